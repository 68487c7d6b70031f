"""kernel/events.py: what rtnetlink notifications name, read from messages laid out as the kernel sends them
(struct ifinfomsg / struct ndmsg, then attributes), and the bound past which a batch says "the whole kind"."""

import socket
import struct

from kernel import events as ev


def _attr(kind: int, value: bytes) -> bytes:
    length = ev.NLA_HDR.size + len(value)
    return ev.NLA_HDR.pack(length, kind) + value + b"\0" * ((-length) % 4)


def _msg(msg_type: int, payload: bytes) -> bytes:
    length = ev.NLMSG_HDR.size + len(payload)
    return ev.NLMSG_HDR.pack(length, msg_type, 0, 0, 0) + payload + b"\0" * ((-length) % 4)


def link(msg_type: int, index: int, name: str) -> bytes:
    return _msg(msg_type, ev.IFINFOMSG.pack(0, 1, index, 0x1003, 0) + _attr(ev.IFLA_IFNAME, name.encode() + b"\0"))


def neigh(msg_type: int, family: int, index: int, mac: str = None, dst: str = None, master: int = None,
          state: int = 0x80, flags: int = 0) -> bytes:
    attrs = b""
    if dst is not None:
        attrs += _attr(ev.NDA_DST, socket.inet_pton(socket.AF_INET6 if ":" in dst else socket.AF_INET, dst))
    if mac is not None:
        attrs += _attr(ev.NDA_LLADDR, bytes(int(x, 16) for x in mac.split(":")))
    if master is not None:
        attrs += _attr(ev.NDA_MASTER, struct.pack("=I", master))
    return _msg(msg_type, ev.NDMSG.pack(family, index, state, flags, 1) + attrs)


def test_link_messages_name_the_index_the_name_and_a_deletion():
    found = ev._kinds_route(link(ev.RTM_NEWLINK, 11, "vxp0123456789a") + link(ev.RTM_DELLINK, 12, "vxtr1"))
    assert found == {"link": {ev.LinkChange(11, "vxp0123456789a", False), ev.LinkChange(12, "vxtr1", True)}}


def test_fdb_and_neighbour_messages_name_device_mac_address_and_where_the_entry_is():
    data = (neigh(ev.RTM_NEWNEIGH, ev.AF_BRIDGE, 11, mac="02:42:0a:01:00:05", master=2, state=0x40)
            + neigh(ev.RTM_DELNEIGH, ev.AF_BRIDGE, 3, mac="02:42:0a:01:00:09", dst="192.0.2.2")
            + neigh(ev.RTM_NEWNEIGH, socket.AF_INET, 3, mac="02:42:0a:01:00:09", dst="10.1.0.9")
            + neigh(ev.RTM_DELNEIGH, socket.AF_INET6, 3, dst="fd00:1::9"))
    assert ev._kinds_route(data) == {
        "fdb": {ev.NeighChange(11, "02:42:0a:01:00:05", None, True, False),
                ev.NeighChange(3, "02:42:0a:01:00:09", "192.0.2.2", False, True)},
        "neighbour": {ev.NeighChange(3, "02:42:0a:01:00:09", "10.1.0.9", False, False),
                      ev.NeighChange(3, None, "fd00:1::9", False, True)}}
    # NTF_MASTER in ndm_flags says "a bridge's entry" too (requests carry the flag, not the attribute)
    flagged = neigh(ev.RTM_NEWNEIGH, ev.AF_BRIDGE, 11, mac="02:42:0a:01:00:05", flags=ev.NTF_MASTER)
    assert ev._kinds_route(flagged) == {"fdb": {ev.NeighChange(11, "02:42:0a:01:00:05", None, True, False)}}


def test_a_message_too_short_to_read_means_the_whole_kind():
    short = _msg(ev.RTM_NEWNEIGH, bytes([ev.AF_BRIDGE, 0, 0]))
    named = neigh(ev.RTM_NEWNEIGH, ev.AF_BRIDGE, 11, mac="02:42:0a:01:00:05", master=2)
    assert ev._kinds_route(named + short) == {"fdb": None}
    assert ev._kinds_route(_msg(ev.RTM_NEWLINK, b"\0" * 8)) == {"link": None}


def test_past_the_bound_a_batch_says_the_whole_kind_and_other_kinds_keep_their_objects():
    one = link(ev.RTM_NEWLINK, 5, "vxp0123456789a")
    many = b"".join(neigh(ev.RTM_NEWNEIGH, ev.AF_BRIDGE, 3, mac=f"02:43:00:00:{i >> 8:02x}:{i & 255:02x}",
                          dst="192.0.2.2") for i in range(ev.MAX_OBJECTS))
    batch = {}
    ev.merge(batch, ev._kinds_route(one + many))
    assert len(batch["fdb"]) == ev.MAX_OBJECTS  # at the bound: still named (control)
    ev.merge(batch, ev._kinds_route(neigh(ev.RTM_NEWNEIGH, ev.AF_BRIDGE, 3, mac="02:44:00:00:00:01")))
    assert batch["fdb"] is None and batch["link"] == {ev.LinkChange(5, "vxp0123456789a", False)}
    # once whole, it stays whole for the batch
    ev.merge(batch, ev._kinds_route(neigh(ev.RTM_NEWNEIGH, ev.AF_BRIDGE, 3, mac="02:44:00:00:00:02")))
    assert batch["fdb"] is None


def test_kinds_without_objects_are_whole():
    batch = {}
    ev.merge(batch, dict.fromkeys({"nft", "sa"}))
    ev.merge(batch, ev._kinds_route(link(ev.RTM_NEWLINK, 5, "br0")))
    assert batch == {"nft": None, "sa": None, "link": {ev.LinkChange(5, "br0", False)}}


def test_a_socket_drained_gives_one_batch_with_its_objects_and_the_bound_applies_across_reads():
    """KernelEvents._drain over a datagram socket holding what the kernel would have queued: every read of the
    socket goes into one batch, and the bound counts the objects of all the reads."""
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    try:
        kernel.send(link(ev.RTM_NEWLINK, 11, "vxp0123456789a"))
        kernel.send(neigh(ev.RTM_NEWNEIGH, ev.AF_BRIDGE, 11, mac="02:42:0a:01:00:05", master=2, state=0x40))
        found = {}
        ev.KernelEvents._drain(ours, ev._kinds_route, found)
        assert found == {"link": {ev.LinkChange(11, "vxp0123456789a", False)},
                         "fdb": {ev.NeighChange(11, "02:42:0a:01:00:05", None, True, False)}}
        for i in range(ev.MAX_OBJECTS + 1):  # one datagram each, as a burst of notifications arrives
            kernel.send(neigh(ev.RTM_NEWNEIGH, socket.AF_INET, 3, mac="02:42:0a:01:00:09",
                              dst=f"10.2.{i >> 8}.{i & 255}"))
        found = {}
        ev.KernelEvents._drain(ours, ev._kinds_route, found)
        assert found == {"neighbour": None}
    finally:
        ours.close()
        kernel.close()
