"""The verdict log: what each network's policy table (netdriver/policy_nft.py) and anti-spoofing table, and the
host's isolation table (netdriver/isolation.py), logged, kept in memory, served on the metrics server's address
(VXNET_METRICS_ADDR) for `vxnet flows` (cli/flows.py).

Who does what:
  - the policy engine (netdriver/policy_engine.py) says when a network's namespace is up here, whatever its mode
    (subscribe: callback(network_id, ns, up=True): made, rebuilt, or its policy table replaced) and when it goes
    (up=False), who each member address is (names(network_id) -> {address: {"container", "service", "endpoint",
    "host"}}) and which local network's subnet holds an address (network_of(address));
  - for each network namespace, a thread of its own reads the NFLOG group (kernel/nflog.py Reader; one listener
    per (namespace, group), so one reader per namespace: the policy table and the anti-spoofing table log to the
    same group) and turns each record into a flow: its time, source and destination (address and the names the
    engine has for it when the record arrives: an address may belong to another container later), protocol,
    ports, verdict and reason; one more thread reads the host's isolation group (host_reader) and files each
    record under the local network whose subnet holds its source, else its destination;
  - a query reads the exact counters of the tables (PolicyFirewall.counters, Firewall.counted) and says how many
    records the log's rate limit and the socket suppressed (kernel/nflog.py Accounting, reader.lost).

Reasons of a drop: "no-rule" (the policy: nothing allows the new connection), "anti-spoofing" (a frame from a
container's bridge port with another source MAC or address than its own, ARP and IPv6 neighbour discovery
included: `rule` says which check, `port` and `mac` where it came in; the source's names are the port's
container, found by the endpoint the port is named after, while `src.ip` is what the frame claimed), "isolation"
(the host refused to route between a vxnet subnet and anything else: `rule` to-overlay, from-overlay,
overlay-to-host, "-v6" for IPv6).

The view is this host's: a policy decides at the destination (the table guards this host's members only), so
the log on host A holds connections *to* A's containers, from anywhere; anti-spoofing and isolation drops are
those of A's containers and A's routing. Ask another host's plugin for its own.

Not logged: cleartext drops of encrypted networks (encrypt/, the fail-closed table): counted
(vxnet_dropped_packets_total{reason="cleartext"}) only; the answer says so ("not_logged").

Memory: a ring of RING_SIZE flows per network with a namespace on this host (the oldest evicted first, and
counted); a flow is a small frozen record with its two ends' names: 650 bytes measured (tracemalloc, 1024 flows
with Swarm-length container names, strings shared with the engine's records), at most ~1 KiB if none are shared,
so 0.65-1 MiB per network, plus one reader thread and one netlink socket (1 MiB receive buffer, kernel/nflog.py
RCVBUF: a bound, not an allocation) each. An idle reader thread measured 28 KiB of resident memory and 0.005% of
a core (it wakes every READ_TIMEOUT to look at its stop flag): 200 networks cost ~5.6 MiB and ~1% of a core, so
one thread per namespace is kept (a select over every socket in one thread would save about that). A network's
ring goes with its namespace (up=False); an up again keeps it.

Sequence numbers: one counter for the process, so a network's flows are in increasing `seq` and a client that
asks `since=<seq>` gets exactly the flows after it; `instance` changes when the plugin restarts (the counter
starts again), so a following client knows to start over.

Wire (GET, JSON; errors {"error": text} with 400 naming the parameter, 404 for a network without a log here):
    /v1/flows -> {"instance", "networks": [{"network", "ns", "records", "next", "running"}]}
    /v1/flows?network=<full id>&verdict=dropped|audit|allowed|all&since=<seq>&limit=<n>
      -> {"instance", "network", "ns", "verdict", "since", "next": the highest seq of this network (ask
          since=next to follow), "first": the oldest seq still held (0: none), "evicted": flows the ring dropped,
          "records": [{"seq", "time", "verdict": "dropped"|"audit"|"allowed", "reason": "no-rule"|
                       "anti-spoofing"|"isolation"|"rule"|"rule-any-port"|"exposed", "rule": the anti-spoofing or
                       isolation rule ("" for the policy's), "port": the bridge port it came in on, "mac": its
                       source MAC ("" where the record has none), "proto" ("tcp", ..., "arp", "ethertype-0x88cc"),
                       "sport", "dport", "icmp_type",
                       "src": {"ip", "container", "service", "endpoint", "host"}, "dst": {...}}],
          "counters": {"dropped", "audit", "allowed"} (the policy table's packets, exact, since the table was made;
                      zeros without one; null if it could not be read), "suppressed": {"dropped", "audit",
                      "allowed"} (counted but not logged: the rate limit, and any lost),
          "guards": {"anti-spoofing": {"counted", "suppressed"}, "isolation": {"counted", "suppressed"}} (packets
                     dropped, exact, and counted but not logged; anti-spoofing: this network's namespace since its
                     table was made; isolation: the host table's, every network's together, since it was made:
                     a drop there is not counted by network; counted null if it could not be read or the host's
                     group is not read), "lost": records the sockets lost, "rate_limited": bool (anything
                     suppressed), "log": {"running": bool, "error": text or null}, "not_logged": text}
    verdict=dropped (the default) means dropped (all three reasons) and audit (would have been dropped); limit: the
    newest n.
"""

