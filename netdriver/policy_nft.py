"""Policy enforcement inside a network's namespace: the `bridge vxnet_policy` table (kernel/names.py POLICY_TABLE),
written as nftables JSON batches, on the bridge's own forward hook: no br_netfilter, no connection tracking.

Why the bridge family and no conntrack: this kernel has no conntrack in the bridge family
(CONFIG_NF_CONNTRACK_BRIDGE unset), so conntrack was reachable only by sending bridged frames through the inet
hooks (br_netfilter), which cost 3.5 us per round trip between two containers of one bridge (ping -f, 30,000
echoes: 7.7 us without a policy, 11.2 us with br_netfilter and a `ct state` table, 8.8 us with a bridge-family
table of stateless rules and one dynamic set); side by side, with an echo loop of its own (docs/policy.md,
Enforcement), the tables made here add 0.93 us and br_netfilter with conntrack 2.05 us. br_netfilter stays off in every
namespace vxnet makes (Links.ensure_netns). What conntrack gave, "new connections refused unless allowed, replies
to allowed ones always pass", is kept by judging only what can open a connection, per protocol:

  TCP     a segment with SYN and without ACK (`tcp flags & (syn|ack) == syn`) is a new connection and is judged;
          every other segment passes, as the table's first rule. A peer cannot open a connection without a SYN
          this table let through (the handshake needs the destination's SYN-ACK, RFC 9293 3.5), so this refuses
          the connections conntrack's `ct state new` refused. What it lets through: a segment without SYN to a port
          it never connected to (an ACK or FIN probe) reaches the destination's kernel, which answers it with a
          RST (RFC 9293 3.10.7.1); a port scan by ACKs learns that the address is up, not which ports are open.
          It is no barrier to data injected into an open connection, and conntrack was none either (it passes
          any segment inside the window): the sequence numbers are the destination kernel's check (RFC 9293
          3.10.7.4, RFC 5961), and the source address anti-spoofing's, so a member can send segments only as
          itself, never into a connection between two others.
  UDP     a datagram to a guarded member is judged unless it is the reverse of a recorded one. A record (set udp4
          or udp6 of the table UDP_TABLE: saddr . daddr . sport . dport) is made when a datagram from a local
          member (one that came in on a container's port, its source vetted by anti-spoofing) has passed this
          table, so a datagram the destination refused on the same host records nothing; a datagram matching the
          reverse of a record passes, refreshes it, and is recorded in turn when its sender is local, so once a
          reply was seen both directions pass (as conntrack's UDP entries do once they have seen a reply), and
          every datagram either way refreshes.
          Timeout UDP_TIMEOUT, conntrack's nf_conntrack_udp_timeout_stream (120 s), not its unreplied 30 s: one
          set cannot tell replied from unreplied, and a reply window shorter than a stream's would cut streams
          that are quiet for 30-120 s (keepalives of 25-60 s, RFC 4787 REQ-5 asks NATs for 2 minutes), while the
          longer window opens nothing but the exact 4-tuple the member itself sent to. Bounded at UDP_SIZE
          records per family: when full, a new record is not made (the datagram still passes) and its replies
          are judged as new datagrams until records expire; records made already keep working (conntrack's full
          table drops new flows instead). Nothing of it is written by the plugin: the packet path fills it, a
          plugin restart leaves it (see ensure_policy) and the plugin never reads it.
  SCTP    a packet with verification tag 0 is judged (RFC 9260 8.5.1: only a packet carrying an INIT has tag 0;
          Linux answers an INIT with any other tag with an ABORT, sctp_sf_do_5_1B_init), every other packet
          passes: without an INIT the destination accepted, a sender has no tag the destination's association
          takes (it silently discards a packet whose tag is not its own, RFC 9260 8.5), which is the same
          guarantee as TCP's SYN rule, with a 32-bit random tag instead of a sequence number.
  ICMP    echo-request (and every type not listed here) is judged by address pair; echo-reply and the errors
          (destination-unreachable, time-exceeded, parameter-problem; ICMPv6's packet-too-big too) pass, so path
          MTU discovery and traceroute work; neighbour solicitations and advertisements pass (anti-spoofing vets
          them). An error passes whatever connection it quotes: the destination's kernel matches the quoted
          header against its own sockets (a TCP error must quote a sequence number in flight, RFC 5927) as it
          does for errors from any router. Echo is not tracked: each echo-request is judged (and, if allowed,
          counted and logged as allowed), where conntrack judged the first of a `ping` run.
  fragments a non-first fragment (IPv4 fragment offset != 0, IPv6 fragment header with offset != 0) passes: it
          carries no transport header, and its first fragment, which does, was judged; a lone later fragment
          reaches nothing (the destination's reassembly times out without the first).
  others  every other protocol (GRE, ESP inside the overlay, ...) is judged packet by packet by address pair:
          a rule without ports allows one direction, replies need a rule of their own. Frames that are not IPv4
          or IPv6 (ARP) pass, as they did not reach the inet hooks before. A frame with one 802.1Q tag is judged
          by the IP packet inside it; one with two tags (its IP header out of every rule's reach) is judged as a
          packet nothing allows (br_netfilter let tagged frames pass unjudged: bridge-nf-filter-vlan-tagged 0).

Why the UDP records are a table of their own (UDP_TABLE): nftables 1.0.6 reads every element of every set of a
table to list any of its rules or counters (even `list chain`, even terse), and the plugin lists the policy table
for its drift check, its counters and the drop metrics. With 65,536 records in it each of those reads took 0.8 s
here; in a table of their own the records cost the plugin nothing, and their table is read only by `list chains`
(which fetches no set). The records table's chains sit on either side of the policy table on the same hook: one
before it (REPLY_PRIORITY) marks a datagram that answers a record (names.POLICY_REPLY_MARK; an accept is not
final across tables, so it cannot pass the datagram itself), the policy table accepts what carries the mark, and
one after it (RECORD_PRIORITY) records what came in on a container's port and was not dropped.

Why every priority is after anti-spoofing (netdriver/isolation.py, `bridge vxnet` at -10): a drop in any table is
final, an accept is not, so the order changes no verdict; but a record made by a frame that anti-spoofing then
drops would open a reply path to a forged source. After it, only vetted frames are judged and recorded.

The tables, whatever the number of rules and members (sets and one verdict map: the cost per packet does not
grow with them):

table bridge vxnet_policy_udp (UDP_TABLE)
  chain replies (hook forward, priority REPLY_PRIORITY)
    ip daddr . ip saddr . udp dport . udp sport @udp4 update @udp4 { <the same> } meta mark set MARK  (and IPv6)
  chain record (hook forward, priority RECORD_PRIORITY): what passed the policy table
    iifname != "vxlan0" update @udp4 { ip saddr . ip daddr . udp sport . udp dport }   (and IPv6; no verdict, so
                                                                                       a full set stops nothing)
table bridge vxnet_policy (TABLE)
  chain forward (hook forward, priority PRIORITY)
    oifname "vxlan0" accept                        leaving for another host, whose table judges it
    tcp flags & (syn|ack) != syn accept            the rest of a TCP connection: the most frequent packet next
    meta l4proto udp meta mark MARK accept         a datagram the records' table found to be a reply
    icmp type { echo-reply, the errors } accept    what passes without a judgment, per protocol
    icmpv6 type { echo-reply, the errors, nd-neighbor-solicit/advert } accept
    sctp vtag != 0 accept
    ip saddr . ip daddr @allow_all4 jump allow-all  a rule without ports: the pair may do anything
    ip6 saddr . ip6 daddr @allow_all6 jump allow-all
    ip daddr != @guarded4 accept                   destinations that are not local members: another host's
    ip6 daddr != @guarded6 accept                  policy decides for its own (enforced at the destination)
    ip saddr . ip daddr . meta l4proto . th dport @allow4 jump allow
    ip daddr . meta l4proto . th dport @exposed4 jump exposed    (mode exposed only)
    (the same two for IPv6)
    meta protocol != { ip, ip6, 8021q, 8021ad } accept   not IP (ARP), and not IP behind a second VLAN tag
    ip frag-off & 0x1fff != 0 accept               a later fragment (and its IPv6 twin, `frag frag-off != 0`)
    limit rate R log group G prefix "vxnet:drop"   a new connection nothing allows: logged, rate-limited ...
    counter drop comment "vxnet:policy:no-rule"    ... and dropped, counted exactly (audit: accepted instead,
                                                   comment "vxnet:policy-audit:no-rule", log prefix "vxnet:audit")
  chain allow-all / allow / exposed: limit rate R log group G prefix "vxnet:allow:<set>"; counter accept
    (the allowed records wait for the reader's batch, kernel/nflog.py BATCH; the drop and audit logs carry
    queue-threshold 1 and are sent at once)

The limit stops only its own rule (an nft `limit` over its rate ends the rule's evaluation, verdict included), so
it sits on a rule that logs and nothing else; the counter and the verdict are on the next one and see every
packet. A set update that fails (the set full) ends its rule the same way, hence records in rules without a
verdict. A reader compares the records it got for a prefix with that verdict's counter (LOGGED) to tell how many
the limit suppressed. NFLOG costs nothing when no reader has bound the group.

Elements: netdriver/policy.py's Elements (guarded {daddr}, exposed {(daddr, proto, port)}, allow {(saddr, daddr,
proto, port)}, allow_all {(saddr, daddr)}, addresses of either family, bare); any object with those four
attributes will do. A diff (netdriver/policy.py Diff: .add and .remove, each an Elements) is applied as element
adds and deletes in one transaction.

Listing: the policy table whole for the drift check, with libnftables' terse output (`nft -t`: no set elements
printed) for its counters, and of the records' table its chains only.
"""

