"""A thin etcd v3 client over its JSON gateway, on one requests session: the only module that speaks to etcd.

Keys and values are str (values are JSON written by the stores). Every failure to reach etcd becomes
StoreUnavailable naming the endpoints, so a `docker` user reads "etcd unreachable at http://...". With several
endpoints (members of one cluster) a call goes to the one that answered last and moves on to the next when one
is unreachable or refuses for the cluster's passing state (an election: "leader changed", "no leader"), for up to
RETRY_SECONDS; every request asks for a member with a leader, so one cut off from its cluster refuses at once.
The stores build on six primitives: get, get_prefix, `read` (several keys and prefixes in one round trip, at
one revision), put, delete and `commit`, a compare-and-swap transaction (keys that must be absent, keys that must
be at a given revision, then puts and deletes). The keys themselves come from store/schema.py.

One HTTP stack: a requests session (TLS client certificate and CA from the settings, nothing from the
environment) carries the JSON calls and the watch's stream. Why a call failed is read from the types of the
errors requests raises and wraps (ssl.SSLError, ConnectionRefusedError, timeouts), and from the HTTP status.
"""

import base64
import dataclasses
import http.client
import json
import logging
import socket
import ssl
import threading
import time
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import requests
import urllib3

from telemetry.metrics import ETCD_ERRORS, ETCD_REQUESTS, ETCD_SECONDS
from wire.errors import StoreUnavailable, VxnetError

log = logging.getLogger(__name__)

# dockerd waits for a plugin call as long as it takes, but a user at `docker network create` should hear that
# etcd is gone within 5 s: 4 s per endpoint attempt leaves room for the rest of the call.
DEFAULT_TIMEOUT = 4.0


# A member answers HTTP 503 (gRPC Unavailable) while its cluster has no leader or has just changed it. A raft
# election takes one to two election timeouts (etcd's default: 1000 ms, randomised up to twice that) plus a round
# trip, so 3 s of retries covers a leader killed or frozen; past that the cluster has lost its quorum.
RETRY_SECONDS = 3.0
FIRST_RETRY_DELAY = 0.05
MAX_RETRY_DELAY = 0.5

# Refusals etcd sends before anything is proposed to raft, so nothing was applied and any request may be sent
# again: a linearizable read dropped by a leader change (ErrLeaderChanged), no leader to forward a proposal to
# (ErrNoLeader), a member not yet caught up (ErrNotCapable), a member shedding load (ErrTooManyRequests, HTTP
# 429), a member that lost its peers (ErrUnhealthy). A timeout ("request timed out", "...due to previous leader
# failure") may have been applied: only a request that changes nothing is sent again after one.
_NOT_APPLIED = ("leader changed", "no leader", "not capable", "too many requests", "unhealthy cluster")


def _idempotent(path: str, body: dict) -> bool:
    """True for a request that changes nothing (reads, a txn of reads only, a lease's TTL or keepalive, which
    only refreshes what it refreshed), so sending it again is always safe."""
    if path in ("kv/range", "lease/timetolive", "lease/keepalive", "maintenance/status"):
        return True
    if path == "kv/txn":
        ops = list(body.get("success") or []) + list(body.get("failure") or [])
        return all("request_range" in op for op in ops)
    return False


def _transient(status: int, detail: str, idempotent: bool) -> bool:
    """Whether a refusal is the cluster's passing state (another member, or the same one a moment later, may
    answer) rather than the request's fault."""
    if status == 429:
        return True
    if status != 503:
        return False
    return idempotent or any(text in detail for text in _NOT_APPLIED)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _unb64(text: str) -> str:
    return base64.b64decode(text).decode()


def prefix_end(prefix: str) -> str:
    """The etcd range_end that selects every key starting with prefix (last byte + 1)."""
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return raw.decode()


@dataclasses.dataclass(frozen=True)
class Entry:
    key: str
    value: str
    mod_revision: int
    create_revision: int
    lease: int = 0

    def json(self):
        return json.loads(self.value)


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """What `read` returns: each key's entry (None if missing), each prefix's entries sorted by key, and the
    revision they were all read at."""
    entries: Dict[str, Optional[Entry]]
    ranges: Dict[str, List[Entry]]
    revision: int


def _entry(kv: dict) -> Entry:
    return Entry(
        key=_unb64(kv["key"]),
        value=_unb64(kv.get("value", "")),
        mod_revision=int(kv.get("mod_revision", 0)),
        create_revision=int(kv.get("create_revision", 0)),
        lease=int(kv.get("lease", 0)),
    )