import collections
import dataclasses
import json
import logging
import secrets
import threading
from typing import Callable, Deque, Dict, Iterable, List, Mapping, Optional, Protocol, Tuple
from urllib.parse import parse_qs

from kernel import names as kernel_names
from kernel.nflog import Accounting, Record
from netdriver import isolation
from netdriver import policy_nft as pn
from wire.errors import VxnetError

log = logging.getLogger(__name__)

PATH = "/v1/flows"
# 20 records a second per verdict at most (policy_nft.LOG_RATE): a ring of 1024 holds the last ~50 s of a
# steady stream of refusals, minutes of anything quieter.
RING_SIZE = 1024
READ_TIMEOUT = 0.5  # how long a reader thread blocks at most before it looks at its stop flag
RETRY_SECONDS = (0.5, 10.0)  # a refused bind (EBUSY: another listener) is retried with backoff between these
VERDICTS = ("dropped", "audit", "allowed", "all")
NOT_LOGGED = ("cleartext drops of encrypted networks are counted (vxnet_dropped_packets_total) but not logged; "
              "policy verdicts are taken at the destination's host: this log holds connections to this host's "
              "containers, and the drops of this host's anti-spoofing and isolation rules")
GUARDS = (isolation.ANTI_SPOOFING, isolation.ISOLATION)

# Prefix -> (verdict, reason). The accepting chains are policy_nft's: allow-all (a rule without ports), allow (a
# rule with ports), exposed (mode exposed: the destination exposes the port).
_REASONS = {"allow-all": "rule-any-port", "allow": "rule", "exposed": "exposed"}


def classify(prefix: str) -> Optional[Tuple[str, str]]:
    """An NFLOG prefix -> (verdict, reason), None for a prefix not of our tables."""
    guard = isolation.logged(prefix)
    if guard is not None:
        return "dropped", guard[0]
    verdict = pn.verdict(prefix)
    if verdict in ("dropped", "audit"):
        return verdict, "no-rule"
    if verdict == "allowed":
        return verdict, _REASONS.get(prefix[len(pn.LOG_ALLOW) + 1:], "rule")
    return None


class Names(Protocol):
    """netdriver.policy_engine.PolicyEngine, what the log uses of it."""

    def subscribe(self, callback: Callable[[str, str, bool], None]) -> None: ...

    def names(self, network_id: str) -> Dict[str, dict]: ...

    def network_of(self, address: str) -> Optional[str]: ...


class NflogReader(Protocol):
    """kernel.nflog.Reader."""
    lost: int
    unparsable: int

    def read(self, timeout: float) -> List[Record]: ...

    def close(self) -> None: ...


Counters = Callable[[str], Mapping[str, Tuple[int, int]]]  # PolicyFirewall.counters: ns -> {comment: counts}
# isolation.Firewall.counted: ns (None: the host's) -> {comment: counts} of the anti-spoofing / isolation table
GuardCounters = Callable[[Optional[str]], Mapping[str, Tuple[int, int]]]
HOST = ""  # the key of the host's isolation log among the taps (no network ID is empty)

