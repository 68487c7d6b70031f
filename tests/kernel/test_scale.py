"""Capacity on one host (issue 14): 2,100 endpoints of one network on one simulated host, past twice the 1,023
ports a Linux bridge takes, attached as dockerd attaches them (CreateEndpoint, then Join) through the real plugin
over the lab's etcd; a container on a second host reaches the first and the last (on the root bridge and on leaf
2) and one on leaf 1; anti-spoofing holds on a leaf; a trunk deleted is reported by `vxnet status` and repaired
by start-up; a Join that the kernel fails half-way takes back all of its
own and leaves every other endpoint reachable; everything goes with the endpoints. The endpoints limit
(VXNET_MAX_ENDPOINTS) is refused in vxnet's words before anything is made.

`make test-scale` runs this file alone, with the reconciler on (the plugin's default); the figures (attach
medians, plugin memory, removal time) are printed, never asserted.
"""

import json
import os
import secrets
import statistics
import time

import pytest

from kernel import names
from tests.harness.driver_calls import Net, answer, call, within
from tests.harness.plugin import Plugin

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces")

COUNT = 2100  # endpoints on host 1: br0 and br1 hold 1000 each, br2 the last 100
POOL = "10.202.0.0/20"  # 4094 addresses; host 2's container takes the 4000th
FIRST, MIDDLE, LAST = 0, 1500, COUNT - 1  # on br0, br1, br2


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def ports(host, ns):
    """name -> (kind, master) of every link in a network namespace of a simulated host."""
    listed = json.loads(host.run(["ip", "-d", "-j", "-n", ns, "link", "show"]).stdout)
    return {link["ifname"]: (link.get("linkinfo", {}).get("info_kind"), link.get("master")) for link in listed}


def static_entries(host, ns):
    """(port, mac) of every static bridge FDB entry in the namespace."""
    listed = json.loads(host.run(["bridge", "-j", "-n", ns, "fdb", "show"]).stdout or "[]")
    return {(e["ifname"], e["mac"]) for e in listed if "static" in e.get("state", "") and e.get("master")}


def nft_table(host, ns):
    return json.loads(host.run(["ip", "netns", "exec", ns, "nft", "-j", "list", "table", "bridge", "vxnet"]).stdout)


def guard_elements(host, ns):
    """Every element of the anti-spoofing sets of a namespace, as (set, element JSON)."""
    return {(item["set"]["name"], json.dumps(elem, sort_keys=True)) for item in nft_table(host, ns)["nftables"]
            if "set" in item for elem in item["set"].get("elem", [])}


def spoofing_drops(host, ns):
    """Packets every anti-spoofing rule of the namespace has dropped."""
    return sum(e["counter"]["packets"] for item in nft_table(host, ns)["nftables"] if "rule" in item
               and item["rule"].get("comment", "").startswith("vxnet:anti-spoofing:")
               for e in item["rule"]["expr"] if "counter" in e)


