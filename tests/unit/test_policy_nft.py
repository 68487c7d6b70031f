"""netdriver/policy_nft.py's batches without a kernel: the rules per mode, the order that keeps counters exact and
established traffic cheap, validation that names the part, and the order of table and br_netfilter switch. The
kernel's verdicts are tests/kernel/test_policy_nft.py's."""

import dataclasses
from typing import FrozenSet

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netdriver import policy_nft as pn
from netdriver.isolation import drop_reason
from telemetry.metrics import DROP_REASONS
from wire.errors import InvalidRequest, KernelError


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


def test_established_first_then_the_verdict_last_in_each_mode():
    for mode, audit in (("deny", False), ("exposed", False), ("deny", True), ("exposed", True)):
        forward = rules(pn.replace_batch(mode, audit, SAMPLE))
        assert forward[0]["comment"] == pn.ACCEPT_ESTABLISHED
        assert forward[-1]["comment"] == (pn.AUDIT if audit else pn.DROP)
        assert kinds(forward[-1]) == ["counter", "accept" if audit else "drop"]
        assert kinds(forward[-2]) == ["limit", "log"]
        jumps = [r["comment"] for r in forward if "jump" in kinds(r)]
        exposed = [c for c in jumps if "exposed" in c]
        assert exposed == (["vxnet:policy-pass:exposed-v4", "vxnet:policy-pass:exposed-v6"] if mode == "exposed"
                           else [])
        assert len(jumps) - len(exposed) == 4  # allow-all and allow, per family


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
        pn.PolicyFirewall(None, None, None).ensure_policy("ns", "closed", False, SAMPLE)


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


class Recorder:
    def __init__(self, missing=False):
        self.calls = []
        self.missing = missing

    def apply(self, ns, commands, what):
        self.calls.append(("nft", ns, commands[0]))
        if self.missing and "list" in commands[0]:
            raise KernelError(f"{what}: No such file or directory")
        return ""

    def switch(self, ns, on):
        self.calls.append(("switch", ns, on))

    def read(self, ns):
        return (False, False)


def test_table_before_switch_on_and_switch_off_before_table_goes():
    rec = Recorder()
    fw = pn.PolicyFirewall(rec.apply, rec.switch, rec.read)
    fw.ensure_policy("vxnet-a", "deny", False, SAMPLE)
    assert [c[0] for c in rec.calls] == ["nft", "switch"] and rec.calls[1] == ("switch", "vxnet-a", True)
    rec.calls.clear()
    fw.remove_policy("vxnet-a")
    assert rec.calls[0] == ("switch", "vxnet-a", False) and rec.calls[1][0] == "nft"
    rec.calls.clear()
    fw.ensure_policy("vxnet-a", "open", False, SAMPLE)  # open: the same as remove
    assert rec.calls[0] == ("switch", "vxnet-a", False)


def test_drift_on_an_open_network_and_a_missing_table():
    fw = pn.PolicyFirewall(Recorder(missing=True).apply, lambda ns, on: None, lambda ns: (False, False))
    assert fw.policy_drift("vxnet-a", "open", False, SAMPLE) is None
    assert fw.policy_drift("vxnet-a", "deny", False, SAMPLE) == "bridge netfilter off; table missing"
    assert fw.counters("vxnet-a") == {}
