"""Policy enforcement inside a network's namespace: the `inet vxnet_policy` table (kernel/names.py POLICY_TABLE),
written as nftables JSON batches, and br_netfilter's switch that makes bridged traffic reach it.

Why the inet family with br_netfilter, not the bridge family: a policy has to accept replies and refuse only new
connections, which takes connection tracking, and this kernel has no conntrack in the bridge family
(CONFIG_NF_CONNTRACK_BRIDGE unset). br_netfilter (built in) sends the IPv4 and IPv6 frames a bridge forwards
through the inet hooks, conntrack included, in each namespace where its two sysctls are 1
(Links.set_bridge_netfilter). Measured on this kernel (6.18) in a network namespace with a bridge, three ports
and a VXLAN device: bridged TCP between two ports and between a port and the VXLAN device, IPv4 and IPv6, reaches
the forward hook with `ct state new` on the SYN and `established` after it; iifname and oifname are the bridge
(br0) there, not the ports, and `meta ibrname` is refused outside the bridge family, so the rules match
addresses only (anti-spoofing, netdriver/isolation.py, makes the source address trustworthy). Only a network
with a policy turns br_netfilter on; its per-namespace default is on, so Links.ensure_netns turns it off in every
namespace it makes and an open network pays nothing.

The table, whatever the number of rules and members (sets only: the cost per packet does not grow with them):

  chain forward (hook forward)
    ct state established,related accept          replies and the rest of allowed connections: one rule
    icmpv6 type {nd-neighbor-solicit, nd-neighbor-advert} accept   neighbour discovery (unicast NA and NUD
                                                  probes go to guarded addresses; anti-spoofing vets them)
    ip daddr != @guarded4 accept                  destinations that are not local members: another host's
    ip6 daddr != @guarded6 accept                 policy decides for its own (enforced at the destination)
    ip saddr . ip daddr @allow_all4 jump allow-all            a rule without ports
    ip saddr . ip daddr . meta l4proto . th dport @allow4 jump allow
    ip daddr . meta l4proto . th dport @exposed4 jump exposed    (mode exposed only)
    (the same three for IPv6)
    limit rate R log group G prefix "vxnet:drop"  a new connection nothing allows: logged, rate-limited ...
    counter drop comment "vxnet:policy:no-rule"   ... and dropped, counted exactly (audit: accepted instead,
                                                  comment "vxnet:policy-audit:no-rule", log prefix "vxnet:audit")
  chain allow-all / allow / exposed: limit rate R log group G prefix "vxnet:allow:<set>"; counter accept

The limit stops only its own rule (an nft `limit` over its rate ends the rule's evaluation, verdict included), so
it sits on a rule that logs and nothing else; the counter and the verdict are on the next one and see every
packet. A reader compares the records it got for a prefix with that verdict's counter (LOGGED) to tell how many
the limit suppressed. NFLOG costs nothing when no reader has bound the group.

Elements: netdriver/policy.py's Elements (guarded {daddr}, exposed {(daddr, proto, port)}, allow {(saddr, daddr,
proto, port)}, allow_all {(saddr, daddr)}, addresses of either family, bare); any object with those four
attributes will do. A diff (netdriver/policy.py Diff: .add and .remove, each an Elements) is applied as element
adds and deletes in one transaction.
"""

import ipaddress
from typing import Callable, Dict, List, Optional, Tuple

from kernel import libnftables, names
from netdriver.isolation import Shape, batch_shape, listing_shape, missing_table, shape_difference
from wire.errors import InvalidRequest, KernelError

TABLE = names.POLICY_TABLE
FAMILY = "inet"
# After conntrack (prerouting, -200) has labelled the packet; nothing else hooks the namespace's forward.
PRIORITY = -10
MODES = ("open", "exposed", "deny")
PROTOCOLS = ("tcp", "udp", "sctp")

# Rule comments: "vxnet:<reason>:<which>"; "vxnet:policy:..." is a drop (telemetry/metrics.py DROP_REASONS, counted
# by netdriver/isolation.py drop_reason); the accepting rules carry reasons no drop counter takes.
DROP = "vxnet:policy:no-rule"
AUDIT = "vxnet:policy-audit:no-rule"
ACCEPT_ESTABLISHED = "vxnet:policy-pass:established"
ACCEPT_NDP = "vxnet:policy-pass:ndp"
ACCEPT_UNGUARDED = "vxnet:policy-pass:unguarded"

