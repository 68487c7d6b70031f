"""Crafted ICMPv6 neighbour discovery messages, sent from inside a network namespace (a container's), and the
capture that tells whether one got across. The test image's busybox can ping and connect over IPv6 but cannot
build a neighbour advertisement or a router advertisement, so the host's python3 sends them from the container's
own network namespace (`nsenter -t PID -n`): the packets leave by the container's eth0 exactly as the container's
own would.

As a command (what send() runs inside the namespace):
    python3 -m tests.harness.ndp na  --iface eth0 --src fe80::42:aff:fec8:3202 --target fd00:50::5 --mac 02:42:...
    python3 -m tests.harness.ndp ra  --iface eth0 --src fe80::42:aff:fec8:3202 --mac 02:42:... --prefix fd99::/64

The kernel fills the ICMPv6 checksum of a raw ICMPv6 socket itself (RFC 3542 3.1), so a message here is only
its ICMPv6 header and body.
"""

import argparse
import ipaddress
import socket
import struct
import subprocess
import sys
import time
from typing import Callable, List, Sequence

from tests.harness.proc import HarnessError

REPO = __file__.rsplit("/tests/harness/", 1)[0]
ALL_NODES = "ff02::1"  # RFC 4291 2.7.1: every node on the link
# RFC 4861 7.1.2 and 6.1.2: a receiver drops a neighbour or router advertisement whose hop limit is not 255 (it
# proves the sender is on the link), so a forgery must use 255 to be a real threat.
ND_HOP_LIMIT = 255
NEIGHBOR_ADVERT = 136  # RFC 4861 4.4
ROUTER_ADVERT = 134  # RFC 4861 4.2
_OPT_TARGET_LLADDR = 2  # RFC 4861 4.6.1
_OPT_SOURCE_LLADDR = 1
_OPT_PREFIX_INFO = 3  # RFC 4861 4.6.2
_NA_OVERRIDE = 0x20000000  # the O flag: replace the cached link-layer address (what a poisoning sets)


def _mac(text: str) -> bytes:
    return bytes(int(part, 16) for part in text.split(":"))


def neighbor_advert(target: str, mac: str) -> bytes:
    """An unsolicited NA (O set, S clear: RFC 4861 7.2.6) saying target is at mac."""
    return (struct.pack("!BBHI", NEIGHBOR_ADVERT, 0, 0, _NA_OVERRIDE) + ipaddress.IPv6Address(target).packed
            + struct.pack("!BB", _OPT_TARGET_LLADDR, 1) + _mac(mac))


def router_advert(mac: str, prefix: str) -> bytes:
    """An RA offering itself as default router for 1800 s and prefix for SLAAC (L and A flags)."""
    net = ipaddress.IPv6Network(prefix)
    body = struct.pack("!BBHBBHII", ROUTER_ADVERT, 0, 0, 64, 0, 1800, 0, 0)
    body += struct.pack("!BB", _OPT_SOURCE_LLADDR, 1) + _mac(mac)
    body += struct.pack("!BBBBIII", _OPT_PREFIX_INFO, 4, net.prefixlen, 0xC0, 86400, 14400, 0)
    return body + net.network_address.packed


def _send(message: bytes, iface: str, src: str, dst: str) -> None:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    try:
        index = socket.if_nametoindex(iface)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, ND_HOP_LIMIT)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, ND_HOP_LIMIT)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
        sock.bind((src, 0, 0, index if ipaddress.IPv6Address(src).is_link_local else 0))
        sock.sendto(message, (dst, 0, 0, index))
    finally:
        sock.close()


def main(argv: Sequence[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("na", "ra"))
    parser.add_argument("--iface", default="eth0")
    parser.add_argument("--src", required=True)
    parser.add_argument("--dst", default=ALL_NODES)
    parser.add_argument("--mac", required=True)
    parser.add_argument("--target", help="na: the address the advertisement claims")
    parser.add_argument("--prefix", default="fd99::/64", help="ra: the prefix offered")
    args = parser.parse_args(argv)
    message = neighbor_advert(args.target, args.mac) if args.kind == "na" else router_advert(args.mac, args.prefix)
    _send(message, args.iface, args.src, args.dst)
    return 0


# --- from the test's side -------------------------------------------------------------------------------------------
def in_netns(pid: int, argv: Sequence[str], timeout: float = 30) -> subprocess.CompletedProcess:
    """Run argv (a program of this machine) in the network namespace of process pid only."""
    return subprocess.run(["nsenter", "-t", str(pid), "-n", "--", *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def send(pid: int, kind: str, **fields: str) -> None:
    """One crafted message from the namespace of pid (fields: the command's options, e.g. src=..., target=...)."""
    argv = [sys.executable, "-m", "tests.harness.ndp", kind]
    for key, value in fields.items():
        argv += [f"--{key}", value]
    done = in_netns(pid, argv)
    if done.returncode != 0:
        raise HarnessError(f"ndp {kind} from pid {pid} failed: {done.stderr.strip()}")


def arrives(receiver_pid: int, capture_filter: str, send_once: Callable[[], None], window: float = 3.0,
            iface: str = "eth0") -> bool:
    """True if a packet matching capture_filter (tcpdump syntax) reaches iface in receiver_pid's namespace while
    send_once() is called every 0.2 s for up to window seconds. The same window serves a check and its
    positive control, so a "no" means the packets were sent for as long as a "yes" needed at most."""
    capture = subprocess.Popen(["nsenter", "-t", str(receiver_pid), "-n", "--", "tcpdump", "-n", "-l", "-c", "1",
                                "-i", iface, capture_filter],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: List[str] = []
    try:
        # tcpdump says "listening on" once its filter is attached: only then can a miss mean anything.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            line = capture.stderr.readline()
            if not line or "listening on" in line:
                break
            lines.append(line)
        if capture.poll() is not None:
            raise HarnessError(f"tcpdump in pid {receiver_pid} exited: {''.join(lines)}{capture.stderr.read()}")
        end = time.monotonic() + window
        while time.monotonic() < end:
            send_once()
            if capture.poll() is not None:
                return capture.returncode == 0
            time.sleep(0.2)
        try:
            capture.wait(0.5)  # a packet sent last may still be on its way
        except subprocess.TimeoutExpired:
            return False
        return capture.returncode == 0
    finally:
        if capture.poll() is None:
            capture.kill()
        capture.wait()


if __name__ == "__main__":
    sys.exit(main())
