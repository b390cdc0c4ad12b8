"""intercept.provision against a real redis-server: targets, recorders, the audit stream."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import threading
from typing import Any

import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from intercept import names, provision
from intercept.targets import Target, TargetSnapshot
from tests.redis_replies import bytes_entries, bytes_hash

NOW = 1_800_000_000.0


def make_cert(kind: str = "rsa", *, days: float = 30, cn: str = "recorder.example",
              not_after: dt.datetime | None = None) -> bytes:
    """A self-signed PEM certificate: RSA 2048 (what S/MIME needs) or EC P-256."""
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048) if kind == "rsa"
        else ec.generate_private_key(ec.SECP256R1()))
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.UTC)
    end = not_after or now + dt.timedelta(days=days)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(min(now, end) - dt.timedelta(days=1)).not_valid_after(end)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def pem() -> bytes:
    return make_cert(days=3650)


def _target(pem: bytes, **kw: object) -> Target:
    args: dict[str, object] = {"liid": "CASE-1", "identities": ["+1 555-123-0001",
                                                           "sip:Alice@Example.com"],
                               "deliver_to": "sip:li@192.0.2.5:5060", "cert_pem": pem,
                               "user": "tester"}
    args.update(kw)
    return provision.build_target(**args)  # type: ignore[arg-type]


def _state(r: redis.Redis) -> tuple[object, ...]:
    return (r.hgetall(names.TARGETS), r.get(names.VERSION), r.hgetall(names.RECORDERS),
            r.xlen(names.AUDIT))


# -- build_target ----------------------------------------------------------------------------
def test_build_target_normalises_and_defaults(pem: bytes) -> None:
    t = provision.build_target(liid="C.1_x-2", identities=["+15551230001", "tel:15551230001",
                                                           "bob@example.com"],
                               deliver_to="subscribe", cert_pem=pem, now=NOW)
    assert t.identities == ("tel:15551230001", "bob@example.com")
    assert t.given == ("+15551230001", "tel:15551230001", "bob@example.com")
    assert t.start == NOW and t.end is None and t.created_at == NOW and t.created_by
    assert t.sides == ("caller", "callee") and t.deliver == ("keys", "events")
    assert t.mode == "intercept"


@pytest.mark.parametrize(("kw", "message"), [
    ({"liid": "bad liid"}, "LIID"),
    ({"liid": "x" * 65}, "LIID"),
    ({"identities": []}, "at least one identity"),
    ({"identities": ["<sip:a@b>"]}, "bare URI"),
    ({"identities": ["12"]}, "neither a number nor"),
    ({"deliver_to": "http://x"}, "not a SIP URI"),
    ({"cert_pem": b"not a cert"}, "not a PEM X.509"),
    ({"mode": "spy"}, "mode"),
    ({"sides": ("caller", "both")}, "match sides"),
    ({"deliver": ("keys", "audio")}, "deliver"),
    ({"start": NOW + 100, "end": NOW + 50}, "end time must be after start"),
    ({"end": NOW - 1}, "in the past"),
])
def test_build_target_refuses(pem: bytes, kw: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _target(pem, now=NOW, **kw)


def test_build_target_refuses_ec_and_expired_certs() -> None:
    with pytest.raises(ValueError, match="RSA"):
        _target(make_cert("ec"))
    expired = make_cert(not_after=dt.datetime.now(dt.UTC) - dt.timedelta(days=1))
    with pytest.raises(ValueError, match="expired"):
        _target(expired)


# -- targets in Redis ------------------------------------------------------------------------
def test_add_show_list_remove_with_version_and_audit(r: redis.Redis, pem: bytes) -> None:
    t = _target(pem, end=dt.datetime(2040, 1, 1, tzinfo=dt.UTC).timestamp())
    assert provision.add_target(r, t, user="alice") is False
    assert r.get(names.VERSION) == b"1"
    assert provision.show_target(r, "CASE-1") == t
    assert provision.list_targets(r) == ([t], [])
    # the proxy's view of the same hash
    snap, errors = TargetSnapshot.from_hash(bytes_hash(r.hgetall(names.TARGETS)), 1)
    assert errors == [] and snap.match(["tel:15551230001"], [], t.start + 1)

    (entry,) = provision.audit_tail(r)
    assert entry["action"] == "target.add" and entry["user"] == "alice"
    assert entry["liid"] == "CASE-1" and entry["address"] == ""
    assert float(entry["ts"]) > 0 and entry["id"]
    detail = entry["detail"]
    assert detail["identities"] == ["tel:15551230001", "alice@example.com"]
    assert detail["end"] == "2040-01-01T00:00:00Z"
    assert set(detail["cert"]) == {"subject", "sha256", "not_after"}
    raw_audit = bytes_entries(r.xrange(names.AUDIT))[0][1][b"detail"]
    assert b"BEGIN CERTIFICATE" not in raw_audit and b"MII" not in raw_audit

    removed = provision.remove_target(r, "CASE-1", user="bob")
    assert removed == t
    assert r.hgetall(names.TARGETS) == {} and r.get(names.VERSION) == b"2"
    assert [e["action"] for e in provision.audit_tail(r)] == ["target.add", "target.remove"]
    assert provision.audit_tail(r)[-1]["user"] == "bob"


def test_existing_liid_needs_explicit_replace(r: redis.Redis, pem: bytes) -> None:
    first = _target(pem)
    provision.add_target(r, first)
    before = _state(r)
    second = _target(pem, identities=["+15559990000"])
    with pytest.raises(ValueError, match="already exists"):
        provision.add_target(r, second)
    assert _state(r) == before  # nothing changed, nothing audited
    assert provision.add_target(r, second, replace=True) is True
    assert provision.show_target(r, "CASE-1").identities == ("tel:15559990000",)
    last = provision.audit_tail(r, 1)[0]
    assert last["action"] == "target.replace"
    assert last["detail"]["replaced"]["identities"] == ["tel:15551230001", "alice@example.com"]
    assert r.get(names.VERSION) == b"2"


def test_unknown_liid(r: redis.Redis) -> None:
    with pytest.raises(LookupError):
        provision.show_target(r, "NOPE")
    with pytest.raises(LookupError):
        provision.remove_target(r, "NOPE")
    with pytest.raises(ValueError, match="LIID"):
        provision.show_target(r, "no such")
    assert _state(r) == ({}, None, {}, 0)


def test_unreadable_record_is_reported_not_fatal(r: redis.Redis, pem: bytes) -> None:
    provision.add_target(r, _target(pem))
    r.hset(names.TARGETS, "BROKEN", b"\xc1")
    targets, errors = provision.list_targets(r)
    assert [t.liid for t in targets] == ["CASE-1"]
    assert len(errors) == 1 and "BROKEN" in errors[0]
    assert provision.remove_target(r, "BROKEN") is None
    assert provision.audit_tail(r, 1)[0]["detail"] == {"record": "unreadable"}


def test_concurrent_adds_of_one_liid_admit_one(redis_url: str, pem: bytes) -> None:
    results: list[str] = []

    def add(i: int) -> None:
        c = redis.Redis.from_url(redis_url)
        try:
            provision.add_target(c, _target(pem, identities=[f"+1555000{i:04d}"]))
            results.append("ok")
        except ValueError:
            results.append("exists")
        finally:
            c.close()

    threads = [threading.Thread(target=add, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(results) == ["exists"] * 7 + ["ok"]
    r = redis.Redis.from_url(redis_url)
    assert r.get(names.VERSION) == b"1" and r.xlen(names.AUDIT) == 1
    r.close()


# -- recorders -------------------------------------------------------------------------------
@pytest.mark.parametrize(("given", "stored"), [
    ("192.0.2.7", "192.0.2.7"), (" 192.0.2.7:5060 ", "192.0.2.7:5060"),
    ("10.1.2.3/8", "10.0.0.0/8"), ("2001:DB8::1", "2001:db8::1"),
    ("[2001:db8::1]:5061", "[2001:db8::1]:5061"), ("2001:db8::/32", "2001:db8::/32"),
])
def test_normalise_address(given: str, stored: str) -> None:
    assert provision.normalise_address(given) == stored


@pytest.mark.parametrize("bad", ["", "host.example", "192.0.2.7:0", "192.0.2.7:70000",
                                 "192.0.2.7:x", "[2001:db8::1]", "999.1.1.1", "1.2.3.4/33",
                                 "1.2.3.4:5060:1", "x" * 100])
def test_normalise_address_refuses(bad: str) -> None:
    with pytest.raises(ValueError, match="recorder address"):
        provision.normalise_address(bad)


def test_recorders_allow_list_remove(r: redis.Redis) -> None:
    recs = provision.recorder_allow(r, ["192.0.2.7", "10.0.0.0/8"], who="carol")
    assert [x.address for x in recs] == ["192.0.2.7", "10.0.0.0/8"]
    (cred,) = provision.recorder_allow(r, ["192.0.2.8:5060"], user="rec1", password="s3cret")
    assert cred.ha1 == hashlib.md5(b"rec1:spitwall:s3cret").hexdigest()
    assert cred.ha1_sha256 == hashlib.sha256(b"rec1:spitwall:s3cret").hexdigest()
    assert cred.algorithms == ["SHA-256", "MD5"]
    stored = r.hget(names.RECORDERS, "192.0.2.8:5060")
    assert stored is not None and b"s3cret" not in stored
    assert isinstance(stored, bytes) and provision.Recorder.unpack(stored) == cred
    (modern,) = provision.recorder_allow(r, ["192.0.2.9"], user="rec2", password="pw",
                                         md5=False)
    assert modern.ha1 == "" and modern.algorithms == ["SHA-256"]
    assert provision.recorder_remove(r, ["192.0.2.9"]) == ["192.0.2.9"]
    with pytest.raises(ValueError, match="--user"):
        provision.recorder_allow(r, ["192.0.2.9"], md5=False)
    listed, errors = provision.recorder_list(r)
    assert errors == [] and [x.address for x in listed] == ["10.0.0.0/8", "192.0.2.7",
                                                            "192.0.2.8:5060"]
    assert listed[2].user == "rec1" and "ha1" not in listed[2].as_json()
    assert "ha1_sha256" not in listed[2].as_json()
    assert listed[2].as_json()["digest"] == ["SHA-256", "MD5"]
    assert r.get(names.VERSION) is None  # recorders do not bump the target version

    before = _state(r)
    with pytest.raises(LookupError, match=r"198\.51\.100\.1"):
        provision.recorder_remove(r, ["192.0.2.7", "198.51.100.1"])
    assert _state(r) == before
    assert provision.recorder_remove(r, ["192.0.2.7"], who="dave") == ["192.0.2.7"]
    actions = [(e["action"], e["address"], e["user"]) for e in provision.audit_tail(r)]
    assert actions == [("recorder.allow", "192.0.2.7", "carol"),
                       ("recorder.allow", "10.0.0.0/8", "carol"),
                       ("recorder.allow", "192.0.2.8:5060", actions[2][2]),
                       ("recorder.allow", "192.0.2.9", actions[2][2]),
                       ("recorder.remove", "192.0.2.9", actions[2][2]),
                       ("recorder.remove", "192.0.2.7", "dave")]
    assert all(b"s3cret" not in json.dumps(e).encode() for e in provision.audit_tail(r))


def test_recorder_records_read_by_the_delivery_worker(r: redis.Redis) -> None:
    """The worker's allow-list parser reads what we write (the RECORDERS record contract)."""
    policy = pytest.importorskip("intercept.delivery.policy")
    provision.recorder_allow(r, ["10.0.0.0/8", "[2001:db8::1]:5061"])
    provision.recorder_allow(r, ["192.0.2.8:5060"], user="rec1", password="pw",
                             liids=["CASE-1", "CASE-2", "CASE-1"])
    rules, errors = policy.parse_recorders(r.hgetall(names.RECORDERS))
    assert errors == []
    by_addr = {rule.address: rule for rule in rules}
    assert set(by_addr) == {"10.0.0.0/8", "[2001:db8::1]:5061", "192.0.2.8:5060"}
    cred = by_addr["192.0.2.8:5060"]
    assert (cred.user, cred.ha1, cred.liids) == ("rec1", hashlib.md5(b"rec1:spitwall:pw")
                                                 .hexdigest(), ("CASE-1", "CASE-2"))
    assert cred.ha1_sha256 == hashlib.sha256(b"rec1:spitwall:pw").hexdigest()
    assert by_addr["10.0.0.0/8"].user is None and by_addr["10.0.0.0/8"].ha1 is None
    assert policy.match_recorder(rules, "10.9.9.9", 5060).address == "10.0.0.0/8"
    assert policy.match_recorder(rules, "192.0.2.8", 5061) is None
    assert policy.match_recorder(rules, "2001:db8::1", 5061) is not None


