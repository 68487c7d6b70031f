"""dockerd's side of the NetworkDriver protocol, for kernel tests that drive the real plugin through its socket
with no dockerd: networks, endpoints joined as dockerd joins them, and "containers" that are namespaces of the
simulated host holding a veth's container end with its addresses."""

import json
import secrets
import time

from kernel import names
from tests.harness.unixhttp import request

TIMEOUT = 5.0  # every probe, positive or negative, waits this long at most


def within(predicate, timeout=TIMEOUT):
    """True as soon as predicate() is, False once timeout seconds have passed without."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def answer(plugin, method, body):
    """(HTTP status, decoded reply) of one NetworkDriver call."""
    status, raw = request(plugin.socket_path, "POST", f"/NetworkDriver.{method}", body=body, timeout=30)
    return status, json.loads(raw or b"{}")


def call(plugin, method, body):
    """One NetworkDriver call that must succeed; its reply."""
    status, reply = answer(plugin, method, body)
    assert status == 200 and not reply.get("Err"), (method, status, reply)
    return reply


class Net:
    """One network as a host's dockerd would have it: its own ID, the overlay shared by name. v4: the first three
    octets of a /24, or a whole IPv4 prefix ("10.1.0.0/20"); v6: a /64's first half ("fd00:96::"), None for an
    IPv4-only network; generic: more `-o` options ({"policy": "deny"})."""

    def __init__(self, plugin, overlay, v4, v6=None, generic=None):
        self.plugin, self.host, self.v4, self.v6 = plugin, plugin.host, v4, v6
        self.pool = v4 if "/" in v4 else f"{v4}.0/24"
        self.prefixlen = int(self.pool.split("/")[1])
        self.id = secrets.token_hex(32)
        self.ns = names.netns(self.id)
        self.endpoints = []
        gateway = self.address(1)
        body = {"NetworkID": self.id, "Options": {"com.docker.network.generic": {"overlay": overlay,
                                                                                 **(generic or {})}},
                "IPv4Data": [{"AddressSpace": "t", "Pool": self.pool, "Gateway": f"{gateway}/{self.prefixlen}"}]}
        if v6:
            body["Options"]["com.docker.network.enable_ipv6"] = True
            body["IPv6Data"] = [{"AddressSpace": "t", "Pool": f"{v6}/64", "Gateway": f"{v6}1/64"}]
        call(plugin, "CreateNetwork", body)

    def address(self, n):
        """The n-th address of the IPv4 pool."""
        base = [int(x) for x in self.pool.split("/")[0].split(".")]
        value = (base[0] << 24 | base[1] << 16 | base[2] << 8 | base[3]) + n
        return ".".join(str(value >> shift & 255) for shift in (24, 16, 8, 0))

    def endpoint(self, last, sandbox="x", exposed=()):
        """CreateEndpoint (with the exposed TCP ports as dockerd sends them) and Join as dockerd calls them:
        (endpoint id, MAC, the container end's name)."""
        eid = secrets.token_hex(32)
        iface = {"Address": f"{self.address(last)}/{self.prefixlen}"}
        if self.v6:
            iface["AddressIPv6"] = f"{self.v6}{last:x}/64"
        body = {"NetworkID": self.id, "EndpointID": eid, "Interface": iface}
        if exposed:
            body["Options"] = {"com.docker.network.endpoint.exposedports": [{"Proto": 6, "Port": p}
                                                                            for p in exposed]}
        mac = call(self.plugin, "CreateEndpoint", body)["Interface"]["MacAddress"]
        self.endpoints.append(eid)
        joined = call(self.plugin, "Join", {"NetworkID": self.id, "EndpointID": eid,
                                            "SandboxKey": f"/var/run/docker/netns/{sandbox}"})
        return eid, mac, joined["InterfaceName"]["SrcName"]

    def container(self, name, last):
        """An endpoint, then what dockerd does with the interface: into the container namespace, as eth0, with its
        addresses (DAD off: it only delays the addresses)."""
        _, mac, ifname = self.endpoint(last, name)
        return self.move_in(name, ifname, last, mac)

    def move_in(self, name, ifname, last, mac):
        ip4 = self.address(last)
        ip6 = f"{self.v6}{last:x}" if self.v6 else None
        run = self.host.run
        run(["ip", "netns", "add", name])
        run(["ip", "netns", "exec", name, "sysctl", "-q", "-w", "net.ipv6.conf.default.accept_dad=0"])
        run(["ip", "link", "set", ifname, "netns", name])
        run(["ip", "-n", name, "link", "set", ifname, "name", "eth0"])
        run(["ip", "-n", name, "addr", "add", f"{ip4}/{self.prefixlen}", "dev", "eth0"])
        if ip6:
            run(["ip", "-n", name, "addr", "add", f"{ip6}/64", "dev", "eth0", "nodad"])
        run(["ip", "-n", name, "link", "set", "eth0", "up"])
        return Container(self.host, name, ip6, mac, ip4)

    def leave(self, eid):
        call(self.plugin, "Leave", {"NetworkID": self.id, "EndpointID": eid})
        call(self.plugin, "DeleteEndpoint", {"NetworkID": self.id, "EndpointID": eid})
        self.endpoints.remove(eid)

    def remove(self):
        for eid in list(self.endpoints):
            self.leave(eid)
        call(self.plugin, "DeleteNetwork", {"NetworkID": self.id})


class Container:
    def __init__(self, host, name, ip6, mac, ip4=None):
        self.host, self.name, self.ip6, self.mac, self.ip4 = host, name, ip6, mac, ip4

    def ping(self, target, source=None, timeout=TIMEOUT):
        """One IPv4 echo answered within the time-out (retried until then)."""
        argv = ["ip", "netns", "exec", self.name, "ping", "-4", "-c", "1", "-W", "1"] + (
            ["-I", source] if source else []) + [target.ip4]
        return within(lambda: self.host.run(argv, check=False).returncode == 0, timeout)

    def ping6(self, target, source=None):
        argv = ["ip", "netns", "exec", self.name, "ping", "-6", "-c", "1", "-W", "1"] + (
            ["-I", source] if source else []) + [target.ip6]
        return within(lambda: self.host.run(argv, check=False).returncode == 0)

    def aim(self, target, prefix):
        """A route and a permanent neighbour entry straight to target's MAC, as a container with NET_ADMIN can
        set: the frame goes onto the overlay with no neighbour discovery to stop it."""
        self.host.run(["ip", "-n", self.name, "-6", "route", "replace", prefix, "dev", "eth0"])
        self.host.run(["ip", "-n", self.name, "-6", "neigh", "replace", target.ip6, "lladdr", target.mac, "dev",
                       "eth0", "nud", "permanent"])
