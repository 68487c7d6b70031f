"""The /metrics endpoint (VXNET_METRICS_ADDR): Prometheus text from a thread of its own in the plugin process, and
the collectors that read, at each scrape, what is not counted as it happens.

What is counted as it happens (plugin calls, etcd requests, watch resyncs, repairs) lives in telemetry/metrics.py
and is incremented where it happens. What is read at a scrape:
- endpoints and peers per network: from what the process holds (the driver's wired endpoints, PeerSync's peer
  table); a scrape never reads etcd, so it answers while etcd is down;
- packets and bytes dropped, by reason: the counters of vxnet's nftables drop rules, read through the netlink
  thread (Links.nft: `list table` in nftables JSON), the anti-spoofing tables in each network's namespace, the
  isolation table and the fail-closed cleartext table in the host's. A namespace that vanishes mid-scrape (its
  network deleted meanwhile) is skipped; so is a table that is not there;
- with encryption configured: the SAs of ours in the kernel and the primary key's age.

The kernel's counters restart at zero whenever their table is made again (every network created or deleted
rebuilds the host's isolation table in one transaction; a namespace's table is rebuilt when its network is made
whole again), and go away with a deleted network's namespace. `Drops` turns them into counters that only grow
for the life of the process, as Prometheus expects: a source read lower than last time was reset, and what it
had counted is kept; a source no longer read keeps its last value. Drops between the last scrape and a reset
are lost (at most one scrape interval's worth).

Wire (GET /metrics, Prometheus text format 0.0.4):
    vxnet_plugin_calls_total{method="NetworkDriver.Join",outcome="ok"} 3.0
    vxnet_endpoints{network="0123456789ab"} 2.0
    vxnet_dropped_packets_total{reason="anti-spoofing"} 7.0
"""

import dataclasses
import logging
import platform
import socket
import threading
from typing import Callable, Dict, Iterable, Mapping, Optional, Protocol, Tuple
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer, make_wsgi_app

from kernel import names
from netdriver.isolation import ANTI_SPOOFING, ISOLATION
from telemetry import metrics as m
from wire import version
from wire.errors import ConfigError, KernelError

log = logging.getLogger(__name__)

CLEARTEXT = "cleartext"
Counts = Tuple[int, int]  # (packets, bytes)


class DropRules(Protocol):
    """netdriver.isolation.Firewall: reason -> counts of its rules in ns (None: the host's table); {} without
    the table, KernelError without the namespace."""

    def dropped(self, ns: Optional[str]) -> Dict[str, Counts]: ...


class CleartextRules(Protocol):
    """encrypt.firewall.Firewall: counts of the fail-closed rules; (0, 0) without the table."""

    def dropped(self) -> Counts: ...


class Encryption(Protocol):
    """encrypt.manager.EncryptionManager, what the metrics read of it."""

    def kernel_sas(self) -> int: ...

    def primary_key_age(self) -> Optional[float]: ...


class Drops:
    """Kernel counters made monotonic (see the module docstring). Thread-safe: scrapes may overlap."""

    def __init__(self):
        self._last: Dict[Tuple[str, str], Counts] = {}  # (source, reason) -> counts last read
        self._kept: Dict[str, Counts] = {}  # reason -> counts of sources before their reset
        self._lock = threading.Lock()

    def update(self, readings: Mapping[Tuple[str, str], Counts]) -> Dict[str, Counts]:
        """readings: (source, reason) -> counts read now, for the sources that could be read. -> reason -> total
        since this process started counting."""
        with self._lock:
            for key, now in readings.items():
                before = self._last.get(key)
                if before is not None and (now[0] < before[0] or now[1] < before[1]):
                    kept = self._kept.get(key[1], (0, 0))
                    self._kept[key[1]] = (kept[0] + before[0], kept[1] + before[1])
                self._last[key] = now
            totals = dict(self._kept)
            for (_, reason), (packets, octets) in self._last.items():
                total = totals.get(reason, (0, 0))
                totals[reason] = (total[0] + packets, total[1] + octets)
            return totals


