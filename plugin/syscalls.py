"""The few Linux calls Python 3.11's os module lacks (setns, unshare, mount), through libc: one place for both
the netlink thread (netdriver/links.py) and the XFRM sockets (encrypt/xfrm.py). Each affects only the calling
thread's network namespace; callers decide which thread that is."""

import ctypes
import ctypes.util
import os

CLONE_NEWNET = 0x40000000  # <linux/sched.h>
MS_BIND = 0x1000  # <linux/mount.h>

_libc = None


def libc_call(name: str, *args) -> None:
    """Call a libc function that returns 0 on success; OSError with its errno otherwise."""
    global _libc
    _libc = _libc or ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if getattr(_libc, name)(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")


def setns(fd: int) -> None:
    """Move the calling thread into the network namespace open at fd."""
    libc_call("setns", fd, CLONE_NEWNET)


def unshare_net() -> None:
    """Move the calling thread into a new, empty network namespace."""
    libc_call("unshare", CLONE_NEWNET)
