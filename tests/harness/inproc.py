"""One simulated host's plugin in this process, for the scale bench (bench/scale.py) and the restart test
(tests/kernel/test_restart_scale.py): the driver, the peer table and the peer watch over the real kernel (a
namespace folder of the caller's) and a real etcd, composed as plugin/main.py composes them, with the kernel
writes counted; and synthetic remote peers written straight into etcd through the store's schema."""

import os
import time
from typing import Callable, Dict, List, Optional

from pyroute2 import IPRoute

from kernel import names
from kernel.events import KernelEvents
from kernel.links import Links
from netdriver.driver import NetworkDriver
from netdriver.isolation import Firewall
from netdriver.models import PeerRecord
from netdriver.peerdb import PeerDB
from netdriver.reconciler import NamespaceTap, Reconciler
from netdriver.sandbox import DataPlane
from netdriver.store import NetworkStore, segment_of
from netdriver.underlay import Underlay
from netdriver.watcher import PeerSync, PeerWatcher
from store.kvstore import EtcdKV
from wire import protocol as p

# etcd's default --max-txn-ops: a transaction of more puts is refused.
TXN_PUTS = 128
WRITES = ("set_fdb", "del_fdb", "set_neigh", "del_neigh", "ensure_veth", "remove_link", "ensure_bridge",
          "ensure_vxlan", "remove_netns")


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


_host_netlink: Optional[IPRoute] = None


def move_link(name: str, netns_path: str) -> None:
    """Move a link of the host namespace into the namespace mounted at netns_path (dockerd's part at Join)."""
    global _host_netlink
    if _host_netlink is None:
        _host_netlink = IPRoute()
    fd = os.open(netns_path, os.O_RDONLY)
    try:
        _host_netlink.link("set", index=_host_netlink.link_lookup(ifname=name)[0], net_ns_fd=fd)
    finally:
        os.close(fd)


