"""Policy inside a network (issue 13) as a user sees it: real dockerd 20.10 in simulated hosts, the plugin as a
host process on each, the test etcd, `vxnet policy` run in a host.

- `-o policy=exposed`: a client reaches a container's exposed port and not an unexposed one of the same
  container, from the same host and from another host.
- `-o policy=deny` and `vxnet policy allow NET --from label=role=client --to service=db --port 5432/tcp` (db: a
  container carrying Compose's service label): the client connects, another container does not, the client
  cannot reach another port of db, db cannot open a connection back to the client, replies flow (the server's
  "ok" is the reply); the rule removed: refused again within 2 s; over IPv6 too (a dual-stack network).
- A Compose file with `expose:`, labels and both modes.
- Audit mode: what would be dropped connects, and `vxnet flows` logs it; a deny network's refused attempts in
  `vxnet flows` with the names of both ends, the protocol and the port.
- A plugin restart during traffic: an established connection survives, refused stays refused, allowed still
  connects (probe loops inside the containers, across the restart).
- Bad rules refused by name with nothing written in etcd; everything removed with the network (no policy key,
  no table).

Every "refused" is a probe that timed out (a drop, not a reset: tests/harness/policy.py refused()), and comes
with the same probe succeeding where it should (same command, same time-out), and every server is checked on its
container's loopback first.
"""

import json
import time

import pytest

from kernel import names
from netdriver import policy_nft
from store import schema
from tests.harness.containers import pings, run_sleeper
from tests.harness.images import IMAGE
from tests.harness.policy import (
    all_refused,
    allow,
    allows,
    compose,
    connects,
    counter,
    etcd_revision,
    ips,
    loop_results,
    network_created,
    open_stream,
    policy_keys,
    policy_table,
    refused,
    remove_rule,
    serve,
    serve_ticker,
    set_elements,
    start_loop,
    stop_loop,
    stream_ticks,
    vxnet,
    wait_connects,
)
from tests.harness.proc import wait_until

# IPv4 subnets of these tests: 10.200.63-69 (tests/harness/hosts.py keeps 10.200.0.0/13 for tests).
SUB_EXPOSED = "10.200.63.0/24"
SUB_DENY = "10.200.64.0/24"
SUB4_V6, SUB6_V6 = "10.200.65.0/24", "fd00:65::/64"
SUB_AUDIT = "10.200.66.0/24"
SUB_FRONT, SUB_BACK = "10.200.67.0/24", "10.200.68.0/24"
SUB_BAD = "10.200.69.0/24"

DB_PORT = 5432
OTHER_PORT = 7000
STREAM_PORT = 6000
COMPOSE_SERVICE = "com.docker.compose.service"
REMOVAL_DEADLINE_S = 2.0  # the bound for a removed rule to be refused again
IN_FORCE_DEADLINE_S = 1.0  # the bound for a rule change to reach the destination host's kernel
DROP_COMMENT, AUDIT_COMMENT = policy_nft.DROP, policy_nft.AUDIT


def identified(etcd, segment: str, host, container: str, network: str):
    """The container's peer record once it carries an identity (rules by label or service apply from then on).
    segment: the network ID, or overlay-<NAME> for a network made with -o overlay=NAME (store/schema.py)."""
    raw = host.docker("inspect", "--format", "{{json .NetworkSettings.Networks}}", container).stdout
    eid = json.loads(raw)[network]["EndpointID"]
    value = etcd.get(f"{schema.PREFIX}/peers/{segment}/{eid}")
    record = json.loads(value) if value else None
    return record if record and record.get("identity") else None


def wait_identities(etcd, segment, network, *placed):
    for host, container in placed:
        wait_until(lambda: identified(etcd, segment, host, container, network), 30, f"{container}'s identity")


