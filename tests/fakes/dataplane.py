"""The per-network data plane (netdriver.sandbox.DataPlane) as state."""

from kernel import names
from wire.errors import KernelError

VXLAN_INDEX = 3  # the VXLAN device's ifindex in every modelled namespace


def _guarded(endpoint):
    return endpoint.id, endpoint.ip, endpoint.mac, endpoint.ip6


class FakeDataPlane:
    """The per-network data plane as state: networks (id -> vni, mtu), endpoints per network, peers per network.
Names come from kernel.names, as the real DataPlane's do, so an ID that could not name a kernel object fails
here as it would there.

    `fail_on` names an operation ("ensure_network", "ensure_endpoint") that raises KernelError, to test rollback;
    `stuck` holds network ids and host link names the kernel refuses to remove.

    Removed by someone else (what the reconciler repairs): `lose_fdb`, `lose_neigh` (one peer's entry),
    `move_fdb` (one peer's entry pointed at another VTEP), `lose_guard` (an endpoint's anti-spoofing elements),
    `lose_host_guard` (the isolation table), `lose_link` (the VXLAN device), `lose_port` (an endpoint's veth:
    no longer wired), `lose_static` (an endpoint's static bridge entry); `writes` counts every change made to
    the modelled kernel, so a test can tell a pass that changed nothing, and `whole_reads` every read of a
    whole table or namespace (network_problems, sync_peers, guard_drift), so it can tell a narrow pass.
    """

    def __init__(self):
        self.networks = {}  # network id -> {"vni": int, "mtu": int}
        self.endpoints = {}  # network id -> {endpoint id: ifname}
        self.peers = {}  # network id -> {ip or ip6: (mac, vtep)}: the remote entries programmed (ARP and NDP)
        self.guarded = {}  # network id -> [(endpoint id, ip, mac, ip6)] under anti-spoofing rules
        self.dual_stack = {}  # network id -> whether its anti-spoofing table is the dual-stack one
        self.host_links = set()  # leftover vx* links in the host namespace
        self.host_subnets = []  # subnets the host isolation rules cover
        self.fail_on = set()
        self.stuck = set()  # network ids whose namespace, and host link names that, cannot be removed
        self.unknown = set()  # names in the namespace folder with our prefix that are not ours to touch
        self.no_fdb = {}  # network id -> ips whose FDB entry someone deleted (peers keeps the neighbour)
        self.no_neigh = {}  # network id -> ips whose neighbour entry someone deleted
        self.broken = {}  # network id -> problem with its bridge or VXLAN device
        self.host_guard_lost = False
        self.writes = 0
        self.whole_reads = 0
        self.placed = {}  # network id -> {endpoint id: mac}: ports ensure_endpoint made (the fabric's placement)
        self.lost_ports = {}  # network id -> {endpoint id: "port" | "static"}: what someone removed of a port

    # -- someone else -------------------------------------------------------------------------------------------
    def lose_fdb(self, network_id, ip):
        self.no_fdb.setdefault(network_id, set()).add(ip)

    def lose_neigh(self, network_id, ip):
        self.no_neigh.setdefault(network_id, set()).add(ip)

    def lose_guard(self, network_id, endpoint_id):
        self.guarded[network_id] = [g for g in self.guarded[network_id] if g[0] != endpoint_id]

    def lose_host_guard(self):
        self.host_guard_lost = True

    def lose_link(self, network_id):
        self.broken[network_id] = "VXLAN device vxlan0 missing"

    def move_fdb(self, network_id, ip, vtep):
        mac, _ = self.peers[network_id][ip]
        self.peers[network_id][ip] = (mac, vtep)

    def lose_port(self, network_id, endpoint_id):
        """The bridge end deleted: the pair goes, the endpoint is no longer wired."""
        self.endpoints[network_id].pop(endpoint_id)
        self.lost_ports.setdefault(network_id, {})[endpoint_id] = "port"

    def lose_static(self, network_id, endpoint_id):
        self.lost_ports.setdefault(network_id, {}).setdefault(endpoint_id, "static")

    def kernel_peers(self, network_id):
        """(fdb mac -> vtep, neigh ip -> mac) as the modelled kernel holds them."""
        peers = self.peers.get(network_id, {})
        fdb = {mac: vtep for ip, (mac, vtep) in peers.items() if ip not in self.no_fdb.get(network_id, ())}
        neigh = {ip: mac for ip, (mac, _) in peers.items() if ip not in self.no_neigh.get(network_id, ())}
        return fdb, neigh

    def _maybe_fail(self, op):
        if op in self.fail_on:
            raise KernelError(f"{op}: injected failure")

    def ensure_network(self, network):
        self._maybe_fail("ensure_network")
        names.netns(network.id)
        if network.id not in self.networks or self.broken.pop(network.id, None):
            self.writes += 1
        self.networks[network.id] = {"vni": network.vni, "mtu": network.mtu}
        self.endpoints.setdefault(network.id, {})
        self.peers.setdefault(network.id, {})

    def remove_network(self, network_id, vni=None):
        names.netns(network_id)
        if network_id[:12] in {s[:12] for s in self.stuck}:
            raise KernelError(f"remove namespace vxnet-{network_id[:12]}: injected failure")
        for nid in [n for n in self.networks if n[:12] == network_id[:12]]:
            del self.networks[nid]
            self.endpoints.pop(nid, None)
            self.peers.pop(nid, None)
            self.guarded.pop(nid, None)  # the table lives in the namespace

    def ensure_endpoint(self, network, endpoint):
        self._maybe_fail("ensure_endpoint")
        if network.id not in self.networks:
            raise KernelError(f"namespace of {network.id[:12]} does not exist")
        ifname = names.veth_container(endpoint.id)
        self.endpoints[network.id][endpoint.id] = ifname
        self.placed.setdefault(network.id, {})[endpoint.id] = endpoint.mac
        self.lost_ports.get(network.id, {}).pop(endpoint.id, None)
        return ifname

    def remove_endpoint(self, network_id, endpoint_id):
        names.netns(network_id), names.veth_bridge(endpoint_id)
        self.endpoints.get(network_id, {}).pop(endpoint_id, None)
        self.placed.get(network_id, {}).pop(endpoint_id, None)
        self.lost_ports.get(network_id, {}).pop(endpoint_id, None)

    def repair_ports(self, network, ports=(), macs=()):
        """As the real one: only ports ensure_endpoint placed, named by port name or endpoint MAC."""
        ports, macs = set(ports), set(macs)
        fixed = []
        for eid, mac in sorted(self.placed.get(network.id, {}).items()):
            port = names.veth_bridge(eid)
            if port not in ports and mac not in macs:
                continue
            lost = self.lost_ports.get(network.id, {}).pop(eid, None)
            if lost is not None:
                self.endpoints[network.id][eid] = names.veth_container(eid)
                self.writes += 1
                fixed.append(f"port {port} missing" if lost == "port" else f"fdb {mac} on br0 missing")
        return fixed

    def peer_entries(self, network, macs, ips):
        have_fdb, have_neigh = self.kernel_peers(network.id)
        return ({m: have_fdb[m] for m in macs if m in have_fdb}, {i: have_neigh[i] for i in ips if i in have_neigh})

    def vxlan_index(self, network):
        return VXLAN_INDEX if network.id in self.networks else None

    def network_ids(self):
        return [n[:12] for n in self.networks]

    def unknown_netns(self):
        return sorted(self.unknown)

    def sweep_host_links(self, endpoint_ids):
        gone = sorted(set(self.host_links) - {"vxc" + e[:11] for e in endpoint_ids()})
        failed = [f"delete {name} in host: injected failure" for name in gone if name in self.stuck]
        gone = [name for name in gone if name not in self.stuck]
        self.host_links -= set(gone)
        return gone, failed

    def guard_endpoints(self, network, endpoints):
        if network.id in self.networks:
            self.guarded[network.id] = sorted(_guarded(e) for e in endpoints)
            self.dual_stack[network.id] = network.ipv6
            self.writes += 1

    def guard_endpoint(self, network, endpoint):
        """Like the real sets: adding needs the table guard_endpoints made; adding twice changes nothing."""
        self._maybe_fail("guard_endpoint")
        if network.id not in self.guarded:
            raise KernelError(f"anti-spoofing table of {network.id[:12]} does not exist")
        self._same_kind(network)
        self.guarded[network.id] = sorted(set(self.guarded[network.id]) | {_guarded(endpoint)})

    def unguard_endpoint(self, network, endpoint):
        if network.id in self.networks and network.id not in self.guarded:
            raise KernelError(f"anti-spoofing table of {network.id[:12]} does not exist")
        if network.id in self.guarded:
            self._same_kind(network)
            self.guarded[network.id] = sorted(set(self.guarded[network.id]) - {_guarded(endpoint)})

    def _same_kind(self, network):
        """A v4-only table has no IPv6 sets: v6 elements added to it fail, as nftables' ENOENT would."""
        if network.ipv6 and not self.dual_stack.get(network.id):
            raise KernelError(f"anti-spoofing table of {network.id[:12]} has no IPv6 sets")

    def wired_endpoints(self, network_id, endpoint_ids):
        return {e for e in endpoint_ids if e in self.endpoints.get(network_id, {})}

    def guard_host(self, networks):
        self.host_subnets = sorted({s.pool for n in networks for s in n.subnets + n.subnets6})
        self.host_guard_lost = False
        self.writes += 1

    def sync_peers(self, network, fdb, neigh):
        self.full_syncs = getattr(self, "full_syncs", 0) + 1
        self.whole_reads += 1
        if network.id not in self.networks:
            return 0, 0
        have_fdb, have_neigh = self.kernel_peers(network.id)
        changed = (len({m for m in set(have_fdb) | set(fdb) if have_fdb.get(m) != fdb.get(m)}),
                   len({i for i in set(have_neigh) | set(neigh) if have_neigh.get(i) != neigh.get(i)}))
        self.peers[network.id] = {ip: (mac, fdb.get(mac)) for ip, mac in neigh.items()}
        self.no_fdb.pop(network.id, None)
        self.no_neigh.pop(network.id, None)
        self.writes += bool(sum(changed))
        return changed

    def network_problems(self, network):
        self.whole_reads += 1
        if network.id not in self.networks:
            return [f"namespace {names.netns(network.id)} missing"]
        return [self.broken[network.id]] if network.id in self.broken else []

    def guard_drift(self, network, endpoints):
        self.whole_reads += 1
        if network.id not in self.networks:
            return None
        if network.id not in self.guarded:
            return "table missing"
        want = sorted(_guarded(e) for e in endpoints)
        if self.dual_stack.get(network.id) != network.ipv6:
            return "table of the wrong kind (IPv4-only against dual stack)"
        return None if self.guarded[network.id] == want else f"elements {self.guarded[network.id]} not {want}"

    def host_guard_drift(self, networks):
        want = sorted({s.pool for n in networks for s in n.subnets + n.subnets6})
        if self.host_guard_lost:
            return "table missing"
        return None if self.host_subnets == want else f"subnets {self.host_subnets} not {want}"

    def update_peers(self, network, before, after):
        """Only the keys in before/after (one event's), as the real DataPlane: one netlink call per entry that
        differs, counted in entry_writes. The touched keys must be in the state `before` says."""
        have_fdb, have_neigh = self.kernel_peers(network.id)
        (old_fdb, old_neigh), (fdb, neigh) = before, after
        for mac in set(old_fdb) | set(fdb):
            assert have_fdb.get(mac) == old_fdb.get(mac), f"incremental update of FDB {mac} from a state the " \
                "kernel is not in"
        for ip in set(old_neigh) | set(neigh):
            assert have_neigh.get(ip) == old_neigh.get(ip), f"incremental update of neighbour {ip} from a state " \
                "the kernel is not in"
        changed = (len({m for m in set(old_fdb) | set(fdb) if old_fdb.get(m) != fdb.get(m)}),
                   len({i for i in set(old_neigh) | set(neigh) if old_neigh.get(i) != neigh.get(i)}))
        for mac in set(old_fdb) | set(fdb):
            have_fdb.pop(mac, None)
            if mac in fdb:
                have_fdb[mac] = fdb[mac]
        for ip in set(old_neigh) | set(neigh):
            have_neigh.pop(ip, None)
            if ip in neigh:
                have_neigh[ip] = neigh[ip]
        self.peers[network.id] = {ip: (mac, have_fdb.get(mac)) for ip, mac in have_neigh.items()}
        # the keys written are the kernel's now: no longer lost
        self.no_neigh.get(network.id, set()).difference_update(set(old_neigh) | set(neigh))
        written = set(old_fdb) | set(fdb)
        self.no_fdb.get(network.id, set()).difference_update(
            {ip for ip, (mac, _) in self.peers[network.id].items() if mac in written})
        self.entry_writes = getattr(self, "entry_writes", 0) + sum(changed)
        return changed
