"""vxnet benchmarks: two simulated Docker hosts, vxnet against Docker's overlay; a table of ratios; torn down.

Parts (all by default, in this order):
  datapath     iperf3 throughput and ping RTT host1 -> host2: vxnet, Docker's overlay, the plain underlay;
               vxnet and Docker's overlay again with --crowd more endpoints on the vxnet network
  convergence  Join on host1 -> peer entries on host2, over N synthetic endpoints
  healing      data path with the self-healing reconciler on vs off; time to repair a deleted FDB entry
  policy       data path on a -o policy=deny network (rules, endpoints) vs an open one; rule change and identity
               to in force on every host
  startup      `docker run --rm --network N busybox true`: vxnet vs Docker's overlay
  scale        issue 14, no dockerd: --scale-endpoints on one network of one host and --scale-peers remote peers;
               attach median last 100 / first 100, peer convergence p99, restart reconcile time, memory

Everything is bounded: each command has a time-out and the whole run a deadline (--deadline, default 540 s),
after which it stops, tears down and exits 3. SIGTERM and Ctrl-C tear down too. A part that fails is reported
and the next one runs; the exit status is then 1. The results also go to a JSON file (--json).
"""

import argparse
import datetime
import fcntl
import json
import os
import signal
import time
import traceback
from typing import Dict, List

from bench import convergence, datapath, healing, policy, scale, startup
from bench.common import load
from bench.lab import BenchLab, log
from tests.harness.plugin import REPO

# In this order: startup's managed form stops the host-process plugins the others run on (and its managed plugin,
# in the host's network namespace, holds the metrics port a host-process plugin restarted after it would need).
PARTS = ("datapath", "convergence", "healing", "policy", "startup", "scale")


class Deadline(BaseException):
    """The run's time is up (raised from SIGALRM, unwinds through every finally to the teardown)."""


def _on_signal(signum, _frame):
    if signum == signal.SIGALRM:
        raise Deadline("deadline reached")
    raise KeyboardInterrupt(f"signal {signum}")


