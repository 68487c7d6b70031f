"""Who is behind each of this host's endpoints: the container's name, its service and its labels, read from the
Docker engine and published in the endpoint's peer record (PeerRecord.identity), so that every host can enforce
rules that select sources on other hosts by service, label or container name.

NEVER CALL THE ENGINE FROM A REQUEST HANDLER. dockerd holds the container's lock while it calls the plugin
(CreateEndpoint and Join run inside the container's start, under container.Lock()), and inspecting a container
(GET /containers/<id>/json) takes that same lock: an inspect from Join waits for the Join to return, which waits
for the inspect, a deadlock that stops the container's start and every later call on it. Nothing in the plugin
calls (CreateEndpoint, Join) names the container either: its name, service and labels are in no request. So this
module runs on threads of its own, fed by the engine's event stream:

- events (GET /events, container and network events): `network connect` comes right after an endpoint's Join (its
  record exists), `container start` after all of a container's Joins; either queues the container. At each
  (re)connect, after subscribing (so nothing falls between), every running container is queued too: the resync
  after a plugin restart or a dockerd restart, whose events were missed.
- a writer thread inspects each queued container (the lock is taken only while dockerd is between calls, so at
  worst the inspect waits until the start is done) and maps each of its networks, NetworkSettings.Networks[*]
  {NetworkID, EndpointID}, to the identity: NetworkDriver.publish_identity writes it only into a record that
  exists and is this host's (endpoints of other drivers' networks, and ones already gone, are skipped), with a
  transaction guarded on the record's revision (a Leave in between wins: no departed endpoint comes back) and
  nothing at all when the record already holds it (replays and resyncs are free of writes).

Until an identity is published, the endpoint's record carries identity None and only rules selecting `any`
apply to it (fail closed). If the engine cannot be reached the plugin serves anyway: this logs it once, keeps
retrying with a backoff, and resyncs when it is back. The window Join -> identity in etcd is logged per endpoint
and exported as vxnet_identity_seconds.

Identity, as PeerRecord.identity holds it (netdriver.policy.Identity.to_dict()):
`{"container": "web1", "service": "db", "labels": {"role": "client", ...}}`; service is the Swarm service
(label com.docker.swarm.service.name) or else the Compose service (label com.docker.compose.service), or "".
"""

import logging
import threading
from typing import Callable, Dict, Iterator, List, Optional, Protocol, Sequence, Tuple

from netdriver.driver import IdentityWrite
from telemetry.metrics import ENGINE_UP, IDENTITY_SECONDS
from wire.errors import StoreUnavailable
from wire.protocol import PROTOCOLS, TransportPort

log = logging.getLogger(__name__)

SWARM_SERVICE_LABEL = "com.docker.swarm.service.name"
COMPOSE_SERVICE_LABEL = "com.docker.compose.service"
# The events that can make an identity appear: a container joined a network (the record exists from here on), a
# container started (after all of its Joins). die/destroy/disconnect need nothing here: Leave deletes the record.
_QUEUE_ON = {("container", "start"), ("network", "connect")}
_FORGET_ON = {("container", "die"), ("container", "destroy")}
_RESYNC = ""  # the queue item that stands for "every running container"


class EventStream(Protocol):
    """The engine's events, decoded (`{"Type","Action","Actor":{"ID","Attributes"},...}`); ends or raises when
    the engine goes away; close() from another thread ends it."""

    def __iter__(self) -> Iterator[dict]: ...

    def close(self) -> None: ...


class Engine(Protocol):
    """The slice of the Docker API this module uses (DockerEngine below; a fake in the unit tests)."""

    def events(self) -> EventStream:
        """Subscribe to container and network events from now on; raises if the engine cannot be reached."""
        ...

    def running(self) -> List[str]:
        """IDs of the running containers."""
        ...

    def inspect(self, container_id: str) -> Optional[dict]:
        """GET /containers/<id>/json, None if there is no such container any more."""
        ...


class Publisher(Protocol):
    def publish_identity(self, network_id: str, endpoint_id: str, identity: dict,
                         exposed: Sequence[str] = ()) -> IdentityWrite: ...


