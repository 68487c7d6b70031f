"""Typed records for every libnetwork remote-driver and remote-IPAM call, and their decoders.

Field names on the wire are Go field names without JSON tags (moby libnetwork/drivers/remote/api/api.go and
libnetwork/ipams/remote/api/api.go): exact and case-sensitive. Go writes a nil map or slice as `null`, so null
is read as empty. A decoder raises InvalidRequest naming the field and what was wrong with it; drivers receive
only well-typed records.

IDs become namespace and interface names, paths and etcd keys, so they are checked here, before anything else
sees them: an EndpointID is dockerd's stringid, 64 lowercase hex characters; a NetworkID
is that too, or for a Swarm-scoped network the ID swarmkit gave it (moby/swarmkit identity.NewID: 128 random
bits in base 36, 25 lowercase letters and digits), which dockerd passes through as the libnetwork network ID.
"""

import dataclasses
import ipaddress
import re
from typing import Any, Dict, Optional, Tuple

from wire.errors import InvalidRequest

_MISSING = object()


def _get(body: dict, name: str, kind, required: bool = True, where: str = ""):
    value = body.get(name, _MISSING)
    label = f"{where}{name}"
    if value is _MISSING or value is None:
        if required and value is _MISSING:
            raise InvalidRequest(f"{label}: missing")
        return {dict: {}, list: [], str: "", bool: False, int: 0}[kind]
    if kind is int and isinstance(value, (bool, float)):
        raise InvalidRequest(f"{label}: expected an integer, got {_json_type(value)}")
    if not isinstance(value, kind):
        names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number"}
        raise InvalidRequest(f"{label}: expected {names[kind]}, got {_json_type(value)}")
    return value


