"""Composition root: settings -> etcd -> stores -> data plane -> drivers -> HTTP server on the unix socket.

The only place that builds concrete objects. Order matters: the socket opens before etcd is contacted
(dockerd gives up on a plugin whose socket is silent for ~10 s), then the kernel is reconciled with etcd.
"""

import logging
import os
import signal
import sys
import threading
from typing import Callable, List, Mapping, Optional, Protocol, Sequence

import waitress

from encrypt.firewall import Firewall as IpsecFirewall
from encrypt.keystore import KeyStore
from encrypt.manager import EncryptionManager
from encrypt.rotator import KeyRotator
from encrypt.secret import read_secret_file
from encrypt.watch import KeyRingWatcher
from ipam_driver.driver import IpamDriver
from ipam_driver.store import IpamStore
from kernel import libnftables, names
from kernel.events import KernelEvents
from kernel.links import Links
from kernel.nflog import Reader
from kernel.probes import EspProbe
from netdriver.driver import NetworkDriver
from netdriver.gc import CollectorLoop
from netdriver.health import HealthOverlay
from netdriver.hosts import HostLease
from netdriver.isolation import Firewall
from netdriver.peerdb import PeerDB
from netdriver.policy_engine import PolicyEngine
from netdriver.policy_nft import PolicyFirewall
from netdriver.policy_store import PolicyStore, PolicyWatcher
from netdriver.reconciler import NamespaceTap, Reconciler
from netdriver.sandbox import DataPlane
from netdriver.service_ports import ServicePorts, ServicePortsWatcher
from netdriver.store import NetworkStore
from netdriver.underlay import Underlay
from netdriver.watcher import PeerSync, PeerWatcher
from plugin import config, gc, identity, scope
from plugin import flows as plugin_flows
from plugin import metrics as plugin_metrics
from plugin.embedded_etcd import EmbeddedEtcd
from plugin.endpoint_identity import DockerEngine, IdentityWriter
from plugin.http import make_app
from plugin.routes import IPAM, NETWORK
from store import compat, schema
from store.kvstore import EtcdKV
from wire import version
from wire.errors import ConfigError, HostIdConflict, SchemaTooNew, StoreUnavailable, VxnetError

log = logging.getLogger("vxnet")


def _underlay(settings: config.Settings, links: Links) -> Underlay:
    if settings.advertise_addr and links.mtu_of_address(settings.advertise_addr) is None:
        raise ConfigError(f"VXNET_ADVERTISE_ADDR: {settings.advertise_addr} is not an address of any interface "
                          "on this host")
    underlay = Underlay(links.mtu_of_address, settings.advertise_addr, links.default_route_address())
    if underlay.address is None:
        log.warning("no VXNET_ADVERTISE_ADDR and no default route: waiting for Swarm's DiscoverNew to name "
                    "this host's address")
    return underlay


RING_WAIT_SECONDS = 5.0


