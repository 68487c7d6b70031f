"""Exposed ports and identities into the peer records: the wire decoder, the driver's guarded identity write, and
the identity writer (plugin/endpoint_identity.py) following a fake engine, over a FakeKV and a FakeDataPlane.
End state in etcd is asserted, not calls."""

import json
import logging
import queue
import threading
from typing import Dict, List, Optional

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from netdriver.driver import NetworkDriver
from netdriver.models import Endpoint, PeerRecord
from netdriver.store import NetworkStore
from netdriver.underlay import Underlay
from plugin.endpoint_identity import IdentityWriter, exposed_of, identity_of
from store import schema
from tests.fakes import FakeDataPlane, FakeKV
from tests.harness.proc import wait_until
from wire import protocol as p
from wire.errors import InvalidRequest

NID = "a" * 64
OTHER_NID = "c" * 64  # a network of another driver (bridge): no vxnet record
EID = "e" * 64
EID2 = "f" * 64
CID = "1" * 64
CID2 = "2" * 64
SANDBOX = "/var/run/docker/netns/0123456789ab"
PEER_KEY = f"{schema.PREFIX}/peers/{NID}/{EID}"


# -- the wire ------------------------------------------------------------------------------------------------------

def endpoint_body(exposed=None, eid=EID, address="10.1.0.5/24"):
    options = {"com.docker.network.portmap": []}
    if exposed is not None:
        options[p.EXPOSED_PORTS] = exposed
    return {"NetworkID": NID, "EndpointID": eid, "Interface": {"Address": address, "MacAddress": ""},
            "Options": options}


def test_exposed_ports_decode_as_dockerd_sends_them():
    """The Options of `docker run --expose 80 --expose 53/udp -p 8080:80` from dockerd 20.10, as logged."""
    req = p.CreateEndpointRequest.decode(endpoint_body([{"Proto": 6, "Port": 80}, {"Proto": 17, "Port": 53}]))
    assert [str(x) for x in req.exposed] == ["53/udp", "80/tcp"]
    image = p.CreateEndpointRequest.decode(endpoint_body(
        [{"Proto": 132, "Port": 7002}, {"Proto": 17, "Port": 7001}, {"Proto": 6, "Port": 7000}]))
    assert [str(x) for x in image.exposed] == ["7000/tcp", "7001/udp", "7002/sctp"]
    for nothing in (None, [], ):
        assert p.CreateEndpointRequest.decode(endpoint_body(nothing)).exposed == ()
    null = endpoint_body()
    null["Options"][p.EXPOSED_PORTS] = None  # Go's nil slice
    assert p.CreateEndpointRequest.decode(null).exposed == ()


@pytest.mark.parametrize("exposed,message", [
    ({"Proto": 6, "Port": 80}, f"Options.{p.EXPOSED_PORTS}: expected a list, got an object"),
    (["80/tcp"], f"Options.{p.EXPOSED_PORTS}[0]: expected an object, got a string"),
    ([{"Proto": 1, "Port": 80}], f"Options.{p.EXPOSED_PORTS}[0].Proto: 1 is not a protocol"),
    ([{"Proto": 6, "Port": 80}, {"Proto": "tcp", "Port": 80}],
     f"Options.{p.EXPOSED_PORTS}[1].Proto: expected a number, got a string"),
    ([{"Proto": 6, "Port": 0}], f"Options.{p.EXPOSED_PORTS}[0].Port: 0 is not a port (1-65535)"),
    ([{"Proto": 6, "Port": 65536}], f"Options.{p.EXPOSED_PORTS}[0].Port: 65536 is not a port (1-65535)"),
    ([{"Proto": 6, "Port": 80.5}], f"Options.{p.EXPOSED_PORTS}[0].Port: expected an integer, got a number"),
    ([{"Proto": 6, "Port": True}], f"Options.{p.EXPOSED_PORTS}[0].Port: expected an integer, got a boolean"),
    ([{"Proto": 6}], f"Options.{p.EXPOSED_PORTS}[0].Port: missing"),
])
def test_bad_exposed_ports_are_refused_naming_the_field(exposed, message):
    with pytest.raises(InvalidRequest) as err:
        p.CreateEndpointRequest.decode(endpoint_body(exposed))
    assert str(err.value).startswith(message)


