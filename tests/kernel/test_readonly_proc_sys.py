"""A namespace made where /proc/sys is read-only, as in the managed plugin (runc mounts /proc/sys as a read-only
bind, the OCI runtime spec's readonlyPaths): it still gets the IPv6 defaults kernel/links.py sets in every new
namespace (addr_gen_mode 1, accept_ra 0), and a failure leaves no namespace behind.

The plugin's side runs in a child process with a mount namespace of its own (unshare --mount, private), in which
/proc/sys is made a read-only bind over itself, as runc does: nothing of it reaches this machine's mounts, and
the child's namespace folder, its procfs and its namespaces go with it."""

import subprocess
import sys
import textwrap

from tests.harness.plugin import REPO

_CHILD = textwrap.dedent("""
    import os, sys, tempfile
    from kernel import links as links_module
    from kernel.links import Links
    from kernel.netns import run_inside
    assert os.statvfs("/proc/sys").f_flag & os.ST_RDONLY, "the setup did not make /proc/sys read-only"
    try:
        open("/proc/sys/net/ipv6/conf/default/accept_ra", "w").close()
        raise SystemExit("a write to the read-only /proc/sys went through: the test proves nothing")
    except OSError as exc:
        assert exc.errno == 30, exc  # EROFS: what the managed plugin met on every network creation
    folder = tempfile.mkdtemp()
    links = Links(folder)
    links.ensure_netns("vxnet-rotest")
    path = links.netns_path("vxnet-rotest")
    for key, want in (("addr_gen_mode", "1"), ("accept_ra", "0")):
        got = run_inside(path, lambda key=key: open(
            f"/proc/sys/net/ipv6/conf/default/{key}").read().strip())
        assert got == want, (key, got)
    links.ensure_netns("vxnet-rotest")  # a replay changes nothing
    # When the defaults cannot be written at all (here: the plugin's own procfs taken to be the read-only /proc),
    # the half-made namespace is removed, not left for a replay to take as finished.
    links_module._private_proc = "/proc"
    try:
        links.ensure_netns("vxnet-rotest2")
        raise SystemExit("ensure_netns succeeded without its defaults")
    except Exception as exc:
        assert "vxnet-rotest2" in str(exc), exc
    assert not links.netns_exists("vxnet-rotest2") and not os.path.exists(links.netns_path("vxnet-rotest2"))
    links.remove_netns("vxnet-rotest")
    links.close()
    print("ok")
""")


def test_namespace_defaults_are_set_through_a_read_only_proc_sys():
    script = "mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys && exec \"$0\" -c \"$1\""
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, sys.executable,
                           _CHILD], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr
