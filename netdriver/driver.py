"""The NetworkDriver verbs: validate, record desired state in etcd, program the data plane, roll back on failure.

No netlink and no etcd calls here: the driver receives a NetworkStore and a DataPlane. Each method takes the
decoded record from wire.protocol and returns the wire reply (shapes in each docstring, after
moby libnetwork/drivers/remote/api/api.go).
"""

import contextlib
import dataclasses
import ipaddress
import logging
import threading
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple

from kernel import mtu as mtu_of
from kernel import names
from netdriver import contracts, options
from netdriver.models import Endpoint, Network, PeerRecord, Subnet, merge_exposed
from netdriver.placement import limit_message
from netdriver.store import NetworkStore, segment_of
from store.schema import SWARM_HOLDER
from wire import protocol as p
from wire.errors import Conflict, Exhausted, InvalidOption, InvalidRequest, KernelError

log = logging.getLogger(__name__)


class _Undo:
    """Actions that reverse what a call has done so far; run newest first if the call fails."""

    def __init__(self):
        self._actions: List[Callable[[], None]] = []

    def push(self, action: Callable[[], None]) -> None:
        self._actions.append(action)

    def run(self) -> None:
        for action in reversed(self._actions):
            try:
                action()
            except Exception:  # keep undoing the rest; the original error is what the user must see
                log.exception("rollback step failed")


@contextlib.contextmanager
def _rollback() -> Iterator[_Undo]:
    undo = _Undo()
    try:
        yield undo
    except BaseException:
        undo.run()
        raise


@dataclasses.dataclass(frozen=True)
class IdentityWrite:
    """What NetworkDriver.publish_identity did: outcome "written", "unchanged" or "absent"; since_join: seconds
    from the endpoint's Join (in this process) to its first identity in etcd, None when not measured."""
    outcome: str
    since_join: Optional[float] = None


def mac_for(ip: str) -> str:
    """A locally administered MAC derived from the IPv4 address (Docker's 02:42:<ip> convention), so a replayed
    endpoint gets the same MAC and peers never see two MACs for one address."""
    octets = ipaddress.IPv4Address(ip).packed
    return "02:42:" + ":".join(f"{b:02x}" for b in octets)


def _subnets(data) -> List[Subnet]:
    if not data:
        # Docker 20.10 allocates an IPv4 pool for every network, --ipv6 or not: a request without one is not
        # from a dockerd we support, and the MAC of every endpoint is derived from its IPv4 address (mac_for).
        raise InvalidRequest("IPv4Data: vxnet needs an IPv4 subnet, also on a --ipv6 network (use --subnet or "
                             "--ipam-driver vxnet)")
    out = []
    for i, item in enumerate(data):
        try:
            pool = str(ipaddress.IPv4Network(item.pool))
        except ValueError:
            raise InvalidRequest(f"IPv4Data[{i}].Pool: {item.pool!r} is not an IPv4 subnet") from None
        out.append(Subnet(pool=pool, gateway=p.ipv4_from_cidr(item.gateway, f"IPv4Data[{i}].Gateway")))
    return out


def _subnets6(data, enabled: bool) -> List[Subnet]:
    """IPv6Data -> the network's IPv6 subnets; [] for an IPv4-only network. enabled: the --ipv6 option."""
    if enabled and not data:
        raise InvalidRequest("IPv6Data: a --ipv6 network needs an IPv6 pool (use --subnet with an IPv6 prefix or "
                             "--ipam-driver vxnet)")
    out = []
    for i, item in enumerate(data):
        try:
            pool = ipaddress.IPv6Network(item.pool)
        except ValueError:
            raise InvalidRequest(f"IPv6Data[{i}].Pool: {item.pool!r} is not an IPv6 subnet") from None
        if pool.is_link_local or pool.is_multicast:
            # fe80::/10 is every interface's own (RFC 4291 2.5.6; anti-spoofing allows each container the
            # link-local address of its MAC), ff00::/8 is no unicast range.
            raise InvalidRequest(f"IPv6Data[{i}].Pool: {pool} is a link-local or multicast range, not a subnet "
                                 "for containers")
        gateway = p.ipv6_from_cidr(item.gateway, f"IPv6Data[{i}].Gateway")
        if gateway is not None and ipaddress.IPv6Address(gateway) not in pool:
            raise InvalidRequest(f"IPv6Data[{i}].Gateway: {gateway} is outside the pool {pool}")
        out.append(Subnet(pool=str(pool), gateway=gateway))
    return out


# dockerd 20.10's Swarm allocator (swarmkit cnmallocator) never gives a swarm-scoped network IPv6: it asks the IPAM
# for every pool with V6 false, hands AllocateNetwork no IPv6Data and gives each task one address, from the first
# pool. Each node's dockerd then asks its own IPAM for a v6 pool on its own, with no subnet (docs/ipv6.md has the
# wire): every node would pick another /64 and containers on different nodes would have no IPv6 path between them.
# So a Swarm network's IPv6Data is refused on every node, with a message `docker service ps` shows.
SWARM_IPV6_REFUSED = ("IPv6Data: --ipv6 on a Swarm-scoped network: dockerd's Swarm allocator gives it no IPv6 "
                      "subnet (AllocateNetwork has no IPv6Data), so each node would pick a v6 subnet of its own; "
                      "for dual stack across hosts use a local-scope network with -o overlay=NAME (docs/ipv6.md)")


