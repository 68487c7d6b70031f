"""netdriver/drift.py: desired (records) against programmed (a kernel snapshot), and the nft listing parser."""

import json

from netdriver import drift
from netdriver.isolation import ANTI_SPOOFING_SETS, Guarded, endpoint_guard_batch, host_guard_batch, listed_sets
from netdriver.models import Endpoint, Network, PeerRecord, Subnet

NID = "a" * 64
ME, OTHER = "host1", "host2"
NET = Network(id=NID, vni=4097, mtu=1450, internal=False, subnets=[Subnet("10.1.0.0/24", "10.1.0.1")])
MINE = Endpoint(network_id=NID, id="e" * 64, ip="10.1.0.2/24", mac="02:42:0a:01:00:02", host=ME)
THEIRS = PeerRecord(network_id=NID, endpoint_id="f" * 64, ip="10.1.0.3", mac="02:42:0a:01:00:03", vtep="192.0.2.2",
                    host=OTHER)
PEERS = [(NID, 10, THEIRS), (NID, 11, PeerRecord(network_id=NID, endpoint_id=MINE.id, ip="10.1.0.2",
                                                 mac=MINE.mac, vtep="192.0.2.1", host=ME))]


def port(eid):
    return "vxb" + eid[:8]


def synced() -> drift.NetworkKernel:
    """What the kernel holds when everything is in place."""
    return drift.NetworkKernel(
        namespace=True, bridge=True, vxlan={"vni": 4097, "up": True}, fdb={THEIRS.mac: THEIRS.vtep},
        neigh={THEIRS.ip: THEIRS.mac}, wired={MINE.id},
        guard=drift.guard_elements([(port(MINE.id), "10.1.0.2", MINE.mac)]))


def diffs(kernel):
    return drift.network_differences(NET, ME, [MINE], PEERS, kernel, port)


def test_in_sync_has_no_differences_and_own_records_are_not_peers():
    assert diffs(synced()) == []


def test_each_kind_of_drift_is_named():
    k = synced()
    k.fdb = {}
    k.neigh = {THEIRS.ip: "02:42:00:00:00:99", "10.1.0.9": "02:42:0a:01:00:09"}
    k.guard = set(list(k.guard)[1:]) | {("ports", "vxbstale")}
    found = {(d.kind, d.object, d.want, d.have) for d in diffs(k)}
    assert ("fdb", THEIRS.mac, THEIRS.vtep, None) in found
    assert ("neighbour", THEIRS.ip, THEIRS.mac, "02:42:00:00:00:99") in found
    assert ("neighbour", "10.1.0.9", None, "02:42:0a:01:00:09") in found
    assert ("anti-spoofing", "ports vxbstale", None, "present") in found
    assert sum(1 for d in found if d[0] == "anti-spoofing" and d[2] == "present") == 1
    texts = [d.text() for d in diffs(k)]
    assert f"{NID[:12]} fdb {THEIRS.mac}: missing (want {THEIRS.vtep})" in texts


def test_missing_namespace_and_devices():
    assert [(d.kind, d.have) for d in diffs(drift.NetworkKernel(namespace=False))] == [("namespace", None)]
    k = synced()
    k.bridge, k.vxlan = False, {"vni": 5, "up": False}
    found = {(d.kind, d.object) for d in diffs(k)}
    assert {("bridge", "bridge"), ("vxlan", "vni"), ("vxlan", "state")} <= found


def test_an_endpoint_not_joined_needs_no_guard():
    k = synced()
    k.wired, k.guard = set(), set()
    assert diffs(k) == []


def test_isolation_and_sas():
    assert drift.isolation_differences([NET], {"10.1.0.0/24"}) == []
    assert [d.object for d in drift.isolation_differences([NET], {"10.9.0.0/16"})] == ["10.1.0.0/24",
                                                                                        "10.9.0.0/16"]
    assert [d.object for d in drift.isolation_differences([NET], None)] == ["table"]
    want = drift.sa_differences("192.0.2.1", ["192.0.2.2"], [("192.0.2.1", "192.0.2.2")])
    assert [(d.object, d.have) for d in want] == [("192.0.2.2 -> 192.0.2.1", None)]
    extra = drift.sa_differences("192.0.2.1", [], [("192.0.2.1", "192.0.2.3"), ("198.51.100.1", "198.51.100.2")])
    assert [d.object for d in extra] == ["192.0.2.1 -> 192.0.2.3"]  # only SAs from or to this VTEP are ours
    assert drift.sa_differences(None, ["192.0.2.2"], []) == []


