"""Shared by the benchmark parts: statistics, commands inside a network namespace, background processes.

Every command has a time-out; every background process is a harness Proc (stopped by PID, never by name).
"""

import math
import os
import re
import statistics
import subprocess
import time
from typing import Dict, List, Optional, Sequence

from tests.harness.hosts import Host
from tests.harness.proc import Proc, run, wait_until


class BenchError(RuntimeError):
    """A benchmark step that could not be carried out (the run goes on with the next part)."""


# --- statistics ---------------------------------------------------------------------------------------------------
def median(values: Sequence[float]) -> Optional[float]:
    return statistics.median(values) if values else None


def percentile(values: Sequence[float], pct: float) -> Optional[float]:
    """Nearest-rank percentile (p99 of 100 samples is the 99th smallest)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100.0 * len(ordered)) - 1)]


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def fmt(value: Optional[float], spec: str = ".2f", unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{unit}"


def verdict(value: Optional[float], target: float, higher_is_better: bool) -> str:
    if value is None:
        return "n/a"
    ok = value >= target if higher_is_better else value <= target
    return "meets target" if ok else "MISSES target"


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


# --- network namespaces -------------------------------------------------------------------------------------------
def netns_of(pid: int) -> List[str]:
    """The prefix that runs a command of this machine in the network namespace of `pid` (a container's or a
    simulated host's): only the network namespace is entered, so the binaries are ours (busybox has no iperf3)."""
    return ["nsenter", "-t", str(pid), "-n", "--"]


def container_pid(host: Host, container: str) -> int:
    pid = int(host.docker("inspect", "-f", "{{.State.Pid}}", container).stdout.strip())
    if pid <= 0:
        raise BenchError(f"{container} on {host.name} is not running")
    return pid


def mtu(pid: int, ifname: str = "eth0") -> Optional[int]:
    out = run(netns_of(pid) + ["ip", "-o", "link", "show", "dev", ifname], check=False, timeout=10).stdout
    found = re.search(r"\bmtu (\d+)", out)
    return int(found.group(1)) if found else None


def ping_once(pid: int, target: str) -> bool:
    return run(netns_of(pid) + ["ping", "-n", "-q", "-c", "1", "-W", "1", target], check=False,
               timeout=10).returncode == 0


def wait_reachable(pid: int, target: str, what: str, timeout: float = 20.0) -> None:
    try:
        wait_until(lambda: ping_once(pid, target), timeout, what, interval=0.2)
    except TimeoutError as exc:
        raise BenchError(str(exc)) from None


def listening(pid: int, port: int) -> bool:
    out = run(netns_of(pid) + ["ss", "-Hltn", f"sport = :{port}"], check=False, timeout=10).stdout
    return bool(out.strip())


class Background:
    """Processes this run started and must stop, by PID, newest first."""

    def __init__(self, log_dir: str):
        self.log_dir = log_dir
        self.procs: List[Proc] = []

    def spawn(self, argv: Sequence[str], name: str) -> Proc:
        os.makedirs(self.log_dir, exist_ok=True)
        log = self.log_path(name)
        if os.path.exists(log):
            os.remove(log)  # the previous run's
        proc = Proc.spawn(argv, name=name, log_path=log)
        self.procs.append(proc)
        return proc

    def log_path(self, name: str) -> str:
        return os.path.join(self.log_dir, re.sub(r"[^A-Za-z0-9_.-]+", "_", name) + ".log")

    def stop(self, proc: Proc) -> None:
        proc.stop(5)
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> List[str]:
        errors = []
        for proc in reversed(list(self.procs)):
            try:
                self.stop(proc)
            except Exception as exc:  # keep stopping the others
                errors.append(f"stop {proc.name}: {exc}")
        return errors


def timed(argv: Sequence[str], timeout: float, env: Optional[Dict[str, str]] = None) -> float:
    """Wall-clock seconds of one command that must succeed."""
    started = time.monotonic()
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, env=env)
    elapsed = time.monotonic() - started
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}")
    return elapsed

