"""IPv6 dual stack as a user sees it (issue 12), against real dockerds in simulated hosts with the plugin as a host
process: `docker network create -d vxnet --ipam-driver vxnet --ipv6 --subnet 10.x --subnet fd00:..`.

Containers on one host and across hosts talk over IPv6 (ping and TCP); a second dual-stack network is unreachable
over IPv6 both ways; a container with NET_ADMIN that forges a v6 source, advertises another container's address
(a crafted neighbour advertisement) or sends a router advertisement gets nothing across; an --internal dual-stack
network has no way out; v6 addresses stay unique under parallel attaches on three hosts; everything is released on
removal; bad input is refused with `Error response from daemon: ...` and leaves nothing behind. On a Swarm (the
managed plugin on three nodes), --ipv6 is refused with the reason, since dockerd 20.10's Swarm allocator gives a
remote driver no IPv6 (docs/ipv6.md), and the same network without it works.

Every "cannot reach" is preceded or followed by the same probe (same command, count, time-out) succeeding where it
should, and every setup command a check relies on is checked. busybox's ping and nc (the test image) speak IPv6;
the crafted neighbour discovery messages are sent from the container's network namespace by tests/harness/ndp.py.
"""

import concurrent.futures
import ipaddress
import json
import os

import pytest

from kernel import names
from store import schema
from tests.harness import ndp
from tests.harness.containers import (
    addresses,
    network_id,
    run_sleeper,
    serve_tcp,
    tcp_answers,
    wait_ping,
)
from tests.harness.images import IMAGE
from tests.harness.plugin import REPO
from tests.harness.proc import HarnessError, wait_until
from tests.harness.swarm import (
    KEPT_KEYS,
    PLUGIN,
    Swarm,
    install_everywhere,
    plugin_settings,
    remove_plugin,
)
from tests.harness.swarm import (
    wait_clean as swarm_wait_clean,
)

# IPv4 subnets of these tests: 10.200.50-59 (tests/harness/hosts.py keeps 10.200.0.0/13 for tests).
SUB4_A, SUB6_A = "10.200.50.0/24", "fd00:50::/64"
SUB4_B, SUB6_B = "10.200.51.0/24", "fd00:51::/64"
SUB4_I, SUB6_I = "10.200.52.0/24", "fd00:52::/64"
SUB4_O, SUB6_O = "10.200.53.0/24", "fd00:53::/64"
SUB4_P, SUB6_P = "10.200.54.0/24", "fd00:54::/64"
SUB4_S, SUB6_S = "10.200.55.0/24", "fd00:55::/64"
SUB4_W, SUB6_W = "10.200.58.0/24", "fd00:58::/64"
SUB4_D = "10.200.56.0/24"
SUB4_E = "10.200.57.0/24"
# The vxnet IPAM's automatic v6 pools (ipam_driver/pools.py DEFAULT_RANGE6), and its automatic v4 ones.
DEFAULT_RANGE6 = ipaddress.ip_network("fd69:c281:134c::/48")
DEFAULT_RANGE4 = ipaddress.ip_network("10.213.0.0/16")
HOST_KEYS = KEPT_KEYS  # each host's own while its plugin runs, and the schema record


# --- helpers ----------------------------------------------------------------------------------------------------------
def create(host, name, *subnets, extra=(), check=True):
    """docker network create -d vxnet --ipam-driver vxnet --ipv6, one --subnet per subnet given."""
    argv = ["network", "create", "-d", "vxnet", "--ipam-driver", "vxnet", "--ipv6"]
    for subnet in subnets:
        argv += ["--subnet", subnet]
    return host.docker(*argv, *extra, name, check=check)


def settings(host, container, network):
    raw = host.docker("inspect", "--format", "{{json .NetworkSettings.Networks}}", container).stdout
    return json.loads(raw)[network]


def v6(host, container, network):
    """The container's global IPv6 address on the network, as docker inspect shows it."""
    address = settings(host, container, network)["GlobalIPv6Address"]
    assert address, f"{container} has no IPv6 address on {network}: {settings(host, container, network)}"
    return address


