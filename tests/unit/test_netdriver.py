"""The network driver over a FakeKV and a FakeDataPlane: end state in etcd and in the (fake) kernel."""

import pytest

from netdriver.driver import NetworkDriver, mac_for
from netdriver.options import VNI_AUTO_BASE
from netdriver.store import NetworkStore
from netdriver.underlay import Underlay
from store import schema
from tests.fakes import FakeDataPlane, FakeKV
from wire import protocol as p
from wire.errors import (
    Conflict,
    Exhausted,
    InvalidOption,
    InvalidRequest,
    KernelError,
    StoreUnavailable,
)

NID = "a" * 64
NID2 = "b" * 64
EID = "e" * 64
SANDBOX = "/var/run/docker/netns/0123456789ab"  # what dockerd sends: its sandbox's namespace path


def make(kv=None, host="h1", plane=None, **options):
    kv = kv or FakeKV()
    plane = plane or FakeDataPlane()
    return NetworkDriver(NetworkStore(kv), plane, host, "local", Underlay(lambda a: 1500, "192.0.2.1"),
                         **options), kv, plane


def create_req(nid=NID, generic=None, pool="10.1.0.0/24", gateway="10.1.0.1/24", **extra):
    opts = {"com.docker.network.generic": generic or {}}
    opts.update(extra)
    return p.CreateNetworkRequest.decode({
        "NetworkID": nid, "Options": opts,
        "IPv4Data": [{"AddressSpace": "vxnet-local", "Pool": pool, "Gateway": gateway}], "IPv6Data": None})


def endpoint_req(nid=NID, eid=EID, address="10.1.0.5/24", mac=""):
    return p.CreateEndpointRequest.decode({"NetworkID": nid, "EndpointID": eid,
                                           "Interface": {"Address": address, "MacAddress": mac}})


def test_create_network_records_state_and_builds_namespace():
    drv, kv, plane = make()
    assert drv.create_network(create_req()) == {}
    net = drv.store.get_network(NID)
    assert net.vni == VNI_AUTO_BASE and net.mtu == 1450 and not net.internal
    assert plane.networks[NID] == {"vni": VNI_AUTO_BASE, "mtu": 1450}
    assert kv.get(f"{schema.PREFIX}/vnis/{VNI_AUTO_BASE}").value == NID


def test_second_network_gets_next_vni_and_options_are_honoured():
    drv, kv, plane = make()
    drv.create_network(create_req())
    drv.create_network(create_req(NID2, {"com.docker.network.driver.mtu": "1400"}, pool="10.2.0.0/24",
                                  gateway="", **{"com.docker.network.internal": True}))
    net2 = drv.store.get_network(NID2)
    assert (net2.vni, net2.mtu, net2.internal) == (VNI_AUTO_BASE + 1, 1400, True)


def test_create_network_replay_is_a_no_op():
    drv, kv, plane = make()
    drv.create_network(create_req())
    before = dict(kv.data)
    plane.networks.clear()  # the namespace vanished meanwhile: the replay rebuilds it
    drv.create_network(create_req())
    assert kv.data == before and NID in plane.networks


@pytest.mark.parametrize("generic,needle", [
    ({"bogus": "1"}, "bogus"),
    ({"vni": "0"}, "vni"),
    ({"vni": "abc"}, "'abc'"),
    ({"com.docker.network.driver.mtu": "99999"}, "com.docker.network.driver.mtu"),
    ({"overlay": "bad name"}, "overlay"),
])
def test_bad_options_are_refused_by_name_and_leave_nothing(generic, needle):
    drv, kv, plane = make()
    with pytest.raises(InvalidOption) as err:
        drv.create_network(create_req(generic=generic))
    assert needle in str(err.value)
    assert kv.keys() == [] and plane.networks == {}


def dual_req(nid=NID, pool6="fd00:1::/64", gateway6="fd00:1::1/64", ipv4=True, enable=True):
    body = {"NetworkID": nid, "Options": {"com.docker.network.generic": {},
                                          "com.docker.network.enable_ipv6": enable},
            "IPv4Data": [{"AddressSpace": "vxnet-local", "Pool": "10.1.0.0/24", "Gateway": "10.1.0.1/24"}] if ipv4
            else [],
            "IPv6Data": [{"AddressSpace": "vxnet-local", "Pool": pool6, "Gateway": gateway6}] if pool6 else []}
    return p.CreateNetworkRequest.decode(body)


