"""Run inside `unshare --mount --propagation private` by test_netns_folder.py: a tmpfs on /run makes /run/netns what
it is after a boot (no folder, so no mount point), or, with `shared`, what systemd's shared /run gives. Each
scenario asserts and exits non-zero on failure; nothing it makes outlives the mount namespace except what it
removes itself (the network namespaces and the VXLAN device, all named with a random tag)."""

import os
import secrets
import subprocess
import sys

from kernel import names, netnsdir
from kernel.links import Links
from netdriver.models import Network, Subnet
from netdriver.sandbox import DataPlane
from netdriver.underlay import Underlay

FOLDER = "/run/netns"


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=30)


def mounts():
    return netnsdir._read_mounts()


def spaces_named(name: str):
    return [m for m in netnsdir.namespace_mounts(mounts(), FOLDER) if os.path.basename(m.point) == name]


def reachable(name: str) -> bool:
    """The same probe everywhere: iproute2 enters the namespace by its path."""
    return sh("ip", "netns", "exec", name, "true", check=False).returncode == 0


def fresh_machine(tag: str) -> None:
    """vxnet creates a network's namespace first, then the real `ip netns add`, then the network is deleted."""
    assert netnsdir.top_mount(mounts(), FOLDER) is None and not os.path.exists(FOLDER), "not a fresh folder"
    links = Links(FOLDER)
    plane = DataPlane(links, Underlay(lambda a: 65536, "127.0.0.1"))
    nid = secrets.token_hex(32)
    vni = 9_100_000 + secrets.randbelow(100_000)
    network = Network(id=nid, vni=vni, mtu=1450, internal=False, subnets=[Subnet("10.78.0.0/24", None)])
    other = f"vxtest-{tag}"
    try:
        plane.ensure_network(network)
        sh("ip", "netns", "add", other)
        ns = names.netns(nid)
        # Controls: both namespaces are there and reachable by path, each mounted once.
        assert reachable(ns) and reachable(other), mounts()
        assert len(spaces_named(ns)) == 1 and len(spaces_named(other)) == 1, spaces_named(ns)
        assert not netnsdir.hidden(mounts(), FOLDER)
        plane.remove_network(nid, vni)
        assert not os.path.exists(os.path.join(FOLDER, ns)), os.listdir(FOLDER)
        assert spaces_named(ns) == [], spaces_named(ns)
        assert ns not in links.list_netns()
        assert reachable(other)  # iproute2's namespace is untouched
    finally:
        plane.remove_network(nid, vni)
        sh("ip", "netns", "del", other, check=False)
        links.close()
    assert spaces_named(other) == []


def repair(tag: str) -> None:
    """The old ordering: a namespace mounted on the plain folder, then `ip netns add` (which hides it); a vxnet
    that starts then mounts it back and can delete it."""
    assert netnsdir.top_mount(mounts(), FOLDER) is None and not os.path.exists(FOLDER), "not a fresh folder"
    ns = names.netns(secrets.token_hex(32))
    other = f"vxtest-{tag}"
    os.makedirs(FOLDER)
    path = os.path.join(FOLDER, ns)
    open(path, "w").close()
    sh("unshare", "--net", "--", "mount", "--bind", "/proc/self/ns/net", path)
    sh("ip", "netns", "add", other)
    links = Links(FOLDER)
    try:
        # The reproduction works: unmounting by path leaves the original covered, and removal fails.
        sh("umount", path)
        assert len(netnsdir.hidden(mounts(), FOLDER)) == 1, mounts()
        assert not reachable(ns) and reachable(other)
        try:
            os.unlink(path)
            raise AssertionError("removing a file with a hidden mount on it should fail with EBUSY")
        except OSError as exc:
            assert exc.errno == 16, exc

        assert ns in links.list_netns()  # start-up's first look at the folder repairs it
        assert netnsdir.hidden(mounts(), FOLDER) == []
        assert reachable(ns) and reachable(other)
        assert len(spaces_named(ns)) == 1
        links.remove_netns(ns)
        assert not os.path.exists(path) and spaces_named(ns) == []
        assert reachable(other)
        assert links.prepare_netns_dir() == []  # once per process, and nothing left to repair
    finally:
        links.remove_netns(ns)
        links.close()
        sh("ip", "netns", "del", other, check=False)
    assert spaces_named(other) == [] and netnsdir.namespace_mounts(mounts(), FOLDER) == []


