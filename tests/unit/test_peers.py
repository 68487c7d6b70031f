"""Peer distribution over fakes: the peer table, its application to local namespaces, host leases, and the
driver republishing its peers."""

from netdriver.driver import NetworkDriver
from netdriver.hosts import HostLease
from netdriver.models import Network, PeerRecord, Subnet
from netdriver.peerdb import PeerDB
from netdriver.store import NetworkStore
from netdriver.underlay import Underlay
from netdriver.watcher import PeerSync
from store import schema
from tests.fakes import FakeDataPlane, FakeKV
from wire import protocol as p


def rec(eid, ip, mac, vtep, host="h2", nid="n"):
    return PeerRecord(network_id=nid, endpoint_id=eid, ip=ip, mac=mac, vtep=vtep, host=host)


def test_peerdb_skips_own_records_and_newest_record_wins_a_shared_mac():
    db = PeerDB("h1")
    assert not db.put("s", 1, rec("e0", "10.0.0.9", "m9", "192.0.2.1", host="h1"))
    db.put("s", 5, rec("e1", "10.0.0.2", "m2", "192.0.2.2"))
    db.put("s", 7, rec("e2", "10.0.0.2", "m2", "192.0.2.3"))  # the same endpoint address, moved to host 3
    assert db.entries("s") == ({"m2": "192.0.2.3"}, {"10.0.0.2": "m2"})
    db.delete("s", "e2")  # the newer record goes: the older one still asks for the MAC, so it stays
    assert db.entries("s") == ({"m2": "192.0.2.2"}, {"10.0.0.2": "m2"})
    db.delete("s", "e1")
    assert db.entries("s") == ({}, {}) and db.segments() == []


def test_peerdb_replace_reports_segments_that_lost_everything():
    db = PeerDB("h1")
    db.put("a", 1, rec("e1", "10.0.0.2", "m2", "v"))
    touched = db.replace([("b", 2, rec("e3", "10.0.1.2", "m3", "v"))])
    assert touched == ["a", "b"] and db.entries("a") == ({}, {})


def network(nid="n" * 64, overlay=None):
    return Network(id=nid, vni=7, mtu=1450, internal=False, subnets=[Subnet("10.0.0.0/24", None)], overlay=overlay)


def test_peers_recorded_before_the_namespace_exist_are_applied_when_it_comes_up():
    plane = FakeDataPlane()
    sync = PeerSync(PeerDB("h1"), plane)
    net = network()
    sync.resync([])
    sync.put(net.id, 3, rec("e1", "10.0.0.2", "m2", "192.0.2.2"))
    assert plane.peers == {}
    plane.ensure_network(net)
    sync.network_up(net)
    assert plane.peers[net.id] == {"10.0.0.2": ("m2", "192.0.2.2")}
    sync.delete(net.id, "e1")
    assert plane.peers[net.id] == {}
    sync.resync([(net.id, 9, rec("e4", "10.0.0.4", "m4", "192.0.2.4"))])
    assert plane.peers[net.id] == {"10.0.0.4": ("m4", "192.0.2.4")}


def test_host_lease_is_reused_after_restart_and_replaced_after_expiry(tmp_path):
    kv = FakeKV()
    store = NetworkStore(kv)
    state = str(tmp_path / "lease")
    first = HostLease(kv, store, "h1", lambda: "192.0.2.1", state)
    assert first.acquire() is True
    assert store.hosts() == {"h1": {"vtep": "192.0.2.1", "version": "0.1.0", "name": "h1", "instance": ""}}
    again = HostLease(kv, store, "h1", lambda: "192.0.2.1", state)  # the plugin restarted within the TTL
    assert again.acquire() is False and again.id == first.id
    kv.expire(first.id)
    assert store.hosts() == {}
    later = HostLease(kv, store, "h1", lambda: "192.0.2.1", state)
    assert later.acquire() is True and later.id != first.id and "h1" in store.hosts()


def leased_driver():
    """A driver over fakes whose peer records live under a host lease: (kv, store, plane, lease, driver); lease
    ["id"] is the lease the driver writes under (replace it to give the host a new one)."""
    kv = FakeKV()
    store = NetworkStore(kv)
    plane = FakeDataPlane()
    lease = {"id": kv.lease_grant(10)}
    drv = NetworkDriver(store, plane, "h1", "local", Underlay(lambda a: 1500, "192.0.2.1"),
                        lease_id=lambda: lease["id"])
    return kv, store, plane, lease, drv


def test_peers_live_under_the_lease_and_republish_restores_them():
    kv, store, plane, lease, drv = leased_driver()
    nid, eid = "a" * 64, "e" * 64
    drv.create_network(p.CreateNetworkRequest.decode({
        "NetworkID": nid, "Options": {}, "IPv4Data": [{"Pool": "10.1.0.0/24", "Gateway": "10.1.0.1/24"}]}))
    drv.create_endpoint(p.CreateEndpointRequest.decode({"NetworkID": nid, "EndpointID": eid,
                                                        "Interface": {"Address": "10.1.0.5/24"}}))
    drv.join(p.JoinRequest.decode({"NetworkID": nid, "EndpointID": eid, "SandboxKey": "/var/run/docker/netns/1"}))
    assert len(store.list_peers(nid)) == 1
    kv.expire(lease["id"])  # etcd was unreachable longer than the TTL: the peer vanished
    assert store.list_peers(nid) == []
    lease["id"] = kv.lease_grant(10)
    drv.republish_peers()
    (peer,) = store.list_peers(nid)
    assert kv.get(f"{schema.PREFIX}/peers/{nid}/{eid}").lease == lease["id"] and peer.ip == "10.1.0.5"
    # An endpoint whose veth is gone (its container died while the plugin was down) is withdrawn.
    plane.remove_endpoint(nid, eid)
    drv.republish_peers()
    assert store.list_peers(nid) == []


