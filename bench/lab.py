"""The benchmark's two simulated Docker hosts and what the parts share on them.

    host1 (192.168.251.11, Swarm manager)  ---- underlay bridge ----  host2 (192.168.251.12, worker)

- Swarm of the two hosts, for Docker's built-in overlay (`bench-builtin`, attachable) and vxnet's swarm network;
- vxnet as a host process in each host (legacy socket `vxnet`, local scope) with `bench-vx` on both hosts
  joined into one overlay by `-o overlay=bench`, as tests/e2e/test_multihost.py does;
- one sleeper container per host on each network (`<network>-1` on host1, `<network>-2` on host2).

Subnets are in 10.200.40.0-10.200.63.255 (inside the harness's test range, apart from the tests' own).
Teardown: containers, networks (while the plugins answer), plugins, Swarm; the Lab then stops dockerd and the
namespaces by PID.
"""

import os
import time
from typing import Dict, List, Optional

from bench.common import Background, container_pid, wait_reachable
from tests.harness.containers import addresses, network_id, run_sleeper
from tests.harness.hosts import SWARM_ADDR_POOL, Host, Lab
from tests.harness.plugin import REPO, Plugin

VX_NET, VX_SUBNET, VX_OVERLAY = "bench-vx", "10.200.40.0/24", "bench"
BUILTIN_NET, BUILTIN_SUBNET = "bench-builtin", "10.200.41.0/24"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class BenchLab:
    def __init__(self, quiet_plugin: bool = True, underlay_mtu: int = 1500):
        """quiet_plugin: the plugins log at info level (debug logs every call with its duration, which costs a
        little; bench --plugin-timings turns it on to read those durations)."""
        self.lab: Optional[Lab] = None
        self.h1: Optional[Host] = None
        self.h2: Optional[Host] = None
        self.bg: Optional[Background] = None
        self.plugins: Dict[str, Plugin] = {}  # host name -> host-process plugin
        self.swarm = False
        self.networks: List[tuple] = []  # (host, name) made here, removed at teardown
        self.quiet_plugin = quiet_plugin
        self.underlay_mtu = underlay_mtu  # vxnet's networks take theirs from it; Docker's overlay stays at 1450

    @property
    def plugin_log_level(self) -> str:
        return "info" if self.quiet_plugin else "debug"

    @property
    def hosts(self) -> List[Host]:
        return [self.h1, self.h2]

    def start(self) -> "BenchLab":
        self.lab = Lab(underlay_mtu=self.underlay_mtu).start()
        self.bg = Background(os.path.join(REPO, "build", "bench", "logs"))
        self.h1, self.h2 = self.lab.add_hosts(2)
        return self

    # --- Swarm and the built-in overlay -------------------------------------------------------------------------
    def ensure_swarm(self) -> None:
        if self.swarm:
            return
        self.h1.docker("swarm", "init", "--advertise-addr", self.h1.ip, "--listen-addr", f"{self.h1.ip}:2377",
                       "--default-addr-pool", SWARM_ADDR_POOL, timeout=60)
        self.swarm = True
        token = self.h1.docker("swarm", "join-token", "-q", "worker").stdout.strip()
        self.h2.docker("swarm", "join", "--advertise-addr", self.h2.ip, "--listen-addr", f"{self.h2.ip}:2377",
                       "--token", token, f"{self.h1.ip}:2377", timeout=60)

    def ensure_builtin(self) -> None:
        """Docker's overlay, attachable, with one sleeper on each host."""
        self.ensure_swarm()
        if not self._has_network(self.h1, BUILTIN_NET):
            self.h1.docker("network", "create", "-d", "overlay", "--attachable", "--subnet", BUILTIN_SUBNET,
                           BUILTIN_NET)
            self.networks.append((self.h1, BUILTIN_NET))
        self.ensure_sleepers(BUILTIN_NET)

    # --- vxnet as a host process ---------------------------------------------------------------------------------
    def start_plugins(self) -> None:
        env = {"VXNET_LOG_LEVEL": self.plugin_log_level}
        for host in self.hosts:
            if host.name not in self.plugins:
                self.plugins[host.name] = Plugin(host, self.lab.etcd.url, env).start()

    def stop_plugins(self) -> None:
        for name, plugin in list(self.plugins.items()):
            plugin.stop()
            del self.plugins[name]

    def vx_network(self, name: str, subnet: str, overlay: str, *options: str) -> Dict[str, str]:
        """The same vxnet overlay on both hosts (local scope), with more `-o KEY=VALUE` options if given (e.g.
        policy=deny); returns host name -> its network ID."""
        self.start_plugins()
        ids = {}
        for host in self.hosts:
            if not self._has_network(host, name):
                host.docker("network", "create", "-d", "vxnet", "--ipam-driver", "vxnet", "--subnet", subnet,
                            "-o", f"overlay={overlay}", *[a for o in options for a in ("-o", o)], name)
                self.networks.append((host, name))
            ids[host.name] = network_id(host, name)
        return ids

    def ensure_vx(self) -> None:
        self.vx_network(VX_NET, VX_SUBNET, VX_OVERLAY)
        self.ensure_sleepers(VX_NET)

    # --- containers ----------------------------------------------------------------------------------------------
    def ensure_sleepers(self, network: str) -> None:
        for i, host in enumerate(self.hosts, 1):
            name = f"{network}-{i}"
            if host.docker("container", "inspect", name, check=False).returncode != 0:
                run_sleeper(host, name, network)

    def endpoints(self, network: str):
        """(client pid on host1, server pid on host2, server's address) of the network's two sleepers."""
        client = container_pid(self.h1, f"{network}-1")
        server = container_pid(self.h2, f"{network}-2")
        ip = addresses(self.h2, f"{network}-2")[network]
        wait_reachable(client, ip, f"{network}-1 on host1 to reach {network}-2 ({ip}) on host2")
        return client, server, ip

    def remove_network(self, host: Host, name: str) -> None:
        ids = host.docker("ps", "-aq", "--filter", f"network={name}").stdout.split()
        if ids:
            host.docker("rm", "-f", *ids, timeout=60)
        if self._has_network(host, name):
            host.docker("network", "rm", name, timeout=60)
        if (host, name) in self.networks:
            self.networks.remove((host, name))

    @staticmethod
    def _has_network(host: Host, name: str) -> bool:
        return host.docker("network", "inspect", name, check=False).returncode == 0

    # --- teardown ------------------------------------------------------------------------------------------------
    def teardown(self) -> List[str]:
        errors: List[str] = []
        if self.bg:
            errors += self.bg.stop_all()
        if self.lab is None:
            return errors
        for host in [h for h in self.hosts if h and h.dockerd and h.dockerd.alive()]:
            try:
                ids = host.docker("ps", "-aq", timeout=20).stdout.split()
                if ids:
                    host.docker("rm", "-f", *ids, timeout=60, check=False)
            except Exception as exc:
                errors.append(f"{host.name}: remove containers: {exc}")
        # Networks go on the host that made them (a swarm network on the manager), workers' last.
        for host, name in reversed(list(self.networks)):
            try:
                host.docker("network", "rm", name, timeout=60, check=False)
            except Exception as exc:
                errors.append(f"{host.name}: network rm {name}: {exc}")
        for host in [h for h in self.hosts if h and h.dockerd and h.dockerd.alive()]:
            for plugin in host.docker("plugin", "ls", "-q", check=False).stdout.split():
                host.docker("plugin", "disable", "-f", plugin, check=False, timeout=30)
                host.docker("plugin", "rm", "-f", plugin, check=False, timeout=30)
        try:
            self.stop_plugins()
        except Exception as exc:
            errors.append(f"stop plugins: {exc}")
        if self.swarm:
            for host in reversed([h for h in self.hosts if h and h.dockerd and h.dockerd.alive()]):
                host.docker("swarm", "leave", "--force", check=False, timeout=30)
        errors += self.lab.teardown()
        return errors
