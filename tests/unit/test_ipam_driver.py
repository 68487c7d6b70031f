"""ipam_driver.driver over FakeKV: replies, end state in the key space, replays, races and failures."""

import ipaddress
import json
import threading

import pytest

from ipam_driver import pools, store
from ipam_driver.driver import IpamDriver
from store import schema
from tests.fakes import FakeKV
from wire.errors import Conflict, Exhausted, InvalidOption, StoreUnavailable
from wire.protocol import (
    AddressRequest,
    EmptyRequest,
    PoolIDRequest,
    ReleaseAddressRequest,
    RequestPoolRequest,
)

ROOT = schema.PREFIX + "/ipam/"
GW = {"RequestAddressType": "com.docker.network.gateway"}


@pytest.fixture
def kv():
    return FakeKV()  # refuses, as etcd does, transactions of more than 128 operations


def driver(kv, host="h1", scope="local"):
    return IpamDriver(store.IpamStore(kv), host, scope)


def pool_req(pool="", sub="", space="vxnet-local", v6=False, options=None):
    return RequestPoolRequest.decode({"AddressSpace": space, "Pool": pool, "SubPool": sub,
                                      "Options": options, "V6": v6})


def addr_req(pool_id, address="", options=None):
    return AddressRequest.decode({"PoolID": pool_id, "Address": address, "Options": options})


def value(kv, key):
    return json.loads(kv.data[key].value)


def address_keys(kv):
    return kv.keys(ROOT + "addresses/")


def orphans(kv):
    """Address keys whose pool key is gone."""
    out = []
    for key in address_keys(kv):
        space, cidr = key[len(ROOT + "addresses/"):].split("/")[:2]
        if ROOT + f"pools/{space}/{cidr}" not in kv.data:
            out.append(key)
    return out


# --- capabilities ---------------------------------------------------------------------------------------------

def test_capabilities_and_default_spaces(kv):
    d = driver(kv)
    assert d.get_capabilities(EmptyRequest()) == {"RequiresMACAddress": False, "RequiresRequestReplay": False}
    assert d.get_default_address_spaces(EmptyRequest()) == {
        "LocalDefaultAddressSpace": "vxnet-local", "GlobalDefaultAddressSpace": "vxnet-global"}


# --- RequestPool ----------------------------------------------------------------------------------------------

def test_explicit_pool_is_recorded_with_its_holder(kv):
    reply = driver(kv).request_pool(pool_req("10.1.0.0/24"))
    assert reply == {"PoolID": "vxnet-local/10.1.0.0/24", "Pool": "10.1.0.0/24", "Data": {}}
    record = value(kv, ROOT + "pools/vxnet-local/10.1.0.0_24")
    assert record["cidr"] == "10.1.0.0/24" and record["space"] == "vxnet-local" and record["hosts"] == ["h1"]


def test_sub_pool_travels_in_the_pool_id(kv):
    reply = driver(kv).request_pool(pool_req("10.1.0.0/24", "10.1.0.128/25"))
    assert reply["PoolID"] == "vxnet-local/10.1.0.0/24/10.1.0.128/25"
    assert reply["Pool"] == "10.1.0.0/24"


def test_same_pool_twice_on_one_host_is_a_conflict_in_local_space(kv):
    d = driver(kv)
    d.request_pool(pool_req("10.1.0.0/24"))
    with pytest.raises(Conflict, match=r"Pool: 10.1.0.0/24 is already in use on this host"):
        d.request_pool(pool_req("10.1.0.0/24"))
    assert value(kv, ROOT + "pools/vxnet-local/10.1.0.0_24")["hosts"] == ["h1"]


def test_another_host_joins_a_local_pool(kv):
    first = driver(kv, "h1").request_pool(pool_req("10.1.0.0/24"))
    second = driver(kv, "h2").request_pool(pool_req("10.1.0.0/24"))
    assert first == second
    assert value(kv, ROOT + "pools/vxnet-local/10.1.0.0_24")["hosts"] == ["h1", "h2"]


