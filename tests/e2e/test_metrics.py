"""/metrics of the real plugin in a simulated host: it parses with prometheus-client's parser, the call counter and
latency histogram move as dockerd makes calls (and count a refused call by its error class), the endpoints gauge
follows the containers, a container that forges its address moves the anti-spoofing drop counter, and one that
tries another network through the host moves the isolation drop counter.

Each drop check has its positive control with the same probe: the same ping from the container's own network
with its own address is answered, and not counted."""

import os
import platform

from tests.harness.containers import addresses, network_id, pings, run_sleeper, wait_ping
from tests.harness.metrics import get, scrape
from tests.harness.plugin import Plugin
from tests.harness.proc import wait_until
from wire.version import current as vxnet_version

SUBNET = "10.200.46.0/24"
SUBNET_B = "10.200.47.0/24"
CALLS = "vxnet_plugin_calls_total"
SECONDS = "vxnet_plugin_call_seconds_count"
SPOOFED = {"reason": "anti-spoofing"}
ISOLATED = {"reason": "isolation"}
DEADLINE = 10.0  # counters are read at the scrape: the drops are there as soon as the kernel counted them


def ping(host, container, target):
    return pings(host, container, target, count=2, wait_s=1)


def test_metrics_parse_and_move_with_calls_endpoints_and_spoofed_packets(hosts, vxnet_plugin):
    (host,) = hosts(1)
    vxnet_plugin(host)
    before = scrape(host)
    info = [labels for (name, labels) in before if name == "vxnet_build_info"]
    assert info and dict(info[0])["version"] and dict(info[0])["python"], info

    refused = host.docker("network", "create", "-d", "vxnet", "--ipam-driver", "vxnet", "--subnet", SUBNET,
                          "-o", "bogus=1", "m-bad", check=False)
    assert refused.returncode != 0 and "bogus" in refused.stderr, refused.stderr
    host.docker("network", "create", "-d", "vxnet", "--ipam-driver", "vxnet", "--subnet", SUBNET, "m1")
    run_sleeper(host, "a1", "m1")
    run_sleeper(host, "a2", "m1", "--cap-add", "NET_ADMIN")  # NET_ADMIN: it changes its own address below
    nid = network_id(host, "m1")
    a1, a2 = addresses(host, "a1")["m1"], addresses(host, "a2")["m1"]

    after = scrape(host)
    for method, calls in (("NetworkDriver.CreateNetwork", 1), ("NetworkDriver.CreateEndpoint", 2),
                          ("NetworkDriver.Join", 2),
                          # the two containers' and the networks' gateways (the refused network's was released)
                          ("IpamDriver.RequestAddress", 4)):
        moved = get(after, CALLS, method=method, outcome="ok") - get(before, CALLS, method=method, outcome="ok")
        assert moved == calls, (method, moved)
        timed = get(after, SECONDS, method=method) - get(before, SECONDS, method=method)
        assert timed >= calls, (method, timed)  # every call observed; a refused one too (the bad create)
    assert get(after, CALLS, method="NetworkDriver.CreateNetwork", outcome="InvalidOption") == \
        get(before, CALLS, method="NetworkDriver.CreateNetwork", outcome="InvalidOption") + 1
    assert get(after, "vxnet_endpoints", network=nid[:12]) == 2
    assert get(after, "vxnet_etcd_requests_total", op="kv/txn") > get(before, "vxnet_etcd_requests_total",
                                                                      op="kv/txn")

    # Control: a2 with its own address reaches a1, by the probe the forged address then fails with, and nothing
    # of it is counted as spoofed.
    wait_ping(host, "a2", a1)
    dropped = get(scrape(host), "vxnet_dropped_packets_total", **SPOOFED)
    assert ping(host, "a2", a1)
    assert get(scrape(host), "vxnet_dropped_packets_total", **SPOOFED) == dropped
    host.docker("exec", "a2", "ip", "addr", "flush", "dev", "eth0")
    host.docker("exec", "a2", "ip", "addr", "add", "10.200.46.99/24", "dev", "eth0")
    assert not ping(host, "a2", a1)
    # Two echo requests, and the ARP requests before them, all carry the forged address: each one is dropped
    # and counted.
    wait_until(lambda: get(scrape(host), "vxnet_dropped_packets_total", **SPOOFED) >= dropped + 2, DEADLINE,
               "the anti-spoofing drop counter to count the forged pings")
    assert get(scrape(host), "vxnet_dropped_bytes_total", **SPOOFED) > 0
    host.docker("exec", "a2", "ip", "addr", "flush", "dev", "eth0")
    host.docker("exec", "a2", "ip", "addr", "add", f"{a2}/24", "dev", "eth0")
    wait_ping(host, "a2", a1)
    assert ping(host, "a2", a1)

    # b1, on another network, routes towards m1 through the gateway bridge: the host's isolation table drops it.
    host.docker("network", "create", "-d", "vxnet", "--ipam-driver", "vxnet", "--subnet", SUBNET_B, "m2")
    run_sleeper(host, "b1", "m2", "--cap-add", "NET_ADMIN")
    host.docker("exec", "b1", "ip", "route", "add", SUBNET, "dev", "eth1")
    isolated = get(scrape(host), "vxnet_dropped_packets_total", **ISOLATED)
    assert ping(host, "a2", a1)  # control, as above
    assert get(scrape(host), "vxnet_dropped_packets_total", **ISOLATED) == isolated
    assert not ping(host, "b1", a1)
    wait_until(lambda: get(scrape(host), "vxnet_dropped_packets_total", **ISOLATED) >= isolated + 2, DEADLINE,
               "the isolation drop counter to count the pings from the other network")

    host.docker("rm", "-f", "a1")
    wait_until(lambda: get(scrape(host), "vxnet_endpoints", network=nid[:12]) == 1, DEADLINE,
               "the endpoints gauge to follow the removed container")