def deny_network(hosts, etcd, name, subnet, *extra, v6=None):
    """A deny network on every host (standalone hosts sharing one overlay, -o overlay=NAME: each host has its
    own network ID); db (the Compose label service=db, servers on 5432 and 7000) and `other` (no label) on the
    first host, client (role=client, a server on 7000) on the last. Rules go through the first host (db's: the
    policy is enforced at the destination). Returns ({host name: network ID}, {container: (v4, v6)})."""
    argv = ["--subnet", subnet, "-o", "policy=deny", "-o", f"overlay={name}", *extra]
    if v6:
        argv = ["--ipv6", "--subnet", v6] + argv
    nids = {h.name: network_created(h, name, *argv) for h in hosts}
    h1, h2 = hosts[0], hosts[-1]
    run_sleeper(h1, "db", name, "--label", f"{COMPOSE_SERVICE}=db")
    run_sleeper(h1, "other", name)
    run_sleeper(h2, "client", name, "--label", "role=client")
    serve(h1, "db", DB_PORT, OTHER_PORT)
    serve(h2, "client", OTHER_PORT)
    wait_identities(etcd, f"overlay-{name}", name, (h1, "db"), (h1, "other"), (h2, "client"))
    return nids, {c: ips(h, c, name) for h, c in ((h1, "db"), (h1, "other"), (h2, "client"))}


@pytest.fixture
def two(hosts, vxnet_plugin):
    h1, h2 = hosts(2)
    plugins = {h1.name: vxnet_plugin(h1), h2.name: vxnet_plugin(h2)}
    return h1, h2, plugins


# --- exposed ----------------------------------------------------------------------------------------------------------
def test_exposed_mode_opens_the_exposed_port_and_not_another_one_on_one_host_and_across(two, etcd):
    h1, h2, _ = two
    nid = {h.name: network_created(h, "ex", "--subnet", SUB_EXPOSED, "-o", "policy=exposed", "-o", "overlay=ex")
           for h in (h1, h2)}
    run_sleeper(h1, "srv", "ex", "--expose", str(DB_PORT))
    run_sleeper(h1, "near", "ex")
    run_sleeper(h2, "far", "ex")
    serve(h1, "srv", DB_PORT, OTHER_PORT)
    srv = ips(h1, "srv", "ex")[0]
    for host, client in ((h1, "near"), (h2, "far")):
        wait_connects(host, client, srv, DB_PORT)  # exposed: open to the network
        assert refused(host, client, srv, OTHER_PORT), f"{client} reached srv's unexposed {OTHER_PORT}"
        assert connects(host, client, srv, DB_PORT)  # the control again, after the refusal
    # The containers expose nothing: nobody may open a connection to them, srv included (the same probe).
    serve(h2, "far", OTHER_PORT)
    assert refused(h1, "srv", ips(h2, "far", "ex")[0], OTHER_PORT)
    # The kernel side: srv's exposed port in the destination host's table, nothing of it on the other host's.
    assert [srv, "tcp", DB_PORT] in [e.get("concat") for e in _elements(h1, nid[h1.name], "exposed4")]
    assert [srv, "tcp", DB_PORT] not in [e.get("concat") for e in _elements(h2, nid[h2.name], "exposed4")]


def _elements(host, nid, name):
    return [e for e in set_elements(policy_table(host, nid), name) if isinstance(e, dict)]