_WHO = ("container", "service", "endpoint", "host")


def _who(address: str, names: Mapping[str, dict]) -> dict:
    known = names.get(address) or {}
    return {"ip": address, **{k: str(known.get(k) or "") for k in _WHO}}


@dataclasses.dataclass(frozen=True)
class Flow:
    seq: int
    time: float
    verdict: str
    reason: str
    proto: str
    sport: int
    dport: int
    icmp_type: Optional[int]
    src: dict
    dst: dict
    rule: str = ""
    port: str = ""
    mac: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _by_prefix(counted: Mapping[str, Tuple[int, int]], guards: Optional[Mapping[str, Tuple[int, int]]] = None
               ) -> Dict[str, int]:
    """The tables' counters by rule comment -> packets by log prefix (the verdicts the log records): the policy
    table's (counted) and the anti-spoofing or isolation table's (guards)."""
    out = {prefix: counted[comment][0] for prefix, comment in pn.LOGGED.items() if comment in counted}
    for comment, (packets, _) in (guards or {}).items():
        reason = isolation.drop_reason(comment)
        if reason in GUARDS:
            out[isolation.log_prefix(reason, comment.split(":")[2])] = packets
    return out


def _by_guard(per_prefix: Mapping[str, int]) -> Dict[str, int]:
    out = {reason: 0 for reason in GUARDS}
    for prefix, count in per_prefix.items():
        guard = isolation.logged(prefix)
        if guard is not None:
            out[guard[0]] += count
    return out


def _by_verdict(per_prefix: Mapping[str, int]) -> Dict[str, int]:
    """The policy table's verdicts only (the anti-spoofing and isolation drops are _by_guard's)."""
    out = {"dropped": 0, "audit": 0, "allowed": 0}
    for prefix, count in per_prefix.items():
        kind = classify(prefix) if isolation.logged(prefix) is None else None
        if kind is not None:
            out[kind[0]] += count
    return out


class _Tap:
    """One network's log: its namespace, ring, accounting and reader thread."""

    def __init__(self, network_id: str, ns: str, size: int):
        self.network_id = network_id
        self.ns = ns
        self.ring: Deque[Flow] = collections.deque(maxlen=size)
        self.evicted = 0
        self.last_seq = 0
        self.accounting: Optional[Accounting] = None
        self.baseline: Dict[str, int] = {}  # the counters (by prefix) last read: a drop below them is a reset
        self.reader: Optional[NflogReader] = None
        self.error: Optional[str] = None
        self.stop = threading.Event()
        self.thread: Optional[threading.Thread] = None
        self.previous: Optional[threading.Thread] = None  # the reader thread this one replaces


