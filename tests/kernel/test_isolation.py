"""Anti-spoofing against the real kernel: two 'containers' (namespaces) on one network's bridge; a container that
changes its address or MAC gets nothing through, its own identity works. And the driver over a real etcd keeps
the sets equal to the endpoints wired, one Join or DeleteEndpoint at a time, as a restart rebuilds them."""

import json
import os
import secrets
import subprocess
import sys

import pytest

from kernel import names
from kernel.libnftables import rule_counters
from kernel.links import Links
from netdriver.driver import NetworkDriver, mac_for
from netdriver.isolation import Firewall, link_local, list_table_command
from netdriver.models import Endpoint, Network, Subnet
from netdriver.sandbox import DataPlane
from netdriver.store import NetworkStore
from netdriver.underlay import Underlay
from store.kvstore import EtcdKV
from tests.harness.driver_calls import within as _within
from wire import protocol as p


def sh(*argv, check=True):
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=30)


def pings(ns, target):
    return sh("ip", "netns", "exec", ns, "ping", "-c", "1", "-W", "1", target, check=False).returncode == 0


@pytest.fixture
def wired():
    links = Links()
    plane = DataPlane(links, Underlay(lambda a: 65536, "127.0.0.1"), Firewall(links.nft))
    nid = secrets.token_hex(32)
    network = Network(id=nid, vni=9000011, mtu=1450, internal=False, subnets=[Subnet("10.77.5.0/24", None)])
    made, endpoints = [], []
    try:
        plane.ensure_network(network)
        for i in (5, 6):
            ep = Endpoint(nid, secrets.token_hex(32), f"10.77.5.{i}/24", f"02:42:0a:4d:05:0{i}", "h")
            ifname = plane.ensure_endpoint(network, ep)
            cns = f"vxt-{ep.id[:8]}"
            sh("ip", "netns", "add", cns)
            made.append(cns)
            sh("ip", "link", "set", ifname, "netns", cns)
            sh("ip", "-n", cns, "link", "set", ifname, "name", "eth0")
            sh("ip", "-n", cns, "addr", "add", ep.ip, "dev", "eth0")
            sh("ip", "-n", cns, "link", "set", "eth0", "up")
            endpoints.append(ep)
        plane.guard_endpoints(network, endpoints)
        yield plane, network, made, endpoints
    finally:
        for cns in made:
            sh("ip", "netns", "del", cns, check=False)
        plane.remove_network(nid, 9000011)
        links.close()


def test_own_identity_passes_forged_address_and_mac_do_not(wired):
    plane, network, (c5, c6), _ = wired
    assert pings(c5, "10.77.5.6")
    # Another address of the same subnet, as a container with NET_ADMIN could set.
    sh("ip", "-n", c5, "addr", "flush", "dev", "eth0")
    sh("ip", "-n", c5, "addr", "add", "10.77.5.99/24", "dev", "eth0")
    sh("ip", "-n", c6, "neigh", "flush", "all")
    assert not pings(c5, "10.77.5.6")
    sh("ip", "-n", c5, "addr", "flush", "dev", "eth0")
    sh("ip", "-n", c5, "addr", "add", "10.77.5.5/24", "dev", "eth0")
    assert pings(c5, "10.77.5.6")
    # Another MAC with the right address.
    sh("ip", "-n", c5, "link", "set", "eth0", "address", "02:42:0a:4d:05:63")
    sh("ip", "-n", c6, "neigh", "flush", "all")
    assert not pings(c5, "10.77.5.6")
    sh("ip", "-n", c5, "link", "set", "eth0", "address", "02:42:0a:4d:05:05")
    assert pings(c5, "10.77.5.6")