@given(st.lists(st.tuples(st.sampled_from([6, 17, 132]), st.integers(1, 65535)), max_size=20))
def test_exposed_ports_are_sorted_unique_text(ports):
    req = p.CreateEndpointRequest.decode(endpoint_body([{"Proto": proto, "Port": port} for proto, port in ports]))
    names = {6: "tcp", 17: "udp", 132: "sctp"}
    assert [str(x) for x in req.exposed] == [f"{port}/{proto}" for port, proto in
                                             sorted({(port, names[proto]) for proto, port in ports})]


# -- the records ---------------------------------------------------------------------------------------------------

def make(kv: Optional[FakeKV] = None, lease: int = 0):
    kv = kv or FakeKV()
    drv = NetworkDriver(NetworkStore(kv), FakeDataPlane(), "h1", "local", Underlay(lambda a: 1500, "192.0.2.1"),
                        lease_id=lambda: lease)
    return drv, kv


def network(drv: NetworkDriver) -> None:
    drv.create_network(p.CreateNetworkRequest.decode({
        "NetworkID": NID, "Options": {"com.docker.network.generic": {}},
        "IPv4Data": [{"AddressSpace": "vxnet-local", "Pool": "10.1.0.0/24", "Gateway": "10.1.0.1/24"}]}))


def joined(drv: NetworkDriver, eid: str = EID, address: str = "10.1.0.5/24", exposed=None) -> None:
    drv.create_endpoint(p.CreateEndpointRequest.decode(endpoint_body(exposed, eid, address)))
    drv.join(p.JoinRequest.decode({"NetworkID": NID, "EndpointID": eid, "SandboxKey": SANDBOX}))


def peer(kv: FakeKV, eid: str = EID) -> Optional[PeerRecord]:
    entry = kv.get(f"{schema.PREFIX}/peers/{NID}/{eid}")
    return PeerRecord.from_json(entry.value) if entry else None


WEB = {"container": "web1", "service": "web", "labels": {"role": "client"}}


def test_create_endpoint_and_join_record_the_exposed_ports():
    drv, kv = make()
    network(drv)
    joined(drv, exposed=[{"Proto": 6, "Port": 5432}, {"Proto": 17, "Port": 53}])
    assert drv.store.get_endpoint(NID, EID).exposed == ["53/udp", "5432/tcp"]
    record = peer(kv)
    assert record.exposed == ["53/udp", "5432/tcp"] and record.identity is None  # unknown until the writer runs


def test_records_from_before_exposed_and_identity_still_load():
    ep = Endpoint.from_json('{"network_id": "n", "id": "e", "ip": "10.0.0.2/24", "mac": "m", "host": "h", '
                            '"ip6": ""}')
    assert ep.exposed == []
    old = PeerRecord.from_json('{"network_id": "n", "endpoint_id": "e", "ip": "10.0.0.2", "mac": "m", '
                               '"vtep": "192.0.2.1", "host": "h"}')
    assert old.exposed == [] and old.identity is None
    new = PeerRecord.from_json(json.dumps({**json.loads(old.to_json()), "exposed": ["80/tcp"], "identity": WEB}))
    assert new.exposed == ["80/tcp"] and new.identity == WEB


def test_publish_identity_writes_it_under_the_lease_and_a_replay_writes_nothing():
    drv, kv = make(lease=4242)
    network(drv)
    joined(drv, exposed=[{"Proto": 6, "Port": 80}])
    first = drv.publish_identity(NID, EID, WEB)
    assert first.outcome == "written" and first.since_join is not None and first.since_join >= 0
    record = peer(kv)
    assert record.identity == WEB and record.exposed == ["80/tcp"] and record.ip == "10.1.0.5"
    assert kv.get(PEER_KEY).lease == 4242
    revision = kv.rev
    again = drv.publish_identity(NID, EID, dict(WEB))
    assert again.outcome == "unchanged" and kv.rev == revision


