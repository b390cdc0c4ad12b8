"""Test recipients for intercept events: an RSA key and a self-signed certificate made at test
time with `cryptography`, and S/MIME decryption as a recorder would do it.

    from tests.intercept_certs import make_recipient
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class Recipient:
    cert: x509.Certificate
    key: rsa.RSAPrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def decrypt(self, der: bytes) -> str:
        """The MIME entity inside an S/MIME enveloped-data body ('Content-Type: ...' CRLF CRLF
        body) as text."""
        return pkcs7.pkcs7_decrypt_der(der, self.cert, self.key, []).decode("utf-8")

    def body(self, der: bytes) -> str:
        """Just the inner body (after the entity's headers)."""
        return self.decrypt(der).split("\r\n\r\n", 1)[1]


def make_recipient(cn: str = "recorder", bits: int = 2048) -> Recipient:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .sign(key, hashes.SHA256()))
    return Recipient(cert, key)
