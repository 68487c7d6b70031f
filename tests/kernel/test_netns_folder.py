"""The namespace folder on a machine as it is after a boot (/run/netns no mount point yet) and after iproute2's
first `ip netns add`: vxnet's namespaces stay reachable and removable, and ones an earlier ordering hid are
mounted back. Each scenario runs in a private mount namespace of its own (tests/kernel/fresh_netns.py), so the
machine's /run/netns is never touched."""

import os
import secrets
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and mounts")

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _scenario(*args: str) -> None:
    out = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "--", sys.executable, "-m", "tests.kernel.fresh_netns",
         args[0], secrets.token_hex(4), *args[1:]],
        cwd=_REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout + out.stderr


@pytest.mark.parametrize("scenario", ["fresh_machine", "repair", "shared_parent"])
def test_namespace_folder(scenario):
    _scenario(scenario)


def test_start_up_skips_a_leftover_it_cannot_clean_and_reconciles_the_rest(etcd):
    _scenario("leftover", etcd.url)
