"""The nftables batches: whole tables replaced atomically, every rule labelled, subnets deduplicated."""

import json

from netdriver.isolation import Firewall, endpoint_guard_batch, host_guard_batch
from plugin.errors import KernelError


def test_endpoint_batch_replaces_the_table_and_keeps_rules_fixed_as_endpoints_grow():
    batch = endpoint_guard_batch([("vxpb", "10.0.0.6", "02:42:0a:00:00:06"), ("vxpa", "10.0.0.5", "m5")])
    assert [list(op)[0] for op in batch[:3]] == ["add", "delete", "add"]
    rules = [op["add"]["rule"] for op in batch if "rule" in op.get("add", {})]
    assert len(rules) == 5 and all(r["comment"].startswith("vxnet:anti-spoofing:") for r in rules)
    assert all(r["expr"][-1] == {"drop": None} for r in rules)
    elements = {op["add"]["element"]["name"]: op["add"]["element"]["elem"]
                for op in batch if "element" in op.get("add", {})}
    assert elements == {"ports": ["vxpa", "vxpb"],  # sorted: the same input always gives the same batch
                        "macs": [{"concat": ["vxpa", "m5"]}, {"concat": ["vxpb", "02:42:0a:00:00:06"]}],
                        "ips": [{"concat": ["vxpa", "10.0.0.5"]}, {"concat": ["vxpb", "10.0.0.6"]}]}
    many = endpoint_guard_batch([(f"vxp{i}", f"10.0.0.{i}", f"02:00:00:00:00:{i:02x}") for i in range(50)])
    assert len([op for op in many if "rule" in op.get("add", {})]) == 5


def test_host_batch_deduplicates_shared_subnets():
    batch = host_guard_batch(["10.1.0.0/24", "10.1.0.0/24", "10.2.0.0/16"])
    (elements,) = [op["add"]["element"]["elem"] for op in batch if "element" in op.get("add", {})]
    assert elements == [{"prefix": {"addr": "10.1.0.0", "len": 24}}, {"prefix": {"addr": "10.2.0.0", "len": 16}}]
    assert not [op for op in host_guard_batch([]) if "element" in op.get("add", {})]


def test_nft_failure_is_a_kernel_error_with_its_message():
    class Proc:
        returncode = 1
        stderr = "Error: Could not process rule: No such file or directory"

    seen = {}

    def runner(argv, **kw):
        seen["argv"], seen["input"] = argv, json.loads(kw["input"])
        return Proc()

    fw = Firewall(runner=runner)
    try:
        fw.guard_endpoints("/run/netns/x", [])
    except KernelError as exc:
        assert "nft refused" in str(exc) and "No such file" in str(exc)
    else:
        raise AssertionError("no error")
    assert seen["argv"][:2] == ["nsenter", "--net=/run/netns/x"] and "nftables" in seen["input"]
