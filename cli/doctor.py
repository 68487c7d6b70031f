"""`vxnet doctor [--json]`: one line per check, PASS, WARN or FAIL, and what to do about each that is not PASS.

Run as root on a host of the cluster (it reads this host's kernel and pings from its health namespace). Exit
status: 0 when nothing FAILed (WARNs are advice), 1 when a check FAILed, 2 when the doctor could not run at all
(a bad flag or setting). It answers within BUDGET seconds whatever is broken: every probe has a short timeout, the
etcd endpoints are asked at once, and with etcd down the checks that need it are reported as not run while the
local ones still run.

The checks, in order:
  etcd            each endpoint answers /v3/maintenance/status (latency, version, leader, its alarms)
  clock           this host's clock against etcd's (the HTTP Date header of its reply)
  plugin socket   the plugin answers POST /Plugin.Activate on its socket (VXNET_SOCKET, or the managed plugin's
                  /run/docker/plugins/<plugin id>/vxnet.sock)
  kernel modules  vxlan, bridge, nf_tables; esp4 and xfrm_user when an encrypted network exists
  host record     this host has a live record (its plugin holds its lease)
  vtep            the VTEP of this host's record is an address of an interface here
  mtu <network>   each of this host's networks fits in what VXLAN (and ESP) leave of the underlay MTU
  duplicate vteps two host records naming one VTEP
  stale hosts     endpoint records of hosts that have no host record (`vxnet gc` collects them)
  drift           etcd against this host's kernel (see drift() below)
  key age         the ESP key ring's last rotation, when a ring exists
  path <host>     the VXLAN path to each other live host, over the health overlay (netdriver/health.py): small
                  echo requests (is its UDP port open?) and ones of the largest MTU of its networks with DF set
                  (does the underlay carry the overlay's full frames unfragmented?)

--json: {"ok": bool, "checks": [{"check", "status", "message", "fix"}, ...]}.
"""

import concurrent.futures
import dataclasses
import email.utils
import http.client
import json
import os
import socket
import time
from typing import Dict, List, Optional, Sequence, Tuple

from cli import context
from cli.status import host_drift
from kernel import mtu, names, ping, probes
from kernel.links import Links
from netdriver.models import Endpoint, Network
from netdriver.store import NetworkStore
from plugin import identity
from store import schema
from store.kvstore import EtcdKV
from wire.errors import KernelError, VxnetError

PASS, WARN, FAIL = "PASS", "WARN", "FAIL"
_ORDER = {PASS: 0, WARN: 1, FAIL: 2}

BUDGET = 10.0  # the bound on one doctor run, whatever fails
SOCKET_TIMEOUT = 1.5
PROBE_TIMEOUT = 2.0  # per probe round; every target is probed at once
SMALL_PROBE = 84  # bytes of IP datagram: ping(8)'s default, 56 bytes of data + ICMP 8 + IP 20
CLOCK_SKEW_WARN = 5.0  # seconds; the Date header has one-second resolution (RFC 9110 section 5.6.7)
KEY_AGE_WARN = 2 * 43200  # two of the default rotation intervals (plugin/config.py VXNET_KEY_ROTATION_SECONDS)
MANAGED_SOCKETS = "/run/docker/plugins"  # dockerd's folder: <plugin id>/<socket> for a managed plugin
MODULES = ("vxlan", "bridge", "nf_tables")
ESP_MODULES = ("esp4", "xfrm_user")
# The kernel option that builds each: a module built in without parameters has no /sys/module entry, and where
# /lib/modules is absent (a container) the build options are what is left to ask.
MODULE_OPTIONS = {"vxlan": "CONFIG_VXLAN", "bridge": "CONFIG_BRIDGE", "nf_tables": "CONFIG_NF_TABLES",
                  "esp4": "CONFIG_INET_ESP", "xfrm_user": "CONFIG_XFRM_USER"}


@dataclasses.dataclass(frozen=True)
class Result:
    check: str
    status: str  # PASS, WARN or FAIL
    message: str
    fix: str = ""  # what to do (empty for PASS)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def passed(check: str, message: str) -> Result:
    return Result(check, PASS, message)


