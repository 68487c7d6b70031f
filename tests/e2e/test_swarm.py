"""vxnet as a Swarm network: three simulated hosts form one Swarm (host1 manager, the others workers), each with the
managed plugin `make plugin` builds (scripts/build-plugin.sh), all against the test etcd, with no scope set: the
plugin is installed after the Swarm formed, so VXNET_SCOPE=auto makes it global on every node, workers included.

One Swarm serves the whole module (the plugin install is the slow part); every test removes what it made and
checks that nothing is left: no vxnet-* namespace, no vx* link in any host, no etcd key but the host records.
This kernel has no IPVS, so services use `--endpoint-mode dnsrr` (tasks.<service> and task names, no VIP).
"""

import os
import re

import pytest

from store import schema
from tests.harness.containers import addresses, network_id, run_sleeper, wait_ping
from tests.harness.images import IMAGE
from tests.harness.plugin import REPO
from tests.harness.proc import HarnessError, wait_until
from tests.harness.swarm import (
    PLUGIN,
    Swarm,
    install_everywhere,
    leftovers,
    ping_replies,
    ping_summary,
    plugin_settings,
    remove_plugin,
    resolve,
    start_ping,
    wait_clean,
)

SLEEPER = ["--init", "--no-resolve-image", IMAGE, "sleep", "86400"]


@pytest.fixture(scope="module")
def swarm(lab):
    """Three fresh hosts with the managed plugin, in one Swarm; torn down in order after the module's tests:
    what the tests left, every node leaves (workers first), the plugins, then the hosts (logs kept in
    build/test-logs/test_swarm/ if a test failed)."""
    lab.etcd.delete_prefix("/vxnet/")
    hosts = lab.add_hosts(3)
    swarm = Swarm(hosts[0], hosts[1:])
    errors = []
    try:
        swarm.init()
        install_everywhere(hosts, lambda h: plugin_settings(h, lab.etcd.url, "VXNET_LOG_LEVEL=debug"))
        yield swarm
    finally:
        errors += swarm.teardown()
        for host in hosts:
            try:
                remove_plugin(host)
            except Exception as exc:
                errors.append(f"{host.name}: plugin removal: {exc}")
        keep = os.path.join(REPO, "build", "test-logs", "test_swarm") if swarm.failed else None
        errors += lab.remove_hosts(hosts, keep_logs=keep)
    if errors:
        raise HarnessError("swarm teardown: " + "; ".join(errors))


@pytest.fixture(autouse=True)
def _swarm_logs(swarm, request):
    """A failed test's report gets every host's dockerd log (the managed plugin logs there), the module keeps the
    hosts' logs, and what the failed test left in the Swarm is removed."""
    request.node.vxnet_hosts = swarm.hosts
    yield
    if getattr(request.node, "vxnet_failed", False):
        swarm.failed = True
        swarm.clear()  # so that the next test starts from an empty Swarm


def container_name(host, container: str) -> str:
    return host.docker("inspect", "--format", "{{.Name}}", container).stdout.strip().lstrip("/")


def ips_of(swarm, tasks, network: str):
    """host name -> the address on network of that host's task container."""
    return {name: addresses(swarm.host(name), cid)[network] for name, cid in tasks.items()}


def test_service_tasks_reach_each_other_by_ip_and_name_and_a_standalone_container_joins(swarm, etcd):
    h1, h2, h3 = swarm.hosts
    subnet = "10.200.30.0/24"
    swarm.create_network("swarmnet", "--ipam-driver", PLUGIN, "--attachable", "--subnet", subnet)
    net = swarm.wait_network("swarmnet")
    assert net["Scope"] == "swarm" and net["Attachable"] is True
    assert net["IPAM"]["Driver"] == PLUGIN and net["IPAM"]["Config"][0]["Subnet"] == subnet

    swarm.create_service("web", "--network", "swarmnet", "--endpoint-mode", "dnsrr", "--mode", "global", *SLEEPER)
    tasks = swarm.wait_tasks("web", {h.name: 1 for h in swarm.hosts})  # one task per node
    ips = ips_of(swarm, tasks, "swarmnet")
    assert len(set(ips.values())) == 3 and all(ip.startswith("10.200.30.") for ip in ips.values()), ips
    names = {name: container_name(swarm.host(name), cid) for name, cid in tasks.items()}

    for src, cid in tasks.items():
        host = swarm.host(src)
        wait_until(lambda: resolve(host, cid, "tasks.web") == set(ips.values()), 30,
                   f"tasks.web to resolve to every task's address in {src}'s task", interval=0.3)
        for dst in tasks:
            if dst != src:
                wait_ping(host, cid, ips[dst])
                wait_ping(host, cid, names[dst])  # the task's own name, from Swarm's DNS

    # A standalone container on a worker joins the attachable network and reaches every task; they reach it.
    run_sleeper(h2, "solo", "swarmnet")
    solo_ip = addresses(h2, "solo")["swarmnet"]
    assert solo_ip.startswith("10.200.30.") and solo_ip not in ips.values()
    for ip in ips.values():
        wait_ping(h2, "solo", ip)
    assert resolve(h2, "solo", "tasks.web") == set(ips.values())
    wait_ping(h3, tasks[h3.name], solo_ip)
    wait_ping(h1, tasks[h1.name], "solo")

    # Removing the container, the service and the network leaves nothing behind on any host.
    h2.docker("rm", "-f", "solo", timeout=60)
    swarm.remove_services("web")
    swarm.remove_network("swarmnet")
    wait_clean(swarm.hosts, etcd)


