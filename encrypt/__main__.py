"""On-demand key operations and the kernel check, for operators:

    python3 -m encrypt show   --etcd http://10.0.0.1:2379 --secret-file /etc/vxnet/tls/encryption.key
    python3 -m encrypt rotate --etcd ... --secret-file ...   # the staged key becomes primary on every host
    python3 -m encrypt prune  --etcd ... --secret-file ...   # drop the previous primary now
    python3 -m encrypt check-kernel                          # can this kernel do the ESP encrypted networks need?

Every host's plugin watches the ring and applies it within moments (encrypt/watch.py). Tags, the
primary and the rotation time are shown; key material never is.
"""

import argparse
import sys
import time
from typing import Callable, Optional, Sequence

from encrypt.keystore import MIN_ROTATION_GAP, KeyStore
from encrypt.ring import KeyRing
from encrypt.secret import read_secret_file
from kernel.probes import EspProbe
from store import schema
from store.kv import KV
from wire.errors import VxnetError


def _describe(ring: KeyRing) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(ring.rotated_at))
    roles = []
    for tag in ring.tags:
        role = "primary" if tag == ring.primary else ("staged" if tag > ring.primary else "previous")
        roles.append(f"{tag} ({role})")
    return f"keys {', '.join(roles)}; last rotation {when}"


def main(argv: Optional[Sequence[str]] = None, kv_factory: Optional[Callable[..., KV]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m encrypt", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("show", "rotate", "prune", "check-kernel"))
    parser.add_argument("--etcd", help="etcd endpoints, comma-separated (as ETCD_ENDPOINTS)")
    parser.add_argument("--secret-file", help="the cluster secret (as VXNET_ENCRYPTION_SECRET_FILE)")
    parser.add_argument("--prefix", default=schema.PREFIX, help="the key prefix in etcd (default %(default)s)")
    for tls in ("--ca", "--cert", "--key"):
        parser.add_argument(tls, help="etcd TLS file (as ETCD_CA_FILE, ETCD_CERT_FILE, ETCD_KEY_FILE)")
    parser.add_argument("--min-age", type=float, default=MIN_ROTATION_GAP,
                        help="refuse to rotate a ring younger than this many seconds (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        if args.command == "check-kernel":
            reason = EspProbe().unavailable_reason()
            print(reason or "this kernel can do ESP with rfc4106(gcm(aes)): encrypted networks will work")
            return 0 if reason is None else 1
        if not args.etcd or not args.secret_file:
            parser.error(f"{args.command} needs --etcd and --secret-file")
        if kv_factory is None:
            from store.kvstore import EtcdKV
            kv_factory = EtcdKV
        kv = kv_factory([e.strip() for e in args.etcd.split(",") if e.strip()], ca=args.ca, cert=args.cert,
                        key=args.key)
        store = KeyStore(kv, read_secret_file(args.secret_file), args.prefix)
        if args.command == "show":
            ring = store.load()
            print(_describe(ring) if ring else f"no key ring at {store.key} yet (the first plugin creates it)")
        elif args.command == "rotate":
            ring, rotated = store.rotate(min_age=args.min_age)
            if not rotated:
                print(f"not rotated: the ring was rotated less than {args.min_age:g} s ago "
                      f"({_describe(ring)})", file=sys.stderr)
                return 1
            print(f"rotated: {_describe(ring)}")
        else:
            print(f"pruned: {_describe(store.prune())}")
        return 0
    except VxnetError as exc:
        print(f"vxnet: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
