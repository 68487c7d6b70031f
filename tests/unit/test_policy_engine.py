"""The policy engine (netdriver/policy_engine.py) over a FakePolicyFirewall that models the tables: after every
event the (fake) kernel holds what compile() gives for the inputs, events write diffs and not whole tables,
nothing is applied before both full reads, a restart finding its tables in place writes nothing, a lost table is
replaced, the reconciler's repair, the segment of an overlay, the Join path through the real driver and PeerSync,
and the flows interface (subscribe, names). Checked on end state."""

import dataclasses

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

from kernel import names
from netdriver.driver import NetworkDriver
from netdriver.models import Network, PeerRecord, Subnet
from netdriver.peerdb import PeerDB
from netdriver.policy import Rule, Selector, compile, parse_port
from netdriver.policy_engine import PolicyEngine, member_of
from netdriver.reconciler import Reconciler
from netdriver.store import NetworkStore
from netdriver.underlay import Underlay
from netdriver.watcher import PeerSync
from tests.fakes import FakeDataPlane, FakeKV, FakePolicyFirewall
from wire import protocol as p

NID = "a" * 64
ME, OTHER = "h1", "h2"
DB = {"container": "db1", "service": "db", "labels": {}}
CLIENT = {"container": "web1", "service": "", "labels": {"role": "client"}}
CLIENT_TO_DB = Rule.make(NID, Selector("label", "role", "client"), Selector("service", "", "db"),
                         [parse_port("5432/tcp")])


def network(mode="deny", nid=NID, overlay=None, audit=False):
    return Network(id=nid, vni=7, mtu=1450, internal=False, subnets=[Subnet("10.0.0.0/24", None)], overlay=overlay,
                   policy=mode, policy_audit=audit)


def record(n, host, identity=None, exposed=(), nid=NID):
    return PeerRecord(network_id=nid, endpoint_id=f"{n:064x}", ip=f"10.0.0.{n}", mac=f"02:00:00:00:00:{n:02x}",
                      vtep="192.0.2.9", host=host, ip6=f"fd00::{n:x}", exposed=list(exposed), identity=identity)


class Rig:
    """An engine over the fake firewall; wired: the local endpoint ids whose veth is in the namespace."""

    def __init__(self, wired=None):
        self.fw = FakePolicyFirewall()
        self.wired = wired  # None: every local record's veth is wired
        self.engine = PolicyEngine(self.fw, ME, lambda nid, ids: set(ids) if self.wired is None
                                   else set(ids) & self.wired)
        self.records = {}
        self.rules = {}

    def load(self, net=None, records=(), rules=()):
        if net is not None:
            self.engine.network_up(net)
        for r in records:
            self.records[r.endpoint_id] = r
        for rule in rules:
            self.rules[rule.id] = rule
        self.engine.resync_peers([(NID, 1, r) for r in self.records.values()])
        self.engine.resync(list(self.rules.values()))

    def put(self, r, segment=NID):
        self.records[r.endpoint_id] = r
        self.engine.put_peer(segment, r)

    def reference(self, net=None, segment=NID):
        net = net or network()
        local = [eid for eid, r in self.records.items() if r.host == ME and (self.wired is None or eid in self.wired)]
        return compile(net.policy, [r for r in self.rules.values() if r.segment == segment],
                       [member_of(r) for r in self.records.values()], local)


NS = names.netns(NID)


def test_nothing_is_applied_before_both_full_reads_then_the_full_compile():
    rig = Rig()
    rig.engine.network_up(network())
    rig.engine.resync_peers([(NID, 1, record(2, ME, DB)), (NID, 2, record(3, OTHER, CLIENT))])
    assert rig.fw.writes == []  # rules not read yet: the kernel keeps what it has
    rig.records = {r.endpoint_id: r for r in (record(2, ME, DB), record(3, OTHER, CLIENT))}
    rig.rules = {CLIENT_TO_DB.id: CLIENT_TO_DB}
    rig.engine.resync([CLIENT_TO_DB])
    assert rig.fw.writes == [("ensure", NS)] and rig.fw.replaced[NS] == 1
    assert rig.fw.elements(NS) == rig.reference()
    assert ("10.0.0.3", "10.0.0.2", "tcp", 5432) in rig.fw.elements(NS).allow  # the remote client to the local db