def test_a_dual_stack_network_records_both_families_and_guards_both():
    drv, kv, plane = make()
    drv.create_network(dual_req())
    net = drv.store.get_network(NID)
    assert net.ipv6 and [(s.pool, s.gateway) for s in net.subnets6] == [("fd00:1::/64", "fd00:1::1")]
    assert plane.host_subnets == ["10.1.0.0/24", "fd00:1::/64"]
    assert drv.create_endpoint(p.CreateEndpointRequest.decode({
        "NetworkID": NID, "EndpointID": EID,
        "Interface": {"Address": "10.1.0.5/24", "AddressIPv6": "fd00:1::5/64"}})) == {
        "Interface": {"MacAddress": "02:42:0a:01:00:05"}}  # the MAC still comes from the IPv4 address
    assert drv.store.get_endpoint(NID, EID).ip6 == "fd00:1::5/64"
    drv.join(p.JoinRequest.decode({"NetworkID": NID, "EndpointID": EID, "SandboxKey": SANDBOX}))
    assert plane.guarded[NID] == [(EID, "10.1.0.5/24", "02:42:0a:01:00:05", "fd00:1::5/64")]
    (peer,) = drv.store.list_peers(NID)
    assert (peer.ip, peer.ip6) == ("10.1.0.5", "fd00:1::5")
    value = drv.endpoint_oper_info(p.EndpointRequest.decode({"NetworkID": NID, "EndpointID": EID}))["Value"]
    assert value["vxnet.ip6"] == "fd00:1::5/64"
    drv.leave(p.EndpointRequest.decode({"NetworkID": NID, "EndpointID": EID}))
    drv.delete_endpoint(p.EndpointRequest.decode({"NetworkID": NID, "EndpointID": EID}))
    drv.delete_network(p.NetworkIDRequest.decode({"NetworkID": NID}))
    assert kv.keys() == [] and plane.networks == {} and plane.host_subnets == []


@pytest.mark.parametrize("req,needle", [
    (dict(ipv4=False), "IPv4Data: vxnet needs an IPv4 subnet, also on a --ipv6 network"),
    (dict(pool6=""), "IPv6Data: a --ipv6 network needs an IPv6 pool"),
    (dict(pool6="10.9.0.0/24"), "IPv6Data[0].Pool: '10.9.0.0/24' is not an IPv6 subnet"),
    (dict(pool6="fd00:1::1/64"), "IPv6Data[0].Pool: 'fd00:1::1/64' is not an IPv6 subnet"),
    (dict(pool6="fe80::/64", gateway6=""), "IPv6Data[0].Pool: fe80::/64 is a link-local or multicast range"),
    (dict(gateway6="fd00:2::1/64"), "IPv6Data[0].Gateway: fd00:2::1 is outside the pool fd00:1::/64"),
    (dict(gateway6="10.1.0.1/24"), "IPv6Data[0].Gateway: '10.1.0.1/24' is not an IPv6 address"),
])
def test_bad_ipv6_data_is_refused_by_field_and_leaves_nothing(req, needle):
    drv, kv, plane = make()
    with pytest.raises(InvalidRequest) as err:
        drv.create_network(dual_req(**req))
    assert needle in str(err.value)
    assert kv.keys() == [] and plane.networks == {}


def test_ipv6_on_a_swarm_network_is_refused_on_every_node_and_leaves_nothing():
    """dockerd's Swarm allocator gives a swarm-scoped network no IPv6 (docs/ipv6.md): each node's CreateNetwork
    carries a v6 pool its own dockerd picked, which would differ from node to node. Refused with the reason, on
    the first node and on one that finds the network already recorded; the same network without IPv6 is fine."""
    swarm_nid = "0123456789abcdefghijklmno"  # swarmkit's 25 lowercase letters and digits
    kv = FakeKV()
    for host in ("h1", "h2"):
        drv, _, plane = make(kv, host)
        with pytest.raises(InvalidOption, match=r"IPv6Data: --ipv6 on a Swarm-scoped network: dockerd's Swarm "
                                                r"allocator gives it no IPv6 subnet"):
            drv.create_network(dual_req(swarm_nid))
        assert kv.keys() == [] and plane.networks == {}
    drv.create_network(dual_req(swarm_nid, pool6="", enable=False))
    assert not drv.store.get_network(swarm_nid).ipv6


