"""Policies in force on two simulated hosts: the real plugin in each (over the lab's etcd), driven through its
socket as dockerd drives it, with "containers" that are namespaces holding a veth's container end (IPv4 and
IPv6). Standalone networks joined by `-o overlay=NAME`: each host's network has an ID of its own, and a rule given
through one host's network (`vxnet policy`, the real CLI entry point) is the segment's, in force on the other.

No dockerd here: identities are published the way plugin/endpoint_identity.py publishes them, through
NetworkDriver.publish_identity, run inside the host against the same etcd (IDENTITY below).

Every refused probe is the same probe, with the same timeout, as one that succeeds in the same test (an allow of
everything is given, checked and removed again). Ports differ between checks, so that no check rides on an
earlier one's connection or UDP record."""

import json
import os
import secrets
import sys
import time

import pytest

from kernel import names
from netdriver import policy_nft
from tests.harness import driver_calls
from tests.harness.driver_calls import within
from tests.harness.plugin import Plugin

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces")

PROBE = 1.0  # a TCP connect across the simulated underlay answers in milliseconds
REMOVAL_DEADLINE = 2.0  # the issue: a removed rule refuses again within 2 s
V4, V6 = "10.200.98", "fd00:98::"
E4, E6 = "10.200.99", "fd00:99::"

# An echo server on each port given: a line in, the same line out, for as long as the connection lasts.
SERVER = r"""
import socket, sys, threading
def serve(c):
    with c:
        while True:
            data = c.recv(64)
            if not data:
                return
            c.sendall(data)
def listen(port):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port)); s.listen(64)
    while True:
        c, _ = s.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()
for port in map(int, sys.argv[1:]):
    threading.Thread(target=listen, args=(port,), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""

# One connection: "ok" if it opened and the server's echo (the reply direction) came back.
CLIENT = r"""
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    s.sendall(b"x"); print("ok" if s.recv(1) == b"x" else "closed")
except OSError as e:
    print("failed", type(e).__name__)
"""

# A long-lived connection with traffic: a numbered line every 0.1 s, each echo checked; "broken" and exit when
# the connection fails or an echo takes longer than 2 s.
FLOW = r"""
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)
n = 0
while True:
    n += 1
    try:
        s.sendall(b"%d\n" % n)
        got = b""
        while not got.endswith(b"\n"):
            chunk = s.recv(64)
            if not chunk:
                raise OSError("closed")
            got += chunk
        if int(got) != n:
            raise OSError("echo %r for %d" % (got, n))
    except OSError as e:
        print("broken", n, e, flush=True); sys.exit(1)
    print("ok", n, flush=True)
    time.sleep(0.1)
