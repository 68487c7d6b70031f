"""`vxnet status` on two simulated hosts with real dockerd, etcd and the plugin: what it reports from etcd, and
the kernel's drift from etcd while it lasts (the plugin frozen, so nothing repairs it meanwhile)."""

import pytest

from kernel import names
from tests.harness.containers import addresses, network_id, run_sleeper, wait_ping

SUBNET = "10.200.30.0/24"


@pytest.fixture
def two(hosts, vxnet_plugin):
    made = hosts(2)
    plugins = [vxnet_plugin(h) for h in made]
    for h in made:
        h.docker("network", "create", "-d", "vxnet", "--ipam-driver", "vxnet", "--subnet", SUBNET,
                 "-o", "overlay=st", "st")
    run_sleeper(made[0], "s1", "st")
    run_sleeper(made[1], "s2", "st")
    wait_ping(made[0], "s1", addresses(made[1], "s2")["st"])
    return made, plugins


def _fdb(host, nid):
    out = host.run(["bridge", "-n", names.netns(nid), "fdb", "show", "dev", names.VXLAN]).stdout
    return {line.split()[0]: line.split()[2] for line in out.splitlines() if " dst " in line
            and not line.startswith("00:00:00:00:00:00")}


def test_status_reports_hosts_networks_endpoints_and_drift_while_it_lasts(two):
    (h1, h2), (p1, _) = two
    nid = network_id(h1, "st")
    code, data = p1.cli_json("status")
    assert code == 0, data
    assert {h["name"] for h in data["hosts"]} == {h1.name, h2.name}
    me = [h for h in data["hosts"] if h["this_host"]]
    assert [h["vtep"] for h in me] == [h1.ip], data["hosts"]
    assert all(0 < h["lease_seconds_left"] <= 30 for h in data["hosts"]), data["hosts"]
    net = [n for n in data["networks"] if n["id"] == nid]
    assert net and net[0]["name"] == "st" and net[0]["subnets"] == [SUBNET] and net[0]["scope"] == "local", net
    names_seen = {e["container"] for e in data["endpoints"] if e["host"] == me[0]["id"]}
    assert "s1" in names_seen, data["endpoints"]
    assert {e["ip"].split("/")[0] for e in data["endpoints"]} >= {addresses(h1, "s1")["st"],
                                                                  addresses(h2, "s2")["st"]}
    assert data["this_host"]["in_sync"] and data["this_host"]["differences"] == [], data["this_host"]
    text = p1.cli("status")
    assert text.returncode == 0 and "in sync" in text.stdout and h2.name in text.stdout, text.stdout

    # Drift: host 2's container's FDB entry deleted by hand while host 1's plugin cannot repair it.
    fdb = _fdb(h1, nid)
    assert fdb and set(fdb.values()) == {h2.ip}, fdb
    mac = next(iter(fdb))
    with p1.frozen():
        h1.run(["bridge", "-n", names.netns(nid), "fdb", "del", mac, "dev", names.VXLAN, "dst", h2.ip])
        code, data = p1.cli_json("status")
        assert code == 1, data["this_host"]
        assert {"network": nid[:12], "kind": "fdb", "object": mac, "want": h2.ip, "have": None} in \
            data["this_host"]["differences"], data["this_host"]
        text = p1.cli("status")
        assert text.returncode == 1 and f"fdb {mac}: missing (want {h2.ip})" in text.stdout, text.stdout
        # Put back by hand: the same probe reports in sync again (so the difference above was the deletion).
        h1.run(["bridge", "-n", names.netns(nid), "fdb", "append", mac, "dev", names.VXLAN, "dst", h2.ip])
        code, data = p1.cli_json("status")
        assert code == 0 and data["this_host"]["in_sync"], data["this_host"]


def test_status_says_it_cannot_read_etcd(hosts, vxnet_plugin):
    (h1,) = hosts(1)
    p1 = vxnet_plugin(h1)
    assert p1.cli("status").returncode == 0  # the same command against the etcd that answers
    done = p1.cli("status", "--etcd", "http://127.0.0.1:9")  # nothing listens on the discard port here
    assert done.returncode == 2 and "cannot read etcd" in done.stderr and "127.0.0.1:9" in done.stderr, done
