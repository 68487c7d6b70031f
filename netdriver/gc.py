"""Garbage collection of what hosts gone for good left in etcd (`vxnet gc`, and the plugin once per interval).

A host's record (hosts/<host>) and its peer records live under its lease, so etcd deletes them TTL seconds after
the host stopped renewing (netdriver/hosts.py). What it held outside its lease stays: its endpoint records, its
members/<segment>/<host> keys (and with them the segment and VNI, when it was the last member), and its holds
in the IPAM pools and addresses of every address space. Those are held for the host on purpose: a host that
is only away (a reboot, dockerd restarted, an etcd outage longer than the TTL) must find them again.

So "gone" needs a time: the first live collector to see a host referenced by any hold but without a host
record writes departed/<host> = {"since", "name", "vtep"} (create-if-absent, so the earliest view wins; the
name and VTEP are what this collector saw in the host record at an earlier pass, empty if it never saw one).
A host that registers again deletes the record in the same transaction (NetworkStore.register_host). The
record's time is when a collector noticed, at most one collection interval after the lease expired.

A host is stale when it has no host record and its departed time is more than `stale_after` seconds ago
(VXNET_STALE_HOST_SECONDS, default 3600). Each of its holds is released in one transaction of its own that
also compares hosts/<host> missing and departed/<host> at the revision that made it stale (the stores take
the compares as a store.kv.Guard): a host that comes back mid-collection keeps every hold not yet released,
and a second collector working at the same time, or a replay, finds the holds gone and changes nothing. When
every hold is gone the departed record goes too.

Order per host: endpoint records, member keys (the network record, its endpoints and the segment's VNI go with
the last member, exactly as DeleteNetwork does), addresses, then pools (the last hold on a pool deletes it
and every address in it, ipam_driver/store.py).

A hold, as listed and reported (`--json`), is a dict: {"kind": "endpoint", "network", "endpoint", "ip"},
{"kind": "member", "segment", "network"}, {"kind": "address", "space", "pool", "address", "role"} or
{"kind": "pool", "space", "pool"}; after a collection each carries "result": "released", "kept" (the host
came back, or departed/<host> changed) or "failed: <reason>".
"""

import dataclasses
import datetime
import logging
import threading
import time
from typing import Callable, Dict, List, Optional, Protocol

from netdriver.store import NetworkStore
from store.kv import Guard
from store.schema import SWARM_HOLDER
from wire.errors import VxnetError

log = logging.getLogger(__name__)

RELEASED = "released"
KEPT = "kept"


class IpamHolds(Protocol):
    """The IPAM side of the collection (ipam_driver/gc.py over IpamStore)."""

    def holds(self) -> List[dict]:
        """Every hold on a pool or an address, one dict per hold (a holder twice on an address: two), each with
        "holder" (a host ID or SWARM_HOLDER) and the fields of the module docstring."""
        ...

    def release(self, hold: dict, guard: Guard) -> bool:
        """Drop that one hold in a transaction that also compares guard; True when it is gone (also when
        someone else released it first), False, with nothing changed, when the guard no longer holds."""
        ...


@dataclasses.dataclass
class GoneHost:
    """A host referenced by holds with no host record. since: its departed time (None: not recorded yet)."""
    host: str
    name: str
    vtep: str
    since: Optional[float]
    stale: bool
    holds: List[dict]
    revision: int = 0  # departed/<host>'s mod_revision, what each release compares

    def as_dict(self, now: float) -> dict:
        return {"host": self.host, "name": self.name, "vtep": self.vtep, "stale": self.stale,
                "since": _iso(self.since) if self.since is not None else None,
                "gone_seconds": round(now - self.since) if self.since is not None else None,
                "holds": self.holds}


@dataclasses.dataclass
class Report:
    """One collection: every gone host (stale or not yet), what was done, and when (unix time)."""
    hosts: List[GoneHost]
    dry_run: bool
    at: float

    @property
    def stale(self) -> List[GoneHost]:
        return [h for h in self.hosts if h.stale]

    @property
    def failed(self) -> int:
        return sum(1 for h in self.stale for hold in h.holds if hold.get("result", "").startswith("failed"))

    def as_dict(self) -> dict:
        return {"dry_run": self.dry_run, "at": _iso(self.at), "failed": self.failed,
                "hosts": [h.as_dict(self.at) for h in self.hosts]}


def _iso(when: float) -> str:
    return datetime.datetime.fromtimestamp(when, datetime.timezone.utc).isoformat(timespec="seconds")


