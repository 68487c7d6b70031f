"""The fail-closed nftables batch, and how Firewall drives nft (a stand-in nft that records what it is given).
The rules themselves are loaded into a real kernel by tests/ipsec (host namespace test and the guest)."""

import json
import os

import pytest

from encrypt.firewall import LABEL_IN, LABEL_OUT, TABLE, Firewall
from plugin.errors import KernelError


def test_ensure_replaces_the_whole_table_in_one_batch():
    batch = Firewall(4790).batch()["nftables"]
    table = {"family": "inet", "name": TABLE}
    # add + delete + add: whatever was there goes, in the same transaction as the new rules arrive.
    assert batch[:3] == [{"add": {"table": table}}, {"delete": {"table": table}}, {"add": {"table": table}}]
    chains = {c["add"]["chain"]["name"]: c["add"]["chain"] for c in batch if "chain" in c.get("add", {})}
    assert {n: (c["hook"], c["type"], c["policy"]) for n, c in chains.items()} == \
        {"input": ("input", "filter", "accept"), "output": ("output", "filter", "accept")}
    rules = {r["add"]["rule"]["chain"]: r["add"]["rule"] for r in batch if "rule" in r.get("add", {})}
    assert rules["input"]["comment"] == LABEL_IN and rules["output"]["comment"] == LABEL_OUT
    for chain, key in (("input", {"meta": {"key": "ipsec"}}), ("output", {"rt": {"key": "ipsec"}})):
        expr = rules[chain]["expr"]
        port = {"payload": {"protocol": "udp", "field": "dport"}}
        assert {"match": {"op": "==", "left": port, "right": 4790}} in expr
        assert {"match": {"op": "==", "left": key, "right": False}} in expr  # "missing"
        assert expr[-1] == {"drop": None} and {"counter": None} in expr
    json.dumps(batch)


def fake_nft(tmp_path, exit_code=0, stderr=""):
    path = tmp_path / "nft"
    record = tmp_path / "calls"
    path.write_text(f"""#!/bin/sh
echo "$@" >> {record}
cat >> {record}.stdin
echo "" >> {record}.stdin
[ -n "{stderr}" ] && echo "{stderr}" >&2
exit {exit_code}
""")
    os.chmod(path, 0o755)
    return str(path), record


def test_ensure_and_remove_feed_nft_json_on_stdin(tmp_path):
    nft, record = fake_nft(tmp_path)
    fw = Firewall(4790, nft=nft)
    fw.ensure()
    fw.remove()
    calls = record.read_text().splitlines()
    assert calls == ["-j -f -", "-j -f -"]
    sent = [json.loads(line) for line in (tmp_path / "calls.stdin").read_text().splitlines() if line]
    assert sent[0] == fw.batch()
    assert sent[1]["nftables"][-1] == {"delete": {"table": {"family": "inet", "name": TABLE}}}


def test_nft_failures_raise_with_nfts_words(tmp_path):
    nft, _ = fake_nft(tmp_path, exit_code=1, stderr="Error: Could not process rule: Operation not supported")
    with pytest.raises(KernelError, match="install the vxnet_ipsec nftables table: nft failed: .*not supported"):
        Firewall(4790, nft=nft).ensure()
    with pytest.raises(KernelError, match="nftables is needed"):
        Firewall(4790, nft=str(tmp_path / "no-such-nft")).ensure()
