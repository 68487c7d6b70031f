"""Netlink listeners that say, without polling, that kernel state vxnet owns may have changed.

The kernel multicasts a notification to every socket subscribed to a group whenever an object of that group is
added, changed or deleted, whoever did it (`ip`, `bridge`, `nft`, another daemon, vxnet itself):
  - rtnetlink (NETLINK_ROUTE) RTNLGRP_LINK: RTM_NEWLINK/DELLINK; RTNLGRP_NEIGH: RTM_NEWNEIGH/DELNEIGH, where the
    FDB entries of a VXLAN device arrive with family AF_BRIDGE and the neighbour (ARP) entries with AF_INET;
  - NETLINK_NETFILTER NFNLGRP_NFTABLES: every nf_tables object change of a committed transaction (tables,
    chains, rules, sets, elements) and one NFT_MSG_NEWGEN per commit;
  - NETLINK_XFRM XFRMNLGRP_SA / XFRMNLGRP_POLICY: SAs and policies added, updated, deleted or flushed.
A netlink socket belongs to the network namespace it was created in for its whole life (kernel/netns.py), so one
set of sockets is opened per namespace, by a thread that goes in, creates them and comes home.

One thread waits in select() on all the sockets and a wake-up pipe (sockets are added and removed from other
threads as namespaces come and go). What it reads from all the ready sockets at once is one batch; for each
(namespace, kind) in it the callback is called once, callback(namespace, kind, objects). Kinds: "link", "fdb",
"neighbour", "nft", "sa", "policy", and "overrun": the socket's receive buffer overflowed (recv fails with
ENOBUFS, netlink(7)), notifications were lost, and the only safe reading is "anything may have changed here".

What a notification names travels with it, so that a reader can look at that object alone instead of the whole
namespace (one Join's veth, bridge port and static entries would otherwise make a reader compare every link and
entry of a network of 4,000 endpoints):
  link       LinkChange(ifindex, ifname, deleted): struct ifinfomsg's ifi_index, IFLA_IFNAME, RTM_DELLINK;
  fdb        NeighChange(ifindex, mac, ip, master, deleted): struct ndmsg's ndm_ifindex (the port of a bridge
  neighbour  entry, the device of a VXLAN or neighbour entry), NDA_LLADDR, NDA_DST (a VXLAN entry's remote
             VTEP; a neighbour's address), master: a bridge's entry (NDA_MASTER, or NTF_MASTER), RTM_DELNEIGH.
objects is a frozenset of those, or None for "the whole kind": always for nft, sa and policy, and for link, fdb
and neighbour once a batch holds more than MAX_OBJECTS of one kind in one namespace (a namespace torn down or
rebuilt: looking at everything is then the cheaper reading) or a message that cannot be read whole.

nf_tables commits of this process are not reported. Every batch vxnet writes (anti-spoofing, isolation, policy,
fail-closed) is made on its netlink thread (kernel/links.py), which carries a name of its own
(names.nft_committer), and is the desired state already: reporting it made the reconciler compare the whole table
again after each change (for a policy table of 7,840 elements: a listing and a full compile, 0.4-0.8 s, holding
the policy engine and the netlink thread), so that a burst of rule changes queued behind passes its own writes
had triggered. The kernel ends each commit's notifications with one NFT_MSG_NEWGEN that names the committing
task (NFTA_GEN_PROC_NAME, its comm; `nft monitor` prints it as "by process PID (NAME)"), after the object
messages of that commit (nf_tables_commit sends them, then the generation, under the commit mutex, so commits
never interleave). So a commit is reported once its NEWGEN names someone else; object messages whose NEWGEN has
not come within PENDING_SECONDS are reported too (a lost NEWGEN cannot hide a change).

What is listened to where: a network namespace gets link, neighbour and nf_tables (its bridge, VXLAN device, FDB,
neighbours, anti-spoofing table); the host namespace gets nf_tables and XFRM (the isolation table, the ESP
fail-closed table, SAs and policies). The host's links and neighbours are not vxnet's (the container ends of the
veth pairs are dockerd's once moved, the underlay is the operator's), and its ARP traffic would wake the
listener for nothing.
"""

import errno
import logging
import os
import select
import socket
import struct
import threading
import time
from typing import Callable, Dict, FrozenSet, List, NamedTuple, Optional, Set, Tuple, Union