def warn(check: str, message: str, fix: str) -> Result:
    return Result(check, WARN, message, fix)


def fail(check: str, message: str, fix: str) -> Result:
    return Result(check, FAIL, message, fix)


def exit_status(results: Sequence[Result]) -> int:
    """0 unless a check FAILed (WARNs are advice), then 1."""
    return context.PROBLEM if any(r.status == FAIL for r in results) else context.OK


def as_json(results: Sequence[Result]) -> dict:
    return {"ok": exit_status(results) == context.OK, "checks": [r.to_json() for r in results]}


def render(data: dict) -> str:
    """One line per check, `STATUS  check  message`, and an indented `-> fix` line under each that did not pass;
    a last line counts them."""
    checks = data["checks"]
    width = max((len(c["check"]) for c in checks), default=0)
    lines = []
    for c in checks:
        lines.append(f"{c['status']}  {c['check'].ljust(width)}  {c['message']}")
        if c["fix"]:
            lines.append(f"{'':6}{'':{width}}  -> {c['fix']}")
    counts = {s: sum(c["status"] == s for c in checks) for s in (PASS, WARN, FAIL)}
    lines.append(f"{counts[PASS]} passed, {counts[WARN]} warnings, {counts[FAIL]} failed")
    return "\n".join(lines)


# -- what etcd holds --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ClusterState:
    """The records the checks read, from one read of etcd."""
    hosts: Dict[str, dict]  # host ID -> its record
    networks: Dict[str, Network]  # network ID -> record
    members: Dict[str, Dict[str, str]]  # segment -> {host ID: network ID}
    endpoints: List[Endpoint]
    keyring: bool  # an ESP key ring exists

    def host_name(self, host: str) -> str:
        """How people read a host: its name and VTEP, with the ID when it differs from the name."""
        record = self.hosts.get(host, {})
        name = str(record.get("name") or host)
        label = name if name == host else f"{name} ({host})"
        return f"{label}, vtep {record.get('vtep') or '?'}"

    def networks_of(self, host: str) -> List[Network]:
        """The networks host is a member of (one per segment)."""
        out = []
        for by_host in self.members.values():
            nid = by_host.get(host)
            if nid is not None and nid in self.networks:
                out.append(self.networks[nid])
        return sorted(out, key=lambda n: n.id)


def _json_dict(value: str) -> dict:
    try:
        found = json.loads(value)
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


def read_state(kv, keys: schema.Schema) -> ClusterState:
    """Everything the checks need from etcd in one round trip (one revision)."""
    prefixes = [keys.prefix(t) for t in (schema.HOST, schema.NETWORK, schema.MEMBER, schema.ENDPOINT)]
    snap = kv.read(keys=[keys.keyring()], prefixes=prefixes)
    hosts_r, networks_r, members_r, endpoints_r = (snap.ranges[p] for p in prefixes)
    hosts = {}
    for e in hosts_r:
        parts = keys.parse(schema.HOST, e.key)
        if parts:
            hosts[parts["host"]] = _json_dict(e.value)
    networks = {}
    for e in networks_r:
        try:
            network = Network.from_json(e.value)
        except (ValueError, KeyError, TypeError):
            continue
        networks[network.id] = network
    members: Dict[str, Dict[str, str]] = {}
    for e in members_r:
        parts = keys.parse(schema.MEMBER, e.key)
        nid = _json_dict(e.value).get("network_id")
        if parts and isinstance(nid, str):
            members.setdefault(parts["segment"], {})[parts["host"]] = nid
    endpoints = []
    for e in endpoints_r:
        try:
            endpoints.append(Endpoint.from_json(e.value))
        except (ValueError, KeyError, TypeError):
            continue
    return ClusterState(hosts, networks, members, endpoints, snap.entries[keys.keyring()] is not None)