def test_events_write_diffs_and_keep_the_table_equal_to_compile():
    rig = Rig()
    rig.load(network(), [record(2, ME, DB)])
    assert rig.fw.writes == [("ensure", NS)]
    client = record(3, OTHER)  # identity not known yet: selected by nothing but `any` (fail closed)
    rig.put(client)
    rig.rules[CLIENT_TO_DB.id] = CLIENT_TO_DB
    rig.engine.put_rule(CLIENT_TO_DB)
    assert rig.fw.elements(NS) == rig.reference() and rig.fw.elements(NS).allow == frozenset()
    rig.put(dataclasses.replace(client, identity=CLIENT))  # the identity published: the rule applies
    assert ("fd00::3", "fd00::2", "tcp", 5432) in rig.fw.elements(NS).allow
    assert rig.fw.elements(NS) == rig.reference()
    rig.engine.delete_rule(NID, CLIENT_TO_DB.id)
    del rig.rules[CLIENT_TO_DB.id]
    assert rig.fw.elements(NS) == rig.reference() and rig.fw.elements(NS).allow == frozenset()
    rig.engine.delete_peer(NID, record(2, ME).endpoint_id)
    del rig.records[record(2, ME).endpoint_id]
    assert rig.fw.elements(NS).guarded == frozenset()
    # The client without an identity, and the rule before it had one, changed no element: nothing written.
    assert [op for op, _ in rig.fw.writes] == ["ensure"] + ["update"] * 3


def test_only_wired_local_records_are_destinations():
    rig = Rig(wired={record(2, ME).endpoint_id})
    rig.load(network(), [record(2, ME, DB), record(4, ME, DB), record(3, OTHER, CLIENT)], [CLIENT_TO_DB])
    assert rig.fw.elements(NS).guarded == {"10.0.0.2", "fd00::2"}  # .4's veth is gone: not guarded here
    assert rig.fw.elements(NS) == rig.reference()


def test_a_restart_that_finds_its_tables_in_place_writes_nothing():
    rig = Rig()
    rig.load(network(), [record(2, ME, DB), record(3, OTHER, CLIENT)], [CLIENT_TO_DB])
    before = rig.fw.elements(NS)
    restarted = PolicyEngine(rig.fw, ME, lambda nid, ids: set(ids))  # the same kernel, a new process
    rig.fw.writes.clear()
    restarted.network_up(network())  # start-up reconciliation, before any etcd read
    restarted.resync_peers([(NID, 1, r) for r in rig.records.values()])
    restarted.resync([CLIENT_TO_DB])
    assert rig.fw.writes == [] and rig.fw.elements(NS) == before
    # A resync after a broken watch (or an outage) with nothing changed writes nothing either.
    restarted.resync_peers([(NID, 1, r) for r in rig.records.values()])
    restarted.resync([CLIENT_TO_DB])
    assert rig.fw.writes == []
    # One that did change is applied as its difference.
    restarted.resync([])
    assert rig.fw.writes == [("update", NS)] and rig.fw.elements(NS).allow == frozenset()


def test_a_restart_that_finds_other_elements_changes_them_and_one_that_finds_another_mode_replaces_it():
    rig = Rig()
    rig.load(network(), [record(2, ME, DB)], [])
    rig.fw.tables[NS] = ("deny", False, dataclasses.replace(rig.fw.elements(NS), guarded=frozenset()))
    restarted = PolicyEngine(rig.fw, ME, lambda nid, ids: set(ids))
    restarted.network_up(network())
    restarted.resync_peers([(NID, 1, r) for r in rig.records.values()])
    restarted.resync([])
    assert rig.fw.writes[-1] == ("ensure", NS) and rig.fw.elements(NS) == rig.reference()
    assert rig.fw.replaced[NS] == 1  # made once, by the first process: its UDP records are kept
    rig.fw.tables[NS] = ("deny", True, rig.fw.elements(NS))  # made with another verdict
    again = PolicyEngine(rig.fw, ME, lambda nid, ids: set(ids))
    again.network_up(network())
    again.resync_peers([(NID, 1, r) for r in rig.records.values()])
    again.resync([])
    assert rig.fw.tables[NS][:2] == ("deny", False) and rig.fw.replaced[NS] == 2


