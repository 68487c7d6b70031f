"""`vxnet policy allow|ls|rm`: the allow rules of a network, in etcd (netdriver/policy_store.py), in force on
every host of the network.

    vxnet policy allow NETWORK --from SELECTOR --to SELECTOR [--port 5432/tcp ...] [--json]
    vxnet policy ls NETWORK [--json]
    vxnet policy rm NETWORK RULE_ID

A SELECTOR is service=NAME (a Swarm or Compose service), label=KEY=VALUE (a container label), container=NAME or
any. No --port: every protocol and port. NETWORK is a name (resolved by this host's Docker engine) or an ID
(in full, or its first 12 or more characters) that vxnet's etcd knows. The same allow given twice is one rule.
A rule on a network created in mode open is stored but has no effect (the mode is fixed at creation:
-o policy=exposed or -o policy=deny). Rules are the network's segment's: on standalone networks joined with
`-o overlay=NAME` (one network ID per host) a rule given on any host, through that host's network, is in force on
every host of the overlay, and `ls`/`rm` on any of them see the same rules.

--json: allow {"network", "segment", "mode", "created": bool, "rule": {"id", "segment", "from", "to", "ports"},
"warning": text or null}; ls {"network", "segment", "mode", "audit", "rules": [rule, ...]}; rm {"network",
"segment", "removed": rule}.
Exit status: 0 done, 2 refused (the message names the part) or etcd could not be reached.
"""

import argparse
import re
import sys
from typing import List, Optional, Tuple

from cli import context
from netdriver.policy import Rule, parse_port, parse_selector
from netdriver.policy_store import NetworkRef, PolicyStore, UnknownNetwork

# Docker accepts an ID's first 12 characters wherever it takes an ID (what `docker network ls` shows). IDs are
# 64 hex digits (local networks) or 25 of [0-9a-z] (Swarm's, wire/protocol.py).
SHORT_ID = 12
_ID_PREFIX = re.compile(r"[0-9a-z]{12,64}")


