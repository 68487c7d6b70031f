"""Swarm's default endpoint mode (VIP, load-balanced by IPVS) on a vxnet network, run inside the qemu guest (a
kernel with ip_vs: this machine's has none) by test_vip_guest.py:

    python3 -m tests.ipsec.inguest_vip     # inside the guest only

One simulated host of tests/harness with dockerd, the managed plugin created from build/plugin/ (made on this
machine by scripts/build-plugin.sh: nothing is built in the guest), `docker swarm init`, a vxnet swarm network and
a service without `--endpoint-mode`, so Swarm gives it a virtual IP from the vxnet IPAM and libnetwork programs
IPVS in each sandbox and a load-balancer endpoint (`lb-<network>`) through the plugin. The replicas are busybox
httpd answering their own hostname; a client container on the (attachable) network asks the VIP.

What it shows: Swarm allocates the VIP from the vxnet IPAM, the service name resolves to it (tasks.<service> to
the replicas), scaling to 0 and back and removing the service leave no address, endpoint record or link behind;
and that dockerd does not balance the VIP of a plugin's network (docs/vip-mode.md), with the evidence.

Each check prints one `VXNET-CHECK {...}` line (tests/ipsec/inguest.py's CheckList).
"""

import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional, Set

from store import schema
from tests.harness import images
from tests.harness.hosts import Host, Lab
from tests.harness.proc import wait_until
from tests.harness.swarm import (
    PLUGIN,
    Swarm,
    install_plugin,
    plugin_settings,
    remove_plugin,
    resolve,
    wait_clean,
)
from tests.ipsec.inguest import CheckList

NETWORK, SUBNET = "vipnet", "10.200.60.0/24"
SERVICE, CLIENT = "web", "client"
# Under TCG everything is 10-30x slower than here: dockerd takes about 20 s to answer, a task 10-20 s to start.
DOCKERD_TIMEOUT = 240
TASK_TIMEOUT = 240
# busybox httpd serving a page with the container's hostname (the task's short container ID): the replica that
# answered is named in the reply. --init: busybox as PID 1 ignores SIGTERM, each stop would wait 10 s.
HTTPD = ["--init", "--no-resolve-image", images.IMAGE, "sh", "-c",
         "mkdir -p /www && hostname >/www/index.html && exec httpd -f -p 80 -h /www"]


class World:
    def __init__(self):
        self.replicas = 2
        self.lab: Optional[Lab] = None
        self.host: Optional[Host] = None
        self.swarm: Optional[Swarm] = None
        self.vip = ""
        self.baseline: Set[str] = set()


def _cgroups() -> None:
    """The guest's init mounts no cgroup filesystem; runc needs one (and the hosts bind /sys/fs/cgroup)."""
    if not os.path.ismount("/sys/fs/cgroup"):
        subprocess.run(["mount", "-t", "cgroup2", "cgroup2", "/sys/fs/cgroup"], check=True)


