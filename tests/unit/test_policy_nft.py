"""netdriver/policy_nft.py's batches without a kernel: the rules per mode, the order that keeps counters exact and
established traffic cheap, the UDP records (made only where a judgment accepted, never written or compared by the
plugin), validation that names the part, and PolicyFirewall over a fake nftables that models the tables: a table
made as the mode makes it is changed by its elements only (a restart keeps the UDP records), one made otherwise is
replaced. The kernel's verdicts are tests/kernel/test_policy_nft.py's."""

import dataclasses
import json
from typing import FrozenSet

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netdriver import policy_nft as pn
from netdriver.isolation import drop_reason
from telemetry.metrics import DROP_REASONS
from tests.fakes import FakeNftables
from wire.errors import InvalidRequest


@dataclasses.dataclass(frozen=True)
class Elements:
    """Stand-in for netdriver/policy.py's Elements (same field names and shapes) until that module is on main."""
    guarded: FrozenSet = frozenset()
    exposed: FrozenSet = frozenset()
    allow: FrozenSet = frozenset()
    allow_all: FrozenSet = frozenset()


@dataclasses.dataclass(frozen=True)
class Diff:
    add: Elements = Elements()
    remove: Elements = Elements()


SAMPLE = Elements(guarded=frozenset({"10.0.0.2", "fd00::2"}),
                  exposed=frozenset({("10.0.0.2", "tcp", 80), ("fd00::2", "udp", 53)}),
                  allow=frozenset({("10.0.0.1", "10.0.0.2", "tcp", 5432), ("fd00::1", "fd00::2", "sctp", 9)}),
                  allow_all=frozenset({("10.0.0.3", "10.0.0.2"), ("fd00::3", "fd00::2")}))


def rules(batch, chain="forward"):
    return [c["add"]["rule"] for c in batch if "rule" in c.get("add", {}) and c["add"]["rule"]["chain"] == chain]


def kinds(rule):
    return [next(iter(e)) for e in rule["expr"]]


def chains(batch):
    return {c["add"]["chain"]["name"]: c["add"]["chain"] for c in batch if "chain" in c.get("add", {})}


def test_established_tcp_first_then_the_protocols_then_the_verdict_last_in_each_mode():
    for mode, audit in (("deny", False), ("exposed", False), ("deny", True), ("exposed", True)):
        batch = pn.replace_batch(mode, audit, SAMPLE)
        forward = rules(batch)
        assert chains(batch)["forward"]["hook"] == "forward" and chains(batch)["forward"]["prio"] == 0
        # The first rule: TCP without (SYN and not ACK) passes; nothing else is looked at for those segments.
        assert forward[0]["comment"] == pn.ACCEPT_ESTABLISHED
        assert forward[0]["expr"] == [{"match": {"op": "!=", "left": {"&": [
            {"payload": {"protocol": "tcp", "field": "flags"}}, {"|": ["syn", "ack"]}]}, "right": "syn"}},
            {"accept": None}]
        vmap = forward[1]["expr"][0]["vmap"]
        assert vmap["key"] == {"meta": {"key": "l4proto"}}
        assert {k: v["jump"]["target"] for k, v in vmap["data"]["set"]} == {
            "udp": "udp-reply", "sctp": "sctp-association", "icmp": "icmp-pass", "ipv6-icmp": "icmpv6-pass"}
        assert forward[-1]["comment"] == (pn.AUDIT if audit else pn.DROP)
        assert forward[-1]["expr"][1] == ({"goto": {"target": "accepted"}} if audit else {"drop": None})
        assert kinds(forward[-2]) == ["limit", "log"]
        # A later fragment and what is not IP pass only after every lookup: allowed packets never pay for them.
        assert [r["comment"] for r in forward[-5:-2]] == [pn.ACCEPT_NOT_IP, pn.ACCEPT_FRAGMENT,
                                                          pn.ACCEPT_FRAGMENT + "-v6"]
        jumps = [r["comment"] for r in forward if "jump" in kinds(r)]
        exposed = [c for c in jumps if "exposed" in c]
        assert exposed == (["vxnet:policy-pass:exposed-v4", "vxnet:policy-pass:exposed-v6"] if mode == "exposed"
                           else [])
        assert len(jumps) - len(exposed) == 4  # allow-all and allow, per family