def _allocation_error(host, network: str) -> str:
    """The manager's log line that says Swarm could not allocate this network ('' while there is none)."""
    with open(os.path.join(host.dir, "logs", "dockerd.log"), errors="replace") as f:
        return next((line for line in f if f"Failed allocation for network {network}" in line), "")


def _refused_on_the_manager(swarm, name: str, subnet: str, *options: str) -> str:
    """`docker network create` of a swarm network the plugin refuses: the error message, wherever it shows."""
    proc = swarm.create_network(name, "--ipam-driver", PLUGIN, "--attachable", "--subnet", subnet, *options,
                                check=False)
    if proc.returncode != 0:
        return proc.stderr  # an engine that allocates before it answers
    # dockerd 20.10 stores the network spec and answers at once; the manager's allocator then calls
    # AllocateNetwork, which refuses, and the daemon logs the plugin's message: the network is never allocated.
    nid = proc.stdout.strip()
    message = wait_until(lambda: _allocation_error(swarm.manager, nid), 20,
                         "the manager to log the failed allocation", interval=0.2)
    net = swarm.network(name)
    assert net is not None and not (net.get("Options") or {}).get("vni"), net
    return message


def test_an_unknown_option_is_refused_on_the_manager_naming_the_key(swarm, etcd):
    message = _refused_on_the_manager(swarm, "bogusnet", "10.200.32.0/24", "-o", "bogus=1")
    assert "AllocateNetwork" in message and "bogus" in message, message
    assert re.search(r"unknown option 'bogus'", message), message
    swarm.remove_network("bogusnet")
    assert leftovers(swarm.hosts, etcd) == []


def test_an_encrypted_network_that_cannot_be_is_refused_on_the_manager(swarm, etcd):
    """No cluster secret is set here (and this kernel has no ESP): refused at allocation, saying why, never
    allocated to fail later on every node."""
    message = _refused_on_the_manager(swarm, "secretnet", "10.200.33.0/24", "-o", "encrypted")
    assert "AllocateNetwork" in message and "option encrypted" in message, message
    swarm.remove_network("secretnet")
    assert leftovers(swarm.hosts, etcd) == []


def _dockerd_log(host) -> str:
    with open(os.path.join(host.dir, "logs", "dockerd.log"), errors="replace") as f:
        return f.read()


def _netns_inode(host, name: str) -> str:
    return host.run(["stat", "-L", "-c", "%i", f"/run/netns/{name}"]).stdout.strip()


def test_plugin_disabled_and_enabled_on_a_worker_keeps_tasks_talking(swarm, etcd):
    h1, h2, h3 = swarm.hosts
    swarm.create_network("restartnet", "--ipam-driver", PLUGIN, "--attachable", "--subnet", "10.200.34.0/24")
    nid = swarm.wait_network("restartnet")["Id"]
    swarm.create_service("chat", "--network", "restartnet", "--endpoint-mode", "dnsrr", "--mode", "global",
                         *SLEEPER)
    tasks = swarm.wait_tasks("chat", {h.name: 1 for h in swarm.hosts})
    ips = ips_of(swarm, tasks, "restartnet")
    source, target = tasks[h1.name], ips[h3.name]
    wait_ping(h1, source, target)
    wait_ping(h2, tasks[h2.name], target)
    netns = f"vxnet-{nid[:12]}"
    assert netns in h3.netns()
    before = _netns_inode(h3, netns)

    # 15 s of pings, 0.1 s apart, from host1's task to host3's across the plugin's disable -f / enable on host3.
    start_ping(h1, source, target, 150)
    wait_until(lambda: ping_replies(h1, source) >= 5, 15, "the background ping to get going", interval=0.2)
    h3.docker("plugin", "disable", "-f", PLUGIN, timeout=30)
    assert h3.docker("plugin", "inspect", "--format", "{{.Enabled}}", PLUGIN).stdout.strip() == "false"
    h3.docker("plugin", "enable", PLUGIN, timeout=60)
    assert ping_summary(h1, source) is None, "the ping ended before the plugin was back: it measured nothing"

    # The worker attaches new containers afterwards: a standalone one and a new task.
    run_sleeper(h3, "late", "restartnet")
    swarm.create_service("latecomer", "--network", "restartnet", "--endpoint-mode", "dnsrr",
                         "--constraint", f"node.hostname=={h3.name}", *SLEEPER)
    late_task = swarm.wait_tasks("latecomer", {h3.name: 1})[h3.name]
    for host, container in ((h3, "late"), (h3, late_task)):
        wait_ping(host, container, ips[h1.name])
        wait_ping(host, container, ips[h2.name])
    wait_ping(h1, source, addresses(h3, "late")["restartnet"])
    wait_ping(h2, tasks[h2.name], addresses(h3, late_task)["restartnet"])
    wait_ping(h2, tasks[h2.name], "latecomer")

    sent, received = wait_until(lambda: ping_summary(h1, source), 30, "the background ping to finish")
    print(f"pings across disable/enable on {h3.name}: {sent - received} of {sent} lost")
    assert sent == 150 and sent - received <= 10, f"{sent - received} of {sent} pings lost across disable/enable"

    # Nothing leaked on the worker: the very same namespace, one bridge port per local endpoint, nothing in the
    # host's own namespace.
    assert [ns for ns in h3.netns() if ns.startswith("vxnet-")] == [netns]
    assert _netns_inode(h3, netns) == before
    ports = [link for link in h3.links(netns) if link.startswith("vxp")]
    assert len(ports) == 3, ports  # chat's task, late, latecomer's task
    assert [link for link in h3.links() if link.startswith("vx")] == []

    h3.docker("rm", "-f", "late", timeout=60)
    swarm.remove_services("chat", "latecomer")
    swarm.remove_network("restartnet")
    wait_clean(swarm.hosts, etcd)


