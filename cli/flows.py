"""`vxnet flows`: the verdicts of a network's policy on this host, from the plugin's verdict log (plugin/flows.py,
served on VXNET_METRICS_ADDR at /v1/flows).

    vxnet flows NETWORK [--verdict dropped|allowed|all] [--follow] [--json] [--host ADDR:PORT]

The view is one host's: a policy decides at the destination, so `vxnet flows` on host A shows the connections
*to* A's containers (from any host); --host asks another host's plugin (its VXNET_METRICS_ADDR must be reachable
from here: it is loopback by default). --verdict dropped (the default) shows what was dropped and what audit mode
would have dropped, for any reason: no-rule (the policy), anti-spoofing (a container sent with another's MAC or
address: the source named is the port's container, the address the one it claimed), isolation (the host refused
to route to or from the network); allowed what a rule or an exposed port let in; all both. The log is
rate-limited (20 records a second per verdict or rule): the counters under the table are exact and say how many
were not logged.

NETWORK is an ID (in full, or its first 12 or more characters) of a network with a namespace on that host, or
a name this host's Docker engine knows. The plugin is asked, not etcd: this works while etcd is down.

--json: the plugin's answer (plugin/flows.py's wire); with --follow, one answer per line (JSON lines), each with
the records that arrived since the previous one. --follow polls every second until Ctrl-C.
Exit status: 0 done, 2 nothing answers at the address, or the network has no log there.
"""

import argparse
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable, List, Optional, Tuple

from cli import context
from cli.policy import _ID_PREFIX, SHORT_ID, docker_networks
from plugin import config
from plugin.flows import PATH
from wire.errors import ConfigError, InvalidRequest

POLL_SECONDS = 1.0
HTTP_TIMEOUT = 5.0


class NoLog(InvalidRequest):
    """The network has no verdict log on the host asked."""


