"""The health overlay's pure parts: one address per host allocated in etcd under its lease (create-if-absent,
idempotent, safe against a concurrent allocator, never one outside its subnet), the host record carrying it, the
MAC derived from it, the entries programmed from other hosts' records (nothing unchecked reaches the kernel), and
the reserved VNI no network can be given; this host's end of the overlay over a fake kernel (tests/fakes/links.py):
the device it builds, the entries it keeps as host records come and go. (The real kernel and the probes over it:
tests/e2e/test_doctor.py.)"""

import ipaddress
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kernel import names
from netdriver import options
from netdriver.health import HealthOverlay, HealthStore, wanted_entries
from netdriver.hosts import HostLease
from netdriver.store import NetworkStore
from netdriver.underlay import Underlay
from store import schema
from store.kvstore import Entry, WatchEvent
from tests.fakes import FakeKV, FakeLinks
from tests.harness.proc import wait_until
from wire.errors import Exhausted, InvalidOption, InvalidRequest

KEYS = schema.Schema()


def holders(kv):
    return {KEYS.parse(schema.HEALTH, k)["address"]: kv.get(k).value for k in kv.keys(KEYS.prefix(schema.HEALTH))}


def test_each_host_gets_its_own_address_and_keeps_it_on_replay():
    kv = FakeKV()
    store = HealthStore(kv)
    a, b = store.claim("h1", 0), store.claim("h2", 0)
    assert (a, b) == ("169.254.0.1", "169.254.0.2")
    assert store.claim("h1", 0) == a and store.claim("h2", 0) == b  # a restart asks again: the same address
    assert holders(kv) == {a: "h1", b: "h2"}


def test_the_address_lives_under_the_hosts_lease_and_goes_with_it():
    kv = FakeKV()
    store = HealthStore(kv)
    first = kv.lease_grant(30)
    assert store.claim("h1", first) == "169.254.0.1"
    assert kv.get(KEYS.health("169.254.0.1")).lease == first
    second = kv.lease_grant(30)  # the host took a new lease while the old one still ran: the address moves
    revision = kv.get(KEYS.health("169.254.0.1")).mod_revision
    assert store.claim("h1", second) == "169.254.0.1"
    assert kv.get(KEYS.health("169.254.0.1")).lease == second
    assert store.claim("h1", second) == "169.254.0.1"  # and stays, nothing written
    assert kv.get(KEYS.health("169.254.0.1")).mod_revision == revision + 1
    kv.expire(second)  # the host is gone: so is its address
    assert holders(kv) == {}


def test_a_released_address_is_the_next_one_given_and_two_held_by_one_host_resolve_to_the_lowest():
    kv = FakeKV()
    store = HealthStore(kv)
    for host in ("h1", "h2", "h3"):
        store.claim(host, 0)
    kv.delete(KEYS.health("169.254.0.2"))  # h2 gone (its lease expired)
    assert store.claim("h4", 0) == "169.254.0.2"
    kv.put(KEYS.health("169.254.0.9"), "h1")  # a crash left h1 a second one
    assert store.claim("h1", 0) == "169.254.0.1"


def test_an_allocator_that_loses_the_race_takes_the_next_free_address():
    kv = FakeKV()
    store = HealthStore(kv)
    kv.cut_in = lambda: kv.put(KEYS.health("169.254.0.1"), "other")  # takes the candidate just before the commit
    assert store.claim("h1", 0) == "169.254.0.2"
    assert holders(kv) == {"169.254.0.1": "other", "169.254.0.2": "h1"}


def test_keys_under_health_that_are_not_health_addresses_are_ignored_not_reused():
    kv = FakeKV()
    kv.put(KEYS.health("10.0.0.1"), "h9")  # outside the subnet
    kv.put(KEYS.health("169.254.255.255"), "h8")  # the broadcast address: no host's
    assert HealthStore(kv).holders() == {}
    assert HealthStore(kv).claim("h1", 0) == "169.254.0.1"


def test_exhausted_when_every_address_is_held():
    kv = FakeKV()
    for index in range(1, names.HEALTH_HOSTS + 1):
        kv.data[KEYS.health(names.health_address(index))] = _entry(index)
    with pytest.raises(Exhausted, match="held by a live host"):
        HealthStore(kv).claim("newcomer", 0)


