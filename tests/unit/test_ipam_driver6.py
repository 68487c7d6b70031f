"""ipam_driver.driver with V6 over FakeKV: every verb for IPv6 pools, side by side with IPv4, replays and
confirmations, conflicts, bad input named by field with nothing written, and canonical keys."""

import ipaddress
import json
import threading

import pytest

from ipam_driver import pools, store
from ipam_driver.driver import IpamDriver
from store import schema
from tests.fakes import FakeKV
from wire.errors import Conflict, Exhausted, InvalidOption, StoreUnavailable
from wire.protocol import AddressRequest, PoolIDRequest, ReleaseAddressRequest, RequestPoolRequest

ROOT = schema.PREFIX + "/ipam/"
GW = {"RequestAddressType": "com.docker.network.gateway"}
POOL = "fd00:1::/64"
PID = "vxnet-local/fd00:1::/64"
POOL_KEY = ROOT + "pools/vxnet-local/fd00:1::_64"


@pytest.fixture
def kv():
    return FakeKV()


def driver(kv, host="h1", scope="local"):
    return IpamDriver(store.IpamStore(kv), host, scope)


def pool_req(pool="", sub="", space="vxnet-local", v6=True, options=None):
    return RequestPoolRequest.decode({"AddressSpace": space, "Pool": pool, "SubPool": sub,
                                      "Options": options, "V6": v6})


def addr_req(pool_id, address="", options=None):
    return AddressRequest.decode({"PoolID": pool_id, "Address": address, "Options": options})


def release_req(pool_id, address):
    return ReleaseAddressRequest.decode({"PoolID": pool_id, "Address": address})


def value(kv, key):
    return json.loads(kv.data[key].value)


def addr_key(address, pool="fd00:1::_64", space="vxnet-local"):
    return ROOT + f"addresses/{space}/{pool}/{address}"


def address_keys(kv):
    return kv.keys(ROOT + "addresses/")


def assert_keys_canonical(kv):
    """Every pool and address part of every IPAM key is the str() of what ipaddress reads from it."""
    for key in kv.keys(ROOT):
        parts = key[len(ROOT):].split("/")
        cidr = parts[2].replace("_", "/")
        assert str(ipaddress.ip_network(cidr)) == cidr, key
        if parts[0] == "addresses":
            assert str(ipaddress.ip_address(parts[3])) == parts[3], key
            assert value(kv, key)["address"] == parts[3] and value(kv, key)["pool"] == cidr


# --- RequestPool ----------------------------------------------------------------------------------------------

def test_explicit_v6_pool_is_recorded_and_its_pool_id_parses_back(kv):
    reply = driver(kv).request_pool(pool_req(POOL))
    assert reply == {"PoolID": PID, "Pool": POOL, "Data": {}}
    record = value(kv, POOL_KEY)
    assert (record["cidr"], record["space"], record["hosts"]) == (POOL, "vxnet-local", ["h1"])
    assert pools.parse_pool_id(reply["PoolID"]) == ("vxnet-local", ipaddress.IPv6Network(POOL), None)
    sub = driver(kv, "h2").request_pool(pool_req(POOL, "fd00:1:0:0:8000::/65"))
    assert sub["PoolID"] == "vxnet-local/fd00:1::/64/fd00:1:0:0:8000::/65" and sub["Pool"] == POOL
    assert value(kv, POOL_KEY)["hosts"] == ["h1", "h2"]


def test_v4_and_v6_pools_of_one_network_live_side_by_side(kv):
    d = driver(kv)
    v4 = d.request_pool(pool_req("10.1.0.0/24", v6=False))["PoolID"]
    v6 = d.request_pool(pool_req(POOL))["PoolID"]
    assert d.request_address(addr_req(v4, options=GW))["Address"] == "10.1.0.1/24"
    assert d.request_address(addr_req(v6, options=GW))["Address"] == "fd00:1::1/64"
    assert d.request_address(addr_req(v4))["Address"] == "10.1.0.2/24"
    assert d.request_address(addr_req(v6))["Address"] == "fd00:1::2/64"
    d.release_pool(PoolIDRequest(v6))
    assert kv.keys(ROOT + "pools/") == [ROOT + "pools/vxnet-local/10.1.0.0_24"]
    assert [k.rsplit("/", 1)[1] for k in address_keys(kv)] == ["10.1.0.1", "10.1.0.2"]
    d.release_pool(PoolIDRequest(v4))
    assert kv.keys(ROOT) == []


