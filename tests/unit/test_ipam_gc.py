"""The garbage collection of a gone host's IPv6 holds (ipam_driver/gc.py under netdriver/gc.py's Collector, and
`vxnet gc`), over FakeKV: its v6 pool and address holds go exactly as its v4 ones do, what others hold stays,
and the freed v6 addresses can be had again."""

import io
import json

from cli import context, main
from ipam_driver.driver import GATEWAY_REQUEST, IpamDriver
from ipam_driver.gc import IpamHolds
from ipam_driver.store import IpamStore
from netdriver.gc import RELEASED, Collector
from netdriver.store import NetworkStore
from plugin import config
from store import schema
from tests.fakes import FakeKV
from wire.protocol import AddressRequest, ReleaseAddressRequest, RequestPoolRequest

STALE = 3600
SHARED4, SHARED6, OWN6 = "10.9.0.0/29", "fd00:9::/64", "fd00:3::/126"
KEYS = schema.Schema()


class Clock:
    def __init__(self):
        self.now = 1_700_000_000.0

    def __call__(self):
        return self.now


def pool(ipam, cidr):
    return ipam.request_pool(RequestPoolRequest.decode(
        {"AddressSpace": "vxnet-local", "Pool": cidr, "SubPool": "", "Options": {}, "V6": ":" in cidr}))["PoolID"]


def address(ipam, pool_id, ip="", gateway=False):
    options = {"RequestAddressType": GATEWAY_REQUEST} if gateway else {}
    return ipam.request_address(AddressRequest.decode({"PoolID": pool_id, "Address": ip, "Options": options}))[
        "Address"]


def world():
    """Three live hosts on one dual-stack overlay (a v4 /29 and a v6 /64, each host holding both pools and both
    gateways and one address of each); h3 also holds two more v6 addresses and a v6 /126 of its own."""
    kv = FakeKV()
    store = NetworkStore(kv)
    leases = {}
    for host in ("h1", "h2", "h3"):
        leases[host] = kv.lease_grant(30)
        assert store.register_host(host, {"vtep": f"192.0.2.{host[-1]}", "name": f"node-{host}"}, leases[host], 0)
        ipam = IpamDriver(IpamStore(kv), host, "local")
        for cidr in (SHARED4, SHARED6):
            pid = pool(ipam, cidr)
            address(ipam, pid, gateway=True)
            address(ipam, pid)
    ipam3 = IpamDriver(IpamStore(kv), "h3", "local")
    address(ipam3, f"vxnet-local/{SHARED6}", "fd00:9::abcd")  # an --aux-address
    address(ipam3, f"vxnet-local/{SHARED6}")
    own = pool(ipam3, OWN6)
    address(ipam3, own, gateway=True)
    return kv, leases


def holders(kv, key):
    return json.loads(kv.data[key].value)["hosts"] if key in kv.data else None


def ipam_of(kv, host):
    return sorted(key for key, entry in kv.data.items()
                  if "/ipam/" in key and host in json.loads(entry.value)["hosts"])


def test_a_gone_hosts_v6_holds_are_released_like_its_v4_ones():
    kv, leases = world()
    clock = Clock()
    gc = Collector(NetworkStore(kv), IpamHolds(IpamStore(kv)), STALE, clock=clock)
    kv.expire(leases["h3"])
    first = gc.collect()
    holds = first.hosts[0].holds
    assert [h.host for h in first.hosts] == ["h3"]
    v6 = sorted((h["pool"], h.get("address", ""), h.get("role", "")) for h in holds if ":" in h["pool"])
    assert v6 == [("fd00:3::/126", "", ""), ("fd00:3::/126", "fd00:3::1", "gateway"),
                  ("fd00:9::/64", "", ""), ("fd00:9::/64", "fd00:9::1", "gateway"),
                  ("fd00:9::/64", "fd00:9::4", "container"), ("fd00:9::/64", "fd00:9::5", "container"),
                  ("fd00:9::/64", "fd00:9::abcd", "container")]
    assert len([h for h in holds if ":" not in h["pool"]]) == 3  # its v4 pool, gateway and address
    kept = ipam_of(kv, "h3")
    assert len(kept) == 10  # not stale yet: every key that names it stays

    clock.now += STALE + 1
    report = gc.collect()
    assert report.failed == 0 and all(h["result"] == RELEASED for h in report.stale[0].holds)
    assert ipam_of(kv, "h3") == []
    assert KEYS.pool("vxnet-local", OWN6) not in kv.data  # it held its own pool alone: pool and addresses gone
    assert kv.keys(KEYS.addresses("vxnet-local", OWN6)) == []
    assert holders(kv, KEYS.pool("vxnet-local", SHARED6)) == ["h1", "h2"]
    assert holders(kv, KEYS.address("vxnet-local", SHARED6, "fd00:9::1")) == ["h1", "h2"]
    assert holders(kv, KEYS.address("vxnet-local", SHARED6, "fd00:9::2")) == ["h1"]
    assert KEYS.address("vxnet-local", SHARED6, "fd00:9::abcd") not in kv.data
    assert gc.collect().hosts == []  # a second pass finds nothing
    # The freed v6 addresses can be had again, lowest first.
    ipam1 = IpamDriver(IpamStore(kv), "h1", "local")
    assert address(ipam1, f"vxnet-local/{SHARED6}") == "fd00:9::4/64"
    assert address(ipam1, f"vxnet-local/{SHARED6}") == "fd00:9::5/64"
    assert address(ipam1, f"vxnet-local/{SHARED6}", "fd00:9::abcd") == "fd00:9::abcd/64"
    assert pool(ipam1, OWN6) == f"vxnet-local/{OWN6}"


def test_vxnet_gc_releases_v6_holds_and_says_which():
    kv, leases = world()
    kv.expire(leases["h3"])

    def vxnet(argv, environ):
        args = main.parser().parse_args(argv)
        out = io.StringIO()
        ctx = context.Context(settings=config.load_client(environ), as_json=args.json, out=out, _kv=kv)
        return args.func(ctx, args), out.getvalue()

    status, out = vxnet(["gc"], {"VXNET_STALE_HOST_SECONDS": "1"})  # marks h3 gone from now
    assert status == 0 and "not stale yet, kept" in out
    departed = KEYS.departed("h3")
    record = json.loads(kv.data[departed].value)
    kv.put(departed, json.dumps({**record, "since": record["since"] - 5}))  # five seconds on
    status, out = vxnet(["gc", "--dry-run", "--json"], {"VXNET_STALE_HOST_SECONDS": "1"})
    listed = json.loads(out)["hosts"][0]["holds"]
    assert status == 1 and {"kind": "address", "space": "vxnet-local", "pool": SHARED6, "address": "fd00:9::abcd",
                            "role": "container"} in listed
    status, out = vxnet(["gc"], {"VXNET_STALE_HOST_SECONDS": "1"})
    assert status == 0
    for line in ("address fd00:9::abcd (container) in pool fd00:9::/64 (vxnet-local): released",
                 "address fd00:3::1 (gateway) in pool fd00:3::/126 (vxnet-local): released",
                 "pool fd00:3::/126 (vxnet-local): released"):
        assert line in out, out
    assert ipam_of(kv, "h3") == [] and kv.keys(KEYS.prefix(schema.DEPARTED)) == []
    # A release by dockerd of what gc already freed (h3 comes back and replays) succeeds and changes nothing.
    before = dict(kv.data)
    IpamDriver(IpamStore(kv), "h3", "local").release_address(ReleaseAddressRequest.decode(
        {"PoolID": f"vxnet-local/{SHARED6}", "Address": "fd00:9::abcd"}))
    assert kv.data == before
