"""Firewall rules that keep networks apart and containers honest, in nftables tables of our own, written as
nftables JSON (kernel/libnftables.py turns a batch declaring a `typeof` set into nft syntax), one atomic batch per
change (through libnftables on the netlink thread: Links.nft). A batch either
replaces a whole table (start-up, network creation: a replay changes nothing and a half-applied state never
exists) or, on Join and DeleteEndpoint, adds or removes one endpoint's elements in the sets the fixed rules look
up: O(1) per container, whatever the number of endpoints.

Two tables:
- `bridge vxnet` inside each network's namespace (anti-spoofing): a frame entering the bridge from an endpoint's
  port must carry that endpoint's MAC, and its IPv4 packets and ARP that endpoint's address. On an IPv4-only
  network IPv6 is dropped; on a dual-stack one IPv6 must come from the endpoint's global or link-local address
  (:: only for DAD and MLD), its neighbour advertisements may advertise only those, and router advertisements
  and redirects are dropped. A container with NET_ADMIN that changes its address or MAC gets nothing through.
  The endpoints are set elements (port, MAC), (port, address), looked up by a fixed set of rules.
- `inet vxnet` in the host namespace (isolation): traffic within a vxnet network is bridged inside its namespace
  and never routed by the host, so any packet the host would forward to or from a vxnet subnet is a container on
  one network trying another through the host (docker_gwbridge egress, a forged source): it is dropped, and so
  is anything reaching the host itself from a vxnet subnet, IPv4 and IPv6 subnets alike. A drop in any nftables
  table is final, so this holds beside Docker's own iptables rules.

Every rule carries a comment naming what it is for, so `nft list ruleset` explains itself, and a counter, so what
each reason dropped can be read (`dropped()`, the metrics' vxnet_dropped_packets_total): a counter statement after
the matches counts only the packets the rule drops, so the traffic that passes costs nothing more.

Every drop is also logged (NFLOG, read by plugin/flows.py for `vxnet flows`), at no cost to what passes: a drop
rule's matches count the packet and `jump` to a chain of that rule's own, `drop-<rule>`, holding two rules:
    limit rate 20/second burst 50 packets log group G prefix "vxnet:drop:<reason>:<rule>"  (comment
                                                                "vxnet:<reason>-log:<rule>")
    drop                                                       (comment "vxnet:<reason>-drop:<rule>")
A frame that passes evaluates exactly the rules it did before; a dropped one two more. The counter stays on the
matching rule (comment "vxnet:<reason>:<rule>", what the drop metrics and the drift check read), so it counts
every drop; the limit (an nft `limit` over its rate ends its rule, log included) is on the log rule alone, so it
never lets a packet through. The log's rate and burst are the policy table's (netdriver/policy_nft.py LOG_RATE,
LOG_BURST). G: kernel/names.py POLICY_NFLOG_GROUP in a network namespace (one reader hears the policy table and
the anti-spoofing table), ISOLATION_NFLOG_GROUP in the host's.
"""

import ipaddress
import json
import logging
from typing import Callable, Dict, FrozenSet, Iterable, List, NamedTuple, Optional, Sequence, Tuple

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
# The policy table in a network's namespace (netdriver/policy_nft.py, `bridge vxnet_policy`) drops for this reason:
# a new connection to a local member that no rule, and (mode exposed) no exposed port, allows.
POLICY = "policy"
# The anti-spoofing table's one accepting rule, first: what did not come in on an endpoint's port.
NOT_A_PORT = f"vxnet:{ANTI_SPOOFING}-pass:not-a-port"

# The drop log (module docstring): the policy table's rate and burst (netdriver/policy_nft.py LOG_RATE, LOG_BURST,
# LOG_SNAPLEN; that module imports this one, so they are repeated here and a unit test holds them equal).
LOG_PREFIX = "vxnet:drop"
LOG_RATE = 20  # per second
LOG_BURST = 50  # packets
LOG_SNAPLEN = 128
_GROUPS = {"bridge": names.POLICY_NFLOG_GROUP, "inet": names.ISOLATION_NFLOG_GROUP}


