"""The key ring's home in etcd: read, created, rotated and pruned there, sealed (encrypt/ring.py) under the cluster
secret (encrypt/secret.py)."""

import time
from typing import Optional, Tuple

from encrypt.ring import KeyRing
from encrypt.secret import check_secret
from store import schema
from store.kv import KV
from wire.errors import Conflict

# An on-demand rotation right after another would make the key staged a moment ago primary before every host
# has installed it (an etcd watch delivers in milliseconds, a host busy applying a ring takes longer).
MIN_ROTATION_GAP = 10.0


class KeyStore:
    """The sealed key ring in etcd, at <prefix>/encryption/keyring. Writes are compare-and-swap on the key's
    revision, so hosts rotating at the same moment make one rotation, not two."""

    def __init__(self, kv: KV, secret: bytes, prefix: str = schema.PREFIX):
        self.kv = kv
        self._secret = check_secret(secret)
        self.key = schema.Schema(prefix).keyring()

    def __repr__(self) -> str:
        return f"KeyStore({self.key})"

    def decode(self, value: str) -> KeyRing:
        """A ring from an etcd value (a watch event's)."""
        return KeyRing.unseal(value, self._secret, self.key)

    def _read(self) -> Tuple[Optional[KeyRing], int]:
        entry = self.kv.get(self.key)
        if entry is None:
            return None, 0
        return self.decode(entry.value), entry.mod_revision

    def load(self) -> Optional[KeyRing]:
        return self._read()[0]

    def read_at_revision(self) -> Tuple[Optional[KeyRing], int]:
        """The ring and the store revision it was read at (a watch resumes from revision + 1)."""
        entries, revision = self.kv.get_prefix(self.key)
        for entry in entries:
            if entry.key == self.key:
                return self.decode(entry.value), revision
        return None, revision

    def ensure(self, now: Optional[float] = None) -> KeyRing:
        """The ring, created if there is none yet (create-if-absent: the first host's wins)."""
        for _ in range(8):
            ring, _rev = self._read()
            if ring is not None:
                return ring
            fresh = KeyRing.initial(now)
            if self.kv.create(self.key, fresh.seal(self._secret, self.key)):
                return fresh
        raise Conflict(f"could not create the key ring at {self.key}: too much contention, try again")

    def rotate(self, now: Optional[float] = None, min_age: float = MIN_ROTATION_GAP) -> Tuple[KeyRing, bool]:
        """Rotate unless the ring was rotated less than `min_age` seconds ago. Returns (ring, rotated)."""
        now = time.time() if now is None else now
        for _ in range(8):
            ring, revision = self._read()
            if ring is None:
                return self.ensure(now), True
            if now - ring.rotated_at < min_age:
                return ring, False
            new = ring.rotate(now)
            if self.kv.commit(revisions={self.key: revision}, puts={self.key: new.seal(self._secret, self.key)}):
                return new, True
        raise Conflict(f"could not rotate the key ring at {self.key}: too much contention, try again")

    def prune(self) -> KeyRing:
        """Drop the previous primary now (it is dropped at the next rotation anyway)."""
        for _ in range(8):
            ring, revision = self._read()
            if ring is None:
                return self.ensure()
            new = ring.prune()
            if new == ring or self.kv.commit(revisions={self.key: revision},
                                             puts={self.key: new.seal(self._secret, self.key)}):
                return new
        raise Conflict(f"could not prune the key ring at {self.key}: too much contention, try again")
