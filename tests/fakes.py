"""Fakes that model state (not call recorders), shared by the unit tests.

FakeKV behaves like store.kvstore.EtcdKV: a revisioned key space with create-if-absent and compare-and-swap
transactions, and an `unavailable` switch that makes every call fail as an unreachable etcd does.
"""

import threading
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from kernel import names
from store.kvstore import Entry, Snapshot
from wire.errors import StoreUnavailable


class FakeKV:
    def __init__(self):
        self.data: Dict[str, Entry] = {}
        self.rev = 1
        self.unavailable = False
        self.fail_after: Optional[int] = None  # number of further writes that succeed before etcd "goes away"
        self._lock = threading.RLock()
        self.endpoints = ("http://fake:2379",)
        self.round_trips = 0  # calls that would each be one request to etcd

    def _check(self, write: bool = False):
        self.round_trips += 1
        if self.unavailable:
            raise StoreUnavailable("etcd unreachable at http://fake:2379 (connection refused)")
        if write and self.fail_after is not None:
            if self.fail_after <= 0:
                self.unavailable = True
                raise StoreUnavailable("etcd unreachable at http://fake:2379 (connection refused)")
            self.fail_after -= 1

    def _put(self, key, value, lease=0):
        self.rev += 1
        old = self.data.get(key)
        self.data[key] = Entry(key, value, self.rev, old.create_revision if old else self.rev, lease)

    def get(self, key: str) -> Optional[Entry]:
        with self._lock:
            self._check()
            return self.data.get(key)

    def get_prefix(self, prefix: str) -> Tuple[List[Entry], int]:
        with self._lock:
            self._check()
            return sorted((e for k, e in self.data.items() if k.startswith(prefix)), key=lambda e: e.key), self.rev

    def read(self, keys: Iterable[str] = (), prefixes: Iterable[str] = ()) -> Snapshot:
        with self._lock:
            self._check()
            return Snapshot(entries={k: self.data.get(k) for k in keys},
                            ranges={p: sorted((e for k, e in self.data.items() if k.startswith(p)),
                                              key=lambda e: e.key) for p in prefixes},
                            revision=self.rev)

    def put(self, key: str, value: str, lease: int = 0) -> int:
        with self._lock:
            self._check(write=True)
            self._put(key, value, lease)
            return self.rev

    def delete(self, key: str) -> bool:
        with self._lock:
            self._check(write=True)
            if key in self.data:
                self.rev += 1
                del self.data[key]
                return True
            return False

    def delete_prefix(self, prefix: str) -> int:
        with self._lock:
            self._check(write=True)
            keys = [k for k in self.data if k.startswith(prefix)]
            if keys:
                self.rev += 1
            for k in keys:
                del self.data[k]
            return len(keys)

    def create(self, key: str, value: str, lease: int = 0) -> bool:
        return self.commit(absent=[key], puts={key: value}, lease=lease)

    def commit(self, absent: Iterable[str] = (), revisions: Optional[Dict[str, int]] = None,
               puts: Optional[Dict[str, str]] = None, deletes: Iterable[str] = (), lease: int = 0,
               unchanged_since: Optional[Dict[str, int]] = None) -> bool:
        with self._lock:
            self._check(write=True)
            if any(k in self.data for k in absent):
                return False
            for prefix, rev in (unchanged_since or {}).items():
                if any(e.mod_revision > rev for k, e in self.data.items() if k.startswith(prefix)):
                    return False
            for k, rev in (revisions or {}).items():
                current = self.data[k].mod_revision if k in self.data else 0
                if current != rev:
                    return False
            self.rev += 1
            for k, v in (puts or {}).items():
                old = self.data.get(k)
                self.data[k] = Entry(k, v, self.rev, old.create_revision if old else self.rev, lease)
            for k in deletes:
                self.data.pop(k, None)
            return True

    # -- leases: keys written under a lease vanish when it expires, as etcd deletes them ----------------------------
    def lease_grant(self, ttl: int) -> int:
        with self._lock:
            self._check(write=True)
            self.leases = getattr(self, "leases", {})
            self.granted = getattr(self, "granted", 1000) + 1
            lease_id = self.granted
            self.leases[lease_id] = ttl
            self.granted_ttls = getattr(self, "granted_ttls", {})
            self.granted_ttls[lease_id] = ttl
            return lease_id

    def lease_keepalive(self, lease_id: int) -> int:
        with self._lock:
            self._check()
            leases = getattr(self, "leases", {})
            if lease_id in leases:
                leases[lease_id] = self.granted_ttls[lease_id]
            return leases.get(lease_id, 0)

    # Called at each lease_ttl read, before the TTL counts down: a test renews "another host's" lease here.
    on_ttl_read: Optional[Callable[[int], None]] = None

    def lease_ttl(self, lease_id: int) -> int:
        """TimeToLive without renewing. Each read stands for one second passing on that lease (the reader polls
        about once a second), so an unrenewed lease counts down and expires as etcd's would."""
        with self._lock:
            self._check()
            if self.on_ttl_read is not None:
                self.on_ttl_read(lease_id)
            leases = getattr(self, "leases", {})
            if lease_id not in leases:
                return 0
            leases[lease_id] -= 1
            if leases[lease_id] <= 0:
                self.expire(lease_id)
                return 0
            return leases[lease_id]

    def expire(self, lease_id: int) -> None:
        """What etcd does TTL seconds after the last renewal."""
        with self._lock:
            self.leases.pop(lease_id, None)
            doomed = [k for k, e in self.data.items() if e.lease == lease_id]
            if doomed:
                self.rev += 1
            for k in doomed:
                del self.data[k]

    def keys(self, prefix: str = "") -> List[str]:
        return sorted(k for k in self.data if k.startswith(prefix))


