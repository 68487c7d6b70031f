"""`vxnet`: the operator's command. Talks to etcd (the desired state of every host) and, as root, reads this
host's kernel directly; never goes through the plugin, so it works while the plugin is down (except `vxnet
flows`, whose log only the running plugin holds).

    vxnet status [--json]          hosts, networks, endpoints; this host's kernel against etcd
    vxnet doctor [--json]          one line per check, PASS/WARN/FAIL and what to do
    vxnet gc [--dry-run] [--json]  state left by hosts gone for good
    vxnet keys status|rotate|prune the IPsec key ring
    vxnet policy allow|ls|rm       allow rules inside a network
    vxnet flows NETWORK            the verdicts of its policy on this host (asks the plugin: VXNET_METRICS_ADDR)
    vxnet settings [--json]        the vxnet plugins on this engine, their settings checked as the plugin does
    vxnet version [--json]         this command's version and the plugin's (asked on its socket)

Exit status: 0 healthy, 1 a problem found, 2 could not run.
"""

import argparse
import importlib
import os
import sys
from typing import Mapping, Optional, Sequence, TextIO

from cli import context
from wire.errors import ConfigError, VxnetError

# Each is a module of this package with register(subparsers, common) (cli/context.py).
COMMANDS: Sequence[str] = ("status", "doctor", "gc", "keys", "policy", "flows", "settings", "version")


def parser() -> argparse.ArgumentParser:
    common = context.common_flags()
    top = argparse.ArgumentParser(prog="vxnet", description=__doc__.split("\n\n")[0],
                                  formatter_class=argparse.RawDescriptionHelpFormatter,
                                  epilog="Exit status: 0 healthy, 1 a problem found, 2 could not run.")
    sub = top.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"cli.{name}").register(sub, common)
    return top


def main(argv: Optional[Sequence[str]] = None, environ: Optional[Mapping[str, str]] = None,
         out: TextIO = sys.stdout) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    try:
        ctx = context.build(args, os.environ if environ is None else environ, out)
        return args.func(ctx, args)
    except ConfigError as exc:
        print(f"vxnet: {exc}", file=sys.stderr)
        return context.CANNOT_RUN
    except VxnetError as exc:
        print(f"vxnet {args.command}: {exc}", file=sys.stderr)
        return context.CANNOT_RUN
