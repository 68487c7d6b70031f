"""vxnet as Docker users get it: pushed to a registry, `docker plugin install`ed on each node with its settings on the
command line, upgraded node by node with `docker plugin upgrade` while traffic flows, removed with `docker plugin rm`.

The registry is Debian's docker-registry (the distribution registry), started here on the underlay's own address
(tests/harness/registry.py); every simulated dockerd trusts it over plain HTTP (--insecure-registry), and nothing
else differs from Docker Hub: the same `docker plugin push/install/upgrade` calls, by full reference. The two
versions are one build of this tree (build/plugin/rootfs) with two numbers: build/plugin-<version>/ differ only in
/opt/vxnet/VERSION (scripts/build-plugin.sh), so x and x+1 are the same code and an upgrade proves the mechanism,
not a code change. This kernel has no IPVS, so services use `--endpoint-mode dnsrr`.

Prints the rootfs size, the registry's blob bytes, the push times and the median `docker plugin install` time.
"""

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict

import pytest

from store import schema
from tests.harness.containers import addresses, wait_ping
from tests.harness.hosts import REGISTRY_ADDR, REGISTRY_PORT, UNDERLAY_GW, Host
from tests.harness.images import IMAGE
from tests.harness.metrics import scrape
from tests.harness.plugin import REPO
from tests.harness.proc import run, wait_until
from tests.harness.registry import Registry
from tests.harness.swarm import Swarm, ping_summary, plugin_settings, wait_clean
from wire import version

PUSH = os.path.join(REPO, "scripts", "push-plugin.sh")
PLUGIN_REPO = f"{REGISTRY_ADDR}/vxnet"
X = version.current()  # the tree's (pyproject.toml)
_v = version.parse(X)
Y = str(version.Version(_v.major, _v.minor, _v.patch + 1))  # the same tree, the next number
REF_X, REF_Y = f"{PLUGIN_REPO}:{X}", f"{PLUGIN_REPO}:{Y}"
SLEEPER = ["--init", "--no-resolve-image", "--endpoint-mode", "dnsrr", IMAGE, "sleep", "86400"]
PING_INTERVAL = 0.1  # seconds between pings: lost replies * PING_INTERVAL is the time lost
MAX_LOST_SECONDS = 1.0  # per node upgraded (the bound)


@pytest.fixture
def registry(lab, tmp_path):
    """docker-registry on 192.168.251.1:5000 in the underlay's namespace, storage under this test's tmp dir."""
    reg = Registry(str(tmp_path / "registry"), UNDERLAY_GW, REGISTRY_PORT, netns_pid=lab.underlay.anchor.pid)
    reg.start()
    yield reg
    reg.stop()


def push(host: Host, ver: str, *flags: str) -> float:
    """scripts/push-plugin.sh (what `make push` runs) from host's dockerd; returns its duration in seconds."""
    env = dict(os.environ, DOCKER_HOST=host.docker_host, VXNET_VERSION=ver)
    started = time.monotonic()
    proc = run(["bash", PUSH, PLUGIN_REPO, *flags], env=env, timeout=900, check=False)
    assert proc.returncode == 0, f"push-plugin.sh {ver} failed:\n{proc.stdout}\n{proc.stderr}"
    # The pushing engine keeps nothing: its own install comes from the registry like every other node's.
    assert host.docker("plugin", "ls", "-q").stdout.split() == []
    return time.monotonic() - started


def install(host: Host, ref: str, *settings: str, check: bool = True) -> subprocess.CompletedProcess:
    return host.docker("plugin", "install", "--grant-all-permissions", ref, *settings, timeout=300, check=check)


def inspect(host: Host, ref: str) -> dict:
    return json.loads(host.docker("plugin", "inspect", ref).stdout)[0]


def host_record(etcd, host: Host) -> dict:
    raw = etcd.get(schema.Schema().host(host.name))
    return json.loads(raw) if raw else {}


