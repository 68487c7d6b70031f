"""The managed plugin as `make plugin` makes it (scripts/build-plugin.sh), installed on a simulated host's dockerd.

The script builds build/plugin/ (config.json + rootfs/) through the host's own dockerd, offline (a debootstrap base
and wheels prepared on this machine; a fresh build when the sources changed, else only `docker plugin create`),
then creates, configures and enables vxnet:latest there. Everything a user sees goes through the docker CLI.
"""

import json
import os
import re
import sys

import pytest

from store import schema
from tests.harness.containers import (
    addresses,
    network_id,
    pings,
    run_sleeper,
    wait_ping,
)
from tests.harness.metrics import get, scrape
from tests.harness.plugin import REPO
from tests.harness.proc import run, wait_until
from tests.harness.swarm import KEPT_KEYS, clear_host

PLUGIN = "vxnet:latest"
SUBNET = "10.200.31.0/24"
BUILD = os.path.join(REPO, "scripts", "build-plugin.sh")
ROOTFS = os.path.join(REPO, "build", "plugin", "rootfs")


def install(host, *settings: str):
    """scripts/build-plugin.sh against the host's dockerd, with plugin settings (KEY=VALUE) set before enabling."""
    env = dict(os.environ, DOCKER_HOST=host.docker_host)
    proc = run(["bash", BUILD, *settings], env=env, timeout=900, check=False)
    assert proc.returncode == 0, f"build-plugin.sh failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture
def host(hosts):
    (host,) = hosts(1)
    yield host
    clear_host(host)


def plugin_field(host, template: str) -> str:
    return host.docker("plugin", "inspect", "--format", template, PLUGIN).stdout.strip()


def netns_inode(host, name: str) -> str:
    """The identity of a named namespace in the host: the inode of the nsfs mounted on /run/netns/<name>."""
    return host.run(["stat", "-L", "-c", "%i", f"/run/netns/{name}"]).stdout.strip()


def ping_summary(host, container: str, path: str):
    """(transmitted, received) from a finished background ping's log, or None while it still runs."""
    out = host.docker("exec", container, "cat", path, check=False).stdout
    found = re.search(r"(\d+) packets transmitted, (\d+) packets received", out)
    return (int(found.group(1)), int(found.group(2))) if found else None


def test_built_plugin_is_installed_enabled_with_its_settings(host):
    out = install(host, "VXNET_SCOPE=local", f"VXNET_ADVERTISE_ADDR={host.ip}", "VXNET_LOG_LEVEL=debug")
    assert f"{PLUGIN} enabled" in out
    assert plugin_field(host, "{{.Enabled}}") == "true"
    assert plugin_field(host, "{{json .Config.Interface.Types}}") == \
        '["docker.networkdriver/1.0","docker.ipamdriver/1.0"]'
    env = plugin_field(host, '{{join .Settings.Env " "}}').split()
    assert "VXNET_SCOPE=local" in env and f"VXNET_ADVERTISE_ADDR={host.ip}" in env
    assert "VXNET_LOG_LEVEL=debug" in env and "ETCD_ENDPOINTS=" in env
    # The plugin directory other engines can `docker plugin create` from.
    assert os.path.isfile(os.path.join(REPO, "build", "plugin", "config.json"))
    assert os.path.isfile(os.path.join(ROOTFS, "usr", "bin", "etcd"))
    assert os.path.isfile(os.path.join(ROOTFS, "opt", "vxnet", "plugin", "main.py"))
    # Network type host: /metrics (default 127.0.0.1:9473) is on the host's own loopback, served from the
    # prometheus-client the image carries; the call counter moves with a call dockerd makes.
    assert "VXNET_METRICS_ADDR=127.0.0.1:9473" in env
    host.docker("network", "create", "-d", PLUGIN, "--ipam-driver", PLUGIN, "--subnet", SUBNET, "m-managed")
    wait_until(lambda: get(scrape(host), "vxnet_plugin_calls_total", method="NetworkDriver.CreateNetwork",
                           outcome="ok") == 1, 10, "the managed plugin's /metrics on the host to count the create")
    assert get(scrape(host), "vxnet_endpoints", network=network_id(host, "m-managed")[:12]) == 0
    host.docker("network", "rm", "m-managed")


