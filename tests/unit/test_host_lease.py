"""One ID, one live host: HostLease registers hosts/<id> only over its own lease, refuses another live host's
record naming both hosts, and is not fooled by its own past (a restart, an expired lease, a lost lease file)."""

import json
import threading

import pytest

from netdriver.hosts import HostLease
from netdriver.store import NetworkStore
from store import schema
from tests.fakes import FakeKV
from wire.errors import HostIdConflict

TTL = 30


def lease(kv, store, state, vtep="192.0.2.1", name="alpha", instance="boot-a/1", host_id="dup", **kw):
    return HostLease(kv, store, host_id, lambda: vtep, str(state), name=name, instance=instance, ttl=TTL, poll=0,
                     **kw)


def renewing(kv, lease_id, every=3):
    """The fake's TTL reads: lease_id's holder renews it every `every` reads (a live host, every TTL/3)."""
    reads = {"n": 0}

    def hook(read_id):
        if read_id == lease_id:
            reads["n"] += 1
            if reads["n"] % every == 0:
                kv.lease_keepalive(lease_id)

    kv.on_ttl_read = hook


def record(kv, host_id="dup"):
    entry = kv.get(f"{schema.PREFIX}/hosts/{host_id}")
    return entry.lease, json.loads(entry.value)


def test_a_second_live_host_with_the_same_id_is_refused_naming_both(tmp_path):
    kv = FakeKV()
    store = NetworkStore(kv)
    first = lease(kv, store, tmp_path / "a", vtep="192.0.2.1", name="alpha")
    assert first.acquire() is True
    renewing(kv, first.id)
    second = lease(kv, store, tmp_path / "b", vtep="192.0.2.2", name="beta", instance="boot-b/2")
    with pytest.raises(HostIdConflict) as err:
        second.acquire()
    message = str(err.value)
    for needle in ("'dup'", "alpha", "192.0.2.1", "beta", "192.0.2.2", "VXNET_HOST_ID"):
        assert needle in message, message
    # The first host's record is untouched (positive control: it is still its own, and it can re-register).
    assert record(kv) == (first.id, {"vtep": "192.0.2.1", "name": "alpha", "instance": "boot-a/1",
                                     "version": "0.1.0"})
    first.register()
    assert record(kv)[0] == first.id


