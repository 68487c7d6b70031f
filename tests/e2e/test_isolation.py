"""Isolation as a user sees it on one host: networks cannot reach each other through the gateway bridge or the
host, a container with NET_ADMIN cannot forge its address or MAC, and --internal networks have no way out."""

from tests.harness.containers import addresses, pings, run_sleeper, serve_tcp, tcp_answers, wait_ping

SUBNET_A = "10.200.40.0/24"
SUBNET_B = "10.200.41.0/24"
SUBNET_I = "10.200.42.0/24"


def create(host, name, subnet, *extra):
    host.docker("network", "create", "-d", "vxnet", "--ipam-driver", "vxnet", "--subnet", subnet, *extra, name)


def gwbridge_ip(host, container):
    """The container's docker_gwbridge address (eth1: dockerd attaches it after our eth0; `docker inspect` does
    not list that endpoint), or None when it has none."""
    out = host.docker("exec", container, "ip", "-4", "-o", "addr", "show", "eth1", check=False).stdout.split()
    return out[3].split("/")[0] if len(out) > 3 else None


def exec_(host, container, *argv):
    return host.docker("exec", container, *argv, check=False, timeout=30)


def test_no_path_between_networks_and_no_forged_identity(hosts, vxnet_plugin):
    (host,) = hosts(1)
    vxnet_plugin(host)
    create(host, "net-a", SUBNET_A)
    create(host, "net-b", SUBNET_B)
    run_sleeper(host, "a1", "net-a")
    run_sleeper(host, "a2", "net-a", "--cap-add", "NET_ADMIN")
    run_sleeper(host, "b1", "net-b", "--cap-add", "NET_ADMIN")
    a1, a2 = addresses(host, "a1")["net-a"], addresses(host, "a2")["net-a"]
    a1_gw = gwbridge_ip(host, "a1")
    assert a1_gw, "non-internal vxnet networks egress through docker_gwbridge"
    serve_tcp(host, "a1")
    wait_ping(host, "a2", a1)

    # From network B, a1 is unreachable on its vxnet address and on its gateway-bridge address, by ping and TCP,
    # even with a route b1 adds itself towards A's subnet through the gateway bridge.
    exec_(host, "b1", "ip", "route", "add", SUBNET_A, "dev", "eth1")
    for target in (a1, a1_gw):
        assert not pings(host, "b1", target, count=2, wait_s=1), target
        assert not tcp_answers(host, "b1", target), target
    # And the other way: from A, b1 is unreachable too, with a route of a1's own towards B.
    b1, b1_gw = addresses(host, "b1")["net-b"], gwbridge_ip(host, "b1")
    serve_tcp(host, "b1")
    exec_(host, "a2", "ip", "route", "add", SUBNET_B, "dev", "eth1")
    for target in (b1, b1_gw):
        assert not pings(host, "a2", target, count=2, wait_s=1), target
        assert not tcp_answers(host, "a2", target), target

    # a2 (NET_ADMIN) takes another address of its own subnet: nothing gets through; back to its own, it does.
    exec_(host, "a2", "ip", "addr", "flush", "dev", "eth0")
    exec_(host, "a2", "ip", "addr", "add", "10.200.40.99/24", "dev", "eth0")
    assert not pings(host, "a2", a1, count=2, wait_s=1)
    exec_(host, "a2", "ip", "addr", "flush", "dev", "eth0")
    exec_(host, "a2", "ip", "addr", "add", f"{a2}/24", "dev", "eth0")
    wait_ping(host, "a2", a1)
    # ... and another MAC: nothing either.
    exec_(host, "a2", "ip", "link", "set", "eth0", "address", "02:42:0a:c8:28:63")
    exec_(host, "a1", "ip", "neigh", "flush", "all")
    assert not pings(host, "a2", a1, count=2, wait_s=1)


