"""ops.cli: the `spitwall` operator tool, run in-process against a real redis-server."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from scoring import keys
from scoring.model import Action, Contribution, Decision
from scoring.store import Store
from tests.redis_replies import str_entries
from tests.unit.scoring.support import attempt, dead_redis_url

Result = tuple[int, str, str]
Run = Callable[..., Result]


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    """A client without decoding: list records are msgpack."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def _state(r: redis.Redis) -> dict[str, Any]:
    return {"config": r.hgetall(keys.CONFIG), "version": r.get(keys.CONFIG_VERSION),
            "lists": {n: r.hgetall(keys.list_key(n)) for n in ("allow", "block", "scanner")},
            "lists_version": r.get(keys.LISTS_VERSION), "audit": r.xlen(keys.AUDIT)}


def _one_line_error(err: str) -> None:
    assert err.endswith("\n")
    assert err.count("\n") == 1, err
    assert "error:" in err
    assert "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# config


def test_config_show_text(run: Run) -> None:
    rc, out, err = run("config", "show")
    assert (rc, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == "config version 0"
    assert any(line.split()[:2] == ["enabled", "true"] for line in lines)
    assert any(line.split()[:2] == ["divert_threshold", "0.3"] for line in lines)
    assert "* = set by an operator" in out


def test_config_show_json(run: Run, r: redis.Redis) -> None:
    r.hset(keys.CONFIG, mapping={"divert_threshold": "0.4", "weight.sweep": "junk"})
    r.set(keys.CONFIG_VERSION, 3)
    rc, out, _ = run("config", "show", "--json")
    assert rc == 0
    data = json.loads(out)
    assert data["version"] == 3
    row = data["config"]["divert_threshold"]
    assert row == {"value": 0.4, "default": 0.3, "set": True,
                   "help": row["help"]}
    assert data["config"]["enabled"]["set"] is False
    assert data["config"]["weight.sweep"]["value"] == 0.5
    assert any("weight.sweep" in e for e in data["errors"])


def test_config_show_text_marks_overrides_and_warnings(run: Run, r: redis.Redis) -> None:
    r.hset(keys.CONFIG, mapping={"divert_threshold": "0.4", "weight.sweep": "junk"})
    rc, out, _ = run("config", "show")
    assert rc == 0
    assert any(line.startswith("* divert_threshold") and " 0.4 " in line
               for line in out.splitlines())
    assert "warning: weight.sweep" in out


def test_config_set_text(run: Run, r: redis.Redis) -> None:
    rc, out, err = run("config", "set", "divert_threshold", "0.4")
    assert (rc, out, err) == (0, "divert_threshold = 0.4\n", "")
    assert r.hget(keys.CONFIG, "divert_threshold") == "0.4"
    assert r.get(keys.CONFIG_VERSION) == "1"
    [(_id, entry)] = str_entries(r.xrange(keys.AUDIT))
    assert (entry["key"], entry["new"]) == ("divert_threshold", "0.4")
    assert entry["user"]


def test_config_set_json(run: Run, r: redis.Redis) -> None:
    rc, out, _ = run("config", "set", "enabled", "off", "--json")
    assert rc == 0
    assert json.loads(out) == {"key": "enabled", "value": False}
    assert r.hget(keys.CONFIG, "enabled") == "false"


def test_global_redis_option_before_the_command(run: Run, redis_url: str,
                                                 r: redis.Redis) -> None:
    rc, _, _ = run("--redis", redis_url, "config", "set", "weight.sweep", "2", redis_arg=False)
    assert rc == 0
    assert r.hget(keys.CONFIG, "weight.sweep") == "2"


def test_redis_url_from_environment(run: Run, redis_url: str, r: redis.Redis,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPITWALL_REDIS", redis_url)
    rc, _, _ = run("config", "set", "weight.sweep", "3", redis_arg=False)
    assert rc == 0
    assert r.hget(keys.CONFIG, "weight.sweep") == "3"


@pytest.mark.parametrize(("argv", "word"), [
    (("config", "set", "divert_treshold", "0.4"), "unknown config key 'divert_treshold'"),
    (("config", "set", "divert_threshold", "1.4"), "above the maximum"),
    (("config", "set", "divert_threshold", "lots"), "invalid value 'lots'"),
    (("config", "set", "divert_threshold", "0.9"), "must not exceed reject_threshold"),
    (("config", "set", "sweep.soft", "99"), "must be below sweep.hard"),
    (("config", "set", "score_header", "X Bad\r\nHeader"), "not a SIP header name"),
    (("config", "reset", "nonsense"), "unknown config key 'nonsense'"),
    (("config", "set", "enabled", "maybe", "--json"), "enabled: invalid value"),
])
def test_config_invalid_exits_2_and_changes_nothing(run: Run, raw: redis.Redis,
                                                    argv: tuple[str, ...], word: str) -> None:
    run("config", "set", "weight.scanner", "0.9")
    before = _state(raw)
    rc, out, err = run(*argv)
    assert rc == 2
    assert out == ""
    _one_line_error(err)
    assert word in err
    assert _state(raw) == before


def test_config_reset_one_text_and_json(run: Run, r: redis.Redis) -> None:
    run("config", "set", "divert_threshold", "0.4")
    run("config", "set", "weight.sweep", "2")
    rc, out, _ = run("config", "reset", "divert_threshold")
    assert rc == 0
    assert out == "reset divert_threshold to defaults (1 override(s) removed)\n"
    assert r.hgetall(keys.CONFIG) == {"weight.sweep": "2"}
    rc, out, _ = run("config", "reset", "--json")
    assert rc == 0
    assert json.loads(out) == {"reset": "*", "removed": 1}
    assert r.hgetall(keys.CONFIG) == {}
    assert r.get(keys.CONFIG_VERSION) == "4"


def test_config_reset_all_text(run: Run, r: redis.Redis) -> None:
    run("config", "set", "divert_threshold", "0.4")
    rc, out, _ = run("config", "reset")
    assert rc == 0
    assert out == "reset all keys to defaults (1 override(s) removed)\n"


# ---------------------------------------------------------------------------------------------
# argparse errors


@pytest.mark.parametrize("argv", [
    ("config", "frob"),
    ("config",),
    ("frobnicate",),
    (),
    ("list", "add", "greylist", "ip", "192.0.2.1"),
    ("list", "add", "block", "mac", "00:11"),
    ("list", "add", "block", "ip", "192.0.2.1", "--ttl", "-5"),
    ("list", "add", "block", "ip", "192.0.2.1", "--ttl", "soon"),
    ("config", "set", "enabled"),
    ("explain",),
    ("config", "show", "--bogus"),
])
def test_usage_errors_exit_2_with_one_line(run: Run, raw: redis.Redis,
                                           argv: tuple[str, ...]) -> None:
    before = _state(raw)
    rc, out, err = run(*argv)
    assert rc == 2
    assert out == ""
    _one_line_error(err)
    assert _state(raw) == before


def test_config_frob_names_the_bad_choice(run: Run) -> None:
    _rc, _out, err = run("config", "frob")
    assert "invalid choice: 'frob'" in err


# ---------------------------------------------------------------------------------------------
# unreachable or bad Redis


@pytest.mark.parametrize("argv", [
    ("config", "show"), ("config", "set", "enabled", "false"), ("list", "show", "block"),
    ("explain", "abc"), ("list", "add", "block", "ip", "192.0.2.1"),
])
def test_unreachable_redis_exits_1_with_one_line(run: Run, argv: tuple[str, ...]) -> None:
    url = dead_redis_url()
    rc, out, err = run(*argv, "--redis", url, redis_arg=False)
    assert rc == 1
    assert out == ""
    _one_line_error(err)
    assert f"cannot reach Redis at {url}" in err


def test_bad_redis_url_exits_1(run: Run) -> None:
    rc, _, err = run("config", "show", "--redis", "nonsense://x", redis_arg=False)
    assert rc == 1
    _one_line_error(err)
    assert "bad --redis URL" in err


# ---------------------------------------------------------------------------------------------
# lists


def test_list_add_show_remove(run: Run, r: redis.Redis) -> None:
    rc, out, err = run("list", "add", "block", "cidr", "192.0.2.77/24", "--reason", "abuse")
    assert (rc, err) == (0, "")
    assert out == "added cidr 192.0.2.0/24 to the block list\n"
    assert r.hkeys(keys.list_key("block")) == ["cidr:192.0.2.0/24"]
    assert r.get(keys.LISTS_VERSION) == "1"

    rc, out, _ = run("list", "add", "allow", "ip", "198.51.100.1", "--ttl", "3600", "--json")
    assert rc == 0
    added = json.loads(out)
    assert added["value"] == "198.51.100.1"
    assert 3599 <= added["expires"] - added["added"] <= 3601

    rc, out, _ = run("list", "show", "block")
    assert rc == 0
    assert out.split()[:2] == ["cidr", "192.0.2.0/24"]
    assert "abuse" in out
    rc, out, _ = run("list", "show", "allow", "--json")
    assert [e["value"] for e in json.loads(out)] == ["198.51.100.1"]
    rc, out, _ = run("list", "show", "allow", "ip")
    assert "198.51.100.1" in out
    assert "until" not in out

    rc, out, _ = run("list", "remove", "block", "cidr", "192.0.2.0/24")
    assert (rc, out) == (0, "removed cidr 192.0.2.0/24 from block\n")
    rc, out, _ = run("list", "show", "block")
    assert out == "the block list is empty\n"
    assert r.xlen(keys.AUDIT) == 3


def test_list_add_with_ttl_prints_expiry(run: Run) -> None:
    rc, out, _ = run("list", "add", "block", "ip", "192.0.2.1", "--ttl", "60")
    assert rc == 0
    assert " until " in out and out.rstrip().endswith("Z")


@pytest.mark.parametrize(("argv", "rc_expected", "word"), [
    (("list", "add", "block", "ip", "not-an-ip"), 2, "not an IP address"),
    (("list", "add", "block", "ip"), 1, "needs a VALUE"),
    (("list", "add", "block", "ip", "192.0.2.1", "--reason", "x" * 300), 2, "--reason"),
    (("list", "remove", "block", "ip", "192.0.2.200"), 1, "is not on the block list"),
    (("list", "remove", "block", "ip", "bogus"), 2, "not an IP address"),
    (("list", "remove", "block", "ip"), 1, "needs a VALUE"),
    (("list", "show", "block", "mac"), 1, "unknown list kind 'mac'"),
])
def test_list_bad_input(run: Run, raw: redis.Redis, argv: tuple[str, ...],
                        rc_expected: int, word: str) -> None:
    run("list", "add", "block", "ip", "192.0.2.1")
    before = _state(raw)
    rc, out, err = run(*argv)
    assert rc == rc_expected
    assert out == ""
    _one_line_error(err)
    assert word in err
    assert _state(raw) == before


def test_list_export_import(run: Run, r: redis.Redis, raw: redis.Redis, tmp_path: Path) -> None:
    run("list", "add", "block", "domain", "spam.example", "--reason", "spam")
    run("list", "add", "allow", "number", "+15550100")
    run("list", "add", "scanner", "ua", "evil-dialer*")
    path = tmp_path / "lists.json"
    rc, out, _ = run("list", "export", str(path))
    assert (rc, out) == (0, f"exported 3 entries to {path}\n")
    exported = raw.hgetall(keys.list_key("block"))
    r.flushall()
    rc, out, _ = run("list", "import", str(path), "--json")
    assert rc == 0
    assert json.loads(out) == {"imported": 3}
    assert raw.hgetall(keys.list_key("block")) == exported
    rc, out, _ = run("list", "show", "scanner")
    assert "evil-dialer*" in out


def test_list_import_bad_file_exits_2_and_changes_nothing(run: Run, raw: redis.Redis,
                                                          tmp_path: Path) -> None:
    run("list", "add", "block", "ip", "192.0.2.1")
    before = _state(raw)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"version": 1, "lists": {"block": [
        {"kind": "ip", "value": "203.0.113.5"}, {"kind": "ip", "value": "nope"}]}}))
    for path in (bad, tmp_path / "missing.json"):
        rc, out, err = run("list", "import", str(path))
        assert rc == 2
        assert out == ""
        _one_line_error(err)
    assert _state(raw) == before


