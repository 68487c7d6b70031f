"""Crafted IPv6 neighbour discovery messages, sent from inside a "container" namespace by a test:

    python3 nd_probe.py na SRC DST TARGET MAC     unsolicited neighbour advertisement, override flag set, claiming
                                                 TARGET is at MAC (RFC 4861 4.4), unicast to DST
    python3 nd_probe.py ra SRC IFNAME PREFIX MAC router advertisement from link-local SRC to all nodes on IFNAME,
                                                 with router lifetime 1800 s and PREFIX (/64) for SLAAC (4.2, 4.6.2)

An ICMPv6 raw socket: the kernel fills in the checksum (RFC 3542 3.1); neighbour discovery must arrive with hop
limit 255 or receivers ignore it (RFC 4861 7.1.2, 6.1.2), so the socket sends with 255.
"""

import ipaddress
import socket
import struct
import sys

HOPS = 255


def _mac(text: str) -> bytes:
    return bytes(int(b, 16) for b in text.split(":"))


def _socket(src: str, scope: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, HOPS)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, HOPS)
    sock.bind((src, 0, 0, scope))
    return sock


def neighbour_advert(target: str, mac: str) -> bytes:
    # type 136, code 0, checksum (kernel), flags R=0 S=0 O=1, target; option 2 (target link-layer address), 8 bytes
    return (struct.pack("!BBHI", 136, 0, 0, 0x20000000) + ipaddress.IPv6Address(target).packed +
            struct.pack("!BB", 2, 1) + _mac(mac))


def router_advert(prefix: str, mac: str) -> bytes:
    # type 134: cur hop limit 64, no flags, router lifetime 1800 s, reachable and retrans timers unspecified
    head = struct.pack("!BBHBBHII", 134, 0, 0, 64, 0, 1800, 0, 0)
    net = ipaddress.IPv6Network(prefix)
    # option 3 (prefix information, 32 bytes): on-link and autonomous, valid 86400 s, preferred 14400 s
    info = struct.pack("!BBBBIII", 3, 4, net.prefixlen, 0xC0, 86400, 14400, 0) + net.network_address.packed
    return head + info + struct.pack("!BB", 1, 1) + _mac(mac)  # option 1: source link-layer address


def main(argv):
    kind = argv[0]
    if kind == "na":
        src, dst, target, mac = argv[1:]
        _socket(src).sendto(neighbour_advert(target, mac), (dst, 0))
    elif kind == "ra":
        src, ifname, prefix, mac = argv[1:]
        scope = socket.if_nametoindex(ifname)
        _socket(src, scope).sendto(router_advert(prefix, mac), ("ff02::1", 0, 0, scope))
    else:
        raise SystemExit(f"unknown probe {kind!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
