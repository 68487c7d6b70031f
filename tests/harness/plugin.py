"""The vxnet plugin as a host process inside a simulated host: start, wait until it answers, stop, kill -9."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from typing import Dict, Iterator, Optional, Tuple

from tests.harness.etcd import tail
from tests.harness.hosts import Host
from tests.harness.proc import HarnessError, Proc, wait_until
from tests.harness.unixhttp import request

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOCKET = "/run/docker/plugins/vxnet.sock"  # so dockerd finds the driver as `vxnet`


class Plugin:
    """`python3 -m plugin` in one host, against the given etcd, advertising the host's underlay address.

    Every start appends to one log file (stderr and stdout), a header line per start; `log()` reads it.
    `env` adds or overrides environment settings (e.g. VXNET_LOG_LEVEL). `root` is the source tree the plugin
    runs from: this checkout, or VXNET_PLUGIN_ROOT when set (to try another tree against these tests).
    """

    def __init__(self, host: Host, etcd_endpoints: str, env: Optional[Dict[str, str]] = None,
                 socket: str = SOCKET, root: Optional[str] = None):
        self.host = host
        self.socket = socket
        self.root = root or os.environ.get("VXNET_PLUGIN_ROOT") or REPO
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "HOME": os.environ.get("HOME", "/root"),
            "PYTHONPATH": self.root,
            "PYTHONUNBUFFERED": "1",
            "VXNET_SOCKET": socket,
            "ETCD_ENDPOINTS": etcd_endpoints,
            "VXNET_ADVERTISE_ADDR": host.ip,
            "VXNET_SCOPE": "local",
            "VXNET_LOG_LEVEL": "debug",
            "VXNET_HOST_ID": host.name,
            "VXNET_STATE_DIR": os.path.join(host.dir, "vxnet"),  # /var/lib/vxnet is not bound per host
        }
        self.env.update(env or {})
        self.log_path = os.path.join(host.dir, "logs", "plugin.log")
        self.proc: Optional[Proc] = None
        self.starts = 0

    @property
    def socket_path(self) -> str:
        """The plugin's socket as seen from the root namespace."""
        return self.host.path(self.socket)

    def start(self, wait: bool = True, timeout: float = 30.0) -> "Plugin":
        if self.proc and self.proc.alive():
            raise HarnessError(f"{self.host.name}: plugin already runs (pid {self.proc.pid})")
        self.starts += 1
        with open(self.log_path, "a") as f:
            f.write(f"===== vxnet plugin start #{self.starts} at {time.strftime('%H:%M:%S')} =====\n")
        self.proc = self.host.spawn([sys.executable, "-m", "plugin"], "plugin", env=self.env,
                                    log_path=self.log_path, cwd=self.root)
        if wait:
            self.wait_ready(timeout)
        return self

    def answers(self) -> bool:
        """True when /Plugin.Activate on the socket replies 200 naming both drivers."""
        try:
            status, body = request(self.socket_path, "POST", "/Plugin.Activate", timeout=2)
        except OSError:
            return False
        if status != 200:
            return False
        implements = json.loads(body or b"{}").get("Implements", [])
        return "NetworkDriver" in implements and "IpamDriver" in implements

    def wait_ready(self, timeout: float = 30.0) -> None:
        try:
            wait_until(lambda: not self.proc.alive() or self.answers(), timeout,
                       f"the plugin in {self.host.name} to answer on {self.socket_path}", interval=0.1)
        except TimeoutError as exc:
            raise HarnessError(f"{exc}\n--- plugin log ---\n{self.log(60)}") from None
        if not self.proc.alive():
            raise HarnessError(f"{self.host.name}: plugin exited {self.proc.returncode} at start\n"
                               f"--- plugin log ---\n{self.log(60)}")

    def stop(self, timeout: float = 15.0) -> Optional[int]:
        """SIGTERM and wait (SIGKILL after timeout); returns the exit code (0 expected)."""
        return self.proc.stop(timeout) if self.proc else None

    def kill(self) -> None:
        """kill -9: no chance to clean up, as in a crash."""
        if self.proc:
            self.proc.send(signal.SIGKILL)
            self.proc.wait(10)

    def restart(self, timeout: float = 30.0) -> Optional[int]:
        """Stop (SIGTERM), start again, wait until it answers; returns the exit code of the stopped one."""
        code = self.stop()
        self.start(timeout=timeout)
        return code

    def alive(self) -> bool:
        return bool(self.proc and self.proc.alive())

    def freeze(self) -> None:
        """SIGSTOP: every thread of the plugin stops where it is (nothing reads its netlink sockets, nothing is
        repaired), the kernel queues the notifications for it. The PID is the plugin's own (nsenter execs it)."""
        if not self.proc or not self.proc.send(signal.SIGSTOP):
            raise HarnessError(f"{self.host.name}: no plugin to freeze")

    def thaw(self) -> None:
        """SIGCONT after freeze(): the plugin goes on, and reads what the kernel queued meanwhile."""
        if self.proc:
            self.proc.send(signal.SIGCONT)

    @contextlib.contextmanager
    def frozen(self) -> Iterator["Plugin"]:
        """The block runs with the plugin frozen; it is thawed afterwards whatever the block raised."""
        self.freeze()
        try:
            yield self
        finally:
            self.thaw()

    def log(self, lines: int = 200) -> str:
        return tail(self.log_path, lines)

    # -- the operator's command, run in this host with this plugin's settings ----------------------------------
    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """`vxnet ARGS` (python3 -m cli) inside the host, with the plugin's environment (its etcd, state dir,
        socket), from the tree the plugin runs from. Never raises on a non-zero exit: callers read returncode."""
        return self.host.run([sys.executable, "-m", "cli", *args], check=False, timeout=timeout, env=self.env,
                             cwd=self.root)

    def cli_json(self, *args: str, timeout: float = 60) -> Tuple[int, dict]:
        """`vxnet ARGS --json`: (exit status, the parsed output)."""
        done = self.cli(*args, "--json", timeout=timeout)
        try:
            return done.returncode, json.loads(done.stdout)
        except ValueError:
            raise HarnessError(f"vxnet {' '.join(args)} --json printed no JSON (exit {done.returncode}):\n"
                               f"{done.stdout}\n{done.stderr}") from None
