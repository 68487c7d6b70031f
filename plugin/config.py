"""Settings, read once from the environment at start-up.

This is the only module that reads os.environ. The managed plugin's config.json maps each of these to a settable
`env` entry, so every knob has an environment name and a default here.
"""

import dataclasses
import ipaddress
import logging
import socket
from typing import Mapping, Optional, Tuple
from urllib.parse import urlsplit

from kernel import names
from plugin.identity import HOST_ID_RULE, valid_host_id
from store import schema
from wire.errors import ConfigError

_LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclasses.dataclass(frozen=True)
class Settings:
    socket_path: str = "/run/docker/plugins/vxnet.sock"
    etcd_endpoints: Tuple[str, ...] = ()  # empty: start the embedded etcd
    etcd_ca: Optional[str] = None
    etcd_cert: Optional[str] = None
    etcd_key: Optional[str] = None
    embedded_etcd_port: int = 23790
    state_dir: str = "/var/lib/vxnet"
    netns_dir: str = "/run/netns"  # where per-network namespaces are mounted (`ip netns` looks here)
    advertise_addr: Optional[str] = None  # None: address of the default-route interface
    # VXNET_SCOPE: "local", "global", or "auto" (the managed plugin's default: plugin/scope.py picks global on a
    # Swarm node, local elsewhere, from dockerd's swarm state folder). The host process keeps "local": Swarm
    # refuses legacy plugins whatever their scope.
    scope: str = "local"
    swarm_state_dir: str = "/var/lib/docker/swarm"  # dockerd's <data-root>/swarm; the managed plugin mounts it ro
    log_level: str = "info"
    host_id: str = ""  # VXNET_HOST_ID; empty: the ID generated once and kept in state_dir (plugin/identity.py)
    hostname: str = ""  # the name people read, recorded beside the ID; any string, never a key
    key_prefix: str = schema.PREFIX  # the root of the etcd tree (store/schema.py draws it)
    # The cluster secret that seals the ESP key ring in etcd: a file holding 32 bytes as hex or base64, the same on
    # every host. A file, not a value: `docker plugin inspect` shows every env value. None: `-o encrypted` refused.
    encryption_secret_file: Optional[str] = None
    key_rotation_seconds: int = 43200  # 12 h, as Docker's overlay; 0: only on demand (`vxnet keys rotate`)
    # Garbage collection of hosts gone for good (netdriver/gc.py): a host is stale this long after a live plugin
    # first saw its record gone (an hour: longer than any reboot or upgrade, whose holds must survive it), and
    # every plugin collects once per gc_seconds (0: never; `vxnet gc` still does).
    stale_host_seconds: int = 3600
    gc_seconds: int = 300
    # VXNET_METRICS_ADDR: where /metrics is served (plugin/metrics.py), (IP address, TCP port); None: not served.
    # Loopback by default: the counters name this host's networks, so exposing them further is the operator's call.
    metrics_addr: Optional[Tuple[str, int]] = ("127.0.0.1", 9473)
    # Self-healing (netdriver/reconciler.py): a full pass this often, and passes on kernel events in between;
    # 0: no reconciler at all (neither, as before it existed).
    reconcile_seconds: int = 30
    # VXNET_DOCKER_HOST: the Docker engine whose events and containers give endpoints their identities
    # (plugin/endpoint_identity.py); unix:///path or tcp://host:port. Unset: DOCKER_HOST, else the host's socket
    # as a host process sees it (the managed plugin's config.json sets the path it mounts, /host/run/docker.sock).
    # "off": no identities (rules by service, label or container then never apply: fail closed).
    docker_host: Optional[str] = "unix:///run/docker.sock"
    # VXNET_MAX_ENDPOINTS: endpoints one network may have on this host (netdriver/placement.py); past it
    # CreateEndpoint and Join are refused in vxnet's words. 4000 by default: four bridges of 1000
    # (kernel/names.py says why a bridge holds 1000), what tests/kernel/test_scale.py and the benchmark attach.
    # At most names.MAX_BRIDGED_ENDPOINTS (23 bridges); a smaller value lets a test reach the limit quickly.
    max_endpoints: int = 4000

    @property
    def embedded(self) -> bool:
        return not self.etcd_endpoints

    @property
    def log_level_number(self) -> int:
        return getattr(logging, self.log_level.upper())