class Collector:
    """The values read at a scrape. endpoints/peers: () -> network id -> count; rules: the isolation and
    anti-spoofing tables; cleartext and encryption: None without a cluster secret."""

    def __init__(self, endpoints: Callable[[], Mapping[str, int]], peers: Callable[[], Mapping[str, int]],
                 rules: DropRules, cleartext: Optional[CleartextRules] = None,
                 encryption: Optional[Encryption] = None):
        self.endpoints = endpoints
        self.peers = peers
        self.rules = rules
        self.cleartext = cleartext
        self.encryption = encryption
        self.drops = Drops()
        self._last_problem = ""

    def _families(self):
        def gauge(spec, labels=()):
            return GaugeMetricFamily(f"{m.NAMESPACE}_{spec[0]}", spec[1], labels=list(labels))

        def counter(spec):
            return CounterMetricFamily(f"{m.NAMESPACE}_{spec[0]}", spec[1], labels=["reason"])

        return (gauge(m.ENDPOINTS, ["network"]), gauge(m.PEERS, ["network"]), counter(m.DROPPED_PACKETS),
                counter(m.DROPPED_BYTES), gauge(m.IPSEC_SAS), gauge(m.IPSEC_KEY_AGE))

    def describe(self) -> Iterable[Metric]:
        """The names, without reading anything (the registry asks at register())."""
        return self._families()

    def _problem(self, what: str, exc: Exception) -> None:
        # Scraped every few seconds: a lasting problem is logged when it starts or changes, not at every scrape.
        message = f"metrics: cannot read {what}: {exc}"
        if message != self._last_problem:
            log.warning("%s", message)
            self._last_problem = message

    def collect(self) -> Iterable[Metric]:
        endpoints_f, peers_f, packets_f, bytes_f, sas_f, age_f = self._families()
        local = dict(self.endpoints())
        for network_id, count in sorted(local.items()):
            endpoints_f.add_metric([network_id[:12]], count)
        for network_id, count in sorted(self.peers().items()):
            peers_f.add_metric([network_id[:12]], count)
        yield endpoints_f
        yield peers_f

        readings: Dict[Tuple[str, str], Counts] = {}
        reasons = [ISOLATION, ANTI_SPOOFING]
        try:
            for reason, counts in self.rules.dropped(None).items():
                readings[("host", reason)] = counts
        except KernelError as exc:
            self._problem("the host's isolation counters", exc)
        for network_id in sorted(local):
            ns = names.netns(network_id)
            try:
                for reason, counts in self.rules.dropped(ns).items():
                    readings[(ns, reason)] = counts
            except KernelError as exc:  # deleted meanwhile: its last counts stay in the totals
                log.debug("metrics: %s skipped: %s", ns, exc)
        if self.cleartext is not None:
            reasons.append(CLEARTEXT)
            try:
                readings[("host", CLEARTEXT)] = self.cleartext.dropped()
            except KernelError as exc:
                self._problem("the cleartext counters", exc)
        totals = self.drops.update(readings)
        for reason in reasons:
            packets, octets = totals.get(reason, (0, 0))
            packets_f.add_metric([reason], packets)
            bytes_f.add_metric([reason], octets)
        yield packets_f
        yield bytes_f

        if self.encryption is not None:
            try:
                sas_f.add_metric([], self.encryption.kernel_sas())
                yield sas_f
            except (KernelError, OSError) as exc:  # OSError: XFRM netlink cannot be opened here
                self._problem("the SAs", exc)
            age = self.encryption.primary_key_age()
            if age is not None:
                age_f.add_metric([], age)
                yield age_f


def set_build_info() -> None:
    m.BUILD_INFO.info({"version": version.current(), "python": platform.python_version()})


class _Quiet(WSGIRequestHandler):
    """No line per request on stderr (a scrape every few seconds, a `vxnet flows --follow` every second)."""

    def log_message(self, format, *args):  # noqa: A002 (the base class's signature)
        pass


def route(apps: Mapping[str, Callable], default: Callable) -> Callable:
    """A WSGI application: requests whose path is a key of apps go to that application, the rest to default
    (the Prometheus exposition, which answers /metrics and every other path alike)."""

    def app(environ, start_response):
        return apps.get(environ.get("PATH_INFO", ""), default)(environ, start_response)

    return app


@dataclasses.dataclass
class MetricsServer:
    """Serves the default registry (telemetry/metrics.py's metrics and the collector) at http://address/metrics
    on a thread of its own (a threading WSGI server: every request in a thread of its own too), and each of
    apps (path -> WSGI application: plugin/flows.py's /v1/flows) at its path.
    start() raises ConfigError naming VXNET_METRICS_ADDR if it cannot listen; stop() also when never started."""

    address: Tuple[str, int]
    collector: Collector
    apps: Mapping[str, Callable] = dataclasses.field(default_factory=dict)
    _server: Optional[WSGIServer] = None
    _thread: Optional[threading.Thread] = None

    def start(self) -> None:
        host, port = self.address
        set_build_info()
        REGISTRY.register(self.collector)

        class Server(ThreadingWSGIServer):
            # The address is an IP literal (plugin/config.py parse_listen_address): its family is plain.
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        try:
            self._server = make_server(host, port, route(self.apps, make_wsgi_app(REGISTRY)), Server,
                                       handler_class=_Quiet)
        except OSError as exc:
            REGISTRY.unregister(self.collector)
            where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            raise ConfigError(f"VXNET_METRICS_ADDR: cannot serve metrics on {where}: "
                              f"{exc.strerror or exc} (another process holds the port? set another "
                              "address, or empty to turn metrics off)") from None
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)
        self._thread.start()
        log.info("metrics on http://%s:%d/metrics%s", f"[{host}]" if ":" in host else host, self.port,
                 "".join(f", {path}" for path in sorted(self.apps)))

    @property
    def port(self) -> int:
        """The port listened on (the one asked for, or the kernel's choice for port 0)."""
        return self._server.server_port if self._server is not None else self.address[1]

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        REGISTRY.unregister(self.collector)
