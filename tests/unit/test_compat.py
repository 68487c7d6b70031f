"""store/compat.py: the schema record over a fake etcd. A new store gets ours; an older minor is raised and read;
a newer minor is read as is; a newer (or older) major stops the plugin with both versions named; plugins
starting at once agree on one record."""

import json

import pytest

from store import compat, schema
from tests.fakes.kv import FakeKV
from wire.errors import SchemaTooNew, StoreUnavailable

KEY = schema.Schema().schema_record()


def record(kv: FakeKV) -> dict:
    return json.loads(kv.get(KEY).value)


def test_a_new_store_gets_this_plugins_schema_once():
    kv = FakeKV()
    assert compat.check(kv, "0.2.0") == (schema.SCHEMA_MAJOR, schema.SCHEMA_MINOR, "0.2.0")
    assert record(kv) == {"major": schema.SCHEMA_MAJOR, "minor": schema.SCHEMA_MINOR, "written_by": "0.2.0"}
    revision = kv.get(KEY).mod_revision
    # Idempotent: a restart, or another host of the same version, writes nothing.
    assert compat.check(kv, "0.2.0") == (schema.SCHEMA_MAJOR, schema.SCHEMA_MINOR, "0.2.0")
    assert kv.get(KEY).mod_revision == revision


def test_an_older_minor_is_read_and_raised_and_the_older_plugin_still_reads_it():
    kv = FakeKV()
    kv.put(KEY, json.dumps({"major": 1, "minor": 0, "written_by": "0.1.0"}))
    assert compat.check(kv, "0.2.0", ours=compat.Layout(1, 1)) == (1, 1, "0.2.0")
    assert record(kv) == {"major": 1, "minor": 1, "written_by": "0.2.0"}
    # The older plugin of a rolling upgrade: the newer minor is read as is, not lowered.
    assert compat.check(kv, "0.1.0", ours=compat.Layout(1, 0)) == (1, 1, "0.2.0")
    assert record(kv)["minor"] == 1


def test_a_newer_major_is_refused_naming_both_versions():
    kv = FakeKV()
    kv.put(KEY, json.dumps({"major": 2, "minor": 0, "written_by": "2.0.0"}))
    with pytest.raises(SchemaTooNew) as exc:
        compat.check(kv, "0.2.0", ours=compat.Layout(1, 1))
    message = str(exc.value)
    assert "schema 2.0 (written by vxnet 2.0.0)" in message
    assert "vxnet 0.2.0, reads schema 1.x only" in message and "upgrade this plugin" in message
    assert record(kv)["major"] == 2  # nothing written


def test_an_older_major_is_refused_too():
    kv = FakeKV()
    kv.put(KEY, json.dumps({"major": 1, "minor": 4, "written_by": "0.9.0"}))
    with pytest.raises(SchemaTooNew, match="needs a migration"):
        compat.check(kv, "2.0.0", ours=compat.Layout(2, 0))


@pytest.mark.parametrize("value", ["not json", "[]", '{"major": "1", "minor": 0}', '{"major": 1}',
                                   '{"major": true, "minor": 0}', '{"major": -1, "minor": 0}'])
def test_a_record_that_is_no_schema_record_is_refused_naming_the_key(value):
    kv = FakeKV()
    kv.put(KEY, value)
    with pytest.raises(SchemaTooNew, match=f"etcd key {KEY} holds .* not a schema record"):
        compat.check(kv, "0.2.0")


def test_a_plugin_that_loses_the_race_to_write_the_record_reads_the_winners():
    kv = FakeKV()
    other = json.dumps({"major": schema.SCHEMA_MAJOR, "minor": schema.SCHEMA_MINOR, "written_by": "0.2.1"})
    kv.cut_in = lambda: kv.put(KEY, other)  # another host writes it between our read and our commit
    assert compat.check(kv, "0.2.0") == (schema.SCHEMA_MAJOR, schema.SCHEMA_MINOR, "0.2.1")
    assert record(kv)["written_by"] == "0.2.1"


def test_an_unreachable_etcd_is_retried_by_the_caller():
    kv = FakeKV()
    kv.unavailable = True
    with pytest.raises(StoreUnavailable):
        compat.check(kv, "0.2.0")


def test_the_record_lives_under_a_moved_prefix_too():
    kv = FakeKV()
    compat.check(kv, "0.2.0", prefix="/other/tree")
    assert kv.keys() == ["/other/tree/schema"]
