"""Swarm on simulated hosts: the managed plugin as `make plugin` builds it (scripts/build-plugin.sh) on each host,
one manager and its workers, and the checks Swarm and Compose tests make.

    swarm = Swarm(h1, [h2, h3]).init()     # docker swarm init on h1 (Swarm's pool: hosts.SWARM_ADDR_POOL), joins
    swarm.wait_network("net")              # Swarm allocates a network after `docker network create` returns
    swarm.wait_tasks("svc", {h1: 1, ...})  # running task containers per host
    swarm.clear()                          # stacks, services, containers, networks the tests left
    swarm.teardown()                       # clear(), every node leaves; then remove_plugin() on each host

Every wait polls with a deadline; everything removed is named (services, stacks, networks this test made).
"""

import concurrent.futures
import json
import os
import re
from typing import Callable, Dict, List, Optional, Sequence, Set

from store import schema
from tests.harness.hosts import SWARM_ADDR_POOL, Host
from tests.harness.plugin import REPO
from tests.harness.proc import HarnessError, run, wait_until

PLUGIN = "vxnet:latest"
BUILD = os.path.join(REPO, "scripts", "build-plugin.sh")
SERVICE_LABEL = "com.docker.swarm.service.name"
# etcd keys that outlive every network: each host's own (its record, which lives as long as its plugin runs, and its
# health overlay address), and the tree's schema record (store/compat.py), written once and kept.
KEPT_KEYS = (schema.PREFIX + "/hosts/", schema.PREFIX + "/health/", schema.PREFIX + "/" + schema.SCHEMA_RECORD)
_IPV4 = re.compile(r"^Address:\s+(\d+\.\d+\.\d+\.\d+)\s*$", re.M)  # busybox nslookup answer lines


