"""Garbage collection of hosts gone for good (netdriver/gc.py over the real stores on FakeKV): a host is marked
gone when first seen without its record, collected only once stale, keeps what it holds if it comes back even
mid-collection; a replay and a second collector change nothing; a dry run changes nothing."""

import hashlib
import json

import pytest

from ipam_driver.driver import GATEWAY_REQUEST, IpamDriver
from ipam_driver.gc import IpamHolds
from ipam_driver.store import IpamStore
from netdriver.gc import KEPT, RELEASED, Collector
from netdriver.models import Endpoint, Network, Subnet
from netdriver.store import NetworkStore
from store import schema
from store.schema import SWARM_HOLDER
from tests.fakes import FakeKV
from wire.protocol import AddressRequest, RequestPoolRequest

STALE = 3600
SUBNET = "10.9.0.0/29"
KEYS = schema.Schema()


class Clock:
    def __init__(self):
        self.now = 1_700_000_000.0

    def __call__(self):
        return self.now


def nid(host, color="blue"):
    """A Docker network ID (64 hex digits) of its own for each host and overlay."""
    return hashlib.sha256(f"{color}/{host}".encode()).hexdigest()


@pytest.fixture
def world():
    """Three hosts on overlay-blue (each its own network, one /29 shared), host h3 also alone on overlay-red and
    holding two container addresses and an endpoint; a Swarm hold on a segment of its own. Returns
    (kv, store, leases)."""
    kv = FakeKV()
    store = NetworkStore(kv)
    leases = {}
    blue_vni = store.allocate_segment("overlay-blue", None)
    for host in ("h1", "h2", "h3"):
        leases[host] = kv.lease_grant(30)
        assert store.register_host(host, {"vtep": f"192.0.2.{host[-1]}", "name": f"node-{host}"}, leases[host], 0)
        net = Network(id=nid(host), vni=blue_vni, mtu=1450, internal=False,
                      subnets=[Subnet(SUBNET, "10.9.0.1")], overlay="blue")
        store.put_network(net, host, "overlay-blue")
        ipam = IpamDriver(IpamStore(kv), host, "local")
        pool_id = ipam.request_pool(RequestPoolRequest.decode(
            {"AddressSpace": "vxnet-local", "Pool": SUBNET, "SubPool": "", "Options": {}, "V6": False}))["PoolID"]
        ipam.request_address(AddressRequest.decode(
            {"PoolID": pool_id, "Address": "", "Options": {"RequestAddressType": GATEWAY_REQUEST}}))
        ip = ipam.request_address(AddressRequest.decode({"PoolID": pool_id, "Address": "", "Options": {}}))
        store.put_endpoint(Endpoint(nid(host), "e" * 63 + host[-1], ip["Address"], "02:00:00:00:00:0" + host[-1],
                                    host))
    ipam3 = IpamDriver(IpamStore(kv), "h3", "local")
    ipam3.request_address(AddressRequest.decode({"PoolID": f"vxnet-local/{SUBNET}", "Address": "", "Options": {}}))
    red_vni = store.allocate_segment("overlay-red", None)
    store.put_network(Network(id=nid("h3", "red"), vni=red_vni, mtu=1450, internal=False, subnets=[],
                              overlay="red"), "h3", "overlay-red")
    store.allocate_segment("swarm-seg", None)
    store.add_member("s" * 25, SWARM_HOLDER, "swarm-seg")
    return kv, store, leases


def collector(kv, clock):
    return Collector(NetworkStore(kv), IpamHolds(IpamStore(kv)), STALE, clock=clock)


def holders(kv, key):
    return json.loads(kv.data[key].value)["hosts"] if key in kv.data else None


def of_h3(kv):
    """Every key that names h3 as its host or one of its holders."""
    out = []
    for key, entry in kv.data.items():
        if key.endswith("/h3") and "/departed/" not in key:
            out.append(key)
        elif "/endpoints/" in key and json.loads(entry.value)["host"] == "h3":
            out.append(key)
        elif "/ipam/" in key and "h3" in json.loads(entry.value)["hosts"]:
            out.append(key)
    return sorted(out)


