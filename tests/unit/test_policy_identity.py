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
from netdriver.service_ports import ServicePorts, ServicePortsWatcher
from netdriver.store import NetworkStore
from netdriver.underlay import Underlay
from plugin.endpoint_identity import IdentityWriter, NotManager, exposed_of, identity_of, service_ports_of
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
    """dockerd as the writer sees it: containers to inspect, an event stream per subscription, and an outage; and,
    when manager is True, the Swarm services it describes (a worker, or an engine in no Swarm, answers 503)."""

    def __init__(self):
        self.containers: Dict[str, dict] = {}
        self.services_: Dict[str, dict] = {}
        self.manager = False
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

    def running(self, service_id: str = "") -> List[str]:
        if not self.up:
            raise ConnectionError("connection refused")
        return [cid for cid, c in self.containers.items() if c["State"]["Running"] and
                (not service_id or c["Config"]["Labels"].get("com.docker.swarm.service.id") == service_id)]

    def services(self) -> List[dict]:
        if not self.manager:
            raise NotManager("This node is not a swarm manager.")
        return list(self.services_.values())

    def service(self, service_id: str) -> Optional[dict]:
        if not self.manager:
            raise NotManager("This node is not a swarm manager.")
        return self.services_.get(service_id)

    def publish(self, service_id: str, name: str, ports: List[dict], version: int, emit: str = "") -> None:
        """A service as GET /services describes it (Spec.EndpointSpec.Ports), and its event (create/update)."""
        self.services_[service_id] = {"ID": service_id, "Version": {"Index": version},
                                      "Spec": {"Name": name, "EndpointSpec": {"Mode": "vip", "Ports": ports}}}
        if emit:
            self.emit({"Type": "service", "Action": emit, "Actor": {"ID": service_id, "Attributes": {"name": name}}})

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


# -- the ports a Swarm service publishes (netdriver/service_ports.py) ------------------------------------------------

SID = "0123456789abcdefghijklmno"  # a Swarm service ID: 25 lowercase letters and digits
SID2 = "zyxwvutsrqponmlkjihgfedcb"
SERVICE_KEY = f"{schema.PREFIX}/services/{SID}"
INGRESS_80 = {"Protocol": "tcp", "TargetPort": 80, "PublishedPort": 8080, "PublishMode": "ingress"}


def stored(kv: FakeKV, service_id: str = SID) -> Optional[dict]:
    entry = kv.get(f"{schema.PREFIX}/services/{service_id}")
    return json.loads(entry.value) if entry else None


def exposed(kv: FakeKV, eid: str = EID) -> Optional[List[str]]:
    record = peer(kv, eid)
    return record.exposed if record else None


def test_service_ports_of_reads_every_publish_mode_and_leaves_out_what_cannot_be_policed():
    service = {"ID": SID, "Version": {"Index": 41}, "Spec": {"EndpointSpec": {"Ports": [
        INGRESS_80,
        {"Protocol": "udp", "TargetPort": 53, "PublishedPort": 53, "PublishMode": "host"},
        {"Protocol": "sctp", "TargetPort": 7002, "PublishMode": "ingress"},
        {"TargetPort": 443},  # no Protocol: swarmkit's default, tcp
        {"Protocol": "tcp", "TargetPort": 80, "PublishedPort": 8081},  # twice: once
        {"Protocol": "icmp", "TargetPort": 1}, {"Protocol": "tcp", "TargetPort": 0},
        {"Protocol": "tcp", "TargetPort": 65536}, {"Protocol": "tcp", "TargetPort": "22"},
        {"Protocol": "tcp", "TargetPort": True}, {"Protocol": "tcp"}, "80/tcp", None]}}}
    assert service_ports_of(service) == (41, ["53/udp", "80/tcp", "443/tcp", "7002/sctp"])
    assert service_ports_of({"ID": SID, "Version": {"Index": 3}, "Spec": {}}) == (3, [])  # nothing published
    assert service_ports_of({"Spec": {"EndpointSpec": {"Ports": {"80": {}}}}}) == (-1, [])


def test_service_ports_keys_keep_the_newest_version_and_a_replay_writes_nothing():
    kv = FakeKV()
    ports = ServicePorts(kv)
    assert ports.put(SID, 5, ["80/tcp"]) == "written"
    assert stored(kv) == {"version": 5, "ports": ["80/tcp"]}
    revision = kv.rev
    assert ports.put(SID, 5, ["80/tcp"]) == "unchanged"  # another manager writing the same
    assert ports.put(SID, 4, ["9999/tcp"]) == "unchanged"  # a manager that read the service before an update
    assert kv.rev == revision and ports.ports(SID) == ["80/tcp"]
    assert ports.put(SID, 6, ["443/tcp", "80/tcp", "53/udp"]) == "written"
    assert ports.ports(SID) == ["53/udp", "80/tcp", "443/tcp"]
    found, _ = ports.listing()
    assert list(found) == [SID]
    assert not ports.remove(SID, found[SID] - 1)  # written since the listing: it stays
    assert ports.remove(SID, found[SID]) and stored(kv) is None
    assert ports.ports(SID) == [] and ports.put(SID, 1, []) == "written" and ports.ports(SID) == []