def log_prefix(reason: str, name: str) -> str:
    """The NFLOG prefix of one drop rule: "vxnet:drop:anti-spoofing:mac"."""
    return f"{LOG_PREFIX}:{reason}:{name}"


def logged(prefix: str) -> Optional[Tuple[str, str, str]]:
    """An NFLOG prefix of these tables -> (reason, rule, the comment of the rule whose counter counts every drop
    it logs); None for any other prefix (the policy table's "vxnet:drop" included)."""
    parts = prefix.split(":")
    if len(parts) == 4 and f"{parts[0]}:{parts[1]}" == LOG_PREFIX and parts[2] in (ANTI_SPOOFING, ISOLATION) \
            and parts[3]:
        return parts[2], parts[3], f"vxnet:{parts[2]}:{parts[3]}"
    return None


def _match(left: dict, right, op: str = "==") -> dict:
    return {"match": {"op": op, "left": left, "right": right}}


def _payload(protocol: str, field: str) -> dict:
    return {"payload": {"protocol": protocol, "field": field}}


def _iif(name: str) -> dict:
    return _match({"meta": {"key": "iifname"}}, name)


def _plain_rule(family: str, chain: str, comment: str, expr: List[dict]) -> dict:
    return {"add": {"rule": {"family": family, "table": TABLE, "chain": chain, "comment": comment, "expr": expr}}}


def _rule(family: str, chain: str, comment: str, *expr: dict) -> List[dict]:
    """A drop rule, logged (module docstring): its log chain, then the rule that counts and jumps there.
    comment: "vxnet:<reason>:<rule>"."""
    _, reason, name = comment.split(":")
    target = f"drop-{name}"
    log_statement = {"log": {"prefix": log_prefix(reason, name), "group": _GROUPS[family], "snaplen": LOG_SNAPLEN,
                             # each record at once (nfnetlink_log batches 100 by default, or waits a second)
                             "queue-threshold": 1}}
    return [{"add": {"chain": {"family": family, "table": TABLE, "name": target}}},
            _plain_rule(family, target, f"vxnet:{reason}-log:{name}",
                        [{"limit": {"rate": LOG_RATE, "per": "second", "burst": LOG_BURST}}, log_statement]),
            _plain_rule(family, target, f"vxnet:{reason}-drop:{name}", [{"drop": None}]),
            _plain_rule(family, chain, comment, list(expr) + [{"counter": None}, {"jump": {"target": target}}])]


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


# Every set of the anti-spoofing table (the last two on dual-stack networks only).
ANTI_SPOOFING_SETS = ("ports", "macs", "ips", "ip6s", "targets")


class Guarded(NamedTuple):
    """One local endpoint as the anti-spoofing sets hold it: its bridge port, bare IPv4 address, MAC, and bare
    global IPv6 address ("" when it has none)."""
    port: str
    ip: str
    mac: str
    ip6: str = ""


def link_local(mac: str) -> str:
    """The link-local address a container's kernel gives its interface from the MAC (addr_gen_mode eui64, the
    default): fe80::/64 with the modified EUI-64 interface identifier, the MAC with ff:fe in the middle and the
    universal/local bit (0x02 of the first octet) inverted (RFC 4291 2.5.6 and appendix A)."""
    octets = bytes(int(b, 16) for b in mac.split(":"))
    eui = bytes([octets[0] ^ 0x02]) + octets[1:3] + b"\xff\xfe" + octets[3:6]
    return str(ipaddress.IPv6Address(b"\xfe\x80" + bytes(6) + eui))


def _raw128(address: str) -> str:
    """An IPv6 address as the 128-bit integer a raw payload match (@th,64,128) compares it with."""
    return f"0x{int(ipaddress.IPv6Address(address)):032x}"


def _own6(endpoint: Guarded) -> List[str]:
    """The IPv6 addresses an endpoint may send from and advertise: its link-local, and its global one if any."""
    return [link_local(endpoint.mac)] + ([endpoint.ip6] if endpoint.ip6 else [])


