"""A real distribution registry (Debian's docker-registry) for tests, inside the simulated underlay: started with a
config file of its own (storage in its folder, plain HTTP on one address of the underlay's namespace), health
polled with a deadline, stopped by PID. The simulated hosts' dockerds trust it (hosts.REGISTRY_ADDR is in their
--insecure-registry), so `docker plugin push/install/upgrade` reach it exactly as they would reach Docker Hub.

    registry = Registry(folder, netns_pid=lab.underlay.anchor.pid).start()
    registry.addr                        # "192.168.251.1:5000"
    registry.blob_bytes()                # what the pushed plugins take in its storage
    registry.stop()
"""

import os
from typing import List, Optional

from tests.harness.proc import HarnessError, Proc, run, wait_until

REGISTRY = "/usr/bin/docker-registry"

# http.addr: the underlay's own address (tests/harness/hosts.py UNDERLAY_GW, where the test etcd listens too);
# no proxy, no auth, no TLS: the hosts' dockerds are told it is insecure. delete: so storage can be inspected
# and cleaned like any registry an operator runs.
_CONFIG = """version: 0.1
log:
  level: info
  formatter: text
storage:
  filesystem:
    rootdirectory: {data}
  delete:
    enabled: true
http:
  addr: {addr}
  headers:
    X-Content-Type-Options: [nosniff]
health:
  storagedriver:
    enabled: true
    interval: 10s
    threshold: 3
"""


class Registry:
    def __init__(self, folder: str, host: str, port: int = 5000, netns_pid: Optional[int] = None):
        self.dir = folder
        self.host = host
        self.port = port
        self.netns_pid = netns_pid
        self.proc: Optional[Proc] = None

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def data(self) -> str:
        return os.path.join(self.dir, "data")

    @property
    def log_path(self) -> str:
        return os.path.join(self.dir, "registry.log")

    def _prefix(self) -> List[str]:
        return ["nsenter", "-t", str(self.netns_pid), "-n", "--"] if self.netns_pid else []

    def start(self, timeout: float = 30.0) -> "Registry":
        os.makedirs(self.data, exist_ok=True)
        config = os.path.join(self.dir, "config.yml")
        with open(config, "w") as f:
            f.write(_CONFIG.format(data=self.data, addr=self.addr))
        # Its own environment: no proxy variables of this machine's may send anything elsewhere.
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
        self.proc = Proc.spawn(self._prefix() + [REGISTRY, "serve", config], name=f"registry {self.addr}",
                               log_path=self.log_path, env=env)
        try:
            wait_until(lambda: not self.proc.alive() or self.healthy(), timeout, f"the registry at {self.addr}",
                       interval=0.1)
        except TimeoutError:
            self.stop()
            raise HarnessError(f"registry at {self.addr} did not answer in {timeout:g}s:\n{self.log_tail()}")
        if not self.proc.alive():
            raise HarnessError(f"registry at {self.addr} exited {self.proc.returncode}:\n{self.log_tail()}")
        return self

    def healthy(self) -> bool:
        """GET /v2/ answers 200 (the distribution API's base: what `docker login` and every pull ask first)."""
        probe = ("import sys, urllib.request\n"
                 "sys.exit(0 if urllib.request.urlopen(sys.argv[1], timeout=1).status == 200 else 1)\n")
        proc = run(self._prefix() + ["python3", "-c", probe, f"http://{self.addr}/v2/"], check=False, timeout=10)
        return proc.returncode == 0

    def blob_bytes(self) -> int:
        """Bytes of every blob stored (layers and configs, each once however many tags refer to it)."""
        total = 0
        for root, _, files in os.walk(os.path.join(self.data, "docker", "registry", "v2", "blobs")):
            total += sum(os.path.getsize(os.path.join(root, name)) for name in files)
        return total

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None:
            self.proc.stop(timeout)
