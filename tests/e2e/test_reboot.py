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

import json
import os
import sys
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
    down = {"ports": _ports(h2, nid) if names.netns(nid) in h2.netns() else None}
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
          f"{new_task_ip}; bridge ports while down: {down['ports']}")

    # No stale link: one bridge port per local endpoint, nothing of ours in host 2's own namespace, and
    # `vxnet status` on host 2 finds kernel and etcd in agreement (no endpoint record left for the old task).
    wait_until(lambda: len(_ports(h2, nid)) == 2, 30, "host 2's bridge to hold exactly keeper's and the task's port",
               interval=0.5)
    assert _ours_in_root(h2) == []
    data = wait_until(lambda: _status(h2, etcd.url)["this_host"]["in_sync"] and _status(h2, etcd.url), 30,
                      "vxnet status on host 2 to be in sync", interval=1)
    mine = [e for e in data["endpoints"] if e["network"] == nid and e["host"] == data["this_host"]["id"]]
    assert sorted(e["ip"].split("/")[0] for e in mine) == sorted([keeper_ip, new_task_ip]), mine

    h2.docker("rm", "-f", "keeper", timeout=60)
    h1.docker("rm", "-f", "probe", timeout=60)
    swarm.remove_services("glob")
    swarm.remove_network("rebootnet")
    wait_clean(swarm.hosts, etcd)
