"""Simulated Docker hosts on one machine:

    underlay namespace:  br0 192.168.251.1/24  (+ the test etcd on 192.168.251.1:2379)
        |-- u1 <veth> eth0 192.168.251.11/24   host1: own netns, mount ns, UTS ns, dockerd
        |-- u2 <veth> eth0 192.168.251.12/24   host2
        ...

Each namespace is held by an anchor process (`sleep infinity` under `unshare`), so everything is found and
removed by PID, never by name: when the anchors and what we started inside are gone, the kernel frees the
namespaces and the mounts in them. Nothing is named in the root namespace; the underlay subnet exists only on
these bridges, and the hosts have no default route, so no packet can leave the machine.

Each host's mount namespace binds per-host folders over /run, /var/lib/docker, /etc/docker and /etc/resolv.conf,
mounts a fresh sysfs (cgroups kept) and is then made rshared. Paths under those binds are also reachable from
the root namespace through `Host.path()`: dockerd's socket, for one, so `Host.docker()` runs the docker CLI here.

Teardown order: containers, custom networks (while the plugin still answers), processes started in the host
(the plugin), dockerd, anything else left in the host's namespaces, the anchors, the underlay, the folders.
"""

import atexit
import concurrent.futures
import ipaddress
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from typing import Callable, Dict, Iterable, List, Optional, Sequence

from tests.harness import images
from tests.harness.etcd import EtcdServer, tail
from tests.harness.proc import (
    Command,
    HarnessError,
    Proc,
    kill_namespace,
    namespace_id,
    run,
    wait_until,
)
from tests.harness.unixhttp import request

UNDERLAY = ipaddress.ip_network("192.168.251.0/24")  # exists only on our underlay bridges
UNDERLAY_GW = "192.168.251.1"  # the bridge's own address: etcd listens here, resolv.conf points here
HOST_OFFSET = 10  # host N is 192.168.251.(10 + N)
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
# Where tests run a distribution registry (tests/harness/registry.py), on the underlay's own address like etcd.
# Every dockerd trusts it over plain HTTP (--insecure-registry); nothing listens there unless a test starts it.
REGISTRY_PORT = 5000
REGISTRY_ADDR = f"{UNDERLAY_GW}:{REGISTRY_PORT}"
# dockerd's own pools (docker0, docker_gwbridge, local networks) and a Swarm pool for `docker swarm init
# --default-addr-pool`: 10.128.0.0-10.191.255.255 between them, so tests' vxnet subnets go in 10.200.0.0/13
# (10.200-10.207) and nothing they make can overlap the underlay or each other.
LOCAL_ADDR_POOL = "10.128.0.0/11"
SWARM_ADDR_POOL = "10.160.0.0/11"
TEST_SUBNETS = ipaddress.ip_network("10.200.0.0/13")

DOCKERD = "/usr/sbin/dockerd"
NSENTER = "nsenter"

# Paths bound per host, and the folder under the host's directory behind each.
BINDS = {"/run": "run", "/var/lib/docker": "docker-lib", "/etc/docker": "docker-etc"}

# Runs as the host's anchor, inside fresh net, mount and UTS namespaces with private propagation.
# resolv.conf is bound first, while a symlinked /etc/resolv.conf still resolves through the machine's /run.
_HOST_SETUP = r"""
set -eu
dir=$1 name=$2
mount --bind "$dir/resolv.conf" /etc/resolv.conf
mkdir -p /var/lib/docker /etc/docker
mount --bind "$dir/run" /run
mount --bind "$dir/docker-lib" /var/lib/docker
mount --bind "$dir/docker-etc" /etc/docker
mount --rbind /sys/fs/cgroup "$dir/cgroup"
mount -t sysfs sysfs /sys
mount --move "$dir/cgroup" /sys/fs/cgroup
mount --make-rshared /
hostname "$name"
echo ready > "$dir/anchor.ready"
exec sleep infinity
"""


def _sysctl(values: Dict[str, str]) -> List[str]:
    # -e: a key that does not exist here (br_netfilter not loaded) is no error.
    return ["sysctl", "-q", "-e", "-w"] + [f"{k}={v}" for k, v in values.items()]


def _spawn_anchor(argv: Sequence[str], name: str, log_path: str) -> Proc:
    anchor = Proc.spawn(argv, name=name, log_path=log_path)
    try:
        wait_until(lambda: not anchor.alive() or namespace_id(anchor.pid, "net") != namespace_id("self", "net"),
                   10, f"{name} to enter its namespaces")
    except TimeoutError:
        anchor.kill()
        raise
    if not anchor.alive():
        raise HarnessError(f"{name} exited {anchor.returncode}: {tail(log_path)}")
    return anchor


