"""A namespace made where /proc/sys is read-only, as in the managed plugin (a runc container: moby's OCI default
spec lists /proc/sys among its readonlyPaths): Links.ensure_netns still sets the namespace's IPv6 defaults. Found by
the VIP guest (tests/ipsec/test_vip_guest.py), whose managed plugin could create no network at all ("create
namespace ...: Read-only file system"). Runs in a private mount namespace of its own (unshare --mount), where
/proc/sys is made read-only the way runc does it (a bind mount of itself, remounted read-only): the machine's
/proc/sys is never touched. Where the remount fails too, the error says so and no half-built namespace stays."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and mounts")

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_SCENARIO = r"""
import errno, os, subprocess, sys, tempfile
from kernel import links as links_module
from kernel.links import Links
from wire.errors import KernelError
from kernel.syscalls import MNT_DETACH, MS_BIND, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_RDONLY, MS_REMOUNT, libc_call

libc_call("mount", b"/proc/sys", b"/proc/sys", None, MS_BIND, None)
libc_call("mount", None, b"/proc/sys", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
          None)
try:  # the control: the plugin's condition is reproduced
    with open("/proc/sys/net/ipv6/conf/default/accept_ra", "w") as f:
        f.write("1")
    sys.exit("/proc/sys is still writable: the scenario does not reproduce a read-only /proc/sys")
except OSError as exc:
    assert exc.errno == errno.EROFS, exc
folder = tempfile.mkdtemp(prefix="vxnet-rosys-")
links = Links(folder)
path = os.path.join(folder, "vxnet-rosys")
try:
    # Where the remount is refused too (a kernel policy forbids it), the error says so and no namespace is left,
    # so that a replay makes it whole.
    real = links_module._proc_sys_writable
    links_module._proc_sys_writable = lambda: (_ for _ in ()).throw(KernelError("remount refused (test)"))
    try:
        links.ensure_netns("vxnet-rosys")
        sys.exit("ensure_netns passed without its IPv6 defaults")
    except KernelError as exc:
        assert "remount refused (test)" in str(exc), exc
    finally:
        links_module._proc_sys_writable = real
    assert not os.path.exists(path) and not links.netns_exists("vxnet-rosys"), "a half-built namespace was left"
    links.ensure_netns("vxnet-rosys")
    got = {key: subprocess.run(["nsenter", f"--net={path}", "cat", f"/proc/sys/net/ipv6/conf/default/{key}"],
                               capture_output=True, text=True, check=True).stdout.strip()
           for key in ("addr_gen_mode", "accept_ra")}
    assert got == {"addr_gen_mode": "1", "accept_ra": "0"}, got
    links.ensure_netns("vxnet-rosys")  # a replay changes nothing and fails nothing
    links.remove_netns("vxnet-rosys")
finally:
    links.close()
    libc_call("umount2", folder.encode(), MNT_DETACH)  # prepare_netns_dir made the folder a mount of itself
    os.rmdir(folder)
print("ok")
"""


def test_a_namespace_gets_its_ipv6_defaults_where_proc_sys_is_read_only():
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", "--", sys.executable, "-c", _SCENARIO],
                         cwd=_REPO, capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=_REPO))
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout + out.stderr
