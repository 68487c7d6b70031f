"""A node that reboots, as far as Docker and vxnet can tell: its dockerd (and everything it runs) stops and starts.

(a) Three simulated hosts in a Swarm with the managed plugin (as test_swarm.py installs it), a vxnet swarm network,
    a `--restart always` container on host 2 and a global service (dnsrr: this kernel has no IPVS). Host 2's dockerd
    is stopped and started again: the managed plugin goes down and comes back with it, as on a reboot.
(b) The plugin as a host process, as a systemd unit runs it (README, "Running as a systemd service"): started before
    dockerd, and, the other way round, dockerd first with the plugin a few seconds later.

What "came back" means in both: the container has the address it had, is reachable from host 1 (with the same
probe failing while host 2 is down: the negative control), and host 2 holds no stale link (one bridge port per local
endpoint, nothing of ours in its own namespace) and `vxnet status` there reports it in sync with etcd.
"""

import contextlib
import json
import os
import re
import sys
import threading
import time

import pytest

from kernel import names
from tests.harness.containers import addresses, network_id, pings, run_sleeper, wait_ping
from tests.harness.images import IMAGE
from tests.harness.plugin import REPO
from tests.harness.proc import HarnessError, wait_until
from tests.harness.swarm import (
    PLUGIN,
    Swarm,
    install_everywhere,
    plugin_settings,
    remove_plugin,
    resolve,
    wait_clean,
)

SLEEPER = ["--init", "--no-resolve-image", IMAGE, "sleep", "86400"]
NOBODY = "10.200.40.250"  # in the test's subnet, never allocated (the IPAM hands out from the bottom)