def test_auto_v6_pools_are_free_64s_of_the_default_ula_range(kv):
    driver(kv, "h2").request_pool(pool_req("fd69:c281:134c:1::/64", space="vxnet-global"))
    got = [driver(kv, f"h{i % 2}").request_pool(pool_req())["Pool"] for i in range(4)]
    assert got == ["fd69:c281:134c::/64", "fd69:c281:134c:2::/64", "fd69:c281:134c:3::/64",
                   "fd69:c281:134c:4::/64"]
    # IPv4's automatic pools are not moved by the v6 ones, nor the other way round.
    assert driver(kv).request_pool(pool_req(v6=False))["Pool"] == "10.213.0.0/24"
    assert driver(kv).request_pool(pool_req())["Pool"] == "fd69:c281:134c:5::/64"
    assert_keys_canonical(kv)


def test_auto_v6_range_exhausted(kv):
    driver(kv).request_pool(pool_req("fd69:c281:134c::/48", space="vxnet-global"))
    with pytest.raises(Exhausted, match=r"Pool: no free /64 left in fd69:c281:134c::/48; give --subnet"):
        driver(kv).request_pool(pool_req())
    assert driver(kv).request_pool(pool_req(v6=False))["Pool"] == "10.213.0.0/24"


def test_v6_conflicts_and_joins(kv):
    h1, h2 = driver(kv, "h1"), driver(kv, "h2")
    h1.request_pool(pool_req(POOL))
    with pytest.raises(Conflict, match=r"Pool: fd00:1::/64 is already in use on this host"):
        h1.request_pool(pool_req(POOL))
    assert h2.request_pool(pool_req(POOL))["PoolID"] == PID  # a second host joins the shared overlay
    for other in ("fd00:1::/48", "fd00:1::/80"):
        with pytest.raises(Conflict) as err:
            driver(kv, "h3").request_pool(pool_req(other))
        assert f"Pool: {other} overlaps pool {POOL}" in str(err.value)
    # Another address space is independent, as for IPv4.
    assert driver(kv, "h3").request_pool(pool_req("fd00:1::/48", space="vxnet-global"))["Pool"] == "fd00:1::/48"
    assert value(kv, POOL_KEY)["hosts"] == ["h1", "h2"]


@pytest.mark.parametrize("req, words", [
    (pool_req("fd00:1::5/64"), ["Pool", "host bits", "fd00:1::/64"]),
    (pool_req("FD00:1::/64"), ["Pool", "must be written fd00:1::/64"]),
    (pool_req("fd00:1:0:0::/64"), ["Pool", "must be written fd00:1::/64"]),
    (pool_req("fd00:1::/127"), ["Pool", "too small", "/126"]),
    (pool_req("ff02::/64"), ["Pool", "not global unicast"]),
    (pool_req("fd00::%eth0/64"), ["Pool", "zone index"]),
    (pool_req("10.1.0.0/24"), ["Pool", "not an IPv6 network (V6 is true)"]),
    (pool_req(POOL, v6=False), ["Pool", "not an IPv4 network (V6 is false)"]),
    (pool_req(POOL, "fd00:2::/80"), ["SubPool", "fd00:2::/80", "not inside"]),
    (pool_req(POOL, "10.1.0.0/24"), ["SubPool", "not an IPv6 network"]),
    (pool_req(POOL, "fd00:1::/128"), ["SubPool", "subnet-router anycast"]),
    (pool_req("", "fd00:1::/80"), ["SubPool", "--subnet"]),
    (pool_req(POOL, space="default"), ["AddressSpace", "'default'"]),
])
def test_wrong_v6_pool_requests_name_the_field_and_write_nothing(kv, req, words):
    with pytest.raises(InvalidOption) as err:
        driver(kv).request_pool(req)
    for word in words:
        assert word in str(err.value)
    assert kv.keys(ROOT) == []


# --- RequestAddress -------------------------------------------------------------------------------------------

def test_gateway_ip6_aux_and_lowest_first(kv):
    d = driver(kv)
    pid = d.request_pool(pool_req(POOL))["PoolID"]
    assert d.request_address(addr_req(pid, options=GW)) == {"Address": "fd00:1::1/64", "Data": {}}
    assert d.request_address(addr_req(pid))["Address"] == "fd00:1::2/64"
    assert d.request_address(addr_req(pid, "fd00:1::3"))["Address"] == "fd00:1::3/64"        # --ip6
    assert d.request_address(addr_req(pid, "fd00:1::abcd"))["Address"] == "fd00:1::abcd/64"  # --aux-address
    assert d.request_address(addr_req(pid))["Address"] == "fd00:1::4/64"
    # The last address of the pool is a host's: IPv6 has no broadcast address.
    top = "fd00:1::ffff:ffff:ffff:ffff"
    assert d.request_address(addr_req(pid, top))["Address"] == f"{top}/64"
    assert value(kv, addr_key("fd00:1::1"))["kind"] == "gateway"
    assert value(kv, addr_key("fd00:1::abcd"))["kind"] == "container"
    assert_keys_canonical(kv)


