"""Policy inside a network: the rules, the identities they select, and what they compile to. Pure: no I/O.

A network's mode is fixed at creation (`-o policy=open|exposed|deny`, netdriver/options.py):
  open     nothing is guarded (today's behaviour); rules are stored but compile to nothing
  exposed  a local member accepts new connections on the ports it exposes, and what a rule allows
  deny     a local member accepts only what a rule allows
Replies always pass (only what opens a connection is judged: netdriver/policy_nft.py); rules are additive allows.

A rule, stored at policy/<segment>/<rule> (store/schema.py) as
    {"id": "1a2b3c4d5e6f", "segment": "...", "from": "label=role=client", "to": "service=db",
     "ports": ["5432/tcp"]}
Rules belong to the segment (netdriver/store.py segment_of: the network ID, or overlay-NAME for standalone
networks joined by `-o overlay=NAME`, which have a different network ID on every host because each host's
dockerd makes its own): an allow given on one host is then in force on every host of the overlay. A Swarm
network has one ID everywhere, its segment.
("ports": [] allows every protocol and port). Its id is 12 hex digits of a SHA-256 of that canonical content, so
the same allow given twice is one rule, one key.

A selector: `service=NAME` (a Swarm service or a Compose service: both are Identity.service), `label=KEY=VALUE`
(a container label), `container=NAME` (the container's name, without Docker's leading '/'), or `any`.
An endpoint whose identity is not known yet (None) is selected only by `any`: fail closed.

Enforcement is at the destination: `compile` gives the element sets for the members on this host,
    guarded    {daddr}                          the local members' addresses, both families
    exposed    {(daddr, proto, port)}           mode exposed only: the local members' exposed ports
    allow      {(saddr, daddr, proto, port)}    a rule with ports, per (source member, local destination member)
    allow_all  {(saddr, daddr)}                 a rule without ports
where the address family is given by the address text (an IPv4 pair from ip, an IPv6 pair from ip6, never
mixed). The kernel looks a packet up in these sets (hash sets: the per-packet cost does not depend on how many
rules or members there are); what grows with them is the number of elements, and the work per change.

Cost of keeping the sets up to date (PolicyState, below), per event:
  a member arriving, leaving or changing identity (remote)   O(rules x local members)
  the same for a local member                                 also O(its new elements): every source a rule
                                                              allows it from, found through a selector index
  a rule added or removed                                     O(members) to find its sources and destinations
                                                              (an index lookup), plus its elements
never O(members^2). `compile` computes everything from scratch (start-up, and the tests' reference).
"""

import dataclasses
import hashlib
import json
import re
from collections import Counter
from typing import Dict, FrozenSet, Iterable, Iterator, List, Mapping, Optional, Set, Tuple

from wire.errors import InvalidRequest

MODES = ("open", "exposed", "deny")
PROTOCOLS = ("tcp", "udp", "sctp")  # what Docker can expose (EXPOSE/--expose/-p: tcp, udp, sctp)
# RFC 793/768/4960: a 16-bit port; 0 is reserved and never a listening port.
PORT_MIN, PORT_MAX = 1, 65535

# Docker's names: a container name [a-zA-Z0-9][a-zA-Z0-9_.-]* (daemon/names), a Swarm service name is a DNS
# label-ish name (at most 63 characters), a Compose service name [a-zA-Z0-9][a-zA-Z0-9_.-]*. One pattern for all
# three; the 255-character cap keeps a record small.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,254}")
# A label key or value is free text to Docker; we refuse only control characters (they would garble `ls`) and
# keep it short enough for a record.
_LABEL_TEXT = re.compile(r"[^\x00-\x1f\x7f]{0,1024}")
_RULE_ID = re.compile(r"[0-9a-f]{12}")


class PolicyError(InvalidRequest):
    """A rule, selector or port that cannot be: the message names the part (--from, --to, --port) and why."""


# -- ports -------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, order=True)
class Port:
    proto: str  # "tcp" | "udp" | "sctp"
    port: int

    def text(self) -> str:
        return f"{self.port}/{self.proto}"

    def __str__(self) -> str:
        return self.text()