class FakeDataPlane:
    """The per-network data plane as state: networks (id -> vni, mtu), endpoints per network, peers per network.
Names come from kernel.names, as the real DataPlane's do, so an ID that could not name a kernel object fails
here as it would there.

    `fail_on` names an operation ("ensure_network", "ensure_endpoint") that raises KernelError, to test rollback;
    `stuck` holds network ids and host link names the kernel refuses to remove.
    """

    def __init__(self):
        self.networks = {}  # network id -> {"vni": int, "mtu": int}
        self.endpoints = {}  # network id -> {endpoint id: ifname}
        self.peers = {}  # network id -> {ip: (mac, vtep)}: the remote entries programmed
        self.guarded = {}  # network id -> [(endpoint id, ip, mac)] under anti-spoofing rules
        self.host_links = set()  # leftover vx* links in the host namespace
        self.host_subnets = []  # subnets the host isolation rules cover
        self.fail_on = set()
        self.stuck = set()  # network ids whose namespace, and host link names that, cannot be removed
        self.unknown = set()  # names in the namespace folder with our prefix that are not ours to touch

    def _maybe_fail(self, op):
        if op in self.fail_on:
            from wire.errors import KernelError
            raise KernelError(f"{op}: injected failure")

    def ensure_network(self, network):
        self._maybe_fail("ensure_network")
        names.netns(network.id)
        self.networks[network.id] = {"vni": network.vni, "mtu": network.mtu}
        self.endpoints.setdefault(network.id, {})
        self.peers.setdefault(network.id, {})

    def remove_network(self, network_id, vni=None):
        names.netns(network_id)
        if network_id[:12] in {s[:12] for s in self.stuck}:
            from wire.errors import KernelError
            raise KernelError(f"remove namespace vxnet-{network_id[:12]}: injected failure")
        for nid in [n for n in self.networks if n[:12] == network_id[:12]]:
            del self.networks[nid]
            self.endpoints.pop(nid, None)
            self.peers.pop(nid, None)
            self.guarded.pop(nid, None)  # the table lives in the namespace

    def ensure_endpoint(self, network, endpoint):
        self._maybe_fail("ensure_endpoint")
        if network.id not in self.networks:
            from wire.errors import KernelError
            raise KernelError(f"namespace of {network.id[:12]} does not exist")
        ifname = names.veth_container(endpoint.id)
        self.endpoints[network.id][endpoint.id] = ifname
        return ifname

    def remove_endpoint(self, network_id, endpoint_id):
        names.netns(network_id), names.veth_bridge(endpoint_id)
        self.endpoints.get(network_id, {}).pop(endpoint_id, None)

    def network_ids(self):
        return [n[:12] for n in self.networks]

    def unknown_netns(self):
        return sorted(self.unknown)

    def sweep_host_links(self, endpoint_ids):
        gone = sorted(set(self.host_links) - {"vxc" + e[:11] for e in endpoint_ids})
        failed = [f"delete {name} in host: injected failure" for name in gone if name in self.stuck]
        gone = [name for name in gone if name not in self.stuck]
        self.host_links -= set(gone)
        return gone, failed

    def guard_endpoints(self, network, endpoints):
        if network.id in self.networks:
            self.guarded[network.id] = sorted((e.id, e.ip, e.mac) for e in endpoints)

    def guard_endpoint(self, network, endpoint):
        """Like the real sets: adding needs the table guard_endpoints made; adding twice changes nothing."""
        self._maybe_fail("guard_endpoint")
        if network.id not in self.guarded:
            from wire.errors import KernelError
            raise KernelError(f"anti-spoofing table of {network.id[:12]} does not exist")
        self.guarded[network.id] = sorted(set(self.guarded[network.id]) | {(endpoint.id, endpoint.ip, endpoint.mac)})

    def unguard_endpoint(self, network, endpoint):
        if network.id in self.networks and network.id not in self.guarded:
            from wire.errors import KernelError
            raise KernelError(f"anti-spoofing table of {network.id[:12]} does not exist")
        if network.id in self.guarded:
            self.guarded[network.id] = sorted(set(self.guarded[network.id]) - {(endpoint.id, endpoint.ip,
                                                                                 endpoint.mac)})

    def wired_endpoints(self, network_id, endpoint_ids):
        return {e for e in endpoint_ids if e in self.endpoints.get(network_id, {})}

    def guard_host(self, networks):
        self.host_subnets = sorted({s.pool for n in networks for s in n.subnets})

    def sync_peers(self, network, fdb, neigh):
        self.full_syncs = getattr(self, "full_syncs", 0) + 1
        if network.id in self.networks:
            self.peers[network.id] = {ip: (mac, fdb.get(mac)) for ip, mac in neigh.items()}

    def update_peers(self, network, before, after):
        have = {ip: (mac, before[0].get(mac)) for ip, mac in before[1].items()}
        assert self.peers.get(network.id, {}) == have, "incremental update from a state the kernel is not in"
        fdb, neigh = after
        self.peers[network.id] = {ip: (mac, fdb.get(mac)) for ip, mac in neigh.items()}
