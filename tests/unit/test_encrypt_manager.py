"""EncryptionManager over a fake XFRM that models the kernel's SA and policy tables. Two hosts' fakes are checked
after every single kernel operation: whatever a host sends with, the other can receive, and an outbound policy
is never missing while the peer is wanted (no packet lost, none sent in clear)."""

import errno

import pytest
from pyroute2.netlink.exceptions import NetlinkError

from encrypt import manager as M
from encrypt.ring import KeyRing
from encrypt.spi import spi_for
from kernel import mtu, names
from kernel.probes import EspProbe
from kernel.xfrm import PolicyState, SAState
from tests.fakes import FakeFirewall, FakeXfrm
from wire.errors import EncryptionUnavailable, KernelError

PORT = names.ENCRYPTED_VXLAN_PORT
H1, H2, H3 = "192.0.2.1", "192.0.2.2", "192.0.2.3"


def host(vtep):
    xfrm = FakeXfrm()
    mgr = M.EncryptionManager(xfrm, FakeFirewall(xfrm.ops), PORT)
    mgr.set_local(vtep)
    return mgr, xfrm


def deliverable(sender_vtep, sender, receiver_vtep, receiver) -> bool:
    """Can sender's VXLAN to receiver get through right now? Its outbound policy names an SA that exists on both
    ends with the same key."""
    policy = sender.sp.get((sender_vtep, receiver_vtep, PORT, "out"))
    if policy is None:
        return False
    out = sender.sa.get((receiver_vtep, policy.spi))
    inn = receiver.sa.get((receiver_vtep, policy.spi))
    return out is not None and inn is not None and out.key == inn.key and \
        (sender_vtep, receiver_vtep, PORT, "in") in receiver.sp


def test_rotations_applied_host_by_host_never_break_either_direction():
    (m1, x1), (m2, x2) = host(H1), host(H2)
    ring = KeyRing.initial(now=0)
    for mgr in (m1, m2):
        mgr.set_keyring(ring)
        mgr.set_peers("seg", {H2 if mgr is m1 else H1})
    checked = []

    def invariant():
        checked.append(1)
        assert deliverable(H1, x1, H2, x2), f"h1 -> h2 broken after {x1.ops[-1:]} / {x2.ops[-1:]}"
        assert deliverable(H2, x2, H1, x1), f"h2 -> h1 broken after {x1.ops[-1:]} / {x2.ops[-1:]}"

    invariant()
    x1.after_change = x2.after_change = invariant
    for order in ((m1, m2), (m2, m1), (m1, m2)):
        ring = ring.rotate(now=len(checked))
        for mgr in order:
            mgr.set_keyring(ring)
    assert len(checked) > 20  # the invariant really ran at each step
    for vtep, peer, x in ((H1, H2, x1), (H2, H1, x2)):
        out = [s.spi for s in x.sas() if s.src == vtep]
        assert out == [spi_for(vtep, peer, ring.primary)]
        assert {s.spi for s in x.sas() if s.dst == vtep} == {spi_for(peer, vtep, t) for t in ring.tags}


def test_rotation_order_on_one_host():
    mgr, x = host(H1)
    ring = KeyRing.initial(now=0)
    mgr.set_keyring(ring)
    mgr.set_peers("seg", {H2})
    del x.ops[:]
    new = ring.rotate(now=1)
    mgr.set_keyring(new)
    kinds = [op[0] + (f":{op[1]}" if op[0] == "set_policy" else "") for op in x.ops]
    new_in = spi_for(H2, H1, 3)
    new_out = spi_for(H1, H2, 2)
    assert x.ops.index(("add_sa", H2, H1, new_in)) < x.ops.index(("add_sa", H1, H2, new_out)) \
        < x.ops.index(("set_policy", "out", H1, H2, new_out)) < x.ops.index(("del_sa", H2, spi_for(H1, H2, 1)))
    assert kinds.count("set_policy:out") == 1 and "del_policy" not in kinds


def test_a_peer_stays_while_any_holder_needs_it():
    mgr, x = host(H1)
    mgr.set_keyring(KeyRing.initial(now=0))
    mgr.set_peers("a", {H2, H3})
    mgr.set_peers("b", {H2})
    mgr.set_peers("a", set())
    assert {s.dst for s in x.sas() if s.src == H1} == {H2} and mgr.peers() == {H2: {"b"}}
    mgr.set_peers("b", {H2})  # a replay changes nothing
    ops = len(x.ops)
    mgr.set_peers("b", {H2})
    assert len(x.ops) == ops
    mgr.set_peers("b", [])
    assert x.sa == {} and x.sp == {} and mgr.peers() == {}