from kernel.netns import run_inside

log = logging.getLogger(__name__)

# linux/netlink.h
NETLINK_ROUTE = 0
NETLINK_XFRM = 6
NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NLMSG_HDR = struct.Struct("=LHHLL")  # nlmsg_len, nlmsg_type, nlmsg_flags, nlmsg_seq, nlmsg_pid
NLMSG_ALIGNTO = 4
# linux/rtnetlink.h
RTNLGRP_LINK = 1
RTNLGRP_NEIGH = 3
RTM_NEWLINK, RTM_DELLINK = 16, 17
RTM_NEWNEIGH, RTM_DELNEIGH = 28, 29
AF_BRIDGE = 7
# struct ifinfomsg (family, pad, type, index, flags, change) and struct ndmsg (family, pad1, pad2, ifindex, state,
# flags, type), each followed by its attributes; linux/if_link.h IFLA_IFNAME, linux/neighbour.h NDA_*, NTF_MASTER
IFINFOMSG = struct.Struct("=BxHiII")
NDMSG = struct.Struct("=BxxxiHBB")
IFLA_IFNAME = 3
NDA_DST, NDA_LLADDR, NDA_MASTER = 1, 2, 9
NTF_MASTER = 0x04
# Past this many objects of one kind in one namespace in one batch, the batch says "the whole kind" instead:
# checking 256 objects one by one costs about what one full comparison of a network does.
MAX_OBJECTS = 256
# linux/netfilter/nfnetlink.h: NFNLGRP_NFTABLES; nf_tables messages are (NFNL_SUBSYS_NFTABLES << 8) | msg
NFNLGRP_NFTABLES = 7
NFNL_SUBSYS_NFTABLES = 10
# linux/netfilter/nf_tables.h: enum nf_tables_msg_types, enum nft_gen_attributes
NFT_MSG_NEWGEN = 15
NFTA_GEN_PROC_NAME = 3
NFGENMSG_SIZE = 4  # struct nfgenmsg: family, version, res_id
NLA_HDR = struct.Struct("=HH")  # nla_len, nla_type
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED and NLA_F_NET_BYTEORDER
# The kernel sends a commit's NEWGEN right after its object messages, in the same system call: a commit read in
# two parts is whole a few microseconds later. Past this, objects without their NEWGEN are reported anyway.
PENDING_SECONDS = 0.5
# linux/xfrm.h
XFRMNLGRP_SA = 3
XFRMNLGRP_POLICY = 4
_XFRM_SA_TYPES = {16, 17, 26, 28, 24}  # NEWSA, DELSA, UPDSA, FLUSHSA, EXPIRE
_XFRM_POLICY_TYPES = {19, 20, 25, 29, 21}  # NEWPOLICY, DELPOLICY, UPDPOLICY, FLUSHPOLICY, POLEXPIRE

# A burst (a namespace torn down, a full FDB rewrite) can exceed the default ~200 KiB buffer; an overrun is
# handled (a full pass), so this only makes it rarer.
RCVBUF = 1 << 20



class LinkChange(NamedTuple):
    """An RTM_NEWLINK or RTM_DELLINK: the link's index in its namespace, its name (None if the message had
    none), and whether it is gone."""
    ifindex: int
    ifname: Optional[str]
    deleted: bool


class NeighChange(NamedTuple):
    """An RTM_NEWNEIGH or RTM_DELNEIGH: the device (ndm_ifindex), the MAC (NDA_LLADDR, lowercase, colons), the IP
    (NDA_DST: a neighbour's address, a VXLAN entry's VTEP), whether it is a bridge's entry (master) rather than
    the device's own table, and whether it is gone."""
    ifindex: int
    mac: Optional[str]
    ip: Optional[str]
    master: bool
    deleted: bool


Objects = Optional[FrozenSet[Union[LinkChange, NeighChange]]]  # None: the whole kind
Callback = Callable[[Optional[str], str, Objects], None]  # (namespace name or None for the host, kind, objects)
Found = Dict[str, Optional[Set]]  # kind -> the objects named, None: the whole kind