# -- etcd -------------------------------------------------------------------------------------------------------
def check_etcd(kv: EtcdKV, now=time.time) -> Tuple[List[Result], bool]:
    """Every endpoint asked at once; -> (the etcd and clock lines, whether any endpoint answers)."""

    def ask(url: str):
        started = time.monotonic()
        try:
            status, date = kv.member_status(url)
            return url, status, date, time.monotonic() - started, now(), None
        except VxnetError as exc:
            return url, None, None, time.monotonic() - started, now(), exc

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(kv.endpoints)) as pool:
        answers = list(pool.map(ask, kv.endpoints))
    return etcd_results(answers)


def etcd_results(answers) -> Tuple[List[Result], bool]:
    """answers: (url, status or None, Date header, seconds taken, local time at the reply, error or None)."""
    results, skews = [], []
    up = [a for a in answers if a[1] is not None]
    for url, status, date, took, at, error in answers:
        if status is None:
            continue
        alarms = status.get("errors") or []
        leader = str(status.get("leader") or "0")
        detail = f"etcd {url} answers in {took * 1000:.0f} ms (version {status.get('version') or '?'})"
        if leader == "0":
            results.append(fail("etcd", f"{detail} but has no leader",
                                "the etcd cluster has lost quorum: bring its members back (etcdctl endpoint "
                                "status --cluster)"))
        elif alarms:
            results.append(warn("etcd", f"{detail} with alarms: {'; '.join(map(str, alarms))}",
                                "etcdctl alarm list; free space (etcdctl compact/defrag) then etcdctl alarm disarm"))
        else:
            results.append(passed("etcd", detail))
        parsed = email.utils.parsedate_to_datetime(date).timestamp() if date else None
        if parsed is not None:
            skews.append((url, parsed - at))
    down = [(url, error) for url, status, _d, _t, _a, error in answers if status is None]
    if down and not up:
        results.append(fail("etcd", "; ".join(str(e) for _u, e in down),
                            "start etcd, or point the doctor at it: --etcd URL (or ETCD_ENDPOINTS as the plugin "
                            "has it)"))
    else:
        for url, error in down:
            results.append(warn("etcd", str(error), f"bring {url} back or take it out of ETCD_ENDPOINTS"))
    if skews:
        url, skew = max(skews, key=lambda s: abs(s[1]))
        if abs(skew) > CLOCK_SKEW_WARN:
            side = "behind" if skew > 0 else "ahead of"
            results.append(warn("clock", f"this host's clock is {abs(skew):.0f} s {side} etcd at {url}",
                                "synchronise the clocks (NTP, chrony): key ages and stale-host times are read "
                                "across hosts"))
        else:
            results.append(passed("clock", f"within {CLOCK_SKEW_WARN:.0f} s of etcd's (1 s resolution)"))
    return results, bool(up)


# -- the plugin's socket ----------------------------------------------------------------------------------------
class UnixConnection(http.client.HTTPConnection):
    """HTTP over a unix socket (the plugin's): `vxnet doctor` and `vxnet version` ask on it."""

    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def plugin_sockets(configured: str, managed_dir: str = MANAGED_SOCKETS) -> List[str]:
    """Where the plugin may answer: the configured socket if it exists, else a managed plugin's
    <managed_dir>/<plugin id>/<the configured socket's file name> (dockerd makes that folder per plugin)."""
    if os.path.exists(configured):
        return [configured]
    base = os.path.basename(configured)
    try:
        folders = sorted(os.listdir(managed_dir))
    except OSError:
        return []
    return [p for p in (os.path.join(managed_dir, f, base) for f in folders) if os.path.exists(p)]


