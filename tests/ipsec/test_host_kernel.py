"""encrypt/ against this machine's kernel, which has XFRM netlink and nftables but no ESP: the refusal an
encrypted network meets here, policies over our netlink module, and the fail-closed table, each in a scratch
namespace. (Everything that needs ESP runs in the guest: test_esp_guest.py.)"""

import json
import os
import subprocess

import pytest

from encrypt.firewall import LABEL_IN, LABEL_OUT, TABLE, Firewall
from kernel.links import Links
from kernel.names import XFRM_REQID as REQID
from kernel.probes import EspProbe
from kernel.xfrm import SA, Policy, Xfrm
from wire.errors import EncryptionUnavailable, KernelError

A, B = "192.0.2.1", "192.0.2.2"


def test_a_kernel_without_esp_refuses_at_once_naming_the_modules():
    esp = EspProbe()
    if esp.supported():
        pytest.skip("this kernel has ESP: the refusal is checked on one that lacks it (test_encrypt_manager "
                    "covers the message)")
    with pytest.raises(EncryptionUnavailable) as exc:
        esp.require()
    text = str(exc.value)
    assert text.startswith("this kernel cannot encrypt VXLAN with IPsec ESP")
    assert "esp4 (" in text and "gcm" in text and "modprobe -a" in text and "without -o encrypted" in text
    assert exc.value.status == 501


def ip_xfrm(netns, *args):
    return subprocess.run(["ip", "-n", netns.rsplit("/", 1)[1], "xfrm", *args], check=True, capture_output=True,
                          text=True).stdout


def test_policies_are_idempotent_and_only_ours_are_touched(scratch_netns):
    # Someone else's policy on the same port: vxnet must neither list nor remove it.
    ip_xfrm(scratch_netns, "policy", "add", "src", "198.51.100.1/32", "dst", "198.51.100.2/32", "proto", "udp",
            "dport", "4790", "dir", "out", "tmpl", "proto", "esp", "mode", "transport", "reqid", "7")
    with Xfrm(scratch_netns) as xfrm:
        for _ in range(2):
            xfrm.ensure_policy(Policy(A, B, 4790, "out", spi=0x1234))
            xfrm.ensure_policy(Policy(B, A, 4790, "in"))
        xfrm.ensure_policy(Policy(A, B, 4790, "out", spi=0x5678))  # the switch a rotation makes
        ours = {(p.direction, p.src, p.dst): p for p in xfrm.policies()}
        assert set(ours) == {("out", A, B), ("in", B, A)}
        assert ours[("out", A, B)].spi == 0x5678 and ours[("in", B, A)].spi == 0
        assert all(p.reqid == REQID and p.dport == 4790 and p.proto == 17 and not p.optional for p in ours.values())
        assert len(xfrm.policies(ours_only=False)) == 3
        assert xfrm.delete_policy(B, A, 4790, "in") and not xfrm.delete_policy(B, A, 4790, "in")
        assert xfrm.remove_ours() == 1 and xfrm.policies() == []
    assert "198.51.100.2" in ip_xfrm(scratch_netns, "policy", "list")


def test_sas_where_the_kernel_has_esp_and_a_clear_error_where_not(scratch_netns):
    sa = SA(A, B, 0x4321, bytes(20), 4790)
    with Xfrm(scratch_netns) as xfrm:
        if not EspProbe().supported():
            with pytest.raises(KernelError, match="add ESP SA spi 0x00004321 192.0.2.1 -> 192.0.2.2 in .*: "):
                xfrm.ensure_sa(sa)
            assert xfrm.sas() == []
            return
        xfrm.ensure_sa(sa)
        xfrm.ensure_sa(sa)
        assert [s.spi for s in xfrm.sas()] == [0x4321]
        xfrm.ensure_sa(SA(A, B, 0x4321, b"\1" * 20, 4790))  # other key, same SPI: replaced
        assert xfrm.get_sa(B, 0x4321).key == b"\1" * 20
        assert xfrm.delete_sa(B, 0x4321) and not xfrm.delete_sa(B, 0x4321)


def test_firewall_table_is_idempotent_and_labelled(scratch_netns):
    links = Links(os.path.dirname(scratch_netns))
    fw = Firewall(4790, links.nft, os.path.basename(scratch_netns))
    assert fw.counters() == {} and not fw.present()
    fw.ensure()
    fw.ensure()
    listing = json.loads(subprocess.run(["nsenter", f"--net={scratch_netns}", "nft", "-j", "list", "ruleset"],
                                        check=True, capture_output=True, text=True).stdout)
    rules = [item["rule"] for item in listing["nftables"] if "rule" in item]
    assert sorted(r["comment"] for r in rules) == sorted([LABEL_IN, LABEL_OUT])
    assert all(r["table"] == TABLE for r in rules)
    assert fw.present() and fw.counters() == {LABEL_IN: 0, LABEL_OUT: 0}
    fw.remove()
    fw.remove()
    assert fw.counters() == {}
    links.close()
