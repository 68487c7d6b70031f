"""The etcd client's transport on loopback: a refused connection, a silent server and an error answer each become
StoreUnavailable saying which (read from the errors' types and the HTTP status); the next endpoint is tried when
one is down, and the one that answered is asked first next time. (Against a real etcd: tests/kernel.)"""

import http.server
import json
import socket
import threading
import time

import pytest

from store.kvstore import EtcdKV
from wire.errors import StoreUnavailable


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Gateway(http.server.BaseHTTPRequestHandler):
    """Answers every POST with the server's (status, body); records the paths asked."""

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.paths.append(self.path)
        status, body = self.server.answer
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def gateway():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Gateway)
    server.paths, server.answer = [], (200, {"header": {"revision": "7"}})
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_a_refused_connection_is_store_unavailable_saying_so():
    url = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(StoreUnavailable, match=rf"etcd unreachable at {url} \({url}: connection refused\)"):
        EtcdKV([url]).get("/k")


def test_a_server_that_never_answers_is_a_timeout_within_the_timeout():
    with socket.socket() as silent:  # accepts (the kernel's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match=rf"{url}: timed out"):
            EtcdKV([url], timeout=0.5).get("/k")
        assert time.monotonic() - started < 3


def test_an_error_answer_is_store_unavailable_with_the_status_and_the_gateways_message(gateway):
    url = f"http://127.0.0.1:{gateway.server_port}"
    assert EtcdKV([url]).revision() == 7  # positive control: the same server, a good answer
    gateway.answer = (400, {"error": "etcdserver: too many operations in txn request", "code": 3,
                            "message": "etcdserver: too many operations in txn request"})
    with pytest.raises(StoreUnavailable, match=rf"etcd at {url} refused kv/txn: HTTP 400 etcdserver: too many"):
        EtcdKV([url]).commit(deletes=["/a"])


def test_a_down_endpoint_is_skipped_and_the_one_that_answered_is_asked_first(gateway):
    down, up = f"http://127.0.0.1:{_closed_port()}", f"http://127.0.0.1:{gateway.server_port}"
    kv = EtcdKV([down, up])
    assert kv.current_endpoint() == down
    assert kv.revision() == 7 and kv.current_endpoint() == up
    assert kv.put("/k", "v") == 7
    assert gateway.paths == ["/v3/kv/range", "/v3/kv/put"]
