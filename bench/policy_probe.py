"""Run inside a simulated host by bench/policy.py (etcd is reachable only from the hosts' underlay, and a host's
namespace files are mounted only in its own mount namespace). Four commands, each printing one JSON line:

    python3 -m bench.policy_probe identities NETWORK_ID HOST     stdin: [[endpoint id, identity], ...]
        publish each synthetic endpoint's identity through NetworkDriver.publish_identity, as
        plugin/endpoint_identity.py does for a container -> {"written": N}
    python3 -m bench.policy_probe rules NETWORK_ID               stdin: [[from, to, [port, ...]], ...]
        write each rule through the policy store (what `vxnet policy allow` does) -> {"ids": [...]}
    python3 -m bench.policy_probe changes NETWORK_ID COUNT SPEC   SPEC: JSON, see _changes
        COUNT rule changes (allow, rm, allow, rm, ...), each timed from the policy store's write to its element
        present (or gone) in the `allow_all4` set of every host's namespace, polled every POLL_SECONDS
    python3 -m bench.policy_probe watch NETNS_DIR NETNS           (runs until stopped)
        poll one namespace's `allow_all4` set; print {"t": wall clock, "op": "add"|"del", "elem": [s, d]} per
        change (the identity window's other end)

A namespace of another host is reached through /proc/<a process of that host>/root/run/netns/<name>: the magic
link resolves the path in that process's mount namespace, and what it opens is the namespace file itself.
"""

import json
import os
import sys
import time
from typing import Dict, List, Optional, Set, Tuple

from kernel import names
from kernel.links import Links
from netdriver import policy_nft
from netdriver.driver import NetworkDriver
from netdriver.policy import Rule, parse_port, parse_selector
from netdriver.policy_store import PolicyStore
from netdriver.store import NetworkStore, segment_of
from store import schema
from store.kvstore import EtcdKV

POLL_SECONDS = 0.001  # listing a set of a handful of elements through libnftables takes well under 1 ms
DEADLINE_SECONDS = 10.0
SET = "allow_all4"


def _kv() -> EtcdKV:
    return EtcdKV(os.environ["ETCD_ENDPOINTS"].split(","))


def allow_all(links: Links, ns: str) -> Optional[Set[Tuple[str, str]]]:
    """The (saddr, daddr) elements of the namespace's allow_all4 set; None while the table or set is not there."""
    try:
        out = links.nft(ns, [{"list": {"set": {"family": policy_nft.FAMILY, "table": names.POLICY_TABLE,
                                               "name": SET}}}], f"list {SET}")
    except Exception:
        return None
    for item in json.loads(out).get("nftables", []):
        if "set" in item:
            return {tuple(e["concat"]) for e in item["set"].get("elem", []) if isinstance(e, dict)}
    return None


def _identities(network_id: str, host: str, items: List[list]) -> dict:
    kv = _kv()
    store = NetworkStore(kv)
    net = store.get_network(network_id)
    keys = schema.Schema()
    lease: Dict[str, int] = {}
    # The record's lease is the host's (the plugin's lease_id would give the same one).
    driver = NetworkDriver(store, None, host, "local", None, lease_id=lambda: lease["id"])
    written = 0
    for endpoint_id, identity in items:
        lease["id"] = kv.get(keys.peer(segment_of(net.id, net.overlay), endpoint_id)).lease
        written += driver.publish_identity(network_id, endpoint_id, identity).outcome == "written"
    return {"written": written}


def _rules(network_id: str, items: List[list]) -> dict:
    store = PolicyStore(_kv())
    ref = store.network(network_id)
    ids = []
    for source, dest, ports in items:
        rule = Rule.make(ref.segment, parse_selector(source, "from"), parse_selector(dest, "to"),
                         [parse_port(p) for p in ports])
        store.put_rule(network_id, rule)
        ids.append(rule.id)
    return {"ids": ids}


def _changes(network_id: str, count: int, spec: dict) -> dict:
    """spec: {"source": selector, "dests": [selector, ...], "watch": [[netns dir, netns, saddr, daddr], ...]};
    change i allows (even i) or removes (odd i) the rule source -> dests[i // 2]; watch[j] is where the rule's
    element for dests[i // 2] shows on host j: spec["watch"][i // 2] is the list of (dir, ns, saddr, daddr)."""
    store = PolicyStore(_kv())
    ref = store.network(network_id)
    links = {d: Links(d) for d in {w[0] for pair in spec["watch"] for w in pair}}
    # list_ms: the mean duration of one listing during each change (is the probe itself what is slow?)
    out = {"write_s": [], "in_force_s": [], "per_host_s": [], "list_ms": [], "missed": 0, "poll_s": POLL_SECONDS}
    try:
        for i in range(count):
            dest = spec["dests"][(i // 2) % len(spec["dests"])]
            watch = spec["watch"][(i // 2) % len(spec["dests"])]
            rule = Rule.make(ref.segment, parse_selector(spec["source"]), parse_selector(dest))
            want = i % 2 == 0
            began = time.monotonic()
            if want:
                store.put_rule(network_id, rule)
            else:
                store.delete_rule(ref.segment, rule.id)
            written = time.monotonic()
            seen: Dict[int, float] = {}
            listings, listing_s = 0, 0.0
            while len(seen) < len(watch) and time.monotonic() - written < DEADLINE_SECONDS:
                for j, (folder, ns, saddr, daddr) in enumerate(watch):
                    if j not in seen:
                        t = time.monotonic()
                        elems = allow_all(links[folder], ns)  # None (no table): neither present nor gone
                        listings, listing_s = listings + 1, listing_s + time.monotonic() - t
                        if elems is not None and ((saddr, daddr) in elems) == want:
                            seen[j] = time.monotonic()
                time.sleep(POLL_SECONDS)
            if len(seen) < len(watch):
                out["missed"] += 1
                continue
            out["list_ms"].append(round(listing_s / max(1, listings) * 1000, 2))
            out["write_s"].append(written - began)
            out["in_force_s"].append(max(seen.values()) - written)
            out["per_host_s"].append([seen[j] - written for j in range(len(watch))])
    finally:
        for lk in links.values():
            lk.close()
    return out


def _watch(folder: str, ns: str) -> None:
    links = Links(folder)
    known: Set[Tuple[str, str]] = set()
    print(json.dumps({"t": time.time(), "op": "start"}), flush=True)
    while True:
        elems = allow_all(links, ns)
        if elems is not None:
            now = time.time()
            for e in sorted(elems - known):
                print(json.dumps({"t": now, "op": "add", "elem": list(e)}), flush=True)
            for e in sorted(known - elems):
                print(json.dumps({"t": now, "op": "del", "elem": list(e)}), flush=True)
            known = elems
        time.sleep(POLL_SECONDS)


def main(argv) -> int:
    command, args = argv[0], argv[1:]
    try:
        if command == "identities":
            result = _identities(args[0], args[1], json.load(sys.stdin))
        elif command == "rules":
            result = _rules(args[0], json.load(sys.stdin))
        elif command == "changes":
            result = _changes(args[0], int(args[1]), json.loads(args[2]))
        elif command == "watch":
            _watch(args[0], args[1])
            return 0
        else:
            result = {"error": f"unknown command {command!r}"}
    except Exception as exc:
        result = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(result))
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
