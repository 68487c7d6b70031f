"""The wire under malformed input: every decoder in wire/protocol.py, and the HTTP app over the real drivers and
the stateful fakes. Whatever the body, the answer is 200 or a 4xx (never 404, which dockerd reads as "not
implemented") with `Err` and `Error` naming a field; never a 5xx, never an exception out of the app. A malformed
ID reaches neither etcd nor the (fake) kernel.

Bodies come from two generators: arbitrary JSON (and bytes), and valid requests broken at random (one field
removed, retyped, or replaced by a hostile string), against a state where the valid request's network,
endpoint and pool exist, so the broken ones get past the lookups into the drivers.
"""

import copy
import dataclasses
import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipam_driver.driver import IpamDriver
from ipam_driver.store import IpamStore
from netdriver.driver import NetworkDriver
from netdriver.store import NetworkStore
from netdriver.underlay import Underlay
from plugin.http import make_app
from plugin.routes import IPAM, NETWORK, ROUTES
from store import schema
from tests.fakes import FakeDataPlane, FakeKV
from tests.ids import docker_id
from wire import protocol as p
from wire.errors import InvalidRequest

NID, NID2, EID, EID2 = docker_id("net"), docker_id("net2"), docker_id("ep"), docker_id("ep2")
SWARM_NID = "q8v9xk3b2w5k1x0l6n5m4j3h2"  # swarmkit's identity.NewID shape: 25 base-36 characters
SANDBOX = "/var/run/docker/netns/0123456789ab"
POOL_ID = "vxnet-local/10.1.0.0/24"

# One valid body per call, against the state seed() builds.
VALID = {
    "/Plugin.Activate": None,
    "/NetworkDriver.GetCapabilities": None,
    "/NetworkDriver.AllocateNetwork": {"NetworkID": SWARM_NID, "Options": {"vni": "5001", "mtu": "1400"},
                                       "IPv4Data": [{"AddressSpace": "vxnet-global", "Pool": "10.3.0.0/24",
                                                     "Gateway": "10.3.0.1/24"}], "IPv6Data": None},
    "/NetworkDriver.FreeNetwork": {"NetworkID": SWARM_NID},
    "/NetworkDriver.CreateNetwork": {
        "NetworkID": NID2,
        "Options": {"com.docker.network.generic": {"vni": "5000", "com.docker.network.driver.mtu": "1400",
                                                   "overlay": "blue"},
                    "com.docker.network.enable_ipv6": False, "com.docker.network.internal": False},
        "IPv4Data": [{"AddressSpace": "vxnet-local", "Pool": "10.2.0.0/24", "Gateway": "10.2.0.1/24",
                      "AuxAddresses": {"a": "10.2.0.9/24"}}], "IPv6Data": []},
    "/NetworkDriver.DeleteNetwork": {"NetworkID": NID},
    "/NetworkDriver.CreateEndpoint": {"NetworkID": NID, "EndpointID": EID2,
                                      "Interface": {"Address": "10.1.0.6/24", "AddressIPv6": "",
                                                    "MacAddress": "02:00:00:00:00:09"}, "Options": {}},
    "/NetworkDriver.EndpointOperInfo": {"NetworkID": NID, "EndpointID": EID},
    "/NetworkDriver.DeleteEndpoint": {"NetworkID": NID, "EndpointID": EID},
    "/NetworkDriver.Join": {"NetworkID": NID, "EndpointID": EID, "SandboxKey": SANDBOX, "Options": {}},
    "/NetworkDriver.Leave": {"NetworkID": NID, "EndpointID": EID},
    "/NetworkDriver.ProgramExternalConnectivity": {"NetworkID": NID, "EndpointID": EID, "Options": {}},
    "/NetworkDriver.RevokeExternalConnectivity": {"NetworkID": NID, "EndpointID": EID},
    "/NetworkDriver.DiscoverNew": {"DiscoveryType": 1,
                                   "DiscoveryData": {"Address": "192.0.2.1", "BindAddress": "", "Self": True}},
    "/NetworkDriver.DiscoverDelete": {"DiscoveryType": 1, "DiscoveryData": {"Address": "192.0.2.9"}},
    "/IpamDriver.GetCapabilities": None,
    "/IpamDriver.GetDefaultAddressSpaces": None,
    "/IpamDriver.RequestPool": {"AddressSpace": "vxnet-local", "Pool": "10.4.0.0/24", "SubPool": "10.4.0.128/25",
                                "Options": {"com.docker.network.ipam.serial": "true"}, "V6": False},
    "/IpamDriver.ReleasePool": {"PoolID": POOL_ID},
    "/IpamDriver.RequestAddress": {"PoolID": POOL_ID, "Address": "10.1.0.7",
                                   "Options": {"RequestAddressType": "com.docker.network.gateway"}},
    "/IpamDriver.ReleaseAddress": {"PoolID": POOL_ID, "Address": "10.1.0.5"},
}

