"""`vxnet doctor`'s pure parts: the lines people read and the JSON machines read, the exit status, each check's
verdict from what it found (etcd's answers, the records, the probes' outcomes), the ICMP packets the probe sends
and reads; and the whole command against an etcd that never answers, within its 10 s (loopback only)."""

import email.utils
import http.server
import io
import json
import os
import socket
import socketserver
import threading
import time

import pytest

from cli import context, doctor
from cli.main import main
from encrypt.ring import KeyRing
from kernel import ping
from netdriver.models import Endpoint, Network, Subnet
from netdriver.store import NetworkStore
from store import schema
from tests.fakes import FakeKV
from wire.errors import StoreUnavailable

NID1, NID2 = "a" * 64, "b" * 64
URL = "http://192.0.2.10:2379"


# -- output and exit status -------------------------------------------------------------------------------------
def test_one_line_per_check_with_the_fix_under_each_that_did_not_pass():
    results = [doctor.passed("etcd", "answers"), doctor.warn("stale hosts", "h9 (2)", "vxnet gc"),
               doctor.fail("path host2", "no echo", "UDP 4789 blocked?")]
    text = doctor.render(doctor.as_json(results))
    assert text.splitlines() == [
        "PASS  etcd         answers",
        "WARN  stale hosts  h9 (2)",
        "                   -> vxnet gc",
        "FAIL  path host2   no echo",
        "                   -> UDP 4789 blocked?",
        "1 passed, 1 warnings, 1 failed",
    ]


def test_json_shape_and_exit_status():
    ok = [doctor.passed("etcd", "answers"), doctor.warn("clock", "6 s ahead", "NTP")]
    assert doctor.as_json(ok) == {"ok": True, "checks": [
        {"check": "etcd", "status": "PASS", "message": "answers", "fix": ""},
        {"check": "clock", "status": "WARN", "message": "6 s ahead", "fix": "NTP"}]}
    assert doctor.exit_status(ok) == context.OK  # WARNs are advice
    bad = ok + [doctor.fail("etcd", "down", "start it")]
    assert doctor.exit_status(bad) == context.PROBLEM and doctor.as_json(bad)["ok"] is False


def test_a_bad_setting_is_could_not_run():
    assert main(["doctor", "--etcd", "not-a-url"], environ={}) == context.CANNOT_RUN


# -- etcd -------------------------------------------------------------------------------------------------------
def _answer(url=URL, leader="42", errors=(), skew=0.0, took=0.003, version="3.5.9"):
    now = 1_800_000_000.0
    status = {"version": version, "leader": leader, "header": {"member_id": "42"}}
    if errors:
        status["errors"] = list(errors)
    return url, status, email.utils.formatdate(now + skew, usegmt=True), took, now, None


def _down(url=URL, why="connection refused"):
    return url, None, None, 0.001, 0.0, StoreUnavailable(f"etcd unreachable at {url} ({why})")


def test_etcd_answering_passes_with_its_latency_and_version_and_the_clock_within_bounds():
    results, up = doctor.etcd_results([_answer()])
    assert up
    assert [(r.check, r.status) for r in results] == [("etcd", "PASS"), ("clock", "PASS")]
    assert URL in results[0].message and "3 ms" in results[0].message and "3.5.9" in results[0].message


def test_etcd_down_fails_naming_its_url():
    results, up = doctor.etcd_results([_down()])
    assert not up
    assert [(r.check, r.status) for r in results] == [("etcd", "FAIL")]
    assert URL in results[0].message and "connection refused" in results[0].message and "--etcd" in results[0].fix


def test_one_endpoint_down_of_two_warns_and_no_leader_or_alarms_are_named():
    other = "http://192.0.2.11:2379"
    results, up = doctor.etcd_results([_answer(), _down(other)])
    assert up and [(r.check, r.status) for r in results] == [("etcd", "PASS"), ("etcd", "WARN"), ("clock", "PASS")]
    assert other in results[1].message
    results, _ = doctor.etcd_results([_answer(leader="0")])
    assert results[0].status == "FAIL" and "no leader" in results[0].message
    results, _ = doctor.etcd_results([_answer(errors=["memberID:42 alarm:NOSPACE"])])
    assert results[0].status == "WARN" and "NOSPACE" in results[0].message