def test_publish_identity_skips_what_is_not_a_joined_vxnet_endpoint_of_this_host():
    drv, kv = make()
    network(drv)
    joined(drv)
    before = dict(kv.data)
    assert drv.publish_identity(OTHER_NID, EID, WEB).outcome == "absent"  # another driver's network
    assert drv.publish_identity(NID, EID2, WEB).outcome == "absent"  # created, never joined: no record
    assert drv.publish_identity("../../x", EID, WEB).outcome == "absent"  # never reaches a key
    assert drv.publish_identity(NID, "E" * 64, WEB).outcome == "absent"
    kv.put(f"{schema.PREFIX}/peers/{NID}/{EID2}", PeerRecord(NID, EID2, "10.1.0.9", "m", "192.0.2.2", "h2")
           .to_json())  # another host's endpoint: not ours to name
    assert drv.publish_identity(NID, EID2, WEB).outcome == "absent"
    assert peer(kv, EID2).identity is None
    del kv.data[f"{schema.PREFIX}/peers/{NID}/{EID2}"]
    assert kv.data == before


def test_a_leave_between_the_read_and_the_write_wins():
    """The record is deleted by a Leave after publish_identity read it: the guarded write fails, the retry finds
    no record, and nothing brings the departed endpoint back. Control: the same write without a Leave lands."""
    drv, kv = make()
    network(drv)
    joined(drv)
    joined(drv, EID2, "10.1.0.6/24")
    kv.cut_in = lambda: drv.leave(p.EndpointRequest.decode({"NetworkID": NID, "EndpointID": EID}))
    assert drv.publish_identity(NID, EID, WEB).outcome == "absent"
    assert peer(kv) is None
    assert drv._identities == {}  # nothing kept for a later rewrite to resurrect
    drv.delete_endpoint(p.EndpointRequest.decode({"NetworkID": NID, "EndpointID": EID}))
    drv.republish_peers()  # the republish after a new lease: still gone
    assert peer(kv) is None
    assert drv.publish_identity(NID, EID2, WEB).outcome == "written" and peer(kv, EID2).identity == WEB


def test_rewrites_of_the_record_keep_the_identity():
    """A replayed Join, a republish under a new lease, and a restarted plugin's republish (empty memory: the
    identity comes from the record it rewrites) all keep the published identity."""
    drv, kv = make()
    network(drv)
    joined(drv)
    drv.publish_identity(NID, EID, WEB)
    drv.join(p.JoinRequest.decode({"NetworkID": NID, "EndpointID": EID, "SandboxKey": SANDBOX}))
    assert peer(kv).identity == WEB
    drv.republish_peers()
    assert peer(kv).identity == WEB
    restarted, _ = make(kv, lease=7)
    restarted.dataplane = drv.dataplane  # the same kernel: the endpoint's veth is still there
    restarted.republish_peers()
    assert peer(kv).identity == WEB and kv.get(PEER_KEY).lease == 7


def test_the_containers_exposed_ports_join_those_of_create_endpoint_and_survive_rewrites():
    """dockerd 20.10 sends exposedports only with a container's first network (Options {} on the others): the
    identity writer's read of Config.ExposedPorts fills them in; a replay writes nothing; a replayed Join, a
    republish and a restarted plugin's republish keep them; Leave forgets them."""
    drv, kv = make()
    network(drv)
    joined(drv)  # CreateEndpoint without the option, as on a second network
    assert peer(kv).exposed == []
    assert drv.publish_identity(NID, EID, WEB, ["5432/tcp", "53/udp"]).outcome == "written"
    assert peer(kv).exposed == ["53/udp", "5432/tcp"] and peer(kv).identity == WEB
    revision = kv.rev
    assert drv.publish_identity(NID, EID, dict(WEB), ["53/udp", "5432/tcp"]).outcome == "unchanged"
    assert kv.rev == revision
    drv.join(p.JoinRequest.decode({"NetworkID": NID, "EndpointID": EID, "SandboxKey": SANDBOX}))
    drv.republish_peers()
    assert peer(kv).exposed == ["53/udp", "5432/tcp"]
    restarted, _ = make(kv, lease=7)
    restarted.dataplane = drv.dataplane
    restarted.republish_peers()
    assert peer(kv).exposed == ["53/udp", "5432/tcp"]
    drv.leave(p.EndpointRequest.decode({"NetworkID": NID, "EndpointID": EID}))
    assert drv._exposed == {}

    # Merged with CreateEndpoint's, sorted by port then protocol, without duplicates.
    drv2, kv2 = make()
    network(drv2)
    joined(drv2, exposed=[{"Proto": 6, "Port": 80}])
    drv2.publish_identity(NID, EID, WEB, ["80/tcp", "7/udp"])
    assert peer(kv2).exposed == ["7/udp", "80/tcp"]