# IDs from the malformed-request run of issue 9, and their relatives.
BAD_IDS = ["0.0.0.0/0", "::1", "../../etc/passwd", "' OR 1=1 --", "", " ", "a\x00b", NID + "\x00", NID.upper(),
           NID[:-1], NID + "0", "g" * 64, "/" * 64, "." * 64, NID[:12], "%2e%2e%2f" * 8, "é" * 64, "٣" * 64,
           NID[:63] + "\n", SWARM_NID.upper(), SWARM_NID[:-1] + "/"]
HOSTILE = BAD_IDS + ["zz:zz:zz:zz:zz:zz", "01:00:5e:00:00:01", "00:00:00:00:00:00", "02:42:0a:01:00:05:07",
                     "10.1.0.5/24\n", "10.1.0.0/33", "1" * 5000, "-1", "0x10", "١٤٠٠", "true", "null",
                     "vxnet-local/../../x", "vxnet-local/10.1.0.0/24/10.1.0.0/24/1", "\ud7ff" * 3]

# What an error may name: every wire field (top-level and nested), the options the network driver takes, and
# the generic shapes of decoder errors. An Err naming none of them is a message a user cannot act on.
FIELD_NAMES = {"NetworkID", "EndpointID", "Options", "IPv4Data", "IPv6Data", "Interface", "SandboxKey",
               "DiscoveryType", "DiscoveryData", "AddressSpace", "Pool", "SubPool", "V6", "PoolID", "Address",
               "request body"}
OPTION_PREFIXES = ("option ", "unknown option ", "--ipv6", "com.docker.network.")


def _names_a_field(message: str) -> bool:
    head = re.match(r"[A-Za-z0-9 ]*", message).group().strip()
    return head in FIELD_NAMES or message.startswith(OPTION_PREFIXES)


def seed():
    """The HTTP app over real drivers and fakes, holding network NID with endpoint EID (joined), and pool POOL_ID
    with the address of EID. Returns (client, kv, plane)."""
    kv, plane = FakeKV(), FakeDataPlane()
    net = NetworkDriver(NetworkStore(kv), plane, "h1", "local", Underlay(lambda a: 1500, "192.0.2.1"))
    ipam = IpamDriver(IpamStore(kv), "h1", "local")
    app = make_app({NETWORK: net, IPAM: ipam})
    app.config["PROPAGATE_EXCEPTIONS"] = True  # an exception out of the app fails the test, not a quiet 500
    client = app.test_client()
    for path, body in (("/IpamDriver.RequestPool", {"AddressSpace": "vxnet-local", "Pool": "10.1.0.0/24"}),
                       ("/IpamDriver.RequestAddress", {"PoolID": POOL_ID, "Address": "10.1.0.1",
                                                       "Options": {"RequestAddressType":
                                                                   "com.docker.network.gateway"}}),
                       ("/IpamDriver.RequestAddress", {"PoolID": POOL_ID, "Address": "10.1.0.5"}),
                       ("/NetworkDriver.CreateNetwork", {"NetworkID": NID, "Options": {}, "IPv4Data": [
                           {"AddressSpace": "vxnet-local", "Pool": "10.1.0.0/24", "Gateway": "10.1.0.1/24"}]}),
                       ("/NetworkDriver.CreateEndpoint", {"NetworkID": NID, "EndpointID": EID,
                                                          "Interface": {"Address": "10.1.0.5/24"}}),
                       ("/NetworkDriver.Join", VALID["/NetworkDriver.Join"])):
        status, reply = call(client, path, json.dumps(body).encode())
        assert status == 200, (path, reply)
    return client, kv, plane