def pid(host, container):
    return int(host.docker("inspect", "--format", "{{.State.Pid}}", container).stdout)


def sh(host, container, *argv):
    """A setup command inside a container: it must succeed."""
    return host.docker("exec", container, *argv, timeout=30)


def v6_addresses(host, container, iface="eth0", scope="global"):
    """The IPv6 addresses (without prefix length) of one interface in the container, of one scope."""
    out = host.docker("exec", container, "ip", "-6", "-o", "addr", "show", "dev", iface, "scope", scope,
                      check=False).stdout
    return [line.split()[3].split("/")[0] for line in out.splitlines() if " inet6 " in line]


def eui64_link_local(mac):
    """RFC 4291 appendix A: fe80::/64 with the MAC's EUI-64 (ff:fe in the middle, the U/L bit flipped)."""
    octets = [int(part, 16) for part in mac.split(":")]
    octets[0] ^= 0x02
    iid = octets[:3] + [0xFF, 0xFE] + octets[3:]
    return str(ipaddress.IPv6Address(b"\xfe\x80" + b"\x00" * 6 + bytes(iid)))


def ping(host, container, target, *extra):
    """The one ping probe of these tests, for checks and controls alike: True if a reply came back. With a source
    (-I ADDRESS) both echo requests must have been sent: a forged source the kernel would not even send from
    proves nothing about the network, and fails the test."""
    proc = host.docker("exec", container, "ping", *extra, "-c", "2", "-W", "1", target, check=False, timeout=40)
    if extra:
        assert "2 packets transmitted" in proc.stdout, f"ping {target} from {container} sent nothing: {proc.stderr}"
    return proc.returncode == 0


def ipv6_disabled(host, container, iface):
    return host.docker("exec", container, "cat", f"/proc/sys/net/ipv6/conf/{iface}/disable_ipv6").stdout.strip() == "1"


def ip_in(host, container, *argv):
    """`ip ARGS` of this machine in the container's network namespace (busybox's ip has no `nodad`): a setup
    command, it must succeed."""
    done = ndp.in_netns(pid(host, container), ["ip", *argv])
    assert done.returncode == 0, f"ip {' '.join(argv)} in {container}: {done.stderr}"


def reaches(host, container, target):
    """(ping answered, TCP answered) from the container: the probe pair of the reachability checks."""
    return ping(host, container, target), tcp_answers(host, container, target)


def leftovers(hosts, etcd):
    """What vxnet still holds: vxnet-* namespaces in each host, etcd keys but each host's own records."""
    found = [f"{h.name}: namespace {ns}" for h in hosts for ns in h.netns() if ns.startswith(names.NETNS_PREFIX)]
    return found + [f"etcd: {key}" for key in etcd.keys(schema.PREFIX + "/") if not key.startswith(HOST_KEYS)]


def wait_clean(hosts, etcd, timeout=30.0):
    last = []

    def clean():
        last[:] = leftovers(hosts, etcd)
        return not last

    try:
        wait_until(clean, timeout, "every host and etcd to be clean of vxnet state", interval=0.3)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}; left behind:\n  " + "\n  ".join(last)) from None


def remove_all(hosts, networks):
    for host in hosts:
        ids = host.docker("ps", "-aq").stdout.split()
        if ids:
            host.docker("rm", "-f", *ids, timeout=120)
        for network in networks:
            if host.docker("network", "inspect", network, check=False).returncode == 0:
                host.docker("network", "rm", network, timeout=60)


def v6_neighbours(host, nid):
    """address -> state of the IPv6 neighbour entries on the VXLAN device of the network's namespace."""
    out = host.run(["ip", "-6", "-n", names.netns(nid), "neigh", "show", "dev", names.VXLAN]).stdout
    return {line.split()[0]: line.split()[-1] for line in out.splitlines() if "lladdr" in line}


