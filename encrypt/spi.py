"""Deterministic SPIs: both ends of a VTEP pair compute the same SPI for a direction and a key, without talking.

An ESP SA is found on receipt by (destination address, SPI, protocol), so the receiver must know the SPI the
sender uses. Deriving it from (source VTEP, destination VTEP, key tag) gives every host the same answer from
what etcd already tells it. Each direction has its own SPI (source and destination are ordered), and each key
its own, so during a rotation the old and the new SA of one direction are told apart by SPI alone.

RFC 4303 section 2.1: SPI 0 is reserved for local use and 1-255 are reserved by IANA; they never go on the wire.
"""

import hashlib
import ipaddress

SPI_MIN = 256  # RFC 4303 2.1: 0-255 reserved
SPI_MAX = 0xFFFFFFFF  # the SPI is a 32-bit field
_DOMAIN = b"vxnet-esp-spi-v1"  # separates these hashes from any other use of the same inputs


def spi_for(src: str, dst: str, tag: int) -> int:
    """The SPI of the SA that carries VXLAN from VTEP `src` to VTEP `dst` under the key with this tag.

    SHA-256 over the packed addresses and the tag, truncated to 32 bits and folded into 256..2^32-1. Two SAs that
    one host receives (same dst) collide only if two (src, tag) pairs hash alike: about n^2 / 2^33 for n of
    them, so a collision is reported by the kernel (EEXIST on a different SA) rather than silently shared."""
    if not 0 <= tag <= 0xFFFFFFFF:
        raise ValueError(f"key tag {tag} is outside 0..2^32-1")
    digest = hashlib.sha256(_DOMAIN + ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed +
                            tag.to_bytes(4, "big")).digest()
    return SPI_MIN + int.from_bytes(digest[:4], "big") % (SPI_MAX - SPI_MIN + 1)