def endpoint_elements(endpoints: Sequence[Guarded], ipv6: bool = False) -> List[Tuple[str, list]]:
    """(set name, elements) of the anti-spoofing sets for these endpoints; ipv6: the table of a dual-stack
    network, which also has the IPv6 sets."""
    endpoints = [Guarded(*e) for e in endpoints]
    out = [("ports", [e.port for e in endpoints]),
           ("macs", [{"concat": [e.port, e.mac]} for e in endpoints]),
           ("ips", [{"concat": [e.port, e.ip]} for e in endpoints])]
    if ipv6:
        out += [("ip6s", [{"concat": [e.port, a]} for e in endpoints for a in _own6(e)]),
                ("targets", [{"concat": [e.port, _raw128(a)]} for e in endpoints for a in _own6(e)])]
    return out


# ICMPv6 types (RFC 4443, RFC 4861, RFC 2710, RFC 3810) as nft names them.
_NS, _NA = "nd-neighbor-solicit", "nd-neighbor-advert"
_FROM_UNSPECIFIED = ["nd-neighbor-solicit", "mld-listener-report", "mld2-listener-report"]
_ROUTER_ONLY = ["nd-router-advert", "nd-redirect"]
# The target address of a neighbour solicitation or advertisement: after type, code, checksum (4 bytes) and the
# reserved/flags word (4 bytes), 16 bytes at bit 64 of the ICMPv6 header (RFC 4861 4.3, 4.4). nftables 1.0.6 has
# no name for it, hence the raw payload and a set declared by the expressions it is compared with (typeof).
_TARGET = {"payload": {"base": "th", "offset": 64, "len": 128}}


def endpoint_guard_batch(endpoints: Sequence[Guarded], ipv6: bool = False) -> List[dict]:
    """The anti-spoofing table for one network namespace. endpoints: each local one; ipv6: the network is dual
    stack (else every IPv6 frame from a port is dropped).

    A fixed set of rules whatever the number of endpoints: each looks up (port, address) in a set, so the cost
    per frame does not grow with the endpoints (a chain of rules per endpoint halved throughput at 50 endpoints).

    IPv6 (dual stack): a packet must come from one of the port's addresses (its global one, or the link-local of
    its MAC), or from :: only for what RFC 4862 5.4.2 (DAD neighbour solicitations, for a target of its own) and
    RFC 3810 5.2.13 (MLD reports before an address is ready) send from there; a neighbour advertisement must
    advertise one of the port's own addresses (else a container answers for another's and takes its traffic);
    router advertisements and redirects are dropped (no container is a router: they would move others' routes).
    Fragmented neighbour discovery needs no rule: receivers drop it (RFC 6980, Linux suppress_frag_ndisc)."""
    endpoints = sorted(Guarded(*e) for e in endpoints)

    def pair(protocol: str, field: str) -> dict:
        return {"concat": [{"meta": {"key": "iifname"}}, _payload(protocol, field)]}

    def rule(name: str, *expr: dict) -> List[dict]:
        return _rule("bridge", "forward", f"vxnet:{ANTI_SPOOFING}:{name}", *expr)

    sets = [_set("bridge", "ports", "ifname"),
            _set("bridge", "macs", ["ifname", "ether_addr"]),
            _set("bridge", "ips", ["ifname", "ipv4_addr"])]
    rules = [
        rule("mac", _match(pair("ether", "saddr"), "@macs", "!=")),
        rule("ip", _match(pair("ip", "saddr"), "@ips", "!=")),
        rule("arp-ip", _match(pair("arp", "saddr ip"), "@ips", "!=")),
        rule("arp-mac", _match(pair("arp", "saddr ether"), "@macs", "!=")),
    ]
    if not ipv6:
        rules.append(rule("no-ipv6", _match(_payload("ether", "type"), "ip6")))
    else:
        unspecified = _match(_payload("ip6", "saddr"), "::")
        icmp6_type = _payload("icmpv6", "type")
        target = {"concat": [{"meta": {"key": "iifname"}}, _TARGET]}
        sets += [_set("bridge", "ip6s", ["ifname", "ipv6_addr"]),
                 _set("bridge", "targets", {"typeof": target})]
        rules += [
            rule("ip6", _match(_payload("ip6", "saddr"), "::", "!="), _match(pair("ip6", "saddr"), "@ip6s", "!=")),
            # Two rules: `icmpv6 type` matches ICMPv6 only, so anything else from :: needs its own.
            rule("ip6-unspecified-proto", unspecified, _match({"meta": {"key": "l4proto"}}, "ipv6-icmp", "!=")),
            rule("ip6-unspecified-type", unspecified, _match(icmp6_type, {"set": _FROM_UNSPECIFIED}, "!=")),
            # A DAD probe for another's tentative address makes its owner give the address up (RFC 4862 5.4.3).
            rule("dad-target", unspecified, _match(icmp6_type, _NS), _match(target, "@targets", "!=")),
            rule("na-target", _match(icmp6_type, _NA), _match(target, "@targets", "!=")),
            rule("router", _match(icmp6_type, {"set": _ROUTER_ONLY})),
        ]
    # What did not come in on an endpoint's port (the VXLAN device: another host's table vetted it; a trunk
    # between this network's bridges: vetted on the bridge it entered) passes at once, with one lookup, so the
    # rules below need no port test of their own (a lookup each, for every frame).
    from_elsewhere = _plain_rule("bridge", "forward", NOT_A_PORT,
                                 [_match({"meta": {"key": "iifname"}}, "@ports", "!="), {"accept": None}])
    return (_replace_table("bridge") + sets + [_chain("bridge", "forward", "forward"), from_elsewhere] +
            [op for r in rules for op in r] +
            [op for name, elems in endpoint_elements(endpoints, ipv6) for op in _elements("bridge", name, elems)])