def check_socket(configured: str, timeout: float = SOCKET_TIMEOUT, managed_dir: str = MANAGED_SOCKETS) -> Result:
    found = plugin_sockets(configured, managed_dir)
    if not found:
        return fail("plugin socket", f"no socket at {configured} nor under {managed_dir}/<plugin id>/",
                    "start the plugin (`docker plugin enable vxnet:latest`, or the host process), or give its "
                    "socket: VXNET_SOCKET=PATH")
    errors = []
    for path in found:
        conn = UnixConnection(path, timeout)
        started = time.monotonic()
        try:
            conn.request("POST", "/Plugin.Activate", body=b"{}", headers={"Content-Type": "application/json"})
            reply = conn.getresponse()
            body = reply.read()
        except OSError as exc:
            errors.append(f"{path}: {exc.strerror or exc}")
            continue
        finally:
            conn.close()
        implements = _json_dict(body.decode("utf-8", "replace")).get("Implements") or []
        if reply.status == 200 and "NetworkDriver" in implements:
            took = (time.monotonic() - started) * 1000
            return passed("plugin socket", f"{path} answers Plugin.Activate in {took:.0f} ms "
                          f"({', '.join(map(str, implements))})")
        errors.append(f"{path}: HTTP {reply.status} {body[:100]!r}")
    return fail("plugin socket", "; ".join(errors),
                "the plugin is not answering: read its log (`journalctl -u docker` for the managed plugin) and "
                "restart it (`docker plugin disable/enable vxnet:latest`)")


# -- kernel modules ---------------------------------------------------------------------------------------------
def module_state(name: str, sys_module: str = "/sys/module", proc_modules: str = "/proc/modules",
                 lib_modules: Optional[str] = None, config=probes.kernel_config) -> Optional[str]:
    """"loaded", "built in", "loadable" (modprobe finds it: the kernel loads it on first use) or None."""
    if os.path.isdir(os.path.join(sys_module, name)):
        return "loaded"
    try:
        with open(proc_modules) as f:
            if any(line.split(" ", 1)[0] == name for line in f):
                return "loaded"
    except OSError:
        pass
    lib = lib_modules or os.path.join("/lib/modules", os.uname().release)
    for listing, state in (("modules.builtin", "built in"), ("modules.dep", "loadable")):
        try:
            with open(os.path.join(lib, listing)) as f:
                for line in f:
                    module = os.path.basename(line.split(":", 1)[0].strip())
                    if module.split(".ko", 1)[0].replace("-", "_") == name:
                        return state
        except OSError:
            continue
    option = (config() or {}).get(MODULE_OPTIONS.get(name, ""))
    return {"y": "built in", "m": "loadable"}.get(option or "")


def check_modules(encrypted: bool, state=module_state) -> Result:
    wanted = MODULES + (ESP_MODULES if encrypted else ())
    found = {m: state(m) for m in wanted}
    missing = [m for m, s in found.items() if s is None]
    summary = ", ".join(f"{m} {s}" for m, s in found.items() if s)
    if missing:
        why = " (an encrypted network exists)" if encrypted and set(missing) & set(ESP_MODULES) else ""
        return fail("kernel modules", f"missing: {', '.join(missing)}{why}; {summary or 'none found'}",
                    f"modprobe {' '.join(missing)}, or install a kernel that has them")
    return passed("kernel modules", summary)


# -- what etcd says about this host and the others --------------------------------------------------------------
def my_host_id(settings, state: ClusterState, local_address) -> Optional[str]:
    """VXNET_HOST_ID, else the ID in the state dir's identity file, else the one host record whose VTEP is an
    address here."""
    if settings.host_id:
        return settings.host_id
    try:
        found = identity.read(os.path.join(settings.state_dir, identity.IDENTITY_FILE))
    except VxnetError:
        found = None
    if found:
        return found
    local = [h for h, r in state.hosts.items() if isinstance(r.get("vtep"), str) and local_address(r["vtep"])]
    return local[0] if len(local) == 1 else None


def check_vtep(vtep: Optional[str], mtu_of_address) -> Result:
    if not vtep:
        return fail("vtep", "this host has no VTEP address (its record names none and VXNET_ADVERTISE_ADDR is unset)",
                    "set VXNET_ADVERTISE_ADDR to this host's underlay address")
    underlay = mtu_of_address(vtep)
    if underlay is None:
        return fail("vtep", f"{vtep} is not an address of any interface here",
                    "set VXNET_ADVERTISE_ADDR to an address of this host's underlay interface and restart the plugin")
    return passed("vtep", f"{vtep} is on an interface here (MTU {underlay})")


