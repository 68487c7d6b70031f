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
(namespace, kind) in it the callback is called once. Kinds: "link", "fdb", "neighbour", "nft", "sa", "policy",
and "overrun": the socket's receive buffer overflowed (recv fails with ENOBUFS, netlink(7)), notifications were
lost, and the only safe reading is "anything may have changed here".

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
from typing import Callable, Dict, List, Optional, Set, Tuple

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
# linux/netfilter/nfnetlink.h: NFNLGRP_NFTABLES; nf_tables messages are (NFNL_SUBSYS_NFTABLES << 8) | msg
NFNLGRP_NFTABLES = 7
NFNL_SUBSYS_NFTABLES = 10
# linux/xfrm.h
XFRMNLGRP_SA = 3
XFRMNLGRP_POLICY = 4
_XFRM_SA_TYPES = {16, 17, 26, 28, 24}  # NEWSA, DELSA, UPDSA, FLUSHSA, EXPIRE
_XFRM_POLICY_TYPES = {19, 20, 25, 29, 21}  # NEWPOLICY, DELPOLICY, UPDPOLICY, FLUSHPOLICY, POLEXPIRE

# A burst (a namespace torn down, a full FDB rewrite) can exceed the default ~200 KiB buffer; an overrun is
# handled (a full pass), so this only makes it rarer.
RCVBUF = 1 << 20

Callback = Callable[[Optional[str], str], None]  # (namespace name or None for the host, kind)


def _kinds_route(data: bytes) -> Set[str]:
    out = set()
    for msg_type, payload in _messages(data):
        if msg_type in (RTM_NEWLINK, RTM_DELLINK):
            out.add("link")
        elif msg_type in (RTM_NEWNEIGH, RTM_DELNEIGH) and payload:
            out.add("fdb" if payload[0] == AF_BRIDGE else "neighbour")  # ndmsg.ndm_family
    return out


def _kinds_nft(data: bytes) -> Set[str]:
    return {"nft" for msg_type, _ in _messages(data) if msg_type >> 8 == NFNL_SUBSYS_NFTABLES}


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


# (protocol, groups, parser) per namespace kind
NETWORK_SOCKETS = ((NETLINK_ROUTE, (RTNLGRP_LINK, RTNLGRP_NEIGH), _kinds_route),
                   (NETLINK_NETFILTER, (NFNLGRP_NFTABLES,), _kinds_nft))
HOST_SOCKETS = ((NETLINK_NETFILTER, (NFNLGRP_NFTABLES,), _kinds_nft),
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
    """One thread, select() over the sockets of every watched namespace; callback(namespace, kind) per batch.

    netns_path(name) -> the path the namespace is mounted at (Links.netns_path). `watch(name)` (re)opens a
    namespace's sockets (again after the namespace was made anew under the same name), `unwatch(name)` closes them
    (call it before the namespace is removed: an open socket keeps a namespace alive). `host=True` listens in the
    host namespace too. The callback runs on the listener's thread: it must be quick (queue and return)."""

    def __init__(self, netns_path: Callable[[str], str], callback: Callback, host: bool = True):
        self._path = netns_path
        self._callback = callback
        self._host = host
        self._lock = threading.Lock()
        self._sockets: Dict[Optional[str], List[Tuple[socket.socket, Callable[[bytes], Set[str]]]]] = {}
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
            try:
                ready, _, _ = select.select([self._wake_r, *owners], [], [])
            except (OSError, ValueError):  # a socket closed by unwatch() meanwhile: take the new set
                continue
            batch: Set[Tuple[Optional[str], str]] = set()
            for fd in ready:
                if fd == self._wake_r:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                    continue
                ns, sock, parse = owners[fd]
                try:
                    batch |= {(ns, kind) for kind in self._drain(sock, parse)}
                except OSError as exc:  # not an overrun: say so, and treat it as one (something may be lost)
                    log.error("reading kernel events of %s failed: %s", ns or "host", exc)
                    batch.add((ns, "overrun"))
            for ns, kind in sorted(batch, key=lambda item: (item[0] or "", item[1])):
                try:
                    self._callback(ns, kind)
                except Exception:  # the listener must outlive a failing callback
                    log.exception("kernel event callback failed ns=%s kind=%s", ns or "host", kind)

    @staticmethod
    def _drain(sock: socket.socket, parse) -> Set[str]:
        """Everything queued on the socket now, as kinds."""
        kinds: Set[str] = set()
        while True:
            try:
                data = sock.recv(1 << 16)
            except BlockingIOError:
                return kinds
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    kinds.add("overrun")
                    continue  # the socket works again after reporting the overrun once
                if exc.errno == errno.EBADF:  # closed by unwatch() meanwhile
                    return kinds
                raise
            if not data:
                return kinds
            kinds |= parse(data)