# --- deny + one allow rule --------------------------------------------------------------------------------------------
def test_deny_with_a_rule_from_label_to_service_on_one_port(two, etcd):
    h1, h2, _ = two
    nids, ip = deny_network((h1, h2), etcd, "dn", SUB_DENY)
    nid = nids[h1.name]
    db, client = ip["db"][0], ip["client"][0]

    # Deny: before any rule, nothing new gets in, not even from the same host.
    assert refused(h2, "client", db, DB_PORT)
    assert refused(h1, "other", db, DB_PORT)

    # The write is the command's last act (after a Python start-up and the engine's name lookup), so from its
    # return to the element in the kernel is the rule's way through etcd's watch and the engine, to within the
    # command's exit; its start is printed too.
    invoked = time.monotonic()
    rule = allow(h1, etcd.url, "dn", "label=role=client", "service=db", f"{DB_PORT}/tcp")
    returned = time.monotonic()
    wait_until(lambda: allows(h1, nid, client, db, "tcp", DB_PORT), 10, "the allow element in db's host's kernel",
               interval=0.02)
    done = time.monotonic()
    print(f"\nrule in force in the destination's kernel {(done - returned) * 1000:.0f} ms after `vxnet policy "
          f"allow` returned, {(done - invoked) * 1000:.0f} ms after it was started")
    assert done - returned <= IN_FORCE_DEADLINE_S, f"the rule took {done - returned:.2f}s to reach {h1.name}'s kernel"

    wait_connects(h2, "client", db, DB_PORT, timeout=5)  # across hosts; the "ok" is db's reply: replies flow
    assert refused(h1, "other", db, DB_PORT), "a container without role=client reached db:5432"
    assert refused(h2, "client", db, OTHER_PORT), "the client reached a port of db the rule does not name"
    assert refused(h1, "db", client, OTHER_PORT), "db opened a connection back to the client"
    assert connects(h2, "client", db, DB_PORT)  # the control, same probe, after the refusals

    remove_rule(h1, etcd.url, "dn", rule["id"])
    removed = time.monotonic()

    def refused_again():
        return time.monotonic() if not connects(h2, "client", db, DB_PORT) else None

    first_refusal_started_by = wait_until(refused_again, REMOVAL_DEADLINE_S + 3, "client refused again")
    # A probe that failed started at most PROBE_S + its exec before it returned: count from its start.
    elapsed = first_refusal_started_by - removed
    print(f"refused again: the first refused probe returned {elapsed:.2f}s after `vxnet policy rm`")
    assert not allows(h1, nid, client, db, "tcp", DB_PORT)
    assert elapsed - 1.0 <= REMOVAL_DEADLINE_S, f"still connecting {elapsed:.2f}s after the rule's removal"
    assert refused(h2, "client", db, DB_PORT)

    # Everything goes with the network: before, the key-less network still has its table (the control); after,
    # no table, no namespace, no policy key.
    rule2 = allow(h1, etcd.url, "dn", "any", "container=db")
    # Rules are the segment's (the networks of one -o overlay=NAME have an ID per host, one segment).
    assert list(policy_keys(etcd, "overlay-dn")) == [f"{schema.PREFIX}/policy/overlay-dn/{rule2['id']}"]
    assert policy_table(h1, nid) and policy_table(h2, nids[h2.name])
    for host in (h1, h2):
        host.docker("rm", "-f", *host.docker("ps", "-aq").stdout.split())
        host.docker("network", "rm", "dn")
    wait_until(lambda: not policy_keys(etcd), 30, "the network's rules to go from etcd")
    for host in (h1, h2):
        ns = names.netns(nids[host.name])
        wait_until(lambda: ns not in host.netns(), 30, f"the namespace on {host.name} to go")
        assert policy_table(host, nids[host.name]) is None


# --- IPv6 -------------------------------------------------------------------------------------------------------------
def test_deny_and_allow_over_ipv6_on_a_dual_stack_network(two, etcd):
    h1, h2, _ = two
    nids, ip = deny_network((h1, h2), etcd, "d6", SUB4_V6, v6=SUB6_V6)
    nid = nids[h1.name]
    db6, client6 = ip["db"][1], ip["client"][1]
    assert db6 and client6, ip
    assert refused(h2, "client", db6, DB_PORT)  # deny before a rule, over v6
    allow(h1, etcd.url, "d6", "label=role=client", "service=db", f"{DB_PORT}/tcp")
    wait_connects(h2, "client", db6, DB_PORT, timeout=5)  # across hosts, over v6
    assert allows(h1, nid, client6, db6, "tcp", DB_PORT)
    assert refused(h1, "other", db6, DB_PORT), "other reached db over v6"
    assert refused(h2, "client", db6, OTHER_PORT), "the client reached another port of db over v6"
    assert refused(h1, "db", client6, OTHER_PORT), "db opened a connection back to the client over v6"
    assert connects(h2, "client", db6, DB_PORT)
    assert connects(h2, "client", ip["db"][0], DB_PORT)  # the same rule over v4

    # ICMP: a rule with ports is TCP/UDP/SCTP only, so ping (a new flow) is refused, over v6 and v4; a rule without
    # ports allows the pair everything, ping included (the control: the same ping probe).
    assert not pings(h2, "client", db6) and not pings(h2, "client", ip["db"][0])
    allow(h1, etcd.url, "d6", "container=client", "container=db")
    wait_until(lambda: pings(h2, "client", db6), 5, "client's ping to db over v6 once a rule without ports is in")
    assert pings(h2, "client", ip["db"][0])
    assert not pings(h1, "other", db6)  # still nobody else
    assert refused(h1, "other", db6, DB_PORT)


