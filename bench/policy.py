"""Part: what a policy costs and how fast it takes effect (issue 13's benchmark).

Three vxnet networks on both hosts (host-process plugins, each joined into one overlay by `-o overlay=`):
`bench-pol-open` (-o policy=open, today's behaviour), `bench-pol-deny` (-o policy=deny) and `bench-pol-deny0`
(deny, see below). Each gets a sleeper per host (host1's labelled role=bench-client, host2's role=bench-server:
real containers, whose identities the plugins publish from dockerd's events) and --policy-endpoints synthetic
endpoints per host (plugin API calls, as in the datapath part's crowd).
On the deny network every synthetic endpoint gets an identity (a container name, service svc<i % 20>, label
group=g<i % 50>), published through NetworkDriver.publish_identity as the identity
writer publishes a container's, and --policy-rules rules go into etcd through the policy store (what
`vxnet policy allow` does): one allowing bench-client -> bench-server (every protocol: iperf3 and ping), one
bench-probe -> bench-server (the identity window below), the rest group=g<k % 50> -> service=svc<k % 20> on
port 6000+k/tcp (80 allow4 elements each per host with 200 endpoints: about 7,800 per host). The part waits
until both hosts' kernels hold every element, and checks the deny network denies (host2's sleeper cannot ping
host1's, the same ping the other way succeeds; on the open network both succeed).

  data path   iperf3 (--runs x --duration per block) host1 -> host2 on each network in ABBA blocks (open, deny0,
              deny, deny, deny0, open), then ping (--pings per network) in rounds of PING_ROUND per network, the
              order reversed every round, so drift in the machine's load hits all alike; deny/open ratios, and
              the RTT's also paired by round (the median of each round's deny/open). deny0 is a third network,
              -o policy=deny with only the pair's rule and the same synthetic endpoints without identities:
              deny0/open is what any policy costs a packet, deny/deny0 what the rules and their elements add to it
              (the issue: nothing; sets, not rules per pair).
  rule change --policy-changes changes (allow, rm, allow, ...: bench-client -> group=g<n>, no ports), each
              timed from the policy store's write (etcd has it) to its element present (gone) in the
              allow_all4 set on both hosts, polled every 1 ms (bench/policy_probe.py, inside host1; host2's
              namespace through /proc/<pid>/root): p50/p99.
  identity    --policy-probes containers started on host1 one after another, labelled role=bench-probe; from
              each endpoint's Join to its identity in etcd (the plugin's own log line, "published N ms after its
              Join") and to the element bench-probe -> bench-server present in host2's kernel (a watcher polling
              host2's allow_all4 every 1 ms): p50/p99. One clock: this machine's wall clock.
"""

import datetime
import ipaddress
import json
import os
import re
import sys
import time
from typing import Dict, List, Optional

from bench import synthetic
from bench.common import BenchError, fmt, median, netns_of, percentile, ping_once, ratio, wait_reachable
from bench.datapath import IPERF_PORT, _iperf, _ping
from bench.lab import BenchLab, log
from kernel import names
from netdriver import policy_nft
from tests.harness.containers import addresses, run_sleeper
from tests.harness.plugin import REPO
from tests.harness.proc import wait_until

OPEN_NET, OPEN_SUBNET, OPEN_OVERLAY = "bench-pol-open", "10.200.48.0/22", "polopen"
DENY_NET, DENY_SUBNET, DENY_OVERLAY = "bench-pol-deny", "10.200.52.0/22", "poldeny"
# deny0: a deny network with only the pair's rule, and the same synthetic endpoints with no identities (guarded,
# selected by nothing): the fixed cost of a policy (the policy table's hook on the bridge path), apart from what the
# rules and their 7,800 elements per host could add.
BARE_NET, BARE_SUBNET, BARE_OVERLAY = "bench-pol-deny0", "10.200.56.0/22", "poldeny0"
NETS = {"open": (OPEN_NET, OPEN_SUBNET, OPEN_OVERLAY), "deny": (DENY_NET, DENY_SUBNET, DENY_OVERLAY),
        "deny0": (BARE_NET, BARE_SUBNET, BARE_OVERLAY)}