@pytest.mark.parametrize("skew,status,side", [(3.0, "PASS", ""), (30.0, "WARN", "behind"), (-30.0, "WARN", "ahead")])
def test_clock_skew_from_the_date_header(skew, status, side):
    results, _ = doctor.etcd_results([_answer(skew=skew)])
    clock = [r for r in results if r.check == "clock"][0]
    assert clock.status == status and side in clock.message


# -- records ----------------------------------------------------------------------------------------------------
def network(nid, mtu=1450, encrypted=False, overlay=None):
    return Network(nid, 8388608, mtu, False, [Subnet("10.200.0.0/24", "10.200.0.1")], overlay=overlay,
                   encrypted=encrypted)


def state_in_etcd():
    """Three hosts in etcd as the plugins write them: h1 and h2 share the overlay blue, h3 has none; h9 is gone
    but its endpoint record stays."""
    kv = FakeKV()
    store = NetworkStore(kv)
    for i in (1, 2, 3):
        store.register_host(f"h{i}", {"vtep": f"192.0.2.{i}", "name": f"host{i}", "health": f"169.254.0.{i}"}, 0, 0)
    store.put_network(network(NID1, overlay="blue"), "h1", "overlay-blue")
    store.put_network(network(NID2, mtu=1400, overlay="blue"), "h2", "overlay-blue")
    store.put_endpoint(Endpoint(NID1, "c" * 64, "10.200.0.2/24", "02:42:0a:c8:00:02", "h1"))
    store.put_endpoint(Endpoint(NID1, "d" * 64, "10.200.0.3/24", "02:42:0a:c8:00:03", "h9"))
    return kv


def test_the_state_is_read_in_one_round_trip_and_networks_are_found_per_host():
    kv = state_in_etcd()
    before = kv.round_trips
    state = doctor.read_state(kv, schema.Schema())
    assert kv.round_trips - before == 1
    assert sorted(state.hosts) == ["h1", "h2", "h3"] and not state.keyring
    assert [n.id for n in state.networks_of("h1")] == [NID1]
    assert [n.id for n in state.networks_of("h2")] == [NID2] and state.networks_of("h3") == []
    assert state.host_name("h2") == "host2 (h2), vtep 192.0.2.2"


def test_stale_hosts_and_duplicate_vteps():
    state = doctor.read_state(state_in_etcd(), schema.Schema())
    stale = doctor.check_stale_hosts(state)
    assert stale.status == "WARN" and "h9 (1)" in stale.message and "vxnet gc" in stale.fix
    assert doctor.check_duplicate_vteps(state).status == "PASS"
    state.hosts["h3"]["vtep"] = "192.0.2.2"
    dup = doctor.check_duplicate_vteps(state)
    assert dup.status == "FAIL" and "192.0.2.2 is the VTEP of h2, h3" in dup.message


def test_network_mtus_against_the_underlay():
    ok, too_big, encrypted = doctor.check_mtus([network(NID1, 1450, overlay="blue"), network(NID2, 1450),
                                                network("e" * 64, 1450, encrypted=True)], 1500)
    assert ok.status == "PASS" and ok.check == "mtu blue"
    assert too_big.status == "PASS"
    assert encrypted.status == "FAIL" and "1416" in encrypted.message and "-o mtu=1416" in encrypted.fix
    (small,) = doctor.check_mtus([network(NID1, 1450)], 1400)
    assert small.status == "FAIL" and "-o mtu=1350" in small.fix and "raise the underlay MTU" in small.fix


def test_vtep_must_be_an_address_here():
    assert doctor.check_vtep("192.0.2.1", {"192.0.2.1": 1500}.get).status == "PASS"
    missing = doctor.check_vtep("192.0.2.9", {"192.0.2.1": 1500}.get)
    assert missing.status == "FAIL" and "192.0.2.9 is not an address" in missing.message
    assert doctor.check_vtep(None, {}.get).status == "FAIL"


def test_drift_verdicts():
    assert doctor.check_drift([]).status == "PASS"
    assert doctor.check_drift(["x"]).status == "FAIL"


