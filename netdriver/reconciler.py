"""Self-healing: keeps this host's kernel equal to the desired state while the plugin runs, without a restart.

Start-up reconciliation (NetworkDriver.reconcile) makes the kernel right once; after that someone else can still
change it: `bridge fdb del`, `ip neigh flush`, `nft flush ruleset`, `ip xfrm state flush`, a link deleted. The
Reconciler finds and repairs that:
  - on kernel events (kernel/events.py tells, without polling, which namespace changed, what kind of object and
    which objects): a pass of that namespace alone, for those kinds, after a short debounce (DEBOUNCE_SECONDS)
    that gathers a burst into one pass; where the events named their objects, the pass looks at those alone
    (below);
  - on a periodic full pass (every `interval` seconds, VXNET_RECONCILE_SECONDS; 0: none), which also catches what
    sends no event (a namespace unmounted by `ip netns del` while our socket keeps it alive);
  - on an overrun of an event socket (notifications lost): a full pass.

What a pass compares and repairs, per network this process made whole (NetworkDriver.ready_networks):
  link          the namespace, bridge and VXLAN device (DataPlane.network_problems): rebuilt whole through the
                driver's own path (NetworkDriver.rebuild: bridge, VXLAN, peers, anti-spoofing), as a first Join;
  fdb/neighbour the VXLAN device's remote entries against the peer table (PeerSync.repair, a full sync that reads
                the kernel, under PeerSync's lock);
  anti-spoofing the namespace's nft table against the endpoints wired here (NetworkDriver.repair_guard, under the
                driver's anti-spoofing lock, skipped while a Join or DeleteEndpoint of the network is under way);
  network-policy  a policy network's `bridge vxnet_policy` table against the policy engine's state
                (PolicyEngine.repair: policy_drift, then the full compile: the table replaced if it is made
                differently, else its elements changed; the UDP records' table made again only if it is gone;
                under the engine's lock, so no event's update is half seen; nothing before the engine has read
                its inputs);
and in the host namespace:
  isolation     the host table against this host's networks (NetworkDriver.repair_host_guard);
  sa/policy/ipsec-firewall   through the EncryptionManager (repair()).

An event pass that knows the objects looks at each in O(1), whatever the number of endpoints and peers: a Join
makes a veth, a bridge port and its static entries, and their notifications must not make the pass compare every
link, entry and anti-spoofing element of the network (past 1,500 endpoints on one network that made each Join
wait about 1 s for the pass its predecessor had woken). So, per object named:
  link, an endpoint's port (vxp*)   the port against what the driver placed (DataPlane.repair_ports: on its bridge,
                up, its static entries), made again if it differs, under the fabric lock a Join takes; a port the
                driver did not place (another tool's, one just removed) is not looked at;
  link, the bridge, the VXLAN device, a leaf bridge or a trunk
                changed: network_problems (rebuilt if it differs); deleted, or a link without a name: the whole
                link check above (Reconciler._structural says why a change alone needs no more);
  link, any other name              nothing (not vxnet's);
  fdb, a bridge's entry (master)    the endpoint whose MAC it is, as for its port; no endpoint's MAC: nothing;
  fdb/neighbour on the VXLAN device those keys against the peer table (PeerSync.repair_entries: one entry read
                per key, put back, corrected or removed, under PeerSync's lock);
  fdb/neighbour on another device   nothing (no other device of ours holds remote entries).
A kind whose objects the events could not name (kernel/events.py: past MAX_OBJECTS in one batch, or a message it
could not read) gets the whole check above, as do an overrun and the periodic and start-up passes.

It never fights itself: every comparison is with the same desired state the driver and PeerSync apply, under the
same locks, so a change they make (or a repair the pass makes) is seen as equal by the pass its own events trigger,
which then changes nothing and sends no event: at most one quiet pass, never a loop. Reads (netlink dumps, nft
list) send no notification, and the nftables commits of this process wake no pass at all (kernel/events.py: the
listener knows them by the committing thread's name). That matters for the cost of a change: a pass compares
whole tables (a policy table of 7,840 elements: a listing and a full compile, 0.4-0.8 s under the engine's
lock), and a pass woken by each rule change's own update made a burst of changes wait for one pass after
another. Nothing here is on the data path: it runs only when the kernel's control state
changes, or once per interval.

Each repair is logged on one line, `repair kind=<kind> where=<namespace|host> count=<n> what="..." why="..."`, and
counted in telemetry.metrics.REPAIRS{kind}; each pass in RECONCILE_PASSES{trigger}.
"""

