"""`vxnet policy allow|ls|rm` and the rule store (netdriver/policy_store.py) over FakeKV: what they print and
write, that the same allow is one rule, that refused rules write nothing, that a network's deletion takes its
rules in the same transaction, and that the policy watch delivers every rule, a change and a resync. Checked on
end state: the keys in the fake etcd, what the watcher's sink holds."""

import dataclasses
import io
import json
import logging

import pytest

from cli import context, main
from cli import policy as policy_cli
from netdriver.models import Network, Subnet
from netdriver.policy import Port, Rule, Selector
from netdriver.policy_store import PolicyStore, PolicyWatcher, UnknownNetwork, UnknownRule
from netdriver.store import NetworkStore
from plugin import config
from store import schema
from tests.fakes import FakeKV
from tests.harness.proc import wait_until
from wire.errors import VxnetError

NET = "ab" * 32
OTHER = "cd" * 32
SWARM = "0123456789abcdefghijklmno"  # a Swarm network ID: 25 of [0-9a-z]
DEADLINE = 10.0


def network(nid=NET, mode="deny"):
    return Network(id=nid, vni=7, mtu=1450, internal=False, subnets=[Subnet("10.0.0.0/24", None)], policy=mode)


@pytest.fixture
def kv():
    kv = FakeKV()
    store = NetworkStore(kv)
    store.put_network(network(), "h1", NET)
    store.put_network(network(OTHER, mode="open"), "h1", OTHER)
    return kv


@pytest.fixture
def engine(monkeypatch):
    """This host's Docker engine as the CLI sees it: (ID, name, driver) of its networks (docker_networks is the
    CLI's one seam to the engine)."""
    networks = [(NET, "backend", "vxnet:latest"), (OTHER, "frontend", "vxnet:latest"),
                ("ef" * 32, "bridge", "bridge"), ("12" * 32, "elsewhere", "vxnet:latest")]
    monkeypatch.setattr(policy_cli, "docker_networks", lambda: list(networks))
    return networks


def vxnet(kv, argv, capsys=None):
    """(exit status, stdout, stderr) of `vxnet argv` against kv, through the real parser and the real error
    handling of cli/main.py (a VxnetError from run is exit 2 with its message)."""
    args = main.parser().parse_args(argv)
    out = io.StringIO()
    ctx = context.Context(settings=config.load_client({}), as_json=args.json, out=out, _kv=kv)
    try:
        status = args.func(ctx, args)
    except VxnetError as exc:
        return context.CANNOT_RUN, out.getvalue(), str(exc)
    return status, out.getvalue(), capsys.readouterr().err if capsys else ""


def rule_keys(kv):
    return sorted(k for k in kv.data if k.startswith(schema.PREFIX + "/policy/"))


def test_allow_ls_rm_round_trip_by_name_and_by_id(kv, engine, capsys):
    status, out, err = vxnet(kv, ["policy", "allow", "backend", "--from", "label=role=client", "--to", "service=db",
                                  "--port", "5432/tcp"], capsys)
    rule = Rule.make(NET, Selector("label", "role", "client"), Selector("service", "", "db"), [Port("tcp", 5432)])
    assert (status, out, err) == (0, f"allowed {rule.id}: from label=role=client to service=db ports 5432/tcp\n", "")
    assert rule_keys(kv) == [schema.Schema().policy_rule(NET, rule.id)]
    assert Rule.from_json(kv.data[rule_keys(kv)[0]].value) == rule
    # The same allow again, by ID prefix, ports in another order and spelling: one rule, nothing written.
    revision = kv.rev
    status, out, _ = vxnet(kv, ["policy", "allow", NET[:12], "--from", "label=role=client", "--to", "service=db",
                                "--port", "5432"], capsys)
    assert status == 0 and out.startswith(f"already allowed (nothing written) {rule.id}") and kv.rev == revision
    status, out, _ = vxnet(kv, ["policy", "allow", NET, "--from", "any", "--to", "container=web1", "--port",
                                "80/tcp", "443/tcp", "--port", "53/udp", "--json"], capsys)
    second = json.loads(out)
    assert status == 0 and second["created"] is True and second["mode"] == "deny" and second["warning"] is None
    assert second["rule"]["ports"] == ["80/tcp", "443/tcp", "53/udp"]  # by protocol, then number
    status, out, _ = vxnet(kv, ["policy", "ls", "backend"], capsys)
    assert status == 0 and out.splitlines() == [
        f"network {NET[:12]}: policy deny",
        "RULE          FROM               TO              PORTS",
        f"{second['rule']['id']}  any                container=web1  80/tcp,443/tcp,53/udp",
        f"{rule.id}  label=role=client  service=db      5432/tcp"]
    status, out, _ = vxnet(kv, ["policy", "ls", NET, "--json"], capsys)
    listed = json.loads(out)
    assert (listed["network"], listed["mode"], listed["audit"]) == (NET, "deny", False)
    assert [r["id"] for r in listed["rules"]] == [second["rule"]["id"], rule.id]
    status, out, _ = vxnet(kv, ["policy", "rm", "backend", rule.id], capsys)
    assert (status, out) == (0, f"removed {rule.id}: from label=role=client to service=db ports 5432/tcp\n")
    assert rule_keys(kv) == [schema.Schema().policy_rule(NET, second["rule"]["id"])]
    # Removing it again is an error, not a silent success.
    status, _, err = vxnet(kv, ["policy", "rm", "backend", rule.id], capsys)
    assert status == 2 and err == f"network {NET[:12]} has no rule {rule.id}"
    status, _, err = vxnet(kv, ["policy", "rm", "backend", "nope"], capsys)
    assert status == 2 and "rule id 'nope': a rule id is 12 hex digits" in err


