"""The nftables batches: whole tables replaced atomically, one endpoint's elements added or removed, every rule
labelled, subnets deduplicated."""

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kernel import libnftables
from netdriver import isolation, policy_nft
from netdriver.isolation import Firewall, Guarded, endpoint_guard_batch, host_guard_batch, link_local
from tests.fakes import FakeNftables
from wire.errors import KernelError

HOOKED = ("forward", "input")  # the base chains: what every frame or packet is evaluated against


def _hooked(batch):
    """The drop rules of the base chains (the log chains' rules are reached by a drop only; the anti-spoofing
    table's first rule accepts what did not come in on a port)."""
    return [op["add"]["rule"] for op in batch if "rule" in op.get("add", {}) and
            op["add"]["rule"]["chain"] in HOOKED and op["add"]["rule"]["comment"] != isolation.NOT_A_PORT]


def _forward(batch):
    return [op["add"]["rule"] for op in batch if "rule" in op.get("add", {}) and
            op["add"]["rule"]["chain"] == "forward"]


def test_endpoint_batch_replaces_the_table_and_keeps_rules_fixed_as_endpoints_grow():
    batch = endpoint_guard_batch([("vxpb", "10.0.0.6", "02:42:0a:00:00:06"), ("vxpa", "10.0.0.5", "m5")])
    assert [list(op)[0] for op in batch[:3]] == ["add", "delete", "add"]
    rules = _hooked(batch)
    assert len(rules) == 5 and all(r["comment"].startswith("vxnet:anti-spoofing:") for r in rules)
    assert all(r["expr"][-2:] == [{"counter": None}, {"jump": {"target": f"drop-{r['comment'].split(':')[2]}"}}]
               for r in rules)
    elements = {op["add"]["element"]["name"]: op["add"]["element"]["elem"]
                for op in batch if "element" in op.get("add", {})}
    assert elements == {"ports": ["vxpa", "vxpb"],  # sorted: the same input always gives the same batch
                        "macs": [{"concat": ["vxpa", "m5"]}, {"concat": ["vxpb", "02:42:0a:00:00:06"]}],
                        "ips": [{"concat": ["vxpa", "10.0.0.5"]}, {"concat": ["vxpb", "10.0.0.6"]}]}
    many = endpoint_guard_batch([(f"vxp{i}", f"10.0.0.{i}", f"02:00:00:00:00:{i:02x}") for i in range(50)])
    assert len(_hooked(many)) == 5
    # First, one lookup passes what did not come in on a port: the drop rules test no port of their own.
    first = _forward(batch)[0]
    assert first["comment"] == isolation.NOT_A_PORT and first["expr"] == [
        {"match": {"op": "!=", "left": {"meta": {"key": "iifname"}}, "right": "@ports"}}, {"accept": None}]
    assert isolation.drop_reason(first["comment"]) is None
    assert all("@ports" not in str(r["expr"]) for r in rules)


@pytest.mark.parametrize("batch, group", [
    (endpoint_guard_batch([("vxpa", "10.0.0.5", "02:42:0a:00:00:05")], ipv6=True), 0x7678),
    (host_guard_batch(["10.1.0.0/24"]), 0x7679)])
def test_every_drop_rule_jumps_to_a_chain_that_logs_rate_limited_then_drops(batch, group):
    """Each drop rule's log chain: a log rule with the limit (it ends only its own rule), then the drop; the
    counter stays on the matching rule, which the drop metrics read by its comment."""
    chains = {}
    for op in batch:
        rule = op.get("add", {}).get("rule")
        if rule is not None and rule["chain"] not in HOOKED:
            chains.setdefault(rule["chain"], []).append(rule)
    hooked = _hooked(batch)
    assert sorted(chains) == sorted(f"drop-{r['comment'].split(':')[2]}" for r in hooked)
    for rule in hooked:
        _, reason, name = rule["comment"].split(":")
        log_rule, drop_rule = chains[f"drop-{name}"]
        limit, log = log_rule["expr"]
        assert limit == {"limit": {"rate": 20, "per": "second", "burst": 50}}
        assert (log["log"]["prefix"], log["log"]["group"]) == (f"vxnet:drop:{reason}:{name}", group)
        assert isolation.logged(log["log"]["prefix"]) == (reason, name, rule["comment"])
        assert drop_rule["expr"] == [{"drop": None}] and "counter" not in str(log_rule) + str(drop_rule)
        assert isolation.drop_reason(log_rule["comment"]) is None and isolation.drop_reason(drop_rule["comment"]) \
            is None  # only the matching rule's counter is a drop metric's
    # The policy table's log and this one's are read alike: the same rate, burst and snap length.
    assert (isolation.LOG_RATE, isolation.LOG_BURST, isolation.LOG_SNAPLEN) == \
        (policy_nft.LOG_RATE, policy_nft.LOG_BURST, policy_nft.LOG_SNAPLEN)
    assert isolation.logged(policy_nft.LOG_DROP) is None and isolation.logged("vxnet:drop:policy:x") is None


