"""The XFRM wire format against <linux/xfrm.h> as a C compiler lays it out (ctypes follows the platform ABI), and
decoding of what the kernel sends back. No kernel needed: messages are encoded and parsed in memory."""

import ctypes
import ipaddress

import pytest

from kernel import names
from kernel import xfrm as X


class xfrm_address_t(ctypes.Union):
    _fields_ = [("a4", ctypes.c_uint32), ("a6", ctypes.c_uint32 * 4)]


class xfrm_selector(ctypes.Structure):
    _fields_ = [("daddr", xfrm_address_t), ("saddr", xfrm_address_t), ("dport", ctypes.c_uint16),
                ("dport_mask", ctypes.c_uint16), ("sport", ctypes.c_uint16), ("sport_mask", ctypes.c_uint16),
                ("family", ctypes.c_uint16), ("prefixlen_d", ctypes.c_uint8), ("prefixlen_s", ctypes.c_uint8),
                ("proto", ctypes.c_uint8), ("ifindex", ctypes.c_int), ("user", ctypes.c_uint32)]


class xfrm_id(ctypes.Structure):
    _fields_ = [("daddr", xfrm_address_t), ("spi", ctypes.c_uint32), ("proto", ctypes.c_uint8)]


class xfrm_lifetime_cfg(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in ("soft_byte_limit", "hard_byte_limit", "soft_packet_limit",
                                               "hard_packet_limit", "soft_add", "hard_add", "soft_use", "hard_use")]


class xfrm_lifetime_cur(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in ("bytes", "packets", "add_time", "use_time")]


class xfrm_stats(ctypes.Structure):
    _fields_ = [("replay_window", ctypes.c_uint32), ("replay", ctypes.c_uint32),
                ("integrity_failed", ctypes.c_uint32)]


class xfrm_usersa_info(ctypes.Structure):
    _fields_ = [("sel", xfrm_selector), ("id", xfrm_id), ("saddr", xfrm_address_t), ("lft", xfrm_lifetime_cfg),
                ("curlft", xfrm_lifetime_cur), ("stats", xfrm_stats), ("seq", ctypes.c_uint32),
                ("reqid", ctypes.c_uint32), ("family", ctypes.c_uint16), ("mode", ctypes.c_uint8),
                ("replay_window", ctypes.c_uint8), ("flags", ctypes.c_uint8)]


class xfrm_usersa_id(ctypes.Structure):
    _fields_ = [("daddr", xfrm_address_t), ("spi", ctypes.c_uint32), ("family", ctypes.c_uint16),
                ("proto", ctypes.c_uint8)]


class xfrm_userpolicy_info(ctypes.Structure):
    _fields_ = [("sel", xfrm_selector), ("lft", xfrm_lifetime_cfg), ("curlft", xfrm_lifetime_cur),
                ("priority", ctypes.c_uint32), ("index", ctypes.c_uint32), ("dir", ctypes.c_uint8),
                ("action", ctypes.c_uint8), ("flags", ctypes.c_uint8), ("share", ctypes.c_uint8)]


class xfrm_userpolicy_id(ctypes.Structure):
    _fields_ = [("sel", xfrm_selector), ("index", ctypes.c_uint32), ("dir", ctypes.c_uint8)]


class xfrm_user_tmpl(ctypes.Structure):
    _fields_ = [("id", xfrm_id), ("family", ctypes.c_uint16), ("saddr", xfrm_address_t), ("reqid", ctypes.c_uint32),
                ("mode", ctypes.c_uint8), ("share", ctypes.c_uint8), ("optional", ctypes.c_uint8),
                ("aalgos", ctypes.c_uint32), ("ealgos", ctypes.c_uint32), ("calgos", ctypes.c_uint32)]


NLMSG_HDR = 16
NLA_HDR = 4


def _body(msg) -> bytes:
    msg.encode()
    return bytes(msg.data[NLMSG_HDR:])


def _ip(addr: xfrm_address_t) -> str:
    return str(ipaddress.IPv4Address(bytes(addr)[:4]))


def _be16(value: int) -> int:
    return int.from_bytes(value.to_bytes(2, "little"), "big")


def _be32(value: int) -> int:
    return int.from_bytes(value.to_bytes(4, "little"), "big")


@pytest.mark.parametrize("ours, theirs", [
    (X.xfrm_usersa_info, xfrm_usersa_info), (X.xfrm_usersa_id, xfrm_usersa_id),
    (X.xfrm_userpolicy_info, xfrm_userpolicy_info), (X.xfrm_userpolicy_id, xfrm_userpolicy_id),
])
def test_fixed_parts_have_the_c_size(ours, theirs):
    msg = ours()
    msg.update({name: b"" for name, fmt in ours.fields if fmt.endswith("s")})
    assert len(_body(msg)) == ctypes.sizeof(theirs)
    assert ctypes.sizeof(xfrm_usersa_info) == 224 and ctypes.sizeof(xfrm_user_tmpl) == 64


