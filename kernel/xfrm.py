"""The only module that speaks XFRM netlink: ESP security associations (SAs) and security policies (SPs).

pyroute2 has no XFRM API, so the messages of <linux/xfrm.h> are declared here on pyroute2's netlink base classes
(nlmsg, nla, Marshal) and sent over a plain NETLINK_XFRM socket: one socket per namespace, created in that
namespace (a short-lived thread enters it, kernel/netns.py, and leaves the socket behind; no fork), usable from
any thread under a lock. The C structs are flattened into field lists with explicit padding; their sizes on x86_64
(xfrm_usersa_info 224, xfrm_userpolicy_info 168, xfrm_user_tmpl 64, ...) are checked by tests/unit.

What vxnet makes, and how it is recognised: every SA and every policy template carries reqid names.XFRM_REQID. Cleanup
and reconciliation list the kernel's SAs and policies and touch only those with this reqid; nothing of anyone
else's (strongSwan, Docker's own overlay) is ever changed. reqid is chosen over XFRMA_MARK or if_id because those
take part in the kernel's lookup (a marked policy only matches marked packets), while reqid only ties a policy's
template to SAs.

Everything is transport-mode ESP between two VTEPs, selected by UDP destination port (VXLAN of encrypted
networks uses its own port), AEAD rfc4106(gcm(aes)). Adds are idempotent: an SA that exists with the same
parameters is left alone, one that differs (a key ring recreated with reused tags) is replaced; policies are
written with XFRM_MSG_UPDPOLICY (create or replace in one step, which is how a rotation switches the SA a policy
sends with).
"""

import dataclasses
import errno
import ipaddress
import itertools
import socket
import threading
from typing import List, Optional

from pyroute2.netlink import (
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_EXCL,
    NLM_F_MULTI,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    nla,
    nlmsg,
)
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.marshal import Marshal

from kernel import names
from kernel.errors import kernel_errors
from kernel.netns import run_inside
from wire.errors import KernelError

# <linux/netlink.h>, <linux/xfrm.h>, <linux/in.h>
NETLINK_XFRM = 6
SOL_NETLINK = 270
NETLINK_EXT_ACK = 11  # the kernel's reason ("Requested AEAD algorithm not found") comes back with the errno

XFRM_MSG_NEWSA = 0x10
XFRM_MSG_DELSA = 0x11
XFRM_MSG_GETSA = 0x12
XFRM_MSG_NEWPOLICY = 0x13
XFRM_MSG_DELPOLICY = 0x14
XFRM_MSG_GETPOLICY = 0x15
XFRM_MSG_UPDPOLICY = 0x19

AF_INET = 2
IPPROTO_UDP = 17
IPPROTO_ESP = 50
XFRM_MODE_TRANSPORT = 0
XFRM_POLICY_IN = 0
XFRM_POLICY_OUT = 1
XFRM_POLICY_ALLOW = 0
XFRM_INF = (1 << 64) - 1  # "no limit" in xfrm_lifetime_cfg; a zero byte/packet limit would expire at once

# Anti-replay is off (window 0, as in Docker's overlay). SPIs are derived, not negotiated, so an SA that one end
# re-creates (a host that rebooted, or that dropped a peer and took it back while the peer kept it) has the same
# SPI and starts again at sequence 1, while the other end still remembers the old high-water mark: with a window
# every packet would be dropped as a replay until the new sequence caught up, i.e. for hours. GCM still
# authenticates every packet; what is given up is the detection of packets captured and sent again.
REPLAY_WINDOW = 0

_DIRECTIONS = {"in": XFRM_POLICY_IN, "out": XFRM_POLICY_OUT}


# -- wire format -------------------------------------------------------------------------------------------------
def _selector(p: str):
    """struct xfrm_selector (56 bytes)."""
    return ((p + "daddr", "16s"), (p + "saddr", "16s"),
            (p + "dport", ">H"), (p + "dport_mask", ">H"), (p + "sport", ">H"), (p + "sport_mask", ">H"),
            (p + "family", "H"), (p + "prefixlen_d", "B"), (p + "prefixlen_s", "B"), (p + "proto", "B"),
            ("__pad", "3x"), (p + "ifindex", "i"), (p + "user", "I"))