def test_a_restarted_plugin_leaves_kernel_entries_alone_until_it_has_read_etcd():
    plane = FakeDataPlane()
    net = network()
    plane.ensure_network(net)
    plane.peers[net.id] = {"10.0.0.2": ("m2", "192.0.2.2")}  # programmed by the previous process
    sync = PeerSync(PeerDB("h1"), plane)
    sync.network_up(net)  # start-up reconciliation, before the watcher's first read
    assert plane.peers[net.id] == {"10.0.0.2": ("m2", "192.0.2.2")}
    sync.resync([(net.id, 4, rec("e1", "10.0.0.2", "m2", "192.0.2.2"))])
    assert plane.peers[net.id] == {"10.0.0.2": ("m2", "192.0.2.2")}


def test_member_networks_are_this_hosts_own_network_of_a_shared_overlay():
    kv = FakeKV()
    drivers = [NetworkDriver(NetworkStore(kv), FakeDataPlane(), h, "local", Underlay(lambda a: 1500, "192.0.2.1"))
               for h in ("h1", "h2")]
    for drv, nid in zip(drivers, ("a" * 64, "b" * 64)):
        drv.create_network(p.CreateNetworkRequest.decode({
            "NetworkID": nid, "Options": {"com.docker.network.generic": {"overlay": "blue"}},
            "IPv4Data": [{"Pool": "10.1.0.0/24"}]}))
    assert [n.id for n in NetworkStore(kv).member_networks("h2")] == ["b" * 64]


def test_watch_events_are_applied_incrementally_after_one_full_sync():
    plane = FakeDataPlane()
    sync = PeerSync(PeerDB("h1"), plane)
    net = network()
    plane.ensure_network(net)
    sync.resync([])
    sync.network_up(net)
    full = plane.full_syncs
    for i in range(2, 12):
        sync.put(net.id, i, rec(f"e{i}", f"10.0.0.{i}", f"m{i}", "192.0.2.2"))
    sync.delete(net.id, "e5")
    assert plane.full_syncs == full  # each event: only its difference, no re-read of the whole table
    assert len(plane.peers[net.id]) == 9 and "10.0.0.5" not in plane.peers[net.id]


def test_a_dual_stack_peer_gives_a_neighbour_entry_for_each_family_and_takes_both_along():
    db = PeerDB("h1")
    v6 = PeerRecord(network_id="n", endpoint_id="e1", ip="10.0.0.2", mac="m2", vtep="192.0.2.2", host="h2",
                    ip6="fd00::2")
    db.put("s", 1, v6)
    db.put("s", 2, rec("e2", "10.0.0.3", "m3", "192.0.2.2"))  # an IPv4-only record (an older plugin's)
    assert db.entries("s") == ({"m2": "192.0.2.2", "m3": "192.0.2.2"},
                               {"10.0.0.2": "m2", "fd00::2": "m2", "10.0.0.3": "m3"})
    plane = FakeDataPlane()
    sync = PeerSync(db, plane)
    net = network()
    plane.ensure_network(net)
    sync.resync([(net.id, 1, PeerRecord(**{**v6.__dict__, "network_id": net.id}))])
    sync.network_up(net)
    assert plane.kernel_peers(net.id) == ({"m2": "192.0.2.2"}, {"10.0.0.2": "m2", "fd00::2": "m2"})
    plane.lose_neigh(net.id, "fd00::2")  # someone deleted the v6 entry: a full sync puts it back
    sync.network_up(net)
    assert plane.kernel_peers(net.id)[1] == {"10.0.0.2": "m2", "fd00::2": "m2"}
    sync.delete(net.id, "e1")
    assert plane.kernel_peers(net.id) == ({}, {})


def test_a_republish_never_writes_back_the_peer_record_of_an_endpoint_deleted_meanwhile():
    """Start-up (or a new lease) republishes from what it read; a Leave and DeleteEndpoint between that read and
    the write remove the endpoint and its peer record, and the write must not bring the record back (every host
    would keep a path to the departed endpoint while this host's lease lives). The other endpoint's record is
    written by the same republish: the positive control."""
    kv, store, plane, lease, drv = leased_driver()
    nid, gone, stays = "a" * 64, "e" * 64, "f" * 64
    drv.create_network(p.CreateNetworkRequest.decode({
        "NetworkID": nid, "Options": {}, "IPv4Data": [{"Pool": "10.1.0.0/24", "Gateway": "10.1.0.1/24"}]}))
    for eid, ip in ((gone, "10.1.0.5/24"), (stays, "10.1.0.6/24")):
        drv.create_endpoint(p.CreateEndpointRequest.decode({"NetworkID": nid, "EndpointID": eid,
                                                            "Interface": {"Address": ip}}))
        drv.join(p.JoinRequest.decode({"NetworkID": nid, "EndpointID": eid,
                                       "SandboxKey": "/var/run/docker/netns/1"}))
    kv.expire(lease["id"])  # both peer records gone with the old lease: the republish must write `stays` again
    lease["id"] = kv.lease_grant(10)
    assert store.list_peers(nid) == []
    real = plane.wired_endpoints

    def racing(network_id, endpoint_ids):
        wired = real(network_id, endpoint_ids)  # read while `gone` is still wired ...
        request = p.EndpointRequest.decode({"NetworkID": nid, "EndpointID": gone})
        drv.leave(request)  # ... then it leaves and is deleted
        drv.delete_endpoint(request)
        return wired

    plane.wired_endpoints = racing
    drv.republish_peers()
    assert [r.endpoint_id for r in store.list_peers(nid)] == [stays]
    assert [e.id for e in store.list_endpoints(nid)] == [stays]