def _unknown_network(network_id: str) -> Conflict:
    # Not 404: that means "not implemented" to dockerd (wire/errors.py).
    return Conflict(f"NetworkID: network {network_id[:12]} is not known to vxnet (not in its etcd store)")


def _address6(network: Network, text: str) -> str:
    """Interface.AddressIPv6 ("fd00:1::2/64" or "") -> the endpoint's ip6, checked against the network."""
    if not text:
        return ""
    if not network.ipv6:
        raise InvalidRequest(f"Interface.AddressIPv6: {text!r} given, but network {network.id[:12]} was created "
                             "without --ipv6")
    try:
        iface = ipaddress.IPv6Interface(text)
    except ValueError:
        raise InvalidRequest(f"Interface.AddressIPv6: {text!r} is not an IPv6 CIDR") from None
    if not any(iface.ip in ipaddress.IPv6Network(s.pool) for s in network.subnets6):
        raise InvalidRequest(f"Interface.AddressIPv6: {iface.ip} is outside the network's IPv6 subnets")
    if iface.ip.is_link_local or iface.ip.is_multicast or iface.ip.is_unspecified:
        raise InvalidRequest(f"Interface.AddressIPv6: {iface.ip} is not a unicast global address")
    return str(iface)


def _unicast_mac(mac: str) -> str:
    """Interface.MacAddress (format checked by the decoder) as a veth can carry it: the kernel refuses a
    multicast (I/G bit, the low bit of the first octet) or all-zero address (is_valid_ether_addr)."""
    if int(mac[:2], 16) & 1 or mac == "00:00:00:00:00:00":
        raise InvalidRequest(f"Interface.MacAddress: {mac} is not a unicast MAC address")
    return mac


