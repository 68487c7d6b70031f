"""The IPAM driver against a real etcd: parallel allocation from two hosts, IPv4 and IPv6 from three host
processes at once, and etcd going away."""

import ipaddress
import multiprocessing
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import pytest

from ipam_driver.driver import IpamDriver
from ipam_driver.store import IpamStore
from store import schema
from store.kvstore import EtcdKV
from tests.harness.etcd import EtcdServer
from wire.errors import StoreUnavailable
from wire.protocol import AddressRequest, PoolIDRequest, ReleaseAddressRequest, RequestPoolRequest


@pytest.fixture
def etcd(tmp_path):
    """An etcd of this test's own (one test stops it), on free loopback ports, removed afterwards."""
    server = EtcdServer(tmp_path).start()
    try:
        yield server
    finally:
        server.close()


def _pool(driver, cidr):
    return driver.request_pool(RequestPoolRequest.decode(
        {"AddressSpace": "vxnet-local", "Pool": cidr, "V6": ":" in cidr}))["PoolID"]


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


V4, V6 = "10.1.0.0/24", "fd00:77::/64"
GATEWAY = {"RequestAddressType": "com.docker.network.gateway"}


def _host_allocates(url, host, threads, count):
    """One host's plugin (run in a process of its own, its own etcd client): join both pools of a dual-stack
    network, ask for each gateway, then `threads` threads each ask `count` addresses of each family at once.
    -> {"gateways": [...], "addresses": [...]} as the replies gave them."""
    driver = IpamDriver(IpamStore(EtcdKV([url])), host, "local")
    pids = [_pool(driver, V4), _pool(driver, V6)]
    gateways = [driver.request_address(AddressRequest(pid, "", GATEWAY))["Address"] for pid in pids]
    got, errors = [], []

    def work():
        try:
            for _ in range(count):
                for pid in pids:
                    got.append(driver.request_address(AddressRequest(pid, "", {}))["Address"])
        except Exception as exc:  # returned to the test
            errors.append(repr(exc))

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    if errors:
        raise RuntimeError(f"{host}: {errors}")
    return {"gateways": gateways, "addresses": got}


def _host_releases(url, host, addresses):
    """The same host lets go of its addresses (ReleaseAddress, as dockerd does for each container), its gateway
    holds and both pools; then replays every release, as dockerd does after a crash."""
    driver = IpamDriver(IpamStore(EtcdKV([url])), host, "local")
    for _ in range(2):
        for reply in addresses:
            ip = ipaddress.ip_interface(reply)
            pid = f"vxnet-local/{V6 if ip.version == 6 else V4}"
            driver.release_address(ReleaseAddressRequest.decode({"PoolID": pid, "Address": str(ip.ip)}))
        for pid in (f"vxnet-local/{V4}", f"vxnet-local/{V6}"):
            driver.release_pool(PoolIDRequest(pid))


def test_three_host_processes_get_unique_v4_and_v6_addresses_and_leave_nothing(etcd):
    """Three hosts (processes, each with its own etcd client and host ID) fill a dual-stack network at once:
    every address is handed out once, lowest first in each family (the gateways ::1 and .1 shared, then a
    contiguous run), and when they let go no key is left under the IPAM prefix."""
    url, hosts, threads, count = etcd.url, ("h1", "h2", "h3"), 2, 20
    with ProcessPoolExecutor(len(hosts), mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(_host_allocates, [url] * 3, hosts, [threads] * 3, [count] * 3))
        for result in results:
            assert result["gateways"] == ["10.1.0.1/24", "fd00:77::1/64"]
        per_host = [r["addresses"] for r in results]
        every = [a for got in per_host for a in got]
        total = len(hosts) * threads * count
        v6 = sorted((ipaddress.ip_interface(a) for a in every if ":" in a), key=lambda i: i.ip)
        v4 = sorted((ipaddress.ip_interface(a) for a in every if ":" not in a), key=lambda i: i.ip)
        assert len(set(every)) == len(every) == 2 * total
        assert [str(i) for i in v6] == [f"fd00:77::{n:x}/64" for n in range(2, total + 2)]
        assert [str(i) for i in v4] == [f"10.1.0.{n}/24" for n in range(2, total + 2)]
        kv = EtcdKV([url])
        entries, _ = kv.get_prefix(schema.PREFIX + "/ipam/addresses/vxnet-local/fd00:77::_64/")
        assert sorted(e.key.rsplit("/", 1)[1] for e in entries) == sorted(
            [str(i.ip) for i in v6] + ["fd00:77::1"])
        pool_entry = kv.get(schema.PREFIX + "/ipam/pools/vxnet-local/fd00:77::_64")
        assert sorted(pool_entry.json()["hosts"]) == list(hosts)

        list(pool.map(_host_releases, [url] * 3, hosts, per_host))
    entries, _ = EtcdKV([url]).get_prefix(schema.PREFIX + "/ipam/")
    assert [e.key for e in entries] == []
