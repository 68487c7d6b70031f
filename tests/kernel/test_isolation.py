"""Anti-spoofing against the real kernel: two 'containers' (namespaces) on one network's bridge; a container that
changes its address or MAC gets nothing through, its own identity works. And the driver over a real etcd keeps
the sets equal to the endpoints wired, one Join or DeleteEndpoint at a time, as a restart rebuilds them."""

import json
import secrets
import subprocess

import pytest

from kernel import names
from kernel.links import Links
from netdriver.driver import NetworkDriver, mac_for
from netdriver.isolation import Firewall
from netdriver.models import Endpoint, Network, Subnet
from netdriver.sandbox import DataPlane
from netdriver.store import NetworkStore
from netdriver.underlay import Underlay
from store.kvstore import EtcdKV
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