def _endpoints(raw: str) -> Tuple[str, ...]:
    return parse_endpoints("ETCD_ENDPOINTS", raw)


def parse_endpoints(field: str, raw: str) -> Tuple[str, ...]:
    """Comma-separated etcd URLs; ConfigError naming field for one that is not http(s)://host:port."""
    out = []
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        parts = urlsplit(item)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.port is None:
            raise ConfigError(f"{field}: {item!r} is not a URL of the form http(s)://host:port")
        out.append(item.rstrip("/"))
    return tuple(out)


def _port(name: str, raw: str) -> int:
    if not raw.isdigit() or not 1 <= int(raw) <= 65534:
        raise ConfigError(f"{name}: {raw!r} is not a TCP port (1-65534; the next port is used for peers)")
    return int(raw)


def parse_listen_address(field: str, raw: str) -> Optional[Tuple[str, int]]:
    """"host:port" (an IPv4 address, or an IPv6 one in brackets, and a TCP port 1-65535) -> (host, port); "" ->
    None. ConfigError naming field otherwise: a name would be resolved at bind time, to who knows what."""
    if not raw:
        return None
    host, sep, port = raw.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        versions = (6,)
    else:
        versions = (4,)
    try:
        if not sep or ipaddress.ip_address(host).version not in versions:
            raise ValueError
    except ValueError:
        raise ConfigError(f"{field}: {raw!r} is not host:port with an IP address for host (127.0.0.1:9473, "
                          "[::1]:9473, 0.0.0.0:9473 for every address; empty: off)") from None
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"{field}: {raw!r}: {port!r} is not a TCP port (1-65535)")
    return host, int(port)


def parse_docker_host(field: str, raw: str) -> Optional[str]:
    """VXNET_DOCKER_HOST (or DOCKER_HOST, named by field): "off" -> None; unix:///absolute/path or
    tcp://host:port as given; ConfigError naming the setting otherwise."""
    if raw.lower() == "off":
        return None
    parts = urlsplit(raw)
    if parts.scheme == "unix" and not parts.netloc and parts.path.startswith("/"):
        return raw
    if parts.scheme == "tcp" and parts.hostname and parts.port is not None and parts.path in ("", "/"):
        return raw
    raise ConfigError(f"{field}: {raw!r} is not unix:///path/to/docker.sock, tcp://host:port or 'off'")