def endpoint_add_batch(endpoint: Guarded, ipv6: bool = False) -> List[dict]:
    """One endpoint's elements into the sets of an existing anti-spoofing table. Adding an element that is there
    already is no error, so a replay changes nothing. A missing table is an error (nothing is created here: sets
    without their rules would guard nothing), and the caller rebuilds the table whole."""
    return [op for name, elems in endpoint_elements([endpoint], ipv6) for op in _elements("bridge", name, elems)]


def endpoint_remove_batch(endpoint: Guarded, ipv6: bool = False) -> List[dict]:
    """One endpoint's elements out of the sets. nftables refuses to delete a missing element, so each is added
    first in the same transaction: the batch succeeds whether or not they were there, and a replay changes
    nothing."""
    return endpoint_add_batch(endpoint, ipv6) + [
        op for name, elems in endpoint_elements([endpoint], ipv6) for op in _elements("bridge", name, elems,
                                                                                        "delete")]


def host_guard_batch(subnets: Iterable[str]) -> List[dict]:
    """The host table: drop what the host would route to or from any vxnet subnet, and what reaches it from one.
    subnets: IPv4 and IPv6 prefixes alike (one interval set per family, the same three rules for each)."""
    nets = {ipaddress.ip_network(s) for s in subnets}
    batch = _replace_table("inet") + [
        {"add": {"set": {"family": "inet", "table": TABLE, "name": name, "type": kind, "flags": ["interval"]}}}
        for name, kind in (("subnets", "ipv4_addr"), ("subnets6", "ipv6_addr"))
    ] + [_chain("inet", "forward", "forward"), _chain("inet", "input", "input")]
    for name, version in (("subnets", 4), ("subnets6", 6)):
        elems = [{"prefix": {"addr": str(n.network_address), "len": n.prefixlen}}
                 for n in sorted(n for n in nets if n.version == version)]
        if elems:
            batch.append({"add": {"element": {"family": "inet", "table": TABLE, "name": name, "elem": elems}}})
    for protocol, name, suffix in (("ip", "@subnets", ""), ("ip6", "@subnets6", "-v6")):
        batch += [
            *_rule("inet", "forward", f"vxnet:isolation:to-overlay{suffix}", _match(_payload(protocol, "daddr"), name)),
            *_rule("inet", "forward", f"vxnet:isolation:from-overlay{suffix}",
                   _match(_payload(protocol, "saddr"), name)),
            *_rule("inet", "input", f"vxnet:isolation:overlay-to-host{suffix}",
                   _match(_payload(protocol, "saddr"), name)),
        ]
    return batch


