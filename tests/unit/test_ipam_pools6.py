"""ipam_driver.pools for IPv6: validation, round trips of pools and PoolIDs, and the free-address walk (never
the subnet-router anycast or an RFC 2526 address, lowest first, exact "none left" in tiny pools, and work in the
number of held addresses, not in the size of a /64)."""

import hashlib
import ipaddress
import itertools

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ipam_driver import pools
from store import schema
from wire.errors import InvalidOption

N = ipaddress.IPv6Network
A = ipaddress.IPv6Address
RESERVED_LOW, RESERVED_HIGH = 0xFDFF_FFFF_FFFF_FF80, 0xFDFF_FFFF_FFFF_FFFF


def reserved(ip: A) -> bool:
    """RFC 2526 by the letter: the 128 highest interface identifiers with the u/l bit cleared."""
    return RESERVED_LOW <= int(ip) & ((1 << 64) - 1) <= RESERVED_HIGH


def reference_next_free(pool, held, sub_pool=None):
    """The answer by enumeration, for pools small enough to enumerate."""
    candidates = sub_pool if sub_pool is not None else pool
    return next((ip for ip in candidates
                 if ip != pool.network_address and not reserved(ip) and ip not in held), None)


# --- strategies ---------------------------------------------------------------------------------------------

BLOCKS = (N("2000::/3"), N("fc00::/7"))


@st.composite
def v6_pools(draw, shortest=8, longest=126):
    """A pool vxnet accepts: in global unicast or unique local space, prefix in [shortest, longest]."""
    block = draw(st.sampled_from(BLOCKS))
    prefix = draw(st.integers(max(shortest, block.prefixlen), longest))
    offset = draw(st.integers(0, (1 << (128 - block.prefixlen)) - 1))
    net = N((int(block.network_address) + offset, prefix), strict=False)
    assume(pools.first_host(net) is not None and pools.next_free_address(net, [pools.first_host(net)]))
    return net


@st.composite
def sub_pools(draw, pool):
    prefix = draw(st.integers(pool.prefixlen, 128))
    offset = draw(st.integers(0, pool.num_addresses - 1))
    return N((int(pool.network_address) + offset, prefix), strict=False)


def spellings(ip: A):
    """Other texts of one address: exploded, upper case, with zero groups written out in full."""
    return {ip.exploded, str(ip).upper(), ip.exploded.replace(":0000", ":0"), str(ip)}


# --- validation -----------------------------------------------------------------------------------------------

def test_parse_pool_accepts_canonical_v6():
    assert pools.parse_pool("fd00:1::/64", v6=True) == N("fd00:1::/64")
    assert pools.parse_pool("2001:db8:0:1::/64", v6=True) == N("2001:db8:0:1::/64")


@pytest.mark.parametrize("text, words", [
    ("fd00:1::5/64", ["Pool", "host bits", "fd00:1::/64"]),
    ("FD00:1::/64", ["Pool", "must be written fd00:1::/64"]),
    ("fd00:0001:0000::/64", ["Pool", "must be written fd00:1::/64"]),
    ("fd00:1:0:0:0:0:0:0/64", ["Pool", "must be written fd00:1::/64"]),
    ("fd00:1::", ["Pool", "no prefix length", "fd00:1::/64"]),
    ("fd00::%eth0/64", ["Pool", "zone index"]),
    ("ff05::/64", ["Pool", "ff05::/64", "not global unicast"]),
    ("fe80::/64", ["Pool", "fe80::/64", "unique local"]),
    ("::/64", ["Pool", "not global unicast"]),
    ("::ffff:0:0/96", ["Pool", "not global unicast"]),
    ("64:ff9b::/96", ["Pool", "not global unicast"]),
    ("fd00:1::/127", ["Pool", "too small", "/126 or shorter"]),
    ("fd00:1::/128", ["Pool", "too small"]),
    ("fd00:1::fdff:ffff:ffff:ff80/121", ["Pool", "too small", "RFC 2526"]),
    ("fd00:1::fdff:ffff:ffff:fffc/126", ["Pool", "too small", "RFC 2526"]),
    ("10.1.0.0/24", ["Pool", "'10.1.0.0/24' is not an IPv6 network (V6 is true)"]),
    ("fd00:1::g/64", ["Pool", "is not an IPv6 network in CIDR form"]),
    ("", ["Pool"]),
])
def test_bad_v6_pools_name_the_field_and_the_reason(text, words):
    with pytest.raises(InvalidOption) as err:
        pools.check_pool_size(pools.parse_pool(text, v6=True))
    for word in words:
        assert word in str(err.value)


