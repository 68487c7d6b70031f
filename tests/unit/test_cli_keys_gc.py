"""`vxnet keys` and `vxnet gc` over FakeKV: what they print (tables and --json), their exit status, that key
material never appears, and that a dry run changes nothing."""

import io
import json

import pytest

from cli import context, main
from encrypt.keystore import KeyStore
from encrypt.ring import KeyringError
from netdriver.models import Endpoint
from netdriver.store import NetworkStore
from plugin import config
from tests.fakes import FakeKV
from wire.errors import ConfigError, StoreUnavailable

SECRET = bytes(range(32))
NET = "ab" * 32
EID = "cd" * 32


def vxnet(kv, argv, environ=None):
    """(exit status, output) of `vxnet argv` against kv: parsed by the real parser, run with a context whose
    etcd is kv (what cli/main.py does, but for the client it would build)."""
    args = main.parser().parse_args(argv)
    out = io.StringIO()
    settings = config.load_client(environ or {})
    ctx = context.Context(settings=settings, as_json=args.json, out=out, _kv=kv)
    return args.func(ctx, args), out.getvalue()


@pytest.fixture
def secret(tmp_path):
    path = tmp_path / "secret"
    path.write_text(SECRET.hex())
    return str(path)


def test_keys_status_rotate_prune_never_print_material(secret):
    kv = FakeKV()
    assert vxnet(kv, ["keys", "status", "--secret-file", secret]) == (
        0, "no key ring in etcd yet (the first plugin with a cluster secret creates it)\n")
    store = KeyStore(kv, SECRET)
    store.ensure(now=0.0)
    status, out = vxnet(kv, ["keys", "status", "--json", "--secret-file", secret])
    data = json.loads(out)
    assert status == 0 and (data["tags"], data["primary"], data["staged"], data["previous"]) == ([1, 2], 1, 2, None)
    assert data["rotated_at"] == "1970-01-01T00:00:00+00:00" and data["age_seconds"] > 10 ** 9
    status, out = vxnet(kv, ["keys", "rotate", "--secret-file", secret])
    assert status == 0 and out.startswith("rotated: keys 1 (previous), 2 (primary), 3 (staged)")
    status, out = vxnet(kv, ["keys", "rotate", "--secret-file", secret])  # at once again: refused
    assert status == 1 and out.startswith("not rotated")
    # The secret from the plugin's variable when no flag names one.
    status, out = vxnet(kv, ["keys", "prune"], {"VXNET_ENCRYPTION_SECRET_FILE": secret})
    assert status == 0 and out.startswith("pruned: keys 2 (primary), 3 (staged)")
    printed = "".join(vxnet(kv, ["keys", "status", *flags, "--secret-file", secret])[1] for flags in ([], ["--json"]))
    assert "(previous)" not in printed and '"previous": null' in printed
    for key in store.load().keys:
        for form in (key.material.hex(), key.material.hex().upper(), repr(key.material)):
            assert form not in out + printed


def test_keys_refuse_without_a_secret_or_with_the_wrong_one(tmp_path, secret):
    kv = FakeKV()
    KeyStore(kv, SECRET).ensure()
    with pytest.raises(ConfigError, match="--secret-file"):
        vxnet(kv, ["keys", "status"])
    wrong = tmp_path / "wrong"
    wrong.write_text(bytes(32).hex())
    with pytest.raises(KeyringError, match="does not open with this host's cluster secret"):
        vxnet(kv, ["keys", "status", "--secret-file", str(wrong)])


def test_main_says_could_not_run_for_a_missing_secret(tmp_path):
    err = io.StringIO()
    assert main.main(["keys", "status", "--etcd", "http://127.0.0.1:1"], environ={}, out=err) == 2


def test_gc_lists_on_dry_run_and_collects_without(monkeypatch):
    kv = FakeKV()
    store = NetworkStore(kv)
    lease = kv.lease_grant(30)
    assert store.register_host("gone", {"vtep": "192.0.2.9", "name": "node9"}, lease, 0)
    store.put_endpoint(Endpoint(NET, EID, "10.9.0.2/29", "02:00:00:00:00:09", "gone"))
    assert vxnet(kv, ["gc", "--dry-run"]) == (0, "no host is gone: nothing to collect\n")
    kv.expire(lease)
    revision = kv.rev
    status, out = vxnet(kv, ["gc", "--dry-run"])
    assert status == 0 and "host gone (name unknown, vtep ?): gone (not recorded yet" in out
    assert kv.rev == revision  # a dry run marks nothing
    status, out = vxnet(kv, ["gc"], {"VXNET_STALE_HOST_SECONDS": "1"})  # marks it gone from now
    assert status == 0 and "not stale yet, kept" in out and kv.rev == revision + 1
    since = json.loads(kv.data[store.keys.departed("gone")].value)["since"]
    old = json.dumps({"since": since - 5, "name": "", "vtep": ""})
    kv.put(store.keys.departed("gone"), old)  # five seconds on
    revision = kv.rev
    status, out = vxnet(kv, ["gc", "--dry-run", "--json"], {"VXNET_STALE_HOST_SECONDS": "1"})
    data = json.loads(out)
    assert status == 1 and kv.rev == revision
    assert [(h["host"], h["stale"], [hold["kind"] for hold in h["holds"]]) for h in data["hosts"]] == \
        [("gone", True, ["endpoint"])]
    status, out = vxnet(kv, ["gc"], {"VXNET_STALE_HOST_SECONDS": "1"})
    assert status == 0 and f"endpoint {EID[:12]} (10.9.0.2/29) of network {NET[:12]}: released" in out
    assert store.get_endpoint(NET, EID) is None and vxnet(kv, ["gc"])[0] == 0
    kv.unavailable = True
    with pytest.raises(StoreUnavailable):
        vxnet(kv, ["gc"])
