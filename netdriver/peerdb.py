"""The desired peer table: which remote endpoints each overlay segment should reach, as kernel entries.

Pure: no I/O. Records arrive from etcd (a full list at resync, then watch events); `entries(segment)` gives the
neighbour (ip -> mac, IPv4 and IPv6 addresses alike) and FDB (mac -> vtep) entries the segment's VXLAN device
should hold. Entries are derived
from the set of records, so they are reference-counted by construction: a MAC that two records share (an endpoint
moving between hosts, its old record not yet gone) stays programmed until the last record naming it goes, and the
newest record (highest etcd revision) decides where it points.
"""

import threading
from typing import Dict, Iterable, List, Tuple

from netdriver.models import PeerRecord

Entries = Tuple[Dict[str, str], Dict[str, str]]  # (fdb: mac -> vtep, neigh: ip or ip6 -> mac)


class PeerDB:
    def __init__(self, host_id: str):
        self.host_id = host_id
        self._records: Dict[str, Dict[str, Tuple[int, PeerRecord]]] = {}  # segment -> eid -> (revision, record)
        self._lock = threading.Lock()

    def replace(self, records: Iterable[Tuple[str, int, PeerRecord]]) -> List[str]:
        """Full resync from (segment, revision, record) triples; returns every segment that may have changed."""
        fresh: Dict[str, Dict[str, Tuple[int, PeerRecord]]] = {}
        for segment, revision, record in records:
            if record.host != self.host_id:
                fresh.setdefault(segment, {})[record.endpoint_id] = (revision, record)
        with self._lock:
            touched = set(self._records) | set(fresh)
            self._records = fresh
        return sorted(touched)

    def put(self, segment: str, revision: int, record: PeerRecord) -> bool:
        """A record was written; False if it is one of ours (local endpoints need no peer entries)."""
        if record.host == self.host_id:
            return False
        with self._lock:
            self._records.setdefault(segment, {})[record.endpoint_id] = (revision, record)
        return True

    def delete(self, segment: str, endpoint_id: str) -> bool:
        with self._lock:
            records = self._records.get(segment, {})
            found = records.pop(endpoint_id, None) is not None
            if not records:
                self._records.pop(segment, None)
        return found

    def entries(self, segment: str) -> Entries:
        with self._lock:
            records = sorted(self._records.get(segment, {}).values(), key=lambda item: item[0])
        fdb: Dict[str, str] = {}
        neigh: Dict[str, str] = {}
        for _, record in records:  # oldest first, so the newest record wins a shared MAC or IP
            fdb[record.mac] = record.vtep
            neigh[record.ip] = record.mac
            if record.ip6:  # dual stack: the VXLAN device's proxy answers neighbour solicitations from it
                neigh[record.ip6] = record.mac
        return fdb, neigh

    def count(self, segment: str) -> int:
        """Remote endpoints recorded for the segment."""
        with self._lock:
            return len(self._records.get(segment, {}))

    def segments(self) -> List[str]:
        with self._lock:
            return sorted(self._records)
