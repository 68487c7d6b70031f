"""Host identity on real hosts: simulated hosts that share one hostname (cloned VMs, stock images) or have none
(`(none)`, a minimal VM before init) each get their own generated ID and work together on one etcd; two live
plugins given one VXNET_HOST_ID: the second is refused naming both, the first keeps working."""

import json
import os
import sys

from store import schema
from tests.harness.containers import addresses, pings, run_sleeper, wait_ping
from tests.harness.proc import wait_until

SUBNET = "10.200.30.0/24"
OTHER = "10.200.31.0/24"
NO_ID = {"VXNET_HOST_ID": ""}  # the harness names each host by default; these tests want the generated ID


def set_hostname(host, name):
    """sethostname(2) in the host's UTS namespace (the `hostname` tool refuses names like `(none)`)."""
    host.run([sys.executable, "-c", "import socket, sys; socket.sethostname(sys.argv[1])", name])
    assert host.run(["uname", "-n"]).stdout.strip() == name


def overlay(host, name, subnet):
    # As in the issue: one overlay shared by standalone hosts, the same subnet on each.
    host.docker("network", "create", "-d", "vxnet", "--ipam-driver", "vxnet", "--subnet", subnet,
                "-o", f"overlay={name}", name)


def host_records(etcd):
    keys = [k for k in etcd.keys(schema.PREFIX + "/hosts/") if k.startswith(schema.PREFIX + "/hosts/")]
    return {k.rsplit("/", 1)[1]: json.loads(etcd.get(k)) for k in keys}


def identity_file(host):
    with open(os.path.join(host.dir, "vxnet", "host-id")) as f:
        return f.read().strip()


def test_three_hosts_with_one_hostname_share_an_overlay(hosts, vxnet_plugin, etcd):
    made = hosts(3)
    for h in made:
        set_hostname(h, "ubuntu")
    plugins = [vxnet_plugin(h, env=NO_ID) for h in made]
    ids = [identity_file(h) for h in made]
    assert len(set(ids)) == 3, ids
    wait_until(lambda: len(host_records(etcd)) == 3, 20, "three host records in etcd")
    records = host_records(etcd)
    assert {i: (r["name"], r["vtep"]) for i, r in records.items()} == {
        i: ("ubuntu", h.ip) for i, h in zip(ids, made)}
    assert all(f"host=ubuntu ({i})" in p.log() for i, p in zip(ids, plugins))

    for i, h in enumerate(made, 1):
        overlay(h, "a", SUBNET)  # the second host's create failed with "Pool ... already in use" before
        run_sleeper(h, f"c{i}", "a")
    ips = {i: addresses(h, f"c{i}")["a"] for i, h in enumerate(made, 1)}
    assert len(set(ips.values())) == 3, ips
    for i, h in enumerate(made, 1):
        for j in (1, 2, 3):
            if j != i:
                wait_ping(h, f"c{i}", ips[j])

    # Each host's members and endpoints are its own: a container on another overlay on host 1 cannot reach c2,
    # while c1 on host 1 can, with the same probe.
    h1, h2, _ = made
    overlay(h1, "b", OTHER)
    run_sleeper(h1, "b1", "b")
    assert pings(h1, "c1", ips[2], count=2, wait_s=1)
    assert not pings(h1, "b1", ips[2], count=2, wait_s=1)

    # A restart keeps the ID (the identity file), and host 2's container stays reachable.
    plugins[1].restart()
    assert identity_file(h2) == ids[1] and set(host_records(etcd)) == set(ids)
    run_sleeper(h2, "c2b", "a")
    wait_ping(h1, "c1", addresses(h2, "c2b")["a"])


def test_a_second_live_host_on_one_id_is_refused_and_a_nameless_host_starts(hosts, vxnet_plugin, etcd):
    h1, h2, h3 = hosts(3)
    set_hostname(h3, "(none)")
    p1 = vxnet_plugin(h1, env={"VXNET_HOST_ID": "twin"})
    p3 = vxnet_plugin(h3, env=NO_ID)
    overlay(h1, "a", SUBNET)
    overlay(h3, "a", SUBNET)
    run_sleeper(h1, "c1", "a")
    run_sleeper(h3, "c3", "a")
    ip1, ip3 = addresses(h1, "c1")["a"], addresses(h3, "c3")["a"]
    wait_ping(h3, "c3", ip1)
    wait_until(lambda: "twin" in host_records(etcd), 20, "host 1's record")
    assert host_records(etcd)[identity_file(h3)]["name"] == "(none)"

    p2 = vxnet_plugin(h2, env={"VXNET_HOST_ID": "twin"}, wait=False)
    # Refused once it has seen host 1 renew its lease (every TTL/3 = 10 s); then the process exits non-zero.
    wait_until(lambda: not p2.alive(), 60, "the second plugin claiming 'twin' to be refused and exit")
    assert p2.proc.returncode not in (0, None), p2.proc.returncode
    log = p2.log()
    expected = (f"host ID 'twin' is held by another live host: host1 (vtep {h1.ip}, lease ")
    assert expected in log and f"this host, host2 (vtep {h2.ip}), refuses to serve as it" in log, log
    assert "give each host its own VXNET_HOST_ID" in log, log
    # Host 1's record is untouched and host 1 keeps working (positive control): a new container of its own is
    # reached from host 3, and nothing of host 2 was written.
    assert host_records(etcd)["twin"]["vtep"] == h1.ip and host_records(etcd)["twin"]["name"] == "host1"
    assert p1.alive() and p3.alive()
    run_sleeper(h1, "c1b", "a")
    wait_ping(h3, "c3", addresses(h1, "c1b")["a"])
    wait_ping(h1, "c1", ip3)
    assert not any(h2.ip in (etcd.get(k) or "") for k in etcd.keys(schema.PREFIX + "/"))