def call(client, path, data: bytes):
    # dockerd's Accept header, and no Content-Type
    resp = client.post(path, data=data, headers={"Accept": "application/vnd.docker.plugins.v1.2+json"})
    return resp.status_code, json.loads(resp.data)


def assert_answer(path, data, status, reply):
    where = f"{path} {data[:300]!r} -> {status} {reply}"
    if status == 200:
        assert "Err" not in reply or not reply["Err"], where
        return
    assert 400 <= status < 500 and status != 404, where
    assert reply["Err"] and reply["Err"] == reply["Error"], where
    assert _names_a_field(reply["Err"]), where


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | st.sampled_from(HOSTILE),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12)

REMOVE = object()


def _paths(value, prefix=()):
    """Every place in a JSON value a mutation can hit: each key and list item, at any depth."""
    out = []
    if isinstance(value, dict):
        for key, item in value.items():
            out.append(prefix + (key,))
            out.extend(_paths(item, prefix + (key,)))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out.append(prefix + (i,))
            out.extend(_paths(item, prefix + (i,)))
    return out


def _mutated(body, path, new):
    body = copy.deepcopy(body)
    parent = body
    for step in path[:-1]:
        parent = parent[step]
    if new is REMOVE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = new
    return body


@st.composite
def broken_requests(draw):
    """(path, body): a valid request with one field removed or replaced at any depth, or one key added to one of
    its objects (an unknown option, say)."""
    path = draw(st.sampled_from([k for k, v in VALID.items() if v]))
    body = VALID[path]
    if draw(st.integers(0, 4)) == 0:
        objects = [()] + [w for w in _paths(body) if isinstance(_at(body, w), dict)]
        where = draw(st.sampled_from(objects))
        key = draw(st.sampled_from(HOSTILE) | st.text(max_size=12))
        return path, _mutated(body, where + (key,), draw(json_values))
    where = draw(st.sampled_from(_paths(body)))
    return path, _mutated(body, where, draw(st.just(REMOVE) | st.sampled_from(HOSTILE) | json_values))


def _at(body, path):
    for step in path:
        body = body[step]
    return body


PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(path=st.sampled_from(sorted(ROUTES) + ["/Plugin.Activate"]),
       data=st.binary(max_size=64) | json_values.map(lambda v: json.dumps(v).encode()))
def test_any_body_gets_200_or_a_4xx_naming_a_field(path, data):
    client, _, _ = seed()
    status, reply = call(client, path, data)
    assert_answer(path, data, status, reply)


@PROPERTY
@given(request=broken_requests())
def test_a_valid_request_broken_at_random_gets_200_or_a_4xx_naming_a_field(request):
    path, body = request
    client, _, _ = seed()
    data = json.dumps(body).encode()
    status, reply = call(client, path, data)
    assert_answer(path, data, status, reply)


def test_the_valid_requests_succeed():
    """The positive control of the two properties above: unbroken, every request is a 200."""
    for path, body in VALID.items():
        client, _, _ = seed()
        status, reply = call(client, path, b"" if body is None else json.dumps(body).encode())
        assert status == 200 and "Err" not in reply, (path, reply)


