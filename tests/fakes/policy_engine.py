"""netdriver.policy_engine.PolicyEngine as the verdict log (plugin/flows.py) sees it: subscribers told when a
network's namespace gets or loses its policy table, and the names of each member address; and an NFLOG reader
(kernel.nflog.Reader) fed by the test."""

import ipaddress
import threading
from typing import Callable, Dict, List, Optional


class FakePolicyEngine:
    """`names_of[network_id]` is what names() returns; `subnets_of[network_id]` the subnets network_of() looks
    in; up()/down() call every subscriber as the engine does."""

    def __init__(self):
        self.subscribers: List[Callable[[str, str, bool], None]] = []
        self.names_of: Dict[str, Dict[str, dict]] = {}
        self.subnets_of: Dict[str, List[str]] = {}

    def network_of(self, address: str) -> Optional[str]:
        ip = ipaddress.ip_address(address)
        return next((n for n, subnets in self.subnets_of.items()
                     if any(ip in ipaddress.ip_network(s) for s in subnets)), None)

    def subscribe(self, callback: Callable[[str, str, bool], None]) -> None:
        self.subscribers.append(callback)

    def names(self, network_id: str) -> Dict[str, dict]:
        return {address: dict(who) for address, who in self.names_of.get(network_id, {}).items()}

    def up(self, network_id: str, ns: str) -> None:
        for callback in list(self.subscribers):
            callback(network_id, ns, True)

    def down(self, network_id: str, ns: str) -> None:
        for callback in list(self.subscribers):
            callback(network_id, ns, False)


class FakeReader:
    """Records put() are returned by the next read(); read() waits up to its timeout for them."""

    def __init__(self, ns: str):
        self.ns = ns
        self.lost = 0
        self.unparsable = 0
        self.closed = False
        self._pending: list = []
        self._ready = threading.Condition()

    def put(self, *records) -> None:
        with self._ready:
            self._pending.extend(records)
            self._ready.notify_all()

    def read(self, timeout: float) -> list:
        with self._ready:
            self._ready.wait_for(lambda: self._pending, timeout)
            out, self._pending = self._pending, []
            return out

    def close(self) -> None:
        self.closed = True
