"""This host's VTEP: the underlay address VXLAN leaves from and peers send to, and the MTU of its interface.

Chosen in this order: VXNET_ADVERTISE_ADDR when set; else the address Swarm reports for this node in DiscoverNew
(`Self: true`), which is the address the operator gave `docker swarm init/join --advertise-addr`; else the address
of the interface holding the default route.
"""

import logging
import threading
from typing import Callable, Optional

from wire.errors import InvalidRequest

log = logging.getLogger(__name__)

DEFAULT_MTU = 1500  # Ethernet (RFC 894), when the address is not (yet) on any interface we can see


class Underlay:
    def __init__(self, mtu_of: Callable[[str], Optional[int]], explicit: Optional[str] = None,
                 fallback: Optional[str] = None):
        self._mtu_of = mtu_of
        self._explicit = explicit
        self._address = explicit or fallback
        self._lock = threading.Lock()

    @property
    def address(self) -> Optional[str]:
        return self._address

    def require(self) -> str:
        """The VTEP address, or an error saying how to give one."""
        address = self._address
        if not address:
            raise InvalidRequest("vxnet has no underlay address for VXLAN: set VXNET_ADVERTISE_ADDR "
                                 "(`docker plugin set vxnet:latest VXNET_ADVERTISE_ADDR=...`) or join a Swarm")
        return address

    @property
    def mtu(self) -> int:
        return (self._mtu_of(self._address) if self._address else None) or DEFAULT_MTU

    def discovered(self, address: str) -> bool:
        """Swarm told us this node's address; True if it becomes the VTEP (it changed and none was configured)."""
        with self._lock:
            if self._explicit or not address or address == self._address:
                return False
            if self._mtu_of(address) is None:
                log.warning("DiscoverNew reports %s, which no interface here has; keeping %s", address,
                            self._address)
                return False
            log.info("VTEP is now %s (from Swarm), was %s", address, self._address)
            self._address = address
            return True