def test_json_nested_too_deeply_is_a_400():
    client, _, _ = seed()
    status, reply = call(client, "/NetworkDriver.CreateNetwork", b"[" * 100000 + b"]" * 100000)
    assert status == 400 and "nested too deeply" in reply["Err"]


# --- decoders -------------------------------------------------------------------------------------------------

DECODERS = sorted({r.decoder for r in ROUTES.values()}, key=lambda c: c.__name__)


def _check_record(record):
    """What a decoded record promises the drivers."""
    if hasattr(record, "network_id"):
        assert p.DOCKER_ID.fullmatch(record.network_id) or p.SWARM_ID.fullmatch(record.network_id)
    if hasattr(record, "endpoint_id"):
        assert p.DOCKER_ID.fullmatch(record.endpoint_id)
    if isinstance(record, p.CreateEndpointRequest) and record.interface.mac_address:
        assert re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", record.interface.mac_address)
    if isinstance(record, p.JoinRequest):
        assert record.sandbox_key.startswith("/") and "\0" not in record.sandbox_key
    if isinstance(record, p.ReleaseAddressRequest):
        assert record.address
    for field in dataclasses.fields(record):
        value = getattr(record, field.name)
        if field.type is str or field.type == "str":
            assert isinstance(value, str)


def _decode(decoder, body):
    try:
        record = decoder.decode(body)
    except InvalidRequest as exc:
        assert _names_a_field(str(exc)), (decoder.__name__, body, str(exc))
        return None
    assert isinstance(record, decoder)
    _check_record(record)
    return record


@pytest.mark.parametrize("decoder", DECODERS, ids=lambda c: c.__name__)
@PROPERTY
@given(body=json_values)
def test_every_decoder_returns_a_sound_record_or_invalid_request_naming_a_field(decoder, body):
    _decode(decoder, body)


@PROPERTY
@given(request=broken_requests())
def test_decoders_on_broken_valid_requests(request):
    path, body = request
    _decode(ROUTES[path].decoder if path in ROUTES else p.EmptyRequest, body)


@PROPERTY
@given(network_id=st.text(max_size=70) | st.sampled_from(BAD_IDS), endpoint_id=st.text(max_size=70))
def test_decoded_ids_are_exactly_dockers(network_id, endpoint_id):
    body = {"NetworkID": network_id, "EndpointID": endpoint_id, "SandboxKey": SANDBOX}
    good_network = bool(re.fullmatch(r"[0-9a-f]{64}|[0-9a-z]{25}", network_id))
    good_endpoint = bool(re.fullmatch(r"[0-9a-f]{64}", endpoint_id))
    for decoder in (p.EndpointRequest, p.JoinRequest, p.CreateEndpointRequest):
        if good_network and good_endpoint:
            record = decoder.decode(body)
            assert (record.network_id, record.endpoint_id) == (network_id, endpoint_id)
        else:
            with pytest.raises(InvalidRequest, match="^NetworkID" if not good_network else "^EndpointID"):
                decoder.decode(body)


# --- malformed IDs reach neither etcd nor the kernel ----------------------------------------------------------

ID_CALLS = [path for path, body in VALID.items() if body and ("NetworkID" in body or "EndpointID" in body)]


def _plane_state(plane):
    return copy.deepcopy({k: v for k, v in vars(plane).items() if k != "full_syncs"})


def _send_with_bad_id(client, kv, plane, path, field, bad):
    body = dict(VALID[path])
    if field not in body:
        return
    body[field] = bad
    keys, revision, state = dict(kv.data), kv.rev, _plane_state(plane)
    status, reply = call(client, path, json.dumps(body).encode())
    assert status == 400 and reply["Err"].startswith(field + ":"), (path, bad, status, reply)
    assert kv.data == keys and kv.rev == revision, (path, bad, "etcd written")
    assert _plane_state(plane) == state, (path, bad, "data plane changed")


