"""Fixtures for end-to-end tests: real dockerds in simulated hosts (`hosts`, from tests/conftest.py), the test
etcd they all reach, and the plugin as a host process in a host.

    def test_something(hosts, vxnet_plugin, etcd):
        (host,) = hosts(1)               # fresh hosts, torn down after the test
        plugin = vxnet_plugin(host)      # `python3 -m plugin` in the host, answering on its socket
        host.docker("network", "create", "-d", "vxnet", "--ipam-driver", "vxnet", "--subnet", ..., "net1")
        plugin.restart(); plugin.kill(); plugin.start()
        etcd.keys(schema.PREFIX + "/"); etcd.pause(); etcd.resume()
"""

import pytest

from tests.harness.plugin import Plugin


@pytest.fixture(scope="session")
def etcd(lab):
    """The test etcd (session-wide) in the underlay: every host reaches it at etcd.url; `hosts` empties its
    /vxnet/ tree before each test."""
    return lab.etcd


@pytest.fixture
def vxnet_plugin(etcd, request):
    """Factory: vxnet_plugin(host, env=None, wait=True) starts the plugin in host against the test etcd,
    advertising the host's underlay address, and waits until it answers. Returns a Plugin (stop, kill,
    start, restart, alive, log). The host's teardown stops it; its log is attached to a failed test's report."""
    plugins = []
    request.node.vxnet_plugins = plugins

    def start(host, env=None, wait: bool = True) -> Plugin:
        plugin = Plugin(host, etcd.url, env)
        plugins.append(plugin)
        return plugin.start(wait=wait)

    return start
