"""Policy enforcement against the real kernel. One network namespace (host 1) with a bridge, three "containers"
(namespaces on veth ports, IPv4 + IPv6) and a VXLAN device whose UDP socket lives in an underlay namespace, as the
plugin's does in the host's; a second network namespace (host 2) with one container, joined over a veth underlay.
The policy table of netdriver/policy_nft.py in host 1's network namespace decides who may open what; every
negative probe is run first as a positive control, the same probe with the same timeout, before the policy (or,
where the table is what makes the difference, the same probe passing in the same test).

The table is stateless but for its UDP records: ports are distinct per test, so that no test rides on a record an
earlier one left (they last 120 s)."""

import dataclasses
import json
import os
import secrets
import select
import subprocess
import sys
import time
from typing import List

import pytest

from kernel import libnftables, names
from kernel.links import Links
from kernel.nflog import Accounting, Reader
from netdriver import policy_nft as pn
from netdriver.isolation import Firewall
from netdriver.policy import Diff, Elements
from tests.harness.proc import wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces")

PROBE_TIMEOUT = 1.0  # a TCP connect within a namespace's bridge answers in well under a millisecond
MARK = f"0x{names.POLICY_REPLY_MARK:x}"



def sh(*argv, check=True):
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=30)


SERVER = r"""
import select, socket, sys
socks = []
for port in map(int, sys.argv[1:]):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port)); s.listen(64); socks.append(s)
print("ready", flush=True)
while True:
    for s in select.select(socks, [], [])[0]:
        c, _ = s.accept(); c.sendall(b"ok"); c.close()
"""

CLIENT = r"""
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    print("sport", s.getsockname()[1], s.recv(2).decode() or "closed")
except OSError as e:
    print("failed", type(e).__name__)
"""

# Non-blocking connects to many ports at once: a burst of SYNs faster than any log rate.
SYN_BURST = r"""
import socket, sys, time
socks = []
for port in range(int(sys.argv[2]), int(sys.argv[2]) + int(sys.argv[3])):
    s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
    s.setblocking(False)
    s.connect_ex((sys.argv[1], port)); socks.append(s)
time.sleep(0.3)  # hold them open past the first SYN, closed before the first retransmission (1 s, RFC 6298)
"""

PORTS = list(range(7100, 7140))
UDP_PORTS = list(range(7200, 7240))  # every UDP peer's sockets

# A UDP peer: a socket on each port given, every datagram received printed ("got PORT SRC SPORT WORD LENGTH"),
# "ping..." answered with "pong..." of the same length from the same socket; a line "SPORT DST DPORT WORD [LENGTH]"
# on stdin sends WORD (padded to LENGTH bytes) from SPORT's socket.
UDP_PEER = r"""
import select, socket, sys
socks = {}
for port in map(int, sys.argv[1:]):
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port)); socks[port] = s
print("ready", flush=True)
while True:
    for r in select.select([sys.stdin] + list(socks.values()), [], [])[0]:
        if r is sys.stdin:
            line = sys.stdin.readline()
            if not line:
                sys.exit(0)
            sport, dst, dport, word, *length = line.split()
            dst = dst if ":" in dst else "::ffff:" + dst  # an IPv4 peer, from the dual-stack socket
            socks[int(sport)].sendto(word.encode().ljust(int(length[0]) if length else 0, b"."), (dst, int(dport)))
            continue
        port = next(p for p, s in socks.items() if s is r)
        data, addr = r.recvfrom(65536)
        host = addr[0][7:] if addr[0].startswith("::ffff:") else addr[0]
        word = data.rstrip(b".").decode()
        print("got", port, host, addr[1], word, len(data), flush=True)
        if word == "ping":
            r.sendto(b"pong".ljust(len(data), b"."), addr)
"""

# One TCP segment from a raw socket (IPv4; the kernel writes the IP header): SRC DST DPORT FLAGS ("S", "A", ...),
# then what came back to its source port within TIMEOUT: the reply's flags, or "none".
RAW_TCP = r"""
import random, socket, struct, sys, time, select
src, dst, dport, flags, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], float(sys.argv[5])
bits = {"F": 1, "S": 2, "R": 4, "P": 8, "A": 16}
sport = random.randint(40000, 60000)
def checksum(data):
    data += b"\0" * (len(data) % 2)
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF
ack = random.randint(1, 1 << 31) if "A" in flags else 0
header = struct.pack("!HHIIBBHHH", sport, dport, random.randint(1, 1 << 31), ack, 5 << 4, sum(bits[f] for f in flags),
                     64240, 0, 0)
pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(header))
header = header[:16] + struct.pack("!H", checksum(pseudo + header)) + header[18:]
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
s.sendto(header, (dst, 0))
deadline = time.monotonic() + timeout
while time.monotonic() < deadline:
    if not select.select([s], [], [], max(0, deadline - time.monotonic()))[0]:
        break
    packet = s.recv(65536)
    ihl = (packet[0] & 15) * 4
    their, ours = struct.unpack("!HH", packet[ihl:ihl + 4])
    if socket.inet_ntoa(packet[12:16]) == dst and (their, ours) == (dport, sport):
        print("".join(f for f, b in bits.items() if packet[ihl + 13] & b))
        sys.exit(0)
print("none")
"""

