"""ESP keys: generation, the key ring (primary, staged, previous) and its sealing at rest.

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

At rest the ring is sealed with AES-256-GCM under the cluster secret (encrypt/secret.py); the etcd key name
(encrypt/keystore.py) is the associated data, so a sealed ring copied elsewhere does not open. Key material never
appears in repr(), str(), logs or exceptions.
"""

import base64
import binascii
import dataclasses
import json
import os
import time
from typing import Optional, Tuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from encrypt.secret import check_secret
from wire.errors import VxnetError

# RFC 4106 section 8.1: the keying material of rfc4106(gcm(aes)) (kernel/names.py AEAD_ALGORITHM) is the AES key
# followed by a 4-byte salt (the fixed part of the nonce). AES-128: 16 + 4 = 20 bytes, 160 bits, as the kernel's
# XFRMA_ALG_AEAD wants it.
AES_KEY_BYTES = 16
SALT_BYTES = 4
MATERIAL_BYTES = AES_KEY_BYTES + SALT_BYTES

_NONCE_BYTES = 12  # NIST SP 800-38D: 96-bit nonces for AES-GCM, random per sealing
_FORMAT = 1
MAX_TAG = 0xFFFFFFFF


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
        sealed = AESGCM(check_secret(secret)).encrypt(nonce, self._plain(), _aad(context))
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
            plain = AESGCM(check_secret(secret)).decrypt(nonce, sealed, _aad(context))
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