# NFLOG prefixes (what kernel/nflog.py reads in a record) and the verdict each stands for.
LOG_DROP = "vxnet:drop"
LOG_AUDIT = "vxnet:audit"
LOG_ALLOW = "vxnet:allow"
# The three accepting sets, each with a chain of its own (its log prefix and counter name which one allowed).
_ALLOWS = (("allow-all", "allow_all"), ("allow", "allow"), ("exposed", "exposed"))


def _allow_comment(chain: str) -> str:
    return f"vxnet:policy-allowed:{chain}"


# NFLOG prefix -> the comment of the rule whose counter counts every packet of that verdict (logged or not).
LOGGED: Dict[str, str] = {LOG_DROP: DROP, LOG_AUDIT: AUDIT,
                          **{f"{LOG_ALLOW}:{chain}": _allow_comment(chain) for chain, _ in _ALLOWS}}



def verdict(prefix: str) -> Optional[str]:
    """What a record's NFLOG prefix says happened: "dropped", "audit" (would have been dropped; accepted),
    "allowed"; None for a prefix not ours."""
    if prefix == LOG_DROP:
        return "dropped"
    if prefix == LOG_AUDIT:
        return "audit"
    if prefix in LOGGED and prefix.startswith(LOG_ALLOW + ":"):
        return "allowed"
    return None


# The rate of the log statements, per verdict: enough for an operator to see who is refused, small enough that a
# scan (thousands of SYNs a second) costs the namespace little (each record is a netlink message of ~200 bytes).
LOG_RATE = 20  # per second
LOG_BURST = 50  # packets
# What a record carries of the packet: the network and transport headers (IPv6's 40 bytes + TCP's 20 + room for
# options and an extension header). The reader's copy range (kernel/nflog.py) is the same.
LOG_SNAPLEN = 128

# Every set, (name, key type) per family: v4 and v6 are separate sets (a set's key has one type).
SETS = {
    "guarded4": "ipv4_addr", "guarded6": "ipv6_addr",
    "exposed4": ["ipv4_addr", "inet_proto", "inet_service"],
    "exposed6": ["ipv6_addr", "inet_proto", "inet_service"],
    "allow4": ["ipv4_addr", "ipv4_addr", "inet_proto", "inet_service"],
    "allow6": ["ipv6_addr", "ipv6_addr", "inet_proto", "inet_service"],
    "allow_all4": ["ipv4_addr", "ipv4_addr"],
    "allow_all6": ["ipv6_addr", "ipv6_addr"],
}
_FIELDS = ("guarded", "exposed", "allow", "allow_all")


def element_text(elem) -> str:
    """A policy set element as `nft list` prints it: an address, or `a . b . tcp . 5432` for a concatenation (ports
    are plain numbers here, not isolation.element_text's raw 128-bit values)."""
    if isinstance(elem, dict):
        if "concat" in elem:
            return " . ".join(element_text(e) for e in elem["concat"])
        if "elem" in elem:  # an element with a counter or timeout attached
            return element_text(elem["elem"].get("val"))
    return str(elem)


# -- validation: nothing reaches the kernel unchecked -------------------------------------------------------------
def _address(value, field: str) -> Tuple[int, str]:
    """(4 or 6, the address in its canonical text) or InvalidRequest naming the field."""
    try:
        ip = ipaddress.ip_address(value)
    except (ValueError, TypeError):
        raise InvalidRequest(f"{field}: {value!r} is not an IPv4 or IPv6 address") from None
    return ip.version, str(ip)


def _proto(value, field: str) -> str:
    if value not in PROTOCOLS:
        raise InvalidRequest(f"{field}: protocol {value!r} is not one of {', '.join(PROTOCOLS)}")
    return value


