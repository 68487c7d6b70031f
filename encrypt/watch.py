"""The key ring watcher: a thread that applies every ring etcd holds, from a full read and then a watch."""

import logging
from typing import Callable

from encrypt.keystore import KeyStore
from encrypt.ring import KeyRing, KeyringError
from store.kv import WatchableKV
from store.watchloop import WatchLoop


class KeyRingWatcher(WatchLoop):
    """A thread: the ring in etcd -> on_ring(ring). A full read (creating the ring if there is none) at start
    and after every break, then a watch from the next revision. on_ring errors are logged and retried after a
    back-off from a fresh read, as the peer watcher does; nothing is skipped."""

    what = "key ring watch"
    failure_level = logging.ERROR  # until it is applied, encrypted peers cannot be programmed

    def __init__(self, kv: WatchableKV, store: KeyStore, on_ring: Callable[[KeyRing], None], max_backoff: float = 2.0):
        super().__init__(kv, max_backoff)
        self.store = store
        self.on_ring = on_ring

    def load(self):
        self.store.ensure()
        ring, revision = self.store.read_at_revision()
        if ring is None:
            raise KeyringError(f"the key ring at {self.store.key} vanished while being read")
        self.on_ring(ring)
        return self.store.key, revision

    def apply(self, event) -> bool:
        if event.key != self.store.key:
            return True  # the watch is on a prefix: <key>-something is not ours
        if event.kind == "put":
            self.on_ring(self.store.decode(event.value))
            return True
        return False  # deleted (etcd wiped by hand): the next full read makes a new ring
