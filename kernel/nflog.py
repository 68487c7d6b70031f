"""The verdict log: NFLOG records read from a netlink socket inside a network's namespace, their packet headers
parsed into (time, prefix, source, destination, protocol, ports).

nfnetlink_log (NETLINK_NETFILTER, subsystem NFNL_SUBSYS_ULOG; include/uapi/linux/netfilter/nfnetlink_log.h): a
socket binds one group of its namespace (one listener per (namespace, group): a second bind is refused with
EBUSY), sets the copy mode (packet, first `copy_range` bytes), and receives one NFULNL_MSG_PACKET per packet an
nftables `log group N` statement of that namespace logs. The policy table (netdriver/policy_nft.py) and the
anti-spoofing table (netdriver/isolation.py) of a network namespace log to kernel/names.py POLICY_NFLOG_GROUP, the
host's isolation table to ISOLATION_NFLOG_GROUP, each with a prefix naming the verdict (and the rule).

A record of the bridge family (the anti-spoofing table) carries the port the frame came in on as
NFULA_IFINDEX_PHYSINDEV (the bridge as INDEV), the frame's source MAC in NFULA_HWADDR, and a payload from the
network header whatever the EtherType: an ARP packet for ARP (hw_protocol 0x0806), an IPv6 packet for neighbour
discovery. Measured on this kernel (6.18): a ping from a port gives PHYSINDEV = the port's ifindex, INDEV = br0's.
The reader names the port (its ifindex in the reader's namespace, resolved once); a frame neither IP nor ARP is
kept with its EtherType as protocol and no addresses.

What the reader can tell about what it did not get:
  - rate-limited: the log statements are rate-limited and the verdicts' counters are not, so for each prefix
    counted - logged is what the limit suppressed (Accounting, fed the counters by the caller);
  - lost on the way: with NFULNL_CFG_F_SEQ every record carries the instance's sequence number, so a gap is
    records the kernel made and could not queue (socket buffer full), and ENOBUFS on receive says the same.
Wire of one record (attributes in network byte order, each a netlink attribute):
    nlmsghdr(type = NFNL_SUBSYS_ULOG << 8 | NFULNL_MSG_PACKET) nfgenmsg(family, version 0, res_id = group)
    NFULA_PACKET_HDR {be16 hw_protocol, u8 hook, u8 pad}   NFULA_PREFIX "vxnet:drop\\0"
    NFULA_TIMESTAMP {be64 sec, be64 usec} (only if the packet was timestamped)   NFULA_SEQ be32
    NFULA_PAYLOAD the packet from its network header, at most copy_range bytes
    NFULA_IFINDEX_PHYSINDEV be32 (bridged frames)   NFULA_HWADDR {be16 hw_addrlen, u16 pad, u8 hw_addr[8]}
"""

import dataclasses
import errno
import ipaddress
import select
import socket
import struct
import time
from typing import Dict, List, Mapping, Optional, Tuple

from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST, nla
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_ULOG, nfgen_msg

from kernel import names
from kernel.netns import run_inside
from wire.errors import KernelError

NETLINK_NETFILTER = 12  # <linux/netlink.h>
NFULNL_MSG_PACKET = 0
NFULNL_MSG_CONFIG = 1
NFULNL_CFG_CMD_BIND = 1
NFULNL_CFG_CMD_UNBIND = 2
NFULNL_COPY_PACKET = 2
NFULNL_CFG_F_SEQ = 0x0001
# How the kernel batches a group's records (net/netfilter/nfnetlink_log.c nfulnl_log_packet): a batch is sent
# when it holds the instance's queue threshold, when the next record would not fit in its buffer, or when its
# flush timer (started by the batch's first record, in 1/100 s) fires. A log rule's own queue-threshold can only
# lower the instance's, and sending flushes the whole batch. Every record sent alone costs a wake-up of this
# reader's thread on the packet's path: measured across two simulated hosts (bench --parts policy), logging each
# allowed echo-request at once added about 0.018 ms to a 0.2 ms round trip. So the logs that may wait (allowed
# connections) arrive batched, at most FLUSH_CENTISECONDS late, and drops and audit verdicts set queue-threshold 1
# in their rules (netdriver/isolation.py, netdriver/policy_nft.py) and arrive at once.
BATCH = 64  # records (~250 bytes each with a 128-byte snaplen: 16 KiB)
BATCH_BUFFER = 16384  # bytes; the kernel's default is one page, its maximum 128 KiB
FLUSH_CENTISECONDS = 25  # a batched record is read at most 0.25 s after its packet
NLMSG_ERROR = 2
NLMSG_DONE = 3
_NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id (host byte order)

