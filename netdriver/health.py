"""The health overlay: one namespace on every host (kernel/names.py HEALTH_NETNS) holding one VXLAN device on the
reserved VNI, UDP port 4789 like the networks, its MTU what VXLAN leaves of the underlay's. Each host has one
address on it (allocated in etcd under health/<address>, under the host's lease like its record, which names it
as "health") and a MAC
derived from that address, and keeps the FDB and neighbour entries of every other live host record: so every
plugin answers ICMP echo on the real VXLAN path, and `vxnet doctor` can tell a blocked UDP port (small probes
lost) from an underlay MTU too small for the overlay (small probes cross, full-size ones with DF do not).

Host records come and go with their leases (netdriver/hosts.py): a full read of hosts/, then a watch on it
(store/watchloop.py); a host whose record is deleted (its lease expired) loses its entries here.

Nothing depends on the health namespace (no container is in it), so a plugin that stops removes it: a stopped
plugin leaves no health overlay behind, and `vxnet doctor` on this host then says the plugin is not running here.
"""

import ipaddress
import json
import logging
import threading
from typing import Dict, Optional, Tuple

from kernel import mtu, names
from kernel.links import Links
from netdriver.contracts import Underlay
from store import schema
from store.kv import KV, WatchableKV
from store.kvstore import Entry, WatchEvent
from store.watchloop import WatchLoop
from wire.errors import Conflict, Exhausted, KernelError

log = logging.getLogger(__name__)

_RETRIES = 16
Entries = Tuple[Dict[str, str], Dict[str, str]]  # (fdb mac -> vtep, neigh ip -> mac)


class HealthStore:
    """health/<address> = host ID: who holds which address of the health subnet."""

    def __init__(self, kv: KV, prefix: str = schema.PREFIX):
        self.kv = kv
        self.keys = schema.Schema(prefix)

    def _held(self) -> Dict[str, Entry]:
        entries, _ = self.kv.get_prefix(self.keys.prefix(schema.HEALTH))
        out = {}
        for entry in entries:
            parts = self.keys.parse(schema.HEALTH, entry.key)
            if parts and names.health_index(parts["address"]):
                out[parts["address"]] = entry
        return out

    def holders(self) -> Dict[str, str]:
        """address -> host ID, for every well-formed allocation (anything else under health/ is ignored)."""
        return {address: entry.value for address, entry in self._held().items()}

    def claim(self, host_id: str, lease: int) -> str:
        """This host's health address, held under its lease (so it goes when the host does, as its record): the
        one it holds already (the lowest, should there be two), moved under this lease if it was under another of
        this host's; else the lowest free one, taken by create-if-absent so two hosts claiming at once never get
        the same. Idempotent. Exhausted when every address is held."""
        for _ in range(_RETRIES):
            held = self._held()
            mine = sorted((a for a, e in held.items() if e.value == host_id), key=names.health_index)
            if mine:
                key, entry = self.keys.health(mine[0]), held[mine[0]]
                if entry.lease == lease or self.kv.commit(revisions={key: entry.mod_revision},
                                                          puts={key: host_id}, lease=lease):
                    return mine[0]
                continue
            taken = {names.health_index(a) for a in held}
            free = next((i for i in range(1, names.HEALTH_HOSTS + 1) if i not in taken), None)
            if free is None:
                raise Exhausted(f"no free address left on the health overlay ({names.HEALTH_SUBNET}): every one "
                                "is held by a live host")
            address = names.health_address(free)
            key = self.keys.health(address)
            if self.kv.commit(absent=[key], puts={key: host_id}, lease=lease):
                log.info("health overlay address %s allocated", address)
                return address
        raise Conflict("could not allocate a health overlay address: too much contention, try again")


def _ipv4(value) -> bool:
    try:
        ipaddress.IPv4Address(value)
    except (ipaddress.AddressValueError, ValueError, TypeError):
        return False
    return True


def wanted_entries(hosts: Dict[str, dict], me: str) -> Entries:
    """The FDB and neighbour entries of every other host's record that names a health address and a VTEP (records
    from older versions, or with values that are not addresses, are left out: nothing unchecked reaches the
    kernel). Two records claiming one health address: the one of the lower host ID wins, deterministically."""
    fdb: Dict[str, str] = {}
    neigh: Dict[str, str] = {}
    for host in sorted(hosts):
        record = hosts[host]
        if host == me or not isinstance(record, dict):
            continue
        address, vtep = record.get("health"), record.get("vtep")
        if not isinstance(address, str) or not names.health_index(address) or not _ipv4(vtep) or address in neigh:
            continue
        mac = names.health_mac(address)
        fdb[mac] = str(vtep)
        neigh[address] = mac
    return fdb, neigh


