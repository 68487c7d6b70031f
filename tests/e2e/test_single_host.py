"""One simulated Docker host, the plugin as a host process, the test etcd: what a user sees from the docker CLI."""

import pytest

from store import schema
from tests.harness.containers import (
    addresses,
    network_id,
    pings,
    run_sleeper,
    serve_tcp,
    tcp_answers,
    wait_ping,
)
from tests.harness.proc import wait_until
from tests.harness.swarm import KEPT_KEYS

SUBNET_A = "10.200.1.0/24"
SUBNET_B = "10.200.2.0/24"
# What a host keeps in etcd for itself, networks or not: its record and its health overlay address.
HOST_KEYS = KEPT_KEYS  # each host's own while its plugin runs, and the schema record


@pytest.fixture
def host(hosts):
    (host,) = hosts(1)
    return host


@pytest.fixture
def plugin(host, vxnet_plugin):
    return vxnet_plugin(host)


def create_network(host, name, subnet, *extra):
    host.docker("network", "create", "-d", "vxnet", "--ipam-driver", "vxnet", "--subnet", subnet, *extra, name)
    return network_id(host, name)


def test_two_containers_ping_each_other_by_ip_and_by_name(host, plugin):
    create_network(host, "net-a", SUBNET_A)
    run_sleeper(host, "a1", "net-a")
    run_sleeper(host, "a2", "net-a")
    ip1, ip2 = addresses(host, "a1")["net-a"], addresses(host, "a2")["net-a"]
    assert ip1 != ip2 and ip1.startswith("10.200.1.") and ip2.startswith("10.200.1.")

    wait_ping(host, "a1", ip2)
    wait_ping(host, "a2", ip1)
    wait_ping(host, "a1", "a2")  # Docker's embedded DNS, on the vxnet network
    wait_ping(host, "a2", "a1")


def test_a_container_on_another_vxnet_network_cannot_reach_the_first(host, plugin):
    create_network(host, "net-a", SUBNET_A)
    create_network(host, "net-b", SUBNET_B)
    run_sleeper(host, "a1", "net-a")
    run_sleeper(host, "a2", "net-a")
    run_sleeper(host, "b1", "net-b")
    run_sleeper(host, "b2", "net-b")
    ip_a1 = addresses(host, "a1")["net-a"]
    ip_b2 = addresses(host, "b2")["net-b"]
    serve_tcp(host, "a1")

    # Both networks work, so a failure below is isolation, not a broken network.
    wait_ping(host, "a2", ip_a1)
    wait_ping(host, "b1", ip_b2)
    wait_until(lambda: tcp_answers(host, "a2", ip_a1), 10, "a2 to reach a1's TCP server")

    assert not pings(host, "b1", ip_a1, count=3, wait_s=2)
    assert not tcp_answers(host, "b1", ip_a1)


def test_an_unknown_option_is_refused_and_the_error_names_it(host, plugin):
    proc = host.docker("network", "create", "-d", "vxnet", "-o", "bogus=1", "x", check=False)
    assert proc.returncode != 0
    assert "Error response from daemon" in proc.stderr
    assert "bogus" in proc.stderr
    assert host.docker("network", "ls", "-q", "--filter", "name=^x$").stdout.strip() == ""
    assert not [ns for ns in host.netns() if ns.startswith("vxnet-")]


def test_removing_containers_and_networks_leaves_nothing_behind(host, plugin, etcd):
    made = {}
    for name, subnet in (("net-a", SUBNET_A), ("net-b", SUBNET_B)):
        made[name] = create_network(host, name, subnet)
        run_sleeper(host, f"{name}-c1", name)
        run_sleeper(host, f"{name}-c2", name)
    wait_ping(host, "net-a-c1", addresses(host, "net-a-c2")["net-a"])

    # While they run, each network has its namespace holding vx* links, and etcd holds their records.
    present = host.netns()
    for nid in made.values():
        assert f"vxnet-{nid[:12]}" in present
        assert [link for link in host.links(f"vxnet-{nid[:12]}") if link.startswith("vx")]
    assert [key for key in etcd.keys(schema.PREFIX + "/") if not key.startswith(HOST_KEYS)]

    host.docker("rm", "-f", "net-a-c1", "net-a-c2", "net-b-c1", "net-b-c2")
    host.docker("network", "rm", "net-a", "net-b")

    wait_until(lambda: not [ns for ns in host.netns() if ns.startswith("vxnet-")], 10,
               "no vxnet-* namespace in the host")
    wait_until(lambda: not [link for link in host.links() if link.startswith("vx")], 10, "no vx* link in the host")
    wait_until(lambda: not [key for key in etcd.keys(schema.PREFIX + "/") if not key.startswith(HOST_KEYS)], 10,
               "no etcd key under /vxnet/v1/ but hosts/ and health/")
    assert plugin.alive()


def test_the_plugin_restarted_between_network_create_and_run_still_works(host, plugin):
    create_network(host, "net-a", SUBNET_A)
    assert plugin.restart() == 0  # SIGTERM: a clean exit, then a fresh start that answers
    run_sleeper(host, "a1", "net-a")
    run_sleeper(host, "a2", "net-a")
    wait_ping(host, "a1", addresses(host, "a2")["net-a"])
    wait_ping(host, "a2", "a1")


def test_encrypted_network_on_a_kernel_without_esp_fails_at_once_naming_the_modules(hosts, vxnet_plugin):
    """This machine's kernel has no ESP: `-o encrypted` must fail at create, saying so, never run in clear."""
    import os
    (host,) = hosts(1)
    secret = os.path.join(host.dir, "vxnet", "encryption.key")
    os.makedirs(os.path.dirname(secret), exist_ok=True)
    with open(secret, "w") as f:
        f.write("ab" * 32)
    vxnet_plugin(host, env={"VXNET_ENCRYPTION_SECRET_FILE": secret})
    proc = host.docker("network", "create", "-d", "vxnet", "--ipam-driver", "vxnet", "--subnet", SUBNET_A,
                       "-o", "encrypted", "secret-net", check=False)
    assert proc.returncode != 0 and "Error response from daemon" in proc.stderr
    assert "esp4" in proc.stderr, proc.stderr
    assert host.docker("network", "ls", "-q", "--filter", "name=^secret-net$").stdout.strip() == ""
    assert not [ns for ns in host.netns() if ns.startswith("vxnet-")]
