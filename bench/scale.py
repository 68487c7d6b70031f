"""The scale part (issue 14): per-event cost and restart at 1,000 local endpoints (the bridge's limit today; an
argument, so 4,000 once a network spans several bridges) and 10,000 remote peers.

No dockerd: one simulated host in this process, the driver and the peer watch over the real kernel (a namespace
folder of its own) and a real etcd on loopback, as the plugin composes them (plugin/main.py), each endpoint made
by CreateEndpoint + Join as dockerd would call them. Remote peers are synthetic records written straight into
etcd through the store's schema (what other hosts' Joins write), in transactions of 128 puts (etcd's default
--max-txn-ops). No packet leaves the machine: the VXLAN devices send from 127.0.0.1 and nothing sends to a peer.
The self-healing reconciler runs as in the plugin (on, VXNET_RECONCILE_SECONDS 30: its netlink listener in the
network's namespace wakes an event pass for every Join's and every peer's notifications), so what it costs each
event is in every figure below.

Measured:
  attach        CreateEndpoint + Join, each timed; the median of the last 100 over that of the first 100
  peers         10,000 peer records -> programmed (one full read and sync), and the peer table's memory
  convergence   one peer record put in etcd -> its FDB and neighbour entries written (the netlink calls acked)
                with 10,000 peers present, p50/p99 over --scale-probes puts
  restart       the plugin stopped (its netlink sockets and the watch closed) and made again: start-up
                reconciliation + the first full peer read applied, timed; the kernel writes it made counted
                (0 when everything was right)
  removal       Leave + DeleteEndpoint of every endpoint, total seconds
"""

import os
import secrets
import shutil
import statistics
import tempfile
import threading
import time
import tracemalloc
from typing import Callable, Dict, List

from kernel import names
from kernel.links import Links
from netdriver.models import PeerRecord
from netdriver.peerdb import PeerDB
from netdriver.store import segment_of
from tests.harness.etcd import EtcdServer
from tests.harness.inproc import Node, peer_record, rss_kib, wait_for, write_peers

HOLDER = "containers"  # in the part's own namespace folder: not a vxnet name, and no other test's


