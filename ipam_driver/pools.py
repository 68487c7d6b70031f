"""Pure pool logic for the IPAM driver, IPv4 and IPv6: parsing and validation, overlap, picking a free pool or
address, PoolIDs and the reply form of an address. No I/O: the store reads etcd and hands the held sets in here.

Every error names the wire field it is about (`Pool`, `SubPool`, `Address`, `PoolID`, `V6`) and the value, so a
`docker network create` user can see which flag to fix.

Every network and address leaves here as an ipaddress object, and every string made of one (PoolIDs, etcd key
parts, replies) is that object's str(): the canonical form (RFC 5952 for IPv6: lower case, leading zeros
dropped, the longest run of zero groups written "::"), so one address has one key whatever the user typed.

Allocation never walks a pool by counting: a v6 /64 has 2^64 addresses and no broadcast address to stop at.
The free address and the free pool are found by walking the *held* things in order (next_free_address,
pick_free_pool), so the cost depends on what is held, not on the size of the pool, and "none left" is exact for
the tiniest pools as for the largest.
"""

import ipaddress
from typing import Iterable, Optional, Tuple, Union

from wire.errors import InvalidOption

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

# Where IPv4 pools come from when `docker network create` gives no --subnet. Chosen to stay out of the ranges
# Docker itself hands out: the bridge defaults 172.17.0.0/16-172.31.0.0/16 and 192.168.0.0/16, and Swarm's
# default-addr-pool 10.0.0.0/8, which is carved into /24s from 10.0.0.0 upwards (it would take 54,528 overlay
# networks to reach 10.213). It stays inside RFC 1918 on purpose: 100.64.0.0/10 (RFC 6598) belongs to carrier NAT
# and Tailscale, and 198.18.0.0/15 (RFC 2544) to the fake-IP ranges of several proxies. Automatic pools avoid
# only the pools held here, not the host's routes: a site whose own LAN uses 10.213/16 must give --subnet.
DEFAULT_RANGE = ipaddress.IPv4Network("10.213.0.0/16")
# /24 as Swarm's default: 254 containers per network, 256 automatic networks in DEFAULT_RANGE.
DEFAULT_PREFIX = 24

# Where IPv6 pools come from when a --ipv6 network gives no v6 --subnet: one unique local /48 (RFC 4193: fd00::/8,
# the L bit set, then a 40-bit global ID). The RFC wants the global ID pseudo-random so that two sites' ULAs do
# not collide when they are routed to each other; every vxnet host of every cluster must pick from the same
# range without asking anyone (etcd's pool list is what keeps the pools apart), so it is one fixed value, and
# it is taken from SHA-1("vxnet") (69c281134c...: its first 40 bits), which anyone can recompute and which no
# one types by hand, unlike fd00::/48, fd00:1::/48 or the fd12:3456:789a::/48 of many examples, which a user's
# own --subnet is likely to use. A site that routes this very /48 gives --subnet.
DEFAULT_RANGE6 = ipaddress.IPv6Network("fd69:c281:134c::/48")
# /64: the one prefix length SLAAC and the 64-bit interface identifiers of RFC 4291 2.5.1 expect (RFC 7421),
# and 65,536 automatic networks in DEFAULT_RANGE6.
DEFAULT_PREFIX6 = 64

# An IPv4 pool must keep at least two host addresses besides its network and broadcast addresses (gateway + one
# container): /30 is the longest prefix that does.
LONGEST_PREFIX = 30
# An IPv6 pool has no broadcast address, but its first address is the subnet-router anycast address (RFC 4291
# 2.6.1), which no host may take: /126 (four addresses) is the longest prefix that keeps a gateway and a
# container besides it. (/127, RFC 6164, is for point-to-point router links and would keep one.)
LONGEST_PREFIX6 = 126

