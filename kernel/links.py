"""The only module that speaks netlink (pyroute2, and libnftables for nftables batches): namespaces, links,
addresses, neighbour and FDB entries, and the per-namespace handles that nftables rules go through.

Every call names its namespace: `ns=None` is the namespace the plugin runs in (the host's), anything else is
a named namespace under `netns_dir` (/run/netns by default, where `ip netns` finds them; the managed plugin keeps
them under its propagated mount so they outlive a plugin restart). Errno values become KernelError with the
object named, by kernel.errors.kernel_errors only.

All netlink work runs on one thread of its own. pyroute2 0.9 opens a socket per calling thread, and for a
named namespace it forks a helper process to do so; forking a process whose other threads hold locks (waitress
workers, the watcher, logging) can deadlock the child, and did here. On its own thread Links opens one socket
per namespace, by entering the namespace, creating the socket there and coming home (kernel/netns.py, which says
why only this thread moves): no fork at all. Namespaces are created the same way (a fresh one on that thread).
nftables batches run on the same thread, inside their namespace, through a libnftables context kept per
namespace like the sockets (kernel/libnftables.py says why that is 10-20 times cheaper than running `nft`).
Because every call runs on that one thread, the calls are serialised without a lock.
"""

import concurrent.futures
import errno
import functools
import ipaddress
import logging
import os
import secrets
import socket
import tempfile
import threading
from typing import ContextManager, Dict, Iterable, List, Optional, Set, Tuple

from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns
from pyroute2.netlink.exceptions import NetlinkError

from kernel import libnftables, names, netnsdir
from kernel.errors import kernel_errors
from kernel.netns import inside
from kernel.syscalls import MS_BIND, MS_NODEV, MS_NOEXEC, MS_NOSUID, libc_call, set_thread_name
from wire.errors import KernelError

log = logging.getLogger(__name__)



def _family(ip: str) -> int:
    """AF_INET or AF_INET6 for an address; KernelError for anything else, which never reaches the kernel."""
    try:
        return socket.AF_INET6 if ipaddress.ip_address(ip).version == 6 else socket.AF_INET
    except ValueError:
        raise KernelError(f"neighbour {ip!r}: not an IPv4 or IPv6 address") from None