def _id(p: str):
    """struct xfrm_id (24 bytes): daddr, spi (network order), proto."""
    return ((p + "daddr", "16s"), (p + "spi", ">I"), (p + "proto", "B"), ("__pad", "3x"))


_LIFETIME_CFG = tuple((f"lft_{n}", "Q") for n in (
    "soft_byte_limit", "hard_byte_limit", "soft_packet_limit", "hard_packet_limit",
    "soft_add_expires_seconds", "hard_add_expires_seconds", "soft_use_expires_seconds",
    "hard_use_expires_seconds"))  # 64 bytes
_LIFETIME_CUR = tuple((f"cur_{n}", "Q") for n in ("bytes", "packets", "add_time", "use_time"))  # 32 bytes

_XFRMA = (
    ("XFRMA_UNSPEC", "none"), ("XFRMA_ALG_AUTH", "cdata"), ("XFRMA_ALG_CRYPT", "cdata"),
    ("XFRMA_ALG_COMP", "cdata"), ("XFRMA_ENCAP", "cdata"), ("XFRMA_TMPL", "xfrm_user_tmpl"),
    ("XFRMA_SA", "cdata"), ("XFRMA_POLICY", "cdata"), ("XFRMA_SEC_CTX", "cdata"), ("XFRMA_LTIME_VAL", "cdata"),
    ("XFRMA_REPLAY_VAL", "xfrm_replay_state"), ("XFRMA_REPLAY_THRESH", "uint32"),
    ("XFRMA_ETIMER_THRESH", "uint32"), ("XFRMA_SRCADDR", "cdata"), ("XFRMA_COADDR", "cdata"),
    ("XFRMA_LASTUSED", "uint64"), ("XFRMA_POLICY_TYPE", "cdata"), ("XFRMA_MIGRATE", "cdata"),
    ("XFRMA_ALG_AEAD", "xfrm_algo_aead"), ("XFRMA_KMADDRESS", "cdata"), ("XFRMA_ALG_AUTH_TRUNC", "cdata"),
    ("XFRMA_MARK", "xfrm_mark"), ("XFRMA_TFCPAD", "uint32"), ("XFRMA_REPLAY_ESN_VAL", "cdata"),
    ("XFRMA_SA_EXTRA_FLAGS", "uint32"), ("XFRMA_PROTO", "uint8"), ("XFRMA_ADDRESS_FILTER", "cdata"),
    ("XFRMA_PAD", "cdata"), ("XFRMA_OFFLOAD_DEV", "cdata"), ("XFRMA_SET_MARK", "uint32"),
    ("XFRMA_SET_MARK_MASK", "uint32"), ("XFRMA_IF_ID", "uint32"), ("XFRMA_MTIMER_THRESH", "uint32"),
)


class _xfrm_msg(nlmsg):
    nla_map = _XFRMA

    class xfrm_user_tmpl(nla):
        """struct xfrm_user_tmpl (64 bytes). vxnet policies carry exactly one."""
        fields = _id("id_") + (("family", "H"), ("__pad", "2x"), ("saddr", "16s"), ("reqid", "I"),
                               ("mode", "B"), ("share", "B"), ("optional", "B"), ("__pad", "1x"),
                               ("aalgos", "I"), ("ealgos", "I"), ("calgos", "I"))

    class xfrm_algo_aead(nla):
        """struct xfrm_algo_aead: name, key length and ICV length in bits, then the key."""
        fields = (("alg_name", "64s"), ("alg_key_len", "I"), ("alg_icv_len", "I"), ("alg_key", "s"))

        def decode(self):
            nla.decode(self)
            start = self.offset + 4 + 72  # NLA header + the fixed part
            self["alg_key"] = bytes(self.data[start:self.offset + self.length])

    class xfrm_mark(nla):
        fields = (("v", "I"), ("m", "I"))

    class xfrm_replay_state(nla):
        fields = (("oseq", "I"), ("seq", "I"), ("bitmap", "I"))


