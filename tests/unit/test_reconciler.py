"""The reconciler over the driver, PeerSync and the fakes: what someone else removed is put back, each repair
counted and logged once, a pass over a kernel that is right changes nothing, its own repairs are followed by at
most one quiet pass, and a Join under way is never taken for drift."""

import logging
import threading

from prometheus_client import REGISTRY

from kernel import names
from netdriver.driver import NetworkDriver
from netdriver.models import PeerRecord
from netdriver.peerdb import PeerDB
from netdriver.reconciler import NamespaceTap, Reconciler
from netdriver.store import NetworkStore
from netdriver.underlay import Underlay
from netdriver.watcher import PeerSync
from tests.fakes import FakeDataPlane, FakeEncryption, FakeKV
from tests.harness.proc import wait_until
from wire import protocol as p

NID = "a" * 64
EID = "e" * 64
PEER_IP, PEER_MAC, PEER_VTEP = "10.1.0.9", "02:42:0a:01:00:09", "192.0.2.2"


def repairs(kind):
    return REGISTRY.get_sample_value("vxnet_repairs_total", {"kind": kind}) or 0.0


def build(encryption=None):
    kv, plane = FakeKV(), FakeDataPlane()
    sync = PeerSync(PeerDB("h1"), plane)
    tap = NamespaceTap(sync)
    drv = NetworkDriver(NetworkStore(kv), plane, "h1", "local", Underlay(lambda a: 1500, "192.0.2.1"), peers=tap)
    drv.create_network(p.CreateNetworkRequest.decode({
        "NetworkID": NID, "Options": {"com.docker.network.generic": {}},
        "IPv4Data": [{"AddressSpace": "vxnet-local", "Pool": "10.1.0.0/24", "Gateway": "10.1.0.1/24"}],
        "IPv6Data": None}))
    drv.create_endpoint(p.CreateEndpointRequest.decode({"NetworkID": NID, "EndpointID": EID,
                                                        "Interface": {"Address": "10.1.0.5/24"}}))
    drv.join(p.JoinRequest.decode({"NetworkID": NID, "EndpointID": EID, "SandboxKey": "/var/run/docker/netns/x",
                                   "Options": {}}))
    sync.resync([(NID, 5, PeerRecord(network_id=NID, endpoint_id="f" * 64, ip=PEER_IP, mac=PEER_MAC,
                                     vtep=PEER_VTEP, host="h2"))])
    rec = Reconciler(drv, sync, encryption, interval=0, debounce=0.01)
    return rec, drv, plane, tap


def test_a_pass_over_a_kernel_that_is_right_changes_nothing():
    rec, drv, plane, _ = build(FakeEncryption())
    writes = plane.writes
    assert rec.run_pass("periodic") == {}
    assert plane.writes == writes


def test_what_someone_else_removed_is_put_back_counted_and_logged(caplog):
    rec, drv, plane, _ = build()
    ns = names.netns(NID)
    before = {k: repairs(k) for k in ("fdb", "neighbour", "anti-spoofing", "isolation", "link")}
    guarded = list(plane.guarded[NID])
    plane.lose_fdb(NID, PEER_IP)
    assert plane.kernel_peers(NID)[0] == {}  # the loss is real in the model (control)
    with caplog.at_level(logging.WARNING, logger="netdriver.reconciler"):
        assert rec.run_pass("event", {ns: {"fdb"}}) == {"fdb": 1}
    assert plane.kernel_peers(NID) == ({PEER_MAC: PEER_VTEP}, {PEER_IP: PEER_MAC})
    assert f'repair kind=fdb where={ns} nid={NID[:12]} count=1' in caplog.text
    assert 'why="event pass after fdb events"' in caplog.text

    plane.lose_neigh(NID, PEER_IP)
    assert rec.run_pass("event", {ns: {"neighbour"}}) == {"neighbour": 1}
    plane.lose_guard(NID, EID)
    assert plane.guarded[NID] != guarded
    assert rec.run_pass("event", {ns: {"nft"}}) == {"anti-spoofing": 1}
    assert plane.guarded[NID] == guarded
    plane.lose_host_guard()
    assert rec.run_pass("event", {None: {"nft"}}) == {"isolation": 1}
    plane.lose_link(NID)
    assert rec.run_pass("event", {ns: {"link"}}) == {"link": 1}
    assert plane.network_problems(drv.ready_networks()[0]) == []
    after = {k: repairs(k) for k in before}
    assert {k: after[k] - before[k] for k in before} == {k: 1 for k in before}
    assert rec.run_pass("periodic") == {}  # and all is quiet again