def test_exposed_of_reads_config_exposed_ports():
    container = {"Config": {"ExposedPorts": {"5432/tcp": {}, "53/udp": {}, "9/sctp": {}, "80": {},
                                             "1000-1001/tcp": {}, "0/tcp": {}, "70000/udp": {}, "1/icmp": {}}}}
    assert exposed_of(container) == ["9/sctp", "53/udp", "80/tcp", "5432/tcp"]
    assert exposed_of({"Config": {"ExposedPorts": None}}) == [] == exposed_of({})


def test_leave_and_delete_endpoint_forget_the_identity():
    drv, kv = make()
    network(drv)
    joined(drv)
    drv.publish_identity(NID, EID, WEB)
    drv.leave(p.EndpointRequest.decode({"NetworkID": NID, "EndpointID": EID}))
    drv.delete_endpoint(p.EndpointRequest.decode({"NetworkID": NID, "EndpointID": EID}))
    assert peer(kv) is None and drv._identities == {} and drv._joined_at == {}


# -- the identity writer over a fake engine ------------------------------------------------------------------------

class FakeEngine:
    """dockerd as the writer sees it: containers to inspect, an event stream per subscription, and an outage."""

    def __init__(self):
        self.containers: Dict[str, dict] = {}
        self.up = True
        self.streams: List["FakeStream"] = []
        self.inspects = 0
        self.lock = threading.Lock()

    def connect(self) -> "FakeEngine":
        if not self.up:
            raise ConnectionError("Error while fetching server API version: connection refused")
        return self

    def events(self) -> "FakeStream":
        if not self.up:
            raise ConnectionError("connection refused")
        stream = FakeStream()
        self.streams.append(stream)
        return stream

    def running(self) -> List[str]:
        if not self.up:
            raise ConnectionError("connection refused")
        return [cid for cid, c in self.containers.items() if c["State"]["Running"]]

    def inspect(self, cid: str) -> Optional[dict]:
        if not self.up:
            raise ConnectionError("connection refused")
        with self.lock:
            self.inspects += 1
        return self.containers.get(cid)

    def emit(self, event: dict) -> None:
        self.streams[-1].events.put(event)

    def stop(self) -> None:
        """dockerd goes away: the open stream ends, new connections are refused."""
        self.up = False
        for stream in self.streams:
            stream.close()

    def run(self, cid: str, name: str, endpoints: Dict[str, str], labels: Optional[Dict[str, str]] = None,
            emit: bool = True) -> None:
        self.containers[cid] = {
            "Id": cid, "Name": "/" + name, "State": {"Running": True},
            "Config": {"Labels": labels or {}},
            "NetworkSettings": {"Networks": {f"net{i}": {"NetworkID": nid, "EndpointID": eid}
                                             for i, (nid, eid) in enumerate(endpoints.items())}}}
        if emit:
            self.emit({"Type": "container", "Action": "start", "id": cid, "Actor": {"ID": cid}})


class FakeStream:
    def __init__(self):
        self.events: "queue.Queue[Optional[dict]]" = queue.Queue()

    def __iter__(self):
        while True:
            event = self.events.get()
            if event is None:
                return
            yield event

    def close(self) -> None:
        self.events.put(None)


@pytest.fixture
def setup():
    drv, kv = make()
    network(drv)
    engine = FakeEngine()
    writers: List[IdentityWriter] = []

    def writer() -> IdentityWriter:
        w = IdentityWriter(engine.connect, drv, where="fake", backoff=(0.01, 0.05))
        writers.append(w)
        w.start()
        return w

    yield drv, kv, engine, writer
    for w in writers:
        w.stop()


