"""The per-network data plane: one namespace per network holding its bridges and a VXLAN device, and one veth
pair per endpoint. Kernel objects only: what should exist is decided by the driver and the stores.

Implements netdriver.contracts.DataPlane, whose docstring lists what each method promises.

The forwarding fabric. A Linux bridge takes 1023 ports (kernel/names.py BR_MAX_PORTS), so a network holds its
endpoints on several bridges: the root (br0) with the VXLAN device, the first ENDPOINTS_PER_BRIDGE endpoints and
a trunk port per leaf; leaves br1, br2, ... each with the other end of its trunk (a veth pair) and up to
ENDPOINTS_PER_BRIDGE endpoints. An endpoint goes to the lowest bridge with room (netdriver/placement.py), a leaf
is made when the one below is full and goes when its last endpoint does; a network of up to 1000 endpoints is one
bridge, as before, with no trunk hop. Nothing is learnt and nothing is flooded where it cannot belong:
- learning off on every port: the forwarding entries are static, one on the endpoint's own bridge (mac -> its
  port) and, for an endpoint on a leaf, one on the root (mac -> that leaf's trunk). A Join or a removal costs
  those one or two entries whatever the number of endpoints; no leaf hears of another leaf's endpoints, and a
  frame with a forged source MAC (dropped by anti-spoofing at the forward hook, after the bridge would have learnt
  it) can no longer move another endpoint's entry.
- unknown unicast is flooded only towards the VXLAN device: up a leaf's trunk (its flood flag on), and on the root
  to the VXLAN device alone (flood off on the endpoints' ports and the root's trunk ends). The VXLAN device's own
  table (remote MAC -> VTEP, static from etcd) takes it from there, as before. So an unknown destination costs one
  copy, not one per endpoint on the bridge.
- broadcast and multicast (ARP, neighbour discovery) are flooded to every port of every bridge as before: the
  VXLAN device's proxy answers for the remote addresses, a local endpoint on any bridge answers for its own.
- anti-spoofing (the `bridge vxnet` table, keyed by the input port) judges a frame where it enters the fabric
  from an endpoint's port; a trunk hop enters from a vxt* port, in no set, and passes. A rule that must judge a
  packet once (the policy table) matches the hop that delivers it: `oifname != "vxt*"` (names.TRUNK_PREFIX).
"""

import errno
import logging
import threading
from typing import Callable, Dict, Iterable, List, Optional, Set, Tuple

from kernel import names
from kernel.links import Links
from netdriver.contracts import Firewall, Underlay
from netdriver.drift import NetworkKernel
from netdriver.isolation import ANTI_SPOOFING_SETS, Guarded, list_table_command, listed_sets
from netdriver.models import Endpoint, Network
from netdriver.peerdb import Entries
from netdriver.placement import Placement
from wire.errors import Conflict, KernelError

log = logging.getLogger(__name__)


def _guarded(endpoint: Endpoint) -> Guarded:
    """(bridge port, address, MAC, IPv6 address) of an endpoint, as the anti-spoofing sets hold it."""
    return Guarded(names.veth_bridge(endpoint.id), endpoint.ip.split("/")[0], endpoint.mac,
                   endpoint.ip6.split("/")[0])


def _subnets(networks: List[Network]) -> List[str]:
    """Every IPv4 and IPv6 prefix of these networks (what the host isolation table covers)."""
    return [s.pool for n in networks for s in n.subnets + n.subnets6]


Ports = Dict[str, Tuple[Optional[str], Optional[str], Optional[str]]]  # Links.ports: name -> (kind, master, alias)


def wired_ports(ports: Ports) -> List[Tuple[str, int, Optional[str]]]:
    """(port, bridge index or -1 when on none of ours, endpoint MAC from its alias) of every endpoint port."""
    out = []
    for name, (_, master, alias) in ports.items():
        if names.bridge_port_endpoint(name):
            out.append((name, names.bridge_index(master) if master else -1, alias))
    return sorted(out)