def test_endpoint_ipv6_address_must_fit_the_network():
    drv, kv, plane = make()
    drv.create_network(create_req())  # IPv4 only
    drv.create_network(dual_req(NID2))

    def endpoint(nid, address6):
        return p.CreateEndpointRequest.decode({"NetworkID": nid, "EndpointID": EID, "Interface": {
            "Address": "10.1.0.5/24", "AddressIPv6": address6}})

    with pytest.raises(InvalidRequest, match=r"Interface.AddressIPv6: 'fd00:1::5/64' given, but network "
                                             r"aaaaaaaaaaaa was created without --ipv6"):
        drv.create_endpoint(endpoint(NID, "fd00:1::5/64"))
    with pytest.raises(InvalidRequest, match="Interface.AddressIPv6: fd00:9::5 is outside the network's IPv6"):
        drv.create_endpoint(endpoint(NID2, "fd00:9::5/64"))
    with pytest.raises(InvalidRequest, match="Interface.AddressIPv6: '10.1.0.6/24' is not an IPv6 CIDR"):
        drv.create_endpoint(endpoint(NID2, "10.1.0.6/24"))
    assert drv.store.list_endpoints(NID) == [] and drv.store.list_endpoints(NID2) == []
    drv.create_endpoint(endpoint(NID2, ""))  # --ipv6 network, no v6 address given: IPv4 (and link-local) only
    assert drv.store.get_endpoint(NID2, EID).ip6 == ""


def test_allocate_network_keeps_the_ipv6_flag_and_checks_ipv6_data():
    drv, kv, _ = make()
    req = p.CreateNetworkRequest.decode({
        "NetworkID": NID, "Options": {"com.docker.network.enable_ipv6": "true", "mtu": "1400"},
        "IPv4Data": [{"Pool": "10.1.0.0/24"}], "IPv6Data": [{"Pool": "fd00:1::/64", "Gateway": "fd00:1::1/64"}]})
    reply = drv.allocate_network(req)
    assert reply["Options"]["com.docker.network.enable_ipv6"] == "true" and reply["Options"]["mtu"] == "1400"
    bad = p.CreateNetworkRequest.decode({"NetworkID": NID2, "Options": {},
                                         "IPv4Data": [{"Pool": "10.2.0.0/24"}], "IPv6Data": [{"Pool": "fd00:x::/64"}]})
    before = kv.keys()
    with pytest.raises(InvalidRequest, match=r"IPv6Data\[0\].Pool"):
        drv.allocate_network(bad)
    assert kv.keys() == before  # refused before any VNI is held


def test_records_written_before_ipv6_still_load():
    from netdriver.models import Endpoint, Network, PeerRecord
    net = Network.from_json('{"id": "n", "vni": 7, "mtu": 1450, "internal": false, '
                            '"subnets": [{"pool": "10.0.0.0/24", "gateway": null}]}')
    assert net.subnets6 == [] and not net.ipv6
    ep = Endpoint.from_json('{"network_id": "n", "id": "e", "ip": "10.0.0.2/24", "mac": "m", "host": "h"}')
    peer = PeerRecord.from_json('{"network_id": "n", "endpoint_id": "e", "ip": "10.0.0.2", "mac": "m", '
                                '"vtep": "192.0.2.1", "host": "h"}')
    assert ep.ip6 == "" and peer.ip6 == ""
    assert Network.from_json(net.to_json()) == net and PeerRecord.from_json(peer.to_json()) == peer
    with pytest.raises(KeyError):
        Endpoint.from_json('{"network_id": "n", "id": "e", "ip": "10.0.0.2/24", "mac": "m"}')


def test_explicit_vni_and_conflict():
    drv, kv, plane = make()
    drv.create_network(create_req(generic={"vni": "5000"}))
    assert drv.store.get_network(NID).vni == 5000
    with pytest.raises(Conflict, match="5000"):
        drv.create_network(create_req(NID2, generic={"vni": "5000"}, pool="10.2.0.0/24"))
    assert drv.store.get_network(NID2) is None and NID2 not in plane.networks


def test_kernel_failure_rolls_back_etcd():
    drv, kv, plane = make()
    plane.fail_on.add("ensure_network")
    with pytest.raises(KernelError):
        drv.create_network(create_req())
    assert kv.keys() == [] and plane.networks == {}


def test_etcd_failure_half_way_leaves_no_key_and_no_namespace():
    drv, kv, plane = make()
    kv.fail_after = 1  # the VNI allocation succeeds, writing the network record fails
    with pytest.raises(StoreUnavailable):
        drv.create_network(create_req())
    kv.unavailable = False
    kv.fail_after = None
    # The rollback could not reach etcd either: what is left is only the VNI reservation, which the next
    # create of the same network reuses (allocation is idempotent per segment) and delete releases.
    drv.create_network(create_req())
    drv.delete_network(p.NetworkIDRequest.decode({"NetworkID": NID}))
    assert kv.keys() == [] and plane.networks == {}