def test_the_shortest_useful_pools_keep_a_gateway_and_a_container():
    for text in ("fd00:1::/126", "fd00:1::fdff:ffff:ffff:ff00/120", "fd00:1::fdff:ffff:ffff:ff7c/126"):
        pool = N(text)
        pools.check_pool_size(pool)
        assert pools.first_host(pool) is not None


def test_v6_sub_pool():
    pool = N("fd00:1::/64")
    assert pools.parse_sub_pool("fd00:1:0:0:8000::/65", pool) == N("fd00:1:0:0:8000::/65")
    with pytest.raises(InvalidOption, match=r"SubPool: fd00:2::/80 is not inside Pool fd00:1::/64"):
        pools.parse_sub_pool("fd00:2::/80", pool)
    with pytest.raises(InvalidOption, match=r"SubPool: '10.1.0.0/24' is not an IPv6 network"):
        pools.parse_sub_pool("10.1.0.0/24", pool)
    with pytest.raises(InvalidOption, match=r"SubPool: 'FD00:1::/80' must be written fd00:1::/80"):
        pools.parse_sub_pool("FD00:1::/80", pool)
    with pytest.raises(InvalidOption, match=r"SubPool: fd00:1::/128 holds only the subnet-router anycast"):
        pools.parse_sub_pool("fd00:1::/128", pool)
    with pytest.raises(InvalidOption, match=r"SubPool: fd00:1::fdff:ffff:ffff:ff80/121 holds only"):
        pools.parse_sub_pool("fd00:1::fdff:ffff:ffff:ff80/121", pool)
    with pytest.raises(InvalidOption, match=r"SubPool: 'fd00:1::/80' is not an IPv4 network"):
        pools.parse_sub_pool("fd00:1::/80", ipaddress.IPv4Network("10.1.0.0/24"))


def test_v6_address_checks():
    pool = N("fd00:1::/64")
    assert pools.parse_address("fd00:1::7", pool) == A("fd00:1::7")
    # No broadcast address in IPv6: the pool's last address is a host's (its IID is above the RFC 2526 block).
    assert pools.parse_address("fd00:1::ffff:ffff:ffff:ffff", pool) == A("fd00:1::ffff:ffff:ffff:ffff")
    assert pools.parse_address("fd00:1::fdff:ffff:ffff:ff7f", pool) == A("fd00:1::fdff:ffff:ffff:ff7f")
    for text, needle in (
            ("fd00:1::", "Address: fd00:1:: is the subnet-router anycast address (RFC 4291 2.6.1) of pool"),
            ("fd00:1::fdff:ffff:ffff:ff80", "Address: fd00:1::fdff:ffff:ffff:ff80 is a reserved subnet anycast"),
            ("fd00:1::fdff:ffff:ffff:ffff", "RFC 2526"),
            ("fd00:2::1", "Address: fd00:2::1 is outside pool fd00:1::/64"),
            ("10.1.0.1", "Address: '10.1.0.1' is not an IPv6 address (pool fd00:1::/64 is IPv6)"),
            ("fd00:1::1%eth0", "Address: 'fd00:1::1%eth0' has a zone index"),
            ("fd00:1::1/64", "Address: 'fd00:1::1/64' is not an IPv6 address"),
            ("fd00:1::g", "Address: 'fd00:1::g' is not an IPv6 address")):
        with pytest.raises(InvalidOption) as err:
            pools.parse_address(text, pool)
        assert needle in str(err.value), text
    with pytest.raises(InvalidOption, match=r"Address: 'fd00:1::1' is not an IPv4 address \(pool 10.1.0.0/24"):
        pools.parse_address("fd00:1::1", ipaddress.IPv4Network("10.1.0.0/24"))


def test_v6_overlap_is_checked_within_the_family_only():
    held = [ipaddress.IPv4Network("10.0.0.0/8"), N("fd00:1::/48")]
    assert pools.overlapping(N("fd00:1:0:5::/64"), held) == N("fd00:1::/48")
    assert pools.overlapping(N("fd00:2::/64"), held) is None
    assert pools.overlapping(ipaddress.IPv4Network("10.1.0.0/24"), held) == ipaddress.IPv4Network("10.0.0.0/8")


def test_default_v6_range_is_one_rfc4193_48():
    assert pools.DEFAULT_RANGE6.prefixlen == 48 and pools.DEFAULT_RANGE6.subnet_of(N("fd00::/8"))
    assert pools.DEFAULT_RANGE6 == N((int(A("fd00::")) | int(hashlib.sha1(b"vxnet").hexdigest()[:10], 16) << 80,
                                      48))


# --- round trips ----------------------------------------------------------------------------------------------

