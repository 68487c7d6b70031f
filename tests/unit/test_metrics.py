"""Metrics: the nft counter parser, the drop counters made monotonic, the scrape-time collector over the real
driver, PeerSync and EncryptionManager on fakes, the call/etcd/resync counters where they are incremented, and
the server on loopback (a port taken is a start-up error naming the setting)."""

import json
import os
import re
import socket
import urllib.request

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from encrypt.firewall import LABEL_IN, LABEL_OUT
from encrypt.firewall import Firewall as IpsecFirewall
from encrypt.manager import EncryptionManager
from encrypt.ring import KeyRing
from kernel import libnftables, names
from netdriver import isolation
from netdriver.driver import NetworkDriver
from netdriver.models import PeerRecord
from netdriver.peerdb import PeerDB
from netdriver.store import NetworkStore
from netdriver.underlay import Underlay
from netdriver.watcher import PeerSync
from plugin import metrics as pm
from plugin.http import make_app
from store.kvstore import EtcdKV
from telemetry import metrics as m
from tests.fakes import FakeDataPlane, FakeKV, FakeNftables, FakeXfrm
from wire import protocol as p
from wire.errors import ConfigError, Conflict, KernelError
from wire.version import current as _version

NID, NID2 = "a" * 64, "b" * 64
EID, EID2 = "e" * 64, "f" * 64


# -- the parser ------------------------------------------------------------------------------------------------
# The shape libnftables 1.0.6 answers `list table bridge vxnet` with (captured here, sets trimmed, counters set).
LISTED = json.dumps({"nftables": [
    {"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}},
    {"table": {"family": "bridge", "name": "vxnet", "handle": 2}},
    {"set": {"family": "bridge", "name": "ports", "table": "vxnet", "type": "ifname", "handle": 1,
             "elem": ["vxp0123456789a"]}},
    {"chain": {"family": "bridge", "table": "vxnet", "name": "forward", "handle": 4, "type": "filter",
               "hook": "forward", "prio": -10, "policy": "accept"}},
    {"rule": {"family": "bridge", "table": "vxnet", "chain": "forward", "handle": 5,
              "comment": "vxnet:anti-spoofing:mac", "expr": [
                  {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "@ports"}},
                  {"counter": {"packets": 3, "bytes": 294}}, {"drop": None}]}},
    {"rule": {"family": "bridge", "table": "vxnet", "chain": "forward", "handle": 6,
              "comment": "vxnet:anti-spoofing:ip", "expr": [
                  {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "@ports"}},
                  {"counter": {"packets": 5, "bytes": 420}}, {"drop": None}]}},
    {"rule": {"family": "bridge", "table": "vxnet", "chain": "forward", "handle": 7,
              "comment": "vxnet:anti-spoofing:no-ipv6", "expr": [{"drop": None}]}},  # a rule without a counter
    {"rule": {"family": "bridge", "table": "vxnet", "chain": "forward", "handle": 8,
              "expr": [{"counter": {"packets": 99, "bytes": 9900}}, {"accept": None}]}},  # no comment: not ours
    {"rule": {"family": "bridge", "table": "vxnet", "chain": "forward", "handle": 9,
              "comment": "someone else's", "expr": [{"counter": {"packets": 7, "bytes": 70}}, {"drop": None}]}},
]})


def test_rule_counters_reads_each_commented_rule():
    assert libnftables.rule_counters(LISTED) == {
        "vxnet:anti-spoofing:mac": (3, 294), "vxnet:anti-spoofing:ip": (5, 420),
        "vxnet:anti-spoofing:no-ipv6": (0, 0), "someone else's": (7, 70)}
    assert libnftables.rule_counters("") == {}  # what a batch without a list command answers


def test_drops_by_reason_only_count_our_rules():
    assert isolation.dropped_by_reason(LISTED) == {"anti-spoofing": (8, 714)}
    assert isolation.drop_reason("vxnet:isolation:to-overlay") == "isolation"
    for other in ("vxnet:anti-spoofing", "vxnet:other:x", "someone else's", "vxnet: drop cleartext"):
        assert isolation.drop_reason(other) is None