class Underlay:
    """The underlay bridge in its own network namespace, and optionally the test etcd on its address."""

    def __init__(self, workdir: str, mtu: int = 1500):
        """mtu: of the bridge and of every host's link to it (both ends): 1500, Ethernet's, or a jumbo underlay
        (the benchmark's 9000-byte one, where vxnet's automatic MTU gives its networks 8950)."""
        self.dir = workdir
        self.mtu = mtu
        self.anchor: Optional[Proc] = None
        self.etcd: Optional[EtcdServer] = None

    def start(self) -> "Underlay":
        os.makedirs(self.dir, exist_ok=True)
        self.anchor = _spawn_anchor(["unshare", "--net", "--", "sleep", "infinity"], "underlay anchor",
                                    os.path.join(self.dir, "anchor.log"))
        self.run(_sysctl({"net.ipv4.ip_forward": "0", "net.ipv6.conf.all.disable_ipv6": "1",
                          "net.ipv6.conf.default.disable_ipv6": "1",
                          "net.bridge.bridge-nf-call-iptables": "0", "net.bridge.bridge-nf-call-ip6tables": "0"}))
        self.run(["ip", "-batch", "-"], input="\n".join([
            "link set lo up",
            f"link add br0 mtu {self.mtu} type bridge",
            f"addr add {UNDERLAY_GW}/{UNDERLAY.prefixlen} dev br0",
            "link set br0 up",
        ]) + "\n")
        return self

    def run(self, argv: Sequence[str], check: bool = True, timeout: float = 30,
            input: Optional[str] = None) -> subprocess.CompletedProcess:
        """Run a command in the underlay's network namespace."""
        return run([NSENTER, "-t", str(self.anchor.pid), "-n", "--", *argv], timeout=timeout, check=check,
                   input=input)

    def start_etcd(self) -> EtcdServer:
        self.etcd = EtcdServer(host=UNDERLAY_GW, client_port=ETCD_CLIENT_PORT, peer_port=ETCD_PEER_PORT,
                               data_dir=os.path.join(self.dir, "etcd"), netns_pid=self.anchor.pid)
        os.makedirs(self.etcd.dir, exist_ok=True)
        return self.etcd.start()

    def attach(self, host: "Host") -> None:
        """A veth from br0 (port u<N>) to the host's eth0, made here and pushed into the host in one call.

        A port left by an earlier host N (the kernel frees a dead namespace's links asynchronously) is ours:
        it is deleted first."""
        port = f"u{host.index}"
        if self.run(["ip", "link", "show", port], check=False).returncode == 0:
            self.run(["ip", "link", "del", port], check=False)
            wait_until(lambda: self.run(["ip", "link", "show", port], check=False).returncode != 0, 10,
                       f"the old underlay port {port} to go")
        self.run(["ip", "-batch", "-"], input="\n".join([
            f"link add {port} mtu {self.mtu} type veth peer name eth0 mtu {self.mtu} netns {host.anchor.pid}",
            f"link set {port} master br0 up",
        ]) + "\n")

    def teardown(self) -> List[str]:
        errors = []
        if self.etcd:
            try:
                self.etcd.stop()
            except Exception as exc:
                errors.append(f"underlay etcd: {exc}")
        if self.anchor:
            try:
                ns = namespace_id(self.anchor.pid, "net") if self.anchor.alive() else None
                if ns:
                    kill_namespace("net", ns, spare=[self.anchor.pid])
                self.anchor.kill()
            except Exception as exc:
                errors.append(f"underlay anchor: {exc}")
        return errors

    def to_state(self) -> dict:
        return {"dir": self.dir, "anchor": self.anchor.to_state() if self.anchor else None,
                "etcd": self.etcd.to_state() if self.etcd else None}

    @classmethod
    def from_state(cls, state: dict) -> "Underlay":
        underlay = cls(state["dir"])
        underlay.anchor = Proc.from_state(state["anchor"]) if state["anchor"] else None
        underlay.etcd = EtcdServer.from_state(state["etcd"]) if state["etcd"] else None
        return underlay


