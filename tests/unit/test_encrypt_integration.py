"""`-o encrypted` through the network driver and the peer sync, over fakes: refused at once where encryption
cannot work, the MTU leaves room for ESP, and the encryption manager is told which VTEPs each encrypted segment
reaches. (The data path itself is checked in the guest: tests/ipsec.)"""

import json

import pytest

from kernel.mtu import inner_mtu
from netdriver.driver import NetworkDriver
from netdriver.models import Network, PeerRecord, Subnet
from netdriver.options import parse
from netdriver.peerdb import PeerDB
from netdriver.store import NetworkStore
from netdriver.underlay import Underlay
from netdriver.watcher import PeerSync
from tests.fakes import FakeDataPlane, FakeEncryption, FakeKV
from wire import protocol as p
from wire.errors import Conflict, EncryptionUnavailable, InvalidOption, KernelError

NID = "c" * 64


def create_req(generic, nid=NID):
    return p.CreateNetworkRequest.decode({
        "NetworkID": nid, "Options": {"com.docker.network.generic": generic},
        "IPv4Data": [{"AddressSpace": "vxnet-local", "Pool": "10.9.0.0/24", "Gateway": "10.9.0.1/24"}],
        "IPv6Data": None})


def make(encryption, kv=None, host="h1"):
    kv, plane = kv or FakeKV(), FakeDataPlane()
    driver = NetworkDriver(NetworkStore(kv), plane, host, "local", Underlay(lambda a: 1500, "192.0.2.1"),
                           encryption=encryption)
    return driver, kv, plane


def test_the_option_parses_as_a_boolean():
    assert parse({"com.docker.network.generic": {"encrypted": ""}}).encrypted
    assert not parse({"com.docker.network.generic": {"encrypted": "false"}}).encrypted
    assert not parse({}).encrypted
    with pytest.raises(InvalidOption, match="encrypted"):
        parse({"com.docker.network.generic": {"encrypted": "maybe"}})


@pytest.mark.parametrize("encryption, error, needle", [
    (None, InvalidOption, "no cluster secret"),
    (FakeEncryption("this kernel cannot encrypt VXLAN with IPsec ESP ... esp4"), EncryptionUnavailable, "esp4"),
])
def test_an_encrypted_network_that_cannot_be_is_refused_before_anything_is_made(encryption, error, needle):
    driver, kv, plane = make(encryption)
    with pytest.raises(error, match=needle):
        driver.create_network(create_req({"encrypted": "true"}))
    assert kv.keys() == [] and plane.networks == {}


@pytest.mark.parametrize("first, second, needle", [
    ({"overlay": "blue", "encrypted": "true"}, {"overlay": "blue"}, "is encrypted .* add -o encrypted"),
    ({"overlay": "blue"}, {"overlay": "blue", "encrypted": "true"}, "is not encrypted .* drop -o encrypted"),
])
def test_hosts_sharing_an_overlay_must_agree_on_encryption(first, second, needle):
    kv = FakeKV()
    h1, _, _ = make(FakeEncryption(), kv, "h1")
    h2, _, plane2 = make(FakeEncryption(), kv, "h2")
    h1.create_network(create_req(first))
    before = dict(kv.data)
    with pytest.raises(Conflict, match=f"option encrypted: overlay overlay-blue {needle}"):
        h2.create_network(create_req(second, nid="d" * 64))
    assert kv.data == before and plane2.networks == {}  # refused before anything was written or built
    h2.create_network(create_req(first, nid="d" * 64))  # agreeing, it joins
    assert h2.store.get_network("d" * 64).vni == h1.store.get_network(NID).vni


