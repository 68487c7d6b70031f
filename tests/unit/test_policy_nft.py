"""netdriver/policy_nft.py's batches without a kernel: the rules per mode, the order that keeps counters exact and
established traffic cheap, the UDP records (a table of their own around the policy table: a reply marked before
it, a record made after it, never written, listed or compared by the plugin), validation that names the part, and
PolicyFirewall over a fake nftables that models the tables: a policy table made as the mode makes it is changed by
its elements only, one made otherwise is replaced, and the records' table is made only when missing (a restart
keeps the records). The kernel's verdicts are tests/kernel/test_policy_nft.py's."""

import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netdriver import policy_nft as pn
from netdriver.isolation import drop_reason
from netdriver.policy import Diff, Elements
from telemetry.metrics import DROP_REASONS
from tests.fakes import FakeNftables
from wire.errors import InvalidRequest

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
        # The first rule: a frame leaving for another host passes (that host's table judges it there).
        assert forward[0]["comment"] == pn.ACCEPT_TO_OTHER_HOSTS
        assert forward[0]["expr"] == [{"match": {"op": "==", "left": {"meta": {"key": "oifname"}},
                                                 "right": "vxlan0"}}, {"accept": None}]
        # Then TCP without (SYN and not ACK) passes; nothing else is looked at for those segments.
        assert forward[1]["comment"] == pn.ACCEPT_ESTABLISHED
        assert forward[1]["expr"] == [{"match": {"op": "!=", "left": {"&": [
            {"payload": {"protocol": "tcp", "field": "flags"}}, {"|": ["syn", "ack"]}]}, "right": "syn"}},
            {"accept": None}]
        # Then what passes unjudged, one direct rule per protocol (no verdict map, no chain per protocol), then
        # the pair's own rule without ports (one lookup decides an allowed pair), then the guarded test.
        assert [r["comment"] for r in forward[2:10]] == [
            pn.ACCEPT_UDP_REPLY, pn.ACCEPT_ICMP, pn.ACCEPT_ICMPV6, pn.ACCEPT_SCTP, "vxnet:policy-pass:allow-all-v4",
            "vxnet:policy-pass:allow-all-v6", pn.ACCEPT_UNGUARDED, pn.ACCEPT_UNGUARDED + "-v6"]
        assert not [r for r in forward if "vmap" in kinds(r)]
        assert set(chains(batch)) == {"forward", "allow-all", "allow", "exposed"}
        assert forward[-1]["comment"] == (pn.AUDIT if audit else pn.DROP)
        assert forward[-1]["expr"][1] == ({"accept": None} if audit else {"drop": None})
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


def table_rules(batch, table, chain):
    return [c["add"]["rule"] for c in batch if "rule" in c.get("add", {}) and c["add"]["rule"]["table"] == table
            and c["add"]["rule"]["chain"] == chain]