def test_rules_follow_the_endpoints_and_go_with_the_namespace(wired):
    plane, network, (c5, c6), (e5, e6) = wired
    ns = plane.links.netns_path(names.netns(network.id))
    listed = sh("nsenter", f"--net={ns}", "nft", "list", "table", "bridge", "vxnet").stdout
    assert listed.count("drop comment") == 5 and names.veth_bridge(e5.id) in listed
    plane.guard_endpoints(network, [e6])
    listed = sh("nsenter", f"--net={ns}", "nft", "list", "table", "bridge", "vxnet").stdout
    assert listed.count("drop comment") == 5 and names.veth_bridge(e5.id) not in listed
    # e5's port is no longer guarded (it is about to be deleted): e6 is still held to its identity.
    sh("ip", "-n", c6, "addr", "flush", "dev", "eth0")
    sh("ip", "-n", c6, "addr", "add", "10.77.5.98/24", "dev", "eth0")
    assert not pings(c6, "10.77.5.5")


class _NetworkFirewall(Firewall):
    """The network namespaces' tables only: the host's `inet vxnet` table belongs to whatever else runs here."""

    def guard_host(self, subnets):
        pass


def _sets(netns_path):
    """The anti-spoofing sets' elements in a namespace, as nft lists them: {set: sorted elements as text}."""
    out = {}
    for name in ("ports", "macs", "ips"):
        listed = json.loads(sh("nsenter", f"--net={netns_path}", "nft", "-j", "list", "set", "bridge", "vxnet",
                               name).stdout)
        (entry,) = [item["set"] for item in listed["nftables"] if "set" in item]
        out[name] = sorted(json.dumps(e, sort_keys=True) for e in entry.get("elem", []))
    return out


def _expected(ports):
    """The sets for these (port, ip, mac), as the whole-table rebuild writes them into a scratch namespace."""
    scratch = f"vxt-{secrets.token_hex(4)}"
    sh("ip", "netns", "add", scratch)
    links = Links()
    try:
        Firewall(links.nft).guard_endpoints(scratch, ports)
        return _sets(f"/run/netns/{scratch}")
    finally:
        links.close()
        sh("ip", "netns", "del", scratch, check=False)


def test_driver_keeps_the_sets_equal_to_the_wired_endpoints_and_a_restart_rebuilds_them(etcd, netns_dir):
    kv = EtcdKV([etcd.url])
    prefix = f"/vxnet-test-{secrets.token_hex(4)}"

    def driver():
        links = Links(netns_dir)
        underlay = Underlay(lambda a: 65536, "127.0.0.1")
        plane = DataPlane(links, underlay, _NetworkFirewall(links.nft))
        plane.sweep_host_links = lambda endpoint_ids: ([], [])  # other tests' veth ends live in this host namespace
        return NetworkDriver(NetworkStore(kv, prefix), plane, "h1", "local", underlay), links

    drv, links = driver()
    nid = secrets.token_hex(32)
    path = links.netns_path(names.netns(nid))
    eids = {i: secrets.token_hex(32) for i in range(1, 6)}
    ips = {i: f"10.77.6.{10 + i}" for i in eids}
    try:
        drv.create_network(p.CreateNetworkRequest.decode({
            "NetworkID": nid, "Options": {"com.docker.network.generic": {"vni": "9000012"}},
            "IPv4Data": [{"Pool": "10.77.6.0/24", "Gateway": "10.77.6.1/24"}]}))
        assert _sets(path) == _expected([])
        wired = set()
        for verb, i in [("join", 1), ("join", 2), ("join", 3), ("delete", 2), ("join", 4), ("delete", 2),
                        ("join", 5), ("delete", 1)]:
            req = {"NetworkID": nid, "EndpointID": eids[i]}
            if verb == "join":
                drv.create_endpoint(p.CreateEndpointRequest.decode({**req, "Interface": {"Address": f"{ips[i]}/24"}}))
                drv.join(p.JoinRequest.decode({**req, "SandboxKey": "/var/run/docker/netns/x"}))
                wired.add(i)
            else:
                drv.leave(p.EndpointRequest.decode(req))
                drv.delete_endpoint(p.EndpointRequest.decode(req))
                wired.discard(i)
            want = _expected([(names.veth_bridge(eids[j]), ips[j], mac_for(ips[j])) for j in sorted(wired)])
            assert _sets(path) == want, (verb, i)
        # A restart: the table is lost (flushed by hand, say), a new process remembers nothing and start-up
        # rebuilds the same sets from etcd and the veths present.
        sh("nsenter", f"--net={path}", "nft", "delete", "table", "bridge", "vxnet")
        links.close()
        drv, links = driver()
        drv.reconcile()
        assert _sets(path) == want and len(want["ports"]) == 3
    finally:
        drv.dataplane.remove_network(nid, 9000012)
        links.close()
        kv.delete_prefix(prefix + "/")