# --- the tests --------------------------------------------------------------------------------------------------------
def test_dual_stack_containers_talk_over_v6_on_one_host_and_across_hosts_and_all_is_released(hosts, vxnet_plugin,
                                                                                              etcd):
    h1, h2 = hosts(2)
    for host in (h1, h2):
        vxnet_plugin(host)
        create(host, "ds", SUB4_A, SUB6_A, extra=("-o", "overlay=ds"))
    nid1 = network_id(h1, "ds")
    run_sleeper(h1, "c1", "ds")
    run_sleeper(h1, "c2", "ds")
    run_sleeper(h2, "c3", "ds")
    run_sleeper(h2, "c4", "ds", "--ip6", "fd00:50::77")  # an address of the user's choosing
    ip6 = {c: v6(h, c, "ds") for h, c in ((h1, "c1"), (h1, "c2"), (h2, "c3"), (h2, "c4"))}
    ip4 = {c: addresses(h, c)["ds"] for h, c in ((h1, "c1"), (h1, "c2"), (h2, "c3"), (h2, "c4"))}
    assert ip6["c4"] == "fd00:50::77", ip6
    assert len(set(ip6.values())) == 4 and all(ipaddress.ip_address(a) in ipaddress.ip_network(SUB6_A)
                                               for a in ip6.values()), ip6
    # What docker inspect says is what the container has, beside its IPv4 address; its link-local address is the
    # EUI-64 one of its MAC (the one anti-spoofing lets through besides its global address).
    for host, c in ((h1, "c1"), (h2, "c3")):
        assert v6_addresses(host, c) == [ip6[c]], (c, v6_addresses(host, c))
        mac = settings(host, c, "ds")["MacAddress"]
        assert v6_addresses(host, c, scope="link") == [eui64_link_local(mac)], c

    # No IPv6 egress: the only IPv6 routes are the network's own and link-local ones (docker_gwbridge is IPv4-only).
    assert "default" not in sh(h1, "c1", "ip", "-6", "route").stdout
    serve_tcp(h1, "c1")
    serve_tcp(h1, "c2")
    serve_tcp(h2, "c3")
    # One host, then across the hosts (VXLAN over the IPv4 underlay), both ways; IPv4 still works beside.
    wait_ping(h1, "c1", ip6["c2"])
    wait_ping(h1, "c1", ip6["c3"])
    wait_ping(h2, "c4", ip6["c1"])
    assert reaches(h1, "c1", ip6["c2"]) == (True, True)
    assert reaches(h1, "c1", ip6["c3"]) == (True, True)
    assert reaches(h2, "c4", ip6["c3"]) == (True, True)
    assert reaches(h2, "c4", ip6["c1"]) == (True, True)
    assert reaches(h1, "c2", ip4["c3"]) == (True, True)
    # No NDP across the overlay: host 1 knows host 2's containers by permanent v6 neighbour entries.
    neigh = v6_neighbours(h1, nid1)
    assert neigh.get(ip6["c3"]) == "PERMANENT" and neigh.get(ip6["c4"]) == "PERMANENT", neigh

    # Removal gives everything back: no pool or address key left in etcd's ipam tree (nor any other), no namespace.
    remove_all((h1, h2), ["ds"])
    wait_clean((h1, h2), etcd)


def test_default_v6_pool_and_an_ipv6_only_request(hosts, vxnet_plugin, etcd):
    """--ipv6 without a v6 --subnet: a /64 of vxnet's unique local /48, a different one per network. A v6 --subnet
    alone: dockerd 20.10 asks for an IPv4 pool all the same (there is no IPv6-only network), so it gets an
    automatic one."""
    (host,) = hosts(1)
    vxnet_plugin(host)
    create(host, "auto1", SUB4_D)
    create(host, "auto2", SUB4_E)
    create(host, "only6", SUB6_P)
    pools = {}
    for name in ("auto1", "auto2", "only6"):
        config = json.loads(host.docker("network", "inspect", "--format", "{{json .IPAM.Config}}", name).stdout)
        pools[name] = [ipaddress.ip_network(c["Subnet"]) for c in config]
    v6_of = {name: [p for p in nets if p.version == 6] for name, nets in pools.items()}
    for name in ("auto1", "auto2"):
        (pool,) = v6_of[name]
        assert pool.prefixlen == 64 and pool.subnet_of(DEFAULT_RANGE6), pools
    assert v6_of["auto1"] != v6_of["auto2"], pools
    (v4_only6,) = [p for p in pools["only6"] if p.version == 4]
    assert v4_only6.subnet_of(DEFAULT_RANGE4) and v6_of["only6"] == [ipaddress.ip_network(SUB6_P)], pools

    run_sleeper(host, "d1", "auto1")
    run_sleeper(host, "d2", "auto1")
    a1, a2 = v6(host, "d1", "auto1"), v6(host, "d2", "auto1")
    assert ipaddress.ip_address(a1) in v6_of["auto1"][0] and a1 != a2
    wait_ping(host, "d1", a2)
    remove_all([host], ["auto1", "auto2", "only6"])
    wait_clean([host], etcd)


