"""The verdict log (plugin/flows.py) and `vxnet flows` (cli/flows.py) over a fake policy engine and fake NFLOG
readers: the ring's bound, the filters, since/follow, the names, the rate-limited marker against exact counters,
the HTTP answers and errors, and what the command prints and returns. Checked on end state: what a query answers,
what the command wrote."""

import io
import json
import re
import socket
import urllib.request
from wsgiref.util import setup_testing_defaults

import pytest

from cli import context, main
from cli import flows as flows_cli
from kernel.nflog import Record
from netdriver import policy_nft as pn
from plugin import config
from plugin import flows as pf
from plugin import metrics as pm
from tests.fakes.policy_engine import FakePolicyEngine, FakeReader
from tests.harness.proc import wait_until
from wire.errors import KernelError

NET = "ab" * 32
OTHER = "abcd" * 16  # shares NET's first two characters, not its first 12
NS = "vxnet-ns-ab"
CLIENT, DB, STRANGER = "10.89.0.2", "10.89.0.3", "10.89.0.9"
NAMES = {CLIENT: {"container": "client-1", "service": "", "endpoint": "e1" * 32, "host": "h1"},
         DB: {"container": "db.1.xyz", "service": "db", "endpoint": "e2" * 32, "host": "h2"}}


def rec(prefix=pn.LOG_DROP, src=CLIENT, dst=DB, dport=5432, when=1_700_000_000.25, proto="tcp"):
    return Record(when, prefix, src, dst, proto, 40000, dport)


class Counters:
    """PolicyFirewall.counters as state: packets per rule comment, per namespace."""

    def __init__(self):
        self.packets = {}

    def __call__(self, ns):
        if ns not in self.packets:
            raise KernelError(f"no namespace {ns}")
        return {comment: (n, n * 60) for comment, n in self.packets[ns].items()}


@pytest.fixture
def world():
    engine, counters = FakePolicyEngine(), Counters()
    engine.names_of[NET] = dict(NAMES)
    readers = []

    def open_reader(ns):
        reader = FakeReader(ns)
        readers.append(reader)
        return reader

    log = pf.FlowLog(engine, open_reader, counters, ring_size=5, threads=False)
    log.start()
    counters.packets[NS] = {pn.DROP: 0}
    engine.up(NET, NS)
    assert log.attach(NET)
    return log, engine, counters, readers


def http(app, query=""):
    environ = {"PATH_INFO": pf.PATH, "QUERY_STRING": query}
    setup_testing_defaults(environ)
    got = {}
    body = b"".join(app(environ, lambda status, headers: got.update(status=status)))
    return int(got["status"].split()[0]), json.loads(body)


def test_the_ring_keeps_the_newest_records_and_counts_the_evicted(world):
    log, _, counters, _ = world
    assert log.ingest(NET, [rec(dport=p) for p in range(1, 9)]) == 8
    counters.packets[NS] = {pn.DROP: 8}
    answer = log.query(NET)
    assert [r["dport"] for r in answer["records"]] == [4, 5, 6, 7, 8]
    assert answer["evicted"] == 3 and answer["first"] == answer["records"][0]["seq"]
    assert [r["seq"] for r in answer["records"]] == list(range(answer["first"], answer["next"] + 1))
    assert answer["counters"] == {"dropped": 8, "audit": 0, "allowed": 0}


def test_verdict_filters(world):
    log, _, _, _ = world
    log.ingest(NET, [rec(pn.LOG_DROP, dport=1), rec(pn.LOG_AUDIT, dport=2), rec(f"{pn.LOG_ALLOW}:allow", dport=3),
                     rec(f"{pn.LOG_ALLOW}:exposed", dport=4), rec("someone-else", dport=5)])
    pick = {v: [(r["dport"], r["verdict"], r["reason"]) for r in log.query(NET, v)["records"]] for v in pf.VERDICTS}
    assert pick["dropped"] == [(1, "dropped", "no-rule"), (2, "audit", "no-rule")]  # audit: would have been
    assert pick["audit"] == [(2, "audit", "no-rule")]
    assert pick["allowed"] == [(3, "allowed", "rule"), (4, "allowed", "exposed")]
    assert [d for d, _, _ in pick["all"]] == [1, 2, 3, 4]  # a prefix not ours is not a flow