# -- dual stack --------------------------------------------------------------------------------------------------
PROBE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nd_probe.py")
V6 = "fd00:77:7::"
TIMEOUT = 3.0  # every positive and negative probe below waits this long at most


def within(predicate, timeout=TIMEOUT):
    """driver_calls.within with this section's shorter deadline."""
    return _within(predicate, timeout)


def container(cns, ifname, v4, v6):
    """A namespace holding a veth's container end as eth0 with both addresses. DAD off (it only delays the
    addresses here), so the link-local address is usable as soon as the link is up."""
    sh("ip", "netns", "add", cns)
    sh("ip", "netns", "exec", cns, "sysctl", "-q", "-w", "net.ipv6.conf.default.accept_dad=0",
       "net.ipv6.conf.all.accept_dad=0")
    sh("ip", "link", "set", ifname, "netns", cns)
    sh("ip", "-n", cns, "link", "set", ifname, "name", "eth0")
    sh("ip", "-n", cns, "addr", "add", v4, "dev", "eth0")
    if v6:
        sh("ip", "-n", cns, "addr", "add", v6, "dev", "eth0", "nodad")
    sh("ip", "-n", cns, "link", "set", "eth0", "up")


def ping6(ns, target, source=None):
    argv = ["ip", "netns", "exec", ns, "ping", "-6", "-c", "1", "-W", "1"] + (["-I", source] if source else [])
    return within(lambda: sh(*argv, target, check=False).returncode == 0)


def neigh_mac(ns, address):
    out = sh("ip", "-n", ns, "-6", "neigh", "show", address, "dev", "eth0").stdout.split()
    return out[out.index("lladdr") + 1] if "lladdr" in out else None


def counters(plane, network):
    listing = plane.links.nft(names.netns(network.id), list_table_command("bridge"), "read")
    return rule_counters(listing)


def probe(ns, *argv):
    sh("ip", "netns", "exec", ns, sys.executable, PROBE, *argv)


@pytest.fixture
def wired6():
    """A dual-stack network with three guarded 'containers' (.5, .6, .7) and a namespace on an unguarded port
    of the bridge (what the anti-spoofing table does not cover: the positive control of router messages)."""
    links = Links()
    plane = DataPlane(links, Underlay(lambda a: 65536, "127.0.0.1"), Firewall(links.nft))
    nid = secrets.token_hex(32)
    network = Network(id=nid, vni=9000013, mtu=1450, internal=False, subnets=[Subnet("10.77.7.0/24", None)],
                      subnets6=[Subnet(V6 + "/64", None)])
    made, endpoints = [], {}
    rogue = f"vxt-{secrets.token_hex(4)}"
    try:
        plane.ensure_network(network)
        for i in (5, 6, 7):
            ep = Endpoint(nid, secrets.token_hex(32), f"10.77.7.{i}/24", f"02:42:0a:4d:07:0{i}", "h", f"{V6}{i}/64")
            ifname = plane.ensure_endpoint(network, ep)
            cns = f"vxt-{ep.id[:8]}"
            made.append(cns)
            container(cns, ifname, ep.ip, ep.ip6)
            endpoints[i] = (cns, ep)
        plane.guard_endpoints(network, [ep for _, ep in endpoints.values()])
        ns = names.netns(nid)
        made.append(rogue)
        sh("ip", "link", "add", "vxtrogue0", "type", "veth", "peer", "name", "vxtrogue1")
        sh("ip", "link", "set", "vxtrogue0", "netns", links.netns_path(ns))
        sh("ip", "-n", ns, "link", "set", "vxtrogue0", "master", names.BRIDGE, "up")
        container(rogue, "vxtrogue1", "10.77.7.99/24", None)
        yield plane, network, endpoints, rogue
    finally:
        for cns in made:
            sh("ip", "netns", "del", cns, check=False)
        sh("ip", "link", "del", "vxtrogue1", check=False)
        plane.remove_network(nid, 9000013)
        links.close()