class FlowLog:
    """The rings of every network with a namespace here, fed by one reader thread per namespace and one for the
    host's isolation group.

    log = FlowLog(engine, open_reader, counters,   open_reader(ns) -> kernel.nflog.Reader of ns (KernelError if
                  guards=, host_reader=)           refused); counters = PolicyFirewall.counters; guards =
                                                   isolation.Firewall.counted; host_reader() -> the Reader of the
                                                   host's isolation group (None: not read)
    log.start()                                    subscribes to the engine (its callbacks start and stop readers),
                                                   starts the host's reader
    log.networks() / log.query(network_id, ...)    what the HTTP endpoint serves (module docstring)
    log.stop()                                     every reader stopped (also when never started)
    ingest(network_id, records) is what a reader thread calls with what it read (HOST: the host's records; tests
    call it directly).
    """

    def __init__(self, engine: Names, open_reader: Callable[[str], NflogReader], counters: Counters,
                 ring_size: int = RING_SIZE, threads: bool = True, guards: Optional[GuardCounters] = None,
                 host_reader: Optional[Callable[[], NflogReader]] = None):
        self.engine = engine
        self.open_reader = open_reader
        self.counters = counters
        self.guards = guards  # None: anti-spoofing and isolation counters not read (their suppressed unknown)
        self.host_reader = host_reader  # None: the host's isolation log is not read
        self.ring_size = ring_size
        self.instance = secrets.token_hex(8)
        self._threads = threads
        self._taps: Dict[str, _Tap] = {}
        self._seq = 0
        self._lock = threading.Lock()

    # -- the engine's callbacks ---------------------------------------------------------------------------------
    def start(self) -> None:
        self.engine.subscribe(self.policy_changed)
        if self.host_reader is not None:
            self.policy_changed(HOST, "", True)  # the host's isolation log: a tap without a ring of its own

    def policy_changed(self, network_id: str, ns: str, up: bool) -> None:
        """The engine's callback: quick (a thread started, another told to stop; nothing joined here). Each up
        opens a new reader even for the same namespace name: the engine says up again when the table is replaced or
        the namespace rebuilt (a new namespace under the old name, where the old socket hears nothing); the ring
        stays. The new reader waits for the old one to close (one listener per group and namespace)."""
        with self._lock:
            old = self._taps.pop(network_id, None)
            if old is not None:
                old.stop.set()
            if up:
                tap = _Tap(network_id, ns, self.ring_size)
                if old is not None:
                    tap.ring, tap.evicted, tap.last_seq, tap.previous = old.ring, old.evicted, old.last_seq, old.thread
                self._taps[network_id] = tap
        if old is not None and old.thread is None:
            self._detach(old)  # no thread of its own to close it (threads=False)
        if up and self._threads:
            tap.thread = threading.Thread(target=self._run, args=(tap,), name=f"flows-{network_id[:12] or 'host'}",
                                          daemon=True)
            tap.thread.start()

    def stop(self) -> None:
        with self._lock:
            taps, self._taps = list(self._taps.values()), {}
        for tap in taps:
            tap.stop.set()
        for tap in taps:
            if tap.thread is not None:
                tap.thread.join(timeout=READ_TIMEOUT * 4)

    # -- a reader thread ----------------------------------------------------------------------------------------
    def _counted(self, tap: _Tap) -> Dict[str, int]:
        """The exact counters of what tap's reader hears, by log prefix (VxnetError if a table cannot be read)."""
        if tap.network_id == HOST:
            return _by_prefix({}, self.guards(None)) if self.guards is not None else {}
        return _by_prefix(self.counters(tap.ns), self.guards(tap.ns) if self.guards is not None else {})

    def attach(self, network_id: str) -> bool:
        """Opens the reader of the network's namespace (HOST: the host's isolation group) and takes the counters
        as the accounting's start; False (the error kept for the answer) if the kernel refused. A reader thread
        calls it; tests too."""
        with self._lock:
            tap = self._taps.get(network_id)
        if tap is None:
            return False
        where = tap.ns or "the host namespace"
        try:
            reader = self.host_reader() if network_id == HOST and self.host_reader else self.open_reader(tap.ns)
        except (VxnetError, OSError) as exc:
            with self._lock:
                if tap.error != str(exc):
                    log.warning("flows: cannot read the verdict log of %s: %s", where, exc)
                tap.error = str(exc)
            return False
        try:
            start = self._counted(tap)
        except VxnetError:
            start = {}  # the table not there yet: it starts at zero
        with self._lock:
            tap.reader, tap.error = reader, None
            tap.accounting, tap.baseline = Accounting(start), dict(start)
        if tap.stop.is_set():  # stopped meanwhile
            self._detach(tap)
        return True

    def _detach(self, tap: _Tap) -> None:
        with self._lock:
            reader, tap.reader = tap.reader, None
        if reader is not None:
            reader.close()

    def _run(self, tap: _Tap) -> None:
        delay = RETRY_SECONDS[0]
        if tap.previous is not None:
            tap.previous.join(timeout=READ_TIMEOUT * 4)
        try:
            while not tap.stop.is_set():
                if tap.reader is None:
                    if not self.attach(tap.network_id):
                        tap.stop.wait(delay)
                        delay = min(delay * 2, RETRY_SECONDS[1])
                        continue
                    delay = RETRY_SECONDS[0]
                try:
                    records = tap.reader.read(READ_TIMEOUT)
                except OSError as exc:  # the socket failed: open another
                    with self._lock:
                        tap.error = f"reading the verdict log: {exc}"
                    self._detach(tap)
                    continue
                if records:
                    self.ingest(tap.network_id, records)
        finally:
            self._detach(tap)

    def _filed(self, record: Record) -> Optional[str]:
        """The local network a host isolation record belongs to: its source's subnet's, else its destination's."""
        for address in (record.src, record.dst):
            network_id = self.engine.network_of(address) if address else None
            if network_id:
                return network_id
        return None

    def ingest(self, network_id: str, records: Iterable[Record]) -> int:
        """Records read from the network's namespace (HOST: the host's isolation group) -> flows in the rings
        (names looked up now). -> how many were filed."""
        kept = [(r, kind) for r in records for kind in (classify(r.prefix),) if kind is not None]
        if not kept:
            return 0
        where = {id(r): (self._filed(r) if network_id == HOST else network_id) for r, _ in kept}
        names = {n: self.engine.names(n) or {} for n in set(where.values()) if n}
        filed = 0
        with self._lock:
            source = self._taps.get(network_id)
            if source is None:
                return 0
            for record, (verdict, reason) in kept:
                if source.accounting is not None:
                    source.accounting.saw(record)  # counted where its counter is: the host's, for isolation
                target = where[id(record)]
                tap = self._taps.get(target) if target else None
                if tap is None or tap.network_id == HOST:
                    continue  # a host record for no network here: counted above, in no ring
                self._seq += 1
                if len(tap.ring) == tap.ring.maxlen:
                    tap.evicted += 1
                tap.ring.append(_flow(self._seq, record, verdict, reason, names[tap.network_id]))
                tap.last_seq = self._seq
                filed += 1
        return filed

    # -- queries ------------------------------------------------------------------------------------------------
    def networks(self) -> List[dict]:
        with self._lock:
            return [{"network": t.network_id, "ns": t.ns, "records": len(t.ring), "next": t.last_seq,
                     "running": t.reader is not None}
                    for t in sorted(self._taps.values(), key=lambda t: t.network_id) if t.network_id != HOST]

    def _read_counters(self, tap: Optional[_Tap]) -> Optional[Dict[str, int]]:
        if tap is None:
            return None
        try:
            return self._counted(tap)
        except VxnetError as exc:  # the table or namespace went meanwhile
            log.debug("flows: counters of %s: %s", tap.ns or "the host", exc)
            return None

    @staticmethod
    def _suppressed(tap: _Tap, counted: Optional[Dict[str, int]]) -> Dict[str, int]:
        """Per prefix, counted but not logged (the lock held)."""
        if counted is None or tap.accounting is None:
            return {}
        if any(counted.get(p, 0) < n for p, n in tap.baseline.items()):
            # The table was made again (counters restart at zero): count from here.
            tap.accounting = Accounting({p: 0 for p in counted})
        tap.baseline = dict(counted)
        return tap.accounting.suppressed(counted)

    def query(self, network_id: str, verdict: str = "dropped", since: int = 0, limit: Optional[int] = None
              ) -> Optional[dict]:
        """The answer for one network (module docstring), None if it has no log here."""
        with self._lock:
            tap = self._taps.get(network_id) if network_id != HOST else None
            host = self._taps.get(HOST)
            if tap is None:
                return None
            ns = tap.ns
        counted = self._read_counters(tap)
        host_counted = self._read_counters(host) if self.guards is not None else None
        wanted = ("dropped", "audit") if verdict == "dropped" else VERDICTS[:3] if verdict == "all" else (verdict,)
        with self._lock:
            flows = [f for f in tap.ring if f.seq > since and f.verdict in wanted]
            if limit is not None:
                flows = flows[-limit:] if limit else []
            held = self._suppressed(tap, counted)
            host_held = self._suppressed(host, host_counted) if host is not None else {}
            guard_counts = {isolation.ANTI_SPOOFING: (_by_guard(counted) if counted is not None and
                                                      self.guards is not None else None, _by_guard(held)),
                            isolation.ISOLATION: (_by_guard(host_counted) if host_counted is not None and
                                                  host is not None else None, _by_guard(host_held))}
            guards = {reason: {"counted": None if total is None else total[reason], "suppressed": ahead[reason]}
                      for reason, (total, ahead) in guard_counts.items()}
            reader = tap.reader
            lost = (reader.lost if reader is not None else 0) + (host.reader.lost if host is not None and
                                                                 host.reader is not None else 0)
            answer = {
                "instance": self.instance, "network": network_id, "ns": ns, "verdict": verdict, "since": since,
                "next": max(since, tap.last_seq), "first": tap.ring[0].seq if tap.ring else 0,
                "evicted": tap.evicted, "records": [f.to_dict() for f in flows],
                "counters": _by_verdict(counted) if counted is not None else None,
                "suppressed": _by_verdict(held), "guards": guards, "lost": lost,
                "log": {"running": reader is not None, "error": tap.error}, "not_logged": NOT_LOGGED,
            }
        answer["rate_limited"] = any(answer["suppressed"].values()) or any(g["suppressed"] for g in guards.values())
        return answer