def test_endpoint_lifecycle_and_join_reply():
    drv, kv, plane = make()
    drv.create_network(create_req())
    reply = drv.create_endpoint(endpoint_req())
    assert reply == {"Interface": {"MacAddress": mac_for("10.1.0.5")}}
    join = drv.join(p.JoinRequest.decode({"NetworkID": NID, "EndpointID": EID, "SandboxKey": "/x"}))
    assert join == {"InterfaceName": {"SrcName": "vxc" + EID[:11], "DstPrefix": "eth"},
                    "DisableGatewayService": False}
    peer = drv.store.list_peers(NID)[0]
    assert (peer.ip, peer.mac, peer.vtep, peer.host) == ("10.1.0.5", "02:42:0a:01:00:05", "192.0.2.1", "h1")
    assert plane.guarded[NID] == [(EID, "10.1.0.5/24", "02:42:0a:01:00:05", "")]
    assert plane.host_subnets == ["10.1.0.0/24"]
    info = drv.endpoint_oper_info(p.EndpointRequest.decode({"NetworkID": NID, "EndpointID": EID}))
    assert info["Value"]["vxnet.vni"] == str(VNI_AUTO_BASE)
    drv.leave(p.EndpointRequest.decode({"NetworkID": NID, "EndpointID": EID}))
    assert drv.store.list_peers(NID) == []
    drv.delete_endpoint(p.EndpointRequest.decode({"NetworkID": NID, "EndpointID": EID}))
    assert plane.endpoints[NID] == {} and plane.guarded[NID] == []
    drv.delete_network(p.NetworkIDRequest.decode({"NetworkID": NID}))
    assert kv.keys() == [] and plane.networks == {} and plane.host_subnets == []


def test_given_mac_is_kept_and_not_echoed():
    drv, _, _ = make()
    drv.create_network(create_req())
    assert drv.create_endpoint(endpoint_req(mac="02:00:00:00:00:09")) == {}
    assert drv.store.get_endpoint(NID, EID).mac == "02:00:00:00:00:09"


def test_endpoint_errors_name_the_field():
    drv, _, _ = make()
    with pytest.raises(Conflict, match="not known to vxnet"):
        drv.create_endpoint(endpoint_req())
    drv.create_network(create_req())
    with pytest.raises(InvalidRequest, match="Interface.Address"):
        drv.create_endpoint(endpoint_req(address=""))
    with pytest.raises(InvalidRequest, match="outside"):
        drv.create_endpoint(endpoint_req(address="10.9.0.5/24"))


def test_join_failure_rolls_back_and_internal_disables_gateway_service():
    drv, kv, plane = make()
    drv.create_network(create_req(**{"com.docker.network.internal": True}))
    drv.create_endpoint(endpoint_req())
    plane.fail_on.add("ensure_endpoint")
    with pytest.raises(KernelError):
        drv.join(p.JoinRequest.decode({"NetworkID": NID, "EndpointID": EID, "SandboxKey": SANDBOX}))
    assert drv.store.list_peers(NID) == [] and plane.endpoints[NID] == {}
    plane.fail_on.clear()
    reply = drv.join(p.JoinRequest.decode({"NetworkID": NID, "EndpointID": EID, "SandboxKey": SANDBOX}))
    assert reply["DisableGatewayService"] is True


def test_unknown_ids_succeed_for_replayed_deletes():
    drv, kv, _ = make()
    req = p.EndpointRequest.decode({"NetworkID": NID, "EndpointID": EID})
    assert drv.leave(req) == {} and drv.delete_endpoint(req) == {}
    assert drv.delete_network(p.NetworkIDRequest.decode({"NetworkID": NID})) == {}
    assert kv.keys() == []


def _eid(i):
    return f"{i:02x}" * 32


def _wired_records(drv, plane, nid=NID):
    """(id, ip, mac, ip6) of the endpoint records whose veth is in the namespace: what the guard must hold."""
    return sorted((e.id, e.ip, e.mac, e.ip6) for e in drv.store.list_endpoints(nid)
                  if e.id in plane.endpoints.get(nid, {}))