class NetworkDriver:
    def __init__(self, store: NetworkStore, dataplane: contracts.DataPlane, host_id: str, scope: str,
                 underlay: contracts.Underlay, peers: Optional[contracts.NamespaceEvents] = None,
                 lease_id: Callable[[], int] = lambda: 0, on_vtep_change: Callable[[], None] = lambda: None,
                 encryption: Optional[contracts.Encryption] = None, policy: Optional[contracts.PolicyEvents] = None,
                 max_endpoints: int = names.MAX_BRIDGED_ENDPOINTS):
        """underlay: this host's VTEP (address, mtu, discovered());
        peers: told when a network's namespace comes and goes (None: single host, no peers);
        lease_id: the host lease that this host's peer records live under;
        on_vtep_change: called after Swarm's DiscoverNew moved the VTEP (re-register the host);
        encryption: the ESP manager (None: no cluster secret, `-o encrypted` refused);
        policy: given this host's record at each Join before dockerd gets the interface (the policy engine);
        max_endpoints: how many endpoints one network may have on this host (VXNET_MAX_ENDPOINTS), refused past it
        at CreateEndpoint and Join in vxnet's words (netdriver/placement.py limit_message)."""
        self.max_endpoints = max_endpoints
        self.policy = policy
        self.store = store
        self.encryption = encryption
        self.dataplane = dataplane
        self.peers = peers
        self.lease_id = lease_id
        self.host_id = host_id
        self.scope = scope
        self.underlay = underlay
        self.on_vtep_change = on_vtep_change
        # Serialises the anti-spoofing changes of all networks. A whole-table rebuild computes the endpoints
        # present and then applies them; an endpoint's own add (after its veth exists) or removal (after its veth
        # is gone) taken in between would be undone by it. Under one lock, whichever comes second sees the other.
        self._guard_lock = threading.Lock()
        # Networks whose namespace this process has made whole (ensure_network, peers applied, anti-spoofing table
        # rebuilt): network id -> record. A Join there only wires its endpoint (ensure_network alone costs ~6 ms
        # and the peer resync reads the whole FDB). Filled by CreateNetwork, start-up and the first Join; an entry
        # goes with the namespace and after any kernel error in it, so the next call rebuilds from scratch.
        self._ready: Dict[str, Network] = {}
        # This host's endpoints wired and guarded in each network's namespace: network id -> endpoint ids. Kept
        # for the metrics (local_endpoints: read at every scrape, so never a round trip to etcd); set whole where
        # the anti-spoofing table is rebuilt, then changed by each Join and DeleteEndpoint. Its own lock, taken
        # last (inside _guard_lock where both are held): a scrape never waits for a guard rebuild's etcd read.
        self._joined: Dict[str, Set[str]] = {}
        self._joined_lock = threading.Lock()
        # network id -> calls now changing its endpoints' ports and anti-spoofing elements (Join, DeleteEndpoint):
        # between a veth made and its elements added (or the veth gone and its elements not yet removed) the
        # table is legitimately behind, and the reconciler must not take that for drift.
        self._busy: Dict[str, int] = {}
        self._busy_lock = threading.Lock()
        # Held while a namespace is removed and while the reconciler rebuilds one: a rebuild decided on before a
        # DeleteNetwork (the namespace found missing, as it is once the delete has removed it) must not make the
        # namespace of a deleted network again.
        self._namespace_lock = threading.RLock()
        # Identities of this host's endpoints as the identity writer (plugin/endpoint_identity.py) published them
        # (endpoint id -> PeerRecord.identity), so that every rewrite of a peer record (a replayed Join, the
        # republish under a new lease) keeps them; and when each endpoint's Join published its record
        # (monotonic), to measure how long it stayed without one. Both go at Leave and DeleteEndpoint.
        self._identities: Dict[str, dict] = {}
        # ... and the container's exposed ports read with it (merged into the record's: see publish_identity).
        self._exposed: Dict[str, List[str]] = {}
        self._joined_at: Dict[str, float] = {}
        self._identity_lock = threading.Lock()
        # This host's endpoint records per network (network id -> endpoint ids), for the limit: read from etcd at
        # a network's first CreateEndpoint in this process, then kept by CreateEndpoint and DeleteEndpoint, so the
        # check costs no round trip. A create reserves its place before its record is written.
        self._here: Dict[str, Set[str]] = {}
        self._here_lock = threading.Lock()

    def local_endpoints(self) -> Dict[str, int]:
        """network id -> this host's endpoints on it, for each network whose namespace this process has made."""
        ready = list(self._ready)
        with self._joined_lock:
            return {nid: len(self._joined.get(nid, ())) for nid in set(ready) | set(self._joined)}

    # -- capabilities and discovery -----------------------------------------------------------------------------
    def get_capabilities(self, req: p.EmptyRequest) -> dict:
        """-> `{"Scope": "local"|"global", "ConnectivityScope": same}`"""
        return {"Scope": self.scope, "ConnectivityScope": self.scope}

    def discover_new(self, req: p.DiscoveryRequest) -> dict:
        """`{"DiscoveryType":1,"DiscoveryData":{"Address","BindAddress","Self"}}` -> `{}`.

        Swarm only ever tells a plugin about its own node (Self: true); that address becomes the VTEP unless
        VXNET_ADVERTISE_ADDR is set. Other hosts are found through etcd, never through this call."""
        data = req.data
        if req.discovery_type == 1 and data.get("Self") is True and isinstance(data.get("Address"), str):
            if self.underlay.discovered(data["Address"]):
                self.on_vtep_change()
                self.republish_peers()
        return {}

    def discover_delete(self, req: p.DiscoveryRequest) -> dict:
        return {}

    # -- Swarm manager ------------------------------------------------------------------------------------------
    def allocate_network(self, req: p.CreateNetworkRequest) -> dict:
        """Swarm manager only. `{"NetworkID","Options":{str:str},"IPv4Data","IPv6Data"}` -> `{"Options":{...}}`.

        The reply replaces the network's driver options on every node, so it echoes every input option and adds
        the VNI workers must use. Replays (leader change) return the same VNI. The manager holds the segment until
        FreeNetwork, so the VNI stays the network's while no task runs anywhere."""
        # The flat driver options, where Swarm may also pass the --ipv6 flag: not a `-o` key of ours, but echoed
        # back with the others, so the workers' CreateNetwork still sees it.
        generic = {k: v for k, v in req.options.items() if k != options.ENABLE_IPV6}
        opts = options.parse({options.GENERIC: generic})
        if req.ipv6_data:
            _subnets6(req.ipv6_data, enabled=False)  # refused here, where `docker network create` is answered
        if opts.encrypted:
            # Refused here, where `docker network create` is answered, rather than by every worker's
            # CreateNetwork later, where a task would fail to start with the reason only in its status.
            self._require_encryption()
        segment = segment_of(req.network_id, opts.overlay)
        vni = self.store.allocate_segment(segment, opts.vni, opts.encrypted)
        self.store.add_member(req.network_id, SWARM_HOLDER, segment)
        return {"Options": {**{str(k): str(v) for k, v in req.options.items()}, "vni": str(vni)}}

    def free_network(self, req: p.NetworkIDRequest) -> dict:
        """Swarm manager only. `{"NetworkID"}` -> `{}`: the manager's hold goes; the VNI goes back once no host
        still has the network."""
        segment = self.store.swarm_segment(req.network_id)
        self.store.delete_network(req.network_id, SWARM_HOLDER, segment)
        self.store.release_segment(segment)
        return {}

    # -- networks -----------------------------------------------------------------------------------------------
    def create_network(self, req: p.CreateNetworkRequest) -> dict:
        """`{"NetworkID","Options":{...},"IPv4Data":[IPAMData],"IPv6Data":[...]}` -> `{}`"""
        opts = options.parse(req.options)
        subnets = _subnets(req.ipv4_data)
        subnets6 = _subnets6(req.ipv6_data, opts.ipv6)
        if subnets6 and p.SWARM_ID.fullmatch(req.network_id):
            raise InvalidOption(SWARM_IPV6_REFUSED)
        existing = self.store.get_network(req.network_id)
        if existing is not None:
            # A replay, or this host joining a network that spans hosts (Swarm: one ID everywhere): this host
            # becomes a member, the kernel is made to match, nothing else changes.
            if existing.encrypted:
                self._require_encryption()
            self.store.add_member(existing.id, self.host_id, segment_of(existing.id, existing.overlay))
            self._prepare(existing)
            self._guard_host()
            return {}
        self.underlay.require()
        if opts.encrypted:
            self._require_encryption()  # before anything is written: a kernel without ESP fails here, at once
        mtu = opts.mtu or (mtu_of.inner_mtu(self.underlay.mtu) if opts.encrypted
                           else mtu_of.vxlan_mtu(self.underlay.mtu))
        segment = segment_of(req.network_id, opts.overlay)
        with _rollback() as undo:
            had_segment = self.store.segment_vni(segment) is not None
            vni = self.store.allocate_segment(segment, opts.vni, opts.encrypted)
            if not had_segment:
                undo.push(lambda: self.store.release_segment(segment))
            network = Network(id=req.network_id, vni=vni, mtu=mtu, internal=opts.internal, subnets=subnets,
                              overlay=opts.overlay, options=opts.generic, encrypted=opts.encrypted,
                              subnets6=subnets6, policy=opts.policy, policy_audit=opts.policy_audit)
            self.store.put_network(network, self.host_id, segment)
            undo.push(lambda: self.store.delete_network(network.id, self.host_id, segment))
            undo.push(lambda: self._remove_namespace(network.id, network.vni))
            self._prepare(network)
            self._guard_host()
        log.info("network created nid=%s vni=%d mtu=%d internal=%s encrypted=%s ipv6=%s", network.id[:12], vni,
                 mtu, opts.internal, opts.encrypted, network.ipv6)
        return {}

    def delete_network(self, req: p.NetworkIDRequest) -> dict:
        """`{"NetworkID"}` -> `{}`. Unknown networks succeed: dockerd replays deletes after a crash."""
        network = self.store.get_network(req.network_id)
        if network is None:
            self._remove_namespace(req.network_id)
            return {}
        segment = segment_of(network.id, network.overlay)
        for endpoint in self.store.list_endpoints(network.id):
            if endpoint.host == self.host_id:
                self.store.delete_peer(segment, endpoint.id)
        if self.peers is not None:
            self.peers.network_down(network)
        self._remove_namespace(network.id, network.vni)
        self.store.delete_network(network.id, self.host_id, segment)
        self._guard_host()
        self.store.release_segment(segment)
        log.info("network deleted nid=%s vni=%d", network.id[:12], network.vni)
        return {}

    def _require_encryption(self) -> None:
        """ESP in the kernel and the fail-closed firewall, or the error the user sees at `docker network create`."""
        if self.encryption is None:
            raise InvalidOption("option encrypted: no cluster secret is configured (set VXNET_ENCRYPTION_SECRET_FILE "
                                "to the same 32-byte secret on every host)")
        self.encryption.require()

    def _network(self, network_id: str) -> Network:
        network = self.store.get_network(network_id)
        if network is None:
            raise _unknown_network(network_id)
        return network

    # -- endpoints ----------------------------------------------------------------------------------------------
    def create_endpoint(self, req: p.CreateEndpointRequest) -> dict:
        """`{"NetworkID","EndpointID","Interface":{"Address","AddressIPv6","MacAddress"},"Options"}` ->
        `{"Interface":{"MacAddress"}}` when the request had no MAC (only fields that were empty), else `{}`."""
        network = self._ready.get(req.network_id) or self._network(req.network_id)  # see leave()
        if not req.interface.address:
            raise InvalidRequest("Interface.Address: vxnet needs the endpoint's IPv4 address from IPAM")
        try:
            iface = ipaddress.IPv4Interface(req.interface.address)
        except ValueError:
            raise InvalidRequest(f"Interface.Address: {req.interface.address!r} is not an IPv4 CIDR") from None
        if not any(iface.ip in ipaddress.IPv4Network(s.pool) for s in network.subnets):
            raise InvalidRequest(f"Interface.Address: {iface.ip} is outside the network's subnets")
        ip6 = _address6(network, req.interface.address_ipv6)
        mac = _unicast_mac(req.interface.mac_address) if req.interface.mac_address else mac_for(str(iface.ip))
        reserved = self._reserve(network, req.endpoint_id)
        try:
            self.store.put_endpoint(Endpoint(network_id=network.id, id=req.endpoint_id, ip=str(iface), mac=mac,
                                             host=self.host_id, ip6=ip6, exposed=[str(x) for x in req.exposed]))
        except BaseException:
            if reserved:
                self._release(network.id, req.endpoint_id)
            raise
        return {} if req.interface.mac_address else {"Interface": {"MacAddress": mac}}

    def _reserve(self, network: Network, endpoint_id: str) -> bool:
        """A place for this endpoint among the network's on this host (True: newly taken, False: it had one), or
        Exhausted naming the limit. Nothing is written or made before it."""
        with self._here_lock:
            here = self._here.get(network.id)
        if here is None:
            found = {e.id for e in self.store.list_endpoints(network.id) if e.host == self.host_id}
            with self._here_lock:
                here = self._here.setdefault(network.id, found)
        with self._here_lock:
            if endpoint_id in here:
                return False
            if len(here) >= self.max_endpoints:
                raise Exhausted(limit_message(network.id, self.max_endpoints))
            here.add(endpoint_id)
            return True

    def _release(self, network_id: str, endpoint_id: str) -> None:
        with self._here_lock:
            self._here.get(network_id, set()).discard(endpoint_id)

    def endpoint_oper_info(self, req: p.EndpointRequest) -> dict:
        """`{"NetworkID","EndpointID"}` -> `{"Value":{...}}`: shown by `docker inspect` under the endpoint."""
        endpoint = self.store.get_endpoint(req.network_id, req.endpoint_id)
        if endpoint is None:
            return {"Value": {}}
        network = self.store.get_network(req.network_id)
        value = {"vxnet.ip": endpoint.ip, "vxnet.mac": endpoint.mac, "vxnet.host": endpoint.host,
                 "vxnet.ifname": names.veth_container(endpoint.id)}
        if endpoint.ip6:
            value["vxnet.ip6"] = endpoint.ip6
        if network is not None:
            value["vxnet.vni"] = str(network.vni)
        return {"Value": value}

    def delete_endpoint(self, req: p.EndpointRequest) -> dict:
        """`{"NetworkID","EndpointID"}` -> `{}`; unknown IDs succeed.

        Records go last, in one transaction: a failure before it leaves them for dockerd's replay to finish with."""
        network, endpoint = self.store.network_and_endpoint(req.network_id, req.endpoint_id)
        with self._changing(req.network_id):
            return self._delete_endpoint(req, network, endpoint)

    def _delete_endpoint(self, req: p.EndpointRequest, network: Optional[Network],
                         endpoint: Optional[Endpoint]) -> dict:
        self.dataplane.remove_endpoint(req.network_id, req.endpoint_id)  # the port goes before its guard
        if network is None:
            self.store.delete_endpoint(req.network_id, req.endpoint_id)
            return {}
        with self._joined_lock:
            self._joined.get(network.id, set()).discard(req.endpoint_id)
        if endpoint is not None and network.id in self._ready:
            try:
                self._unguard(network, endpoint)
            except KernelError as exc:
                log.warning("anti-spoofing of nid=%s rebuilt whole: %s", network.id[:12], exc)
                self._ready.pop(network.id, None)
                self._guard(network)
        else:
            self._guard(network)  # no record to name its elements, or a table this process has not made
        self.store.delete_endpoint(network.id, req.endpoint_id, segment_of(network.id, network.overlay))
        self._release(network.id, req.endpoint_id)
        self._forget_identity(req.endpoint_id)
        return {}

    def join(self, req: p.JoinRequest) -> dict:
        """`{"NetworkID","EndpointID","SandboxKey","Options"}` ->
        `{"InterfaceName":{"SrcName","DstPrefix"},"DisableGatewayService":bool}`.

        No Gateway: on a non-internal network dockerd then attaches the container to docker_gwbridge for egress,
        as it does for Docker's own overlay; internal networks get no way out."""
        network, endpoint = self.store.network_and_endpoint(req.network_id, req.endpoint_id)
        if network is None:
            raise _unknown_network(req.network_id)
        if endpoint is None:
            raise Conflict(f"EndpointID: endpoint {req.endpoint_id[:12]} was never created on network "
                           f"{network.id[:12]}")
        with self._joined_lock:
            joined = self._joined.get(network.id, set())
            if endpoint.id not in joined and len(joined) >= self.max_endpoints:
                raise Exhausted(limit_message(network.id, self.max_endpoints))
        ready = network.id in self._ready
        with self._changing(network.id):
            try:
                ifname = self._wire(network, endpoint, whole=not ready)
            except KernelError as exc:
                if not ready:
                    self._ready.pop(network.id, None)
                    raise
                # _wire took back what it made for this endpoint. The others are untouched and keep working, so
                # nothing is rebuilt under them unless the namespace itself is broken (removed by hand, say: the
                # bridge, the VXLAN device or a trunk gone), where they are not working anyway.
                problems = self.dataplane.network_problems(network)
                if not problems:
                    raise
                self._ready.pop(network.id, None)
                log.warning("network nid=%s rebuilt for Join eid=%s (%s): %s", network.id[:12], endpoint.id[:12],
                            "; ".join(problems), exc)
                ifname = self._wire(network, endpoint, whole=True)
        with self._identity_lock:
            self._joined_at.setdefault(endpoint.id, time.monotonic())
        return {"InterfaceName": {"SrcName": ifname, "DstPrefix": names.CONTAINER_PREFIX},
                "DisableGatewayService": network.internal}

    def _wire(self, network: Network, endpoint: Endpoint, whole: bool) -> str:
        """The endpoint's veth, its anti-spoofing elements, then its peer record; whole: make the network's
        namespace whole first."""
        segment = segment_of(network.id, network.overlay)
        with _rollback() as undo:
            if whole:
                self._prepare(network)
            undo.push(lambda: self.dataplane.remove_endpoint(network.id, endpoint.id))
            ifname = self.dataplane.ensure_endpoint(network, endpoint)
            with self._guard_lock:  # before dockerd gets the interface: no window without anti-spoofing
                try:
                    self.dataplane.guard_endpoint(network, endpoint)
                except KernelError as exc:
                    # The table is gone or not the one we made (someone else's change): replaced whole, in one
                    # atomic batch holding every wired endpoint's elements (this one's too: its veth is wired),
                    # so no other endpoint is unguarded or disturbed meanwhile.
                    log.warning("anti-spoofing of nid=%s rebuilt whole for Join eid=%s: %s", network.id[:12],
                                endpoint.id[:12], exc)
                    mine, wired = self._endpoints_here(network)
                    guarded = [e for e in mine if e.id in wired]
                    self.dataplane.guard_endpoints(network, guarded)
                    with self._joined_lock:
                        self._joined[network.id] = {e.id for e in guarded}
                with self._joined_lock:
                    self._joined.setdefault(network.id, set()).add(endpoint.id)
            undo.push(lambda: self._unwire(network, endpoint))
            undo.push(lambda: self.store.delete_peer(segment, endpoint.id))
            record = self._publish(network, endpoint)
            if self.policy is not None:
                # A policy network guards the new address now, not when the watch echoes the record: dockerd
                # hands the interface to the container as soon as Join returns.
                self.policy.member_here(segment, record)
        return ifname

    def leave(self, req: p.EndpointRequest) -> dict:
        """`{"NetworkID","EndpointID"}` -> `{}`: other hosts forget the peer; the veth goes at DeleteEndpoint."""
        # A network record never changes while this host is a member, so the one kept for a ready namespace
        # names the segment without a round trip to etcd.
        network = self._ready.get(req.network_id) or self.store.get_network(req.network_id)
        self._forget_identity(req.endpoint_id)
        if network is not None:
            self.store.delete_peer(segment_of(network.id, network.overlay), req.endpoint_id)
        return {}

    # -- identities (plugin/endpoint_identity.py writes them; never from a request handler) -----------------------
    def publish_identity(self, network_id: str, endpoint_id: str, identity: dict,
                         exposed: Sequence[str] = ()) -> "IdentityWrite":
        """Record who the container behind this host's endpoint is in its peer record (PeerRecord.identity), for
        the policy of every host, and the ports it exposes (its Config.ExposedPorts, "5432/tcp") beside those of
        CreateEndpoint: dockerd 20.10 sends them only with the container's first network (on the others the
        option is absent), and a container exposes its ports on every network it is on. IDs come from the
        engine's inspect, not from dockerd's plugin calls: checked here, before they name an etcd key; an
        endpoint of a network that is not vxnet's, not joined here, or gone (Leave) is "absent" and nothing is
        written. Idempotent ("unchanged" for a replay); never brings a deleted record back
        (NetworkStore.set_peer_identity)."""
        if not ((p.DOCKER_ID.fullmatch(network_id) or p.SWARM_ID.fullmatch(network_id))
                and p.DOCKER_ID.fullmatch(endpoint_id)):
            return IdentityWrite("absent")
        network = self._ready.get(network_id) or self.store.get_network(network_id)
        if network is None:
            return IdentityWrite("absent")
        # The cache first: a rewrite of the record racing with this one (a republish) then carries it as well.
        # If the record turns out to be gone, the entry goes again (a Leave in between has already dropped it).
        exposed = list(exposed)
        with self._identity_lock:
            self._identities[endpoint_id] = identity
            self._exposed[endpoint_id] = exposed
        outcome = self.store.set_peer_identity(segment_of(network.id, network.overlay), endpoint_id, self.host_id,
                                               identity, self.lease_id(), exposed)
        with self._identity_lock:
            if outcome == "absent":
                if self._identities.get(endpoint_id) is identity:
                    del self._identities[endpoint_id]
                    self._exposed.pop(endpoint_id, None)
                return IdentityWrite(outcome)
            joined = self._joined_at.pop(endpoint_id, None) if outcome == "written" else None
        return IdentityWrite(outcome, None if joined is None else time.monotonic() - joined)

    def _forget_identity(self, endpoint_id: str) -> None:
        with self._identity_lock:
            self._identities.pop(endpoint_id, None)
            self._exposed.pop(endpoint_id, None)
            self._joined_at.pop(endpoint_id, None)

    def program_external_connectivity(self, req: p.EndpointRequest) -> dict:
        """Egress and published ports go through docker_gwbridge, which dockerd programs itself. -> `{}`"""
        return {}

    def revoke_external_connectivity(self, req: p.EndpointRequest) -> dict:
        return {}

    def _prepare(self, network: Network) -> None:
        """Make the network's namespace whole: bridge and VXLAN, the peers, the anti-spoofing table rebuilt from
        the endpoints present. Afterwards Joins only add their own endpoint."""
        self._ready.pop(network.id, None)
        self.dataplane.ensure_network(network)
        self._network_up(network)
        self._guard(network)
        self._ready[network.id] = network

    def _remove_namespace(self, network_id: str, vni: Optional[int] = None) -> None:
        with self._namespace_lock:
            for known in [n for n in self._ready if n[:12] == network_id[:12]]:  # network_id may be a prefix
                self._ready.pop(known, None)
            with self._joined_lock:
                for known in [n for n in self._joined if n[:12] == network_id[:12]]:
                    self._joined.pop(known, None)
            with self._here_lock:
                for known in [n for n in self._here if n[:12] == network_id[:12]]:
                    self._here.pop(known, None)
            self.dataplane.remove_network(network_id, vni)

    def _guard(self, network: Network) -> None:
        """The whole anti-spoofing table, from this host's endpoint records whose veth is in the namespace. A
        table that already holds exactly that is left alone (one listing to compare): a restart with 4,000
        endpoints rewrites nothing that is right."""
        with self._guard_lock:
            mine, wired = self._endpoints_here(network)
            guarded = [e for e in mine if e.id in wired]
            if self.dataplane.guard_drift(network, guarded) is not None:
                self.dataplane.guard_endpoints(network, guarded)
            with self._joined_lock:
                self._joined[network.id] = {e.id for e in guarded}

    def _endpoints_here(self, network: Network) -> Tuple[List[Endpoint], Set[str]]:
        """This host's endpoint records of the network, and the ids of those whose veth is wired."""
        mine = [e for e in self.store.list_endpoints(network.id) if e.host == self.host_id]
        return mine, self.dataplane.wired_endpoints(network.id, [e.id for e in mine])

    def _unguard(self, network: Network, endpoint: Endpoint) -> None:
        with self._guard_lock:
            self.dataplane.unguard_endpoint(network, endpoint)

    def _unwire(self, network: Network, endpoint: Endpoint) -> None:
        """The veth, then its anti-spoofing elements: a port never exists unguarded."""
        self.dataplane.remove_endpoint(network.id, endpoint.id)
        self._unguard(network, endpoint)
        with self._joined_lock:
            self._joined.get(network.id, set()).discard(endpoint.id)

    def _guard_host(self) -> None:
        with self._guard_lock:
            networks = self.store.member_networks(self.host_id)
            if self.dataplane.host_guard_drift(networks) is not None:
                self.dataplane.guard_host(networks)

    def _network_up(self, network: Network) -> None:
        if self.peers is not None:
            self.peers.network_up(network)

    def _publish(self, network: Network, endpoint: Endpoint, known: Optional[PeerRecord] = None) -> PeerRecord:
        """Write the endpoint's peer record (and return it)."""
        record = self._peer_record(network, endpoint, known)
        self.store.put_peer(segment_of(network.id, network.overlay), record, lease=self.lease_id())
        return record

    def _peer_record(self, network: Network, endpoint: Endpoint, known: Optional[PeerRecord] = None) -> PeerRecord:
        """The endpoint's peer record; its identity and the exposed ports read with it are the ones published
        already (by this process, or `known`: the record an earlier process wrote), none yet else."""
        with self._identity_lock:
            identity = self._identities.get(endpoint.id, known.identity if known is not None else None)
            read = self._exposed.get(endpoint.id, known.exposed if known is not None else [])
        return PeerRecord(
            network_id=network.id, endpoint_id=endpoint.id, ip=endpoint.ip.split("/")[0], mac=endpoint.mac,
            vtep=self.underlay.require(), host=self.host_id, ip6=endpoint.ip6.split("/")[0],
            exposed=merge_exposed(endpoint.exposed, read), identity=identity)

    # -- what the reconciler (netdriver/reconciler.py) asks -------------------------------------------------------
    @contextlib.contextmanager
    def _changing(self, network_id: str) -> Iterator[None]:
        with self._busy_lock:
            self._busy[network_id] = self._busy.get(network_id, 0) + 1
        try:
            yield
        finally:
            with self._busy_lock:
                left = self._busy.pop(network_id) - 1
                if left:
                    self._busy[network_id] = left

    def ready_networks(self) -> List[Network]:
        """The networks whose namespace this process has made whole (the ones the reconciler keeps whole)."""
        return list(self._ready.values())

    def rebuild(self, network: Network) -> bool:
        """Make the network's namespace whole again (bridge, VXLAN device, peers, anti-spoofing), as CreateNetwork
        and the first Join do. KernelError: left for the next pass (the network stays out of the ready set, and
        its next Join rebuilds it too). Returns False, doing nothing, if the network is no longer ready here (a
        DeleteNetwork removed it meanwhile)."""
        with self._namespace_lock:
            if network.id not in self._ready:
                return False
            self._prepare(network)
            return True

    def repair_guard(self, network: Network) -> Optional[str]:
        """Compare the network's anti-spoofing table with the endpoints wired here and rebuild it if they differ;
        returns the difference found (None: equal, or a Join or DeleteEndpoint of the network is under way, whose
        own change the table is waiting for). Under the lock every anti-spoofing change takes."""
        def busy() -> bool:
            with self._busy_lock:
                return bool(self._busy.get(network.id))

        with self._guard_lock:
            if busy():
                return None
            mine, wired = self._endpoints_here(network)
            endpoints = [e for e in mine if e.id in wired]
            drift = self.dataplane.guard_drift(network, endpoints)
            # Asked again after the reads: a Join that began meanwhile made its veth (read as wired) and waits on
            # this lock to add its elements; it finished none in between, since it needs the lock held here.
            if drift is not None and busy():
                return None
            if drift is not None:
                self.dataplane.guard_endpoints(network, endpoints)
                with self._joined_lock:
                    self._joined[network.id] = {e.id for e in endpoints}
            return drift

    def repair_host_guard(self) -> Optional[str]:
        """The same for the host isolation table and this host's networks."""
        with self._guard_lock:
            networks = self.store.member_networks(self.host_id)
            drift = self.dataplane.host_guard_drift(networks)
            if drift is not None:
                self.dataplane.guard_host(networks)
            return drift

    # -- start-up -----------------------------------------------------------------------------------------------
    def reconcile(self) -> List[str]:
        """Make the kernel match etcd for this host: rebuild the namespaces of networks this host is a member of,
        remove vxnet namespaces no network record claims, republish the peers of endpoints still wired here and
        withdraw the ones that are not. Running containers keep their veth pairs untouched.

        What the kernel refuses is skipped, logged and returned (one line each, naming the object and the
        reason), and everything else is still reconciled: one leftover must not keep every other network on the
        host without its peers. Store errors (etcd unreachable) propagate: start-up waits for etcd and retries."""
        problems: List[str] = []

        def skip(message: str) -> None:
            log.error("start-up reconciliation skips: %s", message)
            problems.append(message)

        desired = self.store.member_networks(self.host_id)
        for network in desired:
            try:
                self._prepare(network)
            except KernelError as exc:
                # Its next Join or CreateNetwork replay tries again and reports the error to the user.
                skip(f"cannot rebuild network nid={network.id[:12]} vni={network.vni}: {exc}")
        try:
            self._guard_host()
        except KernelError as exc:
            skip(f"cannot program the host isolation rules: {exc}")
        # What the kernel holds is read before the records that claim it. Requests are served meanwhile, and a
        # CreateNetwork writes its record before it makes its namespace (a Join: the endpoint's record before its
        # veth), so whatever the first read saw, the second finds claimed. Read the other way round, a namespace
        # made in between is taken for a leftover and removed under the call making it (seen in CI while the
        # embedded etcd was slow to start).
        present = self.dataplane.network_ids()
        known = {n.id[:12] for n in self.store.list_networks()}
        for name in self.dataplane.unknown_netns():
            skip(f"{name} in the namespace folder is not a name vxnet makes (vxnet-<first 12 characters of a "
                 "network ID>) and is left alone; remove it by hand if it is a leftover")
        for prefix in present:
            if prefix not in known:
                log.info("removing stale namespace %s", names.netns(prefix))
                try:
                    self._remove_namespace(prefix)
                except KernelError as exc:
                    skip(f"cannot remove stale namespace {names.netns(prefix)}: {exc}")
        gone, failed = self.dataplane.sweep_host_links(
            lambda: [e.id for n in self.store.list_networks() for e in self.store.list_endpoints(n.id)
                     if e.host == self.host_id])
        for name in gone:
            log.info("removed stale link %s", name)
        for message in failed:
            skip(f"cannot remove a stale link: {message}")
        self.republish_peers(desired, on_kernel_error=skip)
        return problems

    def republish_peers(self, networks: Optional[List[Network]] = None,
                        on_kernel_error: Optional[Callable[[str], None]] = None) -> None:
        """Write this host's peer records under the current lease (after a new lease, or at start-up). A network
        whose namespace cannot be read is skipped (reported through on_kernel_error, else raised)."""
        for network in networks if networks is not None else self.store.member_networks(self.host_id):
            segment = segment_of(network.id, network.overlay)
            mine = {r.endpoint_id: r for r in self.store.list_peers(segment) if r.host == self.host_id}
            read = [(e, rev) for e, rev in self.store.list_endpoints_revisions(network.id) if e.host == self.host_id]
            endpoints = [e for e, _ in read]
            try:
                wired = self.dataplane.wired_endpoints(network.id, [e.id for e in endpoints])
            except KernelError as exc:
                if on_kernel_error is None:
                    raise
                on_kernel_error(f"cannot republish the peers of network nid={network.id[:12]}: {exc}")
                continue
            # In batched transactions: at start-up with 4,000 endpoints, one round trip per 128 records; each
            # record only while its endpoint's record is as read (store.put_peers: a DeleteEndpoint meanwhile
            # must not get its peer record back).
            self.store.put_peers(segment, network.id, [self._peer_record(network, e, mine.get(e.id))
                                                       for e in endpoints if e.id in wired],
                                 {e.id: rev for e, rev in read}, lease=self.lease_id())
            for endpoint in endpoints:
                if endpoint.id not in wired and endpoint.id in mine:
                    self.store.delete_peer(segment, endpoint.id)
