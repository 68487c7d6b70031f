"""Per-peer ESP between this host's VTEP and every remote VTEP an encrypted network needs, kept equal to the
desired state: the key ring, the local VTEP, and which peers each holder (an overlay segment) needs.

Several encrypted networks between the same two hosts share one set of SAs and policies (they all send VXLAN from
one VTEP to the other on one port): a peer is programmed while at least one holder names it, and removed when the
last one lets go. Holders are sets, not counters, so a replayed call changes nothing.

Per peer, in this order (the same order serves adding a peer and rotating keys, so a rotation is just a
convergence to a new ring):
  1. inbound SAs (peer -> here) for every key in the ring       new keys can be received
  2. outbound SA (here -> peer) for the primary key
  3. inbound policy: UDP to the port from the peer must have come through one of our SAs
  4. outbound policy: UDP to the port for the peer leaves through the primary SA (level required)
  5. outbound SAs of other keys deleted                           nothing refers to them since 4
  6. inbound SAs of keys no longer in the ring deleted            pruned
Removing a peer goes the other way: outbound policy, outbound SAs, inbound policy, inbound SAs. With the
firewall table in place there is no step after which cleartext could cross the underlay.

Failures raise (KernelError naming every peer that failed) after the other peers were tried: the desired state
is recorded first, so the next call or resync retries.
"""

import logging
import threading
import time
from typing import Dict, Iterable, List, Optional, Set, Tuple

from encrypt.firewall import Firewall
from encrypt.ring import KeyRing
from encrypt.spi import spi_for
from kernel import names
from kernel.probes import EspProbe
from kernel.xfrm import SA, Policy, SAState, Xfrm
from wire.errors import KernelError

log = logging.getLogger(__name__)


