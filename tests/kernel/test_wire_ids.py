"""Malformed IDs and a taken VNI against the real kernel and a real etcd, through the real HTTP app: issue 9 saw
`CreateNetwork` with NetworkID "0.0.0.0/0" make a directory in the namespace folder, "::1" a namespace
`vxnet-::1`, and endpoint IDs like "../../etc/passwd" become etcd keys. Each test has its positive control: the
same calls with well-formed IDs (a free VNI) do create the namespace, the veth and the keys."""

import json
import os
import secrets
import subprocess

import pytest

from ipam_driver.driver import IpamDriver
from ipam_driver.store import IpamStore
from kernel import names
from kernel.links import Links
from netdriver.driver import NetworkDriver
from netdriver.sandbox import DataPlane
from netdriver.store import NetworkStore
from netdriver.underlay import Underlay
from plugin.http import make_app
from plugin.routes import IPAM, NETWORK
from store.kvstore import EtcdKV

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces")

BAD_IDS = ["0.0.0.0/0", "::1", "../../etc/passwd"]


@pytest.fixture
def plugin(netns_dir, etcd):
    """The HTTP app over the real drivers: Links with a namespace folder of this test's own, a real etcd under a
    key prefix of its own. Yields (client, links, netns_dir, kv, prefix); removes whatever is left."""
    links = Links(netns_dir)
    kv = EtcdKV([etcd.url])
    prefix = f"/vxnet-test-{secrets.token_hex(4)}"
    underlay = Underlay(lambda a: 1500, "127.0.0.1")
    net = NetworkDriver(NetworkStore(kv, prefix), DataPlane(links, underlay), "h1", "local", underlay)
    app = make_app({NETWORK: net, IPAM: IpamDriver(IpamStore(kv, prefix), "h1", "local")})
    try:
        yield app.test_client(), links, netns_dir, kv, prefix
    finally:
        for name in links.list_netns():
            if names.network_id_prefix(name):
                links.remove_netns(name)
        kv.delete_prefix(prefix + "/")
        links.close()


def call(client, path, body):
    resp = client.post(path, data=json.dumps(body), headers={"Accept": "application/vnd.docker.plugins.v1.2+json"})
    return resp.status_code, json.loads(resp.data)


def create_body(nid, vni, pool="10.78.0.0/24"):
    return {"NetworkID": nid, "Options": {"com.docker.network.generic": {"vni": str(vni)}},
            "IPv4Data": [{"AddressSpace": "", "Pool": pool, "Gateway": pool.rsplit(".", 1)[0] + ".1/24"}]}


def everything_in(netns_dir):
    """Every file and directory under the namespace folder, at any depth."""
    found = []
    for root, dirs, files in os.walk(netns_dir):
        found += [os.path.relpath(os.path.join(root, n), netns_dir) for n in dirs + files]
    return sorted(found)


def all_keys(kv):
    return sorted(e.key for e in kv.get_prefix("/")[0])


