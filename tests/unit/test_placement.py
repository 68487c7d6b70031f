"""Placement of endpoint ports on a network namespace's bridges (netdriver/placement.py): never past the limit or a
bridge's share, the lowest bridge with room first, a freed place taken again; and the fabric check of
netdriver/sandbox.py, which says what a namespace's leaves, trunks and static entries lack."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel import names
from netdriver.placement import Placement, limit_message
from netdriver.sandbox import fabric_differences, wired_ports
from wire.errors import Exhausted

# A small model: 4 bridges of 3 ports, a limit below what they hold, so every bound is reached quickly.
PER_BRIDGE, BRIDGES = 3, 4

operations = st.lists(st.tuples(st.sampled_from(["place", "free"]), st.integers(0, 15)), max_size=80)


@settings(max_examples=300, deadline=None)
@given(operations, st.integers(1, PER_BRIDGE * BRIDGES))
def test_never_over_the_limit_lowest_bridge_first_and_frees_reused(ops, limit):
    placement = Placement(limit, PER_BRIDGE, BRIDGES)
    model = {}  # port -> bridge
    for op, n in ops:
        port = f"p{n}"
        if op == "free":
            assert placement.free(port) == model.pop(port, None)
            continue
        counts = [sum(1 for b in model.values() if b == k) for k in range(BRIDGES)]
        if port in model:
            assert placement.place(port) == model[port]  # a replay keeps its bridge
        elif len(model) >= limit:
            with pytest.raises(Exhausted):
                placement.place(port, "ab" * 32)
        else:
            k = placement.place(port)
            assert k == min(b for b in range(BRIDGES) if counts[b] < PER_BRIDGE)  # the lowest with room
            model[port] = k
        assert len(placement) == len(model) <= limit
        for k in range(BRIDGES):
            assert placement.count(k) == sum(1 for b in model.values() if b == k) <= PER_BRIDGE
        assert placement.used() == sorted(set(model.values()))


def test_the_real_figures_hold_4000_on_four_bridges_and_leave_room_for_the_vxlan_device_and_trunks():
    placement = Placement(4000)
    bridges = [placement.place(f"p{i}") for i in range(4000)]
    assert [bridges.count(k) for k in range(4)] == [1000] * 4
    with pytest.raises(Exhausted) as refused:
        placement.place("one-more", "f" * 64)
    assert str(refused.value).startswith("network ffffffffffff holds at most 4000 endpoints on this host")
    # The root: the VXLAN device, every trunk and its endpoints within a bridge's ports.
    assert 1 + names.MAX_LEAVES + names.ENDPOINTS_PER_BRIDGE <= names.BRIDGE_PORTS < names.BR_MAX_PORTS
    assert names.MAX_BRIDGED_ENDPOINTS == 23000
    with pytest.raises(ValueError):
        Placement(names.MAX_BRIDGED_ENDPOINTS + 1)


def test_a_placement_read_back_from_the_kernel_keeps_what_is_wired_even_past_a_smaller_limit():
    placement = Placement.of(2, [("a", 0), ("b", 0), ("c", 1)], PER_BRIDGE, BRIDGES)
    assert len(placement) == 3 and placement.bridge_of("c") == 1
    with pytest.raises(Exhausted):
        placement.place("d")
    placement.free("a")
    placement.free("b")
    assert placement.place("d") == 0


def test_leaf_and_trunk_names_are_ours_and_invert():
    assert [names.bridge(k) for k in (0, 1, 22)] == ["br0", "br1", "br22"]
    assert [names.bridge_index(n) for n in ("br0", "br1", "br22", "br23", "br01", "vxlan0")] == [0, 1, 22, -1, -1, -1]
    assert (names.trunk_root(3), names.trunk_leaf(3)) == ("vxtr3", "vxtl3")
    assert all(len(names.trunk_root(k)) <= 15 for k in range(1, names.MAX_LEAVES + 1))
    for bad in (0, 23, -1, True):
        with pytest.raises(ValueError):
            names.trunk_root(bad)


PORT_A, PORT_B = "vxp" + "a" * 11, "vxp" + "b" * 11
MAC_A, MAC_B = "02:42:0a:00:00:02", "02:42:0a:00:00:03"


def _fabric(**changes):
    """A namespace with A on the root and B on leaf 1, whole; changes replace or (None) remove links."""
    ports = {"br0": ("bridge", None, None), "vxlan0": ("vxlan", "br0", None), "br1": ("bridge", None, None),
             "vxtr1": ("veth", "br0", None), "vxtl1": ("veth", "br1", None),
             PORT_A: ("veth", "br0", MAC_A), PORT_B: ("veth", "br1", MAC_B)}
    for name, value in changes.items():
        if value is None:
            ports.pop(name)
        else:
            ports[name] = value
    return ports


STATIC = {(PORT_A, MAC_A), (PORT_B, MAC_B), ("vxtr1", MAC_B)}


def test_a_whole_fabric_has_no_differences_and_each_missing_piece_is_named():
    assert wired_ports(_fabric()) == [(PORT_A, 0, MAC_A), (PORT_B, 1, MAC_B)]
    assert fabric_differences(_fabric(), STATIC) == []
    assert fabric_differences(_fabric(vxtr1=None, vxtl1=None), STATIC - {("vxtr1", MAC_B)}) == [
        (f"fdb {MAC_B} on vxtr1", "static", None), ("trunk vxtr1", "on br0", None), ("trunk vxtl1", "on br1", None)]
    assert fabric_differences(_fabric(vxtl1=("veth", None, None)), STATIC) == [("trunk vxtl1", "on br1", "on None")]
    assert fabric_differences(_fabric(br1=None, **{PORT_B: ("veth", None, MAC_B)}), STATIC) == [
        (f"port {PORT_B}", "on a bridge", None)]
    assert fabric_differences(_fabric(), STATIC - {(PORT_A, MAC_A)}) == [(f"fdb {MAC_A} on {PORT_A}", "static", None)]


def test_the_limit_message_names_the_network_and_the_setting():
    assert limit_message("c" * 64, 7) == ("network cccccccccccc holds at most 7 endpoints on this host "
                                          "(VXNET_MAX_ENDPOINTS; vxnet's bridges take 23000 at most)")
