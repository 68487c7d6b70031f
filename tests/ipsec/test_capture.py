"""The capture the guest's "no cleartext" checks count on (tests/ipsec/inguest.py's Capture and Probe), on this
machine's kernel: it counts what crosses between its control frames and its final marker, a capture that
cannot see the hosts' traffic fails instead of reporting zero, and it recognises the inner packets of cleartext
VXLAN, IPv6 ones included (the positive control of "an encrypted dual-stack network leaks no IPv6"). Three
scratch namespaces: an underlay bridge and two hosts on it, as in the guest. The classifier's own rules are
tested on frames built here (no root needed)."""

import os
import socket
import struct
import subprocess
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel import names
from tests.ipsec import inguest
from tests.ipsec.inguest import Capture, Probe, count_frames, inner_packet

VTEP = inguest.VTEP
ZERO_INNER = {"inner_ipv4": 0, "inner_ipv6": 0, "inner_ipv6_echo": 0, "inner_ipv6_tcp": 0}
INNER6 = {"h1": "fd00:77::1", "h2": "fd00:77::2"}  # the hosts' addresses on the VXLAN of the capture test


# -- frames built here -------------------------------------------------------------------------------------------
def ipv6_packet(next_header: int, upper: bytes, src: str = "fd00:1::2", dst: str = "fd00:1::3") -> bytes:
    """IPv6 header (RFC 8200 3: version 6, payload length, next header, hop limit 64) + upper-layer bytes."""
    return struct.pack(">IHBB16s16s", 6 << 28, len(upper), next_header, 64, socket.inet_pton(socket.AF_INET6, src),
                       socket.inet_pton(socket.AF_INET6, dst)) + upper


def vxlan_frame(inner_ethertype: int, inner_ip: bytes, port: int = names.VXLAN_PORT, flags: int = 0x08,
                proto: int = 17) -> bytes:
    """What a VTEP puts on the underlay: outer Ethernet/IPv4/UDP to `port`, VXLAN (RFC 7348), inner Ethernet."""
    inner = bytes.fromhex("02000000000a02000000000b") + struct.pack(">H", inner_ethertype) + inner_ip
    vxlan = struct.pack(">B3xI", flags, 42 << 8) + inner
    udp = struct.pack(">HHHH", 40000, port, 8 + len(vxlan), 0) + vxlan
    return inguest.ipv4_frame(VTEP["h1"], VTEP["h2"], proto, udp)


ECHO_REQUEST = ipv6_packet(58, struct.pack(">BBHHH", 128, 0, 0, 7, 1) + b"x" * 56)
ECHO_REPLY = ipv6_packet(58, struct.pack(">BBHHH", 129, 0, 0, 7, 1) + b"x" * 56)
TCP_SYN = ipv6_packet(6, struct.pack(">HHIIBBHHH", 40000, 5201, 1, 0, 5 << 4, 0x02, 65535, 0, 0))
# An MLDv2 report (RFC 3810 5.2) behind its hop-by-hop header (router alert), as the kernel sends one.
MLD_REPORT = ipv6_packet(0, bytes([58, 0, 5, 2, 0, 0, 1, 0]) + bytes([143, 0, 0, 0, 0, 0, 0, 0]), src="::",
                         dst="ff02::16")
IPV4_ICMP = bytes.fromhex("4500001c000040004001") + bytes(2) + socket.inet_aton("10.0.0.2") + \
    socket.inet_aton("10.0.0.3") + bytes(8)


@pytest.mark.parametrize("frame, want", [
    (vxlan_frame(0x86DD, ECHO_REQUEST), "ipv6-echo"),
    (vxlan_frame(0x86DD, ECHO_REPLY, port=names.ENCRYPTED_VXLAN_PORT), "ipv6-echo"),
    (vxlan_frame(0x86DD, TCP_SYN), "ipv6-tcp"),
    (vxlan_frame(0x86DD, MLD_REPORT), "ipv6"),
    (vxlan_frame(0x0800, IPV4_ICMP), "ipv4"),
    (vxlan_frame(0x0806, bytes(28)), None),  # ARP
    (vxlan_frame(0x86DD, ECHO_REQUEST, port=53), None),  # not a VXLAN port
    (vxlan_frame(0x86DD, ECHO_REQUEST, flags=0x00), None),  # no I flag: not VXLAN
    (vxlan_frame(0x86DD, ECHO_REQUEST, proto=50), None),  # ESP: nothing readable inside
    (vxlan_frame(0x86DD, b"\x45" + ECHO_REQUEST[1:]), None),  # says IPv6, is not
])
def test_the_inner_packet_of_cleartext_vxlan(frame, want):
    assert inner_packet(frame) == want