# --- vxnet flows ------------------------------------------------------------------------------------------------------
def flows(plugin, network, verdict="dropped"):
    """`vxnet flows NETWORK --verdict V --json` on the plugin's host: its records."""
    status, answer = plugin.cli_json("flows", network, "--verdict", verdict)
    assert status == 0, answer
    return answer["records"]


def flow_seen(plugin, network, verdict, src_ip, dst_ip, dport, proto="tcp"):
    """The record of a connection src -> dst:dport in the host's verdict log, None while there is none."""
    for record in flows(plugin, network, verdict):
        if (record["src"]["ip"], record["dst"]["ip"], record["proto"], record["dport"]) == (src_ip, dst_ip, proto,
                                                                                           dport):
            return record
    return None


def test_vxnet_flows_shows_the_refused_attempts_with_their_names(two, etcd):
    h1, h2, plugins = two
    _, ip = deny_network((h1, h2), etcd, "fl", SUB_DENY)
    db, other, client = ip["db"][0], ip["other"][0], ip["client"][0]
    allow(h1, etcd.url, "fl", "label=role=client", "service=db", f"{DB_PORT}/tcp")
    wait_connects(h2, "client", db, DB_PORT, timeout=5)  # the allowed one: a control, not a refusal
    assert refused(h1, "other", db, DB_PORT)  # same host
    assert refused(h2, "client", db, OTHER_PORT)  # across hosts, a port no rule names
    assert refused(h1, "db", client, OTHER_PORT)  # the reverse, decided on the client's host

    p1, p2 = plugins[h1.name], plugins[h2.name]
    seen = wait_until(lambda: flow_seen(p1, "fl", "dropped", other, db, DB_PORT), 5, "other -> db in h1's flows")
    assert seen["verdict"] == "dropped" and seen["reason"] == "no-rule"
    assert (seen["src"]["container"], seen["src"]["service"], seen["src"]["host"]) == ("other", "", h1.name)
    assert (seen["dst"]["container"], seen["dst"]["service"]) == ("db", "db")
    seen = wait_until(lambda: flow_seen(p1, "fl", "dropped", client, db, OTHER_PORT), 5, "client -> db:7000")
    assert (seen["src"]["container"], seen["src"]["host"], seen["dst"]["service"]) == ("client", h2.name, "db")
    seen = wait_until(lambda: flow_seen(p2, "fl", "dropped", db, client, OTHER_PORT), 5, "db -> client in h2's")
    assert (seen["src"]["container"], seen["src"]["service"], seen["src"]["host"]) == ("db", "db", h1.name)
    assert seen["dst"]["container"] == "client"
    # The allowed connection is not among the dropped, and is among the allowed (the same query, the other filter).
    assert flow_seen(p1, "fl", "dropped", client, db, DB_PORT) is None
    allowed = wait_until(lambda: flow_seen(p1, "fl", "allowed", client, db, DB_PORT), 5, "the allowed flow")
    assert allowed["reason"] == "rule" and allowed["src"]["container"] == "client"
    # The human view names them too.
    text = p1.cli("flows", "fl").stdout
    assert "other" in text and "db" in text and "5432" in text, text


# --- audit ------------------------------------------------------------------------------------------------------------
def test_audit_mode_logs_what_it_would_drop_and_drops_nothing(two, etcd):
    h1, h2, plugins = two
    nids, ip = deny_network((h1, h2), etcd, "au", SUB_AUDIT, "-o", "policy-audit=true")
    nid = nids[h1.name]
    db, other, client = ip["db"][0], ip["other"][0], ip["client"][0]
    allow(h1, etcd.url, "au", "label=role=client", "service=db", f"{DB_PORT}/tcp")
    wait_until(lambda: counter(h1, nid, AUDIT_COMMENT) is not None, 10, "the audit rule in db's host's table")
    assert counter(h1, nid, DROP_COMMENT) is None  # audit mode: no dropping rule at all
    before = counter(h1, nid, AUDIT_COMMENT)
    # What deny would refuse (other -> db:5432, no rule) connects, counted by the audit rule; the allowed flow
    # connects without being counted there (the control: the same probe, the counter of the other verdict).
    assert connects(h1, "other", db, DB_PORT), "audit mode dropped a connection"
    assert connects(h2, "client", db, OTHER_PORT), "audit mode dropped a connection from another host"
    audited = wait_until(lambda: (lambda n: n if n >= before + 2 else None)(counter(h1, nid, AUDIT_COMMENT)), 5,
                         "both would-be drops counted by the audit rule")
    assert connects(h2, "client", db, DB_PORT)
    assert counter(h1, nid, AUDIT_COMMENT) == audited  # an allowed connection is not an audit verdict
    # ... and logged: `vxnet flows` has both as audit verdicts (would have been dropped), with their names.
    plugin = plugins[h1.name]
    seen = wait_until(lambda: flow_seen(plugin, "au", "dropped", other, db, DB_PORT), 5, "other -> db, audited")
    assert (seen["verdict"], seen["src"]["container"], seen["dst"]["service"]) == ("audit", "other", "db")
    seen = wait_until(lambda: flow_seen(plugin, "au", "dropped", client, db, OTHER_PORT), 5, "client -> db:7000")
    assert (seen["verdict"], seen["src"]["host"]) == ("audit", h2.name)
    assert flow_seen(plugin, "au", "dropped", client, db, DB_PORT) is None  # the allowed one is no audit verdict


