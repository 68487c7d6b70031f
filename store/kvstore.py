"""A thin etcd v3 wrapper over etcd3gw's HTTP session: the only module that speaks to etcd.

Keys and values are str (values are JSON written by the stores). Every failure to reach etcd becomes
StoreUnavailable naming the endpoints, so a `docker` user reads "etcd unreachable at http://...".
The stores build on six primitives: get, get_prefix, `read` (several keys and prefixes in one round trip, at
one revision), put, delete and `commit`, a compare-and-swap transaction (keys that must be absent, keys that must
be at a given revision, then puts and deletes).
"""

import base64
import dataclasses
import http.client
import json
import logging
import re
import socket
import ssl
import threading
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple
from urllib.parse import urlsplit

import requests
from etcd3gw import exceptions as etcd_exc
from etcd3gw.client import Etcd3Client

from wire.errors import InvalidRequest, StoreUnavailable, VxnetError

log = logging.getLogger(__name__)

# dockerd waits for a plugin call as long as it takes, but a user at `docker network create` should hear that
# etcd is gone within 5 s: 4 s per endpoint attempt leaves room for the rest of the call.
DEFAULT_TIMEOUT = 4.0


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _unb64(text: str) -> str:
    return base64.b64decode(text).decode()


# What the stores put between the slashes of their keys: IDs, host names, VNIs, segment names, escaped CIDRs,
# addresses. Never a slash or a NUL, never "." or "..": a part must not reach into another part of the tree
# ("../../etc/passwd" as an endpoint ID would be three parts, read back as another network's).
_KEY_PART = re.compile(r"[A-Za-z0-9@_.:-]+")


def join_key(prefix: str, *parts: str) -> str:
    """prefix + parts joined by "/"; the last part may be "" (a prefix for get_prefix). InvalidRequest for a part
    that is not a plain name: callers check their values first, this is the backstop before etcd."""
    for i, part in enumerate(parts):
        if part == "" and i == len(parts) - 1:
            continue
        if not isinstance(part, str) or not _KEY_PART.fullmatch(part) or part in (".", ".."):
            raise InvalidRequest(f"etcd key under {prefix}: {part!r} cannot be a key part")
    return prefix + "/".join(parts)


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
    """An HTTP session that uses exactly our TLS files. trust_env off: requests otherwise lets REQUESTS_CA_BUNDLE
    or CURL_CA_BUNDLE from the environment override the session's CA (and sends etcd traffic to HTTP proxies)."""
    session = requests.Session()
    session.trust_env = False
    if ca:
        session.verify = ca
    if cert and key:
        session.cert = (cert, key)
    return session


