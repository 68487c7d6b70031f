"""`vxnet flows` against the real plugin: a simulated host running the plugin (over the lab's etcd, its metrics
address the default 127.0.0.1:9473 inside the host), networks created and containers joined through its socket as
dockerd does (tests/kernel/test_policy_hosts.py's Net), identities published as the identity writer publishes
them, and the command run inside the host (`python -m cli flows ... --json`, the plugin's environment). What it
shows comes from the plugin's own FlowLog, fed by its PolicyEngine's subscribe and names.

Every refusal is the same probe, with the same timeout, as one that connected in the same test."""

import os
import secrets

import pytest

from tests.harness.driver_calls import within
from tests.harness.plugin import Plugin
from tests.kernel.test_policy_hosts import Net, cli

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces")

DEADLINE = 10.0
V4, V6 = "10.200.96", "fd00:96::"
A4, A6 = "10.200.97", "fd00:97::"


def audit_net(plugin, overlay, v4, v6) -> Net:
    """A deny network with -o policy-audit=true."""
    return Net(plugin, overlay, "deny", v4, v6, generic={"policy-audit": "true"})


def flows(plugin, *args):
    code, answer = plugin.cli_json("flows", *args)
    assert code == 0, plugin.cli("flows", *args).stderr
    return answer


def test_vxnet_flows_shows_the_plugins_verdicts_with_names_and_audit_drops_nothing(hosts, lab):
    (h1,) = hosts(1, docker=False)
    plugin = Plugin(h1, lab.etcd.url, env={"VXNET_DOCKER_HOST": "off"}).start()
    tag = secrets.token_hex(3)
    deny = Net(plugin, f"f{tag}", "deny", V4, V6)
    audit = audit_net(plugin, f"a{tag}", A4, A6)
    made = []
    try:
        db = deny.container("fdb", 2, {"container": "db-1", "service": "db", "labels": {}})
        client = deny.container("fclient", 3, {"container": "client-1", "service": "", "labels": {}})
        made += ["fdb", "fclient"]
        db.serve(5432, 5433)
        adb = audit.container("adb", 2, {"container": "adb-1", "service": "adb", "labels": {}})
        aclient = audit.container("aclient", 3, {"container": "aclient-1", "service": "", "labels": {}})
        made += ["adb", "aclient"]
        adb.serve(5432)

        # Positive control: with everything allowed the probe connects, and the log shows it allowed.
        everything = cli(plugin, "allow", deny.id, "--from", "any", "--to", "any")["rule"]["id"]
        assert within(lambda: client.connects(db, 5433), DEADLINE), "allowed probe"
        allowed = flows(plugin, deny.id[:12], "--verdict", "allowed")["records"]
        assert any(r["reason"] == "rule-any-port" and r["dport"] == 5433 and r["src"]["ip"] == client.ip4
                   for r in allowed), allowed
        cli(plugin, "rm", deny.id, everything)
        # The same probe refused once the rule is gone (a new connection: its SYN is judged again).
        assert within(lambda: not client.connects(db, 5432), DEADLINE), "refused probe"

        def refused():
            answer = flows(plugin, deny.id[:12])
            hits = [r for r in answer["records"] if r["dport"] == 5432 and r["src"]["ip"] == client.ip4]
            return (answer, hits[-1]) if hits else None

        assert within(lambda: refused() is not None, DEADLINE), "the refusal in vxnet flows"
        answer, record = refused()
        assert (record["verdict"], record["reason"], record["proto"]) == ("dropped", "no-rule", "tcp")
        assert (record["src"]["container"], record["dst"]["ip"], record["dst"]["container"],
                record["dst"]["service"]) == ("client-1", db.ip4, "db-1", "db")
        assert record["src"]["host"] == record["dst"]["host"] != ""
        assert answer["counters"]["dropped"] >= 1 and answer["log"]["running"] is True

        # Audit: the probe the deny network refuses connects here, and the log says it would have been dropped.
        assert within(lambda: aclient.connects(adb, 5432), DEADLINE), "audit drops nothing"

        def audited():
            return [r for r in flows(plugin, audit.id[:12])["records"] if r["src"]["ip"] == aclient.ip4] or None

        assert within(lambda: audited() is not None, DEADLINE), "the audit record"
        record = audited()[0]
        assert (record["verdict"], record["reason"], record["dport"], record["dst"]["container"],
                record["src"]["container"]) == ("audit", "no-rule", 5432, "adb-1", "aclient-1")
        done = plugin.cli("flows", "nosuchnetwork")
        assert done.returncode == 2 and "nosuchnetwork" in done.stderr
    finally:
        for name in made:
            h1.run(["ip", "netns", "del", name], check=False)
    for net in (audit, deny):
        net.remove()
    left = h1.run(["ip", "netns", "list"]).stdout
    assert deny.ns not in left and audit.ns not in left, left
