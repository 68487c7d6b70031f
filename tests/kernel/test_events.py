"""kernel/events.py in real namespaces: deleting an FDB entry, a neighbour entry or an nft set element by hand
fires the callback with the namespace and the kind; an XFRM policy added fires it for the 'host' sockets; an
unwatched namespace fires nothing for the same deletion (each negative with its positive, same probe, same
timeout); a receive buffer overrun is reported as 'overrun'."""

import queue
import secrets
import subprocess
import threading

import pytest

from kernel import events as ev
from kernel import names
from kernel.links import Links
from kernel.netns import run_inside
from netdriver import policy_nft as pn
from netdriver.isolation import Firewall
from netdriver.models import Endpoint, Network, Subnet
from netdriver.policy import Diff, Elements
from netdriver.sandbox import DataPlane
from netdriver.underlay import Underlay

PEER_MAC, PEER_IP, PEER_VTEP = "02:42:0a:4e:00:09", "10.78.0.9", "127.0.0.2"
PROBE_SECONDS = 2.0


def sh(*argv, check=True):
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=30)


class Seen:
    """The callback, as a queue of (namespace, kind); the objects each call named are kept in `named`."""

    def __init__(self):
        self.q = queue.Queue()
        self.named = queue.Queue()

    def __call__(self, ns, kind, objects=None):
        self.named.put((ns, kind, objects))  # first: whoever sees (ns, kind) in q finds its objects here
        self.q.put((ns, kind))

    def fired(self, ns, kind, timeout=PROBE_SECONDS) -> bool:
        """True once (ns, kind) arrives within timeout (the one probe of every check here)."""
        deadline = threading.Event()
        timer = threading.Timer(timeout, deadline.set)
        timer.start()
        try:
            while not deadline.is_set():
                try:
                    if self.q.get(timeout=0.05) == (ns, kind):
                        return True
                except queue.Empty:
                    pass
            return False
        finally:
            timer.cancel()

    def drain(self):
        while not self.q.empty():
            self.q.get_nowait()
        while not self.named.empty():
            self.named.get_nowait()

    def objects(self, ns, kind) -> set:
        """Every object the calls so far named for (ns, kind); None among them if one call said "whole"."""
        out = set()
        while not self.named.empty():
            got_ns, got_kind, objects = self.named.get_nowait()
            if (got_ns, got_kind) == (ns, kind):
                out |= {None} if objects is None else set(objects)
        return out


@pytest.fixture
def network():
    links = Links()
    plane = DataPlane(links, Underlay(lambda a: 65536, "127.0.0.1"), Firewall(links.nft))
    nid = secrets.token_hex(32)
    vni = 9_200_000 + secrets.randbelow(100_000)
    net = Network(id=nid, vni=vni, mtu=1450, internal=False, subnets=[Subnet("10.78.0.0/24", None)])
    try:
        plane.ensure_network(net)
        ep = Endpoint(nid, secrets.token_hex(32), "10.78.0.5/24", "02:42:0a:4e:00:05", "h")
        plane.ensure_endpoint(net, ep)
        plane.guard_endpoints(net, [ep])
        plane.sync_peers(net, {PEER_MAC: PEER_VTEP}, {PEER_IP: PEER_MAC})
        yield links, plane, net, ep
    finally:
        plane.remove_network(nid, vni)
        links.close()


def _fdb_del(ns):
    sh("ip", "netns", "exec", ns, "bridge", "fdb", "del", PEER_MAC, "dev", names.VXLAN, "dst", PEER_VTEP, "self")