class Background(Protocol):
    """A part with a thread of its own: started once, stopped at shut-down (stop() also when never started)."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


def _start_control_plane(driver: NetworkDriver, lease: HostLease, watcher: PeerWatcher,
                         stop: threading.Event, keyring: Optional[KeyRingWatcher] = None,
                         rotator: Optional[Background] = None, collector: Optional[Background] = None,
                         on_fatal: Callable[[Exception], None] = lambda exc: None,
                         health: Optional[HealthOverlay] = None, healing: Optional[Background] = None,
                         rules: Optional[Background] = None,
                         layout: Callable[[], object] = lambda: None) -> None:
    """Once etcd answers: reconcile the kernel, then keep the host lease and the peer watch running (after the
    key ring watcher and the rotator, so the ring is usually read before peers arrive; with the policy rule
    watch, rules, beside it: the policy engine applies nothing before both have been read). Keeps trying while etcd
    is still starting or down; then the self-healing reconciler (healing), once the kernel is right; stops at once,
    through on_fatal, if another live host holds this host's ID
    (retrying cannot fix that, and serving would act as the other host), or if layout() (store/compat.py check:
    before anything is read or written) finds a store of a schema this version cannot read."""
    delay = 0.2
    while not stop.is_set():
        try:
            layout()
            lease.acquire()
            problems = driver.reconcile()
            if problems:
                log.warning("start-up reconciliation done; %d thing(s) skipped (each logged above)", len(problems))
            else:
                log.info("start-up reconciliation done")
            lease.start()
            before_peers: Sequence[Optional[Background]] = (keyring, rotator, collector, health)
            for part in before_peers:
                if part is not None:
                    part.start()
            if keyring is not None:
                # The key ring first (bounded: an unreadable ring is the ring watcher's to report), so that a
                # restarted plugin's first peer read finds it and encrypted peers are programmed, not deferred.
                keyring.synced.wait(RING_WAIT_SECONDS)
            if rules is not None:
                rules.start()
            watcher.start()
            if healing is not None:
                healing.start()
            return
        except (HostIdConflict, SchemaTooNew) as exc:
            log.error("%s", exc)
            on_fatal(exc)
            return
        except StoreUnavailable as exc:
            log.warning("start-up reconciliation waits for etcd: %s", exc)
        except VxnetError as exc:
            # Not etcd's fault: say what it is (reconcile() skips what the kernel refuses, so this is rarer).
            log.error("start-up reconciliation failed, retrying: %s", exc)
        if stop.wait(delay):
            return
        delay = min(delay * 2, 5.0)


# The schema asked before the socket opens: dockerd gives the socket 12.5 s, so one short round, no more.
LAYOUT_PRECHECK_TIMEOUT = 1.0


def _layout_before_socket(settings: config.Settings) -> None:
    """A shared etcd holding a store of a schema this vxnet cannot read: refuse like a bad setting (no socket,
    the plugin left disabled, the reason in dockerd's log once) rather than serve and then stop, which dockerd
    answers by starting the plugin again and again. An etcd that does not answer yet is the start-up thread's
    to wait for (it checks again before anything else: _start_control_plane)."""
    kv = EtcdKV(settings.etcd_endpoints, ca=settings.etcd_ca, cert=settings.etcd_cert, key=settings.etcd_key,
                timeout=LAYOUT_PRECHECK_TIMEOUT)
    try:
        compat.check(kv, version.current(), settings.key_prefix)
    except SchemaTooNew as exc:
        raise ConfigError(str(exc)) from None
    except VxnetError as exc:
        log.info("store schema not checked before the socket (%s): checked once etcd answers", exc)


def _refuse(exc: ConfigError) -> int:
    """A setting the plugin cannot run with: one line naming it and why, on stderr (dockerd logs a managed plugin's
    stderr at level=error, with plugin=<id>), and no socket, so that `docker plugin enable` fails and leaves the
    plugin disabled (dockerd 20.10 marks a plugin enabled as soon as its socket accepts, whatever it answers:
    docs/install.md). Exit status 2.

    As a managed plugin (PID 1 of its container) it first waits for dockerd's SIGTERM: dockerd restarts a plugin
    that exits while `enable` still waits for its socket (moby v20.10 plugin/manager.go HandleExitEvent restarts
    when the controller's restart flag is set, and enable sets it before starting the plugin), which would start
    it again, and log the same line again, for the 12.5 s that wait lasts (0.5 s, then four dials 3 s apart)."""
    print(f"vxnet: {exc}", file=sys.stderr, flush=True)
    if os.getpid() == 1:
        stop = {signal.SIGTERM, signal.SIGINT}
        signal.pthread_sigmask(signal.SIG_BLOCK, stop)
        signal.sigwait(stop)
    return 2


def main(environ: Optional[Mapping[str, str]] = None) -> int:
    environ = os.environ if environ is None else environ
    try:
        settings = config.load(environ)
    except ConfigError as exc:
        return _refuse(exc)
    # stdout: dockerd logs a managed plugin's stderr at level=error, so info lines there would read as errors.
    logging.basicConfig(level=settings.log_level_number, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Library chatter (every netlink message, every HTTP connection) drowns our own debug lines.
    for noisy in ("pyroute2", "urllib3", "asyncio", "waitress.queue"):
        logging.getLogger(noisy).setLevel(max(settings.log_level_number, logging.INFO))
    links = Links(settings.netns_dir)
    embedded: Optional[EmbeddedEtcd] = None
    watcher: Optional[PeerWatcher] = None
    lease: Optional[HostLease] = None
    keyring: Optional[KeyRingWatcher] = None
    rotator: Optional[KeyRotator] = None
    monitor: Optional[scope.ScopeMonitor] = None
    collector: Optional[CollectorLoop] = None
    metrics: Optional[plugin_metrics.MetricsServer] = None
    flow_log: Optional[plugin_flows.FlowLog] = None
    health: Optional[HealthOverlay] = None
    healing: Optional[Reconciler] = None
    identities: Optional[IdentityWriter] = None
    service_ports: Optional[ServicePortsWatcher] = None
    rules: Optional[PolicyWatcher] = None
    stop = threading.Event()
    fatal: List[Exception] = []

    main_pid = os.getpid()

    def on_fatal(exc: Exception) -> None:
        # From a background thread: stop the server in the main thread (the SIGTERM path) and exit non-zero, so
        # the operator sees the plugin down (`docker plugin ls`, the process's exit code) with the reason logged.
        fatal.append(exc)
        os.kill(main_pid, signal.SIGTERM)

    def on_signal(signum, _frame):
        # Python as PID 1 in a managed plugin ignores SIGTERM unless handled: without this every
        # `docker plugin disable` waits 10 s for the kill.
        if os.getpid() != main_pid:
            # A child that pyroute2 forks to open a socket in a namespace inherits this handler, and pyroute2
            # ends it with SIGTERM, sometimes before it has exited by itself: it must just die, not unwind into
            # the server (it would go on accepting on our socket) or our clean-up (it would stop etcd).
            os._exit(0)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        me = identity.resolve(settings.state_dir, settings.host_id, settings.hostname)
        underlay = _underlay(settings, links)
        os.makedirs(os.path.dirname(settings.socket_path), exist_ok=True)
        if os.path.exists(settings.socket_path):
            os.unlink(settings.socket_path)
        endpoints = settings.etcd_endpoints
        if settings.embedded:
            embedded = EmbeddedEtcd(os.path.join(settings.state_dir, "etcd"), settings.embedded_etcd_port)
        kv = EtcdKV(endpoints or (f"http://127.0.0.1:{settings.embedded_etcd_port}",), ca=settings.etcd_ca,
                    cert=settings.etcd_cert, key=settings.etcd_key)
        store = NetworkStore(kv, settings.key_prefix)
        if not settings.embedded:
            _layout_before_socket(settings)
        try:
            libnftables.require()  # without it no anti-spoofing or isolation: refuse to start, saying why
        except libnftables.NftablesError as exc:
            raise ConfigError(f"nftables: {exc}") from None
        isolation = Firewall(links.nft)
        dataplane = DataPlane(links, underlay, isolation, max_endpoints=settings.max_endpoints)
        # VXNET_SCOPE=auto becomes local or global here, once: dockerd reads the capabilities only at enable.
        choice = scope.choose(settings.scope, settings.swarm_state_dir)
        monitor = scope.ScopeMonitor(choice, settings.swarm_state_dir)
        encryption: Optional[EncryptionManager] = None
        if settings.encryption_secret_file:
            keystore = KeyStore(kv, read_secret_file(settings.encryption_secret_file), settings.key_prefix)
            # XFRM netlink opened on first use, in this (the host's) namespace; the fail-closed table there too;
            # whether the kernel does ESP is asked when the first encrypted network is created.
            encryption = EncryptionManager(None, IpsecFirewall(names.ENCRYPTED_VXLAN_PORT, links.nft),
                                           names.ENCRYPTED_VXLAN_PORT, EspProbe())
            if underlay.address:
                encryption.set_local(underlay.address)
            keyring = KeyRingWatcher(kv, keystore, encryption.set_keyring)
            if settings.key_rotation_seconds:
                rotator = KeyRotator(keystore, settings.key_rotation_seconds)
        # Policies: the tables stay in the kernel when the plugin stops (nothing here removes them), so a restart
        # or an etcd outage changes nothing in force; the engine compares them with its first full read.
        policy = PolicyEngine(PolicyFirewall(links.nft), me.id, dataplane.wired_endpoints)
        sync = PeerSync(PeerDB(me.id), dataplane, encryption, policy=policy)
        watcher = PeerWatcher(kv, store, sync)
        rules = PolicyWatcher(kv, PolicyStore(kv, settings.key_prefix), policy)
        overlay = health = HealthOverlay(kv, links, underlay, me.id, settings.key_prefix)
        def on_outage() -> None:
            watcher.kick()
            rules.kick()
            if service_ports is not None:
                service_ports.kick()

        lease = HostLease(kv, store, me.id, lambda: underlay.address, identity.lease_file(settings.state_dir, me.id),
                          on_outage=on_outage, name=me.name, instance=identity.instance(), remedy=me.remedy(),
                          on_conflict=on_fatal, health=overlay.claim)

        def vtep_changed() -> None:
            lease.register()
            overlay.vtep_changed()
            if encryption is not None:
                encryption.set_local(underlay.address)  # SAs follow the VTEP

        tap = NamespaceTap(sync)  # PeerSync, and the event listener told which namespaces to watch
        net = NetworkDriver(store, dataplane, me.id, choice.scope, underlay,
                            peers=tap, lease_id=lambda: lease.id, on_vtep_change=vtep_changed,
                            encryption=encryption, policy=policy, max_endpoints=settings.max_endpoints)
        if settings.reconcile_seconds:
            # Our own nftables commits wake no pass (kernel/events.py): they are the desired state already.
            events = KernelEvents(links.netns_path,
                                  lambda ns, kind, objects: healing.notify(ns, kind, objects) if healing else None,
                                  own_committer=links.nft_committer)
            tap.attach(events.watch, events.unwatch)
            healing = Reconciler(net, sync, encryption, settings.reconcile_seconds, watch=events.watch,
                                 listener=events, health=overlay, policy=policy)
        lease.on_new_lease = net.republish_peers
        ipam = IpamDriver(IpamStore(kv, settings.key_prefix), me.id, choice.scope)
        if settings.gc_seconds:
            # Started after the host lease (this host is alive in its own collection); every host runs it.
            collector = CollectorLoop(gc.collector(kv, settings.key_prefix, settings.stale_host_seconds),
                                      settings.gc_seconds)
        if settings.metrics_addr is not None:
            # The verdict log (`vxnet flows`) is served beside the metrics: subscribed before the start-up thread
            # runs, so it hears every table the engine makes or finds. Without VXNET_METRICS_ADDR there is none.
            # The host's isolation table logs in this namespace (the managed plugin runs with host networking).
            flow_log = plugin_flows.FlowLog(policy, lambda ns: Reader(links.netns_path(ns)),
                                            policy.firewall.counters, guards=isolation.counted,
                                            host_reader=lambda: Reader(None, names.ISOLATION_NFLOG_GROUP))
            flow_log.start()
            # Before the plugin's socket: a port that cannot be had stops the start, naming the setting.
            metrics = plugin_metrics.MetricsServer(settings.metrics_addr, plugin_metrics.Collector(
                net.local_endpoints, sync.peer_counts, isolation,
                cleartext=encryption.firewall if encryption is not None else None, encryption=encryption),
                apps={plugin_flows.PATH: plugin_flows.make_app(flow_log)})
            metrics.start()
        server = waitress.create_server(make_app({NETWORK: net, IPAM: ipam}), unix_socket=settings.socket_path,
                                        unix_socket_perms="660", threads=8, ident="vxnet")
        log.info("vxnet %s (etcd schema %d.%d)", version.current(), schema.SCHEMA_MAJOR, schema.SCHEMA_MINOR)
        log.info("listening on %s host=%s id-from=%s vtep=%s underlay-mtu=%d scope=%s etcd=%s", settings.socket_path,
                 me, me.source, underlay.address, underlay.mtu, choice.scope, ",".join(kv.endpoints) +
                 (" (embedded)" if embedded else ""))
        log.info("scope %s: %s", choice.scope, choice.why)
        monitor.start()
        docker_host = settings.docker_host
        if docker_host is not None:
            # Its own threads, never a request handler's (see plugin/endpoint_identity.py); an engine that does
            # not answer (yet: dockerd restores plugins before it listens) is logged once and retried.
            ports = ServicePorts(kv, settings.key_prefix)
            identities = IdentityWriter(lambda: DockerEngine(docker_host), net, where=docker_host, services=ports)
            identities.start()
            # Every host: a service's ports written (by a manager's plugin) after its tasks here published their
            # identities reach them through this watch.
            service_ports = ServicePortsWatcher(kv, ports, identities.service_changed)
            service_ports.start()
        else:
            log.warning("VXNET_DOCKER_HOST=off: endpoints get no identity; policy rules selecting by service, "
                        "label or container never apply (fail closed)")
        if embedded is not None:
            embedded.start()
        threading.Thread(target=_start_control_plane, name="start-up", daemon=True,
                         args=(net, lease, watcher, stop, keyring, rotator, collector, on_fatal, health,
                               healing, rules,
                               lambda: compat.check(kv, version.current(), settings.key_prefix))).start()
        server.run()
    except ConfigError as exc:
        return _refuse(exc)
    except SystemExit:
        if fatal:
            log.error("stopping: %s", fatal[0])
        else:
            log.info("stopping")
    finally:
        stop.set()
        parts: Sequence[Optional[Background]] = (service_ports, identities, healing, monitor, watcher, rules, health,
                                                 keyring, rotator, collector, lease, metrics, flow_log)
        for part in parts:
            if part is not None:
                part.stop()
        if embedded is not None:
            embedded.stop()
        links.close()
        try:
            os.unlink(settings.socket_path)
        except OSError:
            pass
    return 1 if fatal else 0