def test_every_drop_rule_of_ours_counts_before_it_drops():
    endpoint = isolation.Guarded("vxp0123456789a", "10.1.0.5", "02:42:0a:01:00:05", "fd00:1::5")
    batches = (isolation.endpoint_guard_batch([endpoint]), isolation.endpoint_guard_batch([endpoint], ipv6=True),
               isolation.host_guard_batch(["10.1.0.0/24"]), IpsecFirewall(4790, FakeNftables()).batch())
    rules = [c["add"]["rule"] for batch in batches for c in batch if "rule" in c.get("add", {})]
    # (the anti-spoofing table's one accepting rule aside: it drops nothing)
    counted = [r for r in rules if isolation.drop_reason(r["comment"]) or (
        r["chain"] in ("forward", "input", "output") and r["comment"] != isolation.NOT_A_PORT)]
    # anti-spoofing IPv4-only, dual stack; host isolation for both families; the ESP firewall
    assert len(counted) == 5 + 10 + 6 + 2
    for rule in counted:
        # A drop, or a jump to the rule's log chain, which drops whatever it logs (its own test:
        # test_isolation_rules.py): either way the counter sees every packet the rule drops.
        assert rule["expr"][-2] == {"counter": None} and rule["expr"][-1] in (
            {"drop": None}, {"jump": {"target": f"drop-{rule['comment'].split(':')[-1]}"}}), rule["comment"]
        assert isolation.drop_reason(rule["comment"]) or rule["comment"].startswith("vxnet:"), rule["comment"]
    # a log rule and a drop rule behind each logged drop, and one accepting rule per anti-spoofing table
    assert len(rules) == len(counted) + 2 * (5 + 10 + 6) + 2


# -- monotonic drops -------------------------------------------------------------------------------------------
def test_drops_survive_a_rebuilt_table_and_a_vanished_namespace():
    drops = pm.Drops()
    assert drops.update({("ns1", "anti-spoofing"): (4, 400), ("host", "isolation"): (1, 84)}) == {
        "anti-spoofing": (4, 400), "isolation": (1, 84)}
    # ns1's table was rebuilt (counters from zero), ns2 appeared, the host table is unchanged.
    assert drops.update({("ns1", "anti-spoofing"): (1, 100), ("ns2", "anti-spoofing"): (2, 200),
                         ("host", "isolation"): (1, 84)}) == {"anti-spoofing": (7, 700), "isolation": (1, 84)}
    # ns1 is gone: what it counted stays.
    assert drops.update({("ns2", "anti-spoofing"): (3, 300)}) == {"anti-spoofing": (8, 800), "isolation": (1, 84)}


@given(st.lists(st.dictionaries(st.sampled_from([("a", "isolation"), ("b", "isolation"), ("c", "cleartext")]),
                                st.tuples(st.integers(0, 50), st.integers(0, 5000)), max_size=3), max_size=12))
def test_drop_totals_never_go_down(scrapes):
    drops, before = pm.Drops(), {}
    for readings in scrapes:
        totals = drops.update(readings)
        for reason, (packets, octets) in before.items():
            assert totals[reason][0] >= packets and totals[reason][1] >= octets
        before = totals


# -- the collector over fakes ----------------------------------------------------------------------------------
class Kernel:
    """One FakeNftables per namespace (None: the host's), applied as Links.nft is: a namespace that is not there
    is a KernelError."""

    def __init__(self):
        self.ns = {None: FakeNftables()}

    def __call__(self, ns, commands, what):
        if ns not in self.ns:
            raise KernelError(f"{what}: namespace {ns} does not exist")
        return self.ns[ns](ns, commands, what)


