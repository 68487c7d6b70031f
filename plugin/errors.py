"""The error classes vxnet raises, each carrying the HTTP status dockerd receives.

Only plugin/http.py turns these into `{"Err": ...}` replies; everything below it raises. This module imports
nothing from the project so every layer may use it.
"""


class VxnetError(Exception):
    """Base class: an error with a message meant for the operator reading `docker` output."""

    status = 500


class InvalidRequest(VxnetError):
    """A request body that is not JSON, or a field that is missing or of the wrong type."""

    status = 400


class InvalidOption(VxnetError):
    """A `-o`/`--ipam-opt` key we do not know, or a value we cannot accept."""

    status = 400


class NotFound(VxnetError):
    status = 404


class Conflict(VxnetError):
    """The request asks for something another holder already has (overlapping pool, address in use)."""

    status = 409


class Exhausted(VxnetError):
    """No free VNI, pool or address is left."""

    status = 507


class StoreUnavailable(VxnetError):
    """etcd could not be reached or did not answer in time."""

    status = 503


class KernelError(VxnetError):
    """A netlink or firewall operation failed; the message names the object and the errno."""

    status = 500


class ConfigError(VxnetError):
    """A setting read at start-up is invalid: the daemon stops with this one line."""