def parse_port(text: str, field: str = "port") -> Port:
    """"5432/tcp" (or "5432", tcp as in Docker's --expose) -> Port; PolicyError naming field."""
    if not isinstance(text, str):
        raise PolicyError(f"{field}: {text!r} is not a port (PORT/PROTOCOL, like 5432/tcp)")
    number, _, proto = text.strip().partition("/")
    proto = proto.lower() if proto else "tcp"
    if proto not in PROTOCOLS:
        raise PolicyError(f"{field}: {text!r} protocol must be {', '.join(PROTOCOLS[:-1])} or {PROTOCOLS[-1]}")
    # ASCII digits only (int() takes other scripts' digits), few of them (no 4300-digit int() errors).
    if not re.fullmatch(r"[0-9]{1,5}", number) or not PORT_MIN <= int(number) <= PORT_MAX:
        if re.fullmatch(r"[0-9]+-[0-9]+", number):
            raise PolicyError(f"{field}: {text!r} is a range; give each port with its own --port")
        raise PolicyError(f"{field}: {text!r} is not a port {PORT_MIN}-{PORT_MAX}")
    return Port(proto, int(number))


# -- selectors ---------------------------------------------------------------------------------------------------
SELECTOR_KINDS = ("service", "label", "container", "any")
_SELECTOR_FORMS = "service=NAME, label=KEY=VALUE, container=NAME or any"


@dataclasses.dataclass(frozen=True, order=True)
class Selector:
    kind: str  # "service" | "label" | "container" | "any"
    key: str = ""  # the label's key (label only)
    value: str = ""  # the service's, label's or container's name

    def text(self) -> str:
        if self.kind == "any":
            return "any"
        if self.kind == "label":
            return f"label={self.key}={self.value}"
        return f"{self.kind}={self.value}"

    def __str__(self) -> str:
        return self.text()


ANY = Selector("any")


def parse_selector(text: str, field: str = "selector") -> Selector:
    """"service=db" | "label=role=client" | "container=web1" | "any" -> Selector; PolicyError naming field."""
    if not isinstance(text, str):
        raise PolicyError(f"{field}: {text!r} is not a selector ({_SELECTOR_FORMS})")
    if text == "any":
        return ANY
    kind, eq, rest = text.partition("=")
    if not eq or kind not in SELECTOR_KINDS or kind == "any":
        raise PolicyError(f"{field}: {text!r} is not a selector ({_SELECTOR_FORMS})")
    if kind == "label":
        key, eq, value = rest.partition("=")
        if not key:
            raise PolicyError(f"{field}: {text!r} has no key (label=KEY=VALUE)")
        if not eq:
            raise PolicyError(f"{field}: {text!r} has no value (label=KEY=VALUE; label=KEY= for an empty one)")
        for what, part in (("key", key), ("value", value)):
            if not _LABEL_TEXT.fullmatch(part):
                raise PolicyError(f"{field}: {text!r}: the label's {what} has control characters or is longer "
                                  f"than 1024")
        return Selector("label", key, value)
    if not rest:
        raise PolicyError(f"{field}: {text!r} has no name ({kind}=NAME)")
    name = rest[1:] if kind == "container" and rest.startswith("/") else rest  # `docker inspect` shows "/web1"
    if not _NAME.fullmatch(name):
        raise PolicyError(f"{field}: {text!r}: a {kind} name is letters, digits, '_', '.' and '-', starting with a "
                          f"letter or digit")
    return Selector(kind, "", name)


# -- identities --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Identity:
    """Who an endpoint is, from the Docker API (never from a plugin call): published in its peer record as
    to_dict() = {"container": "web1", "service": "db" or "", "labels": {"role": "client"}}."""
    container: str  # the container's name, without Docker's leading '/'
    service: str  # the Swarm service (com.docker.swarm.service.name) or Compose service (com.docker.compose.service)
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        # A copy of the labels (the caller's dict may change later), hashed by its items (__hash__).
        object.__setattr__(self, "container", self.container[1:] if self.container.startswith("/")
                           else self.container)
        object.__setattr__(self, "labels", dict(self.labels))

    def __hash__(self) -> int:
        return hash((self.container, self.service, tuple(sorted(self.labels.items()))))

    def matches(self, selector: Selector) -> bool:
        if selector.kind == "any":
            return True
        if selector.kind == "service":
            return bool(self.service) and self.service == selector.value
        if selector.kind == "container":
            return bool(self.container) and self.container == selector.value
        if selector.kind == "label":
            return selector.key in self.labels and self.labels[selector.key] == selector.value
        return False

    def to_dict(self) -> dict:
        return {"container": self.container, "service": self.service, "labels": dict(sorted(self.labels.items()))}

    @classmethod
    def from_dict(cls, raw: Optional[dict]) -> Optional["Identity"]:
        """None (not known yet) stays None; missing fields read as empty, so an older record loads."""
        if raw is None:
            return None
        labels = raw.get("labels") or {}
        return cls(container=str(raw.get("container") or ""), service=str(raw.get("service") or ""),
                   labels={str(k): str(v) for k, v in labels.items()})


