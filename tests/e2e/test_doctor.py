"""`vxnet doctor` on simulated hosts with real dockerd, etcd and the plugin: green on a healthy 3-host setup; the
host whose underlay drops VXLAN's UDP port, or whose underlay MTU is 100 bytes smaller, named by its path check;
etcd stopped named within 10 s while the local checks still run. Each negative check follows the same doctor run
(same probes, same timeouts) passing on the same hosts, its positive control."""

import json
import sys
import time

import pytest

from kernel import names
from tests.harness.proc import wait_until

BLUE = "10.200.30.0/24"
BUDGET = 10.0  # the issue's bound on one doctor run, etcd down included
# Drops VXLAN arriving at host 2 (prerouting, before the VXLAN socket sees it); its own table, removed after.
BLOCK_TABLE = "vxtest_block"


def doctor(host, plugin):
    """`python3 -m cli doctor --json` inside the host, as root, with the plugin's environment:
    (exit status, {check name: check}, wall time in seconds)."""
    started = time.monotonic()
    out = host.run([sys.executable, "-m", "cli", "doctor", "--json"], env=plugin.env, cwd=plugin.root,
                   check=False, timeout=60)
    took = time.monotonic() - started
    assert out.returncode in (0, 1), f"doctor could not run ({out.returncode}): {out.stderr}"
    report = json.loads(out.stdout)
    checks = {}
    for c in report["checks"]:
        checks.setdefault(c["check"], c)
    return out.returncode, checks, took


def failing(checks):
    return {name: c["message"] for name, c in checks.items() if c["status"] == "FAIL"}


def wait_green(host, plugin, timeout=60):
    """Poll the doctor until it passes (the other plugins' health entries arrive through their host records)."""
    last = {}

    def green():
        code, checks, _ = doctor(host, plugin)
        last["checks"] = checks
        return code == 0
    try:
        wait_until(green, timeout, f"vxnet doctor on {host.name} to pass", interval=0.5)
    except TimeoutError:
        pytest.fail(f"doctor never passed: {failing(last.get('checks', {}))}")
    return last["checks"]


@pytest.fixture
def three(hosts, vxnet_plugin):
    made = hosts(3)
    plugins = [vxnet_plugin(h) for h in made]
    for h in made:
        h.docker("network", "create", "-d", "vxnet", "--ipam-driver", "vxnet", "--subnet", BLUE,
                 "-o", "overlay=blue", "blue")
    return made, plugins


def test_doctor_green_then_names_the_host_whose_vxlan_port_is_blocked_or_whose_mtu_is_smaller(three, lab):
    (h1, h2, h3), (p1, _p2, _p3) = three

    # Healthy: every check passes, both other hosts' paths carry the network's full 1450-byte frames.
    checks = wait_green(h1, p1)
    for host in (h2, h3):
        path = checks[f"path {host.name}"]
        assert path["status"] == "PASS" and "1450-byte frames cross" in path["message"], path
    assert checks["mtu blue"]["status"] == "PASS", checks["mtu blue"]
    for name in ("etcd", "clock", "plugin socket", "kernel modules", "host record", "vtep", "duplicate vteps",
                 "stale hosts", "drift"):
        assert checks[name]["status"] == "PASS", checks[name]
    assert not [c for c in checks.values() if c["status"] != "PASS"], checks  # green: not even a warning

    # Host 2's underlay drops UDP to the VXLAN port: host 2 is named, host 3 still passes.
    h2.run(["nft", "-f", "-"], input=f"table inet {BLOCK_TABLE} {{\n chain pre {{\n  type filter hook prerouting "
                                     f"priority -300;\n  udp dport {names.VXLAN_PORT} drop\n }}\n}}\n")
    try:
        code, checks, took = doctor(h1, p1)
    finally:
        h2.run(["nft", "delete", "table", "inet", BLOCK_TABLE])
    assert code == 1, checks
    path = checks[f"path {h2.name}"]
    assert path["status"] == "FAIL" and h2.name in path["message"] and h2.ip in path["message"], path
    assert "UDP 4789 blocked?" in path["fix"], path
    assert checks[f"path {h3.name}"]["status"] == "PASS", checks[f"path {h3.name}"]
    assert took < BUDGET, f"the doctor took {took:.1f} s"

    # Unblocked: green again (the control for what follows).
    wait_green(h1, p1)

    # Host 2's underlay MTU 100 bytes smaller (its eth0 and the underlay bridge's port to it): small probes
    # cross, the overlay's full-size ones do not.
    port = f"u{h2.index}"
    h2.run(["ip", "link", "set", "eth0", "mtu", "1400"])
    try:
        lab.underlay.run(["ip", "link", "set", port, "mtu", "1400"])
        code, checks, took = doctor(h1, p1)
    finally:
        lab.underlay.run(["ip", "link", "set", port, "mtu", "1500"])
        h2.run(["ip", "link", "set", "eth0", "mtu", "1500"])
    assert code == 1, checks
    path = checks[f"path {h2.name}"]
    assert path["status"] == "FAIL" and h2.name in path["message"] and h2.ip in path["message"], path
    assert "84-byte probes cross but 1450-byte ones with DF do not" in path["message"], path
    assert "underlay MTU smaller than the overlay needs" in path["fix"], path
    assert checks[f"path {h3.name}"]["status"] == "PASS", checks[f"path {h3.name}"]
    assert took < BUDGET, f"the doctor took {took:.1f} s"


def test_doctor_names_etcd_when_it_is_stopped_within_10_s_and_still_runs_the_local_checks(hosts, vxnet_plugin, etcd):
    (h1,) = hosts(1, docker=False)
    p1 = vxnet_plugin(h1)
    code, checks, _ = doctor(h1, p1)  # the control: the same run with etcd up
    assert checks["etcd"]["status"] == "PASS" and etcd.url in checks["etcd"]["message"], checks["etcd"]

    etcd.stop()
    try:
        code, checks, took = doctor(h1, p1)
    finally:
        etcd.start()
    assert code == 1, checks
    assert checks["etcd"]["status"] == "FAIL" and etcd.url in checks["etcd"]["message"], checks["etcd"]
    assert took < BUDGET, f"the doctor took {took:.1f} s with etcd stopped"
    for local in ("plugin socket", "kernel modules", "vtep"):
        assert checks[local]["status"] == "PASS", checks[local]


def test_a_stopped_plugin_takes_its_health_overlay_away_and_a_restarted_one_answers_again(hosts, vxnet_plugin):
    h1, h2 = hosts(2, docker=False)
    p1, p2 = vxnet_plugin(h1), vxnet_plugin(h2)
    wait_green(h1, p1)
    assert names.HEALTH_NETNS in h2.netns()

    p2.stop()
    assert names.HEALTH_NETNS not in h2.netns()  # nothing of the plugin's left behind
    code, checks, _ = doctor(h1, p1)
    assert code == 1 and checks[f"path {h2.name}"]["status"] == "FAIL", checks  # its record outlives it a TTL
    code, checks, _ = doctor(h2, p2)
    assert checks["plugin socket"]["status"] == "FAIL" and checks["path"]["status"] == "FAIL", checks

    p2.start()  # a new device on the same VNI: the old one went before its namespace
    wait_green(h1, p1)
    wait_green(h2, p2)