def drop_reason(comment: str) -> Optional[str]:
    """The reason a rule of ours drops for ("vxnet:anti-spoofing:ip" -> "anti-spoofing", "vxnet:policy:no-rule" ->
    "policy"); None for other rules (the policy table's accepting rules say "vxnet:policy-pass:...",
    "vxnet:policy-allowed:...", and in audit mode "vxnet:policy-audit:...": they drop nothing)."""
    parts = comment.split(":")
    if len(parts) == 3 and parts[0] == "vxnet" and parts[1] in (ANTI_SPOOFING, ISOLATION, POLICY):
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


def missing_table(exc: KernelError) -> bool:
    """nftables' answer to a list of a table that is not there (ENOENT, in its own words)."""
    return "No such file or directory" in str(exc)


# What the reconciler compares: a table's rules by their comments, and its sets' elements (as nft prints them).
# The rules are fixed per table kind, so a comment stands for its rule; the elements are the endpoints or subnets.
Shape = Tuple[Tuple[str, ...], Dict[str, FrozenSet[str]]]


# How a set element reads as text in a shape: (set name, element as JSON) -> text. A table kind whose listing
# prints elements differently from its batches (netdriver/policy_nft.py) passes its own.
ElementText = Callable[[str, object], str]


def _element_text(name: str, elem) -> str:
    return element_text(elem)


def batch_shape(batch: List[dict], text: ElementText = _element_text) -> Shape:
    """The shape of the table a replace batch builds (endpoint_guard_batch, host_guard_batch, the policy table's)."""
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
            sets[name] = sets.get(name, frozenset()) | {text(name, e) for e in body["element"]["elem"]}
    return tuple(sorted(comments)), sets