def selects(selector: Selector, identity: Optional[Identity]) -> bool:
    """Whether selector picks an endpoint of this identity; an unknown identity only by `any` (fail closed)."""
    if identity is None:
        return selector.kind == "any"
    return identity.matches(selector)


# -- rules -------------------------------------------------------------------------------------------------------
def _canonical_ports(ports: Iterable[Port]) -> Tuple[Port, ...]:
    return tuple(sorted(set(ports)))


def rule_id(segment: str, source: Selector, dest: Selector, ports: Iterable[Port]) -> str:
    """12 hex digits of SHA-256 over the canonical rule (ports sorted, duplicates dropped): the same allow is one
    id. 48 bits: a collision among a network's rules needs about 2^24 of them."""
    canonical = json.dumps({"segment": segment, "from": source.text(), "to": dest.text(),
                            "ports": [p.text() for p in _canonical_ports(ports)]},
                           sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


@dataclasses.dataclass(frozen=True)
class Rule:
    id: str
    segment: str  # the network's segment (the network ID, or overlay-NAME): see the module's docstring
    source: Selector
    dest: Selector
    ports: Tuple[Port, ...] = ()  # () = every protocol and port

    @classmethod
    def make(cls, segment: str, source: Selector, dest: Selector, ports: Iterable[Port] = ()) -> "Rule":
        canonical = _canonical_ports(ports)
        return cls(rule_id(segment, source, dest, canonical), segment, source, dest, canonical)

    def to_dict(self) -> dict:
        return {"id": self.id, "segment": self.segment, "from": self.source.text(), "to": self.dest.text(),
                "ports": [p.text() for p in self.ports]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Rule":
        """The stored rule, re-validated; PolicyError if it is not one (or its id is not its content's)."""
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise PolicyError(f"rule: not JSON: {exc}") from None
        if not isinstance(raw, dict) or not isinstance(raw.get("ports", []), list):
            raise PolicyError("rule: not a rule object")
        rule = cls.make(str(raw.get("segment", "")), parse_selector(raw.get("from"), "from"),
                        parse_selector(raw.get("to"), "to"), [parse_port(p, "ports") for p in raw.get("ports", [])])
        if raw.get("id") != rule.id:
            raise PolicyError(f"rule {raw.get('id')!r}: its id is not that of its content ({rule.id})")
        return rule


def valid_rule_id(text: str) -> bool:
    return isinstance(text, str) and bool(_RULE_ID.fullmatch(text))


# -- members and compilation -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Member:
    """One endpoint of the network, on any host (from its peer record)."""
    endpoint_id: str
    ip: str  # bare IPv4 address, "" when none
    ip6: str  # bare IPv6 address, "" when none
    exposed: Tuple[Port, ...] = ()
    identity: Optional[Identity] = None
    host: str = ""


@dataclasses.dataclass(frozen=True)
class Elements:
    guarded: FrozenSet[str] = frozenset()
    exposed: FrozenSet[Tuple[str, str, int]] = frozenset()
    allow: FrozenSet[Tuple[str, str, str, int]] = frozenset()
    allow_all: FrozenSet[Tuple[str, str]] = frozenset()

    def size(self) -> int:
        return len(self.guarded) + len(self.exposed) + len(self.allow) + len(self.allow_all)


SETS = tuple(f.name for f in dataclasses.fields(Elements))
EMPTY = Elements()


@dataclasses.dataclass(frozen=True)
class Diff:
    """What to add to and remove from each set to go from one Elements to another (add and remove disjoint)."""
    add: Elements = EMPTY
    remove: Elements = EMPTY

    def empty(self) -> bool:
        return self.add.size() == 0 and self.remove.size() == 0


def diff(old: Elements, new: Elements) -> Diff:
    return Diff(add=Elements(**{s: getattr(new, s) - getattr(old, s) for s in SETS}),
                remove=Elements(**{s: getattr(old, s) - getattr(new, s) for s in SETS}))


def apply(elements: Elements, change: Diff) -> Elements:
    """elements with change made (what the kernel holds after it)."""
    return Elements(**{s: (getattr(elements, s) - getattr(change.remove, s)) | getattr(change.add, s) for s in SETS})


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise PolicyError(f"policy: {mode!r} is not a mode ({', '.join(MODES)})")


def _families(src: Member, dst: Member) -> Iterator[Tuple[str, str]]:
    if src.ip and dst.ip:
        yield src.ip, dst.ip
    if src.ip6 and dst.ip6:
        yield src.ip6, dst.ip6


def _pair(rule: Rule, src: Member, dst: Member) -> Iterator[Tuple[str, tuple]]:
    """The (set, element) pairs rule gives for traffic from src to the local member dst."""
    for saddr, daddr in _families(src, dst):
        if not rule.ports:
            yield "allow_all", (saddr, daddr)
        for port in rule.ports:
            yield "allow", (saddr, daddr, port.proto, port.port)


def _local(mode: str, dst: Member) -> Iterator[Tuple[str, object]]:
    """The (set, element) pairs a local member gives by itself: its addresses guarded, its exposed ports."""
    for daddr in filter(None, (dst.ip, dst.ip6)):
        yield "guarded", daddr
        if mode == "exposed":
            for port in dst.exposed:
                yield "exposed", (daddr, port.proto, port.port)


def compile(mode: str, rules: Iterable[Rule], members: Iterable[Member], local_ids: Iterable[str]) -> Elements:
    """The element sets for the local members (endpoint ids in local_ids) of a network in mode, from scratch.
    A pure function of its inputs. An open network guards nothing, whatever its rules."""
    _check_mode(mode)
    if mode == "open":
        return EMPTY
    members = list(members)
    local_set = set(local_ids)
    local = [m for m in members if m.endpoint_id in local_set]
    out: Dict[str, Set] = {s: set() for s in SETS}
    for dst in local:
        for name, element in _local(mode, dst):
            out[name].add(element)
    for rule in rules:
        dsts = [d for d in local if selects(rule.dest, d.identity)]
        if not dsts:
            continue
        for src in members:
            if selects(rule.source, src.identity):
                for dst in dsts:
                    for name, element in _pair(rule, src, dst):
                        out[name].add(element)
    return Elements(**{s: frozenset(v) for s, v in out.items()})


class _Index:
    """Members by what selects them, so a selector's members are found without a scan: O(matches)."""

    def __init__(self):
        self.all: Set[str] = set()
        self.by: Dict[Selector, Set[str]] = {}

    @staticmethod
    def _selectors(identity: Optional[Identity]) -> List[Selector]:
        if identity is None:
            return []  # only `any` selects it
        out = [Selector("label", k, v) for k, v in identity.labels.items()]
        if identity.service:
            out.append(Selector("service", "", identity.service))
        if identity.container:
            out.append(Selector("container", "", identity.container))
        return out

    def add(self, member: Member) -> None:
        self.all.add(member.endpoint_id)
        for selector in self._selectors(member.identity):
            self.by.setdefault(selector, set()).add(member.endpoint_id)

    def remove(self, member: Member) -> None:
        self.all.discard(member.endpoint_id)
        for selector in self._selectors(member.identity):
            ids = self.by.get(selector)
            if ids is not None:
                ids.discard(member.endpoint_id)
                if not ids:
                    del self.by[selector]

    def select(self, selector: Selector) -> Set[str]:
        return self.all if selector.kind == "any" else self.by.get(selector, set())


class PolicyState:
    """compile() kept up to date one event at a time: each call returns the Diff for the kernel (O(change)) and
    leaves `elements()` equal to compile() on the new inputs (tests/unit/test_policy_incremental.py proves it).

    Elements are counted, not just held: two members may share an address for a while (a stale record and its
    successor), and one going must not take an element the other still justifies."""

    def __init__(self, mode: str, rules: Iterable[Rule] = (), members: Iterable[Member] = (),
                 local_ids: Iterable[str] = ()):
        _check_mode(mode)
        self.mode = mode
        self.rules: Dict[str, Rule] = {}
        self.members: Dict[str, Member] = {}
        self.local: Set[str] = set()
        self._everyone = _Index()
        self._locals = _Index()
        self._count: Dict[str, Counter] = {s: Counter() for s in SETS}
        local_set = set(local_ids)
        for member in members:
            self.put_member(member, member.endpoint_id in local_set)
        for rule in rules:
            self.put_rule(rule)

    def elements(self) -> Elements:
        return Elements(**{s: frozenset(c) for s, c in self._count.items()})

    # -- the bookkeeping every event shares ------------------------------------------------------------------------
    def _change(self, touched: Dict[Tuple[str, object], bool], pairs: Iterable[Tuple[str, object]],
                step: int) -> None:
        """Count pairs up (step 1) or down (-1), noting each element's presence before its first change."""
        if self.mode == "open":
            return
        for name, element in pairs:
            counter = self._count[name]
            touched.setdefault((name, element), element in counter)
            counter[element] += step
            if counter[element] <= 0:
                del counter[element]

    def _diff(self, touched: Dict[Tuple[str, object], bool]) -> Diff:
        add: Dict[str, Set] = {s: set() for s in SETS}
        remove: Dict[str, Set] = {s: set() for s in SETS}
        for (name, element), before in touched.items():
            now = element in self._count[name]
            if now and not before:
                add[name].add(element)
            elif before and not now:
                remove[name].add(element)
        return Diff(add=Elements(**{s: frozenset(v) for s, v in add.items()}),
                    remove=Elements(**{s: frozenset(v) for s, v in remove.items()}))

    def _member_pairs(self, member: Member, is_local: bool) -> Iterator[Tuple[str, object]]:
        """Every (set, element) the member takes part in, as source or as local destination.
        As a source: rules (O(rules)) x the local destinations each selects (an index lookup).
        As a local destination: rules x the sources each selects (index): only what it is allowed from."""
        if is_local:
            yield from _local(self.mode, member)
        for rule in self.rules.values():
            if selects(rule.source, member.identity):
                for dst_id in self._locals.select(rule.dest):
                    if dst_id != member.endpoint_id:  # the pair with itself comes once, below
                        yield from _pair(rule, member, self.members[dst_id])
            if is_local and selects(rule.dest, member.identity):
                for src_id in self._everyone.select(rule.source):
                    if src_id != member.endpoint_id:
                        yield from _pair(rule, self.members[src_id], member)
                if selects(rule.source, member.identity):
                    yield from _pair(rule, member, member)

    def _rule_pairs(self, rule: Rule) -> Iterator[Tuple[str, object]]:
        dsts = self._locals.select(rule.dest)
        if not dsts:
            return
        for src_id in self._everyone.select(rule.source):
            src = self.members[src_id]
            for dst_id in dsts:
                yield from _pair(rule, src, self.members[dst_id])

    # -- events ----------------------------------------------------------------------------------------------------
    def put_member(self, member: Member, is_local: bool) -> Diff:
        """A member arrived, or changed (identity known at last, ports, addresses, moved here or away)."""
        touched: Dict[Tuple[str, object], bool] = {}
        self._drop(member.endpoint_id, touched)
        self.members[member.endpoint_id] = member
        self._everyone.add(member)
        if is_local:
            self.local.add(member.endpoint_id)
            self._locals.add(member)
        self._change(touched, self._member_pairs(member, is_local), +1)
        return self._diff(touched)

    def remove_member(self, endpoint_id: str) -> Diff:
        touched: Dict[Tuple[str, object], bool] = {}
        self._drop(endpoint_id, touched)
        return self._diff(touched)

    def _drop(self, endpoint_id: str, touched: Dict[Tuple[str, object], bool]) -> None:
        old = self.members.get(endpoint_id)
        if old is None:
            return
        was_local = endpoint_id in self.local
        # Counted down while it is still indexed, so that exactly the pairs counted up for it are found again.
        self._change(touched, list(self._member_pairs(old, was_local)), -1)
        del self.members[endpoint_id]
        self._everyone.remove(old)
        if was_local:
            self.local.discard(endpoint_id)
            self._locals.remove(old)

    def put_rule(self, rule: Rule) -> Diff:
        touched: Dict[Tuple[str, object], bool] = {}
        if rule.id not in self.rules:  # a rule's id is its content: the same id is the same rule
            self.rules[rule.id] = rule
            self._change(touched, self._rule_pairs(rule), +1)
        return self._diff(touched)

    def remove_rule(self, rule_id_: str) -> Diff:
        touched: Dict[Tuple[str, object], bool] = {}
        rule = self.rules.pop(rule_id_, None)
        if rule is not None:
            self._change(touched, self._rule_pairs(rule), -1)
        return self._diff(touched)