def test_dual_stack_own_addresses_pass_a_forged_v6_source_does_not(wired6):
    plane, network, eps, _ = wired6
    c5, e6 = eps[5][0], eps[6][1]
    # What the reconciler compares: nft's listing of the raw-payload targets set reads back as the batch wrote it.
    everyone = [ep for _, ep in eps.values()]
    assert plane.guard_drift(network, everyone) is None
    plane.unguard_endpoint(network, e6)
    drift = plane.guard_drift(network, everyone)
    assert f"set targets lacks {names.veth_bridge(e6.id)} . 0xfd000077000700000000000000000006" in drift, drift
    plane.guard_endpoint(network, e6)
    assert plane.guard_drift(network, everyone) is None
    assert ping6(c5, V6 + "6") and ping6(c5, V6 + "6", source=V6 + "5")  # the global address
    assert ping6(c5, f"{link_local(e6.mac)}%eth0")  # the link-local one of its MAC
    # The namespace itself holds no IPv6 address on any of its devices (addr_gen_mode none): it is no node of
    # the network, as it is none in IPv4.
    inside = sh("ip", "-n", names.netns(network.id), "-6", "-o", "addr", "show").stdout
    assert [line for line in inside.splitlines() if " lo " not in line] == []
    sh("ip", "-n", c5, "addr", "add", V6 + "99/64", "dev", "eth0", "nodad")
    before = counters(plane, network).get("vxnet:anti-spoofing:ip6", (0, 0))[0]
    assert not ping6(c5, V6 + "6", source=V6 + "99")
    assert counters(plane, network)["vxnet:anti-spoofing:ip6"][0] > before
    assert ping6(c5, V6 + "6", source=V6 + "5")  # the same probe from its own address, after


def test_a_container_cannot_advertise_another_containers_address(wired6):
    plane, network, eps, _ = wired6
    (c5, e5), e6, c7 = eps[5], eps[6][1], eps[7][0]
    assert ping6(c7, V6 + "6") and ping6(c7, V6 + "5")  # c7 holds neighbour entries for both
    assert neigh_mac(c7, V6 + "6") == e6.mac
    # Control: an advertisement for c5's own address, overriding a wrong entry c7 has for it, gets through.
    sh("ip", "-n", c7, "-6", "neigh", "replace", V6 + "5", "lladdr", "02:00:00:00:00:99", "dev", "eth0", "nud",
       "stale")
    probe(c5, "na", V6 + "5", V6 + "7", V6 + "5", e5.mac)
    assert within(lambda: neigh_mac(c7, V6 + "5") == e5.mac)
    # The same advertisement claiming c6's address for c5's MAC does not.
    before = counters(plane, network).get("vxnet:anti-spoofing:na-target", (0, 0))[0]
    probe(c5, "na", V6 + "5", V6 + "7", V6 + "6", e5.mac)
    assert not within(lambda: neigh_mac(c7, V6 + "6") == e5.mac)
    assert counters(plane, network)["vxnet:anti-spoofing:na-target"][0] == before + 1
    assert ping6(c7, V6 + "6") and neigh_mac(c7, V6 + "6") == e6.mac