def test_since_gives_exactly_what_came_after_and_next_follows(world):
    log, _, _, _ = world
    log.ingest(NET, [rec(dport=1), rec(f"{pn.LOG_ALLOW}:allow", dport=2)])
    first = log.query(NET, "dropped")
    assert [r["dport"] for r in first["records"]] == [1]
    assert first["next"] == first["records"][0]["seq"] + 1  # the allowed one counts for next, filtered or not
    assert log.query(NET, "dropped", since=first["next"])["records"] == []
    log.ingest(NET, [rec(dport=3), rec(dport=4)])
    later = log.query(NET, "dropped", since=first["next"])
    assert [r["dport"] for r in later["records"]] == [3, 4] and later["next"] > first["next"]
    assert [r["dport"] for r in log.query(NET, "all", limit=1)["records"]] == [4]
    assert log.query(NET, "all", limit=0)["records"] == []
    # A client ahead of the log (it asked another instance): nothing, and next does not go back.
    assert log.query(NET, since=10_000)["next"] == 10_000


def test_names_are_the_engines_when_the_record_arrives(world):
    log, engine, _, _ = world
    log.ingest(NET, [rec(src=CLIENT, dst=DB), rec(src=STRANGER, dst=DB)])
    engine.names_of[NET][CLIENT] = {"container": "someone-later", "service": "", "endpoint": "", "host": ""}
    first, second = log.query(NET)["records"]
    assert first["src"] == {"ip": CLIENT, "container": "client-1", "service": "", "endpoint": "e1" * 32,
                            "host": "h1"}
    assert first["dst"]["container"] == "db.1.xyz" and first["dst"]["service"] == "db"
    assert first["proto"] == "tcp" and first["dport"] == 5432 and first["sport"] == 40000
    assert second["src"] == {"ip": STRANGER, "container": "", "service": "", "endpoint": "", "host": ""}


def test_rate_limited_is_said_from_the_exact_counters(world):
    log, engine, counters, readers = world
    # Counted before the reader started: not the log's to explain.
    counters.packets[NS] = {pn.DROP: 100}
    engine.down(NET, NS)
    engine.up(NET, NS)
    assert log.attach(NET)
    log.ingest(NET, [rec(dport=p) for p in range(1, 4)])
    counters.packets[NS] = {pn.DROP: 103}
    quiet = log.query(NET)
    assert quiet["rate_limited"] is False and quiet["suppressed"]["dropped"] == 0
    counters.packets[NS] = {pn.DROP: 110, pn._allow_comment("allow"): 4}
    loud = log.query(NET, "all")
    assert loud["rate_limited"] is True
    assert loud["suppressed"] == {"dropped": 7, "audit": 0, "allowed": 4}
    assert loud["counters"] == {"dropped": 110, "audit": 0, "allowed": 4}
    readers[-1].lost = 2
    assert log.query(NET)["lost"] == 2
    # The table made again: counters restart at zero, and the accounting with them (never negative).
    counters.packets[NS] = {pn.DROP: 1}
    again = log.query(NET)
    assert again["suppressed"]["dropped"] == 1 and again["counters"]["dropped"] == 1  # none logged since
    log.ingest(NET, [rec(), rec()])
    counters.packets[NS] = {pn.DROP: 5}
    assert log.query(NET)["suppressed"]["dropped"] == 3


def test_up_again_reopens_the_reader_and_keeps_the_ring_down_drops_it(world):
    log, engine, _, readers = world
    log.ingest(NET, [rec()])
    # Up again (the table replaced, or the namespace rebuilt under its name): a new reader, the old one closed,
    # the ring kept.
    engine.up(NET, NS)
    assert readers[0].closed and log.attach(NET) and len(readers) == 2 and not readers[1].closed
    assert len(log.query(NET)["records"]) == 1
    log.ingest(NET, [rec()])
    assert [r["seq"] for r in log.query(NET)["records"]] == [1, 2]
    engine.down(NET, NS)
    assert readers[1].closed and log.query(NET) is None and log.networks() == []
    assert log.ingest(NET, [rec()]) == 0  # a reader's last batch after down goes nowhere
    engine.up(NET, "vxnet-ns-other")
    assert log.networks()[0]["ns"] == "vxnet-ns-other" and log.query(NET)["records"] == []


