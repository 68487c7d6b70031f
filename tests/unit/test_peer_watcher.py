"""The peer watcher (netdriver.watcher.PeerWatcher over store.watchloop.WatchLoop) over a watchable FakeKV: peers
other hosts write reach the (fake) data plane; after a compaction, a broken stream or an etcd outage the watcher
reads everything again and converges, including on changes whose events it never saw; stop() ends it. Every
check is on end state: the peers the data plane holds, the watches etcd has open."""

import dataclasses
import logging

import pytest

from netdriver.models import Network, PeerRecord, Subnet
from netdriver.peerdb import PeerDB
from netdriver.store import NetworkStore, segment_of
from netdriver.watcher import PeerSync, PeerWatcher
from store.kvstore import Compacted
from telemetry.metrics import WATCH_RESYNCS
from tests.fakes import FakeDataPlane, FakeKV
from tests.harness.proc import wait_until
from wire.errors import StoreUnavailable

NID = "a" * 64
SEGMENT = segment_of(NID, None)
# Generous for a loaded 2-core machine; a working watcher converges in milliseconds (back-off 0.1 s, max 0.05 s
# here).
DEADLINE = 10.0


def peer(n, host="h2"):
    return PeerRecord(network_id=NID, endpoint_id=f"{n:x}" * 64, ip=f"10.0.0.{n}", mac=f"02:42:0a:00:00:{n:02x}",
                      vtep=f"192.0.2.{n}", host=host)


def programmed(*peers):
    """The data plane's peer entries for these records: ip -> (mac, vtep)."""
    return {p.ip: (p.mac, p.vtep) for p in peers}


class Host:
    """Host h1: its data plane with one network up, the peer sync and the watcher, over a shared FakeKV."""

    def __init__(self, kv):
        self.kv = kv
        self.store = NetworkStore(kv)
        self.plane = FakeDataPlane()
        network = Network(id=NID, vni=7, mtu=1450, internal=False, subnets=[Subnet("10.0.0.0/24", None)])
        self.plane.ensure_network(network)
        self.sync = PeerSync(PeerDB("h1"), self.plane)
        self.sync.network_up(network)
        self.watcher = PeerWatcher(kv, self.store, self.sync, max_backoff=0.05)

    def peers(self):
        return self.plane.peers.get(NID)

    def converges(self, *expected, what):
        want = programmed(*expected)
        wait_until(lambda: self.peers() == want, DEADLINE, what)


@pytest.fixture
def kv():
    return FakeKV()


@pytest.fixture
def host(kv, caplog):
    caplog.set_level(logging.INFO)
    h1 = Host(kv)
    yield h1
    h1.watcher.stop()
    # Nothing crashed along the way: a fake's complaint (an incremental update from a state the kernel is not in)
    # or a bug would be logged at ERROR by the loop, which then resyncs and could hide it behind a good end state.
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def publish(kv, *records):
    """Another host's Join: its peer record in etcd."""
    store = NetworkStore(kv)
    for record in records:
        store.put_peer(SEGMENT, record)


def test_peers_written_and_removed_on_other_hosts_reach_the_data_plane(kv, host):
    publish(kv, peer(2), peer(9, host="h1"))  # before the start: the first full read brings it; our own is skipped
    host.watcher.start()
    host.converges(peer(2), what="the peer present at start in the data plane")
    publish(kv, peer(3), peer(4))
    host.converges(peer(2), peer(3), peer(4), what="peers put after the start")
    NetworkStore(kv).delete_peer(SEGMENT, peer(2).endpoint_id)
    moved = dataclasses.replace(peer(3), vtep="192.0.2.33")  # the endpoint's host got a new address
    publish(kv, moved)
    host.converges(moved, peer(4), what="a deleted and a changed peer")
    assert kv.streams and all(s.prefix == host.store.peers_prefix() for s in kv.streams)  # one watch, on peers/


