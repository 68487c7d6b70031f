"""ESP keys: generation, the key ring (primary, staged, previous) and its storage in etcd, sealed at rest.

Docker never hands its Swarm IPsec keys to a plugin, so vxnet makes its own. Every host reads one key ring from
etcd. A ring holds up to three keys, each with a tag (a small integer, never reused within a ring's history):

    previous   the last primary: peers that have not yet seen the latest ring still send with it
    primary    what this host sends with
    staged     the next primary: every host already receives with it

Each host installs receiving (inbound) SAs for every key in the ring and sends with the primary only. `rotate()`
promotes the staged key to primary, stages a fresh one and drops the key before the previous primary. A key is
therefore received everywhere one full rotation before anyone sends with it, and still received one rotation
after everyone stopped: hosts that apply a ring a little later than others lose nothing (as in Docker's overlay,
which distributes three keys for the same reason).

At rest the ring is sealed with AES-256-GCM under the cluster secret (32 bytes given to every host as a setting
or file, never written to etcd); the etcd key name is the associated data, so a sealed ring copied elsewhere does
not open. Key material never appears in repr(), str(), logs or exceptions.
"""

import base64
import binascii
import dataclasses
import json
import logging
import os
import re
import threading
import time
from typing import Callable, Optional, Tuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from store import schema
from store.watchloop import WatchLoop
from wire.errors import ConfigError, Conflict, VxnetError

log = logging.getLogger(__name__)

# RFC 4106 section 8.1: the keying material of rfc4106(gcm(aes)) (kernel/names.py AEAD_ALGORITHM) is the AES key
# followed by a 4-byte salt (the fixed part of the nonce). AES-128: 16 + 4 = 20 bytes, 160 bits, as the kernel's
# XFRMA_ALG_AEAD wants it.
AES_KEY_BYTES = 16
SALT_BYTES = 4
MATERIAL_BYTES = AES_KEY_BYTES + SALT_BYTES
# RFC 4106 allows an 8, 12 or 16-byte ICV; 16 is the full GCM tag (Docker uses 8 to save MTU).
ICV_BITS = 128

SECRET_BYTES = 32  # AES-256 key that seals the ring in etcd
_NONCE_BYTES = 12  # NIST SP 800-38D: 96-bit nonces for AES-GCM, random per sealing
_FORMAT = 1
MAX_TAG = 0xFFFFFFFF
# An on-demand rotation right after another would make the key staged a moment ago primary before every host
# has installed it (an etcd watch delivers in milliseconds, a host busy applying a ring takes longer).
MIN_ROTATION_GAP = 10.0


class KeyringError(VxnetError):
    """The ring in etcd cannot be read: wrong cluster secret, corrupt or from an unknown format."""

    status = 500


@dataclasses.dataclass(frozen=True)
class Key:
    """One ESP key: 16-byte AES key + 4-byte salt, identified by its tag. repr() shows the tag only."""

    tag: int
    material: bytes = dataclasses.field(repr=False)

    def __post_init__(self):
        if not 1 <= self.tag <= MAX_TAG:
            raise ValueError(f"key tag {self.tag} outside 1..{MAX_TAG}")
        if len(self.material) != MATERIAL_BYTES:
            raise ValueError(f"key {self.tag}: {len(self.material)} bytes of material, expected {MATERIAL_BYTES}")

    @classmethod
    def generate(cls, tag: int) -> "Key":
        return cls(tag, os.urandom(MATERIAL_BYTES))

    def __repr__(self) -> str:
        return f"Key(tag={self.tag})"

    __str__ = __repr__


