"""What the policy tests (tests/e2e/test_policy*.py) do to containers and read from hosts: TCP probes with
busybox's nc, servers that answer on several ports, probe loops that run inside a container across a plugin
restart, a long-lived connection, the `bridge vxnet_policy` table of a network's namespace, `vxnet` commands run
in a host against the test etcd.

Every probe is bounded by its own short time-out (nc -w); waiting for a probe to change polls with a deadline.
A refused probe (a dropped SYN) takes the whole time-out; a positive one returns as soon as the server's "ok"
arrives, which is also the proof that replies flow back through the destination's policy.
"""

import json
import os
import shutil
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

from kernel import names
from netdriver import policy_nft
from store import schema
from tests.harness.hosts import Host
from tests.harness.plugin import REPO
from tests.harness.proc import run, wait_until

PROBE_S = 1  # nc -w: a SYN the policy drops is retried by the kernel (1 s, RFC 6298's initial RTO) and given up


def serve(host: Host, container: str, *ports: int) -> None:
    """A persistent TCP server per port in the container, each answering every connection with 'ok' (busybox nc
    -ll: listen again after each connection); returns once every port answers on the container's loopback, a
    path no policy sees, so that a refused probe later is the policy's and not a server missing."""
    for port in ports:
        host.docker("exec", "-d", container, "nc", "-ll", "-p", str(port), "-e", "/bin/echo", "ok")
    for port in ports:
        wait_until(lambda: connects(host, container, "127.0.0.1", port), 20,
                   f"{container}'s server on port {port} (loopback)", interval=0.1)


def connects(host: Host, container: str, target: str, port: int, wait_s: int = PROBE_S) -> bool:
    """The one TCP probe of the policy tests: a new connection from the container to target:port, True if the
    server's 'ok' came back over it."""
    proc = host.docker("exec", container, "nc", "-w", str(wait_s), target, str(port), check=False,
                       timeout=wait_s + 30)
    return proc.returncode == 0 and "ok" in proc.stdout


def wait_connects(host: Host, container: str, target: str, port: int, timeout: float = 20.0) -> float:
    """Poll until the probe succeeds; returns the seconds it took."""
    started = time.monotonic()
    wait_until(lambda: connects(host, container, target, port), timeout,
               f"{container} on {host.name} to connect to {target}:{port}", interval=0.1)
    return time.monotonic() - started


def refused(host: Host, container: str, target: str, port: int) -> bool:
    """The probe failed, and by a time-out (a drop), not by a reset or an error of docker exec."""
    started = time.monotonic()
    proc = host.docker("exec", container, "nc", "-w", str(PROBE_S), target, str(port), check=False,
                       timeout=PROBE_S + 30)
    elapsed = time.monotonic() - started
    if proc.returncode == 0 and "ok" in proc.stdout:
        return False
    assert elapsed >= PROBE_S * 0.9, (f"{container} -> {target}:{port} failed in {elapsed:.2f}s, before nc's "
                                      f"time-out (a reset or an error, not a drop): {proc.stderr.strip()}")
    return True


# --- probes inside a container, for the duration of something the test does -------------------------------------------
def start_loop(host: Host, container: str, target: str, port: int, tag: str) -> None:
    """A loop in the container: the probe of connects() again and again, one line per attempt (ok / no) in
    /tmp/<tag>.log, until /tmp/<tag>.stop exists."""
    script = (f"while [ ! -e /tmp/{tag}.stop ]; do "
              f"if nc -w {PROBE_S} {target} {port} </dev/null | grep -q ok; then echo ok; else echo no; fi "
              f">> /tmp/{tag}.log; sleep 0.05; done")  # a breath between attempts: the machine is shared
    host.docker("exec", "-d", container, "sh", "-c", script)


def loop_results(host: Host, container: str, tag: str) -> List[str]:
    out = host.docker("exec", container, "sh", "-c", f"cat /tmp/{tag}.log 2>/dev/null || true").stdout
    return out.split()


def stop_loop(host: Host, container: str, tag: str) -> List[str]:
    """Stop the loop (it finishes its attempt and leaves) and return every result it logged."""
    host.docker("exec", container, "touch", f"/tmp/{tag}.stop")
    return loop_results(host, container, tag)


TICKER = "#!/bin/sh\nwhile :; do echo tick; sleep 0.2; done\n"


def serve_ticker(host: Host, container: str, port: int) -> None:
    """A server that sends 'tick' every 0.2 s on each connection, for as long as it stays up."""
    host.docker("exec", container, "sh", "-c", f"printf '{TICKER}' > /ticker && chmod +x /ticker")
    host.docker("exec", "-d", container, "nc", "-ll", "-p", str(port), "-e", "/ticker")


def open_stream(host: Host, container: str, target: str, port: int) -> None:
    """One long-lived connection to a ticker: what arrives goes to /tmp/stream; /tmp/stream.done gets nc's exit
    status when the connection ends (stdin stays open, so only the connection ending ends nc)."""
    host.docker("exec", "-d", container, "sh", "-c",
                f"sleep 86400 | nc {target} {port} > /tmp/stream; echo $? > /tmp/stream.done")


def stream_ticks(host: Host, container: str) -> Tuple[int, bool]:
    """(ticks received so far, the connection still open)."""
    out = host.docker("exec", container, "sh", "-c",
                      "grep -c tick /tmp/stream 2>/dev/null; [ -e /tmp/stream.done ] && echo done || echo open",
                      check=False).stdout.split()
    return int(out[0]) if out and out[0].isdigit() else 0, out[-1:] == ["open"]