def test_host_batch_deduplicates_shared_subnets():
    batch = host_guard_batch(["10.1.0.0/24", "10.1.0.0/24", "10.2.0.0/16"])
    (elements,) = [op["add"]["element"]["elem"] for op in batch if "element" in op.get("add", {})]
    assert elements == [{"prefix": {"addr": "10.1.0.0", "len": 24}}, {"prefix": {"addr": "10.2.0.0", "len": 16}}]
    assert not [op for op in host_guard_batch([]) if "element" in op.get("add", {})]


def _whole(endpoints, ipv6=False):
    """The sets as a whole-table rebuild for these endpoints makes them."""
    nft = FakeNftables()
    Firewall(nft).guard_endpoints("ns", endpoints, ipv6)
    return nft.sets()


def test_endpoint_add_and_remove_change_exactly_its_elements_and_replay_safely():
    nft = FakeNftables()
    fw = Firewall(nft)
    a, b = Guarded("vxpa", "10.0.0.5", "02:42:0a:00:00:05"), Guarded("vxpb", "10.0.0.6", "02:42:0a:00:00:06")
    try:
        fw.guard_endpoint("ns", a)
    except KernelError:
        pass
    else:
        raise AssertionError("elements added without the table and its rules")
    assert nft.tables == {}  # nothing created: sets without their rules would guard nothing
    fw.guard_endpoints("ns", [a])
    fw.guard_endpoint("ns", b)
    fw.guard_endpoint("ns", b)  # a replay
    assert nft.sets() == _whole([a, b])
    assert len([r for r in nft.tables[("bridge", "vxnet")]["rules"] if r["chain"] == "forward"]) == 6
    fw.unguard_endpoint("ns", a)
    fw.unguard_endpoint("ns", a)  # a replay: the elements are gone, the batch still succeeds
    assert nft.sets() == _whole([b])
    fw.unguard_endpoint("ns", b)
    assert nft.sets() == _whole([])
    assert len([r for r in nft.tables[("bridge", "vxnet")]["rules"] if r["chain"] == "forward"]) == 6


def test_a_refused_batch_is_a_kernel_error_naming_the_namespace():
    seen = {}

    def apply(ns, commands, what):
        seen["ns"], seen["commands"] = ns, commands
        raise KernelError(f"{what}: Error: Could not process rule: No such file or directory")

    try:
        Firewall(apply).guard_endpoints("vxnet-0123456789ab", [])
    except KernelError as exc:
        assert "vxnet-0123456789ab" in str(exc) and "No such file" in str(exc)
    else:
        raise AssertionError("no error")
    assert seen["ns"] == "vxnet-0123456789ab" and seen["commands"][0] == {"add": {"table": {"family": "bridge",
                                                                                           "name": "vxnet"}}}


DUAL = [Guarded("vxpa", "10.0.0.5", "02:42:0a:00:00:05", "fd00:1::5"),
        Guarded("vxpb", "10.0.0.6", "02:42:0a:00:00:06", "")]  # no global v6 (created before --ip6): link-local only


def _rules(batch):
    return [rule["comment"].split(":")[2] for rule in _hooked(batch)]


def test_a_dual_stack_table_guards_v6_sources_nd_targets_and_router_messages_with_fixed_rules():
    batch = endpoint_guard_batch(DUAL, ipv6=True)
    assert _rules(batch) == ["mac", "ip", "arp-ip", "arp-mac", "ip6", "ip6-unspecified-proto",
                             "ip6-unspecified-type", "dad-target", "na-target", "router"]
    assert "no-ipv6" in _rules(endpoint_guard_batch(DUAL)) and "ip6" not in _rules(endpoint_guard_batch(DUAL))
    elements = {op["add"]["element"]["name"]: op["add"]["element"]["elem"]
                for op in batch if "element" in op.get("add", {})}
    assert elements["ip6s"] == [{"concat": ["vxpa", "fe80::42:aff:fe00:5"]}, {"concat": ["vxpa", "fd00:1::5"]},
                                {"concat": ["vxpb", "fe80::42:aff:fe00:6"]}]
    assert elements["targets"][1] == {"concat": ["vxpa", "0xfd000001000000000000000000000005"]}
    many = [Guarded(f"vxp{i}", f"10.0.0.{i}", f"02:00:00:00:00:{i:02x}", f"fd00::{i:x}") for i in range(50)]
    assert len(_rules(endpoint_guard_batch(many, ipv6=True))) == 10
    # The targets set is declared by the expressions it is compared with; nftables 1.0.6 takes that only in nft
    # syntax, so the batch goes as text: every value quoted but set references and raw numbers.
    text = libnftables.to_nft_syntax(batch)
    assert "add set bridge vxnet targets { typeof meta iifname . @th,64,128; }" in text
    assert ('meta iifname . @th,64,128 != @targets counter jump drop-na-target comment '
            '"vxnet:anti-spoofing:na-target"') in text
    assert '"vxpa" . 0xfd000001000000000000000000000005' in text and 'meta iifname != @ports accept' in text