def register(subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser("policy", help="allow rules inside a network: allow, ls, rm",
                                   description=__doc__.split("\n\n")[0])
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    allow = actions.add_parser("allow", parents=[common], help="allow new connections from --from to --to")
    allow.add_argument("network", metavar="NETWORK")
    allow.add_argument("--from", dest="source", metavar="SELECTOR", required=True,
                       help="who may connect: service=NAME, label=KEY=VALUE, container=NAME or any")
    allow.add_argument("--to", dest="dest", metavar="SELECTOR", required=True, help="whom they may connect to")
    allow.add_argument("--port", dest="ports", metavar="PORT/PROTO", action="extend", nargs="+", default=[],
                       help="5432/tcp, 53/udp, 9/sctp; repeat for more (default: every protocol and port)")
    allow.set_defaults(func=run_allow)
    ls = actions.add_parser("ls", parents=[common], help="the network's rules")
    ls.add_argument("network", metavar="NETWORK")
    ls.set_defaults(func=run_ls)
    rm = actions.add_parser("rm", parents=[common], help="remove a rule")
    rm.add_argument("network", metavar="NETWORK")
    rm.add_argument("rule", metavar="RULE_ID")
    rm.set_defaults(func=run_rm)


def docker_networks() -> List[Tuple[str, str, str]]:
    """(ID, name, driver) of every network this host's engine knows (on a Swarm manager, Swarm's too).
    ConnectionError if no engine answers (DOCKER_HOST, else /var/run/docker.sock)."""
    try:
        import docker

        client = docker.from_env(timeout=5)
        try:
            return [(n["Id"], n["Name"], str(n.get("Driver", ""))) for n in client.api.networks()]
        finally:
            client.close()
    except Exception as exc:  # no engine, no permission, no SDK: the caller says what that means
        raise ConnectionError(str(exc)) from None


def resolve(store: PolicyStore, text: str) -> NetworkRef:
    """NETWORK -> the network vxnet knows. An ID vxnet's etcd has (in full or its first 12+ characters) first,
    then a name through the engine. UnknownNetwork naming what was given and why."""
    if not isinstance(text, str) or not text:
        raise UnknownNetwork("NETWORK: give a network name or ID")
    known = store.network_ids()
    if _ID_PREFIX.fullmatch(text):
        found = [i for i in known if i.startswith(text)]
        if len(found) > 1:
            raise UnknownNetwork(f"network {text!r}: the ID prefix matches {len(found)} networks "
                                 f"({', '.join(i[:SHORT_ID] for i in found)}); give more of it")
        if found:
            ref = store.network(found[0])
            if ref is not None:
                return ref
    try:
        engine = docker_networks()
    except ConnectionError as exc:
        raise UnknownNetwork(f"network {text!r}: no network of vxnet has that ID, and no Docker engine answered to "
                             f"resolve it as a name ({exc})") from None
    named = [(i, driver) for i, name, driver in engine if name == text]
    if not named:
        raise UnknownNetwork(f"network {text!r}: no such network (not a vxnet network ID in etcd, nor a network "
                             f"name this host's Docker engine knows)")
    if len(named) > 1:
        raise UnknownNetwork(f"network {text!r}: {len(named)} networks have that name "
                             f"({', '.join(i[:SHORT_ID] for i, _ in named)}); give its ID")
    network_id, driver = named[0]
    ref = store.network(network_id) if network_id in known else None
    if ref is None:
        if not driver.startswith("vxnet"):
            raise UnknownNetwork(f"network {text!r} ({network_id[:SHORT_ID]}) uses the driver {driver!r}, not vxnet")
        raise UnknownNetwork(f"network {text!r} ({network_id[:SHORT_ID]}) is not known to vxnet's etcd (created "
                             f"against another etcd, or deleted)")
    return ref


def _mode(ref: NetworkRef) -> Optional[str]:
    return ref.record.policy if ref.record is not None else None


def _warning(ref: NetworkRef) -> Optional[str]:
    mode = _mode(ref)
    if mode == "open":
        return (f"network {ref.id[:SHORT_ID]} is in policy mode open: this rule has no effect (the mode is fixed at "
                f"creation; rules apply on networks created with -o policy=exposed or -o policy=deny)")
    if mode is None:
        return (f"network {ref.id[:SHORT_ID]} has no record yet (a Swarm network no task has run on): rules apply "
                f"only if it was created with -o policy=exposed or -o policy=deny")
    return None


def _ports(rule: Rule) -> str:
    return ",".join(p.text() for p in rule.ports) or "all"


def _describe(rule: Rule) -> str:
    return f"{rule.id}: from {rule.source.text()} to {rule.dest.text()} ports {_ports(rule)}"


def run_allow(ctx: context.Context, args: argparse.Namespace) -> int:
    # Everything the user typed is checked before etcd is touched: a refused rule writes nothing.
    source = parse_selector(args.source, "--from")
    dest = parse_selector(args.dest, "--to")
    ports = [parse_port(p, "--port") for p in args.ports]
    store = PolicyStore(ctx.kv(), ctx.settings.key_prefix)
    ref = resolve(store, args.network)
    rule = Rule.make(ref.segment, source, dest, ports)
    created = store.put_rule(ref.id, rule)
    warning = _warning(ref)
    if warning:
        print(f"vxnet policy: warning: {warning}", file=sys.stderr)
    ctx.emit({"network": ref.id, "segment": ref.segment, "mode": _mode(ref), "created": created,
              "rule": rule.to_dict(), "warning": warning},
             lambda d: ("allowed " if created else "already allowed (nothing written) ") + _describe(rule))
    return context.OK


def _table(rules: List[Rule]) -> str:
    if not rules:
        return "no rules"
    rows = [["RULE", "FROM", "TO", "PORTS"]] + [[r.id, r.source.text(), r.dest.text(), _ports(r)] for r in rules]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def run_ls(ctx: context.Context, args: argparse.Namespace) -> int:
    store = PolicyStore(ctx.kv(), ctx.settings.key_prefix)
    ref = resolve(store, args.network)
    rules = sorted(store.list_rules(ref.segment), key=lambda r: (r.source, r.dest, r.ports, r.id))
    audit = ref.record.policy_audit if ref.record is not None else None
    mode = _mode(ref)
    header = f"network {ref.id[:SHORT_ID]}: policy {mode or 'unknown (no record yet)'}" + (" (audit)" if audit else "")
    ctx.emit({"network": ref.id, "segment": ref.segment, "mode": mode, "audit": audit,
              "rules": [r.to_dict() for r in rules]},
             lambda d: header + "\n" + _table(rules))
    return context.OK


def run_rm(ctx: context.Context, args: argparse.Namespace) -> int:
    store = PolicyStore(ctx.kv(), ctx.settings.key_prefix)
    ref = resolve(store, args.network)
    removed = store.delete_rule(ref.segment, args.rule)
    ctx.emit({"network": ref.id, "segment": ref.segment,
              "removed": removed.to_dict() if removed else {"id": args.rule}},
             lambda d: f"removed {_describe(removed) if removed else args.rule}")
    return context.OK