# What a record carries of a packet: IPv6's 40-byte header, an 8-byte extension header and a 20-byte TCP header
# fit, with room for options; the policy table's snaplen is the same (netdriver/policy_nft.py LOG_SNAPLEN).
COPY_RANGE = 128
# The socket's receive buffer: ~200 bytes a record, so 1 MiB holds a few thousand before the kernel drops.
RCVBUF = 1 << 20

_PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "ipv6-icmp", 132: "sctp"}
_PORTS = (6, 17, 132)  # TCP, UDP and SCTP all begin with the 16-bit source and destination ports (RFC 793, 768,
#                        4960)
# IPv6 extension headers a transport header may follow (RFC 8200 4.1): hop-by-hop, routing, destination options
# (length in 8-byte units, not counting the first 8), fragment (always 8 bytes), AH (RFC 4302: 4-byte units + 2).
_EXTENSIONS = (0, 43, 60)
_FRAGMENT = 44
_AH = 51
# EtherTypes (IEEE 802 numbers) a record's hw_protocol may say.
ETH_P_IP, ETH_P_IPV6, ETH_P_ARP = 0x0800, 0x86DD, 0x0806
# An Ethernet/IPv4 ARP packet (RFC 826): htype, ptype, hlen, plen, oper (8 bytes), then sender MAC (6), sender IP
# (4), target MAC (6), target IP (4).
_ARP = struct.Struct("!HHBBH6s4s6s4s")


class nflog_msg(nfgen_msg):
    """NFULNL_MSG_PACKET (decoded with pyroute2's netlink attribute machinery)."""
    prefix = "NFULA_"
    nla_map = (
        ("NFULA_UNSPEC", "none"),
        ("NFULA_PACKET_HDR", "packet_hdr"),
        ("NFULA_MARK", "be32"),
        ("NFULA_TIMESTAMP", "timestamp"),
        ("NFULA_IFINDEX_INDEV", "be32"),
        ("NFULA_IFINDEX_OUTDEV", "be32"),
        ("NFULA_IFINDEX_PHYSINDEV", "be32"),
        ("NFULA_IFINDEX_PHYSOUTDEV", "be32"),
        ("NFULA_HWADDR", "hex"),
        ("NFULA_PAYLOAD", "cdata"),
        ("NFULA_PREFIX", "asciiz"),
        ("NFULA_UID", "be32"),
        ("NFULA_SEQ", "be32"),
        ("NFULA_SEQ_GLOBAL", "be32"),
    )

    class packet_hdr(nla):
        fields = (("hw_protocol", ">H"), ("hook", "B"), ("pad", "B"))

    class timestamp(nla):
        fields = (("sec", ">Q"), ("usec", ">Q"))


class nflog_config(nfgen_msg):
    """NFULNL_MSG_CONFIG."""
    prefix = "NFULA_CFG_"
    nla_map = (
        ("NFULA_CFG_UNSPEC", "none"),
        ("NFULA_CFG_CMD", "cfg_cmd"),
        ("NFULA_CFG_MODE", "cfg_mode"),
        ("NFULA_CFG_NLBUFSIZ", "be32"),
        ("NFULA_CFG_TIMEOUT", "be32"),
        ("NFULA_CFG_QTHRESH", "be32"),
        ("NFULA_CFG_FLAGS", "be16"),
    )

    class cfg_cmd(nla):
        fields = (("command", "B"),)

    class cfg_mode(nla):
        fields = (("copy_range", ">I"), ("copy_mode", "B"), ("pad", "B"))


