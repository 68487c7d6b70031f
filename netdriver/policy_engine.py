"""From etcd to the kernel for policies: PolicyEngine keeps each local policy network's `bridge vxnet_policy` table
(netdriver/policy_nft.py) equal to what its mode, its rules and the network's members compile to
(netdriver/policy.py).

Inputs, all per segment (netdriver/store.py segment_of; rules and peer records are both keyed by it, so the
networks of a standalone `-o overlay=NAME`, one ID per host, share them):
  the peer records     every record of the segment, this host's included (local endpoints are sources too, and
                       this host's records whose veth is wired are the local destinations). Fed by PeerSync
                       (netdriver/watcher.py) from the one peer watch: its full read (resync_peers), each put
                       and delete; a record rewritten with an identity (plugin/endpoint_identity.py) is a put.
                       The driver also hands over this host's record at Join (member_here) before dockerd gets
                       the interface, so a new local destination is guarded without waiting for the watch.
  the rules            PolicyWatcher (netdriver/policy_store.py), the policy/ prefix: resync, put, delete.
  the local networks   network_up (a namespace made or rebuilt: the full compile, ensure_policy) and
                       network_down (the table goes; the namespace goes anyway), through PeerSync.

Each event applies only what it changed (PolicyState's diff, PolicyFirewall.update_policy: O(change)); a
namespace made or rebuilt, a full read after a broken watch and a repair use the full compile. A table found
missing by an update (someone deleted it) is replaced whole at once.

Nothing is applied before both full reads (peers and rules) have been made: until then the tables are empty,
not known to be empty, and compiling them would open every guarded address and drop every allowed connection
of a restarted plugin. At that first read each table is compared with the full compile (policy_drift, a read)
and written only if it differs: a plugin restart writes nothing when nothing changed, and the kernel keeps the
tables while the plugin is down (nothing removes them at shut-down). Writing the full compile (ensure_policy)
replaces a table only if it is made for another mode or audit flag (or by an older vxnet); else it changes the
elements that differ. The UDP records the packet path keeps (netdriver/policy_nft.py, a table of their own) are
left alone either way: a restart, a repair and a namespace made up again keep them. An etcd outage stops the
watches, not the kernel: the tables stay as they are until the next full read, whose difference is applied then.

Locks: one RLock around everything here, taken after PeerSync's (PeerSync calls in under its own lock, as the
reconciler's PeerSync.repair does) and never the other way round; the reconciler's repair() takes this one
alone. Subscribers are called after it is released.
"""

import ipaddress
import logging
import threading
from typing import Callable, Dict, Iterable, List, Optional, Set, Tuple

from kernel import names
from netdriver.models import Network, PeerRecord
from netdriver.policy import Diff, Identity, Member, PolicyError, PolicyState, Port, Rule, diff, parse_port
from netdriver.store import segment_of
from wire.errors import StoreUnavailable, VxnetError

log = logging.getLogger(__name__)

# How long a Join on a policy network waits for the first full reads of the peers and the rules (a plugin just
# started: the two reads of its watches, normally a few milliseconds to a second). Past it the Join is refused:
# handing over an interface whose policy table cannot be compiled yet would leave it reachable by anyone (fail
# open). dockerd's restart manager retries a container refused this way (--restart), a user sees the reason.
LOAD_WAIT_SECONDS = 10.0

Subscriber = Callable[[str, str, bool], None]


def member_of(record: PeerRecord) -> Member:
    """A peer record as the policy sees it. What does not parse counts as absent, which allows less, never more
    (fail closed): an unreadable exposed port is not exposed, an unreadable identity is unknown."""
    exposed: List[Port] = []
    for text in record.exposed or ():
        try:
            exposed.append(parse_port(text, "exposed"))
        except PolicyError as exc:
            log.warning("peer record eid=%s: ignoring an exposed port (%s)", record.endpoint_id[:12], exc)
    try:
        identity = Identity.from_dict(record.identity)
    except (AttributeError, TypeError, ValueError) as exc:
        log.warning("peer record eid=%s: its identity %r is unreadable, taken as unknown (%s)",
                    record.endpoint_id[:12], record.identity, exc)
        identity = None
    return Member(endpoint_id=record.endpoint_id, ip=record.ip or "", ip6=record.ip6 or "",
                  exposed=tuple(sorted(set(exposed))), identity=identity, host=record.host)


