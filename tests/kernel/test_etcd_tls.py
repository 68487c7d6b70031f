"""etcd over TLS with client certificates: the plugin's store client works with the right files (reads, writes,
transactions, the watch stream) and is refused with a clear error with the wrong ones."""

import threading

import pytest

from store.kvstore import EtcdKV
from tests.harness.etcd import ETCD, free_port
from tests.harness.proc import Proc, wait_until
from tests.harness.tls import CA
from wire.errors import StoreUnavailable


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    files = {}
    for ca_name, prefix in (("ca", ""), ("rogue-ca", "rogue-")):
        ca = CA(d, ca_name)
        files[ca_name] = ca.path
        for role, server in (("server", True), ("client", False)):
            files[f"{prefix}{role}"], files[f"{prefix}{role}-key"] = ca.issue(role, server=server)
    port, peer = free_port(), free_port()
    url = f"https://127.0.0.1:{port}"
    proc = Proc.spawn([ETCD, "--name", "tls", "--data-dir", str(d / "data"),
                       "--listen-client-urls", url, "--advertise-client-urls", url,
                       "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                       "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                       "--initial-cluster", f"tls=http://127.0.0.1:{peer}",
                       "--cert-file", files["server"], "--key-file", files["server-key"],
                       "--client-cert-auth", "--trusted-ca-file", files["ca"]],
                      "tls etcd", str(d / "etcd.log"))
    try:
        good = EtcdKV([url], ca=files["ca"], cert=files["client"], key=files["client-key"])
        wait_until(lambda: good.revision() > 0, 20, "the TLS etcd to answer")
        yield url, files
    finally:
        proc.stop()


def test_the_right_certificates_work_for_every_primitive_and_the_watch(tls):
    url, f = tls
    kv = EtcdKV([url], ca=f["ca"], cert=f["client"], key=f["client-key"])
    start = kv.revision() + 1
    seen = []
    stream = kv.watch("/tls/", start)
    reader = threading.Thread(target=lambda: [seen.append(e) for e in stream], daemon=True)
    reader.start()
    assert kv.create("/tls/a", "1") and not kv.create("/tls/a", "2")
    assert kv.get("/tls/a").value == "1"
    kv.delete_prefix("/tls/")
    wait_until(lambda: len(seen) >= 2, 10, "the watch over TLS to deliver both events")
    stream.close()
    reader.join(5)
    assert [e.kind for e in seen[:2]] == ["put", "delete"]


@pytest.mark.parametrize("cert,key,ca", [
    ("rogue-client", "rogue-client-key", "ca"),  # a client certificate etcd's CA never signed
    (None, None, "ca"),  # no client certificate at all
    ("client", "client-key", "rogue-ca"),  # a CA that did not sign etcd's server certificate
])
def test_wrong_certificates_are_refused_with_a_clear_error(tls, cert, key, ca):
    url, f = tls
    kv = EtcdKV([url], ca=f[ca], cert=f.get(cert), key=f.get(key))
    with pytest.raises(StoreUnavailable) as err:
        kv.get("/tls/x")
    message = str(err.value)
    assert url in message and "TLS" in message, message