def _get(world: World, address: str) -> str:
    """One HTTP request from the client container to address:80, the body's first line ('' if none came)."""
    proc = world.host.docker("exec", CLIENT, "sh", "-c",
                             f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {address} 80", check=False, timeout=30)
    lines = [line.strip() for line in proc.stdout.splitlines()]
    body = lines[lines.index("") + 1:] if "" in lines else []
    return body[0] if body else ""


def _state(world: World) -> Set[str]:
    """What the host and etcd hold for endpoints: address and endpoint keys, vx* links in the host."""
    keys = set(world.lab.etcd.keys(schema.PREFIX + "/ipam/addresses/"))
    keys |= set(world.lab.etcd.keys(schema.PREFIX + "/endpoints/"))
    keys |= set(world.lab.etcd.keys(schema.PREFIX + "/peers/"))
    return keys | {f"link {link}" for link in world.host.links() if link.startswith("vx")}


def _task_names(world: World) -> Dict[str, str]:
    """hostname (short container ID) -> the task's address on the network, for every running task."""
    out = {}
    for cid in world.swarm.tasks(SERVICE)[world.host.name]:
        raw = world.host.docker("inspect", "--format", "{{json .NetworkSettings.Networks}}", cid).stdout
        out[cid[:12]] = json.loads(raw)[NETWORK]["IPAddress"]
    return out


def _ipvs(world: World) -> List[str]:
    """The lines of /proc/net/ip_vs in the client's sandbox (IPVS is per network namespace)."""
    key = world.host.docker("inspect", "--format", "{{.NetworkSettings.SandboxKey}}", CLIENT).stdout.strip()
    out = world.host.run(["nsenter", f"--net={key}", "cat", "/proc/net/ip_vs"], check=False).stdout
    return [line for line in out.splitlines() if line.strip()]


def _lb_evidence(world: World) -> str:
    """What libnetwork programmed for the VIP: IPVS services and the mangle marks in the client's sandbox, the
    network's endpoints (a load-balancer one is named lb-<network>), and dockerd's log lines about it."""
    key = world.host.docker("inspect", "--format", "{{.NetworkSettings.SandboxKey}}", CLIENT).stdout.strip()
    ipvs = "\n".join(_ipvs(world))
    mangle = world.host.run(["nsenter", f"--net={key}", "iptables-save", "-t", "mangle"], check=False).stdout
    endpoints = world.host.docker("network", "inspect", "--format",
                                  "{{range $k, $v := .Containers}}{{$k}}={{$v.Name}}/{{$v.IPv4Address}} {{end}}",
                                  NETWORK, check=False).stdout.strip()
    with open(os.path.join(world.host.dir, "logs", "dockerd.log"), errors="replace") as f:
        lines = [line.strip() for line in f if any(w in line for w in ("LB", "load balanc", "ipvs", "VIP"))]
    return (f"client sandbox /proc/net/ip_vs:\n{ipvs}\nclient sandbox mangle:\n{mangle}\n"
            f"network endpoints: {endpoints}\ndockerd log on load balancing:\n" + "\n".join(lines[-12:]))


check = CheckList()


@check(essential=True)
def kernel_has_ipvs(world: World) -> str:
    assert os.path.exists("/proc/net/ip_vs"), "no /proc/net/ip_vs: the ip_vs module is not loaded"
    return f"kernel {os.uname().release}, ip_vs loaded"


@check(essential=True)
def dockerd_runs(world: World) -> str:
    _cgroups()
    start = time.monotonic()
    world.lab = Lab().start()
    world.host, = world.lab.add_hosts(1, docker=False)
    world.host.start_dockerd(timeout=DOCKERD_TIMEOUT)
    up = time.monotonic() - start
    images.load(world.host.docker, images.tarball(world.host.docker))
    info = json.loads(world.host.docker("info", "--format", "{{json .}}", timeout=60).stdout)
    return (f"dockerd {info['ServerVersion']} answered {up:.1f} s after the lab started (storage "
            f"{info['Driver']}, cgroup v{info.get('CgroupVersion')}), image loaded at {time.monotonic() - start:.1f} s")


@check(essential=True)
def swarm_init(world: World) -> str:
    """Before the plugin: with VXNET_SCOPE=auto it takes its scope from the engine when it starts, and an engine
    not yet in a Swarm makes it local (tests/e2e/test_swarm.py installs it after the Swarm forms too)."""
    start = time.monotonic()
    world.swarm = Swarm(world.host, []).init(timeout=DOCKERD_TIMEOUT)
    return f"swarm init, node Ready in {time.monotonic() - start:.1f} s"


@check(essential=True)
def managed_plugin_enabled(world: World) -> str:
    start = time.monotonic()
    install_plugin(world.host, *plugin_settings(world.host, world.lab.etcd.url))
    enabled = world.host.docker("plugin", "inspect", "--format", "{{.Enabled}}", PLUGIN).stdout.strip()
    assert enabled == "true", f"plugin {PLUGIN} not enabled: {enabled}"
    return f"created from build/plugin and enabled in {time.monotonic() - start:.1f} s"


@check(essential=True)
def swarm_network(world: World) -> str:
    start = time.monotonic()
    world.swarm.create_network(NETWORK, "--ipam-driver", PLUGIN, "--attachable", "--subnet", SUBNET)
    net = world.swarm.wait_network(NETWORK, timeout=120)
    world.host.docker("run", "-d", "--init", "--name", CLIENT, "--network", NETWORK, images.IMAGE,
                      "sleep", "3600", timeout=TASK_TIMEOUT)
    world.baseline = _state(world)
    return (f"network {net['Id'][:12]} (vni {net['Options']['vni']}) and the client container in "
            f"{time.monotonic() - start:.1f} s; baseline: {len(world.baseline)} keys and links")


@check(essential=True)
def service_gets_a_vip(world: World) -> str:
    start = time.monotonic()
    world.swarm.create_service(SERVICE, "--network", NETWORK, "--replicas", str(world.replicas), *HTTPD)
    world.swarm.wait_tasks(SERVICE, {world.host.name: world.replicas}, timeout=TASK_TIMEOUT)
    spec = json.loads(world.host.docker("service", "inspect", "--format", "{{json .}}", SERVICE).stdout)
    mode = spec["Endpoint"]["Spec"].get("Mode")
    net_id = world.swarm.network(NETWORK)["Id"]
    vips = [v["Addr"] for v in spec["Endpoint"].get("VirtualIPs", []) if v["NetworkID"] == net_id]
    assert mode == "vip" and len(vips) == 1, f"endpoint mode {mode}, VIPs on {NETWORK}: {vips}"
    world.vip = vips[0].split("/")[0]
    assert world.vip.startswith("10.200.60."), f"VIP {world.vip} is not from {SUBNET}"
    ipam = world.lab.etcd.keys(schema.PREFIX + "/ipam/addresses/")
    assert any(key.endswith("/" + world.vip) for key in ipam), f"VIP {world.vip} not held in etcd: {ipam}"
    lb = [line for line in world.host.docker("network", "inspect", "--format",
                                             "{{range $k, $v := .Containers}}{{$k}} {{$v.Name}} {{$v.IPv4Address}}\n"
                                             "{{end}}", NETWORK).stdout.splitlines() if "lb-" in line]
    return (f"{world.replicas} task(s) running in {time.monotonic() - start:.1f} s, mode vip, VIP {world.vip} "
            f"held by the vxnet IPAM; load-balancer endpoint: {lb or 'none'}")


@check()
def name_resolves_to_the_vip(world: World) -> str:
    got: Set[str] = set()

    def resolved() -> bool:
        got.clear()
        got.update(resolve(world.host, CLIENT, SERVICE))
        return got == {world.vip}

    try:
        wait_until(resolved, 60, f"{SERVICE} to resolve to {world.vip}", interval=0.5)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}; it resolves to {got}") from None
    tasks = resolve(world.host, CLIENT, f"tasks.{SERVICE}")
    assert world.vip not in tasks and len(tasks) == world.replicas, f"tasks.{SERVICE}: {tasks}"
    return f"{SERVICE} -> {sorted(got)}; tasks.{SERVICE} -> {sorted(tasks)}"


