"""`vxnet keys status|rotate|prune`: the IPsec key ring in etcd (encrypt/ring.py, sealed with the cluster
secret by encrypt/keystore.py). Tags, roles and the ring's age are shown; key material never is.

    status   the tags, which is primary, staged (the next primary) and previous, when it last rotated
    rotate   the staged key becomes primary on every host (each plugin applies the ring within moments)
    prune    drop the previous primary now (after every host has moved to the new one)

The cluster secret comes from --secret-file, else VXNET_ENCRYPTION_SECRET_FILE.
--json: {"ring": bool, "tags": [...], "primary", "staged", "previous" (tag or null), "rotated_at" (ISO 8601),
"age_seconds", and for rotate "rotated": bool}.
"""

import argparse
import datetime
import time
from typing import Optional

from cli import context
from encrypt.keystore import MIN_ROTATION_GAP, KeyStore
from encrypt.ring import KeyRing
from encrypt.secret import read_secret_file
from wire.errors import ConfigError


def register(subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser("keys", parents=[common], help="the IPsec key ring: status, rotate, prune",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("status", "rotate", "prune"))
    parser.add_argument("--secret-file", metavar="FILE",
                        help="the cluster secret (default: VXNET_ENCRYPTION_SECRET_FILE)")
    parser.add_argument("--min-age", type=float, default=MIN_ROTATION_GAP, metavar="SECONDS",
                        help="rotate: refuse a ring rotated less than this long ago (default %(default)s)")
    parser.set_defaults(func=run)


def describe(ring: Optional[KeyRing], now: float) -> dict:
    """The ring without its material: tags and roles, when it rotated."""
    if ring is None:
        return {"ring": False}
    newer = [t for t in ring.tags if t > ring.primary]
    older = [t for t in ring.tags if t < ring.primary]
    return {"ring": True, "tags": list(ring.tags), "primary": ring.primary,
            "staged": newer[0] if newer else None, "previous": older[-1] if older else None,
            "rotated_at": datetime.datetime.fromtimestamp(ring.rotated_at, datetime.timezone.utc)
            .isoformat(timespec="seconds"), "age_seconds": round(now - ring.rotated_at)}


def _render(data: dict) -> str:
    if not data["ring"]:
        return "no key ring in etcd yet (the first plugin with a cluster secret creates it)"
    roles = []
    for tag in data["tags"]:
        role = "primary" if tag == data["primary"] else ("staged" if tag > data["primary"] else "previous")
        roles.append(f"{tag} ({role})")
    line = f"keys {', '.join(roles)}; last rotation {data['rotated_at']} ({_age(data['age_seconds'])} ago)"
    if "rotated" in data:
        line = ("rotated: " if data["rotated"] else "not rotated (too recent, see --min-age): ") + line
    elif "pruned" in data:
        line = "pruned: " + line
    return line


def _age(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds} s"


def run(ctx: context.Context, args: argparse.Namespace) -> int:
    path = args.secret_file or ctx.settings.encryption_secret_file
    if not path:
        raise ConfigError("--secret-file: no cluster secret given (nor VXNET_ENCRYPTION_SECRET_FILE)")
    store = KeyStore(ctx.kv(), read_secret_file(path, "--secret-file" if args.secret_file else
                                                "VXNET_ENCRYPTION_SECRET_FILE"), ctx.settings.key_prefix)
    status = context.OK
    if args.action == "status":
        data = describe(store.load(), time.time())
    elif args.action == "rotate":
        ring, rotated = store.rotate(min_age=args.min_age)
        data = {**describe(ring, time.time()), "rotated": rotated}
        status = context.OK if rotated else context.PROBLEM
    else:
        data = {**describe(store.prune(), time.time()), "pruned": True}
    ctx.emit(data, _render)
    return status
