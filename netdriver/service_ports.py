"""The ports each Swarm service publishes, kept in etcd so that every host can expose them on the service's tasks
under `-o policy=exposed`.

Why not from the task container: moby's executor puts only the ports published in mode=host into a task's
Config.ExposedPorts (daemon/cluster/executor/container/container.go exposedPorts()); a port published through the
ingress routing mesh (`--publish 8080:80`, the default mode) is in the service's spec only. And the spec is
readable on a manager only: GET /services on a worker answers 503 "This node is not a swarm manager". So the
plugins on managers (plugin/endpoint_identity.py, following `service` events and resyncing at each connect) write
one key per service, and every host reads its task's service key when it publishes the task's identity, and
re-publishes the service's running tasks when the key changes (ServicePortsWatcher).

  services/<service>   {"version": N, "ports": ["80/tcp", "53/udp"]}

version is the service's Version.Index (swarmkit raises it at every change of the service object): several managers
write the same key, each from what its engine answered, and a write never replaces a newer version's ports, so a
manager that read the service before an update cannot undo the update. Keys carry no lease: a plugin restart or an
etcd outage leaves them (and what is in force) as they are; a key goes when a manager sees its service removed,
or finds it gone at a resync.
"""

import json
import logging
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from store import schema
from store.kv import KV, WatchableKV
from store.watchloop import WatchLoop
from wire import protocol
from wire.errors import InvalidRequest

log = logging.getLogger(__name__)

_RETRIES = 8
_PORT_MAX = 65535


def valid_port(text: str) -> bool:
    """"80/tcp": a port the policy can police (1-65535; tcp, udp or sctp)."""
    port, _, proto = str(text).partition("/")
    return port.isdigit() and 1 <= int(port) <= _PORT_MAX and proto in protocol.PROTOCOLS.values()


class ServicePorts:
    """The services/ keys (store/schema.py). Every read and write raises StoreUnavailable while etcd is down."""

    def __init__(self, kv: KV, prefix: str = schema.PREFIX):
        self.kv = kv
        self.keys = schema.Schema(prefix)

    def ports(self, service_id: str) -> List[str]:
        """The ports recorded for service_id ("80/tcp"), [] for none, an ID that is no Swarm ID (the label a
        container carries is not trusted), or a value that cannot be read (it exposes nothing)."""
        if not protocol.SWARM_ID.fullmatch(service_id or ""):
            return []
        entry = self.kv.get(self.keys.service(service_id))
        return self._decode(entry.key, entry.value)[1] if entry is not None else []

    def put(self, service_id: str, version: int, ports: Sequence[str]) -> str:
        """Record the ports of version `version` of a service -> "written", "unchanged" (the key holds this
        version or a newer one: a replay, another manager's write, or a stale read). InvalidRequest naming the
        field for an ID that is no Swarm ID or a port that is not one; nothing is written then."""
        if not isinstance(service_id, str) or not protocol.SWARM_ID.fullmatch(service_id):
            raise InvalidRequest(f"service ID: {service_id!r} is not a Swarm ID (25 lowercase letters and digits)")
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise InvalidRequest(f"service {service_id} Version.Index: {version!r} is not a version")
        for i, text in enumerate(ports):
            if not valid_port(text):
                raise InvalidRequest(f"service {service_id} ports[{i}]: {text!r} is not a port (1-65535/tcp|udp|sctp)")
        key = self.keys.service(service_id)
        value = json.dumps({"version": version, "ports": sorted(set(ports), key=_order)}, sort_keys=True)
        for _ in range(_RETRIES):
            entry = self.kv.get(key)
            if entry is None:
                if self.kv.commit(absent=[key], puts={key: value}):
                    return "written"
                continue
            if self._decode(entry.key, entry.value)[0] >= version:
                return "unchanged"
            if self.kv.commit(revisions={key: entry.mod_revision}, puts={key: value}):
                return "written"
        return "unchanged"  # other managers keep writing newer versions: theirs stand

    def remove(self, service_id: str, mod_revision: Optional[int] = None) -> bool:
        """Delete a service's key; with mod_revision, only if it is still at that revision (a resync that read the
        key before listing the services must not delete what a manager wrote since). -> whether it went."""
        if not protocol.SWARM_ID.fullmatch(service_id or ""):
            return False
        key = self.keys.service(service_id)
        if mod_revision is None:
            return self.kv.delete(key)
        return self.kv.commit(revisions={key: mod_revision}, deletes=[key])

    def listing(self) -> Tuple[Dict[str, int], int]:
        """Every service with a key -> the key's mod_revision; and the revision read at."""
        entries, revision = self.kv.get_prefix(self.prefix())
        out = {}
        for entry in entries:
            service_id = self.keys.service_of(entry.key)
            if service_id is not None:
                out[service_id] = entry.mod_revision
        return out, revision

    def prefix(self) -> str:
        return self.keys.prefix(schema.SERVICE)

    def service_of(self, key: str) -> Optional[str]:
        return self.keys.service_of(key)

    @staticmethod
    def _decode(key: str, value: str) -> Tuple[int, List[str]]:
        try:
            record = json.loads(value)
            version, ports = int(record["version"]), list(record["ports"])
        except (ValueError, TypeError, KeyError):
            log.warning("ignoring etcd record %s: not {\"version\": N, \"ports\": [...]}", key)
            return -1, []
        return version, [p for p in ports if isinstance(p, str) and valid_port(p)]


def _order(text: str):
    port, _, proto = text.partition("/")
    return int(port), proto


class ServicePortsWatcher(WatchLoop):
    """A thread: etcd services/ -> changed(service_id) for every key put or deleted, and for every key at each full
    read (a start, or after an outage: the changes in between were not seen)."""

    what = "service ports watch"

    def __init__(self, kv: WatchableKV, store: ServicePorts, changed: Callable[[str], None],
                 max_backoff: float = 2.0):
        super().__init__(kv, max_backoff)
        self.store = store
        self.changed = changed

    def load(self):
        found, revision = self.store.listing()
        for service_id in found:
            self.changed(service_id)
        return self.store.prefix(), revision

    def apply(self, event) -> bool:
        service_id = self.store.service_of(event.key)
        if service_id is not None:
            self.changed(service_id)
        return True
