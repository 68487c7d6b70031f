"""The encrypted data path in a kernel that has ESP: one guest boot runs every check of tests/ipsec/inguest.py
(two simulated hosts, VXLAN on the encrypted port, IPsec programmed by encrypt/), and each check is reported here
as a test of its own. Skipped with the reason where qemu or the kernel package cannot be had; a guest that boots
and then fails or hangs fails."""

import json
import sys

import pytest

from tests.ipsec import guest, inguest

# Measured here: about 4 s to boot, about 45 s for the checks under TCG. The bound leaves room for a loaded CI
# machine; a hang is cut off and fails.
GUEST_TIMEOUT = 300


@pytest.fixture(scope="module")
def guest_run(guest_image):
    result = guest.run(guest_image, [sys.executable, "-m", "tests.ipsec.inguest"], timeout=GUEST_TIMEOUT)
    checks = {}
    for line in result.output.splitlines():
        if line.startswith(inguest.MARKER + " "):
            record = json.loads(line[len(inguest.MARKER) + 1:])
            checks[record["name"]] = record
    return result, checks


def _tail(result, lines: int = 60) -> str:
    return "\n".join(result.output.splitlines()[-lines:])


def test_guest_runs_to_the_end(guest_run):
    result, checks = guest_run
    assert not result.timed_out, f"the guest did not finish within {GUEST_TIMEOUT} s:\n{_tail(result)}"
    assert result.exit_code is not None, f"the guest ended without an exit code:\n{_tail(result)}"
    print(f"guest: booted in {result.boot_seconds} s, {result.seconds:.1f} s in qemu, "
          f"{len(checks)} checks ({sum(c['seconds'] for c in checks.values()):.1f} s)")


@pytest.mark.parametrize("name", inguest.CHECK_NAMES)
def test_in_guest(guest_run, name):
    result, checks = guest_run
    record = checks.get(name)
    assert record is not None, f"check {name} never reported (exit {result.exit_code}):\n{_tail(result)}"
    assert record["ok"], record["detail"]