def load(environ: Mapping[str, str]) -> Settings:
    """Build Settings from an environment mapping; raise ConfigError naming the first bad setting."""

    def get(name: str, default: str = "") -> str:
        return environ.get(name, default).strip()

    socket_path = get("VXNET_SOCKET", Settings.socket_path)
    if not socket_path.startswith("/"):
        raise ConfigError(f"VXNET_SOCKET: {socket_path!r} must be an absolute path")
    state_dir = get("VXNET_STATE_DIR", Settings.state_dir)
    if not state_dir.startswith("/"):
        raise ConfigError(f"VXNET_STATE_DIR: {state_dir!r} must be an absolute path")
    netns_dir = get("VXNET_NETNS_DIR", Settings.netns_dir)
    if not netns_dir.startswith("/"):
        raise ConfigError(f"VXNET_NETNS_DIR: {netns_dir!r} must be an absolute path")
    advertise = get("VXNET_ADVERTISE_ADDR") or None
    if advertise is not None:
        try:
            if ipaddress.ip_address(advertise).version != 4:
                raise ValueError
        except ValueError:
            raise ConfigError(f"VXNET_ADVERTISE_ADDR: {advertise!r} is not an IPv4 address") from None
    scope = get("VXNET_SCOPE", Settings.scope).lower()
    if scope not in ("local", "global", "auto"):
        raise ConfigError(f"VXNET_SCOPE: {scope!r} must be 'local', 'global' or 'auto' (global on a Swarm node, "
                          "else local)")
    swarm_state_dir = get("VXNET_SWARM_STATE_DIR", Settings.swarm_state_dir)
    if not swarm_state_dir.startswith("/"):
        raise ConfigError(f"VXNET_SWARM_STATE_DIR: {swarm_state_dir!r} must be an absolute path")
    level = get("VXNET_LOG_LEVEL", Settings.log_level).lower()
    if level not in _LOG_LEVELS:
        raise ConfigError(f"VXNET_LOG_LEVEL: {level!r} must be one of {', '.join(_LOG_LEVELS)}")
    host_id = get("VXNET_HOST_ID")
    if host_id and not valid_host_id(host_id):
        raise ConfigError(f"VXNET_HOST_ID: {host_id!r} must be {HOST_ID_RULE}")
    tls = {}
    for name, attr in (("ETCD_CA_FILE", "etcd_ca"), ("ETCD_CERT_FILE", "etcd_cert"), ("ETCD_KEY_FILE", "etcd_key")):
        tls[attr] = get(name) or None
    if bool(tls["etcd_cert"]) != bool(tls["etcd_key"]):
        raise ConfigError("ETCD_CERT_FILE/ETCD_KEY_FILE: give both or neither")
    secret_file = get("VXNET_ENCRYPTION_SECRET_FILE") or None
    if secret_file is not None and not secret_file.startswith("/"):
        raise ConfigError(f"VXNET_ENCRYPTION_SECRET_FILE: {secret_file!r} must be an absolute path")
    rotation = get("VXNET_KEY_ROTATION_SECONDS", str(Settings.key_rotation_seconds))
    if not rotation.isdigit() or 0 < int(rotation) < 60:
        raise ConfigError(f"VXNET_KEY_ROTATION_SECONDS: {rotation!r} must be 0 (only on demand) or at least 60")
    stale = _stale_host_seconds(get)
    gc_seconds = get("VXNET_GC_SECONDS", str(Settings.gc_seconds))
    if not gc_seconds.isdigit():
        raise ConfigError(f"VXNET_GC_SECONDS: {gc_seconds!r} must be a whole number of seconds (0: no collection)")
    metrics = environ.get("VXNET_METRICS_ADDR")  # unset: the default; set and empty: off
    metrics_addr = (Settings.metrics_addr if metrics is None
                    else parse_listen_address("VXNET_METRICS_ADDR", metrics.strip()))
    reconcile = get("VXNET_RECONCILE_SECONDS", str(Settings.reconcile_seconds))
    if not reconcile.isdigit() or int(reconcile) > 86400:
        raise ConfigError(f"VXNET_RECONCILE_SECONDS: {reconcile!r} must be a whole number of seconds from 0 (no "
                          "self-healing) to 86400")
    max_endpoints = get("VXNET_MAX_ENDPOINTS", str(Settings.max_endpoints))
    if not max_endpoints.isdigit() or not 1 <= int(max_endpoints) <= names.MAX_BRIDGED_ENDPOINTS:
        raise ConfigError(f"VXNET_MAX_ENDPOINTS: {max_endpoints!r} must be a whole number from 1 to "
                          f"{names.MAX_BRIDGED_ENDPOINTS} (endpoints per network on this host)")
    docker_field = next((name for name in ("VXNET_DOCKER_HOST", "DOCKER_HOST") if get(name)), "")
    docker_host = (parse_docker_host(docker_field, get(docker_field)) if docker_field else Settings.docker_host)
    return Settings(
        docker_host=docker_host,
        stale_host_seconds=stale,
        gc_seconds=int(gc_seconds),
        socket_path=socket_path,
        metrics_addr=metrics_addr,
        etcd_endpoints=_endpoints(get("ETCD_ENDPOINTS")),
        embedded_etcd_port=_port("VXNET_EMBEDDED_ETCD_PORT", get("VXNET_EMBEDDED_ETCD_PORT", "23790")),
        state_dir=state_dir,
        netns_dir=netns_dir,
        advertise_addr=advertise,
        scope=scope,
        swarm_state_dir=swarm_state_dir,
        log_level=level,
        host_id=host_id,
        hostname=socket.gethostname(),
        encryption_secret_file=secret_file,
        key_rotation_seconds=int(rotation),
        reconcile_seconds=int(reconcile),
        max_endpoints=int(max_endpoints),
        **tls,
    )