def test_swarm_allocator_replays_change_nothing_whichever_manager_asks(kv):
    """Leader change: the new leader replays the pool, the gateway and the task addresses the old one held."""
    old, new = driver(kv, "m1", "global"), driver(kv, "m2", "global")
    req = pool_req("10.1.0.0/24", space="vxnet-global")
    pid = old.request_pool(req)["PoolID"]
    gateway = old.request_address(addr_req(pid, options=GW))["Address"]
    task = old.request_address(addr_req(pid))["Address"]
    before = dict(kv.data)
    assert new.request_pool(req)["PoolID"] == pid == "vxnet-global/10.1.0.0/24"
    assert new.request_address(addr_req(pid, gateway.split("/")[0], GW))["Address"] == gateway
    assert new.request_address(addr_req(pid, options=GW))["Address"] == gateway
    assert new.request_address(addr_req(pid, task.split("/")[0]))["Address"] == task
    assert old.request_pool(req)["PoolID"] == pid  # and the old leader again, after leading once more
    assert kv.data == before
    assert value(kv, ROOT + "pools/vxnet-global/10.1.0.0_24")["hosts"] == ["@swarm"]
    # The service and the network go, released by the new leader alone: nothing is left behind.
    new.release_address(addr_req(pid, task.split("/")[0]))
    new.release_address(addr_req(pid, gateway.split("/")[0]))
    new.release_pool(PoolIDRequest(pid))
    assert kv.keys(ROOT) == []


def test_partial_overlap_is_a_conflict_naming_both(kv):
    driver(kv, "h1").request_pool(pool_req("10.1.0.0/24"))
    for other in ("10.1.0.0/16", "10.1.0.128/25"):
        with pytest.raises(Conflict) as err:
            driver(kv, "h2").request_pool(pool_req(other))
        assert other in str(err.value) and "10.1.0.0/24" in str(err.value)
    assert kv.keys(ROOT + "pools/") == [ROOT + "pools/vxnet-local/10.1.0.0_24"]


def test_address_spaces_are_independent(kv):
    driver(kv).request_pool(pool_req("10.1.0.0/24"))
    driver(kv).request_pool(pool_req("10.1.0.0/16", space="vxnet-global"))
    assert len(kv.keys(ROOT + "pools/")) == 2


def test_auto_pools_never_overlap(kv):
    driver(kv, "h2").request_pool(pool_req("10.213.1.0/24", space="vxnet-global"))
    got = []
    for i in range(6):
        reply = driver(kv, f"h{i % 2}").request_pool(pool_req())
        got.append(ipaddress.IPv4Network(reply["Pool"]))
    assert got[0] == ipaddress.IPv4Network("10.213.0.0/24")
    assert ipaddress.IPv4Network("10.213.1.0/24") not in got
    for i, net in enumerate(got):
        assert net.subnet_of(pools.DEFAULT_RANGE)
        assert all(not net.overlaps(other) for other in got[i + 1:])


def test_auto_pool_range_exhausted(kv):
    driver(kv).request_pool(pool_req("10.213.0.0/16", space="vxnet-global"))
    with pytest.raises(Exhausted, match=r"Pool: no free /24 left in 10.213.0.0/16"):
        driver(kv).request_pool(pool_req())


@pytest.mark.parametrize("req, words", [
    (pool_req("10.0.0.300/24"), ["Pool", "10.0.0.300/24"]),
    (pool_req("10.1.0.0/24", "10.2.0.0/25"), ["SubPool", "10.2.0.0/25", "not inside"]),
    (pool_req("", "10.2.0.0/25"), ["SubPool", "--subnet"]),
    (pool_req("10.1.0.0/24", v6=True), ["Pool", "'10.1.0.0/24' is not an IPv6 network (V6 is true)"]),
    (pool_req("fd00:1::/64"), ["Pool", "'fd00:1::/64' is not an IPv4 network (V6 is false)"]),
    (pool_req("10.1.0.0/24", space="default"), ["AddressSpace", "'default'"]),
    (pool_req("10.1.0.0/24", options={"colour": "blue"}), ["Options", "'colour'"]),
    (pool_req("10.1.0.0/32"), ["Pool", "too small"]),
])
def test_wrong_pool_requests_name_the_field(kv, req, words):
    with pytest.raises(InvalidOption) as err:
        driver(kv).request_pool(req)
    for word in words:
        assert word in str(err.value)
    assert kv.keys(ROOT) == []


