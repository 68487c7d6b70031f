"""`vxnet status`: what etcd says (hosts, networks, endpoints) and, for this host, whether the kernel holds what
it should (peers, FDB and neighbour entries, anti-spoofing elements, the isolation set, ESP SAs).

    vxnet status [--host ID] [--json]

JSON shape: {"hosts": [{"id", "name", "vtep", "version", "lease_seconds_left", "this_host"}],
             "networks": [{"id", "name", "vni", "subnets", "scope", "encrypted", "mtu", "members"}],
             "endpoints": [{"network", "id", "ip", "ip6" ("" on an IPv4-only network), "mac", "host", "container"}],
             "this_host": {"id", "source", "in_sync", "differences": [{"network", "kind", "object", "want",
                           "have"}], "error"}}
Exit status: 0 in sync, 1 differences found (or this host is not known), 2 etcd could not be read.

Key material is never read into the output: the key ring is not consulted, and SAs are shown as VTEP pairs.
"""

import logging
import sys
from typing import Dict, List, Optional, Tuple

from cli import context
from kernel import names
from kernel.links import Links
from netdriver import drift
from netdriver.models import Network
from netdriver.sandbox import DataPlane
from netdriver.store import NetworkStore, segment_of
from plugin import identity
from store import schema
from wire import protocol
from wire.errors import ConfigError, KernelError, VxnetError

log = logging.getLogger(__name__)


def register(sub, common) -> None:
    parser = sub.add_parser("status", parents=[common], help="hosts, networks, endpoints; this host's kernel "
                            "against etcd", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", metavar="ID", help="this host's vxnet ID (default: the one in VXNET_STATE_DIR/"
                        "host-id, else the host record whose VTEP is an address here)")
    parser.set_defaults(func=run)


def _scope(network: Network, members: List[str]) -> str:
    if protocol.SWARM_ID.fullmatch(network.id) or schema.SWARM_HOLDER in members:
        return "swarm"
    return "local"


def _members(kv, keys: schema.Schema) -> Dict[str, List[str]]:
    """segment -> member hosts (members/<segment>/<host>)."""
    entries, _ = kv.get_prefix(keys.prefix(schema.MEMBER))
    out: Dict[str, List[str]] = {}
    for entry in entries:
        parts = keys.parse(schema.MEMBER, entry.key)
        if parts:
            out.setdefault(parts["segment"], []).append(parts["host"])
    return out


def _docker_names() -> Tuple[Dict[str, str], Dict[str, str]]:
    """(network ID -> name, endpoint ID -> container name) from this host's engine, when one answers; the
    engine is optional (etcd is the source), so any failure leaves the names unknown."""
    try:
        import docker

        client = docker.from_env(timeout=3)
        try:
            nets, containers = {}, {}
            for net in client.api.networks():
                if not str(net.get("Driver", "")).startswith("vxnet"):
                    continue
                nets[net["Id"]] = net["Name"]
                detail = client.api.inspect_network(net["Id"])
                for info in (detail.get("Containers") or {}).values():
                    if info.get("EndpointID"):
                        containers[info["EndpointID"]] = info.get("Name", "")
            return nets, containers
        finally:
            client.close()
    except Exception as exc:  # no engine, no permission, no SDK: names are a convenience
        log.debug("no container names from the engine: %s", exc)
        return {}, {}


def which_host(ctx: context.Context, hosts: Dict[str, dict], links: Links,
               override: Optional[str] = None) -> Tuple[Optional[str], str]:
    """(this host's ID, how it was found): --host, the plugin's identity file, or the one host record whose
    VTEP is an address on an interface here."""
    if override:
        if not identity.valid_host_id(override):
            raise ConfigError(f"--host: {override!r} must be {identity.HOST_ID_RULE}")
        return override, "--host"
    saved = identity.read(f"{ctx.settings.state_dir}/{identity.IDENTITY_FILE}")
    if saved:
        return saved, f"{ctx.settings.state_dir}/{identity.IDENTITY_FILE}"
    local = [h for h, rec in hosts.items() if rec.get("vtep") and links.mtu_of_address(rec["vtep"]) is not None]
    if len(local) == 1:
        return local[0], f"its VTEP {hosts[local[0]]['vtep']} is an address here"
    return None, "no identity file and no single host record with a VTEP on this host (give --host)"


def host_drift(store: NetworkStore, links: Links, host_id: str, vtep: Optional[str]) -> List[drift.Difference]:
    """This host's kernel against etcd: every difference, one each (the hook `vxnet doctor` calls too)."""
    dataplane = DataPlane(links, underlay=None)  # type: ignore[arg-type]  # reads only: no VTEP needed
    networks = store.member_networks(host_id)
    peers, _ = store.all_peers()
    out: List[drift.Difference] = []
    for network in networks:
        endpoints = store.list_endpoints(network.id)
        kernel = dataplane.inspect(network, [e.id for e in endpoints if e.host == host_id])
        out += drift.network_differences(network, host_id, endpoints, peers, kernel, names.veth_bridge)
    known = {n.id[:12] for n in store.list_networks()}
    for prefix in dataplane.network_ids():
        if prefix not in known:
            out.append(drift.Difference(prefix, "namespace", names.netns(prefix), None, "present"))
    if networks:
        out += drift.isolation_differences(networks, dataplane.host_subnets())
    encrypted = [n for n in networks if n.encrypted]
    if encrypted:
        remote = set()
        for network in encrypted:
            fdb, _ = drift.desired_peers(host_id, peers, segment_of(network.id, network.overlay))
            remote |= set(fdb.values())
        from kernel.xfrm import Xfrm

        with Xfrm() as xfrm:
            pairs = [(sa.src, sa.dst) for sa in xfrm.sas()]
        out += drift.sa_differences(vtep, remote, pairs)
    return out


