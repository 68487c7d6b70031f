"""The network driver's desired state in etcd: networks, segments, VNIs, members, endpoints, peers and hosts.
Every key comes from store/schema.py, whose docstring draws the tree and says what each value holds."""

import dataclasses
import json
import logging
from typing import Dict, List, Optional, Sequence, Tuple

from netdriver.models import Endpoint, Network, PeerRecord, merge_exposed
from netdriver.options import VNI_AUTO_BASE, VNI_MAX
from store import schema
from store.kv import KV, NO_GUARD, Guard
from store.schema import SWARM_HOLDER
from wire import protocol, version
from wire.errors import Conflict, Exhausted

log = logging.getLogger(__name__)

_RETRIES = 32
# etcd's default --max-txn-ops: a transaction with more operations is refused ("too many operations in txn").
TXN_PUTS = 128


def _well_formed(network_id: str, endpoint_id: Optional[str] = None) -> bool:
    """IDs the wire accepts (wire/protocol.py). Versions before it took any string, so a store may still hold
    records named "0.0.0.0/0" or "../../etc/passwd": listings skip them (they can name no kernel object, and
    one of them must not stop start-up for every other network), with a warning naming the key to delete."""
    return bool((protocol.DOCKER_ID.fullmatch(network_id) or protocol.SWARM_ID.fullmatch(network_id)) and
                (endpoint_id is None or protocol.DOCKER_ID.fullmatch(endpoint_id)))


def _skipped(key: str) -> bool:
    log.warning("ignoring etcd record %s: its ID is not a Docker ID (written by an older vxnet; delete it)", key)
    return False


def segment_of(network_id: str, overlay: Optional[str]) -> str:
    return f"overlay-{overlay}" if overlay else network_id


