"""Pools and addresses in etcd. Every write is one transaction that compares what it read, so any number of
plugin processes sharing one etcd agree on who holds what.

Keys (store/schema.py builds them and documents their values): `ipam/pools/<space>/<pool>` and
`ipam/addresses/<space>/<pool>/<address>`. A pool is created only if no key under `ipam/pools/` was written since
the pool list was read (a range compare in the same transaction), so two overlapping pools can never both be
created from the same view of the list.

`hosts` is a multiset: one entry per hold, because several clients on one host may hold the same thing (two
hosts joining one local overlay, each with its own networks' holds), and the first release must not free what
another still uses. A holder can also be uncounted (`counted=False`): it holds a thing once however often it
asks, and one release frees it. The Swarm allocator is such a holder (ipam_driver/driver.py): it replays all
it recorded whenever the leadership moves, from whichever manager leads, and releases once.

An address key never outlives its pool. Releasing the last hold first rewrites the pool with no hosts (its
revision changes, so every allocation in flight, which compares that revision, fails and finds the pool gone),
then deletes the addresses and the pool key. A pool left without hosts (etcd lost between the two steps) is
finished off by the next RequestPool or ReleasePool.
"""

import dataclasses
import datetime
import json
from typing import List, Optional, Sequence, Tuple

from ipam_driver import pools
from ipam_driver.pools import Address, Network
from store import schema
from store.kv import KV, NO_GUARD, Guard
from store.kvstore import Snapshot
from wire.errors import Conflict, Exhausted

GATEWAY = "gateway"
CONTAINER = "container"

# Each failed compare means another writer changed what we read and made progress, so this bound is only hit
# under pathological churn; it turns a livelock into an error the user can retry.
MAX_ROUNDS = 100
# etcd refuses a transaction with more than 128 operations (its --max-txn-ops default).
TXN_BATCH = 100


@dataclasses.dataclass(frozen=True)
class PoolEntry:
    key: str
    revision: int
    space: str
    cidr: Network
    hosts: Tuple[str, ...]
    created: str


@dataclasses.dataclass(frozen=True)
class AddressEntry:
    key: str
    revision: int
    ip: Address
    kind: str
    hosts: Tuple[str, ...]
    created: str


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _with_one(hosts: Tuple[str, ...], host: str, counted: bool) -> Tuple[str, ...]:
    """hosts with one more hold of host; an uncounted holder holds once, so then nothing changes."""
    return hosts if host in hosts and not counted else hosts + (host,)


def _without_one(hosts: Tuple[str, ...], host: str) -> Tuple[str, ...]:
    index = hosts.index(host)
    return hosts[:index] + hosts[index + 1:]