def fabric_differences(ports: Ports, static: Set[Tuple[str, str]]) -> List[Tuple[str, str, Optional[str]]]:
    """What the bridges, trunks and static entries of a namespace lack against the endpoint ports it holds:
    (object, wanted, what is there or None). Pure: the ports and static entries come from Links.ports and
    Links.static_fdb."""
    out: List[Tuple[str, str, Optional[str]]] = []
    used = set()
    for port, k, mac in wired_ports(ports):
        if k < 0:
            out.append((f"port {port}", "on a bridge", ports[port][1]))
            continue
        used.add(k)
        if mac and (port, mac) not in static:
            out.append((f"fdb {mac} on {port}", "static", None))
        if k and mac and (names.trunk_root(k), mac) not in static:
            out.append((f"fdb {mac} on {names.trunk_root(k)}", "static", None))
    for k in sorted(used - {0}):
        bridge = names.bridge(k)
        if ports.get(bridge, (None,))[0] != "bridge":
            out.append((f"bridge {bridge}", "present", None))
        for end, master in ((names.trunk_root(k), names.BRIDGE), (names.trunk_leaf(k), bridge)):
            have = ports.get(end)
            if have is None:
                out.append((f"trunk {end}", f"on {master}", None))
            elif have[1] != master:
                out.append((f"trunk {end}", f"on {master}", f"on {have[1]}"))
    return out


class _Fabric:
    """One namespace's placement as this process holds it (loaded from the kernel by ensure_network)."""

    def __init__(self, placement: Placement):
        self.placement = placement
        self.macs: Dict[str, str] = {}  # port -> endpoint MAC, for the root's entry of an endpoint on a leaf
        # endpoint MAC -> the ports carrying it, oldest first (almost always one): which endpoint an FDB
        # notification names. Two endpoints given one MAC (--mac-address twice) want one static entry each for the
        # same key, which the bridge holds once: the newest wins, as its Join's `fdb replace` made it, and only
        # that one's entries are compared (owner), so a check never moves the entry back and forth.
        self.ports: Dict[str, List[str]] = {}
        self.leaves: Set[int] = set()  # leaves made whole (bridge and trunk) by this process

    def remember(self, port: str, mac: str) -> None:
        self.forget(port)
        self.macs[port] = mac
        self.ports.setdefault(mac, []).append(port)

    def forget(self, port: str) -> None:
        mac = self.macs.pop(port, None)
        if mac is not None:
            holders = self.ports.get(mac, [])
            if port in holders:
                holders.remove(port)
            if not holders:
                self.ports.pop(mac, None)

    def owner(self, mac: str) -> Optional[str]:
        """The port whose static entries a MAC's key should hold (the newest of those carrying it)."""
        holders = self.ports.get(mac)
        return holders[-1] if holders else None


