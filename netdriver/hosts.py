"""This host's presence in etcd: a record under a lease that the plugin keeps alive.

Peer records are written under the same lease, so when a host dies (its plugin stops renewing) etcd deletes its
peers after the TTL and every other host's watcher removes them from the kernel. The lease ID is kept in the
state directory: a plugin restarted within the TTL (kill -9, upgrade) reuses its lease, so its peers never
disappear and no traffic is lost.
"""

import logging
import os
import threading
from typing import Callable, Optional

from netdriver.store import NetworkStore
from plugin.errors import VxnetError

log = logging.getLogger(__name__)

# etcd expires the lease TTL seconds after the last renewal; renewing every TTL/3 survives two lost renewals.
# The TTL is how long a plugin may be away (restart, upgrade, `docker plugin disable`/`enable`, a slow start)
# before the other hosts withdraw its peers. While it is away its containers keep running and the kernel keeps
# forwarding their traffic, so withdrawing early would cut live traffic; withdrawing late only leaves a dead
# host's entries (whose traffic is lost anyway) a little longer. 10 s was measured too short: a plugin restart
# on a slow machine (the ESP guest under TCG) took 8 s, and the lease had been renewed up to TTL/3 before it.
LEASE_TTL = 30


class HostLease:
    def __init__(self, kv, store: NetworkStore, host_id: str, vtep: Callable[[], Optional[str]], state_file: str,
                 on_new_lease: Callable[[], None] = lambda: None, ttl: int = LEASE_TTL,
                 on_outage: Callable[[], None] = lambda: None):
        self.kv = kv
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

    def register(self) -> None:
        """(Re)write the host record: after acquiring the lease, and when the VTEP moved."""
        self.store.register_host(self.host_id, self.vtep() or "", self.id)

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
            except VxnetError as exc:
                if healthy:
                    log.warning("host lease renewal failed: %s", exc)
                    self.on_outage()
                healthy = False
            self._stop.wait(self.ttl / 3 if healthy else 1.0)