def test_guard_follows_joins_and_deletes_one_endpoint_at_a_time_and_a_restart_rebuilds_the_same():
    drv, kv, plane = make()
    drv.create_network(create_req())
    assert plane.guarded[NID] == []  # the table exists from network creation on
    steps = [("join", 1), ("join", 2), ("join", 3), ("delete", 2), ("join", 4), ("create", 5), ("delete", 5),
             ("delete", 1), ("delete", 1), ("join", 6), ("delete", 3)]
    for verb, i in steps:
        req = {"NetworkID": NID, "EndpointID": _eid(i)}
        if verb in ("create", "join") and drv.store.get_endpoint(NID, _eid(i)) is None:
            drv.create_endpoint(endpoint_req(eid=_eid(i), address=f"10.1.0.{10 + i}/24"))
        if verb == "join":
            drv.join(p.JoinRequest.decode({**req, "SandboxKey": SANDBOX}))
        elif verb == "delete":
            drv.leave(p.EndpointRequest.decode(req))
            drv.delete_endpoint(p.EndpointRequest.decode(req))
        assert plane.guarded[NID] == _wired_records(drv, plane), (verb, i)
    assert [g[0] for g in plane.guarded[NID]] == [_eid(4), _eid(6)]
    # A restart: the process remembers nothing, start-up rebuilds the table whole from etcd and the kernel.
    incremental = plane.guarded[NID]
    plane.guarded.clear()
    restarted, _, _ = make(kv, plane=plane)
    restarted.reconcile()
    assert plane.guarded[NID] == incremental


def test_calls_on_a_ready_network_only_touch_their_endpoint_in_few_etcd_round_trips():
    drv, kv, plane = make()
    drv.create_network(create_req())
    drv.create_endpoint(endpoint_req())
    plane.fail_on.add("ensure_network")  # the namespace is whole already: a Join must not need it
    before = kv.round_trips
    drv.create_endpoint(endpoint_req(eid=_eid(7), address="10.1.0.7/24"))
    assert kv.round_trips - before == 1  # the network record is the one kept for the namespace
    before = kv.round_trips
    drv.join(p.JoinRequest.decode({"NetworkID": NID, "EndpointID": EID, "SandboxKey": SANDBOX}))
    assert kv.round_trips - before == 2  # both records in one read; the peer record
    assert plane.guarded[NID] == _wired_records(drv, plane) != []
    before = kv.round_trips
    drv.delete_endpoint(p.EndpointRequest.decode({"NetworkID": NID, "EndpointID": EID}))
    assert kv.round_trips - before == 2  # both records in one read; endpoint and peer deleted in one transaction
    assert plane.guarded[NID] == [] and kv.keys(schema.PREFIX + "/peers/") == []
    assert kv.keys(schema.PREFIX + "/endpoints/") == [f"{schema.PREFIX}/endpoints/{NID}/{_eid(7)}"]


def test_a_namespace_or_table_gone_behind_our_back_is_rebuilt_by_the_next_join():
    drv, kv, plane = make()
    drv.create_network(create_req())
    for i in (1, 2):
        drv.create_endpoint(endpoint_req(eid=_eid(i), address=f"10.1.0.{10 + i}/24"))
    drv.join(p.JoinRequest.decode({"NetworkID": NID, "EndpointID": _eid(1), "SandboxKey": SANDBOX}))
    del plane.guarded[NID]  # someone deleted the anti-spoofing table
    drv.join(p.JoinRequest.decode({"NetworkID": NID, "EndpointID": _eid(2), "SandboxKey": SANDBOX}))
    assert plane.guarded[NID] == _wired_records(drv, plane) and len(plane.guarded[NID]) == 2
    plane.remove_network(NID)  # someone deleted the namespace
    drv.join(p.JoinRequest.decode({"NetworkID": NID, "EndpointID": _eid(1), "SandboxKey": SANDBOX}))
    assert NID in plane.networks and plane.guarded[NID] == _wired_records(drv, plane) != []
    del plane.guarded[NID]  # and the table again, before a delete: rebuilt whole instead of edited
    drv.delete_endpoint(p.EndpointRequest.decode({"NetworkID": NID, "EndpointID": _eid(1)}))
    assert plane.guarded[NID] == [] and drv.store.get_endpoint(NID, _eid(1)) is None


def test_a_join_failing_after_its_guard_takes_the_port_out_again():
    drv, kv, plane = make()
    drv.create_network(create_req())
    drv.create_endpoint(endpoint_req())
    kv.fail_after = 0  # the peer record cannot be written
    with pytest.raises(StoreUnavailable):
        drv.join(p.JoinRequest.decode({"NetworkID": NID, "EndpointID": EID, "SandboxKey": SANDBOX}))
    assert plane.endpoints[NID] == {} and plane.guarded[NID] == []


