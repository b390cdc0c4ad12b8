"""lists.numberdb and its use on the request path, against a real redis-server: file parsing,
import/add/remove/check/count/export/clear with audit, and the INVITE's lookup (same round trip,
block rejects, allow relays unscored, dno raises the caller-ID score, expiry, bad records)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.crc import key_slot

from lists.model import ListEntry
from lists.numberdb import ImportInterrupted, NumberDb, NumberLine, parse_lines, read_file
from scoring import config_admin, keys, redisconn
from scoring.checks.callerid import lookup_numbers
from scoring.model import Action
from scoring.service import ScoringService
from scoring.store import Store
from tests.conftest import RedisServer
from tests.redis_replies import bytes_entries
from tests.unit.scoring.support import attempt

NOW = time.time()
BLOCKED_NUMBER = "+15550100666"


@pytest.fixture
def db(r: redis.Redis) -> NumberDb:
    return NumberDb(r, batch=3)  # small batches: the tests cross batch boundaries


@pytest.fixture
def service(redis_url: str) -> Iterator[ScoringService]:
    store = Store(redis_url, timeout=2.0)
    yield ScoringService(store)
    store.close()


def _audit(r: redis.Redis) -> list[dict[str, str]]:
    return [{k.decode(): v.decode() for k, v in f.items()}
            for _id, f in bytes_entries(r.xrange(keys.AUDIT))]


def _lines(*numbers: str) -> list[NumberLine]:
    return parse_lines(numbers)


# -- parsing ---------------------------------------------------------------------------------


def test_parse_lines_normalises_skips_comments_and_keeps_last_reason() -> None:
    got = parse_lines(["# DNO registry 2026-11", "", "+1 (555) 010-0001,inbound only",
                       "  +15550100002  ", "+15550100001,toll-free IVR"], "f.txt")
    assert got == [NumberLine("+15550100001", "toll-free IVR"), NumberLine("+15550100002", "")]


@pytest.mark.parametrize("line, message", [
    ("12", "f.txt:2: not a phone number"),
    ("+1555abc", "f.txt:2: not a phone number"),
    ("+15550100,reason\x07", "f.txt:2: reason contains control characters"),
    ("+15550100," + "x" * 201, "f.txt:2: reason longer than 200"),
    ("1" * 600, "f.txt:2: line longer than 512"),
])
def test_parse_lines_names_the_first_bad_line(line: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        parse_lines(["+15550100001", line, "also bad"], "f.txt")


def test_read_file_refuses_binary_and_missing_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"+15550100\n\xff\xfe\n")
    with pytest.raises(ValueError, match="not UTF-8 text"):
        read_file(bad)
    with pytest.raises(ValueError, match="cannot read"):
        read_file(tmp_path / "missing.txt")
    good = tmp_path / "good.txt"
    good.write_text("+15550100\n")
    items, digest = read_file(good)
    assert items == [NumberLine("+15550100", "")] and len(digest) == 64


# -- operator side ---------------------------------------------------------------------------


def test_import_writes_every_number_with_one_audit_record(db: NumberDb, r: redis.Redis) -> None:
    items = _lines(*(f"+1555010{i:04d},feed" for i in range(10)))
    n = db.import_numbers("block", items, source="feed.txt", digest="ab" * 32, ttl=3600,
                          user="ops")
    assert n == (10, 0) and db.count("block") == 10 and db.count("allow") == 0
    ttl = r.ttl(keys.number_key("+15550100007", "block"))
    assert 3500 < ttl <= 3600
    found = db.check("+1 555 010 0007")
    assert list(found) == ["block"]
    entry = found["block"]
    assert entry.reason == "feed" and entry.by == "ops" and entry.expires > NOW
    (rec,) = _audit(r)
    assert rec["what"] == "numbers" and rec["action"] == "import block"
    assert rec["key"] == "feed.txt" and rec["user"] == "ops"
    assert json.loads(rec["new"]) == {"numbers": 10, "sha256": "ab" * 32, "ttl": 3600,
                                      "reason": ""}


def test_import_refuses_bad_arguments_and_changes_nothing(db: NumberDb, r: redis.Redis) -> None:
    items = _lines("+15550100001")
    with pytest.raises(ValueError, match="unknown number list 'scanner'"):
        db.import_numbers("scanner", items, source="x")
    with pytest.raises(ValueError, match="--ttl must be between"):
        db.import_numbers("block", items, source="x", ttl=0.5)
    with pytest.raises(ValueError, match="--reason: reason contains control"):
        db.import_numbers("block", items, source="x", reason="a\nb")
    assert r.dbsize() == 0


def test_add_remove_check_and_their_audit(db: NumberDb, r: redis.Redis) -> None:
    e = db.add("dno", "+1 800 555 0199", reason="bank IVR", user="ops")
    assert e.value == "+18005550199" and r.ttl(keys.number_key(e.value, "dno")) == -1
    db.add("allow", "+18005550199", ttl=60, user="ops")
    assert sorted(db.check("+18005550199")) == ["allow", "dno"]
    assert db.remove("dno", "+18005550199", user="ops") is True
    assert db.remove("dno", "+18005550199", user="ops") is False
    assert list(db.check("+18005550199")) == ["allow"]
    actions = [(a["action"], a["key"]) for a in _audit(r)]
    assert actions == [("add dno", "+18005550199"), ("add allow", "+18005550199"),
                       ("remove dno", "+18005550199")]
    assert json.loads(_audit(r)[2]["old"])["reason"] == "bank IVR"
    with pytest.raises(ValueError, match="not a phone number"):
        db.add("block", "alice")


def test_export_writes_the_import_format_and_clear_empties_one_list(
    db: NumberDb, r: redis.Redis, tmp_path: Path
) -> None:
    db.import_numbers("block", _lines("+15550100003,robocalls", "+15550100001", "+15550100002"),
                      source="a")
    db.add("dno", "+15550100009")
    out = tmp_path / "block.txt"
    assert db.export("block", out) == 3
    assert out.read_text() == "+15550100001\n+15550100002\n+15550100003,robocalls\n"
    assert read_file(out)[0][2] == NumberLine("+15550100003", "robocalls")  # round trip
    assert db.clear("block", user="ops") == 3
    assert db.count("block") == 0 and db.count("dno") == 1
    assert _audit(r)[-1]["action"] == "clear block"


def test_replace_makes_the_list_equal_to_the_file(db: NumberDb, r: redis.Redis) -> None:
    """A registry's daily full feed: yesterday's numbers that are gone from today's file
    are removed; other lists are untouched; one audit record says how many went."""
    yesterday = [f"+1555030{i:04d}" for i in range(20)]
    db.import_numbers("dno", _lines(*yesterday), source="dno-1.txt")
    db.add("block", "+15550300005")  # the same number on another list stays there
    today = [*yesterday[5:], "+15550309998", "+15550309999"]
    assert db.import_numbers("dno", _lines(*today), source="dno-2.txt", replace=True,
                             user="ops") == (17, 5)
    assert sorted(db.numbers("dno")) == sorted(today)
    for gone in yesterday[:5]:
        assert r.get(keys.number_key(gone, "dno")) is None
        assert "dno" not in db.check(gone)
    assert "block" in db.check("+15550300005")
    rec = _audit(r)[-1]
    assert rec["action"] == "replace dno" and rec["key"] == "dno-2.txt"
    assert json.loads(rec["new"])["removed"] == 5
    # an empty feed empties the list
    assert db.import_numbers("dno", [], source="empty", replace=True) == (0, 17)
    assert db.count("dno") == 0 and db.count("block") == 1


def test_replace_interrupted_says_how_far_it_got_and_a_rerun_finishes(
        redis_server: RedisServer, redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, socket_timeout=2)
    db = NumberDb(client, batch=2)
    db.import_numbers("block", _lines(*(f"+1555040{i:04d}" for i in range(6))), source="a")
    real = db._remove_others

    def dies_after_one_bucket(name: str, keep: set[str]) -> Iterator[int]:
        for n in real(name, keep):
            yield n
            if n:
                redis_server.stop()

    db._remove_others = dies_after_one_bucket  # type: ignore[method-assign]
    try:
        with pytest.raises(ImportInterrupted, match="others removed") as info:
            db.import_numbers("block", _lines("+15550400000"), source="b", replace=True)
        assert info.value.done == 1 and info.value.removed >= 1
    finally:
        redis_server.start()
    client.close()


# -- request path ----------------------------------------------------------------------------


def _lookup_on(r: redis.Redis, service: ScoringService) -> None:
    """Turn the lookup on; one call lets the service see the new config version."""
    config_admin.set_value(r, "numbers.lookup", "true", user="test")
    service.score(attempt(call_id="warm-up"), now=NOW)
    assert service.config["numbers.lookup"] is True


def test_lookup_numbers_presented_and_e164_each_once() -> None:
    a = attempt(from_user="2025550123", from_uri="sip:2025550123@gw.example",
                pai="<sip:+12025550123@gw.example>")
    assert lookup_numbers(a, "US") == ("2025550123", "+12025550123")
    a = attempt(from_user="+15550100", pai="<tel:+15550100>")
    assert lookup_numbers(a, "US") == ("+15550100",)
    assert lookup_numbers(attempt(from_user="alice"), "US") == ()


def test_a_blocked_number_is_rejected_in_the_same_round_trip(
    service: ScoringService, db: NumberDb, r: redis.Redis
) -> None:
    db.import_numbers("block", _lines("+15550100666,robocall feed"), source="feed")
    caller = attempt(from_user="+15550100666", from_uri="sip:+15550100666@gw.example")
    off = service.score(caller, now=NOW)  # lookup still off
    assert off.action is not Action.REJECT and off.rule == "score"
    _lookup_on(r, service)
    r.config_resetstat()
    d = service.score(caller, now=NOW)
    assert d.action is Action.REJECT and d.rule != "score"
    (c,) = [c for c in d.contributions if c.name == "blocklist"]
    assert "+15550100666 (number database)" in c.reason and "robocall feed" in c.reason
    stats = r.info("commandstats")
    assert stats["cmdstat_mget"]["calls"] == 2  # versions + the one number, one round trip


def test_an_allowed_number_is_relayed_unscored(service: ScoringService, db: NumberDb,
                                                r: redis.Redis) -> None:
    _lookup_on(r, service)
    db.add("allow", "+15550100777")
    scanner_ua = "friendly-scanner"  # would be rejected by the scanner check
    d = service.score(attempt(from_user="+15550100777", user_agent=scanner_ua), now=NOW)
    assert d.action is Action.RELAY and d.rule == "allowlist"


def test_a_dno_number_raises_the_caller_id_score(service: ScoringService, db: NumberDb,
                                                 r: redis.Redis) -> None:
    _lookup_on(r, service)
    db.add("dno", "+18005550199", reason="bank IVR")
    plain = service.score(attempt(call_id="a", from_user="+12025550123"), now=NOW)
    spoofed = service.score(attempt(call_id="b", from_user="8005550199"), now=NOW)  # national
    (c,) = [c for c in spoofed.contributions if c.name == "callerid"]
    assert "do-not-originate" in c.reason and "+18005550199" in c.reason
    assert spoofed.score > plain.score


def test_expired_and_unreadable_records_do_not_match(
    service: ScoringService, r: redis.Redis
) -> None:
    _lookup_on(r, service)
    old = ListEntry("number", "+15550100888", "", NOW - 100, NOW - 1, "ops")
    r.set(keys.number_key("+15550100888", "block"), old.pack())  # expiry in the record only
    r.set(keys.number_key("+15550100999", "block"), b"\xc1 not msgpack")
    for n in ("+15550100888", "+15550100999"):
        d = service.score(attempt(call_id=n, from_user=n), now=NOW)
        assert d.rule == "score" and d.action is not Action.REJECT, d


def test_hostile_caller_values_look_up_nothing(service: ScoringService, r: redis.Redis) -> None:
    _lookup_on(r, service)
    for user in ("+" + "9" * 5000, "1" * 21, "+1\r\n555", "+1555\x00\x01"):
        d = service.score(attempt(call_id=user[:20], from_user=user), now=NOW)
        assert d.action in (Action.RELAY, Action.DIVERT, Action.REJECT)
    assert not r.keys("spitwall:{num:*")  # lookups never create keys


def test_on_a_cluster_import_count_export_and_lookup(redis_cluster_url: str,
                                                      tmp_path: Path) -> None:
    """Numbers spread over every master (one hash tag each): the import's pipelines, the
    SCAN over all nodes, and the INVITE's MGET routed to the number's master."""
    client = redisconn.client(redis_cluster_url, socket_timeout=2)
    store = Store(redis_cluster_url, timeout=2.0)
    try:
        client.flushall()
        db = NumberDb(client, batch=7)
        numbers = [f"+1555020{i:04d}" for i in range(40)]
        assert db.import_numbers("block", _lines(*numbers), source="feed") == (40, 0)
        slots = {key_slot(keys.number_key(n, "block").encode()) for n in numbers}
        assert len(slots) == 40  # one hash tag per number: spread over the cluster
        assert db.count("block") == 40
        assert db.export("block", tmp_path / "out.txt") == 40
        config_admin.set_value(client, "numbers.lookup", "true", user="test")
        service = ScoringService(store)
        service.score(attempt(call_id="warm-up"), now=NOW)
        d = service.score(attempt(call_id="c1", from_user=numbers[17]), now=NOW)
        assert d.action is Action.REJECT and d.rule == "blocklist"
        assert db.clear("block") == 40 and db.count("block") == 0
    finally:
        store.close()
        client.flushall()
        client.close()


def test_the_first_call_after_the_lookup_is_turned_on_is_looked_up(
    service: ScoringService, db: NumberDb, r: redis.Redis
) -> None:
    """Its round trip went out under the old config; the reply's config turns the lookup on,
    so the service looks the numbers up before deciding (a second round trip, once)."""
    service.score(attempt(call_id="before"), now=NOW)
    db.add("block", BLOCKED_NUMBER)
    config_admin.set_value(r, "numbers.lookup", "true", user="test")
    r.config_resetstat()
    first = service.score(attempt(call_id="first", from_user=BLOCKED_NUMBER), now=NOW)
    assert first.action is Action.REJECT and first.rule == "blocklist"
    assert r.info("commandstats")["cmdstat_mget"]["calls"] == 2  # versions, then the late one
    r.config_resetstat()
    second = service.score(attempt(call_id="second", from_user=BLOCKED_NUMBER), now=NOW)
    assert second.rule == "blocklist"
    assert r.info("commandstats")["cmdstat_mget"]["calls"] == 2  # versions + number, one trip
    clean = service.score(attempt(call_id="clean", from_user="alice"), now=NOW)
    assert clean.rule == "score"


def test_the_index_forgets_expired_numbers(db: NumberDb, r: redis.Redis) -> None:
    """count/export read the per-list index, whose scores are the expiry: a number whose key
    expired by its TTL is pruned from the index too."""
    db.import_numbers("block", _lines("+15550100001", "+15550100002"), source="a", ttl=1)
    db.add("block", "+15550100003")  # no TTL
    assert db.count("block") == 3
    idx = keys.number_index_key("+15550100001", "block")
    assert r.zscore(idx, "+15550100001") is not None
    time.sleep(1.3)
    assert db.count("block") == 1
    assert list(db.numbers("block")) == ["+15550100003"]
    assert r.zscore(idx, "+15550100001") is None
    db.remove("block", "+15550100003")
    assert db.count("block") == 0
    assert not [k for k in r.keys("spitwall:{numidx:*") if r.zcard(k)]
