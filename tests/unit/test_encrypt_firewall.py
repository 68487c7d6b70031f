"""The fail-closed nftables batch, and how Firewall drives its applier (a stand-in that models the table). The rules
themselves are loaded into a real kernel by tests/ipsec (host namespace test and the guest)."""

import json

import pytest

from encrypt.firewall import LABEL_IN, LABEL_OUT, TABLE, Firewall
from tests.fakes import FakeNftables
from wire.errors import KernelError


def test_ensure_replaces_the_whole_table_in_one_batch():
    batch = Firewall(4790, FakeNftables()).batch()
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


def test_ensure_and_remove_are_idempotent_and_counters_read_the_table():
    nft = FakeNftables()
    fw = Firewall(4790, nft, "vxnet-ns")
    assert fw.counters() == {} and not fw.present()
    fw.ensure()
    fw.ensure()
    assert fw.present() and fw.counters() == {LABEL_IN: 0, LABEL_OUT: 0}
    assert len(nft.tables[("inet", TABLE)]["rules"]) == 2
    fw.remove()
    fw.remove()
    assert nft.tables == {} and fw.counters() == {}
    assert {ns for ns, _ in nft.calls} == {"vxnet-ns"}


def test_refusals_raise_naming_what_was_being_done():
    with pytest.raises(KernelError, match="install the vxnet_ipsec nftables table: .*not supported"):
        Firewall(4790, FakeNftables(refuse="Error: Could not process rule: Operation not supported")).ensure()