def test_reconcile_rebuilds_member_networks_and_drops_stale_namespaces():
    kv = FakeKV()
    drv, _, plane = make(kv)
    drv.create_network(create_req())
    plane.networks.clear()
    plane.networks["c" * 64] = {"vni": 1, "mtu": 1450}  # left over from an earlier run
    drv.reconcile()
    assert set(plane.networks) == {NID}


def test_reconcile_skips_and_reports_what_it_cannot_clean_and_reconciles_the_rest():
    """A stale namespace the kernel will not remove, a name in the folder that is not ours, a stuck host link:
    each is reported by name, and everything else is still reconciled (a member network rebuilt, a peer
    republished). Once the kernel lets go, the next start-up cleans them and reports nothing."""
    kv = FakeKV()
    drv, _, plane = make(kv)
    drv.create_network(create_req())
    drv.create_network(create_req(NID2, pool="10.2.0.0/24", gateway="10.2.0.1/24"))
    drv.create_endpoint(endpoint_req())
    drv.join(p.JoinRequest.decode({"NetworkID": NID, "EndpointID": EID, "SandboxKey": "/var/run/docker/netns/x"}))
    peer_key = next(k for k in kv.keys() if "/peers/" in k)
    kv.delete(peer_key)  # as if its lease had expired while the plugin was away
    del plane.networks[NID2]  # its namespace went missing
    stale = "c" * 64
    plane.networks[stale] = {"vni": 1, "mtu": 1450}
    plane.stuck |= {stale, "vxc" + "d" * 11}
    plane.host_links.add("vxc" + "d" * 11)
    plane.unknown.add("vxnet-0.0.0.0")

    restarted, _, _ = make(kv, plane=plane)
    problems = restarted.reconcile()
    assert len(problems) == 3, problems
    assert any("vxnet-cccccccccccc" in m and "injected failure" in m for m in problems)
    assert any("vxnet-0.0.0.0" in m and "not a name vxnet makes" in m for m in problems)
    assert any("vxc" + "d" * 11 in m for m in problems)
    assert NID2 in plane.networks and peer_key in kv.keys()  # the rest was reconciled
    assert stale in plane.networks

    plane.stuck.clear()
    unknown = [m for m in problems if "vxnet-0.0.0.0" in m]
    assert make(kv, plane=plane)[0].reconcile() == unknown  # only the name that is not ours stays
    assert stale not in plane.networks and plane.host_links == set()


def test_reconcile_never_takes_a_network_created_meanwhile_for_a_leftover():
    """Requests are served while start-up reconciles: a CreateNetwork (record first, then namespace) and a Join
    (endpoint record first, then veth) landing right after reconcile read the records keep what they made.
    Control: the same reconcile removes a namespace and a host link that no record claims."""
    drv, kv, plane = make()
    plane.networks["c" * 64] = {"vni": 1, "mtu": 1450}  # a leftover: no record claims it
    plane.host_links.add("vxc" + "d" * 11)
    read = drv.store.list_networks
    raced = []

    def racing():
        seen = read()  # the records as reconcile reads them, and then the requests land
        if not raced:
            raced.append(True)
            drv.create_network(create_req())
            drv.create_endpoint(endpoint_req())
            drv.join(p.JoinRequest.decode({"NetworkID": NID, "EndpointID": EID,
                                           "SandboxKey": "/var/run/docker/netns/x"}))
            plane.host_links.add("vxc" + EID[:11])  # the container end the Join left in the host namespace
        return seen

    drv.store.list_networks = racing
    assert drv.reconcile() == []
    assert raced and NID in plane.networks and EID in plane.endpoints[NID]
    assert "vxc" + EID[:11] in plane.host_links
    assert "c" * 64 not in plane.networks and "vxc" + "d" * 11 not in plane.host_links  # the control


def test_overlay_option_shares_one_vni_across_hosts():
    kv = FakeKV()
    h1, _, _ = make(kv, "h1")
    h2, _, _ = make(kv, "h2")
    h1.create_network(create_req(NID, {"overlay": "blue"}))
    h2.create_network(create_req(NID2, {"overlay": "blue"}))
    assert h1.store.get_network(NID).vni == h2.store.get_network(NID2).vni
    h1.delete_network(p.NetworkIDRequest.decode({"NetworkID": NID}))
    assert h2.store.segment_vni("overlay-blue") is not None  # h2 still uses it
    h2.delete_network(p.NetworkIDRequest.decode({"NetworkID": NID2}))
    assert kv.keys() == []