def test_nft_syntax_refuses_what_it_cannot_quote():
    bad = endpoint_guard_batch([Guarded('vx"; flush ruleset', "10.0.0.5", "02:42:0a:00:00:05")], ipv6=True)
    with pytest.raises(libnftables.NftablesError, match="cannot quote"):
        libnftables.to_nft_syntax(bad)


@given(st.binary(min_size=6, max_size=6))
def test_link_local_is_the_modified_eui64_of_the_mac(raw):
    mac = ":".join(f"{b:02x}" for b in raw)
    address = ipaddress.IPv6Address(link_local(mac))
    assert address in ipaddress.IPv6Network("fe80::/64")
    iid = address.packed[8:]
    assert iid[3:5] == b"\xff\xfe" and bytes([iid[0] ^ 2]) + iid[1:3] + iid[5:] == raw


def test_link_local_matches_rfc_4291_and_the_kernel():
    # 02:42:0a:4d:09:06 as a veth of that MAC shows it in `ip -6 addr` (addr_gen_mode eui64).
    assert link_local("02:42:0a:4d:09:06") == "fe80::42:aff:fe4d:906"
    assert link_local("00:00:5e:00:53:01") == "fe80::200:5eff:fe00:5301"  # RFC 7042's documentation MAC


def test_dual_stack_elements_come_and_go_one_endpoint_at_a_time_and_the_shape_compares_equal():
    nft = FakeNftables()
    fw = Firewall(nft)
    a, b = DUAL
    fw.guard_endpoints("ns", [a], ipv6=True)
    assert fw.endpoints_drift("ns", [a], ipv6=True) is None
    fw.guard_endpoint("ns", b, ipv6=True)
    fw.guard_endpoint("ns", b, ipv6=True)
    assert nft.sets() == _whole([a, b], ipv6=True)
    # The listing shows raw targets as nft does (no leading zeros, small ones as numbers): the same shape.
    assert fw.endpoints_drift("ns", [a, b], ipv6=True) is None
    fw.unguard_endpoint("ns", a, ipv6=True)
    fw.unguard_endpoint("ns", a, ipv6=True)
    assert nft.sets() == _whole([b], ipv6=True)
    drift = fw.endpoints_drift("ns", [a, b], ipv6=True)
    assert "set targets lacks vxpa . 0xfd000001000000000000000000000005" in drift
    assert "set ip6s lacks vxpa . fd00:1::5" in drift
    # An IPv4-only table where a dual-stack one is wanted (or back): the rules differ, so it is rebuilt.
    fw.guard_endpoints("ns", [b])
    assert "rules" in fw.endpoints_drift("ns", [b], ipv6=True)
    with pytest.raises(KernelError):
        fw.guard_endpoint("ns", a, ipv6=True)  # no IPv6 sets in it: refused, and the caller rebuilds


def test_small_raw_targets_compare_equal_to_their_listing():
    nft = FakeNftables()
    fw = Firewall(nft)
    low = Guarded("vxpa", "10.0.0.5", "02:42:0a:00:00:05", "::5")  # lists as the number 5
    fw.guard_endpoints("ns", [low], ipv6=True)
    assert fw.endpoints_drift("ns", [low], ipv6=True) is None


def test_host_batch_covers_v6_subnets_with_the_same_rules():
    batch = host_guard_batch(["10.1.0.0/24", "fd00:1::/64", "fd00:1::/64"])
    elements = {op["add"]["element"]["name"]: op["add"]["element"]["elem"]
                for op in batch if "element" in op.get("add", {})}
    assert elements == {"subnets": [{"prefix": {"addr": "10.1.0.0", "len": 24}}],
                        "subnets6": [{"prefix": {"addr": "fd00:1::", "len": 64}}]}
    assert _rules(batch) == ["to-overlay", "from-overlay", "overlay-to-host", "to-overlay-v6", "from-overlay-v6",
                             "overlay-to-host-v6"]
    nft = FakeNftables()
    fw = Firewall(nft)
    fw.guard_host(["10.1.0.0/24", "fd00:1::/64"])
    assert fw.host_drift(["10.1.0.0/24", "fd00:1::/64"]) is None
    assert "set subnets6 lacks fd00:2::/64" in fw.host_drift(["10.1.0.0/24", "fd00:1::/64", "fd00:2::/64"])
