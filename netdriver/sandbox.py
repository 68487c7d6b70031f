"""The per-network data plane: one namespace per network holding a bridge and a VXLAN device, and one veth
pair per endpoint. Kernel objects only: what should exist is decided by the driver and the stores.

Implements netdriver.contracts.DataPlane, whose docstring lists what each method promises.
"""

import errno
import logging
from typing import Callable, Dict, Iterable, List, Optional, Set, Tuple

from kernel import names
from kernel.links import Links
from netdriver.contracts import Firewall, Underlay
from netdriver.drift import NetworkKernel
from netdriver.isolation import ANTI_SPOOFING_SETS, Guarded, list_table_command, listed_sets
from netdriver.models import Endpoint, Network
from netdriver.peerdb import Entries
from wire.errors import Conflict, KernelError

log = logging.getLogger(__name__)


def _guarded(endpoint: Endpoint) -> Guarded:
    """(bridge port, address, MAC, IPv6 address) of an endpoint, as the anti-spoofing sets hold it."""
    return Guarded(names.veth_bridge(endpoint.id), endpoint.ip.split("/")[0], endpoint.mac,
                   endpoint.ip6.split("/")[0])


def _subnets(networks: List[Network]) -> List[str]:
    """Every IPv4 and IPv6 prefix of these networks (what the host isolation table covers)."""
    return [s.pool for n in networks for s in n.subnets + n.subnets6]


class DataPlane:
    def __init__(self, links: Links, underlay: Underlay, firewall: Optional[Firewall] = None,
                 vxlan_port: int = names.VXLAN_PORT):
        """underlay: `.require()` -> the VTEP address VXLAN devices send from;
        firewall: the anti-spoofing and isolation rules (None: none)."""
        self.links = links
        self.underlay = underlay
        self.firewall = firewall
        self.vxlan_port = vxlan_port

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
        except BaseException:
            if fresh:  # no half-built namespace: what this call started, it takes back
                self.remove_network(network.id, network.vni)
            raise

    def remove_network(self, network_id: str, vni: Optional[int] = None) -> None:
        ns = names.netns(network_id)
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
        ns = names.netns(network.id)
        container_end = names.veth_container(endpoint.id)
        self.links.ensure_veth(ns, names.veth_bridge(endpoint.id), container_end, names.BRIDGE, network.mtu,
                               endpoint.mac)
        return container_end

    def remove_endpoint(self, network_id: str, endpoint_id: str) -> None:
        # Deleting either end deletes the pair; the container end may already sit in a container namespace.
        self.links.remove_link(names.netns(network_id), names.veth_bridge(endpoint_id))
        self.links.remove_link(None, names.veth_container(endpoint_id))

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
        have = set(self.links.list_links(ns))
        state = NetworkKernel(namespace=True, bridge=names.BRIDGE in have,
                              vxlan=self.links.link_info(ns, names.VXLAN),
                              wired={e for e in endpoint_ids if names.veth_bridge(e) in have})
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