@dataclasses.dataclass(frozen=True)
class KeyRing:
    """Immutable: rotate() returns a new ring. Keys are ordered by tag (oldest first)."""

    keys: Tuple[Key, ...]
    primary: int
    rotated_at: float = 0.0  # time.time() of the last rotation (or creation)

    def __post_init__(self):
        tags = [k.tag for k in self.keys]
        if tags != sorted(set(tags)):
            raise ValueError(f"key ring tags must be unique and ascending, got {tags}")
        if self.primary not in tags:
            raise ValueError(f"key ring primary {self.primary} is not one of its keys {tags}")

    @classmethod
    def initial(cls, now: Optional[float] = None) -> "KeyRing":
        """A new ring: key 1 primary, key 2 staged."""
        return cls((Key.generate(1), Key.generate(2)), primary=1, rotated_at=time.time() if now is None else now)

    @property
    def tags(self) -> Tuple[int, ...]:
        return tuple(k.tag for k in self.keys)

    @property
    def primary_key(self) -> Key:
        return self.key(self.primary)

    def key(self, tag: int) -> Key:
        for k in self.keys:
            if k.tag == tag:
                return k
        raise KeyError(f"no key with tag {tag} in the ring")

    def rotate(self, now: Optional[float] = None) -> "KeyRing":
        """Promote the newest key (the staged one) to primary, stage a fresh key, keep the old primary as the
        previous key and drop anything older. A ring without a staged key (its primary is the newest) promotes
        a fresh key at once, which is only lossless if peers apply it at the same moment."""
        now = time.time() if now is None else now
        newest = self.keys[-1].tag
        if newest == self.primary:
            promoted = Key.generate(newest + 1)
            staged = Key.generate(newest + 2)
            keys = (self.primary_key, promoted, staged)
        else:
            staged = Key.generate(newest + 1)
            keys = (self.primary_key, self.key(newest), staged)
        if staged.tag > MAX_TAG:
            raise KeyringError("key tags exhausted: create a new ring")
        return KeyRing(keys, primary=keys[1].tag, rotated_at=now)

    def prune(self) -> "KeyRing":
        """Drop the keys older than the primary (the previous primary), keeping the primary and the staged key."""
        return KeyRing(tuple(k for k in self.keys if k.tag >= self.primary), self.primary, self.rotated_at)

    def __repr__(self) -> str:
        return f"KeyRing(tags={list(self.tags)}, primary={self.primary})"

    __str__ = __repr__

    # -- sealing -----------------------------------------------------------------------------------------------
    def _plain(self) -> bytes:
        return json.dumps({"primary": self.primary, "rotated_at": self.rotated_at,
                           "keys": [{"tag": k.tag, "material": k.material.hex()} for k in self.keys]},
                          sort_keys=True).encode()

    def seal(self, secret: bytes, context: str) -> str:
        """The ring encrypted with AES-256-GCM under the cluster secret; `context` (the etcd key) is bound in as
        associated data. Returns the JSON text stored in etcd."""
        nonce = os.urandom(_NONCE_BYTES)
        sealed = AESGCM(_check_secret(secret)).encrypt(nonce, self._plain(), _aad(context))
        return json.dumps({"format": _FORMAT, "cipher": "AES-256-GCM", "nonce": base64.b64encode(nonce).decode(),
                           "sealed": base64.b64encode(sealed).decode()})

    @classmethod
    def unseal(cls, text: str, secret: bytes, context: str) -> "KeyRing":
        try:
            outer = json.loads(text)
            if outer["format"] != _FORMAT:
                raise KeyringError(f"key ring at {context} has format {outer.get('format')!r}; this vxnet reads "
                                   f"format {_FORMAT}")
            nonce = base64.b64decode(outer["nonce"], validate=True)
            sealed = base64.b64decode(outer["sealed"], validate=True)
        except (ValueError, KeyError, TypeError, AttributeError, binascii.Error):
            raise KeyringError(f"key ring at {context} is not a sealed vxnet key ring") from None
        try:
            plain = AESGCM(_check_secret(secret)).decrypt(nonce, sealed, _aad(context))
        except InvalidTag:
            raise KeyringError(f"key ring at {context} does not open with this host's cluster secret "
                               "(VXNET_ENCRYPTION_SECRET differs between hosts, or the ring was altered)") from None
        try:
            raw = json.loads(plain)
            keys = tuple(Key(int(k["tag"]), bytes.fromhex(k["material"])) for k in raw["keys"])
            return cls(keys, primary=int(raw["primary"]), rotated_at=float(raw.get("rotated_at", 0.0)))
        except (ValueError, KeyError, TypeError):
            raise KeyringError(f"key ring at {context} opened but its content is malformed") from None


