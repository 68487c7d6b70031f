"""A plugin restart with many peers changes nothing in the kernel that was right, and a ping between two
containers of the network runs through it without losing a packet (issue 14: restart reconciles, drops no
established traffic). The driver and peer watch run in this process over the real kernel and a real etcd
(tests/harness/inproc.py); 2,000 remote peers are synthetic records in etcd, 30 local endpoints are real veths,
two of them moved into namespaces of their own, as containers, that ping each other across the bridge."""

import os
import re
import secrets
import signal
import subprocess

import pytest

from kernel import names
from netdriver.driver import mac_for
from netdriver.isolation import list_table_command, listed_sets
from netdriver.store import segment_of
from tests.harness.inproc import Node, peer_record, remove_all, wait_for, write_peers

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces")

PEERS = 2000
LOCAL = 30


def ip(*args, ns=None):
    prefix = ["ip", "netns", "exec", ns] if ns else []
    subprocess.run(prefix + ["ip", *args], check=True, timeout=30, capture_output=True)


def ifindexes(path: str) -> dict:
    """name -> ifindex of every link in the namespace at path (the identity a delete/re-add would change)."""
    out = subprocess.run(["nsenter", f"--net={path}", "ip", "-o", "link"], check=True, timeout=30,
                         capture_output=True, text=True).stdout
    return {m.group(2): int(m.group(1)) for m in re.finditer(r"^(\d+): ([^:@]+)", out, re.M)}


def guard_sets(node, ns) -> dict:
    """The anti-spoofing table's sets as listed (elements, not counters: the ping moves those)."""
    return listed_sets(node.links.nft(ns, list_table_command("bridge"), "list anti-spoofing"))


@pytest.fixture
def containers():
    """Namespaces standing for containers, removed afterwards."""
    made = [f"vxtest-{secrets.token_hex(4)}" for _ in range(3)]  # two pinging, one holding the other ends
    for name in made:
        ip("netns", "add", name)
    yield made
    for name in made:
        subprocess.run(["ip", "netns", "del", name], timeout=30)


def test_a_restart_with_2000_peers_rewrites_nothing_and_a_ping_loses_nothing(etcd, netns_dir, containers):
    prefix = f"/vxnet-test-{secrets.token_hex(4)}"
    node = Node(etcd.url, prefix, netns_dir)
    nid = secrets.token_hex(32)
    ns = names.netns(nid)
    ping = None
    try:
        node.start()
        node.create_network(nid, 9200000 + secrets.randbelow(100000), "10.0.0.0/8")
        eids = [secrets.token_hex(32) for _ in range(LOCAL)]
        for i, eid in enumerate(eids):  # the two pinging containers' ends are moved below, the others into one
            node.attach(nid, eid, f"10.1.0.{10 + i}/8", None if i < 2 else f"/run/netns/{containers[2]}")
        for i, container in enumerate(containers[:2]):  # dockerd's part: move the container end in, address it
            ifname = names.veth_container(eids[i])
            ip("link", "set", ifname, "netns", container)
            ip("addr", "add", f"10.1.0.{10 + i}/8", "dev", ifname, ns=container)
            ip("link", "set", ifname, "up", ns=container)
            assert mac_for(f"10.1.0.{10 + i}") in subprocess.run(
                ["ip", "netns", "exec", container, "ip", "link", "show", ifname], capture_output=True,
                text=True, check=True).stdout  # the MAC anti-spoofing expects
        records = [peer_record(nid, i, f"127.1.{i % 20}.1") for i in range(1, PEERS + 1)]
        write_peers(node, nid, records)
        wait_for(lambda: node.writes.get("set_neigh", 0) >= PEERS, 60, "peers programmed")
        assert len(node.links.fdb(ns, names.VXLAN)) == PEERS
        # The control for "no writes at restart": the first start wrote every peer's entries, and counted them.
        assert node.writes.get("set_fdb") == PEERS and node.writes.get("set_neigh") == PEERS
        fdb, neigh = node.links.fdb(ns, names.VXLAN), node.links.neighbours(ns, names.VXLAN)
        before = ifindexes(node.links.netns_path(ns))
        guard = guard_sets(node, ns)
        assert len(guard["ports"]) == LOCAL  # the control: the listing sees every guarded port

        ping = subprocess.Popen(["ip", "netns", "exec", containers[0], "ping", "-n", "-i", "0.01", "10.1.0.11"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        os.set_blocking(ping.stdout.fileno(), False)
        wait_for(lambda: _replies(ping) >= 20, 10, "ping replies before the restart")  # the path works

        node.stop()
        node.writes, node.nft_writes = {}, {}
        took = node.start()
        after = _replies(ping)
        wait_for(lambda: _replies(ping) >= after + 20, 10, "ping replies after the restart")
        ping.send_signal(signal.SIGINT)
        os.set_blocking(ping.stdout.fileno(), True)
        summary = ping.communicate(timeout=10)[0].decode()
        sent, received = map(int, re.search(r"(\d+) packets transmitted, (\d+) received", summary).groups())
        ping = None

        assert sent >= 40 and received == sent, summary
        assert node.writes.get("set_fdb", 0) + node.writes.get("del_fdb", 0) == 0, node.writes
        assert node.writes.get("set_neigh", 0) + node.writes.get("del_neigh", 0) == 0, node.writes
        assert not {"ensure_veth", "remove_link", "remove_netns"} & set(node.writes), node.writes
        # The network's anti-spoofing table is not rewritten. (The host's isolation table is shared with whatever
        # else runs on this machine, other tests' drivers included, so a write there proves nothing either way.)
        assert node.nft_writes.get(ns, 0) == 0, node.nft_writes
        assert node.links.fdb(ns, names.VXLAN) == fdb and node.links.neighbours(ns, names.VXLAN) == neigh
        assert ifindexes(node.links.netns_path(ns)) == before  # no device deleted and made again
        assert guard_sets(node, ns) == guard
        assert node.sync.peerdb.count(segment_of(nid, None)) == PEERS
        print(f"restart with {LOCAL} endpoints and {PEERS} peers reconciled in {took:.2f} s")
    finally:
        if ping is not None:
            ping.kill()
            ping.wait(10)
        remove_all(node, nid, eids, prefix, netns_dir, ns)


_seen = {}


def _replies(proc) -> int:
    """Echo replies the ping has printed so far (read without blocking)."""
    try:
        text = os.read(proc.stdout.fileno(), 1 << 20)
    except BlockingIOError:
        text = b""
    _seen[proc.pid] = _seen.get(proc.pid, 0) + text.count(b"bytes from")
    return _seen[proc.pid]