# The IPv6 space a pool may come from: global unicast (2000::/3, what IANA allocates from) and unique local
# (fc00::/7, RFC 4193). The rest is not for a network of hosts: multicast ff00::/8 (RFC 4291 2.7), link-local
# fe80::/10 (every interface has its own fe80::/64; a container's link-local address comes from its MAC), and
# ::/3, which IANA keeps reserved and which holds only special addresses (::, ::1, IPv4-mapped ::ffff:0:0/96,
# NAT64's 64:ff9b::/96, discard 100::/64). In both allowed blocks interface identifiers are 64 bits
# (RFC 4291 2.5.1), which the RFC 2526 reservation below relies on.
UNICAST6 = (ipaddress.IPv6Network("2000::/3"), ipaddress.IPv6Network("fc00::/7"))

# RFC 2526 reserves, in every subnet whose addresses have 64-bit interface identifiers, the 128 highest interface
# identifiers with the universal/local bit cleared for subnet anycast addresses (anycast IDs 0-127; 126 is
# Mobile IPv6 home-agent discovery, RFC 6275): fdff:ffff:ffff:ff80 to fdff:ffff:ffff:ffff. vxnet never hands them
# out and refuses them when asked: a container there would answer what is meant for a router or home agent.
# The price is nothing in practice (a /64 loses 128 of 2^64, and lowest-first allocation never reaches them),
# and the test is arithmetic on the address alone, so it costs nothing per allocation either.
RESERVED_ANYCAST_IID = 0xFDFF_FFFF_FFFF_FF80
_IID_MASK = (1 << 64) - 1
_ANYCAST_ID_BITS = 0x7F  # the 7-bit anycast ID at the end of the interface identifier


def _family(v6: bool) -> str:
    return "IPv6" if v6 else "IPv4"


def _example(v6: bool) -> str:
    return "fd00:1::/64" if v6 else "10.1.0.0/24"


def parse_pool(text: str, field: str = "Pool", v6: Optional[bool] = False) -> Network:
    """'10.1.0.0/24' (v6 False) or 'fd00:1::/64' (v6 True; v6 None takes either) -> the network; InvalidOption
    naming field for anything else (the other family, host bits, a zone index, a form other than the canonical
    one, junk).

    The canonical form is demanded, not repaired: the PoolID and the etcd keys are made of it, and a
    `docker network inspect` that shows what the user typed next to what vxnet stored would confuse."""
    what = f"an {_family(v6)} network" if v6 is not None else "a network"
    try:
        net = ipaddress.ip_network(text)
    except ValueError:
        try:
            masked = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise InvalidOption(f"{field}: {text!r} is not {what} in CIDR form "
                                f"(e.g. {_example(bool(v6))})") from None
        raise InvalidOption(f"{field}: {text!r} has host bits set; did you mean {masked}?") from None
    if v6 is not None and (net.version == 6) != v6:
        raise InvalidOption(f"{field}: {text!r} is not {what} (V6 is {'true' if v6 else 'false'})")
    if "/" not in text:
        raise InvalidOption(f"{field}: {text!r} has no prefix length (e.g. {net.network_address}/"
                            f"{DEFAULT_PREFIX6 if net.version == 6 else DEFAULT_PREFIX})")
    if net.version == 6:
        if net.network_address.scope_id is not None:
            raise InvalidOption(f"{field}: {text!r} has a zone index (%...): a pool belongs to no one interface")
        if not any(net.subnet_of(block) for block in UNICAST6):
            raise InvalidOption(f"{field}: {net} is not global unicast (2000::/3) or unique local (fc00::/7) "
                                "address space")
    if str(net) != text:
        raise InvalidOption(f"{field}: {text!r} must be written {net}")
    return net


def check_pool_size(pool: Network, field: str = "Pool") -> None:
    """InvalidOption naming field unless pool keeps a gateway and at least one container."""
    longest = LONGEST_PREFIX6 if pool.version == 6 else LONGEST_PREFIX
    if pool.prefixlen > longest:
        raise InvalidOption(f"{field}: {pool} is too small: a pool needs a prefix of /{longest} or shorter")
    first = first_host(pool)
    if first is None or next_free_address(pool, [first]) is None:
        raise InvalidOption(f"{field}: {pool} is too small: it lies in the reserved subnet anycast addresses "
                            "(RFC 2526), which leave no room for a gateway and a container")