def test_reader_threads_read_retry_and_stop():
    engine, counters = FakePolicyEngine(), Counters()
    engine.names_of[NET] = dict(NAMES)
    counters.packets[NS] = {pn.DROP: 0}
    readers, refusals = [], [KernelError("bind NFLOG group 30328: EBUSY (another listener holds the group)")]

    def open_reader(ns):
        if refusals:
            raise refusals.pop()
        readers.append(FakeReader(ns))
        return readers[-1]

    log = pf.FlowLog(engine, open_reader, counters)
    log.start()
    try:
        engine.up(NET, NS)
        wait_until(lambda: readers, 10, "the reader opened after the refusal")
        readers[0].put(rec(dport=7))
        wait_until(lambda: log.query(NET)["records"], 5, "the record in the ring")
        assert log.query(NET)["log"] == {"running": True, "error": None}
        engine.up(NET, NS)  # rebuilt: the old reader closes before the new one opens
        wait_until(lambda: len(readers) == 2, 10, "the new reader")
        assert readers[0].closed
        readers[1].put(rec(dport=8))
        wait_until(lambda: len(log.query(NET)["records"]) == 2, 5, "the new reader's record, the old kept")
        engine.down(NET, NS)
        wait_until(lambda: readers[1].closed, 5, "the reader closed on down")
    finally:
        log.stop()


# -- HTTP -------------------------------------------------------------------------------------------------------
def test_http_answers_and_refuses_by_parameter(world):
    log, _, _, _ = world
    log.ingest(NET, [rec()])
    app = pf.make_app(log)
    status, listing = http(app)
    assert status == 200 and listing["networks"][0]["network"] == NET and listing["instance"] == log.instance
    status, answer = http(app, f"network={NET}&verdict=all&since=0")
    assert status == 200 and answer["records"][0]["dst"]["service"] == "db"
    for query, field in ((f"network={NET}&verdict=maybe", "verdict"), (f"network={NET}&since=-1", "since"),
                         (f"network={NET}&limit=x", "limit"), ("nework=1", "nework")):
        status, answer = http(app, query)
        assert status == 400 and answer["error"].startswith(field + ":"), query
    status, answer = http(app, f"network={OTHER}")
    assert status == 404 and "no namespace on this host" in answer["error"]


# -- the command --------------------------------------------------------------------------------------------------
@pytest.fixture
def cli(world, monkeypatch):
    """The command against the plugin's WSGI application, called in-process at the address it would ask."""
    log = world[0]
    app = pf.make_app(log)
    asked = []

    def fetch(where, setting, params):
        asked.append(where)
        query = "&".join(f"{k}={v}" for k, v in params.items())
        return http(app, query)

    monkeypatch.setattr(flows_cli, "fetch", fetch)
    monkeypatch.setattr(flows_cli, "docker_networks", lambda: [(NET, "backend", "vxnet"), (OTHER, "web", "bridge")])

    def run(*argv, environ=None):
        out = io.StringIO()
        code = main.main(["flows", *argv], environ=environ or {}, out=out)
        return code, out.getvalue()

    return world, run, asked


def test_cli_table_and_json(cli, capsys):
    (log, _, counters, _), run, asked = cli
    log.ingest(NET, [rec(), rec(pn.LOG_AUDIT, src=STRANGER, dport=22), rec(f"{pn.LOG_ALLOW}:allow", dport=5432)])
    counters.packets[NS] = {pn.DROP: 1, pn.AUDIT: 1, pn._allow_comment("allow"): 1}
    code, text = run(NET[:12])
    assert code == 0 and asked[0] == ("127.0.0.1", 9473)  # VXNET_METRICS_ADDR's default
    header, *rows = text.splitlines()[1:4]
    assert header.split() == flows_cli.HEADER
    assert rows[0].split()[1:] == ["dropped", CLIENT, "client-1", DB, "db.1.xyz", "(service", "db)", "tcp", "5432",
                                   "no-rule"]
    assert rows[1].split()[1:4] == ["audit", STRANGER, DB]
    assert "RATE-LIMITED" not in text and "counted (exact" in text and "not logged" in text
    code, text = run("backend", "--json", "--verdict", "allowed")  # a name, through the engine
    answer = json.loads(text)
    assert code == 0 and [(r["verdict"], r["reason"]) for r in answer["records"]] == [("allowed", "rule")]
    assert answer["counters"] == {"dropped": 1, "audit": 1, "allowed": 1} and answer["network"] == NET


