"""What the network driver asks of its collaborators. plugin/main.py passes the concrete ones in (sandbox.DataPlane,
underlay.Underlay, watcher.PeerSync, isolation.Firewall, encrypt.manager.EncryptionManager); the unit tests'
fakes (tests/fakes.py) model the same state. Declared here, where they are used, so the driver imports none of
the kernel or encrypt code behind them."""

from typing import Callable, Dict, Iterable, List, Optional, Protocol, Sequence, Set, Tuple

from netdriver.models import Endpoint, Network, PeerRecord
from netdriver.peerdb import Entries


class DataPlane(Protocol):
    """The per-network data plane (netdriver/sandbox.py): one namespace per network holding a bridge and a VXLAN
    device, and one veth pair per endpoint. Kernel objects only: what should exist is decided by the driver and
    the stores.

      ensure_network(network)                 idempotent; namespace + bridge + VXLAN up with the network's MTU
      remove_network(network_id, vni=None)    idempotent; the namespace and everything in it
      ensure_endpoint(network, endpoint) -> str   idempotent; the host-side interface name for Join's SrcName
      remove_endpoint(network_id, endpoint_id)    idempotent
      network_ids() -> list of 12-char id prefixes that have a namespace here
      unknown_netns() -> names in the namespace folder with our prefix that network_ids() cannot be (never touched)
      sweep_host_links(endpoint_ids) -> (removed, failures)   our leftover host-side links, each on its own;
                                          endpoint_ids() is asked after the links are listed
      wired_endpoints(network_id, endpoint_ids) -> set   those of the ids joined and still wired to the bridge
      sync_peers(network, fdb, neigh) -> (fdb changes, neighbour changes)   the VXLAN device holds exactly these
                                          remote entries (reads the kernel, so it repairs what others changed)
      update_peers(network, before, after) -> the same counts   apply the difference between two tables
      peer_entries(network, macs, ips) -> (fdb, neigh)   the VXLAN device's entries of these keys alone (reads)
      vxlan_index(network) -> int or None     the VXLAN device's ifindex (notifications name devices by index)
      repair_ports(network, ports, macs) -> [what was put right]   the endpoint ports named (or whose endpoint
                                          MACs are named) made as ensure_endpoint made them; O(ports named)
      network_problems(network) -> [reason]   what differs from what ensure_network makes (reads only)
      guard_drift(network, endpoints) -> reason or None   the anti-spoofing table against guard_endpoints'
      host_guard_drift(networks) -> reason or None        the isolation table against guard_host's
      guard_endpoints(network, endpoints)     anti-spoofing rules for exactly these local endpoints (whole table)
      guard_endpoint(network, endpoint)       idempotent; this endpoint's port added to an existing table
      unguard_endpoint(network, endpoint)     idempotent; this endpoint's port taken out (no namespace: nothing)
      guard_host(networks)                    isolation rules for exactly these networks' subnets
    """

    def ensure_network(self, network: Network) -> None: ...

    def remove_network(self, network_id: str, vni: Optional[int] = None) -> None: ...

    def ensure_endpoint(self, network: Network, endpoint: Endpoint) -> str: ...

    def remove_endpoint(self, network_id: str, endpoint_id: str) -> None: ...

    def network_ids(self) -> List[str]: ...

    def unknown_netns(self) -> List[str]: ...

    def sweep_host_links(self, endpoint_ids: Callable[[], Iterable[str]]) -> Tuple[List[str], List[str]]: ...

    def wired_endpoints(self, network_id: str, endpoint_ids: List[str]) -> Set[str]: ...

    def sync_peers(self, network: Network, fdb: Dict[str, str], neigh: Dict[str, str]) -> Tuple[int, int]: ...

    def update_peers(self, network: Network, before: Entries, after: Entries) -> Tuple[int, int]: ...

    def peer_entries(self, network: Network, macs: Iterable[str], ips: Iterable[str]) -> Entries: ...

    def vxlan_index(self, network: Network) -> Optional[int]: ...

    def repair_ports(self, network: Network, ports: Iterable[str] = (), macs: Iterable[str] = ()) -> List[str]: ...

    def network_problems(self, network: Network) -> List[str]: ...

    def guard_drift(self, network: Network, endpoints: List[Endpoint]) -> Optional[str]: ...

    def host_guard_drift(self, networks: List[Network]) -> Optional[str]: ...

    def guard_endpoints(self, network: Network, endpoints: List[Endpoint]) -> None: ...

    def guard_endpoint(self, network: Network, endpoint: Endpoint) -> None: ...

    def unguard_endpoint(self, network: Network, endpoint: Endpoint) -> None: ...

    def guard_host(self, networks: List[Network]) -> None: ...


class Firewall(Protocol):
    """The nftables rules the data plane keeps (netdriver/isolation.py): anti-spoofing in a network's namespace
    `ns`, where an endpoint is (bridge port, address, MAC), and isolation between networks in the host's."""

    def guard_endpoints(self, ns: str, endpoints: Sequence[Tuple[str, str, str]]) -> None: ...

    def guard_endpoint(self, ns: str, port: str, ip: str, mac: str) -> None: ...

    def unguard_endpoint(self, ns: str, port: str, ip: str, mac: str) -> None: ...

    def guard_host(self, subnets: Iterable[str]) -> None: ...

    def endpoints_drift(self, ns: str, endpoints: Sequence[Tuple[str, str, str]]) -> Optional[str]: ...

    def host_drift(self, subnets: Iterable[str]) -> Optional[str]: ...


class Underlay(Protocol):
    """This host's VTEP (netdriver/underlay.py)."""

    @property
    def address(self) -> Optional[str]: ...

    @property
    def mtu(self) -> int:
        """The MTU of the VTEP's interface (networks derive theirs from it)."""
        ...

    def require(self) -> str:
        """The VTEP address, or InvalidRequest saying how to give one."""
        ...

    def discovered(self, address: str) -> bool:
        """Swarm reported this node's address; True if it became the VTEP."""
        ...


class NamespaceEvents(Protocol):
    """Told when a network's namespace comes and goes here (netdriver/watcher.py PeerSync: it programs the
    network's peers from then on, and stops)."""

    def network_up(self, network: Network) -> None: ...

    def network_down(self, network: Network) -> None: ...


class PolicyEvents(Protocol):
    """The policy engine as the driver tells it about a Join (netdriver/policy_engine.py PolicyEngine)."""

    def member_here(self, segment: str, record: PeerRecord) -> None:
        """This host's endpoint, wired and published: its policy elements in place before Join returns
        (KernelError if they could not be: the Join fails)."""
        ...


class Encryption(Protocol):
    """The ESP manager as the network driver and the peer sync use it (encrypt/manager.py EncryptionManager)."""

    def require(self) -> None:
        """What an encrypted network needs before its VXLAN device exists (ESP in the kernel, the fail-closed
        firewall table), or EncryptionUnavailable saying what is missing."""
        ...

    def set_peers(self, holder: str, vteps: Iterable[str]) -> None:
        """The remote VTEPs `holder` (a segment) needs now; empty releases them."""
        ...

    def sync_all(self, holders: Dict[str, Iterable[str]]) -> None:
        """The whole desired state: holder -> remote VTEPs; SAs nothing needs go."""
        ...

    def repair(self) -> Dict[str, int]:
        """Put back what the kernel lost of the desired state (SAs, policies, the fail-closed table); returns
        kind ("sa", "policy", "ipsec-firewall") -> how many were repaired (empty: nothing was wrong)."""
        ...
