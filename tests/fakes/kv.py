"""etcd (store.kvstore.EtcdKV) as state: a revisioned key space with its history, leases and watches.

Every change bumps the store revision once (a transaction, a prefix delete or a lease expiry changes several
keys at one revision, as etcd does) and is recorded in `history` as the WatchEvent a watch would deliver.
`compact(revision)` drops the history before revision, as etcd's compaction does; a watch that needs a dropped
revision fails with Compacted, the error the watch loop recognises as "read everything again".

Switches a test flips to make etcd misbehave:
    unavailable       every call fails as an unreachable etcd does (StoreUnavailable); open watches stay open
                      until `break_watches` (a dead etcd closes its connections; a partition may not)
    fail_after        the number of further writes that succeed before etcd "goes away" (unavailable)
    cut_in            called once, just before the next commit: another writer wins a race at the worst moment
    on_ttl_read       called at each lease_ttl read, before the TTL counts down
    hold_watches()    watches deliver nothing until release_watches(): a watcher that lags behind the store
    break_watches()   every open watch fails with StoreUnavailable, as when etcd drops the stream

A transaction of more than MAX_TXN_OPS operations, which etcd refuses (--max-txn-ops), fails the test.
"""

import threading
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Set, Tuple

from store.kvstore import Compacted, Entry, Snapshot, WatchEvent
from wire.errors import StoreUnavailable

# etcd's default --max-txn-ops: a transaction with more operations in its success branch is refused.
MAX_TXN_OPS = 128

URL = "http://fake:2379"


