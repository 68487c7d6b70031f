"""etcd over TLS with client certificates: the plugin's store client works with the right files (reads, writes,
transactions, the watch stream) and is refused with a clear error with the wrong ones."""

import datetime
import ipaddress
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from store.kvstore import EtcdKV
from tests.harness.etcd import ETCD, free_port
from tests.harness.proc import Proc, wait_until
from wire.errors import StoreUnavailable


def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject, issuer, issuer_key, key, *, ca=False, server=False):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False),
            critical=True)
    if not ca:
        # etcd 3.4's JSON gateway dials etcd's own gRPC port presenting the server certificate as a client one,
        # so with --client-cert-auth the server certificate needs clientAuth as well.
        usage = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH] if server else \
            [ExtendedKeyUsageOID.CLIENT_AUTH]
        builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path, cert=None, key=None):
    with open(path, "wb") as f:
        if cert is not None:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        if key is not None:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    return path


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    files = {}
    for ca_name in ("ca", "rogue-ca"):
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = _cert(ca_name, ca_name, ca_key, ca_key, ca=True)
        files[ca_name] = _write(d / f"{ca_name}.pem", ca)
        for role, server in (("server", True), ("client", False)):
            key = ec.generate_private_key(ec.SECP256R1())
            prefix = "" if ca_name == "ca" else "rogue-"
            files[f"{prefix}{role}"] = _write(d / f"{prefix}{role}.pem",
                                              _cert(role, ca_name, ca_key, key, server=server))
            files[f"{prefix}{role}-key"] = _write(d / f"{prefix}{role}-key.pem", key=key)
    files = {k: str(v) for k, v in files.items()}
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
