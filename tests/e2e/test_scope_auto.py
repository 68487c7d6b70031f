"""VXNET_SCOPE=auto, the managed plugin's default (issue 17): on an engine outside any Swarm the plugin is local and
the README's first managed-plugin example works as printed; after `docker swarm init` and a disable/enable it is
global and swarm-scoped networks work; after `docker swarm leave` and a disable/enable it is local again; and an
explicit VXNET_SCOPE wins in both states.

The plugin is `make plugin`'s (scripts/build-plugin.sh), installed with no setting at all. The simulated host gets
the one thing a real host has and these do not: a default route, so that the plugin finds its VXLAN address by
itself. It points into the underlay namespace, which forwards nothing (ip_forward=0, no route out): nothing can
leave the machine, and no test sends anything but to the containers it made.
"""

import json
import os
import tempfile

import pytest

from tests.harness.containers import addresses, run_sleeper, wait_ping
from tests.harness.hosts import SWARM_ADDR_POOL, UNDERLAY_GW
from tests.harness.proc import wait_until
from tests.harness.swarm import PLUGIN, clear_host, install_plugin
from tests.harness.unixhttp import request

LOCAL_SUBNET = "10.201.77.0/24"
SWARM_SUBNET = "10.201.78.0/24"
JOINED = "this engine joined a Swarm after vxnet started with scope local"
LEFT = "this engine left its Swarm after vxnet started with scope global"
NOT_A_MANAGER = "This node is not a swarm manager"


@pytest.fixture
def host(hosts):
    (host,) = hosts(1)
    yield host
    clear_host(host)
    host.docker("swarm", "leave", "--force", check=False, timeout=60)


def install_with_a_default_route(host, *settings: str) -> None:
    """`make plugin` with these settings (none: what a new user types); the route first, as on a real host."""
    install_plugin(host, "--no-enable", *settings)
    host.run(["ip", "route", "replace", "default", "via", UNDERLAY_GW, "dev", "eth0"])
    host.docker("plugin", "enable", PLUGIN, timeout=60)


def restart_plugin(host, *settings: str) -> None:
    """What the README says a join or leave takes: disable, (set,) enable."""
    host.docker("plugin", "disable", PLUGIN, timeout=30)
    if settings:
        host.docker("plugin", "set", PLUGIN, *settings)
    host.docker("plugin", "enable", PLUGIN, timeout=60)


def declared_scope(host) -> str:
    """The plugin's own answer to GetCapabilities, asked on its socket in the host (what dockerd read at enable)."""
    plugin_id = host.docker("plugin", "inspect", "--format", "{{.Id}}", PLUGIN).stdout.strip()
    sock = host.path(f"/run/docker/plugins/{plugin_id}/vxnet.sock")
    # That path is longer than a unix socket address may be (108 bytes, sun_path): connect through a short
    # symlink, which connect() follows.
    with tempfile.TemporaryDirectory(prefix="vx") as short:
        link = os.path.join(short, "s")
        os.symlink(sock, link)

        def ask():
            try:
                status, body = request(link, "POST", "/NetworkDriver.GetCapabilities", body={}, timeout=5)
            except OSError:
                return None
            return json.loads(body)["Scope"] if status == 200 else None

        return wait_until(ask, 30, f"the plugin on {host.name} to answer GetCapabilities", interval=0.2)


def dockerd_log(host) -> str:
    """The whole dockerd log of the host (the managed plugin's output is in it)."""
    with open(os.path.join(host.dir, "logs", "dockerd.log"), errors="replace") as f:
        return f.read()


def wait_log(host, needle: str, count: int, timeout: float = 30.0) -> None:
    """Until `needle` has appeared `count` times in dockerd's log (the scope monitor looks every 10 s)."""
    wait_until(lambda: dockerd_log(host).count(needle) >= count, timeout,
               f"{needle!r} #{count} in {host.name}'s dockerd log", interval=0.5)


def network(host, name: str) -> dict:
    return json.loads(host.docker("network", "inspect", "--format", "{{json .}}", name).stdout)


def two_containers_talk(host, net: str, first: str, second: str) -> None:
    run_sleeper(host, first, net)
    run_sleeper(host, second, net)
    wait_ping(host, first, addresses(host, second)[net])
    wait_ping(host, second, first)  # by name, through Docker's DNS


def remove(host, *containers: str) -> None:
    host.docker("rm", "-f", *containers, timeout=60)


