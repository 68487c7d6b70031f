"""The IPAM driver against a real etcd: parallel allocation from two hosts, and etcd going away."""

import threading
import time

import pytest

from ipam_driver.driver import IpamDriver
from ipam_driver.store import IpamStore
from store import schema
from store.kvstore import EtcdKV
from tests.harness.etcd import EtcdServer
from wire.errors import StoreUnavailable
from wire.protocol import AddressRequest, PoolIDRequest, RequestPoolRequest


@pytest.fixture
def etcd(tmp_path):
    """An etcd of this test's own (one test stops it), on free loopback ports, removed afterwards."""
    server = EtcdServer(tmp_path).start()
    try:
        yield server
    finally:
        server.close()


def _pool(driver, cidr):
    return driver.request_pool(RequestPoolRequest.decode({"AddressSpace": "vxnet-local", "Pool": cidr}))["PoolID"]


def test_two_hosts_allocate_200_unique_addresses_in_parallel(etcd):
    url = etcd.url
    hosts = [IpamDriver(IpamStore(EtcdKV([url])), "h1", "local"), IpamDriver(IpamStore(EtcdKV([url])), "h2", "local")]
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
    entries, _ = EtcdKV([url]).get_prefix(schema.PREFIX + "/ipam/addresses/")
    assert len(entries) == 200

    # Releasing both holds removes every key of the pool, more than one transaction's worth of addresses.
    for driver in hosts:
        driver.release_pool(PoolIDRequest(pid))
    entries, _ = EtcdKV([url]).get_prefix(schema.PREFIX + "/ipam/")
    assert [e.key for e in entries] == []


def test_etcd_stopped_gives_store_unavailable_within_5_s(etcd):
    url = etcd.url
    driver = IpamDriver(IpamStore(EtcdKV([url])), "h1", "local")
    pid = _pool(driver, "10.1.0.0/24")
    etcd.stop()
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match=r"etcd unreachable at " + url):
        driver.request_address(AddressRequest(pid, "", {}))
    assert time.monotonic() - started < 5
