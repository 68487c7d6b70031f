"""The nftables batches: whole tables replaced atomically, one endpoint's elements added or removed, every rule
labelled, subnets deduplicated."""

from netdriver.isolation import Firewall, endpoint_guard_batch, host_guard_batch
from tests.fakes import FakeNftables
from wire.errors import KernelError


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


def _whole(endpoints):
    """The sets as a whole-table rebuild for these endpoints makes them."""
    nft = FakeNftables()
    Firewall(nft).guard_endpoints("ns", endpoints)
    return nft.sets()


def test_endpoint_add_and_remove_change_exactly_its_elements_and_replay_safely():
    nft = FakeNftables()
    fw = Firewall(nft)
    a, b = ("vxpa", "10.0.0.5", "02:42:0a:00:00:05"), ("vxpb", "10.0.0.6", "02:42:0a:00:00:06")
    try:
        fw.guard_endpoint("ns", *a)
    except KernelError:
        pass
    else:
        raise AssertionError("elements added without the table and its rules")
    assert nft.tables == {}  # nothing created: sets without their rules would guard nothing
    fw.guard_endpoints("ns", [a])
    fw.guard_endpoint("ns", *b)
    fw.guard_endpoint("ns", *b)  # a replay
    assert nft.sets() == _whole([a, b])
    assert len(nft.tables[("bridge", "vxnet")]["rules"]) == 5
    fw.unguard_endpoint("ns", *a)
    fw.unguard_endpoint("ns", *a)  # a replay: the elements are gone, the batch still succeeds
    assert nft.sets() == _whole([b])
    fw.unguard_endpoint("ns", *b)
    assert nft.sets() == _whole([])
    assert len(nft.tables[("bridge", "vxnet")]["rules"]) == 5


def test_a_refused_batch_is_a_kernel_error_naming_the_namespace():
    seen = {}

    def apply(ns, commands, what):
        seen["ns"], seen["commands"] = ns, commands
        raise KernelError(f"{what}: Error: Could not process rule: No such file or directory")

    try:
        Firewall(apply).guard_endpoints("vxnet-0123456789ab", [])
    except KernelError as exc:
        assert "vxnet-0123456789ab" in str(exc) and "No such file" in str(exc)
    else:
        raise AssertionError("no error")
    assert seen["ns"] == "vxnet-0123456789ab" and seen["commands"][0] == {"add": {"table": {"family": "bridge",
                                                                                           "name": "vxnet"}}}