@pytest.mark.parametrize("argv,message", [
    (["--from", "label=", "--to", "any"], "--from: 'label=' has no key"),
    (["--from", "any", "--to", "pod=x"], "--to: 'pod=x' is not a selector"),
    (["--from", "any", "--to", "any", "--port", "70000/tcp"], "--port: '70000/tcp' is not a port 1-65535"),
    (["--from", "any", "--to", "any", "--port", "x/icmp"], "--port: 'x/icmp' protocol must be tcp, udp or sctp"),
    (["--from", "any", "--to", "any", "--port", "80/tcp", "1-2/udp"], "--port: '1-2/udp' is a range"),
])
def test_bad_rules_are_refused_by_name_and_write_nothing(kv, engine, argv, message):
    revision = kv.rev
    status, out, err = vxnet(kv, ["policy", "allow", "backend", *argv])
    assert status == 2 and message in err and out == ""
    assert kv.rev == revision and rule_keys(kv) == []


@pytest.mark.parametrize("name,message", [
    ("nosuch", "network 'nosuch': no such network (not a vxnet network ID in etcd, nor a network name this "
               "host's Docker engine knows)"),
    ("bridge", f"network 'bridge' ({'ef' * 6}) uses the driver 'bridge', not vxnet"),
    ("elsewhere", f"network 'elsewhere' ({'12' * 6}) is not known to vxnet's etcd"),
    ("ababab", "network 'ababab': no such network"),  # fewer than 12 characters is a name, not an ID
    ("0" * 64, f"network '{'0' * 64}': no such network"),
])
def test_unknown_networks_are_refused_naming_them(kv, engine, name, message):
    revision = kv.rev
    status, _, err = vxnet(kv, ["policy", "allow", name, "--from", "any", "--to", "any"])
    assert status == 2 and message in err and kv.rev == revision


def test_no_engine_means_ids_only(kv, monkeypatch, capsys):
    def no_engine():
        raise ConnectionError("Error while fetching server API version")

    monkeypatch.setattr(policy_cli, "docker_networks", no_engine)
    status, _, err = vxnet(kv, ["policy", "ls", "backend"])
    assert status == 2 and "no network of vxnet has that ID, and no Docker engine answered to resolve it as a " \
                           "name (Error while fetching server API version)" in err
    assert vxnet(kv, ["policy", "ls", NET[:12]], capsys)[0] == 0


def test_an_ambiguous_prefix_or_name_is_refused(kv, monkeypatch):
    twin = "ab" * 6 + "cd" * 26
    NetworkStore(kv).put_network(network(twin), "h1", twin)
    monkeypatch.setattr(policy_cli, "docker_networks", lambda: [(NET, "same", "vxnet"), (twin, "same", "vxnet")])
    status, _, err = vxnet(kv, ["policy", "ls", NET[:12]])
    assert status == 2 and f"the ID prefix matches 2 networks ({NET[:12]}, {twin[:12]}); give more of it" in err
    status, _, err = vxnet(kv, ["policy", "ls", "same"])
    assert status == 2 and "2 networks have that name" in err
    assert vxnet(kv, ["policy", "ls", NET[:13]])[0] == 0