def _entry(index):
    return Entry(KEYS.health(names.health_address(index)), f"h{index}", 1, 1)


@given(st.integers(min_value=1, max_value=names.HEALTH_HOSTS))
def test_addresses_and_indexes_are_inverse_and_stay_in_the_subnet(index):
    address = names.health_address(index)
    assert names.health_index(address) == index
    assert ipaddress.IPv4Address(address) in names.HEALTH_SUBNET
    mac = names.health_mac(address)
    assert mac.startswith("02:76:") and mac[6:] == ":".join(f"{b:02x}" for b in ipaddress.IPv4Address(address).packed)


@pytest.mark.parametrize("bad", ["169.254.0.0", "169.254.255.255", "10.0.0.1", "not an address", None, ""])
def test_no_mac_for_what_is_not_a_health_address(bad):
    assert names.health_index(bad) == 0
    with pytest.raises(InvalidRequest):
        names.health_mac(bad)


def test_the_health_namespace_is_neither_a_network_nor_an_unknown_leftover():
    assert names.HEALTH_NETNS.startswith("vx")  # ours, as every host-side name (kernel/names.py)
    assert names.network_id_prefix(names.HEALTH_NETNS) == ""
    assert not names.is_unknown_netns(names.HEALTH_NETNS)


def test_other_hosts_records_become_fdb_and_neighbour_entries_and_nothing_unchecked_does():
    hosts = {
        "h1": {"vtep": "192.0.2.1", "health": "169.254.0.1"},  # this host
        "h2": {"vtep": "192.0.2.2", "health": "169.254.0.2"},
        "h3": {"vtep": "192.0.2.3"},  # an older plugin: no health address
        "h4": {"vtep": "not-an-ip", "health": "169.254.0.4"},
        "h5": {"vtep": "192.0.2.5", "health": "10.0.0.5"},
        "h6": {"vtep": "192.0.2.6", "health": "169.254.0.2"},  # claims h2's: the lower ID keeps it
        "h7": "not a record",
    }
    fdb, neigh = wanted_entries(hosts, "h1")
    mac = names.health_mac("169.254.0.2")
    assert fdb == {mac: "192.0.2.2"} and neigh == {"169.254.0.2": mac}


def test_the_host_record_carries_the_health_address(tmp_path):
    kv = FakeKV()
    store = NetworkStore(kv)
    asked = []
    lease = HostLease(kv, store, "h1", lambda: "192.0.2.1", str(tmp_path / "lease"), name="alpha",
                      health=lambda lease_id: asked.append(lease_id) or "169.254.0.7")
    lease.acquire()
    assert json.loads(kv.get(KEYS.host("h1")).value)["health"] == "169.254.0.7"
    assert asked == [lease.id]  # claimed under the lease the record is written under
    without = HostLease(kv, store, "h2", lambda: "192.0.2.2", str(tmp_path / "lease2"), name="beta")
    without.acquire()
    assert "health" not in json.loads(kv.get(KEYS.host("h2")).value)


def test_the_health_vni_is_refused_to_networks_and_never_allocated():
    with pytest.raises(InvalidOption, match=r"option vni: 16777215 is reserved for vxnet's health overlay"):
        options.parse({options.GENERIC: {"vni": str(names.HEALTH_VNI)}})
    assert options.parse({options.GENERIC: {"vni": str(names.HEALTH_VNI - 1)}}).vni == names.HEALTH_VNI - 1
    # The allocator climbs from VNI_AUTO_BASE and gives up above VNI_MAX (netdriver/store.py _free_vni).
    assert options.VNI_AUTO_BASE <= options.VNI_MAX < names.HEALTH_VNI


# -- the overlay's end on this host, over a fake kernel ----------------------------------------------------------
def overlay_on(kv, links, host="h1", vtep="192.0.2.1", underlay_mtu=1500):
    return HealthOverlay(kv, links, Underlay(lambda a: underlay_mtu, vtep), host)


def register(kv, host, vtep, health, lease=0):
    record = {"vtep": vtep, "name": host}
    if health:
        record["health"] = health
    kv.put(KEYS.host(host), json.dumps(record), lease=lease)


DEV = (names.HEALTH_NETNS, names.HEALTH_VXLAN)


