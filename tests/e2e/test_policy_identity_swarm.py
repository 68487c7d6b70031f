"""Identities of Swarm tasks with the managed plugin: two simulated hosts in one Swarm (host1 manager), the plugin
`make plugin` builds on each (it follows its engine through the host-run mount, /host/run/docker.sock), the test
etcd. A service with a task on each node: each task's peer record, written by its own node, carries the service's
name (com.docker.swarm.service.name) and the ports the task exposes, so either node can enforce rules about the
other's tasks.

What a Swarm task exposes (moby daemon/cluster/executor/container/container.go, exposedPorts()): the service's
ports published in mode=host, plus the image's EXPOSE; ports published through the ingress routing mesh (the
default mode) are not in the task container's ExposedPorts. This kernel has no IPVS: `--endpoint-mode dnsrr`, and
no ingress publishing.
"""

import json
import os

import pytest

from store import schema
from tests.harness.images import IMAGE
from tests.harness.plugin import REPO
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