class NamespacedPlane(FakeDataPlane):
    """The fake data plane, with the real anti-spoofing and isolation tables in the Kernel's fake nftables."""

    def __init__(self, kernel):
        super().__init__()
        self.kernel, self.rules = kernel, isolation.Firewall(kernel)

    def ensure_network(self, network):
        super().ensure_network(network)
        self.kernel.ns.setdefault(names.netns(network.id), FakeNftables())

    def remove_network(self, network_id, vni=None):
        super().remove_network(network_id, vni)
        self.kernel.ns.pop(names.netns(network_id), None)

    def guard_endpoints(self, network, endpoints):
        super().guard_endpoints(network, endpoints)
        self.rules.guard_endpoints(names.netns(network.id), [(names.veth_bridge(e.id), e.ip.split("/")[0], e.mac)
                                                              for e in endpoints])

    def guard_host(self, networks):
        super().guard_host(networks)
        self.rules.guard_host([s.pool for n in networks for s in n.subnets])


def scrape(collector):
    registry = CollectorRegistry()
    registry.register(collector)
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def create(drv, nid, pool):
    drv.create_network(p.CreateNetworkRequest.decode({
        "NetworkID": nid, "Options": {"com.docker.network.generic": {}},
        "IPv4Data": [{"AddressSpace": "vxnet-local", "Pool": pool, "Gateway": ""}], "IPv6Data": None}))


def join(drv, nid, eid, address):
    drv.create_endpoint(p.CreateEndpointRequest.decode({"NetworkID": nid, "EndpointID": eid,
                                                        "Interface": {"Address": address}}))
    drv.join(p.JoinRequest.decode({"NetworkID": nid, "EndpointID": eid, "SandboxKey": "/var/run/docker/netns/x"}))


def test_collector_reads_endpoints_peers_and_drops_from_what_the_process_holds():
    kernel, kv = Kernel(), FakeKV()
    plane = NamespacedPlane(kernel)
    sync = PeerSync(PeerDB("h1"), plane)
    drv = NetworkDriver(NetworkStore(kv), plane, "h1", "local", Underlay(lambda a: 1500, "192.0.2.1"), peers=sync)
    create(drv, NID, "10.1.0.0/24")
    create(drv, NID2, "10.2.0.0/24")
    join(drv, NID, EID, "10.1.0.5/24")
    join(drv, NID, EID2, "10.1.0.6/24")
    sync.resync([(NID, 7, PeerRecord(network_id=NID, endpoint_id="c" * 64, ip="10.1.0.9", mac="02:42:0a:01:00:09",
                                     vtep="192.0.2.2", host="h2"))])
    collector = pm.Collector(drv.local_endpoints, sync.peer_counts, isolation.Firewall(kernel))
    ns1 = kernel.ns[names.netns(NID)]
    ns1.drop("vxnet:anti-spoofing:ip", 2, 196)
    kernel.ns[None].drop("vxnet:isolation:to-overlay", 1, 84, family="inet")

    kv.unavailable = True  # a scrape reads no etcd: it answers all the same
    got = scrape(collector)
    assert got[("vxnet_endpoints", (("network", NID[:12]),))] == 2
    assert got[("vxnet_endpoints", (("network", NID2[:12]),))] == 0
    assert got[("vxnet_peers", (("network", NID[:12]),))] == 1
    assert got[("vxnet_peers", (("network", NID2[:12]),))] == 0
    assert got[("vxnet_dropped_packets_total", (("reason", "anti-spoofing"),))] == 2
    assert got[("vxnet_dropped_bytes_total", (("reason", "anti-spoofing"),))] == 196
    assert got[("vxnet_dropped_packets_total", (("reason", "isolation"),))] == 1
    assert ("vxnet_dropped_packets_total", (("reason", "cleartext"),)) not in got  # no encryption configured
    assert not [k for k in got if k[0].startswith("vxnet_ipsec")]
    kv.unavailable = False

    # A DeleteEndpoint, then its network's namespace vanishing behind the driver's back, mid-life: the scrape
    # skips it, the drops it counted stay.
    drv.delete_endpoint(p.EndpointRequest.decode({"NetworkID": NID, "EndpointID": EID2}))
    del kernel.ns[names.netns(NID)]
    got = scrape(collector)
    assert got[("vxnet_endpoints", (("network", NID[:12]),))] == 1
    assert got[("vxnet_dropped_packets_total", (("reason", "anti-spoofing"),))] == 2
    # Deleting a network rebuilds the host's isolation table (its counters restart): the total does not drop.
    drv.delete_network(p.NetworkIDRequest.decode({"NetworkID": NID2}))
    got = scrape(collector)
    assert ("vxnet_endpoints", (("network", NID2[:12]),)) not in got
    assert got[("vxnet_dropped_packets_total", (("reason", "isolation"),))] == 1