MODES = ("open", "deny0", "deny")
CROWDED = MODES  # the same endpoints on all three: only the policy differs
ORDER = ("open", "deny0", "deny", "deny", "deny0", "open")  # ABBA over three: each mode once in each half
PING_ROUND = 20  # pings per mode per round of the RTT phase
# Synthetic endpoints take addresses from the subnet's second /24 up (dockerd's IPAM gives the sleepers and the
# probes theirs from the first).
CROWD_FIRST = 256
GROUPS, SERVICES = 50, 20
RULE_PORT = 6000
CLIENT, SERVER, PROBE = "role=bench-client", "role=bench-server", "role=bench-probe"
_PUBLISHED = re.compile(r"^(?P<ts>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*identity of eid=\S+ "
                        r"\(container=(?P<name>\S+) .*published (?P<ms>\d+) ms after its Join")


def _probe(host, plugin, *args: str, stdin: Optional[object] = None, timeout: float = 120) -> dict:
    """bench/policy_probe.py inside the host, with the plugin's environment (its etcd); its JSON line."""
    proc = host.run([sys.executable, "-m", "bench.policy_probe", *args], check=False, timeout=timeout,
                    input=None if stdin is None else json.dumps(stdin), cwd=REPO,
                    env=dict(plugin.env, PYTHONPATH=REPO))
    try:
        out = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise BenchError(f"policy_probe {args[0]}: {proc.stderr.strip()[-500:] or proc.stdout.strip()}") from None
    if "error" in out:
        raise BenchError(f"policy_probe {args[0]}: {out['error']}")
    return out


def _set_len(host, ns: str, name: str) -> Optional[int]:
    out = host.run(["ip", "netns", "exec", ns, "nft", "-j", "list", "set", policy_nft.FAMILY, names.POLICY_TABLE,
                    name], check=False, timeout=30)
    if out.returncode:
        return None
    for item in json.loads(out.stdout)["nftables"]:
        if "set" in item:
            return len(item["set"].get("elem", []))
    return None


def _crowd_ip(subnet: str, h: int, count: int, i: int) -> str:
    return str(ipaddress.IPv4Network(subnet).network_address + CROWD_FIRST + h * count + i)


def _identity(h: int, i: int) -> dict:
    return {"container": f"bench-ep{h + 1}-{i}", "service": f"svc{i % SERVICES}",
            "labels": {"group": f"g{i % GROUPS}"}}


def _crowd_rules(count: int) -> List[list]:
    return [[f"label=group=g{k % GROUPS}", f"service=svc{k % SERVICES}", [f"{RULE_PORT + k}/tcp"]]
            for k in range(count)]


def _expected_allow4(rules: List[list], count: int, hosts: int) -> int:
    """allow4 elements per host: for each rule, its sources on every host times its destinations on this one
    (distinct ports per rule: no two rules give the same element)."""
    total = 0
    for k in range(len(rules)):
        sources = hosts * sum(1 for i in range(count) if i % GROUPS == k % GROUPS)
        dests = sum(1 for i in range(count) if i % SERVICES == k % SERVICES)
        total += sources * dests
    return total


def _block(paths: Dict[str, dict], mode: str, runs: int, duration: int, results: Dict[str, dict]) -> None:
    p = paths[mode]
    got = [_iperf(p["client"], p["target"], duration)["gbps"] for _ in range(runs)]
    results[mode]["gbps"] += got
    log(f"policy data path {mode:4s}: {', '.join(f'{g:.2f}' for g in got)} Gbit/s")