class EncryptionManager:
    """Converges the kernel's vxnet SAs and policies (and the firewall table) on the desired state. Thread-safe;
    every call is idempotent."""

    def __init__(self, xfrm: Optional[Xfrm], firewall: Firewall, port: int = names.ENCRYPTED_VXLAN_PORT,
                 esp: Optional[EspProbe] = None):
        """xfrm None: the plugin's own namespace's, opened on first use (so a kernel without XFRM netlink only
        fails encrypted networks, with require()'s message, not the plugin's start); firewall: the table for
        `port` in the same namespace; esp: what require() asks whether the kernel does ESP (None: a
        kernel.probes.EspProbe of this kernel)."""
        self._xfrm = xfrm
        self._xfrm_lock = threading.Lock()  # opening it once, also from a scrape that does not take self._lock
        self.esp = esp if esp is not None else EspProbe()
        self.firewall = firewall
        self.port = port
        self._lock = threading.RLock()
        self._ring: Optional[KeyRing] = None
        self._local: Optional[str] = None
        self._holders: Dict[str, Set[str]] = {}  # holder (segment) -> remote VTEPs it needs
        # Peers whose SAs and policies are in place for the current ring and VTEP. A peer whose programming
        # failed is not in it, so the next call that names it (a replayed set_peers, an event) tries again.
        self._programmed: Set[str] = set()
        # A sync_all that came before the VTEP or the ring (a restarted plugin reads its peers while the ring is
        # still on its way): its clean-up of leftovers is owed, and done when both are known.
        self._prune_owed = False
        self._firewall_ready = False

    @property
    def xfrm(self) -> Xfrm:
        with self._xfrm_lock:
            if self._xfrm is None:
                self._xfrm = Xfrm()
            return self._xfrm

    def require(self) -> None:
        """What an encrypted network needs before its VXLAN device exists: ESP in the kernel (else
        EncryptionUnavailable, naming the missing modules) and the fail-closed firewall table."""
        self.esp.require()
        self.ensure_firewall()

    # -- desired state ---------------------------------------------------------------------------------------
    @property
    def ring(self) -> Optional[KeyRing]:
        return self._ring

    def peers(self) -> Dict[str, Set[str]]:
        """Remote VTEP -> the holders that need it."""
        with self._lock:
            out: Dict[str, Set[str]] = {}
            for holder, vteps in self._holders.items():
                for vtep in vteps:
                    out.setdefault(vtep, set()).add(holder)
            return out

    def _wanted(self) -> Set[str]:
        return {v for vteps in self._holders.values() for v in vteps if v != self._local}

    # -- what the metrics read (without self._lock: a scrape never waits for a convergence) ---------------------
    def kernel_sas(self) -> int:
        """How many SAs of ours (reqid names.XFRM_REQID) the kernel holds now; KernelError if it cannot say."""
        return len(self.xfrm.sas())

    def primary_key_age(self, now: Optional[float] = None) -> Optional[float]:
        """Seconds since the ring's primary key became primary (its last rotation); None before a ring is
        loaded, or for a ring that did not record when (rotated_at 0)."""
        ring = self._ring
        if ring is None or not ring.rotated_at:
            return None
        return max(0.0, (time.time() if now is None else now) - ring.rotated_at)

    def ensure_firewall(self) -> None:
        """The fail-closed table; call before the first encrypted VXLAN device exists."""
        with self._lock:
            self.firewall.ensure()
            self._firewall_ready = True

    def set_keyring(self, ring: KeyRing) -> None:
        """A new ring (from etcd): every peer converges on it, in the rotation order of the module docstring."""
        with self._lock:
            old, self._ring = self._ring, ring
            if old is not None and old == ring:
                return
            log.info("key ring now %s (was %s)", ring, old)
            self._converge(self._wanted(), prune=self._prune_owed, strict=False)

    def set_local(self, vtep: str) -> None:
        """This host's VTEP; a change re-keys every peer from the new address and removes the old SAs."""
        with self._lock:
            old, self._local = self._local, vtep
            if old == vtep:
                return
            self._converge(self._wanted(), prune=True, strict=False)

    def set_peers(self, holder: str, vteps: Iterable[str]) -> None:
        """The remote VTEPs `holder` needs now (an empty set releases them all)."""
        with self._lock:
            vteps = set(vteps)
            if vteps:
                self._holders[holder] = vteps
            else:
                self._holders.pop(holder, None)
            wanted = self._wanted()
            errors = []
            try:
                self._converge(wanted - self._programmed)
            except KernelError as exc:
                errors.append(str(exc))
            for peer in sorted(self._programmed - wanted):
                try:
                    self._remove_peer(peer)
                    self._programmed.discard(peer)
                except KernelError as exc:
                    errors.append(str(exc))
            if errors:
                raise KernelError("; ".join(errors))

    def sync_all(self, holders: Dict[str, Iterable[str]]) -> None:
        """Replace the whole desired state (start-up, resync) and remove every SA and policy of ours that it does
        not call for, including those left by an earlier run. Before the VTEP and the ring are known it only
        records the state (what the kernel holds stays, so running traffic keeps flowing): the peers and the
        clean-up follow when the missing half arrives."""
        with self._lock:
            self._holders = {h: set(v) for h, v in holders.items() if v}
            self._prune_owed = True
            self._converge(self._wanted(), prune=True, strict=False)

    def remove_all(self, firewall: bool = False) -> None:
        """Delete every SA and policy vxnet made here (and the firewall table if asked: only when no encrypted
        network is left)."""
        with self._lock:
            self._holders = {}
            self._programmed = set()
            self.xfrm.remove_ours()
            if firewall:
                self.firewall.remove()
                self._firewall_ready = False

    def repair(self) -> Dict[str, int]:
        """Compare the kernel with the desired state and put back what is missing or altered: the fail-closed
        table, and for every wanted peer its SAs (by destination, SPI and key) and policies. Returns kind ("sa",
        "policy", "ipsec-firewall") -> how many objects were wrong (empty: none). Reads only when nothing is wrong
        (netdriver/reconciler.py calls it on every XFRM or nftables event of the host). Before the VTEP and the
        ring are known there is nothing to compare with."""
        with self._lock:
            counts: Dict[str, int] = {}
            if self._firewall_ready and not self.firewall.present():
                self.firewall.ensure()
                counts["ipsec-firewall"] = 1
            wanted = self._wanted()
            if self._local is None or self._ring is None or not wanted:
                return counts
            local, ring = self._local, self._ring
            have = self.xfrm.sas()
            sas = {(s.dst, s.spi): s.key for s in have if s.dport == self.port}
            policies = {(p.src, p.dst, p.direction, p.spi if p.direction == "out" else 0)
                        for p in self.xfrm.policies() if p.dport == self.port}
            errors = []
            for peer in sorted(wanted):
                want_sas = {(local, spi_for(peer, local, k.tag)): k.material for k in ring.keys}
                want_sas[(peer, spi_for(local, peer, ring.primary))] = ring.primary_key.material
                want_policies = {(peer, local, "in", 0), (local, peer, "out", spi_for(local, peer, ring.primary))}
                bad_sas = sum(1 for key, material in want_sas.items() if sas.get(key) != material)
                bad_policies = len(want_policies - policies)
                if not bad_sas and not bad_policies:
                    continue
                try:
                    self._converge_peer(local, peer, ring, have)
                    self._programmed.add(peer)
                except KernelError as exc:
                    self._programmed.discard(peer)
                    errors.append(str(exc))
                    continue
                for kind, count in (("sa", bad_sas), ("policy", bad_policies)):
                    if count:
                        counts[kind] = counts.get(kind, 0) + count
            if errors:
                raise KernelError("; ".join(errors))
            return counts

    # -- kernel ----------------------------------------------------------------------------------------------
    def _require_ready(self) -> Tuple[str, KeyRing]:
        if self._local is None:
            raise KernelError("encryption: this host's VTEP address is not known yet")
        if self._ring is None:
            raise KernelError("encryption: no key ring loaded yet (etcd not read)")
        if not self._firewall_ready:
            self.ensure_firewall()
        return self._local, self._ring

    def _converge(self, peers: Set[str], prune: bool = False, strict: bool = True) -> None:
        """Program `peers` (and with prune, remove what is not wanted). Until both the VTEP and the ring are
        known nothing can be programmed: strict callers (who asked for peers) get the error, the others (the VTEP
        or the ring arriving) return, and the missing half converges when it comes."""
        if not peers and not prune:
            return
        if self._local is None or self._ring is None:
            if peers and strict:
                self._require_ready()
            return
        local, ring = self._require_ready()
        have = self.xfrm.sas()
        errors = []
        for peer in sorted(peers):
            try:
                self._converge_peer(local, peer, ring, have)
                self._programmed.add(peer)
            except KernelError as exc:
                self._programmed.discard(peer)
                errors.append(str(exc))
        if prune:
            try:
                self._prune(local, peers)
                self._programmed &= peers
                self._prune_owed = False
            except KernelError as exc:
                errors.append(str(exc))
        if errors:
            raise KernelError("; ".join(errors))

    def _converge_peer(self, local: str, peer: str, ring: KeyRing, have: List[SAState]) -> None:
        inbound = {spi_for(peer, local, k.tag): k for k in ring.keys}
        out_spi = spi_for(local, peer, ring.primary)
        for spi, key in inbound.items():  # 1
            self.xfrm.ensure_sa(SA(peer, local, spi, key.material, self.port))
        self.xfrm.ensure_sa(SA(local, peer, out_spi, ring.primary_key.material, self.port))  # 2
        self.xfrm.ensure_policy(Policy(peer, local, self.port, "in"))  # 3
        self.xfrm.ensure_policy(Policy(local, peer, self.port, "out", spi=out_spi))  # 4
        for sa in have:
            if sa.dport != self.port:
                continue
            if sa.src == local and sa.dst == peer and sa.spi != out_spi:  # 5
                self.xfrm.delete_sa(sa.dst, sa.spi)
        for sa in have:
            if sa.dport == self.port and sa.src == peer and sa.dst == local and sa.spi not in inbound:  # 6
                self.xfrm.delete_sa(sa.dst, sa.spi)
        log.debug("esp peer=%s local=%s keys=%s primary=%d", peer, local, list(ring.tags), ring.primary)

    def _remove_peer(self, peer: str) -> None:
        local = self._local
        if local is None:
            return
        self.xfrm.delete_policy(local, peer, self.port, "out")
        sas = [s for s in self.xfrm.sas() if s.dport == self.port]
        for sa in sas:
            if sa.src == local and sa.dst == peer:
                self.xfrm.delete_sa(sa.dst, sa.spi)
        self.xfrm.delete_policy(peer, local, self.port, "in")
        for sa in sas:
            if sa.src == peer and sa.dst == local:
                self.xfrm.delete_sa(sa.dst, sa.spi)
        log.info("esp peer removed peer=%s local=%s", peer, local)

    def _prune(self, local: str, peers: Set[str]) -> None:
        """Remove ours that the desired state does not name: other ports, other local addresses, other peers."""
        def wanted(src: str, dst: str, dport: int) -> bool:
            return dport == self.port and ((src == local and dst in peers) or (dst == local and src in peers))

        policies = [p for p in self.xfrm.policies() if not wanted(p.src, p.dst, p.dport)]
        sas = [s for s in self.xfrm.sas() if not wanted(s.src, s.dst, s.dport)]
        # The removal order of _remove_peer: outbound policies, outbound SAs, inbound policies, inbound SAs.
        for policy in policies:
            if policy.direction == "out":
                self.xfrm.delete_policy(policy.src, policy.dst, policy.dport, "out")
        for sa in sas:
            if sa.dst != local:
                self.xfrm.delete_sa(sa.dst, sa.spi)
        for policy in policies:
            if policy.direction == "in":
                self.xfrm.delete_policy(policy.src, policy.dst, policy.dport, "in")
        for sa in sas:
            if sa.dst == local:
                self.xfrm.delete_sa(sa.dst, sa.spi)