def test_a_lost_table_is_replaced_whole_by_the_next_update_and_by_repair():
    rig = Rig()
    rig.load(network(), [record(2, ME, DB)], [])
    rig.fw.lose(NS)
    rig.put(record(4, ME, DB))  # its update fails (no table): the table is replaced whole
    assert rig.fw.writes[-2:] == [("ensure", NS)] * 2 and rig.fw.elements(NS) == rig.reference()
    assert rig.engine.repair(network()) is None  # equal: nothing done
    rig.fw.lose(NS)
    assert rig.engine.repair(network()) == "policy table missing"
    assert rig.fw.elements(NS) == rig.reference()


def test_open_networks_get_no_table_and_a_deleted_network_loses_its_table_and_state():
    rig = Rig()
    ups = []
    rig.engine.subscribe(lambda nid, ns, up: ups.append((nid, ns, up)))
    rig.load(network("open"), [record(2, ME, DB)], [CLIENT_TO_DB])
    # No table; the namespace is up (the verdict log reads its anti-spoofing drops), said once.
    assert rig.fw.writes == [] and ups == [(NID, NS, True)]
    assert rig.engine.network_of("10.0.0.77") == NID and rig.engine.network_of("192.0.2.1") is None
    rig.engine.network_down(network("open"))
    assert ups[-1] == (NID, NS, False) and rig.engine.network_of("10.0.0.77") is None
    ups.clear()
    rig.engine.network_up(network("exposed"))  # (a test shortcut: the mode is fixed at creation)
    assert rig.fw.tables[NS][0] == "exposed" and ups == [(NID, NS, True)]  # one up: the table's
    rig.engine.network_down(network("exposed"))
    assert NS not in rig.fw.tables and ups[-1] == (NID, NS, False)
    assert rig.engine.policy_networks() == [] and rig.engine.repair(network("exposed")) is None
    rig.put(record(5, OTHER, CLIENT))  # events for it change nothing now
    assert NS not in rig.fw.tables


def test_rules_of_an_overlay_segment_apply_to_this_hosts_network_of_it():
    """Standalone hosts of `-o overlay=blue`: the rule written through another host's network ID is the
    segment's, and so in force here."""
    mine = network(overlay="blue")
    rig = Rig()
    rig.engine.network_up(mine)
    rule = Rule.make("overlay-blue", Selector("any"), Selector("service", "", "db"))
    rig.engine.resync_peers([("overlay-blue", 1, record(2, ME, DB)),
                             ("overlay-blue", 2, record(3, OTHER, CLIENT, nid="b" * 64))])
    rig.engine.resync([rule, CLIENT_TO_DB])  # the second is another segment's (NID's): not applied here
    # any -> the db: the remote client and the db itself (a member may reach itself through the bridge)
    assert rig.fw.elements(NS).allow_all == {("10.0.0.3", "10.0.0.2"), ("fd00::3", "fd00::2"),
                                             ("10.0.0.2", "10.0.0.2"), ("fd00::2", "fd00::2")}
    assert rig.fw.elements(NS).allow == frozenset()
    assert set(rig.engine.names(NID)) == {"10.0.0.2", "fd00::2", "10.0.0.3", "fd00::3"}


def test_names_map_every_address_to_its_identity():
    rig = Rig()
    rig.load(network(), [record(2, ME, DB), record(3, OTHER)], [])
    named = rig.engine.names(NID)
    assert named["10.0.0.2"] == named["fd00::2"] == {"container": "db1", "service": "db",
                                                     "endpoint": record(2, ME).endpoint_id, "host": ME}
    assert named["10.0.0.3"] == {"container": "", "service": "", "endpoint": record(3, OTHER).endpoint_id,
                                 "host": OTHER}
    assert rig.engine.names("f" * 64) == {}


