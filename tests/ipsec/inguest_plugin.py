"""The encrypted network end to end through the real plugin, run inside the qemu guest (a kernel with ESP) by
test_esp_guest.py:

    python3 -m tests.ipsec.inguest_plugin     # inside the guest only

Two simulated hosts of tests/harness (own network, mount and UTS namespaces on an underlay bridge, the test etcd
on the bridge), `python3 -m plugin` in each with the same cluster secret, as `make hosts-up` runs it. The test
plays dockerd's part for `docker network create -d vxnet -o encrypted` and `docker run --network`: the same
NetworkDriver calls over the plugin's socket, and the interface moved into a container namespace the way
libnetwork does it (dockerd itself is too heavy to boot under TCG). Everything else is the product: DataPlane,
PeerSync over etcd, EncryptionManager, the key ring watcher and `vxnet keys`.

The encrypted network is dual-stack (IPv4 and IPv6 pools, each container both addresses), as `docker network
create --ipv6 --subnet ... --subnet fd00:...` makes it: ESP protects the VXLAN UDP between the hosts' IPv4
addresses, so IPv6 inside must cross only as ESP too, which the ipv6_* checks show against a second, unencrypted
dual-stack network (its IPv6 seen in clear by the same capture and probe).

Each check prints one `VXNET-CHECK {...}` line (tests/ipsec/inguest.py's CheckList).

    python3 -m tests.ipsec.inguest_plugin --only ipv6_   # while working on checks: the essential ones, then
                                                         # those whose name starts so (the others do not report)
"""

import base64
import concurrent.futures
import json
import os
import re
import secrets
import select
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

from encrypt.spi import spi_for
from kernel import mtu, names
from kernel.xfrm import Xfrm
from tests.harness.hosts import NSENTER, Host, Lab
from tests.harness.metrics import get, scrape
from tests.harness.plugin import REPO, Plugin
from tests.harness.proc import wait_until
from tests.harness.unixhttp import request
from tests.ipsec import inguest
from tests.ipsec.inguest import Capture, CheckList, Probe, parse_ping

SUBNET, GATEWAY = "10.50.0.0/24", "10.50.0.1/24"
SUBNET6, GATEWAY6 = "fd00:50::/64", "fd00:50::1/64"
OVERLAY = "sec"
CONTAINER_IP = {"h1": "10.50.0.11", "h2": "10.50.0.12"}
CONTAINER_IP6 = {"h1": "fd00:50::11", "h2": "fd00:50::12"}
# The unencrypted dual-stack network of the IPv6 checks' positive control, with its container c2 on each host.
PLAIN = {"overlay": "plain", "subnet": "10.51.0.0/24", "gateway": "10.51.0.1/24", "subnet6": "fd00:51::/64",
         "gateway6": "fd00:51::1/64"}
PLAIN_IP = {"h1": "10.51.0.11", "h2": "10.51.0.12"}
PLAIN_IP6 = {"h1": "fd00:51::11", "h2": "fd00:51::12"}
ENABLE_IPV6 = "com.docker.network.enable_ipv6"
# Under TCG a plugin takes 10-15 s to import and start; two start at once.
START_TIMEOUT = 120


class CallFailed(Exception):
    pass


