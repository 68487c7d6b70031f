"""Part 3: `docker run --rm --network N <busybox> true`, vxnet against Docker's built-in overlay, same hosts, one run.

vxnet in two forms (--startup-plugin; both by default, one after the other):
process: the host-process plugin (legacy socket) of parts 1-2 with the local-scope `bench-vx` network on both
  hosts (-o overlay=bench).
managed: the managed plugin as `make plugin` builds it (scripts/build-plugin.sh, DOCKER_HOST set to each host's
  daemon) installed on both hosts against the lab's etcd, and a swarm-scoped attachable network
  `-d vxnet:latest --ipam-driver vxnet:latest --scope swarm --attachable`, the form issue 4 asks about. The
  host-process plugins are stopped first (they would share the host's identity in etcd) and etcd's /vxnet/ tree
  is emptied. If the managed plugin cannot be installed, that is said in the output (and with
  --startup-plugin managed, the host-process plugin is measured instead).

Each network has one sleeper container on each host already (the cost of a first container is not measured).
Runs go round vxnet, the built-in overlay and Docker's default bridge (the floor: no overlay at all), the order
reversed every other round; one uncounted warm-up each. Times are the docker CLI's wall-clock time.
"""

import concurrent.futures
import os
import re
import time
from typing import Dict, List, Optional, Tuple

from bench.common import BenchError, fmt, median, ratio, timed, verdict
from bench.lab import BUILTIN_NET, VX_NET, BenchLab, log
from tests.harness.images import IMAGE
from tests.harness.plugin import REPO
from tests.harness.proc import run

PLUGIN = "vxnet:latest"
SWARM_NET, SWARM_SUBNET = "bench-vxswarm", "10.200.48.0/24"
BUILD = os.path.join(REPO, "scripts", "build-plugin.sh")


def install_managed(bl: BenchLab) -> float:
    """Stop the host-process plugins (their networks first), then build-plugin.sh on both hosts in parallel."""
    for host in bl.hosts:
        for network in host.docker("network", "ls", "-q", "--filter", "driver=vxnet").stdout.split():
            bl.remove_network(host, network)
    bl.stop_plugins()
    bl.lab.etcd.delete_prefix("/vxnet/")
    started = time.monotonic()

    def install(host):
        env = dict(os.environ, DOCKER_HOST=host.docker_host)
        proc = run(["bash", BUILD, "VXNET_SCOPE=global", f"ETCD_ENDPOINTS={bl.lab.etcd.url}",
                    f"VXNET_ADVERTISE_ADDR={host.ip}", f"VXNET_HOST_ID={host.name}",
                    f"VXNET_LOG_LEVEL={bl.plugin_log_level}"],
                   env=env, timeout=420, check=False)
        if proc.returncode != 0:
            raise BenchError(f"build-plugin.sh on {host.name} failed: {(proc.stderr or proc.stdout)[-800:]}")

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for future in [pool.submit(install, h) for h in bl.hosts]:
            future.result()
    return time.monotonic() - started


def _swarm_network(bl: BenchLab) -> None:
    bl.ensure_swarm()
    if bl.h1.docker("network", "inspect", SWARM_NET, check=False).returncode != 0:
        bl.h1.docker("network", "create", "-d", PLUGIN, "--ipam-driver", PLUGIN, "--scope", "swarm",
                     "--attachable", "--subnet", SWARM_SUBNET, SWARM_NET, timeout=60)
        bl.networks.append((bl.h1, SWARM_NET))
    bl.ensure_sleepers(SWARM_NET)


def _prepare(bl: BenchLab, mode: str) -> Tuple[str, str, Optional[float]]:
    """Make the vxnet network for this mode; returns (mode actually used, network, install seconds or None)."""
    if mode == "managed":
        try:
            install_s = install_managed(bl)
            log(f"managed plugin installed on both hosts in {install_s:.1f} s")
            _swarm_network(bl)
            return mode, SWARM_NET, install_s
        except Exception as exc:
            log(f"managed plugin unusable: {exc}")
            bl.remove_network(bl.h1, SWARM_NET)
            for host in bl.hosts:  # what the attempt left would share the host's identity in etcd
                if host.docker("plugin", "inspect", PLUGIN, check=False).returncode == 0:
                    host.docker("plugin", "disable", "-f", PLUGIN, check=False, timeout=30)
                    host.docker("plugin", "rm", "-f", PLUGIN, check=False, timeout=30)
            raise
    bl.ensure_vx()
    return mode, VX_NET, None


# plugin/http.py's debug line for every call that succeeded; in dockerd's log (managed plugin) it sits inside msg="...".
_CALL_TIME = re.compile(r"(NetworkDriver|IpamDriver)\.(\w+) ok in ([0-9.]+) ms")


