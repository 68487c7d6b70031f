"""The one place netlink and OS errors become KernelError (wire/errors.py), naming what we were doing."""

import contextlib
import os
from typing import Iterator

from pyroute2.netlink.exceptions import NetlinkError

from wire.errors import KernelError


def netlink_reason(exc: NetlinkError) -> str:
    """The errno's text, with the kernel's extended ack message when it sent one."""
    text = os.strerror(exc.code) if exc.code else "error"
    extra = exc.args[1] if len(exc.args) > 1 and exc.args[1] else None
    if isinstance(extra, bytes):
        extra = extra.decode(errors="replace").strip("\0")
    return f"{extra} ({text}, errno {exc.code})" if extra else f"{text} (errno {exc.code})"


@contextlib.contextmanager
def kernel_errors(what: str) -> Iterator[None]:
    """Turn netlink and OS errors raised in the body into KernelError naming what we were doing (the errno is
    KernelError.errno, the original stays the __cause__)."""
    try:
        yield
    except NetlinkError as exc:
        raise KernelError(f"{what}: {netlink_reason(exc)}", exc.code or None) from exc
    except OSError as exc:
        raise KernelError(f"{what}: {exc.strerror or exc} (errno {exc.errno})", exc.errno) from exc
