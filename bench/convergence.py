"""Part 2: peer convergence: from Join returning on host1 to the peer's entries present on host2.

`bench-conv` (-o overlay=conv) exists on both hosts (host-process plugins). On host1 this part calls the plugin's
own HTTP API over its unix socket, as dockerd would, for N synthetic endpoints (their own endpoint IDs,
addresses from the subnet): CreateEndpoint, then Join (which makes the veth pair and publishes the peer in etcd).
On host2, `ip -ts monitor neigh` in the network's namespace, started before, timestamps every neighbour entry
(ip -> mac) and FDB entry (mac -> host1's VTEP) as the kernel takes it. A peer is present when both are; its
convergence time is that moment minus the moment Join returned. Both clocks are this machine's wall clock.

Afterwards every endpoint is withdrawn (Leave, then DeleteEndpoint, which removes its veth pair), and the time
to each neighbour entry's removal on host2 is reported as well.
"""

import datetime
import ipaddress
import re
import time
from typing import Dict, List, Tuple

from bench import synthetic
from bench.common import BenchError, fmt, median, percentile
from bench.lab import BenchLab
from kernel import names
from tests.harness.proc import wait_until

CONV_NET, CONV_SUBNET, CONV_OVERLAY = "bench-conv", "10.200.44.0/22", "conv"
FIRST_HOST = 10  # endpoint i gets the subnet's address number FIRST_HOST + i
SENTINEL_IP, SENTINEL_MAC = "10.200.47.254", "02:00:0a:c8:2f:fe"  # on br0 only, to see the monitor is live

_LINE = re.compile(r"^\[(?P<ts>[0-9T:.-]+)\] (?P<deleted>Deleted )?(?P<rest>.*)$")
_ENTRY = re.compile(r"^(?P<ip>\d+\.\d+\.\d+\.\d+) dev (?P<dev>\S+)(?: lladdr (?P<mac>\S+))?")


def _when(ts: str) -> float:
    return datetime.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%f").timestamp()


def _events(path: str, subnet: ipaddress.IPv4Network) -> Tuple[Dict[str, float], ...]:
    """From the monitor's log: first neighbour add per ip, first FDB add per mac, first neighbour delete per ip
    (all on vxlan0), as wall-clock times.

    `ip monitor neigh` prints the VXLAN device's FDB entries (family AF_BRIDGE) in the neighbour format too, with
    the remote VTEP where a neighbour has its IP: "192.168.251.11 dev vxlan0 lladdr <mac> PERMANENT". An entry
    whose address is in the overlay's subnet is a neighbour entry; any other is an FDB entry (the VTEPs are
    underlay addresses)."""
    neigh, fdb, gone = {}, {}, {}
    with open(path, errors="replace") as f:
        for line in f:
            m = _LINE.match(line.rstrip("\n"))
            if not m:
                continue
            e = _ENTRY.match(m["rest"])
            if not e or e["dev"] != names.VXLAN:
                continue
            t = _when(m["ts"])
            if ipaddress.IPv4Address(e["ip"]) in subnet:
                (gone if m["deleted"] else neigh).setdefault(e["ip"], t)
            elif e["mac"] and not m["deleted"]:
                fdb.setdefault(e["mac"], t)
    return neigh, fdb, gone


def _seen(path: str, pattern: str) -> bool:
    try:
        with open(path, errors="replace") as f:
            return pattern in f.read()
    except FileNotFoundError:
        return False