def test_this_host_is_found_by_id_or_by_its_vtep(tmp_path):
    state = doctor.read_state(state_in_etcd(), schema.Schema())

    class Settings:
        host_id = ""
        state_dir = str(tmp_path)

    assert doctor.my_host_id(Settings, state, lambda a: a == "192.0.2.2") == "h2"
    (tmp_path / "host-id").write_text("h3\n")
    assert doctor.my_host_id(Settings, state, lambda a: a == "192.0.2.2") == "h3"
    Settings.host_id = "h1"
    assert doctor.my_host_id(Settings, state, lambda a: False) == "h1"


def test_key_age():
    now = 1_800_000_000.0
    fresh = KeyRing.initial(now - 3600)
    assert doctor.check_key_age("/secret", lambda path: fresh, now).status == "PASS"
    old = KeyRing.initial(now - 30 * 3600)
    aged = doctor.check_key_age("/secret", lambda path: old, now)
    assert aged.status == "WARN" and "30.0 h" in aged.message and "vxnet keys rotate" in aged.fix
    assert doctor.check_key_age(None, lambda path: fresh, now).status == "WARN"


# -- the VXLAN paths --------------------------------------------------------------------------------------------
def test_each_other_host_is_probed_at_the_largest_mtu_of_its_networks():
    state = doctor.read_state(state_in_etcd(), schema.Schema())
    state.hosts["h4"] = {"vtep": "192.0.2.4", "name": "host4"}  # an older plugin: no health address
    targets, results = doctor.path_targets(state, "h1", 1450)
    assert [(t.host, t.address, t.full) for t in targets] == [("h2", "169.254.0.2", 1400), ("h3", "169.254.0.3", 1450)]
    assert [(r.check, r.status) for r in results] == [("path h4", "WARN")]


def _verdict(small, full, local_mtu=1450, target_mtu=1450):
    target = doctor.Target("h2", "host2 (h2), vtep 192.0.2.2", "169.254.0.2", target_mtu)
    outcomes = {("169.254.0.2", doctor.SMALL_PROBE): small, ("169.254.0.2", min(target_mtu, local_mtu)): full}
    (result,) = doctor.path_results([target], outcomes, local_mtu, 2.0)
    return result


def test_path_verdicts_name_the_host_and_tell_a_blocked_port_from_a_small_mtu():
    answered, lost = ping.Outcome(rtt=0.0004), ping.Outcome()
    good = _verdict(answered, answered)
    assert good.status == "PASS" and "1450-byte frames cross unfragmented" in good.message
    blocked = _verdict(lost, lost)
    assert blocked.status == "FAIL" and "host2" in blocked.message and "192.0.2.2" in blocked.message
    assert "UDP 4789 blocked?" in blocked.fix
    small = _verdict(answered, lost)
    assert small.status == "FAIL" and "84-byte probes cross but 1450-byte ones with DF do not" in small.message
    assert small.fix.startswith("underlay MTU smaller than the overlay needs: lower the network MTU with -o mtu=")
    clamped = _verdict(answered, answered, local_mtu=1400, target_mtu=1450)
    assert clamped.status == "PASS" and "sent at this host's 1400" in clamped.message


# -- the probe's packets ----------------------------------------------------------------------------------------
def test_internet_checksum_of_rfc1071s_example():
    # RFC 1071 section 3: the words 0001 f203 f4f5 f6f7 sum to ddf2 (folded); the checksum is its complement.
    assert ping.checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0xFFFF - 0xDDF2


@pytest.mark.parametrize("size", [ping.MIN_SIZE, doctor.SMALL_PROBE, 1450, 1451])
def test_an_echo_request_has_the_size_asked_and_a_valid_checksum(size):
    packet = ping.echo_request(0x1234, 7, size)
    assert len(packet) + ping.IP_HEADER == size
    assert packet[0] == ping.ECHO_REQUEST and ping.checksum(packet) == 0


def test_only_echo_replies_are_read_back():
    icmp = bytearray(ping.echo_request(0x1234, 7, 100))
    icmp[0] = ping.ECHO_REPLY
    ip = bytes([0x45, 0]) + (100).to_bytes(2, "big") + bytes(16)
    assert ping.parse_reply(ip + bytes(icmp)) == (0x1234, 7, 100)
    assert ping.parse_reply(ip + ping.echo_request(0x1234, 7, 100)) is None  # a request (someone pinging us)
    assert ping.parse_reply(b"\x45\x00") is None


