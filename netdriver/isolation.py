"""Firewall rules that keep networks apart and containers honest, in nftables tables of our own, written as
nftables JSON, one atomic batch per change (through libnftables on the netlink thread: Links.nft). A batch either
replaces a whole table (start-up, network creation: a replay changes nothing and a half-applied state never
exists) or, on Join and DeleteEndpoint, adds or removes one endpoint's elements in the sets the fixed rules look
up: O(1) per container, whatever the number of endpoints.

Two tables:
- `bridge vxnet` inside each network's namespace (anti-spoofing): a frame entering the bridge from an endpoint's
  port must carry that endpoint's MAC, and its IPv4 packets and ARP that endpoint's address; IPv6 is dropped
  (vxnet networks are IPv4-only). A container with NET_ADMIN that changes its address or MAC gets nothing through.
  The endpoints are set elements (port, MAC) and (port, address), looked up by five fixed rules.
- `inet vxnet` in the host namespace (isolation): traffic within a vxnet network is bridged inside its namespace
  and never routed by the host, so any packet the host would forward to or from a vxnet subnet is a container on
  one network trying another through the host (docker_gwbridge egress, a forged source): it is dropped, and so
  is anything reaching the host itself from a vxnet subnet. A drop in any nftables table is final, so this holds
  beside Docker's own iptables rules.

Every rule carries a comment naming what it is for, so `nft list ruleset` explains itself, and a counter, so what
each reason dropped can be read (`dropped()`, the metrics' vxnet_dropped_packets_total): a counter statement after
the matches counts only the packets the rule drops, so the traffic that passes costs nothing more.
"""

import ipaddress
import json
import logging
from typing import Callable, Dict, FrozenSet, Iterable, List, Optional, Sequence, Tuple

from kernel import libnftables, names
from wire.errors import KernelError

log = logging.getLogger(__name__)

TABLE = names.ISOLATION_TABLE
# Before Docker's filter rules (priority 0), so our verdict is reached first; a drop there is final anyway.
PRIORITY = -10
# The drop reasons (telemetry/metrics.py DROP_REASONS) of the two tables: every rule's comment is
# "vxnet:<reason>:<which rule>".
ANTI_SPOOFING = "anti-spoofing"
ISOLATION = "isolation"


def _match(left: dict, right, op: str = "==") -> dict:
    return {"match": {"op": op, "left": left, "right": right}}


def _payload(protocol: str, field: str) -> dict:
    return {"payload": {"protocol": protocol, "field": field}}


def _iif(name: str) -> dict:
    return _match({"meta": {"key": "iifname"}}, name)


def _rule(family: str, chain: str, comment: str, *expr: dict) -> dict:
    return {"add": {"rule": {"family": family, "table": TABLE, "chain": chain, "comment": comment,
                             "expr": list(expr) + [{"counter": None}, {"drop": None}]}}}


def _replace_table(family: str) -> List[dict]:
    """Add, delete and add again: the delete cannot fail on a missing table, and the batch is atomic."""
    table = {"table": {"family": family, "name": TABLE}}
    return [{"add": table}, {"delete": table}, {"add": table}]


def _chain(family: str, name: str, hook: str) -> dict:
    return {"add": {"chain": {"family": family, "table": TABLE, "name": name, "type": "filter", "hook": hook,
                              "prio": PRIORITY, "policy": "accept"}}}


def _set(family: str, name: str, kind) -> dict:
    return {"add": {"set": {"family": family, "table": TABLE, "name": name, "type": kind}}}


def _elements(family: str, name: str, elems: list, op: str = "add") -> List[dict]:
    return [{op: {"element": {"family": family, "table": TABLE, "name": name, "elem": elems}}}] if elems else []


def endpoint_elements(endpoints: Sequence[Tuple[str, str, str]]) -> List[Tuple[str, list]]:
    """(set name, elements) of the anti-spoofing sets for these (port, ip, mac) endpoints."""
    return [("ports", [port for port, _, _ in endpoints]),
            ("macs", [{"concat": [port, mac]} for port, _, mac in endpoints]),
            ("ips", [{"concat": [port, ip]} for port, ip, _ in endpoints])]


def endpoint_guard_batch(endpoints: Sequence[Tuple[str, str, str]]) -> List[dict]:
    """The anti-spoofing table for one network namespace. endpoints: (port name, ip, mac) of each local one.

    Five rules whatever the number of endpoints: each looks up (port, address) in a set, so the cost per frame
    does not grow with the endpoints (a chain of rules per endpoint halved throughput at 50 endpoints)."""
    endpoints = sorted(endpoints)
    guarded = _match({"meta": {"key": "iifname"}}, "@ports")

    def pair(protocol: str, field: str) -> dict:
        return {"concat": [{"meta": {"key": "iifname"}}, _payload(protocol, field)]}

    return _replace_table("bridge") + [
        _set("bridge", "ports", "ifname"),
        _set("bridge", "macs", ["ifname", "ether_addr"]),
        _set("bridge", "ips", ["ifname", "ipv4_addr"]),
        _chain("bridge", "forward", "forward"),
        _rule("bridge", "forward", "vxnet:anti-spoofing:mac", guarded, _match(pair("ether", "saddr"), "@macs", "!=")),
        _rule("bridge", "forward", "vxnet:anti-spoofing:ip", guarded, _match(pair("ip", "saddr"), "@ips", "!=")),
        _rule("bridge", "forward", "vxnet:anti-spoofing:arp-ip", guarded,
              _match(pair("arp", "saddr ip"), "@ips", "!=")),
        _rule("bridge", "forward", "vxnet:anti-spoofing:arp-mac", guarded,
              _match(pair("arp", "saddr ether"), "@macs", "!=")),
        _rule("bridge", "forward", "vxnet:anti-spoofing:no-ipv6", guarded,
              _match(_payload("ether", "type"), "ip6")),
    ] + [op for name, elems in endpoint_elements(endpoints) for op in _elements("bridge", name, elems)]