def vxnet_version(host: Host) -> dict:
    """`vxnet version --json` run in the host (the command from this tree, the plugin asked on its socket)."""
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "PYTHONPATH": REPO}
    proc = host.run([sys.executable, "-m", "cli", "version", "--json"], env=env, cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def build_version(host: Host) -> str:
    """The version label of vxnet_build_info on the host's /metrics (the managed plugin's, 127.0.0.1:9473)."""
    labels = [dict(lbl) for (name, lbl) in scrape(host) if name == "vxnet_build_info"]
    return labels[0]["version"] if labels else ""


def start_ping(host: Host, container: str, target: str, log: str) -> None:
    """A ping every PING_INTERVAL until stop_ping, each reply awaited 1 s at most."""
    host.docker("exec", "-d", container, "sh", "-c",
                f"ping -i {PING_INTERVAL} -W 1 {target} >{log} 2>&1 & echo $! >{log}.pid; wait")
    wait_until(lambda: "bytes from" in host.docker("exec", container, "cat", log, check=False).stdout, 10,
               f"the first ping reply in {log}")


def stop_ping(host: Host, container: str, log: str):
    """SIGINT the ping (it prints its summary), then (transmitted, received)."""
    host.docker("exec", container, "sh", "-c", f"kill -INT $(cat {log}.pid)")
    return wait_until(lambda: ping_summary(host, container, log), 10, f"the ping summary in {log}")


def tasks_ips(swarm: Swarm, service: str, network: str) -> Dict[str, tuple]:
    """host name -> (task container ID, its address on network), one task per host."""
    tasks = swarm.wait_tasks(service, {h.name: 1 for h in swarm.hosts}, timeout=90)
    return {name: (cid, addresses(swarm.host(name), cid)[network]) for name, cid in tasks.items()}


def all_talk(swarm: Swarm, placed: Dict[str, tuple]) -> None:
    for src in swarm.hosts:
        for dst, (_, ip) in placed.items():
            if dst != src.name:
                wait_ping(src, placed[src.name][0], ip, timeout=30)


def test_install_from_a_registry_then_a_rolling_upgrade_loses_no_flow(hosts, etcd, registry):
    h1, h2, h3 = hosts(3)
    nodes = [h1, h2, h3]

    # -- push x and x+1 (one build, two version files) ---------------------------------------------------------
    push_x = push(h1, X)
    push_y = push(h1, Y, "--no-latest")
    rootfs = os.path.join(REPO, "build", f"plugin-{X}", "rootfs")
    rootfs_bytes = int(run(["du", "-sb", rootfs]).stdout.split()[0])
    with open(os.path.join(rootfs, "opt", "vxnet", "VERSION")) as f:
        assert f.read().strip() == X
    with open(os.path.join(REPO, "build", f"plugin-{Y}", "rootfs", "opt", "vxnet", "VERSION")) as f:
        assert f.read().strip() == Y

    # -- a Swarm first (as an operator would: the nodes exist), then the plugin on every node ---------------------
    swarm = Swarm(h1, [h2, h3], plugin=REF_X).init()
    try:
        upgrade_a_swarm(swarm, etcd, registry, rootfs_bytes, push_x, push_y)
    except BaseException:
        swarm.failed = True
        swarm.teardown()
        raise
    wait_clean(nodes, etcd)
    for host in nodes:
        host.docker("plugin", "disable", REF_X, timeout=60)
        host.docker("plugin", "rm", REF_X, timeout=60)
        assert host.docker("plugin", "ls", "-q").stdout.split() == []
        plugins_dir = host.path("/var/lib/docker/plugins")
        left = [name for name in os.listdir(plugins_dir) if name not in ("storage", "tmp")]
        assert left == [], f"{host.name}: {plugins_dir} still holds {left}"
        mounts = host.run(["cat", "/proc/self/mountinfo"]).stdout
        assert "/var/lib/docker/plugins/" not in mounts, mounts
    wait_clean(nodes, etcd)


def upgrade_a_swarm(swarm: Swarm, etcd, registry, rootfs_bytes: int, push_x: float, push_y: float) -> None:
    """Install x everywhere, a network and a service, upgrade node by node to x+1 under ping, a mixed cluster's
    new tasks, then the service and the network gone and every node out of the Swarm."""
    nodes = swarm.hosts
    h1, h2, h3 = nodes

    def timed_install(host: Host) -> float:
        started = time.monotonic()
        install(host, REF_X, *plugin_settings(host, etcd.url, "VXNET_SCOPE=global"))
        return time.monotonic() - started

    install_seconds = [timed_install(h) for h in nodes]  # one after the other: each time is one node's own
    print(f"\ninstall: rootfs {rootfs_bytes / 1e6:.1f} MB (du of build/plugin-{X}/rootfs), registry blobs "
          f"{registry.blob_bytes() / 1e6:.1f} MB for {X}, latest and {Y}; push {push_x:.1f} s ({X} and latest), "
          f"{push_y:.1f} s ({Y}); docker plugin install median {statistics.median(install_seconds):.1f} s "
          f"({', '.join(f'{s:.1f}' for s in install_seconds)})")
    for host in nodes:
        plugin = inspect(host, REF_X)
        assert plugin["Enabled"] is True and plugin["Name"] == REF_X
        env = dict(item.split("=", 1) for item in plugin["Settings"]["Env"])
        assert env["ETCD_ENDPOINTS"] == etcd.url and env["VXNET_ADVERTISE_ADDR"] == host.ip
        assert env["VXNET_HOST_ID"] == host.name and env["VXNET_SCOPE"] == "global"
        # Every setting carries its description (config.json), as `docker plugin inspect` shows it.
        described = {e["Name"]: e["Description"] for e in plugin["Config"]["Env"]}
        assert set(described) == set(env) and all(described.values()), described
        wait_until(lambda host=host: host_record(etcd, host).get("version") == X, 30,
                   f"{host.name}'s host record to carry version {X}")
    record = json.loads(etcd.get(schema.Schema().schema_record()))
    assert (record["major"], record["minor"]) == (schema.SCHEMA_MAJOR, schema.SCHEMA_MINOR)

    # -- a Swarm network by the plugin's full reference, a 3-replica service across the nodes --------------------
    swarm.create_network("net", "--subnet", "10.200.90.0/24")
    swarm.wait_network("net")
    swarm.create_service("svc", "--network", "net", "--replicas", "3", "--replicas-max-per-node", "1",
                         *SLEEPER)
    placed = tasks_ips(swarm, "svc", "net")
    all_talk(swarm, placed)

    # -- upgrade node by node while a cross-host ping runs through the node being upgraded ------------------
    for i, node in enumerate(nodes):
        peer = nodes[(i + 1) % len(nodes)]
        cid = placed[node.name][0]
        log = f"/tmp/ping-{node.name}.log"
        start_ping(node, cid, placed[peer.name][1], log)
        started = time.monotonic()
        node.docker("plugin", "disable", "-f", REF_X, timeout=60)
        # --skip-remote-check: the remote (x+1) is not the reference the plugin was installed from (x), and
        # the CLI would otherwise ask for a confirmation on its standard input.
        node.docker("plugin", "upgrade", "--grant-all-permissions", "--skip-remote-check", REF_X, REF_Y,
                    timeout=300)
        node.docker("plugin", "enable", REF_X, timeout=120)
        took = time.monotonic() - started
        wait_until(lambda node=node: host_record(etcd, node).get("version") == Y, 30,
                   f"{node.name}'s host record to carry version {Y}")
        wait_ping(node, cid, placed[peer.name][1], timeout=30)
        sent, received = stop_ping(node, cid, log)
        lost = (sent - received) * PING_INTERVAL
        print(f"upgrade {node.name}: disable, upgrade, enable in {took:.1f} s; ping {received}/{sent}, "
              f"{lost:.1f} s lost")
        # Positive control: the ping ran across the whole upgrade and was answered.
        assert sent >= took / PING_INTERVAL * 0.8 and received > 0, (sent, received, took)
        assert lost <= MAX_LOST_SECONDS, f"{node.name}: {sent - received} of {sent} pings lost across upgrade"

        plugin = inspect(node, REF_X)
        # dockerd keeps the plugin's name (and so every network's driver name) and its settings; only the
        # reference it came from changes.
        assert plugin["Name"] == REF_X and plugin["PluginReference"] == REF_Y and plugin["Enabled"] is True
        assert f"ETCD_ENDPOINTS={etcd.url}" in plugin["Settings"]["Env"]
        # Peers and addresses kept: the same task, the same address.
        assert addresses(node, cid)["net"] == placed[node.name][1]

        if i == 0:
            # -- the mixed cluster (this node on x+1, the others on x) attaches new tasks that talk ---------
            swarm.create_service("late", "--network", "net", "--replicas", "3", "--replicas-max-per-node",
                                 "1", *SLEEPER)
            all_talk(swarm, tasks_ips(swarm, "late", "net"))
            swarm.remove_services("late")

    all_talk(swarm, placed)
    for host in nodes:
        assert build_version(host) == Y
        reported = vxnet_version(host)
        assert reported["command"] == X and [p["version"] for p in reported["plugins"]] == [Y], reported

    # -- networks gone, then `docker plugin rm` leaves nothing ------------------------------------------------
    swarm.remove_services("svc")
    swarm.remove_network("net")
    errors = swarm.teardown()
    assert not errors, errors


def vxnet_settings(host: Host) -> dict:
    """`vxnet settings --json` in the host: the engine's vxnet plugins with their settings checked."""
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "PYTHONPATH": REPO}
    proc = host.run([sys.executable, "-m", "cli", "settings", "--json"], env=env, cwd=REPO, check=False)
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def test_a_bad_setting_leaves_the_plugin_disabled_and_is_named(hosts, registry):
    (host,) = hosts(1)
    push(host, X, "--no-latest")
    base = [f"VXNET_ADVERTISE_ADDR={host.ip}", "VXNET_SCOPE=local"]
    started = time.monotonic()
    proc = install(host, REF_X, *base, "VXNET_MAX_ENDPOINTS=lots", check=False)
    took = time.monotonic() - started
    print(f"\nbad setting: docker plugin install failed in {took:.1f} s: {proc.stderr.strip()}")
    # Installed and left disabled. dockerd's error is its own: the socket never answered (docs/install.md:
    # dockerd 20.10 passes no text of a plugin's into it).
    assert proc.returncode != 0 and "vxnet.sock" in proc.stderr, proc.stderr
    plugin = inspect(host, REF_X)
    assert plugin["Enabled"] is False
    # The plugin's own line, once (it waits for dockerd's SIGTERM instead of being restarted in a loop), in
    # dockerd's log with plugin=<id>; and `vxnet settings` says it where the operator is.
    line = "vxnet: VXNET_MAX_ENDPOINTS: 'lots' must be a whole number from 1 to"
    logged = [entry for entry in open(os.path.join(host.dir, "logs", "dockerd.log"), errors="replace")
              if line in entry]
    assert len(logged) == 1 and f"plugin={plugin['Id']}" in logged[0], logged
    (found,) = vxnet_settings(host)["plugins"]
    assert found["setting"] == "VXNET_MAX_ENDPOINTS" and found["enabled"] is False and line[7:] in found["error"]
    assert found["fix"].startswith(f"docker plugin set {REF_X} VXNET_MAX_ENDPOINTS=")
    # `docker plugin enable` again fails the same way while the setting is bad.
    proc = host.docker("plugin", "enable", REF_X, check=False, timeout=120)
    assert proc.returncode != 0 and inspect(host, REF_X)["Enabled"] is False
    # Positive control: the same plugin with the setting fixed enables, serves, and its settings pass.
    host.docker("plugin", "set", REF_X, "VXNET_MAX_ENDPOINTS=100")
    host.docker("plugin", "enable", REF_X, timeout=120)
    assert inspect(host, REF_X)["Enabled"] is True
    assert [p["ok"] for p in vxnet_settings(host)["plugins"]] == [True]
    host.docker("network", "create", "-d", REF_X, "--ipam-driver", REF_X, "--subnet", "10.200.91.0/24", "ok")
    host.docker("network", "rm", "ok")
    host.docker("plugin", "disable", REF_X, timeout=60)
    host.docker("plugin", "rm", REF_X, timeout=60)
    # The README's advice: `--alias vxnet` keeps the version out of the name networks use.
    host.docker("plugin", "install", "--grant-all-permissions", "--alias", "vxnet", REF_X, *base, timeout=300)
    assert inspect(host, "vxnet")["Name"] == "vxnet:latest"
    # The full reference, even here: `vxnet` is not `vxnet:latest` to libnetwork (the README says so).
    refused = host.docker("network", "create", "-d", "vxnet", "--subnet", "10.200.91.0/24", "no", check=False)
    assert refused.returncode != 0 and "could not resolve driver vxnet" in refused.stderr, refused.stderr
    host.docker("network", "create", "-d", "vxnet:latest", "--ipam-driver", "vxnet:latest", "--subnet",
                "10.200.91.0/24", "ok")
    assert host.docker("network", "inspect", "--format", "{{.Driver}}", "ok").stdout.strip() == "vxnet:latest"
    host.docker("network", "rm", "ok")
    host.docker("plugin", "disable", "vxnet:latest", timeout=60)
    host.docker("plugin", "rm", "vxnet:latest", timeout=60)