def test_an_event_pass_looks_only_where_and_at_what_changed():
    rec, drv, plane, _ = build()
    plane.lose_fdb(NID, PEER_IP)
    assert rec.run_pass("event", {names.netns(NID): {"nft"}}) == {}  # not an FDB event: not looked at
    assert rec.run_pass("event", {"vxnet-000000000000": {"fdb"}}) == {}  # another namespace
    assert plane.kernel_peers(NID)[0] == {}
    assert rec.run_pass("event", {names.netns(NID): {"fdb"}}) == {"fdb": 1}  # the same loss, found (control)


def test_ipsec_repairs_come_from_the_encryption_manager():
    enc = FakeEncryption()
    rec, *_ = build(enc)
    enc.lose("sa", 2)
    assert rec.run_pass("event", {None: {"sa"}}) == {"sa": 2}
    assert rec.run_pass("event", {None: {"sa"}}) == {}


def test_events_are_debounced_into_one_pass_and_its_own_repair_ends_in_one_quiet_pass():
    rec, drv, plane, _ = build()
    passes = []
    real = rec.run_pass

    def counted(trigger, targets=None):
        result = real(trigger, targets)
        passes.append((trigger, result))
        if result:  # a repair writes to the kernel, and the kernel tells the listener about it
            rec.notify(names.netns(NID), "fdb")
        return result

    rec.run_pass = counted
    rec.start()
    try:
        plane.lose_fdb(NID, PEER_IP)
        for _ in range(5):  # a burst of notifications for one change
            rec.notify(names.netns(NID), "fdb")
        wait_until(lambda: len(passes) >= 2, 5, "the repair pass and the quiet pass after it")
        # No third pass: the quiet one changed nothing, so nothing notified.
        done = threading.Event()
        assert not done.wait(0.3)
        assert passes == [("event", {"fdb": 1}), ("event", {})]
    finally:
        rec.stop()


def test_overrun_means_a_full_pass():
    rec, drv, plane, _ = build()
    seen = []
    real = rec.run_pass
    rec.run_pass = lambda trigger, targets=None: seen.append((trigger, targets)) or real(trigger, targets)
    rec.start()
    try:
        plane.lose_guard(NID, EID)
        rec.notify(names.netns(NID), "overrun")
        wait_until(lambda: seen, 5, "a pass after the overrun")
        assert seen[0] == ("overrun", None) and plane.guarded[NID] != []
    finally:
        rec.stop()


def test_periodic_pass_runs_on_its_own():
    rec, drv, plane, _ = build()
    rec.interval = 0.05
    plane.lose_neigh(NID, PEER_IP)
    rec.start()
    try:
        wait_until(lambda: PEER_IP in plane.kernel_peers(NID)[1], 5, "the periodic pass to put the entry back")
    finally:
        rec.stop()


def test_a_join_under_way_is_not_drift():
    rec, drv, plane, _ = build()
    with drv._changing(NID):
        plane.lose_guard(NID, EID)  # what the table looks like before the Join adds its elements
        assert rec.run_pass("event", {names.netns(NID): {"nft"}}) == {}
    assert rec.run_pass("event", {names.netns(NID): {"nft"}}) == {"anti-spoofing": 1}  # control


def test_the_tap_watches_namespaces_as_they_come_and_go():
    rec, drv, plane, tap = build()
    watched = []
    tap.attach(watched.append, lambda ns: watched.remove(ns))
    drv._prepare(drv.ready_networks()[0])
    assert watched == [names.netns(NID)]
    drv.delete_network(p.NetworkIDRequest.decode({"NetworkID": NID}))
    assert watched == []


class Listener:
    def __init__(self):
        self.sockets = {None}

    def watched(self):
        return sorted(self.sockets, key=str)

    def watch(self, ns):
        self.sockets.add(ns)

    def unwatch(self, ns):
        self.sockets.discard(ns)


def test_a_full_pass_stops_listening_in_namespaces_that_are_gone():
    rec, drv, plane, _ = build()
    rec.listener = Listener()
    rec.listener.watch(names.netns(NID))
    rec.listener.watch("vxnet-0123456789ab")  # made and removed again by a rolled back CreateNetwork
    rec.run_pass("periodic")
    assert rec.listener.watched() == [None, names.netns(NID)]


def test_a_rebuild_decided_before_a_delete_network_does_not_make_its_namespace_again():
    rec, drv, plane, _ = build()
    network = drv.ready_networks()[0]
    drv.delete_network(p.NetworkIDRequest.decode({"NetworkID": NID}))
    assert plane.network_problems(network)  # what the pass, holding the network from before, now reads
    rec.driver.ready_networks = lambda: [network]
    assert rec.run_pass("event", {names.netns(NID): {"link"}}) == {}
    assert NID not in plane.networks