def _netlink_thread(method):
    """Run the method on Links' own thread (directly when already there)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if threading.get_ident() == self._worker_ident:
            return method(self, *args, **kwargs)
        return self._executor.submit(method, self, *args, **kwargs).result()
    return wrapper


# The devices of our namespaces (bridge, VXLAN device, bridge ends of the veths) only forward frames; none of them
# is an IPv6 host. With the kernel's defaults each would take a link-local address when it comes up (addr_gen_mode
# eui64), and with it run DAD, join the solicited-node groups, send MLD reports into the overlay and answer ping6
# from the containers; and the bridge, which also delivers a copy of every multicast frame to itself (past the
# anti-spoofing table's forward hook), would take a default route and SLAAC addresses from any router
# advertisement a container sends (accept_ra 1 on a host that does not forward: shown by tests/kernel/
# test_isolation.py). The namespace would be a node of every dual-stack network, as it is of none in IPv4 (no
# address). So, as the namespace's defaults, set before any device exists or moves in (a device registered in a
# namespace, made there or moved there, takes the namespace's defaults):
#   addr_gen_mode 1 (IN6_ADDR_GEN_MODE_NONE): no address is made; IPv6 itself stays enabled, because the VXLAN
#     device's NDP table must take our permanent entries and the kernel refuses neighbour entries on a device with
#     disable_ipv6 (ndisc_allow_add);
#   accept_ra 0: router advertisements are ignored (no route, no SLAAC address).
_NOT_AN_IPV6_HOST = {"addr_gen_mode": "1", "accept_ra": "0"}


# br_netfilter's per-namespace switches (net/bridge/br_netfilter_hooks.c, struct brnf_net): 1 sends the bridged
# IPv4 (iptables) and IPv6 (ip6tables) frames of the namespace through the inet hooks, conntrack included, which
# costs ~3.5 us per round trip between two ports of a bridge here. A new namespace starts with both at 1
# (brnf_init_net); ensure_netns turns them off when it makes one. Nothing vxnet makes uses them: the policy table
# is in the bridge family (netdriver/policy_nft.py).
_BRIDGE_NETFILTER = ("bridge-nf-call-iptables", "bridge-nf-call-ip6tables")

_private_proc: Optional[str] = None
_private_proc_lock = threading.Lock()


def _proc_sys() -> str:
    """Where sysctls can be written: /proc/sys, or, where that is mounted read-only, the sys/ of a procfs instance
    of our own. A managed plugin's /proc/sys is a read-only bind (runc applies the OCI runtime spec's
    readonlyPaths, /proc/sys among them, and a plugin's config.json cannot lift it), so every write there fails
    with EROFS. A procfs mounted afresh is writable (CAP_SYS_ADMIN, which the plugin has for its namespace
    mounts), and its sys/net files are those of the writing thread's network namespace, as /proc/sys/net's are:
    the kernel looks the net sysctl tables up in the opener's namespace, whatever the mount. It is mounted once,
    in the plugin's own mount namespace, and goes with it; a host process, whose /proc/sys is writable, never
    mounts it."""
    global _private_proc
    if not os.statvfs("/proc/sys").f_flag & os.ST_RDONLY:
        return "/proc/sys"
    with _private_proc_lock:
        if _private_proc is None:
            path = tempfile.mkdtemp(prefix="vxnet-proc-")
            libc_call("mount", b"proc", path.encode(), b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
            _private_proc = path
    return os.path.join(_private_proc, "sys")


def _not_an_ipv6_host() -> None:
    """Run inside a new namespace (sysctl files under /proc/sys/net belong to the opener's namespace)."""
    root = _proc_sys()
    for key, value in _NOT_AN_IPV6_HOST.items():
        path = f"{root}/net/ipv6/conf/default/{key}"
        if os.path.exists(path):  # absent on a kernel without IPv6: nothing to turn off
            with open(path, "w") as f:
                f.write(value)


def _no_bridge_netfilter() -> None:
    """Run inside a new namespace: br_netfilter off (its per-namespace default is on), so no network pays for it.
    Nothing to do on a kernel without br_netfilter."""
    root = _proc_sys()
    for key in _BRIDGE_NETFILTER:
        path = f"{root}/net/bridge/{key}"
        if os.path.exists(path):
            with open(path, "w") as f:
                f.write("0")


class Links:
    """Semantic netlink operations, all executed on one thread of their own (see the module docstring)."""

    def __init__(self, netns_dir: str = "/run/netns"):
        self.netns_dir = netns_dir
        # No lock around these or the kernel calls: every method that touches them runs on the one netlink
        # thread (@_netlink_thread), which serialises them.
        self._sockets: Dict[Optional[str], object] = {}  # namespace -> IPRoute made in it
        self._nft: Dict[Optional[str], libnftables.Context] = {}  # namespace -> context made in it
        # prepare_netns_dir runs on the caller's thread (list_netns) as well as on ours (ensure_netns): this lock
        # makes its once-per-process preparation happen once.
        self._folder_lock = threading.Lock()
        self._folder_ready = False
        self._worker_ident = None
        # The name of the netlink thread, which makes every nftables commit of this Links: the kernel's event of
        # each commit names it (kernel/events.py), so the reconciler is not woken by what we wrote ourselves.
        self.nft_committer = names.nft_committer(secrets.token_hex(4))
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="netlink", initializer=self._init_worker)

    def _init_worker(self) -> None:
        self._worker_ident = threading.get_ident()
        set_thread_name(self.nft_committer)

    def _inside(self, ns: Optional[str]) -> ContextManager[None]:
        """Run the body with this thread in namespace ns (None: the host's), then come home (kernel/netns.py)."""
        return inside(None if ns is None else self._path(ns))

    def _create_netns(self, path: str) -> None:
        """A new network namespace bind-mounted at path, as `ip netns add` makes one, without forking: this thread
        unshares into a fresh namespace, its own /proc/thread-self/ns/net (not /proc/self, which is the main
        thread's) is bind-mounted at path, and the thread goes home."""
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if os.path.exists(path):  # a leftover file with no namespace mounted on it (see netns_exists)
            os.unlink(path)
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0o444))
        try:
            with inside(fresh=True):
                libc_call("mount", b"/proc/thread-self/ns/net", path.encode(), b"none", MS_BIND, None)
        except OSError:
            os.unlink(path)
            raise

    # -- sockets -----------------------------------------------------------------------------------------------
    def _ipr(self, ns: Optional[str]):
        sock = self._sockets.get(ns)
        if sock is None:
            with kernel_errors(f"open netlink in namespace {ns or 'host'}"):
                if ns is None:
                    sock = IPRoute()
                    sock.link_lookup(ifname="lo")
                else:
                    with self._inside(ns):
                        sock = IPRoute()
                        sock.link_lookup(ifname="lo")  # the socket is made now, in ns, and stays bound to it
            self._sockets[ns] = sock
        return sock

    def _forget(self, ns: Optional[str]) -> None:
        """Close our handles in ns: they pin the namespace (it would outlive its removal) and must not be reused
        for a namespace created again under the same name."""
        nft = self._nft.pop(ns, None)
        if nft is not None:
            nft.close()
        sock = self._sockets.pop(ns, None)
        if sock is not None:
            try:
                sock.close()
            except Exception:  # closing a socket whose namespace is gone: nothing left to free
                pass

    @_netlink_thread
    def _close_sockets(self) -> None:
        for ns in set(self._sockets) | set(self._nft):
            self._forget(ns)

    def close(self) -> None:
        self._close_sockets()
        self._executor.shutdown(wait=True)

    # -- namespaces --------------------------------------------------------------------------------------------
    def _path(self, name: str) -> str:
        return os.path.join(self.netns_dir, name)

    def netns_path(self, name: str) -> str:
        """Where a named namespace is mounted (for tools entered with nsenter --net=PATH)."""
        return self._path(name)

    def prepare_netns_dir(self) -> List[str]:
        """Make netns_dir a shared mount of itself before anything is mounted in it, and mount back namespaces an
        earlier ordering hid (kernel/netnsdir.py says why). Once per process: afterwards `ip netns add` finds a
        mount point and hides nothing. Returns the names mounted back."""
        with self._folder_lock:
            if self._folder_ready:
                return []
            with kernel_errors(f"prepare the namespace folder {self.netns_dir}"):
                repaired = netnsdir.prepare(self.netns_dir)
            self._folder_ready = True
            return repaired

    def list_netns(self) -> List[str]:
        self.prepare_netns_dir()
        try:
            return sorted(os.listdir(self.netns_dir))
        except FileNotFoundError:
            return []

    def netns_exists(self, name: str) -> bool:
        """True if a namespace is mounted at the name: a file left behind without its mount (a crash between
        creating the file and mounting it, an unmount by someone else) is not a namespace."""
        try:
            return os.stat(self._path(name)).st_dev == os.stat("/proc/self/ns/net").st_dev
        except FileNotFoundError:
            return False

    @_netlink_thread
    def ensure_netns(self, name: str) -> None:
        self.prepare_netns_dir()
        with kernel_errors(f"create namespace {name}"):
            if not self.netns_exists(name):
                self._forget(name)  # handles left from a namespace of that name removed behind our back
                self._create_netns(self._path(name))
                try:
                    with self._inside(name):
                        _not_an_ipv6_host()
                        _no_bridge_netfilter()
                except OSError:
                    # Its defaults are set only here, before any device exists: a namespace left without them would
                    # pass for a finished one on the next attempt. Remove it, so that attempt starts afresh.
                    pr_netns.remove(self._path(name))
                    raise
                self._ipr(name).link("set", index=self._index(name, "lo"), state="up")

    @_netlink_thread
    def remove_netns(self, name: str) -> None:
        """Remove a namespace and so everything in it (our veth ends take their container-side peers along)."""
        self.prepare_netns_dir()
        self._forget(name)
        path = self._path(name)
        with kernel_errors(f"remove namespace {name}"):
            if self.netns_exists(name):
                pr_netns.remove(path)
            elif os.path.exists(path):
                os.unlink(path)

    # -- nftables ----------------------------------------------------------------------------------------------
    @_netlink_thread
    def nft(self, ns: Optional[str], commands: list, what: str, terse: bool = False) -> str:
        """Apply nftables JSON commands inside ns (None: the host) as one atomic transaction; returns the JSON
        output (terse: sets listed without their elements). KernelError naming `what` if the namespace is missing
        or nftables refuses the batch."""
        with kernel_errors(what):
            if ns is not None and not self.netns_exists(ns):
                raise KernelError(f"{what}: namespace {ns} does not exist")
            try:
                with self._inside(ns):
                    ctx = self._nft.get(ns)
                    if ctx is None:
                        ctx = self._nft[ns] = libnftables.Context()  # its socket is made here, in ns
                    return ctx.run(commands, terse)
            except libnftables.NftablesError as exc:
                raise KernelError(f"{what}: {exc}") from None

    # -- links -------------------------------------------------------------------------------------------------
    def _index(self, ns: Optional[str], name: str) -> Optional[int]:
        found = self._ipr(ns).link_lookup(ifname=name)
        return found[0] if found else None

    @_netlink_thread
    def link_exists(self, ns: Optional[str], name: str) -> bool:
        with kernel_errors(f"look up {name} in {ns or 'host'}"):
            return self._index(ns, name) is not None

    @_netlink_thread
    def link_info(self, ns: Optional[str], name: str) -> Optional[dict]:
        """{"kind", "mtu", "master" (name or None), "up", "mac", "vni", "port"} or None if there is no such link
        (vni and port: a VXLAN device's, else None)."""
        with kernel_errors(f"read {name} in {ns or 'host'}"):
            ipr = self._ipr(ns)
            idx = self._index(ns, name)
            if idx is None:
                return None
            link = ipr.get_links(idx)[0]
            info = link.get_attr("IFLA_LINKINFO")
            kind = info.get_attr("IFLA_INFO_KIND") if info else None
            vni = port = None
            if kind == "vxlan":
                data = info.get_attr("IFLA_INFO_DATA")
                vni, port = data.get_attr("IFLA_VXLAN_ID"), data.get_attr("IFLA_VXLAN_PORT")
            master_idx = link.get_attr("IFLA_MASTER")
            master = None
            if master_idx:
                master = ipr.get_links(master_idx)[0].get_attr("IFLA_IFNAME")
            return {"kind": kind, "mtu": link.get_attr("IFLA_MTU"), "master": master,
                    "up": bool(link["flags"] & 1), "mac": link.get_attr("IFLA_ADDRESS"), "vni": vni,
                    "port": port}

    @_netlink_thread
    def list_links(self, ns: Optional[str]) -> List[str]:
        with kernel_errors(f"list links in {ns or 'host'}"):
            return [link.get_attr("IFLA_IFNAME") for link in self._ipr(ns).get_links()]

    @_netlink_thread
    def remove_link(self, ns: Optional[str], name: str) -> None:
        if ns is not None and not self.netns_exists(ns):
            return
        with kernel_errors(f"delete {name} in {ns or 'host'}"):
            idx = self._index(ns, name)
            if idx is not None:
                try:
                    self._ipr(ns).link("del", index=idx)
                except NetlinkError as exc:
                    if exc.code != errno.ENODEV:  # gone meanwhile (its peer was deleted)
                        raise

    @_netlink_thread
    def ensure_bridge(self, ns: str, name: str, mtu: int) -> None:
        """A bridge, up, with multicast snooping off. With snooping on, once any MLD querier shows up on the
        bridge (and any container can send a query), a registered group is forwarded only to the ports that
        reported it (br_multicast_querier_exists); the VXLAN port stands for every remote container, whose
        reports never cross the overlay (the device has no flood entry), so a neighbour solicitation to a group a
        local container joined (solicited-node groups are shared by addresses with the same low 24 bits, RFC 4291
        2.7.1) would no longer reach the VXLAN device's proxy, which answers for the remote addresses. Off,
        multicast is flooded to every port, as ARP broadcasts are."""
        with kernel_errors(f"create bridge {name} in {ns}"):
            ipr = self._ipr(ns)
            if self._index(ns, name) is None:
                ipr.link("add", ifname=name, kind="bridge", br_mcast_snooping=0)
            ipr.link("set", index=self._index(ns, name), kind="bridge", br_mcast_snooping=0)
            ipr.link("set", index=self._index(ns, name), mtu=mtu, state="up")

    @_netlink_thread
    def ensure_vxlan(self, ns: str, name: str, staging: str, vni: int, local: str, port: int, mtu: int,
                     master: Optional[str], mac: Optional[str] = None) -> None:
        """A VXLAN device inside `ns`, created in the host namespace first so its UDP socket stays there.

        learning off: peers are programmed from etcd, never learnt from flooded traffic; proxy on: ARP for known
        peers (and IPv6 neighbour solicitations) is answered from our neighbour entries instead of crossing the
        underlay. master None: no bridge
        (the health overlay's device carries its address itself); mac: the device's own address (None: random).
        A device whose VNI differs is made again."""
        with kernel_errors(f"create VXLAN {vni} in {ns}"):
            ipr = self._ipr(ns)
            idx = self._index(ns, name)
            if idx is not None:
                current = self.link_info(ns, name)
                if current["vni"] != vni:
                    ipr.link("del", index=idx)
                    idx = None
            if idx is None:
                host = self._ipr(None)
                stale = self._index(None, staging)
                if stale is not None:
                    host.link("del", index=stale)
                host.link("add", ifname=staging, kind="vxlan", vxlan_id=vni, vxlan_local=local,
                          vxlan_port=port, vxlan_learning=0, vxlan_proxy=1)
                host.link("set", index=self._index(None, staging), net_ns_fd=self._path(ns))
                ipr.link("set", index=self._index(ns, staging), ifname=name)
            settings = {"mtu": mtu, "state": "up"}
            if master is not None:
                settings["master"] = self._index(ns, master)
            if mac is not None:
                settings["address"] = mac
            ipr.link("set", index=self._index(ns, name), **settings)

    @_netlink_thread
    def ensure_address(self, ns: str, dev: str, address: str, prefixlen: int) -> None:
        """dev in ns holds exactly this IPv4 address (others it had are removed); a replay changes nothing."""
        with kernel_errors(f"set address {address}/{prefixlen} on {dev} in {ns}"):
            ipr = self._ipr(ns)
            idx = self._index(ns, dev)
            have = {(a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(family=2, index=idx)}
            for other, length in have - {(address, prefixlen)}:
                ipr.addr("del", index=idx, address=other, prefixlen=length)
            if (address, prefixlen) not in have:
                ipr.addr("add", index=idx, address=address, prefixlen=prefixlen)

    # Bridge port flags (IFLA_BRPORT_*) and static FDB entries: netdriver/sandbox.py says which port gets which and
    # why. NUD_NOARP is iproute2's `static` (forwarded to the port, never aged; NUD_PERMANENT would be `permanent`,
    # a local address delivered to the bridge itself); NTF_MASTER puts the entry in the bridge's table, not the
    # port's own.
    _STATIC = 0x40
    _NTF_MASTER = 0x04

    def _port_flags(self, ns: str, idx: int, flood: bool) -> None:
        """Learning off (every forwarding entry is static), unknown-unicast flooding as given; broadcast and
        multicast are flooded to every port as before (ARP, neighbour discovery)."""
        self._ipr(ns).brport("set", index=idx, learning=0, unicast_flood=1 if flood else 0)

    @_netlink_thread
    def ensure_veth(self, ns: str, bridge_end: str, container_end: str, master: str, mtu: int,
                    mac: Optional[str]) -> None:
        """A veth pair: `bridge_end` enslaved to `master` inside ns, `container_end` left in the host namespace
        for dockerd to move into the container. With mac (the container end's address), the bridge end is an
        endpoint's port: learning and unknown-unicast flooding off, a static FDB entry mac -> the port on master,
        and mac kept as the bridge end's alias, so the kernel alone says which endpoint MAC each port carries.
        Replays with the bridge end in place change nothing. A bridge end name held by anything but a veth is
        refused (KernelError) and left alone."""
        with kernel_errors(f"create veth {container_end} for {ns}"):
            ipr = self._ipr(ns)
            host = self._ipr(None)
            idx = self._index(ns, bridge_end)
            if idx is not None:
                info = ipr.get_links(idx)[0].get_attr("IFLA_LINKINFO")
                kind = info.get_attr("IFLA_INFO_KIND") if info else None
                if kind != "veth":
                    raise KernelError(f"create veth {container_end} for {ns}: {bridge_end} is already taken there "
                                      f"by a {kind or 'device'} vxnet did not make")
            else:
                stale = self._index(None, container_end)
                if stale is not None:
                    host.link("del", index=stale)
                # The bridge end is born inside ns: moving a link between namespaces afterwards costs ~20 ms in
                # the kernel (measured by bench/), creating it there ~1 ms.
                args = {"mtu": mtu}
                if mac:
                    args["address"] = mac
                fd = os.open(self._path(ns), os.O_RDONLY)
                try:
                    host.link("add", ifname=container_end, kind="veth",
                              peer={"ifname": bridge_end, "net_ns_fd": fd, "mtu": mtu}, **args)
                finally:
                    os.close(fd)
                idx = self._index(ns, bridge_end)
            settings = {"mtu": mtu, "master": self._index(ns, master), "state": "up"}
            if mac:
                settings["ifalias"] = mac
            ipr.link("set", index=idx, **settings)
            if mac:
                self._port_flags(ns, idx, flood=False)
                ipr.fdb("replace", ifindex=idx, lladdr=mac, state=self._STATIC, flags=self._NTF_MASTER)

    @_netlink_thread
    def ensure_trunk(self, ns: str, root_end: str, leaf_end: str, root: str, leaf: str, mtu: int) -> None:
        """A veth pair inside ns joining bridge `root` (end root_end: unknown unicast not flooded into the leaf)
        to bridge `leaf` (end leaf_end: unknown unicast flooded up to the root); learning off on both. Replays
        change nothing; an end found alone (its peer deleted takes it along, so only a foreign device of that
        name) is refused."""
        with kernel_errors(f"create trunk {root_end} in {ns}"):
            ipr = self._ipr(ns)
            if self._index(ns, root_end) is None and self._index(ns, leaf_end) is None:
                ipr.link("add", ifname=root_end, kind="veth", peer={"ifname": leaf_end, "mtu": mtu}, mtu=mtu)
            for end, master, flood in ((root_end, root, False), (leaf_end, leaf, True)):
                idx = self._index(ns, end)
                if idx is None:
                    raise KernelError(f"create trunk {root_end} in {ns}: {end} is missing while its peer exists")
                ipr.link("set", index=idx, mtu=mtu, master=self._index(ns, master), state="up")
                self._port_flags(ns, idx, flood)

    @_netlink_thread
    def set_port_flags(self, ns: str, port: str, flood: bool) -> None:
        """Learning off and unknown-unicast flooding as given on one bridge port (the VXLAN device's)."""
        with kernel_errors(f"set the bridge port flags of {port} in {ns}"):
            self._port_flags(ns, self._index(ns, port), flood)

    @_netlink_thread
    def set_static_fdb(self, ns: str, port: str, mac: str) -> None:
        """A static entry mac -> port in the table of the bridge port belongs to. Idempotent."""
        with kernel_errors(f"add bridge FDB {mac} -> {port} in {ns}"):
            self._ipr(ns).fdb("replace", ifindex=self._index(ns, port), lladdr=mac, state=self._STATIC,
                              flags=self._NTF_MASTER)

    @_netlink_thread
    def del_static_fdb(self, ns: str, port: str, mac: str) -> None:
        """Take the entry mac -> port out; nothing to do when it, the port or the namespace is gone."""
        with kernel_errors(f"delete bridge FDB {mac} -> {port} in {ns}"):
            idx = self._device(ns, port)
            if idx is not None:
                self._ignore_missing(lambda: self._ipr(ns).fdb("del", ifindex=idx, lladdr=mac,
                                                                flags=self._NTF_MASTER))

    @_netlink_thread
    def ports(self, ns: str) -> Dict[str, Tuple[Optional[str], Optional[str], Optional[str]]]:
        """Every link of ns from one dump: name -> (kind, master's name or None, alias or None)."""
        with kernel_errors(f"list links in {ns}"):
            links = self._ipr(ns).get_links()
            by_index = {link["index"]: link.get_attr("IFLA_IFNAME") for link in links}
            out = {}
            for link in links:
                info = link.get_attr("IFLA_LINKINFO")
                out[link.get_attr("IFLA_IFNAME")] = (info.get_attr("IFLA_INFO_KIND") if info else None,
                                                     by_index.get(link.get_attr("IFLA_MASTER")),
                                                     link.get_attr("IFLA_IFALIAS"))
            return out

    @_netlink_thread
    def static_fdb(self, ns: str) -> Set[Tuple[str, str]]:
        """The static entries of every bridge of ns, from one dump: (port name, mac). Not the VXLAN device's own
        table (Links.fdb), nor the entries the kernel makes for the ports' own addresses."""
        out = set()
        with kernel_errors(f"read the bridge FDB of {ns}"):
            if not self.netns_exists(ns):
                return out
            ipr = self._ipr(ns)
            names_of = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
            for entry in ipr.get_neighbours(family=self._AF_BRIDGE):
                # A bridge's own entries carry NDA_MASTER (the bridge), not the NTF_MASTER flag, in a dump.
                if entry.get_attr("NDA_MASTER") and entry["state"] == self._STATIC:
                    out.add((names_of.get(entry["ifindex"], ""), entry.get_attr("NDA_LLADDR")))
        return out

    # One entry at a time (RTM_GETNEIGH without NLM_F_DUMP: the kernel's rtnl_fdb_get and neigh_get, since 5.0),
    # for the reconciler's look at what one notification named: O(1) whatever the size of the tables.
    def _get_one(self, ns: str, **request) -> Optional[object]:
        try:
            found = self._ipr(ns).neigh("get", **request)
        except NetlinkError as exc:
            if exc.code in (errno.ENOENT, errno.ENODEV, errno.EINVAL):  # no such entry (or device)
                return None
            raise
        for entry in found:
            return entry
        return None

    @_netlink_thread
    def static_port(self, ns: str, bridge: str, mac: str) -> Optional[str]:
        """The port a static entry for mac points at in bridge's table (one entry read); None when there is
        none, when it is not static, or when the namespace or bridge is missing."""
        with kernel_errors(f"read bridge FDB {mac} on {bridge} in {ns}"):
            idx = self._device(ns, bridge)
            if idx is None:
                return None
            entry = self._get_one(ns, family=self._AF_BRIDGE, lladdr=mac, master=idx)
            if entry is None or entry["state"] != self._STATIC or entry["ifindex"] == idx:
                return None
            links = self._ipr(ns).get_links(entry["ifindex"])
            return links[0].get_attr("IFLA_IFNAME") if links else None

    @_netlink_thread
    def fdb_entries(self, ns: str, dev: str, macs: Iterable[str]) -> Dict[str, str]:
        """The remote VTEPs of a VXLAN device's entries for these MACs alone (one entry read each): mac -> vtep,
        the MACs without an entry left out."""
        out = {}
        with kernel_errors(f"read FDB entries of {dev} in {ns}"):
            idx = self._device(ns, dev)
            if idx is None:
                return out
            for mac in macs:
                entry = self._get_one(ns, family=self._AF_BRIDGE, lladdr=mac, ifindex=idx, flags=self._NTF_SELF)
                if entry is not None and entry.get_attr("NDA_DST"):
                    out[mac] = entry.get_attr("NDA_DST")
        return out

    def fdb_entry(self, ns: str, dev: str, mac: str) -> Optional[str]:
        """The remote VTEP of a VXLAN device's entry for mac (one entry read); None when there is none."""
        return self.fdb_entries(ns, dev, [mac]).get(mac)

    @_netlink_thread
    def neighbour_entries(self, ns: str, dev: str, ips: Iterable[str]) -> Dict[str, str]:
        """The MACs of the permanent neighbour entries for these addresses alone on dev (one entry read each):
        ip -> mac, the addresses without a permanent entry left out (as neighbours() leaves them out)."""
        out = {}
        with kernel_errors(f"read neighbour entries of {dev} in {ns}"):
            idx = self._device(ns, dev)
            if idx is None:
                return out
            for ip in ips:
                entry = self._get_one(ns, family=_family(ip), dst=ip, ifindex=idx)
                if entry is not None and entry["state"] & self._PERMANENT and entry.get_attr("NDA_LLADDR"):
                    out[ip] = entry.get_attr("NDA_LLADDR")
        return out

    @_netlink_thread
    def link_index(self, ns: str, name: str) -> Optional[int]:
        """The index of a link of ns; None when it or the namespace is missing."""
        with kernel_errors(f"look up {name} in {ns}"):
            return self._device(ns, name)

    # -- host facts --------------------------------------------------------------------------------------------
    @_netlink_thread
    def default_route_address(self) -> Optional[str]:
        """The primary IPv4 address of the interface holding the default route, if there is one."""
        with kernel_errors("read the default route"):
            ipr = self._ipr(None)
            for route in ipr.get_default_routes(family=2):
                oif = route.get_attr("RTA_OIF")
                for addr in ipr.get_addr(family=2, index=oif):
                    return addr.get_attr("IFA_ADDRESS")
        return None

    @_netlink_thread
    def mtu_of_address(self, address: str) -> Optional[int]:
        """MTU of the interface that carries `address` (the underlay), or None if no interface has it."""
        with kernel_errors(f"find the interface of {address}"):
            ipr = self._ipr(None)
            for addr in ipr.get_addr(family=2):
                if addr.get_attr("IFA_ADDRESS") == address:
                    return ipr.get_links(addr["index"])[0].get_attr("IFLA_MTU")
        return None

    # -- neighbours and FDB (remote peers) --------------------------------------------------------------------
    # NUD_PERMANENT (0x80): never aged out, never probed. NTF_SELF (0x02): the VXLAN device's own FDB, which maps
    # an inner MAC to the remote VTEP, not the bridge's FDB.
    _PERMANENT = 0x80
    _NTF_SELF = 0x02
    _AF_BRIDGE = 7

    def _device(self, ns: str, dev: str) -> Optional[int]:
        if not self.netns_exists(ns):
            return None
        return self._index(ns, dev)

    @_netlink_thread
    def fdb(self, ns: str, dev: str) -> Dict[str, str]:
        """Unicast FDB entries of a VXLAN device: inner mac -> remote VTEP."""
        out = {}
        with kernel_errors(f"read FDB of {dev} in {ns}"):
            idx = self._device(ns, dev)
            if idx is None:
                return out
            for entry in self._ipr(ns).get_neighbours(family=self._AF_BRIDGE, ifindex=idx):
                mac, dst = entry.get_attr("NDA_LLADDR"), entry.get_attr("NDA_DST")
                if mac and dst and mac != "00:00:00:00:00:00":
                    out[mac] = dst
        return out

    @_netlink_thread
    def neighbours(self, ns: str, dev: str) -> Dict[str, str]:
        """Permanent neighbour entries of a device, IPv4 (ARP) and IPv6 (NDP) alike: ip -> mac."""
        out = {}
        with kernel_errors(f"read neighbours of {dev} in {ns}"):
            idx = self._device(ns, dev)
            if idx is None:
                return out
            for family in (socket.AF_INET, socket.AF_INET6):
                for entry in self._ipr(ns).get_neighbours(family=family, ifindex=idx):
                    if entry["state"] & self._PERMANENT and entry.get_attr("NDA_LLADDR"):
                        out[entry.get_attr("NDA_DST")] = entry.get_attr("NDA_LLADDR")
        return out

    @_netlink_thread
    def set_fdb(self, ns: str, dev: str, mac: str, vtep: str) -> None:
        with kernel_errors(f"add FDB {mac} -> {vtep} in {ns}"):
            self._ipr(ns).fdb("replace", ifindex=self._index(ns, dev), lladdr=mac, dst=vtep,
                              state=self._PERMANENT, flags=self._NTF_SELF)

    @_netlink_thread
    def del_fdb(self, ns: str, dev: str, mac: str, vtep: str) -> None:
        with kernel_errors(f"delete FDB {mac} in {ns}"):
            idx = self._device(ns, dev)
            if idx is not None:
                self._ignore_missing(lambda: self._ipr(ns).fdb(
                    "del", ifindex=idx, lladdr=mac, dst=vtep, flags=self._NTF_SELF))

    @_netlink_thread
    def set_neigh(self, ns: str, dev: str, ip: str, mac: str) -> None:
        """A permanent neighbour entry ip -> mac; the family (ARP or NDP table) is the address's."""
        with kernel_errors(f"add neighbour {ip} -> {mac} in {ns}"):
            self._ipr(ns).neigh("replace", family=_family(ip), ifindex=self._index(ns, dev), dst=ip, lladdr=mac,
                                state=self._PERMANENT)

    @_netlink_thread
    def del_neigh(self, ns: str, dev: str, ip: str) -> None:
        with kernel_errors(f"delete neighbour {ip} in {ns}"):
            idx = self._device(ns, dev)
            if idx is not None:
                self._ignore_missing(lambda: self._ipr(ns).neigh("del", family=_family(ip), ifindex=idx, dst=ip))

    @staticmethod
    def _ignore_missing(action) -> None:
        try:
            action()
        except NetlinkError as exc:
            if exc.code not in (errno.ENOENT, errno.ESRCH, errno.ENODEV):
                raise