def test_sa_message_lands_on_the_c_fields():
    sa = X.SA("192.0.2.1", "192.0.2.2", 0x12345678, bytes(range(20)), 4790)
    xfrm = X.Xfrm.__new__(X.Xfrm)  # only the message builder, no socket
    msg = xfrm._sa_message(sa)
    body = _body(msg)
    c = xfrm_usersa_info.from_buffer_copy(body[:ctypes.sizeof(xfrm_usersa_info)])
    assert (_ip(c.sel.saddr), _ip(c.sel.daddr), _be16(c.sel.dport), c.sel.dport_mask, c.sel.proto) == \
        ("192.0.2.1", "192.0.2.2", 4790, 0xFFFF, 17)
    assert (c.sel.family, c.sel.prefixlen_d, c.sel.prefixlen_s) == (2, 32, 32)
    assert (_ip(c.id.daddr), _be32(c.id.spi), c.id.proto, _ip(c.saddr)) == ("192.0.2.2", 0x12345678, 50, "192.0.2.1")
    assert (c.reqid, c.family, c.mode, c.replay_window) == (names.XFRM_REQID, 2, 0, 0)
    assert c.lft.hard_byte_limit == c.lft.hard_packet_limit == X.XFRM_INF and c.lft.hard_add == 0
    # XFRMA_ALG_AEAD follows: name (64), key bits, ICV bits, key.
    attr = body[ctypes.sizeof(xfrm_usersa_info):]
    length = int.from_bytes(attr[0:2], "little")
    kind = int.from_bytes(attr[2:4], "little")
    assert kind == 18 and length == NLA_HDR + 72 + 20
    assert attr[4:68].rstrip(b"\0") == b"rfc4106(gcm(aes))"
    assert int.from_bytes(attr[68:72], "little") == 160 and int.from_bytes(attr[72:76], "little") == 128
    assert attr[76:96] == bytes(range(20))


def test_policy_template_lands_on_the_c_fields():
    msg = X.xfrm_userpolicy_info()
    msg.update(X._flow_selector("192.0.2.1", "192.0.2.2", 4790))
    msg.update({"dir": X.XFRM_POLICY_OUT})
    msg["attrs"] = [["XFRMA_TMPL", {"id_daddr": X._addr("192.0.2.2"), "id_spi": 0xABCDEF01, "id_proto": 50,
                                    "family": 2, "saddr": X._addr("192.0.2.1"), "reqid": names.XFRM_REQID, "mode": 0,
                                    "optional": 0, "aalgos": 0xFFFFFFFF, "ealgos": 0xFFFFFFFF,
                                    "calgos": 0xFFFFFFFF}]]
    body = _body(msg)
    size = ctypes.sizeof(xfrm_userpolicy_info)
    assert xfrm_userpolicy_info.from_buffer_copy(body[:size]).dir == 1
    attr = body[size:]
    assert int.from_bytes(attr[0:2], "little") == NLA_HDR + ctypes.sizeof(xfrm_user_tmpl)
    t = xfrm_user_tmpl.from_buffer_copy(attr[NLA_HDR:NLA_HDR + 64])
    assert (_ip(t.id.daddr), _be32(t.id.spi), t.id.proto, t.family, _ip(t.saddr), t.reqid) == \
        ("192.0.2.2", 0xABCDEF01, 50, 2, "192.0.2.1", names.XFRM_REQID)
    assert (t.mode, t.optional, t.ealgos) == (0, 0, 0xFFFFFFFF)


def _reply(msg_type: int, msg) -> bytes:
    """A message as the kernel would send it: our encoder, with the reply's type in the header."""
    msg["header"]["type"] = msg_type
    msg["header"]["sequence_number"] = 7
    msg.encode()
    return bytes(msg.data)


def test_a_dumped_sa_decodes_with_counters_and_hides_its_key():
    xfrm = X.Xfrm.__new__(X.Xfrm)
    msg = xfrm._sa_message(X.SA("192.0.2.1", "192.0.2.2", 0x1000, b"K" * 20, 4790))
    msg.update({"cur_packets": 42, "cur_bytes": 4200, "stats_integrity_failed": 1})
    parsed = list(X._XfrmMarshal().parse(_reply(X.XFRM_MSG_NEWSA, msg)))
    state = X._sa_state(parsed[0])
    assert (state.src, state.dst, state.spi, state.dport, state.packets, state.bytes) == \
        ("192.0.2.1", "192.0.2.2", 0x1000, 4790, 42, 4200)
    assert state.algorithm == "rfc4106(gcm(aes))" and state.key == b"K" * 20 and state.icv_bits == 128
    assert state.ours and state.integrity_failed == 1
    assert "KKKK" not in repr(state) and "KKKK" not in repr(X.SA("a", "b", 1, b"K" * 20, 1))


def test_same_sa_compares_what_matters():
    sa = X.SA("192.0.2.1", "192.0.2.2", 0x1000, b"K" * 20, 4790)
    state = X.SAState("192.0.2.1", "192.0.2.2", 0x1000, names.XFRM_REQID, 0, "rfc4106(gcm(aes))", b"K" * 20, 128, 4790,
                      0, 0, 0, 0)
    assert X._same_sa(state, sa)
    assert not X._same_sa(state, X.SA("192.0.2.1", "192.0.2.2", 0x1000, b"L" * 20, 4790))