# --- Compose ----------------------------------------------------------------------------------------------------------
COMPOSE_FILE = """\
version: "3.8"
services:
  db:
    image: {image}
    command: ["sleep", "86400"]
    init: true
    expose: ["{db_port}"]
    labels: {{role: db}}
    networks: [front, back]
  client:
    image: {image}
    command: ["sleep", "86400"]
    init: true
    labels: {{role: client}}
    networks: [front, back]
  other:
    image: {image}
    command: ["sleep", "86400"]
    init: true
    networks: [front, back]
networks:
  front:
    driver: vxnet
    driver_opts: {{policy: exposed}}
    ipam: {{driver: vxnet, config: [{{subnet: {front}}}]}}
  back:
    driver: vxnet
    driver_opts: {{policy: deny}}
    ipam: {{driver: vxnet, config: [{{subnet: {back}}}]}}
"""
PROJECT = "vxp"


def test_a_compose_file_with_expose_and_labels(hosts, vxnet_plugin, etcd, tmp_path):
    (host,) = hosts(1)
    vxnet_plugin(host)
    path = str(tmp_path / "docker-compose.yml")
    with open(path, "w") as f:
        f.write(COMPOSE_FILE.format(image=IMAGE, db_port=DB_PORT, front=SUB_FRONT, back=SUB_BACK))
    compose(path, PROJECT, host.docker_host, "up", "-d")
    try:
        c = {s: compose(path, PROJECT, host.docker_host, "ps", "-q", s).stdout.strip() for s in
             ("db", "client", "other")}
        front, back = f"{PROJECT}_front", f"{PROJECT}_back"
        nid_back = host.docker("network", "inspect", "--format", "{{.Id}}", back).stdout.strip()
        wait_identities(etcd, nid_back, back, *((host, cid) for cid in c.values()))
        serve(host, c["db"], DB_PORT, OTHER_PORT)
        db_front, db_back = ips(host, c["db"], front)[0], ips(host, c["db"], back)[0]

        # front (exposed): expose: 5432 is open to anyone on the network, 7000 is not.
        wait_connects(host, c["other"], db_front, DB_PORT)
        assert refused(host, c["other"], db_front, OTHER_PORT)
        # back (deny): only what a rule allows, expose: or not.
        assert refused(host, c["client"], db_back, DB_PORT)
        allow(host, etcd.url, back, "label=role=client", "service=db", f"{DB_PORT}/tcp")
        wait_connects(host, c["client"], db_back, DB_PORT, timeout=5)
        assert refused(host, c["other"], db_back, DB_PORT), "a container without role=client reached db"
        assert refused(host, c["client"], db_back, OTHER_PORT)
        assert connects(host, c["client"], db_back, DB_PORT)
    finally:
        compose(path, PROJECT, host.docker_host, "down")
    wait_until(lambda: not policy_keys(etcd), 30, "the back network's rule to go with it")