def test_bad_v6_input_is_refused_as_the_user_sees_it_and_leaves_nothing(hosts, vxnet_plugin, etcd):
    (host,) = hosts(1)
    vxnet_plugin(host)

    def refused(proc, *words):
        assert proc.returncode != 0, proc.stdout
        message = proc.stderr.strip()
        assert "Error response from daemon:" in message, message  # `docker run` prefixes "docker: "
        for word in words:
            assert word in message, (word, message)
        return message

    # A v6 subnet with host bits: the IPAM names the field and what was meant.
    refused(create(host, "bad1", SUB4_A, "fd00:50::1/64", check=False), "fd00:50::1/64", "host bits",
            "fd00:50::/64")
    # Not unicast space: multicast, link-local.
    refused(create(host, "bad2", SUB4_A, "ff05::/64", check=False), "ff05::/64", "not global unicast")
    refused(create(host, "bad3", SUB4_A, "fe80::/64", check=False), "fe80::/64", "not global unicast")
    # Too small to hold a gateway and a container besides the subnet-router anycast address.
    refused(create(host, "bad4", SUB4_A, "fd00:50::/127", check=False), "fd00:50::/127 is too small")
    assert leftovers([host], etcd) == []

    # --ip6 outside the subnet (dockerd's own check), already taken, the gateway's, the subnet-router anycast
    # address: the container does not start, the network keeps nothing of it.
    create(host, "ok", SUB4_A, SUB6_A)
    run_sleeper(host, "first", "ok", "--ip6", "fd00:50::10")
    for argv, words in ((("--ip6", "fd00:99::5"), ("fd00:99::5", "does not belong to any of this network's")),
                        (("--ip6", "fd00:50::10"), ("Address: fd00:50::10 is already in use",)),
                        (("--ip6", "fd00:50::1"), ("Address: fd00:50::1 is already the gateway",)),
                        (("--ip6", "fd00:50::"), ("fd00:50:: is the subnet-router anycast address",))):
        proc = host.docker("run", "-d", "--init", "--name", "second", "--network", "ok", *argv,
                           "vxnet-test/busybox:latest", "sleep", "86400", check=False, timeout=120)
        refused(proc, *words)
        host.docker("rm", "-f", "second", check=False)
    nid = network_id(host, "ok")
    held = [k for k in etcd.keys(schema.PREFIX + "/ipam/addresses/") if k.startswith(
        schema.Schema().addresses("vxnet-local", ipaddress.ip_network(SUB6_A)))]
    assert sorted(k.rsplit("/", 1)[1] for k in held) == sorted(["fd00:50::1", "fd00:50::10"]), held  # gw, first
    assert len(etcd.keys(schema.PREFIX + "/endpoints/" + nid + "/")) == 1, "only the first container's endpoint"
    remove_all([host], ["ok"])
    wait_clean([host], etcd)