def test_containers_keep_talking_while_the_plugin_is_disabled_and_enabled(host):
    # The embedded etcd (ETCD_ENDPOINTS empty, the default): its data lives in the plugin's propagated mount.
    install(host, "VXNET_SCOPE=local", f"VXNET_ADVERTISE_ADDR={host.ip}")
    host.docker("network", "create", "-d", PLUGIN, "--ipam-driver", PLUGIN, "--subnet", SUBNET, "t1")
    netns = f"vxnet-{network_id(host, 't1')[:12]}"
    run_sleeper(host, "c1", "t1")
    run_sleeper(host, "c2", "t1")
    ip2 = addresses(host, "c2")["t1"]
    wait_ping(host, "c1", ip2)
    wait_ping(host, "c2", "c1")
    assert netns in host.netns()  # in the host's /run/netns, outside the plugin
    before = netns_inode(host, netns)
    # No VXNET_HOST_ID: the generated host ID is kept in the state dir, under the propagated mount.
    id_file = host.path(f"/var/lib/docker/plugins/{plugin_field(host, '{{.Id}}')}/propagated-mount/host-id")
    with open(id_file) as f:
        host_id = f.read().strip()
    assert re.fullmatch(r"[0-9a-f]{32}", host_id), host_id

    # 10 s of pings across the restart: disable -f, a look while it is down, enable.
    host.docker("exec", "-d", "c1", "sh", "-c", f"ping -i 0.1 -c 100 -W 1 {ip2} >/tmp/ping.log 2>&1")
    host.docker("plugin", "disable", "-f", PLUGIN, timeout=30)
    assert plugin_field(host, "{{.Enabled}}") == "false"
    assert netns in host.netns() and netns_inode(host, netns) == before
    assert pings(host, "c2", addresses(host, "c1")["t1"])
    host.docker("plugin", "enable", PLUGIN, timeout=60)

    # The same namespace and the same host ID, traffic still flowing, and a new container attaches and reaches
    # the others.
    assert netns_inode(host, netns) == before
    with open(id_file) as f:
        assert f.read().strip() == host_id
    run_sleeper(host, "c3", "t1")
    wait_ping(host, "c3", ip2)
    wait_ping(host, "c3", "c1")
    wait_ping(host, "c1", addresses(host, "c3")["t1"])
    sent, received = wait_until(lambda: ping_summary(host, "c1", "/tmp/ping.log"), 30,
                                "the background ping to finish")
    assert sent == 100 and received >= 90, f"{sent - received} of {sent} pings lost across disable/enable"


def test_an_unknown_option_is_refused_and_the_error_names_it(host, etcd):
    install(host, "VXNET_SCOPE=local", f"VXNET_ADVERTISE_ADDR={host.ip}", f"ETCD_ENDPOINTS={etcd.url}",
            f"VXNET_HOST_ID={host.name}")
    proc = host.docker("network", "create", "-d", PLUGIN, "--ipam-driver", PLUGIN, "--subnet", SUBNET,
                       "-o", "bogus=1", "x", check=False)
    assert proc.returncode != 0
    assert "Error response from daemon" in proc.stderr
    assert "bogus" in proc.stderr
    assert host.docker("network", "ls", "-q", "--filter", "name=^x$").stdout.strip() == ""
    assert not [ns for ns in host.netns() if ns.startswith("vxnet-")]
    # The plugin runs against the shared etcd it was given: its host record is there, and no network is.
    wait_until(lambda: [k for k in etcd.keys(schema.PREFIX + "/hosts/") if host.name in k], 20,
               f"{host.name}'s host record in the test etcd")
    wait_until(lambda: not [k for k in etcd.keys(schema.PREFIX + "/") if not k.startswith(KEPT_KEYS)], 10,
               "nothing in the test etcd but host records, health overlay addresses and the schema record")


def test_vxnet_doctor_finds_the_managed_plugins_socket_and_health_overlay(host):
    # The embedded etcd, no VXNET_SOCKET, no VXNET_HOST_ID: the doctor's defaults find the etcd on loopback, the
    # socket dockerd made under /run/docker/plugins/<plugin id>/, and this host's record by its VTEP.
    install(host, "VXNET_SCOPE=local", f"VXNET_ADVERTISE_ADDR={host.ip}")
    plugin_id = plugin_field(host, "{{.Id}}")
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "PYTHONPATH": REPO}
    last = {}

    def green() -> bool:
        proc = host.run([sys.executable, "-m", "cli", "doctor", "--json"], env=env, cwd=REPO, check=False)
        last["out"] = proc.stdout + proc.stderr
        return proc.returncode == 0

    try:
        wait_until(green, 60, "vxnet doctor to pass against the managed plugin", interval=0.5)
    except TimeoutError:
        pytest.fail(f"doctor never passed:\n{last.get('out')}")
    checks = {c["check"]: c for c in json.loads(last["out"])["checks"]}
    assert f"/run/docker/plugins/{plugin_id}/vxnet.sock answers" in checks["plugin socket"]["message"], checks
    assert checks["host record"]["status"] == "PASS" and host.ip in checks["host record"]["message"], checks
    assert checks["path"] == {"check": "path", "status": "PASS", "message": "no other host to probe", "fix": ""}