def check_mtus(networks: Sequence[Network], underlay_mtu: Optional[int]) -> List[Result]:
    out = []
    for network in networks:
        label = f"mtu {network.overlay or network.id[:12]}"
        if underlay_mtu is None:
            out.append(warn(label, f"network MTU {network.mtu}; the underlay MTU here is unknown",
                            "fix the vtep check"))
            continue
        room = mtu.inner_mtu(underlay_mtu) if network.encrypted else mtu.vxlan_mtu(underlay_mtu)
        how = "VXLAN and ESP leave" if network.encrypted else "VXLAN leaves"
        if network.mtu > room:
            out.append(fail(label, f"network MTU {network.mtu} is more than the {room} that {how} of the underlay "
                            f"MTU {underlay_mtu} here: full-size packets are lost",
                            f"lower the network MTU with -o mtu={room} or raise the underlay MTU"))
        else:
            out.append(passed(label, f"network MTU {network.mtu} fits the underlay MTU {underlay_mtu} ({how} {room})"))
    return out


def check_duplicate_vteps(state: ClusterState) -> Result:
    by_vtep: Dict[str, List[str]] = {}
    for host, record in state.hosts.items():
        if record.get("vtep"):
            by_vtep.setdefault(str(record["vtep"]), []).append(host)
    dups = {v: sorted(h) for v, h in by_vtep.items() if len(h) > 1}
    if dups:
        return fail("duplicate vteps", "; ".join(f"{v} is the VTEP of {', '.join(h)}" for v, h in sorted(dups.items())),
                    "give each host its own VXNET_ADVERTISE_ADDR: traffic for one of them reaches the other")
    return passed("duplicate vteps", f"{len(by_vtep)} hosts, each with its own VTEP")


def check_stale_hosts(state: ClusterState) -> Result:
    stale: Dict[str, int] = {}
    for endpoint in state.endpoints:
        if endpoint.host not in state.hosts:
            stale[endpoint.host] = stale.get(endpoint.host, 0) + 1
    if stale:
        return warn("stale hosts", "endpoint records of hosts without a host record: " +
                    ", ".join(f"{h} ({n})" for h, n in sorted(stale.items())),
                    "`vxnet gc --dry-run` lists what hosts gone for good left; `vxnet gc` releases it")
    return passed("stale hosts", "every endpoint record's host is alive")


def drift(ctx: context.Context, host: str, links: Links, vtep: Optional[str]) -> List[str]:
    """This host's kernel against etcd, one line per difference (cli/status.py computes them: the namespaces and
    their devices, FDB and neighbour entries, anti-spoofing elements, the isolation set, ESP SAs)."""
    try:
        found = host_drift(NetworkStore(ctx.kv(), ctx.settings.key_prefix), links, host, vtep)
    except KernelError as exc:
        return [f"this host's kernel state cannot be read: {exc}"]
    return [d.text() for d in found]


def check_drift(differences: Sequence[str]) -> Result:
    if differences:
        return fail("drift", f"{len(differences)} difference(s) between etcd and the kernel: " + "; ".join(differences),
                    "`vxnet status` shows them; the plugin's reconciler repairs drift within seconds of an "
                    "event (at most VXNET_RECONCILE_SECONDS): if it stays, the plugin's log says why")
    return passed("drift", "this host's kernel matches etcd")


def check_key_age(secret_file: Optional[str], load_ring, now: float) -> Result:
    """load_ring(secret) -> the KeyRing (its rotated_at)."""
    if not secret_file:
        return warn("key age", "an ESP key ring exists but its age cannot be read without the cluster secret",
                    "run with VXNET_ENCRYPTION_SECRET_FILE as the plugin has it (or `vxnet keys status`)")
    try:
        ring = load_ring(secret_file)
    except (VxnetError, OSError) as exc:
        return fail("key age", f"the key ring cannot be read: {exc}", "check VXNET_ENCRYPTION_SECRET_FILE")
    age = now - ring.rotated_at
    if age > KEY_AGE_WARN:
        return warn("key age", f"last rotation {age / 3600:.1f} h ago (more than {KEY_AGE_WARN / 3600:.0f} h)",
                    "`vxnet keys rotate`; check VXNET_KEY_ROTATION_SECONDS on the plugins")
    return passed("key age", f"last rotation {age / 3600:.1f} h ago")