def test_any_spelling_of_an_address_is_held_under_its_one_canonical_key(kv):
    d = driver(kv)
    pid = d.request_pool(pool_req(POOL))["PoolID"]
    assert d.request_address(addr_req(pid, "FD00:0001:0000:0000:0000:0000:0000:0011"))["Address"] == \
        "fd00:1::11/64"
    assert address_keys(kv) == [addr_key("fd00:1::11")]
    with pytest.raises(Conflict, match=r"Address: fd00:1::11 is already in use in pool fd00:1::/64"):
        d.request_address(addr_req(pid, "fd00:1:0:0::11"))
    d.release_address(release_req(pid, "fd00:1:0::0:11"))
    assert address_keys(kv) == []


def test_explicit_v6_gateway_and_dynamic_addresses_from_the_ip_range(kv):
    d = driver(kv)
    pid = d.request_pool(pool_req(POOL, "fd00:1::100/126"))["PoolID"]
    assert d.request_address(addr_req(pid, "fd00:1::fffe", GW))["Address"] == "fd00:1::fffe/64"
    assert d.request_address(addr_req(pid, "fd00:1::5"))["Address"] == "fd00:1::5/64"
    dynamic = [d.request_address(addr_req(pid))["Address"] for _ in range(4)]
    assert dynamic == ["fd00:1::100/64", "fd00:1::101/64", "fd00:1::102/64", "fd00:1::103/64"]
    with pytest.raises(Exhausted, match=r"no free address left in range fd00:1::100/126 of pool fd00:1::/64"):
        d.request_address(addr_req(pid))


def test_a_126_serves_a_gateway_and_two_containers_then_is_exhausted(kv):
    d = driver(kv)
    pid = d.request_pool(pool_req("fd00:1::/126"))["PoolID"]
    got = [d.request_address(addr_req(pid, options=GW if i == 0 else None))["Address"] for i in range(3)]
    assert got == ["fd00:1::1/126", "fd00:1::2/126", "fd00:1::3/126"]
    with pytest.raises(Exhausted, match=r"no free address left in pool fd00:1::/126"):
        d.request_address(addr_req(pid))
    d.release_address(release_req(pid, "fd00:1::2"))
    assert d.request_address(addr_req(pid))["Address"] == "fd00:1::2/126"
    assert len(address_keys(kv)) == 3


@pytest.mark.parametrize("address, words", [
    ("fd00:1::", ["Address", "subnet-router anycast"]),
    ("fd00:1::fdff:ffff:ffff:ff80", ["Address", "reserved subnet anycast", "RFC 2526"]),
    ("fd00:1::fdff:ffff:ffff:fffe", ["Address", "RFC 2526"]),
    ("fd00:2::5", ["Address", "outside pool fd00:1::/64"]),
    ("10.1.0.5", ["Address", "not an IPv6 address"]),
    ("fd00:1::5%eth0", ["Address", "zone index"]),
    ("fd00:1::5/64", ["Address", "'fd00:1::5/64'"]),
])
def test_wrong_v6_addresses_name_the_field_and_write_nothing(kv, address, words):
    d = driver(kv)
    pid = d.request_pool(pool_req(POOL))["PoolID"]
    before = dict(kv.data)
    for call in (lambda: d.request_address(addr_req(pid, address)),
                 lambda: d.request_address(addr_req(pid, address, GW)),
                 lambda: d.release_address(release_req(pid, address))):
        with pytest.raises(InvalidOption) as err:
            call()
        for word in words:
            assert word in str(err.value)
    assert kv.data == before


def test_foreign_v6_pool_ids_are_refused_by_field(kv):
    d = driver(kv)
    d.request_pool(pool_req(POOL))
    before = dict(kv.data)
    for pid in ("vxnet-local/fd00:1::5/64", "vxnet-local/FD00:1::/64", "vxnet-local/fd00:1::/64/10.1.0.0/24",
                "vxnet-local/fd00:1::/64/fd00:2::/80", "vxnet-local/fd00:1::", "vxnet-local/fd00:1::/64/",
                "../fd00:1::/64"):
        for call in (lambda: d.release_pool(PoolIDRequest(pid)), lambda: d.request_address(addr_req(pid)),
                     lambda: d.release_address(release_req(pid, "fd00:1::1"))):
            with pytest.raises(InvalidOption, match="PoolID"):
                call()
    assert kv.data == before
    with pytest.raises(Conflict, match=r"PoolID: pool fd00:9::/64 in address space vxnet-local is not allocated"):
        d.request_address(addr_req("vxnet-local/fd00:9::/64"))