@pytest.mark.parametrize("service_id,version,port_list,message", [
    ("../../peers/x", 1, ["80/tcp"], "service ID: '../../peers/x' is not a Swarm ID"),
    (SID.upper(), 1, ["80/tcp"], "service ID: "),
    (SID, -1, ["80/tcp"], f"service {SID} Version.Index: -1 is not a version"),
    (SID, True, ["80/tcp"], f"service {SID} Version.Index: True is not a version"),
    (SID, 1, ["80/tcp", "80/icmp"], f"service {SID} ports[1]: '80/icmp' is not a port"),
    (SID, 1, ["0/tcp"], f"service {SID} ports[0]: '0/tcp' is not a port"),
])
def test_a_bad_service_key_is_refused_naming_the_field_and_nothing_is_written(service_id, version, port_list,
                                                                              message):
    kv = FakeKV()
    with pytest.raises(InvalidRequest) as err:
        ServicePorts(kv).put(service_id, version, port_list)
    assert str(err.value).startswith(message)
    assert kv.keys() == []


def test_unreadable_keys_and_untrusted_ids_expose_nothing():
    kv = FakeKV()
    kv.put(SERVICE_KEY, "not json")
    kv.put(f"{schema.PREFIX}/services/{SID2}", json.dumps({"version": 2, "ports": ["80/tcp", "x/tcp", 7]}))
    ports = ServicePorts(kv)
    assert ports.ports(SID) == [] and ports.ports(SID2) == ["80/tcp"]
    assert ports.ports("../x") == [] and ports.ports("") == []
    assert ports.put(SID, 1, ["80/tcp"]) == "written"  # any version replaces what cannot be read


@pytest.fixture
def swarm_setup():
    """A host's driver, its identity writer and its service ports watch over one FakeKV, as plugin/main.py wires
    them; the engine is a worker until the test makes it a manager."""
    drv, kv = make()
    network(drv)
    engine = FakeEngine()
    ports = ServicePorts(kv)
    writer = IdentityWriter(engine.connect, drv, where="fake", backoff=(0.01, 0.05), services=ports)
    watcher = ServicePortsWatcher(kv, ports, writer.service_changed, max_backoff=0.05)
    yield drv, kv, engine, writer, watcher
    watcher.stop()
    writer.stop()


def task(engine: FakeEngine, cid: str = CID, eid: str = EID, service_id: str = SID, exposed_ports=None,
         emit: bool = True) -> None:
    engine.run(cid, f"web.1.{cid[:6]}", {NID: eid}, {"com.docker.swarm.service.name": "web",
                                                     "com.docker.swarm.service.id": service_id}, emit=emit)
    if exposed_ports:
        engine.containers[cid]["Config"]["ExposedPorts"] = {p: {} for p in exposed_ports}


def test_a_manager_writes_its_services_ports_and_removes_the_gone_ones_at_resync(swarm_setup):
    drv, kv, engine, writer, watcher = swarm_setup
    engine.manager = True
    engine.publish(SID, "web", [INGRESS_80, {"Protocol": "icmp", "TargetPort": 1}], version=12)
    engine.publish(SID2, "db", [], version=3)
    gone = "gonegonegonegonegonegone1"
    ServicePorts(kv).put(gone, 7, ["22/tcp"])  # a service removed while no manager's plugin ran
    writer.start()
    wait_until(lambda: stored(kv, gone) is None, 5, "the gone service's key removed")
    wait_until(writer.idle, 5, "the writer to finish")
    assert writer.manager is True
    assert stored(kv) == {"version": 12, "ports": ["80/tcp"]}  # icmp left out
    assert stored(kv, SID2) == {"version": 3, "ports": []}


def test_a_manager_follows_service_events(swarm_setup):
    drv, kv, engine, writer, watcher = swarm_setup
    engine.manager = True
    writer.start()
    wait_until(lambda: writer.connects == 1 and writer.idle(), 5, "the first resync")
    engine.publish(SID, "web", [INGRESS_80], version=20, emit="create")
    wait_until(lambda: stored(kv) == {"version": 20, "ports": ["80/tcp"]}, 5, "the created service's key")
    engine.publish(SID, "web", [INGRESS_80, {"Protocol": "udp", "TargetPort": 53}], version=21, emit="update")
    wait_until(lambda: stored(kv) == {"version": 21, "ports": ["53/udp", "80/tcp"]}, 5, "the updated ports")
    del engine.services_[SID]
    engine.emit({"Type": "service", "Action": "remove", "Actor": {"ID": SID, "Attributes": {"name": "web"}}})
    wait_until(lambda: stored(kv) is None, 5, "the removed service's key gone")


