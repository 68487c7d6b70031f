"""The six IpamDriver verbs of the libnetwork remote IPAM protocol (moby libnetwork/ipams/remote/api/api.go,
docs/ipam.md; the request records in wire/protocol.py). Orchestration only: pool arithmetic lives in pools.py, etcd keys
and transactions in store.py.

What Docker expects, and why the replays are confirmations:
- In the global address space (Swarm) only the manager's allocator asks, and a new leader replays everything it
  recorded (pool, gateway, every task address). With the plugin in global scope its holds belong to the Swarm
  (holder SWARM_HOLDER, uncounted), not to the manager that happened to ask: a replay, from the same or another
  manager, is a confirmation that changes nothing, and the allocator's one release frees the address, so a
  leader change leaks nothing.
- In the local address space a second standalone host may join a network with the same --subnet (the overlay
  is shared): the pool and the gateway are confirmed for it. A second network on the *same* host with that
  subnet, or a container address already in use, is a Conflict.
- A Swarm worker asks again in the *local* space: libnetwork gives swarm-scoped networks a local data scope, so
  a node confirms the manager's task addresses under vxnet-local. With the plugin in global scope (Swarm mode,
  where every vxnet network is a swarm network, allocated by the manager) a held address asked for again in the
  local space is a confirmation too: otherwise a task address the manager hands out again after its node died
  (still held there, never released) would fail on the node that now runs the task.
- Releases of anything unknown succeed: dockerd replays them after a crash and must be able to delete its
  networks. A PoolID that is not one vxnet hands out (pools.pool_id, in one of its two address spaces), or an
  Address that is not a host address of that pool, is not unknown but malformed: InvalidOption naming it. Both
  end up in etcd keys.
"""

import logging

from ipam_driver import pools
from ipam_driver.store import CONTAINER, GATEWAY, IpamStore
from store.schema import SWARM_HOLDER
from wire.errors import InvalidOption
from wire.protocol import (
    AddressRequest,
    EmptyRequest,
    PoolIDRequest,
    ReleaseAddressRequest,
    RequestPoolRequest,
)

log = logging.getLogger(__name__)

LOCAL_SPACE = "vxnet-local"
GLOBAL_SPACE = "vxnet-global"
# Options["RequestAddressType"] of the one RequestAddress per network that asks for the gateway. Aux addresses
# (--aux-address) arrive with no options, exactly like a container's --ip, so they are held as "container".
GATEWAY_REQUEST = "com.docker.network.gateway"
# dockerd and Swarm put their own keys under this prefix (e.g. com.docker.network.ipam.serial); anything else
# in --ipam-opt is the user's and vxnet takes none.
DOCKER_OPTION_PREFIX = "com.docker.network."


