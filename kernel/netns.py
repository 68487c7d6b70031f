"""The one way vxnet enters a network namespace: a thread goes in, does the work, and comes home.

setns(2) and unshare(2) with CLONE_NEWNET move only the calling thread (a namespace is a property of the task,
and every thread is a task of its own); the process's other threads, and the namespace it was started in, stay
where they were. A socket keeps the namespace it was created in for its whole life, whichever thread uses it
later and wherever that thread is. So a socket for a namespace is made by a thread that enters the namespace,
creates the socket and leaves; nothing forks (pyroute2 forks a helper per namespace, which can deadlock a
process whose other threads hold locks), and nothing but that thread ever moves.

Two kinds of thread do this:
  - kernel/links.py's netlink thread, long-lived, enters with `inside()` for each socket it opens or nftables
    batch it runs, and is home again before the next call;
  - everyone else (kernel/xfrm.py's sockets, the tests' packet sockets) calls `run_inside()`, which makes a
    thread for the one job, so the caller's thread never moves.
"""

import contextlib
import os
import threading
from typing import Callable, Iterator, Optional, TypeVar

from kernel.syscalls import setns, unshare_net

T = TypeVar("T")


@contextlib.contextmanager
def inside(path: Optional[str] = None, fresh: bool = False) -> Iterator[None]:
    """Run the body with the calling thread in the namespace mounted at `path` (fresh=True: a new, empty one, which
    lives as long as something holds it: a socket made in the body, a bind mount of /proc/thread-self/ns/net), then
    bring the thread back to the namespace it was in, whatever the body raised. path None without fresh: the body
    runs where the thread is."""
    if path is None and not fresh:
        yield
        return
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)  # this thread's, not /proc/self's (the main thread's)
    try:
        if fresh:
            unshare_net()
        else:
            fd = os.open(path, os.O_RDONLY)
            try:
                setns(fd)
            finally:
                os.close(fd)
        try:
            yield
        finally:
            setns(home)
    finally:
        os.close(home)


def run_inside(path: Optional[str], job: Callable[[], T], fresh: bool = False, name: str = "netns") -> T:
    """job() on a thread made for it inside the namespace at `path` (or a fresh one, as `inside()`); returns what
    it returned, or raises what it raised, on the caller's thread, which never moves. path None without fresh:
    job() runs right here."""
    if path is None and not fresh:
        return job()
    result = {}

    def enter_and_run():
        try:
            with inside(path, fresh):
                result["value"] = job()
        except BaseException as exc:  # handed to the caller's thread
            result["error"] = exc

    thread = threading.Thread(target=enter_and_run, name=name, daemon=True)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]