def test_second_dual_stack_network_is_unreachable_over_v6_both_ways(hosts, vxnet_plugin):
    """Two dual-stack overlays on two hosts. Nothing of B reaches A over IPv6, nor the other way: not the overlay
    addresses on the same host or across, not with a route of its own through the gateway bridge, not with an
    address of the other network's subnet; and not the gateway-bridge side. Controls: the same probes within each
    network, across the hosts."""
    h1, h2 = hosts(2)
    for host in (h1, h2):
        vxnet_plugin(host)
        create(host, "xa", SUB4_A, SUB6_A, extra=("-o", "overlay=xa"))
        create(host, "xb", SUB4_B, SUB6_B, extra=("-o", "overlay=xb"))
    run_sleeper(h1, "a1", "xa", "--cap-add", "NET_ADMIN")
    run_sleeper(h2, "a2", "xa", "--cap-add", "NET_ADMIN")
    run_sleeper(h1, "b1", "xb", "--cap-add", "NET_ADMIN")
    run_sleeper(h2, "b2", "xb")
    a1, a2, b1 = v6(h1, "a1", "xa"), v6(h2, "a2", "xa"), v6(h1, "b1", "xb")
    for host, c in ((h1, "a1"), (h2, "a2"), (h1, "b1")):
        serve_tcp(host, c)
    wait_ping(h1, "a1", a2)
    wait_ping(h2, "b2", b1)

    # B towards A (same host and across), then with routes of its own through eth1 (the gateway bridge).
    assert reaches(h1, "a1", a2) == (True, True)
    assert reaches(h2, "a2", a1) == (True, True)
    for target in (a1, a2):
        assert reaches(h1, "b1", target) == (False, False), target
    ip_in(h1, "b1", "-6", "route", "add", SUB6_A, "dev", "eth0")  # A's subnet on-link on B's overlay
    for target in (a1, a2):
        assert reaches(h1, "b1", target) == (False, False), target
    # A towards B, the same way. Control: b2 reaches b1 across the hosts.
    assert reaches(h2, "b2", b1) == (True, True)
    assert reaches(h2, "a2", b1) == (False, False)
    ip_in(h2, "a2", "-6", "route", "add", SUB6_B, "dev", "eth0")
    assert reaches(h2, "a2", b1) == (False, False)
    ip_in(h2, "a2", "-6", "route", "del", SUB6_B, "dev", "eth0")

    # b1 takes an address in A's v6 subnet besides its own: still nothing crosses into A.
    ip_in(h1, "b1", "-6", "addr", "add", "fd00:50::200/64", "dev", "eth0", "nodad")
    assert reaches(h1, "b1", a2) == (False, False)
    assert reaches(h1, "b1", a1) == (False, False)

    # The gateway-bridge side: docker_gwbridge is IPv4-only and dockerd disables IPv6 on an interface whose
    # endpoint has no v6 address, so eth1 has no v6 address to reach and none to send from (the kernel refused
    # the route through it: EACCES); eth0 is the control. And the host has no v6 route into A's subnet.
    for host, c in ((h1, "a1"), (h1, "b1"), (h2, "a2")):
        assert ipv6_disabled(host, c, "eth1") and not ipv6_disabled(host, c, "eth0"), c
        assert v6_addresses(host, c, "eth1", "link") == [] and v6_addresses(host, c, "eth1", "global") == [], c
    for host in (h1, h2):
        assert host.run(["ip", "-6", "route", "show", SUB6_A]).stdout.strip() == ""
        assert host.run(["ip", "-6", "route", "show", SUB6_B]).stdout.strip() == ""


