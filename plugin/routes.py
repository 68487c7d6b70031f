"""The one table of remote-API calls: (receiver, method) -> request decoder and driver method name.

The driver method name is the wire method in snake_case (CreateNetwork -> create_network), so the table and the
drivers cannot drift apart; `Plugin.Activate` lists the receivers whose drivers are present.
"""

import re
from typing import Dict, NamedTuple, Tuple, Type

from wire import protocol as p

NETWORK = "NetworkDriver"
IPAM = "IpamDriver"


class Route(NamedTuple):
    receiver: str
    method: str
    decoder: Type

    @property
    def handler_name(self) -> str:
        return re.sub(r"(?<!^)(?=[A-Z])", "_", self.method).lower()


_TABLE = (
    Route(NETWORK, "GetCapabilities", p.EmptyRequest),
    Route(NETWORK, "AllocateNetwork", p.CreateNetworkRequest),
    Route(NETWORK, "FreeNetwork", p.NetworkIDRequest),
    Route(NETWORK, "CreateNetwork", p.CreateNetworkRequest),
    Route(NETWORK, "DeleteNetwork", p.NetworkIDRequest),
    Route(NETWORK, "CreateEndpoint", p.CreateEndpointRequest),
    Route(NETWORK, "EndpointOperInfo", p.EndpointRequest),
    Route(NETWORK, "DeleteEndpoint", p.EndpointRequest),
    Route(NETWORK, "Join", p.JoinRequest),
    Route(NETWORK, "Leave", p.EndpointRequest),
    Route(NETWORK, "ProgramExternalConnectivity", p.EndpointRequest),
    Route(NETWORK, "RevokeExternalConnectivity", p.EndpointRequest),
    Route(NETWORK, "DiscoverNew", p.DiscoveryRequest),
    Route(NETWORK, "DiscoverDelete", p.DiscoveryRequest),
    Route(IPAM, "GetCapabilities", p.EmptyRequest),
    Route(IPAM, "GetDefaultAddressSpaces", p.EmptyRequest),
    Route(IPAM, "RequestPool", p.RequestPoolRequest),
    Route(IPAM, "ReleasePool", p.PoolIDRequest),
    Route(IPAM, "RequestAddress", p.AddressRequest),
    Route(IPAM, "ReleaseAddress", p.ReleaseAddressRequest),
)

ROUTES: Dict[str, Route] = {f"/{r.receiver}.{r.method}": r for r in _TABLE}


def receivers() -> Tuple[str, ...]:
    return tuple(dict.fromkeys(r.receiver for r in _TABLE))