def test_2100_endpoints_on_one_host_reachable_guarded_and_removed(hosts, lab):
    h1, h2 = hosts(2, docker=False)
    # Both hosts run the self-healing reconciler, as the plugin does by default (VXNET_RECONCILE_SECONDS 30): its
    # event passes look only at what each notification names (netdriver/reconciler.py), so a Join's own veth and
    # entries cost it O(1) and host 2's passes a read per peer entry, not a comparison of the whole network.
    p1, p2 = Plugin(h1, lab.etcd.url).start(), Plugin(h2, lab.etcd.url).start()
    overlay = f"s{secrets.token_hex(3)}"
    n1, n2 = Net(p1, overlay, POOL), Net(p2, overlay, POOL)
    made = [(h2, "r")]
    remote = n2.container("r", 4000)
    try:
        rss_before = rss_mib(p1.proc.pid)
        attached, took = [], []
        for i in range(COUNT):
            start = time.monotonic()
            attached.append(n1.endpoint(2 + i))
            took.append(time.monotonic() - start)
        rss_after = rss_mib(p1.proc.pid)

        # Three bridges: 1000 endpoints on br0 and on br1, 100 on br2; each leaf's trunk joins it to br0.
        have = ports(h1, n1.ns)
        on = {k: sum(1 for name, (_, master) in have.items() if name.startswith("vxp") and master == names.bridge(k))
              for k in range(3)}
        assert on == {0: 1000, 1: 1000, 2: 100}, on
        for k in (1, 2):
            assert have[names.trunk_root(k)] == ("veth", names.BRIDGE)
            assert have[names.trunk_leaf(k)] == ("veth", names.bridge(k))
        assert names.bridge(3) not in have

        containers = {}
        for index, name in ((FIRST, "cf"), (MIDDLE, "cm"), (LAST, "cl")):
            _, mac, ifname = attached[index]
            made.append((h1, name))
            containers[index] = n1.move_in(name, ifname, 2 + index, mac)
        first, middle, last = containers[FIRST], containers[MIDDLE], containers[LAST]
        # Host 2 programs the 2,100 peers as their records arrive from etcd's watch: wait for all of them.
        assert within(lambda: len(static_fdb_remote(h2, n2.ns)) == COUNT, 120), len(static_fdb_remote(h2, n2.ns))
        assert remote.ping(first, timeout=15) and remote.ping(middle) and remote.ping(last), "across hosts"
        assert first.ping(last) and last.ping(middle), "across the trunks on one host"

        # Anti-spoofing on leaf 2: a forged source from the last endpoint is dropped there, the same ping from
        # its own address passes before and after.
        forged = n1.address(3900)
        h1.run(["ip", "-n", last.name, "addr", "add", f"{forged}/32", "dev", "eth0"])
        assert last.ping(remote)
        before = spoofing_drops(h1, n1.ns)
        assert not last.ping(remote, source=forged, timeout=3)
        assert spoofing_drops(h1, n1.ns) > before
        assert last.ping(remote, source=last.ip4)

        # Someone deletes leaf 2's trunk while host 1's plugin is down: leaf 2 is cut off (the same ping reaches
        # the root's endpoint), `vxnet status` names the trunk and the root's entries that went with it, and the
        # plugin's start-up puts them back.
        p1.stop()
        h1.run(["ip", "-n", n1.ns, "link", "del", names.trunk_root(2)])
        assert remote.ping(first) and not remote.ping(last, timeout=3)
        code, status = p1.cli_json("status", timeout=120)
        differences = status["this_host"]["differences"]
        assert code == 1 and {d["kind"] for d in differences} == {"fabric"}, differences[:5]
        objects = {d["object"] for d in differences}
        assert {f"trunk {names.trunk_root(2)}", f"trunk {names.trunk_leaf(2)}",
                f"fdb {last.mac} on {names.trunk_root(2)}"} <= objects and len(objects) == 2 + 100, len(objects)
        start = time.monotonic()
        p1.start(timeout=120)
        assert remote.ping(last, timeout=60)
        restart = time.monotonic() - start
        # Start-up reconciliation republishes every peer record while requests are served; a Leave in that window
        # has its record written back (a race of the restart path, reported with issue 14's per-event half): wait
        # for the end of it before the endpoints go.
        assert within(lambda: open(p1.log_path).read().count("start-up reconciliation done") == 2, 120)
        startup = time.monotonic() - start
        code, status = p1.cli_json("status", timeout=120)
        assert code == 0 and status["this_host"]["differences"] == [], status["this_host"]["differences"][:5]

        # A Join the kernel fails half-way: leaf 1 has a place free (an endpoint left), but someone else's devices
        # (veth pairs) took the bridge's last ports, so attaching the new veth fails (EXFULL) after the pair was
        # made.
        victim = attached[MIDDLE + 1]
        n1.leave(victim[0])
        have = ports(h1, n1.ns)
        free = names.BRIDGE_PORTS - sum(1 for _, (_, master) in have.items() if master == names.bridge(1))
        fillers = [f"fill{i}" for i in range(free)]
        h1.run(["ip", "-n", n1.ns, "-batch", "-"], input="".join(
            f"link add {f} type veth peer name {f}p\nlink set {f} master {names.bridge(1)}\n" for f in fillers))
        elements_before, static_before = guard_elements(h1, n1.ns), static_entries(h1, n1.ns)
        eid = secrets.token_hex(32)
        call(p1, "CreateEndpoint", {"NetworkID": n1.id, "EndpointID": eid,
                                    "Interface": {"Address": f"{n1.address(2 + MIDDLE + 1)}/20"}})
        status, reply = answer(p1, "Join", {"NetworkID": n1.id, "EndpointID": eid, "SandboxKey": "/x"})
        assert status != 200 and "Exchange full" in reply.get("Err", ""), (status, reply)
        have = ports(h1, n1.ns)
        assert names.veth_bridge(eid) not in have and names.veth_container(eid) not in h1.links()
        assert guard_elements(h1, n1.ns) == elements_before and static_entries(h1, n1.ns) == static_before
        assert not [k for k in lab.etcd.keys("/vxnet/") if "/peers/" in k and eid in k]
        assert remote.ping(first) and remote.ping(middle) and remote.ping(last), "the others after the failure"
        assert "rebuilt" not in p1.log(400)
        call(p1, "DeleteEndpoint", {"NetworkID": n1.id, "EndpointID": eid})
        h1.run(["ip", "-n", n1.ns, "-batch", "-"], input="".join(f"link del {f}\n" for f in fillers))

        # Everything goes with the endpoints: links, leaves and trunks, static entries, set elements, etcd keys,
        # and host 2's entries for them.
        start = time.monotonic()
        for eid, _, _ in list(attached):
            if eid in n1.endpoints:
                n1.leave(eid)
        removal = time.monotonic() - start
        left = ports(h1, n1.ns)
        assert set(left) == {"lo", names.BRIDGE, names.VXLAN}, sorted(left)[:10]
        assert not [name for name in h1.links() if name.startswith("vxc")]
        assert static_entries(h1, n1.ns) == set()
        assert guard_elements(h1, n1.ns) == set()
        ids = {eid for eid, _, _ in attached}
        assert not [k for k in lab.etcd.keys("/vxnet/") if k.rsplit("/", 1)[-1] in ids]
        assert within(lambda: len(static_fdb_remote(h2, n2.ns)) == 0, 30)

        first100, last100 = statistics.median(took[:100]), statistics.median(took[-100:])
        print(f"\nscale: attach median first 100 {first100 * 1000:.1f} ms, last 100 {last100 * 1000:.1f} ms "
              f"(x{last100 / first100:.2f}); plugin RSS {rss_before:.1f} -> {rss_after:.1f} MiB "
              f"({(rss_after - rss_before) * 1024 / COUNT:.1f} KiB per endpoint); removal of {COUNT} {removal:.1f} s; "
              f"restart: leaf 2 repaired and reachable {restart:.1f} s, start-up reconciliation done {startup:.1f} s")
    finally:
        for host, name in made:
            host.run(["ip", "netns", "del", name], check=False)
        n1.endpoints.clear()
        n2.endpoints.clear()
        for net in (n1, n2):
            if net.plugin.alive():  # else the hosts' teardown removes everything
                answer(net.plugin, "DeleteNetwork", {"NetworkID": net.id})