def test_the_health_overlay_is_repaired_by_full_passes_and_its_own_events():
    """The health overlay (netdriver/health.py) reports how many entries it put back; the reconciler counts them
    as kind=health, on a full pass and on an event in its namespace, not on an event elsewhere."""
    rec, *_ = build()

    class Health:
        calls, pending = 0, 0

        def built(self):
            return True

        def reconcile(self):
            self.calls += 1
            count, self.pending = self.pending, 0
            return count

    health = rec.health = Health()
    before = repairs("health")
    health.pending = 2
    assert rec.run_pass("periodic").get("health") == 2
    assert repairs("health") == before + 2
    assert rec.run_pass("periodic").get("health") is None  # nothing left: a quiet pass
    calls = health.calls
    rec.run_pass("event", {names.netns(NID): {"fdb"}})
    assert health.calls == calls  # an event in a network's namespace does not touch the health overlay
    health.pending = 1
    assert rec.run_pass("event", {names.HEALTH_NETNS: {"fdb"}}).get("health") == 1


# -- passes that know what the events named (kernel/events.py objects) -------------------------------------------
from kernel.events import LinkChange, NeighChange  # noqa: E402
from tests.fakes.dataplane import VXLAN_INDEX  # noqa: E402

MY_MAC = "02:42:0a:01:00:05"  # EID's, derived from 10.1.0.5
PORT = names.veth_bridge(EID)


def named(kind, *objects):
    return {names.netns(NID): {kind: frozenset(objects)}}


def test_a_deleted_port_is_made_again_by_the_narrow_check_alone():
    rec, drv, plane, _ = build()
    plane.lose_port(NID, EID)
    assert EID not in plane.endpoints[NID]  # the loss is real in the model (control)
    reads, guarded = plane.whole_reads, list(plane.guarded[NID])
    assert rec.run_pass("event", named("link", LinkChange(11, PORT, True))) == {"port": 1}
    # nothing read whole but the anti-spoofing table, compared once after a repair (the port keeps its elements)
    assert EID in plane.endpoints[NID] and plane.whole_reads == reads + 1 and plane.guarded[NID] == guarded
    reads = plane.whole_reads
    assert rec.run_pass("event", named("link", LinkChange(11, PORT, False))) == {}  # its own event: quiet
    assert plane.whole_reads == reads  # and narrow


def test_a_deleted_static_entry_is_put_back_from_the_mac_its_notification_names():
    rec, drv, plane, _ = build()
    plane.lose_static(NID, EID)
    reads = plane.whole_reads
    # an entry of another bridge port (the port's own address), then the endpoint's: only the second is ours
    other = NeighChange(11, "9a:00:00:00:00:01", None, True, True)
    assert rec.run_pass("event", named("fdb", other)) == {}
    assert plane.lost_ports[NID] == {EID: "static"}  # not looked at: still lost (control for the next)
    assert plane.whole_reads == reads
    assert rec.run_pass("event", named("fdb", NeighChange(11, MY_MAC, None, True, True))) == {"port": 1}
    assert plane.lost_ports[NID] == {} and plane.whole_reads == reads + 1  # the anti-spoofing comparison


def test_a_changed_remote_entry_is_corrected_by_its_key_alone():
    rec, drv, plane, _ = build()
    plane.move_fdb(NID, PEER_IP, "192.0.2.77")
    reads, syncs = plane.whole_reads, plane.full_syncs
    change = NeighChange(VXLAN_INDEX, PEER_MAC, "192.0.2.77", False, False)
    assert rec.run_pass("event", named("fdb", change)) == {"fdb": 1}
    assert plane.kernel_peers(NID) == ({PEER_MAC: PEER_VTEP}, {PEER_IP: PEER_MAC})
    assert plane.whole_reads == reads and plane.full_syncs == syncs
    plane.lose_neigh(NID, PEER_IP)
    gone = NeighChange(VXLAN_INDEX, PEER_MAC, PEER_IP, False, True)
    assert rec.run_pass("event", named("neighbour", gone)) == {"neighbour": 1}
    assert plane.kernel_peers(NID)[1] == {PEER_IP: PEER_MAC}
    # the same notification again, with the kernel right now: quiet, and still nothing read whole
    assert rec.run_pass("event", named("neighbour", gone)) == {} and plane.whole_reads == reads


