"""Target records: identity normalisation, validation, msgpack round trip, matching."""

from __future__ import annotations

import time

import msgpack
import pytest

from intercept.targets import (
    Target,
    TargetSnapshot,
    check_certificate,
    check_deliver_to,
    check_liid,
    normalise_identity,
)
from tests.intercept_certs import make_recipient

PEM = make_recipient("unit").cert_pem


def target(**kw: object) -> Target:
    base: dict[str, object] = {"liid": "C1", "identities": ("tel:15551230001",),
                               "deliver_to": "sip:lea@127.0.0.1:5999", "cert_pem": PEM,
                               "start": 1000.0}
    base.update(kw)
    return Target(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("given,want", [
    ("+15551230001", "tel:15551230001"),
    ("1 555-123-0001", "tel:15551230001"),
    ("tel:+1-555-123-0001;phone-context=x", "tel:15551230001"),
    ("sip:+15551230001@gw.example.net", "tel:15551230001"),
    ("sip:Alice@Example.COM;transport=udp", "alice@example.com"),
    ("sips:bob@[::1]", "bob@[::1]"),
    ("carol@example.org", "carol@example.org"),
    ("sip:dave@example.org:5080", "dave@example.org"),
])
def test_identities_normalise_like_the_scoring_layer(given: str, want: str) -> None:
    assert normalise_identity(given) == want


@pytest.mark.parametrize("bad", ["", "alice", "<sip:a@b>", "sip:@host", "tel:abc", "a b@c",
                                 "x" * 300 + "@h", "sip:a@bad host", "12"])
def test_bad_identities_raise(bad: str) -> None:
    with pytest.raises(ValueError):
        normalise_identity(bad)


def test_validators() -> None:
    assert check_liid("CASE-2026.01_a") == "CASE-2026.01_a"
    for bad in ("", "a b", "x" * 65, "é", "a;b"):
        with pytest.raises(ValueError):
            check_liid(bad)
    for good in ("sip:lea@10.0.0.1:5999", "sips:mf.example.net", "subscribe",
                 "sip:[::1]:5070;transport=udp"):
        assert check_deliver_to(good) == good
    for bad in ("http://x", "sip:", "sip:a@b c", "lea@host", "sip:a@b\r\nX: y"):
        with pytest.raises(ValueError):
            check_deliver_to(bad)
    check_certificate(PEM)
    with pytest.raises(ValueError, match="not a PEM"):
        check_certificate(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")


def test_non_rsa_certificate_is_refused() -> None:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ec")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    with pytest.raises(ValueError, match="RSA"):
        check_certificate(cert.public_bytes(serialization.Encoding.PEM))


def test_record_validation() -> None:
    with pytest.raises(ValueError, match="after start"):
        target(end=999.0)
    with pytest.raises(ValueError, match="mode"):
        target(mode="wiretap")
    with pytest.raises(ValueError, match="sides"):
        target(sides=("both",))
    with pytest.raises(ValueError, match="deliver"):
        target(deliver=())
    with pytest.raises(ValueError, match="identity"):
        target(identities=())


def test_pack_round_trip_and_bad_records() -> None:
    t = target(end=2000.0, sides=("callee",), deliver=("keys",), mode="recording",
               given=("+15551230001",), created_by="ops")
    assert Target.unpack(t.pack()) == t
    with pytest.raises(ValueError):
        Target.unpack(b"\xc1garbage")
    with pytest.raises(ValueError, match="version"):
        Target.unpack(msgpack.packb({"v": 99}))
    with pytest.raises(ValueError, match="incomplete"):
        Target.unpack(msgpack.packb({"v": 1, "liid": "x"}))


def test_snapshot_matching_sides_windows_and_bad_entries() -> None:
    a = target(liid="A", identities=("tel:15551230001",), start=100.0, end=200.0)
    b = target(liid="B", identities=("bob@example.org",), sides=("callee",), start=100.0)
    raw = {b"A": a.pack(), b"B": b.pack(), b"bad": b"\x00"}
    snap, errors = TargetSnapshot.from_hash(raw, 7)
    assert snap.version == 7 and len(snap) == 2 and len(errors) == 1
    m = snap.match(["tel:15551230001"], ["x@y"], 150.0)
    assert [(x.target.liid, x.side) for x in m] == [("A", "caller")]
    assert snap.match(["tel:15551230001"], [], 250.0) == []  # window over
    assert snap.match(["tel:15551230001"], [], 50.0) == []  # not started
    assert snap.match(["bob@example.org"], [], 150.0) == []  # B only as callee
    m = snap.match([], ["bob@example.org", "tel:15551230001"], 150.0)
    assert sorted((x.target.liid, x.side) for x in m) == [("A", "callee"), ("B", "callee")]
    # a case matches once even when both parties are its targets
    m = snap.match(["tel:15551230001"], ["tel:15551230001"], 150.0)
    assert [(x.target.liid, x.side) for x in m] == [("A", "caller")]
    assert TargetSnapshot().match(["a@b"], [], time.time()) == []