def listing_shape(listing: str, text: ElementText = _element_text) -> Shape:
    """The shape of a table as `list table` gives it in nftables JSON: its rules' comments, its sets' elements."""
    comments = [item["rule"].get("comment", "") for item in json.loads(listing or "{}").get("nftables", [])
                if "rule" in item]
    return tuple(sorted(comments)), {name: frozenset(elems) for name, elems in listed_sets(listing, text).items()}


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

    def guard_endpoints(self, ns: str, endpoints: Sequence[Guarded], ipv6: bool = False) -> None:
        self._apply(ns, endpoint_guard_batch(endpoints, ipv6), f"anti-spoofing rules in {ns}")

    def guard_endpoint(self, ns: str, endpoint: Guarded, ipv6: bool = False) -> None:
        self._apply(ns, endpoint_add_batch(endpoint, ipv6), f"anti-spoofing for {endpoint.port} in {ns}")

    def unguard_endpoint(self, ns: str, endpoint: Guarded, ipv6: bool = False) -> None:
        self._apply(ns, endpoint_remove_batch(endpoint, ipv6), f"removing anti-spoofing for {endpoint.port} in {ns}")

    def guard_host(self, subnets: Iterable[str]) -> None:
        self._apply(None, host_guard_batch(subnets), "isolation rules in the host namespace")

    def dropped(self, ns: Optional[str]) -> Dict[str, Tuple[int, int]]:
        """What our rules have dropped since their table was made: reason -> (packets, bytes). ns: a network's
        namespace (the anti-spoofing table, and the policy table's forward chain if the network has one), None:
        the host's (the isolation table). Nothing for a table that is not there; KernelError when the namespace
        is not (or nftables refuses)."""
        family = "inet" if ns is None else "bridge"
        out = self._dropped(ns, list_table_command(family),
                            f"read the {family} {TABLE} table in {ns or 'the host namespace'}")
        if ns is not None:
            # Only the chain with the drop rule: listing the table would also dump every policy set element (and
            # the UDP records), netdriver/policy_nft.py.
            chain = [{"list": {"chain": {"family": "bridge", "table": names.POLICY_TABLE, "name": "forward"}}}]
            out.update(self._dropped(ns, chain, f"read the policy drops in {ns}"))
        return out

    def counted(self, ns: Optional[str]) -> Dict[str, Tuple[int, int]]:
        """The counters of one of our tables by rule comment: ns a network's namespace (anti-spoofing), None the
        host's (isolation); {} for a table that is not there. What the drop log compares its records with."""
        family = "inet" if ns is None else "bridge"
        try:
            text = self._apply(ns, list_table_command(family),
                               f"read the {family} {TABLE} counters in {ns or 'the host namespace'}")
        except KernelError as exc:
            if missing_table(exc):
                return {}
            raise
        return libnftables.rule_counters(text if isinstance(text, str) else "")

    def _dropped(self, ns: Optional[str], command: List[dict], what: str) -> Dict[str, Tuple[int, int]]:
        try:
            text = self._apply(ns, command, what)
        except KernelError as exc:
            if missing_table(exc):
                return {}
            raise
        return dropped_by_reason(text if isinstance(text, str) else "")

    def _listing(self, ns: Optional[str], family: str, what: str) -> Optional[Shape]:
        try:
            text = self._apply(ns, list_table_command(family), what)
        except KernelError as exc:
            if missing_table(exc):
                return None
            raise
        return listing_shape(str(text or ""))

    def endpoints_drift(self, ns: str, endpoints: Sequence[Guarded], ipv6: bool = False) -> Optional[str]:
        """None if the anti-spoofing table in ns is exactly what guard_endpoints(ns, endpoints, ipv6) makes, else
        what differs. Reads only (a list command changes nothing and sends no notification)."""
        have = self._listing(ns, "bridge", f"read the anti-spoofing table in {ns}")
        return shape_difference(have, batch_shape(endpoint_guard_batch(endpoints, ipv6)))

    def host_drift(self, subnets: Iterable[str]) -> Optional[str]:
        """The same for the host isolation table and guard_host(subnets)."""
        have = self._listing(None, "inet", "read the isolation table in the host namespace")
        return shape_difference(have, batch_shape(host_guard_batch(subnets)))


def element_text(elem) -> str:
    """A set element as `nft list set` prints it: a name or address, `a . b` for a concatenation, `addr/len`
    for an interval; a raw 128-bit value (the targets set) as 32 hex digits, whichever way it came: nft lists
    it as a "0x..." string without leading zeros, or as a JSON number when it is small."""
    if isinstance(elem, int) and not isinstance(elem, bool):
        return f"0x{elem:032x}"
    if isinstance(elem, str) and elem.startswith("0x"):
        return f"0x{int(elem, 16):032x}"
    if isinstance(elem, dict):
        if "concat" in elem:
            return " . ".join(element_text(e) for e in elem["concat"])
        if "prefix" in elem:
            return f"{elem['prefix']['addr']}/{elem['prefix']['len']}"
        if "elem" in elem:  # an element with a counter or timeout attached
            return element_text(elem["elem"].get("val"))
    return str(elem)


def listed_sets(listing: str, text: ElementText = _element_text) -> dict:
    """The output of an nftables JSON `list table` -> {set name: set of element texts}."""
    out: dict = {}
    for item in json.loads(listing or "{}").get("nftables", []):
        found = item.get("set")
        if found is not None:
            elems = found.get("elem", [])
            out[found["name"]] = {text(found["name"], e) for e in (elems if isinstance(elems, list) else [elems])}
    return out


def list_table_command(family: str) -> List[dict]:
    """The nftables JSON command that lists one of our tables (family "bridge": anti-spoofing, "inet":
    isolation)."""
    return [{"list": {"table": {"family": family, "name": TABLE}}}]