def test_named_objects_that_are_not_vxnets_are_not_looked_at():
    rec, drv, plane, _ = build()
    plane.move_fdb(NID, PEER_IP, "192.0.2.77")
    reads = plane.whole_reads
    on_a_port = NeighChange(VXLAN_INDEX + 1, PEER_MAC, "192.0.2.77", False, False)  # not the VXLAN device
    assert rec.run_pass("event", named("fdb", on_a_port)) == {}
    assert rec.run_pass("event", named("link", LinkChange(40, "eth7", False))) == {}
    assert plane.kernel_peers(NID)[0] == {PEER_MAC: "192.0.2.77"} and plane.whole_reads == reads
    change = NeighChange(VXLAN_INDEX, PEER_MAC, "192.0.2.77", False, False)  # control: on the VXLAN device
    assert rec.run_pass("event", named("fdb", change)) == {"fdb": 1}


def test_the_bridge_or_vxlan_device_named_or_a_kind_not_named_means_the_whole_check():
    rec, drv, plane, _ = build()
    plane.lose_link(NID)
    reads = plane.whole_reads
    assert rec.run_pass("event", named("link", LinkChange(2, names.BRIDGE, False))) == {"link": 1}
    assert plane.whole_reads > reads
    plane.lose_link(NID)
    assert rec.run_pass("event", named("link", LinkChange(2, names.trunk_root(1), True))) == {"link": 1}
    plane.lose_fdb(NID, PEER_IP)
    reads = plane.whole_reads
    assert rec.run_pass("event", {names.netns(NID): {"fdb": None}}) == {"fdb": 1}  # degraded: the full sync
    assert plane.whole_reads == reads + 1


def test_notify_gathers_objects_over_a_debounce_and_degrades_past_the_bound():
    rec, *_ = build()
    ns = names.netns(NID)
    first, second = LinkChange(11, PORT, False), LinkChange(11, PORT, True)
    rec.notify(ns, "link", frozenset({first}))
    rec.notify(ns, "link", frozenset({second}))
    rec.notify(ns, "nft", None)
    assert rec._pending == {ns: {"link": {first, second}, "nft": None}}
    from netdriver import reconciler
    many = frozenset(NeighChange(3, f"02:43:00:00:{i >> 8:02x}:{i & 255:02x}", None, False, False)
                     for i in range(reconciler.MAX_OBJECTS + 1))
    rec.notify(ns, "fdb", many)
    assert rec._pending[ns]["fdb"] is None
    rec.notify(ns, "fdb", frozenset({NeighChange(3, PEER_MAC, None, False, False)}))
    assert rec._pending[ns]["fdb"] is None  # whole stays whole
    rec.notify(ns, "link", None)
    assert rec._pending[ns]["link"] is None


def test_a_named_pass_through_the_thread_repairs_and_ends_quiet():
    """notify() with objects, as the listener calls it: the narrow repair, then (its own notification) one
    quiet pass."""
    rec, drv, plane, _ = build()
    passes = []
    real = rec.run_pass

    def counted(trigger, targets=None):
        result = real(trigger, targets)
        passes.append(result)
        if result:  # the port made again: the kernel tells of it
            rec.notify(names.netns(NID), "link", frozenset({LinkChange(12, PORT, False)}))
        return result

    rec.run_pass = counted
    rec.start()
    try:
        plane.lose_port(NID, EID)
        rec.notify(names.netns(NID), "link", frozenset({LinkChange(11, PORT, True)}))
        wait_until(lambda: len(passes) >= 2, 5, "the repair pass and the quiet pass after it")
        assert passes[:2] == [{"port": 1}, {}] and EID in plane.endpoints[NID]
    finally:
        rec.stop()


def test_a_port_named_beside_the_bridge_is_still_looked_at():
    """The bridge named makes the link check whole (network_problems), which does not look at endpoint ports:
    the port named in the same batch still gets its own check."""
    rec, drv, plane, _ = build()
    plane.lose_port(NID, EID)
    both = named("link", LinkChange(2, names.BRIDGE, False), LinkChange(11, PORT, True))
    reads = plane.whole_reads
    assert rec.run_pass("event", both) == {"port": 1}
    assert plane.whole_reads > reads and EID in plane.endpoints[NID]


def test_the_bridge_changed_gets_network_problems_alone_and_deleted_the_whole_check():
    """The root bridge is notified whenever its smallest port MAC changes (every few Joins): a change reads
    network_problems only; a deletion (or a link without a name) the whole link check, peers included."""
    rec, drv, plane, _ = build()
    plane.lose_fdb(NID, PEER_IP)
    reads = plane.whole_reads
    assert rec.run_pass("event", named("link", LinkChange(2, names.BRIDGE, False))) == {}
    assert plane.whole_reads == reads + 1 and plane.kernel_peers(NID)[0] == {}  # network_problems only
    assert rec.run_pass("event", named("link", LinkChange(2, names.BRIDGE, True))) == {"fdb": 1}  # control
    plane.lose_fdb(NID, PEER_IP)
    assert rec.run_pass("event", named("link", LinkChange(2, None, False))) == {"fdb": 1}
