"""Fixtures for kernel tests: a real etcd on loopback for code running in this process. Several-host tests use
`hosts(n, docker=False)` from tests/conftest.py: namespaces joined by the underlay bridge, no dockerd.

    def test_in_process(etcd):                 # EtcdServer on 127.0.0.1, free ports, session-wide
        kv = EtcdKV([etcd.url]); ...           # use a key prefix of your own, or etcd.delete_prefix() after

    def test_two_hosts(hosts, lab):
        h1, h2 = hosts(2, docker=False)        # h1.ip, h1.run([...]), h1.spawn([...], "name")
        lab.etcd.url                           # the etcd every simulated host reaches (192.168.251.1:2379)
"""

import subprocess

import pytest

from kernel import netnsdir
from tests.harness.etcd import EtcdServer


@pytest.fixture(scope="session")
def etcd():
    """A real single-member etcd on loopback with a temporary data dir, stopped and removed after the session."""
    server = EtcdServer().start()
    yield server
    server.close()


@pytest.fixture
def netns_dir(tmp_path):
    """A namespace folder of this test's own (start-up removes every vxnet namespace its etcd does not know).
    Links makes it a mount of itself before its first namespace, as it does /run/netns; the mount goes after."""
    path = str(tmp_path / "netns")
    yield path
    while netnsdir.top_mount(netnsdir._read_mounts(), path) is not None:
        subprocess.run(["umount", "--lazy", path], check=True, timeout=30)