def endpoint_add_batch(port: str, ip: str, mac: str) -> List[dict]:
    """One endpoint's elements into the sets of an existing anti-spoofing table. Adding an element that is there
    already is no error, so a replay changes nothing. A missing table is an error (nothing is created here: sets
    without their rules would guard nothing), and the caller rebuilds the table whole."""
    return [op for name, elems in endpoint_elements([(port, ip, mac)]) for op in _elements("bridge", name, elems)]


def endpoint_remove_batch(port: str, ip: str, mac: str) -> List[dict]:
    """One endpoint's elements out of the sets. nftables refuses to delete a missing element, so each is added
    first in the same transaction: the batch succeeds whether or not they were there, and a replay changes
    nothing."""
    return endpoint_add_batch(port, ip, mac) + [
        op for name, elems in endpoint_elements([(port, ip, mac)]) for op in _elements("bridge", name, elems,
                                                                                          "delete")]


def host_guard_batch(subnets: Iterable[str]) -> List[dict]:
    """The host table: drop what the host would route to or from any vxnet subnet, and what reaches it from one."""
    nets = sorted({str(ipaddress.IPv4Network(s)) for s in subnets})
    batch = _replace_table("inet") + [
        {"add": {"set": {"family": "inet", "table": TABLE, "name": "subnets", "type": "ipv4_addr",
                         "flags": ["interval"]}}},
        _chain("inet", "forward", "forward"),
        _chain("inet", "input", "input"),
    ]
    if nets:
        elems = [{"prefix": {"addr": n.split("/")[0], "len": int(n.split("/")[1])}} for n in nets]
        batch.append({"add": {"element": {"family": "inet", "table": TABLE, "name": "subnets", "elem": elems}}})
    batch += [
        _rule("inet", "forward", "vxnet:isolation:to-overlay", _match(_payload("ip", "daddr"), "@subnets")),
        _rule("inet", "forward", "vxnet:isolation:from-overlay", _match(_payload("ip", "saddr"), "@subnets")),
        _rule("inet", "input", "vxnet:isolation:overlay-to-host", _match(_payload("ip", "saddr"), "@subnets")),
    ]
    return batch


def drop_reason(comment: str) -> Optional[str]:
    """The reason a rule of ours drops for ("vxnet:anti-spoofing:ip" -> "anti-spoofing"); None for other rules."""
    parts = comment.split(":")
    if len(parts) == 3 and parts[0] == "vxnet" and parts[1] in (ANTI_SPOOFING, ISOLATION):
        return parts[1]
    return None


def dropped_by_reason(output: str) -> Dict[str, Tuple[int, int]]:
    """A `list table` answer of either table -> reason -> (packets, bytes) summed over that reason's rules."""
    out: Dict[str, Tuple[int, int]] = {}
    for comment, (packets, octets) in libnftables.rule_counters(output).items():
        reason = drop_reason(comment)
        if reason is not None:
            before = out.get(reason, (0, 0))
            out[reason] = (before[0] + packets, before[1] + octets)
    return out


def _missing(exc: KernelError) -> bool:
    """nftables' answer to a list of a table that is not there (ENOENT, in its own words)."""
    return "No such file or directory" in str(exc)


# What the reconciler compares: a table's rules by their comments, and its sets' elements (as nft prints them).
# The rules are fixed per table kind, so a comment stands for its rule; the elements are the endpoints or subnets.
Shape = Tuple[Tuple[str, ...], Dict[str, FrozenSet[str]]]


def batch_shape(batch: List[dict]) -> Shape:
    """The shape of the table a replace batch builds (endpoint_guard_batch, host_guard_batch)."""
    comments, sets = [], {}
    for command in batch:
        (verb, body), = command.items()
        if verb != "add":
            continue
        if "rule" in body:
            comments.append(body["rule"]["comment"])
        elif "set" in body:
            sets.setdefault(body["set"]["name"], frozenset())
        elif "element" in body:
            name = body["element"]["name"]
            sets[name] = sets.get(name, frozenset()) | {_element_text(e) for e in body["element"]["elem"]}
    return tuple(sorted(comments)), sets