class PolicyEngine:
    """firewall: PolicyFirewall (ensure_policy, update_policy, remove_policy, policy_drift); host_id: this host;
    wired(network_id, endpoint_ids) -> the ids whose veth is in the namespace (DataPlane.wired_endpoints)."""

    def __init__(self, firewall, host_id: str, wired: Callable[[str, List[str]], Set[str]]):
        self.firewall = firewall
        self.host_id = host_id
        self._wired = wired
        self._lock = threading.RLock()
        self._records: Dict[str, Dict[str, PeerRecord]] = {}  # segment -> endpoint id -> record (every host's)
        self._rules: Dict[str, Dict[str, Rule]] = {}  # segment -> rule id -> rule
        self._networks: Dict[str, Network] = {}  # segment -> the network with a namespace here (any mode)
        self._states: Dict[str, PolicyState] = {}  # segment -> state, for the local networks with a policy
        # Segments whose table is known to hold their state's elements (ensured, or found equal): events change
        # only those by diff. A segment not in it gets the full compare-or-replace at its next full pass.
        self._applied: Set[str] = set()
        self._peers_loaded = False
        self._rules_loaded = False
        self._loaded_event = threading.Event()  # set once both full reads are made (never cleared: see _loaded)
        self._subscribers: List[Subscriber] = []

    # -- the interface of `vxnet flows` (plugin side) ------------------------------------------------------------
    def subscribe(self, callback: Subscriber) -> None:
        """callback(network_id, ns, up): up=True each time a network's namespace is up here, whatever its mode
        (made or rebuilt: the namespace is a new one), and again each time it gets its policy table (made,
        replaced, or found in place at start-up); up=False when the namespace goes. The verdict log reads every
        namespace (anti-spoofing drops are logged on open networks too). Called without the engine's lock, from
        the thread of the event; keep it short."""
        with self._lock:
            self._subscribers.append(callback)

    def names(self, network_id: str) -> Dict[str, dict]:
        """Each member address of the network (v4 and v6 text) -> {"container", "service", "endpoint", "host"}
        from the records held ("" where unknown: no identity yet). network_id: a network with a namespace here
        (its segment's records, every host's), or a segment."""
        with self._lock:
            segment = next((s for s, n in self._networks.items() if n.id == network_id), network_id)
            records = list(self._records.get(segment, {}).values())
        out: Dict[str, dict] = {}
        for record in records:
            identity = record.identity if isinstance(record.identity, dict) else {}
            entry = {"container": str(identity.get("container") or ""), "service": str(identity.get("service") or ""),
                     "endpoint": record.endpoint_id, "host": record.host}
            for address in (record.ip, record.ip6):
                if address:
                    out[address] = entry
        return out

    def network_of(self, address: str) -> Optional[str]:
        """The local network (a namespace here) one of whose subnets, IPv4 or IPv6, holds the address; None if
        none does (the verdict log files the host's isolation drops under it)."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return None
        with self._lock:
            networks = list(self._networks.values())
        for network in networks:
            for subnet in list(network.subnets) + list(network.subnets6):
                try:
                    if ip in ipaddress.ip_network(subnet.pool, strict=False):
                        return network.id
                except ValueError:
                    continue
        return None

    def policy_networks(self) -> List[Network]:
        """The local networks whose namespace has (or is to have) a policy table."""
        with self._lock:
            return [self._networks[s] for s in self._states]

    # -- the local networks (NamespaceEvents, through PeerSync) --------------------------------------------------
    def network_up(self, network: Network) -> None:
        """A namespace made or rebuilt here: the full compile, replacing the table (once the inputs are read)."""
        notes: List[Tuple[str, str, bool]] = []
        with self._lock:
            segment = segment_of(network.id, network.overlay)
            self._networks[segment] = network
            if network.policy == "open":
                self._states.pop(segment, None)
                self._applied.discard(segment)
            else:
                self._states[segment] = self._build(segment)
                self._applied.discard(segment)  # a new namespace, or one rebuilt: nothing about its table is known
                if self._loaded():
                    self._ensure(segment, notes, check=False)
            if not notes:  # the namespace is up, with no table (yet): its anti-spoofing drops are logged anyway
                notes.append((network.id, names.netns(network.id), True))
        self._notify(notes)

    def network_down(self, network: Network) -> None:
        notes: List[Tuple[str, str, bool]] = []
        with self._lock:
            segment = segment_of(network.id, network.overlay)
            known = self._networks.get(segment)
            if known is not None and known.id != network.id:
                return  # another network of the segment: not the one here
            self._networks.pop(segment, None)
            self._applied.discard(segment)
            ns = names.netns(network.id)
            if self._states.pop(segment, None) is not None:
                try:
                    self.firewall.remove_policy(ns)
                except VxnetError as exc:  # the namespace goes next anyway, and the table with it
                    log.info("policy table of %s not removed before its namespace: %s", ns, exc)
            notes.append((network.id, ns, False))
        self._notify(notes)

    # -- peer records (PeerSync) ---------------------------------------------------------------------------------
    def resync_peers(self, records: Iterable[Tuple[str, int, PeerRecord]]) -> None:
        """Every peer record in etcd (a full read: at start, after a broken watch or an outage)."""
        fresh: Dict[str, Dict[str, PeerRecord]] = {}
        for segment, _revision, record in records:
            fresh.setdefault(segment, {})[record.endpoint_id] = record
        notes: List[Tuple[str, str, bool]] = []
        with self._lock:
            self._records = fresh
            self._peers_loaded = True
            self._mark_loaded()
            self._refresh_all(notes)
        self._notify(notes)

    def put_peer(self, segment: str, record: PeerRecord) -> None:
        notes: List[Tuple[str, str, bool]] = []
        with self._lock:
            self._records.setdefault(segment, {})[record.endpoint_id] = record
            state = self._states.get(segment)
            if state is not None:
                self._apply(segment, state.put_member(member_of(record), record.host == self.host_id), notes)
        self._notify(notes)

    def member_here(self, segment: str, record: PeerRecord) -> None:
        """This host's record, just published by a Join (its veth is wired): applied now, not at the watch's
        echo (which then changes nothing). KernelError if the table could not be made right: the Join fails
        rather than hand over an interface its policy does not guard. On a policy network before both first
        full reads (a plugin just started), it waits for them up to LOAD_WAIT_SECONDS, then StoreUnavailable."""
        with self._lock:
            guarded = segment in self._states
        if guarded and not self._loaded_event.wait(LOAD_WAIT_SECONDS):
            raise StoreUnavailable(
                f"policy of network {record.network_id[:12]}: its rules and members are not read from etcd yet "
                f"(still after {LOAD_WAIT_SECONDS:g} s since the plugin started); the container is refused "
                "rather than attached unguarded; retry once etcd answers")
        notes: List[Tuple[str, str, bool]] = []
        with self._lock:
            self._records.setdefault(segment, {})[record.endpoint_id] = record
            state = self._states.get(segment)
            if state is not None:
                change = state.put_member(member_of(record), True)
                if not self._apply(segment, change, notes) and self._loaded():
                    self._ensure(segment, notes, check=False, raise_errors=True)
        self._notify(notes)

    def delete_peer(self, segment: str, endpoint_id: str) -> None:
        notes: List[Tuple[str, str, bool]] = []
        with self._lock:
            records = self._records.get(segment, {})
            records.pop(endpoint_id, None)
            if not records:
                self._records.pop(segment, None)
            state = self._states.get(segment)
            if state is not None:
                self._apply(segment, state.remove_member(endpoint_id), notes)
        self._notify(notes)

    # -- rules (PolicyWatcher's RuleSink) ------------------------------------------------------------------------
    def resync(self, rules: List[Rule]) -> None:
        fresh: Dict[str, Dict[str, Rule]] = {}
        for rule in rules:
            fresh.setdefault(rule.segment, {})[rule.id] = rule
        notes: List[Tuple[str, str, bool]] = []
        with self._lock:
            self._rules = fresh
            self._rules_loaded = True
            self._mark_loaded()
            self._refresh_all(notes)
        self._notify(notes)

    def put_rule(self, rule: Rule) -> None:
        notes: List[Tuple[str, str, bool]] = []
        with self._lock:
            self._rules.setdefault(rule.segment, {})[rule.id] = rule
            state = self._states.get(rule.segment)
            if state is not None:
                self._apply(rule.segment, state.put_rule(rule), notes)
        self._notify(notes)

    def delete_rule(self, segment: str, rule_id: str) -> None:
        notes: List[Tuple[str, str, bool]] = []
        with self._lock:
            rules = self._rules.get(segment, {})
            rules.pop(rule_id, None)
            if not rules:
                self._rules.pop(segment, None)
            state = self._states.get(segment)
            if state is not None:
                self._apply(segment, state.remove_rule(rule_id), notes)
        self._notify(notes)

    # -- the reconciler (netdriver/reconciler.py) ----------------------------------------------------------------
    def repair(self, network: Network) -> Optional[str]:
        """Compare the network's policy table with its state and replace it if they differ; returns what
        differed (None: equal, no policy here, or the inputs not read yet). KernelError is the caller's."""
        notes: List[Tuple[str, str, bool]] = []
        with self._lock:
            segment = segment_of(network.id, network.overlay)
            state = self._states.get(segment)
            if state is None or not self._loaded() or self._networks.get(segment, network).id != network.id:
                return None
            local = self._networks[segment]
            ns = names.netns(local.id)
            drift = self.firewall.policy_drift(ns, local.policy, local.policy_audit, state.elements())
            if drift is not None:
                self._applied.discard(segment)
                self.firewall.ensure_policy(ns, local.policy, local.policy_audit, state.elements())
                self._applied.add(segment)
                notes.append((local.id, ns, True))
        self._notify(notes)
        return drift

    # -- inside the lock ---------------------------------------------------------------------------------------
    def _loaded(self) -> bool:
        return self._peers_loaded and self._rules_loaded

    def _mark_loaded(self) -> None:
        # Both flags only ever go from False to True: a later outage keeps the last state read (see the module
        # docstring), so a Join then is applied by diff like any other.
        if self._loaded():
            self._loaded_event.set()

    def _build(self, segment: str) -> PolicyState:
        """The segment's state from scratch: every record a member, this host's wired ones local."""
        network = self._networks[segment]
        records = self._records.get(segment, {})
        mine = [eid for eid, r in records.items() if r.host == self.host_id]
        try:
            wired = self._wired(network.id, mine) if mine else set()
        except VxnetError as exc:
            # The namespace cannot be read: its records say who Joined (a record is written once the veth is in).
            log.warning("policy of nid=%s: cannot read which endpoints are wired, taking the records: %s",
                        network.id[:12], exc)
            wired = set(mine)
        return PolicyState(network.policy, self._rules.get(segment, {}).values(),
                           [member_of(r) for r in records.values()], wired)

    def _refresh_all(self, notes: List[Tuple[str, str, bool]]) -> None:
        """After a full read: each local policy network's state rebuilt; its table changed by the difference if
        it was in step, else compared whole and replaced if it differs (the first read after a restart)."""
        if not self._loaded():
            for segment in self._states:
                self._states[segment] = self._build(segment)
            return
        for segment in list(self._states):
            old = self._states[segment]
            new = self._states[segment] = self._build(segment)
            if segment in self._applied:
                self._apply(segment, diff(old.elements(), new.elements()), notes)
            else:
                self._ensure(segment, notes, check=True)

    def _apply(self, segment: str, change: Diff, notes: List[Tuple[str, str, bool]]) -> bool:
        """The change into the kernel if its table is in step (else the next full pass covers it); a failed
        update (the table gone) replaces the table whole. False if the table is not right afterwards."""
        if not self._loaded() or segment not in self._applied:
            return False
        if change.empty():
            return True
        network = self._networks[segment]
        ns = names.netns(network.id)
        try:
            self.firewall.update_policy(ns, change)
            return True
        except VxnetError as exc:
            log.warning("policy update in %s failed, replacing the table whole: %s", ns, exc)
            self._applied.discard(segment)
            return self._ensure(segment, notes, check=False)

    def _ensure(self, segment: str, notes: List[Tuple[str, str, bool]], check: bool,
                raise_errors: bool = False) -> bool:
        """The full compile into the table; check: compare first and write only if it differs."""
        network = self._networks[segment]
        ns = names.netns(network.id)
        elements = self._states[segment].elements()
        try:
            if check and self.firewall.policy_drift(ns, network.policy, network.policy_audit, elements) is None:
                log.info("policy table of nid=%s in %s found in place (%d elements)", network.id[:12], ns,
                         elements.size())
            else:
                self.firewall.ensure_policy(ns, network.policy, network.policy_audit, elements)
                log.info("policy table of nid=%s (%s%s) in %s: %d elements", network.id[:12], network.policy,
                         ", audit" if network.policy_audit else "", ns, elements.size())
        except VxnetError as exc:
            if raise_errors:
                raise
            # Left for the next event or the reconciler's pass, which compare and replace it.
            log.error("policy table of nid=%s in %s not in place: %s", network.id[:12], ns, exc)
            return False
        self._applied.add(segment)
        notes.append((network.id, ns, True))
        return True

    def _notify(self, notes: List[Tuple[str, str, bool]]) -> None:
        if not notes:
            return
        with self._lock:
            subscribers = list(self._subscribers)
        for network_id, ns, up in notes:
            for callback in subscribers:
                try:
                    callback(network_id, ns, up)
                except Exception:  # a subscriber's bug must not stop the policy from being applied
                    log.exception("policy subscriber failed for %s (up=%s)", ns, up)
