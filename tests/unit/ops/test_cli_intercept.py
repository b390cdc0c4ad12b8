"""`spitwall intercept|recorder|deliver`, run in-process against a real redis-server.

Bad input must give one line on stderr, a non-zero exit and leave Redis exactly as it was; every
change must be in the intercept audit stream with who and what.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from intercept import names
from ops import cli
from tests.unit.intercept.test_provision import make_cert

Result = tuple[int, str, str]
Run = Callable[..., Result]


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str], redis_url: str,
        monkeypatch: pytest.MonkeyPatch) -> Run:
    """run(*argv) -> (exit code, stdout, stderr), with the Redis URL in $SPITWALL_REDIS."""
    monkeypatch.setenv("SPITWALL_REDIS", redis_url)

    def _run(*argv: str) -> Result:
        capsys.readouterr()
        try:
            rc = cli.main(list(argv))
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 1
        out, err = capsys.readouterr()
        return rc, out, err

    return _run


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("certs")
    files = {"rsa": make_cert(days=3650), "ec": make_cert("ec"), "garbage": b"not a cert\n"}
    out = {}
    for name, data in files.items():
        (d / f"{name}.pem").write_bytes(data)
        out[name] = d / f"{name}.pem"
    out["missing"] = d / "missing.pem"
    return out


def _state(r: redis.Redis) -> tuple[Any, ...]:
    return (r.hgetall(names.TARGETS), r.get(names.VERSION), r.hgetall(names.RECORDERS),
            r.xrange(names.AUDIT))


def _add(run: Run, certs: dict[str, Path], *extra: str, liid: str = "CASE-1") -> Result:
    return run("intercept", "add", "--liid", liid, "--target", "+15551230001",
               "--deliver-to", "sip:li@192.0.2.5:5060", "--cert", str(certs["rsa"]), *extra)


def test_add_show_list_remove(run: Run, r: redis.Redis, certs: dict[str, Path]) -> None:
    rc, out, err = run("intercept", "add", "--liid", "CASE-1", "--target", "+15551230001",
                       "--target", "sip:alice@example.com", "--deliver-to", "subscribe",
                       "--cert", str(certs["rsa"]), "--start", "2030-01-01T10:00:00+01:00",
                       "--end", "2030-02-01T00:00:00Z", "--deliver", "keys", "--mode",
                       "recording", "--match", "callee", "--json")
    assert rc == 0, err
    added = json.loads(out)
    assert added["start"] == "2030-01-01T09:00:00Z" and added["end"] == "2030-02-01T00:00:00Z"
    assert added["identities"] == ["tel:15551230001", "alice@example.com"]
    assert (added["mode"], added["deliver"], added["match"]) == ("recording", ["keys"],
                                                                  ["callee"])
    assert added["active"] is False
    assert r.get(names.VERSION) == b"1"

    rc, out, _ = run("intercept", "show", "CASE-1")
    assert rc == 0
    shown = json.loads(out)
    assert "BEGIN CERTIFICATE" not in out
    assert shown["cert"]["subject"] == "CN=recorder.example"
    assert len(shown["cert"]["sha256"]) == 95 and shown["cert"]["not_after"].endswith("Z")
    assert shown["created_by"] == getpass.getuser()

    rc, out, _ = run("intercept", "list")
    assert rc == 0 and "CASE-1" in out and "recording" in out and "inactive" in out
    rc, out, _ = run("intercept", "list", "--json")
    assert [t["liid"] for t in json.loads(out)] == ["CASE-1"]

    rc, out, _ = run("intercept", "remove", "CASE-1")
    assert rc == 0 and "removed" in out
    assert r.hgetall(names.TARGETS) == {} and r.get(names.VERSION) == b"2"
    rc, out, _ = run("intercept", "list")
    assert rc == 0 and out.strip() == "no targets"


def test_audit_records_who_and_what(run: Run, certs: dict[str, Path]) -> None:
    assert _add(run, certs)[0] == 0
    assert run("intercept", "remove", "CASE-1")[0] == 0
    rc, out, _ = run("intercept", "audit", "--json")
    assert rc == 0
    data = json.loads(out)
    assert data["removed"] == 0 and data["length"] == 2
    (add, remove) = data["entries"]
    user = getpass.getuser()
    assert (add["action"], add["liid"], add["user"]) == ("target.add", "CASE-1", user)
    assert (remove["action"], remove["liid"], remove["user"]) == ("target.remove", "CASE-1",
                                                                  user)
    assert add["detail"]["deliver_to"] == "sip:li@192.0.2.5:5060"
    assert "BEGIN" not in json.dumps(data)
    rc, out, _ = run("intercept", "audit", "-n", "1")
    assert rc == 0 and len(out.strip().splitlines()) == 1 and "target.remove" in out
    assert user in out


#: (options replacing the valid ones, further argv, expected error text)
BAD_ADDS: list[tuple[dict[str, str], list[str], str]] = [
    ({"--liid": "bad liid"}, [], "LIID"),
    ({"--liid": ""}, [], "LIID"),
    ({"--target": "<sip:a@b>"}, [], "bare URI"),
    ({"--target": "12"}, [], "neither a number"),
    ({"--deliver-to": "http://li.example"}, [], "not a SIP URI"),
    ({"--deliver-to": "sip:"}, [], "not a SIP URI"),
    ({}, ["--start", "2030-01-01T10:00:00"], "no zone"),
    ({}, ["--end", "2030-01-01 10:00"], "no zone"),
    ({}, ["--start", "tomorrow"], "not an ISO time"),
    ({}, ["--start", "2030-02-01T00:00:00Z", "--end", "2030-01-01T00:00:00Z"], "after start"),
    ({}, ["--start", "2030-01-01T00:00:00Z", "--end", "2030-01-01T00:00:00Z"], "after start"),
    ({}, ["--end", "2001-01-01T00:00:00Z"], "in the past"),
    ({}, ["--deliver", "keys,audio"], "--deliver"),
    ({}, ["--deliver", ""], "--deliver"),
    ({}, ["--match", "both"], "--match"),
    ({}, ["--mode", "spy"], "invalid choice"),
    ({}, ["--bogus"], "unrecognized arguments"),
]


@pytest.mark.parametrize(("override", "extra", "message"), BAD_ADDS)
def test_bad_add_changes_nothing(run: Run, r: redis.Redis, certs: dict[str, Path],
                                 override: dict[str, str], extra: list[str],
                                 message: str) -> None:
    assert _add(run, certs, liid="EXISTING")[0] == 0
    before = _state(r)
    options = {"--liid": "CASE-9", "--target": "+15551230001",
               "--deliver-to": "sip:li@192.0.2.5", "--cert": str(certs["rsa"]), **override}
    argv = [x for kv in options.items() for x in kv]
    rc, out, err = run("intercept", "add", *argv, *extra)
    assert rc != 0
    assert message in err
    assert len(err.strip().splitlines()) == 1, err
    assert out == ""
    assert _state(r) == before


@pytest.mark.parametrize(("cert", "message"), [
    ("missing", "cannot read certificate"), ("ec", "RSA"), ("garbage", "not a PEM X.509"),
])
def test_bad_certificate_changes_nothing(run: Run, r: redis.Redis, certs: dict[str, Path],
                                         cert: str, message: str) -> None:
    before = _state(r)
    rc, _, err = run("intercept", "add", "--liid", "C", "--target", "+15551230001",
                     "--deliver-to", "subscribe", "--cert", str(certs[cert]))
    assert rc != 0 and message in err and len(err.strip().splitlines()) == 1
    assert _state(r) == before


def test_existing_liid_needs_replace(run: Run, r: redis.Redis, certs: dict[str, Path]) -> None:
    assert _add(run, certs)[0] == 0
    before = _state(r)
    rc, _, err = run("intercept", "add", "--liid", "CASE-1", "--target", "+15559990000",
                     "--deliver-to", "subscribe", "--cert", str(certs["rsa"]))
    assert rc != 0 and "already exists" in err and "--replace" in err
    assert _state(r) == before
    rc, out, err = run("intercept", "add", "--liid", "CASE-1", "--target", "+15559990000",
                       "--deliver-to", "subscribe", "--cert", str(certs["rsa"]), "--replace")
    assert rc == 0 and out.startswith("replaced"), err
    rc, out, _ = run("intercept", "show", "CASE-1")
    assert json.loads(out)["identities"] == ["tel:15559990000"]


def test_unknown_liid(run: Run, r: redis.Redis) -> None:
    for action in ("show", "remove"):
        rc, out, err = run("intercept", action, "NOPE")
        assert rc == 1 and out == "" and err.strip() == "spitwall: error: no target with LIID NOPE"
    rc, _, err = run("intercept", "show", "no such")
    assert rc == 2 and "LIID" in err
    assert _state(r) == ({}, None, {}, [])


def test_recorders(run: Run, r: redis.Redis, tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    rc, out, err = run("recorder", "allow", "192.0.2.7", "10.0.0.0/8")
    assert rc == 0 and "allowed 192.0.2.7" in out, err
    rc, out, err = run("recorder", "allow", "192.0.2.8:5060", "--user", "rec1",
                       "--password-file", str(pw), "--liid", "CASE-1")
    assert rc == 0 and "digest user rec1" in out and "CASE-1" in out, err
    blob = r.hget(names.RECORDERS, "192.0.2.8:5060")
    assert blob is not None and b"s3cret" not in blob
    assert hashlib.md5(b"rec1:spitwall:s3cret").hexdigest().encode() in blob
    rc, out, _ = run("recorder", "list", "--json")
    listed = json.loads(out)
    assert [x["address"] for x in listed] == ["10.0.0.0/8", "192.0.2.7", "192.0.2.8:5060"]
    assert listed[2]["credentials"] is True and "ha1" not in listed[2]
    assert listed[2]["digest"] == ["SHA-256", "MD5"]
    rc, out, _ = run("recorder", "list")
    assert rc == 0 and "user rec1" in out and "SHA-256/MD5" in out
    rc, out, err = run("recorder", "allow", "192.0.2.8:5060", "--user", "rec1",
                       "--password-file", str(pw), "--no-md5")
    assert rc == 0 and "digest user rec1, SHA-256)" in out, err
    blob = r.hget(names.RECORDERS, "192.0.2.8:5060")
    assert blob is not None and hashlib.md5(b"rec1:spitwall:s3cret").hexdigest().encode() \
        not in blob and hashlib.sha256(b"rec1:spitwall:s3cret").hexdigest().encode() in blob

    before = _state(r)
    for argv, message in (
        (["recorder", "allow", "host.example"], "recorder address"),
        (["recorder", "allow", "192.0.2.9", "--user", "rec"], "--password-file"),
        (["recorder", "allow", "192.0.2.9", "--password-file", str(pw)], "needs --user"),
        (["recorder", "allow", "192.0.2.9", "--user", "r", "--password-file",
          str(tmp_path / "nope")], "cannot read password file"),
        (["recorder", "allow", "192.0.2.9", "--user", "bad user", "--password-file", str(pw)],
         "recorder user"),
        (["recorder", "allow", "192.0.2.9", "--liid", "bad liid"], "LIID"),
        (["recorder", "allow", "192.0.2.9", "--no-md5"], "--no-md5 needs --user"),
        (["recorder", "remove", "192.0.2.7", "198.51.100.1"], "not an allowed recorder"),
        (["recorder", "remove", "nonsense"], "recorder address"),
        (["recorder", "allow"], "arguments are required"),
    ):
        rc, out, err = run(*argv)
        assert rc != 0 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
        assert out == ""
    assert _state(r) == before

    rc, out, _ = run("recorder", "remove", "192.0.2.7", "10.0.0.0/8")
    assert rc == 0 and "removed 10.0.0.0/8" in out
    rc, out, _ = run("intercept", "audit", "--json")
    entries = json.loads(out)["entries"]
    assert [(e["action"], e["address"]) for e in entries] == [
        ("recorder.allow", "192.0.2.7"), ("recorder.allow", "10.0.0.0/8"),
        ("recorder.allow", "192.0.2.8:5060"), ("recorder.allow", "192.0.2.8:5060"),
        ("recorder.remove", "192.0.2.7"), ("recorder.remove", "10.0.0.0/8")]
    assert all(e["user"] == getpass.getuser() for e in entries)
    assert "s3cret" not in out


def test_audit_shows_foreign_entries_and_removals(run: Run, r: redis.Redis) -> None:
    """Entries the delivery worker writes (other field names) print too; removals are flagged."""
    r.xadd(names.AUDIT, {"ts": "1800000000.000", "action": "subscribe_refused",
                         "address": "192.0.2.99:5060", "reason": "not allowed",
                         "by": "deliver:w1"})
    r.xadd(names.AUDIT, {"ts": "1800000001.000", "action": "x", "user": "u"})
    rc, out, _ = run("intercept", "audit")
    assert rc == 0 and "deliver:w1" in out and "not allowed" in out
    assert "WARNING" not in out
    r.xtrim(names.AUDIT, maxlen=1, approximate=False)
    rc, out, _ = run("intercept", "audit")
    assert rc == 0 and "WARNING: 1 audit entries were removed" in out


def test_deliver_delegates(run: Run, monkeypatch: pytest.MonkeyPatch, redis_url: str) -> None:
    calls: list[Any] = []
    fake = types.ModuleType("intercept.deliver")

    def main(argv: list[str]) -> int:
        calls.append(("main", argv))
        return 3

    def replay(client: redis.Redis, count: int | None) -> int:
        calls.append(("replay", client.ping(), count))
        return 7

    fake.main = main  # type: ignore[attr-defined]
    fake.replay = replay  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "intercept.deliver", fake)
    assert run("deliver", "--consumer", "w1")[0] == 3
    assert run("--redis", redis_url, "deliver")[0] == 3
    rc, out, _ = run("deliver", "replay", "--count", "5")
    assert rc == 0 and "re-queued 7" in out
    rc, out, _ = run("deliver", "replay", "--json")
    assert rc == 0 and json.loads(out) == {"replayed": 7}
    assert calls == [("main", ["--consumer", "w1"]), ("main", ["--redis", redis_url]),
                     ("replay", True, 5), ("replay", True, None)]
    rc, out, _ = run("intercept", "audit", "--json")
    entries = json.loads(out)["entries"]
    assert [(e["action"], e["detail"]) for e in entries] == [
        ("deliver.replay", {"count": 5, "replayed": 7}),
        ("deliver.replay", {"count": None, "replayed": 7})]
    rc, _, err = run("deliver", "replay", "--count", "0")
    assert rc == 2 and "--count" in err
    rc, _, err = run("deliver", "replay", "--bogus")
    assert rc == 2 and len(err.strip().splitlines()) == 1


def test_deliver_missing_module(run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "intercept.deliver", None)  # import fails
    rc, out, err = run("deliver")
    assert rc == 1 and out == ""
    assert err.startswith("spitwall: error: the delivery worker is not available")
    assert len(err.strip().splitlines()) == 1
