"""ICMP echo (RFC 792) with Don't Fragment set, sent from inside a namespace: `vxnet doctor`'s probe of the health
overlay (netdriver/health.py). Needs root (a raw socket, CAP_NET_RAW).

Why not a ping library: the probe's socket must be made inside the health namespace (kernel/netns.py says why a
socket keeps the namespace it was made in), and every packet must leave with DF so that one too large for the
path is dropped rather than fragmented; icmplib, the one maintained pure-Python ping, makes its sockets itself in
the caller's namespace and sets no DF. Path MTU discovery "do" (IP_MTU_DISCOVER = IP_PMTUDISC_DO, ip(7)) sets
DF on every datagram and refuses locally (EMSGSIZE) one larger than the route's MTU.
"""

import dataclasses
import errno
import os
import select
import socket
import struct
import time
from typing import Dict, Optional, Sequence, Tuple

from kernel.netns import run_inside

# ip(7); Python's socket module has them on Linux since 3.x under these names, but not every build exports them.
IP_MTU_DISCOVER = getattr(socket, "IP_MTU_DISCOVER", 10)
IP_PMTUDISC_DO = getattr(socket, "IP_PMTUDISC_DO", 2)
ECHO_REPLY, ECHO_REQUEST = 0, 8
IP_HEADER = 20  # no options (RFC 791 IHL 5)
ICMP_HEADER = 8
MIN_SIZE = IP_HEADER + ICMP_HEADER


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071): one's complement of the one's-complement sum of 16-bit words."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def echo_request(ident: int, seq: int, size: int) -> bytes:
    """An ICMP echo request whose IP datagram is `size` bytes long (IP header included)."""
    if size < MIN_SIZE:
        raise ValueError(f"an echo request is at least {MIN_SIZE} bytes, not {size}")
    payload = bytes(i & 0xFF for i in range(size - MIN_SIZE))
    header = struct.pack("!BBHHH", ECHO_REQUEST, 0, 0, ident, seq)
    return struct.pack("!BBHHH", ECHO_REQUEST, 0, checksum(header + payload), ident, seq) + payload


def parse_reply(packet: bytes) -> Optional[Tuple[int, int, int]]:
    """(ident, seq, IP total length) of an echo reply as a raw socket hands it over (IP header first); None for
    anything else."""
    if len(packet) < MIN_SIZE or packet[0] >> 4 != 4:
        return None
    ihl = (packet[0] & 0x0F) * 4
    total = struct.unpack("!H", packet[2:4])[0]
    if len(packet) < ihl + ICMP_HEADER:
        return None
    kind, _code, _sum, ident, seq = struct.unpack("!BBHHH", packet[ihl:ihl + ICMP_HEADER])
    return (ident, seq, total) if kind == ECHO_REPLY else None


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One probe: rtt in seconds if a reply came, else None; error: why it could not even be sent."""
    rtt: Optional[float] = None
    error: Optional[str] = None

    @property
    def answered(self) -> bool:
        return self.rtt is not None


def probe(netns_path: Optional[str], targets: Sequence[Tuple[str, int]], timeout: float = 2.0,
          interval: float = 0.25) -> Dict[Tuple[str, int], Outcome]:
    """Echo requests with DF to every (address, IP datagram size) at once, each resent every `interval` until
    its reply comes or `timeout` has passed since the first send; the socket is made in the namespace at
    netns_path (None: here). Returns an Outcome per target. OSError if no raw socket can be made (not root)."""
    sock = run_inside(netns_path, lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP),
                      name="ping")
    try:
        sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
        sock.setblocking(False)
        ident = (os.getpid() ^ int.from_bytes(os.urandom(2), "big")) & 0xFFFF
        pending = {seq: target for seq, target in enumerate(targets, 1)}
        sent_at: Dict[int, float] = {}
        results: Dict[Tuple[str, int], Outcome] = {}
        deadline = time.monotonic() + timeout
        next_send = time.monotonic()
        while pending and time.monotonic() < deadline:
            now = time.monotonic()
            if now >= next_send:
                for seq, (address, size) in list(pending.items()):
                    try:
                        sock.sendto(echo_request(ident, seq, size), (address, 0))
                        sent_at.setdefault(seq, now)
                    except OSError as exc:
                        why = ("larger than the MTU of the route here" if exc.errno == errno.EMSGSIZE
                               else os.strerror(exc.errno or 0) or str(exc))
                        results[(address, size)] = Outcome(error=why)
                        del pending[seq]
                next_send = now + interval
            wait = max(0.0, min(next_send, deadline) - time.monotonic())
            readable, _, _ = select.select([sock], [], [], wait)
            if not readable:
                continue
            while True:
                try:
                    packet = sock.recv(65535)
                except BlockingIOError:
                    break
                reply = parse_reply(packet)
                if reply is None or reply[0] != ident or reply[1] not in pending:
                    continue
                target = pending.pop(reply[1])
                results[target] = Outcome(rtt=time.monotonic() - sent_at[reply[1]])
        for target in pending.values():
            results[target] = Outcome()
        return results
    finally:
        sock.close()