def test_cli_says_when_the_log_is_rate_limited(cli):
    (log, _, counters, _), run, _ = cli
    log.ingest(NET, [rec()])
    counters.packets[NS] = {pn.DROP: 50}
    code, text = run(NET)
    assert code == 0 and "RATE-LIMITED: counted but not logged: dropped 49" in text


def test_cli_refuses_what_has_no_log_with_exit_2(cli, capsys):
    _, run, _ = cli
    for network, why in (("web", "has no namespace on that host"), ("nosuchnet", "not the ID of a network"),
                         ("ab", "not the ID of a network")):
        code, _ = run(network)
        assert code == context.CANNOT_RUN, network
        assert why in capsys.readouterr().err, network


def test_cli_follow_prints_what_arrives_until_ctrl_c(cli, monkeypatch):
    (log, _, counters, _), run, _ = cli
    log.ingest(NET, [rec(dport=1)])
    counters.packets[NS] = {pn.DROP: 1}
    ticks = []

    def sleep(_seconds):
        ticks.append(1)
        if len(ticks) == 1:
            log.ingest(NET, [rec(dport=2), rec(dport=3)])
            counters.packets[NS] = {pn.DROP: 9}  # 6 more than logged: the limit cut in
        elif len(ticks) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(flows_cli, "sleep", sleep)
    code, text = run(NET, "--follow")
    assert code == 0
    ports = [line.split()[-2] for line in text.splitlines() if re.match(r"\d\d:\d\d:\d\d\.\d{3} ", line)]
    assert ports == ["1", "2", "3"]  # each once: the second and third polls asked since the last
    assert "-- RATE-LIMITED: 6 more verdict(s) counted but not logged --" in text
    assert text.count("RATE-LIMITED: 6") == 1
    ticks.clear()
    code, text = run(NET, "--follow", "--json")
    lines = [json.loads(line) for line in text.splitlines()]
    assert code == 0 and [r["dport"] for r in lines[0]["records"]] == [1, 2, 3]
    assert [r["dport"] for line in lines[1:] for r in line["records"]] == [2, 3]


def test_cli_cannot_run_when_nothing_answers_naming_the_setting(capsys):
    with socket.socket() as probe:  # a loopback port nobody listens on (bound, then closed, by us)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = main.main(["flows", NET], environ={"VXNET_METRICS_ADDR": f"127.0.0.1:{port}"}, out=io.StringIO())
    err = capsys.readouterr().err
    assert code == 2 and "VXNET_METRICS_ADDR" in err and f"127.0.0.1:{port}" in err
    code = main.main(["flows", NET, "--host", f"127.0.0.1:{port}"], environ={}, out=io.StringIO())
    assert code == 2 and "--host: nothing answers" in capsys.readouterr().err
    code = main.main(["flows", NET], environ={"VXNET_METRICS_ADDR": ""}, out=io.StringIO())
    assert code == 2 and "VXNET_METRICS_ADDR is empty" in capsys.readouterr().err
    code = main.main(["flows", NET, "--host", "db:9473"], environ={}, out=io.StringIO())
    assert code == 2 and "--host: 'db:9473' is not host:port" in capsys.readouterr().err


def test_client_settings_read_the_metrics_address():
    assert config.load_client({}).metrics_addr == ("127.0.0.1", 9473)
    assert config.load_client({"VXNET_METRICS_ADDR": "[::1]:9500"}).metrics_addr == ("::1", 9500)
    assert config.load_client({"VXNET_METRICS_ADDR": ""}).metrics_addr is None


class NoDrops:
    def dropped(self, ns):
        return {}


def test_the_metrics_server_serves_the_log_beside_metrics_over_loopback(world):
    """The real server and the command's real HTTP client, on a loopback port: /v1/flows answers, a 404's JSON
    reason comes through, and /metrics is still Prometheus."""
    log = world[0]
    log.ingest(NET, [rec()])
    server = pm.MetricsServer(("127.0.0.1", 0), pm.Collector(lambda: {}, lambda: {}, NoDrops()),
                              apps={pf.PATH: pf.make_app(log)})
    server.start()
    try:
        where = ("127.0.0.1", server.port)
        status, answer = flows_cli.get_json(where, "--host", {"network": NET})
        assert status == 200 and answer["records"][0]["dst"]["container"] == "db.1.xyz"
        status, answer = flows_cli.get_json(where, "--host", {"network": OTHER})
        assert status == 404 and "no namespace on this host" in answer["error"]
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as reply:
            assert b"vxnet_build_info" in reply.read()
    finally:
        server.stop()


