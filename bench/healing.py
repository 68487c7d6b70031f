"""Part: self-healing (netdriver/reconciler.py) and what it costs.

  data path  iperf3 and ping host1 -> host2 over bench-vx with both plugins running the reconciler (the default,
             VXNET_RECONCILE_SECONDS=30 with the netlink listener) and without it (VXNET_RECONCILE_SECONDS=0: no
             listener, no periodic pass), in ABBA order (on, off, off, on: the plugins restarted with the setting
             before each block) so drift in the machine's load hits both alike. The reconciler runs only on
             control-plane changes, so the two must be equal within the run-to-run noise.
  repair     the FDB entry of host2's sleeper deleted in host1's bench-vx namespace `--deletions` times (50), each
             time from the deletion to the entry back, polled every millisecond (bench/heal_probe.py, inside host1):
             median and p99.
"""

import json
import os
import sys
from typing import Dict, List

from bench.common import BenchError, fmt, median, percentile, ratio, wait_reachable
from bench.datapath import IPERF_PORT, _iperf, _ping
from bench.lab import VX_NET, BenchLab, log
from kernel import names
from tests.harness.containers import network_id
from tests.harness.plugin import REPO

MODES = ("on", "off")


def _set_mode(bl: BenchLab, mode: str) -> None:
    for plugin in bl.plugins.values():
        if mode == "off":
            plugin.env["VXNET_RECONCILE_SECONDS"] = "0"
        else:
            plugin.env.pop("VXNET_RECONCILE_SECONDS", None)  # the default
        plugin.restart()


def _measure(bl: BenchLab, runs: int, duration: int, pings: int, interval: float) -> Dict[str, List[float]]:
    client, server, ip = bl.endpoints(VX_NET)
    gbps, rtts = [], []
    for _ in range(runs):
        gbps.append(_iperf(client, ip, duration)["gbps"])
    rtts += _ping(client, ip, pings, interval)["rtts_ms"]
    return {"gbps": gbps, "rtts_ms": rtts}


def run_part(bl: BenchLab, runs: int, duration: int, pings: int, interval: float,
             deletions: int) -> Dict[str, object]:
    bl.ensure_vx()
    client, server, ip = bl.endpoints(VX_NET)
    iperf = bl.bg.spawn(["nsenter", "-t", str(server), "-n", "--", "iperf3", "-s", "-p", str(IPERF_PORT)],
                        "iperf3-healing")
    results = {mode: {"gbps": [], "rtts_ms": []} for mode in MODES}
    try:
        for mode in ("on", "off", "off", "on"):
            _set_mode(bl, mode)
            wait_reachable(client, ip, "bench-vx reachable after the plugins restarted")
            got = _measure(bl, runs, duration, max(1, pings // 2), interval)
            results[mode]["gbps"] += got["gbps"]
            results[mode]["rtts_ms"] += got["rtts_ms"]
            log(f"healing data path, reconciler {mode}: {', '.join(f'{g:.2f}' for g in got['gbps'])} Gbit/s, "
                f"RTT median {fmt(median(got['rtts_ms']), '.3f')} ms")
    finally:
        bl.bg.stop(iperf)
        _set_mode(bl, "on")

    # Repair time: host2's sleeper's MAC, as host1's namespace maps it to host2's VTEP.
    wait_reachable(client, ip, "bench-vx reachable before the deletions")
    mac = bl.h2.docker("inspect", "--format", "{{json .NetworkSettings.Networks}}", f"{VX_NET}-2").stdout
    mac = json.loads(mac)[VX_NET]["MacAddress"]
    ns = names.netns(network_id(bl.h1, VX_NET))
    proc = bl.h1.run([sys.executable, "-m", "bench.heal_probe", ns, mac, bl.h2.ip, str(deletions)], check=False,
                     timeout=deletions * 11 + 60, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
    try:
        probe = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise BenchError(f"heal_probe: {proc.stderr.strip() or proc.stdout.strip()}") from None
    if "error" in probe:
        raise BenchError(f"heal_probe: {probe['error']}")
    repairs = bl.plugins[bl.h1.name].log(5000).count("repair kind=fdb")
    ms = [s * 1000 for s in probe["seconds"]]
    log(f"FDB repair: median {fmt(median(ms), '.1f')} ms, p99 {fmt(percentile(ms, 99), '.1f')} ms over {len(ms)} "
        f"({probe['missed']} not repaired within 10 s)")
    on, off = results["on"], results["off"]
    return {
        "runs": runs, "duration_s": duration,
        "datapath": {mode: {"gbps_runs": [round(g, 3) for g in r["gbps"]], "gbps_median": median(r["gbps"]),
                            "rtt_median_ms": median(r["rtts_ms"]), "rtt_p99_ms": percentile(r["rtts_ms"], 99)}
                     for mode, r in results.items()},
        "throughput_on_off": ratio(median(on["gbps"]), median(off["gbps"])),
        "rtt_on_off": ratio(median(on["rtts_ms"]), median(off["rtts_ms"])),
        "repair": {"deletions": deletions, "repaired": len(ms), "missed": probe["missed"],
                   "median_ms": median(ms), "p99_ms": percentile(ms, 99), "max_ms": max(ms) if ms else None,
                   "poll_ms": probe["poll_s"] * 1000, "logged_repairs": repairs},
    }


def report(summary: Dict[str, object]) -> List[str]:
    d = summary["datapath"]
    lines = ["Self-healing: data path with the reconciler on (default) vs off (VXNET_RECONCILE_SECONDS=0), ABBA"]
    for mode in MODES:
        r = d[mode]
        lines.append(f"  reconciler {mode:3s}  {fmt(r['gbps_median'])} Gbit/s "
                     f"({', '.join(f'{g:.2f}' for g in r['gbps_runs'])})  RTT median {fmt(r['rtt_median_ms'], '.3f')}"
                     f" ms, p99 {fmt(r['rtt_p99_ms'], '.3f')} ms")
    spread = [g for r in d.values() for g in r["gbps_runs"]]
    noise = (max(spread) - min(spread)) / median(spread) if spread else None
    lines.append(f"  on/off throughput {fmt(summary['throughput_on_off'])}x, RTT {fmt(summary['rtt_on_off'])}x "
                 f"(run-to-run spread of all runs: {fmt(noise * 100 if noise is not None else None, '.0f')}%)")
    r = summary["repair"]
    lines.append(f"  FDB entry deleted by hand, back after: median {fmt(r['median_ms'], '.1f')} ms, p99 "
                 f"{fmt(r['p99_ms'], '.1f')} ms, max {fmt(r['max_ms'], '.1f')} ms ({r['repaired']}/{r['deletions']} "
                 f"repaired, polled every {r['poll_ms']:g} ms; {r['logged_repairs']} repairs logged)")
    return lines