# An SCTP packet (common header and an INIT chunk, RFC 9260 3.3.2) from a raw socket: DST DPORT VTAG; and a
# receiver of every SCTP packet (this kernel has no SCTP: raw sockets get them), printing "vtag V" for each.
RAW_SCTP_SEND = r"""
import socket, struct, sys
dst, dport, vtag = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
init = struct.pack("!BBHIIHHI", 1, 0, 20, 0x1234567, 65535, 1, 1, 1)
packet = struct.pack("!HHII", 5000, dport, vtag, 0) + init
s = socket.socket(socket.AF_INET6 if ":" in dst else socket.AF_INET, socket.SOCK_RAW, 132)
s.sendto(packet, (dst, 0))
"""
RAW_SCTP_RECEIVE = r"""
import select, socket, struct
v4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, 132)
v6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, 132)
print("ready", flush=True)
while True:
    for r in select.select([v4, v6], [], [])[0]:
        packet = r.recv(65536)
        at = (packet[0] & 15) * 4 if r is v4 else 0  # an IPv4 raw socket gets the IP header, IPv6's not
        print("vtag", struct.unpack("!I", packet[at + 4:at + 8])[0], flush=True)
"""


class Lines:
    """A process whose stdout is read line by line with a deadline."""

    def __init__(self, argv):
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self._buffer = ""
        assert self.lines(10, until="ready")[-1:] == ["ready"]

    def lines(self, timeout: float, until: str = "") -> List[str]:
        """What it printed within timeout seconds; returns at once after a line starting with `until`."""
        out, deadline = [], time.monotonic() + timeout
        while True:
            while "\n" in self._buffer:
                line, self._buffer = self._buffer.split("\n", 1)
                out.append(line)
                if until and line.startswith(until):
                    return out
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                return out
            chunk = os.read(self.proc.stdout.fileno(), 65536).decode()
            if not chunk:
                return out
            self._buffer += chunk

    def stop(self):
        self.proc.kill()  # `ip netns exec` execs the interpreter: this PID is the script's
        self.proc.wait(timeout=10)


class UdpPeer(Lines):
    def __init__(self, ns, ports):
        super().__init__(["ip", "netns", "exec", ns, sys.executable, "-c", UDP_PEER, *map(str, ports)])

    def send(self, sport, dst, dport, word="ping", length=0):
        self.proc.stdin.write(f"{sport} {dst} {dport} {word} {length or ''}\n")
        self.proc.stdin.flush()

    def saw(self, port, src, sport, word, timeout=PROBE_TIMEOUT) -> bool:
        """Whether a datagram carrying `word` from src:sport arrived on `port` within timeout (returns as soon as it
        did; what else arrived meanwhile is passed over)."""
        wanted = f"got {port} {src} {sport} {word} "
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            lines = self.lines(max(0.0, left), until=wanted)
            if any(line.startswith(wanted) for line in lines):
                return True
            if left <= 0 or not lines:
                return False


class Container:
    def __init__(self, ns, ip, ip6):
        self.ns, self.ip, self.ip6 = ns, ip, ip6

    def connect(self, target, port, timeout=PROBE_TIMEOUT):
        """(True, client port) if a TCP connection to target:port opened and the server's reply came back."""
        out = sh("ip", "netns", "exec", self.ns, sys.executable, "-c", CLIENT, target, str(port), str(timeout)).stdout
        words = out.split()
        return (len(words) == 3 and words[2] == "ok"), (int(words[1]) if words[0] == "sport" else 0)

    def reaches(self, target, port):
        return self.connect(target, port)[0]