# --- a plugin restart during traffic ----------------------------------------------------------------------------------
def test_a_plugin_restart_during_traffic_changes_no_verdict(two, etcd):
    h1, h2, plugins = two
    _, ip = deny_network((h1, h2), etcd, "rs", SUB_DENY)
    db = ip["db"][0]
    allow(h1, etcd.url, "rs", "label=role=client", "service=db", f"{DB_PORT}/tcp", f"{STREAM_PORT}/tcp")
    serve_ticker(h1, "db", STREAM_PORT)
    wait_connects(h2, "client", db, DB_PORT, timeout=5)
    assert refused(h1, "other", db, DB_PORT)
    open_stream(h2, "client", db, STREAM_PORT)
    wait_until(lambda: stream_ticks(h2, "client")[0] >= 3, 10, "ticks on the long-lived connection")
    start_loop(h2, "client", db, DB_PORT, "allowed")
    start_loop(h1, "other", db, DB_PORT, "refused")
    wait_until(lambda: len(loop_results(h2, "client", "allowed")) >= 2 and
               len(loop_results(h1, "other", "refused")) >= 2, 20, "both probe loops under way")

    for host in (h1, h2):  # the destination's plugin and the source's, one after the other
        plugin = plugins[host.name]
        before = plugin.log(20000).count("start-up reconciliation done")
        plugin.restart()
        wait_until(lambda: plugin.log(20000).count("start-up reconciliation done") > before, 60,
                   f"{host.name}'s plugin reconciled after its restart")
    ticks_after_restarts = stream_ticks(h2, "client")[0]
    mark = (len(loop_results(h2, "client", "allowed")), len(loop_results(h1, "other", "refused")))
    wait_until(lambda: len(loop_results(h2, "client", "allowed")) >= mark[0] + 2 and
               len(loop_results(h1, "other", "refused")) >= mark[1] + 2, 20, "probes after the restarts")
    allowed, refused_ = stop_loop(h2, "client", "allowed"), stop_loop(h1, "other", "refused")
    print(f"\nacross two plugin restarts: {len(allowed)} probes of the allowed flow, {len(refused_)} of the refused")
    assert allowed and set(allowed) == {"ok"}, f"an allowed probe failed across the restart: {allowed}"
    assert all_refused(refused_), f"a refused probe connected across the restart: {refused_}"
    ticks, still_open = wait_until(lambda: (lambda t: t if t[0] > ticks_after_restarts else None)(
        stream_ticks(h2, "client")), 10, "more ticks after the restarts")
    assert still_open, "the established connection ended during the restart"
    assert connects(h2, "client", db, DB_PORT) and refused(h1, "other", db, DB_PORT)  # the same verdicts after


# --- bad rules --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,message", [
    (["nosuchnet", "--from", "any", "--to", "any"], "network 'nosuchnet': no such network"),
    (["bad", "--from", "label=", "--to", "service=db"], "--from: 'label=' has no key"),
    (["bad", "--from", "role=client", "--to", "service=db"], "--from: 'role=client'"),
    (["bad", "--from", "any", "--to", "service="], "--to: 'service=' has no name"),
    (["bad", "--from", "any", "--to", "any", "--port", "70000/tcp"], "--port: '70000/tcp' is not a port 1-65535"),
    (["bad", "--from", "any", "--to", "any", "--port", "5432/icmp"], "--port: '5432/icmp' protocol must be tcp"),
    (["bad", "--from", "any", "--to", "any", "--port", "db"], "--port: 'db'"),
])
def test_bad_rules_are_refused_by_name_and_nothing_is_written(hosts, vxnet_plugin, etcd, argv, message):
    (host,) = hosts(1)
    vxnet_plugin(host)
    nid = network_created(host, "bad", "--subnet", SUB_BAD, "-o", "policy=deny")
    good = vxnet(host, etcd.url, "policy", "allow", "bad", "--from", "any", "--to", "service=db", "--port", "5432")
    assert good.returncode == 0, good.stderr  # the control: the same command with good parts is accepted
    keys, revision = policy_keys(etcd), etcd_revision(etcd)
    done = vxnet(host, etcd.url, "policy", "allow", *argv)
    assert done.returncode == 2 and done.stdout == "", (done.returncode, done.stdout, done.stderr)
    assert done.stderr.startswith(f"vxnet policy: {message}"), done.stderr
    assert etcd_revision(etcd) == revision and policy_keys(etcd) == keys  # nothing written, anywhere
    assert len(policy_keys(etcd, nid)) == 1