class IpamDriver:
    """store holds the pools and addresses in etcd (plugin/main.py builds it); host_id names this host in their
    holders; scope ("local"/"global") is the plugin's network scope and picks the address space when a request
    names none."""

    def __init__(self, store: IpamStore, host_id: str, scope: str):
        if scope not in ("local", "global"):
            raise ValueError(f"scope must be 'local' or 'global', not {scope!r}")
        self.host_id = host_id
        self.scope = scope
        self.store = store

    # -- capabilities --------------------------------------------------------------------------------------------
    def get_capabilities(self, req: EmptyRequest) -> dict:
        """-> `{"RequiresMACAddress": false, "RequiresRequestReplay": false}`: what we hold lives in etcd, so
        dockerd need not replay its requests when it restarts."""
        return {"RequiresMACAddress": False, "RequiresRequestReplay": False}

    def get_default_address_spaces(self, req: EmptyRequest) -> dict:
        """-> `{"LocalDefaultAddressSpace": "vxnet-local", "GlobalDefaultAddressSpace": "vxnet-global"}`"""
        return {"LocalDefaultAddressSpace": LOCAL_SPACE, "GlobalDefaultAddressSpace": GLOBAL_SPACE}

    # -- pools ---------------------------------------------------------------------------------------------------
    def request_pool(self, req: RequestPoolRequest) -> dict:
        """`{"AddressSpace","Pool","SubPool","Options","V6"}` -> `{"PoolID","Pool":"10.1.0.0/24","Data":{}}`
        (V6 true: `"Pool":"fd00:1::/64"`, PoolID "vxnet-local/fd00:1::/64"). Pool, and SubPool with it, must be
        of the family V6 names. Pool empty: a free /24 from pools.DEFAULT_RANGE, with V6 a free /64 from
        pools.DEFAULT_RANGE6. A v4 and a v6 pool of one network are independent pools."""
        space = self._space(req.address_space)
        for key in req.options:
            if not key.startswith(DOCKER_OPTION_PREFIX):
                raise InvalidOption(f"Options: unknown IPAM option {key!r} (vxnet IPAM takes none)")
        want = sub_pool = None
        if req.pool:
            want = pools.parse_pool(req.pool, v6=req.v6)
            pools.check_pool_size(want)
            sub_pool = pools.parse_sub_pool(req.sub_pool, want)
        elif req.sub_pool:
            raise InvalidOption(f"SubPool: {req.sub_pool!r} needs a Pool (--ip-range needs --subnet)")
        holder, counted = self._holder(space)
        cidr = self.store.hold_pool(space, want, holder, replay_ok=space == GLOBAL_SPACE, counted=counted,
                                    v6=req.v6)
        pool_id = pools.pool_id(space, cidr, sub_pool)
        log.info("pool held: pool=%s host=%s", pool_id, self.host_id)
        return {"PoolID": pool_id, "Pool": str(cidr), "Data": {}}

    def release_pool(self, req: PoolIDRequest) -> dict:
        """`{"PoolID"}` -> `{}`. The last holder's release deletes the pool and its addresses."""
        space, cidr, _ = self._pool(req.pool_id)
        self.store.release_pool(space, cidr, self._holder(space)[0])
        log.info("pool released: pool=%s host=%s", req.pool_id, self.host_id)
        return {}

    # -- addresses -----------------------------------------------------------------------------------------------
    def request_address(self, req: AddressRequest) -> dict:
        """`{"PoolID","Address":"" or "a.b.c.d" or "fd00:1::5","Options"}` -> `{"Address":"a.b.c.d/nn","Data":{}}`
        ("fd00:1::5/64"), nn the pool's prefix length; the family is the pool's. Empty Address: the lowest free
        one (inside the PoolID's --ip-range, if any); a given Address may be anywhere in the pool. Never handed
        out: IPv4's network and broadcast addresses, IPv6's subnet-router anycast address and RFC 2526 reserved
        subnet anycast addresses (pools.py)."""
        space, cidr, sub_pool = self._pool(req.pool_id)
        kind = GATEWAY if req.options.get("RequestAddressType") == GATEWAY_REQUEST else CONTAINER
        holder, counted = self._holder(space)
        if req.address:
            ip = pools.parse_address(req.address, cidr)
            self.store.reserve_address(space, cidr, ip, holder, kind,
                                       replay_ok=space == GLOBAL_SPACE or self.scope == "global", counted=counted)
        else:
            ip = self.store.allocate_address(space, cidr, holder, kind, sub_pool, counted=counted)
        log.debug("address held: pool=%s ip=%s kind=%s host=%s", req.pool_id, ip, kind, self.host_id)
        return {"Address": pools.reply_address(ip, cidr), "Data": {}}

    def release_address(self, req: ReleaseAddressRequest) -> dict:
        """`{"PoolID","Address"}` -> `{}`."""
        space, cidr, _ = self._pool(req.pool_id)
        ip = pools.parse_address(req.address, cidr)
        self.store.release_address(space, cidr, ip, self._holder(space)[0])
        log.debug("address released: pool=%s ip=%s host=%s", req.pool_id, ip, self.host_id)
        return {}

    # -------------------------------------------------------------------------------------------------------------
    def _holder(self, space: str):
        """(holder, counted) for a request in `space`: the Swarm allocator's (see the module docstring) in the
        global space of a global-scope plugin, else this host's, counted."""
        if space == GLOBAL_SPACE and self.scope == "global":
            return SWARM_HOLDER, False
        return self.host_id, True

    def _pool(self, pool_id: str):
        """(space, cidr, sub-pool) of a PoolID vxnet handed out; InvalidOption naming PoolID for anything else."""
        space, cidr, sub_pool = pools.parse_pool_id(pool_id)
        return self._space(space, field="PoolID"), cidr, sub_pool

    def _space(self, name: str, field: str = "AddressSpace") -> str:
        if not name:
            return GLOBAL_SPACE if self.scope == "global" else LOCAL_SPACE
        if name not in (LOCAL_SPACE, GLOBAL_SPACE):
            raise InvalidOption(f"{field}: {name!r} is not a vxnet address space ({LOCAL_SPACE}, {GLOBAL_SPACE})")
        return name