@settings(deadline=None)  # the machine is shared: a slow example is not a failure
@given(v6_pools(), st.data())
def test_pools_and_pool_ids_round_trip(pool, data):
    assert pools.parse_pool(str(pool), v6=True) == pool
    pools.check_pool_size(pool)
    space = data.draw(st.sampled_from(["vxnet-local", "vxnet-global"]))
    assert pools.parse_pool_id(pools.pool_id(space, pool)) == (space, pool, None)
    sub = data.draw(sub_pools(pool))
    if pools.first_host(pool, sub) is None:
        with pytest.raises(InvalidOption, match=r"^SubPool: "):
            pools.parse_sub_pool(str(sub), pool)
        return
    pid = pools.pool_id(space, pool, sub)
    assert pools.parse_pool_id(pid) == (space, pool, sub)
    assert pools.pool_id(*pools.parse_pool_id(pid)) == pid


@settings(deadline=None)  # the machine is shared: a slow example is not a failure
@given(v6_pools())
def test_only_the_canonical_text_of_a_pool_is_accepted(pool):
    for text in (f"{pool.network_address.exploded}/{pool.prefixlen}", str(pool).upper()):
        if text == str(pool):
            continue
        with pytest.raises(InvalidOption, match=rf"^Pool: '{text}' must be written {pool}$"):
            pools.parse_pool(text, v6=True)


@settings(deadline=None)  # the machine is shared: a slow example is not a failure
@given(v6_pools(longest=126), st.data())
def test_every_spelling_of_an_address_has_one_key(pool, data):
    ip = pools.next_free_address(pool, [])
    keys = schema.Schema()
    wanted = keys.address("vxnet-local", pool, ip)
    for text in spellings(ip):
        got = pools.parse_address(text, pool)
        assert keys.address("vxnet-local", pool, got) == wanted
    assert wanted.endswith("/" + str(ip)) and ip.compressed == str(ip)
    assert keys.pool("vxnet-local", pool).endswith("/" + str(pool).replace("/", "_"))


# --- the free-address walk ------------------------------------------------------------------------------------

@st.composite
def small_pools(draw, shortest=118):
    """A pool of 4 to 2^(128-shortest) addresses anywhere in the allowed space, often at the top of a /64 (next
    to or on the RFC 2526 block)."""
    prefix = draw(st.integers(shortest, 126))
    base = draw(v6_pools(shortest=64, longest=64))
    top = draw(st.booleans())
    if top:
        iid = RESERVED_HIGH - draw(st.integers(0, 2048))
    else:
        iid = draw(st.integers(0, (1 << 64) - 1))
    net = N((int(base.network_address) | iid, prefix), strict=False)
    assume(pools.first_host(net) is not None)
    return net


@settings(max_examples=300, deadline=None)
@given(small_pools(), st.data())
def test_next_free_is_the_lowest_free_and_never_anycast_or_held(pool, data):
    hosts = [ip for ip in pool]
    held = set(data.draw(st.lists(st.sampled_from(hosts), max_size=len(hosts))))
    sub = data.draw(st.none() | sub_pools(pool))
    if sub is not None and pools.first_host(pool, sub) is None:
        sub = None
    got = pools.next_free_address(pool, held, sub)
    assert got == reference_next_free(pool, held, sub)
    if got is not None:
        assert got != pool.network_address and not reserved(got) and got not in held
        assert got in (sub or pool)
        pools.parse_address(str(got), pool)  # what is handed out is what may be asked for


@settings(deadline=None)  # the machine is shared: a slow example is not a failure
@given(small_pools(shortest=121))
def test_allocating_until_exhausted_hands_out_every_host_once(pool):
    held = []
    while (ip := pools.next_free_address(pool, held)) is not None:
        held.append(ip)
    expected = [ip for ip in pool if ip != pool.network_address and not reserved(ip)]
    assert held == expected  # lowest first, each once, and None exactly when nothing is left


def test_a_126_holds_three_then_is_exhausted():
    pool = N("fd00:1::/126")
    held = []
    for _ in range(3):
        held.append(pools.next_free_address(pool, held))
    assert held == [A("fd00:1::1"), A("fd00:1::2"), A("fd00:1::3")]
    assert pools.next_free_address(pool, held) is None
    assert pools.next_free_address(pool, held[1:]) == A("fd00:1::1")


def test_a_pool_at_the_top_of_a_64_stops_before_the_reserved_block():
    pool = N("fd00:1::fdff:ffff:ffff:ff00/120")
    held = [A(int(pool.network_address) + n) for n in range(1, 128)]  # ...ff01 to ...ff7f
    assert pools.next_free_address(pool, held[:-1]) == held[-1]
    assert pools.next_free_address(pool, held) is None  # ...ff80 to ...ffff are RFC 2526's