def test_count_frames_counts_the_inner_ipv6_packets_within_the_snap_length():
    snap = inguest.SNAPLEN
    whole = [vxlan_frame(0x86DD, ECHO_REQUEST), vxlan_frame(0x86DD, ECHO_REPLY), vxlan_frame(0x86DD, TCP_SYN),
             vxlan_frame(0x86DD, MLD_REPORT), vxlan_frame(0x0800, IPV4_ICMP), vxlan_frame(0x86DD, TCP_SYN, proto=50)]
    frames = [f[:snap] for f in whole]
    assert len(whole[0]) > snap, "the echo frames should be longer than the snap length"
    counts = count_frames(frames)
    longest = max(len(f) for f in whole) - 14  # the IPv4 total length, from the header: not cut by the capture
    assert counts == {"esp": 1, "udp_encrypted_port": 0, "udp_other": 5, "other": 0, "max_ip_len": longest,
                      "inner_ipv4": 1, "inner_ipv6": 4, "inner_ipv6_echo": 2, "inner_ipv6_tcp": 1}, counts


@settings(deadline=None)  # a shared, loaded machine: the time per example says nothing here
@given(st.sampled_from([ECHO_REQUEST, TCP_SYN, MLD_REPORT, IPV4_ICMP]), st.integers(0, 200))
def test_a_frame_cut_anywhere_is_never_misread(inner_ip, cut):
    """A capture's snap length can cut a frame anywhere: the answer is the whole frame's, or a less specific one
    of the same family, or None (too short to say); never another family or protocol, never an exception."""
    ethertype = 0x0800 if inner_ip is IPV4_ICMP else 0x86DD
    whole = vxlan_frame(ethertype, inner_ip)
    got = inner_packet(whole[:cut])
    assert got in {inner_packet(whole), None} | ({"ipv6"} if ethertype == 0x86DD else set()), (cut, got)


@settings(deadline=None)
@given(st.binary(max_size=160))
def test_any_bytes_are_classified_without_error(data):
    count_frames([data, b"\0" * 14 + data, bytes.fromhex("ffffffffffff000000000000" "0800") + data])


# -- on this machine's kernel ------------------------------------------------------------------------------------


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