def identity(kv: FakeKV, eid: str = EID) -> Optional[dict]:
    record = peer(kv, eid)
    return record.identity if record else None


def histogram_count() -> float:
    return REGISTRY.get_sample_value("vxnet_identity_seconds_count") or 0.0


def test_identity_of_reads_name_service_and_labels():
    container = {"Name": "/stack_db.1.xyz", "Config": {"Labels": {
        "com.docker.swarm.service.name": "stack_db", "com.docker.compose.service": "db", "role": "db"}},
        "NetworkSettings": {"Networks": {"n": {"NetworkID": NID, "EndpointID": EID},
                                         "none-yet": {"NetworkID": NID, "EndpointID": ""}}}}
    ident, endpoints = identity_of(container)
    assert ident == {"container": "stack_db.1.xyz", "service": "stack_db",
                     "labels": {"com.docker.swarm.service.name": "stack_db", "com.docker.compose.service": "db",
                                "role": "db"}}
    assert endpoints == [(NID, EID)]
    compose, _ = identity_of({"Name": "/p_db_1", "Config": {"Labels": {"com.docker.compose.service": "db"}}})
    assert compose["service"] == "db"
    plain, none = identity_of({"Name": "/web1", "Config": {"Labels": None}, "NetworkSettings": {"Networks": None}})
    assert plain == {"container": "web1", "service": "", "labels": {}} and none == []


def test_a_started_container_gets_its_identity_and_others_networks_are_ignored(setup):
    drv, kv, engine, writer = setup
    joined(drv)
    w = writer()
    wait_until(lambda: engine.streams, 5, "the subscription")
    before = histogram_count()
    engine.run(CID, "web1", {NID: EID, OTHER_NID: EID2}, {"role": "client", "com.docker.compose.service": "web"})
    wait_until(lambda: identity(kv) is not None, 5, "the identity in the record")
    assert identity(kv) == {"container": "web1", "service": "web",
                            "labels": {"role": "client", "com.docker.compose.service": "web"}}
    assert histogram_count() == before + 1  # the Join -> identity window, measured
    wait_until(w.idle, 5, "the writer to finish")
    assert kv.get(f"{schema.PREFIX}/peers/{OTHER_NID}/{EID2}") is None
    assert not [k for k in kv.keys() if OTHER_NID in k]


def test_network_connect_of_a_running_container_publishes_the_new_endpoint(setup):
    drv, kv, engine, writer = setup
    joined(drv)
    writer()
    wait_until(lambda: engine.streams, 5, "the subscription")
    engine.run(CID, "web1", {NID: EID})
    wait_until(lambda: identity(kv) is not None, 5, "the first endpoint's identity")
    joined(drv, EID2, "10.1.0.6/24")  # docker network connect: a second endpoint of the same container
    engine.containers[CID]["NetworkSettings"]["Networks"]["net1"] = {"NetworkID": NID, "EndpointID": EID2}
    engine.emit({"Type": "network", "Action": "connect", "Actor": {"ID": NID, "Attributes": {
        "container": CID, "name": "n", "type": "vxnet"}}})
    wait_until(lambda: identity(kv, EID2) is not None, 5, "the connected endpoint's identity")
    assert identity(kv, EID2)["container"] == "web1"


def test_replayed_events_write_nothing(setup):
    drv, kv, engine, writer = setup
    joined(drv)
    w = writer()
    wait_until(lambda: engine.streams, 5, "the subscription")
    engine.run(CID, "web1", {NID: EID})
    wait_until(lambda: identity(kv) is not None, 5, "the identity")
    wait_until(w.idle, 5, "the writer to finish")
    revision, inspects = kv.rev, engine.inspects
    for _ in range(3):
        engine.emit({"Type": "container", "Action": "start", "Actor": {"ID": CID}})
    wait_until(lambda: engine.inspects >= inspects + 1 and w.idle(), 5, "the replays handled")
    assert kv.rev == revision and identity(kv)["container"] == "web1"