def test_a_worker_writes_no_keys_and_removes_none_but_merges_the_managers_into_its_task(swarm_setup):
    drv, kv, engine, writer, watcher = swarm_setup
    ServicePorts(kv).put(SID, 9, ["80/tcp"])  # the manager's plugin wrote it
    ServicePorts(kv).put(SID2, 4, ["22/tcp"])  # another service: none of its tasks here
    joined(drv, exposed=[{"Proto": 6, "Port": 5432}])  # a mode=host port, in CreateEndpoint's options
    task(engine, exposed_ports=["5432/tcp"], emit=False)
    writer.start()
    watcher.start()
    wait_until(lambda: identity(kv) is not None, 5, "the task's identity")
    wait_until(writer.idle, 5, "the writer to finish")
    assert writer.manager is False
    assert exposed(kv) == ["80/tcp", "5432/tcp"]
    assert stored(kv) == {"version": 9, "ports": ["80/tcp"]} and stored(kv, SID2) == {"version": 4, "ports": ["22/tcp"]}
    # The service's event never reaches a worker's engine; were one to come, the engine still refuses: no write.
    engine.emit({"Type": "service", "Action": "remove", "Actor": {"ID": SID}})
    wait_until(writer.idle, 5, "the event handled")
    assert stored(kv) is not None


def test_a_key_written_after_the_task_published_re_queues_the_task(swarm_setup):
    """The task on this host published its identity before any manager wrote its service's key (or while the key
    said nothing): the watch's event re-queues this host's running tasks of that service only."""
    drv, kv, engine, writer, watcher = swarm_setup
    joined(drv)
    joined(drv, EID2, "10.1.0.6/24")
    writer.start()
    watcher.start()
    wait_until(lambda: watcher.synced.is_set() and writer.connects == 1, 5, "both subscriptions")
    task(engine)
    task(engine, CID2, EID2, SID2)  # another service's task: not re-queued by SID's key
    wait_until(lambda: identity(kv) is not None and identity(kv, EID2) is not None, 5, "both identities")
    wait_until(writer.idle, 5, "the writer to finish")
    assert exposed(kv) == [] and exposed(kv, EID2) == []
    inspects = engine.inspects
    ServicePorts(kv).put(SID, 1, ["80/tcp"])
    wait_until(lambda: exposed(kv) == ["80/tcp"], 5, "the service's port in its task's record")
    wait_until(writer.idle, 5, "the writer to finish")
    assert engine.inspects == inspects + 1  # the one task of SID, not SID2's
    assert exposed(kv, EID2) == []
    ServicePorts(kv).put(SID, 2, ["80/tcp", "443/tcp"])  # a service update adding a port
    wait_until(lambda: exposed(kv) == ["80/tcp", "443/tcp"], 5, "the added port in the record")


def test_bad_service_labels_and_ports_are_left_out_and_the_identity_still_published(swarm_setup):
    drv, kv, engine, writer, watcher = swarm_setup
    engine.manager = True
    engine.publish(SID, "web", [{"Protocol": "tcp", "TargetPort": 99999}, INGRESS_80], version=3)
    engine.publish("NOT-A-SWARM-ID/..", "evil", [INGRESS_80], version=3)
    joined(drv)
    joined(drv, EID2, "10.1.0.6/24")
    task(engine, emit=False)
    task(engine, CID2, EID2, "../../peers", emit=False)
    writer.start()
    wait_until(lambda: identity(kv) is not None and identity(kv, EID2) is not None, 5, "both identities")
    wait_until(writer.idle, 5, "the writer to finish")
    assert exposed(kv) == ["80/tcp"] and exposed(kv, EID2) == []
    assert [k for k in kv.keys() if "/services/" in k] == [SERVICE_KEY]


def test_an_etcd_outage_keeps_what_is_in_force_and_the_ports_arrive_after(swarm_setup):
    drv, kv, engine, writer, watcher = swarm_setup
    ServicePorts(kv).put(SID, 1, ["80/tcp"])
    joined(drv)
    writer.start()
    wait_until(lambda: writer.connects == 1 and writer.idle(), 5, "the first resync")
    kv.unavailable = True
    task(engine)
    wait_until(lambda: engine.inspects >= 2, 5, "attempts during the outage")  # retried, not published without
    kv.unavailable = False
    wait_until(lambda: exposed(kv) == ["80/tcp"], 5, "the ports after the outage")
    # A plugin restart: a new writer, the same records; the replay writes nothing and takes nothing away.
    writer.stop()
    revision = kv.rev
    again = IdentityWriter(engine.connect, drv, where="fake", backoff=(0.01, 0.05), services=ServicePorts(kv))
    again.start()
    try:
        wait_until(lambda: again.connects == 1 and again.idle() and engine.inspects >= 3, 5, "the restart's resync")
        assert kv.rev == revision and exposed(kv) == ["80/tcp"]
    finally:
        again.stop()


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