def collect(ctx: context.Context, host_override: Optional[str] = None) -> dict:
    """Everything status shows, as the JSON shape in the module docstring. StoreUnavailable if etcd cannot be
    read."""
    kv = ctx.kv()
    keys = schema.Schema(ctx.settings.key_prefix)
    store = NetworkStore(kv, ctx.settings.key_prefix)
    entries, _ = kv.get_prefix(keys.prefix(schema.HOST))
    hosts: Dict[str, dict] = {}
    leases: Dict[str, int] = {}
    for entry in entries:
        parts = keys.parse(schema.HOST, entry.key)
        if parts:
            hosts[parts["host"]] = entry.json()
            leases[parts["host"]] = entry.lease
    links = Links(ctx.settings.netns_dir)
    try:
        me, source = which_host(ctx, hosts, links, host_override)
        members = _members(kv, keys)
        net_names, container_names = _docker_names()
        data: dict = {"hosts": [], "networks": [], "endpoints": []}
        for host_id in sorted(hosts):
            record = hosts[host_id]
            ttl = kv.lease_ttl(leases[host_id]) if leases[host_id] else None
            data["hosts"].append({"id": host_id, "name": record.get("name", host_id), "vtep": record.get("vtep"),
                                  "version": record.get("version"), "lease_seconds_left": ttl,
                                  "this_host": host_id == me})
        for network in store.list_networks():
            held = sorted(members.get(segment_of(network.id, network.overlay), []))
            data["networks"].append({
                "id": network.id, "name": net_names.get(network.id), "vni": network.vni, "mtu": network.mtu,
                "subnets": [s.pool for s in network.subnets + network.subnets6], "scope": _scope(network, held),
                "encrypted": network.encrypted, "overlay": network.overlay,
                "members": [h for h in held if h != schema.SWARM_HOLDER]})
            for endpoint in store.list_endpoints(network.id):
                data["endpoints"].append({"network": network.id, "id": endpoint.id, "ip": endpoint.ip,
                                          "ip6": endpoint.ip6, "mac": endpoint.mac, "host": endpoint.host,
                                          "container": container_names.get(endpoint.id)})
        mine: dict = {"id": me, "source": source, "in_sync": False, "differences": [], "error": None}
        if me is None:
            mine["error"] = source
        elif me not in hosts:
            mine["error"] = f"host {me} has no host record in etcd (its plugin is not running, or not registered)"
        if me is not None:
            try:
                diffs = host_drift(store, links, me, hosts.get(me, {}).get("vtep"))
                mine["differences"] = [d.to_json() for d in diffs]
                mine["in_sync"] = not diffs and mine["error"] is None
            except KernelError as exc:
                mine["error"] = f"cannot read this host's kernel state: {exc}"
        data["this_host"] = mine
        return data
    finally:
        links.close()


def _table(headers: List[str], rows: List[List[object]]) -> str:
    cells = [headers] + [["-" if c is None or c == "" else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def render(data: dict) -> str:
    hosts = {h["id"]: h for h in data["hosts"]}
    out = ["HOSTS", _table(["ID", "NAME", "VTEP", "VERSION", "LEASE LEFT"],
                           [[h["id"] + (" (this host)" if h["this_host"] else ""), h["name"], h["vtep"], h["version"],
                             f"{h['lease_seconds_left']}s" if h["lease_seconds_left"] is not None else None]
                            for h in data["hosts"]])]
    out += ["", "NETWORKS", _table(
        ["ID", "NAME", "VNI", "SUBNETS", "SCOPE", "ENCRYPTED", "MEMBERS"],
        [[n["id"][:12], n["name"], n["vni"], ",".join(n["subnets"]), n["scope"], "yes" if n["encrypted"] else "no",
          ",".join(hosts.get(m, {}).get("name", m) for m in n["members"])] for n in data["networks"]])]
    by_host: Dict[str, List[dict]] = {}
    for e in data["endpoints"]:
        by_host.setdefault(e["host"], []).append(e)
    for host_id in sorted(by_host):
        name = hosts.get(host_id, {}).get("name", f"{host_id} (no host record)")
        out += ["", f"ENDPOINTS ON {name}", _table(
            ["NETWORK", "ENDPOINT", "IP", "MAC", "CONTAINER"],
            [[e["network"][:12], e["id"][:12], ",".join(filter(None, (e["ip"], e["ip6"]))), e["mac"], e["container"]]
             for e in by_host[host_id]])]
    mine = data["this_host"]
    out += ["", f"THIS HOST ({mine['id'] or 'unknown'})"]
    if mine["error"]:
        out.append(f"  {mine['error']}")
    if mine["differences"]:
        out.append(f"  {len(mine['differences'])} difference(s) between etcd and the kernel:")
        out += ["  " + drift.Difference(**d).text() for d in mine["differences"]]
    elif mine["id"] is not None and not mine["error"]:
        out.append("  in sync: the kernel holds every peer, FDB and neighbour entry, anti-spoofing element, "
                   "isolation subnet and SA etcd asks for, and nothing else of ours")
    return "\n".join(out)


def run(ctx: context.Context, args) -> int:
    try:
        data = collect(ctx, getattr(args, "host", None))
    except VxnetError as exc:
        print(f"vxnet status: cannot read etcd: {exc}", file=sys.stderr)
        return context.CANNOT_RUN
    ctx.emit(data, render)
    return context.OK if data["this_host"]["in_sync"] else context.PROBLEM