class Host:
    """One simulated Docker host: its namespaces, its folders, its dockerd, and what tests start in it."""

    def __init__(self, index: int, workdir: str, name: Optional[str] = None):
        self.index = index
        self.name = name or f"host{index}"
        self.ip = str(UNDERLAY.network_address + HOST_OFFSET + index)
        self.dir = workdir
        self.anchor: Optional[Proc] = None
        self.dockerd: Optional[Proc] = None
        self.procs: List[Proc] = []  # started in this host by spawn(), stopped before dockerd
        self._lock = threading.Lock()

    # --- paths -------------------------------------------------------------------------------------------------
    def path(self, inside: str) -> str:
        """The root-namespace path of a path inside the host (only for paths under a per-host bind)."""
        for mount, folder in BINDS.items():
            if inside == mount or inside.startswith(mount + "/"):
                return os.path.join(self.dir, folder) + inside[len(mount):]
        if inside.startswith("/var/run/"):
            return self.path(inside[len("/var"):])
        raise ValueError(f"{inside} is not under a per-host bind ({', '.join(BINDS)})")

    @property
    def docker_socket(self) -> str:
        return self.path("/run/docker.sock")

    @property
    def docker_host(self) -> str:
        """DOCKER_HOST for this host's daemon, usable from the root namespace."""
        return f"unix://{self.docker_socket}"

    @property
    def nsenter(self) -> List[str]:
        """The command prefix that enters this host's namespaces."""
        return [NSENTER, "-t", str(self.anchor.pid), "-m", "-u", "-n"]

    # --- lifecycle ---------------------------------------------------------------------------------------------
    def start(self, underlay: Underlay, docker: bool = True) -> "Host":
        os.makedirs(self.dir, exist_ok=True)
        for folder in list(BINDS.values()) + ["cgroup", "logs", "vxnet"]:
            os.makedirs(os.path.join(self.dir, folder), exist_ok=True)
        with open(os.path.join(self.dir, "resolv.conf"), "w") as f:
            f.write(f"nameserver {UNDERLAY_GW}\n")  # inside the test network: nothing there answers
        script = os.path.join(self.dir, "anchor.sh")
        with open(script, "w") as f:
            f.write(_HOST_SETUP)
        ready = os.path.join(self.dir, "anchor.ready")
        log = os.path.join(self.dir, "logs", "anchor.log")
        self.anchor = _spawn_anchor(
            ["unshare", "--net", "--mount", "--uts", "--propagation", "private", "--", "sh", script, self.dir,
             self.name], f"{self.name} anchor", log)
        wait_until(lambda: os.path.exists(ready) or not self.anchor.alive(), 10, f"{self.name} mounts")
        if not self.anchor.alive():
            raise HarnessError(f"{self.name}: namespace setup failed: {tail(log)}")
        underlay.attach(self)
        self.run(_sysctl({"net.ipv4.ip_forward": "1", "net.ipv4.conf.all.rp_filter": "0",
                          "net.ipv4.conf.default.rp_filter": "0"}))
        self.run(["ip", "-batch", "-"], input="\n".join([
            "link set lo up",
            f"addr add {self.ip}/{UNDERLAY.prefixlen} dev eth0",
            "link set eth0 up",
        ]) + "\n")
        if docker:
            self.start_dockerd()
        return self

    def start_dockerd(self, timeout: float = 60) -> None:
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
               "DOCKER_SERVICE_PREFER_OFFLINE_IMAGE": "1"}
        argv = self.nsenter + ["--", DOCKERD, "--host", "unix:///run/docker.sock", "--pidfile", "/run/docker.pid",
                               "--data-root", "/var/lib/docker", "--exec-root", "/run/docker",
                               "--default-address-pool", f"base={LOCAL_ADDR_POOL},size=24",
                               "--insecure-registry", REGISTRY_ADDR]
        # nsenter without --fork execs dockerd: the PID we hold is dockerd's own.
        self.dockerd = Proc.spawn(argv, f"{self.name} dockerd", os.path.join(self.dir, "logs", "dockerd.log"),
                                  env=env)
        try:
            wait_until(lambda: not self.dockerd.alive() or self._docker_ping(), timeout, f"{self.name} dockerd")
        except TimeoutError:
            raise HarnessError(f"{self.name}: dockerd did not answer in {timeout:g}s:\n{self.dockerd_log()}")
        if not self.dockerd.alive():
            raise HarnessError(f"{self.name}: dockerd exited {self.dockerd.returncode}:\n{self.dockerd_log()}")

    def _docker_ping(self) -> bool:
        try:
            return request(self.docker_socket, "GET", "/_ping", timeout=2)[0] == 200
        except OSError:
            return False

    def teardown(self) -> List[str]:
        """Remove everything this host holds; return what went wrong (teardown goes on regardless)."""
        errors: List[str] = []

        def step(what: str, fn: Callable[[], object]) -> None:
            try:
                fn()
            except Exception as exc:
                errors.append(f"{self.name}: {what}: {exc}")

        if self.dockerd and self.dockerd.alive():
            step("remove containers", self._remove_containers)
            step("remove networks", self._remove_networks)
        for proc in reversed(self.procs):
            step(f"stop {proc.name}", lambda proc=proc: proc.stop(10))
        if self.dockerd:
            step("stop dockerd", lambda: self.dockerd.stop(20))
        if self.anchor and self.anchor.alive():
            # Deleting eth0 deletes its underlay peer now, not whenever the kernel frees the namespace.
            step("delete eth0", lambda: self.run(["ip", "link", "del", "eth0"], check=False, timeout=10))
            for kind in ("net", "mnt"):
                ns = namespace_id(self.anchor.pid, kind)
                if ns:
                    step(f"kill what is left in its {kind} namespace",
                         lambda ns=ns, kind=kind: kill_namespace(kind, ns, spare=[self.anchor.pid]))
            step("kill anchor", self.anchor.kill)
        return errors

    # Bounded: a hung plugin hangs these too, and everything is killed after them anyway.
    def _remove_containers(self) -> None:
        ids = self.docker("ps", "-aq", timeout=20).stdout.split()
        if ids:
            self.docker("rm", "-f", *ids, timeout=45)

    def _remove_networks(self) -> None:
        ids = self.docker("network", "ls", "-q", "--filter", "type=custom", timeout=20).stdout.split()
        if ids:
            self.docker("network", "rm", *ids, check=False, timeout=45)

    # --- doing things in the host ------------------------------------------------------------------------------
    def run(self, cmd: Command, check: bool = True, timeout: float = 60, input: Optional[str] = None,
            env: Optional[Dict[str, str]] = None, cwd: str = "/") -> subprocess.CompletedProcess:
        """Run a command inside the host (a string goes through sh -c); text output captured.
        env: the whole environment (default: ours); cwd: a path inside the host."""
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        return run(self.nsenter + [f"--wd={cwd}", "--", *argv], timeout=timeout, check=check, input=input,
                   env=env)

    def docker(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """The docker CLI against this host's daemon. With check=False the caller reads returncode/stderr."""
        return run(["docker", "-H", self.docker_host, *args], timeout=timeout, check=check)

    def spawn(self, argv: Sequence[str], name: str, env: Optional[Dict[str, str]] = None,
              log_path: Optional[str] = None, cwd: str = "/") -> Proc:
        """Start a long-running process inside the host (cwd is a path inside it); teardown stops it."""
        proc = Proc.spawn(self.nsenter + [f"--wd={cwd}", "--", *argv], name=f"{self.name} {name}",
                          log_path=log_path or os.path.join(self.dir, "logs", f"{name}.log"), env=env)
        with self._lock:
            self.procs.append(proc)
        return proc

    def links(self, netns: Optional[str] = None) -> List[str]:
        """Interface names in the host's network namespace, or in one of its named namespaces."""
        out = self.run(["ip", *(["-n", netns] if netns else []), "-o", "link", "show"]).stdout
        return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()]

    def netns(self) -> List[str]:
        """Named network namespaces in the host (`ip netns list`, which reads the host's own /run/netns)."""
        return [line.split()[0] for line in self.run(["ip", "netns", "list"]).stdout.splitlines() if line]

    def dockerd_log(self, lines: int = 40) -> str:
        return tail(os.path.join(self.dir, "logs", "dockerd.log"), lines)

    def to_state(self) -> dict:
        return {"index": self.index, "name": self.name, "dir": self.dir,
                "anchor": self.anchor.to_state() if self.anchor else None,
                "dockerd": self.dockerd.to_state() if self.dockerd else None,
                "procs": [p.to_state() for p in self.procs]}

    @classmethod
    def from_state(cls, state: dict) -> "Host":
        host = cls(state["index"], state["dir"], state["name"])
        host.anchor = Proc.from_state(state["anchor"]) if state["anchor"] else None
        host.dockerd = Proc.from_state(state["dockerd"]) if state["dockerd"] else None
        host.procs = [Proc.from_state(p) for p in state["procs"]]
        return host

    def __repr__(self) -> str:
        return f"<Host {self.name} {self.ip}>"