def test_unreadable_exposed_ports_and_identities_allow_less_never_more():
    rig = Rig()
    bad = dataclasses.replace(record(2, ME), exposed=["80/tcp", "99999/tcp"], identity={"labels": ["x"]})
    rig.load(network("exposed"), [bad], [])
    assert rig.fw.elements(NS).exposed == {("10.0.0.2", "tcp", 80), ("fd00::2", "tcp", 80)}
    assert member_of(bad).identity is None


def test_a_subscriber_that_fails_does_not_stop_the_policy():
    rig = Rig()

    def broken(*args):
        raise RuntimeError("bug")

    rig.engine.subscribe(broken)
    rig.load(network(), [record(2, ME, DB)], [])
    assert rig.fw.elements(NS) == rig.reference()


SELECTORS = st.sampled_from([Selector("any"), Selector("service", "", "db"), Selector("label", "role", "client")])
IDENTITIES = st.sampled_from([None, DB, CLIENT])
EVENTS = st.one_of(
    st.tuples(st.just("put"), st.integers(2, 7), st.sampled_from([ME, OTHER]), IDENTITIES),
    st.tuples(st.just("delete"), st.integers(2, 7)),
    st.tuples(st.just("rule"), SELECTORS, SELECTORS, st.sampled_from([(), ("5432/tcp",)])),
    st.tuples(st.just("unrule"), st.integers(0, 5)),
    st.tuples(st.just("lose")),
    st.tuples(st.just("resync")),
)


@settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["exposed", "deny"]), st.lists(EVENTS, max_size=25))
def test_any_sequence_of_events_leaves_the_kernel_equal_to_compile(mode, events):
    rig = Rig()
    net = network(mode)
    rig.load(net, [], [])
    for event in events:
        kind = event[0]
        if kind == "put":
            _, n, host, identity = event
            rig.put(record(n, host, identity, exposed=["5432/tcp"] if n % 2 else []))
        elif kind == "delete":
            eid = record(event[1], ME).endpoint_id
            rig.records.pop(eid, None)
            rig.engine.delete_peer(NID, eid)
        elif kind == "rule":
            rule = Rule.make(NID, event[1], event[2], [parse_port(x) for x in event[3]])
            rig.rules[rule.id] = rule
            rig.engine.put_rule(rule)
        elif kind == "unrule":
            if rig.rules:
                rule_id = sorted(rig.rules)[event[1] % len(rig.rules)]
                del rig.rules[rule_id]
                rig.engine.delete_rule(NID, rule_id)
        elif kind == "lose":
            rig.fw.lose(NS)
            rig.engine.repair(net)
        else:
            rig.engine.resync_peers([(NID, 1, r) for r in rig.records.values()])
            rig.engine.resync(list(rig.rules.values()))
        assert rig.fw.elements(NS) == rig.reference(net)


# -- through the real driver and PeerSync ----------------------------------------------------------------------
def create_req(policy="deny"):
    return p.CreateNetworkRequest.decode({
        "NetworkID": NID, "Options": {"com.docker.network.generic": {"policy": policy}},
        "IPv4Data": [{"AddressSpace": "vxnet-local", "Pool": "10.1.0.0/24", "Gateway": "10.1.0.1/24"}],
        "IPv6Data": None})


@pytest.fixture
def driver():
    kv, plane, fw = FakeKV(), FakeDataPlane(), FakePolicyFirewall()
    engine = PolicyEngine(fw, ME, plane.wired_endpoints)
    sync = PeerSync(PeerDB(ME), plane, policy=engine)
    drv = NetworkDriver(NetworkStore(kv), plane, ME, "local", Underlay(lambda a: 1500, "192.0.2.1"), peers=sync,
                        policy=engine)
    sync.resync([])
    engine.resync([])
    return drv, engine, fw, plane, sync


def join(drv, n):
    eid = f"{n:064x}"
    drv.create_endpoint(p.CreateEndpointRequest.decode({"NetworkID": NID, "EndpointID": eid, "Interface": {
        "Address": f"10.1.0.{n}/24", "MacAddress": ""}}))
    drv.join(p.JoinRequest.decode({"NetworkID": NID, "EndpointID": eid, "SandboxKey": "/var/run/docker/netns/x"}))
    return eid


