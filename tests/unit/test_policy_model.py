"""netdriver/policy.py by hand: parsing refuses by name, identities match selectors (an unknown identity only
`any`), rules have content ids and survive JSON, compile gives the element sets of both families on hand-made
networks, diff/apply go between them."""

import json

import pytest

from netdriver import options
from netdriver.models import Network
from netdriver.policy import (
    ANY,
    EMPTY,
    Diff,
    Elements,
    Identity,
    Member,
    PolicyError,
    Port,
    Rule,
    Selector,
    apply,
    compile,
    diff,
    parse_port,
    parse_selector,
    rule_id,
    selects,
)
from wire.errors import InvalidOption

NET = "ab" * 32


# -- ports -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,port", [("5432/tcp", Port("tcp", 5432)), ("53/udp", Port("udp", 53)),
                                       ("9/sctp", Port("sctp", 9)), ("80", Port("tcp", 80)),
                                       ("443/TCP", Port("tcp", 443)), ("1/tcp", Port("tcp", 1)),
                                       ("65535/udp", Port("udp", 65535))])
def test_ports_parse_to_their_text_form(text, port):
    assert parse_port(text, "--port") == port
    assert parse_port(port.text(), "--port") == port


@pytest.mark.parametrize("text,message", [
    ("70000/tcp", "--port: '70000/tcp' is not a port 1-65535"),
    ("0/tcp", "--port: '0/tcp' is not a port 1-65535"),
    ("x/icmp", "--port: 'x/icmp' protocol must be tcp, udp or sctp"),
    ("80/icmp", "--port: '80/icmp' protocol must be tcp, udp or sctp"),
    ("/tcp", "--port: '/tcp' is not a port 1-65535"),
    ("abc", "--port: 'abc' is not a port 1-65535"),
    ("८०/tcp", "is not a port"),  # Devanagari digits: int() would take them
    ("8000-8010/tcp", "is a range; give each port with its own --port"),
    ("1" * 5000 + "/tcp", "is not a port"),
])
def test_bad_ports_are_refused_naming_the_field(text, message):
    with pytest.raises(PolicyError) as err:
        parse_port(text, "--port")
    assert str(err.value).startswith("--port: ") and message in str(err.value)


# -- selectors ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,selector", [
    ("any", ANY), ("service=db", Selector("service", "", "db")),
    ("label=role=client", Selector("label", "role", "client")),
    ("label=com.example.tier=a=b", Selector("label", "com.example.tier", "a=b")),  # the value may hold '='
    ("label=role=", Selector("label", "role", "")),  # a label with an empty value
    ("container=web1", Selector("container", "", "web1")),
    ("container=/web1", Selector("container", "", "web1")),  # as `docker inspect` shows the name
])
def test_selectors_parse_and_print_back(text, selector):
    assert parse_selector(text, "--from") == selector
    assert parse_selector(selector.text(), "--from") == selector


@pytest.mark.parametrize("text,message", [
    ("label=", "--from: 'label=' has no key"),
    ("label==x", "--from: 'label==x' has no key"),
    ("label=role", "--from: 'label=role' has no value"),
    ("service=", "--from: 'service=' has no name"),
    ("container=", "--from: 'container=' has no name"),
    ("service=db/x", "--from: 'service=db/x': a service name is letters"),
    ("service=-db", "a service name is"),
    ("pod=db", "--from: 'pod=db' is not a selector (service=NAME, label=KEY=VALUE, container=NAME or any)"),
    ("db", "--from: 'db' is not a selector"),
    ("", "--from: '' is not a selector"),
    ("any=1", "--from: 'any=1' is not a selector"),
    ("label=a=b\nc", "control characters"),
])
def test_bad_selectors_are_refused_naming_the_part(text, message):
    with pytest.raises(PolicyError) as err:
        parse_selector(text, "--from")
    assert message in str(err.value)


