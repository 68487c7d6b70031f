"""Fixtures for tests/ipsec: the qemu guest with a kernel that has ESP (this machine's has none), and a scratch
network namespace on this machine for what its kernel can do (XFRM policies over netlink, the nftables table).

    def test_x(guest_image):          # prepared once per session; skipped, with the reason, if qemu cannot run
        guest.run(guest_image, [sys.executable, "-m", "tests.ipsec.inguest"])

    def test_y(scratch_netns):        # "/run/netns/<name>", removed after the test
"""

import os
import subprocess

import pytest

from tests.ipsec import guest


@pytest.fixture(scope="session")
def guest_image():
    try:
        return guest.prepare()
    except guest.GuestUnavailable as exc:
        pytest.skip(f"the ESP guest cannot run here: {exc}")


@pytest.fixture
def scratch_netns():
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    name = f"vxnet-ipsec-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield f"/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)
