"""Desired against programmed: what this host's kernel should hold for its networks, what it holds, and the
differences, one line each. Pure: the desired side comes from records (etcd), the programmed side from a
reader of the kernel (cli/status.py); nothing here does I/O.

A difference names the network (12-character ID, or "host" for the host namespace), the kind of kernel object
(namespace, bridge, vxlan, fabric: leaves, trunks and their static entries, fdb, neighbour,
anti-spoofing, isolation, sa), the object (a MAC, an address, a set
element, a VTEP pair) and what is wanted and what is there (None: absent).
"""

import dataclasses
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

from netdriver.isolation import Guarded, element_text, endpoint_elements
from netdriver.models import Endpoint, Network, PeerRecord
from netdriver.peerdb import PeerDB
from netdriver.store import segment_of


@dataclasses.dataclass(frozen=True)
class Difference:
    network: str
    kind: str
    object: str
    want: Optional[str]
    have: Optional[str]

    def text(self) -> str:
        if self.have is None:
            return f"{self.network} {self.kind} {self.object}: missing (want {self.want})"
        if self.want is None:
            return f"{self.network} {self.kind} {self.object}: not wanted (kernel has {self.have})"
        return f"{self.network} {self.kind} {self.object}: kernel has {self.have}, want {self.want}"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class NetworkKernel:
    """What one network's namespace holds, as read from the kernel. vxlan: link_info of the VXLAN device
    ({"vni", "master", "up", ...}) or None; guard: the anti-spoofing set elements as (set, element text)."""

    namespace: bool
    bridge: bool = False
    vxlan: Optional[dict] = None
    fdb: Dict[str, str] = dataclasses.field(default_factory=dict)
    neigh: Dict[str, str] = dataclasses.field(default_factory=dict)
    guard: Set[Tuple[str, str]] = dataclasses.field(default_factory=set)
    wired: Set[str] = dataclasses.field(default_factory=set)  # endpoint IDs whose bridge-side veth is here
    # What the leaves, trunks and static bridge entries lack (netdriver/sandbox.py fabric_differences):
    # (object, wanted, what is there or None).
    fabric: List[Tuple[str, str, Optional[str]]] = dataclasses.field(default_factory=list)


def guard_elements(endpoints: Sequence[Guarded], ipv6: bool = False) -> Set[Tuple[str, str]]:
    """Endpoints -> the anti-spoofing set elements as (set name, "port" or "port . value"), the text
    `nft list set` shows (element_text); ipv6: a dual-stack network's table, with its IPv6 sets."""
    return {(name, element_text(elem)) for name, elems in endpoint_elements(list(endpoints), ipv6)
            for elem in elems}


def desired_peers(host_id: str, records: Iterable[Tuple[str, int, PeerRecord]], segment: str) -> Tuple[
        Dict[str, str], Dict[str, str]]:
    """The (fdb, neigh) a segment's VXLAN device should hold here, from every peer record (the plugin's PeerDB
    rules: other hosts' records only, the newest record wins a shared MAC or address)."""
    db = PeerDB(host_id)
    db.replace(records)
    return db.entries(segment)


def _entries(network: str, kind: str, want: Dict[str, str], have: Dict[str, str]) -> List[Difference]:
    out = []
    for key in sorted(want.keys() | have.keys()):
        if want.get(key) != have.get(key):
            out.append(Difference(network, kind, key, want.get(key), have.get(key)))
    return out


def network_differences(network: Network, host_id: str, endpoints: Iterable[Endpoint],
                        peers: Iterable[Tuple[str, int, PeerRecord]], kernel: NetworkKernel,
                        port_of) -> List[Difference]:
    """Differences for one network this host is a member of. endpoints: the network's endpoint records;
    peers: every peer record (segment, revision, record); port_of(endpoint_id) -> the bridge-side veth name."""
    nid = network.id[:12]
    if not kernel.namespace:
        return [Difference(nid, "namespace", nid, "present", None)]
    out = []
    if not kernel.bridge:
        out.append(Difference(nid, "bridge", "bridge", "present", None))
    if kernel.vxlan is None:
        out.append(Difference(nid, "vxlan", f"vni {network.vni}", "present", None))
    else:
        if kernel.vxlan.get("vni") != network.vni:
            out.append(Difference(nid, "vxlan", "vni", str(network.vni), str(kernel.vxlan.get("vni"))))
        if not kernel.vxlan.get("up"):
            out.append(Difference(nid, "vxlan", "state", "up", "down"))
    out += [Difference(nid, "fabric", obj, want, have) for obj, want, have in kernel.fabric]
    fdb, neigh = desired_peers(host_id, peers, segment_of(network.id, network.overlay))
    out += _entries(nid, "fdb", fdb, kernel.fdb)
    out += _entries(nid, "neighbour", neigh, kernel.neigh)
    # Anti-spoofing covers this host's endpoints whose veth is wired (an endpoint created but not joined has no
    # port yet), as the driver's _guard builds it.
    mine = [e for e in endpoints if e.host == host_id and e.id in kernel.wired]
    want = guard_elements([Guarded(port_of(e.id), e.ip.split("/")[0], e.mac, e.ip6.split("/")[0]) for e in mine],
                          network.ipv6)
    for name, elem in sorted(want - kernel.guard):
        out.append(Difference(nid, "anti-spoofing", f"{name} {elem}", "present", None))
    for name, elem in sorted(kernel.guard - want):
        out.append(Difference(nid, "anti-spoofing", f"{name} {elem}", None, "present"))
    return out


def isolation_differences(networks: Iterable[Network], have: Optional[Set[str]]) -> List[Difference]:
    """The host isolation sets (IPv4 and IPv6) against the subnets of this host's networks; have None: no table."""
    want = {s.pool for n in networks for s in n.subnets + n.subnets6}
    if have is None:
        return [Difference("host", "isolation", "table", "present", None)]
    return ([Difference("host", "isolation", s, "present", None) for s in sorted(want - have)] +
            [Difference("host", "isolation", s, None, "present") for s in sorted(have - want)])


def sa_differences(local: Optional[str], remote_vteps: Iterable[str],
                   have_pairs: Iterable[Tuple[str, str]]) -> List[Difference]:
    """ESP SAs of ours against the peers of this host's encrypted networks: one SA each way per remote VTEP
    (src, dst). local None: the VTEP is not known, nothing can be said."""
    if local is None:
        return []
    want = set()
    for vtep in set(remote_vteps):
        want |= {(local, vtep), (vtep, local)}
    have = set(have_pairs)
    return ([Difference("host", "sa", f"{s} -> {d}", "present", None) for s, d in sorted(want - have)] +
            [Difference("host", "sa", f"{s} -> {d}", None, "present") for s, d in sorted(have - want)
             if s == local or d == local])
