"""The etcd value schema of the network driver: what a network, an endpoint and a peer record hold.

Values are JSON objects; `from_json` ignores unknown fields so a newer plugin's records stay readable.
"""

import dataclasses
import json
from typing import List, Optional


@dataclasses.dataclass(frozen=True)
class Subnet:
    pool: str  # "10.0.1.0/24" or "fd00:1::/64"
    gateway: Optional[str]  # bare IP or None


def _subnets(raw: list) -> List[Subnet]:
    return [Subnet(s["pool"], s.get("gateway")) for s in raw]


@dataclasses.dataclass(frozen=True)
class Network:
    id: str
    vni: int
    mtu: int
    internal: bool
    subnets: List[Subnet]
    overlay: Optional[str] = None
    options: dict = dataclasses.field(default_factory=dict)
    encrypted: bool = False
    subnets6: List[Subnet] = dataclasses.field(default_factory=list)  # IPv6 pools of a dual-stack network
    policy: str = "open"  # -o policy: open | exposed | deny (netdriver/policy.py); a record without it is open
    policy_audit: bool = False  # -o policy-audit: log what the policy would drop instead of dropping it

    @property
    def ipv6(self) -> bool:
        """Dual stack: the network was created with --ipv6 and an IPv6 pool."""
        return bool(self.subnets6)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Network":
        raw = json.loads(text)
        return cls(id=raw["id"], vni=int(raw["vni"]), mtu=int(raw["mtu"]), internal=bool(raw["internal"]),
                   subnets=_subnets(raw.get("subnets", [])), overlay=raw.get("overlay"),
                   options=raw.get("options", {}), encrypted=bool(raw.get("encrypted", False)),
                   subnets6=_subnets(raw.get("subnets6", [])), policy=str(raw.get("policy", "open")),
                   policy_audit=bool(raw.get("policy_audit", False)))


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """One container interface on one host. Written at CreateEndpoint, removed at DeleteEndpoint."""
    network_id: str
    id: str
    ip: str  # "10.0.1.5/24"
    mac: str
    host: str
    ip6: str = ""  # "fd00:1::2/64" on a dual-stack network, else ""
    # The ports the container exposes, from CreateEndpoint (wire.protocol.TransportPort as text): ["5432/tcp"],
    # sorted by port. The `exposed` policy mode admits new connections to these only.
    exposed: List[str] = dataclasses.field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Endpoint":
        return cls(**_fields(cls, json.loads(text)))


def merge_exposed(*lists: List[str]) -> List[str]:
    """Exposed ports ("5432/tcp") from several sources -> one list, without duplicates, sorted by port then protocol
    (wire.protocol.TransportPort's order, the order CreateEndpoint's are recorded in)."""
    def key(text: str):
        port, _, proto = text.partition("/")
        return (int(port), proto) if port.isdigit() else (1 << 16, text)

    return sorted({text for texts in lists for text in texts}, key=key)


@dataclasses.dataclass(frozen=True)
class PeerRecord:
    """What other hosts need to reach an endpoint: written at Join, removed at Leave.

    Other hosts program neighbour (ip -> mac, and ip6 -> mac) and FDB (mac -> vtep) entries from it, and enforce
    the network's policy for traffic from it and to it (exposed, identity)."""
    network_id: str
    endpoint_id: str
    ip: str  # bare IP
    mac: str
    vtep: str
    host: str
    ip6: str = ""  # bare IPv6 address on a dual-stack network, else ""
    # The endpoint's, ["5432/tcp"]: CreateEndpoint's, and the container's Config.ExposedPorts once the identity
    # writer has read them (dockerd sends them only with a container's first network: plugin/endpoint_identity.py).
    exposed: List[str] = dataclasses.field(default_factory=list)
    # Who the endpoint is, for rules that select by container, service or label:
    # `{"container": "web1", "service": "db", "labels": {"role": "client"}}` (netdriver.policy.Identity.to_dict()).
    # None until this host's identity writer (plugin/endpoint_identity.py) has read the container from the engine,
    # which happens after the Join: until then only rules selecting `any` apply to it (fail closed).
    identity: Optional[dict] = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "PeerRecord":
        return cls(**_fields(cls, json.loads(text)))


def _fields(cls, raw: dict) -> dict:
    """The record's fields from a stored object: a field with a default may be absent (written by a plugin from
    before it existed), the others are required (KeyError)."""
    out = {}
    for field in dataclasses.fields(cls):
        if field.name in raw:
            out[field.name] = raw[field.name]
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise KeyError(field.name)
    return out
