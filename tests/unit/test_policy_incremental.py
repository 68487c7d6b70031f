"""PolicyState (the per-event path) against compile() (the reference): after any sequence of members arriving,
leaving, changing identity, ports or addresses, moving between hosts, and rules added and removed, its elements
equal compile() on the new inputs, and each event's Diff takes the previous elements exactly to the new ones.
Addresses come from a small pool so that two members share one (a stale record and its successor)."""

import dataclasses

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netdriver.policy import MODES, Identity, Member, PolicyState, Port, Rule, Selector, apply, compile, diff

NET = "ab" * 32
SERVICES = ("db", "web")
LABELS = (("role", "client"), ("role", "server"), ("tier", ""))
CONTAINERS = ("c1", "c2", "c3")

identities = st.one_of(st.none(), st.builds(
    Identity,
    container=st.sampled_from(CONTAINERS + ("",)),
    service=st.sampled_from(SERVICES + ("",)),
    labels=st.dictionaries(st.sampled_from(("role", "tier")), st.sampled_from(("client", "server", "")),
                           max_size=2)))
selectors = st.one_of(
    st.just(Selector("any")),
    st.builds(Selector, st.just("service"), st.just(""), st.sampled_from(SERVICES)),
    st.builds(lambda kv: Selector("label", *kv), st.sampled_from(LABELS)),
    st.builds(Selector, st.just("container"), st.just(""), st.sampled_from(CONTAINERS)))
ports = st.lists(st.builds(Port, st.sampled_from(("tcp", "udp", "sctp")), st.sampled_from((53, 80, 5432))),
                 max_size=2)
rules = st.builds(lambda s, d, p: Rule.make(NET, s, d, p), selectors, selectors, ports)
ENDPOINTS = tuple(c * 64 for c in "0123456")
members = st.builds(
    Member, endpoint_id=st.sampled_from(ENDPOINTS),
    ip=st.sampled_from(("", "10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4")),
    ip6=st.sampled_from(("", "fd00::1", "fd00::2", "fd00::3")),
    exposed=ports.map(tuple), identity=identities, host=st.sampled_from(("h1", "h2")))
events = st.lists(st.one_of(
    st.tuples(st.just("put_member"), members, st.booleans()),
    st.tuples(st.just("remove_member"), st.sampled_from(ENDPOINTS)),
    st.tuples(st.just("put_rule"), rules),
    st.tuples(st.just("remove_rule"), st.integers(0, 7))), max_size=30)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mode=st.sampled_from(MODES), start_members=st.lists(members, max_size=5),
       start_rules=st.lists(rules, max_size=4), local_flags=st.lists(st.booleans(), min_size=7, max_size=7),
       events=events)
def test_each_event_keeps_the_elements_equal_to_compile(mode, start_members, start_rules, local_flags, events):
    # The starting point, as start-up builds it (one record per endpoint: the last one read wins).
    by_id = {m.endpoint_id: m for m in start_members}
    local = {e for e, flag in zip(ENDPOINTS, local_flags) if flag and e in by_id}
    rule_set = {r.id: r for r in start_rules}
    state = PolicyState(mode, rule_set.values(), by_id.values(), local)
    assert state.elements() == compile(mode, rule_set.values(), by_id.values(), local)
    for event in events:
        before = state.elements()
        if event[0] == "put_member":
            _, member, is_local = event
            by_id[member.endpoint_id] = member
            (local.add if is_local else local.discard)(member.endpoint_id)
            change = state.put_member(member, is_local)
        elif event[0] == "remove_member":
            by_id.pop(event[1], None)
            local.discard(event[1])
            change = state.remove_member(event[1])
        elif event[0] == "put_rule":
            rule_set[event[1].id] = event[1]
            change = state.put_rule(event[1])
        else:
            known = sorted(rule_set)
            gone = known[event[1] % len(known)] if known else "000000000000"
            rule_set.pop(gone, None)
            change = state.remove_rule(gone)
        want = compile(mode, rule_set.values(), by_id.values(), local)
        assert state.elements() == want
        assert change == diff(before, want)  # exactly the difference: nothing re-added, nothing missed
        assert apply(before, change) == want


def test_a_shared_address_stays_while_one_of_its_members_remains():
    """The case counting exists for: two records with one address, one goes, the address stays guarded."""
    old = Member("1" * 64, "10.0.0.9", "", (), Identity("db.1", "db", {}), "h1")
    new = dataclasses.replace(old, endpoint_id="2" * 64)
    client = Member("3" * 64, "10.0.0.2", "", (), Identity("c", "", {"role": "client"}), "h2")
    rule = Rule.make(NET, Selector("label", "role", "client"), Selector("service", "", "db"), [Port("tcp", 5432)])
    state = PolicyState("deny", [rule], [old, new, client], {old.endpoint_id, new.endpoint_id})
    change = state.remove_member(old.endpoint_id)
    assert change.empty()
    assert state.elements().guarded == {"10.0.0.9"}
    assert state.elements().allow == {("10.0.0.2", "10.0.0.9", "tcp", 5432)}
    change = state.remove_member(new.endpoint_id)
    assert change.remove.guarded == {"10.0.0.9"} and change.remove.allow == {("10.0.0.2", "10.0.0.9", "tcp", 5432)}
    assert state.elements().size() == 0


def test_an_identity_becoming_known_adds_only_its_own_elements():
    """The fail-closed window: a member with no identity is selected only by `any`; once known, one event adds
    the elements its identity earns, and nothing else changes."""
    rule = Rule.make(NET, Selector("label", "role", "client"), Selector("service", "", "db"), [Port("tcp", 5432)])
    db = Member("1" * 64, "10.0.0.4", "fd00::4", (), Identity("db.1", "db", {}), "h1")
    others = [Member(f"{i:064x}", f"10.0.1.{i}", "", (), Identity(f"o{i}", "", {}), "h2") for i in range(2, 50)]
    client = Member("f" * 64, "10.0.0.2", "fd00::2", (), None, "h2")
    state = PolicyState("deny", [rule], [db, client, *others], {db.endpoint_id})
    assert state.elements().allow == frozenset()
    change = state.put_member(dataclasses.replace(client, identity=Identity("c", "", {"role": "client"})), False)
    assert change.add.allow == {("10.0.0.2", "10.0.0.4", "tcp", 5432), ("fd00::2", "fd00::4", "tcp", 5432)}
    assert change.remove.size() == 0 and change.add.size() == 2