def test_docker_options_are_accepted(kv):
    options = {"com.docker.network.ipam.serial": "true"}
    driver(kv, scope="global").request_pool(pool_req("10.1.0.0/24", space="vxnet-global", options=options))


def test_empty_address_space_follows_the_scope(kv):
    assert driver(kv, scope="global").request_pool(pool_req("10.1.0.0/24", space=""))["PoolID"].startswith(
        "vxnet-global/")
    assert driver(kv, scope="local").request_pool(pool_req("10.1.0.0/24", space=""))["PoolID"].startswith(
        "vxnet-local/")


# --- RequestAddress -------------------------------------------------------------------------------------------

def test_gateway_then_containers_get_the_lowest_free_addresses(kv):
    d = driver(kv)
    pid = d.request_pool(pool_req("10.1.0.0/24"))["PoolID"]
    assert d.request_address(addr_req(pid, options=GW)) == {"Address": "10.1.0.1/24", "Data": {}}
    assert d.request_address(addr_req(pid))["Address"] == "10.1.0.2/24"
    assert d.request_address(addr_req(pid, "10.1.0.3"))["Address"] == "10.1.0.3/24"
    assert d.request_address(addr_req(pid))["Address"] == "10.1.0.4/24"
    gateway = value(kv, ROOT + "addresses/vxnet-local/10.1.0.0_24/10.1.0.1")
    assert gateway["kind"] == "gateway" and gateway["hosts"] == ["h1"]
    assert value(kv, ROOT + "addresses/vxnet-local/10.1.0.0_24/10.1.0.2")["kind"] == "container"


def test_explicit_gateway_is_reserved(kv):
    d = driver(kv)
    pid = d.request_pool(pool_req("10.1.0.0/24"))["PoolID"]
    assert d.request_address(addr_req(pid, "10.1.0.254", GW))["Address"] == "10.1.0.254/24"
    assert d.request_address(addr_req(pid))["Address"] == "10.1.0.1/24"


def test_dynamic_addresses_come_from_the_sub_pool_static_ones_from_anywhere(kv):
    d = driver(kv)
    pid = d.request_pool(pool_req("10.1.0.0/24", "10.1.0.128/30"))["PoolID"]
    assert d.request_address(addr_req(pid, "10.1.0.1", GW))["Address"] == "10.1.0.1/24"
    assert d.request_address(addr_req(pid, "10.1.0.20"))["Address"] == "10.1.0.20/24"
    dynamic = [d.request_address(addr_req(pid))["Address"] for _ in range(4)]
    assert dynamic == ["10.1.0.128/24", "10.1.0.129/24", "10.1.0.130/24", "10.1.0.131/24"]
    with pytest.raises(Exhausted, match=r"no free address left in range 10.1.0.128/30 of pool 10.1.0.0/24"):
        d.request_address(addr_req(pid))


def test_exhausted_pool(kv):
    d = driver(kv)
    pid = d.request_pool(pool_req("10.1.0.0/30"))["PoolID"]
    assert [d.request_address(addr_req(pid))["Address"] for _ in range(2)] == ["10.1.0.1/30", "10.1.0.2/30"]
    with pytest.raises(Exhausted, match=r"no free address left in pool 10.1.0.0/30"):
        d.request_address(addr_req(pid))