def _port(value, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise InvalidRequest(f"{field}: port {value!r} is not an integer in 1..65535")
    return value


def _pair(saddr, daddr, field: str) -> Tuple[int, str, str]:
    sv, s = _address(saddr, f"{field} source")
    dv, d = _address(daddr, f"{field} destination")
    if sv != dv:
        raise InvalidRequest(f"{field}: source {s} and destination {d} are of different IP versions")
    return sv, s, d


def set_elements(elements) -> Dict[str, List]:
    """An Elements value -> {set name: [nftables JSON elements]} for every set (empty lists included), sorted.
    InvalidRequest naming the set and the part if an element is malformed."""
    out: Dict[str, List] = {name: [] for name in SETS}
    for daddr in getattr(elements, "guarded"):
        v, d = _address(daddr, "guarded")
        out[f"guarded{v}"].append(d)
    for item in getattr(elements, "exposed"):
        daddr, proto, port = item
        v, d = _address(daddr, "exposed")
        out[f"exposed{v}"].append({"concat": [d, _proto(proto, "exposed"), _port(port, "exposed")]})
    for item in getattr(elements, "allow"):
        saddr, daddr, proto, port = item
        v, s, d = _pair(saddr, daddr, "allow")
        out[f"allow{v}"].append({"concat": [s, d, _proto(proto, "allow"), _port(port, "allow")]})
    for item in getattr(elements, "allow_all"):
        saddr, daddr = item
        v, s, d = _pair(saddr, daddr, "allow_all")
        out[f"allow_all{v}"].append({"concat": [s, d]})
    return {name: sorted(elems, key=element_text) for name, elems in out.items()}


# -- batches ------------------------------------------------------------------------------------------------------
def _match(left, right, op: str = "==") -> dict:
    return {"match": {"op": op, "left": left, "right": right}}


def _payload(protocol: str, field: str) -> dict:
    return {"payload": {"protocol": protocol, "field": field}}


_L4PROTO = {"meta": {"key": "l4proto"}}
_DPORT = _payload("th", "dport")


def _rule(chain: str, comment: str, *expr: dict) -> dict:
    return {"add": {"rule": {"family": FAMILY, "table": TABLE, "chain": chain, "comment": comment,
                             "expr": list(expr)}}}


def _log(prefix: str, rate: int, burst: int) -> List[dict]:
    """A rate limit and an NFLOG statement: the limit ends the rule when over, so nothing may follow them."""
    return [{"limit": {"rate": rate, "per": "second", "burst": burst}},
            {"log": {"prefix": prefix, "group": names.POLICY_NFLOG_GROUP, "snaplen": LOG_SNAPLEN,
                     # deliver each record at once (nfnetlink_log batches 100 by default, or waits a second)
                     "queue-threshold": 1}}]


def _elements(name: str, elems: list, op: str = "add") -> List[dict]:
    return [{op: {"element": {"family": FAMILY, "table": TABLE, "name": name, "elem": elems}}}] if elems else []


def _lookups(version: int, mode: str) -> List[Tuple[str, dict]]:
    """(chain to jump to, match) for one family's accepting sets, in the order they are tried."""
    ip = "ip" if version == 4 else "ip6"
    saddr, daddr = _payload(ip, "saddr"), _payload(ip, "daddr")
    out = [("allow-all", _match({"concat": [saddr, daddr]}, f"@allow_all{version}")),
           ("allow", _match({"concat": [saddr, daddr, _L4PROTO, _DPORT]}, f"@allow{version}"))]
    if mode == "exposed":
        out.append(("exposed", _match({"concat": [daddr, _L4PROTO, _DPORT]}, f"@exposed{version}")))
    return out


def replace_batch(mode: str, audit: bool, elements, log_rate: int = LOG_RATE, log_burst: int = LOG_BURST
                  ) -> List[dict]:
    """The whole policy table for a network of this mode ("exposed" or "deny"), as one transaction that replaces
    whatever table of that name was there (add, delete, add: the delete cannot fail on a missing table). A replay
    changes nothing. InvalidRequest naming the part for a bad mode or element (nothing is applied then)."""
    if mode not in ("exposed", "deny"):
        raise InvalidRequest(f"policy mode {mode!r}: a table is made only for exposed or deny (open has none)")
    for what, value in (("log rate", log_rate), ("log burst", log_burst)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidRequest(f"policy {what} {value!r}: a positive integer")
    elems = set_elements(elements)
    table = {"table": {"family": FAMILY, "name": TABLE}}
    batch: List[dict] = [{"add": table}, {"delete": table}, {"add": table}]
    batch += [{"add": {"set": {"family": FAMILY, "table": TABLE, "name": name, "type": kind}}}
              for name, kind in SETS.items()]
    batch.append({"add": {"chain": {"family": FAMILY, "table": TABLE, "name": "forward", "type": "filter",
                                    "hook": "forward", "prio": PRIORITY, "policy": "accept"}}})
    for chain, _ in _ALLOWS:
        batch.append({"add": {"chain": {"family": FAMILY, "table": TABLE, "name": chain}}})
        batch.append(_rule(chain, f"vxnet:policy-log:{chain}", *_log(f"{LOG_ALLOW}:{chain}", log_rate, log_burst)))
        batch.append(_rule(chain, _allow_comment(chain), {"counter": None}, {"accept": None}))
    batch += [
        _rule("forward", ACCEPT_ESTABLISHED,
              _match({"ct": {"key": "state"}}, {"set": ["established", "related"]}, "in"), {"accept": None}),
        _rule("forward", ACCEPT_NDP,
              _match(_payload("icmpv6", "type"), {"set": ["nd-neighbor-solicit", "nd-neighbor-advert"]}),
              {"accept": None}),
        _rule("forward", ACCEPT_UNGUARDED, _match(_payload("ip", "daddr"), "@guarded4", "!="), {"accept": None}),
        _rule("forward", ACCEPT_UNGUARDED + "-v6", _match(_payload("ip6", "daddr"), "@guarded6", "!="),
              {"accept": None}),
    ]
    for version in (4, 6):
        for chain, match in _lookups(version, mode):
            batch.append(_rule("forward", f"vxnet:policy-pass:{chain}-v{version}", match, {"jump": {"target": chain}}))
    if audit:
        batch += [_rule("forward", "vxnet:policy-log:audit", *_log(LOG_AUDIT, log_rate, log_burst)),
                  _rule("forward", AUDIT, {"counter": None}, {"accept": None})]
    else:
        batch += [_rule("forward", "vxnet:policy-log:drop", *_log(LOG_DROP, log_rate, log_burst)),
                  _rule("forward", DROP, {"counter": None}, {"drop": None})]
    for name, items in elems.items():
        batch += _elements(name, items)
    return batch


def update_batch(diff) -> List[dict]:
    """A diff's element adds and deletes as one transaction against an existing table: O(change), whatever the
    number of elements. nftables refuses to delete a missing element, so each removed one is added first in the
    same transaction: the batch succeeds whether or not it was there, and a replay changes nothing. The adds come
    first, so an element in both (which netdriver/policy.py diff never gives) ends up removed. A missing table is
    an error (the caller replaces the table whole)."""
    add, remove = set_elements(diff.add), set_elements(diff.remove)
    batch: List[dict] = []
    for name in SETS:
        batch += _elements(name, add[name])
    for name in SETS:
        batch += _elements(name, remove[name]) + _elements(name, remove[name], "delete")
    return batch


def delete_batch() -> List[dict]:
    """The table gone; no error if it was not there (added first, in the same transaction)."""
    table = {"table": {"family": FAMILY, "name": TABLE}}
    return [{"add": table}, {"delete": table}]


def list_command() -> List[dict]:
    return [{"list": {"table": {"family": FAMILY, "name": TABLE}}}]


def list_chain_command(chain: str = "forward") -> List[dict]:
    """One chain of the table: its rules and counters without the sets' elements (a cheap read for metrics)."""
    return [{"list": {"chain": {"family": FAMILY, "table": TABLE, "name": chain}}}]


# -- what the kernel holds ----------------------------------------------------------------------------------------
def _canonical(name: str, text: str) -> str:
    """A set element's text as both a batch and a listing reduce to: nft lists an inet_proto as its name or its
    number and a port as a number, an IPv6 address compressed; normalised to address . proto-name . port."""
    numbers = {"6": "tcp", "17": "udp", "132": "sctp"}
    parts = [p.strip() for p in text.split(" . ")]
    if name.startswith(("exposed", "allow")) and not name.startswith("allow_all"):
        parts[-2] = numbers.get(parts[-2], parts[-2])
    return " . ".join(parts)


def shape_text(name: str, elem) -> str:
    """A policy set element as the drift check compares it (isolation.batch_shape / listing_shape's text)."""
    return _canonical(name, element_text(elem))


class PolicyFirewall:
    """The policy table of each network namespace, and br_netfilter's switch there.

    apply(ns, commands, what): run nftables JSON commands as one transaction inside namespace ns (Links.nft);
    bridge_netfilter(ns, on): set br_netfilter's sysctls there (Links.set_bridge_netfilter);
    read_bridge_netfilter(ns) -> (v4, v6) (Links.bridge_netfilter). Every method is idempotent.

      ensure_policy(ns, mode, audit, elements)   mode open: the same as remove_policy; else the whole table
                                                 replaced (start-up, network creation, repair), then br_netfilter on
      update_policy(ns, diff)                    the diff's element adds/deletes, one transaction (KernelError if
                                                 the table is missing: the caller calls ensure_policy)
      remove_policy(ns)                          br_netfilter off, then the table gone (no error if absent)
      policy_drift(ns, mode, audit, elements)    None if the kernel holds what ensure_policy makes, else what differs
      counters(ns)                               {rule comment: (packets, bytes)} of the table's rules ({} if none)
    """

    def __init__(self, apply: Callable[[Optional[str], List[dict], str], object],
                 bridge_netfilter: Callable[[str, bool], None],
                 read_bridge_netfilter: Callable[[str], Tuple[bool, bool]],
                 log_rate: int = LOG_RATE, log_burst: int = LOG_BURST):
        self._apply = apply
        self._switch = bridge_netfilter
        self._read_switch = read_bridge_netfilter
        self.log_rate = log_rate
        self.log_burst = log_burst

    def _batch(self, mode: str, audit: bool, elements) -> List[dict]:
        return replace_batch(mode, audit, elements, self.log_rate, self.log_burst)

    def ensure_policy(self, ns: str, mode: str, audit: bool, elements) -> None:
        if mode not in MODES:
            raise InvalidRequest(f"policy mode {mode!r}: one of {', '.join(MODES)}")
        if mode == "open":
            self.remove_policy(ns)
            return
        # The table first, then the switch: traffic reaches the hook only when every rule is there.
        self._apply(ns, self._batch(mode, audit, elements), f"policy table ({mode}) in {ns}")
        self._switch(ns, True)

    def update_policy(self, ns: str, diff) -> None:
        batch = update_batch(diff)
        if batch:
            self._apply(ns, batch, f"policy elements in {ns}")

    def remove_policy(self, ns: str) -> None:
        # The switch first: while the table goes, nothing reaches a half-empty hook.
        self._switch(ns, False)
        self._apply(ns, delete_batch(), f"removing the policy table in {ns}")

    def policy_drift(self, ns: str, mode: str, audit: bool, elements) -> Optional[str]:
        """Reads only (a list changes nothing). Also checks br_netfilter's switch: on with a table, off without."""
        want_on = mode != "open"
        problems = []
        if self._read_switch(ns) != (want_on, want_on):
            problems.append(f"bridge netfilter {'off' if want_on else 'on'}")
        try:
            text = self._apply(ns, list_command(), f"read the policy table in {ns}")
            have: Optional[Shape] = listing_shape(str(text or ""), shape_text)
        except KernelError as exc:
            if not missing_table(exc):
                raise
            have = None
        if not want_on:
            if have is not None:
                problems.append("policy table present on an open network")
        else:
            difference = shape_difference(have, batch_shape(self._batch(mode, audit, elements), shape_text))
            if difference:
                problems.append(difference)
        return "; ".join(problems) or None

    def counters(self, ns: str) -> Dict[str, Tuple[int, int]]:
        try:
            text = self._apply(ns, list_command(), f"read the policy counters in {ns}")
        except KernelError as exc:
            if missing_table(exc):
                return {}
            raise
        return libnftables.rule_counters(str(text or ""))