def test_allocate_network_echoes_options_and_is_idempotent():
    drv, kv, _ = make()
    req = p.CreateNetworkRequest.decode({"NetworkID": NID, "Options": {"mtu": "1400"}, "IPv4Data": []})
    first = drv.allocate_network(req)
    assert first == {"Options": {"mtu": "1400", "vni": str(VNI_AUTO_BASE)}}
    assert drv.allocate_network(req) == first
    with pytest.raises(InvalidOption, match="bogus"):
        drv.allocate_network(p.CreateNetworkRequest.decode({"NetworkID": NID2, "Options": {"bogus": "1"}}))
    drv.free_network(p.NetworkIDRequest.decode({"NetworkID": NID}))
    assert kv.keys() == []


def test_etcd_unreachable_is_reported():
    drv, kv, _ = make()
    kv.unavailable = True
    with pytest.raises(StoreUnavailable, match="etcd unreachable"):
        drv.create_network(create_req())


def test_swarm_discover_new_sets_the_vtep_unless_one_was_configured():
    from netdriver.underlay import Underlay
    kv = FakeKV()
    mtus = {"192.0.2.7": 9000}
    underlay = Underlay(mtus.get, None, None)
    moved = []
    drv = NetworkDriver(NetworkStore(kv), FakeDataPlane(), "h1", "global", underlay,
                        on_vtep_change=lambda: moved.append(underlay.address))
    with pytest.raises(InvalidRequest, match="VXNET_ADVERTISE_ADDR"):
        drv.create_network(create_req())
    assert kv.keys() == []
    drv.discover_new(p.DiscoveryRequest.decode(
        {"DiscoveryType": 1, "DiscoveryData": {"Address": "192.0.2.7", "BindAddress": "", "Self": True}}))
    assert moved == ["192.0.2.7"]
    drv.create_network(create_req())
    assert drv.store.get_network(NID).mtu == 8950  # the discovered interface's MTU - 50
    drv.discover_new(p.DiscoveryRequest.decode(  # an address no interface has is not taken
        {"DiscoveryType": 1, "DiscoveryData": {"Address": "198.51.100.1", "Self": True}}))
    fixed = Underlay(mtus.get, "192.0.2.1", None)
    assert not fixed.discovered("192.0.2.7") and fixed.address == "192.0.2.1"


def test_swarm_network_lifecycle_across_manager_and_workers():
    """One Swarm network has one ID on every node: the record lives while any node (or the manager's hold from
    AllocateNetwork to FreeNetwork) has it, and nothing is left once all are gone."""
    kv = FakeKV()
    mgr, _, _ = make(kv, "m")
    w2, _, _ = make(kv, "h2")
    w3, _, _ = make(kv, "h3")
    alloc = mgr.allocate_network(p.CreateNetworkRequest.decode({"NetworkID": NID, "Options": {}, "IPv4Data": []}))
    vni = alloc["Options"]["vni"]
    worker_req = create_req(generic=alloc["Options"])
    w2.create_network(worker_req)
    w3.create_network(worker_req)
    assert w3.store.get_network(NID).vni == int(vni)
    assert w3.dataplane.host_subnets == ["10.1.0.0/24"]  # a worker joining guards the subnet too
    w2.create_endpoint(endpoint_req(eid="2" * 64, address="10.1.0.2/24"))
    w3.create_endpoint(endpoint_req(eid="3" * 64, address="10.1.0.3/24"))
    w2.delete_network(p.NetworkIDRequest.decode({"NetworkID": NID}))
    assert w3.store.get_network(NID) is not None  # h3 still has it, and its endpoint record
    assert w3.store.get_endpoint(NID, "3" * 64) is not None
    w3.delete_network(p.NetworkIDRequest.decode({"NetworkID": NID}))
    assert kv.get(f"{schema.PREFIX}/vnis/{vni}") is not None  # the manager's hold keeps the VNI until FreeNetwork
    for _ in range(2):  # FreeNetwork replayed after a leader change
        mgr.free_network(p.NetworkIDRequest.decode({"NetworkID": NID}))
    assert kv.keys() == []


