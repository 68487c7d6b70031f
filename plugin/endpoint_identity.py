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

A Swarm service's published ports (every mode: `--publish 8080:80` through the ingress routing mesh is not in the
task's ExposedPorts) are exposed on its tasks too: the service's spec is readable on a manager only (GET /services
on a worker answers 503), so on a manager this module also follows `service` events and, at each (re)connect,
lists the services, writing each one's target ports to etcd and removing the keys of services that are gone
(netdriver/service_ports.py); on every host a task container's ports (label com.docker.swarm.service.id) are
merged from that key, and a change of the key (ServicePortsWatcher, through service_changed) re-queues this host's
running tasks of the service, so a task that started before its service's key was written gets the ports too.

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
from netdriver.models import merge_exposed
from telemetry.metrics import ENGINE_UP, IDENTITY_SECONDS
from wire.errors import InvalidRequest, StoreUnavailable
from wire.protocol import PROTOCOLS, SWARM_ID, TransportPort

log = logging.getLogger(__name__)

SWARM_SERVICE_LABEL = "com.docker.swarm.service.name"
COMPOSE_SERVICE_LABEL = "com.docker.compose.service"
SWARM_SERVICE_ID_LABEL = "com.docker.swarm.service.id"
# The events that can make an identity appear: a container joined a network (the record exists from here on), a
# container started (after all of its Joins). die/destroy/disconnect need nothing here: Leave deletes the record.
_QUEUE_ON = {("container", "start"), ("network", "connect")}
_FORGET_ON = {("container", "die"), ("container", "destroy")}
_RESYNC = ""  # the queue item that stands for "every running container"
# Queue items besides container IDs (neither a container ID nor a Swarm ID holds a ':'): a service to write to etcd
# as the engine (a manager) describes it, and a service whose key changed, whose running tasks here are re-queued.
_SERVICE = "service:"
_TASKS = "tasks:"
# Service events (swarmkit, on managers only): each one may change the ports (remove: the key goes).
_SERVICE_EVENTS = {"create", "update", "remove"}


class NotManager(Exception):
    """The engine is no Swarm manager (or in no Swarm): it cannot describe services (503 on GET /services)."""


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

    def running(self, service_id: str = "") -> List[str]:
        """IDs of the running containers; with service_id, of that Swarm service's tasks only."""
        ...

    def services(self) -> List[dict]:
        """GET /services; NotManager on an engine that is no manager."""
        ...

    def service(self, service_id: str) -> Optional[dict]:
        """GET /services/<id>, None if there is no such service; NotManager on an engine that is no manager."""
        ...

    def inspect(self, container_id: str) -> Optional[dict]:
        """GET /containers/<id>/json, None if there is no such container any more."""
        ...


class Publisher(Protocol):
    def publish_identity(self, network_id: str, endpoint_id: str, identity: dict,
                         exposed: Sequence[str] = ()) -> IdentityWrite: ...


class ServicePortsStore(Protocol):
    """netdriver.service_ports.ServicePorts: the services/<service> keys."""

    def ports(self, service_id: str) -> List[str]: ...

    def put(self, service_id: str, version: int, ports: Sequence[str]) -> str: ...

    def remove(self, service_id: str, mod_revision: Optional[int] = None) -> bool: ...

    def listing(self) -> Tuple[Dict[str, int], int]: ...


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
        found = _transport_port(int(port) if port.isdigit() else None, proto or "tcp")  # the API's default: tcp
        if found is not None:
            out.add(found)
    return [str(p) for p in sorted(out)]


def _transport_port(port, proto) -> Optional[TransportPort]:
    """A port the policy can police, None for anything else (another protocol, 0, out of range, not a number)."""
    if isinstance(port, int) and not isinstance(port, bool) and 1 <= port <= 65535 and proto in PROTOCOLS.values():
        return TransportPort(port, proto)
    return None


def service_ports_of(service: dict) -> Tuple[int, List[str]]:
    """A service as GET /services returns it -> (its Version.Index, the target ports it publishes, sorted: ["80/tcp"]).

    `{"ID", "Version": {"Index": N}, "Spec": {"EndpointSpec": {"Ports": [{"Protocol": "tcp", "TargetPort": 80,
    "PublishedPort": 8080, "PublishMode": "ingress"}, ...]}}}`. Every publish mode counts (mode=host ports are in
    the task's ExposedPorts already; ingress ones only here); the spec, not Endpoint.Ports (what the allocator has
    done so far), is what the operator asked for. What the policy cannot police is left out, as in exposed_of;
    Protocol absent means tcp (swarmkit's default). Version -1 for a service without one (it replaces nothing)."""
    version = (service.get("Version") or {}).get("Index")
    version = version if isinstance(version, int) and not isinstance(version, bool) else -1
    ports = ((service.get("Spec") or {}).get("EndpointSpec") or {}).get("Ports") or []
    out = set()
    for item in ports if isinstance(ports, list) else ():
        if isinstance(item, dict):
            found = _transport_port(item.get("TargetPort"), item.get("Protocol") or "tcp")
            if found is not None:
                out.add(found)
    return version, [str(p) for p in sorted(out)]