def test_a_container_cannot_send_router_advertisements(wired6):
    plane, network, eps, rogue = wired6
    (c5, e5), (c7, _) = eps[5], eps[7]

    def default_route(ns):
        return sh("ip", "-n", ns, "-6", "route", "show", "default").stdout.strip()

    rogue_mac = sh("ip", "-n", rogue, "-j", "link", "show", "eth0").stdout.split('"address":"')[1][:17]
    # Control: the same advertisement from a port the table does not guard gives c7 a default route.
    probe(rogue, "ra", link_local(rogue_mac), "eth0", "fd00:98::/64", rogue_mac)
    assert within(lambda: link_local(rogue_mac) in default_route(c7)), default_route(c7)
    # The bridge delivers a copy of the multicast to itself too: the namespace takes neither a route nor an
    # address from it (accept_ra 0 there).
    ns = names.netns(network.id)
    assert sh("ip", "-n", ns, "-6", "route", "show", "default").stdout.strip() == ""
    assert "fd00:98:" not in sh("ip", "-n", ns, "-6", "addr", "show").stdout
    sh("ip", "-n", c7, "-6", "route", "flush", "default")
    before = counters(plane, network).get("vxnet:anti-spoofing:router", (0, 0))[0]
    probe(c5, "ra", link_local(e5.mac), "eth0", "fd00:99::/64", e5.mac)
    assert not within(lambda: default_route(c7) != "")
    # Dropped once per port it was flooded to (the bridge's forward hook runs for each copy).
    assert counters(plane, network)["vxnet:anti-spoofing:router"][0] > before
    assert "fd00:99:" not in sh("ip", "-n", c7, "-6", "addr", "show").stdout
    assert sh("ip", "-n", ns, "-6", "route", "show", "default").stdout.strip() == ""


def test_a_forged_source_is_logged_as_anti_spoofing_under_the_ports_container(wired):
    """`vxnet flows` of an open network: the forged ping appears with reason anti-spoofing and the sending port's
    container; the honest ping from the same port before it passes and is not logged; the counter equals the
    forged packets sent."""
    from kernel.nflog import Reader
    from plugin import flows as pf
    from tests.fakes.policy_engine import FakePolicyEngine
    from tests.harness.proc import wait_until

    plane, network, (c5, c6), (e5, e6) = wired
    ns = names.netns(network.id)
    engine = FakePolicyEngine()
    engine.names_of[network.id] = {e.ip.split("/")[0]: {"container": f"c{e.ip[-4]}", "service": "",
                                                       "endpoint": e.id, "host": "h"} for e in (e5, e6)}
    fw = Firewall(plane.links.nft)
    log = pf.FlowLog(engine, lambda n: Reader(plane.links.netns_path(n)), lambda n: {}, guards=fw.counted)
    log.start()
    try:
        engine.up(network.id, ns)
        wait_until(lambda: log.networks()[0]["running"], 10, "the log reading")
        assert pings(c5, "10.77.5.6")  # positive control: the honest ping from the same port
        # Not logged: no IPv4 record at all (the containers' own IPv6, MLD and router solicitations, is dropped and
        # logged on this IPv4-only network: rule no-ipv6).
        assert [r for r in log.query(network.id)["records"] if r["rule"] != "no-ipv6"] == []
        sh("ip", "-n", c5, "addr", "flush", "dev", "eth0")
        sh("ip", "-n", c5, "addr", "add", "10.77.5.99/24", "dev", "eth0")
        sh("ip", "-n", c5, "neigh", "add", "10.77.5.6", "lladdr", e6.mac, "dev", "eth0")
        assert not pings(c5, "10.77.5.6")

        def logged():
            answer = log.query(network.id)
            hits = [r for r in answer["records"] if r["reason"] == "anti-spoofing" and r["src"]["ip"] == "10.77.5.99"]
            return (answer, hits) if hits else None

        answer, (hit, *_) = wait_until(logged, 10, "the forged ping in the flows answer")
        assert (hit["verdict"], hit["rule"], hit["proto"], hit["dst"]["ip"]) == ("dropped", "ip", "icmp", "10.77.5.6")
        assert (hit["src"]["endpoint"], hit["port"], hit["mac"]) == (e5.id, names.veth_bridge(e5.id), e5.mac)
        assert hit["src"]["container"] == "c5"
        # The ip rule's counter: exactly the one forged echo request sent (ping -c 1). The reason's total also
        # holds the IPv6 the containers' kernels send on this IPv4-only network (rule no-ipv6), each one logged.
        assert fw.counted(ns)["vxnet:anti-spoofing:ip"][0] == 1
        assert [r["rule"] for r in answer["records"]].count("ip") == 1
        assert answer["guards"]["anti-spoofing"]["counted"] >= len(answer["records"])
        assert answer["guards"]["anti-spoofing"]["suppressed"] == 0 and answer["lost"] == 0
    finally:
        log.stop()
