"""The wire: decoding every call's body, the route table, and how errors reach dockerd (wire/errors.py)."""

import json

import pytest

from plugin.http import CONTENT_TYPE, make_app
from plugin.routes import IPAM, NETWORK, ROUTES
from tests.ids import docker_id
from wire import protocol as p
from wire.errors import Conflict, InvalidRequest, StoreUnavailable

N1, N, E = docker_id("n1"), docker_id("n"), docker_id("e")


class Recorder:
    """A driver that answers every call with the decoded record it got, or raises what it is told to."""

    def __init__(self, error=None):
        self.error = error

    def __getattr__(self, name):
        def handler(req):
            if self.error:
                raise self.error
            return {"handler": name, "record": type(req).__name__}
        return handler


@pytest.fixture
def client():
    return make_app({NETWORK: Recorder(), IPAM: Recorder()}).test_client()


def post(client, path, body, raw=False):
    data = body if raw else json.dumps(body)
    # dockerd sends this Accept header and no Content-Type
    resp = client.post(path, data=data, headers={"Accept": "application/vnd.docker.plugins.v1.2+json"})
    return resp.status_code, json.loads(resp.data), resp.headers["Content-Type"]


def test_activate_lists_both_receivers(client):
    status, body, ctype = post(client, "/Plugin.Activate", None, raw=True)
    assert (status, body, ctype) == (200, {"Implements": ["NetworkDriver", "IpamDriver"]}, CONTENT_TYPE)


def test_every_protocol_method_has_a_route():
    wanted = {"GetCapabilities", "AllocateNetwork", "FreeNetwork", "CreateNetwork", "DeleteNetwork",
              "CreateEndpoint", "EndpointOperInfo", "DeleteEndpoint", "Join", "Leave",
              "ProgramExternalConnectivity", "RevokeExternalConnectivity", "DiscoverNew", "DiscoverDelete"}
    assert {r.method for r in ROUTES.values() if r.receiver == NETWORK} == wanted
    assert {r.method for r in ROUTES.values() if r.receiver == IPAM} == {
        "GetCapabilities", "GetDefaultAddressSpaces", "RequestPool", "ReleasePool", "RequestAddress",
        "ReleaseAddress"}
    assert ROUTES["/NetworkDriver.ProgramExternalConnectivity"].handler_name == "program_external_connectivity"


def test_dispatch_decodes_and_calls_the_snake_case_handler(client):
    status, body, _ = post(client, "/NetworkDriver.CreateNetwork", {
        "NetworkID": N1, "Options": {"com.docker.network.generic": {}},
        "IPv4Data": [{"AddressSpace": "", "Pool": "10.0.1.0/24", "Gateway": "10.0.1.1/24"}], "IPv6Data": None})
    assert status == 200 and body == {"handler": "create_network", "record": "CreateNetworkRequest"}
    status, body, _ = post(client, "/IpamDriver.GetCapabilities", b"", raw=True)
    assert status == 200 and body["handler"] == "get_capabilities"


def test_unknown_call_is_404_with_err(client):
    status, body, _ = post(client, "/NetworkDriver.Nope", {})
    assert status == 404 and "Nope" in body["Err"]


@pytest.mark.parametrize("path,body,needle", [
    ("/NetworkDriver.CreateNetwork", b"{not json", "not JSON"),
    ("/NetworkDriver.CreateNetwork", b"[1]", "JSON object"),
    ("/NetworkDriver.CreateNetwork", b'{"Options":{}}', "NetworkID: missing"),
    ("/NetworkDriver.CreateNetwork", b'{"NetworkID":5}', "NetworkID: expected a string, got a number"),
    ("/NetworkDriver.CreateNetwork", b'{"NetworkID":"%s","IPv4Data":[{"Gateway":"x"}]}' % N.encode(),
     "IPv4Data[0].Pool: missing"),
    ("/NetworkDriver.CreateEndpoint", b'{"NetworkID":"%s","EndpointID":"%s","Interface":{"Address":1}}' % (
        N.encode(), E.encode()), "Interface.Address: expected a string"),
    ("/IpamDriver.RequestAddress", b'{"PoolID":"p","Options":{"a":1}}', "Options.a: expected a string"),
    ("/IpamDriver.ReleasePool", b'{}', "PoolID: missing"),
])
def test_bad_bodies_are_400_naming_the_field(client, path, body, needle):
    status, reply, _ = post(client, path, body, raw=True)
    assert status == 400
    assert needle in reply["Err"] and reply["Error"] == reply["Err"]


@pytest.mark.parametrize("error,status", [(Conflict("pool in use"), 409), (StoreUnavailable("etcd down"), 503),
                                          (RuntimeError("boom"), 500)])
def test_driver_errors_map_to_status_with_err_and_error(error, status):
    client = make_app({NETWORK: Recorder(error), IPAM: Recorder(error)}).test_client()
    code, body, _ = post(client, "/IpamDriver.RequestPool", {"Pool": "10.0.0.0/24"})
    assert code == status and str(error) in body["Error"] and body["Err"] == body["Error"]


def test_null_maps_and_lists_read_as_empty():
    req = p.CreateEndpointRequest.decode({"NetworkID": N, "EndpointID": E, "Interface": None, "Options": None})
    assert req.interface.address == "" and req.options == {}
    req = p.CreateNetworkRequest.decode({"NetworkID": N, "Options": None, "IPv4Data": None, "IPv6Data": None})
    assert req.ipv4_data == () and req.options == {}


def test_ipam_data_cidr_gateway_and_aux():
    req = p.CreateNetworkRequest.decode({"NetworkID": N, "IPv4Data": [
        {"AddressSpace": "s", "Pool": "10.0.1.0/24", "Gateway": "10.0.1.1/24", "AuxAddresses": {"a": "10.0.1.5/24"}}]})
    data = req.ipv4_data[0]
    assert (data.pool, data.gateway, data.aux_addresses) == ("10.0.1.0/24", "10.0.1.1/24", {"a": "10.0.1.5/24"})
    assert p.ipv4_from_cidr(data.gateway, "Gateway") == "10.0.1.1"
    with pytest.raises(InvalidRequest, match="Gateway"):
        p.ipv4_from_cidr("10.0.1.x/24", "Gateway")


def test_ipv6_data_gateway_is_read_as_the_kernel_prints_it():
    req = p.CreateNetworkRequest.decode({"NetworkID": N, "IPv6Data": [
        {"AddressSpace": "s", "Pool": "fd00:1::/64", "Gateway": "FD00:1:0::1/64"}]})
    assert p.ipv6_from_cidr(req.ipv6_data[0].gateway, "IPv6Data[0].Gateway") == "fd00:1::1"
    assert p.ipv6_from_cidr("", "IPv6Data[0].Gateway") is None
    with pytest.raises(InvalidRequest, match=r"IPv6Data\[0\].Gateway: '10.0.1.1/24' is not an IPv6 address"):
        p.ipv6_from_cidr("10.0.1.1/24", "IPv6Data[0].Gateway")