class Node:
    """One simulated host's plugin, in this process: start() composes it (and reconciles), stop() drops it with
    its kernel handles, leaving the kernel as a stopped plugin leaves it. reconcile_seconds: the self-healing
    reconciler's period as VXNET_RECONCILE_SECONDS sets it (30 by default, as the plugin's; 0: no reconciler), with
    its netlink listener in the networks' namespaces (not the host's: this machine's own nftables and XFRM changes
    are no part of the simulated host)."""

    def __init__(self, etcd_url: str, prefix: str, netns_dir: str, host_id: str = "h1",
                 vtep: str = "127.0.0.1", reconcile_seconds: float = 30.0):
        self.reconcile_seconds = reconcile_seconds
        self.healing: Optional[Reconciler] = None
        self.kv = EtcdKV([etcd_url])
        self.prefix, self.netns_dir, self.host_id, self.vtep = prefix, netns_dir, host_id, vtep
        self.store = NetworkStore(self.kv, prefix)
        self.writes: Dict[str, int] = {}
        self.nft_writes: Dict[Optional[str], int] = {}  # namespace (None: the host's) -> nft batches that write
        self.on_update: Optional[Callable[[dict, dict], None]] = None  # (before fdb, after fdb) per peer event
        self.links: Optional[Links] = None

    def start(self) -> float:
        """Compose and reconcile as plugin/main.py does; returns the seconds until the kernel matches etcd."""
        self.links = Links(self.netns_dir)
        self._count_writes(self.links)
        underlay = Underlay(lambda a: 1500, self.vtep)
        self.plane = DataPlane(self.links, underlay, Firewall(self.links.nft))
        plane_update = self.plane.update_peers

        def update_peers(network, before, after):
            changed = plane_update(network, before, after)
            if self.on_update is not None:
                self.on_update(before[0], after[0])
            return changed
        self.plane.update_peers = update_peers
        self.sync = PeerSync(PeerDB(self.host_id), self.plane)
        tap = NamespaceTap(self.sync)
        self.driver = NetworkDriver(self.store, self.plane, self.host_id, "local", underlay, peers=tap)
        self.watcher = PeerWatcher(self.kv, self.store, self.sync)
        healing = None
        if self.reconcile_seconds:
            events = KernelEvents(self.links.netns_path,
                                  lambda ns, kind, objects: healing.notify(ns, kind, objects) if healing else None,
                                  host=False, own_committer=self.links.nft_committer)
            tap.attach(events.watch, events.unwatch)
            healing = Reconciler(self.driver, self.sync, None, self.reconcile_seconds, watch=events.watch,
                                 listener=events)
        started = time.monotonic()
        self.driver.reconcile()
        self.watcher.start()
        if not self.sync.wait_loaded(120):
            raise RuntimeError("the peer watch did not read etcd within 120 s")
        took = time.monotonic() - started
        if healing is not None:  # as plugin/main.py: once the kernel is right
            healing.start()
            self.healing = healing
        return took

    def _count_writes(self, links: Links) -> None:
        for name in WRITES:
            method = getattr(links, name)

            def counted(*args, _method=method, _name=name, **kwargs):
                self.writes[_name] = self.writes.get(_name, 0) + 1
                return _method(*args, **kwargs)
            setattr(links, name, counted)
        nft = links.nft

        def nft_counted(ns, commands, what):
            if any(next(iter(c)) != "list" for c in commands):
                self.nft_writes[ns] = self.nft_writes.get(ns, 0) + 1
            return nft(ns, commands, what)
        links.nft = nft_counted

    def stop(self) -> None:
        if self.healing is not None:
            self.healing.stop()
            self.healing = None
        self.watcher.stop()
        self.links.close()
        self.links = None

    # -- what dockerd and other hosts would do ---------------------------------------------------------------
    def create_network(self, nid: str, vni: int, subnet: str) -> None:
        self.driver.create_network(p.CreateNetworkRequest.decode({
            "NetworkID": nid, "Options": {"com.docker.network.generic": {"vni": str(vni)}},
            "IPv4Data": [{"AddressSpace": "bench", "Pool": subnet, "Gateway": ""}], "IPv6Data": None}))

    def attach(self, nid: str, eid: str, address: str, holder: Optional[str] = None) -> float:
        """CreateEndpoint + Join, timed (seconds); holder: then move the container end into the namespace at
        that path, as dockerd moves it into the container (not timed). Left in the host namespace, the end is
        what any vxnet start-up on this machine (another test's plugin) sweeps as a leftover it does not know,
        taking the pair with it."""
        started = time.monotonic()
        self.driver.create_endpoint(p.CreateEndpointRequest.decode({
            "NetworkID": nid, "EndpointID": eid, "Interface": {"Address": address, "MacAddress": ""}}))
        self.driver.join(p.JoinRequest.decode({"NetworkID": nid, "EndpointID": eid,
                                               "SandboxKey": "/var/run/docker/netns/vxscale"}))
        took = time.monotonic() - started
        if holder is not None:
            move_link(names.veth_container(eid), holder)
        return took

    def detach(self, nid: str, eid: str) -> None:
        req = p.EndpointRequest.decode({"NetworkID": nid, "EndpointID": eid})
        self.driver.leave(req)
        self.driver.delete_endpoint(req)

    def delete_network(self, nid: str) -> None:
        self.driver.delete_network(p.NetworkIDRequest.decode({"NetworkID": nid}))


def remove_all(node: Node, nid: str, eids: List[str], prefix: str, netns_dir: str, ns: str) -> None:
    """What a test made through node, gone: its endpoints, network and node (if it started), then whatever is left
    of it in etcd (under prefix) and its namespace, even when the node never started or broke half-way."""
    try:
        if node.links is not None:
            for eid in eids:
                node.detach(nid, eid)
            node.delete_network(nid)
            node.stop()
    finally:
        node.kv.delete_prefix(prefix + "/")
        cleaner = Links(netns_dir)
        cleaner.remove_netns(ns)
        cleaner.close()


def peer_record(nid: str, i: int, vtep: str) -> PeerRecord:
    """The i-th synthetic remote endpoint (i < 2**16) of a network on 10.128.0.0/9-style addresses: 10.x.y.z."""
    ip = f"10.{200 + (i >> 16)}.{i >> 8 & 255}.{i & 255}"
    mac = "02:43:" + ":".join(f"{int(o):02x}" for o in ip.split("."))
    return PeerRecord(network_id=nid, endpoint_id=f"{0xbe000000 + i:064x}", ip=ip, mac=mac, vtep=vtep,
                      host=f"remote{i % 20}")


def write_peers(node: Node, nid: str, records: List[PeerRecord]) -> None:
    segment = segment_of(nid, None)
    for start in range(0, len(records), TXN_PUTS):
        puts = {node.store.keys.peer(segment, r.endpoint_id): r.to_json() for r in records[start:start + TXN_PUTS]}
        node.kv.commit(puts=puts)


def wait_for(check: Callable[[], bool], timeout: float, what: str, step: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout:.0f} s")
        time.sleep(step)