def test_held_address_is_a_conflict_in_local_space(kv):
    h1, h2 = driver(kv, "h1"), driver(kv, "h2")
    pid = h1.request_pool(pool_req("10.1.0.0/24"))["PoolID"]
    h2.request_pool(pool_req("10.1.0.0/24"))
    h1.request_address(addr_req(pid, "10.1.0.5"))
    for d in (h1, h2):
        with pytest.raises(Conflict, match=r"Address: 10.1.0.5 is already in use in pool 10.1.0.0/24"):
            d.request_address(addr_req(pid, "10.1.0.5"))
    assert value(kv, ROOT + "addresses/vxnet-local/10.1.0.0_24/10.1.0.5")["hosts"] == ["h1"]


def test_swarm_nodes_confirm_task_addresses_in_the_local_space(kv):
    """Global scope: node A ran a task at .5 and died holding it; the manager gives .5 to a task on node B, whose
    dockerd asks for it in the local space (libnetwork's data scope for swarm networks): a confirmation."""
    a, b = driver(kv, "a", "global"), driver(kv, "b", "global")
    pid = a.request_pool(pool_req("10.1.0.0/24"))["PoolID"]
    assert b.request_pool(pool_req("10.1.0.0/24"))["PoolID"] == pid == "vxnet-local/10.1.0.0/24"
    a.request_address(addr_req(pid, "10.1.0.5"))
    assert b.request_address(addr_req(pid, "10.1.0.5"))["Address"] == "10.1.0.5/24"
    assert value(kv, ROOT + "addresses/vxnet-local/10.1.0.0_24/10.1.0.5")["hosts"] == ["a", "b"]
    a.release_address(addr_req(pid, "10.1.0.5"))  # node A comes back and cleans up: B's hold stays
    assert value(kv, ROOT + "addresses/vxnet-local/10.1.0.0_24/10.1.0.5")["hosts"] == ["b"]


def test_gateway_is_shared_by_hosts_joining_a_local_pool(kv):
    h1, h2, h3 = driver(kv, "h1"), driver(kv, "h2"), driver(kv, "h3")
    pid = h1.request_pool(pool_req("10.1.0.0/24"))["PoolID"]
    h2.request_pool(pool_req("10.1.0.0/24"))
    h3.request_pool(pool_req("10.1.0.0/24"))
    assert h1.request_address(addr_req(pid, options=GW))["Address"] == "10.1.0.1/24"
    assert h2.request_address(addr_req(pid, "10.1.0.1", GW))["Address"] == "10.1.0.1/24"
    assert h3.request_address(addr_req(pid, options=GW))["Address"] == "10.1.0.1/24"
    assert value(kv, ROOT + "addresses/vxnet-local/10.1.0.0_24/10.1.0.1")["hosts"] == ["h1", "h2", "h3"]
    with pytest.raises(Conflict, match=r"Address: 10.1.0.1 is already the gateway in pool 10.1.0.0/24"):
        h2.request_address(addr_req(pid, "10.1.0.1"))


def test_a_nodes_local_confirmations_and_the_allocators_holds_are_independent(kv):
    """The allocator holds in the global space, the node's dockerd confirms in the local one (as dockerd 20.10
    does): each release touches only its own."""
    manager, worker = driver(kv, "m", "global"), driver(kv, "w", "global")
    gpid = manager.request_pool(pool_req("10.1.0.0/24", space="vxnet-global"))["PoolID"]
    gateway = manager.request_address(addr_req(gpid, options=GW))["Address"].split("/")[0]
    task = manager.request_address(addr_req(gpid))["Address"].split("/")[0]
    lpid = worker.request_pool(pool_req("10.1.0.0/24"))["PoolID"]
    assert worker.request_address(addr_req(lpid, gateway, GW))["Address"] == f"{gateway}/24"
    assert worker.request_address(addr_req(lpid, task))["Address"] == f"{task}/24"
    worker.release_address(addr_req(lpid, task))
    worker.release_address(addr_req(lpid, gateway))
    worker.release_pool(PoolIDRequest(lpid))
    assert kv.keys(ROOT + "pools/") == [ROOT + "pools/vxnet-global/10.1.0.0_24"]
    assert value(kv, ROOT + f"addresses/vxnet-global/10.1.0.0_24/{task}")["hosts"] == ["@swarm"]


