"""The per-network data plane: one namespace per network holding a bridge and a VXLAN device, and one veth
pair per endpoint. Kernel objects only: what should exist is decided by the driver and the stores.

Interface contract (the unit tests' FakeDataPlane models the same state):
  ensure_network(network)                 idempotent; namespace + bridge + VXLAN up with the network's MTU
  remove_network(network_id, vni=None)    idempotent; the namespace and everything in it
  ensure_endpoint(network, endpoint) -> str   idempotent; the host-side interface name for Join's SrcName
  remove_endpoint(network_id, endpoint_id)    idempotent
  network_ids() -> list of 12-char id prefixes that have a namespace here
  ensure_peer(network, peer) / remove_peer(network, peer)   neighbour + FDB entries for a remote endpoint
"""

import logging
from typing import List, Optional

from netdriver import names
from netdriver.links import Links
from netdriver.models import Endpoint, Network, PeerRecord

log = logging.getLogger(__name__)

# IANA-assigned VXLAN port (RFC 7348 section 5).
VXLAN_PORT = 4789


class DataPlane:
    def __init__(self, links: Links, local_ip: str, vxlan_port: int = VXLAN_PORT):
        self.links = links
        self.local_ip = local_ip
        self.vxlan_port = vxlan_port

    def ensure_network(self, network: Network) -> None:
        ns = names.netns(network.id)
        self.links.ensure_netns(ns)
        self.links.ensure_bridge(ns, names.BRIDGE, network.mtu)
        self.links.ensure_vxlan(ns, names.VXLAN, names.vxlan_staging(network.vni), network.vni, self.local_ip,
                                self.vxlan_port, network.mtu, names.BRIDGE)

    def remove_network(self, network_id: str, vni: Optional[int] = None) -> None:
        self.links.remove_netns(names.netns(network_id))
        if vni is not None:
            # A create that died between making the VXLAN device and moving it leaves it in the host namespace,
            # holding the VNI on the shared UDP socket: the next create with that VNI would fail with EEXIST.
            self.links.remove_link(None, names.vxlan_staging(vni))

    def ensure_endpoint(self, network: Network, endpoint: Endpoint) -> str:
        ns = names.netns(network.id)
        container_end = names.veth_container(endpoint.id)
        self.links.ensure_veth(ns, names.veth_bridge(endpoint.id), container_end, names.BRIDGE, network.mtu,
                               endpoint.mac)
        return container_end

    def remove_endpoint(self, network_id: str, endpoint_id: str) -> None:
        # Deleting either end deletes the pair; the container end may already sit in a container namespace.
        self.links.remove_link(names.netns(network_id), names.veth_bridge(endpoint_id))
        self.links.remove_link(None, names.veth_container(endpoint_id))

    def network_ids(self) -> List[str]:
        return [names.network_id_prefix(n) for n in self.links.list_netns() if names.network_id_prefix(n)]

    def ensure_peer(self, network: Network, peer: PeerRecord) -> None:
        self.links.ensure_peer(names.netns(network.id), names.VXLAN, peer.ip, peer.mac, peer.vtep)

    def remove_peer(self, network: Network, peer: PeerRecord) -> None:
        self.links.remove_peer(names.netns(network.id), names.VXLAN, peer.ip, peer.mac, peer.vtep)