def test_a_container_gone_before_its_identity_is_written_leaves_no_record(setup):
    """die, Leave and destroy come before the writer gets to the container: nothing is resurrected. Control: a
    second container on the same writer gets its identity."""
    drv, kv, engine, writer = setup
    joined(drv)
    joined(drv, EID2, "10.1.0.6/24")
    w = writer()
    wait_until(lambda: engine.streams, 5, "the subscription")
    engine.run(CID, "gone", {NID: EID}, emit=False)
    drv.leave(p.EndpointRequest.decode({"NetworkID": NID, "EndpointID": EID}))
    engine.emit({"Type": "container", "Action": "start", "Actor": {"ID": CID}})  # handled after the Leave
    engine.run(CID2, "web2", {NID: EID2})
    wait_until(lambda: identity(kv, EID2) is not None, 5, "the control's identity")
    wait_until(w.idle, 5, "the writer to finish")
    assert peer(kv) is None


def test_a_dockerd_restart_reconnects_and_resyncs(setup):
    """dockerd goes away; a container starts while it is away (its event is lost); when dockerd is back the
    writer subscribes again and the resync gives the container its identity."""
    drv, kv, engine, writer = setup
    joined(drv)
    w = writer()
    wait_until(lambda: w.connects == 1, 5, "the first subscription")
    engine.stop()
    engine.run(CID, "late", {NID: EID}, emit=False)
    engine.up = True
    wait_until(lambda: w.connects == 2, 5, "the reconnection")
    wait_until(lambda: identity(kv) is not None, 5, "the resynced identity")
    assert identity(kv)["container"] == "late"


def test_an_engine_down_at_start_is_logged_once_and_retried(setup, caplog):
    """The plugin serves meanwhile (the driver's calls do not wait for the engine): a Join publishes its record
    without identity (fail closed); the writer warns once however many attempts fail, then catches up."""
    drv, kv, engine, writer = setup
    engine.up = False
    caplog.set_level(logging.DEBUG, logger="plugin.endpoint_identity")
    w = writer()
    wait_until(lambda: sum("still unreachable" in r.message for r in caplog.records) >= 3, 5, "retries")
    joined(drv)
    assert peer(kv) is not None and identity(kv) is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "cannot be reached" in warnings[0].message
    engine.run(CID, "web1", {NID: EID}, emit=False)
    engine.up = True
    wait_until(lambda: identity(kv) is not None, 5, "the identity once the engine is back")
    assert w.connects == 1


def test_an_etcd_outage_delays_the_identity_and_loses_nothing(setup):
    drv, kv, engine, writer = setup
    joined(drv)
    w = writer()
    wait_until(lambda: engine.streams, 5, "the subscription")
    kv.unavailable = True
    engine.run(CID, "web1", {NID: EID})
    wait_until(lambda: engine.inspects >= 2, 5, "attempts during the outage")  # retried, not dropped
    kv.unavailable = False
    wait_until(lambda: identity(kv) is not None, 5, "the identity after the outage")
    wait_until(w.idle, 5, "the writer to finish")


# -- the setting ---------------------------------------------------------------------------------------------------

def test_the_engine_setting():
    from plugin import config
    from wire.errors import ConfigError
    assert config.load({}).docker_host == "unix:///run/docker.sock"
    assert config.load({"DOCKER_HOST": "unix:///x/docker.sock"}).docker_host == "unix:///x/docker.sock"
    assert config.load({"VXNET_DOCKER_HOST": "unix:///host/run/docker.sock",
                        "DOCKER_HOST": "tcp://127.0.0.1:2375"}).docker_host == "unix:///host/run/docker.sock"
    assert config.load({"VXNET_DOCKER_HOST": "tcp://127.0.0.1:2375"}).docker_host == "tcp://127.0.0.1:2375"
    assert config.load({"VXNET_DOCKER_HOST": "off"}).docker_host is None
    for name, bad in (("VXNET_DOCKER_HOST", "unix://relative.sock"), ("VXNET_DOCKER_HOST", "http://h:1"),
                      ("DOCKER_HOST", "tcp://nohost"), ("DOCKER_HOST", "/run/docker.sock")):
        with pytest.raises(ConfigError) as err:
            config.load({name: bad})
        assert str(err.value).startswith(f"{name}: {bad!r} is not")