def _session(ca: Optional[str], cert: Optional[str], key: Optional[str]) -> requests.Session:
    """An HTTP session that asks etcd for a member with a leader and uses exactly our TLS files. trust_env off:
    requests otherwise lets REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE from the environment override the session's CA
    (and sends etcd traffic to HTTP proxies)."""
    session = requests.Session()
    session.trust_env = False
    # etcd's "require leader" (gRPC metadata hasleader=true, which its JSON gateway takes from this header): a
    # member cut off from its cluster refuses calls at once with "no leader" instead of timing out, so they fail
    # over, and ends a watch stream with that error within a few election timeouts, so the watch resyncs from a
    # member that has a leader rather than staying open and silent while the others move on.
    session.headers["Grpc-Metadata-hasleader"] = "true"
    if ca:
        session.verify = ca
    if cert and key:
        session.cert = (cert, key)
    return session


class EtcdKV:
    """etcd v3 over its JSON gateway (POST /v3/<service>/<method>, base64 keys and values). Thread-safe: each call
    is one HTTP request on a session whose connections are pooled per endpoint; the watch streams over the same
    session on a connection of its own."""

    def __init__(self, endpoints: Sequence[str], ca: Optional[str] = None, cert: Optional[str] = None,
                 key: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT):
        if not endpoints:
            raise ValueError("EtcdKV needs at least one endpoint")
        self.endpoints = tuple(url.rstrip("/") for url in endpoints)
        self.timeout = timeout
        self._session = _session(ca, cert, key)
        self._preferred = 0
        self._lock = threading.Lock()

    # -- transport ---------------------------------------------------------------------------------------------
    def _call(self, path: str, body: dict) -> dict:
        """POST body to /v3/<path> on the first endpoint that answers; StoreUnavailable if none does, or if one
        answers with an error (etcd refused the request: another endpoint of the same cluster would too).
        Counted once per call (op: path) whatever the endpoints tried, its latency with the failover included."""
        ETCD_REQUESTS.labels(op=path).inc()
        started = time.monotonic()
        try:
            return self._call_endpoints(path, body)
        except StoreUnavailable:
            ETCD_ERRORS.labels(op=path).inc()
            raise
        finally:
            ETCD_SECONDS.labels(op=path).observe(time.monotonic() - started)

    def _call_endpoints(self, path: str, body: dict) -> dict:
        """One round over the endpoints from the preferred one; a transient refusal (see _transient) moves on to
        the next endpoint like an unreachable one, and when a round met one, the next round starts after a
        short backoff, for up to RETRY_SECONDS: a cluster electing a leader answers again within that."""
        deadline = time.monotonic() + RETRY_SECONDS
        delay = FIRST_RETRY_DELAY
        idempotent = _idempotent(path, body)
        while True:
            errors, refusals = [], []
            with self._lock:
                order = list(range(len(self.endpoints)))
                order = order[self._preferred:] + order[:self._preferred]
            for index in order:
                url = self.endpoints[index]
                try:
                    reply = self._session.post(f"{url}/v3/{path}", json=body, timeout=self.timeout)
                except OSError as exc:  # requests' errors are OSErrors too, and so is an unreadable TLS file
                    errors.append(f"{url}: {_reason(exc)}")
                    continue
                if reply.status_code != 200:
                    detail = _detail(reply)
                    refusal = f"etcd at {url} refused {path}: HTTP {reply.status_code} {detail}"
                    if not _transient(reply.status_code, detail, idempotent):
                        raise StoreUnavailable(refusal)
                    refusals.append(refusal)
                    continue
                try:
                    answer = reply.json()
                except ValueError:
                    raise StoreUnavailable(f"etcd at {url} answered {path} with something that is not JSON") \
                        from None
                with self._lock:
                    self._preferred = index
                return answer
            if not refusals:  # nobody answered at all: etcd is gone, say so now
                raise StoreUnavailable("etcd unreachable at " + ", ".join(self.endpoints) + " (" +
                                       "; ".join(errors) + ")")
            if time.monotonic() + delay > deadline:
                raise StoreUnavailable("; ".join(refusals + errors) + f" (still after {RETRY_SECONDS:g} s)")
            log.debug("etcd %s: %s; trying again in %.2f s", path, "; ".join(refusals), delay)
            time.sleep(delay)  # a backoff between rounds, not a synchronisation
            delay = min(delay * 2, MAX_RETRY_DELAY)

    def _stream(self, path: str, body: dict) -> Tuple[str, requests.Response]:
        """POST body to /v3/<path> on the endpoint that answered last, for a response read as it arrives: the
        connect timeout as for every call, no read timeout (a quiet watch is normal; a dead etcd closes the
        connection, a silent partition is caught by the lease keepalive, which closes the stream).
        Counted as a request of op path, its latency up to the response's headers (the stream lasts as long as it
        lasts); an error if it cannot be opened (WatchStream counts a stream that breaks)."""
        url = self.current_endpoint()
        ETCD_REQUESTS.labels(op=path).inc()
        started = time.monotonic()
        try:
            try:
                reply = self._session.post(f"{url}/v3/{path}", json=body, stream=True,
                                           timeout=(self.timeout, None))
            except OSError as exc:
                raise StoreUnavailable(f"etcd unreachable at {url} ({path}: {_reason(exc)})") from None
            if reply.status_code != 200:
                detail = _detail(reply)
                reply.close()
                raise StoreUnavailable(f"etcd at {url} refused {path}: HTTP {reply.status_code} {detail}")
        except StoreUnavailable:
            ETCD_ERRORS.labels(op=path).inc()
            raise
        finally:
            ETCD_SECONDS.labels(op=path).observe(time.monotonic() - started)
        return url, reply

    # -- reads -------------------------------------------------------------------------------------------------
    def get(self, key: str) -> Optional[Entry]:
        reply = self._call("kv/range", {"key": _b64(key)})
        kvs = reply.get("kvs") or []
        return _entry(kvs[0]) if kvs else None

    def get_prefix(self, prefix: str) -> Tuple[List[Entry], int]:
        """Every entry under prefix, sorted by key, and the store revision they were read at."""
        reply = self._call("kv/range", {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix))})
        entries = sorted((_entry(kv) for kv in reply.get("kvs") or []), key=lambda e: e.key)
        return entries, int(reply.get("header", {}).get("revision", 0))

    def read(self, keys: Sequence[str] = (), prefixes: Sequence[str] = ()) -> "Snapshot":
        """Several keys and prefixes in one round trip (a transaction of reads only), all at one revision."""
        ops = [{"request_range": {"key": _b64(k)}} for k in keys]
        ops += [{"request_range": {"key": _b64(p), "range_end": _b64(prefix_end(p))}} for p in prefixes]
        reply = self._call("kv/txn", {"compare": [], "success": ops, "failure": []})
        results = [[_entry(kv) for kv in (r.get("response_range") or {}).get("kvs") or []]
                   for r in reply.get("responses") or []]
        if len(results) != len(ops):
            raise StoreUnavailable(f"etcd answered {len(results)} of {len(ops)} reads in one transaction")
        return Snapshot(
            entries={k: (found[0] if found else None) for k, found in zip(keys, results)},
            ranges={p: sorted(found, key=lambda e: e.key) for p, found in zip(prefixes, results[len(keys):])},
            revision=int(reply.get("header", {}).get("revision", 0)))

    # -- writes ------------------------------------------------------------------------------------------------
    def put(self, key: str, value: str, lease: int = 0) -> int:
        body = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = lease
        return int(self._call("kv/put", body).get("header", {}).get("revision", 0))

    def delete(self, key: str) -> bool:
        reply = self._call("kv/deleterange", {"key": _b64(key)})
        return int(reply.get("deleted", 0)) > 0

    def delete_prefix(self, prefix: str) -> int:
        reply = self._call("kv/deleterange", {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix))})
        return int(reply.get("deleted", 0))

    def create(self, key: str, value: str, lease: int = 0) -> bool:
        """Put key only if it does not exist; True if this call created it."""
        return self.commit(absent=[key], puts={key: value}, lease=lease)

    def commit(self, absent: Iterable[str] = (), revisions: Optional[Dict[str, int]] = None,
               puts: Optional[Dict[str, str]] = None, deletes: Iterable[str] = (), lease: int = 0,
               unchanged_since: Optional[Dict[str, int]] = None, delete_prefixes: Iterable[str] = ()) -> bool:
        """One atomic transaction: if every key in `absent` is missing, every key in `revisions` is at that
        mod_revision (0 = missing), and no key under a prefix in `unchanged_since` was written after that
        revision (so none was created either), apply `puts`, `deletes` and `delete_prefixes` (each a range
        delete: one operation however many keys it holds) and return True; otherwise change nothing and return
        False."""
        compare = [{"key": _b64(k), "target": "CREATE", "result": "EQUAL", "create_revision": 0} for k in absent]
        for k, rev in (revisions or {}).items():
            compare.append({"key": _b64(k), "target": "MOD", "result": "EQUAL", "mod_revision": rev})
        for prefix, rev in (unchanged_since or {}).items():
            # A compare with range_end applies to every key in the range (etcd >= 3.3).
            compare.append({"key": _b64(prefix), "range_end": _b64(prefix_end(prefix)), "target": "MOD",
                            "result": "LESS", "mod_revision": rev + 1})
        success = []
        for k, v in (puts or {}).items():
            put = {"key": _b64(k), "value": _b64(v)}
            if lease:
                put["lease"] = lease
            success.append({"request_put": put})
        success += [{"request_delete_range": {"key": _b64(k)}} for k in deletes]
        success += [{"request_delete_range": {"key": _b64(p), "range_end": _b64(prefix_end(p))}}
                    for p in delete_prefixes]
        reply = self._call("kv/txn", {"compare": compare, "success": success, "failure": []})
        return bool(reply.get("succeeded", False))

    # -- leases ------------------------------------------------------------------------------------------------
    def lease_grant(self, ttl: int) -> int:
        return int(self._call("lease/grant", {"TTL": ttl, "ID": 0})["ID"])

    def lease_keepalive(self, lease_id: int) -> int:
        """Refresh a lease; returns the remaining TTL, 0 if the lease is gone."""
        reply = self._call("lease/keepalive", {"ID": lease_id})
        return int(reply.get("result", {}).get("TTL", 0))

    def lease_ttl(self, lease_id: int) -> int:
        """A lease's remaining TTL in seconds without renewing it (TimeToLive), 0 if it is gone.
        Wire: {"ID": id} -> {"ID", "TTL": seconds or -1 when expired, "grantedTTL"}."""
        reply = self._call("lease/timetolive", {"ID": lease_id})
        return max(0, int(reply.get("TTL", 0)))

    def watch(self, prefix: str, start_revision: int) -> "WatchStream":
        return WatchStream(self, prefix, start_revision)

    def current_endpoint(self) -> str:
        with self._lock:
            return self.endpoints[self._preferred]

    def revision(self) -> int:
        reply = self._call("kv/range", {"key": _b64("\0"), "limit": 1})
        return int(reply.get("header", {}).get("revision", 0))

    def member_status(self, url: str) -> Tuple[dict, Optional[str]]:
        """One endpoint's own view of itself, for `vxnet doctor`: POST /v3/maintenance/status on url alone (no
        failover), -> (its answer: {"header": {"member_id", ...}, "version", "leader", "raftTerm", "errors"?},
        the HTTP Date header of the reply, which tells the clock skew). StoreUnavailable naming url."""
        try:
            # Without the session's require-leader header: a member without a leader still tells its own view.
            reply = self._session.post(f"{url}/v3/maintenance/status", json={}, timeout=self.timeout,
                                       headers={"Grpc-Metadata-hasleader": None})
        except OSError as exc:
            raise StoreUnavailable(f"etcd unreachable at {url} ({_reason(exc)})") from None
        if reply.status_code != 200:
            raise StoreUnavailable(f"etcd at {url} refused maintenance/status: HTTP {reply.status_code} "
                                   f"{_detail(reply)}")
        try:
            answer = reply.json()
        except ValueError:
            raise StoreUnavailable(f"etcd at {url} answered maintenance/status with something that is not JSON") \
                from None
        return (answer if isinstance(answer, dict) else {}), reply.headers.get("Date")