STACK = """\
version: "3.8"
services:
  ping:
    image: {image}
    command: ["sleep", "86400"]
    init: true
    networks: [x]
    deploy:
      endpoint_mode: dnsrr
      placement:
        constraints: ["node.hostname == {first}"]
  pong:
    image: {image}
    command: ["sleep", "86400"]
    init: true
    networks: [x]
    deploy:
      endpoint_mode: dnsrr
      placement:
        constraints: ["node.hostname == {second}"]
networks:
  x:
    driver: {plugin}
    attachable: true
    ipam:
      driver: {plugin}
      config:
        - subnet: 10.200.36.0/24
"""


def test_stack_deploy_services_reach_each_other_by_name_across_nodes(swarm, etcd, tmp_path):
    h1, h2, h3 = swarm.hosts
    path = tmp_path / "stack.yml"
    path.write_text(STACK.format(image=IMAGE, plugin=PLUGIN, first=h2.name, second=h3.name))
    swarm.deploy_stack("vxs", str(path))
    net = swarm.wait_network("vxs_x")
    assert net["IPAM"]["Config"][0]["Subnet"] == "10.200.36.0/24"
    ping = swarm.wait_tasks("vxs_ping", {h2.name: 1})[h2.name]
    pong = swarm.wait_tasks("vxs_pong", {h3.name: 1})[h3.name]
    pong_ip = addresses(h3, pong)["vxs_x"]
    assert pong_ip.startswith("10.200.36.")
    # The stack's short service names and the full ones, from Swarm's DNS, across the two workers.
    wait_ping(h2, ping, "pong")
    wait_ping(h2, ping, "vxs_pong")
    wait_ping(h3, pong, "ping")
    assert resolve(h2, ping, "tasks.pong") == {pong_ip}
    assert network_id(h2, "vxs_x") == net["Id"]

    swarm.remove_stack("vxs")
    wait_clean(swarm.hosts, etcd)


def test_leadership_moves_and_nothing_leaks(swarm, etcd):
    """Last in the module (the leader changes). The new leader's allocator replays what it finds allocated (the
    network's pool, gateway and task addresses): in etcd that changes nothing, and removing the service and the
    network through the new leader leaves nothing behind."""
    swarm.create_network("leadnet", "--ipam-driver", PLUGIN, "--attachable", "--subnet", "10.200.34.0/24")
    swarm.wait_network("leadnet")
    swarm.create_service("lead", "--network", "leadnet", "--endpoint-mode", "dnsrr", "--mode", "global", *SLEEPER)
    swarm.wait_tasks("lead", {h.name: 1 for h in swarm.hosts})

    def allocator_state():
        return {key: etcd.get(key) for key in etcd.keys(schema.PREFIX + "/ipam/") if "vxnet-global" in key}

    before = allocator_state()
    assert before, "the allocator holds nothing in the global space?"
    old = swarm.manager
    new = swarm.move_leadership()
    pool_line = "pool held: pool=vxnet-global/10.200.34.0/24"
    wait_until(lambda: pool_line in _dockerd_log(new), 60, f"{new.name}'s allocator to replay the pool",
               interval=0.5)
    assert allocator_state() == before, f"the replay by {new.name} (after {old.name}) changed the holds"
    swarm.remove_services("lead")
    swarm.remove_network("leadnet")
    wait_clean(swarm.hosts, etcd)