@pytest.mark.parametrize(("kw", "message"), [
    ({"user": "rec"}, "password"),
    ({"liids": ["bad liid"]}, "LIID"),
    ({"password": "x"}, "recorder user"),
    ({"user": "bad user", "password": "x"}, "recorder user"),
    ({"user": "rec", "password": "a\nb"}, "printable"),
])
def test_recorder_credentials_refused(r: redis.Redis, kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        provision.recorder_allow(r, ["192.0.2.7"], **kw)
    with pytest.raises(ValueError, match="recorder address"):
        provision.recorder_allow(r, ["192.0.2.7", "nope"])
    assert _state(r) == ({}, None, {}, 0)


# -- audit -------------------------------------------------------------------------------------
def test_audit_tail_and_integrity(r: redis.Redis, pem: bytes) -> None:
    assert provision.audit_integrity(r) == {"length": 0, "entries_added": 0, "removed": 0}
    for i in range(5):
        provision.add_target(r, _target(pem, liid=f"C{i}"))
    assert [e["liid"] for e in provision.audit_tail(r, 2)] == ["C3", "C4"]
    assert len(provision.audit_tail(r, None)) == 5
    assert provision.audit_integrity(r) == {"length": 5, "entries_added": 5, "removed": 0}
    r.xtrim(names.AUDIT, maxlen=3, approximate=False)  # only the default user can do; detected
    assert provision.audit_integrity(r)["removed"] == 2
    with pytest.raises(ValueError):
        provision.audit_tail(r, 0)
