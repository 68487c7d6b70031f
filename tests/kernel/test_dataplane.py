"""The data plane against the real kernel: namespaces, bridge, VXLAN, veth, MTU, cleanup, and the network
driver over a real etcd rolling back a failed create. Every name carries this run's random tag so nothing of
anyone else's is touched, and everything is removed even when a test fails."""

import json
import os
import secrets
import subprocess

import pytest

from kernel import names
from kernel.links import Links
from netdriver.driver import NetworkDriver
from netdriver.models import Endpoint, Network, Subnet
from netdriver.sandbox import DataPlane
from netdriver.store import NetworkStore
from netdriver.underlay import Underlay
from wire import protocol as p
from wire.errors import Conflict, KernelError

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces")


@pytest.fixture
def links():
    made = Links()
    yield made
    made.close()


@pytest.fixture
def ids():
    """Random network/endpoint ids; the namespaces and host links they name are removed afterwards."""
    made = []

    def new():
        value = secrets.token_hex(32)
        made.append(value)
        return value

    yield new
    cleaner = Links()
    for value in made:
        cleaner.remove_netns(names.netns(value))
        cleaner.remove_link(None, names.veth_container(value))
    cleaner.close()


def net(nid, vni, mtu=1450):
    return Network(id=nid, vni=vni, mtu=mtu, internal=False, subnets=[Subnet("10.77.0.0/24", None)])


def test_network_namespace_bridge_vxlan_and_veth(links, ids):
    plane = DataPlane(links, Underlay(lambda a: 65536, "127.0.0.1"))
    nid, eid = ids(), ids()
    network = net(nid, 9000001, mtu=1400)
    plane.ensure_network(network)
    plane.ensure_network(network)  # idempotent
    ns = names.netns(nid)
    assert ns in links.list_netns()
    br = links.link_info(ns, names.BRIDGE)
    vx = links.link_info(ns, names.VXLAN)
    assert (br["kind"], br["mtu"], br["up"]) == ("bridge", 1400, True)
    assert (vx["kind"], vx["vni"], vx["mtu"], vx["master"]) == ("vxlan", 9000001, 1400, names.BRIDGE)
    assert not links.link_exists(None, names.vxlan_staging(9000001))
    assert sorted(links.list_links(ns)) == ["br0", "lo", "vxlan0"]  # a namespace of its own, not the host's

    endpoint = Endpoint(nid, eid, "10.77.0.5/24", "02:42:0a:4d:00:05", "h")
    ifname = plane.ensure_endpoint(network, endpoint)
    assert plane.ensure_endpoint(network, endpoint) == ifname
    host_end = links.link_info(None, ifname)
    bridge_end = links.link_info(ns, names.veth_bridge(eid))
    assert (host_end["kind"], host_end["mtu"], host_end["mac"]) == ("veth", 1400, "02:42:0a:4d:00:05")
    assert (bridge_end["master"], bridge_end["mtu"], bridge_end["up"]) == (names.BRIDGE, 1400, True)

    assert plane.wired_endpoints(nid, [eid, ids()]) == {eid}
    fdb = {"02:42:0a:4d:00:09": "127.0.0.2", "02:42:0a:4d:00:0a": "127.0.0.3"}
    neigh = {"10.77.0.9": "02:42:0a:4d:00:09", "10.77.0.10": "02:42:0a:4d:00:0a"}
    plane.sync_peers(network, fdb, neigh)
    plane.sync_peers(network, fdb, neigh)
    assert plane.peers(nid) == (fdb, neigh)
    moved = {"02:42:0a:4d:00:09": "127.0.0.4"}  # one peer moved to another VTEP, the other left
    plane.sync_peers(network, moved, {"10.77.0.9": "02:42:0a:4d:00:09"})
    assert plane.peers(nid) == (moved, {"10.77.0.9": "02:42:0a:4d:00:09"})
    plane.sync_peers(network, {}, {})
    assert plane.peers(nid) == ({}, {})
    # A dual-stack peer: one FDB entry, a neighbour entry in each table (ARP and NDP), replaced and removed alike.
    v6 = {"10.77.0.9": "02:42:0a:4d:00:09", "fd00:77::9": "02:42:0a:4d:00:09"}
    plane.sync_peers(network, {"02:42:0a:4d:00:09": "127.0.0.2"}, v6)
    assert plane.peers(nid) == ({"02:42:0a:4d:00:09": "127.0.0.2"}, v6)
    assert "fd00:77::9 lladdr 02:42:0a:4d:00:09 PERMANENT" in subprocess.run(
        ["ip", "-n", ns, "-6", "neigh", "show", "dev", names.VXLAN], capture_output=True, text=True).stdout
    plane.sync_peers(network, {"02:42:0a:4d:00:09": "127.0.0.2"}, {"fd00:77::9": "02:42:0a:4d:00:0a"})
    assert plane.peers(nid)[1] == {"fd00:77::9": "02:42:0a:4d:00:0a"}
    plane.sync_peers(network, {}, {})
    assert plane.peers(nid) == ({}, {})
    with pytest.raises(KernelError, match="'fd00::zz': not an IPv4 or IPv6 address"):
        links.set_neigh(ns, names.VXLAN, "fd00::zz", "02:42:0a:4d:00:09")
    # None of the namespace's devices is an IPv6 host (no address: no DAD, no MLD, no ping6 answer), and the
    # bridge floods multicast (snooping off) so neighbour solicitations always reach the VXLAN device's proxy.
    addresses = json.loads(subprocess.run(["ip", "-j", "-n", ns, "-6", "addr", "show"], capture_output=True,
                                          text=True).stdout)
    assert {a["ifname"]: [i["local"] for i in a["addr_info"]] for a in addresses if a["addr_info"]} == {
        "lo": ["::1"]}
    bridge = json.loads(subprocess.run(["ip", "-j", "-d", "-n", ns, "link", "show", names.BRIDGE],
                                       capture_output=True, text=True).stdout)[0]
    assert bridge["linkinfo"]["info_data"]["mcast_snooping"] == 0

    plane.remove_endpoint(nid, eid)
    plane.remove_endpoint(nid, eid)
    assert not links.link_exists(None, ifname) and not links.link_exists(ns, names.veth_bridge(eid))
    plane.remove_network(nid, 9000001)
    plane.remove_network(nid, 9000001)
    assert ns not in links.list_netns()


