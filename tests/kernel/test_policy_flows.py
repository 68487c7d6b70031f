"""`vxnet flows` against the real kernel: the policy table of netdriver/policy_nft.py in a network namespace (the
two-host lab of test_policy_nft.py: three containers on host 1's bridge, one on host 2 across VXLAN), the verdict
log of plugin/flows.py reading its NFLOG group with kernel/nflog.py's Reader and the table's real counters,
served by the plugin's metrics server on a loopback port, and the command run as a user runs it (`python -m cli
flows ... --json`). The policy engine is the fake of tests/fakes (its subscribe and names, as the engine gives
them): the names it gives are what the command must show.

Every refusal is preceded by the same probe connecting before the policy (positive control); audit mode's "does
not drop" is the same probe that enforcing mode refused, now connecting."""

import json
import os
import secrets
import subprocess
import sys

import pytest

from kernel.nflog import Reader
from netdriver import policy_nft as pn
from netdriver.isolation import Firewall
from plugin import flows as pf
from plugin import metrics as plugin_metrics
from tests.fakes.policy_engine import FakePolicyEngine
from tests.harness.proc import wait_until
from tests.kernel.test_policy_nft import PORTS, SYN_BURST, Elements, guarded, lab, sh  # noqa: F401 (lab: the fixture)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PORT = PORTS[20]  # not one test_policy_nft.py uses
DEADLINE = 10.0


@pytest.fixture
def served(lab):  # noqa: F811 (the imported fixture)
    """A FlowLog on host 1's namespace, behind the metrics server on 127.0.0.1:<free port>; torn down after."""
    network_id = secrets.token_hex(32)
    n1 = lab["ns"]["n1"]
    links = lab["links"]
    engine = FakePolicyEngine()
    who = {"c1": ("client-1", "", "h1"), "c2": ("db.1.x", "db", "h1"), "c3": ("other-1", "", "h1"),
           "c4": ("client-2", "", "h2")}
    engine.names_of[network_id] = {
        address: {"container": name, "service": service, "endpoint": secrets.token_hex(32), "host": host}
        for key, (name, service, host) in who.items() for address in (lab[key].ip, lab[key].ip6)}
    log = pf.FlowLog(engine, lambda ns: Reader(links.netns_path(ns)), lab["fw"].counters)
    server = plugin_metrics.MetricsServer(("127.0.0.1", 0), plugin_metrics.Collector(
        lambda: {}, lambda: {}, Firewall(links.nft)), apps={pf.PATH: pf.make_app(log)})
    log.start()
    server.start()
    try:
        yield dict(lab=lab, log=log, engine=engine, network=network_id, ns=n1, port=server.port)
    finally:
        server.stop()
        log.stop()
        lab["fw"].remove_policy(n1)


