"""The contract the stores, the host lease and the watchers hold their etcd client to. store/kvstore.py's EtcdKV
is the one implementation; the unit tests' fakes (tests/fakes.py) model the same state: revisions, transactions,
leases and, for the watchers, a watch.

Keys and values are text. A revision is etcd's store-wide counter, raised by every write; an entry's
mod_revision is the revision that last wrote it (0 in a compare: the key is missing).
"""

from typing import Dict, Iterable, Iterator, List, Optional, Protocol, Sequence, Tuple

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
               unchanged_since: Optional[Dict[str, int]] = None) -> bool:
        """One atomic transaction: if every key in `absent` is missing, every key in `revisions` is at that
        mod_revision, and no key under a prefix in `unchanged_since` was written after that revision, apply
        `puts` (under `lease`) and `deletes` and return True; otherwise change nothing and return False."""
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