class Lab:
    """The underlay, the test etcd and any number of hosts; use as a context manager or call teardown().

    A setup that fails half-way tears down what it had made before raising. A lab still up when the
    interpreter exits is torn down then, unless detach() was called (`make hosts-up` leaves it running).
    """

    def __init__(self, workdir: Optional[str] = None, etcd: bool = True, underlay_mtu: int = 1500):
        self.dir = workdir or tempfile.mkdtemp(prefix="vxnet-lab-")
        self.underlay = Underlay(os.path.join(self.dir, "underlay"), underlay_mtu)
        self.hosts: List[Host] = []
        self._want_etcd = etcd
        self._lock = threading.Lock()

    @property
    def etcd(self) -> Optional[EtcdServer]:
        return self.underlay.etcd

    def start(self) -> "Lab":
        atexit.register(self.teardown)
        try:
            self.underlay.start()
            if self._want_etcd:
                self.underlay.start_etcd()
        except BaseException:
            self.teardown()
            raise
        return self

    def __enter__(self) -> "Lab":
        return self.start()

    def __exit__(self, *exc) -> None:
        errors = self.teardown()
        if errors and exc[0] is None:
            raise HarnessError("teardown: " + "; ".join(errors))

    def add_hosts(self, count: int, docker: bool = True, image: bool = True) -> List[Host]:
        """Start `count` more hosts in parallel (dockerd in each unless docker=False; the test image loaded).

        If any fails, the new hosts are all torn down before the error is raised.
        """
        with self._lock:
            used = {h.index for h in self.hosts}
            free = [i for i in range(1, UNDERLAY.num_addresses - HOST_OFFSET - 1) if i not in used][:count]
            if len(free) < count:
                raise HarnessError(f"no room for {count} more hosts on {UNDERLAY}")
            new = [Host(i, os.path.join(self.dir, f"host{i}")) for i in free]
            self.hosts.extend(new)
        try:
            _parallel(lambda h: h.start(self.underlay, docker=docker), new)
            if docker and image:
                tarball = images.tarball(new[0].docker)
                _parallel(lambda h: images.load(h.docker, tarball), new)
        except BaseException:
            errors = self.remove_hosts(new)
            if errors:
                print("vxnet lab: teardown after failed setup: " + "; ".join(errors), file=sys.stderr)
            raise
        return new

    def remove_hosts(self, hosts: Iterable[Host], keep_logs: Optional[str] = None) -> List[str]:
        """Tear hosts down (in parallel) and remove their folders; keep_logs: copy each host's logs/ there
        first (as keep_logs/<host name>/). Returns the errors met on the way."""
        hosts = list(hosts)
        errors = [e for errs in _parallel(lambda h: h.teardown(), hosts) for e in errs]
        with self._lock:
            self.hosts = [h for h in self.hosts if h not in hosts]
        for host in hosts:
            if keep_logs:
                target = os.path.join(keep_logs, host.name)
                shutil.rmtree(target, ignore_errors=True)
                shutil.copytree(os.path.join(host.dir, "logs"), target)
            shutil.rmtree(host.dir, ignore_errors=True)
        return errors

    def detach(self) -> None:
        """Leave everything running when this process exits (its state is in save()'s file)."""
        atexit.unregister(self.teardown)

    def teardown(self) -> List[str]:
        """Hosts, then the underlay (etcd with it), then the folders. Returns the errors met on the way."""
        atexit.unregister(self.teardown)
        errors = self.remove_hosts(list(self.hosts))
        errors += self.underlay.teardown()
        shutil.rmtree(self.dir, ignore_errors=True)
        return errors

    def to_state(self) -> dict:
        return {"dir": self.dir, "underlay": self.underlay.to_state(), "hosts": [h.to_state() for h in self.hosts]}

    @classmethod
    def from_state(cls, state: dict) -> "Lab":
        lab = cls(state["dir"])
        lab.underlay = Underlay.from_state(state["underlay"])
        lab.hosts = [Host.from_state(h) for h in state["hosts"]]
        return lab

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_state(), f, indent=1)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "Lab":
        with open(path) as f:
            return cls.from_state(json.load(f))


def _parallel(fn: Callable, items: Sequence) -> list:
    """fn over items in threads; every call finishes before the first error (if any) is raised.

    At interpreter exit (the atexit teardown) no thread pool can start: the calls run one after the other."""
    if len(items) < 2:
        return [fn(item) for item in items]
    try:
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(items))
        futures = [pool.submit(fn, item) for item in items]
    except RuntimeError:  # "cannot schedule new futures after interpreter shutdown"
        return [fn(item) for item in items]
    with pool:
        concurrent.futures.wait(futures)
    return [f.result() for f in futures]


def shell_command(host: Host, cmd: Sequence[str] = ()) -> str:
    """A command line a person can paste to run `cmd` (or a shell) inside the host."""
    return " ".join(shlex.quote(a) for a in host.nsenter + ["--", *(cmd or ["bash"])])