# -- identities --------------------------------------------------------------------------------------------------
def test_identity_matches_service_label_container_and_any():
    db = Identity(container="/stack_db.1.x", service="db", labels={"role": "server", "tier": ""})
    assert db.container == "stack_db.1.x"  # Docker's leading '/' dropped
    for text, want in [("any", True), ("service=db", True), ("service=web", False), ("label=role=server", True),
                       ("label=role=client", False), ("label=tier=", True), ("label=other=", False),
                       ("container=stack_db.1.x", True), ("container=/stack_db.1.x", True),
                       ("container=db", False)]:
        assert db.matches(parse_selector(text, "--to")) is want, text
    nobody = Identity(container="", service="", labels={})
    assert not nobody.matches(Selector("service", "", "")) and nobody.matches(ANY)


def test_an_unknown_identity_is_selected_only_by_any():
    for text in ("service=db", "label=role=client", "container=web1"):
        assert selects(parse_selector(text, "--to"), None) is False
    assert selects(ANY, None) is True


def test_identity_dict_round_trip_and_old_records():
    ident = Identity("web1", "web", {"b": "2", "a": "1"})
    assert ident.to_dict() == {"container": "web1", "service": "web", "labels": {"a": "1", "b": "2"}}
    assert Identity.from_dict(json.loads(json.dumps(ident.to_dict()))) == ident
    assert hash(Identity.from_dict(ident.to_dict())) == hash(ident)
    assert Identity.from_dict(None) is None
    assert Identity.from_dict({"container": "c"}) == Identity("c", "", {})


# -- rules -------------------------------------------------------------------------------------------------------
def test_the_same_allow_is_one_rule_whatever_the_order_of_its_ports():
    src, dst = parse_selector("label=role=client", "--from"), parse_selector("service=db", "--to")
    a = Rule.make(NET, src, dst, [Port("tcp", 5432), Port("udp", 53), Port("tcp", 5432)])
    b = Rule.make(NET, src, dst, [Port("udp", 53), Port("tcp", 5432)])
    assert a == b and a.id == rule_id(NET, src, dst, [Port("tcp", 5432), Port("udp", 53)])
    assert len(a.id) == 12 and int(a.id, 16) >= 0
    assert a.ports == (Port("tcp", 5432), Port("udp", 53))
    # Anything else is another rule.
    assert Rule.make(NET, src, dst, [Port("tcp", 5432)]).id != a.id
    assert Rule.make(NET, dst, src, a.ports).id != a.id
    assert Rule.make("cd" * 32, src, dst, a.ports).id != a.id
    assert Rule.make(NET, src, dst).id != a.id


def test_rule_json_round_trip_and_tampered_records_are_refused():
    rule = Rule.make(NET, parse_selector("any", "--from"), parse_selector("container=web1", "--to"),
                     [Port("tcp", 80)])
    assert json.loads(rule.to_json()) == {"id": rule.id, "segment": NET, "from": "any", "to": "container=web1",
                                          "ports": ["80/tcp"]}
    assert Rule.from_json(rule.to_json()) == rule
    tampered = json.loads(rule.to_json())
    tampered["ports"] = ["81/tcp"]
    with pytest.raises(PolicyError, match="its id is not that of its content"):
        Rule.from_json(json.dumps(tampered))
    with pytest.raises(PolicyError, match="to: 'pod=x' is not a selector"):
        Rule.from_json(json.dumps({**json.loads(rule.to_json()), "to": "pod=x"}))
    with pytest.raises(PolicyError, match="not JSON"):
        Rule.from_json("{")


# -- options -----------------------------------------------------------------------------------------------------
def test_policy_options_parse_and_refuse_by_name():
    parsed = options.parse({options.GENERIC: {"policy": "deny", "policy-audit": "true"}})
    assert (parsed.policy, parsed.policy_audit) == ("deny", True)
    assert (options.parse({}).policy, options.parse({}).policy_audit) == ("open", False)
    assert options.parse({options.GENERIC: {"policy": "Exposed"}}).policy == "exposed"
    with pytest.raises(InvalidOption, match="option policy: 'closed' is not a policy mode \\(open, exposed, deny\\)"):
        options.parse({options.GENERIC: {"policy": "closed"}})
    with pytest.raises(InvalidOption, match="option policy-audit: 'maybe' is not a boolean"):
        options.parse({options.GENERIC: {"policy-audit": "maybe"}})