@check()
def vip_not_balanced_by_dockerd(world: World) -> str:
    """Docker's limitation, pinned with its evidence: dockerd creates the load-balancer endpoint (lb-<network>)
    that IPVS lives in only for its builtin overlay driver (moby daemon/network.go: `agent && driver ==
    "overlay"`), so for any plugin driver libnetwork's addLBBackend finds none, logs it and programs nothing: the
    VIP is allocated and in DNS, but nothing answers it. This check fails the day a dockerd balances a plugin's
    VIP: then the test should assert that every replica answers through it."""
    names = _task_names(world)
    # Positive control, same probe and timeout: each replica answers its own name at its own address.
    direct = {name: _get(world, ip) for name, ip in names.items()}
    assert direct == {name: name for name in names}, f"direct requests: {direct}"
    through_vip = [_get(world, world.vip) for _ in range(3)]
    evidence = _lb_evidence(world)
    missing = f"addLBBackend {world.swarm.network(NETWORK)['Id']}/{NETWORK}: Unable to find load balancing endpoint"
    assert not any(through_vip), f"the VIP answered {through_vip}: dockerd balances it now\n{evidence}"
    assert missing in evidence, f"the VIP does not answer, for another reason than dockerd's:\n{evidence}"
    assert f"lb-{NETWORK}" not in evidence.split("network endpoints:")[1].split("\n")[0], evidence
    services = [line for line in _ipvs(world) if line.split()[0] in ("TCP", "UDP", "FWM")]
    assert not services, f"IPVS services in the client's sandbox: {services}\n{evidence}"
    return (f"direct {direct}; through {world.vip}: {through_vip} (no answer); dockerd: '{missing}'; no IPVS "
            f"service in the client's sandbox, no lb-{NETWORK} endpoint")