def test_forged_v6_source_forged_neighbour_advert_and_router_advert_get_nothing_across(hosts, vxnet_plugin):
    """a1 (NET_ADMIN, host 1) attacks its own network: a2 beside it, a3 on host 2. Sending from an address not
    its own, advertising a3's address as its own (a neighbour advertisement answering for another container), or
    advertising itself as a router: nothing of it reaches a2 or a3. Controls: the same probes from its own
    addresses, and a neighbour advertisement for its own address, arrive."""
    h1, h2 = hosts(2)
    for host in (h1, h2):
        vxnet_plugin(host)
        create(host, "sp", SUB4_S, SUB6_S, extra=("-o", "overlay=sp"))
    run_sleeper(h1, "a1", "sp", "--cap-add", "NET_ADMIN")
    run_sleeper(h1, "a2", "sp")
    run_sleeper(h2, "a3", "sp")
    ip6 = {c: v6(h, c, "sp") for h, c in ((h1, "a1"), (h1, "a2"), (h2, "a3"))}
    mac1 = settings(h1, "a1", "sp")["MacAddress"]
    ll1 = eui64_link_local(mac1)
    wait_ping(h1, "a1", ip6["a2"])
    wait_ping(h1, "a1", ip6["a3"])

    # A forged global source, inside the subnet (a free address, and a3's own), then a forged link-local one.
    assert ping(h1, "a1", ip6["a2"], "-I", ip6["a1"]) and ping(h1, "a1", ip6["a3"], "-I", ip6["a1"])
    for forged in ("fd00:55::99", ip6["a3"]):
        ip_in(h1, "a1", "-6", "addr", "add", f"{forged}/64", "dev", "eth0", "nodad")
        assert not ping(h1, "a1", ip6["a2"], "-I", forged), forged
        assert not ping(h1, "a1", ip6["a3"] if forged != ip6["a3"] else ip6["a2"], "-I", forged), forged
        ip_in(h1, "a1", "-6", "addr", "del", f"{forged}/64", "dev", "eth0")
    assert ping(h1, "a1", ip6["a2"], "-I", ip6["a1"])  # its own source still works: the drops were the forgery

    # Neighbour and router advertisements to all nodes, from its own link-local address (once DAD has made it
    # usable), hop limit 255.
    p1, p2, p3 = pid(h1, "a1"), pid(h1, "a2"), pid(h2, "a3")
    wait_until(lambda: "tentative" not in h1.docker("exec", "a1", "ip", "-6", "addr", "show", "dev", "eth0").stdout,
               10, "a1's addresses to finish duplicate address detection", interval=0.2)

    def last_word(address):  # the NA's target is at ICMPv6 offset 8: its last 32 bits at IPv6 offset 60
        return "0x" + ipaddress.IPv6Address(address).packed[-4:].hex()

    def na(target, src=ll1, dst=ndp.ALL_NODES):
        return lambda: ndp.send(p1, "na", src=src, dst=dst, target=target, mac=mac1)

    own_na = f"icmp6 and ip6[40] == {ndp.NEIGHBOR_ADVERT} and ip6[60:4] == {last_word(ip6['a1'])}"
    stolen_na = f"icmp6 and ip6[40] == {ndp.NEIGHBOR_ADVERT} and ip6[60:4] == {last_word(ip6['a3'])}"
    assert ndp.arrives(p2, own_na, na(ip6["a1"]))  # control: its own address, on the same host
    assert not ndp.arrives(p2, stolen_na, na(ip6["a3"]))
    # Across the hosts, sent to a3 itself: unicast, which the overlay carries by the permanent entries (a
    # link-scope multicast is not carried to other hosts). a1 has its neighbour entry for a3 again first (the
    # forged a3 address above took it away).
    wait_ping(h1, "a1", ip6["a3"])
    assert ndp.arrives(p3, own_na, na(ip6["a1"], dst=ip6["a3"]))
    # ... claiming a2's address (a3 would send a2's traffic to a1): it never reaches a3.
    stolen_a2 = f"icmp6 and ip6[40] == {ndp.NEIGHBOR_ADVERT} and ip6[60:4] == {last_word(ip6['a2'])}"
    assert not ndp.arrives(p3, stolen_a2, na(ip6["a2"], dst=ip6["a3"]))
    # The same advertisement of its own address, from a link-local address not derived from its MAC: dropped.
    ip_in(h1, "a1", "-6", "addr", "add", "fe80::99/64", "dev", "eth0", "nodad")
    assert not ndp.arrives(p2, own_na, na(ip6["a1"], src="fe80::99"))
    ra = f"icmp6 and ip6[40] == {ndp.ROUTER_ADVERT}"
    assert not ndp.arrives(p2, ra, lambda: ndp.send(p1, "ra", src=ll1, mac=mac1))
    assert ndp.arrives(p2, own_na, na(ip6["a1"]))  # control again, after: the path was open all along
    # a2 learnt nothing from the advertisements: its neighbour entry for a3 (if any) is not a1's MAC, it has no
    # address of the advertised prefix and no default route through a1.
    neigh = h1.docker("exec", "a2", "ip", "-6", "neigh", "show", ip6["a3"]).stdout
    assert mac1 not in neigh, neigh
    assert not [a for a in v6_addresses(h1, "a2") if a.startswith("fd99:")]
    assert ll1 not in h1.docker("exec", "a2", "ip", "-6", "route").stdout


