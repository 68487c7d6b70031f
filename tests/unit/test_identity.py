"""The host identity: generated once into the state dir, read back validated, VXNET_HOST_ID overriding it, and the
hostname-as-ID upgrade path."""

import os
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plugin import config, identity
from wire.errors import ConfigError


def test_a_generated_id_is_kept_and_the_hostname_stays_the_name(tmp_path):
    first = identity.resolve(str(tmp_path), "", "ubuntu")
    assert identity.valid_host_id(first.id) and len(first.id) == 32 and first.id != "ubuntu"
    assert (first.name, first.source) == ("ubuntu", str(tmp_path / "host-id"))
    assert str(first) == f"ubuntu ({first.id})"
    assert (tmp_path / "host-id").read_text() == first.id + "\n"
    again = identity.resolve(str(tmp_path), "", "renamed")  # a restart, even after a rename
    assert (again.id, again.name) == (first.id, "renamed")
    assert [p.name for p in tmp_path.iterdir()] == ["host-id"]  # no temporary file left


def test_hosts_with_one_hostname_get_different_ids(tmp_path):
    ids = {identity.resolve(str(tmp_path / f"h{i}"), "", "localhost").id for i in range(3)}
    assert len(ids) == 3


def test_a_hostname_that_is_no_id_still_starts(tmp_path):
    me = identity.resolve(str(tmp_path / "new"), "", "(none)")  # the state dir is created too
    assert identity.valid_host_id(me.id) and me.name == "(none)"
    assert config.load({}).host_id == ""  # no VXNET_HOST_ID: no hostname check at all


def test_vxnet_host_id_overrides_and_writes_nothing(tmp_path):
    me = identity.resolve(str(tmp_path), "h1", "ubuntu")
    assert (me.id, me.name, me.source) == ("h1", "ubuntu", "VXNET_HOST_ID")
    assert "VXNET_HOST_ID" in me.remedy()
    assert list(tmp_path.iterdir()) == []


def test_an_upgraded_host_keeps_its_hostname_as_its_id(tmp_path):
    (tmp_path / "lease-node7").write_text("1234")  # written by the hostname-as-ID version
    me = identity.resolve(str(tmp_path), "", "node7")
    assert me.id == "node7" and (tmp_path / "host-id").read_text() == "node7\n"
    # ... and only its own hostname's lease file counts: another name's is no evidence.
    other = tmp_path / "other"
    other.mkdir()
    (other / "lease-node7").write_text("1234")
    assert identity.resolve(str(other), "", "node8").id != "node7"


@pytest.mark.parametrize("content,reason", [
    (b"", "is not a host ID"),
    (b"has/slash\n", "is not a host ID"),
    (b"-leading-dash", "is not a host ID"),
    (b"@swarm", "is not a host ID"),
    (b"\xff\xfe", "is not a host ID"),
    (b"a" * 64, "is not a host ID"),
    (b"x" * 5000, "is not a host ID"),
])
def test_a_corrupt_identity_file_is_refused_naming_file_and_reason(tmp_path, content, reason):
    (tmp_path / "host-id").write_bytes(content)
    with pytest.raises(ConfigError) as err:
        identity.resolve(str(tmp_path), "", "ubuntu")
    assert str(tmp_path / "host-id") in str(err.value) and reason in str(err.value)
    assert (tmp_path / "host-id").read_bytes() == content  # nothing overwritten


def test_an_unreadable_identity_file_names_the_file(tmp_path):
    (tmp_path / "host-id").mkdir()
    with pytest.raises(ConfigError, match="host-id: cannot be read"):
        identity.resolve(str(tmp_path), "", "ubuntu")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=80))
def test_whatever_the_file_holds_is_a_valid_id_or_a_clear_error(tmp_path_factory, content):
    path = tmp_path_factory.mktemp("id") / "host-id"
    path.write_bytes(content)
    try:
        found = identity.read(str(path))
    except ConfigError as exc:
        assert str(path) in str(exc)
    else:
        assert found is not None and identity.valid_host_id(found) and "/" not in found


def test_two_processes_starting_at_once_agree_on_one_id(tmp_path):
    # Each round: 8 threads race to create the file in a fresh dir; all must read back the same winner.
    for round_ in range(20):
        folder = str(tmp_path / f"r{round_}")
        os.makedirs(folder)
        barrier = threading.Barrier(8)
        seen = []

        def start():
            barrier.wait()
            seen.append(identity.resolve(folder, "", "clone").id)

        threads = [threading.Thread(target=start) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(seen) == 8 and len(set(seen)) == 1, seen
        assert sorted(os.listdir(folder)) == ["host-id"]


def test_instance_is_stable_within_this_system():
    assert identity.instance() == identity.instance() and "/" in identity.instance()
