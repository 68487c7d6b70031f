"""The garbage collector of gone hosts put together (netdriver/gc.py's Collector over the network driver's store
and the IPAM's holds, which the drivers layer keeps apart): one recipe for the plugin's own loop and `vxnet gc`."""

from ipam_driver.gc import IpamHolds
from ipam_driver.store import IpamStore
from netdriver.gc import Collector
from netdriver.store import NetworkStore
from store.kv import KV


def collector(kv: KV, prefix: str, stale_after: float) -> Collector:
    return Collector(NetworkStore(kv, prefix), IpamHolds(IpamStore(kv, prefix)), stale_after)