def test_list_import_wrong_type_exits_2(run: Run, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"version": 1, "lists": {"block": [
        {"kind": "ip", "value": "203.0.113.5", "added": [1]}]}}))
    rc, _out, err = run("list", "import", str(bad))
    assert rc == 2
    _one_line_error(err)


def test_list_export_to_bad_path_exits_1(run: Run, tmp_path: Path) -> None:
    rc, out, err = run("list", "export", str(tmp_path / "no" / "such" / "dir.json"))
    assert rc == 1
    assert out == ""
    _one_line_error(err)
    assert "cannot write" in err


# ---------------------------------------------------------------------------------------------
# explain


def test_explain_unknown_call_id_exits_1(run: Run) -> None:
    rc, out, err = run("explain", "no-such-call@host")
    assert rc == 1
    assert out == ""
    _one_line_error(err)
    assert "no decision recorded for Call-ID 'no-such-call@host'" in err


@pytest.fixture
def recorded(redis_url: str) -> str:
    store = Store(redis_url, timeout=2.0)
    d = Decision(Action.DIVERT, 0.475, (
        Contribution("rate_ip", 0.5, 0.35, "12 INVITEs/10s per ip (soft 5, hard 20)"),
        Contribution("sweep", 0.6, 0.5, "19 distinct callees from 192.0.2.10"),
        Contribution("scanner", 0.0, 1.0, ""),
    ))
    store.record(attempt(call_id="explain-me@host", user_agent="Zoiper rv2.10"), d,
                 now=1_800_000_000.0)
    store.fetch_config()  # a round trip on the store's connection: the record is written
    store.close()
    return "explain-me@host"