@pytest.fixture(scope="module")
def lab():
    tag = secrets.token_hex(3)
    ns = {k: f"vxtp{tag}-{k}" for k in ("u1", "u2", "n1", "n2", "c1", "c2", "c3", "c4")}
    host_before = open("/proc/sys/net/bridge/bridge-nf-call-iptables").read(), \
        open("/proc/sys/net/bridge/bridge-nf-call-ip6tables").read()
    servers = []
    peers = {}
    links = Links()
    try:
        for name in ns.values():
            sh("ip", "netns", "add", name)
        sh("ip", "-n", ns["u1"], "link", "add", "ul", "type", "veth", "peer", "name", "ul", "netns", ns["u2"])
        for h in (1, 2):
            u, n = ns[f"u{h}"], ns[f"n{h}"]
            sh("ip", "-n", u, "addr", "add", f"192.0.2.{h}/24", "dev", "ul")
            sh("ip", "-n", u, "link", "set", "ul", "up")
            # br_netfilter off, as Links.ensure_netns leaves every namespace it makes: the table must do without.
            sh("ip", "netns", "exec", n, "sysctl", "-q", "-w", "net.bridge.bridge-nf-call-iptables=0",
               "net.bridge.bridge-nf-call-ip6tables=0")
            sh("ip", "-n", n, "link", "add", "br0", "type", "bridge")
            sh("ip", "-n", n, "link", "set", "br0", "up")
            # Made in the underlay namespace and moved: its UDP socket stays there, as the plugin's VXLAN devices'
            # stays in the host's.
            sh("ip", "-n", u, "link", "add", "vxl", "type", "vxlan", "id", "4242", "local", f"192.0.2.{h}",
               "dstport", "4789", "nolearning")
            sh("ip", "-n", u, "link", "set", "vxl", "netns", n)
            sh("ip", "-n", n, "link", "set", "vxl", "name", "vxlan0")
            sh("ip", "-n", n, "link", "set", "vxlan0", "master", "br0", "mtu", "1450", "up")
            sh("ip", "netns", "exec", n, "bridge", "fdb", "append", "00:00:00:00:00:00", "dev", "vxlan0", "dst",
               f"192.0.2.{3 - h}")
        containers = {}
        for i, host in ((1, "n1"), (2, "n1"), (3, "n1"), (4, "n2")):
            c, n = ns[f"c{i}"], ns[host]
            sh("ip", "-n", n, "link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0", "netns", c)
            sh("ip", "-n", n, "link", "set", f"p{i}", "master", "br0", "mtu", "1450", "up")
            sh("ip", "-n", c, "link", "set", "lo", "up")
            sh("ip", "-n", c, "link", "set", "eth0", "mtu", "1450", "up")
            sh("ip", "-n", c, "addr", "add", f"10.89.0.{i}/24", "dev", "eth0")
            sh("ip", "-n", c, "addr", "add", f"fd89::{i}/64", "dev", "eth0", "nodad")
            server = subprocess.Popen(["ip", "netns", "exec", c, sys.executable, "-c", SERVER, *map(str, PORTS)],
                                      stdout=subprocess.PIPE, text=True)
            servers.append(server)
            assert server.stdout.readline().strip() == "ready"
            containers[f"c{i}"] = Container(c, f"10.89.0.{i}", f"fd89::{i}")
            peers[f"c{i}"] = UdpPeer(c, UDP_PORTS)
        fw = pn.PolicyFirewall(links.nft)
        for c in containers.values():  # every address answers before any policy (neighbours learnt)
            wait_until(lambda c=c: containers["c1"].reaches(c.ip, PORTS[0]) if c.ns != containers["c1"].ns
                       else True, 10, f"{c.ip} reachable")
        yield dict(ns=ns, links=links, fw=fw, host_before=host_before, peers=peers, **containers)
    finally:
        for server in servers:
            server.kill()  # `ip netns exec` execs the interpreter: this PID is the server's
            server.wait(timeout=10)
        for peer in peers.values():
            peer.stop()
        links.close()
        for name in ns.values():
            sh("ip", "netns", "del", name, check=False)


@pytest.fixture
def net(lab):
    """host 1's network namespace, its policy removed after the test (which also leaves its switch off)."""
    yield lab
    lab["fw"].remove_policy(lab["ns"]["n1"])


def both(c):
    return (c.ip, c.ip6)


def guarded(lab):
    return frozenset(a for name in ("c1", "c2", "c3") for a in both(lab[name]))


def pairs(src, dst):
    return list(zip(both(src), both(dst)))


def bridge_netfilter(ns):
    return sh("ip", "netns", "exec", ns, "cat", "/proc/sys/net/bridge/bridge-nf-call-iptables",
              "/proc/sys/net/bridge/bridge-nf-call-ip6tables").stdout.split()


def test_the_table_is_the_bridge_familys_and_br_netfilter_stays_off(net):
    ns = net["ns"]
    net["fw"].ensure_policy(ns["n1"], "deny", False, Elements(guarded=guarded(net)))
    tables = json.loads(sh("ip", "netns", "exec", ns["n1"], "nft", "-j", "list", "tables").stdout)["nftables"]
    assert {(t["table"]["family"], t["table"]["name"]) for t in tables if "table" in t} == {
        ("bridge", "vxnet_policy"), ("bridge", "vxnet_policy_udp")}
    assert bridge_netfilter(ns["n1"]) == ["0", "0"] and bridge_netfilter(ns["n2"]) == ["0", "0"]
    host_now = open("/proc/sys/net/bridge/bridge-nf-call-iptables").read(), \
        open("/proc/sys/net/bridge/bridge-nf-call-ip6tables").read()
    assert host_now == net["host_before"]


def test_exposed_mode_lets_exposed_ports_through_and_drops_others(net):
    c1, c2, c4 = net["c1"], net["c2"], net["c4"]
    n1 = net["ns"]["n1"]
    open_port, closed_port = PORTS[1], PORTS[2]
    probes = [(src, dst, port) for src in (c1, c4) for dst in both(c2) for port in (open_port, closed_port)]
    for src, dst, port in probes:  # positive controls: before the policy every probe connects
        assert src.reaches(dst, port), (src.ns, dst, port)
    elements = Elements(guarded=guarded(net),
                        exposed=frozenset((a, "tcp", open_port) for a in both(c2)))
    net["fw"].ensure_policy(n1, "exposed", False, elements)
    assert net["fw"].policy_drift(n1, "exposed", False, elements) is None
    before = net["fw"].counters(n1).get(pn.DROP, (0, 0))[0]
    for src, dst, port in probes:  # local (c1, a port of the bridge) and remote (c4, through VXLAN)
        assert src.reaches(dst, port) == (port == open_port), (src.ns, dst, port)
    counters = net["fw"].counters(n1)
    assert counters[pn.DROP][0] - before >= 4  # one SYN per refused probe at least (4 probes)
    assert counters["vxnet:policy-allowed:exposed"][0] >= 4
    # The drop metric's reason="policy" reads the same counter.
    assert Firewall(net["links"].nft).dropped(n1)["policy"][0] == counters[pn.DROP][0]