def swarm_init(host) -> None:
    host.docker("swarm", "init", "--advertise-addr", host.ip, "--default-addr-pool", SWARM_ADDR_POOL, timeout=60)


def create(host, name: str, subnet: str, *extra: str, check: bool = True):
    """The README's first managed-plugin example, with this name and subnet."""
    return host.docker("network", "create", "-d", PLUGIN, "--ipam-driver", PLUGIN, "--subnet", subnet, *extra,
                       name, check=check)


def test_auto_is_local_outside_a_swarm_and_global_in_one_after_a_disable_enable(host):
    install_with_a_default_route(host)
    env = host.docker("plugin", "inspect", "--format", '{{join .Settings.Env " "}}', PLUGIN).stdout.split()
    assert "VXNET_SCOPE=auto" in env
    assert declared_scope(host) == "local"
    wait_log(host, "scope local: VXNET_SCOPE=auto: this engine is not in a Swarm", 1)

    # A standalone engine, no setting given: the README's example as printed works.
    create(host, "mnet", LOCAL_SUBNET)
    assert network(host, "mnet")["Scope"] == "local"
    two_containers_talk(host, "mnet", "c1", "c2")
    remove(host, "c1", "c2")
    host.docker("network", "rm", "mnet")

    # Joining a Swarm: the running plugin says what it takes, and keeps its scope until then.
    swarm_init(host)
    wait_log(host, JOINED, 1)
    assert "docker plugin disable vxnet:latest && docker plugin enable vxnet:latest" in dockerd_log(host)
    assert declared_scope(host) == "local"
    restart_plugin(host)
    assert declared_scope(host) == "global"
    # No --scope: with a global driver on a manager, dockerd makes it a swarm network.
    create(host, "snet", SWARM_SUBNET, "--attachable")
    net = wait_until(lambda: (lambda n: n if (n.get("Options") or {}).get("vni") else None)(network(host, "snet")),
                     20, "Swarm to allocate snet", interval=0.2)
    assert net["Scope"] == "swarm" and net["Attachable"] is True
    two_containers_talk(host, "snet", "c3", "c4")
    remove(host, "c3", "c4")

    # dockerd restarts: it enables plugins before its Swarm node is back (no control.sock yet under /run/docker/
    # swarm), and the persistent state still says Swarm: global again, and the swarm network still works.
    host.dockerd.stop(30)
    host.start_dockerd()
    assert declared_scope(host) == "global"
    wait_log(host, "scope global: VXNET_SCOPE=auto: this engine is a Swarm node", 2)
    two_containers_talk(host, "snet", "c5", "c6")
    remove(host, "c5", "c6")

    # Leaving: the warning, then a disable/enable makes it local, and the standalone example works again.
    host.docker("network", "rm", "snet")
    host.docker("swarm", "leave", "--force", timeout=60)
    wait_log(host, LEFT, 1)
    restart_plugin(host)
    assert declared_scope(host) == "local"
    create(host, "mnet", LOCAL_SUBNET)
    assert network(host, "mnet")["Scope"] == "local"
    two_containers_talk(host, "mnet", "c7", "c8")


def test_an_explicit_scope_wins_outside_and_inside_a_swarm(host):
    # Outside a Swarm, VXNET_SCOPE=global is what it says: dockerd refuses the network, naming Swarm.
    install_with_a_default_route(host, "VXNET_SCOPE=global")
    assert declared_scope(host) == "global"
    wait_log(host, "VXNET_SCOPE=global but this engine is not in a Swarm", 1)
    refused = create(host, "mnet", LOCAL_SUBNET, check=False)
    assert refused.returncode != 0 and NOT_A_MANAGER in refused.stderr
    # Positive control, the same command: with auto it works here.
    restart_plugin(host, "VXNET_SCOPE=auto")
    assert declared_scope(host) == "local"
    create(host, "mnet", LOCAL_SUBNET)
    host.docker("network", "rm", "mnet")

    # In a Swarm, auto would be global (checked first), VXNET_SCOPE=local is local: the same command makes a
    # network of this engine only, and containers on it talk.
    swarm_init(host)
    restart_plugin(host)
    assert declared_scope(host) == "global"
    restart_plugin(host, "VXNET_SCOPE=local")
    assert declared_scope(host) == "local"
    create(host, "lnet", LOCAL_SUBNET)
    assert network(host, "lnet")["Scope"] == "local"
    two_containers_talk(host, "lnet", "c1", "c2")