@dataclasses.dataclass(frozen=True)
class ClientSettings:
    """What the `vxnet` command (cli/) needs, from the same environment variables as the plugin, so a shell
    that has the plugin's settings exported talks to the same etcd. Flags override each (cli/context.py)."""

    etcd_endpoints: Tuple[str, ...]  # never empty: ETCD_ENDPOINTS, else the embedded etcd on this host
    etcd_ca: Optional[str] = None
    etcd_cert: Optional[str] = None
    etcd_key: Optional[str] = None
    key_prefix: str = schema.PREFIX
    netns_dir: str = Settings.netns_dir
    state_dir: str = Settings.state_dir
    socket_path: str = Settings.socket_path
    encryption_secret_file: Optional[str] = None
    stale_host_seconds: int = 3600
    # Which host record is this host's, and its VTEP (vxnet doctor): VXNET_HOST_ID (else the state dir's identity
    # file) and VXNET_ADVERTISE_ADDR (else the VTEP its host record names).
    host_id: str = ""
    advertise_addr: Optional[str] = None
    # Where this host's plugin serves /metrics and the verdict log (`vxnet flows`): VXNET_METRICS_ADDR, as the
    # plugin reads it (None: set empty, the plugin serves neither). 0.0.0.0 or :: (every address) is asked on
    # loopback.
    metrics_addr: Optional[Tuple[str, int]] = Settings.metrics_addr
    # The Docker engine of this host (`vxnet settings` lists the plugins installed there): DOCKER_HOST, as the
    # docker CLI reads it, else the engine's default socket.
    engine: str = "unix:///run/docker.sock"


def _is_ipv4(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).version == 4
    except ValueError:
        return False


def embedded_endpoint(port: int) -> str:
    """The embedded etcd's client URL (plugin/embedded_etcd.py listens on loopback only)."""
    return f"http://127.0.0.1:{port}"


def load_client(environ: Mapping[str, str]) -> ClientSettings:
    """ClientSettings from an environment mapping; ConfigError naming the first bad variable."""

    def get(name: str, default: str = "") -> str:
        return environ.get(name, default).strip()

    endpoints = _endpoints(get("ETCD_ENDPOINTS")) or (
        embedded_endpoint(_port("VXNET_EMBEDDED_ETCD_PORT", get("VXNET_EMBEDDED_ETCD_PORT", "23790"))),)
    stale = _stale_host_seconds(get)
    if get("VXNET_HOST_ID") and not valid_host_id(get("VXNET_HOST_ID")):
        raise ConfigError(f"VXNET_HOST_ID: {get('VXNET_HOST_ID')!r} must be {HOST_ID_RULE}")
    if get("VXNET_ADVERTISE_ADDR") and not _is_ipv4(get("VXNET_ADVERTISE_ADDR")):
        raise ConfigError(f"VXNET_ADVERTISE_ADDR: {get('VXNET_ADVERTISE_ADDR')!r} is not an IPv4 address")
    metrics = environ.get("VXNET_METRICS_ADDR")
    engine = parse_docker_host("DOCKER_HOST", get("DOCKER_HOST")) if get("DOCKER_HOST") else ClientSettings.engine
    return ClientSettings(
        engine=engine or ClientSettings.engine,
        metrics_addr=(Settings.metrics_addr if metrics is None
                      else parse_listen_address("VXNET_METRICS_ADDR", metrics.strip())),
        etcd_endpoints=endpoints,
        etcd_ca=get("ETCD_CA_FILE") or None,
        etcd_cert=get("ETCD_CERT_FILE") or None,
        etcd_key=get("ETCD_KEY_FILE") or None,
        netns_dir=get("VXNET_NETNS_DIR", Settings.netns_dir),
        state_dir=get("VXNET_STATE_DIR", Settings.state_dir),
        socket_path=get("VXNET_SOCKET", Settings.socket_path),
        encryption_secret_file=get("VXNET_ENCRYPTION_SECRET_FILE") or None,
        stale_host_seconds=stale,
        host_id=get("VXNET_HOST_ID"),
        advertise_addr=get("VXNET_ADVERTISE_ADDR") or None,
    )


def _stale_host_seconds(get) -> int:
    stale = get("VXNET_STALE_HOST_SECONDS", str(Settings.stale_host_seconds))
    if not stale.isdigit() or int(stale) < 1:
        raise ConfigError(f"VXNET_STALE_HOST_SECONDS: {stale!r} must be a whole number of seconds, at least 1")
    return int(stale)