"""

# NetworkDriver.publish_identity, as the identity writer calls it, from inside the host against its etcd: the
# record's lease is the host's (read from the record itself, as the plugin's lease_id would give it).
IDENTITY = r"""
import json, os, sys
from netdriver.driver import NetworkDriver
from netdriver.store import NetworkStore, segment_of
from store import schema
from store.kvstore import EtcdKV
nid, eid, host, identity = sys.argv[1:5]
kv = EtcdKV(os.environ["ETCD_ENDPOINTS"].split(","))
store = NetworkStore(kv)
net = store.get_network(nid)
lease = kv.get(schema.Schema().peer(segment_of(net.id, net.overlay), eid)).lease
driver = NetworkDriver(store, None, host, "local", None, lease_id=lambda: lease)
print(driver.publish_identity(nid, eid, json.loads(identity)).outcome)
"""


class Net(driver_calls.Net):
    """driver_calls.Net of a policy mode, dual stack; its containers publish their identities."""

    def __init__(self, plugin, overlay, mode, v4, v6, generic=None):
        super().__init__(plugin, overlay, v4, v6, generic={"policy": mode, **(generic or {})})

    def container(self, name, last, identity, exposed=()):
        """An endpoint and what dockerd does with its interface (driver_calls.Net), then its identity published,
        as the identity writer would."""
        eid, mac, ifname = self.endpoint(last, name, exposed)
        moved = self.move_in(name, ifname, last, mac)
        done = self.host.run([sys.executable, "-c", IDENTITY, self.id, eid, self.host.name, json.dumps(identity)],
                             env=self.plugin.env, cwd=self.plugin.root)
        assert done.stdout.split() == ["written"], done.stdout + done.stderr
        return Container(self.host, name, moved.ip6, mac, moved.ip4)


class Container(driver_calls.Container):
    def serve(self, *ports):
        proc = self.host.spawn(["ip", "netns", "exec", self.name, sys.executable, "-c", SERVER,
                                *map(str, ports)], f"server-{self.name}")
        log = os.path.join(self.host.dir, "logs", f"server-{self.name}.log")
        assert within(lambda: os.path.exists(log) and "ready" in open(log).read()), f"server in {self.name}"
        return proc

    def connects(self, target, port, family=4):
        address = target.ip4 if family == 4 else target.ip6
        out = self.host.run(["ip", "netns", "exec", self.name, sys.executable, "-c", CLIENT, address, str(port),
                             str(PROBE)], check=False).stdout
        return out.split() == ["ok"]


def policy_set(host, ns, name):
    """The elements of one set of the policy table in a network namespace, as nft lists them."""
    out = host.run(["ip", "netns", "exec", ns, "nft", "-j", "list", "set", policy_nft.FAMILY, names.POLICY_TABLE,
                    name], check=False)
    if out.returncode:
        return None
    for item in json.loads(out.stdout)["nftables"]:
        if "set" in item:
            elems = item["set"].get("elem", [])
            return sorted(json.dumps(e, sort_keys=True) for e in elems)
    return None


def all_sets(host, ns):
    return {name: policy_set(host, ns, name) for name in ("guarded4", "guarded6", "exposed4", "exposed6", "allow4",
                                                           "allow6", "allow_all4", "allow_all6")}


def allowed(host, ns, src, dst, port):
    """Whether allow4 holds src -> dst on port/tcp (nft lists a concatenation as a list of its parts)."""
    for text in policy_set(host, ns, "allow4") or []:
        parts = json.loads(text)["concat"]
        if parts[0] == src.ip4 and parts[1] == dst.ip4 and parts[-1] == port:
            return True
    return False


def cli(plugin, *args):
    done = plugin.cli("policy", *args, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


def test_deny_and_exposed_across_two_hosts_rules_restart_and_ipv6(hosts, lab):
    h1, h2 = hosts(2, docker=False)
    env = {"VXNET_DOCKER_HOST": "off"}  # no dockerd: identities come from IDENTITY
    p1, p2 = (Plugin(h, lab.etcd.url, env=env).start() for h in (h1, h2))
    tag = secrets.token_hex(3)
    d1, d2 = Net(p1, f"d{tag}", "deny", V4, V6), Net(p2, f"d{tag}", "deny", V4, V6)
    e1, e2 = Net(p1, f"e{tag}", "exposed", E4, E6), Net(p2, f"e{tag}", "exposed", E4, E6)
    made = [(h1, "db"), (h1, "other1"), (h2, "client"), (h2, "other2"), (h1, "web"), (h2, "visitor")]
    try:
        db = d1.container("db", 2, {"container": "db", "service": "", "labels": {"role": "db"}})
        other1 = d1.container("other1", 3, {"container": "other1", "service": "", "labels": {"role": "other"}})
        client = d2.container("client", 4, {"container": "client", "service": "", "labels": {"role": "client"}})
        other2 = d2.container("other2", 5, {"container": "other2", "service": "", "labels": {"role": "other"}})
        db.serve(5432, 5433, 5434, 5435, 5436, *range(6000, 6020))
        client.serve(5432)
        other1.serve(5432)

        # Deny: nothing new is accepted, across hosts or on one host, in either family.
        assert within(lambda: policy_set(h1, d1.ns, "guarded4") is not None and len(policy_set(h1, d1.ns,
                                                                                                 "guarded4")) == 2)
        assert not client.connects(db, 5432) and not other1.connects(db, 5432) and not db.connects(client, 5432)

        # The rule, given on host 2 through host 2's network: the segment's, in force on host 1.
        made_rule = cli(p2, "allow", d2.id, "--from", "label=role=client", "--to", "container=db",
                        "--port", "5432/tcp")
        assert made_rule["segment"] == f"overlay-d{tag}" and made_rule["created"] is True
        rule_id = made_rule["rule"]["id"]
        assert [r["id"] for r in cli(p1, "ls", d1.id)["rules"]] == [rule_id]  # host 1 sees it by its own ID
        assert within(lambda: client.connects(db, 5432)), "the client reaches the db on 5432 across hosts"
        assert client.connects(db, 5432, family=6), "and over IPv6"
        # Another source (on the client's host and on the db's), another port, the reverse direction: refused.
        assert not other2.connects(db, 5432) and not other2.connects(db, 5432, family=6)
        assert not other1.connects(db, 5432)
        assert not client.connects(db, 5433) and not client.connects(db, 5433, family=6)
        assert not db.connects(client, 5432) and not db.connects(client, 5432, family=6)

        # The positive control of those refusals: the same probes, with everything allowed, succeed.
        everything = cli(p1, "allow", d1.id, "--from", "any", "--to", "any")["rule"]["id"]
        assert within(lambda: other2.connects(db, 5434))
        assert other1.connects(db, 5434) and client.connects(db, 5434) and client.connects(db, 5434, family=6)
        assert db.connects(client, 5432) and db.connects(client, 5432, family=6)
        cli(p2, "rm", d2.id, everything)
        assert within(lambda: not other2.connects(db, 5435), REMOVAL_DEADLINE + PROBE)
        assert client.connects(db, 5432)

        # An established flow through a plugin restart on both hosts: it keeps flowing, no verdict changes and
        # the kernel's sets are the same elements (the restarted plugin found them in place).
        flow = h2.spawn(["ip", "netns", "exec", "client", sys.executable, "-c", FLOW, db.ip4, "5432"], "flow")
        flow_log = os.path.join(h2.dir, "logs", "flow.log")

        def flowed():
            return open(flow_log).read().count("ok") if os.path.exists(flow_log) else 0

        assert within(lambda: flowed() >= 5)
        before = all_sets(h1, d1.ns), all_sets(h2, d2.ns)
        p1.restart()
        p2.restart()
        seen = flowed()
        assert within(lambda: flowed() >= seen + 10), "the flow stopped after the restart"
        assert "broken" not in open(flow_log).read() and flow.alive()
        assert within(lambda: "found in place" in p1.log(400))
        assert (all_sets(h1, d1.ns), all_sets(h2, d2.ns)) == before
        assert client.connects(db, 5432) and client.connects(db, 5432, family=6)
        assert not other2.connects(db, 5436) and not client.connects(db, 5436)
        flow.stop()

        # Removed: refused again within 2 s (a new connection: its SYN is judged; the old one goes on).
        cli(p1, "rm", d1.id, rule_id)
        removed_at = time.monotonic()
        assert within(lambda: not client.connects(db, 5432), REMOVAL_DEADLINE + PROBE)
        assert time.monotonic() - removed_at <= REMOVAL_DEADLINE + PROBE
        assert not client.connects(db, 5432, family=6)

        # Rule change to in force on the other host: a rule given on host 2 (allow, then rm), seen in (and gone
        # from) host 1's kernel, polled through nft (one read takes a few ms). Two clocks: from the CLI's exit
        # (the rule is in etcd by then; a first read that already finds it says only "below one read"), and from
        # its start (the whole command, Python's start-up included). Reported, not asserted on.
        after_exit, from_start, first_read = [], [], 0
        for i in range(20):
            port = 6000 + i
            for verb in ("allow", "rm"):
                began = time.monotonic()
                if verb == "allow":
                    rid = cli(p2, "allow", d2.id, "--from", "container=client", "--to", "container=db",
                              "--port", f"{port}/tcp")["rule"]["id"]
                else:
                    cli(p2, "rm", d2.id, rid)
                exited = time.monotonic()
                want = verb == "allow"
                first_read += allowed(h1, d1.ns, client, db, port) == want
                assert within(lambda: allowed(h1, d1.ns, client, db, port) == want)
                now = time.monotonic()
                after_exit.append(now - exited)
                from_start.append(now - began)

        def pct(values, q):
            values = sorted(values)
            return values[min(len(values) - 1, round(q * (len(values) - 1)))] * 1000

        print(f"\nrule change -> in force on the other host, {len(after_exit)} changes (20 allow, 20 rm): "
              f"after the CLI's exit p50 {pct(after_exit, .5):.0f} ms p99 {pct(after_exit, .99):.0f} ms; "
              f"from the CLI's start p50 {pct(from_start, .5):.0f} ms p99 {pct(from_start, .99):.0f} ms; "
              f"{first_read}/{len(after_exit)} already in force at the first read after the exit")

        # Exposed: a container accepts new connections only on its exposed ports, across hosts and on one.
        web = e1.container("web", 2, {"container": "web", "service": "web", "labels": {}}, exposed=[8080])
        visitor = e2.container("visitor", 3, {"container": "visitor", "service": "", "labels": {}})
        web.serve(8080, 8081)
        visitor.serve(8080)
        assert within(lambda: visitor.connects(web, 8080)), "the exposed port across hosts"
        assert visitor.connects(web, 8080, family=6)
        assert not visitor.connects(web, 8081) and not visitor.connects(web, 8081, family=6)
        assert not web.connects(visitor, 8080)  # the visitor exposes nothing
        control = cli(p1, "allow", e1.id, "--from", "any", "--to", "any")["rule"]["id"]
        assert within(lambda: visitor.connects(web, 8081)) and web.connects(visitor, 8080)
        cli(p1, "rm", e1.id, control)
        assert within(lambda: not web.connects(visitor, 8080), REMOVAL_DEADLINE + PROBE)
    finally:
        for host, name in made:
            host.run(["ip", "netns", "del", name], check=False)
    for net in (d1, d2, e1, e2):
        net.remove()
    for host, nets in ((h1, (d1, e1)), (h2, (d2, e2))):
        left = host.run(["ip", "netns", "list"]).stdout
        assert not [n for n in nets if n.ns in left], left
    assert lab.etcd.keys("/vxnet/v1/policy/") == []  # the segments released: their rules with them