def test_old_network_records_load_as_open():
    old = {"id": NET, "vni": 1, "mtu": 1450, "internal": False, "subnets": [{"pool": "10.0.0.0/24",
                                                                           "gateway": None}]}
    network = Network.from_json(json.dumps(old))
    assert (network.policy, network.policy_audit) == ("open", False)
    new = Network(id=NET, vni=1, mtu=1450, internal=False, subnets=[], policy="deny", policy_audit=True)
    assert Network.from_json(new.to_json()) == new


# -- compile -----------------------------------------------------------------------------------------------------
CLIENT = Member("c" * 64, "10.0.0.2", "fd00::2", (), Identity("client1", "", {"role": "client"}), "h1")
OTHER = Member("d" * 64, "10.0.0.3", "fd00::3", (), Identity("other", "", {"role": "none"}), "h2")
DB = Member("e" * 64, "10.0.0.4", "fd00::4", (Port("tcp", 5432), Port("tcp", 9187)), Identity("db.1", "db", {}),
            "h2")
NEW = Member("f" * 64, "10.0.0.5", "", (Port("tcp", 80),), None, "h2")  # IPv4 only, identity not known yet
MEMBERS = (CLIENT, OTHER, DB, NEW)
LOCAL = {OTHER.endpoint_id, DB.endpoint_id, NEW.endpoint_id}  # host h2's
CLIENT_TO_DB = Rule.make(NET, parse_selector("label=role=client", "--from"), parse_selector("service=db", "--to"),
                         [Port("tcp", 5432)])


def test_deny_guards_local_members_and_allows_only_the_rule_in_both_families():
    got = compile("deny", [CLIENT_TO_DB], MEMBERS, LOCAL)
    assert got == Elements(
        guarded=frozenset({"10.0.0.3", "fd00::3", "10.0.0.4", "fd00::4", "10.0.0.5"}),
        exposed=frozenset(),  # deny: exposing a port opens nothing
        allow=frozenset({("10.0.0.2", "10.0.0.4", "tcp", 5432), ("fd00::2", "fd00::4", "tcp", 5432)}),
        allow_all=frozenset())


def test_exposed_mode_adds_each_local_members_exposed_ports():
    got = compile("exposed", [], MEMBERS, LOCAL)
    assert got.exposed == {("10.0.0.4", "tcp", 5432), ("fd00::4", "tcp", 5432), ("10.0.0.4", "tcp", 9187),
                           ("fd00::4", "tcp", 9187), ("10.0.0.5", "tcp", 80)}
    assert got.allow == got.allow_all == frozenset() and "10.0.0.2" not in got.guarded  # CLIENT is not local


def test_open_guards_nothing_whatever_the_rules():
    assert compile("open", [CLIENT_TO_DB], MEMBERS, LOCAL) == EMPTY


def test_unknown_identity_is_reached_only_by_any_rules_and_sends_only_under_any():
    to_new = Rule.make(NET, parse_selector("service=db", "--from"), parse_selector("any", "--to"))
    from_any = Rule.make(NET, ANY, parse_selector("service=db", "--to"), [Port("udp", 53)])
    got = compile("deny", [to_new, from_any], MEMBERS, LOCAL)
    # A rule without ports: every (source, local destination) pair of one family, destination any: NEW too.
    assert got.allow_all == {("10.0.0.4", d) for d in ("10.0.0.3", "10.0.0.4", "10.0.0.5")} | \
        {("fd00::4", d) for d in ("fd00::3", "fd00::4")}
    # `any` as a source takes every member, NEW (identity unknown) included, its IPv4 address only.
    assert got.allow == {(s, "10.0.0.4", "udp", 53) for s in ("10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5")} | \
        {(s, "fd00::4", "udp", 53) for s in ("fd00::2", "fd00::3", "fd00::4")}
    # A selector by label or service never picks NEW while its identity is unknown.
    by_label = Rule.make(NET, ANY, parse_selector("label=role=none", "--to"))
    assert not any(d == "10.0.0.5" for _, d in compile("deny", [by_label], MEMBERS, LOCAL).allow_all)