class xfrm_usersa_info(_xfrm_msg):
    """struct xfrm_usersa_info (224 bytes): an SA, in NEWSA requests and in GETSA replies."""
    fields = (_selector("sel_") + _id("id_") + (("saddr", "16s"),) + _LIFETIME_CFG + _LIFETIME_CUR +
              (("stats_replay_window", "I"), ("stats_replay", "I"), ("stats_integrity_failed", "I"),
               ("seq", "I"), ("reqid", "I"), ("family", "H"), ("mode", "B"), ("replay_window", "B"),
               ("flags", "B"), ("__pad", "7x")))


class xfrm_usersa_id(_xfrm_msg):
    """struct xfrm_usersa_id (24 bytes): names an SA for GETSA/DELSA."""
    fields = (("daddr", "16s"), ("spi", ">I"), ("family", "H"), ("proto", "B"), ("__pad", "1x"))


class xfrm_userpolicy_info(_xfrm_msg):
    """struct xfrm_userpolicy_info (168 bytes)."""
    fields = (_selector("sel_") + _LIFETIME_CFG + _LIFETIME_CUR +
              (("priority", "I"), ("index", "I"), ("dir", "B"), ("action", "B"), ("flags", "B"), ("share", "B"),
               ("__pad", "4x")))


class xfrm_userpolicy_id(_xfrm_msg):
    """struct xfrm_userpolicy_id (64 bytes): names a policy by selector and direction for DELPOLICY."""
    fields = _selector("sel_") + (("index", "I"), ("dir", "B"), ("__pad", "3x"))


class _dump_request(nlmsg):
    fields = ()


class _XfrmMarshal(Marshal):
    # Replies only: requests echoed inside error messages decode with the same classes.
    msg_map = {XFRM_MSG_NEWSA: xfrm_usersa_info, XFRM_MSG_NEWPOLICY: xfrm_userpolicy_info}


def _addr(ip: str) -> bytes:
    """xfrm_address_t: 16 bytes, IPv4 in the first four."""
    return ipaddress.IPv4Address(ip).packed + bytes(12)


def _ip(raw: bytes) -> str:
    return str(ipaddress.IPv4Address(bytes(raw[:4])))


def _flow_selector(src: str, dst: str, dport: int) -> dict:
    """UDP from src to dst:dport, any source port: one direction of VXLAN between two VTEPs."""
    return {"sel_daddr": _addr(dst), "sel_saddr": _addr(src), "sel_dport": dport, "sel_dport_mask": 0xFFFF,
            "sel_sport": 0, "sel_sport_mask": 0, "sel_family": AF_INET, "sel_prefixlen_d": 32,
            "sel_prefixlen_s": 32, "sel_proto": IPPROTO_UDP, "sel_ifindex": 0, "sel_user": 0}


def _no_limits() -> dict:
    return {"lft_soft_byte_limit": XFRM_INF, "lft_hard_byte_limit": XFRM_INF,
            "lft_soft_packet_limit": XFRM_INF, "lft_hard_packet_limit": XFRM_INF}


# -- what callers pass and get back -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SA:
    """A transport-mode ESP SA carrying UDP to `dport` from VTEP src to VTEP dst. `key` is the 20-byte
    rfc4106(gcm(aes)) material (AES-128 key + salt) and never shows in repr()."""
    src: str
    dst: str
    spi: int
    key: bytes = dataclasses.field(repr=False)
    dport: int
    icv_bits: int = 128  # RFC 4106 allows an 8, 12 or 16-byte ICV; 16 is the full GCM tag (Docker uses 8 to save MTU)
    reqid: int = names.XFRM_REQID


@dataclasses.dataclass(frozen=True)
class SAState:
    """An SA as the kernel reports it, with its counters (key material withheld from repr)."""
    src: str
    dst: str
    spi: int
    reqid: int
    mode: int
    algorithm: str
    key: bytes = dataclasses.field(repr=False)
    icv_bits: int
    dport: int
    packets: int
    bytes: int
    integrity_failed: int
    replay: int

    @property
    def ours(self) -> bool:
        return self.reqid == names.XFRM_REQID