class HealthOverlay(WatchLoop):
    """This host's end of the health overlay: claim() (from HostLease, with each write of the host record: etcd,
    then the kernel), and start() keeps the entries of the other hosts."""

    what = "health overlay watch"

    def __init__(self, kv: WatchableKV, links: Links, underlay: Underlay, host_id: str,
                 prefix: str = schema.PREFIX):
        super().__init__(kv)
        self.links = links
        self.underlay = underlay
        self.host_id = host_id
        self.store = HealthStore(kv, prefix)
        self.keys = schema.Schema(prefix)
        self.address: Optional[str] = None
        self._hosts: Dict[str, dict] = {}
        self._built_for: Optional[str] = None  # the VTEP the device was made with
        # The watch thread and whoever else repairs (the lease thread at a claim, a periodic pass): one at a time.
        self._lock = threading.RLock()

    def claim(self, lease: int) -> Optional[str]:
        """This host's address under its lease (HostLease asks before each write of the host record, which then
        carries it); the device is built, or given the new address, as it changes. StoreUnavailable propagates
        (the record is not written either, and is retried); running out of addresses, or a kernel refusal, is
        logged and left for `vxnet doctor` to report: the networks do not need the health overlay."""
        try:
            address = self.store.claim(self.host_id, lease)
        except (Exhausted, Conflict) as exc:
            log.error("health overlay not built (vxnet doctor cannot probe this host): %s", exc)
            return None
        with self._lock:
            if address != self.address or self._built_for != self.underlay.address:
                self.address = address
                self._build()
                self._reconcile()  # a device made again has no entries yet
        return address

    def _build(self) -> None:
        vtep = self.underlay.address
        if self.address is None or not vtep:
            return  # no VTEP yet (waiting for Swarm's DiscoverNew): vtep_changed() builds it
        ns = names.HEALTH_NETNS
        try:
            self.links.ensure_netns(ns)
            if self._built_for is not None and self._built_for != vtep:
                self.links.remove_link(ns, names.HEALTH_VXLAN)  # its UDP socket sends from the old VTEP
            self.links.ensure_vxlan(ns, names.HEALTH_VXLAN, names.vxlan_staging(names.HEALTH_VNI), names.HEALTH_VNI,
                                    vtep, names.VXLAN_PORT, mtu.vxlan_mtu(self.underlay.mtu), None,
                                    names.health_mac(self.address))
            self.links.ensure_address(ns, names.HEALTH_VXLAN, self.address, names.HEALTH_SUBNET.prefixlen)
            self._built_for = vtep
        except KernelError as exc:
            log.error("health overlay not built (vxnet doctor cannot probe this host): %s", exc)

    def stop(self) -> None:
        """Stop the watch and remove the namespace (and the device in it), whether or not start() ran."""
        super().stop()
        try:
            # The device first: the kernel dismantles a dropped namespace later, and until then its device would
            # hold the VNI on the shared UDP socket, refusing the next start's device (netdriver/sandbox.py).
            self.links.remove_link(names.HEALTH_NETNS, names.HEALTH_VXLAN)
            self.links.remove_netns(names.HEALTH_NETNS)
        except KernelError as exc:
            log.error("health overlay namespace %s not removed: %s", names.HEALTH_NETNS, exc)
        self._built_for = None

    def vtep_changed(self) -> None:
        """The VTEP moved (Swarm's DiscoverNew): the device is made again, sending from the new one."""
        with self._lock:
            self._build()
            self._reconcile()

    # -- the watch (store/watchloop.py) -------------------------------------------------------------------------
    def load(self) -> Tuple[str, int]:
        prefix = self.keys.prefix(schema.HOST)
        entries, revision = self.kv.get_prefix(prefix)
        hosts = {}
        for entry in entries:
            parts = self.keys.parse(schema.HOST, entry.key)
            if parts:
                hosts[parts["host"]] = _record(entry.value)
        with self._lock:
            self._hosts = hosts
            self.reconcile()
        return prefix, revision

    def apply(self, event: WatchEvent) -> bool:
        parts = self.keys.parse(schema.HOST, event.key)
        if parts is None:
            return True
        with self._lock:
            if event.kind == "put":
                self._hosts[parts["host"]] = _record(event.value)
            else:
                self._hosts.pop(parts["host"], None)
            self.reconcile()
        return True

    def built(self) -> bool:
        """Whether this host's end of the overlay exists (it waits for a VTEP and an address)."""
        return self._built_for is not None

    def reconcile(self) -> int:
        """Make the device hold exactly the wanted entries, from what the kernel has (so entries removed or changed
        by someone else come back with the next event or resync, or when a reconciler pass calls this). Returns
        how many entries it changed."""
        with self._lock:
            return self._reconcile()

    def _reconcile(self) -> int:
        ns, dev = names.HEALTH_NETNS, names.HEALTH_VXLAN
        if self._built_for is None:
            return 0
        fdb, neigh = wanted_entries(self._hosts, self.host_id)
        changed = 0
        try:
            have_fdb, have_neigh = self.links.fdb(ns, dev), self.links.neighbours(ns, dev)
            for ip in have_neigh.keys() - neigh.keys():
                self.links.del_neigh(ns, dev, ip)
                changed += 1
            for mac, vtep in have_fdb.items():
                if fdb.get(mac) != vtep:
                    self.links.del_fdb(ns, dev, mac, vtep)
                    changed += 1
            for mac, vtep in fdb.items():
                if have_fdb.get(mac) != vtep:
                    self.links.set_fdb(ns, dev, mac, vtep)
                    changed += 1
            for ip, mac in neigh.items():
                if have_neigh.get(ip) != mac:
                    self.links.set_neigh(ns, dev, ip, mac)
                    changed += 1
        except KernelError as exc:
            log.error("health overlay entries not programmed: %s", exc)
        return changed


def _record(value: Optional[str]) -> dict:
    try:
        record = json.loads(value or "")
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}
