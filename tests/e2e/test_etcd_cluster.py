"""Three simulated hosts, the plugin on each against a 3-member etcd cluster over TLS with client certificates
(ETCD_ENDPOINTS names every member): containers attach on all three hosts without a pause while the etcd leader
is killed -9 (and started again), then the next leader is frozen (SIGSTOP) for 5 s. Every attach succeeds, no
address is handed out twice, every container is reachable from the other hosts, and each host's kernel matches
etcd (`vxnet status`)."""

import ipaddress
import threading
import time

import pytest

from tests.harness.containers import network_id
from tests.harness.etcd_cluster import EtcdCluster
from tests.harness.images import IMAGE
from tests.harness.plugin import Plugin
from tests.harness.proc import wait_until

SUBNET = "10.200.30.0/24"
FREEZE_SECONDS = 5  # how long the second member stays frozen: well past etcd's 1 s election timeout
ATTACHES_PER_PHASE = 20  # attaches that must succeed after each disturbance before the next one


@pytest.fixture
def cluster(lab, tmp_path):
    """Requested before `hosts`: the cluster outlives the hosts' teardown, which removes networks via etcd."""
    made = EtcdCluster(lab.underlay, str(tmp_path / "etcd-cluster"))
    try:
        yield made.start()
    finally:
        made.stop()


class Attacher(threading.Thread):
    """`docker run` of a new container on the network, one after the other, until stop is set; every result
    kept as (container name, exit status, stderr, when it finished)."""

    def __init__(self, host, stop: threading.Event):
        super().__init__(name=f"attach-{host.name}", daemon=True)
        self.host = host
        self.stop = stop
        self.results = []

    def run(self):
        n = 0
        while not self.stop.is_set():
            n += 1
            name = f"{self.host.name}-c{n}"
            done = self.host.docker("run", "-d", "--init", "--name", name, "--network", "blue", IMAGE,
                                    "sleep", "86400", check=False, timeout=120)
            self.results.append((name, done.returncode, done.stderr.strip(), time.monotonic()))

    def succeeded_since(self, t: float) -> int:
        return sum(1 for _, code, _, when in self.results if code == 0 and when > t)


def probe(host, container, targets):
    """One bounded ping (1 packet, 1 s) to each target from inside the container, in one docker exec:
    -> the set of targets that answered."""
    script = " ; ".join(f"ping -c 1 -W 1 {ip} >/dev/null 2>&1 && echo {ip}" for ip in targets)
    done = host.docker("exec", container, "sh", "-c", script, check=False, timeout=30 + 2 * len(targets))
    return set(done.stdout.split())


def test_attaches_go_on_through_a_leader_killed_and_a_member_frozen(cluster, hosts, request):
    started = time.monotonic()
    made = hosts(3)
    plugins = []
    request.node.vxnet_plugins = plugins
    # Each plugin lists the members from another one on, so every member is some plugin's first choice and
    # whichever is killed or frozen is one a plugin is talking to (its requests and its watch stream).
    for i, host in enumerate(made):
        plugins.append(Plugin(host, cluster.endpoints(i), cluster.env(i)).start())
    for host in made:
        host.docker("network", "create", "-d", "vxnet", "--ipam-driver", "vxnet", "--subnet", SUBNET,
                    "-o", "overlay=blue", "blue")
    nids = {network_id(h, "blue") for h in made}  # local scope: one Docker network per host, one overlay

    stop = threading.Event()
    attachers = [Attacher(h, stop) for h in made]
    for a in attachers:
        a.start()

    def attached_since(t):
        return sum(a.succeeded_since(t) for a in attachers)

    def failures():
        return [(name, err) for a in attachers for name, code, err, _ in a.results if code != 0]

    def steady(since, what):
        wait_until(lambda: attached_since(since) >= ATTACHES_PER_PHASE or failures(), 90,
                   f"{ATTACHES_PER_PHASE} attaches {what}", interval=0.2)

    try:
        steady(started, "before the disturbance")
        killed = cluster.leader()
        killed.kill()
        t_kill = time.monotonic()
        survivor_leader = cluster.leader()  # the two left elect one of them
        assert survivor_leader is not killed
        steady(t_kill, "with the old leader dead")
        killed.start()
        t_back = time.monotonic()
        steady(t_back, "with the killed member back")

        frozen = cluster.leader()
        frozen.freeze()
        t_freeze = time.monotonic()
        try:
            # The length of the outage, not a synchronisation: attaches go on meanwhile.
            stop.wait(FREEZE_SECONDS)
        finally:
            frozen.thaw()
        during_freeze = attached_since(t_freeze)
        t_thaw = time.monotonic()
        steady(t_thaw, "after the frozen member went on")
    finally:
        stop.set()
        for a in attachers:
            a.join(150)
    disturbance_s = time.monotonic() - t_kill
    total = sum(len(a.results) for a in attachers)
    print(f"\netcd cluster: {total} attaches, {len(failures())} failed, {during_freeze} during the "
          f"{FREEZE_SECONDS} s freeze, killed leader {killed.name}, frozen leader {frozen.name}, "
          f"{disturbance_s:.0f} s of disturbance")
    assert not failures(), failures()
    assert frozen is not killed and during_freeze > 0

    # Every member is back and healthy: the cluster itself came through.
    wait_until(lambda: all(m.healthy() for m in cluster.members), 30, "every etcd member to be healthy")

    # No address twice among all containers (on all hosts), each in the subnet.
    ips = {}  # ip -> (host, container)
    for host in made:
        names = [name for name, code, _, _ in next(a for a in attachers if a.host is host).results if code == 0]
        out = host.docker("inspect", "--format", "{{.Name}} {{(index .NetworkSettings.Networks \"blue\").IPAddress}}",
                          *names).stdout
        for line in out.splitlines():
            name, ip = line.split()
            assert ip not in ips, f"{ip} is both {ips[ip]} and {host.name}{name}"
            assert ipaddress.ip_address(ip) in ipaddress.ip_network(SUBNET)
            ips[ip] = (host, name.lstrip("/"))
    assert len(ips) == total

    # Every container answers from a container of each other host. The same probe to an address of the subnet
    # no container has must get nothing: the negative control.
    unused = next(str(a) for a in reversed(list(ipaddress.ip_network(SUBNET).hosts())) if str(a) not in ips)
    for host in made:
        source = next(name for ip, (h, name) in ips.items() if h is host)
        targets = {ip for ip, (h, _) in ips.items() if h is not host}
        missing = set(targets)
        wait_until(lambda: not missing.difference_update(probe(host, source, missing)) and not missing, 60,
                   f"{source} on {host.name} to reach the {len(targets)} containers of the other hosts")
        assert probe(host, source, [unused]) == set(), f"{unused} answered, yet no container has it"

    # The store agrees with the kernel and with Docker on each host.
    for plugin in plugins:
        def in_sync():
            code, data = plugin.cli_json("status")
            return code == 0 and data["this_host"]["in_sync"] and data
        data = wait_until(in_sync, 30, f"vxnet status on {plugin.host.name} to be in sync")
        stored = {e["ip"].split("/")[0] for e in data["endpoints"] if e["network"] in nids}  # "ip/len"
        assert stored == set(ips), (stored ^ set(ips))
    print(f"etcd cluster test: {time.monotonic() - started:.0f} s in all")