class NetworkStore:
    def __init__(self, kv: KV, prefix: str = schema.PREFIX):
        self.kv = kv
        self.keys = schema.Schema(prefix)

    # -- networks ----------------------------------------------------------------------------------------------
    def get_network(self, network_id: str) -> Optional[Network]:
        entry = self.kv.get(self.keys.network(network_id))
        return Network.from_json(entry.value) if entry else None

    def list_networks(self) -> List[Network]:
        entries, _ = self.kv.get_prefix(self.keys.prefix(schema.NETWORK))
        networks = [(e.key, Network.from_json(e.value)) for e in entries]
        return [n for key, n in networks if _well_formed(n.id) or _skipped(key)]

    def segment_vni(self, segment: str) -> Optional[int]:
        record = self._segment(segment)
        return int(record["vni"]) if record else None

    def _segment(self, segment: str) -> Optional[dict]:
        entry = self.kv.get(self.keys.segment(segment))
        return entry.json() if entry else None

    def allocate_segment(self, segment: str, wanted_vni: Optional[int], encrypted: bool = False) -> int:
        """Give `segment` a VNI (create-if-absent on vnis/<vni>), or return the one it already has.

        A wanted VNI held by another segment is a Conflict naming it; so is joining a segment whose encryption
        differs (one side would send ESP, the other cleartext VXLAN on another port: they could never talk, and
        an unencrypted member would silently weaken an encrypted overlay). Idempotent: replays return the same
        VNI."""
        for _ in range(_RETRIES):
            existing = self._segment(segment)
            if existing is not None:
                vni = int(existing["vni"])
                if wanted_vni is not None and wanted_vni != vni:
                    raise Conflict(f"option vni: overlay {segment} already uses VNI {vni}, not {wanted_vni}")
                if bool(existing.get("encrypted", False)) != encrypted:
                    state, fix = ("not encrypted", "drop") if encrypted else ("encrypted", "add")
                    raise Conflict(f"option encrypted: overlay {segment} is {state} on the hosts that already "
                                   f"have it; {fix} -o encrypted to join it")
                return vni
            if wanted_vni is not None:
                holder = self.kv.get(self.keys.vni(wanted_vni))
                if holder is not None and holder.value != segment:
                    raise Conflict(f"option vni: VNI {wanted_vni} is already used by network {holder.value[:12]}")
                candidate = wanted_vni
            else:
                candidate = self._free_vni()
            if self.kv.commit(absent=[self.keys.vni(candidate), self.keys.segment(segment)],
                              puts={self.keys.vni(candidate): segment,
                                    self.keys.segment(segment): json.dumps({"vni": candidate,
                                                                              "encrypted": encrypted})}):
                return candidate
        raise Conflict(f"could not allocate a VNI for {segment}: too much contention, try again")

    def _free_vni(self) -> int:
        entries, _ = self.kv.get_prefix(self.keys.prefix(schema.VNI))
        used = {int(parts["vni"]) for parts in (self.keys.parse(schema.VNI, e.key) for e in entries)
                if parts and parts["vni"].isdigit()}
        candidate = VNI_AUTO_BASE
        while candidate in used:
            candidate += 1
        if candidate > VNI_MAX:
            raise Exhausted("no free VXLAN VNI left")
        return candidate

    def release_segment(self, segment: str) -> None:
        """Drop the segment, its VNI and its policy rules once no host is a member any more (compared: a host that
        joins meanwhile keeps them all)."""
        members_prefix = self.keys.prefix(schema.MEMBER, segment=segment)
        members, revision = self.kv.get_prefix(members_prefix)
        if members:
            return
        vni = self.segment_vni(segment)
        deletes = [self.keys.segment(segment)]
        if vni is not None:
            holder = self.kv.get(self.keys.vni(vni))
            if holder is not None and holder.value == segment:
                deletes.append(self.keys.vni(vni))
        if not self.kv.commit(unchanged_since={members_prefix: revision}, deletes=deletes,
                              delete_prefixes=[self.keys.policy_rules(segment)]):
            return  # a member came: the segment is in use again
        self.kv.delete_prefix(self.keys.prefix(schema.PEER, segment=segment))

    def put_network(self, network: Network, host: str, segment: str) -> None:
        self.kv.commit(puts={
            self.keys.network(network.id): network.to_json(),
            self.keys.member(segment, host): json.dumps({"network_id": network.id}),
        })

    def add_member(self, network_id: str, host: str, segment: str) -> None:
        """host has the network too (a Swarm or global network: one record, one ID on every host); create-if-absent,
        so a replay writes nothing."""
        key = self.keys.member(segment, host)
        self.kv.commit(absent=[key], puts={key: json.dumps({"network_id": network_id})})

    def swarm_segment(self, network_id: str) -> str:
        """The segment the Swarm manager's hold on network_id is under (the network ID if there is none)."""
        entries, _ = self.kv.get_prefix(self.keys.prefix(schema.MEMBER))
        for entry in entries:
            parts = self.keys.parse(schema.MEMBER, entry.key)
            if parts and parts["host"] == SWARM_HOLDER and entry.json().get("network_id") == network_id:
                return parts["segment"]
        return network_id

    def delete_network(self, network_id: str, host: str, segment: str, guard: Guard = NO_GUARD) -> bool:
        """host leaves the network; the record, its endpoints and its policy rules go with the last member (a
        network that spans hosts has one record for all of them), in one transaction. The record is deleted only if
        no member key was written since the members were read, so a host joining meanwhile keeps it. The member
        key goes in one transaction that also compares guard: False, with nothing changed, if that failed."""
        members_prefix = self.keys.prefix(schema.MEMBER, segment=segment)
        if guard is NO_GUARD:
            self.kv.delete(self.keys.member(segment, host))
        elif not self.kv.commit(absent=guard.absent, revisions=dict(guard.revisions),
                                deletes=[self.keys.member(segment, host)]):
            return False
        for _ in range(_RETRIES):
            members, revision = self.kv.get_prefix(members_prefix)
            if any(m.json().get("network_id") == network_id for m in members):
                return True
            # The record and its endpoints in one transaction; the segment's policy rules too when no member of the
            # segment is left (rules are the segment's, shared by the other hosts' networks of an overlay): a rule
            # written while the record existed (netdriver/policy_store.py compares it) goes with it.
            gone = [self.keys.prefix(schema.ENDPOINT, network=network_id)]
            if not members:
                gone.append(self.keys.policy_rules(segment))
            if self.kv.commit(unchanged_since={members_prefix: revision}, deletes=[self.keys.network(network_id)],
                              delete_prefixes=gone):
                return True
        raise Conflict(f"could not delete network {network_id[:12]}: its members keep changing, try again")

    def members(self) -> List[Tuple[str, str, str]]:
        """Every member key as (segment, host, network_id)."""
        entries, _ = self.kv.get_prefix(self.keys.prefix(schema.MEMBER))
        out = []
        for entry in entries:
            parts = self.keys.parse(schema.MEMBER, entry.key)
            if parts:
                out.append((parts["segment"], parts["host"], str(entry.json().get("network_id", ""))))
        return out

    def member_networks(self, host: str) -> List[Network]:
        """The networks this host should have a namespace for: per segment, the network its member key names
        (on standalone hosts sharing `-o overlay=NAME`, each host has its own docker network id)."""
        entries, _ = self.kv.get_prefix(self.keys.prefix(schema.MEMBER))
        out = []
        for entry in entries:
            parts = self.keys.parse(schema.MEMBER, entry.key)
            if not parts or parts["host"] != host:
                continue
            if not _well_formed(entry.json()["network_id"]):
                _skipped(entry.key)
                continue
            network = self.get_network(entry.json()["network_id"])
            if network is not None:
                out.append(network)
        return out

    # -- endpoints ---------------------------------------------------------------------------------------------
    def get_endpoint(self, network_id: str, endpoint_id: str) -> Optional[Endpoint]:
        entry = self.kv.get(self.keys.endpoint(network_id, endpoint_id))
        return Endpoint.from_json(entry.value) if entry else None

    def list_endpoints(self, network_id: str) -> List[Endpoint]:
        return [e for e, _ in self.list_endpoints_revisions(network_id)]

    def list_endpoints_revisions(self, network_id: str) -> List[Tuple[Endpoint, int]]:
        """The network's endpoint records, each with the mod_revision it was read at (for a write that must not
        outlive the record: put_peers' guard)."""
        entries, _ = self.kv.get_prefix(self.keys.prefix(schema.ENDPOINT, network=network_id))
        endpoints = [(e.key, Endpoint.from_json(e.value), e.mod_revision) for e in entries]
        return [(e, rev) for key, e, rev in endpoints if _well_formed(e.network_id, e.id) or _skipped(key)]

    def network_and_endpoint(self, network_id: str, endpoint_id: str) -> Tuple[Optional[Network],
                                                                                Optional[Endpoint]]:
        """Both records in one round trip (Join and DeleteEndpoint need both)."""
        net_key, ep_key = self.keys.network(network_id), self.keys.endpoint(network_id, endpoint_id)
        found = self.kv.read(keys=[net_key, ep_key]).entries
        return (Network.from_json(found[net_key].value) if found[net_key] else None,
                Endpoint.from_json(found[ep_key].value) if found[ep_key] else None)

    def all_endpoints(self) -> List[Endpoint]:
        """Every endpoint record of every network."""
        entries, _ = self.kv.get_prefix(self.keys.prefix(schema.ENDPOINT))
        endpoints = [(e.key, Endpoint.from_json(e.value)) for e in entries]
        return [e for key, e in endpoints if _well_formed(e.network_id, e.id) or _skipped(key)]

    def put_endpoint(self, endpoint: Endpoint) -> None:
        self.kv.put(self.keys.endpoint(endpoint.network_id, endpoint.id), endpoint.to_json())

    def delete_endpoint(self, network_id: str, endpoint_id: str, segment: Optional[str] = None,
                        guard: Guard = NO_GUARD) -> bool:
        """The endpoint's record, and with segment its peer record too, in one transaction (which also compares
        guard: False, with nothing deleted, if that failed)."""
        deletes = [self.keys.endpoint(network_id, endpoint_id)]
        if segment is not None:
            deletes.append(self.keys.peer(segment, endpoint_id))
        return self.kv.commit(absent=guard.absent, revisions=dict(guard.revisions), deletes=deletes)

    # -- peers -------------------------------------------------------------------------------------------------
    def put_peer(self, segment: str, peer: PeerRecord, lease: int = 0) -> None:
        self.kv.put(self.keys.peer(segment, peer.endpoint_id), peer.to_json(), lease=lease)

    def put_peers(self, segment: str, network_id: str, peers: Sequence[PeerRecord],
                  endpoint_revisions: Dict[str, int], lease: int = 0) -> None:
        """Many peer records of one segment (a republish), in transactions of at most TXN_PUTS puts: one round
        trip per 128 records instead of one each (1,000 endpoints: 8 instead of 1,000).

        endpoint_revisions: endpoint id -> the mod_revision its record (in network_id) was read at. Each record is
        written only while its endpoint's record is still at that revision. A DeleteEndpoint between the read and
        this write removes the endpoint and its peer record together; without the guard the republish would write
        the peer record back, and every host would keep a path to an endpoint that is gone for as long as this
        host's lease lives. A transaction whose guard fails is retried record by record, and a record whose own
        guard fails is skipped (a changed endpoint record was Joined again, and that Join writes its own)."""
        def commit(records: Sequence[PeerRecord]) -> bool:
            return self.kv.commit(
                revisions={self.keys.endpoint(network_id, r.endpoint_id): endpoint_revisions[r.endpoint_id]
                           for r in records},
                puts={self.keys.peer(segment, r.endpoint_id): r.to_json() for r in records}, lease=lease)

        for start in range(0, len(peers), TXN_PUTS):
            batch = peers[start:start + TXN_PUTS]
            if not commit(batch):
                for record in batch:
                    commit([record])

    def set_peer_identity(self, segment: str, endpoint_id: str, host: str, identity: dict, lease: int,
                          exposed: Sequence[str] = ()) -> str:
        """Put identity into the endpoint's peer record, and exposed (the container's, from the engine) into its
        exposed ports beside those CreateEndpoint gave, keeping everything else -> "written", "unchanged" (it
        holds both already: a replay writes nothing), or "absent" (no record, or another host's).

        The write compares the record's mod_revision, so it never recreates a record that a Leave deleted after
        it was read (that would bring a departed endpoint back on every host), nor undoes a newer write: either
        retries from a fresh read. Under `lease`, the host lease the record must stay under (a put without it
        would detach the key from the lease, and it would outlive the host)."""
        key = self.keys.peer(segment, endpoint_id)
        for _ in range(_RETRIES):
            entry = self.kv.get(key)
            if entry is None:
                return "absent"
            record = PeerRecord.from_json(entry.value)
            if record.host != host:
                return "absent"
            ports = merge_exposed(record.exposed, list(exposed))
            if record.identity == identity and ports == record.exposed:
                return "unchanged"
            fresh = dataclasses.replace(record, identity=identity, exposed=ports)
            if self.kv.commit(revisions={key: entry.mod_revision}, puts={key: fresh.to_json()}, lease=lease):
                return "written"
        raise Conflict(f"could not publish the identity of endpoint {endpoint_id[:12]}: its record keeps "
                       "changing, try again")

    def delete_peer(self, segment: str, endpoint_id: str) -> None:
        self.kv.delete(self.keys.peer(segment, endpoint_id))

    def peers_prefix(self) -> str:
        return self.keys.prefix(schema.PEER)

    def parse_peer_key(self, key: str) -> Optional[Tuple[str, str]]:
        """peers/<segment>/<eid> -> (segment, eid), None for anything else."""
        return self.keys.peer_of(key)

    def all_peers(self) -> Tuple[List[Tuple[str, int, PeerRecord]], int]:
        """Every peer record as (segment, mod_revision, record), and the revision they were read at."""
        entries, revision = self.kv.get_prefix(self.peers_prefix())
        out = []
        for entry in entries:
            parsed = self.parse_peer_key(entry.key)
            if parsed is not None:
                out.append((parsed[0], entry.mod_revision, PeerRecord.from_json(entry.value)))
        return out, revision

    # -- hosts -------------------------------------------------------------------------------------------------
    def host_entry(self, host: str):
        """The raw hosts/<host> entry (its lease and mod_revision decide who owns it), or None."""
        return self.kv.get(self.keys.host(host))

    def register_host(self, host: str, record: dict, lease: int, expect_revision: int) -> bool:
        """Write hosts/<host> = record + this plugin's version (wire/version.py) under lease, only if the key is
        still at expect_revision (0: absent): the compare makes two hosts claiming one ID at once unable to both
        win. False: it changed meanwhile.
        departed/<host> goes in the same transaction: a host that is back is no longer gone, and what it holds is
        no longer the garbage collector's (netdriver/gc.py)."""
        return self.kv.commit(revisions={self.keys.host(host): expect_revision},
                              puts={self.keys.host(host): json.dumps({**record, "version": version.current()})},
                              deletes=[self.keys.departed(host)], lease=lease)

    def hosts(self) -> dict:
        entries, _ = self.kv.get_prefix(self.keys.prefix(schema.HOST))
        found = ((self.keys.parse(schema.HOST, e.key), e) for e in entries)
        return {parts["host"]: e.json() for parts, e in found if parts}

    # -- hosts that are gone (netdriver/gc.py) -----------------------------------------------------------------
    def departed(self) -> Dict[str, Tuple[dict, int]]:
        """Every departed/<host> record as host -> (value, mod_revision)."""
        entries, _ = self.kv.get_prefix(self.keys.prefix(schema.DEPARTED))
        found = ((self.keys.parse(schema.DEPARTED, e.key), e) for e in entries)
        return {parts["host"]: (_object(e.value), e.mod_revision) for parts, e in found if parts}

    def mark_departed(self, host: str, record: dict) -> bool:
        """departed/<host> = record, only if neither it nor hosts/<host> exists (create-if-absent: the first
        plugin to see the host gone sets the time; a host alive again is never marked). True if written."""
        key = self.keys.departed(host)
        return self.kv.commit(absent=[key, self.keys.host(host)], puts={key: json.dumps(record, sort_keys=True)})

    def forget_departed(self, host: str, guard: Guard) -> bool:
        """Delete departed/<host> once nothing of the host is left, in a transaction that compares guard."""
        return self.kv.commit(absent=guard.absent, revisions=dict(guard.revisions),
                              deletes=[self.keys.departed(host)])

    def departed_guard(self, host: str, revision: int) -> Guard:
        """The compares of every release of a gone host's holds: hosts/<host> still missing, and departed/<host>
        still the record (at revision) that made it stale."""
        return Guard(absent=(self.keys.host(host),), revisions={self.keys.departed(host): revision})

    def list_peers(self, segment: str) -> List[PeerRecord]:
        entries, _ = self.kv.get_prefix(self.keys.prefix(schema.PEER, segment=segment))
        return [PeerRecord.from_json(e.value) for e in entries]


def _object(text: str) -> dict:
    """A JSON object value; anything else reads as empty."""
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