def resyncs():
    return WATCH_RESYNCS.labels(watch="peer watch")._value.get()


def test_after_a_compaction_a_full_read_repairs_what_the_lost_events_said(kv, host):
    publish(kv, peer(2), peer(3))
    before = resyncs()
    host.watcher.start()
    host.converges(peer(2), peer(3), what="the first full read")
    assert resyncs() == before + 1  # the first full read counts
    kv.hold_watches()  # the watcher falls behind ...
    store = NetworkStore(kv)
    store.delete_peer(SEGMENT, peer(2).endpoint_id)
    publish(kv, peer(4))
    kv.compact()  # ... and etcd compacts the revisions it has not seen: those events are gone for good
    assert host.peers() == programmed(peer(2), peer(3))
    kv.release_watches()
    host.converges(peer(3), peer(4), what="the state after the compacted gap (peer 2 deleted, 4 added)")
    assert resyncs() == before + 2  # and the one after the compaction
    publish(kv, peer(5))  # and the new watch, from the fresh read's revision, delivers again
    host.converges(peer(3), peer(4), peer(5), what="a peer put after the resync")


def test_after_a_broken_stream_and_an_outage_a_full_read_converges(kv, host):
    publish(kv, peer(2), peer(3))
    host.watcher.start()
    host.converges(peer(2), peer(3), what="the first full read")
    wait_until(lambda: kv.streams, DEADLINE, "the watch to be open")  # a break only reaches open streams
    kv.hold_watches()  # no event reaches the watcher from here: only a full read can bring what follows
    NetworkStore(kv).delete_peer(SEGMENT, peer(3).endpoint_id)
    publish(kv, peer(4))
    kv.unavailable = True
    kv.break_watches()
    wait_until(lambda: not host.watcher.synced.is_set(), DEADLINE, "the watcher to notice the broken stream")
    assert host.peers() == programmed(peer(2), peer(3))  # full reads fail while etcd is away: nothing changes
    kv.unavailable = False
    host.converges(peer(2), peer(4), what="the state after the outage, from a full read (watches still held)")
    kv.release_watches()
    publish(kv, peer(5))
    host.converges(peer(2), peer(4), peer(5), what="a peer put after the resync")


def test_stop_ends_the_watcher_and_closes_its_watch(kv, host):
    host.watcher.start()
    wait_until(lambda: kv.streams, DEADLINE, "the watch to be open")
    host.watcher.stop()
    assert not host.watcher._thread.is_alive() and kv.streams == set()
    # While etcd is away (the loop waits in its back-off), stop() ends it as well.
    again = PeerWatcher(kv, host.store, host.sync, max_backoff=0.05)
    kv.unavailable = True
    tried = kv.round_trips
    again.start()
    wait_until(lambda: kv.round_trips > tried + 1, DEADLINE, "the watcher to retry its full read")
    assert again._thread.is_alive() and not again.synced.is_set()
    again.stop()
    assert not again._thread.is_alive() and kv.streams == set()


# -- the fake's watch itself, which these tests rely on ------------------------------------------------------------
def test_fake_watch_delivers_from_its_start_and_fails_for_a_compacted_revision(kv):
    kv.put("/p/a", "1")
    start = kv.put("/p/b", "2")
    kv.put("/q/c", "3")
    kv.delete("/p/a")
    stream = kv.watch("/p/", start)
    events = iter(stream)
    assert [(e.kind, e.key, e.value, e.prev_value) for e in (next(events), next(events))] == [
        ("put", "/p/b", "2", None), ("delete", "/p/a", None, "1")]
    stream.close()
    assert list(events) == [] and kv.streams == set()
    kv.compact()
    with pytest.raises(Compacted):
        next(iter(kv.watch("/p/", start)))
    kv.unavailable = True
    with pytest.raises(StoreUnavailable):
        next(iter(kv.watch("/p/", kv.rev + 1)))
