"""Dual stack across two simulated hosts: the real plugin in each (over the lab's etcd), driven through its socket
as dockerd drives it, and "containers" that are namespaces holding a veth's container end with an IPv4 and an
IPv6 address. ping6 on one host and across hosts; a second dual-stack network unreachable over IPv6 both ways
(a static neighbour entry aims the frame straight at the other network's MAC: the same probe reaches a peer of
its own network); the host drops what comes to it from a vxnet IPv6 subnet; a deleted IPv6 neighbour entry is
reported by `vxnet status` and put back by start-up reconciliation; everything goes with the networks."""

import json
import os
import secrets

import pytest

from kernel import names
from tests.harness.driver_calls import Container, Net, within
from tests.harness.plugin import Plugin
from tests.harness.proc import wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces")

A4, A6 = "10.200.96", "fd00:96::"
B4, B6 = "10.200.97", "fd00:97::"


def vxlan_neighbours6(host, ns):
    """The permanent IPv6 neighbour entries of a network namespace's VXLAN device: address -> MAC."""
    listed = json.loads(host.run(["ip", "-j", "-n", ns, "-6", "neigh", "show", "dev", names.VXLAN]).stdout or "[]")
    return {n["dst"]: n.get("lladdr") for n in listed if "PERMANENT" in n.get("state", [])}


def isolation_drops(host, comment):
    """Packets the host isolation table's rule with that comment has dropped."""
    listed = json.loads(host.run(["nft", "-j", "list", "table", "inet", "vxnet"]).stdout)
    for item in listed["nftables"]:
        rule = item.get("rule")
        if rule and rule.get("comment") == comment:
            return sum(e["counter"]["packets"] for e in rule["expr"] if "counter" in e)
    raise AssertionError(f"no rule {comment} in the host table")


def host_subnets6(host):
    listed = json.loads(host.run(["nft", "-j", "list", "set", "inet", "vxnet", "subnets6"]).stdout)
    (found,) = [item["set"] for item in listed["nftables"] if "set" in item]
    return {f"{e['prefix']['addr']}/{e['prefix']['len']}" for e in found.get("elem", [])}


