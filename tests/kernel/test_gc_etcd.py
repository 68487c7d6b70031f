"""The garbage collector's guarded transactions against a real etcd (netdriver/gc.py over the real stores): a
release is refused while the host's record is back, goes through once the host is stale again, and a replay
writes nothing."""

import json

import pytest

from ipam_driver.driver import IpamDriver
from ipam_driver.store import IpamStore
from netdriver.gc import KEPT, RELEASED
from netdriver.models import Endpoint
from netdriver.store import NetworkStore
from plugin import gc
from store import schema
from store.kvstore import EtcdKV
from tests.harness.etcd import EtcdServer
from wire.protocol import AddressRequest, RequestPoolRequest

NET = "ab" * 32
EID = "cd" * 32
STALE = 60


@pytest.fixture
def kv(tmp_path):
    server = EtcdServer(tmp_path).start()
    try:
        yield EtcdKV([server.url])
    finally:
        server.close()


def h3_keys(kv):
    entries, _ = kv.get_prefix(schema.PREFIX + "/")
    out = []
    for e in entries:
        value = json.loads(e.value) if e.value.startswith("{") else {}
        if "h3" in value.get("hosts", ()) or value.get("host") == "h3":
            out.append(e.key)
    return sorted(out)


def age(store, kv, host, seconds):
    """departed/<host> rewritten as if written `seconds` earlier."""
    key = store.keys.departed(host)
    record = json.loads(kv.get(key).value)
    kv.put(key, json.dumps({**record, "since": record["since"] - seconds}))


def test_guarded_releases_on_a_real_etcd(kv):
    store = NetworkStore(kv)
    ipam = IpamDriver(IpamStore(kv), "h3", "local")
    pool_id = ipam.request_pool(RequestPoolRequest.decode({"AddressSpace": "vxnet-local", "Pool": "10.7.0.0/29"}))
    ip = ipam.request_address(AddressRequest(pool_id["PoolID"], "", {}))["Address"]
    store.put_endpoint(Endpoint(NET, EID, ip, "02:00:00:00:00:03", "h3"))
    held = h3_keys(kv)
    assert len(held) == 3  # the pool, the address, the endpoint
    collector = gc.collector(kv, schema.PREFIX, STALE)
    assert [h.host for h in collector.collect().hosts] == ["h3"]  # no host record: marked gone from now
    age(store, kv, "h3", STALE + 1)

    # h3 registers again between the survey and the releases: every release is refused, nothing changes.
    (surveyed,) = collector.survey(mark=True)
    assert surveyed.stale
    assert store.register_host("h3", {"vtep": "192.0.2.3"}, 0, 0)
    collector._release(surveyed)
    assert [hold["result"] for hold in surveyed.holds] == [KEPT] * 3 and h3_keys(kv) == held
    assert kv.get(store.keys.departed("h3")) is None  # registering deleted it

    # Gone again, and stale again: everything goes; a replay writes nothing.
    kv.delete(store.keys.host("h3"))
    collector.collect()
    age(store, kv, "h3", STALE + 1)
    report = collector.collect()
    assert [hold["result"] for hold in report.stale[0].holds] == [RELEASED] * 3 and h3_keys(kv) == []
    _, revision = kv.get_prefix(schema.PREFIX + "/")
    assert collector.collect().hosts == []
    assert kv.get_prefix(schema.PREFIX + "/")[1] == revision
