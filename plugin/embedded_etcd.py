"""The embedded store: a single-member etcd on loopback, started and supervised by the plugin when no
ETCD_ENDPOINTS are given, with its data under <state dir>/etcd so it survives plugin restarts."""

import logging
import os
import shutil
import subprocess
import threading
from typing import List, Optional

from wire.errors import ConfigError

log = logging.getLogger(__name__)


class EmbeddedEtcd:
    def __init__(self, data_dir: str, port: int, binary: str = "etcd"):
        self.data_dir = data_dir
        self.port = port
        self.binary = binary
        self.url = f"http://127.0.0.1:{port}"
        self._proc: Optional[subprocess.Popen] = None
        self._stopping = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _argv(self) -> List[str]:
        peer = f"http://127.0.0.1:{self.port + 1}"
        return [
            self.binary, "--name", "vxnet", "--data-dir", self.data_dir,
            "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"vxnet={peer}",
            # Keep the store small: vxnet writes little, and an embedded store must not grow without bound.
            "--auto-compaction-retention", "1", "--quota-backend-bytes", str(256 * 1024 * 1024),
        ]

    def _spawn(self) -> None:
        os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        log_path = os.path.join(os.path.dirname(self.data_dir), "etcd.log")
        with open(log_path, "ab") as out:
            # A clean environment: etcd reads ETCD_* variables as flags, and ours (ETCD_ENDPOINTS) are not its.
            self._proc = subprocess.Popen(self._argv(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env={"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")})
        log.info("embedded etcd started pid=%d url=%s data=%s", self._proc.pid, self.url, self.data_dir)

    def start(self) -> str:
        if shutil.which(self.binary) is None:
            raise ConfigError(f"ETCD_ENDPOINTS is empty, so vxnet runs its embedded etcd, but {self.binary!r} "
                              "is not installed (apt-get install etcd-server), or set ETCD_ENDPOINTS")
        self._spawn()
        self._thread = threading.Thread(target=self._supervise, name="etcd-supervisor", daemon=True)
        self._thread.start()
        return self.url

    def _supervise(self) -> None:
        backoff = 0.5
        while not self._stopping.is_set():
            code = self._proc.wait()
            if self._stopping.is_set():
                return
            log.error("embedded etcd exited with %s; restarting in %.1f s", code, backoff)
            if self._stopping.wait(backoff):
                return
            backoff = min(backoff * 2, 10.0)
            self._spawn()

    def stop(self) -> None:
        self._stopping.set()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