def static_fdb_remote(host, ns):
    """The VXLAN device's FDB entries pointing at another host (the remote endpoints host 2 knows)."""
    listed = json.loads(host.run(["bridge", "-j", "-n", ns, "fdb", "show", "dev", names.VXLAN]).stdout or "[]")
    return [e for e in listed if e.get("dst") and e["mac"] != "00:00:00:00:00:00"]


def test_the_endpoint_limit_is_refused_in_vxnets_words_before_anything_is_made(hosts, lab):
    h1, = hosts(1, docker=False)
    p1 = Plugin(h1, lab.etcd.url, env={"VXNET_MAX_ENDPOINTS": "3"}).start()
    net = Net(p1, f"m{secrets.token_hex(3)}", "10.203.0")
    try:
        for last in (2, 3, 4):
            net.endpoint(last)
        eid = secrets.token_hex(32)
        status, reply = answer(p1, "CreateEndpoint", {"NetworkID": net.id, "EndpointID": eid,
                                                      "Interface": {"Address": "10.203.0.5/24"}})
        assert status == 507 and reply["Err"].startswith(
            f"network {net.id[:12]} holds at most 3 endpoints on this host"), (status, reply)
        assert not [k for k in lab.etcd.keys("/vxnet/") if eid in k]
        assert names.veth_container(eid) not in h1.links()
        # A place freed is a place again: the same request passes once one endpoint has gone.
        net.leave(net.endpoints[0])
        call(p1, "CreateEndpoint", {"NetworkID": net.id, "EndpointID": eid, "Interface": {"Address": "10.203.0.5/24"}})
        net.endpoints.append(eid)
        call(p1, "Join", {"NetworkID": net.id, "EndpointID": eid, "SandboxKey": "/x"})
        assert names.veth_bridge(eid) in ports(h1, net.ns)
    finally:
        net.remove()