def parse_sub_pool(text: str, pool: Network) -> Optional[Network]:
    """--ip-range: empty -> None; otherwise a network of pool's family inside pool, else InvalidOption naming
    SubPool."""
    if not text:
        return None
    sub = parse_pool(text, "SubPool", v6=pool.version == 6)
    if not sub.subnet_of(pool):
        raise InvalidOption(f"SubPool: {sub} is not inside Pool {pool}")
    if first_host(pool, sub) is None:
        if pool.version == 6:
            raise InvalidOption(f"SubPool: {sub} holds only the subnet-router anycast or reserved subnet anycast "
                                f"addresses (RFC 4291 2.6.1, RFC 2526) of Pool {pool}")
        raise InvalidOption(f"SubPool: {sub} holds only the network or broadcast address of Pool {pool}")
    return sub


def parse_address(text: str, pool: Network, field: str = "Address") -> Address:
    """A bare address ('10.1.0.5', 'fd00:1::5', in any form ipaddress reads) that is a host address of pool;
    InvalidOption naming field otherwise. The address returned is what keys and replies are made of."""
    family = _family(pool.version == 6)
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise InvalidOption(f"{field}: {text!r} is not an {family} address") from None
    if ip.version != pool.version:
        raise InvalidOption(f"{field}: {text!r} is not an {family} address (pool {pool} is {family})")
    if ip.version == 6 and ip.scope_id is not None:
        raise InvalidOption(f"{field}: {text!r} has a zone index (%...); give the bare address")
    if ip not in pool:
        raise InvalidOption(f"{field}: {ip} is outside pool {pool}")
    if ip == pool.network_address:
        which = ("subnet-router anycast address (RFC 4291 2.6.1)" if ip.version == 6 else "network address")
        raise InvalidOption(f"{field}: {ip} is the {which} of pool {pool}")
    if ip.version == 4 and ip == pool.broadcast_address:
        raise InvalidOption(f"{field}: {ip} is the broadcast address of pool {pool}")
    if _reserved_anycast(pool, int(ip)):
        raise InvalidOption(f"{field}: {ip} is a reserved subnet anycast address (RFC 2526: interface "
                            "identifiers fdff:ffff:ffff:ff80 to fdff:ffff:ffff:ffff)")
    return ip


def overlapping(pool: Network, held: Iterable[Network]) -> Optional[Network]:
    """The first held network of pool's family that shares any address with pool, or None."""
    return next((other for other in held if other.version == pool.version and pool.overlaps(other)), None)