def identity_of(container: dict) -> Tuple[dict, List[Tuple[str, str]]]:
    """An inspected container -> (its identity, its endpoints as (NetworkID, EndpointID)). The IDs are not
    trusted here: the driver checks them before they name any key."""
    labels = (container.get("Config") or {}).get("Labels") or {}
    labels = {str(k): str(v) for k, v in labels.items()}
    identity = {
        "container": str(container.get("Name") or "").lstrip("/"),
        "service": labels.get(SWARM_SERVICE_LABEL) or labels.get(COMPOSE_SERVICE_LABEL) or "",
        "labels": labels,
    }
    networks = ((container.get("NetworkSettings") or {}).get("Networks") or {}).values()
    endpoints = [(str(n.get("NetworkID") or ""), str(n.get("EndpointID") or "")) for n in networks
                 if isinstance(n, dict)]
    return identity, [(nid, eid) for nid, eid in endpoints if nid and eid]


def exposed_of(container: dict) -> List[str]:
    """An inspected container's Config.ExposedPorts (`{"5432/tcp": {}, "53/udp": {}}`: the image's EXPOSE,
    --expose, the container ports of -p, Compose expose:/ports:, a Swarm task's mode=host ports) -> ["53/udp",
    "5432/tcp"], sorted by port; what the policy cannot police (another protocol, a range) is left out.

    Why the engine is asked as well as CreateEndpoint: dockerd 20.10 puts the exposed ports in the endpoint options
    of a container's first network only. moby daemon/network.go buildCreateEndpointOptions returns before adding
    them once the container's sandbox has port-mapping information, and the docker_gwbridge endpoint that comes
    with its first (non-internal) vxnet network gives it that; every later network's CreateEndpoint carries
    `Options: {}` (seen on the wire: a Compose service with `expose:` on two networks)."""
    ports = (container.get("Config") or {}).get("ExposedPorts") or {}
    out = set()
    for text in ports if isinstance(ports, dict) else ():
        port, _, proto = str(text).partition("/")
        proto = proto or "tcp"  # the API's own default for a bare port
        if port.isdigit() and 1 <= int(port) <= 65535 and proto in PROTOCOLS.values():
            out.add(TransportPort(int(port), proto))
    return [str(p) for p in sorted(out)]