def test_dual_stack_across_two_hosts_isolation_reconciliation_and_removal(hosts, lab):
    h1, h2 = hosts(2, docker=False)
    p1, p2 = (Plugin(h, lab.etcd.url).start() for h in (h1, h2))
    tag = secrets.token_hex(3)
    a1, a2 = Net(p1, f"a{tag}", A4, A6), Net(p2, f"a{tag}", A4, A6)
    b1, b2 = Net(p1, f"b{tag}", B4, B6), Net(p2, f"b{tag}", B4, B6)
    made = [(h1, "c1"), (h1, "c3"), (h2, "c2"), (h2, "c4"), (h1, "c5")]
    try:
        c1, c3 = a1.container("c1", 2), a1.container("c3", 3)
        c2 = a2.container("c2", 4)
        c4, c5 = b2.container("c4", 5), b1.container("c5", 6)

        assert c1.ping6(c3), "ping6 on one host"
        assert c1.ping6(c2) and c2.ping6(c1), "ping6 across hosts"
        assert c4.ping6(c5), "ping6 across hosts on the second network"
        # The remote addresses are permanent NDP entries on the VXLAN device (its proxy answers for them).
        assert vxlan_neighbours6(h1, a1.ns) == {c2.ip6: c2.mac}
        assert vxlan_neighbours6(h2, a2.ns) == {c1.ip6: c1.mac, c3.ip6: c3.mac}

        # The second network is unreachable over IPv6 both ways, across hosts and on one host, even aimed at
        # its MACs; the same probe reaches a peer of the container's own network.
        for src, dst in ((c1, c4), (c4, c1), (c3, c5), (c5, c3)):
            src.aim(dst, (B6 if dst in (c4, c5) else A6) + "/64")
            assert not src.ping6(dst), f"{src.name} reached {dst.name} on another network"
        c1.aim(c2, A6 + "/64")
        assert c1.ping6(c2)
        for host in (h1, h2):
            assert host_subnets6(host) == {A6 + "/64", B6 + "/64"}  # the host routes neither (inet vxnet)
        # A packet from a vxnet IPv6 subnet reaching host 1 itself is dropped (overlay-to-host-v6); the same ping
        # from an address of no vxnet network, over the same link with the same route back, gets its answer.
        made.append((h1, "q"))
        h1.run(["ip", "netns", "add", "q"])
        h1.run(["ip", "link", "add", "tq0", "type", "veth", "peer", "name", "tq1", "netns", "q"])
        h1.run(["ip", "addr", "add", "fd00:1234::1/64", "dev", "tq0", "nodad"])
        h1.run(["ip", "link", "set", "tq0", "up"])
        h1.run(["ip", "-6", "route", "add", A6 + "99/128", "dev", "tq0"])
        for address in ("fd00:1234::2/64", A6 + "99/128"):
            h1.run(["ip", "-n", "q", "addr", "add", address, "dev", "tq1", "nodad"])
        h1.run(["ip", "-n", "q", "link", "set", "tq1", "up"])
        q = Container(h1, "q", "fd00:1234::2", None)
        host1 = Container(h1, "host", "fd00:1234::1", None)
        assert q.ping6(host1, source="fd00:1234::2")
        before = isolation_drops(h1, "vxnet:isolation:overlay-to-host-v6")
        assert not q.ping6(host1, source=A6 + "99")
        assert isolation_drops(h1, "vxnet:isolation:overlay-to-host-v6") > before
        assert q.ping6(host1, source="fd00:1234::2")
        # `vxnet flows` of network A on host 1 shows that drop, filed under A by its source address, with the rule;
        # the honest pings before and after it (same link, same probe) are not in the log.
        def isolation_flows():
            code, answer = p1.cli_json("flows", a1.id[:12])
            assert code == 0, p1.cli("flows", a1.id[:12]).stderr
            hits = [r for r in answer["records"] if r["reason"] == "isolation"]
            return (answer, hits) if hits else None

        answer, hits = wait_until(isolation_flows, 10, "the isolation drop in vxnet flows")
        assert {(r["src"]["ip"], r["dst"]["ip"], r["rule"], r["verdict"]) for r in hits} == {
            (A6 + "99", "fd00:1234::1", "overlay-to-host-v6", "dropped")}
        assert not [r for r in answer["records"] if r["src"]["ip"] == "fd00:1234::2"]
        assert answer["guards"]["isolation"]["counted"] >= len(hits)

        # Someone deletes host 1's entry for c2 while its plugin is down: `vxnet status` names it, and the
        # plugin's start-up puts it back.
        p1.stop()
        h1.run(["ip", "-n", a1.ns, "-6", "neigh", "del", c2.ip6, "dev", names.VXLAN])
        code, status = p1.cli_json("status")
        missing = [d for d in status["this_host"]["differences"] if d["kind"] == "neighbour"]
        assert code == 1 and missing == [{"network": a1.id[:12], "kind": "neighbour", "object": c2.ip6,
                                          "want": c2.mac, "have": None}], status["this_host"]
        p1.start()
        assert within(lambda: vxlan_neighbours6(h1, a1.ns) == {c2.ip6: c2.mac})
        code, status = p1.cli_json("status")
        assert code == 0 and status["this_host"]["differences"] == [], status["this_host"]
        assert sorted(e["ip6"] for e in status["endpoints"] if e["network"] == a1.id) == [
            c1.ip6 + "/64", c3.ip6 + "/64"]
        assert A6 + "/64" in [n for n in status["networks"] if n["id"] == a1.id][0]["subnets"]
        assert c3.ping6(c2)
    finally:
        h1.run(["ip", "link", "del", "tq0"], check=False)
        for host, name in made:
            host.run(["ip", "netns", "del", name], check=False)
    for net in (a1, a2, b1, b2):
        net.remove()
    for host, nets in ((h1, (a1, b1)), (h2, (a2, b2))):
        left = host.run(["ip", "netns", "list"]).stdout
        assert not [n for n in nets if n.ns in left], left
        assert not [link for link in host.links() if names.is_veth_container(link)]
        assert host_subnets6(host) == set()
    code, status = p1.cli_json("status")
    assert {n["id"] for n in status["networks"]} & {n.id for n in (a1, a2, b1, b2)} == set()
    assert [e for e in status["endpoints"] if e["network"] in {n.id for n in (a1, a2, b1, b2)}] == []