PORT = "vxp" + ("e1" * 32)[:11]  # CLIENT's bridge port (kernel/names.py veth_bridge of its endpoint)


def test_anti_spoofing_and_isolation_drops_are_logged_named_and_counted_exactly():
    """A forged frame from CLIENT's port: its source is the port's container, whatever address it claimed; a
    host isolation drop is filed under the network whose subnet holds an end; each reason's exact counter and
    what its rate limit held back are in the answer, and --verdict dropped shows all three reasons."""
    engine, counters = FakePolicyEngine(), Counters()
    engine.names_of[NET] = dict(NAMES)
    engine.subnets_of[NET] = ["10.89.0.0/24"]
    guards = {NS: {"vxnet:anti-spoofing:ip": (3, 180)}, None: {"vxnet:isolation:from-overlay": (1, 60)}}
    log = pf.FlowLog(engine, FakeReader, counters, threads=False, guards=lambda ns: dict(guards[ns]),
                     host_reader=lambda: FakeReader("host"))
    log.start()
    counters.packets[NS] = {}  # an open network: no policy table
    engine.up(NET, NS)
    assert log.attach(NET) and log.attach(pf.HOST)
    assert [n["network"] for n in log.networks()] == [NET]  # the host's log is no network
    spoofed = Record(1.0, "vxnet:drop:anti-spoofing:ip", DB, STRANGER, "icmp", 0, 0, 8, port=PORT, port_index=7,
                     mac="02:42:0a:59:00:02")
    arp = Record(2.0, "vxnet:drop:anti-spoofing:arp-ip", DB, CLIENT, "arp", 0, 0, port=PORT)
    assert log.ingest(NET, [spoofed, arp]) == 2
    routed = Record(3.0, "vxnet:drop:isolation:from-overlay", CLIENT, "192.0.2.1", "tcp", 40000, 443)
    elsewhere = Record(4.0, "vxnet:drop:isolation:to-overlay", "192.0.2.1", "10.200.0.1", "tcp", 40000, 80)
    assert log.ingest(pf.HOST, [routed, elsewhere]) == 1  # the other subnet is no network here: counted only
    guards[NS]["vxnet:anti-spoofing:ip"] = (6, 360)  # 3 more since the reader started, 1 logged (+1 ARP)
    guards[NS]["vxnet:anti-spoofing:arp-ip"] = (1, 42)
    guards[None]["vxnet:isolation:from-overlay"] = (5, 300)  # 4 more, 1 logged (plus 1 to-overlay seen)
    guards[None]["vxnet:isolation:to-overlay"] = (1, 60)
    answer = log.query(NET)
    first, second, third = answer["records"]
    assert (first["verdict"], first["reason"], first["rule"], first["port"], first["mac"]) == \
        ("dropped", "anti-spoofing", "ip", PORT, "02:42:0a:59:00:02")
    # The sender is client-1 (its port), though the frame claimed the db's address.
    assert first["src"] == {"ip": DB, "container": "client-1", "service": "", "endpoint": "e1" * 32, "host": "h1"}
    assert (second["proto"], second["rule"], second["src"]["container"]) == ("arp", "arp-ip", "client-1")
    assert (third["reason"], third["rule"], third["src"]["container"], third["dst"]["ip"]) == \
        ("isolation", "from-overlay", "client-1", "192.0.2.1")
    assert answer["guards"] == {"anti-spoofing": {"counted": 7, "suppressed": 2},
                                "isolation": {"counted": 6, "suppressed": 3}}
    assert answer["counters"] == {"dropped": 0, "audit": 0, "allowed": 0} and answer["rate_limited"] is True
    assert answer["not_logged"].startswith("cleartext drops")  # the only reason left unlogged
    assert [r["reason"] for r in log.query(NET, "allowed")["records"]] == []
    text = flows_cli.summary(answer)
    assert "anti-spoofing 7" in text and "isolation 6 (the host's" in text and "anti-spoofing 2" in text
    assert "anti-spoofing:ip (" + PORT in flows_cli.table(flows_cli._rows(answer["records"]))
    # A positive control for the counts: nothing more dropped, nothing more held back.
    assert log.query(NET)["guards"]["anti-spoofing"]["suppressed"] == 2
    engine.down(NET, NS)
    assert log.query(NET) is None