def test_collector_with_encryption_counts_our_sas_the_key_age_and_cleartext_drops():
    nft, xfrm = FakeNftables(), FakeXfrm()
    ipsec = IpsecFirewall(names.ENCRYPTED_VXLAN_PORT, nft)
    mgr = EncryptionManager(xfrm, ipsec, names.ENCRYPTED_VXLAN_PORT)
    mgr.set_local("192.0.2.1")
    collector = pm.Collector(dict, dict, isolation.Firewall(nft), cleartext=ipsec, encryption=mgr)
    got = scrape(collector)
    assert got[("vxnet_ipsec_sas", ())] == 0 and ("vxnet_ipsec_key_age_seconds", ()) not in got  # no ring yet
    assert got[("vxnet_dropped_packets_total", (("reason", "cleartext"),))] == 0

    ring = KeyRing.initial(now=1000.0)
    mgr.set_keyring(ring)
    mgr.set_peers("seg", {"192.0.2.2", "192.0.2.3"})
    nft.drop(LABEL_IN, 3, 450, family="inet", table=names.IPSEC_TABLE)
    nft.drop(LABEL_OUT, 1, 150, family="inet", table=names.IPSEC_TABLE)
    got = scrape(collector)
    # Per peer: an inbound SA for each of the ring's two keys, an outbound one for the primary.
    assert got[("vxnet_ipsec_sas", ())] == 2 * 3 == len(xfrm.sas())
    assert got[("vxnet_ipsec_key_age_seconds", ())] > 0
    assert mgr.primary_key_age(now=1060.0) == 60.0
    assert got[("vxnet_dropped_packets_total", (("reason", "cleartext"),))] == 4
    assert got[("vxnet_dropped_bytes_total", (("reason", "cleartext"),))] == 600


# -- counted where it happens ----------------------------------------------------------------------------------
def value(metric, **labels):
    return metric.labels(**labels)._value.get()


def count(histogram, **labels):
    return sum(b.get() for b in histogram.labels(**labels)._buckets)


class Driver:
    def join(self, req):
        raise Conflict("EndpointID: never created")

    def leave(self, req):
        return {}


def test_plugin_calls_are_counted_by_method_and_outcome_with_their_latency():
    client = make_app({"NetworkDriver": Driver()}).test_client()
    method = "NetworkDriver.Leave"
    ok, seconds = value(m.PLUGIN_CALLS, method=method, outcome="ok"), count(m.PLUGIN_CALL_SECONDS, method=method)
    refused = value(m.PLUGIN_CALLS, method="NetworkDriver.Join", outcome="Conflict")
    bad = value(m.PLUGIN_CALLS, method=method, outcome="InvalidRequest")
    body = json.dumps({"NetworkID": NID, "EndpointID": EID})
    assert client.post("/NetworkDriver.Leave", data=body).status_code == 200
    assert client.post("/NetworkDriver.Join", data=json.dumps(
        {"NetworkID": NID, "EndpointID": EID, "SandboxKey": "/x"})).status_code == 409
    assert client.post("/NetworkDriver.Leave", data="{not json").status_code == 400
    assert client.post("/NetworkDriver.Nonsense", data=body).status_code == 404  # not counted: unbounded
    assert value(m.PLUGIN_CALLS, method=method, outcome="ok") == ok + 1
    assert value(m.PLUGIN_CALLS, method="NetworkDriver.Join", outcome="Conflict") == refused + 1
    assert value(m.PLUGIN_CALLS, method=method, outcome="InvalidRequest") == bad + 1
    assert count(m.PLUGIN_CALL_SECONDS, method=method) == seconds + 2


