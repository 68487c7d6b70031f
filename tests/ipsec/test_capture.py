"""The capture the guest's "no cleartext" checks count on (tests/ipsec/inguest.py's Capture and Probe), on this
machine's kernel: it counts what crosses between its control frames and its final marker, and a capture that
cannot see the hosts' traffic fails instead of reporting zero. Three scratch namespaces: an underlay bridge and
two hosts on it, as in the guest."""

import os
import subprocess

import pytest

from tests.ipsec import inguest
from tests.ipsec.inguest import Capture, Probe

VTEP = inguest.VTEP


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


@pytest.fixture
def underlay():
    """{"ul": name, "h1": name, "h2": name}: the bridge br0 in ul, each host's eth0 on it with its VTEP address."""
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    ns = {role: f"vxnet-cap{os.getpid()}-{role}" for role in ("ul", "h1", "h2")}
    made = []
    try:
        for name in ns.values():
            sh("ip", "netns", "add", name)
            made.append(name)
            # No IPv6: a new interface's router solicitations and MLD reports would cross the quiet capture.
            sh("ip", "netns", "exec", name, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1",
               "net.ipv6.conf.default.disable_ipv6=1")
        # No multicast snooping: a snooping bridge joins 224.0.0.106 (multicast router discovery, RFC 4286) and
        # sends an IGMPv3 report for it, from 0.0.0.0, seconds after it comes up: it crossed the quiet capture in CI.
        sh("ip", "-n", ns["ul"], "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        sh("ip", "-n", ns["ul"], "link", "set", "br0", "up")
        for host in ("h1", "h2"):
            sh("ip", "link", "add", f"{host}-ul", "netns", ns["ul"], "type", "veth", "peer", "name", "eth0",
               "netns", ns[host])
            sh("ip", "-n", ns["ul"], "link", "set", f"{host}-ul", "master", "br0", "up")
            sh("ip", "-n", ns[host], "addr", "add", f"{VTEP[host]}/24", "dev", "eth0")
            sh("ip", "-n", ns[host], "link", "set", "eth0", "up")
        yield ns
    finally:
        failed = [name for name in made  # the veths go with their namespaces
                  if subprocess.run(["ip", "netns", "del", name], capture_output=True).returncode != 0]
        assert not failed, f"could not delete namespaces {failed}"


@pytest.fixture
def probe(underlay):
    p = Probe(f"/run/netns/{underlay['h1']}", "eth0", VTEP["h1"], VTEP["h2"])
    yield p
    p.close()


def test_counts_what_crosses_after_the_controls_and_before_the_marker(underlay, probe):
    quiet = Capture(probe, ns=underlay["ul"]).stop()
    assert quiet == {"esp": 0, "udp_encrypted_port": 0, "udp_other": 0, "other": 0, "max_ip_len": 0}, quiet

    cap = Capture(probe, ns=underlay["ul"])
    probe.send(probe.cleartext_vxlan(b"leak-one"))
    probe.send(probe.esp(b"leak-two"))
    out = subprocess.run(["ip", "netns", "exec", underlay["h1"], "ping", "-n", "-q", "-c", "3", "-i", "0.2",
                          "-W", "2", VTEP["h2"]], capture_output=True, text=True, timeout=30).stdout
    seen = cap.stop()
    assert inguest.parse_ping(out)["received"] == 3, out
    assert seen["udp_encrypted_port"] == 1 and seen["esp"] == 1, f"the leaked frames were not counted: {seen}"
    assert seen["other"] >= 6, f"3 ICMP requests and 3 replies crossed: {seen}"


def test_a_capture_that_cannot_see_the_hosts_fails(underlay, probe, monkeypatch):
    # An interface of the underlay namespace that is not on the bridge: up, but nothing of the hosts reaches it.
    sh("ip", "-n", underlay["ul"], "link", "add", "blind0", "type", "veth", "peer", "name", "blind1")
    for dev in ("blind0", "blind1"):
        sh("ip", "-n", underlay["ul"], "link", "set", dev, "up")
    monkeypatch.setattr(Capture, "TIMEOUT", 3)
    with pytest.raises(TimeoutError, match=r"the capture to record the control frames \(cleartext VXLAN, ESP\)"):
        Capture(probe, ns=underlay["ul"], iface="blind0")
    seeing = Capture(probe, ns=underlay["ul"]).stop()  # the same probe, on the bridge: seen
    assert seeing["udp_encrypted_port"] == 0, seeing