def test_deny_lets_exactly_the_allowed_tuple_through(net):
    c1, c2, c3, c4 = net["c1"], net["c2"], net["c3"], net["c4"]
    n1 = net["ns"]["n1"]
    port, other = PORTS[3], PORTS[4]
    allowed = [(c1, d, port) for d in both(c2)] + [(c4, d, port) for d in both(c2)]
    refused = ([(c3, d, port) for d in both(c2)]         # another source
               + [(c1, d, other) for d in both(c2)]      # another port
               + [(c2, d, port) for d in both(c1)])      # the reverse direction
    for src, dst, p in allowed + refused:
        assert src.reaches(dst, p), (src.ns, dst, p)
    allow = frozenset((s, d, "tcp", port) for s, d in pairs(c1, c2) + pairs(c4, c2))
    elements = Elements(guarded=guarded(net), allow=allow)
    net["fw"].ensure_policy(n1, "deny", False, elements)
    net["fw"].ensure_policy(n1, "deny", False, elements)  # a replay
    for src, dst, p in allowed:
        assert src.reaches(dst, p), (src.ns, dst, p)  # the reply ("ok") came back: replies flow
    for src, dst, p in refused:
        assert not src.reaches(dst, p), (src.ns, dst, p)
    # A destination on another host is that host's to guard: c2 opens to c4 (host 2 has no policy).
    assert c2.reaches(c4.ip, port) and c2.reaches(c4.ip6, port)

    # The allow removed (one transaction, element deletes only): refused again; a replay changes nothing.
    gone = Diff(remove=Elements(allow=frozenset(e for e in allow if e[0] in both(c1))))
    net["fw"].update_policy(n1, gone)
    net["fw"].update_policy(n1, gone)
    for dst in both(c2):
        assert not c1.reaches(dst, port)
        assert c4.reaches(dst, port)  # the other allow is still there: the same probe passes
    now = Elements(guarded=guarded(net), allow=frozenset(e for e in allow if e[0] in both(c4)))
    assert net["fw"].policy_drift(n1, "deny", False, now) is None
    # And back.
    net["fw"].update_policy(n1, Diff(add=Elements(allow=frozenset(e for e in allow if e[0] in both(c1)))))
    assert all(c1.reaches(dst, port) for dst in both(c2))
    assert net["fw"].policy_drift(n1, "deny", False, elements) is None


def test_audit_logs_and_does_not_drop(net):
    c2, c3 = net["c2"], net["c3"]
    n1 = net["ns"]["n1"]
    port = PORTS[5]
    reader = Reader(net["links"].netns_path(n1))
    try:
        net["fw"].ensure_policy(n1, "deny", True, Elements(guarded=guarded(net)))
        for dst in both(c2):
            assert c3.reaches(dst, port)
        records = wait_until(lambda: [r for r in reader.read(0.2) if r.prefix == pn.LOG_AUDIT] or None, 5,
                             "audit records")
        records += [r for r in reader.read(0.5) if r.prefix == pn.LOG_AUDIT]
        assert {(r.src, r.dst, r.proto, r.dport) for r in records} == \
            {(s, d, "tcp", port) for s, d in pairs(c3, c2)}
        counters = net["fw"].counters(n1)
        assert counters[pn.AUDIT][0] == 2 and pn.DROP not in counters
        assert "policy" not in Firewall(net["links"].nft).dropped(n1)  # audit drops nothing
        # Positive control of the probe: the same connection in enforcing mode is refused.
        net["fw"].ensure_policy(n1, "deny", False, Elements(guarded=guarded(net)))
        assert not c3.reaches(c2.ip, port)
    finally:
        reader.close()


def test_a_dropped_connection_is_one_record_with_its_fields(net):
    c1, c2 = net["c1"], net["c2"]
    n1 = net["ns"]["n1"]
    port = PORTS[6]
    for dst in both(c2):
        assert c1.reaches(dst, port)
    reader = Reader(net["links"].netns_path(n1))
    try:
        net["fw"].ensure_policy(n1, "deny", False, Elements(guarded=guarded(net)))
        for dst in both(c2):
            started = time.time()
            # Shorter than TCP's first retransmission (1 s): exactly one SYN.
            passed, sport = c1.connect(dst, port, timeout=0.5)
            assert not passed
            (record,) = wait_until(lambda: reader.read(0.2), 5, "a record")
            assert reader.read(0.3) == []  # one, not more
            assert (record.prefix, record.src, record.dst, record.proto, record.dport) == \
                (pn.LOG_DROP, c1.ip if ":" not in dst else c1.ip6, dst, "tcp", port)
            assert record.sport > 1023 and started - 1 <= record.timestamp <= time.time() + 1
        assert reader.lost == 0 and reader.unparsable == 0
    finally:
        reader.close()