@check()
def scale_to_zero_and_back(world: World) -> str:
    with_service = _state(world)
    world.host.docker("service", "scale", "--detach", f"{SERVICE}=0", timeout=60)
    world.swarm.wait_tasks(SERVICE, {}, timeout=TASK_TIMEOUT)
    # With no task left, what remains over the baseline is the VIP's address (the service still holds it).
    vip_key = {key for key in world.lab.etcd.keys(schema.PREFIX + "/ipam/addresses/")
               if key.endswith("/" + world.vip)}
    want = world.baseline | vip_key
    last: List[Set[str]] = [set()]

    def settled(target: Set[str]):
        def check_state() -> bool:
            last[0] = _state(world)
            return last[0] == target if target else len(last[0]) == len(with_service)
        return check_state

    try:
        wait_until(settled(want), 60, "the tasks' addresses, endpoints and links to go", interval=0.5)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}; extra: {sorted(last[0] - want)}; missing: {sorted(want - last[0])}") from None
    gone = len(with_service) - len(last[0])
    world.host.docker("service", "scale", "--detach", f"{SERVICE}={world.replicas}", timeout=60)
    world.swarm.wait_tasks(SERVICE, {world.host.name: world.replicas}, timeout=TASK_TIMEOUT)
    wait_until(settled(set()), 60, "the new tasks' addresses, endpoints and links", interval=0.5)
    names = _task_names(world)
    direct = {name: _get(world, ip) for name, ip in names.items()}
    assert direct == {name: name for name in names}, f"direct requests after scaling back: {direct}"
    assert resolve(world.host, CLIENT, SERVICE) == {world.vip}, "the VIP changed when scaling back"
    return (f"scaled to 0: {gone} keys/links went, only the VIP's address stayed over the baseline; back to "
            f"{world.replicas}: as many as before ({len(with_service)}), the replicas answer {sorted(direct)}, "
            f"{SERVICE} still resolves to {world.vip}")


@check()
def removal_leaves_nothing(world: World) -> str:
    world.swarm.remove_services(SERVICE, timeout=TASK_TIMEOUT)
    last: List[Set[str]] = [set()]

    def settled() -> bool:
        last[0] = _state(world)
        return last[0] == world.baseline

    try:
        wait_until(settled, 60, "the service's addresses (tasks and VIP), endpoints and links to go", interval=0.5)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}; extra: {sorted(last[0] - world.baseline)}; "
                             f"missing: {sorted(world.baseline - last[0])}") from None
    world.host.docker("rm", "-f", CLIENT, timeout=60)
    world.swarm.remove_network(NETWORK, timeout=60)
    wait_clean([world.host], world.lab.etcd, timeout=60)
    return "service removed: back to the baseline; client and network removed: no vxnet state left"


CHECK_NAMES = check.names


def main() -> int:
    world = World()
    failures = check.run(world)
    if world.host is not None:
        sys.stdout.write("---- dockerd log (tail) ----\n" + world.host.dockerd_log(80) + "\n")
    errors = []
    if world.swarm is not None:
        errors += world.swarm.teardown()
    if world.host is not None:
        remove_plugin(world.host)
    if world.lab is not None:
        errors += world.lab.teardown()
    if errors:
        print("teardown: " + "; ".join(errors))
    return 1 if failures or errors else 0


if __name__ == "__main__":
    sys.exit(main())
