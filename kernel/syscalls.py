"""The few Linux calls Python 3.11's os module lacks (setns, unshare, mount, umount2), through libc: one place for
entering namespaces (kernel/netns.py), creating them (kernel/links.py) and the namespace folder
(kernel/netnsdir.py). setns and unshare affect only the calling thread's network namespace: kernel/netns.py is
where threads go in and come home."""

import ctypes
import ctypes.util
import os

CLONE_NEWNET = 0x40000000  # <linux/sched.h>
# <linux/mount.h>
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_BIND = 0x1000
MS_REC = 0x4000
MS_SHARED = 1 << 20
MNT_DETACH = 0x2  # umount2(2): lazy, takes the mount and everything under it off the tree at once

_libc = None


def libc_call(name: str, *args) -> None:
    """Call a libc function that returns 0 on success; OSError with its errno otherwise."""
    global _libc
    _libc = _libc or ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if getattr(_libc, name)(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")


# <linux/prctl.h>; the name is at most TASK_COMM_LEN - 1 = 15 bytes (the kernel cuts the rest)
PR_SET_NAME = 15


def set_thread_name(name: str) -> None:
    """Name the calling thread (its comm: /proc/thread-self/comm, `top -H` and kernel notifications show it)."""
    libc_call("prctl", PR_SET_NAME, name.encode(), 0, 0, 0)


def setns(fd: int) -> None:
    """Move the calling thread into the network namespace open at fd."""
    libc_call("setns", fd, CLONE_NEWNET)


def unshare_net() -> None:
    """Move the calling thread into a new, empty network namespace."""
    libc_call("unshare", CLONE_NEWNET)
