"""The ESP checks, run inside the qemu guest (tests/ipsec/guest.py) by test_esp_guest.py: a kernel with ESP.

    python3 -m tests.ipsec.inguest        # inside the guest only: it builds namespaces and programs IPsec

Two simulated hosts h1 and h2 (network namespaces) joined by veth to a bridge in a namespace of its own (ul),
each with what vxnet builds for an encrypted network: a namespace (hN-net) holding a bridge and a VXLAN device on
port 4790 that was created in the host namespace (so its UDP socket, and the IPsec of its traffic, stay there),
and a 'container' namespace (hN-c) wired to that bridge. IPsec is programmed in each host namespace with
encrypt/ (EncryptionManager over Xfrm and Firewall), exactly as the plugin does in the host namespace. A capture
on the underlay bridge sees everything that crosses between the hosts.

Each check prints one line `VXNET-CHECK {"name", "ok", "detail", "seconds"}`; the checks run in order on one
shared topology, and after a failed check marked essential the rest are reported as not run.
"""

import json
import os
import re
import secrets
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from typing import Callable, Dict, List, Optional

from encrypt import manager as mgr
from encrypt.firewall import LABEL_IN, LABEL_OUT, Firewall
from encrypt.ring import MATERIAL_BYTES, KeyRing
from encrypt.spi import spi_for
from kernel import mtu, names
from kernel.links import Links
from kernel.names import AEAD_ALGORITHM
from kernel.names import XFRM_REQID as REQID
from kernel.netns import run_inside
from kernel.probes import EspProbe
from kernel.xfrm import XFRM_MODE_TRANSPORT, Xfrm
from tests.harness.proc import wait_until

PORT = names.ENCRYPTED_VXLAN_PORT
VNI = 4242
UNDERLAY_MTU = 1500
MTU = mtu.inner_mtu(UNDERLAY_MTU)
VTEP = {"h1": "192.168.77.1", "h2": "192.168.77.2"}
CONTAINER = {"h1": "10.50.0.1", "h2": "10.50.0.2"}
PEER = {"h1": "h2", "h2": "h1"}
SEGMENT = "segment-a"
MARKER = "VXNET-CHECK"


def sh(*argv: str, check: bool = True, timeout: float = 30) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


class Host:
    def __init__(self, name: str, nft: Links):
        """nft: nftables as the plugin writes it (libnftables, a context per namespace on one thread)."""
        self.name = name
        self.vtep = VTEP[name]
        self.netns = f"/run/netns/{name}"
        self.xfrm: Optional[Xfrm] = None
        self.firewall = Firewall(PORT, nft.nft, name)
        self.manager: Optional[mgr.EncryptionManager] = None

    def restart_manager(self) -> mgr.EncryptionManager:
        """A fresh manager, as after a plugin restart: it knows nothing; the kernel keeps what was there."""
        if self.xfrm is not None:
            self.xfrm.close()
        self.xfrm = Xfrm(self.netns)
        self.manager = mgr.EncryptionManager(self.xfrm, self.firewall, PORT)
        return self.manager

    @property
    def peer_vtep(self) -> str:
        return VTEP[PEER[self.name]]


# A probe's frames. Locally administered unicast MACs (first octet 0x02) that no interface here has: the bridge
# floods a frame to an unknown MAC to every port (and to its own device, promiscuous while tcpdump captures), and
# each host's interface marks it PACKET_OTHERHOST, which ip_rcv drops before netfilter or XFRM: the probe moves no
# counter the checks read.
PROBE_DST_MAC = bytes.fromhex("027678000001")
PROBE_SRC_MAC = bytes.fromhex("027678000002")
ETH_P_ALL = 0x0003  # <linux/if_ether.h>
ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_MARKER = 0x88B5  # IEEE 802 local experimental ethertype 1: no protocol takes it
PROBE_SPI = 0x76786E74  # outside vxnet's SPIs (spi_for sets the top bit) and the reserved 1-255 (RFC 4303 2.1)
# Outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14 + IPv6 40 = 104 bytes before the inner
# upper-layer header: 128 holds an ICMPv6 type and TCP ports (inner_packet), and no payload worth the name.
SNAPLEN = 128
PROBE_FRAME = 64  # every probe frame is this long: above Ethernet's 60-byte minimum, so nothing pads it, and
                  # within the snap length, so the capture holds it whole