class Held:
    """The held addresses, counting how they are used: iterating them is allowed (once per call), asking
    whether an address is held is not (that is how an enumeration of the pool would show itself)."""

    def __init__(self, ips):
        self.ips = list(ips)
        self.yielded = 0
        self.iterations = 0

    def __iter__(self):
        self.iterations += 1
        for ip in self.ips:
            self.yielded += 1
            yield ip

    def __contains__(self, ip):
        raise AssertionError("next_free_address asked about one address: it is enumerating the pool")


@pytest.mark.parametrize("prefix", [64, 48])
def test_thousands_held_in_a_big_pool_cost_one_pass_over_them(prefix):
    pool = N(f"fd00:1::/{prefix}")
    base = int(pool.network_address)
    contiguous = [A(base + n) for n in range(1, 5001)]
    scattered = [A(base + (n << 40)) for n in range(1, 3001)]  # far apart, and far above the answer
    held = Held(contiguous[::-1] + scattered)  # any order: the walk sorts what it is given
    assert pools.next_free_address(pool, held) == A(base + 5001)
    assert (held.iterations, held.yielded) == (1, 8000)
    # A gap in the middle is found: the answer is the lowest hole, not one past the highest hold.
    holey = Held(contiguous[:2000] + contiguous[2001:])
    assert pools.next_free_address(pool, holey) == A(base + 2001)
    assert (holey.iterations, holey.yielded) == (1, 4999)


@settings(deadline=None)  # the machine is shared: a slow example is not a failure
@given(st.lists(st.integers(1, 3000), unique=True, max_size=400), st.sampled_from([64, 56, 48]))
def test_big_pools_agree_with_enumeration_of_their_first_addresses(offsets, prefix):
    pool = N(f"fd69:c281:134c::/{prefix}")
    base = int(pool.network_address)
    held = {A(base + n) for n in offsets}
    expected = next(A(base + n) for n in range(1, 3002) if A(base + n) not in held)
    assert pools.next_free_address(pool, held) == expected


# --- free pools -----------------------------------------------------------------------------------------------

def test_auto_v6_pools_are_the_lowest_free_64s_of_the_default_range():
    source, prefix = pools.default_source(True)
    assert (source, prefix) == (pools.DEFAULT_RANGE6, 64)
    assert pools.pick_free_pool([], source, prefix) == N("fd69:c281:134c::/64")
    held = [N("fd69:c281:134c::/63"), N("fd69:c281:134c:3::/64"), N("fd69:c281:134c:2::1/128"),
            ipaddress.IPv4Network("10.213.0.0/16"), N("2001:db8::/32")]
    assert pools.pick_free_pool(held, source, prefix) == N("fd69:c281:134c:4::/64")
    assert pools.pick_free_pool([N("fd00::/8")], source, prefix) is None
    assert pools.pick_free_pool([N("fd69:c281:134c:ffff::/64")], source, prefix) == N("fd69:c281:134c::/64")
    # Everything but the last /64 held, by a few big pools: found without walking the 65,535 below it.
    big = [N("fd69:c281:134c::/49"), N("fd69:c281:134c:8000::/50"), N("fd69:c281:134c:c000::/51"),
           N("fd69:c281:134c:e000::/52"), N("fd69:c281:134c:f000::/53"), N("fd69:c281:134c:f800::/54"),
           N("fd69:c281:134c:fc00::/55"), N("fd69:c281:134c:fe00::/56"), N("fd69:c281:134c:ff00::/57"),
           N("fd69:c281:134c:ff80::/58"), N("fd69:c281:134c:ffc0::/59"), N("fd69:c281:134c:ffe0::/60"),
           N("fd69:c281:134c:fff0::/61"), N("fd69:c281:134c:fff8::/62"), N("fd69:c281:134c:fffc::/63"),
           N("fd69:c281:134c:fffe::/64")]
    assert pools.pick_free_pool(big, source, prefix) == N("fd69:c281:134c:ffff::/64")


@settings(deadline=None)  # the machine is shared: a slow example is not a failure
@given(st.lists(st.tuples(st.integers(0, 300), st.integers(58, 72)), max_size=60))
def test_pick_free_pool_is_the_lowest_non_overlapping_64(specs):
    """Held pools of /58 (64 /64s) to /72 (inside one /64) in the first 300 /64s of the range: the pick is what
    enumerating the /64s in order finds (the first 2,048 of them are sure to hold it)."""
    source, prefix = pools.DEFAULT_RANGE6, 64
    held = [N((int(source.network_address) + (n << 64), p), strict=False) for n, p in specs]
    got = pools.pick_free_pool(held, source, prefix)
    expected = next(net for net in itertools.islice(source.subnets(new_prefix=prefix), 2048)
                    if not any(net.overlaps(h) for h in held))
    assert got == expected