@dataclasses.dataclass(frozen=True)
class WatchEvent:
    kind: str  # "put" or "delete"
    key: str
    value: Optional[str]  # None for deletes
    prev_value: Optional[str]  # None when the key was created (or etcd no longer had the previous version)
    mod_revision: int


class Compacted(VxnetError):
    """The watch asked for a revision etcd has compacted away: the watcher must resync from a fresh read."""

    status = 503

    def __init__(self, compact_revision: int):
        super().__init__(f"etcd compacted past revision {compact_revision}")
        self.compact_revision = compact_revision


class WatchStream:
    """One watch on a key prefix from a start revision. Iterate for events; `close()` (from any thread) ends the
    iteration. Raises StoreUnavailable when the stream breaks and Compacted when the start revision is gone.
    Wire: one create_request, then newline-separated JSON messages {"result": {"events", "compact_revision",
    "canceled", ...}} on the chunked response."""

    def __init__(self, kv: "EtcdKV", prefix: str, start_revision: int):
        self.kv = kv
        self.prefix = prefix
        self.start_revision = start_revision
        self._reply: Optional[requests.Response] = None
        self._closed = threading.Event()

    def close(self) -> None:
        self._closed.set()
        reply = self._reply
        connection = reply.raw.connection if reply is not None else None
        sock = getattr(connection, "sock", None)
        if sock is not None:
            # Shutting the socket down is what wakes a reader blocked in recv() on another thread; close() alone
            # waits for that reader.
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __iter__(self):
        request = {"create_request": {"key": _b64(self.prefix), "range_end": _b64(prefix_end(self.prefix)),
                                      "start_revision": self.start_revision, "prev_kv": True}}
        try:
            url, reply = self.kv._stream("watch", request)
        except StoreUnavailable:
            if self._closed.is_set():
                return
            raise
        # Set before the check: close() either sees the reply (and shuts its socket) or is seen here.
        self._reply = reply
        buffer = b""
        try:
            while not self._closed.is_set():
                chunk = reply.raw.read1(65536)
                if not chunk:
                    # The gateway's last message before it ends a stream (the error a member cancels a watch
                    # with, "no leader") comes without a newline after it.
                    if buffer.strip() and not self._closed.is_set():
                        yield from self._events(json.loads(buffer))
                    break
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        yield from self._events(json.loads(line))
        except (OSError, urllib3.exceptions.HTTPError, http.client.HTTPException, ValueError) as exc:
            if not self._closed.is_set():
                ETCD_ERRORS.labels(op="watch").inc()
                raise StoreUnavailable(f"etcd watch on {url} broke: {_reason(exc)}") from None
        except StoreUnavailable:  # an error or a cancel etcd sent on the stream
            ETCD_ERRORS.labels(op="watch").inc()
            raise
        finally:
            reply.close()
        if not self._closed.is_set():
            ETCD_ERRORS.labels(op="watch").inc()
            raise StoreUnavailable(f"etcd at {url} closed the watch stream")

    def _events(self, message: dict):
        result = message.get("result") or {}
        if "error" in message:
            raise StoreUnavailable(f"etcd watch error: {message['error']}")
        if int(result.get("compact_revision", 0) or 0) > 0:
            raise Compacted(int(result["compact_revision"]))
        if result.get("canceled"):
            raise StoreUnavailable(f"etcd cancelled the watch: {result.get('cancel_reason', '')}")
        for event in result.get("events") or []:
            kv = event["kv"]
            prev = event.get("prev_kv")
            yield WatchEvent(
                kind="delete" if event.get("type") == "DELETE" else "put",
                key=_unb64(kv["key"]),
                value=None if event.get("type") == "DELETE" else _unb64(kv.get("value", "")),
                prev_value=_unb64(prev.get("value", "")) if prev else None,
                mod_revision=int(kv.get("mod_revision", 0)),
            )