import logging
import threading
import time
from typing import Callable, Dict, FrozenSet, Iterable, Mapping, Optional, Set, Union

from kernel import names
from netdriver.contracts import Encryption, NamespaceEvents
from netdriver.models import Network
from telemetry.metrics import RECONCILE_PASSES, REPAIRS
from wire.errors import VxnetError

log = logging.getLogger(__name__)

# Long enough to gather one burst (a rebuild's bridge, VXLAN, FDB and nft notifications arrive within a few ms),
# short against the 2 s a repair may take.
DEBOUNCE_SECONDS = 0.1

NETWORK_KINDS = frozenset({"link", "fdb", "neighbour", "nft"})
HOST_KINDS = frozenset({"nft", "sa", "policy"})
FULL = None  # a pass over everything
# Objects gathered for one kind of one namespace over a debounce, past which the pass checks the whole kind: the
# listener's bound per batch (kernel/events.py MAX_OBJECTS), kept over the batches one debounce gathers.
MAX_OBJECTS = 256

Objects = Optional[FrozenSet]  # what the events named (kernel/events.py LinkChange, NeighChange); None: everything
Targets = Mapping[Optional[str], Union[Iterable[str], Mapping[str, Objects]]]  # ns -> kinds, or kind -> objects


class NamespaceTap:
    """The NamespaceEvents the driver is given: passes network_up/network_down on to PeerSync, and tells the event
    listener to watch a network's namespace once it exists (again after a rebuild made it anew) and to stop before
    it is removed (an open socket would keep a removed namespace alive). `attach` comes later, when the
    listener exists."""

    def __init__(self, inner: Optional[NamespaceEvents]):
        self.inner = inner
        self._watch: Callable[[str], None] = lambda ns: None
        self._unwatch: Callable[[str], None] = lambda ns: None

    def attach(self, watch: Callable[[str], None], unwatch: Callable[[str], None]) -> None:
        self._watch, self._unwatch = watch, unwatch

    def network_up(self, network: Network) -> None:
        if self.inner is not None:
            self.inner.network_up(network)
        try:
            self._watch(names.netns(network.id))
        except OSError as exc:  # the periodic pass still covers it
            log.warning("cannot listen to kernel events of %s: %s", names.netns(network.id), exc)

    def network_down(self, network: Network) -> None:
        self._unwatch(names.netns(network.id))
        if self.inner is not None:
            self.inner.network_down(network)