def test_a_host_is_marked_gone_then_collected_only_once_stale(world):
    kv, store, leases = world
    clock = Clock()
    gc = collector(kv, clock)
    assert gc.collect().hosts == []  # everyone alive: nothing gone, nothing written
    kv.expire(leases["h3"])  # its lease ran out: hosts/h3 is gone
    held = of_h3(kv)
    first = gc.collect()
    assert [(h.host, h.name, h.vtep, h.since, h.stale) for h in first.hosts] == \
        [("h3", "node-h3", "192.0.2.3", clock.now, False)]
    kinds = sorted(hold["kind"] for hold in first.hosts[0].holds)
    assert kinds == ["address", "address", "address", "endpoint", "member", "member", "pool"]
    assert all("result" not in hold for hold in first.hosts[0].holds)
    assert of_h3(kv) == held  # not stale yet: everything kept
    clock.now += STALE  # exactly the threshold: still kept
    assert not gc.collect().stale and of_h3(kv) == held

    clock.now += 1
    report = gc.collect()
    assert report.failed == 0 and [h.host for h in report.stale] == ["h3"]
    assert all(hold["result"] == RELEASED for hold in report.stale[0].holds)
    assert of_h3(kv) == []
    # What others hold stays: their pool and gateway holds, their endpoints and networks, the shared segment.
    assert holders(kv, KEYS.pool("vxnet-local", SUBNET)) == ["h1", "h2"]
    assert holders(kv, KEYS.address("vxnet-local", SUBNET, "10.9.0.1")) == ["h1", "h2"]
    assert KEYS.network(nid("h1")) in kv.data and KEYS.segment("overlay-blue") in kv.data
    # h3 was the last member of overlay-red: its network, segment and VNI went, as DeleteNetwork does.
    assert KEYS.network(nid("h3")) not in kv.data and KEYS.network(nid("h3", "red")) not in kv.data
    assert KEYS.segment("overlay-red") not in kv.data and kv.keys(KEYS.prefix(schema.VNI)) == sorted(
        [KEYS.vni(store.segment_vni("overlay-blue")), KEYS.vni(store.segment_vni("swarm-seg"))])
    # The Swarm's hold is nobody's to collect; the departed record went with the last hold.
    assert KEYS.member("swarm-seg", SWARM_HOLDER) in kv.data
    assert kv.keys(KEYS.prefix(schema.DEPARTED)) == []
    # The freed addresses can be had again.
    ipam1 = IpamDriver(IpamStore(kv), "h1", "local")
    got = {ipam1.request_address(AddressRequest.decode(
        {"PoolID": f"vxnet-local/{SUBNET}", "Address": "", "Options": {}}))["Address"] for _ in range(2)}
    assert got == {"10.9.0.4/29", "10.9.0.5/29"}


def test_replay_and_a_second_collector_change_nothing(world):
    kv, store, leases = world
    clock = Clock()
    kv.expire(leases["h3"])
    collector(kv, clock).collect()
    clock.now += STALE + 1
    one, two = collector(kv, clock), collector(kv, clock)
    assert one.collect().failed == 0
    revision, data = kv.rev, dict(kv.data)
    assert two.collect().hosts == [] and one.collect().hosts == []
    assert (kv.rev, kv.data) == (revision, data)


def test_two_collectors_interleaved_release_each_hold_once(world):
    """Both surveyed the same holds; the second's releases, of holds the first already dropped, are no-ops: the
    other hosts' holds on the shared gateway and pool are untouched."""
    kv, store, leases = world
    clock = Clock()
    kv.expire(leases["h3"])
    collector(kv, clock).collect()
    clock.now += STALE + 1
    late = collector(kv, clock)
    surveyed = late.survey(mark=False)
    assert collector(kv, clock).collect().failed == 0
    for gone in surveyed:
        late._release(gone)
    assert holders(kv, KEYS.pool("vxnet-local", SUBNET)) == ["h1", "h2"]
    assert holders(kv, KEYS.address("vxnet-local", SUBNET, "10.9.0.1")) == ["h1", "h2"]
    assert of_h3(kv) == []


