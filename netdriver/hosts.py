"""This host's presence in etcd: a record under a lease that the plugin keeps alive.

Peer records are written under the same lease, so when a host dies (its plugin stops renewing) etcd deletes its
peers after the TTL and every other host's watcher removes them from the kernel. The lease ID is kept in the
state directory: a plugin restarted within the TTL (kill -9, upgrade) reuses its lease, so its peers never
disappear and no traffic is lost.

One ID, one live host. hosts/<id> is written in a transaction that compares its revision, and only over a record
under this plugin's own lease: a record under another live lease is another host claiming the ID (two hosts given
one VXNET_HOST_ID, a cloned machine that copied the state dir), and this plugin refuses with HostIdConflict rather
than serve as it. A record's lease might instead be this host's own past (the lease file lost, a reboot faster
than the TTL): nothing renews that one any more, so it is watched, not renewed, until it expires (then the ID is
free) or is renewed by its holder (then the holder is alive elsewhere).
"""

import json
import logging
import os
import threading
import time
from typing import Callable, Optional

from netdriver.store import NetworkStore
from store.kv import KV
from wire.errors import HostIdConflict, StoreUnavailable, VxnetError

log = logging.getLogger(__name__)

# etcd expires the lease TTL seconds after the last renewal; renewing every TTL/3 survives two lost renewals.
# The TTL is how long a plugin may be away (restart, upgrade, `docker plugin disable`/`enable`, a slow start)
# before the other hosts withdraw its peers. While it is away its containers keep running and the kernel keeps
# forwarding their traffic, so withdrawing early would cut live traffic; withdrawing late only leaves a dead
# host's entries (whose traffic is lost anyway) a little longer. 10 s was measured too short: a plugin restart
# on a slow machine (the ESP guest under TCG) took 8 s, and the lease had been renewed up to TTL/3 before it.
LEASE_TTL = 30
_RETRIES = 8  # compare-and-put rounds lost to a concurrent writer before giving up (then retried by the caller)


