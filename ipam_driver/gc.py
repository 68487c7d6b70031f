"""The IPAM side of the garbage collection of gone hosts (netdriver/gc.py's IpamHolds): every hold on a pool or
an address of every address space, and the release of one, in one transaction guarded by the collector's
compares (ipam_driver/store.py release_address and release_pool, whose semantics a release keeps: one hold of
a multiset, the last pool hold deleting the pool and its addresses). IPv4 and IPv6 holds alike: "pool" and
"address" are the canonical strings the store wrote ("fd00:1::/64", "fd00:1::5"), read back by ipaddress."""

from typing import List

from ipam_driver import pools
from ipam_driver.store import IpamStore
from store.kv import Guard


class IpamHolds:
    def __init__(self, store: IpamStore):
        self.store = store

    def holds(self) -> List[dict]:
        """{"kind": "address", "holder", "space", "pool", "address", "role": "gateway"|"container"} and
        {"kind": "pool", "holder", "space", "pool"}, one per hold; addresses first."""
        pools, addresses = self.store.holds()
        out = []
        for space, cidr, entry in addresses:
            out += [{"kind": "address", "holder": holder, "space": space, "pool": str(cidr),
                     "address": str(entry.ip), "role": entry.kind} for holder in entry.hosts]
        for pool in pools:
            out += [{"kind": "pool", "holder": holder, "space": pool.space, "pool": str(pool.cidr)}
                    for holder in pool.hosts]
        return out

    def release(self, hold: dict, guard: Guard) -> bool:
        cidr = pools.stored_network(hold["pool"])
        if hold["kind"] == "address":
            ip = pools.stored_address(hold["address"])
            return self.store.release_address(hold["space"], cidr, ip, hold["holder"], guard)
        if hold["kind"] == "pool":
            return self.store.release_pool(hold["space"], cidr, hold["holder"], guard)
        raise ValueError(f"not an IPAM hold: {hold['kind']!r}")