def listing_shape(text: str) -> Shape:
    """The shape of a table as `list table` gives it in nftables JSON: its rules' comments, its sets' elements."""
    comments = [item["rule"].get("comment", "") for item in json.loads(text or "{}").get("nftables", [])
                if "rule" in item]
    return tuple(sorted(comments)), {name: frozenset(elems) for name, elems in listed_sets(text).items()}


def shape_difference(have: Optional[Shape], want: Shape) -> Optional[str]:
    """None if equal, else what differs, in words (for the repair's log line)."""
    if have is None:
        return "table missing"
    parts = []
    if have[0] != want[0]:
        parts.append(f"rules {list(have[0])} instead of {list(want[0])}")
    for name in sorted(set(have[1]) | set(want[1])):
        if name not in have[1]:
            parts.append(f"set {name} missing")
            continue
        missing, extra = want[1].get(name, frozenset()) - have[1][name], have[1][name] - want[1].get(name, frozenset())
        if missing:
            parts.append(f"set {name} lacks {', '.join(sorted(missing))}")
        if extra:
            parts.append(f"set {name} has extra {', '.join(sorted(extra))}")
    return "; ".join(parts) or None


class Firewall:
    """Applies the batches. apply(ns, commands, what): run nftables JSON commands as one transaction inside the
    named namespace (None: the host's), KernelError naming `what` if refused; in the plugin that is Links.nft."""

    def __init__(self, apply: Callable[[Optional[str], List[dict], str], object]):
        self._apply = apply

    def guard_endpoints(self, ns: str, endpoints: Sequence[Tuple[str, str, str]]) -> None:
        self._apply(ns, endpoint_guard_batch(endpoints), f"anti-spoofing rules in {ns}")

    def guard_endpoint(self, ns: str, port: str, ip: str, mac: str) -> None:
        self._apply(ns, endpoint_add_batch(port, ip, mac), f"anti-spoofing for {port} in {ns}")

    def unguard_endpoint(self, ns: str, port: str, ip: str, mac: str) -> None:
        self._apply(ns, endpoint_remove_batch(port, ip, mac), f"removing anti-spoofing for {port} in {ns}")

    def guard_host(self, subnets: Iterable[str]) -> None:
        self._apply(None, host_guard_batch(subnets), "isolation rules in the host namespace")

    def dropped(self, ns: Optional[str]) -> Dict[str, Tuple[int, int]]:
        """What our rules have dropped since their table was made: reason -> (packets, bytes). ns: a network's
        namespace (the anti-spoofing table), None: the host's (the isolation table). {} when the table is not
        there; KernelError when the namespace is not (or nftables refuses)."""
        family = "inet" if ns is None else "bridge"
        try:
            text = self._apply(ns, list_table_command(family),
                               f"read the {family} {TABLE} table in {ns or 'the host namespace'}")
        except KernelError as exc:
            if _missing(exc):
                return {}
            raise
        return dropped_by_reason(text if isinstance(text, str) else "")

    def _listing(self, ns: Optional[str], family: str, what: str) -> Optional[Shape]:
        try:
            text = self._apply(ns, list_table_command(family), what)
        except KernelError as exc:
            if _missing(exc):
                return None
            raise
        return listing_shape(str(text or ""))

    def endpoints_drift(self, ns: str, endpoints: Sequence[Tuple[str, str, str]]) -> Optional[str]:
        """None if the anti-spoofing table in ns is exactly what guard_endpoints(ns, endpoints) makes, else what
        differs. Reads only (a list command changes nothing and sends no notification)."""
        have = self._listing(ns, "bridge", f"read the anti-spoofing table in {ns}")
        return shape_difference(have, batch_shape(endpoint_guard_batch(endpoints)))

    def host_drift(self, subnets: Iterable[str]) -> Optional[str]:
        """The same for the host isolation table and guard_host(subnets)."""
        have = self._listing(None, "inet", "read the isolation table in the host namespace")
        return shape_difference(have, batch_shape(host_guard_batch(subnets)))


def _element_text(elem) -> str:
    """A set element as `nft list set` prints it: a name or address, `a . b` for a concatenation, `addr/len`
    for an interval."""
    if isinstance(elem, dict):
        if "concat" in elem:
            return " . ".join(_element_text(e) for e in elem["concat"])
        if "prefix" in elem:
            return f"{elem['prefix']['addr']}/{elem['prefix']['len']}"
        if "elem" in elem:  # an element with a counter or timeout attached
            return _element_text(elem["elem"].get("val"))
    return str(elem)


def listed_sets(listing: str) -> dict:
    """The output of an nftables JSON `list table` -> {set name: set of element texts}."""
    out: dict = {}
    for item in json.loads(listing or "{}").get("nftables", []):
        found = item.get("set")
        if found is not None:
            elems = found.get("elem", [])
            out[found["name"]] = {_element_text(e) for e in (elems if isinstance(elems, list) else [elems])}
    return out


def list_table_command(family: str) -> List[dict]:
    """The nftables JSON command that lists one of our tables (family "bridge": anti-spoofing, "inet":
    isolation)."""
    return [{"list": {"table": {"family": family, "name": TABLE}}}]