def test_two_endpoints_talk_across_the_bridge(links, ids):
    """Two veth ends moved into namespaces of their own (as dockerd does) reach each other through the bridge."""
    plane = DataPlane(links, Underlay(lambda a: 65536, "127.0.0.1"))
    nid = ids()
    network = net(nid, 9000002)
    plane.ensure_network(network)
    made = []
    try:
        for i in (5, 6):
            eid = ids()
            ifname = plane.ensure_endpoint(network, Endpoint(nid, eid, f"10.77.0.{i}/24", f"02:42:0a:4d:00:0{i}", "h"))
            cns = f"vxt-{eid[:8]}"
            subprocess.run(["ip", "netns", "add", cns], check=True)
            made.append(cns)
            subprocess.run(["ip", "link", "set", ifname, "netns", cns], check=True)
            subprocess.run(["ip", "-n", cns, "addr", "add", f"10.77.0.{i}/24", "dev", ifname], check=True)
            subprocess.run(["ip", "-n", cns, "link", "set", ifname, "up"], check=True)
        out = subprocess.run(["ip", "netns", "exec", made[0], "ping", "-c", "2", "-W", "2", "-i", "0.2",
                              "10.77.0.6"], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
    finally:
        for cns in made:
            subprocess.run(["ip", "netns", "del", cns])
        plane.remove_network(nid, 9000002)


def test_vxlan_vni_clash_is_a_conflict_naming_the_vni(links, ids):
    plane = DataPlane(links, Underlay(lambda a: 65536, "127.0.0.1"))
    a, b = ids(), ids()
    plane.ensure_network(net(a, 9000003))
    try:
        with pytest.raises(Conflict, match="option vni: VNI 9000003 is already used by another VXLAN device"):
            plane.ensure_network(net(b, 9000003))
        assert names.netns(b) not in links.list_netns()  # the failed create took its namespace back
    finally:
        plane.remove_network(b, 9000003)
        plane.remove_network(a, 9000003)
    assert not links.link_exists(None, names.vxlan_staging(9000003))


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    from tests.harness.etcd import EtcdServer
    server = EtcdServer(tmp_path_factory.mktemp("etcd"))
    server.start()
    yield server
    server.stop()


def test_driver_rolls_back_a_failed_create_against_real_etcd(links, ids, etcd):
    from store.kvstore import EtcdKV
    kv = EtcdKV([etcd.url])
    prefix = f"/vxnet-test-{secrets.token_hex(4)}"
    plane = DataPlane(links, Underlay(lambda a: 65536, "127.0.0.1"))
    drv = NetworkDriver(NetworkStore(kv, prefix), plane, "h1", "local", Underlay(lambda a: 1500, "127.0.0.1"))
    blocker, victim = ids(), ids()
    # Another network already holds VNI 9000004 in the kernel (not in etcd): the create reaches the kernel and
    # fails there, after writing etcd.
    plane.ensure_network(net(blocker, 9000004))
    try:
        req = p.CreateNetworkRequest.decode({
            "NetworkID": victim, "Options": {"com.docker.network.generic": {"vni": "9000004"}},
            "IPv4Data": [{"Pool": "10.77.1.0/24", "Gateway": "10.77.1.1/24"}]})
        with pytest.raises(Conflict, match="9000004"):
            drv.create_network(req)
        assert kv.get_prefix(prefix + "/")[0] == []
        assert names.netns(victim) not in links.list_netns()
    finally:
        plane.remove_network(blocker, 9000004)
        kv.delete_prefix(prefix + "/")


def test_a_namespace_file_without_its_mount_is_recreated(links, ids):
    """A crash can leave /run/netns/<name> as a plain file: it is not a namespace, and ensure makes a real one."""
    import os
    plane = DataPlane(links, Underlay(lambda a: 65536, "127.0.0.1"))
    nid = ids()
    ns = names.netns(nid)
    os.makedirs(links.netns_dir, exist_ok=True)
    open(os.path.join(links.netns_dir, ns), "w").close()
    assert not links.netns_exists(ns)
    plane.ensure_network(net(nid, 9000005))
    assert links.netns_exists(ns) and sorted(links.list_links(ns)) == ["br0", "lo", "vxlan0"]
    plane.remove_network(nid, 9000005)
    assert ns not in links.list_netns()


def test_start_up_sweeps_our_leftover_host_links_only(links, ids):
    """A staging VXLAN device and a container-side veth whose endpoint no record knows are ours and stale;
    a veth end of a known endpoint stays."""
    plane = DataPlane(links, Underlay(lambda a: 65536, "127.0.0.1"))
    nid, known, stale = ids(), ids(), ids()
    network = net(nid, 9000006)
    plane.ensure_network(network)
    try:
        for eid in (known, stale):
            plane.ensure_endpoint(network, Endpoint(nid, eid, "10.77.0.7/24", "02:42:0a:4d:00:07", "h"))
        subprocess.run(["ip", "link", "add", "vxl9000007", "type", "vxlan", "id", "9000007", "dstport", "4789",
                        "local", "127.0.0.1"], check=True)
        gone, failed = plane.sweep_host_links(lambda: [known])
        assert sorted(gone) == sorted([names.veth_container(stale), "vxl9000007"]) and failed == []
        assert links.link_exists(None, names.veth_container(known))
        assert not links.link_exists(None, names.veth_container(stale))
    finally:
        links.remove_link(None, "vxl9000007")
        plane.remove_network(nid, 9000006)