# -- the VXLAN path to every other host -------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Target:
    host: str  # ID
    label: str  # name and VTEP
    address: str  # its health address
    full: int  # the IP datagram size its networks need to cross


def path_targets(state: ClusterState, me: str, default_mtu: int) -> Tuple[List[Target], List[Result]]:
    """Every other live host with a health address, probed at the largest MTU of its networks (else
    default_mtu, the health overlay's own); hosts whose record names no health address get a WARN."""
    targets, results = [], []
    for host in sorted(state.hosts):
        if host == me:
            continue
        record = state.hosts[host]
        address = record.get("health")
        label = state.host_name(host)
        if not isinstance(address, str) or not names.health_index(address):
            results.append(warn(f"path {host}", f"{label}: its record names no health overlay address",
                                "upgrade its plugin (the health overlay came with vxnet doctor)"))
            continue
        mtus = [n.mtu for n in state.networks_of(host)]
        targets.append(Target(host, label, address, max(mtus) if mtus else default_mtu))
    return targets, results


def path_results(targets: Sequence[Target], outcomes: Dict[Tuple[str, int], ping.Outcome], local_mtu: int,
                 timeout: float) -> List[Result]:
    """The verdict per host from its small and full-size probes (sizes above local_mtu were sent at local_mtu)."""
    out = []
    for t in targets:
        size = min(t.full, local_mtu)
        small, full = outcomes.get((t.address, SMALL_PROBE)), outcomes.get((t.address, size))
        check = f"path {t.host}"
        where = f"{t.label}, health {t.address}"
        if small is None or full is None:
            out.append(warn(check, f"{where}: not probed", "run the doctor again"))
        elif small.error:
            out.append(fail(check, f"{where}: cannot send: {small.error}", "check this host's health namespace "
                            f"{names.HEALTH_NETNS} (the plugin's log says why it is not built)"))
        elif not small.answered:
            out.append(fail(check, f"{where}: no echo over VXLAN (UDP {names.VXLAN_PORT}, VNI {names.HEALTH_VNI}) "
                            f"within {timeout:g} s",
                            f"UDP {names.VXLAN_PORT} blocked? Open UDP {names.VXLAN_PORT} between the hosts' VTEPs "
                            "(firewalls, security groups) and check that host's plugin runs"))
        elif not full.answered:
            why = full.error or f"no echo within {timeout:g} s"
            out.append(fail(check, f"{where}: {SMALL_PROBE}-byte probes cross but {size}-byte ones with DF do not "
                            f"({why})", "underlay MTU smaller than the overlay needs: lower the network MTU with "
                            "-o mtu=... or raise the underlay MTU"))
        else:
            note = ""
            if t.full > local_mtu:
                note = f" (sent at this host's {local_mtu}, not the {t.full} its networks have)"
            out.append(passed(check, f"{where}: UDP {names.VXLAN_PORT} open, {size}-byte frames cross unfragmented "
                              f"(rtt {(full.rtt or 0.0) * 1000:.1f} ms){note}"))
    return out


def check_paths(state: ClusterState, me: str, links: Links, netns_dir: str, underlay_mtu: Optional[int],
                timeout: float = PROBE_TIMEOUT, probe=ping.probe) -> List[Result]:
    ns_path = os.path.join(netns_dir, names.HEALTH_NETNS)
    info = None
    if links.netns_exists(names.HEALTH_NETNS):
        info = links.link_info(names.HEALTH_NETNS, names.HEALTH_VXLAN)
    if info is None:
        return [fail("path", f"this host has no health overlay ({names.HEALTH_VXLAN} in {ns_path})",
                     "the plugin builds it at start-up and removes it when it stops: is the plugin running here? "
                     "If it is, its log says why not (`health overlay not built`)")]
    local_mtu = int(info["mtu"])
    targets, results = path_targets(state, me, mtu.vxlan_mtu(underlay_mtu) if underlay_mtu else local_mtu)
    if not targets:
        return results or [passed("path", "no other host to probe")]
    wanted = sorted({(t.address, SMALL_PROBE) for t in targets} |
                    {(t.address, min(t.full, local_mtu)) for t in targets})
    try:
        outcomes = probe(ns_path, wanted, timeout)
    except OSError as exc:
        return results + [fail("path", f"cannot probe from {ns_path}: {exc.strerror or exc}",
                               "run vxnet doctor as root on the host (raw sockets, namespaces)")]
    return results + path_results(targets, outcomes, local_mtu, timeout)


