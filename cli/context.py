"""What every subcommand shares: where etcd is (flags over the environment), output as tables or JSON, and the
exit status (0 healthy, 1 a problem found, 2 could not run).

A subcommand module exposes `register(subparsers, common)`: it adds its parser (with `parents=[common]`, so
the shared flags work after the subcommand's name too) and sets `func=run`, where `run(ctx, args) -> int`.
"""

import argparse
import dataclasses
import json
import sys
from typing import Any, Callable, Optional, TextIO

from plugin import config
from store.kvstore import EtcdKV
from wire.errors import ConfigError

OK = 0
PROBLEM = 1
CANNOT_RUN = 2

# An operator's command must answer promptly even when etcd does not (doctor: within 10 s with etcd down).
ETCD_TIMEOUT = 2.0


@dataclasses.dataclass
class Context:
    settings: config.ClientSettings
    as_json: bool = False
    out: TextIO = sys.stdout
    _kv: Optional[EtcdKV] = None

    def kv(self) -> EtcdKV:
        if self._kv is None:
            s = self.settings
            self._kv = EtcdKV(s.etcd_endpoints, ca=s.etcd_ca, cert=s.etcd_cert, key=s.etcd_key,
                              timeout=ETCD_TIMEOUT)
        return self._kv

    def emit(self, data: Any, render: Callable[[Any], str]) -> None:
        """data as JSON (--json), else render(data) for people."""
        if self.as_json:
            json.dump(data, self.out, indent=2, sort_keys=True, default=str)
            self.out.write("\n")
        else:
            text = render(data)
            self.out.write(text if text.endswith("\n") else text + "\n")


def common_flags() -> argparse.ArgumentParser:
    """The flags every subcommand takes (defaults from the plugin's environment variables)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--etcd", metavar="URLS",
                        help="etcd endpoints, comma-separated (default: ETCD_ENDPOINTS, else the embedded etcd here)")
    common.add_argument("--ca", metavar="FILE", help="etcd TLS CA (default: ETCD_CA_FILE)")
    common.add_argument("--cert", metavar="FILE", help="etcd TLS client certificate (default: ETCD_CERT_FILE)")
    common.add_argument("--key", metavar="FILE", help="etcd TLS client key (default: ETCD_KEY_FILE)")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    return common


def build(args: argparse.Namespace, environ, out: TextIO = sys.stdout) -> Context:
    """The Context for parsed args; ConfigError naming a bad flag or variable."""
    base = config.load_client(environ)
    overrides = {}
    if getattr(args, "etcd", None):
        overrides["etcd_endpoints"] = config.parse_endpoints("--etcd", args.etcd)
    for flag, field in (("ca", "etcd_ca"), ("cert", "etcd_cert"), ("key", "etcd_key")):
        if getattr(args, flag, None):
            overrides[field] = getattr(args, flag)
    settings = dataclasses.replace(base, **overrides)
    if bool(settings.etcd_cert) != bool(settings.etcd_key):
        raise ConfigError("--cert/--key (ETCD_CERT_FILE/ETCD_KEY_FILE): give both or neither")
    return Context(settings=settings, as_json=bool(getattr(args, "json", False)), out=out)