def test_dry_run_lists_and_changes_nothing(world):
    kv, store, leases = world
    clock = Clock()
    kv.expire(leases["h3"])
    revision = kv.rev
    listed = collector(kv, clock).collect(dry_run=True)
    assert [(h.host, h.since, h.stale) for h in listed.hosts] == [("h3", None, False)]  # a dry run marks nothing
    assert kv.rev == revision
    collector(kv, clock).collect()  # marks it
    clock.now += STALE + 1
    revision, data = kv.rev, dict(kv.data)
    listed = collector(kv, clock).collect(dry_run=True)
    assert [h.host for h in listed.stale] == ["h3"] and len(listed.stale[0].holds) == 7
    assert all("result" not in hold for hold in listed.stale[0].holds)
    assert (kv.rev, kv.data) == (revision, data)
    assert listed.as_dict()["hosts"][0]["gone_seconds"] == STALE + 1


def test_a_host_that_comes_back_mid_collection_keeps_what_is_not_released_yet(world):
    kv, store, leases = world
    clock = Clock()
    kv.expire(leases["h3"])
    collector(kv, clock).collect()
    clock.now += STALE + 1

    def come_back():
        lease = kv.lease_grant(30)
        assert NetworkStore(kv).register_host("h3", {"vtep": "192.0.2.3", "name": "node-h3"}, lease, 0)

    def after(commits, then):
        kv.cut_in = (lambda: after(commits - 1, then)) if commits else then

    after(2, come_back)  # the endpoint and the first membership go, then h3 registers again
    report = collector(kv, clock).collect()
    results = [hold["result"] for hold in report.stale[0].holds]
    assert results[:2] == [RELEASED, RELEASED] and set(results[2:]) == {KEPT} and report.failed == 0
    assert holders(kv, KEYS.pool("vxnet-local", SUBNET)) == ["h1", "h2", "h3"]
    assert sum(holders(kv, k).count("h3") for k in kv.keys(KEYS.prefix(schema.ADDRESS))) == 3
    assert kv.keys(KEYS.prefix(schema.DEPARTED)) == []  # registering deleted it: h3 is not gone
    assert collector(kv, clock).collect().hosts == []  # and the next pass leaves it alone


def test_a_departed_record_of_another_absence_is_not_the_one_judged_by(world):
    """h3 comes back and goes again between the survey and the release: the new departed record (a new absence,
    not stale yet) fails the guard, so nothing of h3 is released."""
    kv, store, leases = world
    clock = Clock()
    kv.expire(leases["h3"])
    collector(kv, clock).collect()
    clock.now += STALE + 1
    gc = collector(kv, clock)
    surveyed = gc.survey(mark=True)
    lease = kv.lease_grant(30)
    assert store.register_host("h3", {"vtep": "192.0.2.3"}, lease, 0)
    kv.expire(lease)
    assert store.mark_departed("h3", {"since": clock.now, "name": "", "vtep": ""})
    held = of_h3(kv)
    gc._release(surveyed[0])
    assert [hold["result"] for hold in surveyed[0].holds] == [KEPT] * 7 and of_h3(kv) == held


def test_etcd_down_mid_collection_is_reported_and_the_next_pass_finishes(world):
    kv, store, leases = world
    clock = Clock()
    kv.expire(leases["h3"])
    collector(kv, clock).collect()
    clock.now += STALE + 1
    kv.fail_after = 1  # the endpoint's release goes through, then etcd is unreachable
    report = collector(kv, clock).collect()
    assert report.failed == 6
    assert [h["result"] for h in report.stale[0].holds][0] == RELEASED
    kv.unavailable, kv.fail_after = False, None
    assert collector(kv, clock).collect().failed == 0 and of_h3(kv) == []