import ipaddress
import json
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

from kernel import libnftables, names
from netdriver.isolation import Shape, batch_shape, missing_table, shape_difference
from wire.errors import InvalidRequest, KernelError

TABLE = names.POLICY_TABLE
UDP_TABLE = names.POLICY_UDP_TABLE
FAMILY = "bridge"
# The table of the br_netfilter design (`inet vxnet_policy`): removed whenever the bridge table is made or removed,
# so a namespace left by an earlier vxnet keeps no second policy.
LEGACY_FAMILY = "inet"
# After the anti-spoofing table (netdriver/isolation.py PRIORITY, -10), and the records' chains on either side of
# the policy table: see the module docstring.
REPLY_PRIORITY = -5
PRIORITY = 0
RECORD_PRIORITY = 5
# The records' table is compared by its chains alone (its rules cannot be listed without reading every record): a
# change to its rules goes with new chain names, so that a table made by another version is made again.
UDP_CHAINS = {"replies": REPLY_PRIORITY, "record": RECORD_PRIORITY}
MODES = ("open", "exposed", "deny")
PROTOCOLS = ("tcp", "udp", "sctp")

# The UDP records (module docstring): conntrack's nf_conntrack_udp_timeout_stream, and a bound per family: 65536
# records hold 546 new 4-tuples a second for the whole 120 s, far more than service-to-service UDP makes, and take
# 8.2 MiB of kernel memory when full (measured here: the slab grew by 8.3 MiB filling one set, either family; an
# add beyond the size fails with ENFILE, a packet path update just makes no record).
UDP_TIMEOUT = 120  # seconds
UDP_SIZE = 65536