def _plugin_log(bl: BenchLab, mode: str, host) -> str:
    """Where the plugin on host writes its lines: its own log (host process), or dockerd's (managed plugin)."""
    if mode == "managed":
        return os.path.join(host.dir, "logs", "dockerd.log")
    return bl.plugins[host.name].log_path


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _call_times(path: str, offset: int) -> Dict[str, List[float]]:
    """Durations (ms) per plugin call logged in path after offset."""
    out: Dict[str, List[float]] = {}
    with open(path, errors="replace") as f:
        f.seek(offset)
        for match in _CALL_TIME.finditer(f.read()):
            out.setdefault(match.group(2), []).append(float(match.group(3)))
    return out


def _measure(bl: BenchLab, count: int, host_index: int, vx_net: str) -> Dict[str, List[float]]:
    """Interleaved timings: vxnet, the built-in overlay, and the default bridge (the floor: no overlay at all)."""
    bl.endpoints(vx_net)  # the vxnet network carries traffic between the hosts before it is timed
    bl.endpoints(BUILTIN_NET)
    host = bl.hosts[host_index - 1]
    nets = [("vxnet", vx_net), ("builtin", BUILTIN_NET), ("bridge", "bridge")]
    cmd = lambda net: ["docker", "-H", host.docker_host, "run", "--rm", "--network", net, IMAGE, "true"]
    for _, net in nets:
        timed(cmd(net), timeout=120)  # warm-up, not counted
    times: Dict[str, List[float]] = {name: [] for name, _ in nets}
    for i in range(count):
        for name, net in (nets if i % 2 == 0 else nets[::-1]):
            times[name].append(timed(cmd(net), timeout=120))
        log(f"docker run {i + 1}/{count}: " + ", ".join(f"{name} {times[name][-1]:.2f} s" for name, _ in nets))
    return times


def run_part(bl: BenchLab, count: int, mode: str, host_index: int) -> Dict[str, object]:
    """mode: managed, process, or both (process first, while the host-process plugins of parts 1-2 still run)."""
    bl.ensure_builtin()
    results = []
    for wanted in (("process", "managed") if mode == "both" else (mode,)):
        note = ""
        try:
            used, vx_net, install_s = _prepare(bl, wanted)
        except Exception as exc:
            if wanted != "managed":
                raise
            note = f"managed plugin unusable ({exc}); measured with the host-process plugin instead"
            if mode == "both":
                results.append({"mode": "managed", "note": note, "error": str(exc)})
                continue
            used, vx_net, install_s = _prepare(bl, "process")
        plugin_log = _plugin_log(bl, used, bl.hosts[host_index - 1])
        offset = _size(plugin_log)
        times = _measure(bl, count, host_index, vx_net)
        calls = {} if bl.quiet_plugin else _call_times(plugin_log, offset)
        medians = {name: median(values) for name, values in times.items()}
        results.append({
            "mode": used, "note": note, "vxnet_network": vx_net, "plugin_install_s": install_s,
            "times_s": {name: [round(t, 3) for t in values] for name, values in times.items()},
            "median_s": medians, "ratio": ratio(medians["vxnet"], medians["builtin"]),
            "plugin_calls_ms": {call: {"count": len(v), "median": round(median(v), 1), "max": round(max(v), 1)}
                                for call, v in sorted(calls.items())},
        })
    return {"host": bl.hosts[host_index - 1].name, "runs": count, "results": results}


_KINDS = {"managed": "managed plugin vxnet:latest, swarm-scoped attachable network",
          "process": "host-process plugin (legacy socket), local-scope network with -o overlay"}


def report(s: Dict[str, object]) -> List[str]:
    lines = [f"Container start, `docker run --rm --network N busybox true` on {s['host']}, median of {s['runs']} "
             "(builtin: Swarm overlay, attachable; bridge: Docker's default bridge, for reference)"]
    for r in s["results"]:
        lines.append(f"  vxnet as {_KINDS[r['mode']]}:")
        if r["note"]:
            lines.append(f"    NOTE: {r['note']}")
        if "error" in r:
            continue
        for name, values in r["times_s"].items():
            lines.append(f"    {name:8s} {fmt(r['median_s'][name])} s  ({', '.join(f'{t:.2f}' for t in values)})")
        lines.append(f"    vxnet/builtin {fmt(r['ratio'])}x   (target <= 0.8x: {verdict(r['ratio'], 0.8, False)})")
        if r.get("plugin_calls_ms"):
            lines.append("    plugin calls during the timed runs, as the plugin logs them (ms, median/max/count): "
                         + ", ".join(f"{call} {t['median']}/{t['max']}/{t['count']}"
                                     for call, t in r["plugin_calls_ms"].items()))
        if r["plugin_install_s"] is not None:
            lines.append(f"    (installing the managed plugin on both hosts took {r['plugin_install_s']:.0f} s, "
                         "not part of the times above)")
    return lines
