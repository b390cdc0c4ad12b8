"""STIR/SHAKEN: Identity header parsing, PASSporT verification, the trust store, the check and
the out-of-band x5u fetcher. Every certificate and key is generated here with `cryptography`."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import http.server
import json
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from lists.matcher import ListSnapshot
from scoring import stir as s
from scoring.checks import stir as stir_check
from scoring.checks.base import Context
from scoring.model import Signals
from scoring.stir import (
    FetchError,
    IdentityHeader,
    TrustStore,
    b64url,
    fetch_x5u,
    leaf_filename,
    same_number,
    verify,
    write_leaf,
)
from tests.unit.scoring.support import attempt, config

NOW = float(int(time.time()))
X5U = "https://cert.example/sti/leaf.pem"
CALLER = "12025550100"
CALLEE = "12025550199"

# ---------------------------------------------------------------------------------------------
# a small PKI, generated at test time

Key = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_cert(subject: str, key: Key, issuer: tuple[x509.Certificate, Key] | None = None, *,
              ca: bool = False, days: tuple[float, float] = (-1, 365),
              digital_signature: bool = True) -> x509.Certificate:
    """A certificate for `key`, signed by `issuer` (or self-signed)."""
    now = dt.datetime.fromtimestamp(NOW, dt.UTC)
    issuer_name = issuer[0].subject if issuer else _name(subject)
    signing_key = issuer[1] if issuer else key
    b = (x509.CertificateBuilder()
         .subject_name(_name(subject))
         .issuer_name(issuer_name)
         .public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(now + dt.timedelta(days=days[0]))
         .not_valid_after(now + dt.timedelta(days=days[1]))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
         .add_extension(x509.KeyUsage(
             digital_signature=digital_signature, content_commitment=False,
             key_encipherment=False, data_encipherment=False, key_agreement=False,
             key_cert_sign=ca, crl_sign=ca, encipher_only=False, decipher_only=False),
             critical=True))
    return b.sign(signing_key, hashes.SHA256())


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def p256() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@dataclass
class Pki:
    ca_key: ec.EllipticCurvePrivateKey = field(default_factory=p256)
    leaf_key: ec.EllipticCurvePrivateKey = field(default_factory=p256)
    ca: x509.Certificate = field(init=False)
    leaf: x509.Certificate = field(init=False)

    def __post_init__(self) -> None:
        self.ca = make_cert("Test STI-CA", self.ca_key, ca=True)
        self.leaf = make_cert("Test SP", self.leaf_key, (self.ca, self.ca_key))

    def store(self, **kw: Any) -> TrustStore:
        t = TrustStore([self.ca], **kw)
        t.add_leaf(X5U, pem(self.leaf))
        return t


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki()


@pytest.fixture
def trust(pki: Pki) -> TrustStore:
    return pki.store()


@pytest.fixture(autouse=True)
def _fresh_check_cache() -> Iterator[None]:
    stir_check.reset()
    yield
    stir_check.reset()


# ---------------------------------------------------------------------------------------------
# PASSporT builders


def jose(**over: Any) -> dict[str, Any]:
    h: dict[str, Any] = {"alg": "ES256", "typ": "passport", "ppt": "shaken", "x5u": X5U}
    h.update(over)
    return {k: v for k, v in h.items() if v is not None}


def claims(**over: Any) -> dict[str, Any]:
    c: dict[str, Any] = {"attest": "A", "dest": {"tn": [CALLEE]}, "iat": int(NOW),
                         "orig": {"tn": CALLER}, "origid": "123e4567-e89b-12d3-a456-426614174000"}
    c.update(over)
    return {k: v for k, v in c.items() if v is not None}


def enc(obj: Any) -> str:
    return b64url(json.dumps(obj, separators=(",", ":")).encode())


def es256(key: ec.EllipticCurvePrivateKey, signing_input: bytes) -> str:
    r, sv = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
    return b64url(r.to_bytes(32, "big") + sv.to_bytes(32, "big"))


def jws(key: ec.EllipticCurvePrivateKey, header: dict[str, Any] | None = None,
        payload: dict[str, Any] | None = None) -> str:
    si = f"{enc(header or jose())}.{enc(payload or claims())}"
    return f"{si}.{es256(key, si.encode())}"


def identity(token: str, info: str = X5U, params: str = ";alg=ES256;ppt=shaken") -> str:
    return f"{token};info=<{info}>{params}"


def signed(pki: Pki, **claim_over: Any) -> str:
    return identity(jws(pki.leaf_key, payload=claims(**claim_over)))


def run(text: str, trust: TrustStore | None, *, orig: str | tuple[str, ...] = CALLER,
        dest: str = CALLEE, now: float = NOW, max_age: float = 60) -> s.Verification:
    return verify(text, orig_tn=orig, dest_tn=dest, now=now, max_age=max_age, trust=trust)


# ---------------------------------------------------------------------------------------------
# valid PASSporTs


@pytest.mark.parametrize("attest", ["A", "B", "C"])
def test_valid_passport_verifies_with_its_attestation(pki: Pki, trust: TrustStore,
                                                      attest: str) -> None:
    v = run(signed(pki, attest=attest), trust)
    assert (v.status, v.attest, v.reason) == ("verified", attest, "signature verified")
    assert v.passport is not None
    assert v.passport.claims.orig_tn == CALLER
    assert v.passport.header.x5u == X5U


def test_pyjwt_signed_passport_verifies(pki: Pki, trust: TrustStore) -> None:
    """An independent encoder (PyJWT) produces what we accept: R||S, base64url, JOSE header."""
    token = jwt.encode(claims(), pki.leaf_key, algorithm="ES256",
                       headers={"typ": "passport", "ppt": "shaken", "x5u": X5U})
    v = run(identity(token), trust)
    assert v.status == "verified", v.reason


def test_parse_reads_parameters_in_any_order_quoted_and_bare(pki: Pki) -> None:
    token = jws(pki.leaf_key)
    variants = [
        f"{token};info=<{X5U}>;alg=ES256;ppt=shaken",
        f'{token} ; ppt="shaken" ; info={X5U} ; alg="ES256"',
        f"{token};ppt=shaken;info=<{X5U}>",  # alg absent: ES256 by default (RFC 8224)
        f"  {token};info=<{X5U}>;ppt=shaken;x-ext=1;flag  ",
    ]
    for text in variants:
        h = IdentityHeader.parse(text)
        assert (h.info, h.alg, h.ppt, h.jws) == (X5U, "ES256", "shaken", token), text
        assert h.passport.claims.attest == "A"
        assert len(h.signature) == 64


def test_normalised_numbers_match(pki: Pki, trust: TrustStore) -> None:
    text = identity(jws(pki.leaf_key, payload=claims(orig={"tn": "+1-202-555-0100"})))
    assert run(text, trust, orig="+12025550100",
               dest="+12025550199;npdi;rn=+12025550000").status == "verified"
    # the From user is a name, the P-Asserted-Identity carries the number
    assert run(signed(pki), trust, orig=("alice", "+12025550100")).status == "verified"
    # national forms without '+' compare by suffix
    assert run(signed(pki), trust, orig="2025550100", dest="2025550199").status == "verified"


@pytest.mark.parametrize(("tn", "presented", "same"), [
    ("12025550100", "12025550100", True),
    ("12025550100", "+12025550100", True),
    ("12025550100", "2025550100", True),
    ("4930123456789", "030123456789", True),
    ("4930123456789", "004930123456789", True),
    ("12025550100", "+2025550100", False),  # '+' means international: no suffix rule
    ("12025550100", "5550100", False),  # 4 digits of prefix missing: too loose
    ("12025550100", "550100", False),
    ("44123456", "123456", False),  # suffix shorter than 7 digits
    ("441234567", "1234567", True),
    ("12025550100", "12025550101", False),
    ("12025550100", "alice", False),
    ("12025550100", "", False),
])
def test_same_number(tn: str, presented: str, same: bool) -> None:
    assert same_number(tn, presented) is same


# ---------------------------------------------------------------------------------------------
# forged, wrong algorithm, stale, mismatched: invalid


def test_forged_signature_is_invalid(pki: Pki, trust: TrustStore) -> None:
    v = run(identity(jws(p256())), trust)
    assert (v.status, v.attest, v.reason) == ("invalid", None, "signature does not verify")


def test_tampered_claims_are_invalid(pki: Pki, trust: TrustStore) -> None:
    h, _p, sig = jws(pki.leaf_key, payload=claims(attest="C")).split(".")
    v = run(identity(f"{h}.{enc(claims(attest='A'))}.{sig}"), trust)
    assert (v.status, v.reason) == ("invalid", "signature does not verify")


def test_signature_bits_flipped_is_invalid(pki: Pki, trust: TrustStore) -> None:
    h, p, sig = jws(pki.leaf_key).split(".")
    raw = bytearray(s._b64url_decode(sig, "sig"))
    raw[40] ^= 1
    assert run(identity(f"{h}.{p}.{b64url(bytes(raw))}"), trust).status == "invalid"


def test_hs256_with_the_public_key_as_secret_is_invalid(pki: Pki, trust: TrustStore) -> None:
    secret = pki.leaf.public_key().public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
    si = f"{enc(jose(alg='HS256'))}.{enc(claims())}"
    token = f"{si}.{b64url(hmac.new(secret, si.encode(), hashlib.sha256).digest())}"
    for params in (";alg=ES256;ppt=shaken", ";alg=HS256;ppt=shaken"):
        v = run(identity(token, params=params), trust)
        assert v.status == "invalid"
        assert "HS256" in v.reason and "ES256 only" in v.reason


def test_alg_none_is_invalid(trust: TrustStore) -> None:
    token = f"{enc(jose(alg='none'))}.{enc(claims())}."
    v = run(identity(token), trust)
    assert v.status == "invalid"
    assert v.reason == "JOSE alg 'none' not allowed (ES256 only)"


def test_rs256_is_invalid(trust: TrustStore) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode(claims(), rsa_key, algorithm="RS256",
                       headers={"typ": "passport", "ppt": "shaken", "x5u": X5U})
    v = run(identity(token, params=";ppt=shaken"), trust)
    assert v.status == "invalid"
    assert "'RS256' not allowed" in v.reason


@pytest.mark.parametrize("alg_param", ["none", "RS256", "es256"])
def test_alg_parameter_other_than_es256_is_invalid(pki: Pki, trust: TrustStore,
                                                   alg_param: str) -> None:
    v = run(identity(jws(pki.leaf_key), params=f";alg={alg_param};ppt=shaken"), trust)
    assert v.status == "invalid"
    assert v.reason == f"alg parameter '{alg_param}' not allowed (ES256 only)"


def test_stale_iat_is_invalid(pki: Pki, trust: TrustStore) -> None:
    v = run(signed(pki, iat=int(NOW) - 900), trust)
    assert (v.status, v.reason) == ("invalid", "iat 900 s old (max 60 s)")


def test_future_iat_is_invalid(pki: Pki, trust: TrustStore) -> None:
    v = run(signed(pki, iat=int(NOW) + 120), trust)
    assert (v.status, v.reason) == ("invalid", "iat 120 s in the future")


def test_iat_boundaries_allow_small_clock_skew(pki: Pki, trust: TrustStore) -> None:
    skew = int(s.CLOCK_SKEW)
    assert run(signed(pki, iat=int(NOW) - 60 - skew), trust).status == "verified"
    assert run(signed(pki, iat=int(NOW) - 61 - skew), trust).status == "invalid"
    assert run(signed(pki, iat=int(NOW) + skew), trust).status == "verified"
    assert run(signed(pki, iat=int(NOW) + skew + 1), trust).status == "invalid"


def test_orig_mismatch_is_invalid(pki: Pki, trust: TrustStore) -> None:
    v = run(signed(pki), trust, orig=("12025550111", "alice"))
    assert v.status == "invalid"
    assert v.reason == "orig.tn 12025550100 does not match caller '12025550111', 'alice'"


def test_dest_mismatch_is_invalid(pki: Pki, trust: TrustStore) -> None:
    """A PASSporT replayed towards another callee."""
    v = run(signed(pki), trust, dest="12025550177")
    assert (v.status, v.reason) == ("invalid", "dest.tn does not contain callee '12025550177'")


def test_dest_list_may_hold_several_numbers(pki: Pki, trust: TrustStore) -> None:
    text = signed(pki, dest={"tn": ["12025550111", CALLEE]})
    assert run(text, trust).status == "verified"
    assert run(text, trust, dest="12025550111").status == "verified"
    assert run(text, trust, dest="12025550122").status == "invalid"


def test_info_must_equal_x5u(pki: Pki, trust: TrustStore) -> None:
    v = run(identity(jws(pki.leaf_key), info="https://other.example/leaf.pem"), trust)
    assert (v.status, v.reason) == ("invalid", "info parameter differs from x5u")


def test_stale_claims_are_invalid_even_when_unverifiable(pki: Pki) -> None:
    v = run(signed(pki, iat=int(NOW) - 900), TrustStore([pki.ca]))
    assert v.status == "invalid"


# ---------------------------------------------------------------------------------------------
# trust: unverified


def test_leaf_not_chaining_to_the_trust_store_is_unverified(pki: Pki) -> None:
    selfsigned = make_cert("Self SP", pki.leaf_key)
    trust = TrustStore([pki.ca])
    with pytest.raises(ValueError, match="does not chain to a trusted CA"):
        trust.add_leaf(X5U, pem(selfsigned))
    v = run(signed(pki), trust)
    assert (v.status, v.attest) == ("unverified", "A")
    assert v.reason == "certificate rejected: does not chain to a trusted CA"
    assert trust.leaf_for(X5U) is None


def test_leaf_from_an_untrusted_ca_is_unverified(pki: Pki) -> None:
    other_key = p256()
    other = make_cert("Test STI-CA", other_key, ca=True)  # same name, other key
    leaf = make_cert("Test SP", pki.leaf_key, (other, other_key))
    trust = TrustStore([pki.ca])
    with pytest.raises(ValueError, match="chain"):
        trust.add_leaf(X5U, pem(leaf))
    assert run(signed(pki), trust).status == "unverified"


def test_cold_cache_is_unverified(pki: Pki) -> None:
    v = run(signed(pki), TrustStore([pki.ca]))
    assert (v.status, v.attest, v.reason) == ("unverified", "A", "certificate not cached")


def test_no_trust_store_is_unverified(pki: Pki) -> None:
    v = run(signed(pki), None)
    assert (v.status, v.reason) == ("unverified", "no trust store configured")


def test_store_without_cas_is_unverified(pki: Pki) -> None:
    v = run(signed(pki), TrustStore())
    assert (v.status, v.reason) == ("unverified", "no trusted CA certificates")


def test_intermediate_from_the_bundle_is_one_allowed_level(pki: Pki) -> None:
    ik = p256()
    inter = make_cert("Test Intermediate", ik, (pki.ca, pki.ca_key), ca=True)
    leaf = make_cert("Test SP", pki.leaf_key, (inter, ik))
    trust = TrustStore([pki.ca])
    with pytest.raises(ValueError, match="chain"):
        trust.add_leaf(X5U, pem(leaf))  # without the intermediate
    assert trust.add_leaf(X5U, pem(leaf, inter)) == leaf
    assert run(signed(pki), trust).status == "verified"


def test_intermediate_that_is_not_a_ca_is_refused(pki: Pki) -> None:
    ik = p256()
    inter = make_cert("Test Intermediate", ik, (pki.ca, pki.ca_key), ca=False)
    leaf = make_cert("Test SP", pki.leaf_key, (inter, ik))
    with pytest.raises(ValueError, match="chain"):
        TrustStore([pki.ca]).add_leaf(X5U, pem(leaf, inter))


def test_two_intermediate_levels_are_refused(pki: Pki) -> None:
    k1, k2 = p256(), p256()
    i1 = make_cert("Inter 1", k1, (pki.ca, pki.ca_key), ca=True)
    i2 = make_cert("Inter 2", k2, (i1, k1), ca=True)
    leaf = make_cert("Test SP", pki.leaf_key, (i2, k2))
    with pytest.raises(ValueError, match="chain"):
        TrustStore([pki.ca]).add_leaf(X5U, pem(leaf, i2, i1))


@pytest.mark.parametrize(("key", "match"), [
    (lambda: ec.generate_private_key(ec.SECP384R1()), "not EC P-256"),
    (lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048), "not EC P-256"),
])
def test_leaf_key_must_be_p256(pki: Pki, key: Any, match: str) -> None:
    leaf = make_cert("Test SP", key(), (pki.ca, pki.ca_key))
    with pytest.raises(ValueError, match=match):
        TrustStore([pki.ca]).add_leaf(X5U, pem(leaf))


def test_leaf_that_is_a_ca_or_cannot_sign_is_refused(pki: Pki) -> None:
    trust = TrustStore([pki.ca])
    with pytest.raises(ValueError, match="leaf is a CA"):
        trust.add_leaf(X5U, pem(make_cert("SP", p256(), (pki.ca, pki.ca_key), ca=True)))
    with pytest.raises(ValueError, match="digitalSignature"):
        trust.add_leaf(X5U, pem(make_cert("SP", p256(), (pki.ca, pki.ca_key),
                                          digital_signature=False)))


def test_validity_dates(pki: Pki) -> None:
    trust = TrustStore([pki.ca])
    expired = make_cert("SP", pki.leaf_key, (pki.ca, pki.ca_key), days=(-30, -1))
    with pytest.raises(ValueError, match="expired"):
        trust.add_leaf(X5U, pem(expired))
    future = make_cert("SP", pki.leaf_key, (pki.ca, pki.ca_key), days=(1, 30))
    with pytest.raises(ValueError, match="not yet valid"):
        trust.add_leaf(X5U, pem(future))
    # valid when cached, expired by the time of the call
    short = make_cert("SP", pki.leaf_key, (pki.ca, pki.ca_key), days=(-1, 1))
    trust.add_leaf(X5U, pem(short))
    later = NOW + 2 * 86400
    assert run(signed(pki, iat=int(later)), trust, now=later).status == "unverified"
    assert run(signed(pki), trust).status == "unverified"  # dropped from the cache


def test_expired_ca_makes_its_leaves_unverified(pki: Pki) -> None:
    ca_key = p256()
    ca = make_cert("Old CA", ca_key, ca=True, days=(-10, 0.5))
    leaf = make_cert("SP", pki.leaf_key, (ca, ca_key), days=(-1, 365))
    trust = TrustStore([ca])
    trust.add_leaf(X5U, pem(leaf))
    assert run(signed(pki), trust).status == "verified"
    later = NOW + 86400
    v = run(signed(pki, iat=int(later)), trust, now=later)
    assert v.status == "unverified"


def test_leaf_for_returns_the_cached_certificate(pki: Pki, trust: TrustStore) -> None:
    assert trust.leaf_for(X5U) == pki.leaf
    assert trust.leaf_for("https://cert.example/other.pem") is None


def test_cache_is_bounded(pki: Pki) -> None:
    trust = TrustStore([pki.ca], max_leaves=3)
    for i in range(5):
        trust.add_leaf(f"https://cert.example/{i}.pem", pem(pki.leaf))
    assert trust.leaf_for("https://cert.example/0.pem") is None
    assert trust.leaf_for("https://cert.example/4.pem") == pki.leaf
    assert len(trust._leaves) == 3


def test_non_ca_certificate_cannot_be_an_anchor(pki: Pki) -> None:
    with pytest.raises(ValueError, match="not a CA"):
        TrustStore([pki.leaf])


# ---------------------------------------------------------------------------------------------
# the trust directory: CA files and <sha256(x5u)>.leaf.pem files


def test_leaf_filename_is_the_sha256_of_the_url() -> None:
    assert leaf_filename(X5U) == hashlib.sha256(X5U.encode()).hexdigest() + ".leaf.pem"
    assert leaf_filename("https://a/../../etc/passwd").count("/") == 0


def test_trust_directory_loads_cas_and_leaf_files(pki: Pki, tmp_path: Path) -> None:
    (tmp_path / "sti-ca.pem").write_bytes(pem(pki.ca))
    write_leaf(tmp_path, X5U, pem(pki.leaf))
    (tmp_path / "notes.txt").write_text("ignored")
    trust = TrustStore.load(tmp_path)
    assert trust.ca_count == 1  # the .leaf.pem file is not a CA
    assert trust.errors == []
    assert run(signed(pki), trust).status == "verified"
    assert (tmp_path / leaf_filename(X5U)).is_file()


def test_leaf_file_written_later_is_picked_up_after_the_miss_ttl(pki: Pki,
                                                                tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_bytes(pem(pki.ca))
    trust = TrustStore.load(tmp_path, miss_ttl=3600)
    assert run(signed(pki), trust).reason == "certificate not cached"
    write_leaf(tmp_path, X5U, pem(pki.leaf))
    assert run(signed(pki), trust).status == "unverified"  # miss remembered
    trust.miss_ttl = 0
    trust._misses.clear()
    assert run(signed(pki), trust).status == "verified"


def test_bad_leaf_file_is_unverified_with_a_reason(pki: Pki, tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_bytes(pem(pki.ca))
    write_leaf(tmp_path, X5U, pem(make_cert("Self", pki.leaf_key)))
    v = run(signed(pki), TrustStore.load(tmp_path))
    assert (v.status, v.reason) == ("unverified",
                                    "certificate rejected: does not chain to a trusted CA")
    write_leaf(tmp_path, X5U, b"garbage")
    v = run(signed(pki), TrustStore.load(tmp_path))
    assert v.status == "unverified" and v.reason.startswith("certificate rejected: no")


def test_trust_directory_problems_are_reported_not_raised(pki: Pki, tmp_path: Path) -> None:
    (tmp_path / "a.pem").write_bytes(pem(pki.ca))
    (tmp_path / "b.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\nnope\n-----END")
    (tmp_path / "c.crt").write_bytes(pem(pki.leaf))
    trust = TrustStore.load(tmp_path)
    assert trust.ca_count == 1
    assert [e.split(":")[0] for e in trust.errors] == ["b.pem", "c.crt"]
    missing = TrustStore.load(tmp_path / "nope")
    assert missing.ca_count == 0 and missing.errors
    assert run(signed(pki), missing).status == "unverified"


def test_write_leaf_refuses_oversized(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="limit"):
        write_leaf(tmp_path, X5U, b"x" * (s.MAX_CERT_BYTES + 1))
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# malformed headers: invalid, never an exception


def _malformed(pki: Pki) -> list[tuple[str, str, str]]:
    good = jws(pki.leaf_key)
    h, p, sig = good.split(".")
    big = enc(claims(origid="x" * 100_000))
    dup = b64url(b'{"attest":"A","attest":"C"}')
    not_utf8 = b64url(b'{"a":"\xff"}')
    nan = b64url(json.dumps(claims(iat=float("nan"))).encode())
    return [
        ("missing info", f"{good};alg=ES256;ppt=shaken", "info parameter missing"),
        ("bad info", f"{good};info=<ftp://x/y>;ppt=shaken", "is not an http(s) URL"),
        ("missing ppt", f"{good};info=<{X5U}>;alg=ES256", "ppt parameter missing"),
        ("ppt div", f"{good};info=<{X5U}>;ppt=div", "ppt parameter 'div' is not 'shaken'"),
        ("dup param", f"{good};info=<{X5U}>;ppt=shaken;ppt=shaken", "duplicate ppt"),
        ("junk param", f"{good};info=<{X5U}>;ppt=shaken;<x>", "malformed header parameter"),
        ("two parts", identity(f"{h}.{p}"), "JWS has 2 part(s)"),
        ("four parts", identity(f"{good}.{sig}"), "JWS has 4 part(s)"),
        ("empty header", identity(f".{p}.{sig}"), "JWS header part is empty"),
        ("compact form", identity(f"{h}..{sig}"), "compact form"),
        ("no signature", identity(f"{h}.{p}."), "signature part is empty"),
        ("bad base64", identity(f"{h}.{p[:-4]}*!{p[-2:]}.{sig}"), "payload is not base64url"),
        ("padded base64", identity(f"{h}.{p}==.{sig}"), "payload is not base64url"),
        ("bad b64 length", identity(f"{h}.{p}A.{sig}") if len(p) % 4 == 0
         else identity(f"{h}.{p[:len(p) - len(p) % 4]}A.{sig}"), "impossible base64url length"),
        ("non-canonical b64", identity(f"{h}.{b64url(b'{}')[:-1]}D.{sig}"), "not canonical"),
        ("short signature", identity(f"{h}.{p}.{sig[:43]}"), "ES256 needs 86"),
        ("100 KB payload", identity(f"{h}.{big}.{sig}"), "limit 4096"),
        ("3 KB payload", identity(f"{h}.{enc(claims(origid='x' * 2100))}.{sig}"),
         "payload exceeds 2048 bytes"),
        ("non-JSON", identity(f"{h}.{b64url(b'attest=A')}.{sig}"), "payload is not JSON"),
        ("JSON array", identity(f"{h}.{enc([claims()])}.{sig}"),
         "payload is a JSON list, expected an object"),
        ("JSON string header", identity(f"{enc('ES256')}.{p}.{sig}"),
         "JOSE header is a JSON str"),
        ("deep JSON", identity(f"{h}.{b64url(b'[' * 1500)}.{sig}"), "nests too deeply"),
        ("NaN iat", identity(f"{h}.{nan}.{sig}"), "NaN is not JSON"),
        ("duplicate key", identity(f"{h}.{dup}.{sig}"), "duplicate key 'attest'"),
        ("not UTF-8", identity(f"{h}.{not_utf8}.{sig}"), "not UTF-8"),
        ("non-ASCII", identity(good) + ";x=\u00e9", "non-ASCII"),
        ("non-ASCII in token", identity(good.replace("e", "\u0435", 1)), "non-ASCII"),
        ("control char", identity(good) + "\r\nX-Evil: 1", "control characters"),
        ("typ", identity(jws(pki.leaf_key, jose(typ="JWT"))), "typ 'JWT'"),
        ("JOSE ppt", identity(jws(pki.leaf_key, jose(ppt="div"))), "JOSE ppt 'div'"),
        ("crit", identity(jws(pki.leaf_key, jose(crit=["ppt"]))), "crit"),
        ("no x5u", identity(jws(pki.leaf_key, jose(x5u=None))), "x5u None"),
        ("attest D", signed(pki, attest="D"), "attest 'D' is not A, B or C"),
        ("no dest", signed(pki, dest=None), "dest claim missing"),
        ("dest tn str", signed(pki, dest={"tn": CALLEE}), "dest.tn missing"),
        ("dest tn empty", signed(pki, dest={"tn": []}), "dest.tn missing"),
        ("dest uri only", signed(pki, dest={"uri": ["sip:bob@x"]}), "dest.tn missing"),
        ("dest not number", signed(pki, dest={"tn": ["bob"]}), "not a telephone number"),
        ("orig too long", signed(pki, orig={"tn": "1" * 16}), "orig.tn"),
        ("orig number", signed(pki, orig={"tn": 12025550100}), "orig.tn 12025550100 is not"),
        ("iat string", signed(pki, iat=str(int(NOW))), "iat"),
        ("iat bool", signed(pki, iat=True), "iat True is not a number"),
        ("no origid", signed(pki, origid=None), "origid missing"),
        ("no JWS", f";info=<{X5U}>;ppt=shaken", "PASSporT (JWS) missing"),
        ("only commas", " , ,", "empty Identity header"),
    ]


def test_malformed_headers_are_invalid_never_an_exception(pki: Pki, trust: TrustStore) -> None:
    cases = _malformed(pki)
    assert len({name for name, _, _ in cases}) == len(cases)
    for name, text, fragment in cases:
        v = run(text, trust)
        assert v.status == "invalid", (name, v)
        assert fragment in v.reason, (name, v.reason)
        assert v.attest is None
        assert len(v.reason) < 120, (name, v.reason)
        if name != "only commas":
            with pytest.raises(ValueError):
                IdentityHeader.parse(text)


def test_absent_header(trust: TrustStore) -> None:
    for text in ("", "   "):
        v = run(text, trust)
        assert (v.status, v.attest) == ("absent", None)


def test_several_values_joined_by_commas(pki: Pki, trust: TrustStore) -> None:
    div = f"{jws(pki.leaf_key)};info=<{X5U}>;ppt=div"
    assert run(f"{div}, {signed(pki)}", trust).status == "verified"
    v = run(f"{div},{div}", trust)
    assert (v.status, v.reason) == ("invalid", "ppt parameter 'div' is not 'shaken'")


def test_random_mutations_never_raise(pki: Pki, trust: TrustStore) -> None:
    good = signed(pki)
    rng = random.Random(8224)
    alphabet = "A-_.;=<>\",:{}[]\\ \t\x00\u00e9+"
    seen = set()
    for _ in range(3000):
        chars = list(good)
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(chars))
            op = rng.random()
            if op < 0.4:
                chars[i] = rng.choice(alphabet)
            elif op < 0.7:
                del chars[i]
            else:
                chars.insert(i, rng.choice(alphabet))
        v = run("".join(chars), trust)
        assert v.status in ("verified", "invalid", "unverified"), v
        seen.add(v.status)
    assert "invalid" in seen


def test_verify_never_raises_on_internal_errors(pki: Pki) -> None:
    class Broken(TrustStore):
        def lookup(self, x5u: str, now: float) -> Any:
            raise RuntimeError("bug")

    v = run(signed(pki), Broken([pki.ca]))
    assert (v.status, v.reason) == ("unverified", "verification error: RuntimeError")


# ---------------------------------------------------------------------------------------------
# the check


def check_ctx(identity_text: str, trust_dir: str = "", *, now: float = NOW,
              **att: Any) -> Context:
    fields: dict[str, Any] = {"from_user": "+" + CALLER, "ruri_user": CALLEE,
                              "identity": identity_text, "has_identity": bool(identity_text)}
    fields.update(att)
    cfg = config(stir__trust_dir=trust_dir) if trust_dir else config()
    return Context(attempt(**fields), Signals(), cfg, ListSnapshot.empty(), now=now)


@pytest.fixture
def trust_dir(trust: TrustStore, tmp_path: Path) -> str:
    path = str(tmp_path)
    stir_check.install_trust_store(path, trust)
    return path


@pytest.mark.parametrize(("attest", "score"), [("A", 0.0), ("B", 0.15), ("C", 0.3)])
def test_check_scores_verified_attestations(pki: Pki, trust_dir: str, attest: str,
                                            score: float) -> None:
    r = stir_check.check(check_ctx(signed(pki, attest=attest), trust_dir))
    assert (r.name, r.score, r.reason) == ("stir", score, f"SHAKEN {attest} verified")


def test_check_scores_ordering(pki: Pki, trust_dir: str) -> None:
    a = stir_check.check(check_ctx(signed(pki, attest="A"), trust_dir))
    c = stir_check.check(check_ctx(signed(pki, attest="C"), trust_dir))
    absent = stir_check.check(check_ctx("", trust_dir))
    unverified = stir_check.check(check_ctx(identity(jws(pki.leaf_key, jose(
        x5u="https://cert.example/unknown.pem")), info="https://cert.example/unknown.pem"),
        trust_dir))
    forged = stir_check.check(check_ctx(identity(jws(p256())), trust_dir))
    assert a.score < absent.score < invalid_score(forged)
    assert a.score < c.score < unverified.score < forged.score
    assert absent.score == 0.25 and absent.reason == "no Identity header"
    assert unverified.score == 0.35
    assert unverified.reason == "SHAKEN A unverified: certificate not cached"
    assert forged.reason == "Identity invalid: signature does not verify"


def invalid_score(r: Any) -> float:
    assert r.score == 1.0
    return float(r.score)


def test_check_reason_for_stale_iat(pki: Pki, trust_dir: str) -> None:
    r = stir_check.check(check_ctx(signed(pki, iat=int(NOW) - 900), trust_dir))
    assert (r.score, r.reason) == (1.0, "Identity invalid: iat 900 s old (max 60 s)")


def test_check_uses_the_configured_max_age(pki: Pki, trust_dir: str) -> None:
    text = signed(pki, iat=int(NOW) - 300)
    assert stir_check.check(check_ctx(text, trust_dir)).score == 1.0
    ctx = check_ctx(text, trust_dir)
    cfg = config(stir__trust_dir=trust_dir, stir__max_age="600")
    ctx = Context(ctx.attempt, ctx.signals, cfg, ctx.lists, now=NOW)
    assert stir_check.check(ctx).score == 0.0


def test_check_absent_score_is_configurable(trust_dir: str) -> None:
    base = check_ctx("", trust_dir)
    for value, reason in (("0", ""), ("0.6", "no Identity header")):
        cfg = config(stir__trust_dir=trust_dir, stir__absent_score=value)
        r = stir_check.check(Context(base.attempt, base.signals, cfg, base.lists, now=NOW))
        assert (r.score, r.reason) == (float(value), reason)


def test_check_reads_pai_and_ruri(pki: Pki, trust_dir: str) -> None:
    text = signed(pki)
    ok = check_ctx(text, trust_dir, from_user="alice", pai="<sip:+12025550100@carrier.example>")
    assert stir_check.check(ok).score == 0.0
    wrong_callee = check_ctx(text, trust_dir, ruri_user="12025550177", to_user=CALLEE)
    assert stir_check.check(wrong_callee).score == 1.0
    wrong_caller = check_ctx(text, trust_dir, from_user="12025550111")
    assert stir_check.check(wrong_caller).reason.startswith("Identity invalid: orig.tn")


def test_check_without_trust_dir_scores_unverified(pki: Pki) -> None:
    r = stir_check.check(check_ctx(signed(pki)))
    assert (r.score, r.reason) == (0.35, "SHAKEN A unverified: no trust store configured")


def test_check_uses_wall_clock_when_context_has_no_time(pki: Pki, trust_dir: str) -> None:
    r = stir_check.check(check_ctx(signed(pki, iat=int(time.time())), trust_dir, now=0.0))
    assert r.score == 0.0
    r = stir_check.check(check_ctx(signed(pki, iat=int(time.time()) - 3000), trust_dir, now=0.0))
    assert r.score == 1.0


def test_check_loads_the_trust_dir_once_and_again_on_change(pki: Pki, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           ) -> None:
    first, second = tmp_path / "one", tmp_path / "two"
    for d in (first, second):
        d.mkdir()
        (d / "ca.pem").write_bytes(pem(pki.ca))
        write_leaf(d, X5U, pem(pki.leaf))
    loads: list[str] = []
    real = TrustStore.load

    def counting(directory: Any, **kw: Any) -> TrustStore:
        loads.append(str(directory))
        return real(directory, **kw)

    monkeypatch.setattr(TrustStore, "load", staticmethod(counting))
    for d in (first, first, first, second, second, first):
        r = stir_check.check(check_ctx(signed(pki), str(d)))
        assert r.score == 0.0, r.reason
    assert loads == [str(first), str(second), str(first)]


def test_check_caches_the_leaf_key(pki: Pki, tmp_path: Path) -> None:
    """After the first call the leaf file is not read again."""
    (tmp_path / "ca.pem").write_bytes(pem(pki.ca))
    leaf = write_leaf(tmp_path, X5U, pem(pki.leaf))
    assert stir_check.check(check_ctx(signed(pki), str(tmp_path))).score == 0.0
    leaf.unlink()
    assert stir_check.check(check_ctx(signed(pki), str(tmp_path))).score == 0.0


def test_check_is_local() -> None:
    assert stir_check.name == "stir"
    assert stir_check.shared is False


# ---------------------------------------------------------------------------------------------
# the out-of-band x5u fetcher


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    bodies: ClassVar[dict[str, tuple[bytes, bool]]] = {}
    seen: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.seen.append(self.path)
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "http://evil.example/leaf.pem")
            self.end_headers()
            return
        if self.path in ("/endless.pem", "/slow.pem"):
            self.send_response(200)
            self.end_headers()
            chunk, pause = (b"z" * 1024, 0.001) if self.path == "/endless.pem" else (b"z", 0.2)
            try:
                for _ in range(10_000):
                    self.wfile.write(chunk)
                    self.wfile.flush()
                    time.sleep(pause)
            except OSError:
                pass
            return
        body, with_length = self.bodies.get(self.path, (b"", True))
        if not body:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/pem-certificate-chain")
        if with_length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def cert_server(pki: Pki) -> Iterator[tuple[str, list[str]]]:
    _Handler.bodies = {
        "/leaf.pem": (pem(pki.leaf), True),
        "/big.pem": (b"x" * (20 * 1024), True),
        "/big-nolength.pem": (b"x" * (20 * 1024), False),
        "/exact.pem": (b"y" * s.MAX_CERT_BYTES, False),
    }
    _Handler.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", _Handler.seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_fetch_x5u_gets_an_allow_listed_certificate(pki: Pki, cert_server: Any,
                                                    tmp_path: Path) -> None:
    hostport, seen = cert_server
    url = f"http://{hostport}/leaf.pem"
    body = fetch_x5u(url, [hostport], timeout=2.0)
    assert body == pem(pki.leaf)
    assert fetch_x5u(f"http://{hostport}/exact.pem", [hostport]) == b"y" * s.MAX_CERT_BYTES
    # the fetcher stores it where the INVITE path finds it
    (tmp_path / "ca.pem").write_bytes(pem(pki.ca))
    write_leaf(tmp_path, url, body)
    text = identity(jws(pki.leaf_key, jose(x5u=url)), info=url)
    assert run(text, TrustStore.load(tmp_path)).status == "verified"
    assert seen == ["/leaf.pem", "/exact.pem"]


@pytest.mark.parametrize("make_url", [
    lambda hp: f"http://localhost:{hp.split(':')[1]}/leaf.pem",  # same server, other name
    lambda hp: "http://127.0.0.1/leaf.pem",  # allow-listed host, other port
    lambda hp: f"http://user:pw@{hp}/leaf.pem",  # credentials
    lambda hp: f"ftp://{hp}/leaf.pem",
    lambda hp: "file:///etc/passwd",
    lambda hp: "http://[::1/leaf.pem",
])
def test_fetch_x5u_refuses_other_hosts_before_connecting(cert_server: Any, make_url: Any) -> None:
    hostport, seen = cert_server
    with pytest.raises(FetchError, match="not on an allow-listed host"):
        fetch_x5u(make_url(hostport), [hostport, "cert.example"], timeout=2.0)
    assert seen == []


@pytest.mark.parametrize("path", ["/big.pem", "/big-nolength.pem", "/endless.pem"])
def test_fetch_x5u_refuses_oversized_bodies(cert_server: Any, path: str) -> None:
    hostport, seen = cert_server
    with pytest.raises(FetchError, match="exceeds 16384"):
        fetch_x5u(f"http://{hostport}{path}", [hostport], timeout=2.0)
    assert seen == [path]


def test_fetch_x5u_bounds_the_whole_exchange(cert_server: Any) -> None:
    """A server dripping bytes faster than the socket timeout still hits the deadline."""
    hostport, _seen = cert_server
    t0 = time.monotonic()
    with pytest.raises(FetchError, match="timed out"):
        fetch_x5u(f"http://{hostport}/slow.pem", [hostport], timeout=1.0)
    assert time.monotonic() - t0 < 2.0


def test_fetch_x5u_does_not_follow_redirects_or_accept_errors(cert_server: Any) -> None:
    hostport, seen = cert_server
    with pytest.raises(FetchError, match="HTTP 302"):
        fetch_x5u(f"http://{hostport}/redirect", [hostport])
    with pytest.raises(FetchError, match="HTTP 404"):
        fetch_x5u(f"http://{hostport}/missing.pem", [hostport])
    assert seen == ["/redirect", "/missing.pem"]


def test_fetch_x5u_connection_failure_is_a_fetch_error() -> None:
    from tests.unit.scoring.support import closed_port
    port = closed_port()
    with pytest.raises(FetchError, match="fetch failed"):
        fetch_x5u(f"http://127.0.0.1:{port}/leaf.pem", [f"127.0.0.1:{port}"], timeout=1.0)


@pytest.mark.parametrize(("url", "allowed"), [
    ("https://cert.example/x.pem", True),
    ("https://CERT.example:443/x.pem", True),
    ("https://cert.example:8443/x.pem", False),
    ("http://cert.example/x.pem", True),
    ("https://sub.cert.example/x.pem", False),
    ("https://cert.example.evil/x.pem", False),
    ("https://other.example:8443/x.pem", True),
    ("https://other.example/x.pem", False),
])
def test_host_allow_list_rule(url: str, allowed: bool) -> None:
    assert s.host_allowed(url, ["cert.example", "other.example:8443"]) is allowed