# Rule comments: "vxnet:<reason>:<which>"; "vxnet:policy:..." is a drop (telemetry/metrics.py DROP_REASONS, counted
# by netdriver/isolation.py drop_reason); the accepting rules carry reasons no drop counter takes.
DROP = "vxnet:policy:no-rule"
AUDIT = "vxnet:policy-audit:no-rule"
ACCEPT_TO_OTHER_HOSTS = "vxnet:policy-pass:to-other-hosts"
ACCEPT_ESTABLISHED = "vxnet:policy-pass:established"
ACCEPT_UDP_REPLY = "vxnet:policy-pass:udp-reply"
ACCEPT_SCTP = "vxnet:policy-pass:sctp-association"
ACCEPT_ICMP = "vxnet:policy-pass:icmp"
ACCEPT_ICMPV6 = "vxnet:policy-pass:icmpv6"
ACCEPT_UNGUARDED = "vxnet:policy-pass:unguarded"
ACCEPT_NOT_IP = "vxnet:policy-pass:not-ip"
ACCEPT_FRAGMENT = "vxnet:policy-pass:fragment"
UDP_REPLY = "vxnet:policy-udp:reply"
UDP_RECORD = "vxnet:policy-udp:record"

# NFLOG prefixes (what kernel/nflog.py reads in a record) and the verdict each stands for.
LOG_DROP = "vxnet:drop"
LOG_AUDIT = "vxnet:audit"
LOG_ALLOW = "vxnet:allow"
# The three accepting sets, each with a chain of its own (its log prefix and counter name which one allowed).
_ALLOWS = (("allow-all", "allow_all"), ("allow", "allow"), ("exposed", "exposed"))
# The chains reached from forward's verdict map.