class Collector:
    """store: the network driver's records (hosts, departed, endpoints, members); ipam: the IPAM holds;
    stale_after: seconds a host must have been gone; clock: wall time (the departed times are compared across
    hosts, so not a monotonic clock; hosts' clocks skewed by seconds matter nothing against an hour)."""

    def __init__(self, store: NetworkStore, ipam: IpamHolds, stale_after: float,
                 clock: Callable[[], float] = time.time):
        self.store = store
        self.ipam = ipam
        self.stale_after = stale_after
        self.clock = clock
        self._seen: Dict[str, dict] = {}  # the last host record seen for each host: a departed record's name/vtep

    def survey(self, mark: bool) -> List[GoneHost]:
        """Every host that holds something and has no host record, with its holds; mark: write departed/<host>
        for those that have none yet (a dry run marks nothing)."""
        live = self.store.hosts()
        self._seen.update(live)
        holds: Dict[str, List[dict]] = {}
        for endpoint in self.store.all_endpoints():
            holds.setdefault(endpoint.host, []).append(
                {"kind": "endpoint", "network": endpoint.network_id, "endpoint": endpoint.id, "ip": endpoint.ip})
        for segment, host, network_id in self.store.members():
            holds.setdefault(host, []).append({"kind": "member", "segment": segment, "network": network_id})
        for hold in self.ipam.holds():
            hold = dict(hold)
            holds.setdefault(hold.pop("holder"), []).append(hold)
        gone = {host: found for host, found in holds.items() if host not in live and host != SWARM_HOLDER}
        self._seen = {host: record for host, record in self._seen.items() if host in live or host in gone}
        departed = self.store.departed()
        now = self.clock()
        if mark and any(host not in departed for host in gone):
            for host in gone:
                if host not in departed:
                    seen = self._seen.get(host, {})
                    if self.store.mark_departed(host, {"since": now, "name": str(seen.get("name", "")),
                                                       "vtep": str(seen.get("vtep", ""))}):
                        log.info("gc: host %s (%s) holds %d thing(s) and has no host record: gone since now",
                                 host, seen.get("name") or "?", len(gone[host]))
            departed = self.store.departed()
        out = []
        for host, found in sorted(gone.items()):
            record, revision = departed.get(host, ({}, 0))
            since = _number(record.get("since")) if revision else None
            seen = self._seen.get(host, {})
            out.append(GoneHost(host=host, name=str(record.get("name") or seen.get("name", "")),
                                vtep=str(record.get("vtep") or seen.get("vtep", "")), since=since,
                                stale=since is not None and now - since > self.stale_after,
                                holds=_ordered(found), revision=revision))
        return out

    def collect(self, dry_run: bool = False) -> Report:
        """Survey, then (unless dry_run) release every hold of every stale host. Raises StoreUnavailable when
        etcd cannot be read at all; a release that fails is reported in its hold's "result"."""
        hosts = self.survey(mark=not dry_run)
        report = Report(hosts=hosts, dry_run=dry_run, at=self.clock())
        if dry_run:
            return report
        for gone in report.stale:
            self._release(gone)
        self._forget_empty({h.host for h in hosts})
        return report

    def _release(self, gone: GoneHost) -> None:
        guard = self.store.departed_guard(gone.host, gone.revision)
        back = False
        for hold in gone.holds:
            if back:
                hold["result"] = KEPT
                continue
            try:
                done = self._release_one(gone.host, hold, guard)
            except VxnetError as exc:
                hold["result"] = f"failed: {exc}"
                log.warning("gc: could not release %s of host %s: %s", describe(hold), gone.host, exc)
                continue
            if done:
                hold["result"] = RELEASED
                log.info("gc: released %s of host %s (%s, gone since %s)", describe(hold), gone.host,
                         gone.name or "?", _iso(gone.since or 0))
            else:
                back = True
                hold["result"] = KEPT
                log.info("gc: host %s is back (or its departed record changed): it keeps what it holds", gone.host)
        if not back and all(h["result"] == RELEASED for h in gone.holds):
            try:
                self.store.forget_departed(gone.host, guard)
            except VxnetError as exc:
                log.warning("gc: departed/%s stays (the next pass deletes it): %s", gone.host, exc)

    def _release_one(self, host: str, hold: dict, guard: Guard) -> bool:
        kind = hold["kind"]
        if kind == "endpoint":
            return self.store.delete_endpoint(hold["network"], hold["endpoint"], guard=guard)
        if kind == "member":
            if not self.store.delete_network(hold["network"], host, hold["segment"], guard=guard):
                return False
            self.store.release_segment(hold["segment"])
            return True
        return self.ipam.release({**hold, "holder": host}, guard)

    def _forget_empty(self, holding: set) -> None:
        """departed records of stale hosts that hold nothing any more (their last pass was cut short)."""
        now = self.clock()
        try:
            for host, (record, revision) in self.store.departed().items():
                since = _number(record.get("since"))
                if host not in holding and since is not None and now - since > self.stale_after:
                    self.store.forget_departed(host, self.store.departed_guard(host, revision))
        except VxnetError as exc:
            log.warning("gc: departed records of hosts that hold nothing stay (the next pass deletes them): %s", exc)


def _number(value) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


_ORDER = {"endpoint": 0, "member": 1, "address": 2, "pool": 3}


def _ordered(holds: List[dict]) -> List[dict]:
    return sorted(holds, key=lambda h: _ORDER.get(h["kind"], 9))


def describe(hold: dict) -> str:
    """A hold for people (logs and the CLI's table)."""
    kind = hold["kind"]
    if kind == "endpoint":
        return f"endpoint {hold['endpoint'][:12]} ({hold['ip']}) of network {hold['network'][:12]}"
    if kind == "member":
        return f"membership of segment {hold['segment'][:20]}"
    if kind == "address":
        return f"address {hold['address']} ({hold.get('role', '')}) in pool {hold['pool']} ({hold['space']})"
    return f"pool {hold['pool']} ({hold['space']})"


class CollectorLoop:
    """The plugin's own collection: a first pass when started (after the host lease is acquired, so this host
    is never gone in its own eyes), then one every interval seconds. Every plugin may run it: the guarded
    transactions make a second collector's releases no-ops."""

    def __init__(self, collector: Collector, interval: float):
        self.collector = collector
        self.interval = interval
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="gc", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                report = self.collector.collect()
                if report.failed:
                    log.warning("gc: %d hold(s) of gone hosts could not be released; the next pass retries",
                                report.failed)
            except VxnetError as exc:
                log.warning("gc pass skipped: %s", exc)
            self._stop.wait(self.interval)