def test_rate_limited_log_says_how_many_it_suppressed(net):
    c1, c2 = net["c1"], net["c2"]
    n1 = net["ns"]["n1"]
    links = net["links"]
    fw = pn.PolicyFirewall(links.nft, log_rate=1, log_burst=3)
    assert c1.reaches(c2.ip, PORTS[7])  # positive control of the first probe of the burst
    reader = Reader(links.netns_path(n1))
    try:
        fw.ensure_policy(n1, "deny", False, Elements(guarded=guarded(net)))
        acc = Accounting({pn.LOG_DROP: fw.counters(n1)[pn.DROP][0]})
        sh("ip", "netns", "exec", c1.ns, sys.executable, "-c", SYN_BURST, c2.ip, str(PORTS[7]), "30")
        records = []
        wait_until(lambda: records.extend(reader.read(0.2)) or len(records) >= 3, 5, "the burst's records")
        records += reader.read(0.5)
        for record in records:
            acc.saw(record)
        counted = fw.counters(n1)[pn.DROP][0]
        suppressed = acc.suppressed({pn.LOG_DROP: counted})[pn.LOG_DROP]
        assert counted >= 30  # the counter is exact: every SYN
        assert 3 <= len(records) < 30 and suppressed > 0
        assert len(records) + suppressed == counted and reader.lost == 0
    finally:
        reader.close()


def test_removal_leaves_nothing_and_a_replay_is_no_error(net):
    n1 = net["ns"]["n1"]
    c1, c2 = net["c1"], net["c2"]
    port = PORTS[8]
    net["fw"].ensure_policy(n1, "deny", False, Elements(guarded=guarded(net)))
    assert not c1.reaches(c2.ip, port)
    net["fw"].remove_policy(n1)
    net["fw"].remove_policy(n1)
    assert sh("ip", "netns", "exec", n1, "nft", "list", "tables").stdout.strip() == ""
    assert net["fw"].policy_drift(n1, "open", False, Elements()) is None
    assert c1.reaches(c2.ip, port)  # the same probe passes again


def test_a_namespace_vxnet_makes_starts_without_bridge_netfilter(netns_dir):
    """Links.ensure_netns turns br_netfilter off (its default in a new namespace is on: brnf_init_net, as a namespace
    of `ip netns add` shows): no network pays for it, and a policy needs none."""
    links = Links(netns_dir)
    name = f"vxtp{secrets.token_hex(3)}"
    scratch = f"vxtp{secrets.token_hex(3)}"
    sh("ip", "netns", "add", scratch)
    try:
        assert bridge_netfilter(scratch) == ["1", "1"]
        links.ensure_netns(name)
        path = links.netns_path(name)
        off = sh("nsenter", f"--net={path}", "cat", "/proc/sys/net/bridge/bridge-nf-call-iptables",
                 "/proc/sys/net/bridge/bridge-nf-call-ip6tables").stdout.split()
        assert off == ["0", "0"]
        pn.PolicyFirewall(links.nft).ensure_policy(name, "deny", False, Elements(guarded=frozenset({"10.0.0.2"})))
        assert sh("nsenter", f"--net={path}", "cat", "/proc/sys/net/bridge/bridge-nf-call-iptables",
                  "/proc/sys/net/bridge/bridge-nf-call-ip6tables").stdout.split() == ["0", "0"]
    finally:
        links.remove_netns(name)
        links.close()
        sh("ip", "netns", "del", scratch, check=False)


# -- what the stateless table lets through, and what not ---------------------------------------------------------
def udp_exchange(peers, src, dst, sport, dport, length=0):
    """src sends "ping" from sport to dst:dport: (dst's peer got it, src's peer got the "pong" back)."""
    peers[src.ns_key].send(sport, dst.addr, dport, "ping", length)
    arrived = peers[dst.ns_key].saw(dport, src.addr, sport, "ping")
    return arrived, peers[src.ns_key].saw(sport, dst.addr, dport, "pong")


@dataclasses.dataclass(frozen=True)
class End:
    """One end of a UDP probe: the lab's container key and one of its addresses."""
    ns_key: str
    addr: str


def ends(net, key):
    return End(key, net[key].ip), End(key, net[key].ip6)


def unsolicited(peers, src, dst, sport, dport):
    """src sends "hello" from sport to dst:dport: did it arrive?"""
    peers[src.ns_key].send(sport, dst.addr, dport, "hello")
    return peers[dst.ns_key].saw(dport, src.addr, sport, "hello")


