"""A 3-member etcd cluster, by default with TLS everywhere (clients and peers both present certificates of one
test CA) in the underlay namespace on the bridge's address, one port pair per member:

    m1  https://192.168.251.1:2479 (peers :2480)   m2  :2579 (:2580)   m3  :2679 (:2680)

(the session's single etcd keeps 2379/2380 on the same address); `EtcdCluster.loopback()` is one on 127.0.0.1,
plain HTTP, free ports, for code in the test process. Members are killed, frozen and started again by PID;
`leader()` asks each member's status who leads.
"""

import json
import os
import signal
from typing import Dict, List, Optional, Sequence

from tests.harness.etcd import ETCD, ETCDCTL, free_port, tail
from tests.harness.hosts import UNDERLAY_GW, Underlay
from tests.harness.proc import HarnessError, Proc, run, wait_until
from tests.harness.tls import CA

FIRST_CLIENT_PORT = 2479  # member i listens on FIRST_CLIENT_PORT + 100 * i for clients, + 1 for peers


class Member:
    def __init__(self, cluster: "EtcdCluster", index: int):
        self.cluster = cluster
        self.name = f"m{index + 1}"
        scheme = "https" if cluster.ca else "http"
        if cluster.first_port:
            port, peer = cluster.first_port + 100 * index, cluster.first_port + 100 * index + 1
        else:
            port, peer = free_port(cluster.host), free_port(cluster.host)
        self.url = f"{scheme}://{cluster.host}:{port}"
        self.peer_url = f"{scheme}://{cluster.host}:{peer}"
        self.dir = os.path.join(cluster.dir, self.name)
        self.proc: Optional[Proc] = None

    @property
    def log_path(self) -> str:
        return os.path.join(self.dir, "etcd.log")

    def spawn(self, state: str = "new") -> None:
        """Start the process (no wait: a member of a new cluster is healthy only once a quorum runs)."""
        if self.proc and self.proc.alive():
            return
        os.makedirs(self.dir, exist_ok=True)
        c = self.cluster
        argv = self.cluster.underlay_prefix() + [
            ETCD, "--name", self.name, "--data-dir", os.path.join(self.dir, "data"),
            "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
            "--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", ",".join(f"{m.name}={m.peer_url}" for m in c.members),
            "--initial-cluster-state", state, "--initial-cluster-token", "vxnet-test-cluster",
            "--logger", "zap", "--log-outputs", "stderr", *c.timing,
        ]
        if c.ca:
            argv += ["--cert-file", c.server_cert, "--key-file", c.server_key,
                     "--client-cert-auth", "--trusted-ca-file", c.ca.path,
                     "--peer-cert-file", c.server_cert, "--peer-key-file", c.server_key,
                     "--peer-client-cert-auth", "--peer-trusted-ca-file", c.ca.path]
        self.proc = Proc.spawn(argv, name=f"etcd {self.name} {self.url}", log_path=self.log_path)

    def etcdctl(self, *args: str, check: bool = True, timeout: float = 10.0):
        return self.cluster.etcdctl(self.url, *args, check=check, timeout=timeout)

    def healthy(self) -> bool:
        return bool(self.proc and self.proc.alive()) and \
            self.etcdctl("endpoint", "health", "--command-timeout=1s", check=False, timeout=5).returncode == 0

    def status(self) -> Optional[dict]:
        """This member's own view (etcdctl endpoint status: its member ID and the leader's), None if it does
        not answer."""
        done = self.etcdctl("endpoint", "status", "-w", "json", "--command-timeout=2s", check=False, timeout=6)
        if done.returncode != 0:
            return None
        status = json.loads(done.stdout)[0]["Status"]
        return {"id": int(status["header"]["member_id"]), "leader": int(status["leader"])}

    def kill(self) -> None:
        """kill -9, as a crash; the data dir stays for start()."""
        if self.proc:
            self.proc.send(signal.SIGKILL)
            if not self.proc.wait(10):
                raise HarnessError(f"etcd {self.name} (pid {self.proc.pid}) did not die of SIGKILL")

    def freeze(self) -> None:
        """SIGSTOP: the member holds its connections open and answers nothing, as a hung machine does."""
        if not self.proc or not self.proc.send(signal.SIGSTOP):
            raise HarnessError(f"etcd {self.name}: nothing to freeze")

    def thaw(self) -> None:
        if self.proc:
            self.proc.send(signal.SIGCONT)

    def start(self, timeout: float = 30.0) -> None:
        """Start a member that ran before (its data dir knows the cluster) and wait until it is healthy."""
        self.spawn(state="existing")
        wait_until(lambda: not self.proc.alive() or self.healthy(), timeout, f"etcd {self.name} to rejoin")
        if not self.proc.alive():
            raise HarnessError(f"etcd {self.name} exited {self.proc.returncode}:\n{tail(self.log_path)}")

    def stop(self) -> None:
        if self.proc:
            self.proc.send(signal.SIGCONT)  # a frozen process cannot act on SIGTERM
            self.proc.stop(10)


