"""`vxnet gc [--dry-run]`: what hosts gone for good left in etcd (netdriver/gc.py says what and how): each stale
host (no host record, gone more than VXNET_STALE_HOST_SECONDS) with its endpoint records, memberships, address
and pool holds, each released in one transaction of its own unless --dry-run. Hosts gone but not stale yet are
listed too (kept). Without --dry-run a host seen gone for the first time is marked gone from now.

Exit status: 0 nothing stale, or all of it released; 1 something stale could not be released (or, with
--dry-run, something stale is there to release); 2 etcd could not be read.
--json: {"dry_run", "at", "failed", "hosts": [{"host", "name", "vtep", "stale", "since", "gone_seconds",
"holds": [{"kind", ..., "result"}]}]}.
"""

import argparse

from cli import context
from netdriver.gc import describe
from plugin import gc


def register(subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser("gc", parents=[common], help="state left by hosts gone for good",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="list what would be released; change nothing")
    parser.set_defaults(func=run)


def _render(data: dict) -> str:
    if not data["hosts"]:
        return "no host is gone: nothing to collect"
    lines = []
    for host in data["hosts"]:
        since = (f"gone since {host['since']} ({host['gone_seconds']} s)" if host["since"]
                 else "gone (not recorded yet: the next collection records it)")
        state = "stale" if host["stale"] else "not stale yet, kept"
        lines.append(f"host {host['host']} ({host['name'] or 'name unknown'}, vtep {host['vtep'] or '?'}): "
                     f"{since}, {state}")
        for hold in host["holds"]:
            verdict = hold.get("result") or ("would be released" if data["dry_run"] and host["stale"] else "")
            lines.append(f"  {describe(hold)}" + (f": {verdict}" if verdict else ""))
    if data["failed"]:
        lines.append(f"{data['failed']} hold(s) could not be released; run again")
    return "\n".join(lines)


def run(ctx: context.Context, args: argparse.Namespace) -> int:
    report = gc.collector(ctx.kv(), ctx.settings.key_prefix, ctx.settings.stale_host_seconds).collect(
        dry_run=args.dry_run)
    ctx.emit(report.as_dict(), _render)
    if report.failed or (args.dry_run and report.stale):
        return context.PROBLEM
    return context.OK