def test_deletions_by_hand_fire_the_callback_in_a_watched_namespace_only(network):
    links, plane, net, ep = network
    ns = names.netns(net.id)
    seen = Seen()
    listener = ev.KernelEvents(links.netns_path, seen, host=False)
    listener.start()
    try:
        listener.watch(ns)
        vxlan = links.link_index(ns, names.VXLAN)
        _fdb_del(ns)
        assert seen.fired(ns, "fdb")
        # What the notification named travels with it: the device, the MAC, the VTEP, a deletion of its own table
        assert ev.NeighChange(vxlan, PEER_MAC, PEER_VTEP, False, True) in seen.objects(ns, "fdb")
        sh("ip", "netns", "exec", ns, "ip", "neigh", "del", PEER_IP, "dev", names.VXLAN)
        assert seen.fired(ns, "neighbour")
        # (no MAC: the kernel sends NDA_LLADDR only for an entry in a valid state, neigh_fill_info)
        assert ev.NeighChange(vxlan, None, PEER_IP, False, True) in seen.objects(ns, "neighbour")
        port, mac = names.veth_bridge(ep.id), ep.mac
        sh("ip", "netns", "exec", ns, "bridge", "fdb", "del", mac, "dev", port, "master")
        assert seen.fired(ns, "fdb")
        assert ev.NeighChange(links.link_index(ns, port), mac, None, True, True) in seen.objects(ns, "fdb")
        sh("ip", "netns", "exec", ns, "nft", "delete", "element", "bridge", "vxnet", "ports",
           "{", names.veth_bridge(ep.id), "}")
        assert seen.fired(ns, "nft")
        sh("ip", "netns", "exec", ns, "ip", "link", "set", names.BRIDGE, "down")
        assert seen.fired(ns, "link")
        assert ev.LinkChange(links.link_index(ns, names.BRIDGE), names.BRIDGE, False) in seen.objects(ns, "link")

        # Negative, same probe: the same deletion in the namespace once unwatched fires nothing.
        plane.sync_peers(net, {PEER_MAC: PEER_VTEP}, {PEER_IP: PEER_MAC})
        listener.unwatch(ns)
        seen.drain()
        _fdb_del(ns)
        assert not seen.fired(ns, "fdb")
        # and watched again (a namespace made anew under its name is watched this way), it fires again.
        plane.sync_peers(net, {PEER_MAC: PEER_VTEP}, {PEER_IP: PEER_MAC})
        listener.watch(ns)
        seen.drain()
        _fdb_del(ns)
        assert seen.fired(ns, "fdb")
    finally:
        listener.stop()


def test_host_sockets_report_xfrm_policies_and_nftables():
    """The host set of sockets, opened in a namespace of the test's own (so nothing touches this machine's
    XFRM tables): a policy added there is a 'policy' event, a table added an 'nft' event, under ns None."""
    name = f"vxt-ev-{secrets.token_hex(4)}"
    sh("ip", "netns", "add", name)
    seen = Seen()
    listener = ev.KernelEvents(lambda n: f"/run/netns/{n}", seen, host=True)
    try:
        run_inside(f"/run/netns/{name}", listener.start)  # 'host' sockets made where start() runs
        sh("ip", "-n", name, "xfrm", "policy", "add", "src", "192.0.2.1", "dst", "192.0.2.2", "proto", "udp",
           "dport", "4790", "dir", "out", "tmpl", "proto", "esp", "mode", "transport")
        assert seen.fired(None, "policy")
        sh("ip", "netns", "exec", name, "nft", "add", "table", "inet", "vxt")
        assert seen.fired(None, "nft")
        assert not seen.fired(None, "sa", timeout=0.5)  # no SA was touched (control: policy above, same probe)
    finally:
        listener.stop()
        sh("ip", "netns", "del", name, check=False)


def test_an_overrun_is_reported(network, monkeypatch):
    links, plane, net, ep = network
    ns = names.netns(net.id)
    monkeypatch.setattr(ev, "RCVBUF", 4096)  # the kernel's floor is about 2 KiB: a few dozen notifications
    held = threading.Event()
    seen = Seen()

    def slow(ns_, kind, objects=None):
        seen(ns_, kind, objects)
        held.wait(10)  # the listener reads nothing while the burst below overflows its buffer

    listener = ev.KernelEvents(links.netns_path, slow, host=False)
    listener.start()
    try:
        listener.watch(ns)
        _fdb_del(ns)
        assert seen.fired(ns, "fdb")
        fdb = {f"02:42:0a:4f:{i // 256:02x}:{i % 256:02x}": PEER_VTEP for i in range(300)}
        plane.sync_peers(net, fdb, {})
        held.set()
        assert seen.fired(ns, "overrun")
    finally:
        held.set()
        listener.stop()