def test_claim_builds_the_device_on_the_reserved_vni_with_the_vxlan_mtu_and_its_address():
    kv, links = FakeKV(), FakeLinks()
    overlay = overlay_on(kv, links, underlay_mtu=1400)
    assert overlay.claim(0) == "169.254.0.1"
    device = links.devices[DEV]
    assert (device["vni"], device["local"], device["port"], device["mtu"]) == (names.HEALTH_VNI, "192.0.2.1",
                                                                               names.VXLAN_PORT, 1350)
    assert device["mac"] == names.health_mac("169.254.0.1") and device["master"] is None
    assert device["addresses"] == {("169.254.0.1", 16)}
    assert overlay.claim(0) == "169.254.0.1" and holders(kv) == {"169.254.0.1": "h1"}  # a replay: the same


def test_a_kernel_refusal_leaves_the_networks_alone_and_no_vtep_yet_builds_later():
    kv, links = FakeKV(), FakeLinks()
    links.refuse.add("ensure_vxlan")
    assert overlay_on(kv, links).claim(0) == "169.254.0.1"  # logged, not raised: start-up goes on
    assert DEV not in links.devices
    late = overlay_on(kv, FakeLinks(), host="h2", vtep=None)
    assert late.claim(0) == "169.254.0.2" and not late.links.devices
    late.underlay.discovered("192.0.2.2")
    late.vtep_changed()
    assert late.links.devices[DEV]["local"] == "192.0.2.2"


def test_other_hosts_come_and_go_with_their_records_and_entries_changed_by_hand_are_repaired():
    kv, links = FakeKV(), FakeLinks()
    overlay = overlay_on(kv, links)
    overlay.claim(0)
    register(kv, "h1", "192.0.2.1", "169.254.0.1")
    register(kv, "h2", "192.0.2.2", "169.254.0.2")
    prefix, _ = overlay.load()
    assert prefix == KEYS.prefix(schema.HOST)
    mac2 = names.health_mac("169.254.0.2")
    assert links.fdbs[DEV] == {mac2: "192.0.2.2"} and links.neighs[DEV] == {"169.254.0.2": mac2}

    record3 = json.dumps({"vtep": "192.0.2.3", "health": "169.254.0.3"})
    overlay.apply(WatchEvent("put", KEYS.host("h3"), record3, None, 10))
    assert set(links.neighs[DEV]) == {"169.254.0.2", "169.254.0.3"}
    links.fdbs[DEV][mac2] = "192.0.2.99"  # someone changed it by hand
    del links.neighs[DEV]["169.254.0.3"]
    overlay.apply(WatchEvent("delete", KEYS.host("h2"), None, None, 11))  # h2's lease expired
    mac3 = names.health_mac("169.254.0.3")
    assert links.fdbs[DEV] == {mac3: "192.0.2.3"} and links.neighs[DEV] == {"169.254.0.3": mac3}


def test_the_watch_follows_host_records_and_stop_removes_the_namespace():
    kv, links = FakeKV(), FakeLinks()
    overlay = overlay_on(kv, links)
    overlay.claim(0)
    overlay.start()
    try:
        lease = kv.lease_grant(30)
        register(kv, "h2", "192.0.2.2", "169.254.0.2", lease=lease)
        wait_until(lambda: "169.254.0.2" in links.neighbours(*DEV), 5, "h2's entries")
        kv.expire(lease)
        wait_until(lambda: not links.neighbours(*DEV), 5, "h2's entries to go with its lease")
    finally:
        overlay.stop()
    assert names.HEALTH_NETNS not in links.netns and DEV not in links.devices


def test_a_new_vtep_makes_the_device_again_with_every_entry_back():
    kv, links = FakeKV(), FakeLinks()
    overlay = overlay_on(kv, links, vtep=None)
    overlay.underlay.discovered("192.0.2.1")
    overlay.claim(0)
    register(kv, "h2", "192.0.2.2", "169.254.0.2")
    overlay.load()
    assert overlay.underlay.discovered("192.0.2.9")
    overlay.vtep_changed()
    assert links.devices[DEV]["local"] == "192.0.2.9"
    assert links.fdbs[DEV] == {names.health_mac("169.254.0.2"): "192.0.2.2"}