def test_internal_dual_stack_network_has_no_way_out(hosts, vxnet_plugin):
    (host,) = hosts(1)
    vxnet_plugin(host)
    create(host, "inside", SUB4_I, SUB6_I, extra=("--internal",))
    create(host, "outside", SUB4_O, SUB6_O)
    run_sleeper(host, "i1", "inside")
    run_sleeper(host, "i2", "inside")
    run_sleeper(host, "o1", "outside")
    run_sleeper(host, "o2", "outside")
    i2, o2 = v6(host, "i2", "inside"), v6(host, "o2", "outside")
    serve_tcp(host, "i2")
    serve_tcp(host, "o2")
    wait_ping(host, "i1", i2)
    wait_ping(host, "o1", o2)
    assert reaches(host, "i1", i2) == (True, True)  # control: within the internal network, v6 works
    routes = sh(host, "i1", "ip", "-6", "route").stdout
    assert "default" not in routes, routes
    assert v6_addresses(host, "i1", "eth1", "global") == [] == v6_addresses(host, "i1", "eth1", "link")
    # Not the other network's v6 addresses (control: from its own network), not the host's own IPv6 addresses on
    # docker_gwbridge and eth0 (control: the non-internal container reaches the gateway bridge's, when it has a
    # gateway-bridge leg with IPv6 at all).
    assert reaches(host, "o1", o2) == (True, True)
    assert reaches(host, "i1", o2) == (False, False)
    # Nor the host's own IPv6 addresses (the link-local ones of docker_gwbridge and eth0: the host has no other),
    # asked for on the only link i1 has. Control: the same link-scoped probe reaches i2's link-local address.
    i2_ll = v6_addresses(host, "i2", "eth0", "link")[0]
    assert ping(host, "i1", f"{i2_ll}%eth0")
    host_v6 = [line.split()[3].split("/")[0] for dev in ("docker_gwbridge", "eth0")
               for line in host.run(["ip", "-6", "-o", "addr", "show", "dev", dev]).stdout.splitlines()]
    assert host_v6, "the host has no IPv6 address to try"
    for address in host_v6:
        assert not ping(host, "i1", f"{address}%eth0" if address.startswith("fe80:") else address), address