class Engine:
    """dockerd's side of the remote driver protocol on one host, for networks with addresses it chose itself
    (as with the default IPAM) and for containers that are network namespaces of the host."""

    def __init__(self, name: str, host: Host, plugin: Plugin):
        self.name, self.host, self.plugin = name, host, plugin
        self.endpoints: Dict[str, tuple] = {}  # container -> (network id, endpoint id)

    def call(self, method: str, body: dict) -> dict:
        status, raw = request(self.plugin.socket_path, "POST", f"/NetworkDriver.{method}", body, timeout=60)
        reply = json.loads(raw or b"{}")
        if status != 200 or reply.get("Err"):
            raise CallFailed(f"{self.name} {method}: HTTP {status}: {reply.get('Err')}")
        return reply

    def create_network(self, nid: str, generic: Dict[str, str], subnet: str = SUBNET, gateway: str = GATEWAY,
                       subnet6: str = SUBNET6, gateway6: str = GATEWAY6) -> None:
        """A dual-stack network (`--ipv6` with a v4 and a v6 --subnet): both pools, enable_ipv6 set."""
        self.call("CreateNetwork", {
            "NetworkID": nid, "Options": {"com.docker.network.generic": generic, ENABLE_IPV6: True},
            "IPv4Data": [{"AddressSpace": "LocalDefault", "Pool": subnet, "Gateway": gateway}],
            "IPv6Data": [{"AddressSpace": "LocalDefault", "Pool": subnet6, "Gateway": gateway6}]})

    def run_container(self, container: str, nid: str, ip: str, ip6: str) -> None:
        """CreateEndpoint, Join, then what libnetwork does with the reply: the host end goes into the sandbox,
        renamed to DstPrefix + index, given the endpoint's addresses (the IPv6 one without duplicate address
        detection: libnetwork adds it with IFA_F_NODAD), up."""
        eid = secrets.token_hex(32)
        self.call("CreateEndpoint", {"NetworkID": nid, "EndpointID": eid, "Interface": {
            "Address": f"{ip}/24", "AddressIPv6": f"{ip6}/64", "MacAddress": ""}})
        self.host.run(["ip", "netns", "add", container])
        joined = self.call("Join", {"NetworkID": nid, "EndpointID": eid,
                                    "SandboxKey": f"/run/netns/{container}", "Options": {}})
        src, prefix = joined["InterfaceName"]["SrcName"], joined["InterfaceName"]["DstPrefix"]
        self.host.run(["ip", "link", "set", src, "netns", container])
        self.host.run(["ip", "-n", container, "-batch", "-"], input="\n".join([
            f"link set {src} name {prefix}0",
            f"addr add {ip}/24 dev {prefix}0",
            f"addr add {ip6}/64 dev {prefix}0 nodad",
            f"link set {prefix}0 up",
            "link set lo up",
        ]) + "\n")
        self.endpoints[container] = (nid, eid)

    def remove_container(self, container: str) -> None:
        nid, eid = self.endpoints.pop(container)
        self.call("Leave", {"NetworkID": nid, "EndpointID": eid})
        self.host.run(["ip", "netns", "del", container])  # the sandbox goes, and the veth pair with it
        self.call("DeleteEndpoint", {"NetworkID": nid, "EndpointID": eid})

    def ping(self, container: str, target: str, count: int, interval: float = 0.2, wait: float = 1.0) -> dict:
        return parse_ping(self.ping_output(container, target, count, interval, wait))

    def ping_output(self, container: str, target: str, count: int, interval: float = 0.2, wait: float = 1.0,
                    extra: Sequence[str] = (), quiet: bool = True) -> str:
        """ping's whole output (stdout and stderr; quiet=False keeps the per-packet lines, among them the local
        errors -q hides); IPv6 for an address with a colon."""
        family = ["-6"] if ":" in target else []
        proc = self.host.run(["ip", "netns", "exec", container, "ping", *family, "-n", *(["-q"] if quiet else []),
                              "-c", str(count), "-i", str(interval), "-W", str(wait), *extra, target], check=False,
                             timeout=count * (interval + wait) + 30)
        return proc.stdout + proc.stderr

    def ping_loop(self, container: str, target: str, count: int, interval: float) -> subprocess.Popen:
        return subprocess.Popen(self.host.nsenter + ["--", "ip", "netns", "exec", container, "ping", "-n", "-q",
                                                     "-c", str(count), "-i", str(interval), "-W", "2", target],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def xfrm(self) -> Xfrm:
        return Xfrm(f"/proc/{self.host.anchor.pid}/ns/net")

    def python_in(self, container: str, code: str, *args: str) -> List[str]:
        """argv that runs `python3 -c code args` in one of this host's container namespaces."""
        return self.host.nsenter + ["--", "ip", "netns", "exec", container, sys.executable, "-c", code, *args]


# A TCP exchange over one address: the server sends back what it read until the client's FIN; the client checks it
# got every byte back. 64 KiB each way: full-size segments (MSS = MTU - 60 for IPv6), so a wrong MTU would show.
TCP_ECHO_SERVER = """
import socket, sys
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1)
s.settimeout(60)
print("listening", flush=True)
c, _ = s.accept()
c.settimeout(60)
data = b""
while True:
    chunk = c.recv(65536)
    if not chunk:
        break
    data += chunk
c.sendall(data)
c.close()
"""
TCP_ECHO_CLIENT = """
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
sent = b"vxnet-v6" * 8192
c.sendall(sent)
c.shutdown(socket.SHUT_WR)
got = b""
while True:
    chunk = c.recv(65536)
    if not chunk:
        break
    got += chunk
print(f"echoed {len(got)} of {len(sent)} bytes", "intact" if got == sent else "CORRUPT", flush=True)
"""
TCP_PORT = 5201


class World:
    def __init__(self):
        self.lab: Optional[Lab] = None
        self.engines: Dict[str, Engine] = {}
        self.secret_file = ""
        self.nids = {"h1": secrets.token_hex(32), "h2": secrets.token_hex(32)}
        self.plain_nids: Dict[str, str] = {}  # the unencrypted network's, once ipv6_crosses_the_underlay_... made it
        self.primary = 0
        self.probe: Optional[Probe] = None

    @property
    def h1(self) -> Engine:
        return self.engines["h1"]

    @property
    def h2(self) -> Engine:
        return self.engines["h2"]

    def capture(self) -> Capture:
        """A capture on the underlay bridge, its control frames sent from host 1's underlay interface."""
        if self.probe is None:
            self.probe = Probe(f"/proc/{self.h1.host.anchor.pid}/ns/net", "eth0", self.h1.host.ip, self.h2.host.ip)
        return Capture(self.probe, enter=[NSENTER, "-t", str(self.lab.underlay.anchor.pid), "-n", "--"],
                       iface="br0")

    def sa_packets(self, engine: Engine, src: Engine, dst: Engine) -> int:
        """Packets counted by `engine`'s SAs for the direction src -> dst (every key tag)."""
        xfrm = engine.xfrm()
        try:
            return sum(sa.packets for sa in xfrm.sas() if (sa.src, sa.dst) == (src.host.ip, dst.host.ip))
        finally:
            xfrm.close()

    def outbound_spis(self, engine: Engine, peer: Engine) -> List[int]:
        xfrm = engine.xfrm()
        try:
            return sorted(sa.spi for sa in xfrm.sas() if (sa.src, sa.dst) == (engine.host.ip, peer.host.ip))
        finally:
            xfrm.close()

    def keys_cli(self, *args: str) -> dict:
        """`vxnet keys ... --json` on host 1 (etcd is reachable from the hosts only): its JSON answer."""
        proc = self.h1.host.run([sys.executable, "-m", "cli", "keys", *args, "--etcd", self.lab.etcd.url,
                                 "--secret-file", self.secret_file, "--json"], check=False, cwd=REPO,
                                env=dict(os.environ, PYTHONPATH=REPO))
        assert proc.returncode == 0, f"vxnet keys {' '.join(args)}: {proc.stderr or proc.stdout}"
        return json.loads(proc.stdout)



def _interesting(log: str, lines: int = 40) -> str:
    keep = [line for line in log.splitlines() if " DEBUG " not in line or "peer" in line or "lease" in line]
    return "\n".join(keep[-lines:])


def _loop_result(proc: subprocess.Popen, timeout: float) -> dict:
    out, _ = proc.communicate(timeout=timeout)
    return parse_ping(out)


check = CheckList()


check(essential=True)(inguest.esp_supported)  # the same first check: nothing else can work without it


@check(essential=True)
def plugins_start_with_one_cluster_secret(world: World) -> str:
    started = time.monotonic()
    world.lab = Lab().start()
    hosts = world.lab.add_hosts(2, docker=False, image=False)
    world.secret_file = os.path.join(world.lab.dir, "encryption.key")
    with open(world.secret_file, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    os.chmod(world.secret_file, 0o600)
    for name, host in zip(("h1", "h2"), hosts):
        plugin = Plugin(host, world.lab.etcd.url, {"VXNET_ENCRYPTION_SECRET_FILE": world.secret_file})
        world.engines[name] = Engine(name, host, plugin.start(wait=False))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for future in [pool.submit(e.plugin.wait_ready, START_TIMEOUT) for e in world.engines.values()]:
            future.result()
    for engine in world.engines.values():
        wait_until(lambda: "key ring now" in engine.plugin.log(), 60, f"{engine.name}: the key ring loaded")
    world.primary = world.keys_cli("status")["primary"]
    return f"etcd, two hosts and two plugins up in {time.monotonic() - started:.1f} s; primary key {world.primary}"


@check(essential=True)
def encrypted_network_on_both_hosts(world: World) -> str:
    for name, engine in world.engines.items():
        engine.create_network(world.nids[name], {"overlay": OVERLAY, "encrypted": "true"})
    details = []
    for name, engine in world.engines.items():
        out = engine.host.run(["ip", "-d", "-n", names.netns(world.nids[name]), "link", "show",
                               names.VXLAN]).stdout
        assert f"mtu {mtu.inner_mtu(1500)} " in out, f"{name}: the VXLAN MTU leaves no room for ESP: {out}"
        assert f"dstport {names.ENCRYPTED_VXLAN_PORT} " in out, f"{name}: not on the encrypted port: {out}"
        details.append(f"{name} mtu {mtu.inner_mtu(1500)} dstport {names.ENCRYPTED_VXLAN_PORT}")
    # A third network that would join the overlay unencrypted is refused, naming the option, leaving nothing.
    stray = secrets.token_hex(32)
    try:
        world.h2.create_network(stray, {"overlay": OVERLAY})
        raise AssertionError("an unencrypted member of an encrypted overlay was accepted")
    except CallFailed as exc:
        assert "option encrypted" in str(exc), exc
        refusal = str(exc)
    leftovers = [k for k in world.lab.etcd.keys("/vxnet/") if stray in k]
    assert not leftovers, f"the refused network left keys: {leftovers}"
    assert names.netns(stray) not in world.h2.host.netns(), "the refused network left a namespace"
    return "; ".join(details) + f"; unencrypted member refused: {refusal}"


@check(essential=True)
def containers_talk_across_hosts(world: World) -> str:
    for name, engine in world.engines.items():
        engine.run_container("c1", world.nids[name], CONTAINER_IP[name], CONTAINER_IP6[name])
    started = time.monotonic()
    wait_until(lambda: world.h1.ping("c1", CONTAINER_IP["h2"], 1, wait=1)["received"] == 1, 60,
               "c1 on host 1 to reach c1 on host 2 over the encrypted network")
    result = world.h1.ping("c1", CONTAINER_IP["h2"], 5, interval=0.1)
    assert result["received"] == 5, result
    return f"first reply after {time.monotonic() - started:.1f} s; then {result}"


@check()
def the_underlay_carries_only_esp(world: World) -> str:
    cap = world.capture()
    result = world.h1.ping("c1", CONTAINER_IP["h2"], 10, interval=0.1)
    seen = cap.stop()
    assert result["received"] == 10, result
    assert seen["esp"] >= 20, f"expected ESP both ways: {seen}"
    assert seen["udp_encrypted_port"] == 0 and seen["udp_other"] == 0, f"cleartext VXLAN on the underlay: {seen}"
    return f"ping {result}; underlay {seen}"


PROBE_PINGS = 10


def tcp_exchange(server: Engine, client: Engine, container: str, address: str) -> str:
    """TCP_ECHO_CLIENT in `client`'s container to TCP_ECHO_SERVER in `server`'s, over `address`: the client's
    verdict line ("echoed N of N bytes intact")."""
    srv = subprocess.Popen(server.python_in(container, TCP_ECHO_SERVER, address, str(TCP_PORT)),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        ready, _, _ = select.select([srv.stdout], [], [], 60)  # python's start under TCG takes seconds
        line = srv.stdout.readline() if ready else ""
        assert line.strip() == "listening", f"the TCP server in {server.name}'s {container} did not start: {line!r}"
        done = subprocess.run(client.python_in(container, TCP_ECHO_CLIENT, address, str(TCP_PORT)),
                              capture_output=True, text=True, timeout=120)
        verdict = (done.stdout + done.stderr).strip()
        assert done.returncode == 0 and verdict.endswith("intact"), f"TCP over [{address}]:{TCP_PORT}: {verdict}"
        assert srv.wait(timeout=60) == 0, f"the TCP server exited {srv.returncode}: {srv.stdout.read()}"
        return verdict
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait()
        srv.stdout.close()


def ipv6_probe(world: World, container: str, addresses6: Dict[str, str]) -> str:
    """The IPv6 checks' one probe: PROBE_PINGS ping6 from host 1's container to host 2's, then a TCP exchange
    over host 2's IPv6 address; fails unless every reply and every byte came back."""
    result = world.h1.ping(container, addresses6["h2"], PROBE_PINGS, interval=0.1)
    assert result["received"] == PROBE_PINGS, f"ping6 {addresses6['h2']}: {result}"
    return f"ping6 {result}, TCP {tcp_exchange(world.h2, world.h1, container, addresses6['h2'])}"


def _reaches(world: World, container: str, address: str, what: str) -> float:
    """Seconds until one ping from host 1's container to `address` is answered (60 s deadline)."""
    started = time.monotonic()
    wait_until(lambda: world.h1.ping(container, address, 1, wait=1)["received"] == 1, 60, what)
    return time.monotonic() - started


@check()
def ipv6_crosses_the_underlay_only_as_esp(world: World) -> str:
    """The encrypted dual-stack network's IPv6 (ping6 and TCP between the hosts' containers) crosses the
    underlay as ESP and nothing else. Positive control, same probe and capture: on an unencrypted dual-stack
    network made next to it, the capture sees the same traffic's inner IPv6 echo and TCP in cleartext VXLAN."""
    first = _reaches(world, "c1", CONTAINER_IP6["h2"], "c1's first ping6 across the encrypted network")
    cap = world.capture()
    encrypted = ipv6_probe(world, "c1", CONTAINER_IP6)
    sealed = cap.stop()
    for name, engine in world.engines.items():
        world.plain_nids[name] = secrets.token_hex(32)
        engine.create_network(world.plain_nids[name], {"overlay": PLAIN["overlay"]}, PLAIN["subnet"],
                              PLAIN["gateway"], PLAIN["subnet6"], PLAIN["gateway6"])
        engine.run_container("c2", world.plain_nids[name], PLAIN_IP[name], PLAIN_IP6[name])
    _reaches(world, "c2", PLAIN_IP6["h2"], "c2's first ping6 across the unencrypted network")
    cap = world.capture()
    plain = ipv6_probe(world, "c2", PLAIN_IP6)
    clear = cap.stop()
    assert clear["inner_ipv6_echo"] >= 2 * PROBE_PINGS and clear["inner_ipv6_tcp"] >= 6, (
        f"the capture did not see the unencrypted network's IPv6 in clear (positive control): {clear}")
    assert sealed["udp_encrypted_port"] == sealed["udp_other"] == sealed["inner_ipv6"] == 0, (
        f"cleartext VXLAN on the underlay from the encrypted network: {sealed}")
    assert sealed["esp"] >= 2 * PROBE_PINGS + 6, f"the probe's packets did not cross as ESP: {sealed}"
    return (f"encrypted: first ping6 after {first:.1f} s; {encrypted}; underlay {sealed}. "
            f"Unencrypted: {plain}; underlay {clear}")


@check()
def ipv6_mtu_fits_the_encrypted_network(world: World) -> str:
    """IPv6 has no fragmentation on the way (RFC 8200 5), so the container's MTU must be what fits: a ping6 of
    exactly the inner MTU with fragmentation forbidden (-M do) crosses, as ESP packets of exactly the underlay's
    1500 bytes; one byte more is refused at the sender, which names that MTU."""
    inner = mtu.inner_mtu(1500)
    size = inner - 40 - 8  # IPv6 header 40, ICMPv6 echo header 8
    cap = world.capture()
    fits = world.h1.ping_output("c1", CONTAINER_IP6["h2"], 3, 0.1, extra=["-s", str(size), "-M", "do"],
                                quiet=False)
    over = world.h1.ping_output("c1", CONTAINER_IP6["h2"], 3, 0.1, extra=["-s", str(size + 1), "-M", "do"],
                                quiet=False)
    seen = cap.stop()
    assert parse_ping(fits)["received"] == 3, f"a full-size ping6 ({inner} bytes) did not cross: {fits}"
    assert seen["max_ip_len"] == 1500, f"largest underlay packet {seen['max_ip_len']}, expected 1500: {seen}"
    assert seen["udp_encrypted_port"] == seen["udp_other"] == 0, f"cleartext VXLAN on the underlay: {seen}"
    refused = re.search(r"message too long, mtu[:=] ?(\d+)", over)
    assert parse_ping(over)["received"] == 0 and refused and int(refused.group(1)) == inner, (
        f"one byte over the inner MTU {inner} was not refused at the sender: {over}")
    return f"ping6 -s {size} -M do: {parse_ping(fits)}, underlay max {seen['max_ip_len']} bytes; -s {size + 1}: " \
           f"{refused.group(0)}"


@check()
def sa_counters_rise(world: World) -> str:
    h1, h2 = world.h1, world.h2
    before = (world.sa_packets(h1, h1, h2), world.sa_packets(h2, h1, h2))
    result = h1.ping("c1", CONTAINER_IP["h2"], 10, interval=0.05)
    after = (world.sa_packets(h1, h1, h2), world.sa_packets(h2, h1, h2))
    sent, received = after[0] - before[0], after[1] - before[1]
    assert result["received"] == 10, result
    assert sent >= 10 and received >= 10, f"SA packets host1->host2: out +{sent} on host 1, in +{received} on host 2"
    spi = spi_for(h1.host.ip, h2.host.ip, world.primary)
    assert world.outbound_spis(h1, h2) == [spi], f"outbound SA is not the primary key's {spi:#x}"
    return f"host 1 out +{sent}, host 2 in +{received} (spi {spi:#010x})"


@check()
def sas_gone_traffic_stops(world: World) -> str:
    """Every SA of host 1 deleted behind the plugin's back while it is frozen (SIGSTOP, so nothing repairs them):
    the policies and the firewall still hold, so nothing crosses, in clear or at all. Thawed, the plugin's
    reconciler puts them back and traffic resumes within 2 s."""
    with world.h1.plugin.frozen():
        world.h1.host.run(["ip", "xfrm", "state", "flush"])
        cap = world.capture()
        result = world.h1.ping("c1", CONTAINER_IP["h2"], 3, interval=0.3)
        seen = cap.stop()
    assert result["received"] == 0, f"traffic flowed without SAs: {result}"
    assert seen["udp_encrypted_port"] == 0 and seen["udp_other"] == 0, f"cleartext VXLAN on the underlay: {seen}"
    took = _resumes(world, "traffic after the thawed plugin repaired the flushed SAs")
    return f"frozen: ping {result}; underlay {seen}; thawed: traffic back after {took:.2f} s"


def _resumes(world: World, what: str) -> float:
    """Poll host 1's one-ping probe with a 2 s deadline (the self-healing bound); returns the time it took."""
    started = time.monotonic()
    wait_until(lambda: world.h1.ping("c1", CONTAINER_IP["h2"], 1, wait=1)["received"] == 1, 2.0, what,
               interval=0.05)
    return time.monotonic() - started


def _status_differences(engine: Engine):
    """`vxnet status --json` on the engine's host: (exit status, its differences as (kind, object, want, have))."""
    code, data = engine.plugin.cli_json("status")
    return code, [(d["kind"], d["object"], d["want"], d["have"]) for d in data["this_host"]["differences"]]


@check()
def a_deleted_sa_comes_back_by_itself(world: World) -> str:
    """`ip xfrm state delete` of host 1's outbound SA: with the plugin frozen the same probe fails (negative
    control), and after SIGCONT traffic resumes within 2 s; then with the plugin running, within 2 s too. The
    repair is in the plugin's log."""
    h1, h2 = world.h1, world.h2
    spi = spi_for(h1.host.ip, h2.host.ip, world.primary)
    delete = ["ip", "xfrm", "state", "delete", "src", h1.host.ip, "dst", h2.host.ip, "proto", "esp", "spi",
              f"{spi:#010x}"]
    assert h1.ping("c1", CONTAINER_IP["h2"], 1, wait=1)["received"] == 1, "traffic before (positive control)"
    missing = ("sa", f"{h1.host.ip} -> {h2.host.ip}", "present", None)
    assert missing not in _status_differences(h1)[1], "vxnet status: the outbound SA is there before"
    repairs = get(scrape(h1.host), "vxnet_repairs_total", kind="sa")
    with h1.plugin.frozen():
        h1.host.run(delete)
        frozen = h1.ping("c1", CONTAINER_IP["h2"], 1, wait=1)
        assert frozen["received"] == 0, f"traffic flowed without the outbound SA: {frozen}"
        # The drift while it lasts, as `vxnet status` on host 1 shows it (it reads etcd and the kernel itself).
        code, during = _status_differences(h1)
        assert code == 1 and missing in during, during
    thawed = _resumes(world, "traffic after the thawed plugin repaired the deleted SA")
    wait_until(lambda: missing not in _status_differences(h1)[1], 10, "vxnet status without the SA difference")
    assert get(scrape(h1.host), "vxnet_repairs_total", kind="sa") >= repairs + 1, "the repair counter moved"
    h1.host.run(delete)
    running = _resumes(world, "traffic after the running plugin repaired the deleted SA")
    wait_until(lambda: "repair kind=sa where=host" in h1.plugin.log(5000), 10, "the SA repair in host 1's log")
    assert world.outbound_spis(h1, h2) == [spi]
    return f"frozen: {frozen}; back {thawed:.2f} s after thawing; running: back after {running:.2f} s"


@check()
def ipv6_cleartext_from_a_peer_is_dropped(world: World) -> str:
    """Host 1 loses every protection behind its frozen plugin (SAs, policies and its fail-closed table), so its
    VXLAN leaves in clear: the capture sees the inner IPv4 and IPv6 echo requests cross (the control that the
    probe sent cleartext), and host 2's input rule drops both families alike (its cleartext counter, no reply).
    Thawed, host 1's plugin puts everything back and both families flow again."""
    h1, h2 = world.h1, world.h2

    def dropped() -> float:
        return get(scrape(h2.host), "vxnet_dropped_packets_total", reason="cleartext")

    repairs = get(scrape(h1.host), "vxnet_repairs_total", kind="ipsec-firewall")
    with h1.plugin.frozen():
        h1.host.run(["ip", "xfrm", "state", "flush"])
        h1.host.run(["ip", "xfrm", "policy", "flush"])
        h1.host.run(["nft", "delete", "table", "inet", names.IPSEC_TABLE])
        cap = world.capture()
        before = dropped()
        v4 = h1.ping("c1", CONTAINER_IP["h2"], 3, interval=0.3)
        after_v4 = dropped()
        v6 = h1.ping("c1", CONTAINER_IP6["h2"], 3, interval=0.3)
        after_v6 = dropped()
        seen = cap.stop()
    assert seen["inner_ipv4"] >= 3 and seen["inner_ipv6_echo"] >= 3, f"host 1 sent no cleartext: {seen}"
    assert v4["received"] == 0 and after_v4 - before >= 3, f"IPv4 cleartext: {v4}, dropped +{after_v4 - before}"
    assert v6["received"] == 0 and after_v6 - after_v4 >= 3, f"IPv6 cleartext: {v6}, dropped +{after_v6 - after_v4}"
    # How fast self-healing is, a_deleted_sa_comes_back_by_itself bounds; here it is only the way back.
    back = _reaches(world, "c1", CONTAINER_IP["h2"], "IPv4 after host 1's plugin repaired its SAs, policies, table")
    back6 = _reaches(world, "c1", CONTAINER_IP6["h2"], "IPv6 after the repair")
    assert get(scrape(h1.host), "vxnet_repairs_total", kind="ipsec-firewall") >= repairs + 1, "no table repair"
    return (f"underlay {seen}; host 2 dropped IPv4 +{after_v4 - before:.0f} ({v4}), IPv6 +{after_v6 - after_v4:.0f} "
            f"({v6}); repaired: IPv4 back after {back:.2f} s, IPv6 after {back6:.2f} s")


@check()
def metrics_count_the_sas_the_key_age_and_cleartext_dropped(world: World) -> str:
    """/metrics (scraped inside each host, as a Prometheus there would): each host has its three SAs (inbound
    for both keys of the ring, outbound for the primary; host 1's put back by self-healing after the deletions
    above). Then host 1's policies go too, with its plugin frozen (else self-healing puts them back before the
    pings): its VXLAN now leaves without IPsec and the fail-closed rule drops it, which
    vxnet_dropped_packets_total{reason="cleartext"} counts. Control: host 2's count of cleartext stays where it
    was (nothing reached it), and the underlay carries no cleartext."""
    h1, h2 = world.h1, world.h2
    before = {e.name: scrape(e.host) for e in (h1, h2)}
    assert get(before["h1"], "vxnet_ipsec_sas") == len(_sas(h1)) == 3, _sas(h1)  # put back by self-healing
    assert get(before["h2"], "vxnet_ipsec_sas") == len(_sas(h2)) == 3, _sas(h2)
    ages = [get(before[name], "vxnet_ipsec_key_age_seconds") for name in ("h1", "h2")]
    assert all(age > 0 for age in ages) and abs(ages[0] - ages[1]) < 60, ages  # one ring, one rotation time
    cleartext = {name: get(samples, "vxnet_dropped_packets_total", reason="cleartext")
                 for name, samples in before.items()}
    with h1.plugin.frozen():  # or self-healing puts the policies back before the pings
        h1.host.run(["ip", "xfrm", "policy", "flush"])
        cap = world.capture()
        result = h1.ping("c1", CONTAINER_IP["h2"], 3, interval=0.3)
        seen = cap.stop()
    assert result["received"] == 0, f"traffic flowed without SAs and policies: {result}"
    assert seen["udp_encrypted_port"] == 0 and seen["udp_other"] == 0, f"cleartext VXLAN on the underlay: {seen}"
    wait_until(lambda: get(scrape(h1.host), "vxnet_dropped_packets_total", reason="cleartext") >=
               cleartext["h1"] + 3, 10, "host 1's cleartext drop counter to count the pings")
    after = {e.name: scrape(e.host) for e in (h1, h2)}
    assert get(after["h2"], "vxnet_dropped_packets_total", reason="cleartext") == cleartext["h2"]
    dropped = get(after["h1"], "vxnet_dropped_packets_total", reason="cleartext") - cleartext["h1"]
    return (f"SAs h1 3, h2 3; key age {ages[0]:.0f} s / {ages[1]:.0f} s; policies flushed: ping {result}, "
            f"cleartext dropped on h1 +{dropped:.0f}, h2 +0; underlay {seen}")


@check()
def restart_restores_the_sas(world: World) -> str:
    """The SAs deleted while the plugin is stopped: start-up reconciliation puts them back."""
    code = world.h1.plugin.stop()
    assert code == 0, f"the plugin exited {code} on SIGTERM"
    world.h1.host.run(["ip", "xfrm", "state", "flush"])
    world.h1.plugin.start(timeout=START_TIMEOUT)
    started = time.monotonic()
    wait_until(lambda: world.h1.ping("c1", CONTAINER_IP["h2"], 1, wait=1)["received"] == 1, 60,
               "traffic after host 1's plugin restarted")
    spi = spi_for(world.h1.host.ip, world.h2.host.ip, world.primary)
    assert world.outbound_spis(world.h1, world.h2) == [spi]
    return f"start-up reconciliation put the SAs back; traffic {time.monotonic() - started:.1f} s after it answered"


@check()
def restart_under_traffic_loses_nothing(world: World) -> str:
    count = 300
    cap = world.capture()
    loop = world.h1.ping_loop("c1", CONTAINER_IP["h2"], count, 0.05)
    started = time.monotonic()
    code = world.h2.plugin.restart(timeout=START_TIMEOUT)
    took = time.monotonic() - started
    result = _loop_result(loop, count * 0.5 + 60)
    seen = cap.stop()
    assert code == 0, f"the plugin exited {code} on SIGTERM"
    assert result["received"] == result["sent"] == count, (
        f"loss while host 2's plugin restarted ({took:.1f} s to answer again): {result}\n"
        f"--- host 1 ---\n{_interesting(world.h1.plugin.log(400))}\n"
        f"--- host 2 ---\n{_interesting(world.h2.plugin.log(400))}")
    assert seen["udp_encrypted_port"] == 0 and seen["udp_other"] == 0, f"cleartext VXLAN on the underlay: {seen}"
    assert seen["esp"] >= 2 * count, f"the capture missed ESP: {2 * count} packets crossed, saw {seen}"
    return f"host 2's plugin restarted during {result}; underlay {seen}"


@check()
def rotation_and_prune_by_cli_lose_nothing(world: World) -> str:
    h1, h2 = world.h1, world.h2
    count = 400
    cap = world.capture()
    before = world.sa_packets(h1, h1, h2)
    loop = h1.ping_loop("c1", CONTAINER_IP["h2"], count, 0.05)
    wait_until(lambda: world.sa_packets(h1, h1, h2) >= before + 10, 60, "some traffic on the old key first")
    rotated = world.keys_cli("rotate", "--min-age", "0")
    new = rotated["primary"]
    assert rotated["rotated"] and new != world.primary, rotated
    want = {"h1": spi_for(h1.host.ip, h2.host.ip, new), "h2": spi_for(h2.host.ip, h1.host.ip, new)}
    wait_until(lambda: world.outbound_spis(h1, h2) == [want["h1"]] and world.outbound_spis(h2, h1) == [want["h2"]],
               60, "both plugins to send with the new primary key")
    pruned = world.keys_cli("prune")
    old_in = spi_for(h2.host.ip, h1.host.ip, world.primary)
    wait_until(lambda: old_in not in [sa.spi for sa in _sas(h1)], 60, "host 1 to drop the pruned key's SAs")
    result = _loop_result(loop, count * 0.5 + 60)
    seen = cap.stop()
    assert result["received"] == result["sent"] == count, f"loss across rotation and prune: {result}"
    assert seen["udp_encrypted_port"] == 0 and seen["udp_other"] == 0, f"cleartext VXLAN on the underlay: {seen}"
    assert seen["esp"] >= 2 * count, f"the capture missed ESP: {2 * count} packets crossed, saw {seen}"
    world.primary = new
    return f"{rotated}; {pruned}; ping {result}; underlay {seen}"


def _sas(engine: Engine):
    xfrm = engine.xfrm()
    try:
        return xfrm.sas()
    finally:
        xfrm.close()


@check()
def no_key_material_in_logs_or_argv(world: World) -> str:
    """The cluster secret and every SA key in the kernel, in hex and base64, appear in neither plugin's log nor
    in any process's command line."""
    with open(world.secret_file) as f:
        secrets_seen = [f.read().strip()]
    for engine in world.engines.values():
        secrets_seen += [sa.key.hex() for sa in _sas(engine)]
    needles = set(secrets_seen) | {base64.b64encode(bytes.fromhex(h)).decode() for h in secrets_seen}
    needles |= {n[:16] for n in needles}  # a fragment is a leak too
    logs = {e.name: e.plugin.log(100000) for e in world.engines.values()}
    argv = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv.append(f.read().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                pass
    for needle in needles:
        for name, text in logs.items():
            assert needle not in text, f"key material in {name}'s plugin log"
        assert not any(needle in line for line in argv), "key material in a command line"
    return (f"{len(secrets_seen) - 1} SA keys and the secret: in none of {sum(len(t) for t in logs.values())} "
            f"bytes of plugin logs (debug level) nor {len(argv)} command lines")


@check()
def removing_everything_leaves_nothing(world: World) -> str:
    for name, engine in world.engines.items():
        engine.remove_container("c1")
        engine.call("DeleteNetwork", {"NetworkID": world.nids[name]})
        if name in world.plain_nids:
            engine.remove_container("c2")
            engine.call("DeleteNetwork", {"NetworkID": world.plain_nids[name]})
    for name, engine in world.engines.items():
        xfrm = engine.xfrm()
        try:
            sas, policies = xfrm.sas(), xfrm.policies()
        finally:
            xfrm.close()
        assert not sas and not policies, f"{name}: SAs {sas} policies {policies} left"
        left = [ns for ns in engine.host.netns() if ns.startswith("vxnet-")]
        assert not left, f"{name}: namespaces left: {left}"
    # What a live host keeps whatever its networks: its record and health-overlay address (under its lease), and
    # the cluster's key ring.
    keys = [k for k in world.lab.etcd.keys("/vxnet/v1/")
            if not k.startswith(("/vxnet/v1/hosts/", "/vxnet/v1/health/", "/vxnet/v1/encryption/",
                                 "/vxnet/v1/schema"))]
    assert not keys, f"etcd keys left: {keys}"
    return "no SA, no policy, no namespace, no etcd key of the networks on either host"


CHECK_NAMES = check.names


def main(argv: Sequence[str] = ()) -> int:
    """argv: `--only PREFIX`: the essential checks and those whose name starts with PREFIX (by hand only)."""
    world = World()
    try:
        if list(argv[:1]) == ["--only"] and len(argv) == 2:
            return check.run(world, only=argv[1])
        if argv:
            raise SystemExit(f"usage: python3 -m tests.ipsec.inguest_plugin [--only PREFIX], not {list(argv)}")
        return check.run(world)
    finally:
        if world.probe is not None:
            world.probe.close()  # it holds host 1's network namespace
        if world.lab is not None:
            errors = world.lab.teardown()
            if errors:
                print(f"teardown: {errors}", flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