# --- the managed plugin ---------------------------------------------------------------------------------------------
def install_plugin(host: Host, *settings: str, timeout: float = 900) -> str:
    """scripts/build-plugin.sh against the host's dockerd (builds build/plugin/ once per source change, then
    `docker plugin create` + set + enable); settings are KEY=VALUE plugin settings. Returns its output."""
    env = dict(os.environ, DOCKER_HOST=host.docker_host)
    proc = run(["bash", BUILD, *settings], env=env, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise HarnessError(f"{host.name}: build-plugin.sh failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def install_everywhere(hosts: Sequence[Host], settings: Callable[[Host], Sequence[str]]) -> None:
    """install_plugin on every host at once (the build itself is serialised by the script's lock)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(hosts)) as pool:
        for future in [pool.submit(install_plugin, h, *settings(h)) for h in hosts]:
            future.result()


def plugin_settings(host: Host, etcd_url: str, *extra: str) -> List[str]:
    """What a multi-host install sets: the shared etcd, this host's underlay address and name."""
    return [f"ETCD_ENDPOINTS={etcd_url}", f"VXNET_ADVERTISE_ADDR={host.ip}", f"VXNET_HOST_ID={host.name}", *extra]


def remove_plugin(host: Host) -> None:
    if host.docker("plugin", "inspect", PLUGIN, check=False, timeout=20).returncode == 0:
        host.docker("plugin", "disable", "-f", PLUGIN, check=False, timeout=30)
        host.docker("plugin", "rm", "-f", PLUGIN, check=False, timeout=30)


def clear_host(host: Host) -> None:
    """Containers and vxnet networks go while the plugin still answers, then the plugin (the hosts fixture stops
    dockerd after): a plugin removed first would leave container removal hanging on its dead socket."""
    ids = host.docker("ps", "-aq", check=False).stdout.split()
    if ids:
        host.docker("rm", "-f", *ids, timeout=60, check=False)
    nets = host.docker("network", "ls", "-q", "--filter", f"driver={PLUGIN}", check=False).stdout.split()
    if nets:
        host.docker("network", "rm", *nets, timeout=60, check=False)
    remove_plugin(host)


# --- what is left behind ----------------------------------------------------------------------------------------------
def leftovers(hosts: Sequence[Host], etcd) -> List[str]:
    """Everything vxnet made that is still there: vxnet-* namespaces and vx* links in each host, and etcd keys other
    than KEPT_KEYS. Empty when clean."""
    found = []
    for host in hosts:
        found += [f"{host.name}: namespace {ns}" for ns in host.netns() if ns.startswith("vxnet-")]
        found += [f"{host.name}: link {link}" for link in host.links() if link.startswith("vx")]
    found += [f"etcd: {key}" for key in etcd.keys("/vxnet/") if not key.startswith(KEPT_KEYS)]
    return found


def wait_clean(hosts: Sequence[Host], etcd, timeout: float = 30.0) -> None:
    """Poll until leftovers() is empty (workers clean up when their last task is gone, asynchronously)."""
    last: List[str] = []

    def clean() -> bool:
        last[:] = leftovers(hosts, etcd)
        return not last

    try:
        wait_until(clean, timeout, "every host and etcd to be clean of vxnet state", interval=0.5)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}; left behind:\n  " + "\n  ".join(last)) from None


# --- inside containers ------------------------------------------------------------------------------------------------
def resolve(host: Host, container: str, name: str) -> Set[str]:
    """The IPv4 addresses a name resolves to inside the container (Docker's embedded DNS), empty if none."""
    proc = host.docker("exec", container, "nslookup", name, check=False, timeout=30)
    return {ip for ip in _IPV4.findall(proc.stdout) if not ip.startswith("127.")}


def start_ping(host: Host, container: str, target: str, count: int, log: str = "/tmp/ping.log") -> None:
    """A background ping every 0.1 s, count of them, each waiting at most 1 s; its summary goes to log."""
    host.docker("exec", "-d", container, "sh", "-c", f"ping -i 0.1 -c {count} -W 1 {target} >{log} 2>&1")


def ping_replies(host: Host, container: str, log: str = "/tmp/ping.log") -> int:
    """Replies so far of a background ping (its log's reply lines)."""
    out = host.docker("exec", container, "cat", log, check=False).stdout
    return len(re.findall(r"bytes from", out))


def ping_summary(host: Host, container: str, log: str = "/tmp/ping.log"):
    """(transmitted, received) of a finished background ping, or None while it still runs."""
    out = host.docker("exec", container, "cat", log, check=False).stdout
    found = re.search(r"(\d+) packets transmitted, (\d+) packets received", out)
    return (int(found.group(1)), int(found.group(2))) if found else None


# --- the Swarm ------------------------------------------------------------------------------------------------------
class Swarm:
    """plugin: the network driver's name as dockerd knows it (vxnet:latest from build-plugin.sh; a registry
    reference, host:port/vxnet:0.1.0, for a `docker plugin install`)."""

    def __init__(self, manager: Host, workers: Sequence[Host], plugin: str = PLUGIN):
        self.plugin = plugin
        self.manager = manager
        self.workers = list(workers)
        self.node_ids: Dict[str, str] = {}  # host name -> Swarm node ID
        self.services: List[str] = []
        self.stacks: List[str] = []
        self.networks: List[str] = []
        self.failed = False  # set by tests when one failed: the hosts' logs are worth keeping

    @property
    def hosts(self) -> List[Host]:
        return [self.manager] + self.workers

    def init(self, timeout: float = 60.0) -> "Swarm":
        """swarm init on the manager (advertising its underlay address, Swarm's pool kept off everything the tests
        use), workers join, and every node is Ready."""
        self.manager.docker("swarm", "init", "--advertise-addr", self.manager.ip,
                            "--default-addr-pool", SWARM_ADDR_POOL, timeout=60)
        token = self.manager.docker("swarm", "join-token", "-q", "worker").stdout.strip()
        for worker in self.workers:
            worker.docker("swarm", "join", "--token", token, "--advertise-addr", worker.ip,
                          f"{self.manager.ip}:2377", timeout=60)

        def ready() -> bool:
            out = self.manager.docker("node", "ls", "--format", "{{.ID}} {{.Hostname}} {{.Status}}").stdout
            nodes = {name: (nid, status) for nid, name, status in (line.split() for line in out.splitlines())}
            if all(nodes.get(h.name, ("", ""))[1] == "Ready" for h in self.hosts):
                self.node_ids = {name: nid for name, (nid, _) in nodes.items()}
                return True
            return False

        wait_until(ready, timeout, "every node to be Ready in the Swarm", interval=0.2)
        return self

    def host(self, name: str) -> Host:
        return next(h for h in self.hosts if h.name == name)

    def managers(self, via: Host) -> Dict[str, str]:
        """Host name -> manager status (Leader, Reachable, ...) of the manager nodes, as `via` sees them."""
        out = via.docker("node", "ls", "--format", "{{.Hostname}} {{.ManagerStatus}}", check=False).stdout
        return {parts[0]: parts[1] for parts in (line.split() for line in out.splitlines()) if len(parts) == 2}

    @staticmethod
    def _node(via: Host, verb: str, name: str, timeout: float = 60.0) -> None:
        """`docker node promote|demote NAME` on via. swarmkit updates a node by compare-and-swap on its version, so
        an update racing another one (Raft's own, just after a leadership change) is refused with "update out of
        sequence" and changes nothing: ask again, until the deadline. Any other error is raised at once."""
        refused = []

        def attempt() -> bool:
            proc = via.docker("node", verb, name, check=False, timeout=60)
            if proc.returncode != 0 and "update out of sequence" in proc.stderr:
                return False
            if proc.returncode != 0:
                refused.append(proc.stderr.strip())
            return True
        wait_until(attempt, timeout, f"docker node {verb} {name} to be accepted", interval=0.3)
        if refused:
            raise HarnessError(f"docker node {verb} {name} on {via.name}: {refused[0]}")

    def move_leadership(self, timeout: float = 90.0) -> Host:
        """Another node becomes the leader, as when a leader fails: every worker is promoted, the manager demoted
        (Raft elects one of the others), then the others are demoted again. Afterwards self.manager is the new
        leader and every other node a worker. Returns the new leader."""
        old, others = self.manager, list(self.workers)
        for worker in others:
            self._node(old, "promote", worker.name)
        wait_until(lambda: len(self.managers(old)) == len(others) + 1, timeout, "every node to be a manager",
                   interval=0.3)
        self._node(old, "demote", old.name)

        def leader() -> Optional[Host]:
            for host in others:
                status = self.managers(host)
                name = next((n for n, s in status.items() if s == "Leader"), None)
                if name and name != old.name and old.name not in status:
                    return self.host(name)
            return None

        new = wait_until(leader, timeout, "another manager to lead", interval=0.3)
        for host in others:
            if host is not new:
                self._node(new, "demote", host.name)
        wait_until(lambda: list(self.managers(new)) == [new.name], timeout, f"{new.name} to be the only manager",
                   interval=0.3)
        self.manager, self.workers = new, [h for h in [old] + others if h is not new]
        return new

    # -- networks ------------------------------------------------------------------------------------------------
    def create_network(self, name: str, *args: str, check: bool = True):
        """docker network create -d <plugin> --scope swarm ... on the manager; remembered for teardown."""
        self.networks.append(name)
        return self.manager.docker("network", "create", "-d", self.plugin, "--scope", "swarm", *args, name,
                                   check=check)

    def network(self, name: str) -> Optional[dict]:
        proc = self.manager.docker("network", "inspect", "--format", "{{json .}}", name, check=False)
        return json.loads(proc.stdout) if proc.returncode == 0 else None

    def wait_network(self, name: str, timeout: float = 20.0) -> dict:
        """The network once Swarm has allocated it (driver state set: AllocateNetwork answered with its VNI)."""
        def allocated() -> Optional[dict]:
            net = self.network(name)
            return net if net and net.get("Driver") == self.plugin and (net.get("Options") or {}).get("vni") else None

        return wait_until(allocated, timeout, f"Swarm to allocate network {name}", interval=0.2)

    def remove_network(self, name: str, timeout: float = 30.0) -> None:
        """docker network rm on the manager, retried while Swarm still counts a task that is going away."""
        def removed() -> bool:
            if self.network(name) is None:
                return True
            self.manager.docker("network", "rm", name, check=False, timeout=30)
            return self.network(name) is None

        wait_until(removed, timeout, f"network {name} to be removed", interval=0.5)
        if name in self.networks:
            self.networks.remove(name)

    # -- services ------------------------------------------------------------------------------------------------
    def create_service(self, name: str, *args: str) -> None:
        """A detached service; remembered for teardown. args: options, then image and command."""
        self.services.append(name)
        self.manager.docker("service", "create", "--detach", "--name", name, *args, timeout=60)

    def tasks(self, service: str, hosts: Optional[Sequence[Host]] = None) -> Dict[str, List[str]]:
        """Host name -> IDs of the service's running task containers there."""
        return {h.name: h.docker("ps", "-q", "--filter", f"label={SERVICE_LABEL}={service}").stdout.split()
                for h in (hosts or self.hosts)}

    def wait_tasks(self, service: str, per_host: Dict[str, int], timeout: float = 60.0) -> Dict[str, str]:
        """Wait until each named host runs exactly that many task containers of the service (the others none);
        returns host name -> one container ID there (for hosts with at least one)."""
        got: Dict[str, List[str]] = {}

        def placed() -> bool:
            got.clear()
            got.update(self.tasks(service))
            return all(len(got[h.name]) == per_host.get(h.name, 0) for h in self.hosts)

        try:
            wait_until(placed, timeout, f"the tasks of {service} to run as {per_host}", interval=0.3)
        except TimeoutError as exc:
            states = self.manager.docker("service", "ps", "--no-trunc", "--format",
                                         "{{.Name}} {{.Node}} {{.CurrentState}} {{.Error}}", service,
                                         check=False).stdout
            raise AssertionError(f"{exc}; running: {got}; service ps:\n{states}") from None
        return {name: ids[0] for name, ids in got.items() if ids}

    def remove_services(self, *names: str, timeout: float = 60.0) -> None:
        """docker service rm, then wait until no host runs a container of them."""
        self.manager.docker("service", "rm", *names, check=False, timeout=60)
        for name in names:
            if name in self.services:
                self.services.remove(name)
        wait_until(lambda: not any(self._service_containers(h, names) for h in self.hosts), timeout,
                   f"the containers of {', '.join(names)} to go", interval=0.3)

    @staticmethod
    def _service_containers(host: Host, names: Sequence[str]) -> List[str]:
        ids: List[str] = []
        for name in names:
            ids += host.docker("ps", "-aq", "--filter", f"label={SERVICE_LABEL}={name}", check=False).stdout.split()
        return ids

    # -- stacks --------------------------------------------------------------------------------------------------
    def deploy_stack(self, name: str, compose_file: str) -> None:
        self.stacks.append(name)
        self.manager.docker("stack", "deploy", "--resolve-image", "never", "-c", compose_file, name, timeout=60)

    def remove_stack(self, name: str, timeout: float = 60.0) -> None:
        """docker stack rm, then wait until its containers and its networks are gone on every host."""
        self.manager.docker("stack", "rm", name, check=False, timeout=60)
        if name in self.stacks:
            self.stacks.remove(name)
        label = f"label=com.docker.stack.namespace={name}"

        def gone() -> bool:
            for host in self.hosts:
                if host.docker("ps", "-aq", "--filter", label, check=False).stdout.split():
                    return False
                if host.docker("network", "ls", "-q", "--filter", label, check=False).stdout.split():
                    return False
            return True

        wait_until(gone, timeout, f"stack {name} to be gone from every host", interval=0.5)

    # -- teardown ------------------------------------------------------------------------------------------------
    def clear(self) -> List[str]:
        """Remove what the tests left: stacks, services, every container, the networks they made. Returns the
        errors met (and goes on regardless)."""
        errors: List[str] = []

        def step(what: str, fn: Callable[[], object]) -> None:
            try:
                fn()
            except Exception as exc:
                errors.append(f"swarm teardown: {what}: {exc}")

        for stack in list(self.stacks):
            step(f"stack {stack}", lambda stack=stack: self.remove_stack(stack))
        if self.services:
            step("services", lambda: self.remove_services(*self.services))
        for host in self.hosts:
            ids = host.docker("ps", "-aq", check=False, timeout=20).stdout.split()
            if ids:
                step(f"{host.name}: containers", lambda host=host, ids=ids: host.docker("rm", "-f", *ids, timeout=60))
        for network in list(self.networks):
            step(f"network {network}", lambda network=network: self.remove_network(network))
        return errors

    def teardown(self) -> List[str]:
        """clear(), then every node leaves (workers first; each deletes its copies of swarm networks while the
        plugin still answers). Returns the errors met."""
        errors = self.clear()
        for host in self.workers + [self.manager]:
            try:
                host.docker("swarm", "leave", "--force", timeout=60, check=False)
            except Exception as exc:
                errors.append(f"swarm teardown: {host.name}: swarm leave: {exc}")
        return errors