def test_v6_addresses_unique_across_three_hosts_under_parallel_attaches(hosts, vxnet_plugin, etcd):
    made = hosts(3)
    for host in made:
        vxnet_plugin(host)
        create(host, "par", SUB4_P, SUB6_P, extra=("-o", "overlay=par"))
    per_host = 4
    jobs = [(host, f"p{host.index}x{i}") for host in made for i in range(per_host)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        list(pool.map(lambda job: run_sleeper(job[0], job[1], "par"), jobs))
    got = {name: v6(host, name, "par") for host, name in jobs}
    assert len(set(got.values())) == len(jobs), got
    assert all(ipaddress.ip_address(a) in ipaddress.ip_network(SUB6_P) for a in got.values()), got
    # etcd holds exactly these and the gateway in the v6 pool.
    prefix = schema.Schema().addresses("vxnet-local", ipaddress.ip_network(SUB6_P))
    held = {k.rsplit("/", 1)[1] for k in etcd.keys(prefix)}
    gateway = str(ipaddress.ip_network(SUB6_P)[1])
    assert held == set(got.values()) | {gateway}, sorted(held ^ (set(got.values()) | {gateway}))
    # Each reaches one container on every other host over v6.
    firsts = {host.index: (host, f"p{host.index}x0") for host in made}
    for i, (host, name) in firsts.items():
        for j, (_, other) in firsts.items():
            if i != j:
                wait_ping(host, name, got[other])
    remove_all(made, ["par"])
    wait_clean(made, etcd)


# --- Swarm ------------------------------------------------------------------------------------------------------------
@pytest.fixture
def swarm(lab, request):
    """Three fresh hosts in one Swarm with the managed plugin (scripts/build-plugin.sh), against the test etcd;
    torn down in the order tests/e2e/test_swarm.py's fixture uses (its logs kept if the test failed)."""
    lab.etcd.delete_prefix("/vxnet/")
    made = lab.add_hosts(3)
    request.node.vxnet_hosts = made
    cluster = Swarm(made[0], made[1:])
    errors = []
    try:
        cluster.init()
        install_everywhere(made, lambda h: plugin_settings(h, lab.etcd.url, "VXNET_LOG_LEVEL=debug"))
        yield cluster
    finally:
        errors += cluster.teardown()
        for host in made:
            try:
                remove_plugin(host)
            except Exception as exc:
                errors.append(f"{host.name}: plugin removal: {exc}")
        failed = getattr(request.node, "vxnet_failed", False)
        keep = os.path.join(REPO, "build", "test-logs", "test_ipv6_swarm") if failed else None
        errors += lab.remove_hosts(made, keep_logs=keep)
    if errors:
        raise HarnessError("swarm teardown: " + "; ".join(errors))


def test_swarm_scoped_ipv6_is_refused_with_the_reason_and_the_same_network_without_it_works(swarm, etcd):
    """dockerd 20.10's Swarm allocator gives a swarm-scoped network no IPv6 (docs/ipv6.md has the wire). With a v6
    --subnet it asks for that pool as IPv4: vxnet refuses, Swarm never allocates the network, the manager's log
    says why. Without one each node would pick a v6 subnet of its own: every node refuses, `docker service ps`
    says why. Control: the same network and service without --ipv6 run and talk across the nodes."""
    h1, h2, h3 = swarm.hosts
    sleeper = ["--init", "--no-resolve-image", IMAGE, "sleep", "86400"]

    swarm.create_network("s6a", "--ipv6", "--attachable", "--ipam-driver", PLUGIN, "--subnet", SUB4_W,
                         "--subnet", SUB6_W)
    nid = swarm.network("s6a")["Id"]
    wait_until(lambda: f"Failed allocation for network {nid}" in h1.dockerd_log(400)
               and "asks for every pool as IPv4 (V6 false)" in h1.dockerd_log(400), 30,
               "the manager to log why it cannot allocate s6a", interval=0.3)
    assert not (swarm.network("s6a").get("Options") or {}).get("vni")
    swarm.remove_network("s6a")

    swarm.create_network("s6b", "--ipv6", "--attachable", "--ipam-driver", PLUGIN, "--subnet", SUB4_W)
    swarm.wait_network("s6b")  # allocated: the manager sees no IPv6 in it
    swarm.create_service("w6", "--network", "s6b", "--endpoint-mode", "dnsrr", "--mode", "global", *sleeper)

    def refused_on_every_node():
        out = h1.docker("service", "ps", "--no-trunc", "--format", "{{.Node}}\t{{.Error}}", "w6").stdout
        nodes = {line.split("\t")[0] for line in out.splitlines()
                 if "--ipv6 on a Swarm-scoped network" in line}
        return nodes == {h.name for h in swarm.hosts}

    wait_until(refused_on_every_node, 60, "every node to refuse s6b's IPv6 with the reason", interval=0.5)
    assert not any(swarm.tasks("w6").values())
    swarm.remove_services("w6")
    swarm.remove_network("s6b")

    swarm.create_network("s4", "--attachable", "--ipam-driver", PLUGIN, "--subnet", SUB4_W)
    swarm.wait_network("s4")
    swarm.create_service("w4", "--network", "s4", "--endpoint-mode", "dnsrr", "--mode", "global", *sleeper)
    tasks = swarm.wait_tasks("w4", {h.name: 1 for h in swarm.hosts})
    ips = {name: addresses(swarm.host(name), cid)["s4"] for name, cid in tasks.items()}
    wait_ping(h1, tasks[h1.name], ips[h2.name])
    wait_ping(h3, tasks[h3.name], ips[h1.name])
    swarm.remove_services("w4")
    swarm.remove_network("s4")
    swarm_wait_clean(swarm.hosts, etcd)