def test_removing_a_peer_drops_the_outbound_policy_first():
    mgr, x = host(H1)
    mgr.set_keyring(KeyRing.initial(now=0))
    mgr.set_peers("a", {H2})
    del x.ops[:]
    mgr.set_peers("a", set())
    assert x.ops[0] == ("del_policy", "out", H1, H2)
    assert x.ops.index(("del_policy", "in", H2, H1)) > max(
        i for i, op in enumerate(x.ops) if op[0] == "del_sa" and op[1] == H2)


def test_firewall_is_in_place_before_the_first_sa():
    mgr, x = host(H1)
    mgr.set_keyring(KeyRing.initial(now=0))
    mgr.set_peers("a", {H2})
    assert x.ops[0] == ("firewall",) and mgr.firewall.installed


def test_sync_all_removes_leftovers_of_ours_and_nothing_else():
    mgr, x = host(H1)
    ring = KeyRing.initial(now=0)
    mgr.set_keyring(ring)
    mgr.set_peers("a", {H2, H3})
    foreign = SAState(H1, "198.51.100.7", 0x999, 5, 0, "rfc4106(gcm(aes))", b"k" * 20, 128, 500, 0, 0, 0, 0)
    x.sa[(foreign.dst, foreign.spi)] = foreign
    x.sp[(H1, "198.51.100.7", 500, "out")] = PolicyState(H1, "198.51.100.7", 500, 17, "out", 0x999, 5, False)
    restarted = M.EncryptionManager(x, mgr.firewall, PORT)  # a plugin restart: knows nothing, kernel kept all
    restarted.set_local(H1)
    restarted.set_keyring(ring)
    del x.ops[:]
    restarted.sync_all({"a": {H2}})
    assert all(op[0] in ("del_sa", "del_policy", "firewall") for op in x.ops), x.ops  # nothing re-added
    assert {s.dst for s in x.sas() if s.src == H1} == {H2} and {s.src for s in x.sas() if s.dst == H1} == {H2}
    assert (foreign.dst, foreign.spi) in x.sa and (H1, "198.51.100.7", 500, "out") in x.sp


def test_a_restart_that_reads_peers_before_the_ring_keeps_the_kernel_then_cleans_up():
    mgr, x = host(H1)
    ring = KeyRing.initial(now=0)
    mgr.set_keyring(ring)
    mgr.set_peers("a", {H2, H3})
    restarted = M.EncryptionManager(x, mgr.firewall, PORT)
    restarted.set_local(H1)
    before = dict(x.sa)
    restarted.sync_all({"a": {H2}})  # the peer table came first: no error, nothing touched yet
    assert x.sa == before
    restarted.set_keyring(ring)  # now H3, gone while the plugin was down, is cleaned up
    assert {s.dst for s in x.sas() if s.src == H1} == {H2} and {s.src for s in x.sas() if s.dst == H1} == {H2}
    assert {(p.src, p.dst) for p in x.policies()} == {(H1, H2), (H2, H1)}


def test_a_new_local_address_rekeys_and_removes_the_old_sas():
    mgr, x = host(H1)
    ring = KeyRing.initial(now=0)
    mgr.set_keyring(ring)
    mgr.set_peers("a", {H2})
    mgr.set_local(H3)
    assert {(s.src, s.dst) for s in x.sas()} == {(H3, H2), (H2, H3)}
    assert {(p.src, p.dst) for p in x.policies()} == {(H3, H2), (H2, H3)}


def test_failures_raise_after_the_other_peers_and_are_retried():
    mgr, x = host(H1)
    mgr.set_keyring(KeyRing.initial(now=0))
    x.fail_for = {H3}
    with pytest.raises(KernelError, match="192.0.2.3 -> 192.0.2.1: injected failure"):
        mgr.set_peers("a", {H2, H3})
    assert {s.dst for s in x.sas() if s.src == H1} == {H2}
    assert mgr.peers() == {H2: {"a"}, H3: {"a"}}  # desired state kept for the retry
    x.fail_for = set()
    mgr.set_peers("a", {H2, H3})  # the same call again (the next event): the failed peer is retried
    assert {s.dst for s in x.sas() if s.src == H1} == {H2, H3}