def test_internal_network_has_no_way_out(hosts, vxnet_plugin):
    (host,) = hosts(1)
    vxnet_plugin(host)
    create(host, "inside", SUBNET_I, "--internal")
    run_sleeper(host, "i1", "inside")
    run_sleeper(host, "i2", "inside")
    wait_ping(host, "i1", addresses(host, "i2")["inside"])
    assert gwbridge_ip(host, "i1") is None
    routes = exec_(host, "i1", "ip", "route").stdout
    assert "default" not in routes, routes
    # Not even the host's own addresses: the underlay address, and the gateway bridge's.
    assert not pings(host, "i1", host.ip, count=2, wait_s=1)
    gw = host.run(["ip", "-4", "-o", "addr", "show", "docker_gwbridge"], check=False).stdout.split()
    if len(gw) > 3:
        assert not pings(host, "i1", gw[3].split("/")[0], count=1, wait_s=1)


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
    run_sleeper(h1, "a4", "xa")
    run_sleeper(h1, "b1", "xb", "--cap-add", "NET_ADMIN")
    run_sleeper(h2, "a2", "xa", "--cap-add", "NET_ADMIN")
    run_sleeper(h2, "a3", "xa")
    a1, a2, a3 = addresses(h1, "a1")["xa"], addresses(h2, "a2")["xa"], addresses(h2, "a3")["xa"]
    a4, b1 = addresses(h1, "a4")["xa"], addresses(h1, "b1")["xb"]
    a2_gw = gwbridge_ip(h2, "a2")
    serve_tcp(h2, "a2")
    serve_tcp(h1, "a4")
    wait_ping(h1, "a1", a2)  # the overlay itself works across the hosts
    assert tcp_answers(h1, "a1", a2)

    # B on host 1 towards A on host 2: by the overlay address, and by the gateway-bridge address with a route
    # of its own through eth1, ping and TCP.
    exec_(h1, "b1", "ip", "route", "add", SUBNET_XA, "dev", "eth1")
    for target in (a2, a2_gw):
        assert not pings(h1, "b1", target, count=2, wait_s=1), target
        assert not tcp_answers(h1, "b1", target), target
    # And the other way: A on host 2 towards B on host 1, with a route of a2's own towards B.
    b1_gw = gwbridge_ip(h1, "b1")
    serve_tcp(h1, "b1")
    exec_(h2, "a2", "ip", "route", "add", SUBNET_XB, "dev", "eth1")
    for target in (b1, b1_gw):
        assert not pings(h2, "a2", target, count=2, wait_s=1), target
        assert not tcp_answers(h2, "a2", target), target
    exec_(h2, "a2", "ip", "route", "del", SUBNET_XB, "dev", "eth1")

    # b1 (NET_ADMIN) adds an address inside A's subnet: nothing crosses from B's overlay into A's.
    exec_(h1, "b1", "ip", "addr", "add", "10.200.43.200/24", "dev", "eth0")
    assert not pings(h1, "b1", a2, count=2, wait_s=1)
    assert not tcp_answers(h1, "b1", a2)

    # a2 (NET_ADMIN, host 2) takes the address of a1, which lives on host 1, and then a free one of its own
    # subnet: neither a3 beside it nor a4 across the hosts answers (nothing leaves host 2's bridge port).
    for forged in (a1, "10.200.43.201"):
        exec_(h2, "a2", "ip", "addr", "flush", "dev", "eth0")
        exec_(h2, "a2", "ip", "addr", "add", f"{forged}/24", "dev", "eth0")
        assert not pings(h2, "a2", a3, count=2, wait_s=1), forged
        assert not pings(h2, "a2", b1, count=2, wait_s=1), forged
        assert not pings(h2, "a2", a4, count=2, wait_s=1), forged
        assert not tcp_answers(h2, "a2", a4), forged
    # Back to its own address it reaches a1 across the hosts again: the drops were the forgery, not a broken link.
    exec_(h2, "a2", "ip", "addr", "flush", "dev", "eth0")
    exec_(h2, "a2", "ip", "addr", "add", f"{a2}/24", "dev", "eth0")
    wait_ping(h2, "a2", a4)
    assert tcp_answers(h2, "a2", a4)
    # A forged MAC with its own address: nothing across either.
    exec_(h2, "a2", "ip", "link", "set", "eth0", "address", "02:42:0a:c8:2b:63")
    exec_(h1, "a4", "ip", "neigh", "flush", "all")
    assert not pings(h2, "a2", a4, count=2, wait_s=1)