def test_udp_replies_pass_after_an_allowed_datagram_and_unsolicited_ones_do_not(net):
    peers, n1 = net["peers"], net["ns"]["n1"]
    c1s, c2s, c4s = ends(net, "c1"), ends(net, "c2"), ends(net, "c4")
    s, s2, p = UDP_PORTS[1], UDP_PORTS[2], UDP_PORTS[3]
    # Where the reply mark would show if it left the network's namespace: a marked datagram answers a record, so
    # its destination is a member here (c1), which counts the datagrams it gets and those of them with the mark.
    subprocess.run(["ip", "netns", "exec", net["c1"].ns, "nft", "-f", "-"], check=True, text=True, timeout=30, input=(
        f"table inet markcheck {{\n chain c {{\n  type filter hook input priority 0; policy accept;\n"
        f"  udp dport {s} meta mark {MARK} counter comment \"marked\"\n  udp dport {s} counter comment \"all\"\n"
        " }\n}\n"))
    # Positive controls: before the policy, everything of each probe arrives.
    for c1, c2, c4 in zip(c1s, c2s, c4s):
        assert unsolicited(peers, c2, c1, p, s2) and unsolicited(peers, c4, c1, p, s2)
    allow = frozenset((a.addr, b.addr, "udp", p) for a, b in zip(c1s, c2s))
    net["fw"].ensure_policy(n1, "deny", False, Elements(guarded=guarded(net), allow=allow))
    for c1, c2, c4 in zip(c1s, c2s, c4s):
        # Not yet asked: the same datagram from the peer's port to c1's is refused.
        assert not unsolicited(peers, c2, c1, p, s)
        # The allowed direction (c1 -> c2:p) arrives, and its reply comes back (c2 -> c1 has no rule).
        assert udp_exchange(peers, c1, c2, s, p) == (True, True)
        # Now the reverse of the record passes, from the peer's own port only ...
        assert unsolicited(peers, c2, c1, p, s)
        # ... and the same peer and port to another port of c1 is refused (the record is the 4-tuple).
        assert not unsolicited(peers, c2, c1, p, s2)
        # Another host (c4: its own host guards nothing) answers through VXLAN: c1's datagram to it was
        # recorded where it was accepted (an unguarded destination), so its reply passes; unsolicited does not.
        assert not unsolicited(peers, c4, c1, p, s)
        assert udp_exchange(peers, c1, c4, s, p) == (True, True)
        assert not unsolicited(peers, c4, c1, p, s2)
    # The replies (c2's, and c4's through VXLAN) were marked in n1 to pass, and the mark stayed there.
    counted = libnftables.rule_counters(sh("ip", "netns", "exec", net["c1"].ns, "nft", "-j", "list", "table", "inet",
                                           "markcheck").stdout)
    assert counted["all"][0] >= 4 and counted["marked"][0] == 0, counted
    sh("ip", "netns", "exec", net["c1"].ns, "nft", "delete", "table", "inet", "markcheck")
    # A datagram refused on this host records nothing: c1 -> c2 on a port no rule allows, then the reverse.
    refused = UDP_PORTS[4]
    for c1, c2 in zip(c1s, c2s):
        assert udp_exchange(peers, c1, c2, s, refused) == (False, False)
        assert not unsolicited(peers, c2, c1, refused, s)
    # Traffic either way refreshes the record: wait until its timeout has run down a second, then a reply.
    key = f"{net['c1'].ip} . {net['c2'].ip} . {s} . {p}"

    def expires():
        listed = json.loads(sh("ip", "netns", "exec", n1, "nft", "-j", "list", "set", "bridge", pn.UDP_TABLE,
                               "udp4").stdout)["nftables"]
        elems = next(i["set"] for i in listed if "set" in i).get("elem", [])
        return {pn.element_text(e): e["elem"]["expires"] for e in elems}.get(key)

    assert 0 < expires() <= pn.UDP_TIMEOUT
    wait_until(lambda: expires() <= pn.UDP_TIMEOUT - 2, 10, "the record's timeout to run down")
    assert unsolicited(peers, c2s[0], c1s[0], p, s)  # the reply direction
    assert expires() >= pn.UDP_TIMEOUT - 1


# A TCP client that stays connected: prints "echo N" each time the server echoed its Nth line, sends the next one
# for each line on its stdin; exits if it cannot connect.
CHAT = r"""
import socket, sys
print("ready", flush=True)
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)
except OSError:
    sys.exit(0)
f = s.makefile("rwb", buffering=0)
n = 0
while True:
    f.write(b"line\n")
    if f.readline() != b"line\n":
        sys.exit(1)
    print("echo", n, flush=True)
    n += 1
    if not sys.stdin.readline():
        sys.exit(0)
"""
ECHO_SERVER = r"""
import socket, sys, threading
s = socket.socket(socket.AF_INET6); s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("::", int(sys.argv[1]))); s.listen(8)
print("ready", flush=True)
def serve(c):
    for line in c.makefile("rb"):
        c.sendall(line)
while True:
    threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()
"""
CHAT_PORT = 7300  # not one of PORTS (the lab's servers listen on those)


def test_tcp_new_refused_established_passes_and_replies_pass(net):
    c1, c2 = net["c1"], net["c2"]
    n1, port = net["ns"]["n1"], PORTS[9]
    server = Lines(["ip", "netns", "exec", c2.ns, sys.executable, "-c", ECHO_SERVER, str(CHAT_PORT)])
    chats = []

    def chat():
        chats.append(Lines(["ip", "netns", "exec", c1.ns, sys.executable, "-c", CHAT, c2.ip, str(CHAT_PORT)]))
        return chats[-1]

    try:
        assert c1.reaches(c2.ip, port) and c2.reaches(c1.ip, port)  # positive controls
        talk = frozenset({(c1.ip, c2.ip, "tcp", CHAT_PORT)})
        allow = frozenset((s, d, "tcp", port) for s, d in pairs(c1, c2)) | talk
        net["fw"].ensure_policy(n1, "deny", False, Elements(guarded=guarded(net), allow=allow))
        first = chat()
        assert first.lines(5, until="echo")[-1:] == ["echo 0"]  # opened, and the server's bytes came back
        assert c1.reaches(c2.ip, port) and c1.reaches(c2.ip6, port)  # new and allowed
        assert not c2.reaches(c1.ip, port)  # the reverse of an allowed pair opens nothing
        # The rule removed: a new connection is refused (the same probe as the first) ...
        net["fw"].update_policy(n1, Diff(remove=Elements(allow=talk)))
        assert chat().lines(5, until="echo") == []
        # ... and the open one goes on both ways: none of its segments is a SYN without ACK.
        first.proc.stdin.write("more\n")
        first.proc.stdin.flush()
        assert first.lines(5, until="echo")[-1:] == ["echo 1"]
    finally:
        for one in chats + [server]:
            one.stop()


