"""kernel/netns.py against real namespaces: a job runs inside the namespace it names, its result or its exception
comes back to the caller, and no thread but the one made for the job (or the one that went in) ever moves."""

import os
import secrets
import threading

import pytest

from kernel.links import Links
from kernel.netns import inside, run_inside


def here() -> int:
    """The inode of the calling thread's network namespace."""
    return os.stat("/proc/thread-self/ns/net").st_ino


@pytest.fixture
def target(netns_dir):
    links = Links(netns_dir)
    name = f"vxnet-nstest-{secrets.token_hex(3)}"
    links.ensure_netns(name)
    try:
        yield links.netns_path(name)
    finally:
        links.remove_netns(name)
        links.close()
        assert not os.path.exists(os.path.join(netns_dir, name))


def test_a_job_runs_inside_and_the_caller_never_moves(target):
    home = here()
    inode = os.stat(target).st_ino
    assert inode != home  # the namespaces differ, so the comparisons below can tell them apart
    assert run_inside(target, here) == inode
    assert here() == home
    assert run_inside(None, here) == home  # no namespace: right here, on the caller's thread


def test_a_fresh_namespace_is_neither_home_nor_the_target(target):
    home = here()
    fresh = run_inside(None, here, fresh=True)
    assert fresh not in (home, os.stat(target).st_ino)
    assert here() == home


def test_the_jobs_exception_reaches_the_caller_at_home(target):
    home = here()

    def fail():
        raise LookupError(f"inside {here()}")

    with pytest.raises(LookupError, match=f"inside {os.stat(target).st_ino}$"):
        run_inside(target, fail)
    assert here() == home
    with pytest.raises(FileNotFoundError):
        run_inside(target + "-missing", here)
    assert here() == home


def test_a_thread_that_went_in_comes_home_whatever_the_body_raised(target):
    seen = {}

    def excursion():
        seen["home"] = here()
        try:
            with inside(target):
                seen["inside"] = here()
                raise LookupError("body failed")
        except LookupError:
            pass
        seen["after"] = here()
        with inside(fresh=True):
            seen["fresh"] = here()
        seen["after fresh"] = here()

    thread = threading.Thread(target=excursion)
    thread.start()
    thread.join()
    assert seen["inside"] == os.stat(target).st_ino != seen["home"]
    assert seen["fresh"] not in (seen["home"], seen["inside"])
    assert seen["after"] == seen["after fresh"] == seen["home"] == here()