def shared_parent(tag: str) -> None:
    """Under a shared /run (systemd) the folder's layers are peers: nothing to repair, nothing left after."""
    links = Links(FOLDER)
    other = f"vxtest-{tag}"
    ns = names.netns(secrets.token_hex(32))
    try:
        assert links.prepare_netns_dir() == []
        links.ensure_netns(ns)
        sh("ip", "netns", "add", other)
        assert reachable(ns) and reachable(other)
        assert netnsdir.hidden(mounts(), FOLDER) == []
        links.remove_netns(ns)
        assert not os.path.exists(os.path.join(FOLDER, ns)) and spaces_named(ns) == []
        assert reachable(other)
    finally:
        links.remove_netns(ns)
        links.close()
        sh("ip", "netns", "del", other, check=False)


def leftover(tag: str, etcd_url: str) -> None:
    """A leftover a vxnet that took IDs on trust made (a folder vxnet-0.0.0.0 with a namespace mounted inside, as
    NetworkID "0.0.0.0/0" gave) and a stale namespace the kernel will not let go of: a restarted plugin reports
    both by name and still rebuilds the network it is a member of, and removes the stale namespace it can."""
    from netdriver.driver import NetworkDriver
    from netdriver.store import NetworkStore
    from store.kvstore import EtcdKV
    from wire import protocol as p

    os.makedirs(FOLDER + "/vxnet-0.0.0.0")
    junk = FOLDER + "/vxnet-0.0.0.0/0"
    open(junk, "w").close()
    sh("unshare", "--net", "--", "mount", "--bind", "/proc/self/ns/net", junk)
    kv = EtcdKV([etcd_url])
    prefix = f"/vxtest-{tag}/v1"
    links = Links(FOLDER)
    plane = DataPlane(links, Underlay(lambda a: 65536, "127.0.0.1"))
    underlay = Underlay(lambda a: 1500, "127.0.0.1")
    nid, stale = secrets.token_hex(32), names.netns(secrets.token_hex(32))
    make = lambda: NetworkDriver(NetworkStore(kv, prefix), plane, "h1", "local", underlay)  # noqa: E731
    vni = 9_200_000 + secrets.randbelow(9999)
    try:
        make().create_network(p.CreateNetworkRequest.decode({
            "NetworkID": nid, "Options": {"com.docker.network.generic": {"vni": str(vni)}},
            "IPv4Data": [{"Pool": "10.79.0.0/24", "Gateway": "10.79.0.1/24"}]}))
        ns = names.netns(nid)
        assert reachable(ns)
        plane.remove_network(nid, vni)  # a reboot took it
        links.ensure_netns(stale)
        assert not reachable(ns) and reachable(stale)  # controls for the checks after the restart

        problems = make().reconcile()
        assert len(problems) == 1 and "vxnet-0.0.0.0" in problems[0], problems
        assert reachable(ns) and links.link_exists(ns, names.VXLAN), links.list_netns()  # rebuilt all the same
        assert not reachable(stale) and stale not in links.list_netns()
        assert os.path.isdir(FOLDER + "/vxnet-0.0.0.0")  # not ours to touch: left for the operator
    finally:
        make().delete_network(p.NetworkIDRequest.decode({"NetworkID": nid}))
        links.remove_netns(stale)
        links.close()
        sh("umount", junk, check=False)
        kv.delete_prefix(prefix + "/")
    assert not os.path.exists(os.path.join(FOLDER, names.netns(nid)))


def main(scenario: str, tag: str, *args: str) -> None:
    # This mount namespace's private copies of the machine's /run/netns layers go first (nothing propagates out of
    # a private namespace), so that the tmpfs below shows the folder as a boot leaves it.
    while netnsdir.top_mount(mounts(), FOLDER) is not None:
        sh("umount", "--lazy", FOLDER)
    sh("mount", "-t", "tmpfs", "vxtest-run", "/run")
    if scenario == "shared_parent":
        sh("mount", "--make-shared", "/run")
    {"fresh_machine": fresh_machine, "repair": repair, "shared_parent": shared_parent,
     "leftover": leftover}[scenario](tag, *args)
    print("ok")


if __name__ == "__main__":
    main(*sys.argv[1:])
