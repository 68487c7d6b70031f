"""Isolation as a user sees it on one host: networks cannot reach each other through the gateway bridge or the
host, a container with NET_ADMIN cannot forge its address or MAC, and --internal networks have no way out.

Every "cannot reach" is preceded by the same probe (same command, count and time-out) succeeding where it
should, and every setup command a check relies on is checked: a drop that a broken setup would also give
proves nothing."""

from tests.harness.containers import (
    addresses,
    host_pings,
    host_tcp_answers,
    pings,
    run_sleeper,
    serve_tcp,
    tcp_answers,
    wait_ping,
)

SUBNET_A = "10.200.40.0/24"
SUBNET_B = "10.200.41.0/24"
SUBNET_I = "10.200.42.0/24"
SUBNET_O = "10.200.45.0/24"


def create(host, name, subnet, *extra):
    host.docker("network", "create", "-d", "vxnet", "--ipam-driver", "vxnet", "--subnet", subnet, *extra, name)


def gwbridge_ip(host, container):
    """The container's docker_gwbridge address (eth1: dockerd attaches it after our eth0; `docker inspect` does
    not list that endpoint)."""
    out = host.docker("exec", container, "ip", "-4", "-o", "addr", "show", "eth1").stdout.split()
    assert len(out) > 3, f"{container} has no docker_gwbridge address: {out}"
    return out[3].split("/")[0]


def sh(host, container, *argv):
    """A setup command inside a container: it must succeed."""
    return host.docker("exec", container, *argv, timeout=30)


def ping(host, container, target):
    """The one ping probe of these tests, for checks and controls alike."""
    return pings(host, container, target, count=2, wait_s=1)


def reaches(host, container, target):
    """(ping answered, TCP answered) from the container: the probe pair of every check here."""
    return ping(host, container, target), tcp_answers(host, container, target)


def host_reaches(host, target):
    """The same probe pair from the simulated host's own namespace: a container's gateway-bridge address answers
    there, so it shows the container and its server are up on that address."""
    return host_pings(host, target, count=2, wait_s=1), host_tcp_answers(host, target)


def test_no_path_between_networks_and_no_forged_identity(hosts, vxnet_plugin):
    (host,) = hosts(1)
    vxnet_plugin(host)
    create(host, "net-a", SUBNET_A)
    create(host, "net-b", SUBNET_B)
    run_sleeper(host, "a1", "net-a", "--cap-add", "NET_ADMIN")  # NET_ADMIN: it flushes its neighbours below
    run_sleeper(host, "a2", "net-a", "--cap-add", "NET_ADMIN")
    run_sleeper(host, "b1", "net-b", "--cap-add", "NET_ADMIN")
    run_sleeper(host, "b2", "net-b")
    a1, a2 = addresses(host, "a1")["net-a"], addresses(host, "a2")["net-a"]
    b1 = addresses(host, "b1")["net-b"]
    a1_gw, b1_gw = gwbridge_ip(host, "a1"), gwbridge_ip(host, "b1")
    serve_tcp(host, "a1")
    serve_tcp(host, "b1")
    wait_ping(host, "a2", a1)
    wait_ping(host, "b2", b1)

    # From network B, a1 is unreachable on its vxnet address and on its gateway-bridge address, by ping and TCP,
    # even with a route b1 adds itself towards A's subnet through the gateway bridge. Controls: the same probes
    # reach a1 from a2 (its own network) and from the host (its gateway-bridge address).
    assert reaches(host, "a2", a1) == (True, True)
    assert host_reaches(host, a1_gw) == (True, True)
    sh(host, "b1", "ip", "route", "add", SUBNET_A, "dev", "eth1")
    for target in (a1, a1_gw):
        assert reaches(host, "b1", target) == (False, False), target
    # And the other way: from A, b1 is unreachable too, with a route of a2's own towards B.
    assert reaches(host, "b2", b1) == (True, True)
    assert host_reaches(host, b1_gw) == (True, True)
    sh(host, "a2", "ip", "route", "add", SUBNET_B, "dev", "eth1")
    for target in (b1, b1_gw):
        assert reaches(host, "a2", target) == (False, False), target

    # a2 (NET_ADMIN) takes another address of its own subnet: nothing gets through; back to its own, it does.
    assert ping(host, "a2", a1)
    sh(host, "a2", "ip", "addr", "flush", "dev", "eth0")
    sh(host, "a2", "ip", "addr", "add", "10.200.40.99/24", "dev", "eth0")
    assert not ping(host, "a2", a1)
    sh(host, "a2", "ip", "addr", "flush", "dev", "eth0")
    sh(host, "a2", "ip", "addr", "add", f"{a2}/24", "dev", "eth0")
    wait_ping(host, "a2", a1)
    assert ping(host, "a2", a1)
    # ... and another MAC: nothing either.
    sh(host, "a2", "ip", "link", "set", "eth0", "address", "02:42:0a:c8:28:63")
    sh(host, "a1", "ip", "neigh", "flush", "all")
    assert not ping(host, "a2", a1)