def _wait_for_load(threshold: float, max_wait: float) -> None:
    if threshold <= 0:
        return
    deadline = time.monotonic() + max_wait
    while os.getloadavg()[0] >= threshold and time.monotonic() < deadline:
        log(f"load {load()} >= {threshold}: waiting (at most {max(0, deadline - time.monotonic()):.0f} s more)")
        time.sleep(min(15, max(1, deadline - time.monotonic())))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated, from {', '.join(PARTS)} (default: all)")
    parser.add_argument("--runs", type=int, default=3, help="iperf3 runs per path (default 3)")
    parser.add_argument("--duration", type=int, default=5, help="seconds per iperf3 run (default 5)")
    parser.add_argument("--pings", type=int, default=100, help="pings per path (default 100)")
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between pings (default 0.05)")
    parser.add_argument("--crowd", type=int, default=50,
                        help="datapath: measure again with this many more endpoints on each host (0: skip; 50)")
    parser.add_argument("--streams", type=int, default=4,
                        help="datapath: parallel TCP streams of the second iperf3 rounds (default 4; 1: none)")
    parser.add_argument("--underlay-mtu", type=int, default=1500,
                        help="MTU of the simulated underlay (default 1500; 9000: a jumbo underlay, where vxnet's "
                             "automatic MTU is 8950 and Docker's overlay stays at 1450)")
    parser.add_argument("--endpoints", type=int, default=200, help="synthetic endpoints for convergence (200)")
    parser.add_argument("--gap", type=float, default=0.0,
                        help="seconds between two Joins in the convergence part (default 0: back to back)")
    parser.add_argument("--docker-runs", type=int, default=10, help="timed docker runs per network (default 10)")
    parser.add_argument("--startup-plugin", choices=("managed", "process", "both"), default="both",
                        help="vxnet for the startup part: the managed plugin on a swarm network (falls back to "
                             "process if it cannot be installed), the host-process plugin on a local-scope "
                             "network, or both, one after the other (default)")
    parser.add_argument("--startup-host", type=int, choices=(1, 2), default=1,
                        help="host that runs the timed containers (1: Swarm manager, 2: worker)")
    parser.add_argument("--plugin-timings", action="store_true",
                        help="startup: run the plugins at debug level and report the median duration of each "
                             "plugin call during the timed runs, as the plugin logs it (costs a little)")
    parser.add_argument("--deletions", type=int, default=50,
                        help="healing: FDB entries deleted by hand, one at a time, to time their repair (50)")
    parser.add_argument("--policy-endpoints", type=int, default=200,
                        help="policy: synthetic endpoints per host on each of the two networks (200)")
    parser.add_argument("--policy-rules", type=int, default=100, help="policy: rules on the deny network (100)")
    parser.add_argument("--policy-changes", type=int, default=30,
                        help="policy: rule changes timed to in force on both hosts (30)")
    parser.add_argument("--policy-probes", type=int, default=10,
                        help="policy: containers started to time the identity window (10)")
    parser.add_argument("--scale-endpoints", type=int, default=1000,
                        help="scale: local endpoints on the one network (default 1000: what one bridge takes "
                             "today; 4000 once a network spans several bridges)")
    parser.add_argument("--scale-peers", type=int, default=10000, help="scale: remote peers (default 10000)")
    parser.add_argument("--scale-probes", type=int, default=200,
                        help="scale: peer records put one at a time to time convergence (default 200)")
    parser.add_argument("--wait-load", type=float, default=1.0, metavar="LOAD",
                        help="before starting, wait while the 1-minute load average is >= LOAD (default 1.0; "
                             "0: do not wait)")
    parser.add_argument("--wait-max", type=float, default=60,
                        help="wait at most this long (seconds, default 60) for --wait-load, then run anyway")
    parser.add_argument("--deadline", type=int, default=1080,
                        help="seconds for the run after the wait (default 1080; a default run takes about 11 "
                             "min)")
    parser.add_argument("--json", default=os.path.join(REPO, "build", "bench", "results.json"),
                        help="write the results here (default build/bench/results.json; '' for none)")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        parser.error(f"--parts: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(PARTS)}")
    if os.geteuid() != 0:
        parser.error("needs root (namespaces, dockerd)")

    # One run at a time per checkout: runs share build/bench/ (logs, results) and would share the CPUs.
    os.makedirs(os.path.join(REPO, "build", "bench"), exist_ok=True)
    lock = open(os.path.join(REPO, "build", "bench", ".lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        parser.exit(1, "another `python3 -m bench` runs in this checkout\n")

    for sig in (signal.SIGTERM, signal.SIGALRM, signal.SIGINT):
        signal.signal(sig, _on_signal)
    _wait_for_load(args.wait_load, args.wait_max)
    signal.alarm(args.deadline)

    started = time.monotonic()
    results: Dict[str, object] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "load_at_start": load(), "cpus": os.cpu_count(), "kernel": os.uname().release, "args": vars(args),
        "parts": {},
    }
    log(f"vxnet bench: parts {', '.join(parts)}; load average {results['load_at_start']} ({os.cpu_count()} CPUs)")
    failed: List[str] = []
    status = 0
    if not 1280 <= args.underlay_mtu <= 65535:
        parser.error(f"--underlay-mtu {args.underlay_mtu}: from 1280 to 65535")
    if args.streams < 1:
        parser.error(f"--streams {args.streams}: at least 1")
    bl = BenchLab(quiet_plugin=not args.plugin_timings, underlay_mtu=args.underlay_mtu)
    try:
        if set(parts) - {"scale"}:  # the scale part runs its own in-process host and etcd
            bl.start()
            log(f"two simulated hosts up ({time.monotonic() - started:.0f} s)")
        for part in PARTS:
            if part not in parts:
                continue
            log(f"--- {part}")
            t = time.monotonic()
            try:
                if part == "datapath":
                    out = datapath.run_part(bl, args.runs, args.duration, args.pings, args.interval,
                                            args.crowd, args.streams)
                elif part == "convergence":
                    out = convergence.run_part(bl, args.endpoints, args.gap)
                elif part == "policy":
                    out = policy.run_part(bl, args.runs, args.duration, args.pings, args.interval,
                                          args.policy_endpoints, args.policy_rules, args.policy_changes,
                                          args.policy_probes)
                elif part == "healing":
                    out = healing.run_part(bl, args.runs, args.duration, args.pings, args.interval,
                                           args.deletions)
                elif part == "scale":
                    out = scale.run_part(args.scale_endpoints, args.scale_peers, args.scale_probes, log)
                else:
                    out = startup.run_part(bl, args.docker_runs, args.startup_plugin, args.startup_host)
                out["seconds"] = round(time.monotonic() - t, 1)
                out["load_after"] = load()
                results["parts"][part] = out
            except Exception as exc:
                failed.append(part)
                results["parts"][part] = {"error": f"{type(exc).__name__}: {exc}"}
                log(f"{part} FAILED: {exc}")
                traceback.print_exc()
    except Deadline:
        log(f"deadline of {args.deadline} s reached: stopping")
        status = 3
    except KeyboardInterrupt as exc:
        log(f"interrupted ({exc}): tearing down")
        status = 130
    finally:
        signal.alarm(0)
        # The teardown gets its own bound: a second alarm in it would leave things behind, so none is set, but
        # every step of it is bounded by its own time-out.
        t = time.monotonic()
        errors = bl.teardown()
        for error in errors:
            log(f"teardown: {error}")
        log(f"torn down in {time.monotonic() - t:.0f} s")
    results["load_at_end"] = load()
    results["seconds"] = round(time.monotonic() - started, 1)
    _print_report(results)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"results: {args.json}")
    if status:
        return status
    return 1 if failed or errors else 0


def _print_report(results: Dict[str, object]) -> None:
    print()
    print(f"=== vxnet bench {results['date']}, {results['cpus']} CPUs, kernel {results['kernel']}; load average "
          f"{results['load_at_start']} at start, {results['load_at_end']} at end; {results['seconds']:.0f} s")
    if float(results["load_at_start"].split()[0]) >= 1.0:
        print("    (load >= 1.0 at start: something else shares the CPUs, the figures are noisier than usual)")
    reporters = {"datapath": datapath.report, "convergence": convergence.report, "startup": startup.report,
                 "healing": healing.report, "policy": policy.report, "scale": scale.report}
    for part, out in results["parts"].items():
        print()
        if "error" in out:
            print(f"{part}: FAILED: {out['error']}")
            continue
        for line in reporters[part](out):
            print(line)
        print(f"  ({out['seconds']:.0f} s; load average after: {out['load_after']})")