@pytest.mark.parametrize("path", ID_CALLS)
def test_the_listed_malformed_ids_reach_neither_etcd_nor_the_data_plane(path):
    client, kv, plane = seed()
    for field in ("NetworkID", "EndpointID"):
        for bad in BAD_IDS:
            _send_with_bad_id(client, kv, plane, path, field, bad)
    # The same call with the IDs it was written with does reach them (or answers as for a known ID).
    status, reply = call(client, path, json.dumps(VALID[path]).encode())
    assert status == 200, reply


@PROPERTY
@given(path=st.sampled_from(ID_CALLS), field=st.sampled_from(["NetworkID", "EndpointID"]),
       bad=st.text(max_size=70).filter(lambda t: not re.fullmatch(r"[0-9a-f]{64}|[0-9a-z]{25}", t)))
def test_generated_malformed_ids_reach_neither_etcd_nor_the_data_plane(path, field, bad):
    client, kv, plane = seed()
    _send_with_bad_id(client, kv, plane, path, field, bad)


# --- the cases of issue 9 -------------------------------------------------------------------------------------

def test_unknown_ids_are_409_not_404_and_replayed_cleanups_still_succeed():
    client, kv, _ = seed()
    other, stranger = docker_id("unknown net"), docker_id("unknown ep")
    for path, body, field in (
            ("/NetworkDriver.CreateEndpoint", {**VALID["/NetworkDriver.CreateEndpoint"], "NetworkID": other},
             "NetworkID"),
            ("/NetworkDriver.Join", {**VALID["/NetworkDriver.Join"], "NetworkID": other}, "NetworkID"),
            ("/NetworkDriver.Join", {**VALID["/NetworkDriver.Join"], "EndpointID": stranger}, "EndpointID"),
            ("/IpamDriver.RequestAddress", {"PoolID": "vxnet-local/10.9.0.0/24", "Address": ""}, "PoolID")):
        status, reply = call(client, path, json.dumps(body).encode())
        assert status == 409 and reply["Err"].startswith(field + ":") and reply["Error"] == reply["Err"], reply
    keys = dict(kv.data)
    # dockerd's start-up clean-up of sandboxes it remembers, and the calls it takes a 404 from as success.
    for path in ("/NetworkDriver.Leave", "/NetworkDriver.DeleteEndpoint", "/NetworkDriver.ProgramExternalConnectivity",
                 "/NetworkDriver.RevokeExternalConnectivity", "/NetworkDriver.EndpointOperInfo"):
        for body in ({"NetworkID": other, "EndpointID": stranger}, {"NetworkID": NID, "EndpointID": stranger}):
            status, reply = call(client, path, json.dumps(body).encode())
            assert status == 200, (path, reply)
    status, _ = call(client, "/NetworkDriver.DeleteNetwork", json.dumps({"NetworkID": other}).encode())
    assert status == 200 and kv.data == keys


@pytest.mark.parametrize("body,needle", [
    ({"NetworkID": NID, "EndpointID": EID}, "SandboxKey: missing"),
    ({"NetworkID": NID, "EndpointID": EID, "SandboxKey": ""}, "SandboxKey: empty"),
    ({"NetworkID": NID, "EndpointID": EID, "SandboxKey": None}, "SandboxKey: empty"),
    ({"NetworkID": NID, "EndpointID": EID, "SandboxKey": "netns/1"}, "SandboxKey: 'netns/1' is not an absolute"),
])
def test_join_without_a_sandbox_key_is_400(body, needle):
    client, kv, plane = seed()
    call(client, "/NetworkDriver.Leave", json.dumps(body).encode())
    before, state = dict(kv.data), _plane_state(plane)
    status, reply = call(client, "/NetworkDriver.Join", json.dumps(body).encode())
    assert status == 400 and reply["Err"].startswith(needle), reply
    assert kv.data == before and _plane_state(plane) == state


