"""`vxnet policy` through the real CLI entry point (cli/main.py main) against a real etcd, on networks the real
driver created (namespaces and all) with -o policy: allow/ls/rm round trip, the same allow twice is one rule,
bad rules refused by name with nothing written (etcd's revision unchanged), a rule on an open network warned
about, the rules gone in the transaction that deletes the network, and the policy watch seeing every change."""

import io
import json
import secrets

import pytest

from kernel.links import Links
from netdriver.driver import NetworkDriver
from netdriver.isolation import Firewall
from netdriver.policy import Port, Rule, Selector
from netdriver.policy_store import PolicyStore, PolicyWatcher
from netdriver.sandbox import DataPlane
from netdriver.store import NetworkStore
from netdriver.underlay import Underlay
from store import schema
from store.kvstore import EtcdKV
from tests.harness.etcd import EtcdServer
from tests.harness.proc import wait_until
from wire import protocol as p

DEADLINE = 10.0  # a working watch delivers in milliseconds; generous for a loaded 2-core machine


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """An etcd of this module's own: the CLI writes under the default prefix (/vxnet/v1), which no other test's
    etcd data is then mixed with."""
    etcd = EtcdServer(tmp_path_factory.mktemp("etcd")).start()
    try:
        yield etcd
    finally:
        etcd.close()


class _NetworkFirewall(Firewall):
    """The network namespaces' tables only: the host's `inet vxnet` table belongs to whatever else runs here."""

    def guard_host(self, subnets):
        pass


@pytest.fixture
def cluster(server, netns_dir, monkeypatch):
    """A driver over the real etcd and kernel, the CLI's environment, and cleanup of both."""
    # No engine: names cannot be resolved here, IDs are (a Docker engine on this machine is not ours to ask).
    monkeypatch.setenv("DOCKER_HOST", f"unix://{netns_dir}-no-docker.sock")
    kv = EtcdKV([server.url])
    links = Links(netns_dir)
    underlay = Underlay(lambda a: 65536, "127.0.0.1")
    plane = DataPlane(links, underlay, _NetworkFirewall(links.nft))
    plane.sweep_host_links = lambda endpoint_ids: ([], [])  # other tests' veth ends live in this host namespace
    driver = NetworkDriver(NetworkStore(kv), plane, "h1", "local", underlay)
    made = []

    def create(mode, vni, pool):
        nid = secrets.token_hex(32)
        made.append((nid, vni))
        driver.create_network(p.CreateNetworkRequest.decode({
            "NetworkID": nid, "Options": {"com.docker.network.generic": {"vni": str(vni), "policy": mode}},
            "IPv4Data": [{"Pool": pool, "Gateway": pool.replace("0/24", "1/24")}]}))
        return nid

    try:
        yield kv, driver, create
    finally:
        for nid, vni in made:
            plane.remove_network(nid, vni)
        links.close()
        kv.delete_prefix(schema.PREFIX + "/")


def vxnet(server, capsys, *argv):
    """(exit status, stdout, stderr) of the real `vxnet` entry point against the real etcd."""
    from cli import main

    out = io.StringIO()
    status = main.main(list(argv), environ={"ETCD_ENDPOINTS": server.url}, out=out)
    return status, out.getvalue(), capsys.readouterr().err


def rule_keys(kv, nid=""):
    entries, _ = kv.get_prefix(schema.Schema().policy_rules(nid) if nid else schema.Schema().prefix(schema.POLICY))
    return [e.key for e in entries]


def test_allow_ls_rm_round_trip_and_the_same_allow_is_one_rule(server, cluster, capsys):
    kv, driver, create = cluster
    nid = create("deny", 9000301, "10.77.31.0/24")
    assert NetworkStore(kv).get_network(nid).policy == "deny"  # the -o option, as the driver recorded it
    status, out, err = vxnet(server, capsys, "policy", "allow", nid, "--from", "label=role=client", "--to",
                             "service=db", "--port", "5432/tcp", "--json")
    made = json.loads(out)
    rule = Rule.make(nid, Selector("label", "role", "client"), Selector("service", "", "db"), [Port("tcp", 5432)])
    assert (status, err) == (0, "") and made["created"] is True and made["rule"] == rule.to_dict()
    assert rule_keys(kv, nid) == [schema.Schema().policy_rule(nid, rule.id)]
    assert Rule.from_json(kv.get(rule_keys(kv, nid)[0]).value) == rule

    # The same allow, by its 12-character ID: one rule, and etcd's revision does not move.
    _, revision = kv.get_prefix(schema.PREFIX + "/")
    status, out, _ = vxnet(server, capsys, "policy", "allow", nid[:12], "--from", "label=role=client", "--to",
                           "service=db", "--port", "5432")
    assert status == 0 and out.startswith(f"already allowed (nothing written) {rule.id}")
    assert kv.get_prefix(schema.PREFIX + "/")[1] == revision and len(rule_keys(kv, nid)) == 1

    status, out, _ = vxnet(server, capsys, "policy", "allow", nid, "--from", "any", "--to", "container=web1")
    assert status == 0
    status, out, _ = vxnet(server, capsys, "policy", "ls", nid[:12], "--json")
    listed = json.loads(out)
    assert status == 0 and (listed["network"], listed["mode"]) == (nid, "deny")
    assert sorted(r["to"] for r in listed["rules"]) == ["container=web1", "service=db"]
    status, out, _ = vxnet(server, capsys, "policy", "ls", nid)
    assert status == 0 and out.splitlines()[0] == f"network {nid[:12]}: policy deny" and len(out.splitlines()) == 4

    status, out, _ = vxnet(server, capsys, "policy", "rm", nid, rule.id)
    assert status == 0 and out == f"removed {rule.id}: from label=role=client to service=db ports 5432/tcp\n"
    assert len(rule_keys(kv, nid)) == 1
    status, _, err = vxnet(server, capsys, "policy", "rm", nid, rule.id)
    assert status == 2 and err == f"vxnet policy: network {nid[:12]} has no rule {rule.id}\n"


