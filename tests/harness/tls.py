"""Test certificates made with `cryptography`: a CA, server and client certificates it signs, written as PEM.

etcd 3.4's JSON gateway dials etcd's own gRPC port presenting the server certificate as a client one, so with
--client-cert-auth a server certificate needs clientAuth as well as serverAuth; a member's peer certificate is
both too (it accepts peers' connections and opens its own).
"""

import datetime
import ipaddress
import os
from typing import Sequence, Tuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def certificate(subject: str, issuer: str, issuer_key, key, *, ca: bool = False, server: bool = False,
                ips: Sequence[str] = ("127.0.0.1",)) -> x509.Certificate:
    """A certificate for key, signed by issuer_key, valid for a day. ca: a CA that signs certificates;
    server: serverAuth + clientAuth with IP SANs `ips`; otherwise a client certificate (clientAuth only)."""
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
    else:
        usage = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH] if server else \
            [ExtendedKeyUsageOID.CLIENT_AUTH]
        builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def write_pem(path, cert=None, key=None) -> str:
    """cert and/or key as PEM in path (mode 0600: it may hold a key); returns the path as str."""
    path = os.fspath(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        if cert is not None:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        if key is not None:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    return path


class CA:
    """A CA whose certificate is written to folder/<name>.pem (self.path); issue() signs certificates for it."""

    def __init__(self, folder, name: str = "ca"):
        self.folder = os.fspath(folder)
        self.name = name
        self._key = new_key()
        self.path = write_pem(os.path.join(self.folder, f"{name}.pem"),
                              certificate(name, name, self._key, self._key, ca=True))

    def issue(self, role: str, *, server: bool, ips: Sequence[str] = ("127.0.0.1",)) -> Tuple[str, str]:
        """A certificate for a new key, subject role: -> (certificate path, key path), both PEM in folder."""
        key = new_key()
        base = os.path.join(self.folder, f"{self.name}-{role}")
        return (write_pem(base + ".pem", certificate(role, self.name, self._key, key, server=server, ips=ips)),
                write_pem(base + "-key.pem", key=key))
