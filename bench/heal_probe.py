"""Run inside a simulated host by bench/healing.py (its namespace files are visible only in the host's mount
namespace): delete one FDB entry of a network namespace's VXLAN device N times, each time polling the kernel
every POLL_SECONDS until the plugin's reconciler has put it back, and print the times as JSON.

    python3 -m bench.heal_probe <netns> <mac> <vtep> <count>
"""

import json
import sys
import time

from kernel import names
from kernel.links import Links

POLL_SECONDS = 0.001  # one FDB dump of a device with a handful of entries takes about 0.2 ms
DEADLINE_SECONDS = 10.0
SETTLE_SECONDS = 0.3  # between deletions: the pass that follows a repair (which finds nothing) is over


def main(argv) -> int:
    ns, mac, vtep, count = argv[0], argv[1], argv[2], int(argv[3])
    links = Links("/run/netns")
    times, missed = [], 0
    try:
        if links.fdb(ns, names.VXLAN).get(mac) != vtep:
            print(json.dumps({"error": f"{mac} -> {vtep} is not in {ns}'s FDB to begin with"}))
            return 1
        for _ in range(count):
            links.del_fdb(ns, names.VXLAN, mac, vtep)
            gone = time.monotonic()
            while links.fdb(ns, names.VXLAN).get(mac) != vtep:
                if time.monotonic() - gone > DEADLINE_SECONDS:
                    missed += 1
                    break
                time.sleep(POLL_SECONDS)
            else:
                times.append(time.monotonic() - gone)
            time.sleep(SETTLE_SECONDS)
    finally:
        links.close()
    print(json.dumps({"seconds": times, "missed": missed, "poll_s": POLL_SECONDS}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
