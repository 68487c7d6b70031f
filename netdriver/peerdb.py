"""The desired peer table: which remote endpoints each overlay segment should reach, as kernel entries.

Pure: no I/O. Records arrive from etcd (a full list at resync, then watch events); `entries(segment)` gives the
neighbour (ip -> mac, IPv4 and IPv6 addresses alike) and FDB (mac -> vtep) entries the segment's VXLAN device
should hold. Entries are derived from the set of records, so they are reference-counted by construction: a MAC
that two records share (an endpoint moving between hosts, its old record not yet gone) stays programmed until the
last record naming it goes, and the newest record (highest etcd revision; equal revisions, one transaction: the
greater endpoint id) decides where it points.

The entries are kept up to date as records come and go, not recomputed: `put` and `delete` touch only the keys
the record names (its MAC, its IPv4 and IPv6 addresses) and return those keys' entries before and after (a
Change), so a watch event costs the same with 10 or 10,000 peers in the segment. Each key keeps the records that
claim it (almost always one), which is what makes the newest-wins rule local to the key.
"""

import threading
from typing import Dict, Iterable, List, Optional, Set, Tuple

from netdriver.models import PeerRecord

Entries = Tuple[Dict[str, str], Dict[str, str]]  # (fdb: mac -> vtep, neigh: ip or ip6 -> mac)
Change = Tuple[Entries, Entries]  # (before, after) over the keys one event touched


class _Segment:
    """One segment's records and the entries derived from them."""

    __slots__ = ("records", "by_mac", "by_ip", "fdb", "neigh", "vteps")

    def __init__(self):
        self.records: Dict[str, Tuple[int, PeerRecord]] = {}  # endpoint id -> (revision, record)
        self.by_mac: Dict[str, Dict[str, int]] = {}  # mac -> {endpoint id: revision} of the records naming it
        self.by_ip: Dict[str, Dict[str, int]] = {}  # ip or ip6 -> the same
        self.fdb: Dict[str, str] = {}  # mac -> vtep of the newest record naming the mac
        self.neigh: Dict[str, str] = {}  # ip -> mac of the newest record naming the ip
        self.vteps: Dict[str, int] = {}  # vtep -> FDB entries pointing at it (the encrypted peers)

    @staticmethod
    def _ips(record: PeerRecord) -> List[str]:
        # Dual stack: the VXLAN device's proxy answers neighbour solicitations from the ip6 entry.
        return [record.ip, record.ip6] if record.ip6 else [record.ip]

    def _claim(self, endpoint_id: str, revision: int, record: PeerRecord) -> None:
        self.records[endpoint_id] = (revision, record)
        self.by_mac.setdefault(record.mac, {})[endpoint_id] = revision
        for ip in self._ips(record):
            self.by_ip.setdefault(ip, {})[endpoint_id] = revision

    def _unclaim(self, endpoint_id: str) -> Optional[PeerRecord]:
        old = self.records.pop(endpoint_id, None)
        if old is None:
            return None
        record = old[1]
        for table, keys in ((self.by_mac, [record.mac]), (self.by_ip, self._ips(record))):
            for key in keys:
                claims = table.get(key)
                if claims is not None:
                    claims.pop(endpoint_id, None)
                    if not claims:
                        del table[key]
        return record

    def _newest(self, claims: Dict[str, int]) -> PeerRecord:
        winner = max(claims, key=lambda eid: (claims[eid], eid))
        return self.records[winner][1]

    def _set_fdb(self, mac: str, vtep: Optional[str]) -> None:
        old = self.fdb.get(mac)
        if old == vtep:
            return
        if old is not None:
            left = self.vteps[old] - 1
            if left:
                self.vteps[old] = left
            else:
                del self.vteps[old]
            del self.fdb[mac]
        if vtep is not None:
            self.fdb[mac] = vtep
            self.vteps[vtep] = self.vteps.get(vtep, 0) + 1

    def _settle(self, macs: Iterable[str], ips: Iterable[str]) -> None:
        """Recompute the entries of these keys from the records claiming them."""
        for mac in macs:
            claims = self.by_mac.get(mac)
            self._set_fdb(mac, self._newest(claims).vtep if claims else None)
        for ip in ips:
            claims = self.by_ip.get(ip)
            if claims:
                self.neigh[ip] = self._newest(claims).mac
            else:
                self.neigh.pop(ip, None)

    def _view(self, macs: Set[str], ips: Set[str]) -> Entries:
        return ({m: self.fdb[m] for m in macs if m in self.fdb}, {i: self.neigh[i] for i in ips if i in self.neigh})

    def change(self, endpoint_id: str, revision: Optional[int], record: Optional[PeerRecord]) -> Change:
        """Put (record given) or remove (None) one endpoint's record; the touched keys before and after."""
        current = self.records.get(endpoint_id)
        named = [r for r in (current[1] if current else None, record) if r is not None]
        macs = {r.mac for r in named}
        ips = {ip for r in named for ip in self._ips(r)}
        before = self._view(macs, ips)
        self._unclaim(endpoint_id)
        if record is not None:
            self._claim(endpoint_id, revision, record)
        self._settle(macs, ips)
        return before, self._view(macs, ips)


