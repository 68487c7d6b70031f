"""Every kernel object vxnet makes is named here and nowhere else: namespaces, interfaces, nftables tables, the
XFRM label, the VXLAN UDP ports and the ESP algorithm.

Linux interface names are at most 15 characters (IFNAMSIZ 16 with the NUL). Everything on the host side starts
with "vx" so start-up reconciliation and tests can tell our objects from everyone else's.

The IDs names are built from were checked at the wire (wire/protocol.py); they are checked again here, where
they become kernel names and paths under the namespace folder, so that no path ("0.0.0.0/0" would make a
directory) or foreign character reaches the kernel whatever the caller.
"""

import ipaddress
import re

from wire.errors import InvalidRequest

# IANA-assigned VXLAN port (RFC 7348 section 5).
VXLAN_PORT = 4789
# Encrypted networks send VXLAN to this UDP port instead: the XFRM policies select their traffic by port alone, so
# no packet marking is needed, and cleartext VXLAN of an encrypted network is recognisable by port alone (the
# fail-closed table drops it). 4790 is IANA's VXLAN-GPE port; vxnet never uses GPE, and Docker's overlay uses 4789.
ENCRYPTED_VXLAN_PORT = 4790

# nftables tables: isolation and anti-spoofing (`inet vxnet` on the host, `bridge vxnet` in each network's
# namespace), and the fail-closed table for encrypted networks (`inet vxnet_ipsec` on the host).
ISOLATION_TABLE = "vxnet"
IPSEC_TABLE = "vxnet_ipsec"
# The policy table (netdriver/policy_nft.py): `bridge vxnet_policy` inside the namespace of each network whose mode
# is not open. Its own name, not `bridge vxnet`: that is the namespace's anti-spoofing table, and the drift checks
# and counters read each table by name.
POLICY_TABLE = "vxnet_policy"
# The policy's UDP records (netdriver/policy_nft.py): `bridge vxnet_policy_udp` beside it, the only table the packet
# path writes. A table of its own because nftables 1.0.6 reads every element of a table's sets to list any of its
# rules or counters: 65,536 records made each read of the policy table cost 0.8 s here.
POLICY_UDP_TABLE = "vxnet_policy_udp"
# The skb mark the UDP records' table gives a datagram that answers a record, for the policy table to pass it
# ("vx"). Nothing else marks packets in a network namespace, and the mark never leaves it: a marked datagram
# answers a record, so it goes to a member on this host, and the kernel clears the mark as the frame crosses into
# the container's namespace (veth, skb_scrub_packet; the VXLAN device's socket in the host's clears it the same).
POLICY_REPLY_MARK = 0x7678
# The NFLOG group the policy table sends its verdicts to (kernel/nflog.py reads it). nfnetlink_log's groups are per
# network namespace (one instance per (namespace, group)), so every network uses the same 16-bit number: 0x7678,
# "vx".
POLICY_NFLOG_GROUP = 0x7678
# The anti-spoofing table (`bridge vxnet`) of a network namespace logs its drops to the same group: one reader per
# namespace hears both. The host's isolation table (`inet vxnet`, the host namespace: the managed plugin runs with
# host networking) logs to a group of its own, 0x7679, so that nothing vxnet runs in the host namespace contends
# with a network namespace's listener if the two ever share one.
ISOLATION_NFLOG_GROUP = 0x7679

# The name (the kernel's task comm) of the one thread that commits vxnet's nftables batches in a process
# (kernel/links.py), with a random tag per Links: every commit's NFT_MSG_NEWGEN notification carries the committing
# task's comm (NFTA_GEN_PROC_NAME), so the event listener (kernel/events.py) tells this process's own commits,
# which are the desired state already, from anyone else's. TASK_COMM_LEN is 16 bytes with the NUL: 6 + 8 = 14.
NFT_COMMITTER_PREFIX = "vxnft-"
_COMMITTER_TAG = re.compile(r"[0-9a-f]{8}")


def nft_committer(tag: str) -> str:
    """The committing thread's name for an 8-hex-digit tag (ValueError otherwise)."""
    if not isinstance(tag, str) or not _COMMITTER_TAG.fullmatch(tag):
        raise ValueError(f"nft committer tag {tag!r}: 8 lowercase hex digits")
    return NFT_COMMITTER_PREFIX + tag