def test_a_rule_on_an_open_network_is_stored_with_a_warning(kv, engine, capsys):
    status, out, err = vxnet(kv, ["policy", "allow", "frontend", "--from", "any", "--to", "service=web"], capsys)
    assert status == 0 and out.startswith("allowed ")
    assert err == (f"vxnet policy: warning: network {OTHER[:12]} is in policy mode open: this rule has no effect (the "
                   "mode is fixed at creation; rules apply on networks created with -o policy=exposed or "
                   "-o policy=deny)\n")
    assert len(rule_keys(kv)) == 1


def test_a_swarm_network_held_by_the_manager_takes_rules_before_any_task(kv, capsys):
    store = NetworkStore(kv)
    store.add_member(SWARM, schema.SWARM_HOLDER, SWARM)  # AllocateNetwork: no record until a task runs
    status, out, err = vxnet(kv, ["policy", "allow", SWARM, "--from", "service=web", "--to", "service=db"], capsys)
    assert status == 0 and "has no record yet" in err
    assert len(PolicyStore(kv).list_rules(SWARM)) == 1
    # FreeNetwork: the manager's hold goes, and the rules with it.
    store.delete_network(SWARM, schema.SWARM_HOLDER, SWARM)
    assert rule_keys(kv) == []


def test_deleting_the_network_takes_its_rules_in_the_same_transaction(kv, engine):
    vxnet(kv, ["policy", "allow", "backend", "--from", "any", "--to", "any"])
    vxnet(kv, ["policy", "allow", "frontend", "--from", "any", "--to", "any"])
    store = NetworkStore(kv)
    store.add_member(NET, "h2", NET)
    store.delete_network(NET, "h1", NET)  # h2 still has it: the rules stay
    assert len(PolicyStore(kv).list_rules(NET)) == 1
    before = len(kv.history)
    store.delete_network(NET, "h2", NET)
    gone = [e for e in kv.history[before:] if e.kind == "delete"]
    record = [e for e in gone if e.key == schema.Schema().network(NET)]
    rules = [e for e in gone if e.key.startswith(schema.Schema().policy_rules(NET))]
    assert len(record) == 1 and len(rules) == 1 and rules[0].mod_revision == record[0].mod_revision
    assert PolicyStore(kv).list_rules(NET) == [] and len(PolicyStore(kv).list_rules(OTHER)) == 1
    status, _, err = vxnet(kv, ["policy", "ls", NET])
    assert status == 2 and f"network '{NET}': no such network" in err


def test_a_rule_racing_the_networks_deletion_is_never_left_behind(kv):
    store = PolicyStore(kv)
    rule = Rule.make(NET, Selector("any"), Selector("any"))
    # The network goes between the check and the write: the write's compare fails, the retry finds no network.
    kv.cut_in = lambda: NetworkStore(kv).delete_network(NET, "h1", NET)
    with pytest.raises(UnknownNetwork, match=f"network {NET[:12]} is not a vxnet network"):
        store.put_rule(NET, rule)
    assert rule_keys(kv) == []


def test_unreadable_records_are_skipped_with_a_warning_and_still_removable(kv, caplog):
    keys = schema.Schema()
    good = Rule.make(NET, Selector("any"), Selector("service", "", "db"))
    kv.put(keys.policy_rule(NET, good.id), good.to_json())
    kv.put(keys.policy_rule(NET, "0123456789ab"), '{"id": "0123456789ab"}')
    kv.put(keys.policy_rule(OTHER, good.id), good.to_json())  # another network's rule under this key
    with caplog.at_level(logging.WARNING):
        assert PolicyStore(kv).list_rules(NET) == [good]
        assert PolicyStore(kv).list_rules(OTHER) == []
    assert "not a valid rule" in caplog.text and "it holds rule" in caplog.text
    assert PolicyStore(kv).delete_rule(NET, "0123456789ab") is None
    with pytest.raises(UnknownRule):
        PolicyStore(kv).delete_rule(NET, "0123456789ab")


