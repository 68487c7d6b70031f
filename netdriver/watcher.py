"""From etcd to the kernel: PeerSync keeps each local VXLAN device's peer entries equal to the peer table, and
PeerWatcher feeds the table from etcd (a full read, then a watch from the next revision; a fresh full read after
a compaction, a broken stream or an etcd outage).

Both start-up and every event go through the same path: update PeerDB, then bring the segment's VXLAN device to
the table (a full `sync_peers` at start-up and resync; an event's own change, `update_peers`, otherwise). The
same records, this host's included, and the same network_up/network_down reach the policy engine
(netdriver/policy_engine.py), under PeerSync's lock (taken before the engine's): one watch of peers/ feeds both.
"""

import ipaddress
import logging
import threading
from typing import Dict, Iterable, Optional, Protocol, Set, Tuple

from netdriver.contracts import DataPlane, Encryption
from netdriver.models import Network, PeerRecord
from netdriver.peerdb import Change, PeerDB
from netdriver.store import NetworkStore, segment_of
from store.kv import WatchableKV
from store.watchloop import WatchLoop
from wire.errors import VxnetError

log = logging.getLogger(__name__)


class PeerListener(Protocol):
    """What else the peer records feed (netdriver/policy_engine.py PolicyEngine): every host's records."""

    def network_up(self, network: Network) -> None: ...

    def network_down(self, network: Network) -> None: ...

    def resync_peers(self, records: Iterable[Tuple[str, int, PeerRecord]]) -> None: ...

    def put_peer(self, segment: str, record: PeerRecord) -> None: ...

    def delete_peer(self, segment: str, endpoint_id: str) -> None: ...