@pytest.mark.parametrize("body,needle", [
    ({"PoolID": POOL_ID}, "Address: missing"), ({"PoolID": POOL_ID, "Address": ""}, "Address: empty"),
    ({"PoolID": POOL_ID, "Address": "10.1.0.5/24"}, "Address: '10.1.0.5/24' is not an IPv4 address"),
    ({"PoolID": "../../etc/passwd", "Address": "10.1.0.5"}, "PoolID:"),
])
def test_release_address_without_a_good_address_is_400_and_releases_nothing(body, needle):
    client, kv, _ = seed()
    before = dict(kv.data)
    status, reply = call(client, "/IpamDriver.ReleaseAddress", json.dumps(body).encode())
    assert status == 400 and reply["Err"].startswith(needle) and reply["Error"] == reply["Err"], reply
    assert kv.data == before
    status, _ = call(client, "/IpamDriver.ReleaseAddress", json.dumps({"PoolID": POOL_ID, "Address": "10.1.0.5"}))
    assert status == 200 and kv.data != before  # the well-formed release does release


@pytest.mark.parametrize("mac,needle", [
    ("02:42:zz:01:00:05", "is not a MAC address"),  # was a 500 at Join (int(..., 16) in the netlink encoder)
    ("02-42-0a-01-00-05", "is not a MAC address"),
    ("01:00:5e:00:00:01", "is not a unicast MAC address"),  # the kernel refuses it for a veth
    ("00:00:00:00:00:00", "is not a unicast MAC address"),
])
def test_a_bad_mac_is_refused_at_create_endpoint_and_nothing_is_kept(mac, needle):
    client, kv, plane = seed()
    body = {**VALID["/NetworkDriver.CreateEndpoint"], "Interface": {"Address": "10.1.0.6/24", "MacAddress": mac}}
    before, state = dict(kv.data), _plane_state(plane)
    status, reply = call(client, "/NetworkDriver.CreateEndpoint", json.dumps(body).encode())
    assert status == 400 and reply["Err"].startswith("Interface.MacAddress:") and needle in reply["Err"], reply
    assert kv.data == before and _plane_state(plane) == state
    status, reply = call(client, "/NetworkDriver.Join", json.dumps({**VALID["/NetworkDriver.Join"],
                                                                     "EndpointID": EID2}).encode())
    assert status == 409 and reply["Err"].startswith("EndpointID:"), reply
    body["Interface"]["MacAddress"] = "02:42:0A:01:00:06"  # the positive control: a good MAC, in any case
    status, _ = call(client, "/NetworkDriver.CreateEndpoint", json.dumps(body).encode())
    assert status == 200 and kv.get(f"{schema.PREFIX}/endpoints/{NID}/{EID2}").json()["mac"] == "02:42:0a:01:00:06"


def test_a_null_byte_in_an_id_is_400_not_a_500():
    client, kv, _ = seed()
    for path, bodies in (("/NetworkDriver.DeleteEndpoint", 2), ("/NetworkDriver.Leave", 2),
                         ("/NetworkDriver.DeleteNetwork", 1)):
        for body in ({"NetworkID": NID + "\x00", "EndpointID": EID},
                     {"NetworkID": NID, "EndpointID": "\x00" + EID})[:bodies]:
            status, reply = call(client, path, json.dumps(body).encode())
            assert status == 400 and reply["Err"].split(":")[0] in ("NetworkID", "EndpointID"), reply
    assert kv.get(f"{schema.PREFIX}/endpoints/{NID}/{EID}") is not None  # nothing was deleted


def test_swarm_network_ids_are_accepted():
    client, kv, _ = seed()
    status, reply = call(client, "/NetworkDriver.AllocateNetwork",
                         json.dumps(VALID["/NetworkDriver.AllocateNetwork"]).encode())
    assert status == 200 and reply["Options"]["vni"] == "5001"
    assert kv.get(f"{schema.PREFIX}/members/{SWARM_NID}/@swarm") is not None