def _ping_rounds(paths: Dict[str, dict], pings: int, interval: float, results: Dict[str, dict]) -> None:
    """The RTT, apart from iperf3 (a ping right after a 5 s stream meets a machine still busy with it): `pings`
    per mode in rounds of PING_ROUND pings, the modes' order reversed every round, so a change of the machine's
    load during the part reaches every mode alike. Each round's median per mode is kept for a paired ratio."""
    rounds = max(1, pings // PING_ROUND)
    for i in range(rounds):
        for mode in (MODES if i % 2 == 0 else MODES[::-1]):
            p = paths[mode]
            got = _ping(p["client"], p["target"], PING_ROUND, interval)
            results[mode]["rtts_ms"] += got["rtts_ms"]
            results[mode]["lost"] += got["lost"]
            results[mode]["round_medians"].append(median(got["rtts_ms"]))
    log("policy RTT medians: " + ", ".join(f"{m} {fmt(median(results[m]['rtts_ms']), '.3f')} ms" for m in MODES)
        + f" ({rounds} rounds of {PING_ROUND} pings per mode)")


def _paired(results: Dict[str, dict], a: str, b: str) -> Optional[float]:
    """The median over rounds of a's round median / b's round median (same round: same load)."""
    pairs = [x / y for x, y in zip(results[a]["round_medians"], results[b]["round_medians"])
             if x is not None and y]
    return median(pairs) if pairs else None


def _published(log_path: str, wanted: List[str]) -> Dict[str, tuple]:
    """container name -> (wall clock of its identity's publication, ms after its Join) from the plugin's log."""
    found: Dict[str, tuple] = {}
    with open(log_path, errors="replace") as f:
        for line in f:
            m = _PUBLISHED.match(line)
            if m and m["name"] in wanted:
                when = datetime.datetime.strptime(m["ts"], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                found[m["name"]] = (when, int(m["ms"]))
    return found


def _watched(log_path: str) -> Dict[tuple, float]:
    """(saddr, daddr) -> wall clock of its first appearance, from the watcher's log."""
    first: Dict[tuple, float] = {}
    try:
        with open(log_path, errors="replace") as f:
            for line in f:
                try:
                    e = json.loads(line)
                except ValueError:
                    continue
                if e.get("op") == "add":
                    first.setdefault(tuple(e["elem"]), e["t"])
    except FileNotFoundError:
        pass
    return first


def run_part(bl: BenchLab, runs: int, duration: int, pings: int, interval: float, count: int, rules: int,
             changes: int, probes: int) -> Dict[str, object]:
    h1, h2 = bl.h1, bl.h2
    if CROWD_FIRST + 2 * count > ipaddress.IPv4Network(DENY_SUBNET).num_addresses - 2:
        raise BenchError(f"--policy-endpoints {count}: at most {(1022 - CROWD_FIRST) // 2} fit in {DENY_SUBNET}")
    if rules < 2:
        raise BenchError("--policy-rules: at least 2 (the measured pair's and the identity probe's)")
    ids: Dict[str, Dict[str, str]] = {}
    made: List[Dict[str, object]] = []
    servers, watcher, probe_names = [], None, []
    summary: Dict[str, object] = {"endpoints_per_host": count, "rules": rules, "runs_per_block": runs,
                                  "duration_s": duration}
    try:
        paths: Dict[str, dict] = {}
        for mode, (net, subnet, overlay) in NETS.items():
            ids[mode] = bl.vx_network(net, subnet, overlay, f"policy={mode.rstrip('0')}")
            for host, name, label in ((h1, f"{net}-1", CLIENT), (h2, f"{net}-2", SERVER)):
                if host.docker("container", "inspect", name, check=False).returncode != 0:
                    run_sleeper(host, name, net, "--label", label)
            client = int(h1.docker("inspect", "-f", "{{.State.Pid}}", f"{net}-1").stdout)
            server = int(h2.docker("inspect", "-f", "{{.State.Pid}}", f"{net}-2").stdout)
            paths[mode] = {"client": client, "server": server, "target": addresses(h2, f"{net}-2")[net],
                           "client_ip": addresses(h1, f"{net}-1")[net]}
        log(f"adding {count} endpoints per host to each of {', '.join(NETS[m][0] for m in CROWDED)}")
        t = time.monotonic()
        for mode in CROWDED:
            net, subnet, _overlay = NETS[mode]
            prefix = ipaddress.IPv4Network(subnet).prefixlen
            for h, host in enumerate(bl.hosts):
                socket = bl.plugins[host.name].socket_path
                for i in range(count):
                    ep = {"socket": socket, "mode": mode, "h": h, "i": i}
                    made.append(ep)
                    synthetic.join(socket, ids[mode][host.name], f"{_crowd_ip(subnet, h, count, i)}/{prefix}", ep)
        summary["crowd_s"] = round(time.monotonic() - t, 1)

        # Identities of the deny network's synthetic endpoints, then the rules, all in etcd.
        t = time.monotonic()
        for h, host in enumerate(bl.hosts):
            items = [[ep["id"], _identity(h, ep["i"])] for ep in made if ep["mode"] == "deny" and ep["h"] == h]
            _probe(host, bl.plugins[host.name], "identities", ids["deny"][host.name], host.name, stdin=items)
        crowd_rules = _crowd_rules(rules - 2)
        given = [[f"label={CLIENT}", f"label={SERVER}", []], [f"label={PROBE}", f"label={SERVER}", []]]
        _probe(h1, bl.plugins[h1.name], "rules", ids["deny"][h1.name], stdin=given + crowd_rules)
        _probe(h1, bl.plugins[h1.name], "rules", ids["deny0"][h1.name], stdin=given[:1])
        ns0 = names.netns(ids["deny0"][h2.name])
        want = _expected_allow4(crowd_rules, count, len(bl.hosts))
        ns = {host.name: names.netns(ids["deny"][host.name]) for host in bl.hosts}
        deny = paths["deny"]

        def in_force() -> bool:
            return (all(_set_len(host, ns[host.name], "allow4") == want for host in bl.hosts)
                    and (_set_len(h2, ns[h2.name], "allow_all4") or 0) >= 1
                    and (_set_len(h2, ns0, "allow_all4") or 0) >= 1)

        try:
            wait_until(in_force, 120, f"{want} allow4 elements on both hosts and the pair's allow_all4", interval=0.5)
        except TimeoutError as exc:
            raise BenchError(f"{exc}: allow4 has {[_set_len(h, ns[h.name], 'allow4') for h in bl.hosts]}") from None
        summary["policy_ready_s"] = round(time.monotonic() - t, 1)
        summary["allow4_per_host"] = want
        summary["guarded4_per_host"] = {host.name: _set_len(host, ns[host.name], "guarded4") for host in bl.hosts}
        log(f"{rules} rules in force: {want} allow4 elements per host ({summary['policy_ready_s']} s after the "
            f"identities and rules went to etcd)")

        # The deny network denies (the reverse direction has no rule), with the same probe as a positive control.
        for mode in ("deny", "deny0"):
            wait_reachable(paths[mode]["client"], paths[mode]["target"], f"bench-client -> bench-server on {mode}")
        summary["enforced"] = {
            "deny_client_to_server": ping_once(deny["client"], deny["target"]),
            "deny_server_to_client": ping_once(deny["server"], deny["client_ip"]),
            "deny0_client_to_server": ping_once(paths["deny0"]["client"], paths["deny0"]["target"]),
            "deny0_server_to_client": ping_once(paths["deny0"]["server"], paths["deny0"]["client_ip"]),
            "open_server_to_client": ping_once(paths["open"]["server"], paths["open"]["client_ip"]),
        }
        log(f"enforced: {summary['enforced']}")

        # Data path, ABBA.
        for mode, p in paths.items():
            wait_reachable(p["client"], p["target"], f"{mode}: host1 -> host2")
            proc = bl.bg.spawn(netns_of(p["server"]) + ["iperf3", "-s", "-p", str(IPERF_PORT)], f"iperf3-pol-{mode}")
            servers.append(proc)
        results = {mode: {"gbps": [], "rtts_ms": [], "lost": 0, "round_medians": []} for mode in MODES}
        for mode in ORDER:
            _block(paths, mode, runs, duration, results)
        _ping_rounds(paths, pings, interval, results)
        summary["datapath"] = {
            mode: {"gbps_runs": [round(g, 3) for g in r["gbps"]], "gbps_median": median(r["gbps"]),
                   "rtt_median_ms": median(r["rtts_ms"]), "rtt_p99_ms": percentile(r["rtts_ms"], 99),
                   "ping_lost": r["lost"]} for mode, r in results.items()}
        o, d, b = (summary["datapath"][m] for m in ("open", "deny", "deny0"))
        summary["throughput_deny_open"] = ratio(d["gbps_median"], o["gbps_median"])
        summary["rtt_deny_open"] = ratio(d["rtt_median_ms"], o["rtt_median_ms"])
        summary["rtt_p99_deny_open"] = ratio(d["rtt_p99_ms"], o["rtt_p99_ms"])
        summary["throughput_deny0_open"] = ratio(b["gbps_median"], o["gbps_median"])
        summary["rtt_deny0_open"] = ratio(b["rtt_median_ms"], o["rtt_median_ms"])
        summary["throughput_deny_deny0"] = ratio(d["gbps_median"], b["gbps_median"])
        summary["rtt_deny_deny0"] = ratio(d["rtt_median_ms"], b["rtt_median_ms"])
        summary["rtt_paired_deny_open"] = _paired(results, "deny", "open")
        summary["rtt_paired_deny0_open"] = _paired(results, "deny0", "open")
        for proc in servers:
            bl.bg.stop(proc)
        servers = []

        # Rule change -> in force on both hosts.
        dests, watch = [], []
        for g in range(min(GROUPS, max(1, (changes + 1) // 2))):
            dests.append(f"label=group=g{g}")
            pair = []
            for h, host in enumerate(bl.hosts):
                folder = "/run/netns" if host is h1 else f"/proc/{host.anchor.pid}/root/run/netns"
                pair.append([folder, ns[host.name], deny["client_ip"], _crowd_ip(DENY_SUBNET, h, count, g)])
            watch.append(pair)
        spec = {"source": f"label={CLIENT}", "dests": dests, "watch": watch}
        got = _probe(h1, bl.plugins[h1.name], "changes", ids["deny"][h1.name], str(changes), json.dumps(spec),
                     timeout=changes * 12 + 60)
        ms = [s * 1000 for s in got["in_force_s"]]
        per_host = list(zip(*got["per_host_s"])) if got["per_host_s"] else [[], []]
        summary["changes"] = {
            "count": changes, "measured": len(ms), "missed": got["missed"], "poll_ms": got["poll_s"] * 1000,
            "p50_ms": median(ms), "p99_ms": percentile(ms, 99), "max_ms": max(ms) if ms else None,
            "host1_p50_ms": median([s * 1000 for s in per_host[0]]),
            "host2_p50_ms": median([s * 1000 for s in per_host[1]]),
            "write_p50_ms": median([s * 1000 for s in got["write_s"]]),
            # Change i is an allow for even i, a removal for odd i (bench/policy_probe.py).
            "allow_p50_ms": median(ms[0::2]), "rm_p50_ms": median(ms[1::2]),
            "per_host_ms": [[round(x * 1000, 1) for x in row] for row in got["per_host_s"]],
            "list_ms": got["list_ms"],
        }
        # What the plugins said meanwhile (a warning here explains a slow change: e.g. a table replaced whole).
        summary["changes"]["plugin_warnings"] = {
            host.name: [line for line in bl.plugins[host.name].log(3000).splitlines()
                        if " WARNING " in line or " ERROR " in line][-8:] for host in bl.hosts}
        log(f"rule change -> in force on both hosts: p50 {fmt(median(ms), '.1f')} ms, p99 "
            f"{fmt(percentile(ms, 99), '.1f')} ms over {len(ms)} ({got['missed']} missed)")

        # Identity window: real containers, identities from dockerd's events.
        watcher = bl.bg.spawn(h2.nsenter + [f"--wd={REPO}", "--", "env", f"PYTHONPATH={REPO}", sys.executable, "-m",
                                            "bench.policy_probe", "watch", "/run/netns", ns[h2.name]],
                              "policy-watch-host2")
        watch_log = bl.bg.log_path("policy-watch-host2")
        wait_until(lambda: os.path.exists(watch_log) and '"start"' in open(watch_log).read(), 20,
                   "the allow_all4 watcher on host2", interval=0.1)
        started: Dict[str, float] = {}
        ips: Dict[str, str] = {}
        for i in range(probes):
            name = f"bench-pol-probe-{i}"
            probe_names.append(name)
            started[name] = time.time()
            run_sleeper(h1, name, DENY_NET, "--label", PROBE)
            ips[name] = addresses(h1, name)[DENY_NET]
            try:
                wait_until(lambda: (ips[name], deny["target"]) in _watched(watch_log), 15,
                           f"{name}'s identity in force on host2", interval=0.05)
            except TimeoutError:
                pass  # counted as missing below
        bl.bg.stop(watcher)
        watcher = None
        seen = _watched(watch_log)
        published = _published(bl.plugins[h1.name].log_path, probe_names)
        to_etcd, to_host2, from_run, missing = [], [], [], 0
        for name in probe_names:
            if name not in published or (ips.get(name), deny["target"]) not in seen:
                missing += 1
                continue
            when, after_join = published[name]
            joined = when - after_join / 1000
            to_etcd.append(after_join)
            to_host2.append((seen[(ips[name], deny["target"])] - joined) * 1000)
            from_run.append((seen[(ips[name], deny["target"])] - started[name]) * 1000)
        summary["identity"] = {
            "containers": probes, "missing": missing,
            "join_to_etcd_p50_ms": median(to_etcd), "join_to_etcd_p99_ms": percentile(to_etcd, 99),
            "join_to_host2_p50_ms": median(to_host2), "join_to_host2_p99_ms": percentile(to_host2, 99),
            "docker_run_to_host2_p50_ms": median(from_run), "docker_run_to_host2_p99_ms": percentile(from_run, 99),
        }
        log(f"identity window: Join -> etcd p50 {fmt(median(to_etcd), '.0f')} ms, -> host2's kernel p50 "
            f"{fmt(median(to_host2), '.0f')} ms ({missing} missing)")
    finally:
        for proc in servers:
            bl.bg.stop(proc)
        if watcher is not None:
            bl.bg.stop(watcher)
        for name in probe_names:
            h1.docker("rm", "-f", name, check=False, timeout=60)
        for socket in dict.fromkeys(ep["socket"] for ep in made):
            synthetic.withdraw(socket, [ep for ep in made if ep["socket"] == socket])
        for mode, (net, _subnet, _overlay) in NETS.items():
            for host in bl.hosts:
                bl.remove_network(host, net)
    leaked = [f"{h.name}:{names.netns(by_host[h.name])[:16]}" for by_host in ids.values() for h in bl.hosts
              if names.netns(by_host[h.name]) in h.netns()]
    summary["namespaces_left"] = leaked
    return summary


def report(s: Dict[str, object]) -> List[str]:
    d = s["datapath"]
    lines = [f"Policy: -o policy=deny with {s['rules']} rules ({s['allow4_per_host']} allow4 elements per host) and "
             f"{s['endpoints_per_host']} more endpoints per host vs -o policy=open with as many endpoints; "
             f"blocks of {s['runs_per_block']} x {s['duration_s']} s in the order "
             f"{', '.join(ORDER)}"]
    for mode in MODES:
        r = d[mode]
        lines.append(f"  {mode:4s}  {fmt(r['gbps_median'])} Gbit/s ({', '.join(f'{g:.2f}' for g in r['gbps_runs'])})"
                     f"  RTT median {fmt(r['rtt_median_ms'], '.3f')} ms, p99 {fmt(r['rtt_p99_ms'], '.3f')} ms, "
                     f"{r['ping_lost']} lost")
    spread = [g for r in d.values() for g in r["gbps_runs"]]
    noise = (max(spread) - min(spread)) / median(spread) if spread else None
    tput, rtt = s["throughput_deny_open"], s["rtt_deny_open"]
    lines += [
        f"  deny0 (deny, 1 rule, the same endpoints without identities)/open: throughput "
        f"{fmt(s['throughput_deny0_open'])}x, RTT median {fmt(s['rtt_deny0_open'])}x;  deny/deny0: throughput "
        f"{fmt(s['throughput_deny_deny0'])}x, RTT median {fmt(s['rtt_deny_deny0'])}x (what the rules and "
        "their elements add)",
        f"  deny/open throughput {fmt(tput)}x (target >= 0.95x), RTT median {fmt(rtt)}x (target <= 1.05x), "
        f"p99 {fmt(s['rtt_p99_deny_open'])}x; run-to-run spread of all runs "
        f"{fmt(noise * 100 if noise is not None else None, '.0f')}%",
        f"  RTT paired by round (median of each round's deny/open, {PING_ROUND} pings a mode a round, the modes "
        f"interleaved): deny/open {fmt(s.get('rtt_paired_deny_open'))}x, deny0/open "
        f"{fmt(s.get('rtt_paired_deny0_open'))}x",
        f"  enforced: {s['enforced']}",
    ]
    c = s["changes"]
    lines.append(f"  rule change (policy store write -> element in allow_all4 on both hosts): p50 "
                 f"{fmt(c['p50_ms'], '.1f')} ms, p99 {fmt(c['p99_ms'], '.1f')} ms, max {fmt(c['max_ms'], '.1f')} ms "
                 f"over {c['measured']}/{c['count']} (allow p50 {fmt(c['allow_p50_ms'], '.1f')}, rm p50 "
                 f"{fmt(c['rm_p50_ms'], '.1f')} ms; host1 p50 {fmt(c['host1_p50_ms'], '.1f')}, host2 p50 "
                 f"{fmt(c['host2_p50_ms'], '.1f')} ms; the write itself p50 {fmt(c['write_p50_ms'], '.1f')} ms; "
                 f"polled every {c['poll_ms']:g} ms)")
    i = s["identity"]
    lines.append(f"  identity window, {i['containers']} containers on host1: Join -> identity in etcd p50 "
                 f"{fmt(i['join_to_etcd_p50_ms'], '.0f')} ms, p99 {fmt(i['join_to_etcd_p99_ms'], '.0f')} ms; "
                 f"-> in force on host2 p50 {fmt(i['join_to_host2_p50_ms'], '.0f')} ms, p99 "
                 f"{fmt(i['join_to_host2_p99_ms'], '.0f')} ms (docker run -> host2 p50 "
                 f"{fmt(i['docker_run_to_host2_p50_ms'], '.0f')} ms); {i['missing']} missing")
    lines.append(f"  set-up: endpoints {s['crowd_s']} s, identities + rules in force {s['policy_ready_s']} s; "
                 f"namespaces left: {s['namespaces_left'] or 'none'}")
    return lines