class IdentityWriter:
    """The two threads described above. engine: builds a client per connection attempt (the docker SDK asks
    the engine its API version when it is built, which fails while dockerd is down)."""

    def __init__(self, engine: Callable[[], Engine], publisher: Publisher, where: str = "",
                 backoff: Tuple[float, float] = (0.5, 30.0)):
        self._connect = engine
        self._publisher = publisher
        self._where = where  # the engine's address, for the logs
        self._backoff = backoff
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._pending: Dict[str, None] = {}  # container ids (or _RESYNC) in arrival order, each once
        self._engine: Optional[Engine] = None
        self._stream: Optional[EventStream] = None
        self._threads: List[threading.Thread] = []
        self._busy = False  # the writer is handling an item (under _cond)
        self.connects = 0  # successful subscriptions (the first one and every reconnect)

    # -- life cycle ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        for name, target in (("identity-events", self._follow), ("identity-writer", self._write)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        stream = self._stream
        if stream is not None:
            try:
                stream.close()
            except Exception:  # closing a broken stream: nothing left to release
                pass
        with self._cond:
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=5)

    def idle(self) -> bool:
        """Nothing queued and nothing being written (tests poll this)."""
        with self._cond:
            return not self._pending and not self._busy

    # -- the event thread ---------------------------------------------------------------------------------------
    def _follow(self) -> None:
        delay = self._backoff[0]
        down_logged = False
        while not self._stop.is_set():
            try:
                engine = self._connect()
                stream = engine.events()
            except Exception as exc:
                ENGINE_UP.set(0)
                if not down_logged:
                    log.warning("docker engine %s cannot be reached (%s): identities of new endpoints stay unknown "
                                "(rules by service, label or container do not apply to them) until it can; "
                                "retrying", self._where, exc)
                    down_logged = True
                else:
                    log.debug("docker engine %s still unreachable: %s", self._where, exc)
                if self._stop.wait(delay):
                    return
                delay = min(delay * 2, self._backoff[1])
                continue
            self._engine, self._stream = engine, stream
            self.connects += 1
            ENGINE_UP.set(1)
            log.info("following docker engine %s events%s; resyncing every running container", self._where,
                     " again" if down_logged or self.connects > 1 else "")
            down_logged = False
            delay = self._backoff[0]
            self._queue(_RESYNC)
            try:
                for event in stream:
                    self._event(event)
                if not self._stop.is_set():
                    log.warning("docker engine %s ended the event stream (restarting?); reconnecting", self._where)
            except Exception as exc:
                if not self._stop.is_set():
                    log.warning("docker engine %s event stream broke (%s); reconnecting", self._where, exc)
            finally:
                self._stream = None
                ENGINE_UP.set(0)
            if self._stop.wait(delay):
                return

    def _event(self, event: dict) -> None:
        if not isinstance(event, dict):
            return
        kind = (event.get("Type"), event.get("Action"))
        actor = event.get("Actor") or {}
        if kind[0] == "container":
            container = actor.get("ID") or event.get("id")
        else:
            container = (actor.get("Attributes") or {}).get("container")
        if not isinstance(container, str) or not container:
            return
        if kind in _QUEUE_ON:
            self._queue(container)
        elif kind in _FORGET_ON:
            with self._cond:
                self._pending.pop(container, None)

    def _queue(self, item: str) -> None:
        with self._cond:
            self._pending[item] = None
            self._cond.notify_all()

    # -- the writer thread --------------------------------------------------------------------------------------
    def _write(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                while not self._pending and not self._stop.is_set():
                    self._cond.wait()
                if self._stop.is_set():
                    return
                item = next(iter(self._pending))
                del self._pending[item]
                self._busy = True
            try:
                self._handle(item)
            except StoreUnavailable as exc:
                # etcd is down: the identity is still wanted, once it is back (the peer watcher reports the outage).
                log.debug("identity of %s waits for etcd: %s", item[:12] or "every container", exc)
                self._queue(item)
                self._stop.wait(self._backoff[0])
            except Exception as exc:
                # The engine went away mid-inspect (the event thread reconnects and resyncs) or a bug: keep going.
                log.warning("identity of %s not published: %s: %s", item[:12] or "every container",
                            type(exc).__name__, exc)
            finally:
                with self._cond:
                    self._busy = False

    def _handle(self, item: str) -> None:
        engine = self._engine
        if engine is None:
            return
        if item == _RESYNC:
            for container in engine.running():
                self._queue(container)
            return
        found = engine.inspect(item)
        if found is None:
            return
        identity, endpoints = identity_of(found)
        exposed = exposed_of(found)
        for network_id, endpoint_id in endpoints:
            self._publish(network_id, endpoint_id, identity, exposed)

    def _publish(self, network_id: str, endpoint_id: str, identity: dict, exposed: List[str]) -> None:
        result = self._publisher.publish_identity(network_id, endpoint_id, identity, exposed)
        if result.outcome != "written":
            return
        if result.since_join is not None:
            IDENTITY_SECONDS.observe(result.since_join)
            log.info("identity of eid=%s (container=%s service=%s) published %.0f ms after its Join",
                     endpoint_id[:12], identity["container"], identity["service"] or "-", result.since_join * 1000)
        else:
            log.info("identity of eid=%s (container=%s service=%s) published", endpoint_id[:12],
                     identity["container"], identity["service"] or "-")


class DockerEngine:
    """Engine over the docker SDK's low-level client, one per connection (version negotiated with the engine)."""

    def __init__(self, base_url: str, timeout: float = 10.0):
        import docker  # the plugin layer's: nothing below it talks to the engine

        self._errors = docker.errors
        self._client = docker.APIClient(base_url=base_url, version="auto", timeout=timeout)

    def events(self) -> EventStream:
        # No timeout on the stream (docker-py's events() reads without one): an idle engine sends nothing.
        return self._client.events(decode=True, filters={"type": ["container", "network"]})

    def running(self) -> List[str]:
        return [c["Id"] for c in self._client.containers(quiet=True)]

    def inspect(self, container_id: str) -> Optional[dict]:
        try:
            return self._client.inspect_container(container_id)
        except self._errors.NotFound:
            return None