def test_the_reads_the_reconciler_compares_see_what_was_deleted(network):
    """DataPlane.guard_drift, network_problems and sync_peers' counts against the real kernel: equal when intact
    (control), the deleted element, the downed bridge and the deleted FDB entry named or counted."""
    links, plane, net, ep = network
    ns = names.netns(net.id)
    assert plane.guard_drift(net, [ep]) is None and plane.network_problems(net) == []
    assert plane.sync_peers(net, {PEER_MAC: PEER_VTEP}, {PEER_IP: PEER_MAC}) == (0, 0)
    sh("ip", "netns", "exec", ns, "nft", "delete", "element", "bridge", "vxnet", "ports",
       "{", names.veth_bridge(ep.id), "}")
    assert "set ports lacks" in plane.guard_drift(net, [ep])
    sh("ip", "netns", "exec", ns, "ip", "link", "set", names.BRIDGE, "down")
    assert plane.network_problems(net) == [f"bridge {names.BRIDGE} down"]
    _fdb_del(ns)
    assert plane.sync_peers(net, {PEER_MAC: PEER_VTEP}, {PEER_IP: PEER_MAC}) == (1, 0)
    assert plane.sync_peers(net, {PEER_MAC: PEER_VTEP}, {PEER_IP: PEER_MAC}) == (0, 0)



def test_our_own_policy_commits_wake_nothing_and_each_asks_libnftables_for_its_change_only(network):
    """The bench's rule changes slowed from about the 10th on (0.2-0.8 s each instead of 1-3 ms): every update's own
    commit woke the reconciler, whose pass listed and compiled the whole policy table while the next change waited.
    50 rule changes (allow, rm, ...) by this process's Links against a table of 2,000 allow elements: no 'nft'
    event, and every batch handed to libnftables holds that change's elements and nothing else (no listing); the
    same kind of change made by `nft` in the same namespace does fire (control, same probe)."""
    links, plane, net, ep = network
    ns = names.netns(net.id)
    asked = []

    def apply(ns_, commands, what, terse=False):
        asked.append(commands)
        return links.nft(ns_, commands, what, terse=terse)

    firewall = pn.PolicyFirewall(apply)
    bulk = frozenset((f"10.79.{i // 250}.{i % 250 + 1}", "10.78.0.5", "tcp", 6000 + i % 100) for i in range(2000))
    firewall.ensure_policy(ns, "deny", False, Elements(guarded=frozenset({"10.78.0.5"}), allow=bulk))
    seen = Seen()
    listener = ev.KernelEvents(links.netns_path, seen, host=False, own_committer=links.nft_committer)
    listener.start()
    try:
        listener.watch(ns)
        asked.clear()
        for i in range(50):
            pair = Elements(allow_all=frozenset({(f"10.78.1.{i // 2 + 1}", "10.78.0.5")}))
            firewall.update_policy(ns, Diff(add=pair) if i % 2 == 0 else Diff(remove=pair))
        assert not seen.fired(ns, "nft")
        # What libnftables was asked, per change: one add for an allow, an add and a delete for a removal, each of
        # the one element; never a listing, whatever the 2,000 elements beside them.
        shapes = {tuple((verb, len(body["element"]["elem"])) for command in batch for verb, body in command.items())
                  for batch in asked}
        assert len(asked) == 50 and shapes == {(("add", 1),), (("add", 1), ("delete", 1))}

        sh("ip", "netns", "exec", ns, "nft", "add", "element", pn.FAMILY, names.POLICY_TABLE, "allow_all4",
           "{ 10.78.2.1 . 10.78.0.5 }")
        assert seen.fired(ns, "nft")
        # and a commit of this process's own made again after it: still nothing (the filter is per commit)
        seen.drain()
        firewall.update_policy(ns, Diff(remove=Elements(allow_all=frozenset({("10.78.2.1", "10.78.0.5")}))))
        assert not seen.fired(ns, "nft")
    finally:
        listener.stop()
        firewall.remove_policy(ns)