@pytest.fixture
def underlay():
    """{"ul": name, "h1": name, "h2": name}: the bridge br0 in ul, each host's eth0 on it with its VTEP address."""
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    ns = {role: f"vxnet-cap{os.getpid()}-{role}" for role in ("ul", "h1", "h2")}
    made = []
    try:
        for name in ns.values():
            sh("ip", "netns", "add", name)
            made.append(name)
            # No IPv6: a new interface's router solicitations and MLD reports would cross the quiet capture.
            sh("ip", "netns", "exec", name, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1",
               "net.ipv6.conf.default.disable_ipv6=1")
        # No multicast snooping: a snooping bridge joins 224.0.0.106 (multicast router discovery, RFC 4286) and
        # sends an IGMPv3 report for it, from 0.0.0.0, seconds after it comes up: it crossed the quiet capture in CI.
        sh("ip", "-n", ns["ul"], "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        sh("ip", "-n", ns["ul"], "link", "set", "br0", "up")
        for host in ("h1", "h2"):
            sh("ip", "link", "add", f"{host}-ul", "netns", ns["ul"], "type", "veth", "peer", "name", "eth0",
               "netns", ns[host])
            sh("ip", "-n", ns["ul"], "link", "set", f"{host}-ul", "master", "br0", "up")
            sh("ip", "-n", ns[host], "addr", "add", f"{VTEP[host]}/24", "dev", "eth0")
            sh("ip", "-n", ns[host], "link", "set", "eth0", "up")
        yield ns
    finally:
        failed = [name for name in made  # the veths go with their namespaces
                  if subprocess.run(["ip", "netns", "del", name], capture_output=True).returncode != 0]
        assert not failed, f"could not delete namespaces {failed}"


@pytest.fixture
def probe(underlay):
    p = Probe(f"/run/netns/{underlay['h1']}", "eth0", VTEP["h1"], VTEP["h2"])
    yield p
    p.close()


def test_counts_what_crosses_after_the_controls_and_before_the_marker(underlay, probe):
    quiet = Capture(probe, ns=underlay["ul"]).stop()
    assert quiet == {"esp": 0, "udp_encrypted_port": 0, "udp_other": 0, "other": 0, "max_ip_len": 0,
                     **ZERO_INNER}, quiet

    cap = Capture(probe, ns=underlay["ul"])
    probe.send(probe.cleartext_vxlan(b"leak-one"))
    probe.send(probe.esp(b"leak-two"))
    out = subprocess.run(["ip", "netns", "exec", underlay["h1"], "ping", "-n", "-q", "-c", "3", "-i", "0.2",
                          "-W", "2", VTEP["h2"]], capture_output=True, text=True, timeout=30).stdout
    seen = cap.stop()
    assert inguest.parse_ping(out)["received"] == 3, out
    assert seen["udp_encrypted_port"] == 1 and seen["esp"] == 1, f"the leaked frames were not counted: {seen}"
    assert seen["other"] >= 6, f"3 ICMP requests and 3 replies crossed: {seen}"


def test_a_capture_that_cannot_see_the_hosts_fails(underlay, probe, monkeypatch):
    # An interface of the underlay namespace that is not on the bridge: up, but nothing of the hosts reaches it.
    sh("ip", "-n", underlay["ul"], "link", "add", "blind0", "type", "veth", "peer", "name", "blind1")
    for dev in ("blind0", "blind1"):
        sh("ip", "-n", underlay["ul"], "link", "set", dev, "up")
    monkeypatch.setattr(Capture, "TIMEOUT", 3)
    with pytest.raises(TimeoutError, match=r"the capture to record the control frames \(cleartext VXLAN, ESP\)"):
        Capture(probe, ns=underlay["ul"], iface="blind0")
    seeing = Capture(probe, ns=underlay["ul"]).stop()  # the same probe, on the bridge: seen
    assert seeing["udp_encrypted_port"] == 0, seeing


def test_inner_ipv6_of_real_vxlan_is_recognised(underlay, probe):
    """The kernel's own VXLAN (port 4789, IPv4 underlay) between the two hosts, IPv6 on it: ping6 and a TCP
    exchange cross the capture as cleartext VXLAN whose inner packets count as IPv6 echo and TCP. Before any IPv6
    is on the VXLAN the same capture counts none (control: the counts are the traffic's)."""
    for host, peer in (("h1", "h2"), ("h2", "h1")):
        sh("ip", "-n", underlay[host], "link", "add", "vx0", "type", "vxlan", "id", "42", "local", VTEP[host],
           "remote", VTEP[peer], "dstport", str(names.VXLAN_PORT))
    before = Capture(probe, ns=underlay["ul"]).stop()
    assert before["inner_ipv6"] == 0 and before["udp_other"] == 0, before
    for host in ("h1", "h2"):
        sh("ip", "netns", "exec", underlay[host], "sysctl", "-q", "-w", "net.ipv6.conf.vx0.disable_ipv6=0")
        sh("ip", "-n", underlay[host], "addr", "add", f"{INNER6[host]}/64", "dev", "vx0", "nodad")
        sh("ip", "-n", underlay[host], "link", "set", "vx0", "up")
    cap = Capture(probe, ns=underlay["ul"])
    out = subprocess.run(["ip", "netns", "exec", underlay["h1"], "ping", "-6", "-n", "-q", "-c", "3", "-i", "0.2",
                          "-W", "2", INNER6["h2"]], capture_output=True, text=True, timeout=30).stdout
    echoed = _tcp_exchange(f"/run/netns/{underlay['h1']}", f"/run/netns/{underlay['h2']}", INNER6["h2"])
    seen = cap.stop()
    assert inguest.parse_ping(out)["received"] == 3, out
    assert echoed == b"vxnet-v6" * 512, "the TCP exchange over the VXLAN's IPv6 failed"
    assert seen["inner_ipv6_echo"] >= 6, f"3 echo requests and 3 replies crossed: {seen}"
    assert seen["inner_ipv6_tcp"] >= 6, f"a TCP handshake, 4 KiB each way and the close crossed: {seen}"
    assert seen["udp_other"] >= seen["inner_ipv6"] >= seen["inner_ipv6_echo"] + seen["inner_ipv6_tcp"], seen


def _tcp_exchange(client_ns: str, server_ns: str, address: str, port: int = 5201) -> bytes:
    """4 KiB to a server in server_ns that sends back what it read; what the client got back."""
    listener = inguest.socket_in(server_ns, socket.AF_INET6, socket.SOCK_STREAM)
    client = inguest.socket_in(client_ns, socket.AF_INET6, socket.SOCK_STREAM)
    listener.settimeout(20)
    client.settimeout(20)

    def serve():
        conn, _ = listener.accept()
        with conn:
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
            conn.sendall(data)

    try:
        listener.bind((address, port))
        listener.listen(1)
        server = threading.Thread(target=serve, daemon=True)
        server.start()
        client.connect((address, port))  # the listener is already listening: no wait
        client.sendall(b"vxnet-v6" * 512)
        client.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := client.recv(65536):
            got += chunk
        server.join(20)
        return got
    finally:
        client.close()
        listener.close()