def test_records_with_malformed_ids_left_by_older_versions_do_not_stop_start_up():
    """Before the wire checked IDs, "0.0.0.0/0" and "../../etc/passwd" became records; start-up skips them and
    rebuilds every well-formed network (the positive control, in the same reconcile)."""
    import json as _json

    from netdriver.models import Endpoint, Network, Subnet
    drv, kv, plane = make()
    drv.create_network(create_req())
    drv.create_endpoint(endpoint_req())
    bad = Network(id="0.0.0.0/0", vni=77, mtu=1450, internal=False, subnets=[Subnet("10.9.0.0/24", None)])
    kv.put(schema.PREFIX + "/networks/0.0.0.0/0", bad.to_json())
    kv.put(schema.PREFIX + "/members/0.0.0.0/0/h1", _json.dumps({"network_id": "0.0.0.0/0"}))
    kv.put(f"{schema.PREFIX}/endpoints/{NID}/../../etc/passwd", Endpoint(NID, "../../etc/passwd", "10.1.0.9/24",
                                                                   "02:42:0a:01:00:09", "h1").to_json())
    plane.networks.clear()
    restarted, _, _ = make(kv, plane=plane)
    restarted.reconcile()
    assert set(plane.networks) == {NID} and plane.guarded[NID] == []
    assert [e.id for e in restarted.store.list_endpoints(NID)] == [EID]


def _join(drv, eid):
    return drv.join(p.JoinRequest.decode({"NetworkID": NID, "EndpointID": eid, "SandboxKey": SANDBOX}))


def test_past_the_endpoint_limit_create_endpoint_is_refused_in_vxnets_words_and_writes_nothing():
    drv, kv, plane = make(max_endpoints=2)
    drv.create_network(create_req())
    for i in (1, 2):
        drv.create_endpoint(endpoint_req(eid=_eid(i), address=f"10.1.0.{10 + i}/24"))
    drv.create_endpoint(endpoint_req(eid=_eid(2), address="10.1.0.12/24"))  # a replay takes no second place
    before = dict(kv.data)
    with pytest.raises(Exhausted, match=rf"^network {NID[:12]} holds at most 2 endpoints on this host"):
        drv.create_endpoint(endpoint_req(eid=_eid(3), address="10.1.0.13/24"))
    assert kv.data == before
    drv.delete_endpoint(p.EndpointRequest.decode({"NetworkID": NID, "EndpointID": _eid(1)}))
    drv.create_endpoint(endpoint_req(eid=_eid(3), address="10.1.0.13/24"))  # the freed place is taken again
    assert drv.store.get_endpoint(NID, _eid(3)) is not None


def test_the_limit_counts_records_an_earlier_process_wrote():
    kv = FakeKV()
    drv, _, _ = make(kv, max_endpoints=5)
    drv.create_network(create_req())
    for i in (1, 2):
        drv.create_endpoint(endpoint_req(eid=_eid(i), address=f"10.1.0.{10 + i}/24"))
    again, _, _ = make(kv, max_endpoints=2)  # a restart with a smaller limit
    with pytest.raises(Exhausted):
        again.create_endpoint(endpoint_req(eid=_eid(3), address="10.1.0.13/24"))


def test_past_the_limit_a_join_is_refused_before_the_kernel_is_touched():
    kv = FakeKV()
    drv, _, plane = make(kv)
    drv.create_network(create_req())
    for i in (1, 2, 3):
        drv.create_endpoint(endpoint_req(eid=_eid(i), address=f"10.1.0.{10 + i}/24"))
    small, _, _ = make(kv, plane=plane, max_endpoints=2)  # records made under a larger limit
    small.reconcile()
    for i in (1, 2):
        _join(small, _eid(i))
    _join(small, _eid(2))  # a replay is no new place
    with pytest.raises(Exhausted, match="holds at most 2 endpoints"):
        _join(small, _eid(3))
    assert set(plane.endpoints[NID]) == {_eid(1), _eid(2)}


def test_a_join_the_kernel_fails_rebuilds_nothing_and_leaves_nothing_of_its_own():
    drv, kv, plane = make()
    drv.create_network(create_req())
    for i in (1, 2):
        drv.create_endpoint(endpoint_req(eid=_eid(i), address=f"10.1.0.{10 + i}/24"))
    _join(drv, _eid(1))
    guarded, writes, syncs = list(plane.guarded[NID]), plane.writes, getattr(plane, "full_syncs", 0)
    plane.fail_on.add("ensure_endpoint")
    with pytest.raises(KernelError, match="injected"):
        _join(drv, _eid(2))
    assert plane.endpoints[NID] == {_eid(1): "vxc" + _eid(1)[:11]} and plane.guarded[NID] == guarded
    assert (plane.writes, getattr(plane, "full_syncs", 0)) == (writes, syncs)  # nothing rebuilt under the others
    assert [k for k in kv.keys(schema.PREFIX + "/peers/")] == [f"{schema.PREFIX}/peers/{NID}/{_eid(1)}"]
    plane.fail_on.clear()
    _join(drv, _eid(2))  # the next try wires it as any Join
    assert set(plane.endpoints[NID]) == {_eid(1), _eid(2)}