# What meta protocol (skb->protocol) is for the frames judged here: IPv4, IPv6, and a frame with a second VLAN tag
# (802.1Q or 802.1ad inside the first), whose IP header no rule can see: it falls to the verdict (dropped, in
# enforcing mode) instead of passing as "not IP".
NOT_PASSING = ["ip", "ip6", "8021q", "8021ad"]
# ICMP types that pass unjudged (RFC 792, RFC 4443; RFC 4861 for neighbour discovery), as nft names them.
ICMP_PASS = ["echo-reply", "destination-unreachable", "time-exceeded", "parameter-problem"]
ICMPV6_PASS = ["echo-reply", "destination-unreachable", "packet-too-big", "time-exceeded", "parameter-problem",
               "nd-neighbor-solicit", "nd-neighbor-advert"]


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

# The sets the plugin writes, (name, key type) per family: v4 and v6 are separate sets (a set's key has one type).
SETS = {
    "guarded4": "ipv4_addr", "guarded6": "ipv6_addr",
    "exposed4": ["ipv4_addr", "inet_proto", "inet_service"],
    "exposed6": ["ipv6_addr", "inet_proto", "inet_service"],
    "allow4": ["ipv4_addr", "ipv4_addr", "inet_proto", "inet_service"],
    "allow6": ["ipv6_addr", "ipv6_addr", "inet_proto", "inet_service"],
    "allow_all4": ["ipv4_addr", "ipv4_addr"],
    "allow_all6": ["ipv6_addr", "ipv6_addr"],
}
# The sets the packet path writes (the UDP records, in UDP_TABLE): saddr . daddr . sport . dport of a datagram a local
# member sent.
FLOW_SETS = {
    "udp4": ["ipv4_addr", "ipv4_addr", "inet_service", "inet_service"],
    "udp6": ["ipv6_addr", "ipv6_addr", "inet_service", "inet_service"],
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
_ACCEPT = {"accept": None}


def _ip(version: int) -> str:
    return "ip" if version == 4 else "ip6"


def _rule(chain: str, comment: str, *expr: dict) -> dict:
    return {"add": {"rule": {"family": FAMILY, "table": TABLE, "chain": chain, "comment": comment,
                             "expr": list(expr)}}}


def _chain(name: str) -> dict:
    return {"add": {"chain": {"family": FAMILY, "table": TABLE, "name": name}}}


def _log(prefix: str, rate: int, burst: int, at_once: bool) -> List[dict]:
    """A rate limit and an NFLOG statement: the limit ends the rule when over, so nothing may follow them.
    at_once: the record is sent alone, now (queue-threshold 1: drops and audit verdicts); else with the reader's
    batch (kernel/nflog.py BATCH: allowed connections, at most 0.25 s later, without waking the reader for each)."""
    log = {"prefix": prefix, "group": names.POLICY_NFLOG_GROUP, "snaplen": LOG_SNAPLEN}
    if at_once:
        log["queue-threshold"] = 1
    return [{"limit": {"rate": rate, "per": "second", "burst": burst}}, {"log": log}]


def _elements(name: str, elems: list, op: str = "add") -> List[dict]:
    return [{op: {"element": {"family": FAMILY, "table": TABLE, "name": name, "elem": elems}}}] if elems else []


def _lookups(version: int, mode: str) -> List[Tuple[str, dict]]:
    """(chain to jump to, match) for one family's accepting sets, in the order they are tried."""
    ip = _ip(version)
    saddr, daddr = _payload(ip, "saddr"), _payload(ip, "daddr")
    out = [("allow-all", _match({"concat": [saddr, daddr]}, f"@allow_all{version}")),
           ("allow", _match({"concat": [saddr, daddr, _L4PROTO, _DPORT]}, f"@allow{version}"))]
    if mode == "exposed":
        out.append(("exposed", _match({"concat": [daddr, _L4PROTO, _DPORT]}, f"@exposed{version}")))
    return out


def _udp_key(version: int, reverse: bool) -> dict:
    """saddr . daddr . sport . dport of a datagram, or (reverse) of the datagram it answers."""
    ip = _ip(version)
    fields = [_payload(ip, "saddr"), _payload(ip, "daddr"), _payload("udp", "sport"), _payload("udp", "dport")]
    if reverse:
        fields = [fields[1], fields[0], fields[3], fields[2]]
    return {"concat": fields}


def _update(version: int, reverse: bool) -> dict:
    """Add the datagram's record (reverse: its reply's) to the family's UDP set, or refresh its timeout."""
    return {"set": {"op": "update", "elem": _udp_key(version, reverse), "set": f"@udp{version}"}}


def udp_batch() -> List[dict]:
    """The records' table (UDP_TABLE, module docstring), made anew (add, delete, add): its sets empty."""
    table = {"table": {"family": FAMILY, "name": UDP_TABLE}}
    batch: List[dict] = [{"add": table}, {"delete": table}, {"add": table}]
    batch += [{"add": {"set": {"family": FAMILY, "table": UDP_TABLE, "name": name, "type": kind,
                               "flags": ["timeout"], "timeout": UDP_TIMEOUT, "size": UDP_SIZE}}}
              for name, kind in FLOW_SETS.items()]
    batch += [{"add": {"chain": {"family": FAMILY, "table": UDP_TABLE, "name": name, "type": "filter",
                                 "hook": "forward", "prio": prio, "policy": "accept"}}}
              for name, prio in UDP_CHAINS.items()]
    for version, suffix in ((4, ""), (6, "-v6")):
        batch.append({"add": {"rule": {"family": FAMILY, "table": UDP_TABLE, "chain": "replies",
                                       "comment": UDP_REPLY + suffix, "expr": [
                                           _match(_udp_key(version, True), f"@udp{version}"), _update(version, True),
                                           {"mangle": {"key": {"meta": {"key": "mark"}},
                                                       "value": names.POLICY_REPLY_MARK}}]}}})
        # A datagram that came in on a container's port: the VXLAN device's come from other hosts, whose own
        # tables record them. Anti-spoofing has vetted its source; the policy table did not drop it.
        batch.append({"add": {"rule": {"family": FAMILY, "table": UDP_TABLE, "chain": "record",
                                       "comment": UDP_RECORD + suffix, "expr": [
                                           _match(_L4PROTO, "udp"), _match({"meta": {"key": "protocol"}}, _ip(version)),
                                           _match({"meta": {"key": "iifname"}}, names.VXLAN, "!="),
                                           _update(version, False)]}}})
    return batch


def _unjudged() -> List[dict]:
    """What passes without a judgment, per protocol (module docstring), as rules of forward. Direct rules rather
    than a verdict map on l4proto into a chain per protocol: each rule's protocol test is one comparison of the
    packet's parsed l4proto, where the map cost a lookup and a jump for every packet that reached it."""
    return [
        # The mark is set only by the records' table's replies chain, for UDP; the test of l4proto keeps any other
        # packet that carries the same mark value from passing here.
        _rule("forward", ACCEPT_UDP_REPLY, _match(_L4PROTO, "udp"),
              _match({"meta": {"key": "mark"}}, names.POLICY_REPLY_MARK), _ACCEPT),
        _rule("forward", ACCEPT_ICMP, _match(_payload("icmp", "type"), {"set": ICMP_PASS}), _ACCEPT),
        _rule("forward", ACCEPT_ICMPV6, _match(_payload("icmpv6", "type"), {"set": ICMPV6_PASS}), _ACCEPT),
        _rule("forward", ACCEPT_SCTP, _match(_payload("sctp", "vtag"), 0, "!="), _ACCEPT),
    ]


def replace_batch(mode: str, audit: bool, elements, log_rate: int = LOG_RATE, log_burst: int = LOG_BURST
                  ) -> List[dict]:
    """The whole policy table for a network of this mode ("exposed" or "deny"), as one transaction that replaces
    whatever table of that name was there (add, delete, add: the delete cannot fail on a missing table), and removes
    the br_netfilter design's `inet` table if one is left (the UDP records' table is udp_batch's). A replay changes
    nothing. InvalidRequest naming the part for a bad mode or element (nothing is applied then)."""
    if mode not in ("exposed", "deny"):
        raise InvalidRequest(f"policy mode {mode!r}: a table is made only for exposed or deny (open has none)")
    for what, value in (("log rate", log_rate), ("log burst", log_burst)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidRequest(f"policy {what} {value!r}: a positive integer")
    elems = set_elements(elements)
    table = {"table": {"family": FAMILY, "name": TABLE}}
    legacy = {"table": {"family": LEGACY_FAMILY, "name": TABLE}}
    batch: List[dict] = [{"add": legacy}, {"delete": legacy}, {"add": table}, {"delete": table}, {"add": table}]
    batch += [{"add": {"set": {"family": FAMILY, "table": TABLE, "name": name, "type": kind}}}
              for name, kind in SETS.items()]
    batch.append({"add": {"chain": {"family": FAMILY, "table": TABLE, "name": "forward", "type": "filter",
                                    "hook": "forward", "prio": PRIORITY, "policy": "accept"}}})
    # Every chain before any rule: a jump or goto names a chain that must exist.
    batch += [_chain(name) for name, _ in _ALLOWS]
    for chain, _ in _ALLOWS:
        batch.append(_rule(chain, f"vxnet:policy-log:{chain}",
                           *_log(f"{LOG_ALLOW}:{chain}", log_rate, log_burst, False)))
        batch.append(_rule(chain, _allow_comment(chain), {"counter": None}, _ACCEPT))
    batch += [
        # Leaving for another host: its own table judges the frame at the destination, so none of the rules below
        # need run on the way out (one of a round trip's two bridge crossings per host).
        _rule("forward", ACCEPT_TO_OTHER_HOSTS, _match({"meta": {"key": "oifname"}}, names.VXLAN), _ACCEPT),
        # SYN set, ACK clear: a new connection. Everything else of TCP passes here (module docstring).
        _rule("forward", ACCEPT_ESTABLISHED,
              _match({"&": [_payload("tcp", "flags"), {"|": ["syn", "ack"]}]}, "syn", "!="), _ACCEPT),
    ] + _unjudged()
    lookups = {version: _lookups(version, mode) for version in (4, 6)}
    # A pair with a rule without ports may do anything: its lookup before the guarded test decides an allowed
    # pair's packet in one lookup (an element's destination is a local member, so it is guarded anyway).
    for version in (4, 6):
        chain, match = lookups[version][0]
        batch.append(_rule("forward", f"vxnet:policy-pass:{chain}-v{version}", match, {"jump": {"target": chain}}))
    batch += [
        _rule("forward", ACCEPT_UNGUARDED, _match(_payload("ip", "daddr"), "@guarded4", "!="), _ACCEPT),
        _rule("forward", ACCEPT_UNGUARDED + "-v6", _match(_payload("ip6", "daddr"), "@guarded6", "!="), _ACCEPT),
    ]
    for version in (4, 6):
        for chain, match in lookups[version][1:]:
            batch.append(_rule("forward", f"vxnet:policy-pass:{chain}-v{version}", match, {"jump": {"target": chain}}))
    batch += [
        # Not IPv4 or IPv6 (ARP): passes. skb->protocol (meta protocol) is the IP inside one 802.1Q tag (the
        # receive path moves a tag out of the frame), judged above; a second tag hides it, so it stays here.
        _rule("forward", ACCEPT_NOT_IP, _match({"meta": {"key": "protocol"}}, {"set": NOT_PASSING}, "!="), _ACCEPT),
        # The fragment offset: the low 13 bits of IPv4's flags/offset word (RFC 791), IPv6's fragment header's
        # (RFC 8200 4.5); 0 in the first fragment, which carries the transport header and was judged.
        _rule("forward", ACCEPT_FRAGMENT, _match({"&": [_payload("ip", "frag-off"), 0x1FFF]}, 0, "!="), _ACCEPT),
        _rule("forward", ACCEPT_FRAGMENT + "-v6", _match({"exthdr": {"name": "frag", "field": "frag-off"}}, 0, "!="),
              _ACCEPT),
    ]
    if audit:
        batch += [_rule("forward", "vxnet:policy-log:audit", *_log(LOG_AUDIT, log_rate, log_burst, True)),
                  _rule("forward", AUDIT, {"counter": None}, _ACCEPT)]
    else:
        batch += [_rule("forward", "vxnet:policy-log:drop", *_log(LOG_DROP, log_rate, log_burst, True)),
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
    return _element_ops(set_elements(diff.add), set_elements(diff.remove))


def _element_ops(add: Dict[str, List], remove: Dict[str, List]) -> List[dict]:
    batch: List[dict] = []
    for name in SETS:
        batch += _elements(name, add.get(name, []))
    for name in SETS:
        gone = remove.get(name, [])
        batch += _elements(name, gone) + _elements(name, gone, "delete")
    return batch


def delete_batch() -> List[dict]:
    """The policy table gone, the UDP records' table, and the br_netfilter design's `inet` one if left; no error if
    one was not there (each added first, in the same transaction)."""
    return [op for family, name in ((FAMILY, TABLE), (FAMILY, UDP_TABLE), (LEGACY_FAMILY, TABLE))
            for op in ({"add": {"table": {"family": family, "name": name}}},
                       {"delete": {"table": {"family": family, "name": name}}})]


def list_command() -> List[dict]:
    """The policy table: its sets (with their elements, unless listed terse), rules and counters."""
    return [{"list": {"table": {"family": FAMILY, "name": TABLE}}}]


def list_chains_command() -> List[dict]:
    """Every chain of the namespace's bridge family, without rules: nftables fetches no set for it."""
    return [{"list": {"chains": {"family": FAMILY}}}]


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


def _declaration(body: dict) -> str:
    """A set as declared (batch) or listed: its name and key type."""
    kind = body.get("type")
    return f"{body['name']}: {' . '.join(kind) if isinstance(kind, list) else kind}"


class Structure(NamedTuple):
    """What a table is made of, apart from its elements: rule comments and set declarations, each sorted."""
    rules: Tuple[str, ...]
    sets: Tuple[str, ...]


def batch_structure(batch: List[dict]) -> Structure:
    rules = sorted(c["add"]["rule"]["comment"] for c in batch if "rule" in c.get("add", {}))
    sets = sorted(_declaration(c["add"]["set"]) for c in batch if "set" in c.get("add", {}))
    return Structure(tuple(rules), tuple(sets))


def _items(output: str) -> List[dict]:
    """Every item of a `list` answer: nft prints one JSON document per list command, one after the other."""
    decoder, text, at, out = json.JSONDecoder(), output or "", 0, []
    while True:
        while at < len(text) and text[at].isspace():
            at += 1
        if at >= len(text):
            return out
        document, at = decoder.raw_decode(text, at)
        out += document.get("nftables", [])


def listing_structure(output: str) -> Structure:
    items = _items(output)
    rules = sorted(i["rule"].get("comment", "") for i in items if "rule" in i)
    sets = sorted(_declaration(i["set"]) for i in items if "set" in i)
    return Structure(tuple(rules), tuple(sets))


def listed_elements(output: str) -> Dict[str, Dict[str, object]]:
    """A list answer -> {set name: {element text (shape_text): the element as listed}} for the sets the plugin
    writes."""
    out: Dict[str, Dict[str, object]] = {}
    for item in _items(output):
        found = item.get("set")
        if found is not None and found.get("name") in SETS:
            elems = found.get("elem", [])
            out[found["name"]] = {shape_text(found["name"], e): e
                                  for e in (elems if isinstance(elems, list) else [elems])}
    return out


def udp_chains_in_place(output: str) -> bool:
    """Whether a list_chains_command answer has the records' table with its chains as udp_batch makes them."""
    found = {(c.get("name"), c.get("hook"), c.get("prio")) for c in (i.get("chain") for i in _items(output))
             if c is not None and c.get("table") == UDP_TABLE}
    return found == {(name, "forward", prio) for name, prio in UDP_CHAINS.items()}


class PolicyFirewall:
    """The policy table of each network namespace, and the table of its UDP records.

    apply(ns, commands, what, terse=False): run nftables JSON commands as one transaction inside namespace ns
    (Links.nft); terse: list without set elements. Every method is idempotent.

      ensure_policy(ns, mode, audit, elements)   mode open: the same as remove_policy; else the policy table made
                                                 what the mode, audit flag and elements give: replaced whole if it
                                                 is missing or made differently, else changed by element adds and
                                                 deletes only; the records' table made if missing or made
                                                 differently, else left as it is (a restart keeps the records)
      update_policy(ns, diff)                    the diff's element adds/deletes, one transaction (KernelError if
                                                 the table is missing: the caller calls ensure_policy)
      remove_policy(ns)                          both tables gone (no error if absent)
      policy_drift(ns, mode, audit, elements)    None if the kernel holds what ensure_policy makes, else what differs
                                                 (the records' table by its chains: its records are the packet
                                                 path's, never read)
      counters(ns)                               {rule comment: (packets, bytes)} of the policy table ({} if none)
    """

    def __init__(self, apply: Callable[..., object], log_rate: int = LOG_RATE, log_burst: int = LOG_BURST):
        self._apply = apply
        self.log_rate = log_rate
        self.log_burst = log_burst

    def _batch(self, mode: str, audit: bool, elements) -> List[dict]:
        return replace_batch(mode, audit, elements, self.log_rate, self.log_burst)

    def _listing(self, ns: str, what: str, terse: bool = False) -> Optional[str]:
        """The policy table as listed (terse: without set elements); None if there is no table."""
        try:
            return str(self._apply(ns, list_command(), what, terse=terse) or "")
        except KernelError as exc:
            if not missing_table(exc):
                raise
            return None

    def _udp_in_place(self, ns: str) -> bool:
        return udp_chains_in_place(str(self._apply(ns, list_chains_command(), f"read the chains in {ns}") or ""))

    def ensure_policy(self, ns: str, mode: str, audit: bool, elements) -> None:
        if mode not in MODES:
            raise InvalidRequest(f"policy mode {mode!r}: one of {', '.join(MODES)}")
        if mode == "open":
            self.remove_policy(ns)
            return
        batch = self._batch(mode, audit, elements)  # checks everything before the kernel is read or written
        # The records' table first in the transaction: a policy table made with it finds its replies marked.
        changes = [] if self._udp_in_place(ns) else udp_batch()
        listing = self._listing(ns, f"read the policy table in {ns}")
        if listing is None or listing_structure(listing) != batch_structure(batch):
            self._apply(ns, changes + batch, f"policy tables ({mode}) in {ns}")
            return
        # Made as this mode makes it: only the elements can differ, and an element diff is O(change) where a
        # replacement writes every element again (and restarts the counters).
        have = listed_elements(listing)
        want = {name: {shape_text(name, e): e for e in elems} for name, elems in set_elements(elements).items()}
        add = {name: [e for text, e in want[name].items() if text not in have.get(name, {})] for name in SETS}
        remove = {name: [e for text, e in have.get(name, {}).items() if text not in want[name]] for name in SETS}
        changes += _element_ops(add, remove)
        if changes:
            self._apply(ns, changes, f"policy elements in {ns}")

    def update_policy(self, ns: str, diff) -> None:
        batch = update_batch(diff)
        if batch:
            self._apply(ns, batch, f"policy elements in {ns}")

    def remove_policy(self, ns: str) -> None:
        self._apply(ns, delete_batch(), f"removing the policy tables in {ns}")

    def policy_drift(self, ns: str, mode: str, audit: bool, elements) -> Optional[str]:
        """Reads only (a list changes nothing, and sends no notification)."""
        listing = self._listing(ns, f"read the policy table in {ns}")
        if mode == "open":
            if listing is not None:
                return "policy table present on an open network"
            return "UDP records table present on an open network" if self._udp_in_place(ns) else None
        batch = self._batch(mode, audit, elements)
        problems = [] if self._udp_in_place(ns) else ["UDP records table missing or made otherwise"]
        if listing is None:
            return "; ".join(problems + ["table missing"])
        structure, want = listing_structure(listing), batch_structure(batch)
        if structure.rules != want.rules:
            problems.append(f"rules {list(structure.rules)} instead of {list(want.rules)}")
        if structure.sets != want.sets:
            problems.append(f"sets {list(structure.sets)} instead of {list(want.sets)}")
        if structure == want:
            have: Shape = ((), {name: frozenset(elems) for name, elems in listed_elements(listing).items()})
            difference = shape_difference(have, ((), batch_shape(batch, shape_text)[1]))
            if difference:
                problems.append(difference)
        return "; ".join(problems) or None

    def counters(self, ns: str) -> Dict[str, Tuple[int, int]]:
        listing = self._listing(ns, f"read the policy counters in {ns}", terse=True)
        return libnftables.rule_counters(listing) if listing is not None else {}