@dataclasses.dataclass(frozen=True)
class Headers:
    """What the packet headers say. proto: a name of _PROTO_NAMES or the number as text; sport/dport: 0 without
    ports (ICMP, a non-first fragment, a truncated header); icmp_type: ICMP's or ICMPv6's type, else None."""
    src: str
    dst: str
    proto: str
    sport: int = 0
    dport: int = 0
    icmp_type: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class Record:
    """One logged packet. timestamp: seconds since the epoch (the packet's own timestamp if the kernel stamped
    it, else when it was read); seq: the instance's sequence number (None if the kernel sent none); port: the
    bridge port it came in on (a bridged frame's PHYSINDEV, named in the reader's namespace; "" if none or
    unknown), port_index its ifindex (0: none); mac: the frame's source MAC ("" if the record has none)."""
    timestamp: float
    prefix: str
    src: str
    dst: str
    proto: str
    sport: int
    dport: int
    icmp_type: Optional[int] = None
    seq: Optional[int] = None
    port: str = ""
    port_index: int = 0
    mac: str = ""


def parse_headers(packet: bytes) -> Headers:
    """The IPv4 or IPv6 packet (from its network header, possibly truncated after the transport ports) -> its
    addresses, protocol and ports. ValueError if it is not an IPv4 or IPv6 packet or too short for its addresses."""
    if not packet:
        raise ValueError("empty packet")
    version = packet[0] >> 4
    if version == 4:
        if len(packet) < 20:
            raise ValueError(f"IPv4 header truncated ({len(packet)} bytes)")
        ihl = (packet[0] & 0x0F) * 4
        if ihl < 20:
            raise ValueError(f"IPv4 header length {ihl} < 20")
        proto = packet[9]
        src, dst = str(ipaddress.IPv4Address(packet[12:16])), str(ipaddress.IPv4Address(packet[16:20]))
        # A non-first fragment (offset != 0) carries no transport header (RFC 791).
        offset = struct.unpack("!H", packet[6:8])[0] & 0x1FFF
        transport = packet[ihl:] if offset == 0 else b""
    elif version == 6:
        if len(packet) < 40:
            raise ValueError(f"IPv6 header truncated ({len(packet)} bytes)")
        src, dst = str(ipaddress.IPv6Address(packet[8:24])), str(ipaddress.IPv6Address(packet[24:40]))
        proto, at, transport = packet[6], 40, b""
        while True:
            if proto in _EXTENSIONS or proto == _AH:
                if len(packet) < at + 2:
                    break
                length = (packet[at + 1] + 2) * 4 if proto == _AH else (packet[at + 1] + 1) * 8
                proto, at = packet[at], at + length
            elif proto == _FRAGMENT:
                if len(packet) < at + 8:
                    break
                offset = struct.unpack("!H", packet[at + 2:at + 4])[0] >> 3
                proto, at = packet[at], at + 8
                if offset != 0:
                    break  # a later fragment: no transport header
            else:
                transport = packet[at:]
                break
    else:
        raise ValueError(f"IP version {version}: not an IPv4 or IPv6 packet")
    name = _PROTO_NAMES.get(proto, str(proto))
    if proto in _PORTS and len(transport) >= 4:
        sport, dport = struct.unpack("!HH", transport[:4])
        return Headers(src, dst, name, sport, dport)
    if proto in (1, 58) and transport:
        return Headers(src, dst, name, icmp_type=transport[0])
    return Headers(src, dst, name)


def parse_arp(packet: bytes) -> Headers:
    """An Ethernet/IPv4 ARP packet -> its sender and target IPv4 addresses, protocol "arp" (ValueError if it is
    not one or is truncated)."""
    if len(packet) < _ARP.size:
        raise ValueError(f"ARP packet truncated ({len(packet)} bytes)")
    _htype, ptype, hlen, plen, _oper, _sha, spa, _tha, tpa = _ARP.unpack_from(packet)
    if (ptype, hlen, plen) != (ETH_P_IP, 6, 4):
        raise ValueError(f"ARP for protocol 0x{ptype:04x} with {hlen}/{plen}-byte addresses: not Ethernet/IPv4")
    return Headers(str(ipaddress.IPv4Address(spa)), str(ipaddress.IPv4Address(tpa)), "arp")


def _mac(hwaddr) -> str:
    """NFULA_HWADDR (as pyroute2's "hex" decodes it: "00:06:00:00:02:42:...") -> the address, "" if none."""
    octets = bytes(int(b, 16) for b in hwaddr.split(":")) if isinstance(hwaddr, str) and hwaddr else b""
    if len(octets) < 4:
        return ""
    length = min(struct.unpack("!H", octets[:2])[0], len(octets) - 4)
    return ":".join(f"{b:02x}" for b in octets[4:4 + length])


