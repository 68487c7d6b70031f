"""The cluster secret: 32 bytes given to every host as a setting or a file, never written to etcd. It seals the
key ring at rest (encrypt/ring.py). Errors name the setting and the length seen, never the value."""

import base64
import binascii
import re

from wire.errors import ConfigError

SECRET_BYTES = 32  # AES-256 key that seals the ring in etcd


def check_secret(secret: bytes) -> bytes:
    """The secret as bytes, or ConfigError if it is not SECRET_BYTES long."""
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