def _attributes(payload: bytes, offset: int) -> Dict[int, bytes]:
    """type -> value of the netlink attributes from offset on (the last of a repeated type wins)."""
    out = {}
    while offset + NLA_HDR.size <= len(payload):
        length, kind = NLA_HDR.unpack_from(payload, offset)
        if length < NLA_HDR.size:
            break
        out[kind & NLA_TYPE_MASK] = payload[offset + NLA_HDR.size:offset + length]
        offset += (length + NLMSG_ALIGNTO - 1) & ~(NLMSG_ALIGNTO - 1)
    return out


def _address(raw: Optional[bytes]) -> Optional[str]:
    if raw is None:
        return None
    if len(raw) in (4, 16):
        return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)
    return None


def _mac(raw: Optional[bytes]) -> Optional[str]:
    return ":".join(f"{b:02x}" for b in raw) if raw is not None and len(raw) == 6 else None


def link_change(msg_type: int, payload: bytes) -> Optional[LinkChange]:
    """What an RTM_NEWLINK/RTM_DELLINK payload names; None if it is too short to say."""
    if len(payload) < IFINFOMSG.size:
        return None
    _, _, index, _, _ = IFINFOMSG.unpack_from(payload)
    name = _attributes(payload, IFINFOMSG.size).get(IFLA_IFNAME)
    return LinkChange(index, name.split(b"\0", 1)[0].decode(errors="replace") if name is not None else None,
                      msg_type == RTM_DELLINK)


def neigh_change(msg_type: int, payload: bytes) -> Optional[Tuple[str, NeighChange]]:
    """(kind, change) of an RTM_NEWNEIGH/RTM_DELNEIGH payload: "fdb" for family AF_BRIDGE, else "neighbour";
    None if it is too short to say."""
    if len(payload) < NDMSG.size:
        return None
    family, ifindex, _, flags, _ = NDMSG.unpack_from(payload)
    attrs = _attributes(payload, NDMSG.size)
    change = NeighChange(ifindex, _mac(attrs.get(NDA_LLADDR)), _address(attrs.get(NDA_DST)),
                         NDA_MASTER in attrs or bool(flags & NTF_MASTER), msg_type == RTM_DELNEIGH)
    return ("fdb" if family == AF_BRIDGE else "neighbour"), change


def _add(found: Found, kind: str, obj) -> None:
    """Add one object (None: the whole kind) to what a batch found, degrading past MAX_OBJECTS."""
    if kind in found and found[kind] is None:
        return
    if obj is None:
        found[kind] = None
        return
    objects = found.setdefault(kind, set())
    objects.add(obj)
    if len(objects) > MAX_OBJECTS:
        found[kind] = None


def merge(into: Found, found: Found) -> None:
    """Add what one read found to a batch's (the bound applies to the sum)."""
    for kind, objects in found.items():
        if objects is None:
            _add(into, kind, None)
        else:
            for obj in objects:
                _add(into, kind, obj)
                if into[kind] is None:
                    break


def _kinds_route(data: bytes) -> Found:
    out: Found = {}
    for msg_type, payload in _messages(data):
        if msg_type in (RTM_NEWLINK, RTM_DELLINK):
            _add(out, "link", link_change(msg_type, payload))
        elif msg_type in (RTM_NEWNEIGH, RTM_DELNEIGH) and payload:
            named = neigh_change(msg_type, payload)
            if named is None:
                _add(out, "fdb" if payload[0] == AF_BRIDGE else "neighbour", None)  # ndmsg.ndm_family
            else:
                _add(out, *named)
    return out


def committer(payload: bytes) -> Optional[str]:
    """The committing task's name in an NFT_MSG_NEWGEN payload (nfgenmsg, then attributes), None if absent."""
    offset = NFGENMSG_SIZE
    while offset + NLA_HDR.size <= len(payload):
        length, kind = NLA_HDR.unpack_from(payload, offset)
        if length < NLA_HDR.size:
            break
        if kind & NLA_TYPE_MASK == NFTA_GEN_PROC_NAME:
            return payload[offset + NLA_HDR.size:offset + length].split(b"\0", 1)[0].decode(errors="replace")
        offset += (length + NLMSG_ALIGNTO - 1) & ~(NLMSG_ALIGNTO - 1)
    return None