# --- the kernel and etcd side -----------------------------------------------------------------------------------------
def policy_table(host: Host, network_id: str) -> Optional[dict]:
    """The network namespace's `bridge vxnet_policy` table as `nft -j list table` gives it, None when absent (or the
    namespace is)."""
    ns = names.netns(network_id)
    proc = host.run(["ip", "netns", "exec", ns, "nft", "-j", "list", "table", policy_nft.FAMILY,
                     names.POLICY_TABLE], check=False, timeout=30)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def set_elements(table: Optional[dict], name: str) -> List:
    """The elements of one set of the table, as nft's JSON gives them (an address, or {"concat": [...]})."""
    for item in (table or {}).get("nftables", []):
        found = item.get("set")
        if found and found.get("name") == name:
            return found.get("elem", [])
    return []


def allows(host: Host, network_id: str, src: str, dst: str, proto: str, port: int) -> bool:
    """The destination host's kernel holds the allow element src . dst . proto . port."""
    family = "6" if ":" in dst else "4"
    for elem in set_elements(policy_table(host, network_id), "allow" + family):
        concat = elem.get("concat") if isinstance(elem, dict) else None
        if concat and [str(x) for x in concat] == [src, dst, proto, str(port)]:
            return True
    return False


def counter(host: Host, network_id: str, comment: str) -> Optional[int]:
    """Packets counted by the table's rule with that comment (netdriver/policy_nft.py DROP, AUDIT, ...); None when
    the table or the rule is absent."""
    for item in (policy_table(host, network_id) or {}).get("nftables", []):
        rule = item.get("rule")
        if rule and rule.get("comment") == comment:
            for expr in rule.get("expr", []):
                if "counter" in expr:
                    return int(expr["counter"]["packets"])
    return None


def policy_keys(etcd, network_id: Optional[str] = None) -> Dict[str, str]:
    """policy/ keys in etcd (of one network, or all) -> their values."""
    prefix = f"{schema.PREFIX}/policy/" + (f"{network_id}/" if network_id else "")
    return {key: etcd.get(key) for key in etcd.keys(prefix)}


def etcd_revision(etcd) -> int:
    """etcd's current revision: any write anywhere moves it."""
    out = etcd.etcdctl("get", "/", "--prefix", "--keys-only", "--limit=1", "-w", "json").stdout
    return int(json.loads(out)["header"]["revision"])


def cli_root() -> str:
    """The tree `vxnet` runs from: the plugin's (tests/harness/plugin.py: this checkout, or VXNET_PLUGIN_ROOT)."""
    return os.environ.get("VXNET_PLUGIN_ROOT") or REPO


def cli_env(etcd_url: str, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "HOME": os.environ.get("HOME", "/root"),
           "PYTHONPATH": cli_root(), "PYTHONUNBUFFERED": "1", "ETCD_ENDPOINTS": etcd_url,
           "DOCKER_HOST": "unix:///run/docker.sock"}  # the host's own engine, inside its mount namespace
    env.update(extra or {})
    return env


def vxnet(host: Host, etcd_url: str, *args: str, env: Optional[Dict[str, str]] = None, timeout: float = 60):
    """`vxnet ARGS` run inside the host (its Docker engine resolves network names), against the given etcd.
    Never raises on a non-zero exit."""
    return host.run([sys.executable, "-m", "cli", *args], check=False, timeout=timeout,
                    env=cli_env(etcd_url, env), cwd=cli_root())


def allow(host: Host, etcd_url: str, network: str, source: str, dest: str, *ports: str) -> dict:
    """vxnet policy allow ... --json, which must succeed: the rule as the CLI printed it."""
    argv = ["policy", "allow", network, "--from", source, "--to", dest]
    for port in ports:
        argv += ["--port", port]
    done = vxnet(host, etcd_url, *argv, "--json")
    assert done.returncode == 0, f"vxnet {' '.join(argv)}: exit {done.returncode}: {done.stderr}"
    return json.loads(done.stdout)["rule"]


def remove_rule(host: Host, etcd_url: str, network: str, rule_id: str) -> None:
    done = vxnet(host, etcd_url, "policy", "rm", network, rule_id)
    assert done.returncode == 0, f"vxnet policy rm {network} {rule_id}: exit {done.returncode}: {done.stderr}"


def network_created(host: Host, name: str, *argv: str) -> str:
    """docker network create -d vxnet --ipam-driver vxnet ARGV NAME; returns the network's ID."""
    host.docker("network", "create", "-d", "vxnet", "--ipam-driver", "vxnet", *argv, name)
    return host.docker("network", "inspect", "--format", "{{.Id}}", name).stdout.strip()


def compose(path: str, project: str, docker_host: str, *args: str, check: bool = True):
    """docker-compose --no-ansi -p PROJECT -f PATH ARGS against one daemon."""
    binary = shutil.which("docker-compose")
    assert binary, "docker-compose is not installed (make deps / scripts/install-deps.sh installs Debian's)"
    env = dict(os.environ, DOCKER_HOST=docker_host)
    return run([binary, "--no-ansi", "-p", project, "-f", path, *args], env=env, timeout=180, check=check)


def ips(host: Host, container: str, network: str) -> Tuple[str, str]:
    """(IPv4, IPv6) of the container on the network ('' when it has none)."""
    raw = host.docker("inspect", "--format", "{{json .NetworkSettings.Networks}}", container).stdout
    info = json.loads(raw)[network]
    return info["IPAddress"], info.get("GlobalIPv6Address", "")


def all_refused(results: Sequence[str]) -> bool:
    return bool(results) and all(r == "no" for r in results)
