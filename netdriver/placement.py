"""Which bridge of a network namespace each endpoint's port sits on: pure arithmetic, no I/O.

A network namespace holds bridge 0 (the root, with the VXLAN device) and leaves 1.. (kernel/names.py says why a
bridge holds ENDPOINTS_PER_BRIDGE endpoints at most). An endpoint goes to the lowest bridge with room, so a network
of up to ENDPOINTS_PER_BRIDGE endpoints is one bridge, as before there were leaves, and a port freed on a low bridge
is the next one taken. The whole network holds at most `limit` endpoints on one host (plugin/config.py
VXNET_MAX_ENDPOINTS): past it a placement is refused, in vxnet's words, before any kernel object is made.

Every operation is O(bridges) at most (23), never O(endpoints).
"""

from typing import Dict, Iterable, List, Optional, Tuple

from kernel import names
from wire.errors import Exhausted


def limit_message(network_id: str, limit: int) -> str:
    """The refusal a CreateEndpoint or Join past the limit returns (what `docker run` prints)."""
    return (f"network {network_id[:12]} holds at most {limit} endpoints on this host (VXNET_MAX_ENDPOINTS; "
            f"vxnet's bridges take {names.MAX_BRIDGED_ENDPOINTS} at most)")


class Placement:
    """Ports (bridge-side veth names) -> bridge index, for one network namespace."""

    def __init__(self, limit: int, per_bridge: int = names.ENDPOINTS_PER_BRIDGE,
                 bridges: int = 1 + names.MAX_LEAVES):
        if not 1 <= limit <= per_bridge * bridges:
            raise ValueError(f"limit {limit}: between 1 and {per_bridge * bridges} ({bridges} bridges of "
                             f"{per_bridge})")
        self.limit, self.per_bridge, self.bridges = limit, per_bridge, bridges
        self._where: Dict[str, int] = {}
        self._count: List[int] = [0] * bridges

    @classmethod
    def of(cls, limit: int, ports: Iterable[Tuple[str, int]], per_bridge: int = names.ENDPOINTS_PER_BRIDGE,
           bridges: int = 1 + names.MAX_LEAVES) -> "Placement":
        """The placement the kernel holds: (port, bridge index) pairs as read from it. Taken as they are, even past
        a bridge's share or the limit (a smaller limit after a restart): nothing wired is moved; only new
        placements wait until there is room again."""
        placement = cls(limit, per_bridge, bridges)
        for port, k in ports:
            if 0 <= k < bridges and port not in placement._where:
                placement._where[port] = k
                placement._count[k] += 1
        return placement

    def __len__(self) -> int:
        return len(self._where)

    def bridge_of(self, port: str) -> Optional[int]:
        return self._where.get(port)

    def count(self, k: int) -> int:
        return self._count[k]

    def used(self) -> List[int]:
        """The bridges holding at least one port, lowest first."""
        return [k for k, n in enumerate(self._count) if n]

    def ports(self, k: int) -> List[str]:
        """The ports on bridge k (O(endpoints): for repairs, never per event)."""
        return sorted(p for p, b in self._where.items() if b == k)

    def room(self) -> Optional[int]:
        """The bridge the next new port goes to, None when the limit or every bridge is full."""
        if len(self._where) >= self.limit:
            return None
        return next((k for k, n in enumerate(self._count) if n < self.per_bridge), None)

    def place(self, port: str, network_id: str = "") -> int:
        """The port's bridge: the one it has (a replay), else the lowest with room. Exhausted past the limit."""
        k = self._where.get(port)
        if k is not None:
            return k
        k = self.room()
        if k is None:
            raise Exhausted(limit_message(network_id, min(self.limit, self.per_bridge * self.bridges)))
        self._where[port] = k
        self._count[k] += 1
        return k

    def free(self, port: str) -> Optional[int]:
        """Forget the port; returns the bridge it was on (None: it had none)."""
        k = self._where.pop(port, None)
        if k is not None:
            self._count[k] -= 1
        return k