def test_a_metrics_port_already_taken_stops_the_start_naming_the_setting(hosts, vxnet_plugin, etcd):
    """A second plugin in the same host (its own socket and state) finds 127.0.0.1:9473 taken by the first: it
    exits at once with the setting named, and the first one goes on serving its metrics."""
    (host,) = hosts(1, docker=False)
    first = vxnet_plugin(host)
    assert get(scrape(host), "vxnet_build_info", python=platform.python_version(), version=vxnet_version()) == 1
    second = Plugin(host, etcd.url, {"VXNET_HOST_ID": "second",
                                     "VXNET_STATE_DIR": os.path.join(host.dir, "vxnet-second")},
                    socket="/run/docker/plugins/vxnet-second.sock")
    second.log_path = os.path.join(host.dir, "logs", "plugin-second.log")
    second.start(wait=False)
    try:
        wait_until(lambda: not second.alive(), DEADLINE, "the second plugin to stop at start")
        assert second.proc.returncode == 2
        assert "vxnet: VXNET_METRICS_ADDR: cannot serve metrics on 127.0.0.1:9473" in second.log(), second.log()
        assert not os.path.exists(second.socket_path)
    finally:
        second.stop()
    assert first.alive() and first.answers()
    assert get(scrape(host), "vxnet_build_info", python=platform.python_version(), version=vxnet_version()) == 1


SUBNET_X = "10.200.48.0/24"


def test_peers_per_network_follow_the_containers_on_the_other_host(hosts, vxnet_plugin):
    h1, h2 = hosts(2)
    for host in (h1, h2):
        vxnet_plugin(host)
        host.docker("network", "create", "-d", "vxnet", "--ipam-driver", "vxnet", "--subnet", SUBNET_X,
                    "-o", "overlay=mx", "mx")
    run_sleeper(h1, "x1", "mx")
    run_sleeper(h2, "x2", "mx")
    run_sleeper(h2, "x3", "mx")
    wait_ping(h1, "x1", addresses(h2, "x2")["mx"])
    label = {"network": network_id(h1, "mx")[:12]}
    wait_until(lambda: get(scrape(h1), "vxnet_peers", **label) == 2, DEADLINE, "host 1 to count host 2's two")
    assert get(scrape(h1), "vxnet_endpoints", **label) == 1
    label2 = {"network": network_id(h2, "mx")[:12]}
    assert get(scrape(h2), "vxnet_endpoints", **label2) == 2
    wait_until(lambda: get(scrape(h2), "vxnet_peers", **label2) == 1, DEADLINE, "host 2 to count host 1's one")
    h2.docker("rm", "-f", "x3")
    wait_until(lambda: get(scrape(h1), "vxnet_peers", **label) == 1, DEADLINE, "host 1 to see one of them go")
