"""Composition root: settings -> etcd -> stores -> data plane -> drivers -> HTTP server on the unix socket.

The only place that builds concrete objects. Order matters: the socket opens before etcd is contacted
(dockerd gives up on a plugin whose socket is silent for ~10 s), then the kernel is reconciled with etcd.
"""

import logging
import os
import signal
import sys
import threading
import time
from typing import Mapping, Optional

import waitress

from ipam_driver.driver import IpamDriver
from netdriver.driver import NetworkDriver
from netdriver.links import Links
from netdriver.sandbox import DataPlane
from netdriver.store import NetworkStore
from plugin import config
from plugin.embedded_etcd import EmbeddedEtcd
from plugin.errors import ConfigError, VxnetError
from plugin.http import make_app
from plugin.kvstore import EtcdKV
from plugin.routes import IPAM, NETWORK

log = logging.getLogger("vxnet")


def _underlay(settings: config.Settings, links: Links):
    vtep = settings.advertise_addr or links.default_route_address()
    if not vtep:
        raise ConfigError("VXNET_ADVERTISE_ADDR: not set and this host has no default route to take it from")
    mtu = links.mtu_of_address(vtep)
    if mtu is None:
        raise ConfigError(f"VXNET_ADVERTISE_ADDR: {vtep} is not an address of any interface on this host")
    return vtep, mtu


def _reconcile_when_ready(driver: NetworkDriver, stop: threading.Event) -> None:
    """Reconcile once etcd answers; keep trying (etcd may still be starting, or down) until it succeeds."""
    delay = 0.2
    while not stop.is_set():
        try:
            driver.reconcile()
            log.info("start-up reconciliation done")
            return
        except VxnetError as exc:
            log.warning("start-up reconciliation waits for etcd: %s", exc)
        if stop.wait(delay):
            return
        delay = min(delay * 2, 5.0)


def main(environ: Optional[Mapping[str, str]] = None) -> int:
    environ = os.environ if environ is None else environ
    try:
        settings = config.load(environ)
    except ConfigError as exc:
        print(f"vxnet: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level_number, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    links = Links()
    embedded: Optional[EmbeddedEtcd] = None
    stop = threading.Event()

    def on_signal(signum, _frame):
        # Python as PID 1 in a managed plugin ignores SIGTERM unless handled: without this every
        # `docker plugin disable` waits 10 s for the kill.
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        vtep, underlay_mtu = _underlay(settings, links)
        os.makedirs(os.path.dirname(settings.socket_path), exist_ok=True)
        if os.path.exists(settings.socket_path):
            os.unlink(settings.socket_path)
        endpoints = settings.etcd_endpoints
        if settings.embedded:
            embedded = EmbeddedEtcd(os.path.join(settings.state_dir, "etcd"), settings.embedded_etcd_port)
        kv = EtcdKV(endpoints or (f"http://127.0.0.1:{settings.embedded_etcd_port}",), ca=settings.etcd_ca,
                    cert=settings.etcd_cert, key=settings.etcd_key)
        net = NetworkDriver(NetworkStore(kv, settings.key_prefix), DataPlane(links, vtep), settings.host_id,
                            settings.scope, underlay_mtu, vtep)
        ipam = IpamDriver(kv, settings.host_id, settings.scope, settings.key_prefix)
        server = waitress.create_server(make_app({NETWORK: net, IPAM: ipam}), unix_socket=settings.socket_path,
                                        unix_socket_perms="660", threads=8, ident="vxnet")
        log.info("listening on %s host=%s vtep=%s underlay-mtu=%d scope=%s etcd=%s", settings.socket_path,
                 settings.host_id, vtep, underlay_mtu, settings.scope, ",".join(kv.endpoints) +
                 (" (embedded)" if embedded else ""))
        if embedded is not None:
            embedded.start()
        threading.Thread(target=_reconcile_when_ready, args=(net, stop), name="reconcile", daemon=True).start()
        server.run()
    except ConfigError as exc:
        print(f"vxnet: {exc}", file=sys.stderr)
        return 2
    except SystemExit:
        log.info("stopping")
    finally:
        stop.set()
        if embedded is not None:
            embedded.stop()
        links.close()
        try:
            os.unlink(settings.socket_path)
        except OSError:
            pass
    return 0