class DataPlane:
    def __init__(self, links: Links, underlay: Underlay, firewall: Optional[Firewall] = None,
                 vxlan_port: int = names.VXLAN_PORT, max_endpoints: int = names.MAX_BRIDGED_ENDPOINTS):
        """underlay: `.require()` -> the VTEP address VXLAN devices send from;
        firewall: the anti-spoofing and isolation rules (None: none);
        max_endpoints: how many endpoints one network holds on this host (plugin/config.py VXNET_MAX_ENDPOINTS)."""
        self.links = links
        self.underlay = underlay
        self.firewall = firewall
        self.vxlan_port = vxlan_port
        self.max_endpoints = max_endpoints
        self._fabrics: Dict[str, _Fabric] = {}  # namespace -> its placement, once loaded
        # namespace -> the lock its placements, removals and (re)loads take, kept across reloads so that a Join
        # placing on the old placement finishes before a rebuild reads the kernel: Joins of one network are
        # placed one at a time, other networks' meanwhile. Reentrant: a placement may load the fabric first.
        self._locks: Dict[str, threading.RLock] = {}
        self._fabrics_lock = threading.Lock()  # guards the two dicts only

    def _lock(self, ns: str) -> "threading.RLock":
        with self._fabrics_lock:
            return self._locks.setdefault(ns, threading.RLock())

    def ensure_network(self, network: Network) -> None:
        ns = names.netns(network.id)
        fresh = not self.links.netns_exists(ns)
        self.links.ensure_netns(ns)
        try:
            self.links.ensure_bridge(ns, names.BRIDGE, network.mtu)
            # Encrypted networks use a port of their own: the IPsec policies select their VXLAN by port alone, and
            # the fail-closed firewall drops cleartext on it (kernel/names.py ENCRYPTED_VXLAN_PORT).
            port = names.ENCRYPTED_VXLAN_PORT if network.encrypted else self.vxlan_port
            try:
                self.links.ensure_vxlan(ns, names.VXLAN, names.vxlan_staging(network.vni), network.vni,
                                        self.underlay.require(), port, network.mtu, names.BRIDGE)
            except KernelError as exc:
                # The kernel allows one VXLAN device per VNI and UDP port in a namespace (vxlan_vni_in_use):
                # EEXIST is a device vxnet's etcd does not know (Docker's own overlay, another tool) holding it.
                if exc.errno != errno.EEXIST:
                    raise
                raise Conflict(f"option vni: VNI {network.vni} is already used by another VXLAN device on this "
                               f"host (UDP port {port}); choose another with -o vni=N") from exc
            # Unknown unicast leaves the root through the VXLAN device alone (module docstring).
            self.links.set_port_flags(ns, names.VXLAN, flood=True)
            self._load_fabric(network)
        except BaseException:
            if fresh:  # no half-built namespace: what this call started, it takes back
                self.remove_network(network.id, network.vni)
            raise

    def _load_fabric(self, network: Network) -> None:
        """Read the namespace's ports (one dump) and static entries (one dump) and make the fabric whole: a leaf
        bridge or trunk someone removed is made again, its endpoints' entries put back, a port left on no bridge
        (its leaf deleted) placed again, a leaf with no endpoint left removed, stale root entries deleted.
        O(endpoints), at CreateNetwork, start-up and a rebuild only; afterwards each Join places in O(1)."""
        ns = names.netns(network.id)
        with self._lock(ns):
            ports = self.links.ports(ns)
            wired = wired_ports(ports)
            placement = Placement.of(self.max_endpoints, [(p, k) for p, k, _ in wired if k >= 0])
            fabric = _Fabric(placement)
            for p, _, mac in wired:
                if mac:
                    fabric.remember(p, mac)
            with self._fabrics_lock:
                self._fabrics[ns] = fabric
            for port, k, mac in wired:
                if k < 0 and mac and placement.room() is not None:  # its bridge went, the veth stayed: placed
                    placement.place(port, network.id)            # again, wired below (else drift reports it)
            static = self.links.static_fdb(ns)
            for k in placement.used():
                self._ensure_leaf(ns, network, fabric, k)
            for name, (kind, _, _) in ports.items():
                k = names.bridge_index(name)
                if k > 0 and kind == "bridge" and not placement.count(k):
                    self._remove_leaf(ns, k)
            for port, k, mac in wired:
                k = placement.bridge_of(port)
                if mac is None or k is None:
                    continue
                if ports[port][1] != names.bridge(k) or (port, mac) not in static:
                    self.links.ensure_veth(ns, port, names.veth_container(names.bridge_port_endpoint(port)),
                                           names.bridge(k), network.mtu, mac)
                if k and (names.trunk_root(k), mac) not in static:
                    self.links.set_static_fdb(ns, names.trunk_root(k), mac)
            leaf_macs = {(names.trunk_root(placement.bridge_of(p)), m) for p, m in fabric.macs.items()
                         if placement.bridge_of(p)}
            root_ends = {names.trunk_root(k) for k in range(1, names.MAX_LEAVES + 1)}
            for port, mac in static:
                if port in root_ends and (port, mac) not in leaf_macs:
                    self.links.del_static_fdb(ns, port, mac)

    def _fabric(self, network: Network) -> _Fabric:
        """The namespace's fabric, loaded first if this process has none; call with its lock held."""
        ns = names.netns(network.id)
        with self._fabrics_lock:
            fabric = self._fabrics.get(ns)
        if fabric is None:
            self._load_fabric(network)
            with self._fabrics_lock:
                fabric = self._fabrics[ns]
        return fabric

    def _ensure_leaf(self, ns: str, network: Network, fabric: _Fabric, k: int) -> None:
        """Leaf k's bridge and trunk (nothing for the root); once per process and leaf unless a rebuild asks."""
        if k == 0 or k in fabric.leaves:
            return
        self.links.ensure_bridge(ns, names.bridge(k), network.mtu)
        self.links.ensure_trunk(ns, names.trunk_root(k), names.trunk_leaf(k), names.BRIDGE, names.bridge(k),
                                network.mtu)
        fabric.leaves.add(k)

    def _remove_leaf(self, ns: str, k: int) -> None:
        """Leaf k's trunk (the root's entries on it go with its port) and bridge."""
        self.links.remove_link(ns, names.trunk_root(k))
        self.links.remove_link(ns, names.bridge(k))

    def remove_network(self, network_id: str, vni: Optional[int] = None) -> None:
        ns = names.netns(network_id)
        with self._fabrics_lock:
            self._fabrics.pop(ns, None)
        if self.links.netns_exists(ns):
            # The kernel dismantles a dropped namespace later, in a work queue; until then its VXLAN device still
            # holds the VNI on the shared UDP socket and a new network given the same VNI fails with EEXIST.
            # Deleting the device first releases the VNI now.
            self.links.remove_link(ns, names.VXLAN)
        self.links.remove_netns(ns)
        if vni is not None:
            # A create that died between making the VXLAN device and moving it leaves it in the host namespace,
            # holding the VNI on the shared UDP socket: the next create with that VNI would fail with EEXIST.
            self.links.remove_link(None, names.vxlan_staging(vni))

    def ensure_endpoint(self, network: Network, endpoint: Endpoint) -> str:
        """The endpoint's veth on the lowest bridge with room (its own on a replay), its static entries, and, when
        it opens a leaf, the leaf's bridge and trunk. Exhausted past max_endpoints, before the kernel is touched.
        A kernel error takes back what this call made for the endpoint (veth, entries, its place) and leaves every
        other endpoint as it was; a leaf it opened goes again."""
        ns = names.netns(network.id)
        port, container_end = names.veth_bridge(endpoint.id), names.veth_container(endpoint.id)
        with self._lock(ns):
            fabric = self._fabric(network)
            placed = fabric.placement.bridge_of(port) is not None
            k = fabric.placement.place(port, network.id)
            try:
                self._ensure_leaf(ns, network, fabric, k)
                self.links.ensure_veth(ns, port, container_end, names.bridge(k), network.mtu, endpoint.mac)
                if k:
                    self.links.set_static_fdb(ns, names.trunk_root(k), endpoint.mac)
            except BaseException:
                if not placed:
                    self._unplace(ns, fabric, port, endpoint.mac)
                raise
            fabric.remember(port, endpoint.mac)
        return container_end

    def _unplace(self, ns: str, fabric: _Fabric, port: str, mac: Optional[str]) -> None:
        """Take a port out: its veth (either end deleted deletes the pair, and its own entry with its port), the
        root's entry for it, its place; a leaf left empty goes too."""
        self.links.remove_link(ns, port)
        self.links.remove_link(None, names.veth_container(names.bridge_port_endpoint(port)))
        k = fabric.placement.free(port)
        fabric.forget(port)
        if k:
            if mac:
                self.links.del_static_fdb(ns, names.trunk_root(k), mac)
            if not fabric.placement.count(k):
                self._remove_leaf(ns, k)
                fabric.leaves.discard(k)

    def remove_endpoint(self, network_id: str, endpoint_id: str) -> None:
        ns = names.netns(network_id)
        port = names.veth_bridge(endpoint_id)
        with self._lock(ns):
            with self._fabrics_lock:
                fabric = self._fabrics.get(ns)
            if fabric is None:  # not loaded by this process: nothing placed to forget, the veth goes all the same
                self.links.remove_link(ns, port)
                self.links.remove_link(None, names.veth_container(endpoint_id))
                return
            self._unplace(ns, fabric, port, fabric.macs.get(port))

    def sweep_host_links(self, endpoint_ids: Callable[[], Iterable[str]]) -> Tuple[List[str], List[str]]:
        """Delete leftovers of ours in the host namespace: VXLAN devices still under their staging name (a create
        that died before moving them) and container-side veth ends of endpoints no record knows. endpoint_ids is
        asked after the links are listed, so an endpoint joined meanwhile is known (its record comes first).
        Returns what went and, one line each, what could not go: one stuck link does not keep the others."""
        present = self.links.list_links(None)
        known = {names.veth_container(e) for e in endpoint_ids()}
        gone, failed = [], []
        for name in present:
            if names.is_vxlan_staging(name) or (names.is_veth_container(name) and name not in known):
                try:
                    self.links.remove_link(None, name)
                except KernelError as exc:
                    failed.append(str(exc))
                    continue
                gone.append(name)
        return gone, failed

    def network_ids(self) -> List[str]:
        return [names.network_id_prefix(n) for n in self.links.list_netns() if names.network_id_prefix(n)]

    def unknown_netns(self) -> List[str]:
        return [n for n in self.links.list_netns() if names.is_unknown_netns(n)]

    def wired_endpoints(self, network_id: str, endpoint_ids: List[str]) -> Set[str]:
        """Those of endpoint_ids whose bridge-side veth is in the network namespace (joined, and still wired),
        from one dump of the namespace's links."""
        ns = names.netns(network_id)
        if not self.links.netns_exists(ns):
            return set()
        have = set(self.links.list_links(ns))
        return {e for e in endpoint_ids if names.veth_bridge(e) in have}

    def sync_peers(self, network: Network, fdb: Dict[str, str], neigh: Dict[str, str]) -> Tuple[int, int]:
        """Make the VXLAN device hold exactly these remote entries: fdb mac -> vtep, neigh ip -> mac.
        Reads what the kernel has, so it also repairs entries someone else changed; returns how many (FDB,
        neighbour) entries it changed (0, 0 when the kernel already held them). No namespace: nothing to do (the
        entries are applied when the namespace is created)."""
        ns = names.netns(network.id)
        if not self.links.netns_exists(ns):
            return 0, 0
        have = (self.links.fdb(ns, names.VXLAN), self.links.neighbours(ns, names.VXLAN))
        return self.update_peers(network, have, (fdb, neigh))

    def update_peers(self, network: Network, before: Entries, after: Entries) -> Tuple[int, int]:
        """Apply only the difference between two (fdb, neigh) tables, without reading the kernel: one watch event
        costs one or two netlink calls however many peers the network has. Returns (FDB, neighbour) changes."""
        ns = names.netns(network.id)
        (old_fdb, old_neigh), (fdb, neigh) = before, after
        changed_fdb = changed_neigh = 0
        for ip in old_neigh.keys() - neigh.keys():
            self.links.del_neigh(ns, names.VXLAN, ip)
            changed_neigh += 1
        for mac, vtep in old_fdb.items():
            if fdb.get(mac) != vtep:
                self.links.del_fdb(ns, names.VXLAN, mac, vtep)
                changed_fdb += 1
        for mac, vtep in fdb.items():
            if old_fdb.get(mac) != vtep:
                self.links.set_fdb(ns, names.VXLAN, mac, vtep)
                changed_fdb += 1
        for ip, mac in neigh.items():
            if old_neigh.get(ip) != mac:
                self.links.set_neigh(ns, names.VXLAN, ip, mac)
                changed_neigh += 1
        return changed_fdb, changed_neigh

    def peer_entries(self, network: Network, macs: Iterable[str], ips: Iterable[str]) -> Entries:
        """(fdb, neigh) of the VXLAN device for these keys alone, as the kernel holds them (one entry read per
        key, not a dump): the `before` of update_peers for a repair of what a notification named."""
        ns = names.netns(network.id)
        macs, ips = list(macs), list(ips)
        return (self.links.fdb_entries(ns, names.VXLAN, macs) if macs else {},
                self.links.neighbour_entries(ns, names.VXLAN, ips) if ips else {})

    def vxlan_index(self, network: Network) -> Optional[int]:
        """The VXLAN device's index in the network's namespace (notifications name devices by index)."""
        return self.links.link_index(names.netns(network.id), names.VXLAN)

    def repair_ports(self, network: Network, ports: Iterable[str] = (), macs: Iterable[str] = ()) -> List[str]:
        """The endpoint ports named (by port name, or by an endpoint MAC an FDB notification carried) against
        what ensure_endpoint made for them: the veth on its bridge, up, its static entry there and, on a leaf,
        the root's entry towards the leaf's trunk. What differs is made again through ensure_endpoint's own
        calls (ensure_veth, set_static_fdb); a port deleted whole is made again with its pair, whose container
        end comes back in the host namespace (the one dockerd had moved into the container went with the pair,
        so that container stays without its interface until dockerd joins it again, which finds this port).
        Ports this process did not place (another tool's links, an endpoint left meanwhile) are not looked at.
        Under the namespace's lock, as a Join's placement and a removal: never half of either. Returns one line
        per port put right; O(ports named), a handful of single-object reads each."""
        ns = names.netns(network.id)
        with self._lock(ns):
            with self._fabrics_lock:
                fabric = self._fabrics.get(ns)
            if fabric is None:
                return []
            named = set(ports) | {port for port in map(fabric.owner, macs) if port is not None}
            repaired = []
            for port in sorted(named):
                k, mac = fabric.placement.bridge_of(port), fabric.macs.get(port)
                if k is None or mac is None:
                    continue
                problem = self._port_problem(ns, port, k, mac, entries=fabric.owner(mac) == port)
                if problem is None:
                    continue
                self.links.ensure_veth(ns, port, names.veth_container(names.bridge_port_endpoint(port)),
                                       names.bridge(k), network.mtu, mac)
                if k and fabric.owner(mac) == port:
                    self.links.set_static_fdb(ns, names.trunk_root(k), mac)
                repaired.append(problem)
            return repaired

    def _port_problem(self, ns: str, port: str, k: int, mac: str, entries: bool) -> Optional[str]:
        """What differs for one placed port (None: nothing); entries: its static entries too (it owns its MAC's
        key). Reads only."""
        info = self.links.link_info(ns, port)
        bridge = names.bridge(k)
        if info is None:
            return f"port {port} missing"
        if info["master"] != bridge:
            return f"port {port} on {info['master']} instead of {bridge}"
        if not info["up"]:
            return f"port {port} down"
        if not entries:
            return None
        have = self.links.static_port(ns, bridge, mac)
        if have != port:
            return f"fdb {mac} on {bridge} {'missing' if have is None else f'towards {have}'} instead of {port}"
        if k:
            have = self.links.static_port(ns, names.BRIDGE, mac)
            if have != names.trunk_root(k):
                return (f"fdb {mac} on {names.BRIDGE} {'missing' if have is None else f'towards {have}'} instead "
                        f"of {names.trunk_root(k)}")
        return None

    def network_problems(self, network: Network) -> List[str]:
        """What is wrong with the network's namespace, bridge and VXLAN device against what ensure_network makes
        (empty: nothing). Reads only."""
        ns = names.netns(network.id)
        if not self.links.netns_exists(ns):
            return [f"namespace {ns} missing"]
        problems = []
        port = names.ENCRYPTED_VXLAN_PORT if network.encrypted else self.vxlan_port
        bridge = self.links.link_info(ns, names.BRIDGE)
        if bridge is None or bridge["kind"] != "bridge":
            problems.append(f"bridge {names.BRIDGE} missing")
        else:
            if not bridge["up"]:
                problems.append(f"bridge {names.BRIDGE} down")
            if bridge["mtu"] != network.mtu:
                problems.append(f"bridge {names.BRIDGE} mtu {bridge['mtu']} instead of {network.mtu}")
        vxlan = self.links.link_info(ns, names.VXLAN)
        if vxlan is None or vxlan["kind"] != "vxlan":
            problems.append(f"VXLAN device {names.VXLAN} missing")
        else:
            for what, have, want in (("vni", vxlan["vni"], network.vni), ("mtu", vxlan["mtu"], network.mtu),
                                     ("master", vxlan["master"], names.BRIDGE), ("up", vxlan["up"], True),
                                     ("port", vxlan.get("port", port), port)):
                if have != want:
                    problems.append(f"VXLAN device {names.VXLAN} {what} {have} instead of {want}")
        problems += self._leaf_problems(network)
        return problems

    def _leaf_problems(self, network: Network) -> List[str]:
        """The leaves this process placed endpoints on, each without its bridge or a trunk end on the right bridge:
        three lookups per leaf, whatever the number of endpoints (the reconciler asks on every pass)."""
        with self._fabrics_lock:
            fabric = self._fabrics.get(names.netns(network.id))
        if fabric is None:
            return []
        ns = names.netns(network.id)
        problems = []
        for k in fabric.placement.used():
            if not k:
                continue
            bridge = self.links.link_info(ns, names.bridge(k))
            if bridge is None or bridge["kind"] != "bridge":
                problems.append(f"leaf bridge {names.bridge(k)} missing")
                continue
            for end, master in ((names.trunk_root(k), names.BRIDGE), (names.trunk_leaf(k), names.bridge(k))):
                info = self.links.link_info(ns, end)
                if info is None:
                    problems.append(f"trunk {end} missing")
                elif info["master"] != master:
                    problems.append(f"trunk {end} on {info['master']} instead of {master}")
        return problems

    def guard_endpoints(self, network: Network, endpoints: List[Endpoint]) -> None:
        """Anti-spoofing in the network's namespace: exactly these endpoints' ports are guarded."""
        ns = names.netns(network.id)
        if self.firewall is not None and self.links.netns_exists(ns):
            self.firewall.guard_endpoints(ns, [_guarded(e) for e in endpoints], network.ipv6)

    def guard_endpoint(self, network: Network, endpoint: Endpoint) -> None:
        """Add this endpoint's port to the anti-spoofing table guard_endpoints made. KernelError if the namespace
        or the table is missing: the caller rebuilds them."""
        if self.firewall is not None:
            self.firewall.guard_endpoint(names.netns(network.id), _guarded(endpoint), network.ipv6)

    def unguard_endpoint(self, network: Network, endpoint: Endpoint) -> None:
        """Take this endpoint's port out of the table; nothing to do without the namespace."""
        ns = names.netns(network.id)
        if self.firewall is not None and self.links.netns_exists(ns):
            self.firewall.unguard_endpoint(ns, _guarded(endpoint), network.ipv6)

    def guard_host(self, networks: List[Network]) -> None:
        """Isolation in the host namespace for the subnets of these networks (all of this host's)."""
        if self.firewall is not None:
            self.firewall.guard_host(_subnets(networks))

    def guard_drift(self, network: Network, endpoints: List[Endpoint]) -> Optional[str]:
        """None if the network's anti-spoofing table is exactly what guard_endpoints(network, endpoints) makes,
        else what differs. No namespace or no firewall: None (nothing to compare)."""
        ns = names.netns(network.id)
        if self.firewall is None or not self.links.netns_exists(ns):
            return None
        return self.firewall.endpoints_drift(ns, [_guarded(e) for e in endpoints], network.ipv6)

    def host_guard_drift(self, networks: List[Network]) -> Optional[str]:
        """None if the host isolation table is exactly what guard_host(networks) makes, else what differs."""
        if self.firewall is None:
            return None
        return self.firewall.host_drift(_subnets(networks))

    def peers(self, network_id: str) -> Entries:
        """(fdb, neigh) as programmed in the kernel, for tests and diagnostics."""
        ns = names.netns(network_id)
        return self.links.fdb(ns, names.VXLAN), self.links.neighbours(ns, names.VXLAN)

    def inspect(self, network: Network, endpoint_ids: List[str]) -> NetworkKernel:
        """What the network's namespace holds (for drift: netdriver/drift.py): its devices, the VXLAN device's
        remote entries, the anti-spoofing elements, and which of endpoint_ids have their veth wired."""
        ns = names.netns(network.id)
        if not self.links.netns_exists(ns):
            return NetworkKernel(namespace=False)
        ports = self.links.ports(ns)
        state = NetworkKernel(namespace=True, bridge=names.BRIDGE in ports,
                              vxlan=self.links.link_info(ns, names.VXLAN),
                              wired={e for e in endpoint_ids if names.veth_bridge(e) in ports},
                              fabric=fabric_differences(ports, self.links.static_fdb(ns)))
        if state.vxlan is not None:
            state.fdb, state.neigh = self.peers(network.id)
        try:
            sets = listed_sets(self.links.nft(ns, list_table_command("bridge"), f"list anti-spoofing in {ns}"))
        except KernelError:
            sets = {}  # no table: every wanted element shows missing
        state.guard = {(name, elem) for name in ANTI_SPOOFING_SETS for elem in sets.get(name, ())}
        return state

    def host_subnets(self) -> Optional[Set[str]]:
        """The IPv4 and IPv6 subnets in the host's isolation sets; None when the table is missing."""
        try:
            listing = self.links.nft(None, list_table_command("inet"), "list isolation rules")
        except KernelError:
            return None
        sets = listed_sets(listing)
        return sets.get("subnets", set()) | sets.get("subnets6", set())