class PeerSync:
    """The local networks (segment -> Network with a namespace here) and the peer table, applied to the kernel."""

    def __init__(self, peerdb: PeerDB, dataplane: DataPlane, encryption: Optional[Encryption] = None,
                 policy: Optional[PeerListener] = None):
        """encryption: told which remote VTEPs each encrypted segment reaches (None: no encrypted networks
        here); policy: given every record and namespace change too (None: no policies enforced here)."""
        self.policy = policy
        self.peerdb = peerdb
        self.dataplane = dataplane
        self.encryption = encryption
        self._local: Dict[str, Network] = {}
        # Segments whose VXLAN device was last made to hold exactly the table (a full sync, then each event's
        # change): an event applies only its own change there. Missing (first sync, or a failed one): the next
        # sync reads the kernel and repairs it whole.
        self._applied: Set[str] = set()
        self._lock = threading.RLock()
        # Until the first full read of etcd the table is empty, not known to be empty: applying it then would
        # wipe the entries a restarted plugin finds in the kernel and cut running containers off.
        self._loaded = False
        self._resynced = threading.Event()  # set once a first full read has been applied

    def wait_loaded(self, timeout: float) -> bool:
        """Wait until the first full read of etcd has been applied (start-up is over); False on time-out."""
        return self._resynced.wait(timeout)

    def _sync(self, segment: str, full: bool = False, change: Optional[Change] = None) -> Tuple[int, int]:
        """Make the segment's VXLAN device hold the table: only `change` (one event's keys, O(1) in the peers)
        when the device held the table before it, else a full sync that reads the kernel. Returns how many (FDB,
        neighbour) entries the kernel needed changed."""
        network = self._local.get(segment)
        if network is None or not self._loaded:
            return 0, 0  # no namespace here (the table keeps the records until one is created), or nothing read yet
        incremental = change is not None and not full and segment in self._applied
        if network.encrypted and self.encryption is not None:
            # SAs before FDB entries, so the first packet to a new peer finds its SA. Without one (the key ring
            # not read yet, a kernel error) packets are dropped, never sent in clear: the FDB is programmed all
            # the same, and the manager, which keeps the wanted peers, programs them when the ring comes or with
            # the next change. One VTEP per remote host: O(hosts), not O(peers).
            try:
                self.encryption.set_peers(segment, self.peerdb.vteps(segment))
            except VxnetError as exc:
                log.error("encryption not in place seg=%s nid=%s (its traffic is dropped until it is): %s",
                          segment, network.id[:12], exc)
        self._applied.discard(segment)
        try:
            if incremental:
                before, after = change
                changed = self.dataplane.update_peers(network, before, after)
            else:
                fdb, neigh = self.peerdb.entries(segment)
                changed = self.dataplane.sync_peers(network, fdb, neigh)
            self._applied.add(segment)
            return changed
        except VxnetError as exc:
            # Left for the next event or resync to retry; the error is logged, never swallowed silently.
            log.error("peer sync failed seg=%s nid=%s: %s", segment, network.id[:12], exc)
            return 0, 0

    def repair(self, network: Network) -> Tuple[int, int]:
        """A full sync of the network's segment against what the kernel holds (netdriver/reconciler.py): returns
        how many (FDB, neighbour) entries were put back or corrected; (0, 0) if the kernel was right, or before the
        first read of etcd (the table is not known yet)."""
        with self._lock:
            segment = segment_of(network.id, network.overlay)
            if segment not in self._local:
                return 0, 0
            return self._sync(segment, full=True)

    def repair_entries(self, network: Network, macs: Iterable[str] = (), ips: Iterable[str] = ()) -> Tuple[int, int]:
        """The VXLAN device's entries of these keys alone (FDB: macs, neighbours: ips) against the peer table, for
        what a kernel notification named (netdriver/reconciler.py): each key read from the kernel and put back,
        corrected or removed where it differs, O(keys) whatever the number of peers. Under the lock the full
        repair takes; a segment whose last sync failed gets the full one instead. Returns (FDB, neighbour)
        entries changed."""
        with self._lock:
            segment = segment_of(network.id, network.overlay)
            if segment not in self._local or not self._loaded:
                return 0, 0
            if segment not in self._applied:
                return self._sync(segment, full=True)
            macs, ips = set(macs), {str(ipaddress.ip_address(ip)) for ip in ips}
            network = self._local[segment]
            want = self.peerdb.lookup(segment, macs, ips)
            try:
                have = self.dataplane.peer_entries(network, macs, ips)
                return self.dataplane.update_peers(network, have, want)
            except VxnetError:
                self._applied.discard(segment)  # half applied: the next sync reads the kernel whole
                raise

    def peer_counts(self) -> Dict[str, int]:
        """network id -> remote endpoints in the peer table, for each network with a namespace here (what the
        process holds: no etcd read, no kernel read)."""
        local = dict(self._local)  # a copy taken without the lock: a scrape never waits for a sync in progress
        return {network.id: self.peerdb.count(segment) for segment, network in local.items()}

    def network_up(self, network: Network) -> None:
        with self._lock:
            segment = segment_of(network.id, network.overlay)
            self._local[segment] = network
            self._sync(segment, full=True)
            if self.policy is not None:
                self.policy.network_up(network)

    def network_down(self, network: Network) -> None:
        with self._lock:
            segment = segment_of(network.id, network.overlay)
            self._local.pop(segment, None)
            self._applied.discard(segment)
            if self.policy is not None:
                self.policy.network_down(network)
            if network.encrypted and self.encryption is not None:
                self.encryption.set_peers(segment, ())  # raises: the delete fails and is retried by dockerd

    def resync(self, records) -> None:
        """records: (segment, revision, PeerRecord) for every peer in etcd."""
        records = list(records)
        with self._lock:
            self._loaded = True
            touched = set(self.peerdb.replace(records)) | set(self._local)
            if self.encryption is not None:
                # The whole desired state at once: SAs and policies of ours that no local encrypted segment needs
                # any more (peers gone while the plugin was down) are removed.
                holders: Dict[str, Iterable[str]] = {
                    segment: self.peerdb.vteps(segment)
                    for segment, network in self._local.items() if network.encrypted}
                try:
                    self.encryption.sync_all(holders)
                except VxnetError as exc:
                    log.error("encryption resync failed: %s", exc)
            for segment in touched:
                self._sync(segment, full=True)
            if self.policy is not None:
                self.policy.resync_peers(records)
        self._resynced.set()

    def put(self, segment: str, revision: int, record: PeerRecord) -> None:
        with self._lock:
            change = self.peerdb.put(segment, revision, record)
            if change is not None:
                self._sync(segment, change=change)
            if self.policy is not None:  # this host's records too: its endpoints are sources and destinations
                self.policy.put_peer(segment, record)

    def delete(self, segment: str, endpoint_id: str) -> None:
        with self._lock:
            change = self.peerdb.delete(segment, endpoint_id)
            if change is not None:
                self._sync(segment, change=change)
            if self.policy is not None:
                self.policy.delete_peer(segment, endpoint_id)


class PeerWatcher(WatchLoop):
    """A thread: etcd peers/ -> PeerSync. `stop()` ends it; `kick()` forces a reconnect and full resync."""

    what = "peer watch"

    def __init__(self, kv: WatchableKV, store: NetworkStore, sync: PeerSync, max_backoff: float = 2.0):
        super().__init__(kv, max_backoff)
        self.store = store
        self.sync = sync

    def load(self):
        records, revision = self.store.all_peers()
        self.sync.resync(records)
        return self.store.peers_prefix(), revision

    def apply(self, event) -> bool:
        parsed = self.store.parse_peer_key(event.key)
        if parsed is not None:
            segment, endpoint_id = parsed
            if event.kind == "put":
                self.sync.put(segment, event.mod_revision, PeerRecord.from_json(event.value))
            else:
                self.sync.delete(segment, endpoint_id)
        return True
