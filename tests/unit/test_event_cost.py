"""What one event costs, counted (never timed): a peer arriving, moving or going, and each endpoint verb, must do
the same work with 10 peers or endpoints as with thousands (issue 14: per-event cost flat at 4,000 endpoints and
10,000 peers). Counts: netlink calls of the real DataPlane over the fake netlink facade, etcd round trips and
records read over the fake KV, data-plane calls of the driver."""

import pytest

from kernel import names
from netdriver.driver import NetworkDriver
from netdriver.models import Network, PeerRecord, Subnet
from netdriver.peerdb import PeerDB
from netdriver.sandbox import DataPlane
from netdriver.store import NetworkStore
from netdriver.underlay import Underlay
from netdriver.watcher import PeerSync
from tests.fakes import FakeDataPlane, FakeKV, FakeLinks
from wire import protocol as p

NET = Network(id="c" * 64, vni=7, mtu=1450, internal=False, subnets=[Subnet("10.0.0.0/8", None)])
NS = names.netns(NET.id)


def peer(i: int, vtep: str = "192.0.2.2") -> PeerRecord:
    ip = f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"
    mac = "02:42:" + ":".join(f"{int(o):02x}" for o in ip.split("."))
    return PeerRecord(network_id=NET.id, endpoint_id=f"{i:064x}", ip=ip, mac=mac, vtep=vtep, host=f"h{2 + i % 50}")


def synced(count: int):
    """PeerSync with `count` remote peers read at start-up and applied to a fake kernel."""
    links = FakeLinks()
    links.ensure_netns(NS)
    links.ensure_vxlan(NS, names.VXLAN, "stage", NET.vni, "192.0.2.1", 4789, NET.mtu, names.BRIDGE)
    plane = DataPlane(links, Underlay(lambda a: 1500, "192.0.2.1"))
    handed = links.handed = []  # the sizes of the tables each update_peers was given: the work it compares

    def update_peers(network, before, after):
        handed.append(sum(len(table) for table in before + after))
        return DataPlane.update_peers(plane, network, before, after)
    plane.update_peers = update_peers
    sync = PeerSync(PeerDB("h1"), plane)
    sync.network_up(NET)
    sync.resync([(NET.id, 10 + i, peer(i)) for i in range(1, count + 1)])
    assert len(links.fdb(NS, names.VXLAN)) == count and len(links.neighbours(NS, names.VXLAN)) == count
    links.calls.clear()
    handed.clear()
    return sync, links


@pytest.mark.parametrize("count", [10, 1000, 10000])
def test_a_peer_arrival_writes_one_fdb_and_one_neighbour_entry_and_reads_nothing(count):
    sync, links = synced(count)
    new = peer(count + 1, vtep="192.0.2.9")
    sync.put(NET.id, 10**6, new)
    assert links.calls == {"set_fdb": 1, "set_neigh": 1}  # no dump of the FDB or the neighbour table
    assert links.handed == [2]  # and only its own MAC and address compared: not the whole table
    assert links.fdb(NS, names.VXLAN)[new.mac] == "192.0.2.9"
    assert links.neighbours(NS, names.VXLAN)[new.ip] == new.mac
    assert len(links.fdb(NS, names.VXLAN)) == count + 1


@pytest.mark.parametrize("count", [10, 1000, 10000])
def test_a_peer_moving_or_going_touches_its_own_entries_only(count):
    sync, links = synced(count)
    moved = peer(5)
    moved = PeerRecord(**{**moved.__dict__, "vtep": "192.0.2.77"})
    sync.put(NET.id, 10**6, moved)  # the container moved host: its FDB entry points elsewhere, its neighbour stays
    assert links.calls == {"del_fdb": 1, "set_fdb": 1}
    assert links.fdb(NS, names.VXLAN)[moved.mac] == "192.0.2.77"
    links.calls.clear()
    sync.put(NET.id, 10**6 + 1, moved)  # a replay (the watch resumed): nothing to do
    assert links.calls == {}
    sync.delete(NET.id, moved.endpoint_id)
    assert links.calls == {"del_fdb": 1, "del_neigh": 1}
    assert links.handed == [4, 4, 2]  # move: the entry before and after; replay: the same; removal: before only
    assert moved.mac not in links.fdb(NS, names.VXLAN) and moved.ip not in links.neighbours(NS, names.VXLAN)
    assert len(links.fdb(NS, names.VXLAN)) == count - 1