def test_the_rules_do_not_grow_with_the_elements():
    """Sets and one verdict map: the same rules for 200 members and a few thousand allows as for none."""
    many = Elements(guarded=frozenset(f"10.1.{i // 250}.{i % 250 + 1}" for i in range(200)),
                    allow=frozenset((f"10.1.0.{i % 250 + 1}", "10.1.0.1", "tcp", 1000 + i) for i in range(3000)))
    for mode in ("deny", "exposed"):
        small, big = pn.replace_batch(mode, False, Elements()), pn.replace_batch(mode, False, many)
        assert [c for c in small if "element" not in c.get("add", {})] == \
            [c for c in big if "element" not in c.get("add", {})]


def test_every_accepting_judgment_goes_through_the_chain_that_records_udp():
    batch = pn.replace_batch("exposed", True, SAMPLE)
    accepted = rules(batch, "accepted")
    # The records first, each a rule without a verdict (a full set ends only that rule), then the accept.
    assert [r["comment"] for r in accepted] == [pn.RECORD_UDP, pn.RECORD_UDP + "-v6", pn.ACCEPTED]
    for rule, ip, version in ((accepted[0], "ip", 4), (accepted[1], "ip6", 6)):
        assert rule["expr"][:2] == [
            {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "udp"}},
            {"match": {"op": "==", "left": {"payload": {"protocol": ip, "field": "saddr"}},
                       "right": f"@guarded{version}"}}]  # a local member's datagram only
        assert rule["expr"][2]["set"]["op"] == "update" and len(rule["expr"]) == 3
    assert accepted[2]["expr"] == [{"accept": None}]
    # Every other way to accept a judged packet goes there: unguarded destinations, the three allows, audit,
    # and a UDP reply (so a local member's reply is recorded in turn).
    gotos = [r["comment"] for c in ("forward", "udp-reply", "allow-all", "allow", "exposed") for r in rules(batch, c)
             if {"goto": {"target": "accepted"}} in r["expr"]]
    assert sorted(gotos) == sorted([pn.ACCEPT_UNGUARDED, pn.ACCEPT_UNGUARDED + "-v6", pn.AUDIT,
                                    pn.ACCEPT_UDP_REPLY, pn.ACCEPT_UDP_REPLY + "-v6",
                                    "vxnet:policy-allowed:allow-all", "vxnet:policy-allowed:allow",
                                    "vxnet:policy-allowed:exposed"])
    assert not [r for c in ("allow-all", "allow", "exposed") for r in rules(batch, c) if "accept" in kinds(r)]