class PeerDB:
    def __init__(self, host_id: str):
        self.host_id = host_id
        self._segments: Dict[str, _Segment] = {}
        self._lock = threading.Lock()

    def replace(self, records: Iterable[Tuple[str, int, PeerRecord]]) -> List[str]:
        """Full resync from (segment, revision, record) triples; returns every segment that may have changed."""
        fresh: Dict[str, _Segment] = {}
        touched: Dict[str, Set[str]] = {}
        for segment, revision, record in records:
            if record.host != self.host_id:
                seg = fresh.get(segment)
                if seg is None:
                    seg = fresh[segment] = _Segment()
                    touched[segment] = set()
                seg._unclaim(record.endpoint_id)  # a record listed twice: the later listing stands
                seg._claim(record.endpoint_id, revision, record)
        for seg in fresh.values():
            seg._settle(list(seg.by_mac), list(seg.by_ip))
        with self._lock:
            names = set(self._segments) | set(fresh)
            self._segments = fresh
        return sorted(names)

    def put(self, segment: str, revision: int, record: PeerRecord) -> Optional[Change]:
        """A record was written: the entries it changed, (before, after) over the keys it names; None if it is
        one of ours (local endpoints need no peer entries)."""
        if record.host == self.host_id:
            return None
        with self._lock:
            seg = self._segments.get(segment)
            if seg is None:
                seg = self._segments[segment] = _Segment()
            return seg.change(record.endpoint_id, revision, record)

    def delete(self, segment: str, endpoint_id: str) -> Optional[Change]:
        """A record went: the entries that changed (before, after); None if the table did not hold it."""
        with self._lock:
            seg = self._segments.get(segment)
            if seg is None or endpoint_id not in seg.records:
                return None
            change = seg.change(endpoint_id, None, None)
            if not seg.records:
                del self._segments[segment]
            return change

    def entries(self, segment: str) -> Entries:
        """Copies of the segment's whole (fdb, neigh): for a full sync, O(peers)."""
        with self._lock:
            seg = self._segments.get(segment)
            return (dict(seg.fdb), dict(seg.neigh)) if seg is not None else ({}, {})

    def lookup(self, segment: str, macs: Iterable[str], ips: Iterable[str]) -> Entries:
        """The entries of these keys alone (fdb mac -> vtep, neigh ip -> mac; keys the table does not hold are
        left out): O(keys), whatever the number of peers."""
        with self._lock:
            seg = self._segments.get(segment)
            if seg is None:
                return {}, {}
            return ({m: seg.fdb[m] for m in macs if m in seg.fdb}, {i: seg.neigh[i] for i in ips if i in seg.neigh})

    def vteps(self, segment: str) -> Set[str]:
        """The remote VTEPs the segment's FDB points at (one per remote host, not per peer)."""
        with self._lock:
            seg = self._segments.get(segment)
            return set(seg.vteps) if seg is not None else set()

    def count(self, segment: str) -> int:
        """Remote endpoints recorded for the segment."""
        with self._lock:
            seg = self._segments.get(segment)
            return len(seg.records) if seg is not None else 0

    def segments(self) -> List[str]:
        with self._lock:
            return sorted(self._segments)