def test_a_bare_ack_gets_the_destinations_rst_and_a_syn_nothing(net):
    """What a stateless judgment lets through, as documented: a segment without SYN reaches the destination,
    whose kernel answers a port with no connection with a RST; the SYN of the same probe is dropped."""
    c3, c2 = net["c3"], net["c2"]
    n1, port = net["ns"]["n1"], PORTS[11]

    def probe(flags):
        return sh("ip", "netns", "exec", c3.ns, sys.executable, "-c", RAW_TCP, c3.ip, c2.ip, str(port), flags,
                  str(PROBE_TIMEOUT)).stdout.strip()

    assert probe("S") == "SA" and probe("A") == "R"  # positive controls: the server's SYN-ACK, an RST
    net["fw"].ensure_policy(n1, "deny", False, Elements(guarded=guarded(net)))
    assert probe("S") == "none"
    assert probe("A") == "R"


def test_icmp_echo_reply_and_errors_pass_and_an_echo_request_needs_a_rule(net):
    c1, c2 = net["c1"], net["c2"]
    n1 = net["ns"]["n1"]

    def ping(src, dst):
        return sh("ip", "netns", "exec", src.ns, "ping", "-c", "1", "-W", str(int(PROBE_TIMEOUT)), dst,
                  check=False).returncode == 0

    def closed_port():
        """A datagram to a UDP port of c2 nothing listens on: "refused" when the port unreachable came back."""
        return sh("ip", "netns", "exec", c1.ns, sys.executable, "-c", UNREACHABLE, c2.ip, "7299").stdout.strip()

    for dst in both(c2):
        assert ping(c1, dst)
    for dst in both(c1):
        assert ping(c2, dst)
    assert closed_port() == "refused"
    net["fw"].ensure_policy(n1, "deny", False, Elements(guarded=guarded(net)))
    for dst in both(c2):
        assert not ping(c1, dst)  # an echo-request to a guarded member, no rule
    assert closed_port() == "silence"  # the datagram itself is refused
    allow_all = frozenset(pairs(c1, c2))
    net["fw"].update_policy(n1, Diff(add=Elements(allow_all=allow_all)))
    for dst in both(c2):
        assert ping(c1, dst)  # its echo-reply (c2 -> c1: no rule) passes
    for dst in both(c1):
        assert not ping(c2, dst)  # the other direction is another echo-request
    # An error passes: the datagram to the closed port, allowed now, brings c1 the port unreachable (c2 -> c1, no
    # rule), which its connected socket reports.
    assert closed_port() == "refused"


UNREACHABLE = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1)
s.connect((sys.argv[1], int(sys.argv[2]))); s.send(b"x")
try:
    s.recv(10)
    print("answered")
except ConnectionRefusedError:
    print("refused")
except socket.timeout:
    print("silence")
"""


def test_a_later_fragment_passes_and_a_refused_first_one_keeps_the_datagram_out(net):
    peers, n1 = net["peers"], net["ns"]["n1"]
    c1s, c2s = ends(net, "c1"), ends(net, "c2")
    s, p, refused = UDP_PORTS[5], UDP_PORTS[6], UDP_PORTS[7]
    big = 4000  # three fragments at the lab's MTU of 1450, each way
    for c1, c2 in zip(c1s, c2s):
        assert udp_exchange(peers, c1, c2, s, p, big) == (True, True)
        assert udp_exchange(peers, c1, c2, s, refused, big) == (True, True)
    allow = frozenset((a.addr, b.addr, "udp", p) for a, b in zip(c1s, c2s))
    net["fw"].ensure_policy(n1, "deny", False, Elements(guarded=guarded(net), allow=allow))
    before = net["fw"].counters(n1)
    for c1, c2 in zip(c1s, c2s):
        assert udp_exchange(peers, c1, c2, s, p, big) == (True, True)  # the reply fragmented too
        assert udp_exchange(peers, c1, c2, s, refused, big) == (False, False)
    # Dropped: the two refused first fragments, and none of the later ones (they passed, to no avail).
    assert net["fw"].counters(n1)[pn.DROP][0] - before[pn.DROP][0] == 2


def test_sctp_is_judged_by_its_zero_verification_tag(net):
    """SCTP (raw packets: this kernel has no SCTP): tag 0 (an INIT) is judged, any other tag passes."""
    c1, c2 = net["c1"], net["c2"]
    n1, port = net["ns"]["n1"], PORTS[12]
    receiver = Lines(["ip", "netns", "exec", c2.ns, sys.executable, "-c", RAW_SCTP_RECEIVE])
    try:
        def arrives(dst, vtag):
            sh("ip", "netns", "exec", c1.ns, sys.executable, "-c", RAW_SCTP_SEND, dst, str(port), str(vtag))
            return f"vtag {vtag}" in receiver.lines(PROBE_TIMEOUT, until=f"vtag {vtag}")

        for dst in both(c2):
            assert arrives(dst, 0) and arrives(dst, 77)
        net["fw"].ensure_policy(n1, "deny", False, Elements(guarded=guarded(net)))
        for dst in both(c2):
            assert not arrives(dst, 0)  # an INIT nothing allows
            assert arrives(dst, 77)  # a packet of an association (which only an accepted INIT starts)
        net["fw"].update_policy(n1, Diff(add=Elements(allow=frozenset((s, d, "sctp", port) for s, d in pairs(c1, c2)))))
        for dst in both(c2):
            assert arrives(dst, 0)  # allowed
    finally:
        receiver.stop()


VLAN_FRAME = r"""
import socket, struct, sys
# An IPv4 UDP datagram to DST:DPORT in TAGS 802.1Q tags, sent on eth0 to DSTMAC.
src, dst, dport, dmac, tags, marker = sys.argv[1:3] + [int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), sys.argv[6]]
def checksum(data):
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF
payload = marker.encode().ljust(8, b".")
udp = struct.pack("!HHHH", 5000, dport, 8 + len(payload), 0) + payload
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0, socket.inet_aton(src), socket.inet_aton(dst))
ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
mac = open("/sys/class/net/eth0/address").read().strip()
frame = bytes.fromhex(dmac.replace(":", "")) + bytes.fromhex(mac.replace(":", ""))
frame += b"".join(struct.pack("!HH", 0x8100, 5 + i) for i in range(tags)) + struct.pack("!H", 0x0800)
s.send(frame + ip + udp)
"""
CAPTURE = r"""
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))  # ETH_P_ALL
s.bind(("eth0", 0))
print("ready", flush=True)
while True:
    frame = s.recv(65536)
    for marker in sys.argv[1:]:
        if marker.encode() in frame:
            print("seen", marker, flush=True)