def test_internal_network_has_no_way_out(hosts, vxnet_plugin):
    (host,) = hosts(1)
    vxnet_plugin(host)
    create(host, "inside", SUBNET_I, "--internal")
    create(host, "outside", SUBNET_O)
    run_sleeper(host, "i1", "inside")
    run_sleeper(host, "i2", "inside")
    run_sleeper(host, "o1", "outside")  # a non-internal container: the control, and docker_gwbridge exists
    wait_ping(host, "i1", addresses(host, "i2")["inside"])
    eth1 = host.docker("exec", "i1", "ip", "-4", "-o", "addr", "show", "eth1", check=False)
    assert eth1.returncode != 0 and "eth1" not in eth1.stdout, eth1.stdout  # no gateway-bridge leg
    routes = sh(host, "i1", "ip", "route").stdout
    assert "default" not in routes, routes
    # Not even the host's own addresses: the underlay address, and the gateway bridge's. Controls: the same
    # probe reaches both from the non-internal container.
    gw = host.run(["ip", "-4", "-o", "addr", "show", "docker_gwbridge"]).stdout.split()
    assert len(gw) > 3, f"docker_gwbridge has no address: {gw}"
    for target in (host.ip, gw[3].split("/")[0]):
        assert ping(host, "o1", target), target
        assert not ping(host, "i1", target), target


SUBNET_XA = "10.200.43.0/24"
SUBNET_XB = "10.200.44.0/24"


def test_no_path_between_networks_across_hosts_and_no_forged_source(hosts, vxnet_plugin):
    """Two overlays spanning two hosts (`-o overlay=NAME`). Nothing of network B reaches network A's container on
    the other host, nor the other way (overlay and gateway-bridge addresses, ping and TCP), and a container that forges
    its source, as another container of its own network living on the other host, or as a container of the
    other network, gets nothing across the VXLAN link."""
    h1, h2 = hosts(2)
    for host in (h1, h2):
        vxnet_plugin(host)
        create(host, "xa", SUBNET_XA, "-o", "overlay=xa")
        create(host, "xb", SUBNET_XB, "-o", "overlay=xb")
    run_sleeper(h1, "a1", "xa")
    run_sleeper(h1, "a4", "xa", "--cap-add", "NET_ADMIN")  # NET_ADMIN: it flushes its neighbours below
    run_sleeper(h1, "b1", "xb", "--cap-add", "NET_ADMIN")
    run_sleeper(h2, "a2", "xa", "--cap-add", "NET_ADMIN")
    run_sleeper(h2, "a3", "xa")
    run_sleeper(h2, "b2", "xb")
    a1, a2, a3 = addresses(h1, "a1")["xa"], addresses(h2, "a2")["xa"], addresses(h2, "a3")["xa"]
    a4, b1 = addresses(h1, "a4")["xa"], addresses(h1, "b1")["xb"]
    a2_gw, b1_gw = gwbridge_ip(h2, "a2"), gwbridge_ip(h1, "b1")
    serve_tcp(h2, "a2")
    serve_tcp(h1, "a4")
    serve_tcp(h1, "b1")
    wait_ping(h1, "a1", a2)  # the overlays themselves work across the hosts
    wait_ping(h2, "b2", b1)

    # B on host 1 towards A on host 2: by the overlay address, and by the gateway-bridge address with a route
    # of its own through eth1, ping and TCP. Controls: a1 (A, host 1) reaches a2 by the same probes, and host 2
    # reaches a2's gateway-bridge address.
    assert reaches(h1, "a1", a2) == (True, True)
    assert host_reaches(h2, a2_gw) == (True, True)
    sh(h1, "b1", "ip", "route", "add", SUBNET_XA, "dev", "eth1")
    for target in (a2, a2_gw):
        assert reaches(h1, "b1", target) == (False, False), target
    # And the other way: A on host 2 towards B on host 1, with a route of a2's own towards B. Controls: b2 (B,
    # host 2) reaches b1 across the hosts, host 1 reaches b1's gateway-bridge address.
    assert reaches(h2, "b2", b1) == (True, True)
    assert host_reaches(h1, b1_gw) == (True, True)
    sh(h2, "a2", "ip", "route", "add", SUBNET_XB, "dev", "eth1")
    for target in (b1, b1_gw):
        assert reaches(h2, "a2", target) == (False, False), target
    sh(h2, "a2", "ip", "route", "del", SUBNET_XB, "dev", "eth1")

    # b1 (NET_ADMIN) adds an address inside A's subnet: nothing crosses from B's overlay into A's (control: the
    # same probes from a1, above).
    sh(h1, "b1", "ip", "addr", "add", "10.200.43.200/24", "dev", "eth0")
    assert reaches(h1, "b1", a2) == (False, False)

    # a2 (NET_ADMIN, host 2) takes the address of a1, which lives on host 1, and then a free one of its own
    # subnet: neither a3 beside it nor a4 across the hosts answers (nothing leaves host 2's bridge port).
    # Control: with its own address the same probes reach a3 and a4.
    assert ping(h2, "a2", a3) and reaches(h2, "a2", a4) == (True, True)
    for forged in (a1, "10.200.43.201"):
        sh(h2, "a2", "ip", "addr", "flush", "dev", "eth0")
        sh(h2, "a2", "ip", "addr", "add", f"{forged}/24", "dev", "eth0")
        assert not ping(h2, "a2", a3), forged
        assert not ping(h2, "a2", b1), forged
        assert reaches(h2, "a2", a4) == (False, False), forged
    # Back to its own address it reaches a4 across the hosts again: the drops were the forgery, not a broken link.
    sh(h2, "a2", "ip", "addr", "flush", "dev", "eth0")
    sh(h2, "a2", "ip", "addr", "add", f"{a2}/24", "dev", "eth0")
    wait_ping(h2, "a2", a4)
    assert reaches(h2, "a2", a4) == (True, True)
    # A forged MAC with its own address: nothing across either.
    sh(h2, "a2", "ip", "link", "set", "eth0", "address", "02:42:0a:c8:2b:63")
    sh(h1, "a4", "ip", "neigh", "flush", "all")
    assert not ping(h2, "a2", a4)
