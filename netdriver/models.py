"""The etcd value schema of the network driver: what a network, an endpoint and a peer record hold.

Values are JSON objects; `from_json` ignores unknown fields so a newer plugin's records stay readable.
"""

import dataclasses
import json
from typing import List, Optional


@dataclasses.dataclass(frozen=True)
class Subnet:
    pool: str  # "10.0.1.0/24"
    gateway: Optional[str]  # bare IP or None


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

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Network":
        raw = json.loads(text)
        return cls(id=raw["id"], vni=int(raw["vni"]), mtu=int(raw["mtu"]), internal=bool(raw["internal"]),
                   subnets=[Subnet(s["pool"], s.get("gateway")) for s in raw.get("subnets", [])],
                   overlay=raw.get("overlay"), options=raw.get("options", {}),
                   encrypted=bool(raw.get("encrypted", False)))


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """One container interface on one host. Written at CreateEndpoint, removed at DeleteEndpoint."""
    network_id: str
    id: str
    ip: str  # "10.0.1.5/24"
    mac: str
    host: str

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Endpoint":
        raw = json.loads(text)
        return cls(**{f.name: raw[f.name] for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class PeerRecord:
    """What other hosts need to reach an endpoint: written at Join, removed at Leave.

    Other hosts program neighbour (ip -> mac) and FDB (mac -> vtep) entries from it."""
    network_id: str
    endpoint_id: str
    ip: str  # bare IP
    mac: str
    vtep: str
    host: str

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "PeerRecord":
        raw = json.loads(text)
        return cls(**{f.name: raw[f.name] for f in dataclasses.fields(cls)})