class Reconciler:
    """A thread that runs passes on events and periodically. driver: NetworkDriver (ready_networks, rebuild,
    repair_guard, repair_host_guard, and its dataplane's network_problems, repair_ports, vxlan_index); peers:
    PeerSync (repair, repair_entries); encryption: the EncryptionManager or None;
    interval: seconds between full passes (0: none); watch(ns): start listening in a namespace (the tap's);
    listener: the kernel event listener whose callback is notify() (started and stopped with the reconciler;
    None: periodic passes only)."""

    def __init__(self, driver, peers, encryption: Optional[Encryption] = None, interval: float = 30.0,
                 debounce: float = DEBOUNCE_SECONDS, watch: Callable[[str], None] = lambda ns: None,
                 listener=None, clock: Callable[[], float] = time.monotonic, health=None, policy=None):
        self.driver = driver
        self.policy = policy  # netdriver/policy_engine.py PolicyEngine (repair(network) -> drift), or None
        self.health = health  # netdriver/health.py HealthOverlay (reconcile() -> entries changed), or None
        self.peers = peers
        self.encryption = encryption
        self.interval = interval
        self.debounce = debounce
        self._watch = watch
        self.listener = listener
        self._clock = clock
        self._cond = threading.Condition()
        self._pending: Dict[Optional[str], Dict[str, Optional[Set]]] = {}  # ns (None: host) -> kind -> objects
        self._full_owed = False
        self._due: Optional[float] = None
        self._stopping = False
        self._thread: Optional[threading.Thread] = None

    # -- triggers --------------------------------------------------------------------------------------------
    def notify(self, ns: Optional[str], kind: str, objects: Objects = None) -> None:
        """A kernel event (kernel/events.py callback): queue a pass for it and return at once. objects: what the
        event named (None: anything of that kind may have changed)."""
        with self._cond:
            if kind == "overrun":
                self._full_owed = True
            else:
                kinds = self._pending.setdefault(ns, {})
                if objects is None or (kind in kinds and kinds[kind] is None):
                    kinds[kind] = None
                else:
                    gathered = kinds.setdefault(kind, set())
                    gathered |= objects
                    if len(gathered) > MAX_OBJECTS:
                        kinds[kind] = None
            if self._due is None:
                self._due = self._clock() + self.debounce
            self._cond.notify()

    def start(self) -> None:
        if self.listener is not None:
            try:
                self.listener.start()
            except OSError as exc:  # a kernel without one of the netlink families: periodic passes still run
                log.error("kernel events unavailable, self-healing by periodic passes only: %s", exc)
        spaces = [names.netns(n.id) for n in self.driver.ready_networks()]  # made whole before the listener existed
        if self.health is not None and self.health.built():
            spaces.append(names.HEALTH_NETNS)
        for ns in spaces:
            try:
                self._watch(ns)
            except OSError as exc:
                log.warning("cannot listen to kernel events of %s: %s", ns, exc)
        self._thread = threading.Thread(target=self._run, name="reconciler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(10)
        if self.listener is not None:
            self.listener.stop()

    def _run(self) -> None:
        next_full = self._clock() + self.interval if self.interval else None
        while True:
            with self._cond:
                while not self._stopping:
                    now = self._clock()
                    deadlines = [d for d in (self._due, next_full) if d is not None]
                    if deadlines and min(deadlines) <= now:
                        break
                    self._cond.wait(min(deadlines) - now if deadlines else None)
                if self._stopping:
                    return
                now = self._clock()
                periodic = next_full is not None and next_full <= now
                event = self._due is not None and self._due <= now
                pending, full_owed = {}, False
                if event:
                    pending, full_owed = self._pending, self._full_owed
                    self._pending, self._full_owed, self._due = {}, False, None
            if periodic or full_owed:
                self.run_pass("periodic" if periodic else "overrun")
                next_full = self._clock() + self.interval if self.interval else None
            elif pending:
                self.run_pass("event", pending)

    # -- a pass ----------------------------------------------------------------------------------------------
    def run_pass(self, trigger: str, targets: Optional[Targets] = FULL) -> Dict[str, int]:
        """One pass: targets namespace (None: the host) -> the kinds to check whole, or kind -> the objects named
        (None: whole), or FULL for everything. Returns kind -> objects repaired. Errors are logged, and the rest of
        the pass goes on (one stuck network does not keep the others from being repaired); the next event or
        period tries again."""
        RECONCILE_PASSES.labels(trigger).inc()
        repaired: Dict[str, int] = {}
        if targets is FULL:
            self._forget_removed()

        def named(ns: Optional[str], kinds: Iterable[str]) -> Dict[str, Objects]:
            if targets is FULL:
                return dict.fromkeys(kinds)
            asked = targets.get(ns, ())
            asked = asked if isinstance(asked, Mapping) else dict.fromkeys(asked)
            return {k: (None if v is None else frozenset(v)) for k, v in asked.items() if k in kinds}

        def wanted(ns: Optional[str], kinds: Iterable[str]) -> Set[str]:
            return set(named(ns, kinds))

        for network in self.driver.ready_networks():
            ns = names.netns(network.id)
            kinds = named(ns, NETWORK_KINDS)
            if kinds:
                self._network(network, ns, kinds, trigger, repaired)
        host = wanted(None, HOST_KINDS)
        if host:
            self._host(host, trigger, repaired)
        if self.health is not None and wanted(names.HEALTH_NETNS, ("fdb", "neighbour", "link")):
            # The health overlay `vxnet doctor` probes: its entries follow the host records (netdriver/health.py).
            count = self.health.reconcile()
            if count:
                self._record(repaired, "health", count, names.HEALTH_NETNS, f"{count} entries put back",
                             self._why(trigger, {"fdb"}))
        if repaired:
            log.info("reconcile pass (%s) repaired %s", trigger, ", ".join(f"{k}={v}" for k, v in sorted(
                repaired.items())))
        return repaired

    def _forget_removed(self) -> None:
        """Stop listening in namespaces that are gone (a rollback removed one it had just made): the listener's
        socket would keep a removed namespace alive."""
        if self.listener is None:
            return
        try:
            present = {names.netns(prefix) for prefix in self.driver.dataplane.network_ids()}
            for ns in self.listener.watched():
                if ns is not None and ns not in present:
                    self.listener.unwatch(ns)
        except VxnetError as exc:
            log.warning("cannot list the namespaces to stop listening in removed ones: %s", exc)

    def _network(self, network: Network, ns: str, kinds: Dict[str, Objects], trigger: str,
                 repaired: Dict[str, int]) -> None:
        """The checks of one network (module docstring): the namespace's structure first when the link check is
        whole (a rebuild makes everything else right), then the objects named one by one, then the tables of the
        kinds not named. The named ports come before the anti-spoofing comparison: a port made again is wired
        again, and so keeps its elements."""
        whole = {kind for kind, objects in kinds.items() if objects is None}
        structure = "link" in whole
        for change in kinds.get("link") or ():
            if self._structural(change):
                structure = True
                if change.deleted or change.ifname is None:
                    whole.add("link")
        why = self._why(trigger, whole | ({"link"} if structure else set()))
        where = f"{ns} nid={network.id[:12]}"
        try:
            if structure:
                problems = self.driver.dataplane.network_problems(network)
                # rebuild(): bridge, VXLAN, peers and anti-spoofing, all of it; False: deleted meanwhile
                if problems and self.driver.rebuild(network):
                    self._record(repaired, "link", 1, where, "; ".join(problems) + ": namespace rebuilt", why)
                    return
                if problems:
                    return
            # the ports a link event named are looked at even when another link made the link check whole:
            # network_problems does not look at endpoint ports
            named = {kind: objects for kind, objects in kinds.items() if objects}
            if named and self._named(network, ns, named, trigger, repaired):
                # A port made again: its anti-spoofing elements compared too, whole (a full pass in between may
                # have taken them out while it was missing). Only after a repair, which someone else caused.
                whole.add("nft")
            if whole & {"fdb", "neighbour", "link"}:
                fdb, neigh = self.peers.repair(network)
                self._peer_records(repaired, fdb, neigh, where, why)
            if whole & {"nft", "link"}:
                drift = self.driver.repair_guard(network)
                if drift is not None:
                    self._record(repaired, "anti-spoofing", 1, where, f"{drift}: table rebuilt", why)
                if self.policy is not None:
                    drift = self.policy.repair(network)
                    if drift is not None:
                        self._record(repaired, "network-policy", 1, where, f"{drift}: policy table replaced", why)
        except VxnetError as exc:
            log.error("reconcile pass (%s) could not repair %s: %s", trigger, where, exc)

    @staticmethod
    def _structural(change) -> bool:
        """A link of the namespace's structure: the bridges, the VXLAN device, the trunks, or one the
        notification did not name. Changed, it gets network_problems (a rebuild if it is not as
        ensure_network makes it); deleted or unnamed, the whole link check. A change alone cannot have lost
        what the whole check compares besides (a device set down loses its neighbour entries, each of which
        is notified and named), and the root bridge changes with every new smallest port MAC (the kernel
        gives a bridge without an address of its own the smallest of its ports', br_stp_recalculate_bridge_id):
        a whole check each time would read every peer entry and anti-spoofing element some dozen times per
        thousand Joins."""
        name = change.ifname
        return name is None or name == names.VXLAN or names.bridge_index(name) >= 0 or names.is_trunk(name)

    def _named(self, network: Network, ns: str, kinds: Dict[str, FrozenSet], trigger: str,
               repaired: Dict[str, int]) -> bool:
        """The objects the events named, each against its desired state in O(1). True if a port was made
        again."""
        why = self._why(trigger, set(kinds), named=True)
        where = f"{ns} nid={network.id[:12]}"
        ports = {c.ifname for c in kinds.get("link", ()) if c.ifname and names.bridge_port_endpoint(c.ifname)}
        bridged = {c.mac for c in kinds.get("fdb", ()) if c.master and c.mac}
        own = [c for kind in ("fdb", "neighbour") for c in kinds.get(kind, ()) if not c.master]
        fixed = []
        if ports or bridged:
            fixed = self.driver.dataplane.repair_ports(network, ports, bridged)
            if fixed:
                self._record(repaired, "port", len(fixed), where, "; ".join(fixed) + ": made again", why)
        if own:
            vxlan = self.driver.dataplane.vxlan_index(network)
            macs = {c.mac for c in kinds.get("fdb", ()) if not c.master and c.ifindex == vxlan and c.mac}
            ips = {c.ip for c in kinds.get("neighbour", ()) if c.ifindex == vxlan and c.ip}
            if vxlan is not None and (macs or ips):
                fdb, neigh = self.peers.repair_entries(network, macs, ips)
                self._peer_records(repaired, fdb, neigh, where, why)
        return bool(fixed)

    def _peer_records(self, repaired: Dict[str, int], fdb: int, neigh: int, where: str, why: str) -> None:
        if fdb:
            self._record(repaired, "fdb", fdb, where, f"{fdb} FDB entr{'y' if fdb == 1 else 'ies'} put back "
                         "or corrected", why)
        if neigh:
            self._record(repaired, "neighbour", neigh, where, f"{neigh} neighbour entr"
                         f"{'y' if neigh == 1 else 'ies'} put back or corrected", why)

    def _host(self, kinds: Set[str], trigger: str, repaired: Dict[str, int]) -> None:
        why = self._why(trigger, kinds)
        if "nft" in kinds:
            try:
                drift = self.driver.repair_host_guard()
                if drift is not None:
                    self._record(repaired, "isolation", 1, "host", f"{drift}: table rebuilt", why)
            except VxnetError as exc:
                log.error("reconcile pass (%s) could not repair the host isolation table: %s", trigger, exc)
        if self.encryption is not None:
            try:
                for kind, count in sorted(self.encryption.repair().items()):
                    self._record(repaired, kind, count, "host", f"{count} {kind} object(s) put back", why)
            except VxnetError as exc:
                log.error("reconcile pass (%s) could not repair IPsec: %s", trigger, exc)

    @staticmethod
    def _why(trigger: str, kinds: Set[str], named: bool = False) -> str:
        if trigger != "event":
            return f"{trigger} pass"
        return f"event pass after {'/'.join(sorted(kinds))} events" + (" naming them" if named else "")

    @staticmethod
    def _record(repaired: Dict[str, int], kind: str, count: int, where: str, what: str, why: str) -> None:
        repaired[kind] = repaired.get(kind, 0) + count
        REPAIRS.labels(kind).inc(count)
        log.warning('repair kind=%s where=%s count=%d what="%s" why="%s"', kind, where, count, what, why)
