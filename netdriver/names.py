"""Every interface and namespace name vxnet makes, built here and nowhere else.

Linux interface names are at most 15 characters (IFNAMSIZ 16 with the NUL). Everything on the host side starts
with "vx" so start-up reconciliation and tests can tell our objects from everyone else's.
"""

import re

NETNS_PREFIX = "vxnet-"
# Inside a network's own namespace the names need not be unique across networks.
BRIDGE = "br0"
VXLAN = "vxlan0"
# Docker's sandbox code renames our container-side veth to DstPrefix + index (eth0, eth1, ...).
CONTAINER_PREFIX = "eth"

_ID_CHARS = 12  # Docker's short IDs: unique enough for one host, readable in `ip netns`


def netns(network_id: str) -> str:
    """The network namespace holding one network's bridge and VXLAN device: vxnet-<12 hex>."""
    return NETNS_PREFIX + network_id[:_ID_CHARS]


def vxlan_staging(vni: int) -> str:
    """The VXLAN device's name in the host namespace before it moves into the network namespace
    (vxl + up to 8 digits: VNIs are 24-bit, at most 16777215)."""
    return f"vxl{vni}"


def veth_container(endpoint_id: str) -> str:
    """The veth end handed to dockerd in Join (SrcName); dockerd moves it into the container: vxc<11 hex>."""
    return "vxc" + endpoint_id[:11]


def veth_bridge(endpoint_id: str) -> str:
    """The veth end enslaved to the network's bridge inside the network namespace: vxp<11 hex>."""
    return "vxp" + endpoint_id[:11]


_NETNS_NAME = re.compile(re.escape(NETNS_PREFIX) + r"[0-9a-f]{12}")


def network_id_prefix(netns_name: str) -> str:
    """The 12-character network id prefix a namespace name was built from ("" if it is not a name netns() makes:
    anything else in the folder, even with our prefix, is never taken for a network of ours)."""
    return netns_name[len(NETNS_PREFIX):] if _NETNS_NAME.fullmatch(netns_name) else ""


def is_unknown_netns(netns_name: str) -> bool:
    """Has our prefix but is not a name netns() makes (a leftover of a vxnet that took IDs on trust)."""
    return netns_name.startswith(NETNS_PREFIX) and not network_id_prefix(netns_name)


def is_vxlan_staging(name: str) -> bool:
    return name.startswith("vxl") and name[3:].isdigit()


def is_veth_container(name: str) -> bool:
    return name.startswith("vxc") and len(name) == 14
