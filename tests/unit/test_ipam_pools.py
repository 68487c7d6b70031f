"""ipam_driver.pools: pure pool arithmetic and validation."""

import ipaddress

import pytest

from ipam_driver import pools
from wire.errors import InvalidOption

N = ipaddress.IPv4Network
A = ipaddress.IPv4Address


def test_parse_pool_accepts_canonical_cidr():
    assert pools.parse_pool("10.1.0.0/24") == N("10.1.0.0/24")


@pytest.mark.parametrize("text, words", [
    ("10.0.0.300/24", ["Pool", "'10.0.0.300/24'", "not an IPv4 network"]),
    ("banana", ["Pool", "'banana'"]),
    ("", ["Pool"]),
    ("10.1.0.5/24", ["Pool", "host bits", "10.1.0.0/24"]),
    ("10.1.0.0", ["Pool", "no prefix length"]),
    ("fd00::/64", ["Pool", "'fd00::/64' is not an IPv4 network (V6 is false)"]),
    ("10.1.0.0/255.255.255.0", ["Pool", "must be written 10.1.0.0/24"]),
    ("010.1.0.0/24", ["Pool", "'010.1.0.0/24'"]),
])
def test_parse_pool_names_field_and_value(text, words):
    with pytest.raises(InvalidOption) as err:
        pools.parse_pool(text)
    for word in words:
        assert word in str(err.value)


def test_pools_too_small_for_a_gateway_and_a_host_are_refused():
    pools.check_pool_size(N("10.1.0.0/30"))
    with pytest.raises(InvalidOption, match=r"Pool: 10.1.0.0/31 is too small"):
        pools.check_pool_size(N("10.1.0.0/31"))


def test_sub_pool_must_lie_inside_pool():
    pool = N("10.1.0.0/24")
    assert pools.parse_sub_pool("", pool) is None
    assert pools.parse_sub_pool("10.1.0.128/25", pool) == N("10.1.0.128/25")
    with pytest.raises(InvalidOption, match=r"SubPool: 10.2.0.0/25 is not inside Pool 10.1.0.0/24"):
        pools.parse_sub_pool("10.2.0.0/25", pool)
    with pytest.raises(InvalidOption, match=r"SubPool: 10.1.0.0/23 is not inside"):
        pools.parse_sub_pool("10.1.0.0/23", pool)
    with pytest.raises(InvalidOption, match=r"SubPool: '10.1.0.999/25'"):
        pools.parse_sub_pool("10.1.0.999/25", pool)
    with pytest.raises(InvalidOption, match=r"SubPool: 10.1.0.255/32 holds only"):
        pools.parse_sub_pool("10.1.0.255/32", pool)


def test_parse_address_checks_pool_membership():
    pool = N("10.1.0.0/24")
    assert pools.parse_address("10.1.0.7", pool) == A("10.1.0.7")
    with pytest.raises(InvalidOption, match=r"Address: 10.2.0.7 is outside pool 10.1.0.0/24"):
        pools.parse_address("10.2.0.7", pool)
    with pytest.raises(InvalidOption, match=r"Address: 10.1.0.0 is the network address"):
        pools.parse_address("10.1.0.0", pool)
    with pytest.raises(InvalidOption, match=r"Address: 10.1.0.255 is the broadcast address"):
        pools.parse_address("10.1.0.255", pool)
    with pytest.raises(InvalidOption, match=r"Address: '10.1.0.7/24' is not an IPv4 address"):
        pools.parse_address("10.1.0.7/24", pool)


def test_overlapping_finds_containing_contained_and_equal_pools():
    held = [N("10.1.0.0/24"), N("10.3.0.0/16")]
    assert pools.overlapping(N("10.1.0.128/25"), held) == N("10.1.0.0/24")
    assert pools.overlapping(N("10.0.0.0/8"), held) == N("10.1.0.0/24")
    assert pools.overlapping(N("10.3.4.0/24"), held) == N("10.3.0.0/16")
    assert pools.overlapping(N("10.2.0.0/24"), held) is None


def test_pick_free_pool_never_overlaps_what_is_held():
    held = [N("10.213.0.0/23"), N("10.213.3.0/24")]
    first = pools.pick_free_pool(held)
    assert first == N("10.213.2.0/24")
    picked = []
    for _ in range(10):
        net = pools.pick_free_pool(held + picked)
        assert pools.overlapping(net, held + picked) is None
        assert net.subnet_of(pools.DEFAULT_RANGE) and net.prefixlen == pools.DEFAULT_PREFIX
        picked.append(net)
    assert pools.pick_free_pool([N("10.0.0.0/8")]) is None


def test_next_free_address_skips_network_broadcast_and_held():
    pool = N("10.1.0.0/29")  # .1 - .6 are hosts
    assert pools.next_free_address(pool, set()) == A("10.1.0.1")
    assert pools.next_free_address(pool, {A("10.1.0.1"), A("10.1.0.2")}) == A("10.1.0.3")
    every_host = {A(f"10.1.0.{n}") for n in range(1, 7)}
    assert pools.next_free_address(pool, every_host) is None


def test_next_free_address_stays_in_sub_pool_but_off_pool_edges():
    pool = N("10.1.0.0/24")
    assert pools.next_free_address(pool, set(), N("10.1.0.128/25")) == A("10.1.0.128")
    assert pools.next_free_address(pool, set(), N("10.1.0.0/25")) == A("10.1.0.1")
    last = N("10.1.0.252/30")
    assert pools.next_free_address(pool, {A("10.1.0.252"), A("10.1.0.253"), A("10.1.0.254")}, last) is None


def test_reply_address_carries_the_pool_prefix_length():
    assert pools.reply_address(A("10.1.0.5"), N("10.1.0.0/24")) == "10.1.0.5/24"
    assert pools.reply_address(A("10.1.2.5"), N("10.1.0.0/16")) == "10.1.2.5/16"


def test_pool_id_round_trips():
    assert pools.pool_id("vxnet-local", N("10.1.0.0/24")) == "vxnet-local/10.1.0.0/24"
    full = pools.pool_id("vxnet-global", N("10.1.0.0/24"), N("10.1.0.128/25"))
    assert full == "vxnet-global/10.1.0.0/24/10.1.0.128/25"
    assert pools.parse_pool_id(full) == ("vxnet-global", N("10.1.0.0/24"), N("10.1.0.128/25"))
    assert pools.parse_pool_id("vxnet-local/10.1.0.0/24") == ("vxnet-local", N("10.1.0.0/24"), None)


@pytest.mark.parametrize("text", ["", "10.1.0.0/24", "vxnet-local/10.1.0.0", "/10.1.0.0/24",
                                  "vxnet-local/10.1.0.0/24/10.9.0.0/25", "vxnet-local/10.1.0.300/24"])
def test_parse_pool_id_refuses_foreign_ids(text):
    with pytest.raises(InvalidOption, match=r"^PoolID: "):
        pools.parse_pool_id(text)