def pick_free_pool(held: Iterable[Network], source: Network = DEFAULT_RANGE,
                   prefix: int = DEFAULT_PREFIX) -> Optional[Network]:
    """The lowest /prefix inside source that overlaps none of held, or None when source is used up.

    Walks the held networks that touch source in address order, each pushing the candidate past its end: the
    cost is that of sorting what is held, whether source has 256 blocks or 65,536."""
    size = 1 << (source.max_prefixlen - prefix)  # source is aligned on size, so every candidate is too
    spans = sorted((int(n.network_address), int(n.broadcast_address)) for n in held
                   if n.version == source.version and n.overlaps(source))
    candidate = int(source.network_address)
    for low, high in spans:
        if low >= candidate + size:
            break  # this and every later span start past the candidate: it is free
        if high >= candidate:
            candidate = (high // size + 1) * size
    if candidate + size - 1 > int(source.broadcast_address):
        return None
    return type(source)((candidate, prefix))


def default_source(v6: bool) -> Tuple[Network, int]:
    """(range, prefix length) automatic pools of the family come from."""
    return (DEFAULT_RANGE6, DEFAULT_PREFIX6) if v6 else (DEFAULT_RANGE, DEFAULT_PREFIX)


def _reserved_anycast(pool: Network, n: int) -> bool:
    return pool.version == 6 and RESERVED_ANYCAST_IID <= n & _IID_MASK <= RESERVED_ANYCAST_IID | _ANYCAST_ID_BITS


def _skip_reserved(pool: Network, n: int) -> int:
    """n, or the first address after the RFC 2526 block n is in (the block is 128-aligned: its last address is
    n with the anycast ID bits set)."""
    return (n | _ANYCAST_ID_BITS) + 1 if _reserved_anycast(pool, n) else n


def _host_bounds(pool: Network, sub_pool: Optional[Network]) -> Tuple[int, int]:
    # The first address is never a host's: the network address in IPv4, the subnet-router anycast address in
    # IPv6. The last one is IPv4's broadcast address; IPv6 has no broadcast (RFC 4291 2), so it is a host's.
    # Both belong to the pool, not to any sub-pool: a sub-pool's own edges are ordinary hosts (as in Docker's
    # built-in IPAM).
    low = int(pool.network_address) + 1
    high = int(pool.broadcast_address) - (1 if pool.version == 4 else 0)
    if sub_pool is not None:
        low, high = max(low, int(sub_pool.network_address)), min(high, int(sub_pool.broadcast_address))
    return low, high


def first_host(pool: Network, sub_pool: Optional[Network] = None) -> Optional[Address]:
    return next_free_address(pool, (), sub_pool)


def next_free_address(pool: Network, held: Iterable[Address],
                      sub_pool: Optional[Network] = None) -> Optional[Address]:
    """The lowest host address of pool (within sub_pool if given) not in held; None when all are taken.

    Lowest-first keeps allocation predictable for operators (gateway .1 / ::1, first container .2 / ::2, as
    Docker does). held is iterated once and nothing else is enumerated: the candidate starts at the lowest host
    and each held address equal to it (in order) pushes it one on, past an RFC 2526 block if it lands in one."""
    low, high = _host_bounds(pool, sub_pool)
    candidate = _skip_reserved(pool, low)
    for n in sorted({int(ip) for ip in held if ip.version == pool.version and low <= int(ip) <= high}):
        if n > candidate:
            break
        if n == candidate:
            candidate = _skip_reserved(pool, candidate + 1)
    return type(pool.network_address)(candidate) if candidate <= high else None


def reply_address(ip: Address, pool: Network) -> str:
    """The RequestAddress reply form: the address with the pool's prefix length, '10.1.0.5/24', 'fd00:1::5/64'."""
    return f"{ip}/{pool.prefixlen}"


def stored_network(text: str) -> Network:
    """A pool as vxnet wrote it into etcd (already canonical: it was a parse_pool result)."""
    return ipaddress.ip_network(text)


def stored_address(text: str) -> Address:
    """An address as vxnet wrote it into etcd (already canonical: it was a parse_address result)."""
    return ipaddress.ip_address(text)


# --- PoolIDs ------------------------------------------------------------------------------------------------------
# dockerd stores the PoolID we return and hands it back on every later call, so it carries everything needed to
# find the pool again: "<space>/<cidr>" or, with --ip-range, "<space>/<cidr>/<sub-pool>", e.g.
# "vxnet-local/10.1.0.0/24/10.1.0.128/25" or "vxnet-local/fd00:1::/64/fd00:1:0:0:8000::/65". Readable in
# `docker network inspect`, and deterministic so that replays (Swarm workers, a new Swarm leader) get the very ID
# the first request got. An IPv6 CIDR has ':' but no more '/' than an IPv4 one, so the '/' count still tells
# the parts apart; the space is never empty and has no '/'.

def pool_id(space: str, pool: Network, sub_pool: Optional[Network] = None) -> str:
    return f"{space}/{pool}" + (f"/{sub_pool}" if sub_pool is not None else "")


def parse_pool_id(text: str) -> Tuple[str, Network, Optional[Network]]:
    """Inverse of pool_id; InvalidOption naming PoolID if text is not one of ours."""
    parts = text.split("/")
    if len(parts) not in (3, 5) or not parts[0]:
        raise InvalidOption(f"PoolID: {text!r} is not a vxnet pool ID (<space>/<cidr>[/<ip-range>])")
    try:
        pool = parse_pool("/".join(parts[1:3]), "PoolID", v6=None)
        sub = parse_sub_pool("/".join(parts[3:5]), pool) if len(parts) == 5 else None
    except InvalidOption as exc:
        raise InvalidOption(f"PoolID: {text!r} is not a vxnet pool ID ({exc})") from None
    return parts[0], pool, sub
