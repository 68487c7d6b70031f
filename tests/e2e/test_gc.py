"""A host killed for good (its plugin and dockerd stopped by PID, the host removed) on three simulated hosts with
real dockerd and etcd: its peers go with its lease, `vxnet gc --dry-run` lists its holds and releases none,
the plugins collect them once it is stale (VXNET_STALE_HOST_SECONDS and VXNET_GC_SECONDS shortened), and a new
container gets the released address, which before the collection no container could get."""

import json
import sys

from kernel import names
from tests.harness.containers import IMAGE, addresses, network_id, run_sleeper
from tests.harness.plugin import REPO
from tests.harness.proc import wait_until

# A /29: .0 the network, .7 broadcast, .1 the gateway, so five container addresses (.2 to .6).
SUBNET = "10.200.29.0/29"
STALE = 30  # seconds: room for the dry run and the negative control before the collection
GC_EVERY = 2
# The host lease's TTL (netdriver/hosts.py LEASE_TTL, 30 s) plus slack for a slow machine.
LEASE_WAIT = 60
SETTINGS = {"VXNET_STALE_HOST_SECONDS": str(STALE), "VXNET_GC_SECONDS": str(GC_EVERY)}


def vxnet(host, etcd, *args):
    """`vxnet ARGS --json` run in host (from the checkout, as `make run`'s wrapper does) -> (status, JSON)."""
    done = host.run([sys.executable, "-m", "cli", *args, "--json", "--etcd", etcd.url], cwd=REPO, check=False,
                    timeout=60, env={"PYTHONPATH": REPO, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    assert done.returncode in (0, 1), done.stdout + done.stderr
    return done.returncode, json.loads(done.stdout)


def held_by(etcd, host_id):
    """The IPAM keys whose holders include host_id, and the endpoint/member keys naming it."""
    out = []
    for key in etcd.keys("/vxnet/v1/"):
        if key.startswith("/vxnet/v1/ipam/"):
            if host_id in json.loads(etcd.get(key))["hosts"]:
                out.append(key)
        elif key.startswith("/vxnet/v1/endpoints/"):
            if json.loads(etcd.get(key))["host"] == host_id:
                out.append(key)
        elif key.startswith("/vxnet/v1/members/") and key.endswith("/" + host_id):
            out.append(key)
    return sorted(out)


def overlay(host):
    """Overlay blue on a standalone host: `-o overlay=blue` with the one /29, its addresses held by vxnet IPAM."""
    host.docker("network", "create", "-d", "vxnet", "--ipam-driver", "vxnet", "--subnet", SUBNET, "-o",
                "overlay=blue", "blue")
    return network_id(host, "blue")


def neighbours(host, nid):
    """The IPs of the permanent neighbour entries in the network's namespace on that host."""
    out = host.run(["ip", "-n", names.netns(nid), "neigh", "show", "dev", names.VXLAN]).stdout
    return {line.split()[0] for line in out.splitlines() if "lladdr" in line}


def refused(host, name):
    """True if `docker run` on host cannot start container name for want of an address (the container dockerd
    created is removed)."""
    done = host.docker("run", "-d", "--init", "--name", name, "--network", "blue", IMAGE,
                       "sleep", "86400", check=False, timeout=120)
    if done.returncode == 0:
        return False
    host.docker("rm", "-f", name, check=False)
    assert "no free address" in done.stderr, done.stderr
    return True


def test_a_host_killed_for_good_is_collected_and_its_address_given_again(lab, hosts, vxnet_plugin, etcd):
    h1, h2, h3 = hosts(3)
    plugins = [vxnet_plugin(h, env=SETTINGS) for h in (h1, h2, h3)]
    nets = {h: overlay(h) for h in (h1, h2, h3)}
    for name, h in (("a1", h1), ("a2", h1), ("b1", h2), ("b2", h2), ("c1", h3)):
        run_sleeper(h, name, "blue")
    ip_c1 = addresses(h3, "c1")["blue"]
    assert refused(h1, "full")  # every address is held
    hosts_before = {json.loads(etcd.get(k))["vtep"]: k.rsplit("/", 1)[1] for k in etcd.keys("/vxnet/v1/hosts/")}
    gone = hosts_before[h3.ip]
    held = held_by(etcd, gone)
    assert any(k.endswith("/" + ip_c1) for k in held) and any("/ipam/pools/" in k for k in held)
    status, report = vxnet(h1, etcd, "gc", "--dry-run")
    assert (status, report["hosts"]) == (0, [])  # everyone alive: nothing to collect

    wait_until(lambda: all(ip_c1 in neighbours(h, nets[h]) for h in (h1, h2)), 20,
               "host 3's container to be a peer on hosts 1 and 2")

    # Host 3 goes for good: its plugin, then its dockerd, stopped by PID; then the host itself is removed.
    plugins[2].kill()
    h3.dockerd.stop(20)
    assert not lab.remove_hosts([h3])
    wait_until(lambda: gone not in [k.rsplit("/", 1)[1] for k in etcd.keys("/vxnet/v1/hosts/")], LEASE_WAIT,
               "host 3's lease to expire")
    wait_until(lambda: all(ip_c1 not in neighbours(h, nets[h]) for h in (h1, h2)), 20,
               "host 3's peer to leave hosts 1 and 2")

    # The plugins mark it gone (from their earlier view of its record: its name and VTEP); a dry run lists its
    # holds and releases none.
    def marked():
        return vxnet(h1, etcd, "gc", "--dry-run")[1]["hosts"]
    wait_until(lambda: [h["since"] is not None for h in marked()] == [True], 3 * GC_EVERY + 10,
               "a plugin to mark host 3 gone")
    status, report = vxnet(h1, etcd, "gc", "--dry-run")
    (listed,) = report["hosts"]
    assert (listed["host"], listed["vtep"]) == (gone, h3.ip)
    kinds = sorted(hold["kind"] for hold in listed["holds"])
    assert kinds.count("address") == 2 and {"endpoint", "member", "pool"} <= set(kinds), listed
    assert any(hold.get("address") == ip_c1 for hold in listed["holds"])
    assert all("result" not in hold for hold in listed["holds"])
    assert held_by(etcd, gone) == held  # the dry run released nothing ...
    assert refused(h2, "early")  # ... and no address is free yet

    # Once stale, a plugin collects everything: the same keys the dry run left are gone, and the address is free.
    wait_until(lambda: held_by(etcd, gone) == [], STALE + 6 * GC_EVERY + 30, "the plugins to collect host 3")
    assert not [k for k in etcd.keys("/vxnet/v1/departed/")]
    run_sleeper(h2, "b3", "blue")
    assert addresses(h2, "b3")["blue"] == ip_c1
    status, report = vxnet(h1, etcd, "gc")
    assert (status, report["hosts"]) == (0, [])  # a replay finds nothing
    assert addresses(h1, "a1")["blue"] and held_by(etcd, hosts_before[h1.ip])  # the others keep theirs

