"""The kernel check, for operators: can this kernel do the ESP that encrypted networks need?

    python3 -m encrypt check-kernel

The key ring's status, rotation and pruning are `vxnet keys status|rotate|prune` (cli/keys.py).
"""

import argparse
import sys
from typing import Optional, Sequence

from kernel.probes import EspProbe


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m encrypt", description=__doc__.split("\n\n")[0],
                                     epilog="The key ring: vxnet keys status|rotate|prune.")
    parser.add_argument("command", choices=("check-kernel",))
    parser.parse_args(argv)
    reason = EspProbe().unavailable_reason()
    print(reason or "this kernel can do ESP with rfc4106(gcm(aes)): encrypted networks will work")
    return 0 if reason is None else 1


if __name__ == "__main__":
    sys.exit(main())
