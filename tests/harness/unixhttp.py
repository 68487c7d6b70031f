"""HTTP over a unix socket (dockerd's API, the plugin's socket), reachable by path from the root namespace."""

import http.client
import json
import socket
from typing import Any, Optional, Tuple


class _Connection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def request(path: str, method: str, url: str, body: Optional[Any] = None,
            timeout: float = 5.0) -> Tuple[int, bytes]:
    """One request; body is JSON-encoded when given. Returns (status, raw reply body)."""
    conn = _Connection(path, timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, url, body=data)
        reply = conn.getresponse()
        return reply.status, reply.read()
    finally:
        conn.close()
