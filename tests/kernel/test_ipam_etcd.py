"""The IPAM driver against a real etcd: parallel allocation from two hosts, and etcd going away."""

import os
import shutil
import socket
import subprocess
import threading
import time

import pytest

from ipam_driver.driver import IpamDriver
from plugin.errors import StoreUnavailable
from plugin.kvstore import EtcdKV
from plugin.protocol import AddressRequest, PoolIDRequest, RequestPoolRequest

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
pytestmark = pytest.mark.skipif(not os.access(ETCD, os.X_OK), reason="etcd binary not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_etcd(data_dir: str, timeout: float = 20.0):
    """Start a single-member etcd on free loopback ports; return (process, client URL) once it answers."""
    client, peer = f"http://127.0.0.1:{_free_port()}", f"http://127.0.0.1:{_free_port()}"
    proc = subprocess.Popen(
        [ETCD, "--name", "ipam-test", "--data-dir", data_dir,
         "--listen-client-urls", client, "--advertise-client-urls", client,
         "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
         "--initial-cluster", f"ipam-test={peer}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    probe = EtcdKV([client], timeout=1.0)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"etcd exited with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
        try:
            probe.revision()
            return proc, client
        except StoreUnavailable:
            if time.monotonic() > deadline:
                stop_etcd(proc)
                raise RuntimeError(f"etcd at {client} did not answer within {timeout} s")
            time.sleep(0.05)  # poll interval, not a wait for an event


def stop_etcd(proc) -> None:
    """Stop etcd by its PID: SIGTERM, then SIGKILL if it lingers."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    proc.stderr.close()


@pytest.fixture
def etcd(tmp_path):
    proc, url = start_etcd(str(tmp_path / "etcd"))
    try:
        yield proc, url
    finally:
        stop_etcd(proc)


def _pool(driver, cidr):
    return driver.request_pool(RequestPoolRequest.decode({"AddressSpace": "vxnet-local", "Pool": cidr}))["PoolID"]


def test_two_hosts_allocate_200_unique_addresses_in_parallel(etcd):
    _, url = etcd
    hosts = [IpamDriver(EtcdKV([url]), "h1", "local"), IpamDriver(EtcdKV([url]), "h2", "local")]
    pid = _pool(hosts[0], "10.1.0.0/24")
    assert _pool(hosts[1], "10.1.0.0/24") == pid
    got, errors = [], []

    def work(driver, count):
        try:
            for _ in range(count):
                got.append(driver.request_address(AddressRequest(pid, "", {}))["Address"])
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(hosts[i % 2], 25)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(got) == 200 and len(set(got)) == 200
    entries, _ = EtcdKV([url]).get_prefix("/vxnet/v1/ipam/addresses/")
    assert len(entries) == 200

    # Releasing both holds removes every key of the pool, more than one transaction's worth of addresses.
    for driver in hosts:
        driver.release_pool(PoolIDRequest(pid))
    entries, _ = EtcdKV([url]).get_prefix("/vxnet/v1/ipam/")
    assert [e.key for e in entries] == []


def test_etcd_stopped_gives_store_unavailable_within_5_s(etcd):
    proc, url = etcd
    driver = IpamDriver(EtcdKV([url]), "h1", "local")
    pid = _pool(driver, "10.1.0.0/24")
    stop_etcd(proc)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match=r"etcd unreachable at " + url):
        driver.request_address(AddressRequest(pid, "", {}))
    assert time.monotonic() - started < 5