def parse_messages(data: bytes) -> Tuple[List[dict], List[int]]:
    """A buffer read from the socket -> (the records' attributes as {NFULA_ name: value}, the errnos of the error
    and acknowledgement messages in it, 0 for an ack)."""
    records, errors = [], []
    at = 0
    while at + _NLMSGHDR.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, at)
        if length < _NLMSGHDR.size or at + length > len(data):
            break
        if kind == NLMSG_ERROR:
            errors.append(-struct.unpack_from("=i", data, at + _NLMSGHDR.size)[0])
        elif kind == (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET:
            msg = nflog_msg(data[at:at + length])
            msg.decode()
            records.append({name: value for name, value in msg["attrs"]})
        at += (length + 3) & ~3  # NLMSG_ALIGN
    return records, errors


def to_record(attrs: dict, now: float, port: str = "") -> Record:
    """A record's attributes -> Record (ValueError if its payload is not an IPv4/IPv6 packet, or for a bridged
    frame not what its EtherType says). port: the name of the port's ifindex, for the caller to give."""
    payload = attrs.get("NFULA_PAYLOAD") or b""
    ethertype = (attrs.get("NFULA_PACKET_HDR") or {}).get("hw_protocol", 0)
    if ethertype == ETH_P_ARP:
        headers = parse_arp(payload)
    elif ethertype not in (0, ETH_P_IP, ETH_P_IPV6) and attrs.get("NFULA_IFINDEX_PHYSINDEV"):
        headers = Headers("", "", f"ethertype-0x{ethertype:04x}")  # a bridged frame of another protocol
    else:
        headers = parse_headers(payload)
    stamp = attrs.get("NFULA_TIMESTAMP")
    when = stamp["sec"] + stamp["usec"] / 1e6 if stamp else now
    return Record(when, attrs.get("NFULA_PREFIX") or "", headers.src, headers.dst, headers.proto, headers.sport,
                  headers.dport, headers.icmp_type, attrs.get("NFULA_SEQ"), port,
                  int(attrs.get("NFULA_IFINDEX_PHYSINDEV") or 0), _mac(attrs.get("NFULA_HWADDR")))


def _config(group: int, attrs: list) -> bytes:
    msg = nflog_config()
    msg["header"]["type"] = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG
    msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK
    msg["nfgen_family"] = socket.AF_UNSPEC
    msg["res_id"] = group
    msg["attrs"] = attrs
    msg.encode()
    return bytes(msg.data)


class Reader:
    """The NFLOG records of one group in one namespace.

    reader = Reader(netns_path)      # opens and binds; KernelError if refused (EBUSY: someone else listens)
    reader.read(timeout) -> [Record] # what arrived within timeout seconds (at least one if any arrived)
    reader.lost                      # records the kernel made and we did not get (sequence gaps, ENOBUFS)
    reader.unparsable                # records whose payload was not an IPv4/IPv6 packet
    reader.close()
    """

    def __init__(self, netns_path: Optional[str], group: int = names.POLICY_NFLOG_GROUP,
                 copy_range: int = COPY_RANGE):
        self.group = group
        self._netns_path = netns_path
        self._ports: Dict[int, str] = {}  # ifindex -> name in this namespace (ifindexes are not reused soon:
        #                                   the kernel allocates them cyclically, net/core/dev.c dev_index_reserve)
        self.lost = 0
        self.unparsable = 0
        self._next_seq: Optional[int] = None
        self._pending: List[Record] = []  # parsed, not yet returned by read()
        where = netns_path or "the host namespace"
        try:
            # The socket belongs to the namespace it is made in (kernel/netns.py), whichever thread reads it.
            self._sock = run_inside(netns_path, lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW,
                                                                      NETLINK_NETFILTER), name="nflog")
        except OSError as exc:
            raise KernelError(f"NFLOG socket in {where}: {exc.strerror}", exc.errno) from None
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            self._sock.bind((0, 0))
            self._request([["NFULA_CFG_CMD", {"command": NFULNL_CFG_CMD_BIND}]], f"bind NFLOG group {group}",
                          where)
            self._request([["NFULA_CFG_MODE", {"copy_range": copy_range, "copy_mode": NFULNL_COPY_PACKET,
                                               "pad": 0}],
                           # Records are batched (module constants BATCH, FLUSH_CENTISECONDS): a rule whose log
                           # must arrive at once (every drop) says queue-threshold 1, which overrides these.
                           ["NFULA_CFG_QTHRESH", BATCH],
                           ["NFULA_CFG_TIMEOUT", FLUSH_CENTISECONDS],
                           ["NFULA_CFG_NLBUFSIZ", BATCH_BUFFER],
                           ["NFULA_CFG_FLAGS", NFULNL_CFG_F_SEQ]], f"configure NFLOG group {group}", where)
        except BaseException:
            self._sock.close()
            raise

    def _request(self, attrs: list, what: str, where: str) -> None:
        self._sock.send(_config(self.group, attrs))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self._sock], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            records, errors = parse_messages(self._sock.recv(65536))
            self._take(records, time.time())
            if errors:
                if errors[0]:
                    why = "another listener holds the group" if errors[0] == errno.EBUSY else "refused"
                    raise KernelError(f"{what} in {where}: {errno.errorcode.get(errors[0], errors[0])} ({why})",
                                      errors[0])
                return
        raise KernelError(f"{what} in {where}: no answer from nfnetlink_log")

    def _take(self, records: List[dict], now: float) -> None:
        for attrs in records:
            seq = attrs.get("NFULA_SEQ")
            if seq is not None:
                if self._next_seq is not None and seq != self._next_seq:
                    self.lost += (seq - self._next_seq) & 0xFFFFFFFF
                self._next_seq = (seq + 1) & 0xFFFFFFFF
            try:
                self._pending.append(to_record(attrs, now, self._port(attrs.get("NFULA_IFINDEX_PHYSINDEV"))))
            except ValueError:
                self.unparsable += 1

    def _port(self, index) -> str:
        """The name of a port ifindex in this reader's namespace, "" if none or gone (asked once per index)."""
        if not index:
            return ""
        if index not in self._ports:
            if len(self._ports) >= 4096:  # a bound: ports come and go with containers
                self._ports.clear()
            try:
                self._ports[index] = run_inside(self._netns_path, lambda: socket.if_indextoname(index),
                                                name="nflog-port")
            except OSError:
                return ""  # the port went before its record was read
        return self._ports[index]

    def read(self, timeout: float) -> List[Record]:
        """Every record that arrives within timeout seconds of the call, returning as soon as there is one (what
        arrived during configuration included)."""
        if self._pending:
            out, self._pending = self._pending, []
            return out
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self._sock], [], [], max(0.0, left))
            if not ready:
                return []
            try:
                data = self._sock.recv(65536)
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:  # the kernel dropped records: the next sequence number says how many
                    continue
                raise
            records, _ = parse_messages(data)
            self._take(records, time.time())
            out, self._pending = self._pending, []
            if out or left <= 0:
                return out

    def close(self) -> None:
        try:
            self._sock.send(_config(self.group, [["NFULA_CFG_CMD", {"command": NFULNL_CFG_CMD_UNBIND}]]))
        except OSError:
            pass  # closing the socket unbinds too (nfulnl_rcv_nl_event on NETLINK_URELEASE)
        self._sock.close()


class Accounting:
    """Which verdicts were rate-limited out of the log: the records seen per prefix against the exact counters of
    the rules that log them (netdriver/policy_nft.py LOGGED: prefix -> rule comment), both since the start.

    acc = Accounting(counted)        # counted: {prefix: packets} read when the reader started
    acc.saw(record)
    acc.suppressed(counted_now) -> {prefix: packets counted but not logged} (rate limit, plus any lost)
    """

    def __init__(self, counted: Mapping[str, int]):
        self._start = dict(counted)
        self.logged: Dict[str, int] = {}

    def saw(self, record: Record) -> None:
        self.logged[record.prefix] = self.logged.get(record.prefix, 0) + 1

    def suppressed(self, counted: Mapping[str, int]) -> Dict[str, int]:
        # The log rule runs just before its counter on the same packet, so a counter read in between can be one
        # behind a record: never report less than nothing.
        return {prefix: max(0, count - self._start.get(prefix, 0) - self.logged.get(prefix, 0))
                for prefix, count in counted.items()}
