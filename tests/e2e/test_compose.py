"""Docker Compose (Debian's docker-compose 1.29) on one Docker host with the managed plugin: what a single-host
user does. No scope is set: VXNET_SCOPE=auto makes the plugin local on an engine outside a Swarm (a global-scope
driver would be refused there, "This node is not a swarm manager"); `docker stack deploy` across a Swarm is in
test_swarm.py.
"""

import os
import shutil

import pytest

from tests.harness.containers import addresses, wait_ping
from tests.harness.images import IMAGE
from tests.harness.proc import run
from tests.harness.swarm import (
    PLUGIN,
    clear_host,
    install_plugin,
    plugin_settings,
    wait_clean,
)

COMPOSE = shutil.which("docker-compose")
PROJECT = "vxc"
SUBNET = "10.200.38.0/24"

COMPOSE_FILE = """\
version: "3.8"
services:
  web:
    image: {image}
    command: ["sleep", "86400"]
    init: true
    networks: [x]
  client:
    image: {image}
    command: ["sleep", "86400"]
    init: true
    networks: [x]
networks:
  x:
    driver: {plugin}
    ipam:
      driver: {plugin}
      config:
        - subnet: {subnet}
"""


def compose(host, path: str, *args: str, check: bool = True):
    """docker-compose -p vxc -f path ... against the host's dockerd."""
    env = dict(os.environ, DOCKER_HOST=host.docker_host)
    return run([COMPOSE, "--no-ansi", "-p", PROJECT, "-f", path, *args], env=env, timeout=120, check=check)


@pytest.fixture
def host(hosts):
    (host,) = hosts(1)
    yield host
    clear_host(host)


def test_compose_services_on_a_vxnet_network_talk_by_name(host, etcd, tmp_path):
    assert COMPOSE, "docker-compose is not installed (make deps / scripts/install-deps.sh installs Debian's)"
    install_plugin(host, *plugin_settings(host, etcd.url))
    path = str(tmp_path / "docker-compose.yml")
    with open(path, "w") as f:
        f.write(COMPOSE_FILE.format(image=IMAGE, plugin=PLUGIN, subnet=SUBNET))

    compose(host, path, "up", "-d")
    net = f"{PROJECT}_x"
    shape = "{{.Driver}} {{.IPAM.Driver}} {{(index .IPAM.Config 0).Subnet}}"
    assert host.docker("network", "inspect", "--format", shape, net).stdout.split() == [PLUGIN, PLUGIN, SUBNET]
    web = compose(host, path, "ps", "-q", "web").stdout.strip()
    client = compose(host, path, "ps", "-q", "client").stdout.strip()
    assert web and client
    assert addresses(host, web)[net].startswith("10.200.38.")
    wait_ping(host, client, "web")  # Compose's service names, from Docker's DNS on the user-defined network
    wait_ping(host, web, "client")

    compose(host, path, "down")
    assert host.docker("network", "ls", "-q", "--filter", f"name={net}").stdout.strip() == ""
    wait_clean([host], etcd)