class NftCommits:
    """The nf_tables notifications of one socket, commit by commit: feed(data) -> {"nft"} for a commit made by
    anyone but `ours` (a committer name; None: report every commit). Object messages wait for their commit's
    NEWGEN, across reads; overdue(now) -> {"nft"} once they have waited PENDING_SECONDS without one."""

    def __init__(self, ours: Optional[str], clock: Callable[[], float]):
        self.ours = ours
        self._clock = clock
        self.pending_since: Optional[float] = None  # when the first object message of an unfinished commit came

    def __call__(self, data: bytes) -> Set[str]:
        return self.feed(data)

    def feed(self, data: bytes) -> Set[str]:
        out: Set[str] = set()
        for msg_type, payload in _messages(data):
            if msg_type >> 8 != NFNL_SUBSYS_NFTABLES:
                continue
            if msg_type & 0xFF == NFT_MSG_NEWGEN:
                if self.ours is None or committer(payload) != self.ours:
                    out.add("nft")
                self.pending_since = None
            elif self.pending_since is None:
                self.pending_since = self._clock()
        return out

    def due(self) -> Optional[float]:
        """When the pending objects become overdue (None: nothing pending)."""
        return None if self.pending_since is None else self.pending_since + PENDING_SECONDS

    def overdue(self, now: float) -> Set[str]:
        due = self.due()
        if due is None or now < due:
            return set()
        self.pending_since = None
        return {"nft"}


def _kinds_xfrm(data: bytes) -> Set[str]:
    out = set()
    for msg_type, _ in _messages(data):
        if msg_type in _XFRM_SA_TYPES:
            out.add("sa")
        elif msg_type in _XFRM_POLICY_TYPES:
            out.add("policy")
    return out


def _messages(data: bytes) -> List[Tuple[int, bytes]]:
    """(nlmsg_type, payload) of each message of one datagram (a datagram may carry several, netlink(7))."""
    out = []
    offset = 0
    while offset + NLMSG_HDR.size <= len(data):
        length, msg_type, _, _, _ = NLMSG_HDR.unpack_from(data, offset)
        if length < NLMSG_HDR.size:
            break
        out.append((msg_type, data[offset + NLMSG_HDR.size:offset + length]))
        offset += (length + NLMSG_ALIGNTO - 1) & ~(NLMSG_ALIGNTO - 1)
    return out


# (protocol, groups, parser) per namespace kind; NFT stands for a fresh NftCommits per socket (it keeps state)
NFT = "nft"
NETWORK_SOCKETS = ((NETLINK_ROUTE, (RTNLGRP_LINK, RTNLGRP_NEIGH), _kinds_route),
                   (NETLINK_NETFILTER, (NFNLGRP_NFTABLES,), NFT))
HOST_SOCKETS = ((NETLINK_NETFILTER, (NFNLGRP_NFTABLES,), NFT),
                (NETLINK_XFRM, (XFRMNLGRP_SA, XFRMNLGRP_POLICY), _kinds_xfrm))


def _open(protocol: int, groups) -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, protocol)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        sock.bind((0, 0))
        for group in groups:
            sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
    except BaseException:
        sock.close()
        raise
    return sock