# "vxn" + 0x01: the reqid every SA and policy template vxnet makes carries, so clean-up touches only ours
# (kernel/xfrm.py says why reqid rather than a mark or if_id).
XFRM_REQID = 0x76786E01
# RFC 4106 AES-GCM ESP with a 4-byte salt: Docker's overlay uses the same.
AEAD_ALGORITHM = "rfc4106(gcm(aes))"

NETNS_PREFIX = "vxnet-"
# Inside a network's own namespace the names need not be unique across networks.
BRIDGE = "br0"
VXLAN = "vxlan0"

# The forwarding fabric of a network namespace (netdriver/sandbox.py says how frames cross it): the root bridge
# BRIDGE (bridge 0) holds the VXLAN device, the first endpoints and one trunk port per leaf; leaf k (br<k>, k >= 1)
# holds its trunk's other end and further endpoints. A Linux bridge takes at most BR_MAX_PORTS = 1024 ports
# (net/bridge/br_private.h: port numbers are 10 bits, and 0 is reserved), so 1023 of them: the 1023rd veth on one
# bridge beside the VXLAN device was refused with EXFULL ("Exchange full").
BR_MAX_PORTS = 1024
BRIDGE_PORTS = BR_MAX_PORTS - 1
# Endpoints per bridge, the same on the root and on every leaf: a round figure under what a bridge takes, so the
# root keeps room for the VXLAN device and every trunk (1 + MAX_LEAVES + 1000 <= 1023) and a leaf for its trunk.
ENDPOINTS_PER_BRIDGE = 1000
MAX_LEAVES = BRIDGE_PORTS - 1 - ENDPOINTS_PER_BRIDGE  # 22: the root's ports left for trunks
# The most endpoints one network can hold on one host, whatever the setting (plugin/config.py VXNET_MAX_ENDPOINTS).
MAX_BRIDGED_ENDPOINTS = ENDPOINTS_PER_BRIDGE * (1 + MAX_LEAVES)
# Trunk ends: vxtr<k> on the root, vxtl<k> on leaf k. The prefix tells a trunk hop from an endpoint's port (vxp...)
# and the VXLAN device in any rule judging by interface name (`iifname`/`oifname "vxt*"`).
TRUNK_PREFIX = "vxt"
_LEAF_BRIDGE = re.compile(r"br([1-9][0-9]?)")


def _leaf_index(k: int) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_LEAVES:
        raise ValueError(f"leaf {k!r}: leaves are numbered 1..{MAX_LEAVES}")
    return k


def bridge(k: int) -> str:
    """Bridge k of a network namespace: 0 is the root (BRIDGE), 1..MAX_LEAVES the leaves (br<k>)."""
    return BRIDGE if k == 0 else f"br{_leaf_index(k)}"


def bridge_index(name: str) -> int:
    """bridge()'s inverse: 0 for the root, k for leaf k, -1 for any other name."""
    if name == BRIDGE:
        return 0
    found = _LEAF_BRIDGE.fullmatch(name)
    return int(found.group(1)) if found and int(found.group(1)) <= MAX_LEAVES else -1


def trunk_root(k: int) -> str:
    """The root bridge's end of leaf k's trunk."""
    return f"{TRUNK_PREFIX}r{_leaf_index(k)}"


def trunk_leaf(k: int) -> str:
    """Leaf k's end of its trunk to the root bridge."""
    return f"{TRUNK_PREFIX}l{_leaf_index(k)}"


def is_trunk(name: str) -> bool:
    return name.startswith(TRUNK_PREFIX)
# Docker's sandbox code renames our container-side veth to DstPrefix + index (eth0, eth1, ...).
CONTAINER_PREFIX = "eth"

_ID_CHARS = 12  # Docker's short IDs: unique enough for one host, readable in `ip netns`
# A network ID or its 12-character prefix: dockerd's hex IDs, or a Swarm network's base-36 ID.
_NETWORK_ID = re.compile(r"[0-9a-z]{12,64}")
# An endpoint ID or a prefix of at least the 11 characters the veth names take: always dockerd's hex.
_ENDPOINT_ID = re.compile(r"[0-9a-f]{11,64}")


