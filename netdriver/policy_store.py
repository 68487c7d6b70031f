"""Policy rules in etcd: policy/<segment>/<rule> -> Rule JSON (netdriver/policy.py; store/schema.py builds the
keys), written by `vxnet policy`, watched by every plugin (PolicyWatcher, the same full-read-then-watch loop as
the peer watch in netdriver/watcher.py).

Rules are the segment's (netdriver/store.py segment_of): standalone networks joined with `-o overlay=NAME` have
a network ID per host, and a rule given on one host is in force on all of them. A rule is written only while a
network of the segment is known to vxnet (a network record, or the Swarm manager's hold on it before any task
has run: members/<segment>/@swarm), and in a transaction that compares the key that proved it: a network
deleted meanwhile takes the write down with it, and a write after the delete is refused. The segment's last
network record takes its rules with it in one transaction (netdriver/store.py delete_network), and releasing
the segment removes them again (a replay, or a delete that stopped in between): no rule outlives its segment.
"""

import dataclasses
import logging
from typing import List, Optional, Protocol, Tuple

from netdriver.models import Network
from netdriver.policy import PolicyError, Rule, valid_rule_id
from netdriver.store import segment_of
from store import schema
from store.kv import KV, WatchableKV
from store.schema import SWARM_HOLDER
from store.watchloop import WatchLoop
from wire import protocol
from wire.errors import Conflict, InvalidRequest

log = logging.getLogger(__name__)

_RETRIES = 16


def short(segment: str) -> str:
    """A segment as messages show it: a network ID's first 12 characters (as `docker network ls`), overlay-NAME
    whole."""
    return segment if segment.startswith("overlay-") else segment[:12]


class UnknownNetwork(InvalidRequest):
    """The network is not one vxnet's etcd knows."""


class UnknownRule(InvalidRequest):
    """No rule of that id on that network."""


@dataclasses.dataclass(frozen=True)
class NetworkRef:
    """A network vxnet knows: its record (None while only the Swarm manager holds it), its segment (where its
    rules are), and the key and mod_revision that prove it exists (compared by every rule write)."""
    id: str
    record: Optional[Network]
    proof_key: str
    proof_revision: int
    segment: str = ""

    def __post_init__(self):
        if not self.segment:
            object.__setattr__(self, "segment", segment_of(self.id, self.record.overlay if self.record else None))