@dataclasses.dataclass(frozen=True)
class Policy:
    """A policy for UDP from src to dst:dport. direction "out": traffic must leave through the ESP SA with SPI
    `spi` (required, so without that SA nothing leaves); "in": traffic must have arrived through one of our SAs
    (spi 0: any of them)."""
    src: str
    dst: str
    dport: int
    direction: str
    spi: int = 0
    reqid: int = names.XFRM_REQID


@dataclasses.dataclass(frozen=True)
class PolicyState:
    src: str
    dst: str
    dport: int
    proto: int
    direction: str
    spi: int  # of the (first) template, 0 = any
    reqid: int  # of the (first) template; 0 if the policy has none
    optional: bool

    @property
    def ours(self) -> bool:
        return self.reqid == names.XFRM_REQID


# -- namespaces ---------------------------------------------------------------------------------------------------
def _new_socket() -> socket.socket:
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_XFRM)
    except OSError as exc:
        if exc.errno == errno.EPROTONOSUPPORT:
            raise KernelError("this kernel has no XFRM netlink interface (module xfrm_user is not loaded and "
                              "could not be loaded)") from None
        raise
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
        sock.bind((0, 0))
    except OSError:
        sock.close()
        raise
    return sock


def open_socket(netns: Optional[str] = None, private: bool = False) -> socket.socket:
    """A NETLINK_XFRM socket bound to a network namespace: the caller's (None), the one mounted at path `netns`,
    or (private=True) a fresh empty namespace that lives as long as the socket. Made by a thread of its own inside
    that namespace (kernel/netns.py); the caller's threads never move."""
    return run_inside(netns, _new_socket, fresh=private, name="xfrm-netns")


def _missing(exc: BaseException) -> bool:
    return isinstance(exc, NetlinkError) and exc.code in (errno.ENOENT, errno.ESRCH)


