"""The reconciler's event passes look at what the notifications name (netdriver/reconciler.py), over the real
kernel and a real etcd, composed as the plugin composes them (tests/harness/inproc.py, reconciler on): an
endpoint's static bridge entry deleted with `bridge fdb del`, an endpoint's port deleted with `ip link del`, and
a remote peer's FDB entry pointed elsewhere with `bridge fdb replace` are each put back by a pass that was told
the objects, through the narrow checks (DataPlane.repair_ports, PeerSync.repair_entries); the first and the last
read no whole table but the anti-spoofing table a port's repair is followed by. Each deletion is seen in the
kernel before its repair (the positive control: the pass waits on the lock the repair takes, held by the test
while it looks)."""

import json
import os
import secrets
import subprocess
import threading
import time

import pytest

from kernel import names
from netdriver.driver import mac_for
from tests.harness.inproc import Node, peer_record, remove_all, wait_for, write_peers

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces")


def sh(*argv):
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout


def static_entries(path):
    """(port, mac) of every static bridge entry in the namespace mounted at path."""
    listed = json.loads(sh("nsenter", f"--net={path}", "bridge", "-j", "fdb", "show") or "[]")
    return {(e["ifname"], e["mac"]) for e in listed if "static" in e.get("state", "") and e.get("master")}


def link_names(path):
    return {link["ifname"] for link in json.loads(sh("nsenter", f"--net={path}", "ip", "-j", "link", "show"))}


def settle(healing, quiet=0.5, timeout=30):
    """Wait until the reconciler has had nothing queued for `quiet` seconds (the set-up's own notifications,
    the Joins' and the peer's, have had their passes)."""
    since = [time.monotonic()]

    def idle():
        with healing._cond:
            busy = bool(healing._pending) or healing._due is not None
        now = time.monotonic()
        if busy:
            since[0] = now
        return now - since[0] >= quiet
    wait_for(idle, timeout, "the reconciler idle")


class Recorder:
    """Every pass of the node's reconciler: (trigger, targets, result, whole reads it made: network_problems and
    full peer syncs, anti-spoofing comparisons), and every repair_ports call with what it returned."""

    def __init__(self, node):
        self.passes, self.ports, self.whole, self.guard = [], [], 0, 0
        self.lock = threading.Lock()
        plane, healing = node.plane, node.healing
        for name in ("network_problems", "sync_peers"):
            setattr(plane, name, self._counted(getattr(plane, name)))
        guard_drift = plane.guard_drift

        def guard(*args, **kwargs):
            self.guard += 1
            return guard_drift(*args, **kwargs)
        plane.guard_drift = guard
        repair_ports = plane.repair_ports

        def ports(network, ports=(), macs=()):
            fixed = repair_ports(network, ports, macs)
            self.ports.append((set(ports), set(macs), fixed))
            return fixed
        plane.repair_ports = ports
        run_pass = healing.run_pass

        def recorded(trigger, targets=None):
            before = self.whole, self.guard
            result = run_pass(trigger, targets)
            with self.lock:
                self.passes.append((trigger, targets, result, (self.whole - before[0], self.guard - before[1])))
            return result
        healing.run_pass = recorded

    def _counted(self, method):
        def counted(*args, **kwargs):
            self.whole += 1
            return method(*args, **kwargs)
        return counted

    def repairs(self):
        with self.lock:
            return [p for p in self.passes if p[2]]