# --- replays and confirmations --------------------------------------------------------------------------------

def test_swarm_allocator_replays_of_v6_change_nothing_whichever_manager_asks(kv):
    old, new = driver(kv, "m1", "global"), driver(kv, "m2", "global")
    req = pool_req(POOL, space="vxnet-global")
    pid = old.request_pool(req)["PoolID"]
    gateway = old.request_address(addr_req(pid, options=GW))["Address"]
    task = old.request_address(addr_req(pid))["Address"]
    before = dict(kv.data)
    assert new.request_pool(req)["PoolID"] == pid == "vxnet-global/fd00:1::/64"
    assert new.request_address(addr_req(pid, gateway.split("/")[0], GW))["Address"] == gateway
    assert new.request_address(addr_req(pid, options=GW))["Address"] == gateway
    assert new.request_address(addr_req(pid, task.split("/")[0]))["Address"] == task
    assert kv.data == before
    assert value(kv, ROOT + "pools/vxnet-global/fd00:1::_64")["hosts"] == ["@swarm"]
    new.release_address(release_req(pid, task.split("/")[0]))
    new.release_address(release_req(pid, gateway.split("/")[0]))
    new.release_pool(PoolIDRequest(pid))
    assert kv.keys(ROOT) == []


def test_swarm_nodes_confirm_v6_task_addresses_in_the_local_space(kv):
    a, b = driver(kv, "a", "global"), driver(kv, "b", "global")
    pid = a.request_pool(pool_req(POOL))["PoolID"]
    assert b.request_pool(pool_req(POOL))["PoolID"] == pid
    a.request_address(addr_req(pid, "fd00:1::5"))
    assert b.request_address(addr_req(pid, "fd00:1::5"))["Address"] == "fd00:1::5/64"
    assert value(kv, addr_key("fd00:1::5"))["hosts"] == ["a", "b"]
    a.release_address(release_req(pid, "fd00:1::5"))
    assert value(kv, addr_key("fd00:1::5"))["hosts"] == ["b"]


def test_v6_gateway_is_shared_by_hosts_and_a_held_address_is_a_conflict_in_local_space(kv):
    h1, h2 = driver(kv, "h1"), driver(kv, "h2")
    pid = h1.request_pool(pool_req(POOL))["PoolID"]
    h2.request_pool(pool_req(POOL))
    assert h1.request_address(addr_req(pid, options=GW))["Address"] == "fd00:1::1/64"
    assert h2.request_address(addr_req(pid, options=GW))["Address"] == "fd00:1::1/64"
    assert value(kv, addr_key("fd00:1::1"))["hosts"] == ["h1", "h2"]
    with pytest.raises(Conflict, match=r"Address: fd00:1::1 is already the gateway in pool fd00:1::/64"):
        h2.request_address(addr_req(pid, "fd00:1::1"))
    h1.request_address(addr_req(pid, "fd00:1::9"))
    with pytest.raises(Conflict, match=r"Address: fd00:1::9 is already in use"):
        h2.request_address(addr_req(pid, "fd00:1::9"))
    assert value(kv, addr_key("fd00:1::9"))["hosts"] == ["h1"]


# --- releases -------------------------------------------------------------------------------------------------

def test_v6_releases_are_idempotent_and_unknown_ones_succeed(kv):
    d = driver(kv)
    pid = d.request_pool(pool_req(POOL))["PoolID"]
    d.request_address(addr_req(pid, "fd00:1::5"))
    for _ in range(2):
        assert d.release_address(release_req(pid, "fd00:1::5")) == {}
    assert address_keys(kv) == []
    assert d.release_address(release_req("vxnet-local/fd00:7::/64", "fd00:7::1")) == {}
    assert d.release_pool(PoolIDRequest("vxnet-local/fd00:7::/64")) == {}
    for _ in range(2):
        assert d.release_pool(PoolIDRequest(pid)) == {}
    assert kv.keys(ROOT) == []


def test_release_pool_deletes_more_v6_addresses_than_one_transaction_holds(kv):
    d = driver(kv)
    pid = d.request_pool(pool_req(POOL))["PoolID"]
    for n in range(store.TXN_BATCH * 2 + 10):
        d.request_address(addr_req(pid, f"fd00:1::{n + 1:x}"))
    d.release_pool(PoolIDRequest(pid))
    assert kv.keys(ROOT) == []