def test_a_join_guards_its_address_before_it_returns_and_a_delete_takes_the_table(driver):
    drv, engine, fw, plane, sync = driver
    ups = []
    engine.subscribe(lambda nid, ns, up: ups.append(up))
    drv.create_network(create_req())
    assert fw.tables[NS][0] == "deny" and fw.elements(NS).guarded == frozenset() and ups == [True]
    join(drv, 5)  # no watch runs here: only the Join's own hand-over can have guarded it
    assert fw.elements(NS).guarded == {"10.1.0.5"}
    # The reconciler's pass finds the table right; a table deleted by hand is replaced, kind network-policy.
    healing = Reconciler(drv, sync, policy=engine, interval=0)
    assert "network-policy" not in healing.run_pass("periodic")
    fw.lose(NS)
    assert healing.run_pass("periodic").get("network-policy") == 1 and fw.elements(NS).guarded == {"10.1.0.5"}
    drv.delete_network(p.NetworkIDRequest.decode({"NetworkID": NID}))
    assert NS not in fw.tables and ups[-1] is False and engine.policy_networks() == []


def test_a_rebuilt_namespace_gets_the_full_compile(driver):
    drv, engine, fw, plane, sync = driver
    drv.create_network(create_req("exposed"))
    join(drv, 5)
    plane.lose_link(NID)
    fw.lose(NS)  # the namespace went, and its table with it
    healing = Reconciler(drv, sync, policy=engine, interval=0)
    assert healing.run_pass("periodic").get("link") == 1
    assert fw.elements(NS).guarded == {"10.1.0.5"} and fw.tables[NS][0] == "exposed"


def test_a_join_before_the_first_reads_waits_for_them_and_is_then_guarded():
    """A plugin just started: the Join's record waits for both full reads instead of being handed over with no
    table compiled for it (fail closed); once they come, it is in the table."""
    import threading

    rig = Rig()
    rig.engine.network_up(network())
    joined = threading.Event()
    errors = []

    def join():
        try:
            rig.engine.member_here(NID, record(2, ME, DB))
        except Exception as exc:  # recorded for the assertion below
            errors.append(exc)
        joined.set()

    thread = threading.Thread(target=join)
    thread.start()
    assert not joined.wait(0.2)  # still waiting: neither read made yet
    assert rig.fw.writes == []
    rig.records = {r.endpoint_id: r for r in (record(2, ME, DB), record(3, OTHER, CLIENT))}
    rig.rules = {CLIENT_TO_DB.id: CLIENT_TO_DB}
    rig.engine.resync_peers([(NID, 1, record(3, OTHER, CLIENT))])
    rig.engine.resync([CLIENT_TO_DB])
    assert joined.wait(5) and errors == []
    thread.join(5)
    assert "10.0.0.2" in rig.fw.elements(NS).guarded
    assert rig.fw.elements(NS) == rig.reference()


def test_a_join_whose_policy_cannot_be_read_in_time_is_refused_and_nothing_is_applied(monkeypatch):
    from netdriver import policy_engine
    from wire.errors import StoreUnavailable

    monkeypatch.setattr(policy_engine, "LOAD_WAIT_SECONDS", 0.05)
    rig = Rig()
    rig.engine.network_up(network())
    rig.engine.resync_peers([])  # the peers are read, the rules are not (etcd went away meanwhile)
    with pytest.raises(StoreUnavailable, match="not read from etcd yet"):
        rig.engine.member_here(NID, record(2, ME, DB))
    assert rig.fw.writes == []
    # Control: the same Join once the rules are read goes through and is guarded.
    rig.engine.resync([])
    rig.engine.member_here(NID, record(2, ME, DB))
    assert "10.0.0.2" in rig.fw.elements(NS).guarded


def test_a_join_on_an_open_network_never_waits_for_the_policy_reads(monkeypatch):
    from netdriver import policy_engine

    monkeypatch.setattr(policy_engine, "LOAD_WAIT_SECONDS", 30)
    rig = Rig()
    rig.engine.network_up(network("open"))
    rig.engine.member_here(NID, record(2, ME, DB))  # returns at once: no policy to guard it
    assert rig.fw.writes == []