# -- the API ----------------------------------------------------------------------------------------------------
class Xfrm:
    """SAs and policies of one network namespace (None: the one the process runs in). Thread-safe."""

    def __init__(self, netns: Optional[str] = None, sock: Optional[socket.socket] = None):
        self.netns = netns
        self._where = f" in {netns}" if netns else ""
        with kernel_errors(f"open XFRM netlink{self._where}"):
            self._sock = sock or open_socket(netns)
        self._marshal = _XfrmMarshal()
        self._seq = itertools.count(1)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "Xfrm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- transport -------------------------------------------------------------------------------------------
    def _request(self, msg: nlmsg, msg_type: int, flags: int) -> List[nlmsg]:
        """Send one request and collect its replies (all parts of a dump); NetlinkError on a kernel error."""
        with self._lock:
            seq = next(self._seq)
            msg["header"]["type"] = msg_type
            msg["header"]["flags"] = flags
            msg["header"]["sequence_number"] = seq
            msg["header"]["pid"] = 0
            msg.encode()
            self._sock.send(msg.data)
            out = []
            while True:
                data = self._sock.recv(1 << 20)
                for reply in self._marshal.parse(data):
                    header = reply["header"]
                    if header["sequence_number"] != seq:
                        continue  # a late reply to an earlier request that raised
                    if header.get("error") is not None:
                        raise header["error"]
                    if header["type"] in (NLMSG_DONE, NLMSG_ERROR):  # end of dump, or the ack
                        return out
                    out.append(reply)
                    if not header["flags"] & NLM_F_MULTI and not flags & NLM_F_ACK:
                        return out

    # -- SAs -------------------------------------------------------------------------------------------------
    def _sa_message(self, sa: SA) -> xfrm_usersa_info:
        msg = xfrm_usersa_info()
        msg.update(_flow_selector(sa.src, sa.dst, sa.dport))
        msg.update(_no_limits())
        msg.update({"id_daddr": _addr(sa.dst), "id_spi": sa.spi, "id_proto": IPPROTO_ESP, "saddr": _addr(sa.src),
                    "reqid": sa.reqid, "family": AF_INET, "mode": XFRM_MODE_TRANSPORT,
                    "replay_window": REPLAY_WINDOW, "flags": 0})
        msg["attrs"] = [["XFRMA_ALG_AEAD", {"alg_name": names.AEAD_ALGORITHM.encode(), "alg_key_len": len(sa.key) * 8,
                                            "alg_icv_len": sa.icv_bits, "alg_key": sa.key}]]
        return msg

    def add_sa(self, sa: SA) -> None:
        """Create the SA; KernelError (EEXIST among others) if it cannot."""
        with kernel_errors(f"add ESP SA spi 0x{sa.spi:08x} {sa.src} -> {sa.dst}{self._where}"):
            self._request(self._sa_message(sa), XFRM_MSG_NEWSA,
                          NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL)

    def ensure_sa(self, sa: SA) -> None:
        """Idempotent: the SA exists afterwards with exactly these parameters."""
        what = f"add ESP SA spi 0x{sa.spi:08x} {sa.src} -> {sa.dst}{self._where}"
        with kernel_errors(what):
            try:
                self._request(self._sa_message(sa), XFRM_MSG_NEWSA,
                              NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL)
                return
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise
        have = self.get_sa(sa.dst, sa.spi)
        if have is not None and _same_sa(have, sa):
            return
        if have is not None and not have.ours:
            raise KernelError(f"{what}: SPI 0x{sa.spi:08x} to {sa.dst} is taken by an SA vxnet did not make "
                              f"(reqid {have.reqid})")
        self.delete_sa(sa.dst, sa.spi)  # ours, with other parameters (a key ring recreated with reused tags)
        self.add_sa(sa)

    def get_sa(self, dst: str, spi: int) -> Optional[SAState]:
        msg = xfrm_usersa_id()
        msg.update({"daddr": _addr(dst), "spi": spi, "family": AF_INET, "proto": IPPROTO_ESP})
        with kernel_errors(f"read ESP SA spi 0x{spi:08x} to {dst}{self._where}"):
            try:
                replies = self._request(msg, XFRM_MSG_GETSA, NLM_F_REQUEST)
            except NetlinkError as exc:
                if _missing(exc):
                    return None
                raise
        states = [_sa_state(r) for r in replies if r["header"]["type"] == XFRM_MSG_NEWSA]
        return states[0] if states else None

    def delete_sa(self, dst: str, spi: int) -> bool:
        """Idempotent; True if an SA was deleted."""
        msg = xfrm_usersa_id()
        msg.update({"daddr": _addr(dst), "spi": spi, "family": AF_INET, "proto": IPPROTO_ESP})
        return self._delete(msg, XFRM_MSG_DELSA, f"delete ESP SA spi 0x{spi:08x} to {dst}{self._where}")

    def sas(self, ours_only: bool = True) -> List[SAState]:
        """Every IPv4 ESP SA (ours only unless asked), with counters."""
        with kernel_errors(f"list SAs{self._where}"):
            replies = self._request(_dump_request(), XFRM_MSG_GETSA, NLM_F_REQUEST | NLM_F_DUMP)
        states = [_sa_state(r) for r in replies
                  if r["header"]["type"] == XFRM_MSG_NEWSA and r["family"] == AF_INET and r["id_proto"] == IPPROTO_ESP]
        return [s for s in states if s.ours or not ours_only]

    # -- policies --------------------------------------------------------------------------------------------
    def ensure_policy(self, policy: Policy) -> None:
        """Create or replace (XFRM_MSG_UPDPOLICY) the policy for this selector and direction, in one step."""
        direction = _DIRECTIONS[policy.direction]
        msg = xfrm_userpolicy_info()
        msg.update(_flow_selector(policy.src, policy.dst, policy.dport))
        msg.update(_no_limits())
        msg.update({"priority": 0, "index": 0, "dir": direction, "action": XFRM_POLICY_ALLOW, "flags": 0,
                    "share": 0})
        # aalgos/ealgos/calgos all ~0: any algorithm (the kernel then sets allalgs); optional 0: level required.
        msg["attrs"] = [["XFRMA_TMPL", {
            "id_daddr": _addr(policy.dst), "id_spi": policy.spi, "id_proto": IPPROTO_ESP, "family": AF_INET,
            "saddr": _addr(policy.src), "reqid": policy.reqid, "mode": XFRM_MODE_TRANSPORT, "share": 0,
            "optional": 0, "aalgos": 0xFFFFFFFF, "ealgos": 0xFFFFFFFF, "calgos": 0xFFFFFFFF}]]
        what = f"set {policy.direction} policy {policy.src} -> {policy.dst} udp/{policy.dport}{self._where}"
        with kernel_errors(what):
            self._request(msg, XFRM_MSG_UPDPOLICY, NLM_F_REQUEST | NLM_F_ACK)

    def delete_policy(self, src: str, dst: str, dport: int, direction: str) -> bool:
        """Idempotent; True if a policy was deleted."""
        msg = xfrm_userpolicy_id()
        msg.update(_flow_selector(src, dst, dport))
        msg.update({"index": 0, "dir": _DIRECTIONS[direction]})
        return self._delete(msg, XFRM_MSG_DELPOLICY, f"delete {direction} policy {src} -> {dst} udp/{dport}"
                                                     f"{self._where}")

    def _delete(self, msg, msg_type: int, what: str) -> bool:
        """One delete request; True if the kernel deleted something, False if there was nothing to delete."""
        with kernel_errors(what):
            try:
                self._request(msg, msg_type, NLM_F_REQUEST | NLM_F_ACK)
                return True
            except NetlinkError as exc:
                if _missing(exc):
                    return False
                raise

    def policies(self, ours_only: bool = True) -> List[PolicyState]:
        with kernel_errors(f"list policies{self._where}"):
            replies = self._request(_dump_request(), XFRM_MSG_GETPOLICY, NLM_F_REQUEST | NLM_F_DUMP)
        out = []
        for reply in replies:
            if reply["header"]["type"] != XFRM_MSG_NEWPOLICY or reply["sel_family"] != AF_INET:
                continue
            if reply["dir"] not in (XFRM_POLICY_IN, XFRM_POLICY_OUT):
                continue
            tmpl = reply.get_attr("XFRMA_TMPL") or {}
            out.append(PolicyState(
                src=_ip(reply["sel_saddr"]), dst=_ip(reply["sel_daddr"]), dport=reply["sel_dport"],
                proto=reply["sel_proto"], direction="in" if reply["dir"] == XFRM_POLICY_IN else "out",
                spi=tmpl.get("id_spi", 0), reqid=tmpl.get("reqid", 0), optional=bool(tmpl.get("optional", 0))))
        return [p for p in out if p.ours or not ours_only]

    # -- cleanup ---------------------------------------------------------------------------------------------
    def remove_ours(self) -> int:
        """Delete every policy and SA vxnet made here (policies first: no moment where a policy points at a
        missing SA matters, it blackholes). Returns how many objects went."""
        count = 0
        for p in self.policies():
            count += self.delete_policy(p.src, p.dst, p.dport, p.direction)
        for s in self.sas():
            count += self.delete_sa(s.dst, s.spi)
        return count


def _sa_state(msg) -> SAState:
    aead = msg.get_attr("XFRMA_ALG_AEAD") or {}
    name = aead.get("alg_name", b"")
    if isinstance(name, bytes):
        name = name.split(b"\0", 1)[0].decode(errors="replace")
    return SAState(
        src=_ip(msg["saddr"]), dst=_ip(msg["id_daddr"]), spi=msg["id_spi"], reqid=msg["reqid"], mode=msg["mode"],
        algorithm=name, key=aead.get("alg_key", b""), icv_bits=aead.get("alg_icv_len", 0),
        dport=msg["sel_dport"], packets=msg["cur_packets"], bytes=msg["cur_bytes"],
        integrity_failed=msg["stats_integrity_failed"], replay=msg["stats_replay"])


def _same_sa(have: SAState, want: SA) -> bool:
    return (have.src, have.reqid, have.mode, have.algorithm, have.key, have.icv_bits, have.dport) == \
        (want.src, want.reqid, XFRM_MODE_TRANSPORT, names.AEAD_ALGORITHM, want.key, want.icv_bits, want.dport)
