"""Anti-spoofing against the real kernel: two 'containers' (namespaces) on one network's bridge; a container that
changes its address or MAC gets nothing through, its own identity works."""

import secrets
import subprocess

import pytest

from netdriver import names
from netdriver.isolation import Firewall
from netdriver.links import Links
from netdriver.models import Endpoint, Network, Subnet
from netdriver.sandbox import DataPlane
from netdriver.underlay import Underlay


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