def test_explain_text(run: Run, recorded: str) -> None:
    rc, out, err = run("explain", recorded)
    assert (rc, err) == (0, "")
    assert f"Call-ID   {recorded}" in out
    assert "time      2027-01-15 08:00:00Z" in out
    assert "sip:alice@example.com -> sip:15550100@carrier.example from 192.0.2.10:5060/udp" in out
    assert "UA        Zoiper rv2.10" in out
    assert "decision  DIVERT  score 0.47  (rule: score)" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[6:] if line.strip()}
    assert rows["rate_ip"][1:4] == ["0.50", "0.35", "0.175"]
    assert rows["sweep"][1:4] == ["0.60", "0.50", "0.300"]
    assert rows["scanner"][1:4] == ["0.00", "1.00", "0.000"]
    assert "12 INVITEs/10s per ip" in " ".join(rows["rate_ip"])


def test_explain_json(run: Run, recorded: str) -> None:
    rc, out, _ = run("explain", recorded, "--json")
    assert rc == 0
    data = json.loads(out)
    assert data["call_id"] == recorded
    assert data["action"] == "divert"
    assert data["score"] == 0.475
    assert data["degraded"] is False
    assert data["checks"] == [
        {"check": "rate_ip", "score": 0.5, "weight": 0.35, "contribution": 0.175,
         "reason": "12 INVITEs/10s per ip (soft 5, hard 20)"},
        {"check": "sweep", "score": 0.6, "weight": 0.5, "contribution": 0.3,
         "reason": "19 distinct callees from 192.0.2.10"},
        {"check": "scanner", "score": 0.0, "weight": 1.0, "contribution": 0.0, "reason": ""},
    ]
    assert data["call"]["ua"] == "Zoiper rv2.10"


def test_explain_degraded_decision(run: Run, redis_url: str) -> None:
    store = Store(redis_url, timeout=2.0)
    store.record(attempt(call_id="deg@h"), Decision(Action.RELAY, 0.0, degraded=True))
    store.fetch_config()
    store.close()
    rc, out, _ = run("explain", "deg@h")
    assert rc == 0
    assert "degraded: Redis unavailable" in out


# ---------------------------------------------------------------------------------------------
# audit and stats


def test_audit_and_stats(run: Run) -> None:
    rc, out, _ = run("audit")
    assert (rc, out) == (0, "no audit records\n")
    rc, out, _ = run("stats")
    assert (rc, out) == (0, "no calls counted yet\n")
    run("config", "set", "weight.sweep", "2")
    run("list", "add", "block", "ip", "192.0.2.1")
    rc, out, _ = run("audit", "--json")
    rows = json.loads(out)
    assert [r["what"] for r in rows] == ["list", "config"]  # newest first
    rc, out, _ = run("audit")
    assert out.splitlines()[0].split()[3:5] == ["config", "set"]