@pytest.mark.parametrize("encryption, error, needle", [
    (None, InvalidOption, "no cluster secret"),
    (FakeEncryption("this kernel cannot encrypt VXLAN with IPsec ESP ... esp4"), EncryptionUnavailable, "esp4"),
])
def test_the_swarm_manager_refuses_an_encrypted_network_that_cannot_be(encryption, error, needle):
    manager, kv, _ = make(encryption)
    with pytest.raises(error, match=needle):
        manager.allocate_network(p.CreateNetworkRequest.decode(
            {"NetworkID": NID, "Options": {"encrypted": "true"}, "IPv4Data": []}))
    assert kv.keys() == []


def test_a_swarm_network_keeps_its_encryption_for_every_worker():
    kv = FakeKV()
    manager, _, _ = make(FakeEncryption(), kv, "m")
    reply = manager.allocate_network(p.CreateNetworkRequest.decode(
        {"NetworkID": NID, "Options": {"overlay": "blue", "encrypted": "true"}, "IPv4Data": []}))
    assert reply["Options"]["encrypted"] == "true"
    with pytest.raises(Conflict, match="option encrypted"):
        manager.allocate_network(p.CreateNetworkRequest.decode(
            {"NetworkID": "d" * 64, "Options": {"overlay": "blue"}, "IPv4Data": []}))


def test_an_encrypted_network_is_recorded_with_room_for_esp():
    encryption = FakeEncryption()
    driver, kv, plane = make(encryption)
    driver.create_network(create_req({"encrypted": "true"}))
    network = driver.store.get_network(NID)
    assert network.encrypted and network.mtu == inner_mtu(1500) == 1416 and encryption.firewall
    assert Network.from_json(network.to_json()) == network
    old = json.loads(network.to_json())
    del old["encrypted"]
    assert not Network.from_json(json.dumps(old)).encrypted  # records written before the field: unencrypted


def test_peer_sync_tells_the_manager_which_vteps_a_segment_reaches():
    encryption = FakeEncryption()
    sync = PeerSync(PeerDB("h1"), FakeDataPlane(), encryption)
    net = Network(id=NID, vni=5, mtu=1416, internal=False, subnets=[Subnet("10.9.0.0/24", None)], encrypted=True)
    clear = Network(id="d" * 64, vni=6, mtu=1450, internal=False, subnets=[Subnet("10.8.0.0/24", None)])
    sync.dataplane.ensure_network(net)
    sync.dataplane.ensure_network(clear)
    sync.network_up(net)
    sync.network_up(clear)
    record = PeerRecord(network_id=NID, endpoint_id="e1", ip="10.9.0.2", mac="02:42:0a:09:00:02",
                        vtep="192.0.2.2", host="h2")
    sync.resync([(NID, 3, record), (clear.id, 4, PeerRecord(clear.id, "e2", "10.8.0.2", "m", "192.0.2.3", "h3"))])
    assert encryption.holders == {NID: {"192.0.2.2"}}  # the unencrypted network's peer needs no SA
    sync.put(NID, 5, PeerRecord(NID, "e3", "10.9.0.3", "02:42:0a:09:00:03", "192.0.2.4", "h4"))
    assert encryption.holders == {NID: {"192.0.2.2", "192.0.2.4"}}
    sync.network_down(net)
    assert encryption.holders == {}


def test_a_failing_manager_does_not_keep_the_fdb_from_being_programmed():
    class Failing(FakeEncryption):
        def set_peers(self, holder, vteps):
            raise KernelError("encryption: no key ring loaded yet (etcd not read)")

    plane = FakeDataPlane()
    sync = PeerSync(PeerDB("h1"), plane, Failing())
    net = Network(id=NID, vni=5, mtu=1416, internal=False, subnets=[Subnet("10.9.0.0/24", None)], encrypted=True)
    plane.ensure_network(net)
    sync.network_up(net)
    sync.resync([(NID, 3, PeerRecord(NID, "e1", "10.9.0.2", "02:42:0a:09:00:02", "192.0.2.2", "h2"))])
    # Dropped, never in clear, until the ring comes: the manager keeps the wanted peers and programs them then.
    assert plane.peers[NID] == {"10.9.0.2": ("02:42:0a:09:00:02", "192.0.2.2")}