class FakeKV:
    def __init__(self):
        self.data: Dict[str, Entry] = {}
        self.rev = 1
        self.unavailable = False
        self.fail_after: Optional[int] = None  # number of further writes that succeed before etcd "goes away"
        self.cut_in: Optional[Callable[[], None]] = None
        self.endpoints = (URL,)
        self.round_trips = 0  # calls that would each be one request to etcd
        self.records_read = 0  # entries those reads returned (what a call costs in etcd's reply)
        self.leases: Dict[int, int] = {}  # lease id -> seconds left
        self.granted_ttls: Dict[int, int] = {}
        self.granted = 1000  # the last lease id handed out
        self.history: List[WatchEvent] = []  # every change since compact_revision, oldest first
        self.compact_revision = 0  # revisions below this are gone from the history
        self.held = False
        self.streams: Set["FakeWatchStream"] = set()  # watches open now
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)  # notified on every change, compaction and break

    def _check(self, write: bool = False):
        self.round_trips += 1
        if self.unavailable:
            raise StoreUnavailable(f"etcd unreachable at {URL} (connection refused)")
        if write and self.fail_after is not None:
            if self.fail_after <= 0:
                self.unavailable = True
                raise StoreUnavailable(f"etcd unreachable at {URL} (connection refused)")
            self.fail_after -= 1

    # -- changes: the only places that touch `data`, so the history misses nothing ---------------------------------
    def _set(self, key: str, value: str, lease: int = 0) -> None:
        """Write key at the current revision (the caller has bumped it)."""
        old = self.data.get(key)
        self.data[key] = Entry(key, value, self.rev, old.create_revision if old else self.rev, lease)
        self.history.append(WatchEvent("put", key, value, old.value if old else None, self.rev))
        self._changed.notify_all()

    def _erase(self, key: str) -> None:
        old = self.data.pop(key)
        self.history.append(WatchEvent("delete", key, None, old.value, self.rev))
        self._changed.notify_all()

    def _put(self, key, value, lease=0):
        self.rev += 1
        self._set(key, value, lease)

    # -- reads -----------------------------------------------------------------------------------------------------
    def get(self, key: str) -> Optional[Entry]:
        with self._lock:
            self._check()
            self.records_read += key in self.data
            return self.data.get(key)

    def get_prefix(self, prefix: str) -> Tuple[List[Entry], int]:
        with self._lock:
            self._check()
            found = sorted((e for k, e in self.data.items() if k.startswith(prefix)), key=lambda e: e.key)
            self.records_read += len(found)
            return found, self.rev

    def read(self, keys: Iterable[str] = (), prefixes: Iterable[str] = ()) -> Snapshot:
        with self._lock:
            self._check()
            snapshot = Snapshot(entries={k: self.data.get(k) for k in keys},
                                ranges={p: sorted((e for k, e in self.data.items() if k.startswith(p)),
                                                  key=lambda e: e.key) for p in prefixes},
                                revision=self.rev)
            self.records_read += sum(e is not None for e in snapshot.entries.values())
            self.records_read += sum(len(r) for r in snapshot.ranges.values())
            return snapshot

    def revision(self) -> int:
        with self._lock:
            self._check()
            return self.rev

    # -- writes ----------------------------------------------------------------------------------------------------
    def put(self, key: str, value: str, lease: int = 0) -> int:
        with self._lock:
            self._check(write=True)
            self._put(key, value, lease)
            return self.rev

    def delete(self, key: str) -> bool:
        with self._lock:
            self._check(write=True)
            if key in self.data:
                self.rev += 1
                self._erase(key)
                return True
            return False

    def delete_prefix(self, prefix: str) -> int:
        with self._lock:
            self._check(write=True)
            keys = sorted(k for k in self.data if k.startswith(prefix))
            if keys:
                self.rev += 1
            for k in keys:
                self._erase(k)
            return len(keys)

    def create(self, key: str, value: str, lease: int = 0) -> bool:
        return self.commit(absent=[key], puts={key: value}, lease=lease)

    def commit(self, absent: Iterable[str] = (), revisions: Optional[Dict[str, int]] = None,
               puts: Optional[Dict[str, str]] = None, deletes: Iterable[str] = (), lease: int = 0,
               unchanged_since: Optional[Dict[str, int]] = None, delete_prefixes: Iterable[str] = ()) -> bool:
        cut_in, self.cut_in = self.cut_in, None
        if cut_in is not None:
            cut_in()
        deletes = list(deletes)
        with self._lock:
            self._check(write=True)
            # etcd refuses such a transaction; that is a bug in the caller, not an outage it should survive, so it
            # fails the test (as StoreUnavailable it could pass for one).
            delete_prefixes = list(delete_prefixes)
            assert len(puts or {}) + len(deletes) + len(delete_prefixes) <= MAX_TXN_OPS, \
                "etcd would refuse this transaction"
            if any(k in self.data for k in absent):
                return False
            for prefix, rev in (unchanged_since or {}).items():
                if any(e.mod_revision > rev for k, e in self.data.items() if k.startswith(prefix)):
                    return False
            for k, rev in (revisions or {}).items():
                current = self.data[k].mod_revision if k in self.data else 0
                if current != rev:
                    return False
            self.rev += 1
            for k, v in (puts or {}).items():
                self._set(k, v, lease)
            for k in deletes:
                if k in self.data:
                    self._erase(k)
            for prefix in delete_prefixes:
                for k in sorted(k for k in self.data if k.startswith(prefix)):
                    self._erase(k)
            return True

    # -- leases: keys written under a lease vanish when it expires, as etcd deletes them ----------------------------
    def lease_grant(self, ttl: int) -> int:
        with self._lock:
            self._check(write=True)
            self.granted += 1
            lease_id = self.granted
            self.leases[lease_id] = ttl
            self.granted_ttls[lease_id] = ttl
            return lease_id

    def lease_keepalive(self, lease_id: int) -> int:
        with self._lock:
            self._check()
            if lease_id in self.leases:
                self.leases[lease_id] = self.granted_ttls[lease_id]
            return self.leases.get(lease_id, 0)

    # Called at each lease_ttl read, before the TTL counts down: a test renews "another host's" lease here.
    on_ttl_read: Optional[Callable[[int], None]] = None

    def lease_ttl(self, lease_id: int) -> int:
        """TimeToLive without renewing. Each read stands for one second passing on that lease (the reader polls
        about once a second), so an unrenewed lease counts down and expires as etcd's would."""
        with self._lock:
            self._check()
            if self.on_ttl_read is not None:
                self.on_ttl_read(lease_id)
            if lease_id not in self.leases:
                return 0
            self.leases[lease_id] -= 1
            if self.leases[lease_id] <= 0:
                self.expire(lease_id)
                return 0
            return self.leases[lease_id]

    def expire(self, lease_id: int) -> None:
        """What etcd does TTL seconds after the last renewal."""
        with self._lock:
            self.leases.pop(lease_id, None)
            doomed = sorted(k for k, e in self.data.items() if e.lease == lease_id)
            if doomed:
                self.rev += 1
            for k in doomed:
                self._erase(k)

    def keys(self, prefix: str = "") -> List[str]:
        return sorted(k for k in self.data if k.startswith(prefix))

    # -- history and watches ---------------------------------------------------------------------------------------
    def compact(self, revision: Optional[int] = None) -> None:
        """etcd's compaction at revision (default: the current one): the history before it is gone, so a watch
        from an earlier revision fails with Compacted. The key space itself is unchanged."""
        with self._lock:
            revision = self.rev if revision is None else revision
            assert revision <= self.rev, "etcd refuses to compact a future revision"
            self.compact_revision = max(self.compact_revision, revision)
            self.history = [e for e in self.history if e.mod_revision >= self.compact_revision]
            self._changed.notify_all()

    def watch(self, prefix: str, start_revision: int) -> "FakeWatchStream":
        """Like EtcdKV.watch: nothing is asked of etcd until the stream is iterated."""
        return FakeWatchStream(self, prefix, start_revision)

    def hold_watches(self) -> None:
        with self._lock:
            self.held = True

    def release_watches(self) -> None:
        with self._lock:
            self.held = False
            self._changed.notify_all()

    def break_watches(self, reason: str = "connection reset by peer") -> None:
        """etcd drops every open watch stream (a restart, a network fault)."""
        with self._lock:
            for stream in self.streams:
                stream.broken = reason
            self._changed.notify_all()


