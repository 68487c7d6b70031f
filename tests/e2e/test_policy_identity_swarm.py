"""Identities of Swarm tasks with the managed plugin: two simulated hosts in one Swarm (host1 manager), the plugin
`make plugin` builds on each (it follows its engine through the host-run mount, /host/run/docker.sock), the test
etcd. A service with a task on each node: each task's peer record, written by its own node, carries the service's
name (com.docker.swarm.service.name) and the ports the task exposes, so either node can enforce rules about the
other's tasks.

What a Swarm task exposes (moby daemon/cluster/executor/container/container.go, exposedPorts()): the service's
ports published in mode=host, plus the image's EXPOSE; ports published through the ingress routing mesh (the
default mode) are not in the task container's ExposedPorts, so the manager's plugin writes every service's target
ports to etcd (services/<service>) and each node merges them into its tasks' records. This kernel has no IPVS:
neither the VIP nor the routing mesh itself answers, so the probes go to the tasks' own addresses on the network.
"""

import json
import os

import pytest

from store import schema
from tests.harness.containers import run_sleeper
from tests.harness.images import IMAGE
from tests.harness.plugin import REPO
from tests.harness.policy import connects, ips, refused, serve, wait_connects
from tests.harness.proc import HarnessError, wait_until
from tests.harness.swarm import PLUGIN, Swarm, install_everywhere, plugin_settings, remove_plugin


@pytest.fixture(scope="module")
def swarm(lab):
    lab.etcd.delete_prefix("/vxnet/")
    hosts = lab.add_hosts(2)
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
        keep = os.path.join(REPO, "build", "test-logs", "test_policy_identity_swarm") if swarm.failed else None
        errors += lab.remove_hosts(hosts, keep_logs=keep)
    if errors:
        raise HarnessError("swarm teardown: " + "; ".join(errors))


@pytest.fixture(autouse=True)
def _swarm_logs(swarm, request):
    request.node.vxnet_hosts = swarm.hosts
    yield
    if getattr(request.node, "vxnet_failed", False):
        swarm.failed = True
        swarm.clear()


def test_each_nodes_task_records_carry_the_service_and_its_published_port(swarm, etcd):
    swarm.create_network("snet", "-d", PLUGIN, "--attachable", "--subnet", "10.200.62.0/24")
    nid = swarm.wait_network("snet")["Id"]
    swarm.create_service("db", "--network", "snet", "--endpoint-mode", "dnsrr", "--mode", "global",
                         "--label", "tier=data", "--container-label", "role=db",
                         "--publish", "mode=host,target=5432,published=15432",
                         "--init", "--no-resolve-image", IMAGE, "sleep", "86400")
    tasks = swarm.wait_tasks("db", {h.name: 1 for h in swarm.hosts})

    def records():
        found = {}
        for host in swarm.hosts:
            raw = host.docker("inspect", "--format", "{{json .NetworkSettings.Networks}}", tasks[host.name]).stdout
            eid = json.loads(raw)["snet"]["EndpointID"]
            value = etcd.get(f"{schema.PREFIX}/peers/{nid}/{eid}")
            record = json.loads(value) if value else None
            if not record or not record.get("identity"):
                return None
            found[host.name] = record
        return found

    found = wait_until(records, 60, "every task's identity in its record")
    for host in swarm.hosts:
        record = found[host.name]
        assert record["host"] == host.name
        assert record["exposed"] == ["5432/tcp"]  # the mode=host published port's target
        identity = record["identity"]
        assert identity["service"] == "db"
        assert identity["labels"]["role"] == "db"  # --container-label; --label is the service's, not the task's
        assert "tier" not in identity["labels"]
        assert identity["container"].startswith("db.")  # db.<node id>.<task id> for a global service
        assert identity["labels"]["com.docker.swarm.service.name"] == "db"
    swarm.remove_services("db")
    wait_until(lambda: not etcd.keys(f"{schema.PREFIX}/peers/"), 60, "the tasks' records to go")
    swarm.remove_network("snet")


def test_an_ingress_published_port_is_exposed_on_every_nodes_task_and_another_port_is_not(swarm, etcd):
    """`--publish 8080:80` (ingress mode) on an `-o policy=exposed` network: the worker's plugin cannot read the
    service (GET /services is a manager's), the manager's writes its ports to etcd, and both nodes' task records
    carry 80/tcp. A container on each node reaches the other node's task on 80, and is refused on 7000 of the same
    task (served, never published nor exposed) by the same probe."""
    swarm.create_network("pnet", "--attachable", "--subnet", "10.200.63.0/24", "-o", "policy=exposed")
    nid = swarm.wait_network("pnet")["Id"]
    swarm.create_service("web", "--network", "pnet", "--mode", "global", "--publish", "8080:80",
                         "--init", "--no-resolve-image", IMAGE, "sleep", "86400")
    tasks = swarm.wait_tasks("web", {h.name: 1 for h in swarm.hosts})
    service_id = swarm.manager.docker("service", "inspect", "--format", "{{.ID}}", "web").stdout.strip()
    stored = wait_until(lambda: etcd.get(f"{schema.PREFIX}/services/{service_id}"), 30, "the service's ports key")
    assert json.loads(stored)["ports"] == ["80/tcp"]

    web = {}
    for host in swarm.hosts:
        raw = host.docker("inspect", "--format", "{{json .Config.ExposedPorts}}", tasks[host.name]).stdout
        assert "80/tcp" not in (json.loads(raw) or {}), "moby now exposes ingress ports itself: revisit this"
        serve(host, tasks[host.name], 80, 7000)
        web[host.name] = ips(host, tasks[host.name], "pnet")[0]
        run_sleeper(host, f"client-{host.name}", "pnet")

    def exposed(host):
        eid = json.loads(host.docker("inspect", "--format", "{{json .NetworkSettings.Networks}}",
                                     tasks[host.name]).stdout)["pnet"]["EndpointID"]
        value = etcd.get(f"{schema.PREFIX}/peers/{nid}/{eid}")
        return json.loads(value).get("exposed") if value else None

    for host in swarm.hosts:  # the worker's task too: its ports came from the manager's key
        wait_until(lambda: exposed(host) == ["80/tcp"], 30, f"80/tcp in the record of web's task on {host.name}")

    ring = list(zip(swarm.hosts, swarm.hosts[1:] + swarm.hosts[:1]))  # each node and the other
    for src, dst in ring:
        wait_connects(src, f"client-{src.name}", web[dst.name], 80, timeout=10)
        assert refused(src, f"client-{src.name}", web[dst.name], 7000), f"{src.name} reached 7000 on {dst.name}"
        assert connects(src, f"client-{src.name}", web[dst.name], 80)  # the control, same probe

    for host in swarm.hosts:
        host.docker("rm", "-f", f"client-{host.name}")
    swarm.remove_services("web")
    wait_until(lambda: etcd.get(f"{schema.PREFIX}/services/{service_id}") is None, 30, "the service's key to go")
    wait_until(lambda: not etcd.keys(f"{schema.PREFIX}/peers/"), 60, "the tasks' records to go")
    swarm.remove_network("pnet")
