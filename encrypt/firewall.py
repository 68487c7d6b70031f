"""Fail closed: VXLAN of encrypted networks never crosses the underlay in clear, whatever state the SAs are in.

Encrypted networks send VXLAN to their own UDP port (kernel/names.py ENCRYPTED_VXLAN_PORT), so cleartext VXLAN of an
encrypted network is recognisable by port alone, without marking packets. Our own nftables table holds two rules:

  input   UDP to the port that did not arrive through IPsec (`meta ipsec missing`: no secpath) is dropped. A
          decrypted packet passes the input hook again with its secpath set, so only cleartext matches.
  output  UDP to the port whose route has no IPsec transformation (`rt ipsec missing`: no XFRM policy matched
          when VXLAN looked its route up) is dropped, before it can leave. The ESP packet that comes out of the
          transformation is protocol 50, not UDP, and passes.

The XFRM policies (level required) already refuse cleartext in both directions; these rules hold when there is
no policy at all: before the first peer is programmed, after a crash between deleting and adding, or while the
plugin restarts (the table stays when the plugin stops). A drop in any nftables table is final, so the rules
hold beside Docker's own.

Every change is one atomic batch of nftables JSON, applied by the caller's `apply(ns, commands, what)` (in the
plugin: netdriver's Links.nft, libnftables on the netlink thread, the one way vxnet writes nftables); `ensure()`
re-creates the whole table in one transaction (add, delete, add), so a replay converges on exactly these rules
and there is no moment without them.
"""

from typing import Callable, Dict, List, Optional, Tuple

from kernel import libnftables, names
from wire.errors import KernelError

TABLE = names.IPSEC_TABLE
FAMILY = "inet"

# Rule comments double as labels: counters() reports by them and a reader of `nft list ruleset` sees why.
LABEL_IN = "vxnet: drop cleartext VXLAN of encrypted networks arriving without IPsec"
LABEL_OUT = "vxnet: drop cleartext VXLAN of encrypted networks leaving without an IPsec policy"


class Firewall:
    """The vxnet_ipsec table in one network namespace (ns None: the plugin's own, i.e. the host's).

    apply(ns, commands, what) -> JSON output: runs nftables JSON commands as one transaction in ns, KernelError
    naming `what` if refused (Links.nft)."""

    def __init__(self, port: int, apply: Callable[[Optional[str], List[dict], str], str], ns: Optional[str] = None):
        self.port = port
        self._apply = apply
        self.ns = ns

    def _table(self) -> dict:
        return {"family": FAMILY, "name": TABLE}

    def _rule(self, chain: str, label: str, condition: dict) -> dict:
        return {"add": {"rule": {"family": FAMILY, "table": TABLE, "chain": chain, "comment": label, "expr": [
            {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "udp"}},
            {"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}}, "right": self.port}},
            {"match": {"op": "==", "left": condition, "right": False}},
            {"counter": None},
            {"drop": None},
        ]}}}

    def batch(self) -> List[dict]:
        """The ensure() commands (exposed for tests and for reading)."""
        table = self._table()
        chains = [{"add": {"chain": {"family": FAMILY, "table": TABLE, "name": hook, "type": "filter", "hook": hook,
                                     "prio": 0, "policy": "accept"}}} for hook in ("input", "output")]
        return [
            {"add": {"table": table}},
            {"delete": {"table": table}},
            {"add": {"table": table}},
            *chains,
            self._rule("input", LABEL_IN, {"meta": {"key": "ipsec"}}),
            self._rule("output", LABEL_OUT, {"rt": {"key": "ipsec"}}),
        ]

    def ensure(self) -> None:
        """Create or re-create the table with exactly our two rules, atomically. Idempotent."""
        self._apply(self.ns, self.batch(), f"install the {TABLE} nftables table")

    def remove(self) -> None:
        """Remove the table (only when no encrypted network is left). Idempotent."""
        table = self._table()
        self._apply(self.ns, [{"add": {"table": table}}, {"delete": {"table": table}}],
                    f"remove the {TABLE} nftables table")

    def present(self) -> bool:
        return set(self.counters()) == {LABEL_IN, LABEL_OUT}

    def counters(self) -> Dict[str, int]:
        """Packets dropped so far by each of our rules, by label; {} if the table is absent."""
        return {label: packets for label, (packets, _) in self._read().items()}

    def dropped(self) -> Tuple[int, int]:
        """(packets, bytes) of cleartext VXLAN both rules have dropped since the table was made; (0, 0) if the
        table is absent."""
        counts = [value for label, value in self._read().items() if label in (LABEL_IN, LABEL_OUT)]
        return sum(p for p, _ in counts), sum(b for _, b in counts)

    def _read(self) -> Dict[str, Tuple[int, int]]:
        try:
            text = self._apply(self.ns, [{"list": {"table": self._table()}}], f"read the {TABLE} nftables table")
        except KernelError as exc:
            if "No such file or directory" in str(exc):
                return {}
            raise
        return libnftables.rule_counters(text or "")