def test_malformed_ids_make_no_namespace_file_no_link_and_no_etcd_key(plugin):
    client, links, netns_dir, kv, prefix = plugin
    vni = 9100000 + secrets.randbelow(100000)
    nid, eid = secrets.token_hex(32), secrets.token_hex(32)
    # Positive control: well-formed IDs reach the kernel and etcd through the same app.
    assert call(client, "/NetworkDriver.CreateNetwork", create_body(nid, vni)) == (200, {})
    status, _ = call(client, "/NetworkDriver.CreateEndpoint",
                     {"NetworkID": nid, "EndpointID": eid, "Interface": {"Address": "10.78.0.5/24"}})
    assert status == 200
    status, reply = call(client, "/NetworkDriver.Join", {"NetworkID": nid, "EndpointID": eid,
                                                         "SandboxKey": "/var/run/docker/netns/x"})
    assert status == 200 and links.link_exists(None, reply["InterfaceName"]["SrcName"])
    assert everything_in(netns_dir) == [names.netns(nid)] and links.netns_exists(names.netns(nid))
    keys = all_keys(kv)
    assert f"{prefix}/networks/{nid}" in keys and f"{prefix}/endpoints/{nid}/{eid}" in keys
    host_links = sorted(links.list_links(None))

    try:
        for bad in BAD_IDS:
            calls = [
                ("/NetworkDriver.CreateNetwork", create_body(bad, vni + 1, "10.78.1.0/24"), "NetworkID"),
                ("/NetworkDriver.AllocateNetwork", create_body(bad, vni + 1, "10.78.1.0/24"), "NetworkID"),
                ("/NetworkDriver.CreateEndpoint", {"NetworkID": bad, "EndpointID": eid,
                                                   "Interface": {"Address": "10.78.0.6/24"}}, "NetworkID"),
                ("/NetworkDriver.CreateEndpoint", {"NetworkID": nid, "EndpointID": bad,
                                                   "Interface": {"Address": "10.78.0.6/24"}}, "EndpointID"),
            ]
            for path in ("Join", "Leave", "DeleteEndpoint", "EndpointOperInfo", "ProgramExternalConnectivity"):
                for body, field in (({"NetworkID": bad, "EndpointID": eid}, "NetworkID"),
                                    ({"NetworkID": nid, "EndpointID": bad}, "EndpointID")):
                    calls.append((f"/NetworkDriver.{path}", {**body, "SandboxKey": "/var/run/docker/netns/x"}, field))
            calls += [("/NetworkDriver.DeleteNetwork", {"NetworkID": bad}, "NetworkID"),
                      ("/NetworkDriver.FreeNetwork", {"NetworkID": bad}, "NetworkID"),
                      ("/IpamDriver.ReleasePool", {"PoolID": bad}, "PoolID"),
                      ("/IpamDriver.RequestAddress", {"PoolID": bad, "Address": ""}, "PoolID")]
            for path, body, field in calls:
                status, reply = call(client, path, body)
                assert status == 400 and reply["Err"].startswith(field + ":"), (path, bad, status, reply)
            assert everything_in(netns_dir) == [names.netns(nid)], bad
            assert all_keys(kv) == keys, bad
            assert sorted(links.list_links(None)) == host_links, bad
    finally:
        # The positive control cleans up through the same app, and that too is seen in the kernel and etcd.
        for path in ("Leave", "DeleteEndpoint"):
            assert call(client, f"/NetworkDriver.{path}", {"NetworkID": nid, "EndpointID": eid})[0] == 200
        assert call(client, "/NetworkDriver.DeleteNetwork", {"NetworkID": nid})[0] == 200
    assert everything_in(netns_dir) == [] and kv.get_prefix(prefix + "/")[0] == []


def test_a_vni_held_by_a_vxlan_device_vxnet_does_not_know_is_a_409_and_leaves_nothing(plugin):
    client, links, netns_dir, kv, prefix = plugin
    vni = 9200000 + secrets.randbelow(100000)
    foreign = f"vxt-{secrets.token_hex(4)}"  # not a name of ours, so nothing of vxnet's sweeps it
    subprocess.run(["ip", "link", "add", foreign, "type", "vxlan", "id", str(vni), "local", "127.0.0.1",
                    "dstport", "4789"], check=True)
    try:
        taken, free = secrets.token_hex(32), secrets.token_hex(32)
        status, reply = call(client, "/NetworkDriver.CreateNetwork", create_body(taken, vni))
        assert status == 409, reply
        assert reply["Err"].startswith(f"option vni: VNI {vni} is already used by another VXLAN device")
        assert reply["Error"] == reply["Err"]
        assert everything_in(netns_dir) == [] and kv.get_prefix(prefix + "/")[0] == []
        assert not links.link_exists(None, names.vxlan_staging(vni))
        # Positive control: the next VNI is free, and the same call builds the network.
        assert call(client, "/NetworkDriver.CreateNetwork", create_body(free, vni + 1)) == (200, {})
        assert everything_in(netns_dir) == [names.netns(free)]
        assert links.link_info(names.netns(free), names.VXLAN)["vni"] == vni + 1
        assert call(client, "/NetworkDriver.DeleteNetwork", {"NetworkID": free}) == (200, {})
        assert everything_in(netns_dir) == [] and kv.get_prefix(prefix + "/")[0] == []
    finally:
        subprocess.run(["ip", "link", "del", foreign], check=False)