def register(subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser("flows", parents=[common], help="the verdicts of a network's policy on this host",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("network", metavar="NETWORK")
    parser.add_argument("--verdict", choices=("dropped", "allowed", "all"), default="dropped",
                        help="dropped (and audit: would have been dropped), allowed, or all (default: dropped)")
    parser.add_argument("--follow", action="store_true", help="keep printing new verdicts until Ctrl-C")
    parser.add_argument("--host", metavar="ADDR:PORT",
                        help="another host's plugin (its VXNET_METRICS_ADDR; default: this host's)")
    parser.set_defaults(func=run)


def address(ctx: context.Context, args: argparse.Namespace) -> Tuple[Tuple[str, int], str]:
    """(host, port) to ask and the setting it came from; ConfigError naming it."""
    if args.host:
        return config.parse_listen_address("--host", args.host.strip()), "--host"
    if ctx.settings.metrics_addr is None:
        raise ConfigError("VXNET_METRICS_ADDR is empty: the plugin serves neither metrics nor the verdict log; set "
                          "it where the plugin runs, or give --host ADDR:PORT")
    host, port = ctx.settings.metrics_addr
    # A plugin listening on every address answers on loopback.
    return ({"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host), port), "VXNET_METRICS_ADDR"


def _url(where: Tuple[str, int], params: dict) -> str:
    host, port = where
    query = urllib.parse.urlencode(params)
    return f"http://{f'[{host}]' if ':' in host else host}:{port}{PATH}" + (f"?{query}" if query else "")


def get_json(where: Tuple[str, int], setting: str, params: dict) -> Tuple[int, dict]:
    """(HTTP status, JSON body) of GET PATH?params; ConfigError naming the setting when nothing answers."""
    url = _url(where, params)
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as reply:
            return reply.status, json.load(reply)
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.load(exc)
        except ValueError:
            return exc.code, {"error": f"HTTP {exc.code} {exc.reason}"}
    except (OSError, ValueError) as exc:
        why = getattr(exc, "reason", exc)
        raise ConfigError(f"{setting}: nothing answers at {url} ({why}): is the plugin running on that host, with "
                          f"{'that' if setting == '--host' else 'this'} address as its VXNET_METRICS_ADDR?") from None


# Tests replace this (the WSGI application called in-process, or a clock that ends --follow).
fetch: Callable[[Tuple[str, int], str, dict], Tuple[int, dict]] = get_json
sleep: Callable[[float], None] = time.sleep


def resolve(where: Tuple[str, int], setting: str, text: str) -> str:
    """NETWORK -> the full ID of a network with a log on that host: an ID prefix (12+) among the plugin's, else a
    name through this host's engine. NoLog naming what was given and why."""
    status, answer = fetch(where, setting, {})
    if status != 200:
        raise NoLog(f"{_url(where, {})}: {answer.get('error', status)}")
    logged = [n["network"] for n in answer.get("networks", [])]
    if _ID_PREFIX.fullmatch(text):
        found = [i for i in logged if i.startswith(text)]
        if len(found) > 1:
            raise NoLog(f"network {text!r}: the ID prefix matches {len(found)} networks "
                        f"({', '.join(i[:SHORT_ID] for i in found)}); give more of it")
        if found:
            return found[0]
    try:
        named = [i for i, name, _ in docker_networks() if name == text]
    except ConnectionError as exc:
        named, why = [], f"no Docker engine answered to resolve it as a name ({exc})"
    else:
        why = "nor a network name this host's Docker engine knows"
    if len(named) > 1:
        raise NoLog(f"network {text!r}: {len(named)} networks have that name "
                    f"({', '.join(i[:SHORT_ID] for i in named)}); give its ID")
    if named and named[0] in logged:
        return named[0]
    if named:
        raise NoLog(f"network {text!r} ({named[0][:SHORT_ID]}) has no namespace on that host (no container of it "
                    f"there, or not a vxnet network); verdicts are taken at the destination's host")
    raise NoLog(f"network {text!r}: not the ID of a network with a namespace on that host ({len(logged)} have "
                f"one), {why}")


def _who(end: dict) -> str:
    name = end.get("container") or ""
    if end.get("service"):
        name = f"{name} (service {end['service']})" if name else f"service {end['service']}"
    return f"{end.get('ip', '')} {name}".strip()


def _port(flow: dict) -> str:
    if flow.get("dport"):
        return str(flow["dport"])
    return f"type {flow['icmp_type']}" if flow.get("icmp_type") is not None else "-"


def _reason(flow: dict) -> str:
    """The reason, with the anti-spoofing or isolation rule and where the frame came in (port, MAC)."""
    text = f"{flow['reason']}:{flow['rule']}" if flow.get("rule") else flow["reason"]
    where = " ".join(x for x in (flow.get("port") or "", flow.get("mac") or "") if x)
    return f"{text} ({where})" if where and flow["reason"] == "anti-spoofing" else text


def _rows(flows: List[dict]) -> List[List[str]]:
    return [[time.strftime("%H:%M:%S", time.localtime(f["time"])) + f".{int(f['time'] * 1000) % 1000:03d}",
             f["verdict"], _who(f["src"]), _who(f["dst"]), f["proto"], _port(f), _reason(f)] for f in flows]


def _held(answer: dict) -> int:
    """Everything counted and not logged, policy and guards."""
    return sum(answer.get("suppressed", {}).values()) + sum(g.get("suppressed", 0)
                                                            for g in (answer.get("guards") or {}).values())


HEADER = ["TIME", "VERDICT", "SOURCE", "DESTINATION", "PROTO", "PORT", "REASON"]


def table(rows: List[List[str]], header: bool = True) -> str:
    rows = ([HEADER] if header else []) + rows
    if not rows:
        return ""
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def summary(answer: dict) -> str:
    lines = []
    counters = answer.get("counters")
    if counters is None:
        lines.append("counters: could not be read (the table is being made again?)")
    else:
        lines.append("counted (exact, since the policy table was made): " +
                     ", ".join(f"{k} {counters[k]}" for k in ("dropped", "audit", "allowed")))
    guards = answer.get("guards") or {}
    if guards:
        lines.append("dropped by the guards (exact): " + ", ".join(
            f"{reason} {g['counted'] if g.get('counted') is not None else 'unknown'}" +
            (" (the host's, every network's)" if reason == "isolation" else "")
            for reason, g in sorted(guards.items())))
    if answer.get("rate_limited"):
        held = answer["suppressed"]
        lines.append("RATE-LIMITED: counted but not logged: " + ", ".join(
            [f"{k} {held[k]}" for k in ("dropped", "audit", "allowed") if held.get(k)] +
            [f"{reason} {g['suppressed']}" for reason, g in sorted(guards.items()) if g.get("suppressed")]))
    if answer.get("lost"):
        lines.append(f"lost: {answer['lost']} record(s) the log's socket could not take")
    if answer.get("evicted"):
        lines.append(f"the ring holds the newest records only: {answer['evicted']} older one(s) evicted")
    running = answer.get("log", {})
    if not running.get("running"):
        lines.append(f"the log is not being read: {running.get('error') or 'starting'}")
    lines.append(f"note: {answer.get('not_logged', '')}")
    return "\n".join(lines)


def _ask(where, setting, network_id: str, verdict: str, since: int) -> dict:
    status, answer = fetch(where, setting, {"network": network_id, "verdict": verdict, "since": since})
    if status != 200:
        raise NoLog(f"network {network_id[:SHORT_ID]}: {answer.get('error', status)}")
    return answer


def run(ctx: context.Context, args: argparse.Namespace) -> int:
    where, setting = address(ctx, args)
    network_id = resolve(where, setting, args.network)
    answer = _ask(where, setting, network_id, args.verdict, 0)
    if not args.follow:
        ctx.emit(answer, lambda a: (f"network {network_id[:SHORT_ID]} on {_url(where, {})} ({args.verdict}):\n" +
                                    (table(_rows(a["records"])) if a["records"] else "no records") + "\n" +
                                    summary(a)))
        return context.OK
    out = ctx.out
    instance: Optional[str] = answer["instance"]
    if ctx.as_json:
        out.write(json.dumps(answer, sort_keys=True) + "\n")
    else:
        out.write(table(_rows(answer["records"])) + "\n")
    out.flush()
    held = _held(answer)
    since = answer["next"]
    try:
        while True:
            sleep(POLL_SECONDS)
            answer = _ask(where, setting, network_id, args.verdict, since)
            if answer["instance"] != instance:  # the plugin restarted: its numbering starts again
                instance, held = answer["instance"], 0
                answer = _ask(where, setting, network_id, args.verdict, 0)
                if not ctx.as_json:
                    out.write("-- the plugin restarted: its log starts again --\n")
            since = answer["next"]
            if ctx.as_json:
                out.write(json.dumps(answer, sort_keys=True) + "\n")
            else:
                if answer["records"]:
                    out.write(table(_rows(answer["records"]), header=False) + "\n")
                now = _held(answer)
                if now > held:  # said where it happens, between the records it cut
                    out.write(f"-- RATE-LIMITED: {now - held} more verdict(s) counted but not logged --\n")
                held = max(held, now)
            out.flush()
    except KeyboardInterrupt:
        if not ctx.as_json:
            out.write(summary(answer) + "\n")
        return context.OK