def test_etcd_requests_and_errors_are_counted_by_operation():
    with socket.socket() as s:  # a port nothing listens on: connection refused
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    kv = EtcdKV([url], timeout=1)
    before = (value(m.ETCD_REQUESTS, op="kv/range"), value(m.ETCD_ERRORS, op="kv/range"),
              count(m.ETCD_SECONDS, op="kv/range"), value(m.ETCD_ERRORS, op="watch"))
    with pytest.raises(Exception, match="unreachable"):
        kv.get("/x")
    with pytest.raises(Exception, match="unreachable"):
        next(iter(kv.watch("/x/", 1)))
    assert (value(m.ETCD_REQUESTS, op="kv/range"), value(m.ETCD_ERRORS, op="kv/range"),
            count(m.ETCD_SECONDS, op="kv/range"), value(m.ETCD_ERRORS, op="watch")) == (
        before[0] + 1, before[1] + 1, before[2] + 1, before[3] + 1)


# -- the server --------------------------------------------------------------------------------------------------
def test_a_taken_port_is_an_error_naming_the_setting_then_the_server_serves_and_stops():
    kernel = Kernel()
    collector = pm.Collector(lambda: {NID: 1}, dict, isolation.Firewall(kernel))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"VXNET_METRICS_ADDR: cannot serve metrics on 127.0.0.1:{port}"):
            pm.MetricsServer(("127.0.0.1", port), collector).start()
    server = pm.MetricsServer(("127.0.0.1", 0), collector)  # the failed start left nothing registered
    server.start()
    try:
        port = server.port
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        assert families["vxnet_build_info"].samples[0].labels["version"]
        assert families["vxnet_endpoints"].samples[0].value == 1
        assert "vxnet_plugin_calls" in families and "vxnet_etcd_requests" in families
    finally:
        server.stop()
    server.stop()  # again: nothing left to stop
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_the_readme_says_what_every_metric_means():
    """The README's Metrics table names every family vxnet exports, and nothing it does not."""
    nft, xfrm = FakeNftables(), FakeXfrm()
    ipsec = IpsecFirewall(names.ENCRYPTED_VXLAN_PORT, nft)
    mgr = EncryptionManager(xfrm, ipsec, names.ENCRYPTED_VXLAN_PORT)
    mgr.set_keyring(KeyRing.initial())
    collector = pm.Collector(lambda: {NID: 0}, lambda: {NID: 0}, isolation.Firewall(nft), ipsec, mgr)
    pm.set_build_info()
    exported = {f.name for f in REGISTRY.collect() if f.name.startswith("vxnet_")}
    exported |= {f.name for f in collector.collect()}
    readme = open(os.path.join(os.path.dirname(__file__), "..", "..", "README.md")).read()
    section = readme[readme.index("### Metrics"):readme.index("### Looking inside")]
    documented = {re.sub(r"_total$", "", name) for name in re.findall(r"^\| `(vxnet_\w+)", section, re.M)}
    documented |= {re.sub(r"_total$", "", name) for name in re.findall(r"`, `(vxnet_\w+)", section)}
    documented = {re.sub(r"_info$", "", name) for name in documented}
    assert documented == exported


def test_build_info_carries_the_version_pyproject_declares():
    with open(os.path.join(os.path.dirname(__file__), "..", "..", "pyproject.toml")) as f:
        declared = re.search(r'^version = "([^"]+)"$', f.read(), re.M).group(1)  # [project]'s, the only one
    assert declared == _version()