def _causes(exc: BaseException):
    """exc and what it wraps: requests wraps urllib3's errors (in args, MaxRetryError.reason), which wrap the
    socket's and ssl's (__cause__, __context__)."""
    seen, todo = set(), [exc]
    while todo:
        current = todo.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        wrapped = [current.__cause__, current.__context__, getattr(current, "reason", None), *current.args]
        todo += [w for w in wrapped if isinstance(w, BaseException)]


def _reason(exc: BaseException) -> str:
    """Why a request did not reach etcd, in a few words, from the types of the errors it wraps."""
    causes = list(_causes(exc))
    tls = next((c for c in causes if isinstance(c, ssl.SSLError)), None)
    if tls is not None or any(isinstance(c, requests.exceptions.SSLError) for c in causes):
        why = getattr(tls, "verify_message", None) or getattr(tls, "reason", None) or "refused"
        return f"TLS handshake failed: {why} (check ETCD_CA_FILE, ETCD_CERT_FILE, ETCD_KEY_FILE)"
    if any(isinstance(c, ConnectionRefusedError) for c in causes):
        return "connection refused"
    if any(isinstance(c, (socket.timeout, requests.exceptions.Timeout, urllib3.exceptions.TimeoutError))
           for c in causes):
        return "timed out"
    if not isinstance(exc, requests.exceptions.RequestException):
        # An OSError requests raises before it connects: a TLS file that does not exist.
        return f"{exc} (check ETCD_CA_FILE, ETCD_CERT_FILE, ETCD_KEY_FILE)"
    innermost = causes[-1]
    return (getattr(innermost, "strerror", None) or str(innermost))[:200]


def _detail(reply: requests.Response) -> str:
    """The gateway's error text: {"error", "code", "message"} (grpc-gateway), or the start of the body."""
    try:
        body = reply.json()
    except ValueError:
        return reply.text[:200]
    return str(body.get("message") or body.get("error") or body)[:200] if isinstance(body, dict) else str(body)[:200]