def test_a_store_of_a_newer_schema_major_is_refused_naming_both_versions(hosts, registry, etcd):
    (host,) = hosts(1)
    push(host, X, "--no-latest")
    key = schema.Schema().schema_record()
    newer = schema.SCHEMA_MAJOR + 1
    etcd.put(key, json.dumps({"major": newer, "minor": 0, "written_by": f"{newer}.0.0"}))
    settings = plugin_settings(host, etcd.url, "VXNET_SCOPE=local")
    proc = install(host, REF_X, *settings, check=False)
    assert proc.returncode != 0 and inspect(host, REF_X)["Enabled"] is False, proc.stderr
    line = (f"vxnet: the etcd store under {schema.PREFIX} is schema {newer}.0 (written by vxnet {newer}.0.0); "
            f"this plugin, vxnet {X}, reads schema {schema.SCHEMA_MAJOR}.x only")
    logged = [entry for entry in open(os.path.join(host.dir, "logs", "dockerd.log"), errors="replace")
              if line in entry]
    assert len(logged) == 1, logged
    assert not etcd.keys(schema.PREFIX + "/hosts/")  # it wrote nothing
    assert json.loads(etcd.get(key))["major"] == newer
    # Positive control: the same plugin against a store of its own major enables and registers.
    etcd.put(key, json.dumps({"major": schema.SCHEMA_MAJOR, "minor": 0, "written_by": "0.0.1"}))
    host.docker("plugin", "enable", REF_X, timeout=120)
    assert inspect(host, REF_X)["Enabled"] is True
    wait_until(lambda: host_record(etcd, host).get("version") == X, 30, f"{host.name}'s host record")
    # An older minor of the same major is read, and raised to this plugin's.
    assert json.loads(etcd.get(key)) == {"major": schema.SCHEMA_MAJOR, "minor": schema.SCHEMA_MINOR,
                                         "written_by": X}
    host.docker("plugin", "disable", REF_X, timeout=60)
    host.docker("plugin", "rm", REF_X, timeout=60)
