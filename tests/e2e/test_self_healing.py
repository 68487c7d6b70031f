"""Self-healing on two simulated hosts with real dockerd and etcd: a peer's FDB entry, then its neighbour entry,
then a container's anti-spoofing set element, deleted by hand on host 1, come back by themselves, and traffic
between the containers resumes within 2 s each time.

Each deletion is made twice. First with host 1's plugin frozen (SIGSTOP): the same probe then shows traffic
broken (the negative control: the deletion matters), and after SIGCONT the plugin, reading the notifications the
kernel queued for it, repairs it and traffic resumes within 2 s. Then with the plugin running: traffic is back
within 2 s. The repairs are in the plugin's log (`repair kind=... where=vxnet-...`).

`drift(plugin, delete)` is the frozen window on its own: inside it the kernel differs from the desired state
and nothing repairs it, for checks that must see the drift while it lasts (`vxnet status`, the repair counter
before and after)."""

import contextlib
import json
import re
from typing import Callable, Iterator, Optional

import pytest

from kernel import names
from tests.harness import metrics
from tests.harness.containers import addresses, network_id, run_sleeper, wait_ping
from tests.harness.plugin import Plugin
from tests.harness.proc import wait_until

SUBNET = "10.200.30.0/24"
WINDOW_SECONDS = 2  # traffic must resume within this; the probe's window
PING_INTERVAL = 0.1


@contextlib.contextmanager
def drift(plugin: Plugin, delete: Callable[[], None]) -> Iterator[None]:
    """Freeze the plugin, make the deletion, run the block while the drift lasts, thaw (the repair follows)."""
    with plugin.frozen():
        delete()
        yield


def endpoint_of(host, container: str, network: str) -> dict:
    raw = host.docker("inspect", "--format", "{{json .NetworkSettings.Networks}}", container).stdout
    return json.loads(raw)[network]


def first_reply(host, container: str, target: str) -> Optional[float]:
    """The one probe of this test: pings every 0.1 s for 2 s; the time of the first that was answered (seconds
    from the probe's start), or None if none was. The negative checks and the positive ones use it alike."""
    out = host.docker("exec", container, "ping", "-i", str(PING_INTERVAL), "-w", str(WINDOW_SECONDS), target,
                      check=False, timeout=WINDOW_SECONDS + 30).stdout
    seqs = [int(n) for n in re.findall(r"seq=(\d+)", out)]
    return min(seqs) * PING_INTERVAL if seqs else None


@pytest.fixture
def pair(hosts, vxnet_plugin):
    h1, h2 = hosts(2)
    p1 = vxnet_plugin(h1)
    vxnet_plugin(h2)
    nets = {}
    for h in (h1, h2):
        h.docker("network", "create", "-d", "vxnet", "--ipam-driver", "vxnet", "--subnet", SUBNET,
                 "-o", "overlay=heal", "heal")
        nets[h] = network_id(h, "heal")
    # NET_ADMIN: the test flushes the container's own ARP cache, so a lost neighbour entry matters.
    run_sleeper(h1, "c1", "heal", "--cap-add", "NET_ADMIN")
    run_sleeper(h2, "c2", "heal", "--cap-add", "NET_ADMIN")
    ip2 = addresses(h2, "c2")["heal"]
    wait_ping(h1, "c1", ip2)
    return h1, h2, p1, names.netns(nets[h1]), ip2


def test_deleted_fdb_neighbour_and_anti_spoofing_entries_come_back_by_themselves(pair):
    h1, h2, p1, ns, ip2 = pair
    c1, c2 = endpoint_of(h1, "c1", "heal"), endpoint_of(h2, "c2", "heal")
    mac2, ip1 = c2["MacAddress"], c1["IPAddress"]

    def probe() -> Optional[float]:
        return first_reply(h1, "c1", ip2)

    def in_ns(*argv: str) -> None:
        h1.run(["ip", "netns", "exec", ns, *argv])

    def delete_fdb() -> None:
        in_ns("bridge", "fdb", "del", mac2, "dev", names.VXLAN, "dst", h2.ip, "self")

    def delete_neigh() -> None:
        in_ns("ip", "neigh", "del", ip2, "dev", names.VXLAN)
        h1.docker("exec", "c1", "ip", "neigh", "flush", "all")  # or c1 keeps using the MAC it learnt

    def delete_element() -> None:
        in_ns("nft", "delete", "element", "bridge", "vxnet", "ips",
              "{", f"{names.veth_bridge(c1['EndpointID'])} . {ip1}", "}")

    # What `vxnet status` must name while each deletion lasts (netdriver/drift.py's objects).
    port1 = names.veth_bridge(c1["EndpointID"])
    shown = {"fdb": (mac2, h2.ip), "neighbour": (ip2, mac2), "anti-spoofing": (f"ips {port1} . {ip1}", "present")}

    def status_differences():
        code, data = p1.cli_json("status")
        return code, [(d["kind"], d["object"], d["want"], d["have"]) for d in data["this_host"]["differences"]]

    assert status_differences() == (0, []), "vxnet status in sync before any deletion"
    took = {}
    for kind, delete in (("fdb", delete_fdb), ("neighbour", delete_neigh), ("anti-spoofing", delete_element)):
        assert probe() is not None, f"traffic before deleting the {kind} entry (positive control)"
        counted = metrics.get(metrics.scrape(h1), "vxnet_repairs_total", kind=kind)
        with drift(p1, delete):
            assert probe() is None, f"traffic while the {kind} deletion is not repaired (negative control)"
            # The drift while it lasts, as the operator sees it (the command reads etcd and the kernel itself).
            code, found = status_differences()
            assert code == 1 and found == [(kind, *shown[kind][:1], shown[kind][1], None)], found
        after_thaw = probe()
        assert after_thaw is not None, f"no traffic within {WINDOW_SECONDS} s of thawing after the {kind} deletion"
        wait_until(lambda: status_differences() == (0, []), 10, f"vxnet status in sync after the {kind} repair")
        assert metrics.get(metrics.scrape(h1), "vxnet_repairs_total", kind=kind) >= counted + 1, \
            f"vxnet_repairs_total{{kind={kind}}} moved with the repair"
        delete()
        running = probe()  # started right after the deletion returned
        assert running is not None, f"no traffic within {WINDOW_SECONDS} s of the {kind} deletion"
        took[f"{kind} after thaw"] = after_thaw
        took[kind] = running
        wait_until(lambda: f"repair kind={kind} where={ns}" in p1.log(2000), 5,
                   f"the {kind} repair in the plugin log")
    print("first answered ping, seconds into the probe:", {k: round(v, 2) for k, v in took.items()})
    # Each deletion was repaired once, no more: the repairs' own notifications led to no further repair.
    log = p1.log(5000)
    counts = {kind: log.count(f"repair kind={kind} ") for kind in ("fdb", "neighbour", "anti-spoofing")}
    assert counts == {"fdb": 2, "neighbour": 2, "anti-spoofing": 2}, counts
    assert "could not repair" not in log
