"""Pure IPv4 pool logic for the IPAM driver: parsing and validation, overlap, picking a free pool or address,
PoolIDs and the reply form of an address. No I/O: the store reads etcd and hands the held sets in here.

Every error names the wire field it is about (`Pool`, `SubPool`, `Address`, `PoolID`, `V6`) and the value, so a
`docker network create` user can see which flag to fix.
"""

import ipaddress
from typing import Iterable, Optional, Set, Tuple

from wire.errors import InvalidOption

Network = ipaddress.IPv4Network
Address = ipaddress.IPv4Address

# Where pools come from when `docker network create` gives no --subnet. Chosen to stay out of the ranges Docker
# itself hands out: the bridge defaults 172.17.0.0/16-172.31.0.0/16 and 192.168.0.0/16, and Swarm's
# default-addr-pool 10.0.0.0/8, which is carved into /24s from 10.0.0.0 upwards (it would take 54,528 overlay
# networks to reach 10.213). It stays inside RFC 1918 on purpose: 100.64.0.0/10 (RFC 6598) belongs to carrier NAT
# and Tailscale, and 198.18.0.0/15 (RFC 2544) to the fake-IP ranges of several proxies. Automatic pools avoid
# only the pools held here, not the host's routes: a site whose own LAN uses 10.213/16 must give --subnet.
DEFAULT_RANGE = Network("10.213.0.0/16")
# /24 as Swarm's default: 254 containers per network, 256 automatic networks in DEFAULT_RANGE.
DEFAULT_PREFIX = 24

# A pool must keep at least two host addresses besides its network and broadcast addresses (gateway + one
# container): /30 is the longest prefix that does.
LONGEST_PREFIX = 30


def parse_pool(text: str, field: str = "Pool") -> Network:
    """'10.1.0.0/24' -> IPv4Network; InvalidOption naming field for anything else (IPv6, host bits, junk)."""
    try:
        net = ipaddress.ip_network(text)
    except ValueError:
        try:
            masked = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise InvalidOption(f"{field}: {text!r} is not an IPv4 network in CIDR form (e.g. 10.1.0.0/24)") from None
        raise InvalidOption(f"{field}: {text!r} has host bits set; did you mean {masked}?") from None
    if net.version != 4:
        raise InvalidOption(f"{field}: {text!r} is not an IPv4 network: vxnet IPAM serves IPv4 only")
    if "/" not in text:
        raise InvalidOption(f"{field}: {text!r} has no prefix length (e.g. {net.network_address}/24)")
    if str(net) != text:
        raise InvalidOption(f"{field}: {text!r} must be written {net}")
    return net


def check_pool_size(pool: Network, field: str = "Pool") -> None:
    if pool.prefixlen > LONGEST_PREFIX:
        raise InvalidOption(f"{field}: {pool} is too small: a pool needs a prefix of /{LONGEST_PREFIX} or shorter")


def parse_sub_pool(text: str, pool: Network) -> Optional[Network]:
    """--ip-range: empty -> None; otherwise a network inside pool, else InvalidOption naming SubPool."""
    if not text:
        return None
    sub = parse_pool(text, "SubPool")
    if not sub.subnet_of(pool):
        raise InvalidOption(f"SubPool: {sub} is not inside Pool {pool}")
    if first_host(pool, sub) is None:
        raise InvalidOption(f"SubPool: {sub} holds only the network or broadcast address of Pool {pool}")
    return sub


def parse_address(text: str, pool: Network, field: str = "Address") -> Address:
    """A bare 'a.b.c.d' that is a host address of pool; InvalidOption naming field otherwise."""
    try:
        ip = Address(text)
    except ValueError:
        raise InvalidOption(f"{field}: {text!r} is not an IPv4 address") from None
    if ip not in pool:
        raise InvalidOption(f"{field}: {ip} is outside pool {pool}")
    if ip in (pool.network_address, pool.broadcast_address):
        which = "network" if ip == pool.network_address else "broadcast"
        raise InvalidOption(f"{field}: {ip} is the {which} address of pool {pool}")
    return ip


def overlapping(pool: Network, held: Iterable[Network]) -> Optional[Network]:
    """The first held network that shares any address with pool, or None."""
    return next((other for other in held if pool.overlaps(other)), None)


def pick_free_pool(held: Iterable[Network], source: Network = DEFAULT_RANGE,
                   prefix: int = DEFAULT_PREFIX) -> Optional[Network]:
    """The lowest /prefix inside source that overlaps none of held, or None when source is used up."""
    held = list(held)
    return next((net for net in source.subnets(new_prefix=prefix) if overlapping(net, held) is None), None)


def _host_bounds(pool: Network, sub_pool: Optional[Network]) -> Tuple[int, int]:
    # Network and broadcast addresses belong to the pool, not to any sub-pool: a sub-pool's own edges are
    # ordinary hosts (as in Docker's built-in IPAM).
    low, high = int(pool.network_address) + 1, int(pool.broadcast_address) - 1
    if sub_pool is not None:
        low, high = max(low, int(sub_pool.network_address)), min(high, int(sub_pool.broadcast_address))
    return low, high


def first_host(pool: Network, sub_pool: Optional[Network] = None) -> Optional[Address]:
    low, high = _host_bounds(pool, sub_pool)
    return Address(low) if low <= high else None


def next_free_address(pool: Network, held: Set[Address], sub_pool: Optional[Network] = None) -> Optional[Address]:
    """The lowest host address of pool (within sub_pool if given) not in held; None when all are taken.

    Lowest-first keeps allocation predictable for operators (gateway .1, first container .2, as Docker does)."""
    low, high = _host_bounds(pool, sub_pool)
    taken = {int(ip) for ip in held}
    return next((Address(n) for n in range(low, high + 1) if n not in taken), None)


def reply_address(ip: Address, pool: Network) -> str:
    """The RequestAddress reply form: the address with the pool's prefix length, '10.1.0.5/24'."""
    return f"{ip}/{pool.prefixlen}"


# --- PoolIDs ------------------------------------------------------------------------------------------------------
# dockerd stores the PoolID we return and hands it back on every later call, so it carries everything needed to
# find the pool again: "<space>/<cidr>" or, with --ip-range, "<space>/<cidr>/<sub-pool>", e.g.
# "vxnet-local/10.1.0.0/24/10.1.0.128/25". Readable in `docker network inspect`, and deterministic so that
# replays (Swarm workers, a new Swarm leader) get the very ID the first request got.

def pool_id(space: str, pool: Network, sub_pool: Optional[Network] = None) -> str:
    return f"{space}/{pool}" + (f"/{sub_pool}" if sub_pool is not None else "")


def parse_pool_id(text: str) -> Tuple[str, Network, Optional[Network]]:
    """Inverse of pool_id; InvalidOption naming PoolID if text is not one of ours."""
    parts = text.split("/")
    if len(parts) not in (3, 5) or not parts[0]:
        raise InvalidOption(f"PoolID: {text!r} is not a vxnet pool ID (<space>/<cidr>[/<ip-range>])")
    try:
        pool = parse_pool("/".join(parts[1:3]), "PoolID")
        sub = parse_sub_pool("/".join(parts[3:5]), pool) if len(parts) == 5 else None
    except InvalidOption as exc:
        raise InvalidOption(f"PoolID: {text!r} is not a vxnet pool ID ({exc})") from None
    return parts[0], pool, sub