def test_manager_and_worker_on_one_host_release_independently(kv):
    """A Swarm manager also runs tasks: its allocator (global space) and its own dockerd (local space) both hold
    the pool and the gateway."""
    node = driver(kv, "n1", "global")
    gpid = node.request_pool(pool_req("10.1.0.0/24", space="vxnet-global"))["PoolID"]   # allocator
    node.request_address(addr_req(gpid, options=GW))
    lpid = node.request_pool(pool_req("10.1.0.0/24"))["PoolID"]                         # the node's dockerd
    node.request_address(addr_req(lpid, "10.1.0.1", GW))
    node.release_address(addr_req(lpid, "10.1.0.1"))                                     # ... drops the network
    node.release_pool(PoolIDRequest(lpid))
    assert kv.keys(ROOT + "pools/") == [ROOT + "pools/vxnet-global/10.1.0.0_24"]
    assert node.request_address(addr_req(gpid))["Address"] == "10.1.0.2/24"  # the gateway is still held
    node.release_address(addr_req(gpid, "10.1.0.1"))                         # the allocator deletes the network
    node.release_address(addr_req(gpid, "10.1.0.2"))
    node.release_pool(PoolIDRequest(gpid))
    assert kv.keys(ROOT) == []


@pytest.mark.parametrize("address, words", [
    ("10.2.0.5", ["Address", "10.2.0.5", "outside pool 10.1.0.0/24"]),
    ("10.1.0.0", ["Address", "network address"]),
    ("10.1.0.256", ["Address", "'10.1.0.256'"]),
])
def test_wrong_addresses_name_the_field(kv, address, words):
    d = driver(kv)
    pid = d.request_pool(pool_req("10.1.0.0/24"))["PoolID"]
    with pytest.raises(InvalidOption) as err:
        d.request_address(addr_req(pid, address))
    for word in words:
        assert word in str(err.value)
    assert address_keys(kv) == []


def test_address_in_unknown_or_foreign_pool(kv):
    d = driver(kv)
    with pytest.raises(Conflict, match=r"PoolID: pool 10.9.0.0/24 in address space vxnet-local is not allocated"):
        d.request_address(addr_req("vxnet-local/10.9.0.0/24"))
    with pytest.raises(InvalidOption, match=r"PoolID: 'abc'"):
        d.request_address(addr_req("abc"))
    with pytest.raises(InvalidOption, match=r"PoolID: 'other' is not a vxnet address space"):
        d.request_address(addr_req("other/10.9.0.0/24"))


# --- releases -------------------------------------------------------------------------------------------------

def test_release_address_is_idempotent(kv):
    d = driver(kv)
    pid = d.request_pool(pool_req("10.1.0.0/24"))["PoolID"]
    d.request_address(addr_req(pid, "10.1.0.5"))
    for _ in range(2):
        assert d.release_address(addr_req(pid, "10.1.0.5")) == {}
    assert address_keys(kv) == []
    assert d.request_address(addr_req(pid))["Address"] == "10.1.0.1/24"


def test_release_address_of_unknown_things_succeeds(kv):
    d = driver(kv)
    pid = d.request_pool(pool_req("10.1.0.0/24"))["PoolID"]
    for pool_id, address in ((pid, "10.1.0.9"), ("vxnet-local/10.7.0.0/24", "10.7.0.1")):
        assert d.release_address(addr_req(pool_id, address)) == {}