class IpamStore:
    """prefix: the root of the whole tree (schema.PREFIX unless the settings move it); the IPAM keys are the
    schema's ipam/ ones under it."""

    def __init__(self, kv: KV, prefix: str = schema.PREFIX):
        self.kv = kv
        self.keys = schema.Schema(prefix)
        self.pools_prefix = self.keys.prefix(schema.POOL)

    # -- keys ------------------------------------------------------------------------------------------------------
    def pool_key(self, space: str, cidr: Network) -> str:
        return self.keys.pool(space, cidr)

    def addresses_prefix(self, space: str, cidr: Network) -> str:
        return self.keys.addresses(space, cidr)

    def address_key(self, space: str, cidr: Network, ip: Address) -> str:
        return self.keys.address(space, cidr, ip)

    # -- reads -----------------------------------------------------------------------------------------------------
    @staticmethod
    def _pool_entry(entry) -> PoolEntry:
        value = entry.json()
        return PoolEntry(entry.key, entry.mod_revision, value["space"], pools.stored_network(value["cidr"]),
                         tuple(value["hosts"]), value.get("created", ""))

    @staticmethod
    def _address_entry(entry) -> AddressEntry:
        value = entry.json()
        return AddressEntry(entry.key, entry.mod_revision, pools.stored_address(value["address"]), value["kind"],
                            tuple(value["hosts"]), value.get("created", ""))

    def _pools_at(self) -> Tuple[List[PoolEntry], int]:
        """The pools and the store revision they were read at."""
        entries, revision = self.kv.get_prefix(self.pools_prefix)
        return [self._pool_entry(e) for e in entries], revision

    def pool(self, space: str, cidr: Network) -> Optional[PoolEntry]:
        entry = self.kv.get(self.pool_key(space, cidr))
        return self._pool_entry(entry) if entry else None

    # -- writes of records -----------------------------------------------------------------------------------------
    def _pool_value(self, space: str, cidr: Network, hosts: Tuple[str, ...], created: str) -> str:
        return json.dumps({"cidr": str(cidr), "space": space, "hosts": list(hosts), "created": created})

    def _address_value(self, cidr: Network, ip: Address, kind: str, hosts: Tuple[str, ...],
                       created: str = "") -> str:
        return json.dumps({"address": str(ip), "pool": str(cidr), "kind": kind, "hosts": list(hosts),
                           "created": created or _now()})

    def _set_pool_hosts(self, pool: PoolEntry, hosts: Tuple[str, ...], guard: Guard = NO_GUARD) -> bool:
        value = self._pool_value(pool.space, pool.cidr, hosts, pool.created)
        return self.kv.commit(absent=guard.absent, revisions={pool.key: pool.revision, **guard.revisions},
                              puts={pool.key: value})

    def _live_pool(self, space: str, cidr: Network, keys: Sequence[str] = (),
                   prefixes: Sequence[str] = ()) -> Tuple[PoolEntry, Snapshot]:
        """The pool, which must be held, and the given keys and prefixes, read in one round trip at one revision
        (an address call then costs that read and its one transaction)."""
        snap = self.kv.read(keys=[self.pool_key(space, cidr), *keys], prefixes=prefixes)
        raw = snap.entries[self.pool_key(space, cidr)]
        pool = self._pool_entry(raw) if raw else None
        if pool is None or not pool.hosts:
            raise Conflict(f"PoolID: pool {cidr} in address space {space} is not allocated "
                           "(released, or never requested)")
        return pool, snap

    # -- pools -----------------------------------------------------------------------------------------------------
    def hold_pool(self, space: str, want: Optional[Network], host: str, replay_ok: bool,
                  counted: bool = True, v6: bool = False) -> Network:
        """Hold pool `want` in `space` for host, or with want None a new pool of the family v6 names from
        pools.default_source (a /24 of pools.DEFAULT_RANGE, a /64 of pools.DEFAULT_RANGE6) that overlaps no pool
        of any space. An existing pool with the same CIDR is joined (host added to its holders) when host does
        not hold it yet, or when replay_ok; otherwise, and on any partial overlap with a pool of its family in
        its space, Conflict. An uncounted holder that holds it already changes nothing."""
        for _ in range(MAX_ROUNDS):
            held, read_at = self._pools_at()
            retired = [p for p in held if not p.hosts]
            if retired:
                for pool in retired:
                    self._reap(pool)
                continue
            if want is None:
                source, prefix = pools.default_source(v6)
                cidr = pools.pick_free_pool((p.cidr for p in held), source, prefix)
                if cidr is None:
                    raise Exhausted(f"Pool: no free /{prefix} left in {source}; give --subnet explicitly")
            else:
                cidr = want
                same = next((p for p in held if p.space == space and p.cidr == want), None)
                if same is not None:
                    hosts = _with_one(same.hosts, host, counted)
                    if hosts == same.hosts:
                        return want
                    if host in same.hosts and not replay_ok:
                        raise Conflict(f"Pool: {want} is already in use on this host by another network "
                                       f"(address space {space}); choose another --subnet")
                    if self._set_pool_hosts(same, hosts):
                        return want
                    continue
                other = pools.overlapping(want, (p.cidr for p in held if p.space == space))
                if other is not None:
                    raise Conflict(f"Pool: {want} overlaps pool {other} already in use in address space {space}")
            key = self.pool_key(space, cidr)
            value = self._pool_value(space, cidr, (host,), _now())
            if self.kv.commit(absent=[key], unchanged_since={self.pools_prefix: read_at}, puts={key: value}):
                return cidr
        raise Conflict(f"Pool: gave up after {MAX_ROUNDS} attempts, pools are changing too fast; retry")

    def release_pool(self, space: str, cidr: Network, host: str, guard: Guard = NO_GUARD) -> bool:
        """Drop one hold of host; the last hold deletes the pool and every address in it. Unknown pools and
        hosts that hold nothing succeed (dockerd replays releases after a crash). The hold is dropped in one
        transaction that also compares guard: False, with nothing changed, once the guard no longer holds."""
        for _ in range(MAX_ROUNDS):
            pool = self.pool(space, cidr)
            if pool is None:
                return True
            if not pool.hosts:
                if self._reap(pool):
                    return True
                continue
            if host not in pool.hosts:
                return True
            remaining = _without_one(pool.hosts, host)
            if not self._set_pool_hosts(pool, remaining, guard):
                if guard is not NO_GUARD and not guard.holds(self.kv):
                    return False
                continue
            if remaining:
                return True
            # That was the last hold: the pool is retired now, and the next round reaps it.
        raise Conflict(f"PoolID: gave up releasing {cidr} after {MAX_ROUNDS} attempts; retry")

    def _reap(self, pool: PoolEntry) -> bool:
        """Delete a pool that has no holders and its addresses. Each batch compares the pool's revision, so
        nothing is deleted from a pool that was reaped and created anew meanwhile; the pool key goes last, so
        an address key never outlives its pool. False if the pool changed under us."""
        entries, _ = self.kv.get_prefix(self.addresses_prefix(pool.space, pool.cidr))
        keys = [e.key for e in entries]
        while len(keys) >= TXN_BATCH:
            batch, keys = keys[:TXN_BATCH], keys[TXN_BATCH:]
            if not self.kv.commit(revisions={pool.key: pool.revision}, deletes=batch):
                return False
        return self.kv.commit(revisions={pool.key: pool.revision}, deletes=keys + [pool.key])

    # -- every hold, for the garbage collector -----------------------------------------------------------------------
    def holds(self) -> Tuple[List[PoolEntry], List[Tuple[str, Network, AddressEntry]]]:
        """Every pool, and every address as (space, pool, entry), of every space, read at one revision; their
        holders are in `hosts`."""
        prefix = self.keys.prefix(schema.ADDRESS)
        snap = self.kv.read(prefixes=[self.pools_prefix, prefix])
        addresses = []
        for raw in snap.ranges[prefix]:
            parts = self.keys.parse(schema.ADDRESS, raw.key)
            if parts is not None:
                entry = self._address_entry(raw)
                addresses.append((parts["space"], pools.stored_network(raw.json()["pool"]), entry))
        return [self._pool_entry(e) for e in snap.ranges[self.pools_prefix]], addresses

    # -- addresses -------------------------------------------------------------------------------------------------
    def _add_holder(self, pool: PoolEntry, entry: AddressEntry, host: str, counted: bool) -> bool:
        """One more hold of host on the address (none for an uncounted holder that has it); False if the
        address or the pool changed since they were read."""
        hosts = _with_one(entry.hosts, host, counted)
        if hosts == entry.hosts:
            return True
        value = self._address_value(pool.cidr, entry.ip, entry.kind, hosts, entry.created)
        return self.kv.commit(revisions={entry.key: entry.revision, pool.key: pool.revision},
                              puts={entry.key: value})

    def reserve_address(self, space: str, cidr: Network, ip: Address, host: str, kind: str,
                        replay_ok: bool, counted: bool = True) -> None:
        """Hold the specific address ip. If it is held already, this is a confirmation (host added to its
        holders) when replay_ok or when both are the gateway (one gateway serves every host of a network);
        otherwise Conflict. A confirmation by an uncounted holder that holds it already changes nothing."""
        key = self.address_key(space, cidr, ip)
        for _ in range(MAX_ROUNDS):
            pool, snap = self._live_pool(space, cidr, keys=[key])
            raw = snap.entries[key]
            if raw is None:
                value = self._address_value(cidr, ip, kind, (host,))
                if self.kv.commit(absent=[key], revisions={pool.key: pool.revision}, puts={key: value}):
                    return
                continue
            entry = self._address_entry(raw)
            if not (replay_ok or kind == entry.kind == GATEWAY):
                what = "the gateway" if entry.kind == GATEWAY else "in use"
                raise Conflict(f"Address: {ip} is already {what} in pool {cidr}")
            if self._add_holder(pool, entry, host, counted):
                return
        raise Conflict(f"Address: gave up reserving {ip} after {MAX_ROUNDS} attempts; retry")

    def allocate_address(self, space: str, cidr: Network, host: str, kind: str,
                         sub_pool: Optional[Network], counted: bool = True) -> Address:
        """Hold the lowest free host address (inside sub_pool if given) and return it. A gateway request joins
        the pool's existing gateway if there is one (an uncounted holder that holds it already just gets it).
        Exhausted when no address is left. The cost is one read of the pool's held addresses and work in their
        number (pools.next_free_address), never in the pool's size: a v6 /64 costs what its holds cost."""
        prefix = self.addresses_prefix(space, cidr)
        for _ in range(MAX_ROUNDS):
            pool, snap = self._live_pool(space, cidr, prefixes=[prefix])
            held = {a.ip: a for a in map(self._address_entry, snap.ranges[prefix])}
            gateway = next((a for a in held.values() if a.kind == GATEWAY), None) if kind == GATEWAY else None
            if gateway is not None:
                if self._add_holder(pool, gateway, host, counted):
                    return gateway.ip
                continue
            taken = set(held)
            while True:
                ip = pools.next_free_address(cidr, taken, sub_pool)
                if ip is None:
                    where = f"range {sub_pool} of pool {cidr}" if sub_pool else f"pool {cidr}"
                    raise Exhausted(f"no free address left in {where}")
                key = self.address_key(space, cidr, ip)
                value = self._address_value(cidr, ip, kind, (host,))
                if self.kv.commit(absent=[key], revisions={pool.key: pool.revision}, puts={key: value}):
                    return ip
                # Someone took ip, or the pool itself changed: only the latter needs a fresh read.
                taken.add(ip)
                current = self.kv.get(pool.key)
                if current is None or current.mod_revision != pool.revision:
                    break
        raise Conflict(f"Address: gave up allocating in {cidr} after {MAX_ROUNDS} attempts; retry")

    def release_address(self, space: str, cidr: Network, ip: Address, host: str, guard: Guard = NO_GUARD) -> bool:
        """Drop one hold of host on ip; the last hold deletes the key. Unknown addresses succeed. The hold is
        dropped in one transaction that also compares guard: False, with nothing changed, once it no longer
        holds."""
        key = self.address_key(space, cidr, ip)
        for _ in range(MAX_ROUNDS):
            raw = self.kv.get(key)
            if raw is None:
                return True
            entry = self._address_entry(raw)
            if host not in entry.hosts:
                return True
            hosts = _without_one(entry.hosts, host)
            revisions = {key: entry.revision, **guard.revisions}
            if hosts:
                value = self._address_value(cidr, ip, entry.kind, hosts, entry.created)
                done = self.kv.commit(absent=guard.absent, revisions=revisions, puts={key: value})
            else:
                done = self.kv.commit(absent=guard.absent, revisions=revisions, deletes=[key])
            if done:
                return True
            if guard is not NO_GUARD and not guard.holds(self.kv):
                return False
        raise Conflict(f"Address: gave up releasing {ip} after {MAX_ROUNDS} attempts; retry")
