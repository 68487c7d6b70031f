"""What this kernel can do for vxnet, found out by asking it: today, whether it does the ESP that encrypted networks
need (rfc4106(gcm(aes)) in transport mode), and if not, which modules are missing.

The answer comes from adding a real SA in a private, throwaway network namespace (nothing is left behind on the
host); the module lists (/sys/module, modules.builtin, the kernel's build options) only explain a refusal.
"""

import errno
import gzip
import os
import threading
from typing import Callable, Dict, List, Optional, Set

from pyroute2.netlink.exceptions import NetlinkError

from kernel import names
from kernel.errors import netlink_reason
from kernel.xfrm import SA, Xfrm, open_socket
from wire.errors import EncryptionUnavailable, KernelError

# What rfc4106(gcm(aes)) transport-mode ESP needs, in load order, with the kernel option that builds each. The
# RNG: ESP's IV generator (seqiv) takes the kernel's default RNG (drbg, HMAC-SHA512), which seeds from
# jitterentropy, which hashes with SHA-3; without them every SA add fails with "Kernel was unable to initialize
# cryptographic operations".
ESP_MODULES = (
    ("xfrm_algo", ("CONFIG_XFRM_ALGO",)),
    ("xfrm_user", ("CONFIG_XFRM_USER",)),
    ("esp4", ("CONFIG_INET_ESP",)),
    ("aead", ("CONFIG_CRYPTO_AEAD",)),
    ("gf128mul", ("CONFIG_CRYPTO_GF128MUL", "CONFIG_CRYPTO_LIB_GF128MUL")),
    ("ghash_generic", ("CONFIG_CRYPTO_GHASH",)),
    ("ctr", ("CONFIG_CRYPTO_CTR",)),
    ("gcm", ("CONFIG_CRYPTO_GCM",)),
    ("seqiv", ("CONFIG_CRYPTO_SEQIV",)),
    ("sha512_generic", ("CONFIG_CRYPTO_SHA512",)),
    ("sha3_generic", ("CONFIG_CRYPTO_SHA3",)),
    ("jitterentropy_rng", ("CONFIG_CRYPTO_JITTERENTROPY",)),
    ("drbg", ("CONFIG_CRYPTO_DRBG",)),
)
_PROBE_SPI = 0x100  # lowest non-reserved SPI (RFC 4303 2.1); the probe SA lives in a namespace of its own
_PROBE_SRC, _PROBE_DST = "192.0.2.1", "192.0.2.2"  # RFC 5737 TEST-NET-1
# rfc4106 key material is the AES key followed by a 4-byte salt (RFC 4106 8.1): AES-128 + salt, the size of
# encrypt.keys' material (any valid size would do: the probe asks for the algorithm, not for a key).
_PROBE_KEY = bytes(16 + 4)


def kernel_config() -> Optional[Dict[str, str]]:
    """The running kernel's build options (/proc/config.gz or /boot/config-<release>), None if unreadable."""
    release = os.uname().release
    for path, opener in (("/proc/config.gz", gzip.open), (f"/boot/config-{release}", open)):
        try:
            with opener(path, "rt") as f:
                out = {}
                for line in f:
                    if line.startswith("CONFIG_") and "=" in line:
                        name, value = line.strip().split("=", 1)
                        out[name] = value
                return out
        except OSError:
            continue
    return None


def builtin_modules() -> Set[str]:
    """The modules built into the running kernel (modules.builtin), empty if unreadable."""
    try:
        with open(f"/lib/modules/{os.uname().release}/modules.builtin") as f:
            return {os.path.basename(line.strip())[:-3] for line in f if line.strip().endswith(".ko")}
    except OSError:
        return set()


def module_loaded(name: str) -> bool:
    """A module that is loaded (or built in and showing parameters) has /sys/module/<name>."""
    return os.path.isdir(f"/sys/module/{name}")


def add_test_sa() -> None:
    """Add and delete one rfc4106(gcm(aes)) transport SA, in a private namespace where this process may make one
    (else here, with TEST-NET addresses and our reqid): the kernel loads what it can and says what it lacks.
    Raises KernelError (the NetlinkError its __cause__) or OSError on a refusal."""
    try:
        sock = open_socket(private=True)
    except OSError as exc:
        if exc.errno != errno.EPERM:
            raise
        sock = open_socket()  # no CAP_SYS_ADMIN
    probe = SA(_PROBE_SRC, _PROBE_DST, _PROBE_SPI, _PROBE_KEY, names.ENCRYPTED_VXLAN_PORT)
    with Xfrm(sock=sock) as xfrm:
        xfrm.delete_sa(_PROBE_DST, _PROBE_SPI)
        xfrm.add_sa(probe)
        xfrm.delete_sa(_PROBE_DST, _PROBE_SPI)


class EspProbe:
    """Can this kernel do ESP with rfc4106(gcm(aes))? A success is remembered; a failure is probed again next
    time (modules can be loaded meanwhile). Thread-safe.

    Its inputs are parameters (the real kernel's by default) so that a test can give it any kernel: try_sa adds
    and removes a test SA (raising on refusal), config returns the build options (None: unknown), builtin the
    built-in modules, loaded whether a module is loaded."""

    def __init__(self, try_sa: Callable[[], None] = add_test_sa,
                 config: Callable[[], Optional[Dict[str, str]]] = kernel_config,
                 builtin: Callable[[], Set[str]] = builtin_modules,
                 loaded: Callable[[str], bool] = module_loaded):
        self._try_sa = try_sa
        self._config = config
        self._builtin = builtin
        self._loaded = loaded
        self._ok = False
        self._lock = threading.Lock()

    def missing_modules(self) -> List[str]:
        """The ESP_MODULES this kernel lacks, each with why: "esp4 (CONFIG_INET_ESP is not set)" when the kernel
        was built without it, "esp4 (not loaded)" when it is a module that is not loaded (or nothing says
        otherwise)."""
        config = self._config()
        builtin = self._builtin()
        out = []
        for name, options in ESP_MODULES:
            if self._loaded(name) or name in builtin:
                continue
            if config is not None:
                values = [config.get(o) for o in options]
                if "y" in values:
                    continue
                if "m" not in values:
                    out.append(f"{name} ({options[0]} is not set)")
                    continue
            out.append(f"{name} (not loaded)")
        return out

    def unavailable_reason(self) -> Optional[str]:
        """None if this kernel can add an ESP SA with rfc4106(gcm(aes)); otherwise the message to show, naming the
        missing modules."""
        with self._lock:
            if self._ok:
                return None
            try:
                self._try_sa()
            except (KernelError, NetlinkError, OSError) as exc:
                missing = self.missing_modules()
                modules = [name for name, _ in ESP_MODULES]
                cause = exc.__cause__
                refused = netlink_reason(cause) if isinstance(cause, NetlinkError) else str(exc)
                return (f"this kernel cannot encrypt VXLAN with IPsec ESP (it refused a test SA: {refused}). "
                        f"Missing: {', '.join(missing) if missing else 'no module detectably, see the error'}. "
                        f"Encrypted networks need the kernel modules {', '.join(modules)} (load them with "
                        f"`modprobe -a {' '.join(modules)}` on the host, or use a kernel that has them), or create "
                        "the network without -o encrypted")
            self._ok = True
            return None

    def supported(self) -> bool:
        return self.unavailable_reason() is None

    def require(self) -> None:
        """Raise EncryptionUnavailable (HTTP 501 to dockerd, the message to the user) unless ESP works here."""
        reason = self.unavailable_reason()
        if reason is not None:
            raise EncryptionUnavailable(reason)