class EtcdCluster:
    """Three members of one cluster, with TLS: client certificates for clients and peers.

    Files (in folder): ca.pem, ca-server(.pem, -key.pem) for every member (SAN: the members' address),
    ca-client(...) for vxnet and etcdctl. `env()` is what a plugin needs to use the cluster.
    Defaults: etcd's own timing (100 ms heartbeats, 1 s election timeout), as an operator's cluster has."""

    def __init__(self, underlay: Optional[Underlay], folder: str, size: int = 3, host: str = UNDERLAY_GW,
                 first_port: Optional[int] = FIRST_CLIENT_PORT, tls: bool = True, timing: Sequence[str] = ()):
        self.underlay = underlay
        self.dir = folder
        self.host = host
        self.first_port = first_port
        self.timing = list(timing)
        os.makedirs(folder, exist_ok=True)
        self.ca = CA(folder) if tls else None
        if self.ca:
            self.server_cert, self.server_key = self.ca.issue("server", server=True, ips=[host])
            self.client_cert, self.client_key = self.ca.issue("client", server=False)
        self.members: List[Member] = []
        self.members = [Member(self, i) for i in range(size)]

    @classmethod
    def loopback(cls, folder: str) -> "EtcdCluster":
        """On 127.0.0.1 in this namespace, plain HTTP, free ports, 50 ms heartbeats and a 300 ms election
        timeout (nothing else shares the loopback's latency: a short timeout only makes the test faster)."""
        return cls(None, folder, host="127.0.0.1", first_port=None, tls=False,
                   timing=["--heartbeat-interval", "50", "--election-timeout", "300"])

    def underlay_prefix(self) -> List[str]:
        return ["nsenter", "-t", str(self.underlay.anchor.pid), "-n", "--"] if self.underlay else []

    def endpoints(self, first: int = 0) -> str:
        """Every member's client URL, starting with member `first` (vxnet asks the first one first)."""
        urls = [m.url for m in self.members]
        return ",".join(urls[first:] + urls[:first])

    def env(self, first: int = 0) -> Dict[str, str]:
        """A plugin's settings for this cluster: ETCD_ENDPOINTS from member `first` on, the TLS files."""
        env = {"ETCD_ENDPOINTS": self.endpoints(first)}
        if self.ca:
            env.update(ETCD_CA_FILE=self.ca.path, ETCD_CERT_FILE=self.client_cert, ETCD_KEY_FILE=self.client_key)
        return env

    def etcdctl(self, endpoints: str, *args: str, check: bool = True, timeout: float = 10.0):
        env = dict(os.environ, ETCDCTL_API="3")
        tls = ["--cacert", self.ca.path, "--cert", self.client_cert, "--key", self.client_key] if self.ca else []
        return run(self.underlay_prefix() + [ETCDCTL, "--endpoints", endpoints, *tls, *args], timeout=timeout,
                   check=check, env=env)

    def start(self, timeout: float = 60.0) -> "EtcdCluster":
        for member in self.members:
            member.spawn()
        try:
            wait_until(lambda: all(m.healthy() for m in self.members) or any(not m.proc.alive() for m in self.members),
                       timeout, "the 3 etcd members to be healthy", interval=0.2)
        except TimeoutError:
            raise HarnessError("etcd cluster not healthy:\n" + self.logs()) from None
        dead = [m.name for m in self.members if not m.proc.alive()]
        if dead:
            raise HarnessError(f"etcd {', '.join(dead)} exited at start:\n" + self.logs())
        return self

    def leader(self) -> Member:
        """The member every answering member names as leader (polled: right after a change they may differ)."""
        def agreed():
            views = {m.name: m.status() for m in self.members if m.proc and m.proc.alive()}
            leaders = {v["leader"] for v in views.values() if v}
            if len(leaders) != 1 or None in views.values():
                return None
            ids = {v["id"]: name for name, v in views.items()}
            return ids.get(leaders.pop())
        name = wait_until(agreed, 20, "the etcd members to agree on a leader", interval=0.2)
        return next(m for m in self.members if m.name == name)

    def logs(self, lines: int = 15) -> str:
        return "\n".join(f"--- {m.name} ---\n{tail(m.log_path, lines)}" for m in self.members)

    def stop(self) -> None:
        for member in self.members:
            member.stop()