def _json_type(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number"}.get(type(value), type(value).__name__)


# dockerd's stringid.GenerateRandomID: 32 random bytes in lowercase hex.
DOCKER_ID = re.compile(r"[0-9a-f]{64}")
# swarmkit's identity.NewID, Swarm-scoped networks only.
SWARM_ID = re.compile(r"[0-9a-z]{25}")
# Interface.MacAddress: Go's net.HardwareAddr.String() of a 6-byte Ethernet address.
MAC_ADDRESS = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")


def _shown(value: str) -> str:
    """A bad value as an error message quotes it: repr (control characters visible), cut short."""
    return repr(value) if len(value) <= 80 else repr(value[:77]) + "..."


def _nonempty(body: dict, name: str) -> str:
    value = _get(body, name, str)
    if not value:
        raise InvalidRequest(f"{name}: empty")
    return value


def _endpoint_id(body: dict) -> str:
    value = _nonempty(body, "EndpointID")
    if not DOCKER_ID.fullmatch(value):
        raise InvalidRequest(f"EndpointID: {_shown(value)} is not a Docker ID (64 lowercase hex characters)")
    return value


def _network_id(body: dict) -> str:
    value = _nonempty(body, "NetworkID")
    if not (DOCKER_ID.fullmatch(value) or SWARM_ID.fullmatch(value)):
        raise InvalidRequest(f"NetworkID: {_shown(value)} is not a Docker network ID (64 lowercase hex "
                             "characters, or a Swarm network's 25 lowercase letters and digits)")
    return value


def _body(raw: Any) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InvalidRequest(f"request body: expected a JSON object, got {_json_type(raw)}")
    return raw


# --- NetworkDriver --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class IPAMData:
    """`{"AddressSpace","Pool":"10.0.1.0/24","Gateway":"10.0.1.1/24","AuxAddresses":{"n":"10.0.1.5/24"}}`"""
    address_space: str
    pool: str
    gateway: str
    aux_addresses: Dict[str, str]

    @classmethod
    def decode(cls, raw: Any, where: str) -> "IPAMData":
        if not isinstance(raw, dict):
            raise InvalidRequest(f"{where}: expected an object, got {_json_type(raw)}")
        aux = _get(raw, "AuxAddresses", dict, required=False, where=where + ".")
        for key, value in aux.items():
            if not isinstance(value, str):
                raise InvalidRequest(f"{where}.AuxAddresses.{key}: expected a string")
        return cls(
            address_space=_get(raw, "AddressSpace", str, required=False, where=where + "."),
            pool=_get(raw, "Pool", str, where=where + "."),
            gateway=_get(raw, "Gateway", str, required=False, where=where + "."),
            aux_addresses=dict(aux),
        )


def _ipam_list(body: dict, name: str, required: bool) -> Tuple[IPAMData, ...]:
    items = _get(body, name, list, required=required)
    return tuple(IPAMData.decode(item, f"{name}[{i}]") for i, item in enumerate(items))


@dataclasses.dataclass(frozen=True)
class NetworkIDRequest:
    """DeleteNetwork, FreeNetwork: `{"NetworkID"}`."""
    network_id: str

    @classmethod
    def decode(cls, raw: Any) -> "NetworkIDRequest":
        return cls(network_id=_network_id(_body(raw)))


@dataclasses.dataclass(frozen=True)
class CreateNetworkRequest:
    """CreateNetwork and AllocateNetwork:
    `{"NetworkID","Options":{...},"IPv4Data":[IPAMData],"IPv6Data":[IPAMData]}`.
    Options holds `com.docker.network.generic` (the `-o` map), `com.docker.network.enable_ipv6`,
    `com.docker.network.internal`."""
    network_id: str
    options: Dict[str, Any]
    ipv4_data: Tuple[IPAMData, ...]
    ipv6_data: Tuple[IPAMData, ...]

    @classmethod
    def decode(cls, raw: Any) -> "CreateNetworkRequest":
        body = _body(raw)
        return cls(
            network_id=_network_id(body),
            options=dict(_get(body, "Options", dict, required=False)),
            ipv4_data=_ipam_list(body, "IPv4Data", required=False),
            ipv6_data=_ipam_list(body, "IPv6Data", required=False),
        )


@dataclasses.dataclass(frozen=True)
class EndpointInterface:
    address: str
    address_ipv6: str
    mac_address: str


def _mac(iface: dict) -> str:
    """Interface.MacAddress: "" (vxnet picks one) or six colon-separated hex octets, returned in lowercase."""
    value = _get(iface, "MacAddress", str, required=False, where="Interface.")
    if value and not MAC_ADDRESS.fullmatch(value):
        raise InvalidRequest(f"Interface.MacAddress: {_shown(value)} is not a MAC address "
                             "(six hex octets, e.g. 02:42:0a:00:00:05)")
    return value.lower()


EXPOSED_PORTS = "com.docker.network.endpoint.exposedports"
# IP protocol numbers (IANA, RFC 790/768/4960) as Go's libnetwork types.Protocol carries them, and the names the
# policy uses for them ("5432/tcp").
PROTOCOLS = {6: "tcp", 17: "udp", 132: "sctp"}
_PORT_MAX = 65535  # a 16-bit port field (RFC 793/768/4960); 0 names no port a client can connect to


@dataclasses.dataclass(frozen=True, order=True)
class TransportPort:
    """One exposed port as the policy names it: `str()` is "5432/tcp". Ordered by port, then protocol."""
    port: int
    proto: str  # "tcp" | "udp" | "sctp"

    def __str__(self) -> str:
        return f"{self.port}/{self.proto}"


def _exposed_ports(options: dict) -> Tuple[TransportPort, ...]:
    """Options["com.docker.network.endpoint.exposedports"]: what the container exposes (image EXPOSE, --expose,
    the container ports of -p, Compose expose:/ports:, a Swarm task's mode=host published ports), as dockerd 20.10
    sends it (libnetwork types.TransportPort list): `[{"Proto":6,"Port":80},{"Proto":17,"Port":53}]`, `[]` for
    none; absent or null from other callers. -> sorted, without duplicates."""
    items = _get(options, EXPOSED_PORTS, list, required=False, where="Options.")
    out = set()
    for i, item in enumerate(items):
        where = f"Options.{EXPOSED_PORTS}[{i}]"
        if not isinstance(item, dict):
            raise InvalidRequest(f"{where}: expected an object, got {_json_type(item)}")
        proto = _get(item, "Proto", int, where=where + ".")
        if proto not in PROTOCOLS:
            raise InvalidRequest(f"{where}.Proto: {proto} is not a protocol vxnet can police (6 tcp, 17 udp, "
                                 "132 sctp)")
        port = _get(item, "Port", int, where=where + ".")
        if not 1 <= port <= _PORT_MAX:
            raise InvalidRequest(f"{where}.Port: {port} is not a port (1-{_PORT_MAX})")
        out.add(TransportPort(port, PROTOCOLS[proto]))
    return tuple(sorted(out))


@dataclasses.dataclass(frozen=True)
class CreateEndpointRequest:
    """`{"NetworkID","EndpointID","Interface":{"Address","AddressIPv6","MacAddress"},"Options":{...}}`

    Options as dockerd 20.10 sends them for `docker run --expose 80 --expose 53/udp -p 8080:80`:
    `{"com.docker.network.endpoint.exposedports":[{"Proto":6,"Port":80},{"Proto":17,"Port":53}],
    "com.docker.network.portmap":[{"Proto":6,"IP":"","Port":80,"HostIP":"","HostPort":8080,"HostPortEnd":8080}]}`
    (Join carries the same two). `exposed` is the first, decoded."""
    network_id: str
    endpoint_id: str
    interface: EndpointInterface
    options: Dict[str, Any]
    exposed: Tuple[TransportPort, ...] = ()

    @classmethod
    def decode(cls, raw: Any) -> "CreateEndpointRequest":
        body = _body(raw)
        iface = _get(body, "Interface", dict, required=False)
        options = _get(body, "Options", dict, required=False)
        return cls(
            network_id=_network_id(body),
            endpoint_id=_endpoint_id(body),
            interface=EndpointInterface(
                address=_get(iface, "Address", str, required=False, where="Interface."),
                address_ipv6=_get(iface, "AddressIPv6", str, required=False, where="Interface."),
                mac_address=_mac(iface),
            ),
            options=dict(options),
            exposed=_exposed_ports(options),
        )


@dataclasses.dataclass(frozen=True)
class EndpointRequest:
    """EndpointOperInfo, DeleteEndpoint, Leave, RevokeExternalConnectivity: `{"NetworkID","EndpointID"}`;
    ProgramExternalConnectivity adds `"Options"`."""
    network_id: str
    endpoint_id: str
    options: Dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def decode(cls, raw: Any) -> "EndpointRequest":
        body = _body(raw)
        return cls(network_id=_network_id(body), endpoint_id=_endpoint_id(body),
                   options=dict(_get(body, "Options", dict, required=False)))


@dataclasses.dataclass(frozen=True)
class JoinRequest:
    """`{"NetworkID","EndpointID","SandboxKey","Options":{...}}`. SandboxKey, the path of the container's network
    namespace (/var/run/docker/netns/<id>), is required: a Join without one names no container."""
    network_id: str
    endpoint_id: str
    sandbox_key: str
    options: Dict[str, Any]

    @classmethod
    def decode(cls, raw: Any) -> "JoinRequest":
        body = _body(raw)
        return cls(network_id=_network_id(body), endpoint_id=_endpoint_id(body),
                   sandbox_key=_sandbox_key(body),
                   options=dict(_get(body, "Options", dict, required=False)))


def _sandbox_key(body: dict) -> str:
    value = _nonempty(body, "SandboxKey")
    if not value.startswith("/") or "\0" in value:
        raise InvalidRequest(f"SandboxKey: {_shown(value)} is not an absolute path")
    return value


@dataclasses.dataclass(frozen=True)
class DiscoveryRequest:
    """DiscoverNew/DiscoverDelete: `{"DiscoveryType":1,"DiscoveryData":{"Address","BindAddress","Self"}}`"""
    discovery_type: int
    data: Dict[str, Any]

    @classmethod
    def decode(cls, raw: Any) -> "DiscoveryRequest":
        body = _body(raw)
        data = body.get("DiscoveryData")
        return cls(discovery_type=_get(body, "DiscoveryType", int),
                   data=dict(data) if isinstance(data, dict) else {})


@dataclasses.dataclass(frozen=True)
class EmptyRequest:
    """GetCapabilities, GetDefaultAddressSpaces, Plugin.Activate: no body, or one we ignore."""

    @classmethod
    def decode(cls, raw: Any) -> "EmptyRequest":
        return cls()


# --- IpamDriver -----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RequestPoolRequest:
    """`{"AddressSpace","Pool","SubPool","Options","V6"}`"""
    address_space: str
    pool: str
    sub_pool: str
    options: Dict[str, str]
    v6: bool

    @classmethod
    def decode(cls, raw: Any) -> "RequestPoolRequest":
        body = _body(raw)
        return cls(address_space=_get(body, "AddressSpace", str, required=False),
                   pool=_get(body, "Pool", str, required=False),
                   sub_pool=_get(body, "SubPool", str, required=False),
                   options=_str_map(body, "Options"),
                   v6=_get(body, "V6", bool, required=False))


@dataclasses.dataclass(frozen=True)
class PoolIDRequest:
    """ReleasePool: `{"PoolID"}`"""
    pool_id: str

    @classmethod
    def decode(cls, raw: Any) -> "PoolIDRequest":
        return cls(pool_id=_nonempty(_body(raw), "PoolID"))


@dataclasses.dataclass(frozen=True)
class AddressRequest:
    """RequestAddress `{"PoolID","Address":"" or "a.b.c.d","Options"}`: Address empty asks for any free one.
    PoolID is checked by the IPAM driver, which made it (ipam_driver/pools.py)."""
    pool_id: str
    address: str
    options: Dict[str, str]

    @classmethod
    def decode(cls, raw: Any) -> "AddressRequest":
        body = _body(raw)
        return cls(pool_id=_nonempty(body, "PoolID"), address=_get(body, "Address", str, required=False),
                   options=_str_map(body, "Options"))


@dataclasses.dataclass(frozen=True)
class ReleaseAddressRequest(AddressRequest):
    """ReleaseAddress `{"PoolID","Address":"a.b.c.d"}`: the Address is required (a release of nothing in
    particular is a broken request, not a no-op)."""

    @classmethod
    def decode(cls, raw: Any) -> "ReleaseAddressRequest":
        body = _body(raw)
        return cls(pool_id=_nonempty(body, "PoolID"), address=_nonempty(body, "Address"),
                   options=_str_map(body, "Options"))


def _str_map(body: dict, name: str) -> Dict[str, str]:
    value = _get(body, name, dict, required=False)
    for key, item in value.items():
        if not isinstance(item, str):
            raise InvalidRequest(f"{name}.{key}: expected a string, got {_json_type(item)}")
    return dict(value)


def _address_from_cidr(text: str, field: str, version: int) -> Optional[str]:
    """Gateway and aux addresses arrive as CIDR strings ("10.0.1.1/24", "fd00:1::1/64"); return the bare address
    of that IP version, as ipaddress prints it (IPv6 compressed, as the kernel prints it); "" -> None."""
    if not text:
        return None
    kind = ipaddress.IPv4Interface if version == 4 else ipaddress.IPv6Interface
    try:
        return str(kind(text).ip)
    except ValueError:
        raise InvalidRequest(f"{field}: {_shown(text)} is not an IPv{version} address in CIDR form") from None


def ipv4_from_cidr(text: str, field: str) -> Optional[str]:
    return _address_from_cidr(text, field, 4)


def ipv6_from_cidr(text: str, field: str) -> Optional[str]:
    return _address_from_cidr(text, field, 6)
