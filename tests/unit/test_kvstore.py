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
    """Answers each POST with the next (status, body) of the server's script, then with its answer; records the
    paths asked."""

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.paths.append(self.path)
        status, body = self.server.script.pop(0) if self.server.script else self.server.answer
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
    server.paths, server.script, server.answer = [], [], (200, {"header": {"revision": "7"}})
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture
def gateway2():
    """A second gateway: another member of the same cluster."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Gateway)
    server.paths, server.script, server.answer = [], [], (200, {"header": {"revision": "8"}})
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


def _unavailable(message):
    """What etcd's gateway sends for a gRPC Unavailable error: HTTP 503 and the error in the body."""
    return 503, {"error": message, "code": 14, "message": message}


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


def test_a_member_refusing_for_a_leader_change_is_passed_over_for_the_next_which_is_then_asked_first(
        gateway, gateway2):
    """The leader was killed: the member asked first answers `leader changed` (a linearizable read it dropped),
    the next one has the new leader and answers."""
    first, second = (f"http://127.0.0.1:{g.server_port}" for g in (gateway, gateway2))
    gateway.answer = _unavailable("etcdserver: leader changed")
    kv = EtcdKV([first, second])
    assert kv.get_prefix("/k/") == ([], 8) and kv.current_endpoint() == second
    assert kv.put("/k", "v") == 8  # the one that answered is asked first: the first is not asked again
    assert gateway.paths == ["/v3/kv/range"] and gateway2.paths == ["/v3/kv/range", "/v3/kv/put"]


def test_a_cluster_electing_a_leader_is_asked_again_until_it_has_one(gateway):
    """The only endpoint has no leader for two answers (the election), then takes the write: the caller sees
    the write succeed, not the election."""
    url = f"http://127.0.0.1:{gateway.server_port}"
    gateway.script = [_unavailable("etcdserver: no leader"), _unavailable("etcdserver: leader changed")]
    gateway.answer = (200, {"header": {"revision": "9"}, "succeeded": True})
    assert EtcdKV([url]).commit(absent=["/a"], puts={"/a": "1"}) is True
    assert gateway.paths == ["/v3/kv/txn"] * 3


def test_a_write_that_timed_out_in_raft_is_not_sent_again_but_a_read_is(gateway):
    """`request timed out` may have been applied: a compare-and-swap sent again could find its own write and
    report failure, so it surfaces; the same refusal of a read (which changes nothing) is retried: the control."""
    url = f"http://127.0.0.1:{gateway.server_port}"
    gateway.script = [_unavailable("etcdserver: request timed out")]
    with pytest.raises(StoreUnavailable, match=rf"etcd at {url} refused kv/txn: HTTP 503 etcdserver: request timed"):
        EtcdKV([url]).commit(absent=["/a"], puts={"/a": "1"})
    assert gateway.paths == ["/v3/kv/txn"]
    gateway.script = [_unavailable("etcdserver: request timed out")]
    assert EtcdKV([url]).get_prefix("/a/") == ([], 7)
    assert gateway.paths == ["/v3/kv/txn"] + ["/v3/kv/range"] * 2


def test_a_cluster_that_stays_without_a_leader_is_store_unavailable_within_the_retry_window(gateway, monkeypatch):
    url = f"http://127.0.0.1:{gateway.server_port}"
    monkeypatch.setattr("store.kvstore.RETRY_SECONDS", 0.5)
    gateway.answer = _unavailable("etcdserver: no leader")
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match=rf"etcd at {url} refused kv/put: HTTP 503 etcdserver: no leader"
                                               r".*still after 0.5 s"):
        EtcdKV([url]).put("/k", "v")
    assert time.monotonic() - started < 2 and len(gateway.paths) >= 2