class EtcdKV:
    """etcd v3 over its JSON gateway. Thread-safe: each call is one HTTP request on a pooled session."""

    def __init__(self, endpoints: Sequence[str], ca: Optional[str] = None, cert: Optional[str] = None,
                 key: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT,
                 client_factory: Callable[..., Etcd3Client] = Etcd3Client):
        if not endpoints:
            raise ValueError("EtcdKV needs at least one endpoint")
        self.endpoints = tuple(endpoints)
        self._clients = []
        for url in self.endpoints:
            scheme, rest = url.split("://", 1)
            host, port = rest.rsplit(":", 1)
            self._clients.append(client_factory(
                host=host.strip("[]"), port=int(port), protocol=scheme, timeout=timeout, api_path="/v3/",
                session=_session(ca, cert, key)))
        self._tls = (ca, cert, key)
        self._preferred = 0
        self._lock = threading.Lock()

    # -- transport ---------------------------------------------------------------------------------------------
    def _call(self, path: str, body: dict) -> dict:
        """POST body to /v3/<path> on the first endpoint that answers; StoreUnavailable if none does."""
        errors = []
        with self._lock:
            order = list(range(len(self._clients)))
            order = order[self._preferred:] + order[:self._preferred]
        for index in order:
            client = self._clients[index]
            try:
                reply = client.post(client.get_url(path), data=json.dumps(body))
            except (etcd_exc.ConnectionFailedError, etcd_exc.ConnectionTimeoutError) as exc:
                errors.append(f"{self.endpoints[index]}: {_short(exc)}")
                continue
            except etcd_exc.Etcd3Exception as exc:
                raise StoreUnavailable(
                    f"etcd at {self.endpoints[index]} refused {path}: {exc.detail_text or exc}") from None
            except OSError as exc:  # TLS files unreadable, bad certificates
                errors.append(f"{self.endpoints[index]}: {exc}")
                continue
            with self._lock:
                self._preferred = index
            return reply
        raise StoreUnavailable("etcd unreachable at " + ", ".join(self.endpoints) + " (" + "; ".join(errors) + ")")

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
               unchanged_since: Optional[Dict[str, int]] = None) -> bool:
        """One atomic transaction: if every key in `absent` is missing, every key in `revisions` is at that
        mod_revision (0 = missing), and no key under a prefix in `unchanged_since` was written after that
        revision (so none was created either), apply `puts` and `deletes` and return True; otherwise change
        nothing and return False."""
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

    def lease_revoke(self, lease_id: int) -> None:
        try:
            self._call("lease/revoke", {"ID": lease_id})
        except StoreUnavailable:
            raise
        except VxnetError:
            pass

    def watch(self, prefix: str, start_revision: int) -> "WatchStream":
        return WatchStream(self, prefix, start_revision)

    def current_endpoint(self) -> str:
        with self._lock:
            return self.endpoints[self._preferred]

    def http_connection(self, url: str) -> http.client.HTTPConnection:
        """A connection of our own for a long-lived stream (its socket can be shut down from another thread)."""
        parts = urlsplit(url)
        if parts.scheme == "https":
            context = ssl.create_default_context(cafile=self._tls[0])
            if self._tls[1]:
                context.load_cert_chain(self._tls[1], self._tls[2])
            return http.client.HTTPSConnection(parts.hostname, parts.port, timeout=DEFAULT_TIMEOUT, context=context)
        return http.client.HTTPConnection(parts.hostname, parts.port, timeout=DEFAULT_TIMEOUT)

    def revision(self) -> int:
        reply = self._call("kv/range", {"key": _b64("\0"), "limit": 1})
        return int(reply.get("header", {}).get("revision", 0))


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
    iteration. Raises StoreUnavailable when the stream breaks and Compacted when the start revision is gone."""

    def __init__(self, kv: "EtcdKV", prefix: str, start_revision: int):
        self.kv = kv
        self.prefix = prefix
        self.start_revision = start_revision
        self._conn = None
        self._closed = threading.Event()

    def close(self) -> None:
        self._closed.set()
        conn = self._conn
        if conn is not None and conn.sock is not None:
            # Shutting the socket down is what wakes a reader blocked in recv() on another thread; close() alone
            # waits for that reader.
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __iter__(self):
        request = {"create_request": {"key": _b64(self.prefix), "range_end": _b64(prefix_end(self.prefix)),
                                      "start_revision": self.start_revision, "prev_kv": True}}
        url = self.kv.current_endpoint()
        try:
            self._conn = self.kv.http_connection(url)
            self._conn.request("POST", "/v3/watch", body=json.dumps(request),
                               headers={"Content-Type": "application/json"})
            # No read timeout from here on: a quiet watch is normal. A dead etcd closes the connection; a silent
            # partition is caught by the lease keepalive, which closes this stream.
            self._conn.sock.settimeout(None)
            resp = self._conn.getresponse()
            if resp.status != 200:
                raise StoreUnavailable(f"etcd at {url} refused the watch: HTTP {resp.status}")
        except OSError as exc:
            if self._closed.is_set():
                return
            raise StoreUnavailable(f"etcd unreachable at {url} (watch: {exc})") from None
        buffer = b""
        try:
            while not self._closed.is_set():
                chunk = resp.read1(65536)
                if not chunk:
                    break
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        yield from self._events(json.loads(line))
        except (OSError, http.client.HTTPException, ValueError) as exc:
            if not self._closed.is_set():
                raise StoreUnavailable(f"etcd watch on {url} broke: {exc}") from None
        finally:
            self._conn.close()
        if not self._closed.is_set():
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


def _short(exc: Exception) -> str:
    text = getattr(exc, "detail_text", None) or str(exc)
    ssl_reason = re.search(r"\[SSL[^\]]*\] ([^'\")(]+)", text) or re.search(r"(certificate [^'\")(]+)", text)
    if "SSL" in text or "certificate" in text.lower():
        return "TLS handshake failed: " + (ssl_reason.group(1).strip() if ssl_reason else text[:200]) + \
            " (check ETCD_CA_FILE, ETCD_CERT_FILE, ETCD_KEY_FILE)"
    if "Connection refused" in text:
        return "connection refused"
    if "timed out" in text.lower():
        return "timed out"
    return text[:200]
