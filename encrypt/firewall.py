"""Fail closed: VXLAN of encrypted networks never crosses the underlay in clear, whatever state the SAs are in.

Encrypted networks send VXLAN to their own UDP port (manager.ENCRYPTED_VXLAN_PORT), so cleartext VXLAN of an
encrypted network is recognisable by port alone, without marking packets. Our own nftables table holds two rules:

  input   UDP to the port that did not arrive through IPsec (`meta ipsec missing`: no secpath) is dropped. A
          decrypted packet passes the input hook again with its secpath set, so only cleartext matches.
  output  UDP to the port whose route has no IPsec transformation (`rt ipsec missing`: no XFRM policy matched
          when VXLAN looked its route up) is dropped, before it can leave. The ESP packet that comes out of the
          transformation is protocol 50, not UDP, and passes.

The XFRM policies (level required) already refuse cleartext in both directions; these rules hold when there is
no policy at all: before the first peer is programmed, after a crash between deleting and adding, or while the
plugin restarts (the table stays when the plugin stops). A drop in any nftables table is final, so the rules
hold beside Docker's own.

Every change is one atomic `nft -j -f -` batch; `ensure()` re-creates the whole table in one transaction (add,
delete, add), so a replay converges on exactly these rules and there is no moment without them.
"""

import json
import subprocess
from typing import Dict, List, Optional

from plugin.errors import KernelError

TABLE = "vxnet_ipsec"
FAMILY = "inet"
_TIMEOUT = 10.0

# Rule comments double as labels: counters() reports by them and a reader of `nft list ruleset` sees why.
LABEL_IN = "vxnet: drop cleartext VXLAN of encrypted networks arriving without IPsec"
LABEL_OUT = "vxnet: drop cleartext VXLAN of encrypted networks leaving without an IPsec policy"


class Firewall:
    """The vxnet_ipsec table in one network namespace (None: the plugin's own, i.e. the host's)."""

    def __init__(self, port: int, netns: Optional[str] = None, nft: str = "nft"):
        self.port = port
        self.netns = netns
        self._nft = nft

    def _argv(self, *args: str) -> List[str]:
        argv = [self._nft, *args]
        return ["nsenter", f"--net={self.netns}", *argv] if self.netns else argv

    def _run(self, what: str, *args: str, batch: Optional[dict] = None) -> str:
        try:
            proc = subprocess.run(self._argv(*args), input=json.dumps(batch) if batch else None,
                                  capture_output=True, text=True, timeout=_TIMEOUT)
        except FileNotFoundError:
            raise KernelError(f"{what}: `{self._nft}` is not installed (nftables is needed to keep encrypted "
                              "networks from leaking cleartext)") from None
        except subprocess.TimeoutExpired:
            raise KernelError(f"{what}: nft did not answer within {_TIMEOUT:.0f} s") from None
        if proc.returncode != 0:
            raise KernelError(f"{what}: nft failed: {proc.stderr.strip() or proc.returncode}")
        return proc.stdout

    def _table(self) -> dict:
        return {"family": FAMILY, "name": TABLE}

    def _rule(self, chain: str, label: str, condition: dict) -> dict:
        return {"add": {"rule": {"family": FAMILY, "table": TABLE, "chain": chain, "comment": label, "expr": [
            {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "udp"}},
            {"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}}, "right": self.port}},
            {"match": {"op": "==", "left": condition, "right": False}},
            {"counter": None},
            {"drop": None},
        ]}}}

    def batch(self) -> dict:
        """The ensure() batch (exposed for tests and for reading)."""
        table = self._table()
        chains = [{"add": {"chain": {"family": FAMILY, "table": TABLE, "name": hook, "type": "filter", "hook": hook,
                                     "prio": 0, "policy": "accept"}}} for hook in ("input", "output")]
        return {"nftables": [
            {"add": {"table": table}},
            {"delete": {"table": table}},
            {"add": {"table": table}},
            *chains,
            self._rule("input", LABEL_IN, {"meta": {"key": "ipsec"}}),
            self._rule("output", LABEL_OUT, {"rt": {"key": "ipsec"}}),
        ]}

    def ensure(self) -> None:
        """Create or re-create the table with exactly our two rules, atomically. Idempotent."""
        self._run(f"install the {TABLE} nftables table", "-j", "-f", "-", batch=self.batch())

    def remove(self) -> None:
        """Remove the table (only when no encrypted network is left). Idempotent."""
        table = self._table()
        self._run(f"remove the {TABLE} nftables table", "-j", "-f", "-",
                  batch={"nftables": [{"add": {"table": table}}, {"delete": {"table": table}}]})

    def present(self) -> bool:
        return set(self.counters()) == {LABEL_IN, LABEL_OUT}

    def counters(self) -> Dict[str, int]:
        """Packets dropped so far by each of our rules, by label; {} if the table is absent."""
        try:
            text = self._run(f"read the {TABLE} nftables table", "-j", "list", "table", FAMILY, TABLE)
        except KernelError as exc:
            if "No such file or directory" in str(exc):
                return {}
            raise
        out = {}
        for item in json.loads(text).get("nftables", []):
            rule = item.get("rule")
            if not rule or "comment" not in rule:
                continue
            packets = sum(e["counter"].get("packets", 0) for e in rule.get("expr", []) if "counter" in e)
            out[rule["comment"]] = packets
        return out
