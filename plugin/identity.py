"""This host's identity: the ID that names it in etcd, and the hostname people read.

The ID keys this host's records (members/<segment>/<id>, endpoints' `host`, IPAM holders, hosts/<id>), so it must
be unique per host and stable across restarts and upgrades. The hostname is neither: cloned VMs and stock images
share one (`localhost`, `ubuntu`), and a minimal VM before its init runs has `(none)`. So, as dockerd keeps its
engine ID, the ID is generated once and kept in VXNET_STATE_DIR (the managed plugin's propagated mount, which
survives plugin restarts and upgrades); VXNET_HOST_ID overrides it. The hostname is only recorded beside it.

Called by the composition root at start-up (file I/O); nothing here runs at import time.
"""

import dataclasses
import os
import re
import secrets
import tempfile
from typing import Optional

from wire.errors import ConfigError

# A safe etcd key component and IPAM holder name: no '/', no leading '.' or '-', and never '@' (SWARM_HOLDER).
HOST_ID_RULE = "1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"
_HOST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
IDENTITY_FILE = "host-id"
# 128 random bits as hex, as dockerd's engine ID: no two hosts draw the same one.
_GENERATED_BYTES = 16
_MAX_FILE = 256  # a host ID is at most 63 characters; anything much longer is not one


def valid_host_id(value: str) -> bool:
    return _HOST_ID.fullmatch(value) is not None


def lease_file(state_dir: str, host_id: str) -> str:
    """Where HostLease keeps its lease ID (the name the hostname-as-ID versions used too)."""
    return os.path.join(state_dir, f"lease-{host_id}")


@dataclasses.dataclass(frozen=True)
class Identity:
    id: str  # the key in etcd
    name: str  # the hostname, for people: logs and the host record
    source: str  # where the ID came from: "VXNET_HOST_ID", or the identity file's path

    def __str__(self) -> str:
        return self.id if self.name == self.id else f"{self.name} ({self.id})"

    def remedy(self) -> str:
        """What an operator does when another live host claims this ID."""
        if self.source == "VXNET_HOST_ID":
            return "give each host its own VXNET_HOST_ID"
        return (f"if this machine is a copy of the other, delete {self.source} here and restart the plugin "
                "to generate a new ID")


def read(path: str) -> Optional[str]:
    """The ID kept in path, None if there is none; ConfigError naming the file and the reason if it is not one."""
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_FILE + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"host identity file {path}: cannot be read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        text = None
    if text is None or len(raw) > _MAX_FILE or not valid_host_id(text):
        shown = raw[:80].decode("ascii", "backslashreplace")
        raise ConfigError(f"host identity file {path}: {shown!r} is not a host ID ({HOST_ID_RULE}); fix it, "
                          "or delete it to generate a new ID (records in etcd under the old ID stay orphaned)")
    return text


def _create(path: str, value: str) -> str:
    """Write value to path unless path exists; return what path holds afterwards (ours, or a racing writer's).

    The value goes into a private temporary file, is synced, then hard-linked to path: link(2) fails with EEXIST
    instead of replacing, so of two processes starting at once exactly one wins and the other reads the winner's
    ID; and path never exists half-written (a crash leaves at most a temporary file)."""
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".host-id.", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(value + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
    finally:
        os.unlink(tmp)
    dirfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dirfd)  # the new name survives a power cut
    finally:
        os.close(dirfd)
    found = read(path)
    if found is None:
        raise ConfigError(f"host identity file {path}: vanished right after it was written")
    return found


def resolve(state_dir: str, override: str, hostname: str) -> Identity:
    """The host's identity: VXNET_HOST_ID if set (config has validated it), else the ID in the state dir's
    identity file, created on first start."""
    if override:
        return Identity(override, hostname, "VXNET_HOST_ID")
    path = os.path.join(state_dir, IDENTITY_FILE)
    found = read(path)
    if found is None:
        try:
            os.makedirs(state_dir, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"VXNET_STATE_DIR: {state_dir}: cannot be created: {exc.strerror or exc}") from None
        # Upgrade from the versions that used the hostname as the ID: this host's networks, endpoints and IPAM
        # holds in etcd are under its hostname, and its lease file (lease-<hostname>) says it ran here. Keeping
        # the hostname as the ID keeps those records this host's; a new random ID would orphan them (and its
        # networks would be torn down as another host's). A host without that file never wrote records under
        # its hostname, so it gets a generated ID. A hostname that is no valid ID cannot have been one.
        if valid_host_id(hostname) and os.path.exists(lease_file(state_dir, hostname)):
            candidate = hostname
        else:
            candidate = secrets.token_hex(_GENERATED_BYTES)
        try:
            found = _create(path, candidate)
        except OSError as exc:
            raise ConfigError(f"host identity file {path}: cannot be written: {exc.strerror or exc}") from None
    return Identity(found, hostname, path)


def instance() -> str:
    """What tells this running system from a copy of it: the kernel's boot ID (new at every boot, different on a
    cloned VM even when its disk, state dir included, is a copy) and the inode of this network namespace (tells
    apart hosts that share one kernel, as containers or simulated hosts do). Both stay the same across plugin
    restarts on one host, so a restarted plugin recognises the host record its predecessor wrote."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "unknown-boot"
    try:
        netns = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        netns = 0
    return f"{boot}/{netns}"