def ipv4_frame(src: str, dst: str, proto: int, payload: bytes) -> bytes:
    """Ethernet + IPv4 (with its header checksum, RFC 791) + payload, padded to PROBE_FRAME bytes."""
    payload += bytes(max(0, PROBE_FRAME - 34 - len(payload)))
    header = bytearray(struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0x4000, 64, proto, 0,
                                   socket.inet_aton(src), socket.inet_aton(dst)))
    total = sum(struct.unpack(">10H", header))
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    struct.pack_into(">H", header, 10, ~total & 0xFFFF)
    return PROBE_DST_MAC + PROBE_SRC_MAC + struct.pack(">H", ETHERTYPE_IPV4) + bytes(header) + payload


def socket_in(netns: str, *args) -> socket.socket:
    """socket.socket(*args) created in the network namespace at path netns (it stays there), by a thread of its
    own (kernel/netns.py); the caller's threads never move."""
    return run_inside(netns, lambda: socket.socket(*args), name="probe-netns")


class Probe:
    """Frames written straight onto one host's underlay interface with a packet socket opened in its namespace:
    they cross the underlay bridge as that host's VXLAN or ESP would, but pass neither its nftables nor its XFRM
    (a packet socket's frames go to the driver directly), so a cleartext VXLAN frame can be sent even while the
    protection holds. Each frame carries a nonce, which tells one capture's frames from another's."""

    def __init__(self, netns: str, iface: str, src: str, dst: str):
        self.src, self.dst = src, dst
        self.sock = socket_in(netns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.bind((iface, 0))

    def cleartext_vxlan(self, nonce: bytes) -> bytes:
        """UDP to the encrypted networks' port, VXLAN header (RFC 7348: flags 0x08, VNI), then the nonce."""
        vxlan = struct.pack(">B3xI", 0x08, VNI << 8) + nonce
        udp = struct.pack(">HHHH", PORT, PORT, 8 + len(vxlan), 0) + vxlan  # checksum 0: none (RFC 768)
        return ipv4_frame(self.src, self.dst, 17, udp)

    def esp(self, nonce: bytes) -> bytes:
        """An ESP header (RFC 4303: SPI, sequence number), then the nonce."""
        return ipv4_frame(self.src, self.dst, 50, struct.pack(">II", PROBE_SPI, 1) + nonce)

    def marker(self, nonce: bytes) -> bytes:
        """Not IPv4: no count of parse_pcap's includes it."""
        frame = PROBE_DST_MAC + PROBE_SRC_MAC + struct.pack(">H", ETHERTYPE_MARKER) + b"vxnet-end" + nonce
        return frame + bytes(PROBE_FRAME - len(frame))

    def send(self, frame: bytes) -> None:
        self.sock.send(frame)

    def close(self) -> None:
        self.sock.close()


class Capture:
    """tcpdump on the underlay bridge into a pcap file; stop() returns what crossed, by kind (parse_pcap's counts).

    Synchronised, never timed: it is ready when tcpdump said it listens and, as the positive control of every
    check that counts on it, the capture file holds a cleartext VXLAN frame and an ESP frame sent by `probe` from
    the sending host's underlay interface, each counted by parse_pcap's rules as the kind it is. stop() sends a
    final marker frame the same way and waits until the file holds it; the counts are of what crossed between
    the controls and the marker, and a capture that lost packets (tcpdump's kernel drop count) fails.
    Immediate mode and -U: each packet is handed over and written as it comes, so the file can be read while
    tcpdump runs."""

    TIMEOUT = 30  # under TCG on a loaded machine tcpdump can take seconds to start and to catch up

    def __init__(self, probe: Probe, ns: str = "ul", iface: str = "br0", enter: Optional[List[str]] = None):
        fd, self.path = tempfile.mkstemp(suffix=".pcap")
        os.close(fd)
        self.probe = probe
        self.nonce = secrets.token_bytes(8)
        self.proc = subprocess.Popen((enter or ["ip", "netns", "exec", ns]) + [
            "tcpdump", "-i", iface, "-n", "-U", "-Z", "root", "--immediate-mode", "-s", str(SNAPLEN),
            "-w", self.path], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        ready = threading.Event()
        self.stderr: List[str] = []

        def read():
            for line in self.proc.stderr:
                self.stderr.append(line)
                if "listening on" in line:
                    ready.set()
            ready.set()

        self.reader = threading.Thread(target=read, daemon=True)
        self.reader.start()
        try:
            if not ready.wait(self.TIMEOUT) or self.proc.poll() is not None:
                raise RuntimeError(f"tcpdump did not start: {''.join(self.stderr)}")
            self.controls = {"udp_encrypted_port": probe.cleartext_vxlan(self.nonce), "esp": probe.esp(self.nonce)}
            for kind, frame in self.controls.items():
                assert classify(frame) == kind, f"parse_pcap would not count the control frame as {kind}"
                probe.send(frame)
            wait_until(lambda: all(f in self._frames() for f in self.controls.values()), self.TIMEOUT,
                       f"the capture to record the control frames (cleartext VXLAN, ESP) from {probe.src}")
        except BaseException:
            self._end()
            os.unlink(self.path)
            raise

    def _frames(self) -> List[bytes]:
        with open(self.path, "rb") as f:
            return pcap_frames(f.read())

    def _end(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=self.TIMEOUT)
        self.reader.join(timeout=self.TIMEOUT)

    def stop(self) -> Dict[str, int]:
        marker = self.probe.marker(self.nonce)
        try:
            self.probe.send(marker)
            wait_until(lambda: marker in self._frames(), self.TIMEOUT, "the capture to record its final marker")
        finally:
            self._end()
        frames = self._frames()
        os.unlink(self.path)
        dropped = re.search(r"(\d+) packets? dropped by kernel", "".join(self.stderr))
        assert dropped and dropped.group(1) == "0", f"the capture lost packets: {''.join(self.stderr).strip()}"
        first = max(frames.index(f) for f in self.controls.values()) + 1
        return count_frames(frames[first:frames.index(marker)])


def pcap_frames(data: bytes) -> List[bytes]:
    """The frames of a pcap file (as captured: up to the snap length); a record still being written is left
    out."""
    if len(data) < 24:
        return []
    magic, = struct.unpack_from("<I", data, 0)
    endian = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    frames = []
    offset = 24
    while offset + 16 <= len(data):
        _sec, _frac, incl, _orig = struct.unpack_from(endian + "IIII", data, offset)
        if offset + 16 + incl > len(data):
            break
        frames.append(data[offset + 16:offset + 16 + incl])
        offset += 16 + incl
    return frames


def classify(frame: bytes) -> Optional[str]:
    """An Ethernet frame's kind for parse_pcap: esp, udp_encrypted_port (cleartext VXLAN of encrypted networks),
    udp_other, other (any other IPv4); None if it is not IPv4."""
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":
        return None
    ip = frame[14:]
    ihl = (ip[0] & 0x0F) * 4
    proto = ip[9]
    if proto == 50:
        return "esp"
    if proto == 17 and len(ip) >= ihl + 4:
        dport, = struct.unpack_from(">H", ip, ihl + 2)
        return "udp_encrypted_port" if dport == PORT else "udp_other"
    return "other"


ETHERTYPE_IPV6 = 0x86DD
IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMPV6 = 6, 17, 58
ICMPV6_ECHO = (128, 129)  # echo request, echo reply (RFC 4443 4.1, 4.2)
VXLAN_FLAG_I = 0x08  # RFC 7348 5: the I flag (VNI valid); the other flag bits are reserved, sent as 0


def inner_packet(frame: bytes) -> Optional[str]:
    """What a cleartext VXLAN frame carries, read from its inner Ethernet frame: "ipv6-echo" (ICMPv6 echo request
    or reply), "ipv6-tcp", "ipv6" (any other IPv6), "ipv4"; None if the frame is not UDP to a VXLAN port
    (vxnet's 4789 or 4790) with a VXLAN header, or was cut before the inner type. An inner IPv6 header cut
    before its upper-layer byte still counts as "ipv6". Only the first next-header is read: a packet with
    extension headers (MLD's hop-by-hop) is "ipv6"."""
    if classify(frame) not in ("udp_encrypted_port", "udp_other"):
        return None
    udp = 14 + (frame[14] & 0x0F) * 4
    vxlan, inner = udp + 8, udp + 16
    if len(frame) < inner + 14:
        return None
    dport, = struct.unpack_from(">H", frame, udp + 2)
    if dport not in (PORT, names.VXLAN_PORT) or frame[vxlan] != VXLAN_FLAG_I:
        return None
    ethertype, = struct.unpack_from(">H", frame, inner + 12)
    ip = inner + 14
    if ethertype == ETHERTYPE_IPV4:
        return "ipv4"
    if ethertype != ETHERTYPE_IPV6:
        return None
    if len(frame) < ip + 7:
        return "ipv6"
    if frame[ip] >> 4 != 6:
        return None
    next_header = frame[ip + 6]
    if next_header == IPPROTO_TCP:
        return "ipv6-tcp"
    if next_header == IPPROTO_ICMPV6 and len(frame) > ip + 40 and frame[ip + 40] in ICMPV6_ECHO:
        return "ipv6-echo"
    return "ipv6"


INNER_COUNTS = {"ipv4": "inner_ipv4", "ipv6": "inner_ipv6", "ipv6-echo": "inner_ipv6_echo",
                "ipv6-tcp": "inner_ipv6_tcp"}


def count_frames(frames: List[bytes]) -> Dict[str, int]:
    """parse_pcap's counts: by classify()'s kind, max_ip_len, and what cleartext VXLAN carried (inner_packet()):
    inner_ipv4, inner_ipv6 (every inner IPv6 packet), of which inner_ipv6_echo and inner_ipv6_tcp."""
    counts = {"esp": 0, "udp_encrypted_port": 0, "udp_other": 0, "other": 0, "max_ip_len": 0,
              **{key: 0 for key in INNER_COUNTS.values()}}
    for frame in frames:
        kind = classify(frame)
        if kind is None:
            continue
        counts[kind] += 1
        total, = struct.unpack_from(">H", frame, 14 + 2)
        counts["max_ip_len"] = max(counts["max_ip_len"], total)
        inner = inner_packet(frame)
        if inner is not None:
            counts[INNER_COUNTS[inner]] += 1
            if inner.startswith("ipv6-"):
                counts["inner_ipv6"] += 1
    return counts


def parse_pcap(data: bytes) -> Dict[str, int]:
    """Counts of IPv4 packets on an Ethernet capture: esp, udp_encrypted_port (cleartext VXLAN of encrypted
    networks), udp_other, other; max_ip_len (the largest IPv4 total length seen); and the inner packets of
    cleartext VXLAN (count_frames)."""
    return count_frames(pcap_frames(data))


def ping(src: str, dst_host: str, count: int, interval: float = 0.2, size: Optional[int] = None,
         dont_fragment: bool = False, wait: float = 1.0) -> Dict[str, int]:
    argv = ["ip", "netns", "exec", f"{src}-c", "ping", "-n", "-q", "-c", str(count), "-i", str(interval),
            "-W", str(wait)]
    if size is not None:
        argv += ["-s", str(size)]
    if dont_fragment:
        argv += ["-M", "do"]
    return parse_ping(sh(*argv, CONTAINER[dst_host], check=False, timeout=count * interval + 30))


def parse_ping(out: str) -> Dict[str, int]:
    """{"sent", "received"} from ping's summary line."""
    match = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    if not match:
        raise RuntimeError(f"unexpected ping output: {out!r}")
    return {"sent": int(match.group(1)), "received": int(match.group(2))}


class Lab:
    def __init__(self):
        self.nft = Links("/run/netns")
        self.hosts = {name: Host(name, self.nft) for name in ("h1", "h2")}
        self.ring: Optional[KeyRing] = None
        self.probe: Optional[Probe] = None

    def capture(self) -> Capture:
        """A capture on the underlay bridge, its control frames sent from h1's underlay interface."""
        if self.probe is None:
            self.probe = Probe(self.hosts["h1"].netns, "eth0", VTEP["h1"], VTEP["h2"])
        return Capture(self.probe)

    def build(self) -> None:
        sh("ip", "netns", "add", "ul")
        sh("ip", "-n", "ul", "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", "ul", "link", "set", "br0", "up")
        for name, host in self.hosts.items():
            for ns in (name, f"{name}-net", f"{name}-c"):
                sh("ip", "netns", "add", ns)
                sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "link", "add", f"{name}-ul", "netns", "ul", "mtu", str(UNDERLAY_MTU), "type", "veth",
               "peer", "name", "eth0", "netns", name, "mtu", str(UNDERLAY_MTU))
            sh("ip", "-n", "ul", "link", "set", f"{name}-ul", "master", "br0", "up")
            sh("ip", "-n", name, "addr", "add", f"{host.vtep}/24", "dev", "eth0")
            sh("ip", "-n", name, "link", "set", "eth0", "up")
            net = f"{name}-net"
            sh("ip", "-n", net, "link", "add", "br0", "type", "bridge")
            sh("ip", "-n", net, "link", "set", "br0", "up")
            # Made in the host namespace, then moved: its UDP socket (and so ESP) stays in the host namespace.
            sh("ip", "-n", name, "link", "add", "vx0", "type", "vxlan", "id", str(VNI), "local", host.vtep,
               "dstport", str(PORT), "nolearning")
            sh("ip", "-n", name, "link", "set", "vx0", "netns", net)
            sh("ip", "-n", net, "link", "set", "vx0", "master", "br0", "mtu", str(MTU), "up")
            sh("bridge", "-n", net, "fdb", "append", "00:00:00:00:00:00", "dev", "vx0", "dst", host.peer_vtep)
            sh("ip", "-n", net, "link", "add", "p0", "mtu", str(MTU), "type", "veth", "peer", "name", "eth0",
               "netns", f"{name}-c", "mtu", str(MTU))
            sh("ip", "-n", net, "link", "set", "p0", "master", "br0", "up")
            sh("ip", "-n", f"{name}-c", "addr", "add", f"{CONTAINER[name]}/24", "dev", "eth0")
            sh("ip", "-n", f"{name}-c", "link", "set", "eth0", "up")
            host.restart_manager()

    def program(self, ring: KeyRing, holders: Optional[Dict[str, set]] = None) -> None:
        """Both hosts: local VTEP, ring, and the peer for SEGMENT (what the plugin does at start-up)."""
        for host in self.hosts.values():
            host.manager.set_local(host.vtep)
            host.manager.set_keyring(ring)
            host.manager.sync_all(holders if holders is not None else {SEGMENT: {host.peer_vtep}})
        self.ring = ring


class CheckList:
    """Checks in the order they were registered, run on one shared state; each reports one marker line, and
    after a failed check marked essential the rest are reported as not run.

        check = CheckList()
        @check(essential=True)
        def first(state) -> str: ...      # returns what it showed; an exception (assert) is a failure
    """

    def __init__(self):
        self.fns: List[Callable] = []
        self.essential = set()

    def __call__(self, essential: bool = False):
        def register(fn):
            self.fns.append(fn)
            if essential:
                self.essential.add(fn.__name__)
            return fn
        return register

    @property
    def names(self) -> List[str]:
        return [fn.__name__ for fn in self.fns]

    def run(self, state, only: Optional[str] = None) -> int:
        """only: run the essential checks and those whose name starts with it, report nothing of the others (a
        quicker round while working on some checks; test_esp_guest.py always runs them all)."""
        failed_essential = None
        failures = 0
        for fn in self.fns:
            if only is not None and fn.__name__ not in self.essential and not fn.__name__.startswith(only):
                continue
            start = time.monotonic()
            if failed_essential:
                record = {"name": fn.__name__, "ok": False, "detail": f"not run: {failed_essential} failed"}
            else:
                try:
                    record = {"name": fn.__name__, "ok": True, "detail": fn(state)}
                except Exception as exc:
                    tb = traceback.format_exc(limit=4)
                    record = {"name": fn.__name__, "ok": False, "detail": f"{type(exc).__name__}: {exc}\n{tb}"}
                    if fn.__name__ in self.essential:
                        failed_essential = fn.__name__
            record["seconds"] = round(time.monotonic() - start, 2)
            failures += not record["ok"]
            print(f"{MARKER} {json.dumps(record)}", flush=True)
        return 1 if failures else 0


check = CheckList()


# -- the checks, in order ---------------------------------------------------------------------------------------
@check(essential=True)
def esp_supported(lab: Lab) -> str:
    reason = EspProbe().unavailable_reason()
    assert reason is None, reason
    return "EspProbe.require() passes: a test SA with rfc4106(gcm(aes)) was accepted"


@check(essential=True)
def topology_up(lab: Lab) -> str:
    lab.build()
    out = sh("ip", "netns", "exec", "h1", "ping", "-n", "-c", "2", "-i", "0.2", "-W", "2", VTEP["h2"], check=False)
    assert " 0% packet loss" in out, f"underlay h1 -> h2 does not work: {out}"
    return f"two hosts, VXLAN {VNI} on udp/{PORT}, inner MTU {MTU}; underlay ping works"


@check(essential=True)
def fail_closed_before_any_sa(lab: Lab) -> str:
    """Firewall only, no policy, no SA: container traffic is attempted and dropped at output, nothing in clear."""
    for host in lab.hosts.values():
        host.manager.ensure_firewall()
        assert host.firewall.present(), f"{host.name}: firewall table missing after ensure"
    cap = lab.capture()
    result = ping("h1", "h2", count=3, interval=0.3)
    seen = cap.stop()
    drops = lab.hosts["h1"].firewall.counters()[LABEL_OUT]
    assert result["received"] == 0, f"traffic got through without IPsec: {result}"
    assert seen["udp_encrypted_port"] == 0, f"cleartext VXLAN on the underlay: {seen}"
    assert drops > 0, "the output rule dropped nothing: the test sent nothing?"
    return f"ping {result}, underlay {seen}, output drops {drops}"


@check(essential=True)
def encrypted_ping(lab: Lab) -> str:
    lab.program(KeyRing.initial())
    ping("h1", "h2", count=1, wait=3)  # ARP first
    result = ping("h1", "h2", count=5, interval=0.1)
    assert result["received"] == result["sent"] == 5, f"ping over ESP: {result}"
    return f"ping {result} with keys {list(lab.ring.tags)}, primary {lab.ring.primary}"


@check()
def underlay_carries_only_esp(lab: Lab) -> str:
    cap = lab.capture()
    result = ping("h1", "h2", count=20, interval=0.05)
    seen = cap.stop()
    assert result["received"] == 20, f"ping: {result}"
    assert seen["udp_encrypted_port"] == 0, f"cleartext VXLAN on the underlay: {seen}"
    assert seen["esp"] >= 40, f"expected >= 40 ESP packets (20 requests, 20 replies): {seen}"
    return f"underlay {seen}"


@check()
def gcm_sa_parameters(lab: Lab) -> str:
    h1, h2 = lab.hosts["h1"], lab.hosts["h2"]
    ring = lab.ring
    out_spi = spi_for(h1.vtep, h2.vtep, ring.primary)
    for host in (h1, h2):
        sas = host.xfrm.sas()
        assert sas, f"{host.name}: no SAs"
        for sa in sas:
            assert sa.algorithm == AEAD_ALGORITHM, sa
            assert len(sa.key) == MATERIAL_BYTES and sa.icv_bits == 128, sa
            assert sa.mode == XFRM_MODE_TRANSPORT and sa.reqid == REQID and sa.dport == PORT, sa
        inbound = {sa.spi for sa in sas if sa.dst == host.vtep}
        assert inbound == {spi_for(host.peer_vtep, host.vtep, t) for t in ring.tags}, (host.name, inbound)
        outbound = [sa for sa in sas if sa.src == host.vtep]
        assert [sa.spi for sa in outbound] == [spi_for(host.vtep, host.peer_vtep, ring.primary)], outbound
        policies = {p.direction: p for p in host.xfrm.policies()}
        assert policies["out"].spi == outbound[0].spi and not policies["out"].optional, policies
        assert policies["in"].spi == 0 and policies["in"].dport == PORT, policies
    sent = h1.xfrm.get_sa(h2.vtep, out_spi)
    received = h2.xfrm.get_sa(h2.vtep, out_spi)
    assert sent is not None and sent.key == ring.primary_key.material, "h1's outbound SA does not hold the primary"
    assert received is not None and received.key == sent.key, "both ends must hold the same SA"
    return (f"rfc4106(gcm(aes)) 160-bit key, 128-bit ICV, transport, reqid 0x{REQID:08x}; "
            f"h1->h2 spi 0x{out_spi:08x} on both ends")


@check()
def counters_rise(lab: Lab) -> str:
    h1, h2 = lab.hosts["h1"], lab.hosts["h2"]
    spi = spi_for(h1.vtep, h2.vtep, lab.ring.primary)
    before = (h1.xfrm.get_sa(h2.vtep, spi), h2.xfrm.get_sa(h2.vtep, spi))
    result = ping("h1", "h2", count=10, interval=0.05)
    after = (h1.xfrm.get_sa(h2.vtep, spi), h2.xfrm.get_sa(h2.vtep, spi))
    sent = after[0].packets - before[0].packets
    received = after[1].packets - before[1].packets
    assert result["received"] == 10, result
    assert sent >= 10 and received >= 10, f"SA packets: h1 out +{sent}, h2 in +{received}"
    assert after[1].integrity_failed == 0 and after[1].replay == 0, after[1]
    return f"h1 outbound +{sent} packets (+{after[0].bytes - before[0].bytes} bytes), h2 inbound +{received}"


@check()
def mtu_fits_the_underlay(lab: Lab) -> str:
    size = MTU - 28  # inner IPv4 20 + ICMP 8
    cap = lab.capture()
    result = ping("h1", "h2", count=3, interval=0.1, size=size, dont_fragment=True)
    seen = cap.stop()
    assert result["received"] == 3, f"a full-MTU packet ({MTU}) with DF did not cross: {result}"
    assert seen["max_ip_len"] == UNDERLAY_MTU, f"largest underlay packet {seen['max_ip_len']}, expected exactly " \
                                               f"{UNDERLAY_MTU}: inner_mtu() is off"
    return f"inner MTU {MTU} -> ESP packets of exactly {seen['max_ip_len']} bytes"


def outbound_packets(host: Host, ring: KeyRing) -> int:
    """Packets sent by host's outbound SA for ring's primary key (0 while there is none)."""
    sa = host.xfrm.get_sa(host.peer_vtep, spi_for(host.vtep, host.peer_vtep, ring.primary))
    return sa.packets if sa is not None else 0


def flowing(lab: Lab, ring: KeyRing, what: str, packets: int = 10) -> None:
    """Wait until both hosts' outbound SAs for ring's primary key have sent `packets` more packets (a running
    ping loop's requests and replies)."""
    hosts = list(lab.hosts.values())
    start = {host.name: outbound_packets(host, ring) for host in hosts}
    wait_until(lambda: all(outbound_packets(h, ring) >= start[h.name] + packets for h in hosts), 60,
               f"traffic both ways on {what}")


@check()
def rotation_loses_nothing(lab: Lab) -> str:
    h1, h2 = lab.hosts["h1"], lab.hosts["h2"]
    cap = lab.capture()
    count, interval = 150, 0.03
    pinger = subprocess.Popen(["ip", "netns", "exec", "h1-c", "ping", "-n", "-q", "-c", str(count), "-i",
                               str(interval), "-W", "2", CONTAINER["h2"]], stdout=subprocess.PIPE, text=True)
    rings = [lab.ring]
    # Traffic both ways on the old key first, then on each new one before the next rotation.
    flowing(lab, rings[-1], "the old key")
    for order in ((h1, h2), (h2, h1)):  # one rotation applied h1 first, the next h2 first
        ring = rings[-1].rotate()
        for host in order:
            host.manager.set_keyring(ring)
        rings.append(ring)
        flowing(lab, ring, f"key {ring.primary} after the rotation {order[0].name} first")
    out, _ = pinger.communicate(timeout=count * interval + 60)
    seen = cap.stop()
    lab.ring = rings[-1]
    match = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    assert match, out
    sent, received = int(match.group(1)), int(match.group(2))
    assert sent == received == count, f"lost {sent - received} of {sent} during two rotations"
    assert seen["udp_encrypted_port"] == 0, f"cleartext VXLAN during rotation: {seen}"
    assert seen["esp"] >= 2 * count, f"the capture missed ESP: {2 * count} packets crossed, saw {seen}"
    for host in (h1, h2):
        sas = host.xfrm.sas()
        outbound = [sa for sa in sas if sa.src == host.vtep]
        assert [sa.spi for sa in outbound] == [spi_for(host.vtep, host.peer_vtep, lab.ring.primary)], outbound
        assert outbound[0].packets > 0, f"{host.name}: nothing sent with the new primary key"
        inbound = {sa.spi for sa in sas if sa.dst == host.vtep}
        assert inbound == {spi_for(host.peer_vtep, host.vtep, t) for t in lab.ring.tags}, inbound
    return (f"{received}/{sent} replies across rotations {[list(r.tags) for r in rings]}; underlay {seen}")


@check()
def sas_removed_traffic_stops(lab: Lab) -> str:
    """Policies stay, SAs go: the outbound policy (level required) has no SA to use, so nothing leaves."""
    for host in lab.hosts.values():
        for sa in host.xfrm.sas():
            host.xfrm.delete_sa(sa.dst, sa.spi)
        assert host.xfrm.policies(), f"{host.name}: the policies should still be there"
    cap = lab.capture()
    result = ping("h1", "h2", count=4, interval=0.3)
    seen = cap.stop()
    assert result["received"] == 0, f"traffic without SAs: {result}"
    assert seen["udp_encrypted_port"] == 0 and seen["esp"] == 0, f"something crossed: {seen}"
    return f"ping {result}, underlay {seen}"


@check()
def policies_removed_firewall_holds(lab: Lab) -> str:
    """No SA and no policy (a crash between deleting and adding, a restart): the firewall table alone holds."""
    h1 = lab.hosts["h1"]
    for host in lab.hosts.values():
        host.manager.remove_all()
        assert not host.xfrm.sas() and not host.xfrm.policies()
    drops_before = h1.firewall.counters()[LABEL_OUT]
    cap = lab.capture()
    result = ping("h1", "h2", count=4, interval=0.3)
    seen = cap.stop()
    drops = h1.firewall.counters()[LABEL_OUT] - drops_before
    assert result["received"] == 0, f"traffic without IPsec: {result}"
    assert seen["udp_encrypted_port"] == 0, f"cleartext VXLAN on the underlay: {seen}"
    assert drops > 0, "the output rule dropped nothing"
    return f"ping {result}, underlay {seen}, output rule dropped {drops}"


@check()
def restart_restores_and_keeps(lab: Lab) -> str:
    """Fresh managers (a plugin restart) rebuild from the desired state; another restart while traffic flows
    changes nothing and loses nothing."""
    for host in lab.hosts.values():
        host.restart_manager()
    lab.program(lab.ring)
    ping("h1", "h2", count=1, wait=3)
    first = ping("h1", "h2", count=5, interval=0.1)
    assert first["received"] == 5, f"after a restart from nothing: {first}"
    spis = {name: sorted(sa.spi for sa in host.xfrm.sas()) for name, host in lab.hosts.items()}
    pinger = subprocess.Popen(["ip", "netns", "exec", "h1-c", "ping", "-n", "-q", "-c", "60", "-i", "0.03", "-W", "2",
                               CONTAINER["h2"]], stdout=subprocess.PIPE, text=True)
    flowing(lab, lab.ring, "the restored SAs", packets=5)  # the restart happens under traffic
    for host in lab.hosts.values():
        host.restart_manager()
    lab.program(lab.ring)
    out, _ = pinger.communicate(timeout=60)
    match = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    assert match and match.group(1) == match.group(2) == "60", f"loss across a restart: {out}"
    assert spis == {name: sorted(sa.spi for sa in host.xfrm.sas()) for name, host in lab.hosts.items()}
    return f"restored: {first}; restart under traffic: 60/60, SAs unchanged"


def xfrm_stat(ns: str) -> Dict[str, int]:
    out = sh("ip", "netns", "exec", ns, "cat", "/proc/net/xfrm_stat")
    return {name: int(value) for name, value in (line.split() for line in out.splitlines() if line.strip())}


@check()
def cleartext_from_a_peer_is_dropped(lab: Lab) -> str:
    """h1 loses all protection and sends VXLAN in clear; h2 drops it: by its firewall, and without the firewall
    by its inbound policy (the kernel counts a template mismatch). Then h1 programs h2 again from nothing while h2
    kept its SAs all along (a host that rebooted): traffic must resume at once (SAs re-created with the same SPI
    restart their sequence numbers, see xfrm.REPLAY_WINDOW)."""
    h1, h2 = lab.hosts["h1"], lab.hosts["h2"]
    h1.manager.remove_all(firewall=True)
    cap = lab.capture()
    drops_before = h2.firewall.counters()[LABEL_IN]
    by_firewall = ping("h1", "h2", count=3, interval=0.3)
    seen = cap.stop()
    dropped_in = h2.firewall.counters()[LABEL_IN] - drops_before
    assert seen["udp_encrypted_port"] > 0, f"h1 should be sending cleartext now: {seen}"
    assert by_firewall["received"] == 0 and dropped_in >= 3, (by_firewall, dropped_in)
    h2.firewall.remove()
    stat_before = xfrm_stat("h2")
    by_policy = ping("h1", "h2", count=3, interval=0.3)
    stat = xfrm_stat("h2")
    mismatches = stat["XfrmInTmplMismatch"] - stat_before["XfrmInTmplMismatch"]
    assert by_policy["received"] == 0 and mismatches >= 3, (by_policy, mismatches)
    for host in (h1, h2):
        host.manager.ensure_firewall()
    lab.program(lab.ring)
    back = ping("h1", "h2", count=3, interval=0.1, wait=3)
    assert back["received"] == 3, f"after restoring h1: {back}"
    return (f"h2's firewall dropped {dropped_in} cleartext packets; without it, its inbound policy refused "
            f"{mismatches} (XfrmInTmplMismatch); restored: {back}")


@check()
def peers_are_reference_counted(lab: Lab) -> str:
    h1, h2 = lab.hosts["h1"], lab.hosts["h2"]
    for host in (h1, h2):
        host.manager.set_peers("segment-b", {host.peer_vtep})
        host.manager.set_peers(SEGMENT, set())
    kept = ping("h1", "h2", count=3, interval=0.1)
    assert kept["received"] == 3, f"segment-b still needs the peer: {kept}"
    for host in (h1, h2):
        host.manager.set_peers("segment-b", set())
        assert not host.xfrm.sas() and not host.xfrm.policies(), f"{host.name}: left {host.xfrm.sas()}"
    cap = lab.capture()
    gone = ping("h1", "h2", count=3, interval=0.3)
    seen = cap.stop()
    assert gone["received"] == 0 and seen["udp_encrypted_port"] == 0, (gone, seen)
    return f"one holder left: {kept}; none: {gone}, underlay {seen}"


@check()
def capture_would_see_cleartext(lab: Lab) -> str:
    """Control: with the firewall removed too, the same traffic crosses in clear and the capture sees it; so the
    zero counts above were the protection's doing, not a blind capture."""
    for host in lab.hosts.values():
        host.firewall.remove()
    # The previous check left the path dead long enough for neighbour entries to go stale: let the first exchange
    # (ARP in the containers and on the underlay) finish before the three pings that are counted.
    deadline = time.monotonic() + 10
    while ping("h1", "h2", count=1, wait=1)["received"] != 1 and time.monotonic() < deadline:
        pass
    cap = lab.capture()
    result = ping("h1", "h2", count=3, interval=0.2, wait=3)
    seen = cap.stop()
    for host in lab.hosts.values():
        host.firewall.ensure()
    assert result["received"] == 3, f"unprotected VXLAN should work: {result}"
    assert seen["udp_encrypted_port"] >= 6, f"the capture did not see the cleartext VXLAN: {seen}"
    return f"without any protection: ping {result}, underlay {seen}"


CHECK_NAMES = check.names


def main() -> int:
    return check.run(Lab())


if __name__ == "__main__":
    sys.exit(main())