# --- a /64 with thousands held --------------------------------------------------------------------------------

def test_a_64_with_thousands_held_allocates_the_lowest_hole_in_one_read_and_one_transaction(kv):
    d = driver(kv)
    pid = d.request_pool(pool_req(POOL))["PoolID"]
    held = 3000
    for n in range(1, held + 1):
        if n != 1500:
            d.request_address(addr_req(pid, f"fd00:1::{n:x}"))  # a reservation reads one key, not the pool
    before = kv.round_trips
    assert d.request_address(addr_req(pid))["Address"] == f"fd00:1::{1500:x}/64"
    assert kv.round_trips - before == 2
    before = kv.round_trips
    assert d.request_address(addr_req(pid))["Address"] == f"fd00:1::{held + 1:x}/64"
    assert kv.round_trips - before == 2
    assert len(address_keys(kv)) == held + 1


# --- races and failures ---------------------------------------------------------------------------------------

def test_v6_address_taken_during_our_pick_is_skipped():
    kv = FakeKV()
    h1, h2 = driver(kv, "h1"), driver(kv, "h2")
    pid = h1.request_pool(pool_req(POOL))["PoolID"]
    h2.request_pool(pool_req(POOL))
    kv.cut_in = lambda: h2.request_address(addr_req(pid))
    assert h1.request_address(addr_req(pid))["Address"] == "fd00:1::2/64"
    assert value(kv, addr_key("fd00:1::1"))["hosts"] == ["h2"]


def test_auto_v6_pool_taken_during_our_pick_is_skipped():
    kv = FakeKV()
    kv.cut_in = lambda: driver(kv, "h2").request_pool(pool_req())
    assert driver(kv, "h1").request_pool(pool_req())["Pool"] == "fd69:c281:134c:1::/64"


def test_three_hosts_allocating_v6_in_parallel_never_collide(kv):
    hosts = [driver(kv, f"h{i}") for i in range(3)]
    pid = hosts[0].request_pool(pool_req(POOL))["PoolID"]
    for d in hosts[1:]:
        d.request_pool(pool_req(POOL))
    got, errors = [], []

    def work(d):
        try:
            for _ in range(30):
                got.append(d.request_address(addr_req(pid))["Address"])
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(hosts[i % 3],)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(got) == 180 and len(set(got)) == 180
    assert sorted(got, key=lambda a: ipaddress.ip_interface(a)) == [f"fd00:1::{n:x}/64" for n in range(1, 181)]


def _scenario(kv):
    """Two hosts share a dual-stack network, fill it a little and let go of everything."""
    h1, h2 = driver(kv, "h1"), driver(kv, "h2")
    v4 = h1.request_pool(pool_req("10.1.0.0/24", v6=False))["PoolID"]
    v6 = h1.request_pool(pool_req(POOL))["PoolID"]
    h1.request_address(addr_req(v6, options=GW))
    h2.request_pool(pool_req(POOL))
    h2.request_address(addr_req(v6, "fd00:1::1", GW))
    h1.request_address(addr_req(v4))
    h1.request_address(addr_req(v6))
    h2.request_address(addr_req(v6, "fd00:1::9"))
    auto = h1.request_pool(pool_req())["PoolID"]
    h1.request_address(addr_req(auto))
    h1.release_pool(PoolIDRequest(v6))
    h2.release_pool(PoolIDRequest(v6))
    h1.release_pool(PoolIDRequest(auto))
    h1.release_pool(PoolIDRequest(v4))


def test_etcd_lost_at_any_write_of_a_v6_scenario_leaves_no_orphan_and_a_retry_cleans_up():
    writes = 0
    while True:
        kv = FakeKV()
        kv.fail_after = writes
        try:
            _scenario(kv)
            break
        except StoreUnavailable:
            pass
        for key in address_keys(kv):
            space, cidr = key[len(ROOT + "addresses/"):].split("/")[:2]
            assert ROOT + f"pools/{space}/{cidr}" in kv.data, f"orphan {key} after failing write {writes}"
        assert_keys_canonical(kv)
        kv.unavailable, kv.fail_after = False, None
        for host in ("h1", "h2"):
            for pid in ("vxnet-local/10.1.0.0/24", PID, "vxnet-local/fd69:c281:134c::/64"):
                driver(kv, host).release_pool(PoolIDRequest(pid))
        assert kv.keys(ROOT) == [], f"leftovers after failing write {writes}"
        writes += 1
    assert writes > 10 and kv.keys(ROOT) == []