# The health overlay (netdriver/health.py): one namespace on every host with one VXLAN device, on a VNI no network
# can be given, that `vxnet doctor` pings every other host through, so a probe crosses the same UDP port and the
# same underlay as the networks' traffic. Its namespace is not a vxnet-<id> name (start-up reconciliation and
# every count of the networks' namespaces leave it alone); its device carries the host's health address.
HEALTH_NETNS = "vxhealth"
HEALTH_VXLAN = "vxhealth0"
# RFC 7348's 24-bit VNI field tops out at 2^24-1; that last VNI is the health overlay's (netdriver/options.py
# refuses it to users, netdriver/store.py never allocates it).
HEALTH_VNI = (1 << 24) - 1
# RFC 3927 link-local: never routed, so nothing outside the health namespace can be meant by one of them. Every
# host gets one address of it, allocated in etcd (store/schema.py HEALTH).
HEALTH_SUBNET = ipaddress.IPv4Network("169.254.0.0/16")


def health_address(index: int) -> str:
    """The index-th health address (1 .. HEALTH_HOSTS): the subnet's network and broadcast addresses skipped."""
    if not 1 <= index <= HEALTH_HOSTS:
        raise ValueError(f"health address index {index} outside 1..{HEALTH_HOSTS}")
    return str(HEALTH_SUBNET.network_address + index)


HEALTH_HOSTS = HEALTH_SUBNET.num_addresses - 2


def health_index(address: str) -> int:
    """health_address's inverse; 0 for anything that is not a host address of the health subnet."""
    try:
        ip = ipaddress.IPv4Address(address)
    except (ipaddress.AddressValueError, ValueError, TypeError):
        return 0
    index = int(ip) - int(HEALTH_SUBNET.network_address)
    return index if 1 <= index <= HEALTH_HOSTS else 0


def health_mac(address: str) -> str:
    """The health device's MAC, derived from its address as Docker's overlay derives container MACs (02:42 + the
    IPv4 bytes): 02 marks it locally administered (IEEE 802 U/L bit), 76 is 'v'."""
    if not health_index(address):
        raise InvalidRequest(f"{address!r} is not an address of the health overlay ({HEALTH_SUBNET})")
    return "02:76:" + ":".join(f"{b:02x}" for b in ipaddress.IPv4Address(address).packed)


def _checked(pattern, value: str, what: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise InvalidRequest(f"{what}: {value!r} cannot name a kernel object (not a Docker ID)")
    return value


def netns(network_id: str) -> str:
    """The network namespace holding one network's bridge and VXLAN device: vxnet-<the ID's first 12 characters>."""
    return NETNS_PREFIX + _checked(_NETWORK_ID, network_id, "NetworkID")[:_ID_CHARS]


def vxlan_staging(vni: int) -> str:
    """The VXLAN device's name in the host namespace before it moves into the network namespace
    (vxl + up to 8 digits: VNIs are 24-bit, at most 16777215)."""
    return f"vxl{vni}"


def veth_container(endpoint_id: str) -> str:
    """The veth end handed to dockerd in Join (SrcName); dockerd moves it into the container: vxc<11 hex>."""
    return "vxc" + _checked(_ENDPOINT_ID, endpoint_id, "EndpointID")[:11]


def veth_bridge(endpoint_id: str) -> str:
    """The veth end enslaved to the network's bridge inside the network namespace: vxp<11 hex>."""
    return "vxp" + _checked(_ENDPOINT_ID, endpoint_id, "EndpointID")[:11]


_NETNS_NAME = re.compile(re.escape(NETNS_PREFIX) + r"[0-9a-z]{12}")  # network IDs are hex, or base 36 (Swarm)


def network_id_prefix(netns_name: str) -> str:
    """The 12-character network id prefix a namespace name was built from ("" if it is not a name netns() makes:
    anything else in the folder, even with our prefix, is never taken for a network of ours)."""
    return netns_name[len(NETNS_PREFIX):] if _NETNS_NAME.fullmatch(netns_name) else ""


def is_unknown_netns(netns_name: str) -> bool:
    """Has our prefix but is not a name netns() makes (a leftover of a vxnet that took IDs on trust)."""
    return netns_name.startswith(NETNS_PREFIX) and not network_id_prefix(netns_name)


def bridge_port_endpoint(name: str) -> str:
    """The endpoint ID prefix (11 hex) a bridge port's name was built from by veth_bridge, "" for any other
    name (a record's port names its container through it)."""
    if name.startswith("vxp") and len(name) == 14 and _ENDPOINT_ID.fullmatch(name[3:]):
        return name[3:]
    return ""


def is_vxlan_staging(name: str) -> bool:
    return name.startswith("vxl") and name[3:].isdigit()


def is_veth_container(name: str) -> bool:
    return name.startswith("vxc") and len(name) == 14 and bool(_ENDPOINT_ID.fullmatch(name[3:]))
