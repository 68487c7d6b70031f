"""Shared by every test layer: markers by folder, the simulated-host lab and its hosts, logs kept on failure.

    def test_x(hosts):
        h1, h2 = hosts(2)                  # simulated Docker hosts (dockerd + test image), torn down after
        h3, = hosts(1, docker=False)       # namespaces and underlay only
"""

import os
import re
import signal

import pytest

from tests.harness.proc import HarnessError

pytest_plugins = ["tests.ci_skips"]

_LAYERS = ("unit", "kernel", "e2e", "ipsec")
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    """`timeout` and CI runners stop a run with SIGTERM, whose default action skips every teardown and would
    leave the session's dockerds, etcd and namespaces running: make it an interrupt, which pytest unwinds
    through the fixtures' finalizers."""
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_collection_modifyitems(items):
    """Mark each test with its layer (its folder under tests/), so `-m "not e2e"` works without decorators."""
    for item in items:
        parts = os.path.relpath(str(item.fspath), os.path.dirname(__file__)).split(os.sep)
        if parts[0] in _LAYERS:
            item.add_marker(getattr(pytest.mark, parts[0]))


@pytest.fixture(scope="session")
def lab():
    """The underlay namespace with the test etcd on 192.168.251.1:2379 (lab.etcd); hosts are added per test.

    Made on first use, torn down at the end of the session (a leak fails the session)."""
    from tests.harness.hosts import Lab

    lab = Lab().start()
    yield lab
    errors = lab.teardown()
    if errors:
        raise HarnessError("lab teardown: " + "; ".join(errors))


@pytest.fixture
def hosts(lab, request):
    """Factory: hosts(n, docker=True) starts n more simulated hosts for this test, with dockerd and the test
    image unless docker=False. The lab's etcd starts empty for each test (everything under /vxnet/ is deleted
    first). The hosts, and everything started in them, are torn down after the test; the logs of a failed
    test's hosts are kept in build/test-logs/<test name>/<host>/."""
    lab.etcd.delete_prefix("/vxnet/")
    made = []
    request.node.vxnet_hosts = made

    def make(count: int = 1, docker: bool = True):
        new = lab.add_hosts(count, docker=docker)
        made.extend(new)
        return new

    yield make
    keep = None
    if getattr(request.node, "vxnet_failed", False):
        keep = os.path.join(_REPO, "build", "test-logs", re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name))
    errors = lab.remove_hosts(made, keep_logs=keep)
    if errors:
        raise HarnessError("host teardown: " + "; ".join(errors))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On a failure, attach the plugin's and dockerd's logs of every host the test used, and mark the test so
    the hosts fixture keeps the logs."""
    outcome = yield
    report = outcome.get_result()
    if not report.failed or call.when == "teardown":
        return
    item.vxnet_failed = True
    for plugin in getattr(item, "vxnet_plugins", []):
        report.sections.append((f"vxnet plugin log ({plugin.host.name}, last 200 lines)", plugin.log(200)))
    for host in getattr(item, "vxnet_hosts", []):
        if host.dockerd:
            report.sections.append((f"dockerd log ({host.name}, last 40 lines)", host.dockerd_log(40)))
