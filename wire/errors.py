"""The error classes vxnet raises, each carrying the HTTP status dockerd receives.

Only plugin/http.py turns these into `{"Err": ...}` replies; everything below it raises. This module imports
nothing, from the project or outside it, so every layer may use it; kernel/errors.py is the one place netlink
and OS errors become KernelError.
"""

from typing import Optional


class VxnetError(Exception):
    """Base class: an error with a message meant for the operator reading `docker` output."""

    status = 500


class InvalidRequest(VxnetError):
    """A request body that is not JSON, or a field that is missing or of the wrong type."""

    status = 400


class InvalidOption(VxnetError):
    """A `-o`/`--ipam-opt` key we do not know, or a value we cannot accept."""

    status = 400


# No error here maps to 404: in the plugin protocol 404 means "method not implemented", and dockerd takes it as
# success from ProgramExternalConnectivity/RevokeExternalConnectivity (moby libnetwork/drivers/remote/driver.go:
# "It is not mandatory yet to support this method") and as a hard failure everywhere else. A request naming a
# network, endpoint or pool vxnet does not have conflicts with what it holds: Conflict.


class Conflict(VxnetError):
    """The request asks for something another holder already has (overlapping pool, address in use, a VNI
    another VXLAN device holds), or names something vxnet does not have (unknown network, endpoint, pool)."""

    status = 409


class HostIdConflict(Conflict):
    """Another live host holds this host's ID in etcd: this plugin must not serve as it. Not retried: only the
    operator can resolve it (the message names both hosts and the remedy)."""


class Exhausted(VxnetError):
    """No free VNI, pool or address is left."""

    status = 507


class StoreUnavailable(VxnetError):
    """etcd could not be reached or did not answer in time."""

    status = 503


class KernelError(VxnetError):
    """A netlink or firewall operation failed; the message names the object and the errno, `errno` holds it
    (None when the failure carried none)."""

    status = 500

    def __init__(self, message: str, errno: Optional[int] = None):
        super().__init__(message)
        self.errno = errno


class EncryptionUnavailable(KernelError):
    """The kernel cannot do what encrypted networks need (kernel/probes.py); the message names the missing
    modules."""

    status = 501


class ConfigError(VxnetError):
    """A setting read at start-up is invalid: the daemon stops with this one line."""


class SchemaTooNew(VxnetError):
    """The etcd store was written by a vxnet whose schema major version this plugin does not know
    (store/compat.py): serving would misread it. Not retried: the message names both versions and the remedy."""
