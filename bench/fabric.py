"""The forwarding fabric's cost on a small case: `python3 -m bench.fabric` (root; no dockerd, no plugin).

One namespace made as netdriver/sandbox.py makes a network's: root bridge br0 with a VXLAN device (no remote: what
it is sent is counted and dropped), leaf br1 joined by a veth trunk, and container namespaces: a and b on br0, c
on br1, plus IDLE idle endpoints on br1. Two ways to run the same topology:
  static    vxnet's: learning off everywhere, static entries (mac -> port on its bridge, mac -> trunk on the
            root), unknown unicast flooded only up the leaf's trunk and out of the VXLAN device;
  learning  the bridge's defaults: every port learns and floods unknown unicast.
For each: ping RTT a->b (one bridge) and a->c (across the trunk), iperf3 a->c, and the copies one frame to an
unknown MAC costs (sent from c: how many ports transmit it). Everything it makes is removed at the end.
"""

import json
import os
import re
import statistics
import subprocess
import sys
from typing import Dict, List

IDLE = 50
PREFIX = f"vxfab{os.getpid() % 10000}"


def sh(*argv: str, check: bool = True) -> str:
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=120).stdout


def build(mode: str) -> Dict[str, str]:
    """The topology of the module docstring, in `mode` ("static" or "learning"); returns endpoint -> MAC."""
    ns = f"{PREFIX}-ns"
    sh("ip", "netns", "add", ns)
    # No IPv6 on any device made here (as vxnet's namespaces make none): the idle endpoints' DAD and MLD would
    # be multicast flooded to every port, in both modes, and blur the copies counted.
    sh("ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv6.conf.default.disable_ipv6=1")
    batch = [f"link add br{k} type bridge mcast_snooping 0" for k in (0, 1)]
    batch += ["link add vxlan0 type vxlan id 4242 dstport 4789 nolearning", "link set vxlan0 master br0",
              "link add vxtr1 type veth peer name vxtl1", "link set vxtr1 master br0", "link set vxtl1 master br1"]
    subprocess.run(["ip", "-n", ns, "-batch", "-"], input="\n".join(batch) + "\n", text=True, check=True)
    macs = {}
    ends = [("a", 0, 2), ("b", 0, 3), ("c", 1, 4)] + [(f"i{n}", 1, 10 + n) for n in range(IDLE)]
    cmds = []
    for name, k, last in ends:
        mac = f"02:42:0a:63:00:{last:02x}"
        macs[name] = mac
        port = f"vxp{name}"
        if name in ("a", "b", "c"):
            sh("ip", "netns", "add", f"{PREFIX}-{name}")
            sh("ip", "netns", "exec", f"{PREFIX}-{name}", "sysctl", "-q", "-w",
               "net.ipv6.conf.default.disable_ipv6=1")
            cmds.append(f"link add {port} type veth peer name eth0 netns {PREFIX}-{name} address {mac}")
        else:
            cmds.append(f"link add {port} type veth peer name e{name} address {mac}")
            cmds.append(f"link set e{name} up")
        cmds += [f"link set {port} master br{k}", f"link set {port} up"]
    cmds += ["link set br0 up", "link set br1 up", "link set vxlan0 up", "link set vxtr1 up", "link set vxtl1 up"]
    subprocess.run(["ip", "-n", ns, "-batch", "-"], input="\n".join(cmds) + "\n", text=True, check=True)
    if mode == "static":
        fdb = []
        lines = []
        for name, k, _ in ends:
            lines.append(f"link set dev vxp{name} learning off flood off")
            fdb.append(f"fdb replace {macs[name]} dev vxp{name} master static")
            if k:
                fdb.append(f"fdb replace {macs[name]} dev vxtr1 master static")
        lines += ["link set dev vxtr1 learning off flood off", "link set dev vxtl1 learning off flood on",
                  "link set dev vxlan0 learning off flood on"]
        subprocess.run(["bridge", "-n", ns, "-batch", "-"], input="\n".join(lines + fdb) + "\n", text=True,
                       check=True)
    for name, _, last in ends[:3]:
        c = f"{PREFIX}-{name}"
        sh("ip", "-n", c, "addr", "add", f"10.99.0.{last}/24", "dev", "eth0")
        sh("ip", "-n", c, "link", "set", "eth0", "up")
        sh("ip", "-n", c, "link", "set", "lo", "up")
    return macs


def teardown() -> None:
    for name in ("ns", "a", "b", "c"):
        sh("ip", "netns", "del", f"{PREFIX}-{name}", check=False)


def rtt(src: str, dst: str) -> float:
    out = sh("ip", "netns", "exec", f"{PREFIX}-{src}", "ping", "-c", "300", "-i", "0.002", "-q", dst)
    return float(re.search(r"= [\d.]+/([\d.]+)/", out).group(1)) * 1000  # avg in microseconds


def throughput(src: str, dst_ns: str, dst: str) -> float:
    server = subprocess.Popen(["ip", "netns", "exec", f"{PREFIX}-{dst_ns}", "iperf3", "-s", "-1", "-B", dst],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(50):
            if sh("ip", "netns", "exec", f"{PREFIX}-{dst_ns}", "ss", "-ltn").find(f"{dst}:5201") >= 0:
                break
            subprocess.run(["sleep", "0.1"])
        out = sh("ip", "netns", "exec", f"{PREFIX}-{src}", "iperf3", "-c", dst, "-t", "3", "-O", "1", "-J")
        return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9
    finally:
        server.wait(timeout=30)


def tx_packets(ns: str, names: List[str]) -> int:
    listed = json.loads(sh("ip", "-s", "-j", "-n", ns, "link", "show"))
    return sum(link["stats64"]["tx"]["packets"] for link in listed if link["ifname"] in names)


def flood_copies() -> float:
    """Ports transmitting one frame c sends to a MAC no bridge knows (100 frames, averaged)."""
    ns = f"{PREFIX}-ns"
    c = f"{PREFIX}-c"
    sh("ip", "-n", c, "neigh", "replace", "10.99.0.250", "lladdr", "02:00:00:00:00:fa", "dev", "eth0", "nud",
       "permanent")
    ports = [f"vxpi{n}" for n in range(IDLE)] + ["vxpa", "vxpb", "vxlan0", "vxtr1"]
    before = tx_packets(ns, ports)
    sh("ip", "netns", "exec", c, "ping", "-c", "100", "-i", "0.002", "-q", "10.99.0.250", check=False)
    return (tx_packets(ns, ports) - before) / 100


ROUNDS = 3  # the modes alternate, so the machine's load (2 shared cores) hits both alike; medians are printed


def main() -> int:
    results: Dict[str, Dict[str, List[float]]] = {}
    for _ in range(ROUNDS):
        for mode in ("static", "learning"):
            teardown()
            try:
                build(mode)
                sh("ip", "netns", "exec", f"{PREFIX}-a", "ping", "-c", "3", "-i", "0.2", "10.99.0.4")  # warm
                figures = {"rtt one bridge us": rtt("a", "10.99.0.3"), "rtt across trunk us": rtt("a", "10.99.0.4"),
                           "iperf3 one bridge Gbit/s": throughput("a", "b", "10.99.0.3"),
                           "iperf3 across trunk Gbit/s": throughput("a", "c", "10.99.0.4"),
                           "copies of an unknown-unicast frame": flood_copies()}
            finally:
                teardown()
            for key, value in figures.items():
                results.setdefault(mode, {}).setdefault(key, []).append(value)
    for mode, figures in results.items():
        print(mode + ": " + ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in figures.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