# -- the command ------------------------------------------------------------------------------------------------
def diagnose(ctx: context.Context, now=time.time) -> List[Result]:
    # The probes get what is left of the budget (less a margin for the interpreter's start and the output),
    # should etcd or the socket have been slow to answer.
    deadline = time.monotonic() + BUDGET - 1.5
    settings = ctx.settings
    keys = schema.Schema(settings.key_prefix)
    results, etcd_up = check_etcd(ctx.kv())
    results.append(check_socket(settings.socket_path))
    state: Optional[ClusterState] = None
    if etcd_up:
        try:
            state = read_state(ctx.kv(), keys)
        except VxnetError as exc:
            results.append(fail("etcd", f"reading the records failed: {exc}", "check etcd's health"))
    encrypted = bool(state and any(n.encrypted for n in state.networks.values()))
    results.append(check_modules(encrypted))
    links = Links(settings.netns_dir)
    try:
        if state is None:
            vtep = settings.advertise_addr
            if vtep:
                results.append(check_vtep(vtep, links.mtu_of_address))
            results.append(warn("cluster", "records, MTUs, drift, key age and the VXLAN paths not checked: etcd "
                                "is not answering", "fix the etcd check first"))
            return results
        me = my_host_id(settings, state, lambda a: links.mtu_of_address(a) is not None)
        record = state.hosts.get(me or "")
        if me is None or record is None:
            results.append(fail("host record", f"no live host record for this host ({me or 'its ID is unknown'})",
                                "start the plugin here (it writes its record under a lease); with VXNET_HOST_ID "
                                "set on the plugin, set it for the doctor too"))
        else:
            results.append(passed("host record", f"{state.host_name(me)}, plugin {record.get('version') or '?'}"))
        vtep = settings.advertise_addr or (record or {}).get("vtep")
        results.append(check_vtep(vtep, links.mtu_of_address))
        underlay_mtu = links.mtu_of_address(vtep) if vtep else None
        if me is not None:
            results.extend(check_mtus(state.networks_of(me), underlay_mtu))
        results.append(check_duplicate_vteps(state))
        results.append(check_stale_hosts(state))
        if me is not None:
            results.append(check_drift(drift(ctx, me, links, vtep)))
        if state.keyring:
            results.append(check_key_age(settings.encryption_secret_file, _ring_loader(ctx.kv(), settings), now()))
        if me is not None:
            left = max(0.5, min(PROBE_TIMEOUT, deadline - time.monotonic()))
            results.extend(check_paths(state, me, links, settings.netns_dir, underlay_mtu, timeout=left))
        return results
    finally:
        links.close()


def _ring_loader(kv, settings):
    def load(secret_file: str):
        from encrypt.keystore import KeyStore  # only when a ring exists
        from encrypt.secret import read_secret_file
        ring = KeyStore(kv, read_secret_file(secret_file), settings.key_prefix).load()
        if ring is None:
            raise VxnetError("the key ring vanished while the doctor read it")
        return ring
    return load


def register(subparsers, common) -> None:
    doc = __doc__ or ""
    p = subparsers.add_parser("doctor", parents=[common], help="check this host and its paths to the others",
                              description=doc.split("\n\n")[0])
    p.set_defaults(func=run)


def run(ctx: context.Context, args) -> int:
    results = diagnose(ctx)  # in the order they ran
    ctx.emit(as_json(results), render)
    return exit_status(results)