def run_part(bl: BenchLab, count: int, gap: float) -> Dict[str, object]:
    from netdriver.driver import (
        mac_for,  # the MAC the plugin gives an endpoint with none (Docker's 02:42:<ip>)
    )

    h1, h2 = bl.h1, bl.h2
    ids = bl.vx_network(CONV_NET, CONV_SUBNET, CONV_OVERLAY)
    nid1, ns2 = ids[h1.name], names.netns(ids[h2.name])
    socket = bl.plugins[h1.name].socket_path
    subnet = ipaddress.IPv4Network(CONV_SUBNET)
    if count > subnet.num_addresses - FIRST_HOST - 4:
        raise BenchError(f"at most {subnet.num_addresses - FIRST_HOST - 4} endpoints fit in {CONV_SUBNET}")

    monitor = bl.bg.spawn(h2.nsenter + ["--", "stdbuf", "-oL", "ip", "-n", ns2, "-ts", "monitor", "neigh"],
                          "monitor-host2")
    mon_log = bl.bg.log_path("monitor-host2")
    # The monitor is live once it reports an entry we add (on the bridge, which vxnet never programs).
    # Added and deleted each time: re-adding an identical entry would notify nobody.

    def monitor_live() -> bool:
        h2.run(["ip", "-n", ns2, "neigh", "replace", SENTINEL_IP, "lladdr", SENTINEL_MAC, "dev", names.BRIDGE,
                "nud", "permanent"])
        h2.run(["ip", "-n", ns2, "neigh", "del", SENTINEL_IP, "dev", names.BRIDGE])
        return _seen(mon_log, SENTINEL_IP)

    wait_until(monitor_live, 10, "ip monitor on host2 to be live", interval=0.1)

    endpoints: List[Dict[str, object]] = []
    try:
        for i in range(count):
            ip = str(subnet.network_address + FIRST_HOST + i)
            ep = {"ip": ip, "mac": mac_for(ip)}
            endpoints.append(ep)  # before the calls, so a half-made endpoint is cleaned up too
            synthetic.join(socket, nid1, f"{ip}/{subnet.prefixlen}", ep)
            if gap:
                time.sleep(gap)

        def all_present() -> bool:
            neigh, fdb, _ = _events(mon_log, subnet)
            return all(ep["ip"] in neigh and ep["mac"] in fdb for ep in endpoints)

        try:
            wait_until(all_present, 20, f"{count} peers on host2", interval=0.2)
        except TimeoutError:
            pass  # reported as missing below
    finally:
        withdraw = synthetic.withdraw(socket, endpoints)
    try:
        wait_until(lambda: all(ep["ip"] in _events(mon_log, subnet)[2] for ep in endpoints), 20,
                   "peers withdrawn on host2", interval=0.2)
    except TimeoutError:
        pass
    bl.bg.stop(monitor)

    neigh, fdb, gone = _events(mon_log, subnet)
    conv, conv_neigh, removal, missing = [], [], [], 0
    for ep in endpoints:
        if ep["ip"] not in neigh or ep["mac"] not in fdb or "joined" not in ep:
            missing += 1
            continue
        conv_neigh.append((neigh[ep["ip"]] - ep["joined"]) * 1000)
        ep["converge_ms"] = (max(neigh[ep["ip"]], fdb[ep["mac"]]) - ep["joined"]) * 1000
        conv.append(ep["converge_ms"])
        if ep["ip"] in gone and "left" in ep:
            removal.append((gone[ep["ip"]] - ep["left"]) * 1000)
    calls = [ep["call_s"] * 1000 for ep in endpoints if "call_s" in ep]
    # Does it grow with the number of peers already there? The first and the last quarter, in Join order.
    quarter = max(1, len(endpoints) // 4)
    first = [ep["converge_ms"] for ep in endpoints[:quarter] if "converge_ms" in ep]
    last = [ep["converge_ms"] for ep in endpoints[-quarter:] if "converge_ms" in ep]
    first_calls = [ep["call_s"] * 1000 for ep in endpoints[:quarter] if "call_s" in ep]
    last_calls = [ep["call_s"] * 1000 for ep in endpoints[-quarter:] if "call_s" in ep]
    for host in (h1, h2):
        bl.remove_network(host, CONV_NET)
    leaked = [name for name in h1.links() if name.startswith("vxc") or name.startswith("vxp")]
    return {
        "endpoints": count, "gap_s": gap, "missing": missing,
        "converge_ms_median": median(conv), "converge_ms_p99": percentile(conv, 99), "converge_ms_max":
            max(conv) if conv else None,
        "neigh_ms_median": median(conv_neigh), "neigh_ms_p99": percentile(conv_neigh, 99),
        "first_quarter_converge_ms_median": median(first), "last_quarter_converge_ms_median": median(last),
        "join_call_ms_median": median(calls), "join_call_ms_p99": percentile(calls, 99),
        "first_quarter_call_ms_median": median(first_calls), "last_quarter_call_ms_median": median(last_calls),
        "withdraw_ms_median": median(removal), "withdraw_ms_p99": percentile(removal, 99),
        "withdraw_calls_s": withdraw, "leaked_links_host1": leaked,
    }


def report(s: Dict[str, object]) -> List[str]:
    p99 = s["converge_ms_p99"]
    ok = "n/a" if p99 is None else "meets target" if p99 < 100 else "MISSES target"
    ms = lambda key: fmt(s[key], ".1f")
    return [
        f"Peer convergence, {s['endpoints']} endpoints joined on host1 one after the other "
        f"(gap {s['gap_s']} s), entries watched on host2",
        f"  Join returned -> neighbour + FDB entry on host2: median {ms('converge_ms_median')} ms, "
        f"p99 {ms('converge_ms_p99')} ms, max {ms('converge_ms_max')} ms   (target p99 < 100 ms: {ok})",
        f"  neighbour entry alone: median {ms('neigh_ms_median')} ms, p99 {ms('neigh_ms_p99')} ms; "
        f"median of the first quarter {ms('first_quarter_converge_ms_median')} ms, "
        f"of the last {ms('last_quarter_converge_ms_median')} ms",
        f"  CreateEndpoint+Join calls on host1: median {ms('join_call_ms_median')} ms, "
        f"p99 {ms('join_call_ms_p99')} ms; first quarter {ms('first_quarter_call_ms_median')} ms, "
        f"last {ms('last_quarter_call_ms_median')} ms",
        f"  Leave returned -> neighbour entry gone on host2: median {ms('withdraw_ms_median')} ms, "
        f"p99 {ms('withdraw_ms_p99')} ms (Leave+DeleteEndpoint of all: {s['withdraw_calls_s']:.1f} s)",
        f"  missing on host2: {s['missing']}; links left on host1: {len(s['leaked_links_host1'])}",
    ]