@pytest.mark.parametrize("argv,message", [
    (["--from", "label=", "--to", "any"], "--from: 'label=' has no key"),
    (["--from", "any", "--to", "service="], "--to: 'service=' has no name"),
    (["--from", "any", "--to", "any", "--port", "70000/tcp"], "--port: '70000/tcp' is not a port 1-65535"),
    (["--from", "any", "--to", "any", "--port", "x/icmp"], "--port: 'x/icmp' protocol must be tcp, udp or sctp"),
])
def test_bad_rules_are_refused_by_name_and_nothing_is_written(server, cluster, capsys, argv, message):
    kv, driver, create = cluster
    nid = create("deny", 9000302, "10.77.32.0/24")
    _, revision = kv.get_prefix(schema.PREFIX + "/")
    status, out, err = vxnet(server, capsys, "policy", "allow", nid, *argv)
    assert (status, out) == (2, "") and err.startswith(f"vxnet policy: {message}")
    assert kv.get_prefix(schema.PREFIX + "/")[1] == revision and rule_keys(kv) == []


def test_unknown_networks_are_refused_naming_them(server, cluster, capsys):
    kv, driver, create = cluster
    create("deny", 9000303, "10.77.33.0/24")
    _, revision = kv.get_prefix(schema.PREFIX + "/")
    ghost = secrets.token_hex(32)
    status, _, err = vxnet(server, capsys, "policy", "allow", ghost, "--from", "any", "--to", "any")
    assert status == 2 and f"network '{ghost}': no network of vxnet has that ID, and no Docker engine answered" in err
    status, _, err = vxnet(server, capsys, "policy", "ls", "backend")
    assert status == 2 and "network 'backend'" in err
    assert kv.get_prefix(schema.PREFIX + "/")[1] == revision


def test_a_rule_on_an_open_network_is_stored_with_a_warning(server, cluster, capsys):
    kv, driver, create = cluster
    nid = create("open", 9000304, "10.77.34.0/24")
    status, out, err = vxnet(server, capsys, "policy", "allow", nid, "--from", "any", "--to", "service=web")
    assert status == 0 and out.startswith("allowed ")
    assert err.startswith(f"vxnet policy: warning: network {nid[:12]} is in policy mode open: this rule has no "
                          f"effect")
    assert len(rule_keys(kv, nid)) == 1


def test_the_rules_go_with_the_network_and_the_watch_sees_every_change(server, cluster, capsys):
    kv, driver, create = cluster
    doomed, kept = create("deny", 9000305, "10.77.35.0/24"), create("exposed", 9000306, "10.77.36.0/24")
    seen = {}

    class Sink:
        def resync(self, rules):
            seen.clear()
            seen.update({(r.segment, r.id): r for r in rules})

        def put_rule(self, rule):
            seen[(rule.segment, rule.id)] = rule

        def delete_rule(self, segment, rule_id):
            seen.pop((segment, rule_id), None)

    watcher = PolicyWatcher(kv, PolicyStore(kv), Sink(), max_backoff=0.05)
    watcher.start()
    try:
        assert watcher.synced.wait(DEADLINE)
        for nid in (doomed, kept):
            for selector in ("service=db", "label=role=client"):
                assert vxnet(server, capsys, "policy", "allow", nid, "--from", "any", "--to", selector)[0] == 0
        wait_until(lambda: len(seen) == 4, DEADLINE, "the four rules through the watch")
        assert len(rule_keys(kv, doomed)) == 2
        driver.delete_network(p.NetworkIDRequest.decode({"NetworkID": doomed}))
        # Gone from etcd at once (one transaction with the record), and from the watcher's view.
        assert rule_keys(kv, doomed) == [] and NetworkStore(kv).get_network(doomed) is None
        assert len(rule_keys(kv, kept)) == 2
        wait_until(lambda: {n for n, _ in seen} == {kept} and len(seen) == 2, DEADLINE,
                   "the deleted network's rules leaving the watcher's view")
        status, _, err = vxnet(server, capsys, "policy", "ls", doomed)
        assert status == 2 and f"network '{doomed}'" in err
    finally:
        watcher.stop()