def test_nothing_is_programmed_before_the_vtep_and_the_ring_are_known():
    x = FakeXfrm()
    mgr = M.EncryptionManager(x, FakeFirewall(x.ops), PORT)
    with pytest.raises(KernelError, match="VTEP"):
        mgr.set_peers("a", {H2})
    mgr.set_local(H1)
    with pytest.raises(KernelError, match="no key ring"):
        mgr.set_peers("a", {H2})
    assert x.sa == {}
    mgr.set_keyring(KeyRing.initial(now=0))
    assert {s.dst for s in x.sas() if s.src == H1} == {H2}


def test_inner_mtu_leaves_room_for_esp_and_vxlan():
    assert mtu.inner_mtu(1500) == 1416  # checked on the wire in the guest: ESP packets of exactly 1500 bytes
    for underlay in range(1280, 9001, 7):
        inner = mtu.inner_mtu(underlay)
        payload = 2 + 8 + 8 + 14 + inner
        padded = (payload + 3) // 4 * 4
        assert 20 + 8 + 8 + padded + 16 <= underlay < 20 + 8 + 8 + padded + 16 + 4 + 4


def test_a_kernel_without_esp_is_refused_with_the_modules_named():
    def refuse():
        try:
            raise NetlinkError(errno.ENOSYS, "Requested AEAD algorithm not found")
        except NetlinkError as exc:
            raise KernelError("add ESP SA: refused") from exc

    # A kernel with xfrm_user built in, gcm a module not loaded, and nothing else: no module loaded, none in
    # modules.builtin.
    esp = EspProbe(try_sa=refuse, config=lambda: {"CONFIG_XFRM_USER": "y", "CONFIG_CRYPTO_GCM": "m"},
                   builtin=set, loaded=lambda name: False)
    with pytest.raises(EncryptionUnavailable) as exc:
        esp.require()
    text = str(exc.value)
    assert "Requested AEAD algorithm not found" in text
    assert "esp4 (CONFIG_INET_ESP is not set)" in text and "gcm (not loaded)" in text
    assert "xfrm_user (" not in text.split("Missing:")[1].split(".")[0]
    assert "modprobe -a" in text and "without -o encrypted" in text
    assert exc.value.status == 501 and not esp.supported()
    xfrm = FakeXfrm()
    mgr = M.EncryptionManager(xfrm, FakeFirewall(xfrm.ops), PORT, esp)
    with pytest.raises(EncryptionUnavailable):
        mgr.require()
    assert not mgr.firewall.installed  # refused before anything is made


def test_require_installs_the_firewall_where_esp_works():
    xfrm = FakeXfrm()
    mgr = M.EncryptionManager(xfrm, FakeFirewall(xfrm.ops), PORT, EspProbe(try_sa=lambda: None))
    mgr.require()
    assert mgr.firewall.installed and xfrm.ops == [("firewall",)] and xfrm.sa == {} and xfrm.sp == {}


def test_repair_puts_back_what_someone_else_deleted_and_reports_it():
    (m1, x1), (m2, x2) = host(H1), host(H2)
    ring = KeyRing.initial(now=0)
    for mgr, peer in ((m1, H2), (m2, H1)):
        mgr.ensure_firewall()
        mgr.set_keyring(ring)
        mgr.set_peers("seg", {peer})
    ops = len(x1.ops)
    assert m1.repair() == {} and len(x1.ops) == ops  # right already: nothing reported, nothing written
    out_spi = spi_for(H1, H2, ring.primary)
    x1.delete_sa(H2, out_spi)  # `ip xfrm state delete` by hand
    x1.delete_policy(H2, H1, PORT, "in")
    assert not deliverable(H1, x1, H2, x2)  # control: the deletion broke it
    m1.firewall.installed = False  # `nft delete table inet vxnet_ipsec`
    assert m1.repair() == {"sa": 1, "policy": 1, "ipsec-firewall": 1}
    assert deliverable(H1, x1, H2, x2) and deliverable(H2, x2, H1, x1) and m1.firewall.installed
    assert m1.repair() == {}