class Sink:
    """The data-plane side of the watch as state: rules by (network, id)."""

    def __init__(self):
        self.rules = {}
        self.resyncs = 0

    def resync(self, rules):
        self.resyncs += 1
        self.rules = {(r.segment, r.id): r for r in rules}

    def put_rule(self, rule):
        self.rules[(rule.segment, rule.id)] = rule

    def delete_rule(self, segment, rule_id):
        self.rules.pop((segment, rule_id), None)


def test_the_policy_watch_delivers_rules_changes_and_resyncs(kv):
    store = PolicyStore(kv)
    first = Rule.make(NET, Selector("any"), Selector("service", "", "db"), [Port("tcp", 5432)])
    store.put_rule(NET, first)
    sink = Sink()
    watcher = PolicyWatcher(kv, store, sink, max_backoff=0.05)
    watcher.start()
    try:
        wait_until(lambda: set(sink.rules) == {(NET, first.id)}, DEADLINE, "the first full read")
        second = Rule.make(OTHER, Selector("label", "role", "client"), Selector("any"))
        store.put_rule(OTHER, second)
        wait_until(lambda: set(sink.rules) == {(NET, first.id), (OTHER, second.id)}, DEADLINE, "a put event")
        store.delete_rule(NET, first.id)
        wait_until(lambda: set(sink.rules) == {(OTHER, second.id)}, DEADLINE, "a delete event")
        # A stream broken while a change happens: the full read that follows repairs it.
        kv.hold_watches()
        NetworkStore(kv).delete_network(OTHER, "h1", OTHER)
        kv.break_watches()
        kv.release_watches()
        wait_until(lambda: sink.rules == {} and sink.resyncs >= 2, DEADLINE, "a resync after a broken watch")
    finally:
        watcher.stop()


def test_rules_of_standalone_networks_sharing_an_overlay_are_the_segments(kv):
    """Each host's dockerd gives its network of `-o overlay=blue` an ID of its own: a rule given through one is
    listed, removable and in force through the other, and stays until the segment's last network goes."""
    h1_net, h2_net = "1a" * 32, "2b" * 32
    store = NetworkStore(kv)
    for nid, host in ((h1_net, "h1"), (h2_net, "h2")):
        store.put_network(dataclasses.replace(network(nid), overlay="blue"), host, "overlay-blue")
    status, out, _ = vxnet(kv, ["policy", "allow", h1_net, "--from", "any", "--to", "service=db", "--json"])
    made = json.loads(out)
    assert status == 0 and made["segment"] == "overlay-blue" and made["rule"]["segment"] == "overlay-blue"
    assert rule_keys(kv) == [schema.Schema().policy_rule("overlay-blue", made["rule"]["id"])]
    status, out, _ = vxnet(kv, ["policy", "ls", h2_net, "--json"])
    assert status == 0 and [r["id"] for r in json.loads(out)["rules"]] == [made["rule"]["id"]]
    # The same allow through the other host's network is the same rule: nothing written.
    status, out, _ = vxnet(kv, ["policy", "allow", h2_net, "--from", "any", "--to", "service=db", "--json"])
    assert status == 0 and json.loads(out)["created"] is False and len(rule_keys(kv)) == 1
    store.delete_network(h1_net, "h1", "overlay-blue")
    store.release_segment("overlay-blue")  # h2 is still a member: nothing is released
    assert len(rule_keys(kv)) == 1
    before = len(kv.history)
    store.delete_network(h2_net, "h2", "overlay-blue")
    gone = [e for e in kv.history[before:] if e.kind == "delete"]
    record = [e for e in gone if e.key == schema.Schema().network(h2_net)]
    rules = [e for e in gone if e.key.startswith(schema.Schema().policy_rules("overlay-blue"))]
    assert len(record) == 1 and len(rules) == 1 and rules[0].mod_revision == record[0].mod_revision
    store.release_segment("overlay-blue")  # a replay: nothing left to remove, no error
    assert rule_keys(kv) == []


def test_releasing_a_segment_takes_rules_left_by_an_interrupted_delete(kv):
    rule = Rule.make(NET, Selector("any"), Selector("any"))
    kv.put(schema.Schema().policy_rule(NET, rule.id), rule.to_json())  # as if the network's delete stopped halfway
    kv.delete(schema.Schema().network(NET))
    kv.delete(schema.Schema().member(NET, "h1"))
    NetworkStore(kv).release_segment(NET)
    assert rule_keys(kv) == []
