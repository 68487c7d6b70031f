"""A deny network on a Swarm of three simulated hosts (host1 manager), the managed plugin `make plugin` builds on
each, the test etcd: a rule selecting a Swarm service by `service=` is in force on every node for every task.

db is a global service (a task on each node, each serving 5432 and 7000); a client container with role=client
and a container without the label on each node (the network is attachable). `vxnet policy allow snet --from
label=role=client --to service=db --port 5432/tcp`, run on the manager: every client reaches every task of db on
5432, on its own node and across; nobody else does; no client reaches 7000; no task of db opens a connection to a
client. Removing the rule refuses the clients again on every node. This kernel has no IPVS: `--endpoint-mode
dnsrr`, and the probes go to the tasks' addresses.
"""

import json
import os

import pytest

from tests.harness.containers import run_sleeper
from tests.harness.images import IMAGE
from tests.harness.plugin import REPO
from tests.harness.policy import allow, allows, connects, ips, refused, remove_rule, serve, vxnet, wait_connects
from tests.harness.proc import HarnessError, wait_until
from tests.harness.swarm import Swarm, install_everywhere, plugin_settings, remove_plugin, wait_clean

SUBNET = "10.200.60.0/24"
DB_PORT = 5432
OTHER_PORT = 7000


@pytest.fixture(scope="module")
def swarm(lab):
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
        keep = os.path.join(REPO, "build", "test-logs", "test_policy_swarm") if swarm.failed else None
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


def test_a_rule_selecting_a_swarm_service_is_in_force_on_every_node(swarm, etcd):
    manager = swarm.manager
    swarm.create_network("snet", "--attachable", "--subnet", SUBNET, "-o", "policy=deny")
    nid = swarm.wait_network("snet")["Id"]
    swarm.create_service("db", "--network", "snet", "--endpoint-mode", "dnsrr", "--mode", "global",
                         "--init", "--no-resolve-image", IMAGE, "sleep", "86400")
    tasks = swarm.wait_tasks("db", {h.name: 1 for h in swarm.hosts})
    db = {}
    for host in swarm.hosts:
        serve(host, tasks[host.name], DB_PORT, OTHER_PORT)
        db[host.name] = ips(host, tasks[host.name], "snet")[0]
        run_sleeper(host, f"client-{host.name}", "snet", "--label", "role=client")
        run_sleeper(host, f"other-{host.name}", "snet")
        serve(host, f"client-{host.name}", OTHER_PORT)
    client = {h.name: ips(h, f"client-{h.name}", "snet")[0] for h in swarm.hosts}
    other = {h.name: ips(h, f"other-{h.name}", "snet")[0] for h in swarm.hosts}
    ring = list(zip(swarm.hosts, swarm.hosts[1:] + swarm.hosts[:1]))  # each node and the next one

    # Deny, before any rule: a client is refused by db on its own node.
    for host in swarm.hosts:
        assert refused(host, f"client-{host.name}", db[host.name], DB_PORT)

    rule = allow(manager, etcd.url, "snet", "label=role=client", "service=db", f"{DB_PORT}/tcp")
    for src in swarm.hosts:  # every client, every task of db: its own node's and the two others'
        for dst in swarm.hosts:
            wait_connects(src, f"client-{src.name}", db[dst.name], DB_PORT, timeout=10)
    for dst in swarm.hosts:  # each destination node's kernel holds every client's element for its task
        assert all(allows(dst, nid, client[src.name], db[dst.name], "tcp", DB_PORT) for src in swarm.hosts)
    for src, dst in ring:
        assert refused(src, f"other-{src.name}", db[dst.name], DB_PORT), f"other on {src.name} reached db"
        assert refused(src, f"client-{src.name}", db[dst.name], OTHER_PORT), "a client reached db's 7000"
        assert refused(dst, tasks[dst.name], client[src.name], OTHER_PORT), "a task of db reached a client"
        assert connects(src, f"client-{src.name}", db[dst.name], DB_PORT)  # the control, same probe

    # Each destination node's verdict log names the refused source (a container on another node) and the task
    # of the service it tried (vxnet flows on that node, asking its managed plugin on VXNET_METRICS_ADDR).
    for src, dst in ring:
        def logged():
            done = vxnet(dst, etcd.url, "flows", "snet", "--json")
            assert done.returncode == 0, done.stderr
            return next((r for r in json.loads(done.stdout)["records"]
                         if (r["src"]["ip"], r["dst"]["ip"], r["proto"], r["dport"]) ==
                         (other[src.name], db[dst.name], "tcp", DB_PORT)), None)

        record = wait_until(logged, 5, f"other on {src.name} -> db on {dst.name} in {dst.name}'s flows")
        assert record["verdict"] == "dropped" and record["reason"] == "no-rule"
        assert (record["src"]["container"], record["src"]["host"]) == (f"other-{src.name}", src.name)
        assert record["dst"]["service"] == "db" and record["dst"]["container"].startswith("db.")

    remove_rule(manager, etcd.url, "snet", rule["id"])
    for src, dst in ring:
        wait_until(lambda: not connects(src, f"client-{src.name}", db[dst.name], DB_PORT), 5,
                   f"client on {src.name} refused again by db on {dst.name}")
        assert refused(src, f"client-{src.name}", db[dst.name], DB_PORT)

    for host in swarm.hosts:
        host.docker("rm", "-f", f"client-{host.name}", f"other-{host.name}")
    swarm.remove_services("db")
    swarm.remove_network("snet")
    wait_clean(swarm.hosts, etcd)  # no namespace (and so no table), no policy key