def test_a_udp_reply_is_looked_up_by_the_reverse_of_the_recorded_key():
    batch = pn.replace_batch("deny", False, SAMPLE)
    for rule, version in zip(rules(batch, "udp-reply"), (4, 6)):
        looked_up = rule["expr"][0]["match"]["left"]["concat"]
        refreshed = rule["expr"][1]["set"]["elem"]["concat"]
        recorded = rules(batch, "accepted")[version // 6]["expr"][2]["set"]["elem"]["concat"]
        assert looked_up == refreshed == [recorded[1], recorded[0], recorded[3], recorded[2]]
        assert rule["expr"][0]["match"]["right"] == f"@udp{version}" and rule["expr"][2] == {
            "goto": {"target": "accepted"}}
    declared = {c["add"]["set"]["name"]: c["add"]["set"] for c in batch if "set" in c.get("add", {})}
    for name in pn.FLOW_SETS:
        assert declared[name]["timeout"] == pn.UDP_TIMEOUT == 120 and declared[name]["size"] == pn.UDP_SIZE
        assert "timeout" in declared[name]["flags"]
    assert not [c for c in batch if "element" in c.get("add", {}) and c["add"]["element"]["name"] in pn.FLOW_SETS]


def test_what_passes_unjudged_per_protocol():
    batch = pn.replace_batch("deny", False, SAMPLE)
    (sctp,) = rules(batch, "sctp-association")
    assert sctp["expr"][0]["match"] == {"op": "!=", "left": {"payload": {"protocol": "sctp", "field": "vtag"}},
                                        "right": 0}
    (icmp,) = rules(batch, "icmp-pass")
    (icmpv6,) = rules(batch, "icmpv6-pass")
    assert "echo-request" not in icmp["expr"][0]["match"]["right"]["set"]
    assert set(icmpv6["expr"][0]["match"]["right"]["set"]) == {
        "echo-reply", "destination-unreachable", "packet-too-big", "time-exceeded", "parameter-problem",
        "nd-neighbor-solicit", "nd-neighbor-advert"}
    assert {c["add"]["table"]["family"] for c in batch if "table" in c.get("add", {})} == {"bridge", "inet"}
    assert [c["delete"]["table"]["family"] for c in batch if "delete" in c] == ["inet", "bridge"]


def test_a_limit_never_shares_a_rule_with_a_counter_or_a_verdict():
    """An nft limit over its rate ends its rule: a counter or verdict after it would miss packets."""
    batch = pn.replace_batch("exposed", False, SAMPLE)
    for command in batch:
        rule = command.get("add", {}).get("rule")
        if rule and "limit" in kinds(rule):
            assert kinds(rule) == ["limit", "log"]
            assert rule["expr"][1]["log"]["group"] == 0x7678
    for chain in ("allow-all", "allow", "exposed"):
        assert [kinds(r) for r in rules(batch, chain)] == [["limit", "log"], ["counter", "goto"]]


def test_every_logged_prefix_has_an_exact_counter():
    batch = pn.replace_batch("exposed", False, SAMPLE) + pn.replace_batch("deny", True, SAMPLE)
    prefixes = {c["add"]["rule"]["expr"][1]["log"]["prefix"] for c in batch
                if "rule" in c.get("add", {}) and "log" in kinds(c["add"]["rule"])}
    comments = {c["add"]["rule"]["comment"] for c in batch if "rule" in c.get("add", {})}
    assert prefixes == set(pn.LOGGED)
    assert {pn.LOGGED[p] for p in prefixes} <= comments


def test_verdict_of_a_prefix():
    assert [pn.verdict(p) for p in sorted(pn.LOGGED)] == ["allowed", "allowed", "allowed", "audit", "dropped"]
    assert pn.verdict("vxnet:allow:other") is None and pn.verdict("") is None


def test_elements_go_to_the_set_of_their_family():
    got = pn.set_elements(SAMPLE)
    assert got["guarded4"] == ["10.0.0.2"] and got["guarded6"] == ["fd00::2"]
    assert got["allow4"] == [{"concat": ["10.0.0.1", "10.0.0.2", "tcp", 5432]}]
    assert got["allow6"] == [{"concat": ["fd00::1", "fd00::2", "sctp", 9]}]
    assert got["exposed6"] == [{"concat": ["fd00::2", "udp", 53]}]
    assert got["allow_all4"] == [{"concat": ["10.0.0.3", "10.0.0.2"]}]


def test_addresses_are_canonical():
    got = pn.set_elements(Elements(guarded=frozenset({"FD00:0::0002"})))
    assert got["guarded6"] == ["fd00::2"]


@pytest.mark.parametrize("elements, words", [
    (Elements(guarded=frozenset({"10.0.0.300"})), "guarded: '10.0.0.300' is not an IPv4 or IPv6 address"),
    (Elements(guarded=frozenset({"10.0.0.0/24"})), "guarded"),
    (Elements(exposed=frozenset({("10.0.0.2", "icmp", 80)})), "exposed: protocol 'icmp'"),
    (Elements(exposed=frozenset({("10.0.0.2", "tcp", 0)})), "exposed: port 0"),
    (Elements(exposed=frozenset({("10.0.0.2", "tcp", 65536)})), "exposed: port 65536"),
    (Elements(exposed=frozenset({("10.0.0.2", "tcp", True)})), "exposed: port True"),
    (Elements(allow=frozenset({("10.0.0.1", "fd00::2", "tcp", 1)})), "different IP versions"),
    (Elements(allow=frozenset({("x; drop", "10.0.0.2", "tcp", 1)})), "allow source"),
    (Elements(allow_all=frozenset({("10.0.0.1", "10.0.0.2\n")})), "allow_all destination"),
])
def test_bad_elements_are_refused_naming_the_part(elements, words):
    with pytest.raises(InvalidRequest, match=words.replace("(", r"\(")):
        pn.replace_batch("deny", False, elements)


def test_bad_mode_and_rate_are_refused():
    with pytest.raises(InvalidRequest, match="policy mode 'open'"):
        pn.replace_batch("open", False, SAMPLE)
    with pytest.raises(InvalidRequest, match="log rate 0"):
        pn.replace_batch("deny", False, SAMPLE, log_rate=0)
    with pytest.raises(InvalidRequest, match="policy mode 'closed'"):
        pn.PolicyFirewall(None).ensure_policy("ns", "closed", False, SAMPLE)


def test_update_adds_then_deletes_removed_elements_in_one_batch():
    diff = Diff(add=Elements(allow=frozenset({("10.0.0.5", "10.0.0.2", "tcp", 22)})),
                remove=Elements(guarded=frozenset({"fd00::9"})))
    batch = pn.update_batch(diff)
    ops = [(next(iter(c)), c[next(iter(c))]["element"]["name"]) for c in batch]
    assert ops == [("add", "allow4"), ("add", "guarded6"), ("delete", "guarded6")]
    assert pn.update_batch(Diff()) == []


def test_comments_count_drops_for_reason_policy_only_when_they_drop():
    assert "policy" in DROP_REASONS
    assert drop_reason(pn.DROP) == "policy"
    for comment in (pn.AUDIT, pn.ACCEPT_ESTABLISHED, pn.ACCEPT_UNGUARDED, "vxnet:policy-allowed:allow",
                    "vxnet:policy-log:drop"):
        assert drop_reason(comment) is None


@settings(deadline=None)  # the machine is shared: a slow example is not a failure
@given(st.frozensets(st.ip_addresses(v=4).map(str), max_size=5),
       st.frozensets(st.tuples(st.ip_addresses(v=6).map(str), st.sampled_from(pn.PROTOCOLS),
                               st.integers(1, 65535)), max_size=5))
def test_the_shape_of_a_batch_is_what_it_lists(guarded, exposed):
    """batch_shape reduces elements to the text `nft list` prints (the drift check compares the two)."""
    batch = pn.replace_batch("exposed", False, Elements(guarded=guarded, exposed=exposed))
    shape = pn.batch_shape(batch, pn.shape_text)
    assert shape[1]["guarded4"] == frozenset(guarded)
    assert shape[1]["exposed6"] == frozenset(f"{a} . {p} . {n}" for a, p, n in exposed)
    assert set(shape[1]) == set(pn.SETS) | set(pn.FLOW_SETS)


def firewall(**kwargs):
    nft = FakeNftables()
    calls = []

    def apply(ns, commands, what, terse=False):
        calls.append((what, terse, [next(iter(c)) for c in commands]))
        return nft(ns, commands, what, terse)

    return nft, pn.PolicyFirewall(apply, **kwargs), calls


def writes(calls):
    return [what for what, _terse, verbs in calls if set(verbs) != {"list"}]


UDP4 = {"concat": ["10.0.0.2", "10.0.0.9", 40000, 53]}


def test_a_table_in_place_is_changed_by_its_elements_and_keeps_its_udp_records():
    nft, fw, calls = firewall()
    fw.ensure_policy("vxnet-a", "deny", False, SAMPLE)
    assert writes(calls) == ["policy table (deny) in vxnet-a"]
    nft.record(UDP4, "udp4")  # the packet path records a datagram
    calls.clear()
    fw.ensure_policy("vxnet-a", "deny", False, SAMPLE)  # a restart, a repair, a namespace made up again
    assert writes(calls) == []  # the same: nothing written
    # The listings never read the UDP records: the table terse, the plugin's sets one by one.
    assert [(terse, verbs) for _what, terse, verbs in calls] == [(True, ["list"])] + [(False, ["list"])] * 8
    smaller = dataclasses.replace(SAMPLE, guarded=frozenset({"10.0.0.2"}), allow=frozenset())
    calls.clear()
    fw.ensure_policy("vxnet-a", "deny", False, smaller)
    assert writes(calls) == ["policy elements in vxnet-a"]
    sets = nft.sets("bridge", "vxnet_policy")
    assert sets["udp4"] == [json.dumps(UDP4, sort_keys=True)]  # kept
    assert sets["guarded4"] == ['"10.0.0.2"'] and sets["guarded6"] == [] and sets["allow4"] == []
    assert fw.policy_drift("vxnet-a", "deny", False, smaller) is None  # the records are not compared
    # Another verdict (audit) is another table: replaced whole, records gone.
    fw.ensure_policy("vxnet-a", "deny", True, smaller)
    assert nft.sets("bridge", "vxnet_policy")["udp4"] == []
    assert fw.policy_drift("vxnet-a", "deny", True, smaller) is None


def test_drift_names_what_differs_and_ignores_the_udp_records():
    nft, fw, _ = firewall()
    assert fw.policy_drift("vxnet-a", "open", False, SAMPLE) is None
    assert fw.policy_drift("vxnet-a", "deny", False, SAMPLE) == "table missing"
    assert fw.counters("vxnet-a") == {}
    fw.ensure_policy("vxnet-a", "exposed", False, SAMPLE)
    nft.record(UDP4, "udp4")
    assert fw.policy_drift("vxnet-a", "exposed", False, SAMPLE) is None
    assert "exposed-v4" in fw.policy_drift("vxnet-a", "deny", False, SAMPLE)  # the rules differ
    assert fw.policy_drift("vxnet-a", "exposed", False, dataclasses.replace(SAMPLE, guarded=frozenset())) == \
        "set guarded4 has extra 10.0.0.2; set guarded6 has extra fd00::2"
    assert fw.policy_drift("vxnet-a", "open", False, SAMPLE) == "policy table present on an open network"
    assert pn.DROP in fw.counters("vxnet-a")


def test_removal_takes_the_table_and_a_leftover_of_the_br_netfilter_design():
    nft, fw, _ = firewall()
    nft("vxnet-a", [{"add": {"table": {"family": "inet", "name": "vxnet_policy"}}}], "an earlier vxnet's table")
    fw.ensure_policy("vxnet-a", "deny", False, SAMPLE)
    assert set(nft.tables) == {("bridge", "vxnet_policy")}  # made: the inet one went in the same transaction
    fw.remove_policy("vxnet-a")
    fw.remove_policy("vxnet-a")  # a replay is no error
    assert nft.tables == {}
    fw.ensure_policy("vxnet-a", "deny", False, SAMPLE)
    fw.ensure_policy("vxnet-a", "open", False, SAMPLE)  # open: the same as remove
    assert nft.tables == {}


def test_bad_input_reaches_neither_read_nor_write():
    nft, fw, calls = firewall()
    with pytest.raises(InvalidRequest, match="guarded: '10.0.0.300'"):
        fw.ensure_policy("vxnet-a", "deny", False, Elements(guarded=frozenset({"10.0.0.300"})))
    assert calls == [] and nft.tables == {}


def test_a_list_answer_of_several_documents_is_read_whole():
    """nft prints one JSON document per list command."""
    one = {"nftables": [{"set": {"name": "guarded4", "elem": ["10.0.0.2"]}}]}
    two = {"nftables": [{"set": {"name": "allow4", "elem": [{"concat": ["10.0.0.1", "10.0.0.2", 6, 80]}]}}]}
    got = pn.listed_elements(json.dumps(one) + "\n" + json.dumps(two) + "\n")
    assert {n: set(e) for n, e in got.items()} == {"guarded4": {"10.0.0.2"},
                                                   "allow4": {"10.0.0.1 . 10.0.0.2 . tcp . 80"}}