# -- the plugin's socket and the modules ------------------------------------------------------------------------
class _Activate(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = json.dumps({"Implements": ["NetworkDriver", "IpamDriver"]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class _UnixHTTP(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def get_request(self):
        request, _ = super().get_request()
        return request, ("local", 0)  # BaseHTTPRequestHandler wants an address pair


def test_the_managed_plugins_socket_is_found_and_asked(tmp_path):
    managed = tmp_path / "plugins"
    (managed / "f00d").mkdir(parents=True)
    path = managed / "f00d" / "vxnet.sock"
    server = _UnixHTTP(str(path), _Activate)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        result = doctor.check_socket(str(tmp_path / "vxnet.sock"), managed_dir=str(managed))
    finally:
        server.shutdown()
        server.server_close()
    assert result.status == "PASS" and str(path) in result.message and "NetworkDriver" in result.message
    gone = doctor.check_socket(str(tmp_path / "vxnet.sock"), managed_dir=str(managed))
    assert gone.status == "FAIL"  # the file stays, nothing answers
    assert doctor.check_socket(str(tmp_path / "none.sock"), managed_dir=str(tmp_path / "no")).status == "FAIL"


def test_module_state_from_sysfs_the_module_lists_or_the_build_options(tmp_path):
    (tmp_path / "sys" / "vxlan").mkdir(parents=True)
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "modules.builtin").write_text("kernel/net/bridge/bridge.ko\n")
    (lib / "modules.dep").write_text("kernel/net/ipv4/esp4.ko: kernel/net/xfrm/xfrm_algo.ko\n")

    def state(name, config=dict):
        return doctor.module_state(name, str(tmp_path / "sys"), str(tmp_path / "none"), str(lib), config)

    assert state("vxlan") == "loaded" and state("bridge") == "built in" and state("esp4") == "loadable"
    assert state("nf_tables") is None
    assert state("nf_tables", lambda: {"CONFIG_NF_TABLES": "y"}) == "built in"
    missing = doctor.check_modules(True, lambda m: None if m == "esp4" else "loaded")
    assert missing.status == "FAIL" and "esp4" in missing.message and "modprobe esp4" in missing.fix
    assert doctor.check_modules(False, lambda m: None if m == "esp4" else "loaded").status == "PASS"


# -- the whole command against an etcd that never answers -------------------------------------------------------
def test_the_doctor_answers_within_its_budget_when_etcd_accepts_but_never_answers(tmp_path):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # connections complete in the kernel's backlog; nothing ever reads or answers them
    url = f"http://127.0.0.1:{silent.getsockname()[1]}"
    env = {"ETCD_ENDPOINTS": url, "VXNET_SOCKET": str(tmp_path / "vxnet.sock"),
           "VXNET_NETNS_DIR": str(tmp_path / "netns"), "VXNET_STATE_DIR": str(tmp_path / "state")}
    out = io.StringIO()
    started = time.monotonic()
    try:
        code = main(["doctor", "--json"], environ=env, out=out)
    finally:
        silent.close()
    took = time.monotonic() - started
    report = json.loads(out.getvalue())
    etcd = [c for c in report["checks"] if c["check"] == "etcd"][0]
    assert code == context.PROBLEM and etcd["status"] == "FAIL" and url in etcd["message"]
    assert "timed out" in etcd["message"]
    assert {c["check"] for c in report["checks"]} >= {"plugin socket", "kernel modules"}  # the local checks ran
    assert took < doctor.BUDGET, f"{took:.1f} s"
    assert not os.path.exists(tmp_path / "netns")  # the doctor made nothing


def test_the_doctor_reads_this_hosts_id_and_vtep_as_the_plugin_does_and_refuses_bad_ones():
    from plugin import config
    from wire.errors import ConfigError
    settings = config.load_client({"VXNET_HOST_ID": "h1", "VXNET_ADVERTISE_ADDR": "192.0.2.1"})
    assert (settings.host_id, settings.advertise_addr) == ("h1", "192.0.2.1")
    assert (config.load_client({}).host_id, config.load_client({}).advertise_addr) == ("", None)
    with pytest.raises(ConfigError, match="VXNET_HOST_ID: '../x'"):
        config.load_client({"VXNET_HOST_ID": "../x"})
    with pytest.raises(ConfigError, match="VXNET_ADVERTISE_ADDR: '::1' is not an IPv4 address"):
        config.load_client({"VXNET_ADVERTISE_ADDR": "::1"})