def _aad(context: str) -> bytes:
    return b"vxnet key ring v1\0" + context.encode()


def _check_secret(secret: bytes) -> bytes:
    if not isinstance(secret, (bytes, bytearray)) or len(secret) != SECRET_BYTES:
        raise ConfigError(f"the cluster secret must be {SECRET_BYTES} bytes")
    return bytes(secret)


def parse_secret(text: str, name: str = "VXNET_ENCRYPTION_SECRET") -> bytes:
    """32 bytes from 64 hex digits or base64 (standard or URL-safe). The error names the setting and the length
    it saw, never the value."""
    text = text.strip()
    if re.fullmatch(r"[0-9A-Fa-f]{64}", text):
        return bytes.fromhex(text)
    try:  # standard or URL-safe alphabet
        raw = base64.b64decode(text.replace("-", "+").replace("_", "/"), validate=True)
    except (ValueError, binascii.Error):
        raw = b""
    if len(raw) == SECRET_BYTES:
        return raw
    raise ConfigError(f"{name}: expected {SECRET_BYTES} bytes as 64 hex digits or base64 "
                      f"(`openssl rand -hex 32`), got {len(text)} characters that are neither")


def read_secret_file(path: str, name: str = "VXNET_ENCRYPTION_SECRET_FILE") -> bytes:
    try:
        with open(path, encoding="ascii") as f:
            return parse_secret(f.read(), f"{name} ({path})")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{name}: cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None


class KeyStore:
    """The sealed key ring in etcd, at <prefix>/encryption/keyring. Writes are compare-and-swap on the key's
    revision, so hosts rotating at the same moment make one rotation, not two."""

    def __init__(self, kv, secret: bytes, prefix: str = schema.PREFIX):
        self.kv = kv
        self._secret = _check_secret(secret)
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


class KeyRingWatcher(WatchLoop):
    """A thread: the ring in etcd -> on_ring(ring). A full read (creating the ring if there is none) at start
    and after every break, then a watch from the next revision. on_ring errors are logged and retried after a
    back-off from a fresh read, as the peer watcher does; nothing is skipped."""

    what = "key ring watch"
    failure_level = logging.ERROR  # until it is applied, encrypted peers cannot be programmed

    def __init__(self, kv, store: KeyStore, on_ring: Callable[[KeyRing], None], max_backoff: float = 2.0):
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


class KeyRotator:
    """A thread that rotates the ring every `interval` seconds. Every host runs one; the compare-and-swap in
    KeyStore.rotate and its age check make one rotation per interval, whichever host gets there first."""

    def __init__(self, store: KeyStore, interval: float, check_every: float = 60.0):
        if interval < MIN_ROTATION_GAP:
            raise ConfigError(f"key rotation interval {interval:g} s is below the minimum {MIN_ROTATION_GAP:g} s")
        self.store = store
        self.interval = interval
        self.check_every = min(check_every, interval / 2)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="key-rotator", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def tick(self, now: Optional[float] = None) -> bool:
        """One check; True if this call rotated the ring."""
        ring, rotated = self.store.rotate(now, min_age=self.interval)
        if rotated:
            log.info("key ring rotated: %s", ring)
        return rotated

    def _run(self) -> None:
        while not self._stop.wait(self.check_every):
            try:
                self.tick()
            except VxnetError as exc:
                log.error("scheduled key rotation failed, next try in %.0f s: %s", self.check_every, exc)
