"""The netlink facade (kernel.links.Links) as state, for what the health overlay asks of it: namespaces, VXLAN
devices (their VNI, local address, MTU, MAC, addresses), and each device's FDB and permanent neighbour entries."""

import ipaddress
from typing import Dict, Optional, Tuple

from wire.errors import KernelError


class FakeLinks:
    """`devices[(ns, name)]` = {"vni", "local", "port", "mtu", "mac", "addresses"}; `fdbs[(ns, name)]` mac -> vtep,
    `neighs[(ns, name)]` ip -> mac, IPv4 (ARP) and IPv6 (NDP) entries alike as the real neighbours() reads both
tables; an address of neither family is refused as the kernel would. `refuse` holds operation names that raise
KernelError."""

    def __init__(self):
        self.netns = set()
        self.devices: Dict[Tuple[str, str], dict] = {}
        self.fdbs: Dict[Tuple[str, str], Dict[str, str]] = {}
        self.neighs: Dict[Tuple[str, str], Dict[str, str]] = {}
        self.refuse = set()
        self.calls: Dict[str, int] = {}  # operation -> calls: dumps (fdb, neighbours) and entry writes

    def _count(self, op: str) -> None:
        self.calls[op] = self.calls.get(op, 0) + 1

    def _check(self, op: str) -> None:
        if op in self.refuse:
            raise KernelError(f"{op}: refused by the fake kernel")

    def netns_exists(self, name: str) -> bool:
        return name in self.netns

    def ensure_netns(self, name: str) -> None:
        self._check("ensure_netns")
        self.netns.add(name)

    def remove_netns(self, name: str) -> None:
        self._check("remove_netns")
        self.netns.discard(name)
        for key in [k for k in self.devices if k[0] == name]:
            self.remove_link(*key)

    def remove_link(self, ns: Optional[str], name: str) -> None:
        self.devices.pop((ns, name), None)
        self.fdbs.pop((ns, name), None)
        self.neighs.pop((ns, name), None)

    def ensure_vxlan(self, ns, name, staging, vni, local, port, mtu, master, mac=None) -> None:
        self._check("ensure_vxlan")
        if ns not in self.netns:
            raise KernelError(f"create VXLAN {vni} in {ns}: no such namespace")
        device = self.devices.get((ns, name))
        if device is None or device["vni"] != vni:
            device = self.devices[(ns, name)] = {"vni": vni, "local": local, "port": port, "addresses": set()}
            self.fdbs[(ns, name)], self.neighs[(ns, name)] = {}, {}
        device.update(mtu=mtu, mac=mac, master=master)

    def ensure_address(self, ns, dev, address, prefixlen) -> None:
        self.devices[(ns, dev)]["addresses"] = {(address, prefixlen)}

    def link_info(self, ns, name) -> Optional[dict]:
        device = self.devices.get((ns, name))
        return None if device is None else {"kind": "vxlan", "mtu": device["mtu"], "master": device.get("master"),
                                            "up": True, "mac": device.get("mac"), "vni": device["vni"]}

    def fdb(self, ns, dev) -> Dict[str, str]:
        self._count("fdb")
        return dict(self.fdbs.get((ns, dev), {}))

    def neighbours(self, ns, dev) -> Dict[str, str]:
        self._count("neighbours")
        return dict(self.neighs.get((ns, dev), {}))

    def set_fdb(self, ns, dev, mac, vtep) -> None:
        self._count("set_fdb")
        self._check("set_fdb")
        self.fdbs[(ns, dev)][mac] = vtep

    def del_fdb(self, ns, dev, mac, vtep) -> None:
        self._count("del_fdb")
        self.fdbs.get((ns, dev), {}).pop(mac, None)

    def set_neigh(self, ns, dev, ip, mac) -> None:
        self._count("set_neigh")
        self.neighs[(ns, dev)][_address(ip)] = mac

    def del_neigh(self, ns, dev, ip) -> None:
        self._count("del_neigh")
        self.neighs.get((ns, dev), {}).pop(_address(ip), None)


def _address(ip: str) -> str:
    """The address as the kernel lists it (compressed IPv6); ValueError for what no family takes, as Links does."""
    return str(ipaddress.ip_address(ip))