def _owner(port: str, names: Mapping[str, dict]) -> Optional[dict]:
    """The names of the endpoint a bridge port is named after (kernel/names.py veth_bridge), None if unknown."""
    prefix = kernel_names.bridge_port_endpoint(port)
    if not prefix:
        return None
    return next((who for who in names.values() if str(who.get("endpoint") or "").startswith(prefix)), None)


def _flow(seq: int, record: Record, verdict: str, reason: str, names: Mapping[str, dict]) -> Flow:
    guard = isolation.logged(record.prefix)
    src = _who(record.src, names)
    if reason == isolation.ANTI_SPOOFING:
        # The sender is the port's container, whatever address the frame claimed (it may be another's).
        owner = _owner(record.port, names)
        src = {"ip": record.src, **{k: str((owner or {}).get(k) or "") for k in _WHO}}
    return Flow(seq, record.timestamp, verdict, reason, record.proto, record.sport, record.dport, record.icmp_type,
                src, _who(record.dst, names), guard[1] if guard else "", record.port, record.mac)


# -- HTTP -------------------------------------------------------------------------------------------------------
def _reply(start_response, status: str, body: dict) -> List[bytes]:
    data = json.dumps(body, sort_keys=True).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]


def _bad(start_response, text: str) -> List[bytes]:
    return _reply(start_response, "400 Bad Request", {"error": text})


