"""Parse and validate the options a network is created with.

`docker network create -o k=v` reaches us as Options["com.docker.network.generic"]; `--internal` as
Options["com.docker.network.internal"]; `--ipv6` as Options["com.docker.network.enable_ipv6"]. Unknown `-o` keys are
refused by name so a typo never silently builds a different network than the user asked for.
"""

import dataclasses
import re
from typing import Any, Dict, Optional

from kernel import names
from netdriver.policy import MODES
from wire.errors import InvalidOption

GENERIC = "com.docker.network.generic"
INTERNAL = "com.docker.network.internal"
ENABLE_IPV6 = "com.docker.network.enable_ipv6"
MTU_KEY = "com.docker.network.driver.mtu"

# RFC 7348: the VNI is a 24-bit field. Docker's built-in overlay allocates upward from 4096, so vxnet
# allocates from 2^23 upward: the two never meet in practice, and a VNI shared on one host's UDP socket would
# make the second device fail to come up.
VNI_MIN = 1
VNI_AUTO_BASE = 1 << 23
# The top VNI is the health overlay's on every host (kernel/names.py HEALTH_VNI): a network on it would take the
# doctor's probes. Networks get VNI_MIN .. VNI_MAX.
VNI_MAX = names.HEALTH_VNI - 1

# RFC 791: 68 is the minimum IPv4 MTU; 9000 is the usual jumbo frame ceiling for underlays we can carry.
MTU_MIN = 68
MTU_MAX = 9000

_KNOWN = {MTU_KEY, "mtu", "vni", "overlay", "encrypted", "policy", "policy-audit"}
_OVERLAY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


@dataclasses.dataclass(frozen=True)
class NetworkOptions:
    mtu: Optional[int] = None  # None: underlay MTU minus VXLAN overhead
    vni: Optional[int] = None  # None: allocate
    overlay: Optional[str] = None  # standalone hosts naming the same overlay share one VNI and pool
    internal: bool = False
    encrypted: bool = False  # IPsec ESP between VTEPs (encrypt/), VXLAN on its own port
    ipv6: bool = False  # --ipv6: dual stack (the IPv6 pools come as IPv6Data)
    policy: str = "open"  # open | exposed | deny (netdriver/policy.py): fixed at creation
    policy_audit: bool = False  # log what the policy would drop, and drop nothing
    generic: Dict[str, str] = dataclasses.field(default_factory=dict)


def _truthy(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("", "1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise InvalidOption(f"option {key}: {value!r} is not a boolean (true or false)")


def _int(key: str, value: Any, low: int, high: int, what: str) -> int:
    text = str(value).strip()
    # ASCII digits, not \d (int() takes other scripts' digits too), and few of them (int() refuses a string of
    # more than 4300 digits with ValueError; no bound here needs more than 8).
    if not re.fullmatch(r"[0-9]{1,9}", text) or not low <= int(text) <= high:
        raise InvalidOption(f"option {key}: {value!r} is not a valid {what} ({low}-{high})")
    return int(text)


def parse(options: Dict[str, Any]) -> NetworkOptions:
    """Options of CreateNetwork/AllocateNetwork -> NetworkOptions; InvalidOption names the key and the value."""
    generic = options.get(GENERIC) or {}
    if not isinstance(generic, dict):
        raise InvalidOption(f"{GENERIC}: expected a map of driver options")
    unknown = sorted(k for k in generic if k not in _KNOWN)
    if unknown:
        raise InvalidOption(
            f"unknown option {unknown[0]!r} for the vxnet driver (known: {', '.join(sorted(_KNOWN))})")
    mtu = None
    for key in (MTU_KEY, "mtu"):
        if key in generic:
            mtu = _int(key, generic[key], MTU_MIN, MTU_MAX, "MTU")
    vni = _int("vni", generic["vni"], VNI_MIN, names.HEALTH_VNI, "VXLAN VNI") if "vni" in generic else None
    if vni == names.HEALTH_VNI:
        raise InvalidOption(f"option vni: {vni} is reserved for vxnet's health overlay (the path `vxnet doctor` "
                            f"probes); choose {VNI_MIN}-{VNI_MAX}")
    overlay = None
    if "overlay" in generic:
        overlay = str(generic["overlay"])
        if not _OVERLAY_NAME.fullmatch(overlay):
            raise InvalidOption(f"option overlay: {overlay!r} must be 1-63 letters, digits, '.', '_' or '-'")
    policy = str(generic.get("policy", "open")).strip().lower()
    if policy not in MODES:
        raise InvalidOption(f"option policy: {generic['policy']!r} is not a policy mode ({', '.join(MODES)})")
    return NetworkOptions(
        mtu=mtu,
        vni=vni,
        overlay=overlay,
        internal=_truthy(INTERNAL, options.get(INTERNAL, False)),
        ipv6=_truthy(ENABLE_IPV6, options.get(ENABLE_IPV6, False)),
        encrypted="encrypted" in generic and _truthy("encrypted", generic["encrypted"]),
        policy=policy,
        policy_audit="policy-audit" in generic and _truthy("policy-audit", generic["policy-audit"]),
        generic={str(k): str(v) for k, v in generic.items()},
    )