def vxnet_flows(port, *argv):
    """The command as a user runs it: (exit status, its JSON answer or None, stderr)."""
    done = subprocess.run([sys.executable, "-m", "cli", "flows", *argv, "--json", "--host", f"127.0.0.1:{port}"],
                          capture_output=True, text=True, timeout=60, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": REPO})
    return done.returncode, (json.loads(done.stdout) if done.returncode == 0 else None), done.stderr


def flows_of(served, *argv):
    code, answer, err = vxnet_flows(served["port"], served["network"][:12], *argv)
    assert code == 0, err
    return answer


def test_refused_syns_appear_with_names_protocol_port_and_verdict_and_audit_does_not_drop(served):
    hosts, n1 = served["lab"], served["ns"]
    c1, c2, c4 = hosts["c1"], hosts["c2"], hosts["c4"]
    probes = [(c1, c2.ip), (c1, c2.ip6), (c4, c2.ip)]  # local (a bridge port) and remote (through VXLAN)
    for src, dst in probes:  # positive controls: the same probes, same timeout, before the policy
        assert src.reaches(dst, PORT), (src.ns, dst)

    fw = hosts["fw"]
    fw.ensure_policy(n1, "deny", False, Elements(guarded=guarded(hosts)))
    served["engine"].up(served["network"], n1)  # as the engine says once the table is there
    wait_until(lambda: served["log"].networks()[0]["running"], DEADLINE, "the verdict log reading")
    for src, dst in probes:
        # Shorter than TCP's first retransmission (1 s): one SYN each.
        assert not src.connect(dst, PORT, timeout=0.5)[0], (src.ns, dst)

    def refused():
        answer = flows_of(served)
        got = {(r["src"]["ip"], r["dst"]["ip"]) for r in answer["records"]}
        return answer if got >= {(src.ip if ":" not in dst else src.ip6, dst) for src, dst in probes} else None

    answer = wait_until(refused, DEADLINE, "the refused SYNs in vxnet flows")
    by_source = {r["src"]["ip"]: r for r in answer["records"]}
    for src, name, host in ((c1.ip, "client-1", "h1"), (c1.ip6, "client-1", "h1"), (c4.ip, "client-2", "h2")):
        r = by_source[src]
        assert (r["verdict"], r["reason"], r["proto"], r["dport"]) == ("dropped", "no-rule", "tcp", PORT)
        assert (r["src"]["container"], r["src"]["host"]) == (name, host)
        assert (r["dst"]["container"], r["dst"]["service"]) == ("db.1.x", "db")
        assert r["sport"] > 1023
    assert answer["counters"]["dropped"] >= 3 and answer["counters"]["audit"] == 0
    assert answer["lost"] == 0 and answer["log"]["running"] is True
    assert flows_of(served, "--verdict", "allowed")["records"] == []  # nothing was allowed

    # Audit: the table remade with the audit verdict, and the engine says up again (as it does for a replaced
    # table): a new reader, once the old one let the group go; the ring stays.
    fw.ensure_policy(n1, "deny", True, Elements(guarded=guarded(hosts)))
    served["engine"].up(served["network"], n1)
    wait_until(lambda: served["log"].networks()[0]["running"], DEADLINE, "the new reader bound")
    since = answer["next"]
    assert c1.reaches(c2.ip, PORT)  # the probe enforcing mode refused now connects: audit drops nothing

    def audited():
        records = [r for r in flows_of(served)["records"] if r["seq"] > since]
        return records or None

    (record,) = wait_until(audited, DEADLINE, "the audit record")
    assert (record["verdict"], record["reason"], record["src"]["ip"], record["dst"]["ip"], record["dport"]) == \
        ("audit", "no-rule", c1.ip, c2.ip, PORT)
    assert record["src"]["container"] == "client-1" and record["dst"]["service"] == "db"
    counted = flows_of(served)["counters"]
    assert counted["audit"] >= 1 and counted["dropped"] == 0  # the new table's exact counters
    assert "policy" not in Firewall(hosts["links"].nft).dropped(n1)  # audit counts no drop
    assert len(flows_of(served)["records"]) == len(answer["records"]) + 1  # the enforcing mode's records kept


def test_the_log_says_when_it_is_rate_limited(served):
    """A burst of SYNs faster than the log's rate: the counter is exact, the records fewer, and the answer says
    how many were counted and not logged, those two adding up."""
    hosts, n1 = served["lab"], served["ns"]
    c1, c2 = hosts["c1"], hosts["c2"]
    port = PORTS[21]
    assert c1.reaches(c2.ip, port)  # positive control of the burst's first probe
    links = hosts["links"]
    slow = pn.PolicyFirewall(links.nft, log_rate=1, log_burst=3)
    slow.ensure_policy(n1, "deny", False, Elements(guarded=guarded(hosts)))
    served["engine"].up(served["network"], n1)
    wait_until(lambda: served["log"].networks()[0]["running"], DEADLINE, "the verdict log reading")
    sh("ip", "netns", "exec", c1.ns, sys.executable, "-c", SYN_BURST, c2.ip, str(port), "30")

    def limited():
        answer = flows_of(served)
        counted = answer["counters"]["dropped"]
        seen = len(answer["records"])
        return answer if counted >= 30 and seen + answer["suppressed"]["dropped"] == counted else None

    answer = wait_until(limited, DEADLINE, "the burst counted and accounted for")
    assert answer["rate_limited"] is True and 3 <= len(answer["records"]) < 30
    assert answer["lost"] == 0