def _as_listing(batch):
    """What `nft -j list table` prints for the sets a batch made (the element shapes are those nft returns)."""
    sets = {}
    for op in batch:
        for verb in ("add",):
            body = op.get(verb, {})
            if "set" in body:
                sets[body["set"]["name"]] = {"set": {**body["set"], "elem": []}}
            if "element" in body:
                sets[body["element"]["name"]]["set"]["elem"] += body["element"]["elem"]
    return json.dumps({"nftables": [{"metainfo": {}}] + list(sets.values())})


def test_listed_sets_reads_back_what_the_batches_write():
    endpoints = [(port(MINE.id), "10.1.0.2", MINE.mac), ("vxbother", "10.1.0.7", "02:42:0a:01:00:07")]
    sets = listed_sets(_as_listing(endpoint_guard_batch(endpoints)))
    assert {(name, e) for name in ("ports", "macs", "ips") for e in sets[name]} == drift.guard_elements(endpoints)
    assert listed_sets(_as_listing(host_guard_batch(["10.1.0.0/24", "10.2.0.0/16"])))["subnets"] == {
        "10.1.0.0/24", "10.2.0.0/16"}
    assert listed_sets("") == {}


NET6 = Network(id=NID, vni=4097, mtu=1450, internal=False, subnets=[Subnet("10.1.0.0/24", "10.1.0.1")],
               subnets6=[Subnet("fd00:1::/64", "fd00:1::1")])
MINE6 = Endpoint(network_id=NID, id="e" * 64, ip="10.1.0.2/24", mac="02:42:0a:01:00:02", host=ME,
                 ip6="fd00:1::2/64")
THEIRS6 = PeerRecord(**{**THEIRS.__dict__, "ip6": "fd00:1::3"})


def test_dual_stack_drift_covers_v6_neighbours_and_v6_guard_elements():
    guarded = Guarded(port(MINE6.id), "10.1.0.2", MINE6.mac, "fd00:1::2")
    kernel = drift.NetworkKernel(
        namespace=True, bridge=True, vxlan={"vni": 4097, "up": True}, fdb={THEIRS.mac: THEIRS.vtep},
        neigh={THEIRS.ip: THEIRS.mac, "fd00:1::3": THEIRS.mac}, wired={MINE6.id},
        guard=drift.guard_elements([guarded], ipv6=True))
    peers = [(NID, 10, THEIRS6)]
    assert drift.network_differences(NET6, ME, [MINE6], peers, kernel, port) == []
    assert ("targets", f"{port(MINE6.id)} . 0xfd000001000000000000000000000002") in kernel.guard
    del kernel.neigh["fd00:1::3"]
    kernel.guard.discard(("ip6s", f"{port(MINE6.id)} . fe80::42:aff:fe01:2"))
    texts = [d.text() for d in drift.network_differences(NET6, ME, [MINE6], peers, kernel, port)]
    assert texts == [f"{NID[:12]} neighbour fd00:1::3: missing (want {THEIRS.mac})",
                     f"{NID[:12]} anti-spoofing ip6s {port(MINE6.id)} . fe80::42:aff:fe01:2: missing (want present)"]


def test_isolation_drift_covers_v6_subnets():
    assert drift.isolation_differences([NET6], {"10.1.0.0/24", "fd00:1::/64"}) == []
    assert [d.object for d in drift.isolation_differences([NET6], {"10.1.0.0/24"})] == ["fd00:1::/64"]


def test_listed_sets_reads_back_the_dual_stack_sets():
    endpoints = [Guarded(port(MINE6.id), "10.1.0.2", MINE6.mac, "fd00:1::2"),
                 Guarded("vxbother", "10.1.0.7", "02:42:0a:01:00:07")]
    sets = listed_sets(_as_listing(endpoint_guard_batch(endpoints, ipv6=True)))
    assert {(name, e) for name in ANTI_SPOOFING_SETS for e in sets[name]} == drift.guard_elements(endpoints, True)
    assert listed_sets(_as_listing(host_guard_batch(["fd00:1::/64"])))["subnets6"] == {"fd00:1::/64"}


def test_what_the_fabric_lacks_is_a_difference_of_its_own_kind():
    k = synced()
    k.fabric = [("trunk vxtr2", "on br0", None), (f"fdb {MINE.mac} on vxtr2", "static", None)]
    found = [(d.kind, d.object, d.want, d.have) for d in diffs(k)]
    assert found == [("fabric", "trunk vxtr2", "on br0", None), ("fabric", f"fdb {MINE.mac} on vxtr2", "static", None)]
    assert diffs(k)[0].text() == f"{NID[:12]} fabric trunk vxtr2: missing (want on br0)"