class IdentityWriter:
    """The two threads described above. engine: builds a client per connection attempt (the docker SDK asks
    the engine its API version when it is built, which fails while dockerd is down)."""

    def __init__(self, engine: Callable[[], Engine], publisher: Publisher, where: str = "",
                 backoff: Tuple[float, float] = (0.5, 30.0), services: Optional[ServicePortsStore] = None):
        self._connect = engine
        self._publisher = publisher
        self._services = services  # None: services' published ports are not merged (nor written)
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
        self.manager: Optional[bool] = None  # whether the engine described its services at the last resync

    def service_changed(self, service_id: str) -> None:
        """A service's key in etcd changed (ServicePortsWatcher): re-publish this host's running tasks of it."""
        if SWARM_ID.fullmatch(service_id):
            self._queue(_TASKS + service_id)

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
        if kind[0] == "service":
            service_id = actor.get("ID")
            if self._services is not None and kind[1] in _SERVICE_EVENTS and isinstance(service_id, str) \
                    and service_id:
                self._queue(_SERVICE + service_id)
            return
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
            # The services first: on a manager, the keys the tasks' ports are read from are written before them.
            if self._services is not None:
                self._sync_services(engine, self._services)
            for container in engine.running():
                self._queue(container)
            return
        if item.startswith(_SERVICE):
            if self._services is not None:
                self._sync_service(engine, self._services, item[len(_SERVICE):])
            return
        if item.startswith(_TASKS):
            for container in engine.running(item[len(_TASKS):]):
                self._queue(container)
            return
        found = engine.inspect(item)
        if found is None:
            return
        identity, endpoints = identity_of(found)
        exposed = exposed_of(found)
        service_id = identity["labels"].get(SWARM_SERVICE_ID_LABEL)
        if service_id and self._services is not None and endpoints:
            # etcd down: StoreUnavailable, the container waits in the queue (its record keeps what it holds).
            exposed = merge_exposed(exposed, self._services.ports(service_id))
        for network_id, endpoint_id in endpoints:
            self._publish(network_id, endpoint_id, identity, exposed)

    def _sync_services(self, engine: Engine, store: ServicePortsStore) -> None:
        """Every service's ports into etcd, and the keys of services that are gone removed. The keys are read
        before the services are listed, and a key is removed only if it is still as read: a service created
        after the listing (its key written since by another manager) keeps its key."""
        keys, _ = store.listing()
        try:
            services = engine.services()
        except NotManager as exc:
            if self.manager is not False:
                log.info("docker engine %s describes no services (%s): the ports of services come from the "
                         "managers' plugins", self._where, exc)
            self.manager = False
            return
        if not self.manager:
            log.info("docker engine %s is a swarm manager: writing the ports its services publish", self._where)
        self.manager = True
        listed = set()
        for service in services:
            service_id = service.get("ID") if isinstance(service, dict) else None
            if isinstance(service_id, str) and service_id:
                listed.add(service_id)
                self._put_service(store, service_id, service)
        for service_id, revision in keys.items():
            if service_id not in listed and store.remove(service_id, revision):
                log.info("ports of service %s removed: the service is gone", service_id)

    def _sync_service(self, engine: Engine, store: ServicePortsStore, service_id: str) -> None:
        try:
            service = engine.service(service_id)
        except NotManager:
            return  # demoted since: the managers' plugins write it
        if service is None:
            if store.remove(service_id):
                log.info("ports of service %s removed: the service is gone", service_id)
            return
        self._put_service(store, service_id, service)

    @staticmethod
    def _put_service(store: ServicePortsStore, service_id: str, service: dict) -> None:
        version, ports = service_ports_of(service)
        try:
            outcome = store.put(service_id, version, ports)
        except InvalidRequest as exc:  # an ID that is no Swarm ID (it could name no key), or no version
            log.warning("ports of service %r not recorded: %s", service_id, exc)
            return
        if outcome == "written":
            name = ((service.get("Spec") or {}).get("Name")) or "?"
            log.info("ports of service %s (%s) version %d: %s", service_id, name, version,
                     ", ".join(ports) or "none")

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
        # No timeout on the stream (docker-py's events() reads without one): an idle engine sends nothing. A
        # worker accepts the service type and sends none of them.
        return self._client.events(decode=True, filters={"type": ["container", "network", "service"]})

    def running(self, service_id: str = "") -> List[str]:
        filters = {"label": f"{SWARM_SERVICE_ID_LABEL}={service_id}"} if service_id else None
        return [c["Id"] for c in self._client.containers(quiet=True, filters=filters)]

    def services(self) -> List[dict]:
        try:
            return self._client.services()
        except self._errors.APIError as exc:
            raise self._not_manager(exc)

    def service(self, service_id: str) -> Optional[dict]:
        try:
            return self._client.inspect_service(service_id)
        except self._errors.NotFound:
            return None
        except self._errors.APIError as exc:
            raise self._not_manager(exc)

    @staticmethod
    def _not_manager(exc) -> Exception:
        # 503 is what the engine answers on a worker or outside a Swarm ("This node is not a swarm manager");
        # anything else is an error of its own (the writer logs it and the next event or resync tries again).
        return NotManager(exc.explanation or str(exc)) if exc.status_code == 503 else exc

    def inspect(self, container_id: str) -> Optional[dict]:
        try:
            return self._client.inspect_container(container_id)
        except self._errors.NotFound:
            return None