class HostLease:
    """name: the hostname recorded for people; instance: what tells this running system from a copy of it
    (plugin/identity.py instance()); remedy: the advice a HostIdConflict ends with; on_conflict: called (from
    the renewal thread) when a re-registration is refused, after which the lease is no longer kept."""

    def __init__(self, kv: KV, store: NetworkStore, host_id: str, vtep: Callable[[], Optional[str]], state_file: str,
                 on_new_lease: Callable[[], None] = lambda: None, ttl: int = LEASE_TTL,
                 on_outage: Callable[[], None] = lambda: None, name: str = "", instance: str = "",
                 remedy: str = "give each host its own VXNET_HOST_ID",
                 on_conflict: Callable[[HostIdConflict], None] = lambda exc: None, poll: float = 1.0,
                 health: Callable[[int], Optional[str]] = lambda lease: None):
        self.kv = kv
        # health(lease ID): this host's address on the health overlay (netdriver/health.py), claimed under the
        # lease before each write of the record, which names it; None: no address.
        self.health = health
        self.name = name or host_id
        self.instance = instance
        self.remedy = remedy
        self.on_conflict = on_conflict
        self.poll = poll  # seconds between reads of a foreign lease's TTL
        self.store = store
        self.host_id = host_id
        self.vtep = vtep
        self.state_file = state_file
        self.ttl = ttl
        self.on_new_lease = on_new_lease
        self.on_outage = on_outage
        self.id = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _load(self) -> int:
        try:
            with open(self.state_file) as f:
                return int(f.read().strip() or 0)
        except (OSError, ValueError):
            return 0

    def _save(self) -> None:
        os.makedirs(os.path.dirname(self.state_file), exist_ok=True)
        tmp = self.state_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(self.id))
        os.replace(tmp, self.state_file)

    def acquire(self) -> bool:
        """Reuse the saved lease if etcd still has it, else grant a new one. True if the lease is new."""
        saved = self.id or self._load()
        if saved and not self.id:
            saved = self._saved_lease_if_mine(saved)
        if saved and self.kv.lease_keepalive(saved) > 0:
            self.id = saved
            fresh = False
        else:
            self.id = self.kv.lease_grant(self.ttl)
            fresh = True
            log.info("host lease granted id=%x ttl=%d", self.id, self.ttl)
        self._save()
        self.register()
        return fresh

    def _saved_lease_if_mine(self, saved: int) -> int:
        """The saved lease (from the state file, at start-up) if this system may take it up again, else 0.

        A record under it written by this running system (same instance), or by a version that did not record
        instances, means a plugin restart: reuse it. One written by another instance means a reboot faster than
        the TTL, or a copy of this state dir whose original is alive and renewing it: renewing it here would make
        two machines one host, so watch it instead (HostIdConflict if it is renewed, 0 once it has expired)."""
        current = self.store.host_entry(self.host_id)
        if current is None or current.lease != saved:
            return saved  # whatever holds the ID, register() decides about it
        recorded = _record(current).get("instance")
        if recorded is None or recorded == self.instance:
            return saved
        log.info("host lease %x holds a record from another instance (%s, not %s): waiting to see whether it is "
                 "renewed elsewhere", saved, recorded, self.instance)
        if self._renewed_elsewhere(saved):
            raise self._conflict(current)
        return 0

    def register(self) -> None:
        """(Re)write the host record: after acquiring the lease, and when the VTEP moved. Raises HostIdConflict
        if another live host holds the ID."""
        record = {"vtep": self.vtep() or "", "name": self.name, "instance": self.instance}
        for _ in range(_RETRIES):
            current = self.store.host_entry(self.host_id)
            if current is not None and current.lease != self.id:
                # etcd deletes a lease's keys when it expires, so this lease is alive: another host's, or this
                # host's own past that nobody renews any more and that is about to expire.
                if self._renewed_elsewhere(current.lease):
                    raise self._conflict(current)
                continue  # expired, and its record with it
            health = self.health(self.id)  # once the ID is known to be this host's
            if health:
                record["health"] = health
            if self.store.register_host(self.host_id, record, self.id, current.mod_revision if current else 0):
                return
        raise StoreUnavailable(f"hosts/{self.host_id} changed {_RETRIES} times while this host registered")

    def _renewed_elsewhere(self, lease_id: int) -> bool:
        """Watch a lease this plugin does not renew (etcd's TimeToLive does not renew it either): True as soon as
        its remaining TTL goes up (its holder renewed it), or if it outlives a whole TTL (only renewals make it);
        False once it has expired."""
        deadline = time.monotonic() + self.ttl + 5
        last = self.kv.lease_ttl(lease_id)
        while last > 0:
            if time.monotonic() > deadline:
                return True
            if self._stop.wait(self.poll):
                raise VxnetError("stopped while waiting for another lease on this host's ID to expire")
            now = self.kv.lease_ttl(lease_id)
            if now > last:
                return True
            last = now
        return False

    def _conflict(self, other) -> HostIdConflict:
        theirs = _record(other)
        return HostIdConflict(
            f"host ID {self.host_id!r} is held by another live host: {theirs.get('name') or '?'} "
            f"(vtep {theirs.get('vtep') or '?'}, lease {other.lease:x}); this host, {self.name} "
            f"(vtep {self.vtep() or '?'}), refuses to serve as it: {self.remedy}")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="host-lease", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop renewing, after one last renewal: the lease is not revoked, and a restarting plugin has a whole
        TTL to pick it up again."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.id:
            try:
                self.kv.lease_keepalive(self.id)
            except VxnetError as exc:
                log.warning("last host lease renewal failed: %s", exc)

    def _run(self) -> None:
        healthy = self.id != 0  # start() follows a successful acquire()
        while not self._stop.is_set():
            try:
                if not healthy or self.kv.lease_keepalive(self.id) <= 0:
                    if self.acquire() or not healthy:
                        self.on_new_lease()
                healthy = True
            except HostIdConflict as exc:
                # The lease was lost (an outage longer than the TTL) and another host took the ID meanwhile.
                log.error("%s", exc)
                self.on_conflict(exc)
                return
            except VxnetError as exc:
                if healthy:
                    log.warning("host lease renewal failed: %s", exc)
                    self.on_outage()
                healthy = False
            self._stop.wait(self.ttl / 3 if healthy else 1.0)


def _record(entry) -> dict:
    """A hosts/<id> value as a dict; a value that is not a JSON object reads as empty (it names nobody)."""
    try:
        value = json.loads(entry.value)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