def measure(etcd_url: str, endpoints: int = 1000, peers: int = 10000, probes: int = 200,
            log: Callable[[str], None] = print) -> dict:
    """One run; everything it made is removed before it returns."""
    workdir = tempfile.mkdtemp(prefix="vxnet-scale-")
    prefix = f"/vxnet-scale-{secrets.token_hex(4)}"
    node = Node(etcd_url, prefix, os.path.join(workdir, "netns"))
    nid = secrets.token_hex(32)
    ns = names.netns(nid)
    out: dict = {"endpoints": endpoints, "peers": peers, "reconcile_seconds": node.reconcile_seconds}
    try:
        node.start()
        node.create_network(nid, 9100000 + secrets.randbelow(100000), "10.0.0.0/8")
        # The containers' side: every container end goes into one namespace of ours, as into containers.
        holder = node.links.netns_path(HOLDER)
        node.links.ensure_netns(HOLDER)
        # -- attach
        rss0 = rss_kib()
        eids = [secrets.token_hex(32) for _ in range(endpoints)]
        times = [node.attach(nid, eid, f"10.{1 + (i >> 16)}.{i >> 8 & 255}.{(i & 255) or 1}/8", holder)
                 for i, eid in enumerate(eids)]
        first, last = statistics.median(times[:100]), statistics.median(times[-100:])
        out["attach_first100_ms"], out["attach_last100_ms"] = round(first * 1e3, 2), round(last * 1e3, 2)
        out["attach_ratio"] = round(last / first, 2)
        out["rss_per_endpoint_kib"] = round((rss_kib() - rss0) / endpoints, 1)
        log(f"attached {endpoints}: first 100 median {first * 1e3:.1f} ms, last 100 {last * 1e3:.1f} ms")
        # -- peers
        records = [peer_record(nid, i, f"127.1.{i % 20}.1") for i in range(1, peers + 1)]
        rss0 = rss_kib()
        write_peers(node, nid, records)
        wait_for(lambda: node.sync.peerdb.count(segment_of(nid, None)) >= peers, 300, "peers read")
        wait_for(lambda: node.writes.get("set_neigh", 0) >= peers, 300, "peers programmed")
        out["rss_per_peer_kib"] = round((rss_kib() - rss0) / peers, 2)
        # The peer table alone (what the plugin keeps per peer: the record, its claims, its two entries), the
        # same records parsed as the watch parses them, measured apart: tracing the whole watch slows it 5x.
        texts = [r.to_json() for r in records]
        tracemalloc.start()
        table = PeerDB("h1")
        parsed = [(segment_of(nid, None), i, PeerRecord.from_json(text)) for i, text in enumerate(texts)]
        table.replace(parsed)
        del parsed  # the list; the records stay, held by the table
        grown = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        del table, texts
        out["peer_table_bytes_per_peer"] = round(grown / peers)
        log(f"{peers} peers programmed; peer table {grown / peers:.0f} bytes per peer")
        # -- convergence: one more peer at a time, put -> entry written
        seen: Dict[str, float] = {}
        ready = threading.Event()

        def on_update(before: dict, after: dict) -> None:
            for mac in after.keys() - before.keys():
                seen[mac] = time.monotonic()
            ready.set()
        node.on_update = on_update
        lags = []
        for i in range(peers + 1, peers + 1 + probes):
            record = peer_record(nid, i, "127.1.99.1")
            ready.clear()
            put = time.monotonic()
            node.store.put_peer(segment_of(nid, None), record)
            wait_for(lambda: record.mac in seen, 10, f"peer {record.ip} programmed", step=0.0005)
            lags.append(seen[record.mac] - put)
        node.on_update = None
        lags.sort()
        out["convergence_p50_ms"] = round(statistics.median(lags) * 1e3, 2)
        out["convergence_p99_ms"] = round(lags[int(0.99 * (len(lags) - 1))] * 1e3, 2)
        log(f"convergence over {probes} puts with {peers} peers: p50 {out['convergence_p50_ms']} ms, "
            f"p99 {out['convergence_p99_ms']} ms")
        # -- restart
        fdb_before = node.links.fdb(ns, names.VXLAN)
        links_before = node.links.list_links(ns)
        node.stop()
        node.writes, node.nft_writes = {}, {}
        out["restart_s"] = round(node.start(), 2)
        out["restart_kernel_writes"] = sum(node.writes.values())
        out["restart_nft_writes"] = node.nft_writes.get(ns, 0)
        out["restart_fdb_equal"] = node.links.fdb(ns, names.VXLAN) == fdb_before
        out["restart_links_equal"] = node.links.list_links(ns) == links_before
        log(f"restart with {endpoints} endpoints and {peers + probes} peers: {out['restart_s']} s, "
            f"{out['restart_kernel_writes']} netlink writes {node.writes}, {node.nft_writes} nft batches")
        # -- removal
        started = time.monotonic()
        for eid in eids:
            node.detach(nid, eid)
        out["removal_s"] = round(time.monotonic() - started, 1)
        log(f"removed {endpoints} endpoints in {out['removal_s']} s")
    finally:
        try:
            if node.links is not None:
                node.delete_network(nid)
                node.stop()
        finally:
            node.kv.delete_prefix(prefix + "/")
            cleaner = Links(os.path.join(workdir, "netns"))
            cleaner.remove_netns(ns)
            cleaner.remove_netns(HOLDER)
            cleaner.close()
            shutil.rmtree(workdir, ignore_errors=True)
    return out


def run_part(endpoints: int, peers: int, probes: int, log: Callable[[str], None]) -> dict:
    """A single-member etcd of its own on loopback (tests/harness/etcd.py), stopped afterwards."""
    server = EtcdServer().start()
    try:
        return measure(server.url, endpoints, peers, probes, log)
    finally:
        server.close()


def report(out: dict) -> List[str]:
    return [
        f"scale: {out['endpoints']} endpoints on one network of one host, {out['peers']} remote peers, reconciler "
        f"{'every ' + str(out['reconcile_seconds']) + ' s and on events' if out.get('reconcile_seconds') else 'off'}",
        f"  attach median first 100 / last 100: {out['attach_first100_ms']} / {out['attach_last100_ms']} ms, "
        f"ratio {out['attach_ratio']} (target <= 1.2)",
        f"  peer convergence (etcd put -> entries written) with {out['peers']} peers: p50 "
        f"{out['convergence_p50_ms']} ms, p99 {out['convergence_p99_ms']} ms (target p99 < 20 ms)",
        f"  restart reconcile: {out['restart_s']} s (target < 10 s); {out['restart_kernel_writes']} netlink writes,"
        f" {out['restart_nft_writes']} nft batches; FDB unchanged {out['restart_fdb_equal']}, links unchanged "
        f"{out['restart_links_equal']}",
        f"  memory: {out['peer_table_bytes_per_peer']} B per peer in the peer table (tracemalloc), RSS "
        f"{out['rss_per_peer_kib']} KiB per peer, {out['rss_per_endpoint_kib']} KiB per endpoint",
        f"  removal of every endpoint: {out['removal_s']} s",
    ]
