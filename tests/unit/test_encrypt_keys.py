"""Keys, the ring's rotation, sealing at rest, the secret setting, the ring in a fake etcd, and SPIs."""

import base64
import json
import logging
import os
import threading

import pytest

from encrypt.keystore import KeyStore
from encrypt.ring import MATERIAL_BYTES, Key, KeyRing, KeyringError
from encrypt.rotator import KeyRotator
from encrypt.secret import parse_secret, read_secret_file
from encrypt.spi import SPI_MIN, spi_for
from encrypt.watch import KeyRingWatcher
from tests.fakes import FakeKV
from wire.errors import ConfigError

SECRET = bytes(range(32))


# -- keys and the ring ------------------------------------------------------------------------------------------
def test_a_key_never_shows_its_material():
    key = Key.generate(7)
    ring = KeyRing.initial(now=1.0)
    shown = repr(key) + str(key) + repr(ring) + str(ring) + f"{key} {ring!r}"
    for k in (key, *ring.keys):
        assert k.material.hex() not in shown and repr(k.material) not in shown
    assert repr(key) == "Key(tag=7)" and len(key.material) == MATERIAL_BYTES == 20


def test_rotation_promotes_the_staged_key_and_drops_the_one_before_the_previous():
    r1 = KeyRing.initial(now=1.0)
    assert r1.tags == (1, 2) and r1.primary == 1
    r2 = r1.rotate(now=2.0)
    assert r2.tags == (1, 2, 3) and r2.primary == 2 and r2.rotated_at == 2.0
    assert r2.key(1) == r1.key(1) and r2.key(2) == r1.key(2)  # same material: peers already hold these
    r3 = r2.rotate(now=3.0)
    assert r3.tags == (2, 3, 4) and r3.primary == 3
    # Every key a host may send with under r_n or r_n+1 is received under both: lossless across one step.
    for old, new in ((r1, r2), (r2, r3)):
        assert {old.primary, new.primary} <= set(old.tags) & set(new.tags)
    assert r3.prune().tags == (3, 4)


def test_a_ring_without_a_staged_key_still_rotates_to_a_fresh_primary():
    ring = KeyRing((Key.generate(5),), primary=5)
    new = ring.rotate(now=1.0)
    assert new.tags == (5, 6, 7) and new.primary == 6


def test_sealed_ring_opens_only_with_the_secret_and_at_its_own_key():
    ring = KeyRing.initial(now=5.0)
    text = ring.seal(SECRET, "/vxnet/v1/encryption/keyring")
    for k in ring.keys:
        assert k.material.hex() not in text and base64.b64encode(k.material).decode() not in text
    assert KeyRing.unseal(text, SECRET, "/vxnet/v1/encryption/keyring") == ring
    with pytest.raises(KeyringError, match="does not open with this host's cluster secret") as wrong:
        KeyRing.unseal(text, bytes(32), "/vxnet/v1/encryption/keyring")
    with pytest.raises(KeyringError):
        KeyRing.unseal(text, SECRET, "/elsewhere/encryption/keyring")  # moved: the AAD no longer matches
    assert ring.keys[0].material.hex() not in str(wrong.value)
    tampered = json.loads(text)
    tampered["sealed"] = base64.b64encode(b"x" + base64.b64decode(tampered["sealed"])[1:]).decode()
    with pytest.raises(KeyringError):
        KeyRing.unseal(json.dumps(tampered), SECRET, "/vxnet/v1/encryption/keyring")
    with pytest.raises(KeyringError, match="not a sealed vxnet key ring"):
        KeyRing.unseal("{}", SECRET, "/k")


def test_secret_from_hex_base64_or_file_and_errors_never_echo_it(tmp_path):
    raw = os.urandom(32)
    assert parse_secret(raw.hex()) == raw
    assert parse_secret(" " + base64.b64encode(raw).decode() + "\n") == raw
    assert parse_secret(base64.urlsafe_b64encode(raw).decode()) == raw
    path = tmp_path / "secret"
    path.write_text(raw.hex() + "\n")
    assert read_secret_file(str(path)) == raw
    bad = "deadbeef" * 7  # 56 hex digits: 28 bytes
    with pytest.raises(ConfigError) as exc:
        parse_secret(bad)
    message = str(exc.value)
    assert bad not in message and "VXNET_ENCRYPTION_SECRET" in message and "56 characters" in message
    with pytest.raises(ConfigError, match="cannot read"):
        read_secret_file(str(tmp_path / "missing"))
    with pytest.raises(ConfigError):
        KeyStore(FakeKV(), b"short")