def _status(host, etcd_url: str) -> dict:
    """`vxnet status --json` inside the host against the plugin's etcd; the host is found by its VTEP (an address
    here), as an operator on a managed-plugin node would run it. Returns the parsed output, exit status in "code"."""
    done = host.run([sys.executable, "-m", "cli", "status", "--json", "--etcd", etcd_url], cwd=REPO, check=False,
                    env={"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "PYTHONPATH": REPO,
                         "DOCKER_HOST": "unix:///run/docker.sock"})
    try:
        data = json.loads(done.stdout)
    except ValueError:
        raise HarnessError(f"vxnet status printed no JSON (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
    data["code"] = done.returncode
    return data


def _ports(host, nid: str):
    """The bridge ports (host-side veth ends) in the network's namespace on that host."""
    return sorted(link for link in host.links(names.netns(nid)) if link.startswith("vxp"))


def _ours_in_root(host):
    return [link for link in host.links() if link.startswith("vx")]


def _assert_in_sync(host, etcd_url: str):
    data = _status(host, etcd_url)
    me = data["this_host"]
    assert data["code"] == 0 and me["in_sync"] and me["differences"] == [], me
    return data


def _restart_count(host, container: str) -> str:
    return host.docker("inspect", "--format", "{{.RestartCount}} {{.State.StartedAt}}", container).stdout.strip()


# --- (a) Swarm, managed plugin ------------------------------------------------------------------------------------
@pytest.fixture
def swarm(lab, request):
    """Three fresh hosts in one Swarm with the managed plugin on each; torn down in order (what is left, every node
    leaves, the plugins, the hosts)."""
    lab.etcd.delete_prefix("/vxnet/")
    made = lab.add_hosts(3)
    request.node.vxnet_hosts = made
    swarm = Swarm(made[0], made[1:])
    errors = []
    try:
        swarm.init()
        install_everywhere(made, lambda h: plugin_settings(h, lab.etcd.url, "VXNET_LOG_LEVEL=debug"))
        yield swarm
    finally:
        errors += swarm.teardown()
        for host in made:
            try:
                remove_plugin(host)
            except Exception as exc:
                errors.append(f"{host.name}: plugin removal: {exc}")
        keep = None
        if getattr(request.node, "vxnet_failed", False):
            keep = os.path.join(REPO, "build", "test-logs", "test_reboot_swarm")
        errors += lab.remove_hosts(made, keep_logs=keep)
    if errors:
        raise HarnessError("swarm teardown: " + "; ".join(errors))


def test_swarm_node_whose_dockerd_restarts_gets_its_container_and_task_back(swarm, etcd):
    h1, h2, h3 = swarm.hosts
    swarm.create_network("rebootnet", "--ipam-driver", PLUGIN, "--attachable", "--subnet", "10.200.40.0/24")
    nid = swarm.wait_network("rebootnet")["Id"]
    swarm.create_service("glob", "--network", "rebootnet", "--endpoint-mode", "dnsrr", "--mode", "global",
                         *SLEEPER)
    tasks = swarm.wait_tasks("glob", {h.name: 1 for h in swarm.hosts})
    run_sleeper(h2, "keeper", "rebootnet", "--restart", "always")
    run_sleeper(h1, "probe", "rebootnet")
    keeper_ip = addresses(h2, "keeper")["rebootnet"]
    task_ip = addresses(h2, tasks[h2.name])["rebootnet"]
    wait_ping(h1, "probe", keeper_ip)
    wait_ping(h1, "probe", task_ip)
    assert not pings(h1, "probe", NOBODY), "an address nobody has answers?"
    ports_before = _ports(h2, nid)
    assert len(ports_before) == 2, ports_before  # keeper, glob's task
    _assert_in_sync(h2, etcd.url)

    # The "reboot": dockerd stops (its containers and the managed plugin with it) ...
    t0 = time.monotonic()
    assert h2.dockerd.stop(60) is not None
    # ... and while it is down, the same probe that reached keeper gets nothing (the negative control).
    assert not pings(h1, "probe", keeper_ip), "keeper answers while host 2's dockerd is down"
    # Nothing of the stopped containers is left on host 2 meanwhile: no bridge port (the namespace itself goes
    # with the network's last local endpoint), nothing in the host's own namespace.
    down_ports = _ports(h2, nid) if names.netns(nid) in h2.netns() else None
    assert down_ports in (None, []) and _ours_in_root(h2) == [], (down_ports, _ours_in_root(h2))
    h2.start_dockerd()

    # The restart-always container comes back with its address, reachable from host 1 with the same probe.
    wait_until(lambda: h2.docker("inspect", "--format", "{{.State.Running}}", "keeper").stdout.strip() == "true",
               60, "keeper to run again on host 2", interval=0.3)
    assert addresses(h2, "keeper")["rebootnet"] == keeper_ip
    wait_ping(h1, "probe", keeper_ip, timeout=30)
    back = time.monotonic() - t0
    # The global service has a running task on host 2 again (Swarm starts a new one), reachable from host 1.
    tasks_after = swarm.wait_tasks("glob", {h.name: 1 for h in swarm.hosts}, timeout=90)
    new_task_ip = addresses(h2, tasks_after[h2.name])["rebootnet"]
    wait_ping(h1, "probe", new_task_ip, timeout=30)
    wait_ping(h2, tasks_after[h2.name], addresses(h3, tasks_after[h3.name])["rebootnet"])
    wait_until(lambda: new_task_ip in resolve(h1, "probe", "tasks.glob"), 30,
               "tasks.glob to name host 2's new task", interval=0.5)
    print(f"host 2 dockerd restart: keeper {keeper_ip} reachable again after {back:.1f}s; task {task_ip} -> "
          f"{new_task_ip} (container {'new' if tasks_after[h2.name] != tasks[h2.name] else 'the same'}); "
          f"bridge ports while down: {down_ports}")

    # No stale link: one bridge port per local endpoint, nothing of ours in host 2's own namespace, and
    # `vxnet status` on host 2 finds kernel and etcd in agreement (no endpoint record left for the old task).
    wait_until(lambda: len(_ports(h2, nid)) == 2, 30, "host 2's bridge to hold exactly keeper's and the task's port",
               interval=0.5)
    assert _ours_in_root(h2) == []
    assert [ns for ns in h2.netns() if ns.startswith("vxnet-")] == [names.netns(nid)]

    def in_sync():
        data = _status(h2, etcd.url)
        return data if data["this_host"]["in_sync"] else None

    data = wait_until(in_sync, 30, "vxnet status on host 2 to be in sync", interval=1)
    mine = [e for e in data["endpoints"] if e["network"] == nid and e["host"] == data["this_host"]["id"]]
    assert sorted(e["ip"].split("/")[0] for e in mine) == sorted([keeper_ip, new_task_ip]), mine

    h2.docker("rm", "-f", "keeper", timeout=60)
    h1.docker("rm", "-f", "probe", timeout=60)
    swarm.remove_services("glob")
    swarm.remove_network("rebootnet")
    wait_clean(swarm.hosts, etcd)


# --- (b) the host-process plugin and dockerd, in either order --------------------------------------------------------
BOOT = "10.200.41.0/24"


@pytest.fixture
def booted(hosts, vxnet_plugin, etcd):
    """Two hosts with the host-process plugin and one local-scope overlay; a probe container on host 1 and a
    `--restart always` container on host 2, reaching each other."""
    h1, h2 = hosts(2)
    plugins = [vxnet_plugin(h) for h in (h1, h2)]
    nets = {}
    for h in (h1, h2):
        h.docker("network", "create", "-d", "vxnet", "--ipam-driver", "vxnet", "--subnet", BOOT, "-o", "overlay=boot",
                 "boot")
        nets[h.name] = network_id(h, "boot")
    run_sleeper(h1, "probe", "boot")
    run_sleeper(h2, "keeper", "boot", "--restart", "always")
    ip = addresses(h2, "keeper")["boot"]
    wait_ping(h1, "probe", ip)
    assert _ports(h2, nets[h2.name]) != [] and _ours_in_root(h2) == []
    _assert_in_sync(h2, etcd.url)
    return (h1, h2), plugins, nets, ip


def _dockerd_log_size(host) -> int:
    return os.path.getsize(os.path.join(host.dir, "logs", "dockerd.log"))


def _dockerd_log_since(host, offset: int) -> str:
    with open(os.path.join(host.dir, "logs", "dockerd.log"), errors="replace") as f:
        f.seek(offset)
        return f.read()


def _came_back(h1, h2, nid: str, ip: str, etcd_url: str, since: float) -> float:
    """keeper runs again on host 2 with address ip, host 1's probe reaches it, one bridge port, status in sync.
    Returns the seconds from `since` until the probe got through."""
    wait_until(lambda: h2.docker("inspect", "--format", "{{.State.Running}}", "keeper").stdout.strip() == "true",
               60, "keeper to run again on host 2", interval=0.3)
    assert addresses(h2, "keeper")["boot"] == ip
    wait_ping(h1, "probe", ip, timeout=30)
    took = time.monotonic() - since
    assert len(_ports(h2, nid)) == 1, _ports(h2, nid)
    assert _ours_in_root(h2) == []
    assert [ns for ns in h2.netns() if ns.startswith("vxnet-")] == [names.netns(nid)]
    wait_until(lambda: _status(h2, etcd_url)["this_host"]["in_sync"], 30, "vxnet status on host 2 to be in sync",
               interval=1)
    return took


def _go_down(h1, h2, plugin, ip: str) -> None:
    """A shutdown as systemd orders it for a unit that is Before=docker.service: dockerd stops first (its
    containers leave while the plugin still answers), then the plugin. The probe that reached keeper fails now."""
    assert h2.dockerd.stop(60) is not None
    assert plugin.stop() is not None
    assert not pings(h1, "probe", ip), "keeper answers while host 2 is down"


def test_plugin_started_before_dockerd_restores_the_restart_always_container(booted, etcd):
    (h1, h2), (_, p2), nets, ip = booted
    _go_down(h1, h2, p2, ip)
    t0 = time.monotonic()
    p2.start()  # what Before=docker.service gives: the plugin answers before dockerd looks for it
    offset = _dockerd_log_size(h2)
    h2.start_dockerd()
    took = _came_back(h1, h2, nets[h2.name], ip, etcd.url, t0)
    log = _dockerd_log_since(h2, offset)
    assert WAITING not in log and not GAVE_UP.search(log), log[-3000:]  # dockerd found the plugin at once
    print(f"plugin first, then dockerd: keeper {ip} reachable again {took:.1f}s after the plugin's start; "
          f"restarts: {_restart_count(h2, 'keeper')}")



@contextlib.contextmanager
def _dockerd_starting(host):
    """dockerd starts in the background (it serves its API only after restoring containers, which waits for the
    plugin): the block runs meanwhile; on leaving, wait until dockerd answers (or raise what starting it raised)."""
    failed = []

    def start():
        try:
            host.start_dockerd(timeout=90)
        except Exception as exc:
            failed.append(exc)

    starter = threading.Thread(target=start)
    starter.start()
    try:
        yield
    finally:
        starter.join()
    if failed:
        raise failed[0]


# dockerd 20.10 looks a plugin up with retries 1, 2, 4, 8 s apart (pkg/plugins: ~15 s), once for each thing it
# restores that needs it (the network's IPAM driver, then the container's endpoint), and logs each retry.
WAITING = "Unable to locate plugin: vxnet, retrying"
GAVE_UP = re.compile(r'msg="failed to start container" container=(\w+) error="plugin \\"vxnet\\" not found"')


def test_dockerd_started_first_waits_for_a_plugin_that_comes_within_its_retries(booted, etcd):
    (h1, h2), (_, p2), nets, ip = booted
    _go_down(h1, h2, p2, ip)
    offset = _dockerd_log_size(h2)
    t0 = time.monotonic()
    with _dockerd_starting(h2):
        # The plugin comes a few seconds later: once dockerd has waited 1 + 2 s for it and says it waits 4 more.
        wait_until(lambda: f"{WAITING} in 4s" in _dockerd_log_since(h2, offset), 60,
                   "dockerd to have looked for vxnet for 3 s", interval=0.2)
        waited = time.monotonic() - t0
        p2.start()
    took = _came_back(h1, h2, nets[h2.name], ip, etcd.url, t0)
    log = _dockerd_log_since(h2, offset)
    assert not GAVE_UP.search(log), log[-3000:]
    print(f"dockerd first, plugin {waited:.1f}s later (dockerd retrying): keeper {ip} reachable after {took:.1f}s; "
          f"dockerd retries logged: {log.count(WAITING)}")


def test_dockerd_started_first_gives_up_on_a_later_plugin_and_leaves_the_container_stopped(booted, etcd):
    """Docker's trap, shown on dockerd itself: the plugin answering only after dockerd's retries ran out, the
    restart-always container is not started (dockerd logs it and does not try again). vxnet has nothing to do with
    it: once the plugin answers, the same container starts by hand with its address and is reachable."""
    (h1, h2), (_, p2), nets, ip = booted
    keeper = h2.docker("inspect", "--format", "{{.Id}}", "keeper").stdout.strip()
    before = _restart_count(h2, "keeper")
    _go_down(h1, h2, p2, ip)
    offset = _dockerd_log_size(h2)
    t0 = time.monotonic()
    with _dockerd_starting(h2):
        found = wait_until(lambda: GAVE_UP.search(_dockerd_log_since(h2, offset)), 80,
                           "dockerd to give up starting keeper", interval=0.5)
        gave_up = time.monotonic() - t0
        p2.start()
    assert found.group(1) == keeper
    # dockerd has finished its restore (it answers): nothing will start keeper now.
    state = h2.docker("inspect", "--format", "{{.State.Running}} {{.State.Status}}", "keeper").stdout.split()
    assert state == ["false", "exited"], state
    assert _restart_count(h2, "keeper") == before
    assert not pings(h1, "probe", ip)
    # The positive control with the same probe: started by hand now that the plugin answers.
    t1 = time.monotonic()
    h2.docker("start", "keeper", timeout=60)
    took = _came_back(h1, h2, nets[h2.name], ip, etcd.url, t1)
    print(f"dockerd first, plugin after dockerd gave up ({gave_up:.1f}s): keeper left {state[1]}; "
          f"`docker start keeper` -> reachable at {ip} in {took:.1f}s")
