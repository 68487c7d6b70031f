"""Three simulated Docker hosts, the plugin on each (legacy socket, local scope), one test etcd: containers on
different hosts reach each other over VXLAN with peers learnt from etcd, and survive plugin and etcd failures."""

import re
import subprocess
import threading

import pytest

from kernel import names
from tests.harness.containers import (
    addresses,
    network_id,
    pings,
    run_sleeper,
    serve_tcp,
    tcp_answers,
    wait_ping,
)
from tests.harness.proc import wait_until

BLUE = "10.200.20.0/24"
RED = "10.200.21.0/24"


def overlay(host, name, subnet):
    """The same overlay on several standalone hosts: `-o overlay=NAME` with one subnet."""
    host.docker("network", "create", "-d", "vxnet", "--ipam-driver", "vxnet", "--subnet", subnet,
                "-o", f"overlay={name}", name)
    return network_id(host, name)


def neighbours(host, nid):
    """ip -> mac of the permanent neighbour entries in the network's namespace on that host."""
    out = host.run(["ip", "-n", names.netns(nid), "neigh", "show", "dev", names.VXLAN]).stdout
    return {line.split()[0]: line.split()[2] for line in out.splitlines() if "lladdr" in line}


@pytest.fixture
def three(hosts, vxnet_plugin):
    made = hosts(3)
    plugins = [vxnet_plugin(h) for h in made]
    return made, plugins


def test_containers_on_three_hosts_reach_each_other_and_overlays_stay_apart(three):
    (h1, h2, h3), _ = three
    nets = {h: overlay(h, "blue", BLUE) for h in (h1, h2, h3)}
    for i, h in enumerate((h1, h2, h3), 1):
        run_sleeper(h, f"c{i}", "blue")
    ips = {i: addresses(h, f"c{i}")["blue"] for i, h in enumerate((h1, h2, h3), 1)}
    assert len(set(ips.values())) == 3, f"two containers share an address: {ips}"

    for i, h in enumerate((h1, h2, h3), 1):
        for j in (1, 2, 3):
            if j != i:
                wait_ping(h, f"c{i}", ips[j])

    # What crosses the underlay between host 1 and host 2 is VXLAN from VTEP 1 to VTEP 2.
    capture = subprocess.Popen(h2.nsenter + ["--", "tcpdump", "-n", "-l", "-c", "3", "-i", "eth0",
                                             f"udp port 4789 and src host {h1.ip}"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        wait_until(lambda: pings(h1, "c1", ips[2]) and capture.poll() is not None, 20,
                   "three VXLAN packets from host 1 on host 2's underlay", interval=0.2)
        lines = capture.stdout.read().splitlines()
    finally:
        if capture.poll() is None:
            capture.kill()
        capture.wait()
    outer = [line for line in lines if ".4789: VXLAN" in line]  # tcpdump prints the inner packet below each
    assert len(outer) == 3 and all(f"IP {h1.ip}." in o and f"> {h2.ip}.4789: VXLAN" in o for o in outer), lines
    assert any(f"> {ips[2]}: ICMP echo request" in line for line in lines), lines

    # A second overlay on hosts 1 and 2 works within itself and cannot reach the first.
    overlay(h1, "red", RED)
    overlay(h2, "red", RED)
    run_sleeper(h1, "r1", "red")
    run_sleeper(h2, "r2", "red")
    wait_ping(h1, "r1", addresses(h2, "r2")["red"])
    assert not pings(h1, "r1", ips[2], count=2, wait_s=1)
    assert not pings(h2, "r2", ips[1], count=2, wait_s=1)
    serve_tcp(h2, "c2")
    wait_until(lambda: tcp_answers(h1, "c1", ips[2]), 10, "c1 on host 1 to reach c2's TCP server on host 2")
    assert not tcp_answers(h1, "r1", ips[2])
    # Peers are programmed from etcd, not learnt: host 1's blue namespace knows exactly c2 and c3.
    assert set(neighbours(h1, nets[h1])) == {ips[2], ips[3]}


def test_plugin_killed_mid_ping_loses_nothing_and_a_dead_hosts_peers_expire(three):
    (h1, h2, h3), (p1, p2, p3) = three
    nets = {h: overlay(h, "blue", BLUE) for h in (h1, h2, h3)}
    for i, h in enumerate((h1, h2, h3), 1):
        run_sleeper(h, f"c{i}", "blue")
    ip2 = addresses(h2, "c2")["blue"]
    ip3 = addresses(h3, "c3")["blue"]
    wait_ping(h1, "c1", ip2)
    wait_ping(h1, "c1", ip3)

    result = {}
    pinger = threading.Thread(target=lambda: result.update(out=h1.docker(
        "exec", "c1", "ping", "-c", "40", "-i", "0.2", "-W", "1", ip2, check=False, timeout=120)))
    pinger.start()
    try:
        p2.kill()
        p2.start()
    finally:
        pinger.join()
    summary = result["out"].stdout
    assert re.search(r"40 packets transmitted, 40 packets received", summary), summary
    run_sleeper(h2, "c2b", "blue")
    wait_ping(h1, "c1", addresses(h2, "c2b")["blue"])

    # Host 3's plugin stops for good: once its lease expires, hosts 1 and 2 forget its container.
    assert ip3 in neighbours(h1, nets[h1])
    p3.kill()
    wait_until(lambda: ip3 not in neighbours(h1, nets[h1]) and ip3 not in neighbours(h2, nets[h2]), 60,
               "host 3's peer to expire from hosts 1 and 2")
    assert ip2 in neighbours(h1, nets[h1])  # the others stay

    # Host 3 comes back with a new lease: it republishes its container, which is reachable again.
    p3.start()
    wait_ping(h1, "c1", ip3)


def test_etcd_outage_keeps_traffic_and_refuses_changes_then_recovers(hosts, vxnet_plugin, etcd):
    h1, h2 = hosts(2)
    vxnet_plugin(h1)
    vxnet_plugin(h2)
    overlay(h1, "blue", BLUE)
    overlay(h2, "blue", BLUE)
    run_sleeper(h1, "c1", "blue")
    run_sleeper(h2, "c2", "blue")
    ip2 = addresses(h2, "c2")["blue"]
    wait_ping(h1, "c1", ip2)

    etcd.pause()
    try:
        # 30 s without etcd (150 pings at 0.2 s) while containers keep talking ...
        result = {}
        pinger = threading.Thread(target=lambda: result.update(out=h1.docker(
            "exec", "c1", "ping", "-c", "150", "-i", "0.2", "-W", "1", ip2, check=False, timeout=120)))
        pinger.start()
        # ... and a change is refused with a message that says why.
        refused = h1.docker("network", "create", "-d", "vxnet", "--ipam-driver", "vxnet", "--subnet",
                            "10.200.22.0/24", "during-outage", check=False, timeout=60)
        pinger.join()
    finally:
        etcd.resume()
    assert refused.returncode != 0 and "etcd unreachable" in refused.stderr, refused.stderr
    assert "150 packets transmitted, 150 packets received" in result["out"].stdout, result["out"].stdout

    # Back: a new container attaches and is reachable from the other host within 5 s, nothing restarted.
    run_sleeper(h2, "c3", "blue")
    wait_ping(h1, "c1", addresses(h2, "c3")["blue"], timeout=5)