"""


def test_frames_with_two_vlan_tags_are_judged_not_waved_through(net):
    """One 802.1Q tag: the receive path moves it out of the frame, and the IP packet is judged; two: no rule sees
    the IP header, and it is refused like a packet nothing allows (not passed as "not IP")."""
    c1, c2 = net["c1"], net["c2"]
    n1, port = net["ns"]["n1"], UDP_PORTS[8]
    mac = sh("ip", "netns", "exec", c2.ns, "cat", "/sys/class/net/eth0/address").stdout.strip()
    markers = [f"tag{tags}-{secrets.token_hex(2)}" for tags in range(3)]
    capture = Lines(["ip", "netns", "exec", c2.ns, sys.executable, "-c", CAPTURE, *markers])
    try:
        def arrives(tags, marker):
            sh("ip", "netns", "exec", c1.ns, sys.executable, "-c", VLAN_FRAME, c1.ip, c2.ip, str(port), mac,
               str(tags), marker)
            return f"seen {marker}" in capture.lines(PROBE_TIMEOUT, until=f"seen {marker}")

        for tags, marker in enumerate(markers):
            assert arrives(tags, marker)  # positive controls
        net["fw"].ensure_policy(n1, "deny", False, Elements(guarded=guarded(net)))
        drops = net["fw"].counters(n1)[pn.DROP][0]
        for tags, marker in enumerate(markers):
            assert not arrives(tags, marker), tags
        assert net["fw"].counters(n1)[pn.DROP][0] - drops == 3
    finally:
        capture.stop()


def test_a_restart_keeps_a_udp_reply_flow_passing_and_new_records_do_not(net):
    """ensure_policy on tables made as the mode makes them (a plugin restart, a repair) changes the policy table's
    elements only and leaves the UDP records' table: a reply to a datagram sent before still passes. The records'
    table made anew (the positive control of the probe) loses them, and the same reply is refused."""
    peers, links, n1 = net["peers"], net["links"], net["ns"]["n1"]
    c1, c2 = ends(net, "c1")[0], ends(net, "c2")[0]
    s, p = UDP_PORTS[9], UDP_PORTS[10]
    allow = frozenset({(c1.addr, c2.addr, "udp", p)})
    elements = Elements(guarded=guarded(net), allow=allow)
    net["fw"].ensure_policy(n1, "deny", False, elements)
    assert udp_exchange(peers, c1, c2, s, p) == (True, True)
    # A new process (no state of its own) with other elements: the allow gone (the record, not the rule, lets a
    # reply through), an allow-all added. The table's elements change, nothing else.
    restarted = pn.PolicyFirewall(links.nft)
    more = dataclasses.replace(elements, allow=frozenset(), allow_all=frozenset({(net["c3"].ip, c2.addr)}))
    restarted.ensure_policy(n1, "deny", False, more)
    assert restarted.policy_drift(n1, "deny", False, more) is None
    assert unsolicited(peers, c2, c1, p, s)  # c2's datagram to c1, the reverse of c1's: still passes
    assert net["c3"].reaches(c2.addr, PORTS[13])  # and the added element is in force
    assert udp_exchange(peers, c1, c2, UDP_PORTS[11], p) == (False, False)  # the removed one is not
    # The policy table replaced whole (another mode, an older vxnet's table) keeps them too: a table of their own.
    links.nft(n1, pn.replace_batch("deny", False, more), "the policy table replaced whole")
    assert unsolicited(peers, c2, c1, p, s)
    links.nft(n1, pn.udp_batch(), "the records' table made anew")
    assert not unsolicited(peers, c2, c1, p, s)
