"""The contract the stores, the host lease and the watchers hold their etcd client to. store/kvstore.py's EtcdKV
is the one implementation; the unit tests' fakes (tests/fakes.py) model the same state: revisions, transactions,
leases and, for the watchers, a watch.

Keys and values are text. A revision is etcd's store-wide counter, raised by every write; an entry's
mod_revision is the revision that last wrote it (0 in a compare: the key is missing).
"""

import dataclasses
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Protocol, Sequence, Tuple

from store.kvstore import Entry, Snapshot, WatchEvent


class KV(Protocol):
    def get(self, key: str) -> Optional[Entry]: ...

    def get_prefix(self, prefix: str) -> Tuple[List[Entry], int]:
        """Every entry under prefix, sorted by key, and the store revision they were read at."""
        ...

    def read(self, keys: Sequence[str] = (), prefixes: Sequence[str] = ()) -> Snapshot:
        """Several keys and prefixes at one revision (one read-only transaction)."""
        ...

    def put(self, key: str, value: str, lease: int = 0) -> int:
        """-> the revision of the write."""
        ...

    def delete(self, key: str) -> bool: ...

    def delete_prefix(self, prefix: str) -> int:
        """-> how many keys went."""
        ...

    def create(self, key: str, value: str, lease: int = 0) -> bool:
        """Put key only if it does not exist; True if this call created it."""
        ...

    def commit(self, absent: Iterable[str] = (), revisions: Optional[Dict[str, int]] = None,
               puts: Optional[Dict[str, str]] = None, deletes: Iterable[str] = (), lease: int = 0,
               unchanged_since: Optional[Dict[str, int]] = None, delete_prefixes: Iterable[str] = ()) -> bool:
        """One atomic transaction: if every key in `absent` is missing, every key in `revisions` is at that
        mod_revision, and no key under a prefix in `unchanged_since` was written after that revision, apply
        `puts` (under `lease`), `deletes` and the deletion of every key under each of `delete_prefixes` (one
        operation each, whatever they hold) and return True; otherwise change nothing and return False."""
        ...

    def lease_grant(self, ttl: int) -> int:
        """-> a new lease's ID; keys put under it go when it expires."""
        ...

    def lease_keepalive(self, lease_id: int) -> int:
        """Refresh a lease; -> the remaining TTL in seconds, 0 if the lease is gone."""
        ...

    def lease_ttl(self, lease_id: int) -> int:
        """A lease's remaining TTL in seconds without renewing it, 0 if it is gone."""
        ...


class WatchStream(Protocol):
    """Events on a prefix from a start revision, in revision order. Iteration raises StoreUnavailable when the
    stream breaks and store.kvstore.Compacted when the start revision is gone; `close()`, from any thread, ends
    it."""

    def __iter__(self) -> Iterator[WatchEvent]: ...

    def close(self) -> None: ...


class WatchableKV(KV, Protocol):
    """A KV that can also watch (what store/watchloop.py needs)."""

    def watch(self, prefix: str, start_revision: int) -> WatchStream: ...


@dataclasses.dataclass(frozen=True)
class Guard:
    """Compares a caller adds to a store's own transaction: keys that must be missing and keys that must be at a
    mod_revision. The garbage collector (netdriver/gc.py) releases a gone host's holds only while hosts/<host> is
    missing and departed/<host> is the record it judged by, so a host that comes back keeps what it holds."""

    absent: Tuple[str, ...] = ()
    revisions: Mapping[str, int] = dataclasses.field(default_factory=dict)

    def holds(self, kv: KV) -> bool:
        """Whether the compares still hold (read at one revision): a store tells a transaction lost to the
        guard, which it must not retry, from one lost to a concurrent writer, which it retries."""
        found = kv.read(keys=[*self.absent, *self.revisions]).entries
        revisions = {k: entry.mod_revision if entry is not None else 0 for k, entry in found.items()}
        return (all(found[k] is None for k in self.absent) and
                all(revisions[k] == rev for k, rev in self.revisions.items()))


NO_GUARD = Guard()
