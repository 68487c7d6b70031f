"""Containers of the test image in a simulated host, and the reachability checks tests make between them.

Every check is bounded: one probe has its own short time-out, and waiting for success polls with a deadline.
"""

import json
from typing import Dict

from tests.harness.hosts import Host
from tests.harness.images import IMAGE
from tests.harness.proc import wait_until

TCP_PORT = 7000


def run_sleeper(host: Host, name: str, network: str, *extra: str) -> str:
    """A detached container that only sleeps (`--init`, so it stops at once); returns its ID."""
    return host.docker("run", "-d", "--init", "--name", name, "--network", network, *extra, IMAGE,
                       "sleep", "86400", timeout=120).stdout.strip()


def addresses(host: Host, container: str) -> Dict[str, str]:
    """Network name -> IPv4 address of the container on it."""
    raw = host.docker("inspect", "--format", "{{json .NetworkSettings.Networks}}", container).stdout
    return {net: info["IPAddress"] for net, info in json.loads(raw).items()}


def network_id(host: Host, network: str) -> str:
    return host.docker("network", "inspect", "--format", "{{.Id}}", network).stdout.strip()


def pings(host: Host, container: str, target: str, count: int = 1, wait_s: int = 1) -> bool:
    """One bounded ping from inside the container: True if a reply came back."""
    proc = host.docker("exec", container, "ping", "-c", str(count), "-W", str(wait_s), target, check=False,
                       timeout=count + wait_s + 30)
    return proc.returncode == 0


def wait_ping(host: Host, container: str, target: str, timeout: float = 20.0) -> None:
    """Poll until the container reaches target (first packets may wait for ARP and the plugin's programming)."""
    wait_until(lambda: pings(host, container, target), timeout, f"{container} on {host.name} to ping {target}",
               interval=0.2)


def serve_tcp(host: Host, container: str, port: int = TCP_PORT) -> None:
    """A persistent TCP server in the container that answers every connection with 'ok'."""
    host.docker("exec", "-d", container, "nc", "-ll", "-p", str(port), "-e", "/bin/echo", "ok")


def host_pings(host: Host, target: str, count: int = 1, wait_s: int = 1) -> bool:
    """The same bounded ping as pings(), from the simulated host's own namespace (not a container)."""
    proc = host.run(["ping", "-c", str(count), "-W", str(wait_s), target], check=False,
                    timeout=count + wait_s + 30)
    return proc.returncode == 0


def host_tcp_answers(host: Host, target: str, port: int = TCP_PORT, wait_s: int = 2) -> bool:
    """tcp_answers() from the simulated host's own namespace (netcat-openbsd: -N closes after stdin's end)."""
    proc = host.run(["nc", "-N", "-w", str(wait_s), target, str(port)], check=False, timeout=wait_s + 30,
                    input="")
    return proc.returncode == 0 and "ok" in proc.stdout


def tcp_answers(host: Host, container: str, target: str, port: int = TCP_PORT, wait_s: int = 2) -> bool:
    """True if a TCP connection from the container to target:port got the server's 'ok'."""
    proc = host.docker("exec", container, "nc", "-w", str(wait_s), target, str(port), check=False,
                       timeout=wait_s + 30)
    return proc.returncode == 0 and "ok" in proc.stdout