def test_the_udp_records_are_a_table_around_the_policy_table():
    """A reply is marked before the policy table (which passes the mark), a record made after it (so only what it
    did not drop), in a table the plugin never lists: nftables reads a table's every element to list its rules."""
    udp = pn.udp_batch()
    chains = {c["add"]["chain"]["name"]: c["add"]["chain"] for c in udp if "chain" in c.get("add", {})}
    assert {n: (c["hook"], c["prio"]) for n, c in chains.items()} == {"replies": ("forward", -5),
                                                                     "record": ("forward", 5)}
    assert -10 < chains["replies"]["prio"] < pn.PRIORITY < chains["record"]["prio"]  # all after anti-spoofing
    declared = {c["add"]["set"]["name"]: c["add"]["set"] for c in udp if "set" in c.get("add", {})}
    assert set(declared) == set(pn.FLOW_SETS)
    for name in pn.FLOW_SETS:
        assert declared[name]["timeout"] == pn.UDP_TIMEOUT == 120 and declared[name]["size"] == pn.UDP_SIZE
        assert declared[name]["flags"] == ["timeout"]
    assert not [c for c in udp if "element" in c.get("add", {})]
    assert not [r for c in ("replies", "record") for r in table_rules(udp, pn.UDP_TABLE, c)
                if {"accept", "drop", "jump", "goto"} & set(kinds(r))]  # no verdicts: the policy table decides
    for version, rule, record in zip((4, 6), table_rules(udp, pn.UDP_TABLE, "replies"),
                                     table_rules(udp, pn.UDP_TABLE, "record")):
        looked_up = rule["expr"][0]["match"]["left"]["concat"]
        refreshed = rule["expr"][1]["set"]["elem"]["concat"]
        recorded = record["expr"][-1]["set"]["elem"]["concat"]
        assert looked_up == refreshed == [recorded[1], recorded[0], recorded[3], recorded[2]]
        assert rule["expr"][0]["match"]["right"] == f"@udp{version}"
        assert rule["expr"][2] == {"mangle": {"key": {"meta": {"key": "mark"}}, "value": 0x7678}}
        # Recorded: UDP of this family that came in on a container's port (not the VXLAN device).
        assert record["expr"][:3] == [
            {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "udp"}},
            {"match": {"op": "==", "left": {"meta": {"key": "protocol"}}, "right": "ip" if version == 4 else "ip6"}},
            {"match": {"op": "!=", "left": {"meta": {"key": "iifname"}}, "right": "vxlan0"}}]
        assert record["expr"][-1]["set"]["op"] == "update" and len(record["expr"]) == 4
    # The policy table passes the mark, and has no UDP set of its own.
    batch = pn.replace_batch("exposed", True, SAMPLE)
    (reply,) = [r for r in rules(batch) if r["comment"] == pn.ACCEPT_UDP_REPLY]
    assert reply["expr"] == [{"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "udp"}},
                             {"match": {"op": "==", "left": {"meta": {"key": "mark"}}, "right": 0x7678}},
                             {"accept": None}]
    assert not [c for c in batch if "set" in c.get("add", {}) and c["add"]["set"]["name"] in pn.FLOW_SETS]
    assert {c["add"]["rule"]["table"] for c in batch if "rule" in c.get("add", {})} == {pn.TABLE}


def test_what_passes_unjudged_per_protocol():
    batch = pn.replace_batch("deny", False, SAMPLE)
    by_comment = {r["comment"]: r for r in rules(batch)}
    sctp = by_comment[pn.ACCEPT_SCTP]
    assert sctp["expr"][0]["match"] == {"op": "!=", "left": {"payload": {"protocol": "sctp", "field": "vtag"}},
                                        "right": 0}
    icmp, icmpv6 = by_comment[pn.ACCEPT_ICMP], by_comment[pn.ACCEPT_ICMPV6]
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
        assert [kinds(r) for r in rules(batch, chain)] == [["limit", "log"], ["counter", "accept"]]


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
    assert set(shape[1]) == set(pn.SETS)


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


def test_a_table_in_place_is_changed_by_its_elements_and_the_udp_records_are_kept():
    nft, fw, calls = firewall()
    fw.ensure_policy("vxnet-a", "deny", False, SAMPLE)
    assert writes(calls) == ["policy tables (deny) in vxnet-a"]  # both, in one transaction
    nft.record(UDP4, "udp4")  # the packet path records a datagram
    calls.clear()
    fw.ensure_policy("vxnet-a", "deny", False, SAMPLE)  # a restart, a repair, a namespace made up again
    assert writes(calls) == []  # the same: nothing written
    # What is read: the chains (the records' table by its chains alone) and the policy table; never the records'
    # table's sets or rules.
    assert [(what, verbs) for what, _terse, verbs in calls] == [("read the chains in vxnet-a", ["list"]),
                                                                ("read the policy table in vxnet-a", ["list"])]
    assert fw.counters("vxnet-a") and calls[-1][1] is True  # the counters: listed terse
    smaller = dataclasses.replace(SAMPLE, guarded=frozenset({"10.0.0.2"}), allow=frozenset())
    calls.clear()
    fw.ensure_policy("vxnet-a", "deny", False, smaller)
    assert writes(calls) == ["policy elements in vxnet-a"]
    sets = nft.sets("bridge", "vxnet_policy")
    assert sets["guarded4"] == ['"10.0.0.2"'] and sets["guarded6"] == [] and sets["allow4"] == []
    assert fw.policy_drift("vxnet-a", "deny", False, smaller) is None
    # Another verdict (audit) is another policy table, replaced whole; the records' table is left alone.
    fw.ensure_policy("vxnet-a", "deny", True, smaller)
    assert fw.policy_drift("vxnet-a", "deny", True, smaller) is None
    assert nft.sets("bridge", "vxnet_policy_udp")["udp4"] == [json.dumps(UDP4, sort_keys=True)]  # kept throughout


def test_a_lost_records_table_is_made_again_and_the_policy_table_left():
    nft, fw, calls = firewall()
    fw.ensure_policy("vxnet-a", "deny", False, SAMPLE)
    nft("vxnet-a", [{"delete": {"table": {"family": "bridge", "name": "vxnet_policy_udp"}}}], "someone")
    assert fw.policy_drift("vxnet-a", "deny", False, SAMPLE) == "UDP records table missing or made otherwise"
    calls.clear()
    fw.ensure_policy("vxnet-a", "deny", False, SAMPLE)
    assert writes(calls) == ["policy elements in vxnet-a"]  # the records' table, and no element change
    assert fw.policy_drift("vxnet-a", "deny", False, SAMPLE) is None


def test_drift_names_what_differs_and_ignores_the_udp_records():
    nft, fw, _ = firewall()
    assert fw.policy_drift("vxnet-a", "open", False, SAMPLE) is None
    assert fw.policy_drift("vxnet-a", "deny", False, SAMPLE) == \
        "UDP records table missing or made otherwise; table missing"
    assert fw.counters("vxnet-a") == {}
    fw.ensure_policy("vxnet-a", "exposed", False, SAMPLE)
    nft.record(UDP4, "udp4")
    assert fw.policy_drift("vxnet-a", "exposed", False, SAMPLE) is None
    assert "exposed-v4" in fw.policy_drift("vxnet-a", "deny", False, SAMPLE)  # the rules differ
    assert fw.policy_drift("vxnet-a", "exposed", False, dataclasses.replace(SAMPLE, guarded=frozenset())) == \
        "set guarded4 has extra 10.0.0.2; set guarded6 has extra fd00::2"
    assert fw.policy_drift("vxnet-a", "open", False, SAMPLE) == "policy table present on an open network"
    assert pn.DROP in fw.counters("vxnet-a")
    nft("vxnet-a", [{"delete": {"table": {"family": "bridge", "name": "vxnet_policy"}}}], "someone")
    assert fw.policy_drift("vxnet-a", "open", False, SAMPLE) == "UDP records table present on an open network"


def test_removal_takes_both_tables_and_a_leftover_of_the_br_netfilter_design():
    nft, fw, _ = firewall()
    nft("vxnet-a", [{"add": {"table": {"family": "inet", "name": "vxnet_policy"}}}], "an earlier vxnet's table")
    fw.ensure_policy("vxnet-a", "deny", False, SAMPLE)
    # Made: the inet one went in the same transaction.
    assert set(nft.tables) == {("bridge", "vxnet_policy"), ("bridge", "vxnet_policy_udp")}
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


def test_drops_and_audit_are_logged_at_once_and_allowed_connections_in_the_readers_batch():
    """queue-threshold 1 sends a record alone, now; without it the record waits for kernel/nflog.py's batch
    (the instance's threshold, buffer or 0.25 s flush timer), so an allowed connection does not wake the reader."""
    for audit in (False, True):
        batch = pn.replace_batch("exposed", audit, SAMPLE)
        logs = {c["add"]["rule"]["comment"]: e["log"] for c in batch if "rule" in c.get("add", {})
                for e in c["add"]["rule"]["expr"] if "log" in e}
        verdict = "vxnet:policy-log:audit" if audit else "vxnet:policy-log:drop"
        assert logs[verdict]["queue-threshold"] == 1
        allowed = {c: log for c, log in logs.items() if log["prefix"].startswith(pn.LOG_ALLOW)}
        assert sorted(allowed) == ["vxnet:policy-log:allow", "vxnet:policy-log:allow-all", "vxnet:policy-log:exposed"]
        assert all("queue-threshold" not in log for log in allowed.values())