def test_destinations_are_only_local_members():
    to_client = Rule.make(NET, ANY, parse_selector("label=role=client", "--to"))
    assert compile("deny", [to_client], MEMBERS, LOCAL).allow_all == frozenset()
    here = compile("deny", [to_client], MEMBERS, {CLIENT.endpoint_id})
    assert here.guarded == {"10.0.0.2", "fd00::2"} and ("10.0.0.4", "10.0.0.2") in here.allow_all


def test_an_unknown_mode_is_refused():
    with pytest.raises(PolicyError, match="policy: 'closed' is not a mode"):
        compile("closed", [], MEMBERS, LOCAL)


def test_diff_and_apply_go_from_one_set_to_the_next():
    before = compile("deny", [], MEMBERS, LOCAL)
    after = compile("deny", [CLIENT_TO_DB], [m for m in MEMBERS if m is not NEW], LOCAL)
    change = diff(before, after)
    assert change.add == Elements(allow=after.allow)
    assert change.remove == Elements(guarded=frozenset({"10.0.0.5"}))
    assert apply(before, change) == after and apply(after, diff(after, before)) == before
    assert diff(after, after) == Diff() and Diff().empty() and not change.empty()


# -- the driver records the mode -----------------------------------------------------------------------------------
def _driver():
    from netdriver.driver import NetworkDriver
    from netdriver.store import NetworkStore
    from netdriver.underlay import Underlay
    from tests.fakes import FakeDataPlane, FakeKV

    kv, plane = FakeKV(), FakeDataPlane()
    return NetworkDriver(NetworkStore(kv), plane, "h1", "local", Underlay(lambda a: 1500, "192.0.2.1")), kv, plane


def _create(driver, generic, nid=NET):
    from wire import protocol

    return driver.create_network(protocol.CreateNetworkRequest.decode({
        "NetworkID": nid, "Options": {options.GENERIC: generic},
        "IPv4Data": [{"Pool": "10.1.0.0/24", "Gateway": "10.1.0.1/24"}]}))


def test_create_network_records_the_mode_and_a_bad_one_leaves_nothing():
    driver, kv, plane = _driver()
    _create(driver, {"policy": "exposed", "policy-audit": "yes"})
    record = Network.from_json(kv.data[f"/vxnet/v1/networks/{NET}"].value)
    assert (record.policy, record.policy_audit) == ("exposed", True)
    driver, kv, plane = _driver()
    with pytest.raises(InvalidOption, match="option policy: 'strict' is not a policy mode"):
        _create(driver, {"policy": "strict"})
    assert kv.data == {} and plane.networks == {}


def test_the_swarm_manager_refuses_a_bad_mode_and_echoes_a_good_one():
    from wire import protocol

    driver, kv, _ = _driver()
    swarm = "0123456789abcdefghijklmno"
    reply = driver.allocate_network(protocol.CreateNetworkRequest.decode({
        "NetworkID": swarm, "Options": {"policy": "deny"}, "IPv4Data": [{"Pool": "10.2.0.0/24"}]}))
    assert reply["Options"]["policy"] == "deny"  # every worker's CreateNetwork sees it
    with pytest.raises(InvalidOption, match="option policy-audit: 'sometimes' is not a boolean"):
        driver.allocate_network(protocol.CreateNetworkRequest.decode({
            "NetworkID": "1" * 25, "Options": {"policy-audit": "sometimes"}, "IPv4Data": [{"Pool": "10.3.0.0/24"}]}))