@pytest.mark.parametrize("pool_id,address,needle", [
    ("own", "10.7.0.1", "Address: 10.7.0.1 is outside pool 10.1.0.0/24"),
    ("own", "junk", "Address: 'junk' is not an IPv4 address"),
    ("own", "10.1.0.255", "broadcast"),
    ("junk", "10.1.0.1", "PoolID: 'junk' is not a vxnet pool ID"),
    ("../../etc/10.1.0.0/24", "10.1.0.1", "PoolID: '../../etc/10.1.0.0/24' is not a vxnet pool ID"),
    ("..%2f/10.1.0.0/24", "10.1.0.1", "PoolID: '..%2f' is not a vxnet address space"),
])
def test_release_address_of_malformed_things_is_refused_by_field_and_changes_nothing(kv, pool_id, address, needle):
    d = driver(kv)
    pid = d.request_pool(pool_req("10.1.0.0/24"))["PoolID"]
    d.request_address(addr_req(pid, "10.1.0.1"))
    before = dict(kv.data)
    with pytest.raises(InvalidOption) as err:
        d.release_address(addr_req(pid if pool_id == "own" else pool_id, address))
    assert needle in str(err.value) and kv.data == before


def test_release_address_without_address_is_refused_by_the_decoder():
    from wire.errors import InvalidRequest
    for body, needle in (({"PoolID": "vxnet-local/10.1.0.0/24"}, "Address: missing"),
                         ({"PoolID": "vxnet-local/10.1.0.0/24", "Address": ""}, "Address: empty")):
        with pytest.raises(InvalidRequest, match=needle):
            ReleaseAddressRequest.decode(body)


def test_another_host_cannot_release_what_it_does_not_hold(kv):
    h1, h2 = driver(kv, "h1"), driver(kv, "h2")
    pid = h1.request_pool(pool_req("10.1.0.0/24"))["PoolID"]
    h1.request_address(addr_req(pid, "10.1.0.5"))
    h2.release_address(addr_req(pid, "10.1.0.5"))
    h2.release_pool(PoolIDRequest(pid))
    assert ROOT + "addresses/vxnet-local/10.1.0.0_24/10.1.0.5" in kv.data
    assert value(kv, ROOT + "pools/vxnet-local/10.1.0.0_24")["hosts"] == ["h1"]


def test_release_pool_keeps_it_for_other_holders_then_deletes_everything(kv):
    h1, h2 = driver(kv, "h1"), driver(kv, "h2")
    pid = h1.request_pool(pool_req("10.1.0.0/24"))["PoolID"]
    h2.request_pool(pool_req("10.1.0.0/24"))
    h1.request_address(addr_req(pid, options=GW))
    h2.request_address(addr_req(pid))
    h1.release_pool(PoolIDRequest(pid))
    assert value(kv, ROOT + "pools/vxnet-local/10.1.0.0_24")["hosts"] == ["h2"]
    assert len(address_keys(kv)) == 2
    for _ in range(2):
        assert h2.release_pool(PoolIDRequest(pid)) == {}
    assert kv.keys(ROOT + "pools/") == [] and address_keys(kv) == []
    # The CIDR is free again, for anyone.
    assert h1.request_pool(pool_req("10.1.0.0/24"))["PoolID"] == pid


def test_release_of_unknown_pools_succeeds(kv):
    d = driver(kv)
    for pid in ("vxnet-local/10.1.0.0/24", "vxnet-local/10.1.0.0/24/10.1.0.0/25"):
        assert d.release_pool(PoolIDRequest(pid)) == {}


@pytest.mark.parametrize("pid", ["junk", "a/b/c", "other/10.1.0.0/24", "../10.1.0.0/24", "vxnet-local/10.1.0.5/24",
                                 "vxnet-local/10.1.0.0/24\0", "vxnet-local/10.1.0.0/24/10.2.0.0/25"])
def test_release_of_a_pool_id_vxnet_never_hands_out_is_refused_and_changes_nothing(kv, pid):
    d = driver(kv)
    d.request_pool(pool_req("10.1.0.0/24"))
    before = dict(kv.data)
    with pytest.raises(InvalidOption, match="PoolID"):
        d.release_pool(PoolIDRequest(pid))
    assert kv.data == before