def test_a_shared_mac_follows_the_newest_record_and_outlives_the_newer_one_incrementally():
    sync, links = synced(10)
    old = peer(3)
    newer = PeerRecord(**{**old.__dict__, "endpoint_id": "f" * 64, "vtep": "192.0.2.50"})
    sync.put(NET.id, 10**6, newer)  # the same address and MAC on another host, its old record not gone yet
    assert links.fdb(NS, names.VXLAN)[old.mac] == "192.0.2.50"
    sync.delete(NET.id, newer.endpoint_id)  # the newer goes first: the MAC points back at the older record's host
    assert links.fdb(NS, names.VXLAN)[old.mac] == old.vtep
    assert links.neighbours(NS, names.VXLAN)[old.ip] == old.mac
    sync.delete(NET.id, old.endpoint_id)
    assert old.mac not in links.fdb(NS, names.VXLAN)


def test_after_a_failed_write_the_next_event_repairs_the_whole_table():
    sync, links = synced(100)
    links.refuse.add("set_fdb")
    sync.put(NET.id, 10**6, peer(101))  # refused: the kernel is not known to hold the table any more
    links.refuse.clear()
    del links.fdbs[(NS, names.VXLAN)][peer(7).mac]  # and meanwhile someone deleted another entry
    links.calls.clear()
    sync.put(NET.id, 10**6 + 1, peer(102))
    assert links.calls["fdb"] == 1  # a full sync: read once, then put back what is missing
    fdb = links.fdb(NS, names.VXLAN)
    assert {peer(7).mac, peer(101).mac, peer(102).mac} <= set(fdb) and len(fdb) == 102
    links.calls.clear()
    sync.put(NET.id, 10**6 + 2, peer(103))
    assert links.calls == {"set_fdb": 1, "set_neigh": 1}  # incremental again


# -- the endpoint verbs --------------------------------------------------------------------------------------------
class Counting:
    """The driver's DataPlane, counting which of its methods each verb calls."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = {}

    def __getattr__(self, name):
        target = getattr(self.inner, name)
        if not callable(target):
            return target

        def call(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            return target(*args, **kwargs)
        return call


def _req(cls, **fields):
    return cls.decode(fields)


def _eid(i: int) -> str:
    return f"{i:064x}"


def _verbs_cost(existing: int):
    """Attach `existing` endpoints, then count what one more CreateEndpoint, Join, Leave and DeleteEndpoint do."""
    kv, plane = FakeKV(), Counting(FakeDataPlane())
    drv = NetworkDriver(NetworkStore(kv), plane, "h1", "local", Underlay(lambda a: 1500, "192.0.2.1"))
    nid = "a" * 64
    drv.create_network(p.CreateNetworkRequest.decode({
        "NetworkID": nid, "Options": {"com.docker.network.generic": {}},
        "IPv4Data": [{"AddressSpace": "x", "Pool": "10.64.0.0/16", "Gateway": ""}], "IPv6Data": None}))

    def attach(i):
        drv.create_endpoint(_req(p.CreateEndpointRequest, NetworkID=nid, EndpointID=_eid(i),
                                 Interface={"Address": f"10.64.{i >> 8}.{i & 255}/16", "MacAddress": ""}))
        drv.join(_req(p.JoinRequest, NetworkID=nid, EndpointID=_eid(i), SandboxKey="/x"))

    for i in range(1, existing + 1):
        attach(i)
    cost = {}
    last = existing + 1
    steps = [("CreateEndpoint", lambda: drv.create_endpoint(_req(
                 p.CreateEndpointRequest, NetworkID=nid, EndpointID=_eid(last),
                 Interface={"Address": f"10.64.{last >> 8}.{last & 255}/16", "MacAddress": ""}))),
             ("Join", lambda: drv.join(_req(p.JoinRequest, NetworkID=nid, EndpointID=_eid(last), SandboxKey="/x"))),
             ("Leave", lambda: drv.leave(_req(p.EndpointRequest, NetworkID=nid, EndpointID=_eid(last)))),
             ("DeleteEndpoint", lambda: drv.delete_endpoint(_req(p.EndpointRequest, NetworkID=nid,
                                                                 EndpointID=_eid(last))))]
    for verb, step in steps:
        trips, records, plane.calls = kv.round_trips, kv.records_read, {}
        step()
        cost[verb] = (kv.round_trips - trips, kv.records_read - records, dict(plane.calls))
    assert set(plane.inner.endpoints[nid]) == {_eid(i) for i in range(1, existing + 1)}  # the last one went again
    return cost


def test_each_endpoint_verb_costs_the_same_with_10_or_1000_endpoints_present():
    small, large = _verbs_cost(10), _verbs_cost(1000)
    assert small == large
    for verb, (_trips, records, calls) in large.items():
        assert records <= 3, f"{verb} read {records} etcd records"  # its own network and endpoint, never a list
        assert not {"guard_endpoints", "wired_endpoints", "sync_peers"} & set(calls), f"{verb}: {calls}"
    assert large["Join"][2] == {"ensure_endpoint": 1, "guard_endpoint": 1}