def test_a_static_entry_a_port_and_a_peer_entry_are_repaired_through_the_named_checks(etcd, netns_dir):
    holder = f"vxtest-{secrets.token_hex(4)}"  # the containers' side: their ends are moved in, as by dockerd
    sh("ip", "netns", "add", holder)
    # A period longer than the test: every pass here is woken by an event.
    prefix = f"/vxnet-test-{secrets.token_hex(4)}"
    node = Node(etcd.url, prefix, netns_dir, reconcile_seconds=600)
    nid = secrets.token_hex(32)
    ns = names.netns(nid)
    eids = [secrets.token_hex(32) for _ in range(4)]
    try:
        node.start()
        node.create_network(nid, 9300000 + secrets.randbelow(100000), "10.0.0.0/8")
        for i, eid in enumerate(eids):  # the last one given the first one's address, so its MAC too
            node.attach(nid, eid, f"10.1.0.{10 + i if i < 3 else 10}/8", f"/run/netns/{holder}")
        peer = peer_record(nid, 1, "127.1.0.1")
        write_peers(node, nid, [peer])
        wait_for(lambda: node.links.fdb(ns, names.VXLAN).get(peer.mac) == peer.vtep, 30, "the peer programmed")
        path = node.links.netns_path(ns)
        # Two ports carrying one MAC want one static entry each for a key the bridge holds once: the newest holds
        # it, and the passes do not move it back and forth (else the reconciler never goes idle here).
        settle(node.healing)
        shared = mac_for("10.1.0.10")
        assert {p for p, m in static_entries(path) if m == shared} == {names.veth_bridge(eids[3])}
        rec = Recorder(node)

        # 1. `bridge fdb del` of one endpoint's static entry.
        port, mac = names.veth_bridge(eids[1]), mac_for("10.1.0.11")
        assert (port, mac) in static_entries(path)
        with node.plane._lock(ns):  # repair_ports waits for it
            sh("nsenter", f"--net={path}", "bridge", "fdb", "del", mac, "dev", port, "master")
            assert (port, mac) not in static_entries(path)  # gone in the kernel (positive control)
        wait_for(lambda: (port, mac) in static_entries(path), 10, "the static entry put back")
        wait_for(lambda: rec.repairs(), 10, "the repair pass recorded")
        (trigger, targets, result, whole), = rec.repairs()
        assert trigger == "event" and result == {"port": 1}, rec.passes
        # named; nothing read whole but the anti-spoofing table, compared once after a port's repair
        assert {c.mac for c in targets[ns]["fdb"]} >= {mac} and whole == (0, 1), rec.passes
        assert rec.ports[-1] == (set(), {mac}, [f"fdb {mac} on {names.BRIDGE} missing instead of {port}"])

        settle(node.healing)  # each step's passes on their own (a port made again may notify the bridge too)

        # 2. `ip link del` of another endpoint's port: the pair goes, the port is made again on its bridge with
        # its static entry, its new container end in the host namespace.
        port, mac = names.veth_bridge(eids[2]), mac_for("10.1.0.12")
        with node.plane._lock(ns):
            sh("nsenter", f"--net={path}", "ip", "link", "del", port)
            assert port not in link_names(path)  # positive control
        wait_for(lambda: (port, mac) in static_entries(path), 10, "the port and its entry made again")
        wait_for(lambda: len(rec.repairs()) == 2, 10, "the repair pass recorded")
        trigger, targets, result, _ = rec.repairs()[1]
        assert trigger == "event" and result == {"port": 1}, rec.passes
        assert port in {c.ifname for c in targets[ns]["link"]}, targets  # the link named, not the whole kind
        assert [f for _, _, f in rec.ports if f][-1] == [f"port {port} missing"]
        ends = link_names("/proc/self/ns/net")
        assert names.veth_container(eids[2]) in ends
        sh("ip", "link", "set", names.veth_container(eids[2]), "netns", holder)  # out of the host namespace

        settle(node.healing)

        # 3. `bridge fdb replace` of the remote peer's entry towards another VTEP: corrected by its key alone.
        with node.sync._lock:  # PeerSync.repair_entries waits for it
            sh("nsenter", f"--net={path}", "bridge", "fdb", "replace", peer.mac, "dev", names.VXLAN, "dst",
               "127.9.9.9", "self", "permanent")
            assert node.links.fdb_entry(ns, names.VXLAN, peer.mac) == "127.9.9.9"  # positive control
        wait_for(lambda: node.links.fdb_entry(ns, names.VXLAN, peer.mac) == peer.vtep, 10, "the entry corrected")
        wait_for(lambda: len(rec.repairs()) == 3, 10, "the repair pass recorded")
        trigger, targets, result, whole = rec.repairs()[2]
        # (update_peers counts a moved entry as its old VTEP's taken out and the right one put in: 2)
        assert trigger == "event" and set(result) == {"fdb"} and whole == (0, 0), rec.passes
        assert peer.mac in {c.mac for c in targets[ns]["fdb"]}

        # Every repair's own notifications end in quiet passes: three repairs in all, the last pass quiet.
        wait_for(lambda: rec.passes and not rec.passes[-1][2], 10, "a quiet pass last")
        assert len(rec.repairs()) == 3, rec.passes
    finally:
        try:
            remove_all(node, nid, eids, prefix, netns_dir, ns)
        finally:
            subprocess.run(["ip", "netns", "del", holder], timeout=30)