def test_release_pool_with_more_addresses_than_one_transaction_holds(kv):
    d = driver(kv)
    pid = d.request_pool(pool_req("10.1.0.0/23"))["PoolID"]
    for _ in range(store.TXN_BATCH * 2 + 10):
        d.request_address(addr_req(pid))
    d.release_pool(PoolIDRequest(pid))
    assert kv.keys(ROOT + "pools/") == [] and address_keys(kv) == []


# --- races ----------------------------------------------------------------------------------------------------

def test_overlapping_pool_created_during_our_check_is_seen():
    kv = FakeKV()
    kv.cut_in = lambda: driver(kv, "h2").request_pool(pool_req("10.1.0.0/16"))
    with pytest.raises(Conflict, match=r"Pool: 10.1.0.0/24 overlaps pool 10.1.0.0/16"):
        driver(kv, "h1").request_pool(pool_req("10.1.0.0/24"))
    assert kv.keys(ROOT + "pools/") == [ROOT + "pools/vxnet-local/10.1.0.0_16"]


def test_auto_pool_taken_during_our_pick_is_skipped():
    kv = FakeKV()
    kv.cut_in = lambda: driver(kv, "h2").request_pool(pool_req())
    assert driver(kv, "h1").request_pool(pool_req())["Pool"] == "10.213.1.0/24"
    assert len(kv.keys(ROOT + "pools/")) == 2


def test_address_taken_during_our_pick_is_skipped():
    kv = FakeKV()
    h1, h2 = driver(kv, "h1"), driver(kv, "h2")
    pid = h1.request_pool(pool_req("10.1.0.0/24"))["PoolID"]
    h2.request_pool(pool_req("10.1.0.0/24"))
    kv.cut_in = lambda: h2.request_address(addr_req(pid))
    assert h1.request_address(addr_req(pid))["Address"] == "10.1.0.2/24"
    assert value(kv, ROOT + "addresses/vxnet-local/10.1.0.0_24/10.1.0.1")["hosts"] == ["h2"]


def test_allocation_racing_the_last_release_leaves_no_orphan():
    kv = FakeKV()
    h1 = driver(kv, "h1")
    pid = h1.request_pool(pool_req("10.1.0.0/24"))["PoolID"]
    kv.cut_in = lambda: h1.release_pool(PoolIDRequest(pid))
    with pytest.raises(Conflict):
        h1.request_address(addr_req(pid))
    assert kv.keys(ROOT) == []


def test_two_hosts_allocating_in_parallel_never_collide(kv):
    hosts = [driver(kv, "h1"), driver(kv, "h2")]
    pid = hosts[0].request_pool(pool_req("10.1.0.0/24"))["PoolID"]
    hosts[1].request_pool(pool_req("10.1.0.0/24"))
    got, errors = [], []

    def work(d):
        try:
            for _ in range(40):
                got.append(d.request_address(addr_req(pid))["Address"])
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(hosts[i % 2],)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(got) == 240 and len(set(got)) == 240
    assert len(address_keys(kv)) == 240


