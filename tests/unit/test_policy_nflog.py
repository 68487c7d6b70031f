"""kernel/nflog.py's parsers on packets and netlink messages built here, byte by byte from the RFC layouts (not by
the code under test): every header the policy log can carry comes back as the fields it was built from, a
truncated one loses only what was cut, and no input makes the parser raise anything but ValueError."""

import ipaddress
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel import nflog

V4 = st.ip_addresses(v=4).map(str)
V6 = st.ip_addresses(v=6).map(str)
PORT = st.integers(0, 65535)
PORTED = st.sampled_from([("tcp", 6), ("udp", 17), ("sctp", 132)])


def transport(number: int, sport: int, dport: int, icmp_type: int = 8) -> bytes:
    if number == 6:  # RFC 793: ports, seq, ack, offset 5 words, SYN
        return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x02, 65535, 0, 0)
    if number == 17:  # RFC 768
        return struct.pack("!HHHH", sport, dport, 8, 0)
    if number == 132:  # RFC 4960: common header (ports, verification tag, checksum)
        return struct.pack("!HHII", sport, dport, 0, 0)
    return struct.pack("!BBHHH", icmp_type, 0, 0, 1, 1)  # ICMP / ICMPv6 echo


def ipv4(src: str, dst: str, number: int, payload: bytes, frag_offset: int = 0, options: bytes = b"") -> bytes:
    ihl = 5 + len(options) // 4
    return struct.pack("!BBHHHBBH4s4s", (4 << 4) | ihl, 0, 4 * ihl + len(payload), 1, frag_offset, 64, number, 0,
                       ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed) + options + payload


def ipv6(src: str, dst: str, number: int, payload: bytes, extensions=()) -> bytes:
    """extensions: (kind, body) pairs in order; kind 0/43/60 (8-byte units), 44 (fragment: body is the offset),
    51 (AH, 4-byte units)."""
    chain = b""
    kinds = [k for k, _ in extensions] + [number]
    for (kind, body), following in zip(extensions, kinds[1:]):
        if kind == 44:
            chain += struct.pack("!BBHI", following, 0, body << 3, 7)
        elif kind == 51:
            chain += struct.pack("!BB", following, 4) + bytes(22)  # 6 words: (4 + 2) * 4 = 24 bytes
        else:
            chain += struct.pack("!BB", following, 0) + bytes(6)  # 8 bytes
    first = kinds[0]
    return struct.pack("!IHBB16s16s", 6 << 28, len(chain) + len(payload), first, 64,
                       ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed) + chain + payload


@settings(deadline=None)  # the machine is shared: a slow example is not a failure
@given(V4, V4, PORTED, PORT, PORT)
def test_ipv4_ports(src, dst, proto, sport, dport):
    name, number = proto
    got = nflog.parse_headers(ipv4(src, dst, number, transport(number, sport, dport)))
    assert got == nflog.Headers(src, dst, name, sport, dport)


@settings(deadline=None)  # the machine is shared: a slow example is not a failure
@given(V4, V4, st.integers(0, 255), st.binary(min_size=0, max_size=40).filter(lambda b: len(b) % 4 == 0))
def test_ipv4_icmp_and_options(src, dst, icmp_type, options):
    got = nflog.parse_headers(ipv4(src, dst, 1, transport(1, 0, 0, icmp_type), options=options))
    assert got == nflog.Headers(src, dst, "icmp", icmp_type=icmp_type)


@settings(deadline=None)  # the machine is shared: a slow example is not a failure
@given(V4, V4, PORTED, PORT, PORT, st.integers(1, 0x1FFF))
def test_ipv4_later_fragment_has_no_ports(src, dst, proto, sport, dport, offset):
    name, number = proto
    got = nflog.parse_headers(ipv4(src, dst, number, transport(number, sport, dport), frag_offset=offset))
    assert got == nflog.Headers(src, dst, name)


EXTENSION = st.one_of(st.tuples(st.sampled_from([0, 43, 60, 51]), st.just(0)), st.tuples(st.just(44), st.just(0)))


@settings(deadline=None)  # the machine is shared: a slow example is not a failure
@given(V6, V6, PORTED, PORT, PORT, st.lists(EXTENSION, max_size=3))
def test_ipv6_ports_through_extension_headers(src, dst, proto, sport, dport, extensions):
    name, number = proto
    got = nflog.parse_headers(ipv6(src, dst, number, transport(number, sport, dport), extensions))
    assert got == nflog.Headers(src, dst, name, sport, dport)


@settings(deadline=None)  # the machine is shared: a slow example is not a failure
@given(V6, V6, st.integers(0, 255))
def test_ipv6_icmp(src, dst, icmp_type):
    got = nflog.parse_headers(ipv6(src, dst, 58, transport(58, 0, 0, icmp_type)))
    assert got == nflog.Headers(src, dst, "ipv6-icmp", icmp_type=icmp_type)


@settings(deadline=None)  # the machine is shared: a slow example is not a failure
@given(V6, V6, PORTED, PORT, PORT, st.integers(1, 0x1FFF))
def test_ipv6_later_fragment_has_no_ports(src, dst, proto, sport, dport, offset):
    name, number = proto
    got = nflog.parse_headers(ipv6(src, dst, number, transport(number, sport, dport), [(44, offset)]))
    assert got == nflog.Headers(src, dst, name)


@settings(deadline=None)  # the machine is shared: a slow example is not a failure
@given(st.one_of(st.tuples(V4, V4).map(lambda a: ("4",) + a), st.tuples(V6, V6).map(lambda a: ("6",) + a)),
       PORTED, PORT, PORT, st.integers(0, 80))
