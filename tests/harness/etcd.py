"""A real etcd for tests: its own data dir and ports, health polled with a deadline, stopped by PID."""

import os
import shutil
import socket
import tempfile
from typing import List, Optional, Union

from tests.harness.proc import HarnessError, Proc, run, wait_until

ETCD = "/usr/bin/etcd"
ETCDCTL = "/usr/bin/etcdctl"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (another process may still take it: start() retries)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EtcdServer:
    """One single-member etcd.

    data_dir: where its data and log go (default: a temporary folder, which close() removes).
    host: the address it listens on (loopback by default); ports are free ones unless given.
    netns_pid: run it, and every etcdctl call, inside the network namespace of that process (the simulated
    hosts' underlay), where fixed ports are free anyway.
    stop()/start() keep the ports and the data dir, so a test can take etcd away and bring the same one back;
    pause()/resume() are those two under the names a failure test reads best with.
    """

    def __init__(self, data_dir: Optional[Union[str, os.PathLike]] = None, host: str = "127.0.0.1",
                 client_port: Optional[int] = None, peer_port: Optional[int] = None,
                 netns_pid: Optional[int] = None, name: str = "vxnet-test"):
        self.host = host
        self.netns_pid = netns_pid
        self.name = name
        self._fixed_ports = client_port is not None
        self.client_port = client_port or 0
        self.peer_port = peer_port or 0
        self._own_dir = data_dir is None
        self.dir = os.fspath(data_dir) if data_dir is not None else tempfile.mkdtemp(prefix="vxnet-etcd-")
        self.proc: Optional[Proc] = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.client_port}"

    @property
    def log_path(self) -> str:
        return os.path.join(self.dir, "etcd.log")

    def _prefix(self) -> List[str]:
        return ["nsenter", "-t", str(self.netns_pid), "-n", "--"] if self.netns_pid else []

    def _argv(self) -> List[str]:
        peer = f"http://{self.host}:{self.peer_port}"
        return self._prefix() + [
            ETCD, "--name", self.name, "--data-dir", os.path.join(self.dir, "data"),
            "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"{self.name}={peer}", "--initial-cluster-state", "new",
            "--logger", "zap", "--log-outputs", "stderr",
            # One member: no peer to wait for, so a short election timeout only makes start-up faster.
            "--heartbeat-interval", "50", "--election-timeout", "300",
        ]

    def start(self, timeout: float = 30.0) -> "EtcdServer":
        """Start (or start again) and wait until it answers a health check."""
        if self.proc and self.proc.alive():
            return self
        attempts = 1 if self._fixed_ports or self.client_port else 3
        for attempt in range(attempts):
            if not self.client_port:
                self.client_port, self.peer_port = free_port(), free_port()
            elif not self.peer_port:
                self.peer_port = free_port()
            self.proc = Proc.spawn(self._argv(), name=f"etcd {self.url}", log_path=self.log_path)
            try:
                wait_until(lambda: self._exited() or self.healthy(), timeout, f"etcd at {self.url} to be healthy",
                           interval=0.1)
            except TimeoutError:
                self.proc.kill()
                raise HarnessError(f"etcd at {self.url} not healthy in {timeout:g}s; log:\n{self.log_tail()}")
            if not self._exited():
                return self
            if attempt + 1 < attempts and "address already in use" in self.log_tail():
                self.client_port = self.peer_port = 0  # someone took a port between our probe and etcd's bind
                continue
            break
        raise HarnessError(f"etcd at {self.url} exited with {self.proc.returncode}; log:\n{self.log_tail()}")

    def _exited(self) -> bool:
        return self.proc is not None and not self.proc.alive()

    def healthy(self) -> bool:
        if not self.proc or not self.proc.alive():
            return False
        return self.etcdctl("endpoint", "health", "--command-timeout=1s", check=False, timeout=5).returncode == 0

    def stop(self, timeout: float = 10.0) -> None:
        """Stop it (SIGTERM, then SIGKILL); ports and data dir are kept for start()."""
        if self.proc:
            self.proc.stop(timeout)

    pause = stop
    resume = start

    def close(self) -> None:
        """Stop for good and remove the data dir if this object made it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def etcdctl(self, *args: str, check: bool = True, timeout: float = 15.0, input: Optional[str] = None):
        env = dict(os.environ, ETCDCTL_API="3")
        return run(self._prefix() + [ETCDCTL, "--endpoints", self.url, *args], timeout=timeout, check=check,
                   input=input, env=env)

    def keys(self, prefix: str = "/") -> List[str]:
        """Every key under prefix, sorted."""
        out = self.etcdctl("get", "--prefix", "--keys-only", prefix).stdout
        return sorted(line for line in out.splitlines() if line)

    def get(self, key: str) -> Optional[str]:
        out = self.etcdctl("get", "--print-value-only", key).stdout
        return out[:-1] if out.endswith("\n") else (out or None)

    def put(self, key: str, value: str) -> None:
        self.etcdctl("put", key, "--", value)

    def delete_prefix(self, prefix: str) -> None:
        if not prefix.startswith("/") or prefix == "/":
            raise ValueError(f"refusing to delete {prefix!r}: name a prefix of your own")
        self.etcdctl("del", "--prefix", prefix)

    def to_state(self) -> dict:
        return {"host": self.host, "client_port": self.client_port, "peer_port": self.peer_port,
                "dir": self.dir, "netns_pid": self.netns_pid, "own_dir": self._own_dir,
                "proc": self.proc.to_state() if self.proc else None}

    @classmethod
    def from_state(cls, state: dict) -> "EtcdServer":
        server = cls(state["dir"], state["host"], state["client_port"], state["peer_port"], state["netns_pid"])
        server._own_dir = state["own_dir"]
        server.proc = Proc.from_state(state["proc"]) if state["proc"] else None
        return server

    def log_tail(self, lines: int = 30) -> str:
        return tail(self.log_path, lines)


def tail(path: str, lines: int = 50) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 200 * lines))
            text = f.read().decode(errors="replace")
    except FileNotFoundError:
        return f"({path} does not exist)"
    return "\n".join(text.splitlines()[-lines:])