def test_two_hosts_picking_auto_pools_in_parallel_never_overlap(kv):
    got = []
    threads = [threading.Thread(target=lambda d=driver(kv, f"h{i}"): got.extend(
        ipaddress.IPv4Network(d.request_pool(pool_req())["Pool"]) for _ in range(10))) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 40
    assert all(not a.overlaps(b) for i, a in enumerate(got) for b in got[i + 1:])


# --- failures -------------------------------------------------------------------------------------------------

def test_store_unavailable_propagates_unchanged(kv):
    d = driver(kv)
    pid = d.request_pool(pool_req("10.1.0.0/24"))["PoolID"]
    kv.unavailable = True
    calls = [lambda: d.request_pool(pool_req("10.2.0.0/24")), lambda: d.request_address(addr_req(pid)),
             lambda: d.release_address(addr_req(pid, "10.1.0.1")), lambda: d.release_pool(PoolIDRequest(pid))]
    for call in calls:
        with pytest.raises(StoreUnavailable, match=r"etcd unreachable"):
            call()


def _scenario(kv):
    """Two hosts share a pool, fill it a little and let go of everything."""
    h1, h2 = driver(kv, "h1"), driver(kv, "h2")
    pid = h1.request_pool(pool_req("10.1.0.0/24"))["PoolID"]
    h1.request_address(addr_req(pid, options=GW))
    h2.request_pool(pool_req("10.1.0.0/24"))
    h2.request_address(addr_req(pid, "10.1.0.1", GW))
    h1.request_address(addr_req(pid))
    h2.request_address(addr_req(pid, "10.1.0.9"))
    auto = h1.request_pool(pool_req())["PoolID"]
    h1.request_address(addr_req(auto))
    h1.release_pool(PoolIDRequest(pid))
    h2.release_pool(PoolIDRequest(pid))
    h1.release_pool(PoolIDRequest(auto))


def test_etcd_lost_at_any_write_leaves_no_orphan_and_a_retry_cleans_up():
    writes = 0
    while True:
        kv = FakeKV()
        kv.fail_after = writes
        try:
            _scenario(kv)
            break  # enough writes allowed: the scenario completed
        except StoreUnavailable:
            pass
        assert orphans(kv) == [], f"orphans after failing write {writes}"
        kv.unavailable, kv.fail_after = False, None
        # dockerd retries the releases it did not get an answer for; any later RequestPool also finishes a pool
        # whose last holder was gone when etcd went away.
        for host in ("h1", "h2"):
            for pid in ("vxnet-local/10.1.0.0/24", "vxnet-local/10.213.0.0/24"):
                driver(kv, host).release_pool(PoolIDRequest(pid))
        assert kv.keys(ROOT) == [], f"leftovers after failing write {writes}"
        writes += 1
    assert writes > 10
    assert kv.keys(ROOT) == []


def test_pool_left_without_holders_is_finished_by_the_next_request_pool(kv):
    d = driver(kv)
    pid = d.request_pool(pool_req("10.1.0.0/24"))["PoolID"]
    d.request_address(addr_req(pid))
    kv.fail_after = 1  # the release's first write (dropping the last holder) lands, the cleanup does not
    with pytest.raises(StoreUnavailable):
        d.release_pool(PoolIDRequest(pid))
    assert value(kv, ROOT + "pools/vxnet-local/10.1.0.0_24")["hosts"] == []
    assert orphans(kv) == []
    kv.unavailable, kv.fail_after = False, None
    with pytest.raises(Conflict):
        d.request_address(addr_req(pid))
    assert driver(kv, "h2").request_pool(pool_req("10.1.0.0/16"))["Pool"] == "10.1.0.0/16"
    assert kv.keys(ROOT + "pools/") == [ROOT + "pools/vxnet-local/10.1.0.0_16"] and address_keys(kv) == []


def test_address_calls_cost_one_read_and_one_transaction(kv):
    """A container start in a Swarm makes two RequestAddress and two ReleaseAddress calls (the allocator's in the
    global space, the node's in the local one): each is one read of everything it compares, then one
    transaction; an allocator's replay is the read alone."""
    d = driver(kv, scope="global")
    for space in ("vxnet-global", "vxnet-local"):
        pool_id = d.request_pool(pool_req("10.9.0.0/24", space=space))["PoolID"]
        replay = 1 if space == "vxnet-global" else 2
        for request, trips in ((addr_req(pool_id), 2), (addr_req(pool_id, "10.9.0.20"), 2),
                               (addr_req(pool_id, "10.9.0.20"), replay), (addr_req(pool_id, options=GW), 2)):
            before = kv.round_trips
            d.request_address(request)
            assert kv.round_trips - before == trips, (space, request)
        before = kv.round_trips
        d.release_address(addr_req(pool_id, "10.9.0.20"))
        assert kv.round_trips - before == 2
        d.release_address(addr_req(pool_id, "10.9.0.20"))  # a replayed release: nothing left to do
        assert "10.9.0.20" not in [key.rsplit("/", 1)[1] for key in address_keys(kv) if space in key]