class PolicyStore:
    def __init__(self, kv: KV, prefix: str = schema.PREFIX):
        self.kv = kv
        self.keys = schema.Schema(prefix)

    # -- networks ----------------------------------------------------------------------------------------------
    def network_ids(self) -> List[str]:
        """Every network ID vxnet's etcd knows: records, and Swarm networks held by the manager."""
        entries, _ = self.kv.get_prefix(self.keys.prefix(schema.NETWORK))
        ids = {parts["network"] for parts in (self.keys.parse(schema.NETWORK, e.key) for e in entries) if parts}
        for network_id, _key, _rev, _segment in self._swarm_holds():
            ids.add(network_id)
        return sorted(i for i in ids if protocol.DOCKER_ID.fullmatch(i) or protocol.SWARM_ID.fullmatch(i))

    def _swarm_holds(self) -> List[Tuple[str, str, int, str]]:
        """(network ID, hold key, its mod_revision, segment) of each Swarm manager's hold."""
        entries, _ = self.kv.get_prefix(self.keys.prefix(schema.MEMBER))
        out = []
        for entry in entries:
            parts = self.keys.parse(schema.MEMBER, entry.key)
            if parts and parts["host"] == SWARM_HOLDER:
                out.append((str(entry.json().get("network_id", "")), entry.key, entry.mod_revision, parts["segment"]))
        return out

    def network(self, network_id: str) -> Optional[NetworkRef]:
        """The network if vxnet knows it, with the key proving it; None if not."""
        if not (protocol.DOCKER_ID.fullmatch(network_id) or protocol.SWARM_ID.fullmatch(network_id)):
            return None
        entry = self.kv.get(self.keys.network(network_id))
        if entry is not None:
            return NetworkRef(network_id, Network.from_json(entry.value), entry.key, entry.mod_revision)
        for held, key, revision, segment in self._swarm_holds():
            if held == network_id:
                return NetworkRef(network_id, None, key, revision, segment)
        return None

    def _require(self, network_id: str) -> NetworkRef:
        ref = self.network(network_id)
        if ref is None:
            raise UnknownNetwork(f"network {network_id[:12]} is not a vxnet network (etcd has no record of it)")
        return ref

    # -- rules -------------------------------------------------------------------------------------------------
    def put_rule(self, network_id: str, rule: Rule) -> bool:
        """Write rule, given on network network_id (of the rule's segment; the proof that the segment is in use),
        create-if-absent: True if written, False if the same rule was already there (a replay writes nothing).
        UnknownNetwork if the network is not known, or went while we wrote; InvalidRequest if the rule is not of
        the network's segment."""
        key = self.keys.policy_rule(rule.segment, rule.id)
        for _ in range(_RETRIES):
            ref = self._require(network_id)
            if ref.segment != rule.segment:
                raise InvalidRequest(f"rule {rule.id} is of segment {rule.segment}, network {network_id[:12]} of "
                                     f"{ref.segment}")
            if self.kv.get(key) is not None:
                return False
            if self.kv.commit(absent=[key], revisions={ref.proof_key: ref.proof_revision},
                              puts={key: rule.to_json()}):
                return True
        raise Conflict(f"could not write rule {rule.id} on network {network_id[:12]}: too much contention, "
                       f"try again")

    def delete_rule(self, segment: str, rule_id: str) -> Optional[Rule]:
        """Remove one rule of the segment; -> the rule removed (None if what the key held was not a readable
        rule: it goes all the same). UnknownRule if the segment has no rule of that id (so a typo in
        `vxnet policy rm` is an error, not a silent success)."""
        if not valid_rule_id(rule_id):
            raise UnknownRule(f"rule id {rule_id!r}: a rule id is 12 hex digits (as `vxnet policy ls` shows)")
        key = self.keys.policy_rule(segment, rule_id)
        entry = self.kv.get(key)
        if entry is None or not self.kv.commit(revisions={key: entry.mod_revision}, deletes=[key]):
            raise UnknownRule(f"network {short(segment)} has no rule {rule_id}")
        return self.decode(entry.key, entry.value)

    def list_rules(self, segment: str) -> List[Rule]:
        entries, _ = self.kv.get_prefix(self.keys.policy_rules(segment))
        return [r for r in (self.decode(e.key, e.value) for e in entries) if r is not None]

    def rules_prefix(self) -> str:
        return self.keys.prefix(schema.POLICY)

    def all_rules(self) -> Tuple[List[Rule], int]:
        """Every rule of every segment, and the revision they were read at."""
        entries, revision = self.kv.get_prefix(self.rules_prefix())
        return [r for r in (self.decode(e.key, e.value) for e in entries) if r is not None], revision

    def parse_rule_key(self, key: str) -> Optional[Tuple[str, str]]:
        return self.keys.policy_rule_of(key)

    def decode(self, key: str, value: str) -> Optional[Rule]:
        """A stored rule, or None (logged) if it is not one or not the rule its key names. Skipping it allows
        less, never more: fail closed."""
        try:
            rule = Rule.from_json(value)
        except PolicyError as exc:
            log.warning("ignoring etcd record %s: not a valid rule (%s); delete it", key, exc)
            return None
        if self.parse_rule_key(key) != (rule.segment, rule.id):
            log.warning("ignoring etcd record %s: it holds rule %s of segment %s", key, rule.id, short(rule.segment))
            return None
        return rule


class RuleSink(Protocol):
    """What PolicyWatcher feeds (the data-plane side keeps a PolicyState per local network)."""

    def resync(self, rules: List[Rule]) -> None:
        """Every rule in etcd: the whole desired set (rules not in it are gone)."""
        ...

    def put_rule(self, rule: Rule) -> None: ...

    def delete_rule(self, segment: str, rule_id: str) -> None: ...


class PolicyWatcher(WatchLoop):
    """A thread: etcd policy/ -> sink. `stop()` ends it; `kick()` forces a reconnect and full resync."""

    what = "policy watch"

    def __init__(self, kv: WatchableKV, store: PolicyStore, sink: RuleSink, max_backoff: float = 2.0):
        super().__init__(kv, max_backoff)
        self.store = store
        self.sink = sink

    def load(self):
        rules, revision = self.store.all_rules()
        self.sink.resync(rules)
        return self.store.rules_prefix(), revision

    def apply(self, event) -> bool:
        parsed = self.store.parse_rule_key(event.key)
        if parsed is None:
            return True
        segment, rule_id = parsed
        if event.kind == "put":
            rule = self.store.decode(event.key, event.value)
            if rule is None:
                self.sink.delete_rule(segment, rule_id)  # an unreadable rule allows nothing
            else:
                self.sink.put_rule(rule)
        else:
            self.sink.delete_rule(segment, rule_id)
        return True