def test_truncation_loses_only_what_was_cut(addresses, proto, sport, dport, cut):
    version, src, dst = addresses
    name, number = proto
    build = ipv4 if version == "4" else ipv6
    packet = build(src, dst, number, transport(number, sport, dport))
    header = 20 if version == "4" else 40
    keep = min(len(packet), header + cut)
    got = nflog.parse_headers(packet[:keep])
    if keep - header >= 4:
        assert got == nflog.Headers(src, dst, name, sport, dport)
    else:
        assert got == nflog.Headers(src, dst, name)


@settings(deadline=None)  # the machine is shared: a slow example is not a failure
@given(st.binary(max_size=120))
def test_garbage_raises_value_error_or_parses(data):
    try:
        got = nflog.parse_headers(data)
    except ValueError:
        return
    assert ipaddress.ip_address(got.src).version == ipaddress.ip_address(got.dst).version


def _attr(kind: int, body: bytes) -> bytes:
    """A netlink attribute: u16 length (header included, unpadded), u16 type, body padded to 4 bytes."""
    return struct.pack("=HH", 4 + len(body), kind) + body + bytes((-len(body)) % 4)


def nflog_packet(prefix: str, payload: bytes, seq: int, stamp=None) -> bytes:
    """NFULNL_MSG_PACKET as nfnetlink_log.c __build_packet_message lays it out."""
    attrs = _attr(1, struct.pack("!HBB", 0x0800, 2, 0))  # NFULA_PACKET_HDR: hw_protocol, hook FORWARD
    if stamp is not None:
        attrs += _attr(3, struct.pack("!QQ", stamp[0], stamp[1]))  # NFULA_TIMESTAMP
    attrs += _attr(10, prefix.encode() + b"\0") + _attr(12, struct.pack("!I", seq)) + _attr(9, payload)
    body = struct.pack("!BBH", socket.AF_INET, 0, 0x7678) + attrs  # nfgenmsg: family, version, res_id (group)
    return struct.pack("=IHHII", 16 + len(body), (4 << 8) | 0, 0, 0, 0) + body


@settings(deadline=None)  # the machine is shared: a slow example is not a failure
@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz:-", min_size=1, max_size=60), V4, V4, PORT, PORT,
       st.integers(0, 2**32 - 1), st.one_of(st.none(), st.tuples(st.integers(1, 2**33), st.integers(0, 999999))))
def test_netlink_record_to_record(prefix, src, dst, sport, dport, seq, stamp):
    data = nflog_packet(prefix, ipv4(src, dst, 6, transport(6, sport, dport)), seq, stamp)
    ack = struct.pack("=IHHIIi", 36, 2, 0, 0, 0, 0) + bytes(16)  # NLMSG_ERROR with error 0: an ack
    records, errors = nflog.parse_messages(data + ack)
    assert errors == [0] and len(records) == 1
    record = nflog.to_record(records[0], now=123.0)
    want_time = stamp[0] + stamp[1] / 1e6 if stamp else 123.0
    assert record == nflog.Record(want_time, prefix, src, dst, "tcp", sport, dport, None, seq)


def test_accounting_tells_suppressed_from_logged():
    acc = nflog.Accounting({"vxnet:drop": 10})
    for _ in range(3):
        acc.saw(nflog.Record(0.0, "vxnet:drop", "10.0.0.1", "10.0.0.2", "tcp", 1, 2))
    assert acc.suppressed({"vxnet:drop": 20, "vxnet:audit": 0}) == {"vxnet:drop": 7, "vxnet:audit": 0}
    assert acc.suppressed({"vxnet:drop": 12}) == {"vxnet:drop": 0}  # counter read before its last increments


def test_a_bridged_arp_record_gives_its_addresses_port_index_and_source_mac():
    """As measured (kernel/nflog.py): a bridge-family record carries PHYSINDEV (the port), INDEV (the bridge),
    HWADDR {len 6, pad, 8 bytes}, and the ARP packet as payload."""
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, bytes.fromhex("024200000005"),
                      bytes([10, 0, 0, 9]), bytes(6), bytes([10, 0, 0, 6]))
    attrs = (_attr(1, struct.pack("!HBB", 0x0806, 2, 0)) + _attr(6, struct.pack("!I", 7)) +
             _attr(4, struct.pack("!I", 2)) + _attr(8, struct.pack("!HH", 6, 0) + bytes.fromhex("0242000000050000")) +
             _attr(10, b"vxnet:drop:anti-spoofing:arp-ip\0") + _attr(9, arp))
    body = struct.pack("!BBH", 7, 0, 0x7678) + attrs  # NFPROTO_BRIDGE
    (parsed,), _ = nflog.parse_messages(struct.pack("=IHHII", 16 + len(body), (4 << 8) | 0, 0, 0, 0) + body)
    record = nflog.to_record(parsed, now=5.0, port="vxp0123456789a")
    assert (record.src, record.dst, record.proto, record.port, record.port_index, record.mac) == \
        ("10.0.0.9", "10.0.0.6", "arp", "vxp0123456789a", 7, "02:42:00:00:00:05")
    other = dict(parsed, NFULA_PACKET_HDR={"hw_protocol": 0x88CC}, NFULA_PAYLOAD=b"\x02\x07")
    assert nflog.to_record(other, now=5.0).proto == "ethertype-0x88cc"  # neither IP nor ARP: kept, unaddressed
    with pytest.raises(ValueError):
        nflog.to_record(dict(parsed, NFULA_PAYLOAD=arp[:20]), now=5.0)  # truncated ARP