def test_two_hosts_registering_at_once_cannot_both_win(tmp_path):
    kv = FakeKV()
    store = NetworkStore(kv)
    a = lease(kv, store, tmp_path / "a", name="alpha")
    b = lease(kv, store, tmp_path / "b", name="beta", instance="boot-b/2")
    a.id, b.id = kv.lease_grant(TTL), kv.lease_grant(TTL)
    # Both read "absent"; the compare lets only the first put through, the second re-reads and finds the other.
    real_get = kv.get
    barrier = threading.Barrier(2)
    first_reads = set()

    def racing_get(key):
        found = real_get(key)
        me = threading.current_thread().name
        if me.startswith("race") and me not in first_reads:
            first_reads.add(me)
            barrier.wait(timeout=5)  # both have read "absent" before either writes
        return found

    kv.get = racing_get
    results = {}

    def run(who):
        try:
            who.register()
            results[who.name] = "registered"
        except HostIdConflict as exc:
            results[who.name] = str(exc)

    kv.on_ttl_read = lambda lease_id: kv.lease_keepalive(lease_id) if kv.leases[lease_id] % 3 == 0 else None
    threads = [threading.Thread(target=run, args=(w,), name=f"race-{w.name}") for w in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    kv.get = real_get
    assert sorted(results.values())[1] == "registered" and "held by another live host" in sorted(results.values())[0]
    winner = "alpha" if results["alpha"] == "registered" else "beta"
    assert record(kv)[1]["name"] == winner


def test_a_restart_reuses_its_lease_and_its_record(tmp_path):
    kv = FakeKV()
    store = NetworkStore(kv)
    first = lease(kv, store, tmp_path / "lease")
    first.acquire()
    again = lease(kv, store, tmp_path / "lease")  # same state file, same system: a plugin restart
    assert again.acquire() is False and again.id == first.id and record(kv)[0] == first.id


def test_a_record_from_an_older_version_under_the_saved_lease_is_this_hosts(tmp_path):
    kv = FakeKV()
    store = NetworkStore(kv)
    old = kv.lease_grant(TTL)
    kv.put(schema.PREFIX + "/hosts/dup", json.dumps({"vtep": "192.0.2.1", "version": "0.0.9"}), lease=old)
    (tmp_path / "lease").write_text(str(old))
    upgraded = lease(kv, store, tmp_path / "lease")
    assert upgraded.acquire() is False and upgraded.id == old  # no wait, no new lease: peers never vanish


def test_a_copied_state_dir_whose_original_lives_is_refused(tmp_path):
    kv = FakeKV()
    store = NetworkStore(kv)
    original = lease(kv, store, tmp_path / "lease", vtep="192.0.2.1", name="web", instance="boot-a/1")
    original.acquire()
    renewing(kv, original.id)
    clone = lease(kv, store, tmp_path / "lease", vtep="192.0.2.9", name="web", instance="boot-c/1",
                  remedy="delete /var/lib/vxnet/host-id here")
    with pytest.raises(HostIdConflict, match="192.0.2.1.*192.0.2.9.*delete /var/lib/vxnet/host-id"):
        clone.acquire()
    assert record(kv) == (original.id, {"vtep": "192.0.2.1", "name": "web", "instance": "boot-a/1",
                                        "version": "0.1.0"})


def test_a_reboot_within_the_ttl_waits_for_its_old_lease_then_registers(tmp_path):
    kv = FakeKV()
    store = NetworkStore(kv)
    before = lease(kv, store, tmp_path / "lease", instance="boot-a/1")
    before.acquire()
    after = lease(kv, store, tmp_path / "lease", instance="boot-b/1")  # nobody renews the old lease
    assert after.acquire() is True and after.id != before.id
    assert before.id not in kv.leases and record(kv) == (after.id, {
        "vtep": "192.0.2.1", "name": "alpha", "instance": "boot-b/1", "version": "0.1.0"})


def test_a_lost_lease_file_waits_for_its_own_old_record_to_expire(tmp_path):
    kv = FakeKV()
    store = NetworkStore(kv)
    before = lease(kv, store, tmp_path / "a")
    before.acquire()
    after = lease(kv, store, tmp_path / "b")  # same system, the lease file gone
    assert after.acquire() is True and record(kv)[0] == after.id


def test_renewal_after_losing_the_lease_registers_again_not_refused(tmp_path):
    kv = FakeKV()
    store = NetworkStore(kv)
    me = lease(kv, store, tmp_path / "lease")
    me.acquire()
    old = me.id
    kv.expire(old)  # etcd unreachable for longer than the TTL
    assert me.acquire() is True and me.id != old and record(kv)[0] == me.id
    me.register()  # the VTEP moved: same lease, no conflict
    assert record(kv)[0] == me.id


def test_renewal_finding_another_host_on_its_id_calls_on_conflict(tmp_path):
    kv = FakeKV()
    store = NetworkStore(kv)
    refused = []
    me = lease(kv, store, tmp_path / "a", on_conflict=refused.append)
    me.acquire()
    kv.expire(me.id)
    other = lease(kv, store, tmp_path / "b", vtep="192.0.2.7", name="gamma", instance="boot-g/1")
    other.acquire()  # took the free ID while this host was cut off
    renewing(kv, other.id)
    thread = threading.Thread(target=me._run)
    thread.start()
    thread.join(10)
    assert not thread.is_alive() and len(refused) == 1 and "gamma" in str(refused[0])
    assert record(kv)[1]["name"] == "gamma"
