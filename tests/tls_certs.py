"""A throw-away PKI for TLS tests, made at test time with `cryptography`: a CA, server
certificates with DNS and IP subject alternative names, client certificates (mutual TLS).

    from tests.tls_certs import TestCa
    ca = TestCa("spitwall test CA")
    server = ca.issue("recorder.test", dns=["recorder.test"], ips=["127.0.0.1"])
    paths = server.write(tmp_path, "server")    # -> Paths(cert, key); ca.write(tmp_path)

Why not reuse `tests.intercept_certs`: those are self-signed S/MIME recipients; TLS needs a
chain (CA -> leaf) with SANs and key usages that OpenSSL's verifier accepts.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@dataclass(frozen=True)
class Paths:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Leaf:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self, password: bytes | None = None) -> bytes:
        enc: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(password) if password
            else serialization.NoEncryption())
        return self.key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8, enc)

    def write(self, directory: Path, stem: str, password: bytes | None = None) -> Paths:
        cert, key = directory / f"{stem}.crt", directory / f"{stem}.key"
        cert.write_bytes(self.cert_pem())
        key.write_bytes(self.key_pem(password))
        key.chmod(0o600)
        return Paths(cert, key)


class TestCa:
    """A CA that signs leaves (ECDSA P-256, valid from an hour ago for two days)."""

    __test__ = False  # not a pytest test class

    def __init__(self, cn: str = "spitwall test CA") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()),
                           critical=False)
            .sign(self.key, hashes.SHA256()))

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def write(self, directory: Path, stem: str = "ca") -> Path:
        path = directory / f"{stem}.crt"
        path.write_bytes(self.cert_pem())
        return path

    def issue(self, cn: str, *, dns: tuple[str, ...] | list[str] = (),
              ips: tuple[str, ...] | list[str] = (), client: bool = False) -> Leaf:
        """A leaf for a TLS server (``dns``/``ips`` SANs) or, with ``client``, a client."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(self.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=True, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]),
                critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.key.public_key()), critical=False))
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return Leaf(builder.sign(self.key, hashes.SHA256()), key)


@dataclass(frozen=True)
class RedisTls:
    """Certificates for redis-server processes that speak only TLS (a CA, a server certificate
    for 127.0.0.1/localhost, a client certificate for the servers' own links: replication, the
    cluster bus, sentinel to master)."""

    ca: Path
    server: Paths
    client: Paths

    @classmethod
    def make(cls, directory: Path) -> RedisTls:
        directory.mkdir(parents=True, exist_ok=True)
        ca = TestCa("spitwall redis test CA")
        return cls(ca.write(directory),
                   ca.issue("redis.test", dns=["localhost"], ips=["127.0.0.1"]).write(
                       directory, "server"),
                   ca.issue("redis-node", client=True).write(directory, "client"))

    def server_args(self) -> list[str]:
        """redis-server options (without the ports) for TLS on every link."""
        return ["--tls-cert-file", str(self.server.cert), "--tls-key-file", str(self.server.key),
                "--tls-client-cert-file", str(self.client.cert),
                "--tls-client-key-file", str(self.client.key),
                "--tls-ca-cert-file", str(self.ca), "--tls-auth-clients", "optional",
                "--tls-replication", "yes"]

    def client_kwargs(self) -> dict[str, object]:
        return {"ssl": True, "ssl_ca_certs": str(self.ca)}