def make_app(flows: FlowLog) -> Callable:
    """The WSGI application of PATH (module docstring); the metrics server routes PATH here."""

    def app(environ, start_response):
        if environ.get("REQUEST_METHOD", "GET") != "GET":
            return _reply(start_response, "405 Method Not Allowed", {"error": f"{PATH}: GET only"})
        query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        unknown = sorted(set(query) - {"network", "verdict", "since", "limit"})
        if unknown:
            return _bad(start_response, f"{unknown[0]}: not a parameter of {PATH} (network, verdict, since, limit)")
        one = {key: values[-1] for key, values in query.items()}
        if "network" not in one:
            return _reply(start_response, "200 OK", {"instance": flows.instance, "networks": flows.networks()})
        verdict = one.get("verdict", "dropped")
        if verdict not in VERDICTS:
            return _bad(start_response, f"verdict: {verdict!r} is not one of {', '.join(VERDICTS)}")
        numbers = {}
        for key in ("since", "limit"):
            text = one.get(key)
            if text is not None and not (text.isdigit() and len(text) <= 18):
                return _bad(start_response, f"{key}: {text!r} is not a whole number")
            numbers[key] = int(text) if text is not None else None
        answer = flows.query(one["network"], verdict, numbers["since"] or 0, numbers["limit"])
        if answer is None:
            return _reply(start_response, "404 Not Found",
                          {"error": f"network {one['network'][:64]!r}: no namespace on this host (no container "
                                    "of it here, or not yet set up)"})
        return _reply(start_response, "200 OK", answer)

    return app