class KernelEvents:
    """One thread, select() over the sockets of every watched namespace; callback(namespace, kind, objects) per
    batch (objects: the module docstring).

    netns_path(name) -> the path the namespace is mounted at (Links.netns_path). `watch(name)` (re)opens a
    namespace's sockets (again after the namespace was made anew under the same name), `unwatch(name)` closes them
    (call it before the namespace is removed: an open socket keeps a namespace alive). `host=True` listens in the
    host namespace too. The callback runs on the listener's thread: it must be quick (queue and return).
    own_committer: the name of the thread that makes this process's nftables commits (Links.nft_committer), whose
    commits are not reported; None reports every commit."""

    def __init__(self, netns_path: Callable[[str], str], callback: Callback, host: bool = True,
                 own_committer: Optional[str] = None, clock: Callable[[], float] = time.monotonic):
        self._path = netns_path
        self._callback = callback
        self._host = host
        self._own_committer = own_committer
        self._clock = clock
        self._lock = threading.Lock()
        self._sockets: Dict[Optional[str], List[Tuple[socket.socket, Callable[[bytes], object]]]] = {}
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # -- namespaces ------------------------------------------------------------------------------------------
    def _open_set(self, ns: Optional[str]):
        """The sockets of one namespace. In the host, a family the kernel lacks (NETLINK_XFRM without xfrm_user:
        no encrypted network can exist there either) is logged and left out; in a network namespace every
        socket is needed, and the first failure raises."""
        specs = HOST_SOCKETS if ns is None else NETWORK_SOCKETS
        opened = []

        def make():
            for protocol, groups, parse in specs:
                if parse == NFT:
                    parse = NftCommits(self._own_committer, self._clock)
                try:
                    opened.append((_open(protocol, groups), parse))
                except OSError as exc:
                    if ns is not None:
                        raise
                    log.warning("no kernel events of netlink family %d in the host namespace: %s", protocol, exc)

        try:
            run_inside(None if ns is None else self._path(ns), make, name="netlink-events")
        except BaseException:
            for sock, _ in opened:
                sock.close()
            raise
        return opened

    def watch(self, ns: str) -> None:
        """Listen in namespace ns from now on (its old sockets, if any, are closed: they may belong to a namespace
        that was removed and made again under this name). OSError if the namespace cannot be entered."""
        fresh = self._open_set(ns)
        with self._lock:
            old = self._sockets.pop(ns, [])
            self._sockets[ns] = fresh
        self._close(old)
        self._wake()

    def unwatch(self, ns: str) -> None:
        with self._lock:
            old = self._sockets.pop(ns, [])
        self._close(old)
        self._wake()

    def watched(self) -> List[Optional[str]]:
        with self._lock:
            return list(self._sockets)

    @staticmethod
    def _close(entries) -> None:
        for sock, _ in entries:
            sock.close()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:  # the pipe is full: the thread is woken already
            pass

    # -- thread ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._host:
            opened = self._open_set(None)
            with self._lock:
                self._sockets[None] = opened
        self._thread = threading.Thread(target=self._run, name="kernel-events", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(5)
        with self._lock:
            entries = [e for group in self._sockets.values() for e in group]
            self._sockets = {}
        self._close(entries)
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                owners = {sock.fileno(): (ns, sock, parse) for ns, group in self._sockets.items()
                          for sock, parse in group}
            dues = [due for _, _, parse in owners.values() if isinstance(parse, NftCommits)
                    for due in (parse.due(),) if due is not None]
            timeout = max(0.0, min(dues) - self._clock()) if dues else None
            try:
                ready, _, _ = select.select([self._wake_r, *owners], [], [], timeout)
            except (OSError, ValueError):  # a socket closed by unwatch() meanwhile: take the new set
                continue
            batch: Dict[Optional[str], Found] = {}
            for fd in ready:
                if fd == self._wake_r:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                    continue
                ns, sock, parse = owners[fd]
                found = batch.setdefault(ns, {})
                try:
                    self._drain(sock, parse, found)
                except OSError as exc:  # not an overrun: say so, and treat it as one (something may be lost)
                    log.error("reading kernel events of %s failed: %s", ns or "host", exc)
                    found["overrun"] = None
            now = self._clock()  # after the reads: a NEWGEN just read has resolved its commit
            for ns, _, parse in owners.values():
                if isinstance(parse, NftCommits):
                    for kind in parse.overdue(now):
                        batch.setdefault(ns, {})[kind] = None
            for ns in sorted(batch, key=lambda n: n or ""):
                for kind, objects in sorted(batch[ns].items()):
                    try:
                        self._callback(ns, kind, None if objects is None else frozenset(objects))
                    except Exception:  # the listener must outlive a failing callback
                        log.exception("kernel event callback failed ns=%s kind=%s", ns or "host", kind)

    @staticmethod
    def _drain(sock: socket.socket, parse, found: Found) -> None:
        """Everything queued on the socket now, added to found (kind -> objects, None: the whole kind)."""
        while True:
            try:
                data = sock.recv(1 << 16)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    found["overrun"] = None
                    continue  # the socket works again after reporting the overrun once
                if exc.errno == errno.EBADF:  # closed by unwatch() meanwhile
                    return
                raise
            if not data:
                return
            result = parse(data)
            # NftCommits and the XFRM parser say kinds only: each is the whole kind
            merge(found, result if isinstance(result, dict) else dict.fromkeys(result))