class FakeWatchStream:
    """One watch on a key prefix from a start revision, as store.kvstore.WatchStream behaves: iterate for events
    in revision order; `close()` from any thread ends the iteration quietly; StoreUnavailable when etcd is
    unreachable or drops the stream, Compacted when a revision the watch still needs is compacted away."""

    def __init__(self, kv: FakeKV, prefix: str, start_revision: int):
        self.kv = kv
        self.prefix = prefix
        self.next_revision = start_revision  # the first revision not delivered yet
        self.broken: Optional[str] = None
        self.closed = False

    def close(self) -> None:
        with self.kv._lock:
            self.closed = True
            self.kv._changed.notify_all()

    def _due(self) -> List[WatchEvent]:
        """The events to deliver now (caller holds the lock); raises what the stream fails with."""
        if self.broken is not None:
            raise StoreUnavailable(f"etcd watch on {URL} broke: {self.broken}")
        if self.kv.held:
            return []
        if self.next_revision < self.kv.compact_revision:
            raise Compacted(self.kv.compact_revision)
        due = [e for e in self.kv.history if e.mod_revision >= self.next_revision]
        if due:
            self.next_revision = due[-1].mod_revision + 1
        return [e for e in due if e.key.startswith(self.prefix)]

    def __iter__(self) -> Iterator[WatchEvent]:
        kv = self.kv
        with kv._lock:
            if self.closed:
                return
            kv._check()
            kv.streams.add(self)
        try:
            while True:
                with kv._lock:
                    events = []
                    while not self.closed and not events:
                        events = self._due()
                        if not events:
                            kv._changed.wait()
                    if self.closed:
                        return
                # Delivered outside the lock: the consumer may call etcd (or a test may write) meanwhile.
                for event in events:
                    if self.closed:
                        return
                    yield event
        finally:
            with kv._lock:
                kv.streams.discard(self)
