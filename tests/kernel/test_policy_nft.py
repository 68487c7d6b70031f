"""Policy enforcement against the real kernel. One network namespace (host 1) with a bridge, three "containers"
(namespaces on veth ports, IPv4 + IPv6) and a VXLAN device whose UDP socket lives in an underlay namespace, as the
plugin's does in the host's; a second network namespace (host 2) with one container, joined over a veth underlay.
The policy table of netdriver/policy_nft.py in host 1's network namespace decides who may open what; every
negative probe is run first as a positive control, the same probe with the same timeout, before the policy.

Ports are distinct per test: conntrack remembers a connection that passed, and a later test must not ride on it."""

import dataclasses
import os
import secrets
import subprocess
import sys
import time
from typing import FrozenSet

import pytest

from kernel.links import Links
from kernel.nflog import Accounting, Reader
from netdriver import policy_nft as pn
from netdriver.isolation import Firewall
from tests.harness.proc import wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces")

PROBE_TIMEOUT = 1.0  # a TCP connect within a namespace's bridge answers in well under a millisecond


@dataclasses.dataclass(frozen=True)
class Elements:
    """Stand-in for netdriver/policy.py's Elements (same field names and shapes) until that module is on main."""
    guarded: FrozenSet = frozenset()
    exposed: FrozenSet = frozenset()
    allow: FrozenSet = frozenset()
    allow_all: FrozenSet = frozenset()


@dataclasses.dataclass(frozen=True)
class Diff:
    add: Elements = Elements()
    remove: Elements = Elements()


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
    links = Links()
    try:
        for name in ns.values():
            sh("ip", "netns", "add", name)
        sh("ip", "-n", ns["u1"], "link", "add", "ul", "type", "veth", "peer", "name", "ul", "netns", ns["u2"])
        for h in (1, 2):
            u, n = ns[f"u{h}"], ns[f"n{h}"]
            sh("ip", "-n", u, "addr", "add", f"192.0.2.{h}/24", "dev", "ul")
            sh("ip", "-n", u, "link", "set", "ul", "up")
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
        fw = pn.PolicyFirewall(links.nft, links.set_bridge_netfilter, links.bridge_netfilter)
        # The second host's network namespace has no policy: it pays nothing for br_netfilter.
        links.set_bridge_netfilter(ns["n2"], False)
        for c in containers.values():  # every address answers before any policy (neighbours learnt)
            wait_until(lambda c=c: containers["c1"].reaches(c.ip, PORTS[0]) if c.ns != containers["c1"].ns
                       else True, 10, f"{c.ip} reachable")
        yield dict(ns=ns, links=links, fw=fw, host_before=host_before, **containers)
    finally:
        for server in servers:
            server.kill()  # `ip netns exec` execs the interpreter: this PID is the server's
            server.wait(timeout=10)
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


def test_switch_is_per_namespace_and_the_host_keeps_its_value(net):
    links, ns = net["links"], net["ns"]
    net["fw"].ensure_policy(ns["n1"], "deny", False, Elements(guarded=guarded(net)))
    assert links.bridge_netfilter(ns["n1"]) == (True, True)
    assert links.bridge_netfilter(ns["n2"]) == (False, False)  # another namespace: untouched
    net["fw"].remove_policy(ns["n1"])
    assert links.bridge_netfilter(ns["n1"]) == (False, False)
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
    fw = pn.PolicyFirewall(links.nft, links.set_bridge_netfilter, links.bridge_netfilter, log_rate=1, log_burst=3)
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
    links, n1 = net["links"], net["ns"]["n1"]
    c1, c2 = net["c1"], net["c2"]
    port = PORTS[8]
    net["fw"].ensure_policy(n1, "deny", False, Elements(guarded=guarded(net)))
    assert not c1.reaches(c2.ip, port)
    net["fw"].remove_policy(n1)
    net["fw"].remove_policy(n1)
    assert sh("ip", "netns", "exec", n1, "nft", "list", "tables").stdout.strip() == ""
    assert links.bridge_netfilter(n1) == (False, False)
    assert net["fw"].policy_drift(n1, "open", False, Elements()) is None
    assert c1.reaches(c2.ip, port)  # the same probe passes again


def test_a_namespace_vxnet_makes_starts_without_bridge_netfilter(netns_dir):
    """Links.ensure_netns turns br_netfilter off (its default in a new namespace is on: brnf_init_net, as a namespace
    of `ip netns add` shows): an open network pays nothing for it."""
    links = Links(netns_dir)
    name = f"vxtp{secrets.token_hex(3)}"
    scratch = f"vxtp{secrets.token_hex(3)}"
    sh("ip", "netns", "add", scratch)
    try:
        assert sh("ip", "netns", "exec", scratch, "cat", "/proc/sys/net/bridge/bridge-nf-call-iptables",
                  "/proc/sys/net/bridge/bridge-nf-call-ip6tables").stdout.split() == ["1", "1"]
        links.ensure_netns(name)
        assert links.bridge_netfilter(name) == (False, False)
        links.set_bridge_netfilter(name, True)
        links.ensure_netns(name)  # a replay on an existing namespace keeps what a policy set
        assert links.bridge_netfilter(name) == (True, True)
    finally:
        links.remove_netns(name)
        links.close()
        sh("ip", "netns", "del", scratch, check=False)