# -- the ring in etcd -------------------------------------------------------------------------------------------
def test_the_first_host_creates_the_ring_and_the_others_read_it():
    kv = FakeKV()
    a, b = KeyStore(kv, SECRET), KeyStore(kv, SECRET)
    assert a.load() is None
    ring = a.ensure(now=1.0)
    assert b.ensure(now=2.0) == ring and kv.keys() == ["/vxnet/v1/encryption/keyring"]
    for k in ring.keys:
        assert k.material.hex() not in kv.data["/vxnet/v1/encryption/keyring"].value
    with pytest.raises(KeyringError):
        KeyStore(kv, bytes(32)).load()


def test_rotation_is_one_per_interval_whoever_asks():
    kv = FakeKV()
    a, b = KeyStore(kv, SECRET), KeyStore(kv, SECRET)
    a.ensure(now=100.0)
    ring, rotated = a.rotate(now=105.0, min_age=10)
    assert not rotated and ring.primary == 1
    ring, rotated = a.rotate(now=111.0, min_age=10)
    assert rotated and ring.primary == 2
    again, rotated = b.rotate(now=112.0, min_age=10)  # another host a moment later: already done
    assert not rotated and again == ring
    assert KeyRotator(a, interval=10).tick(now=125.0) and a.load().primary == 3
    assert a.prune().tags == (3, 4) and b.load().tags == (3, 4)
    with pytest.raises(ConfigError):
        KeyRotator(a, interval=1)


def test_rotation_compare_and_swap_retries_after_a_concurrent_write():
    kv = FakeKV()
    store = KeyStore(kv, SECRET)
    store.ensure(now=0.0)
    real_commit = kv.commit
    raced = []

    def commit(**kwargs):
        if not raced:  # another host rotates between our read and our write
            raced.append(None)
            kv.commit = real_commit
            raced[0] = KeyStore(kv, SECRET).rotate(now=50.0, min_age=0)[0]
            kv.commit = commit
        return real_commit(**kwargs)

    kv.commit = commit
    ring, rotated = store.rotate(now=50.0, min_age=0)
    # Our first write lost; the re-read ring was rotated by the other host just now, so we rotate once more.
    assert rotated and raced[0].primary == 2 and ring.primary == 3


def test_watcher_applies_the_ring_at_start_and_every_rotation_and_retries_failures(caplog):
    kv = FakeKV()
    store = KeyStore(kv, SECRET)
    applied = []
    failures = [1]

    def on_ring(ring):
        if failures:
            failures.pop()
            from wire.errors import KernelError
            raise KernelError("injected")
        applied.append(ring)

    watcher = KeyRingWatcher(kv, store, on_ring, max_backoff=0.05)
    caplog.set_level(logging.ERROR)
    watcher.start()
    try:
        assert watcher.synced.wait(5), "the watcher never applied the ring"
        assert "injected" in caplog.text  # the failure was reported, then retried from a fresh read
        rotated, _ = KeyStore(kv, SECRET).rotate(min_age=0)
        deadline = threading.Event()
        for _ in range(100):
            if applied and applied[-1] == rotated:
                break
            deadline.wait(0.05)
        assert applied[0].primary == 1 and applied[-1] == rotated
        for ring in applied:
            for k in ring.keys:
                assert k.material.hex() not in caplog.text
    finally:
        watcher.stop()


# -- SPIs ---------------------------------------------------------------------------------------------------------
def test_spi_is_deterministic_directional_per_key_and_never_reserved():
    a, b = "192.0.2.1", "192.0.2.2"
    assert spi_for(a, b, 1) == spi_for(a, b, 1)
    assert len({spi_for(a, b, 1), spi_for(b, a, 1), spi_for(a, b, 2)}) == 3
    spis = [spi_for(f"10.0.{i // 250}.{i % 250 + 1}", b, t) for i in range(500) for t in (1, 2, 3)]
    assert min(spis) >= SPI_MIN and max(spis) <= 0xFFFFFFFF
    assert len(set(spis)) == len(spis)
    with pytest.raises(ValueError):
        spi_for(a, b, -1)
