"""scoring.config_admin and scoring.audit against a real redis-server."""

from __future__ import annotations

import getpass
from collections.abc import Iterator

import pytest
import redis

from scoring import audit, config_admin, keys
from tests.redis_replies import str_entries, str_hash


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


def _audit(r: redis.Redis) -> list[dict[str, str]]:
    return [fields for _id, fields in str_entries(r.xrange(keys.AUDIT))]


def _state(r: redis.Redis) -> tuple[dict[str, str], str | None, int]:
    config, version, length = r.hgetall(keys.CONFIG), r.get(keys.CONFIG_VERSION), r.xlen(keys.AUDIT)
    assert version is None or isinstance(version, str)
    return str_hash(config), version, length


# ---------------------------------------------------------------------------------------------
# set


def test_set_stores_bumps_version_and_audits(r: redis.Redis) -> None:
    value = config_admin.set_value(r, "divert_threshold", "0.4", user="alice")
    assert value == 0.4
    assert r.hgetall(keys.CONFIG) == {"divert_threshold": "0.4"}
    assert r.get(keys.CONFIG_VERSION) == "1"
    entries = _audit(r)
    assert len(entries) == 1
    e = entries[0]
    assert e["user"] == "alice"
    assert e["what"] == "config"
    assert e["action"] == "set"
    assert e["key"] == "divert_threshold"
    assert e["old"] == "0.3 (default)"
    assert e["new"] == "0.4"
    assert float(e["ts"]) > 1e9


def test_second_set_records_previous_value(r: redis.Redis) -> None:
    config_admin.set_value(r, "weight.sweep", "0.8", user="alice")
    config_admin.set_value(r, "weight.sweep", "1.2", user="bob")
    assert r.get(keys.CONFIG_VERSION) == "2"
    last = _audit(r)[-1]
    assert (last["user"], last["old"], last["new"]) == ("bob", "0.8", "1.2")


def test_set_canonicalises_what_is_stored(r: redis.Redis) -> None:
    assert config_admin.set_value(r, "enabled", " OFF ", user="u") is False
    assert config_admin.set_value(r, "reject_code", "608 ", user="u") == "608"
    assert config_admin.set_value(r, "rate.short_window", " 20", user="u") == 20
    assert r.hgetall(keys.CONFIG) == {"enabled": "false", "reject_code": "608",
                                      "rate.short_window": "20"}


def test_set_without_user_records_os_user(r: redis.Redis) -> None:
    config_admin.set_value(r, "enabled", "true")
    assert _audit(r)[0]["user"] == audit.os_user()


def test_set_keeps_the_value_exactly(r: redis.Redis) -> None:
    value = config_admin.set_value(r, "rate_ip.long.hard", "1234567", user="u")
    cfg, _raw = config_admin.show(r)
    assert cfg["rate_ip.long.hard"] == value == 1234567.0


@pytest.mark.parametrize(("key", "text", "word"), [
    ("divert_treshold", "0.4", "unknown config key 'divert_treshold'"),
    ("divert_threshold", "1.5", "divert_threshold: 1.5 is above the maximum 1"),
    ("divert_threshold", "0.8", "must not exceed reject_threshold"),
    ("sweep.soft", "40", "sweep.soft (40) must be below sweep.hard (30)"),
    ("enabled", "perhaps", "enabled: invalid value 'perhaps'"),
    ("rate.short_window", "300", "rate.short_window must be shorter"),
])
def test_invalid_set_changes_nothing(r: redis.Redis, key: str, text: str, word: str) -> None:
    config_admin.set_value(r, "weight.scanner", "0.9", user="u")
    before = _state(r)
    with pytest.raises(ValueError) as err:
        config_admin.set_value(r, key, text, user="mallory")
    assert word in str(err.value)
    assert _state(r) == before


def test_invalid_set_on_empty_redis_creates_nothing(r: redis.Redis) -> None:
    with pytest.raises(ValueError):
        config_admin.set_value(r, "divert_threshold", "2", user="u")
    assert r.keys("*") == []


def test_set_is_validated_against_stored_values(r: redis.Redis) -> None:
    config_admin.set_value(r, "reject_threshold", "0.9", user="u")
    config_admin.set_value(r, "divert_threshold", "0.85", user="u")
    with pytest.raises(ValueError, match="must not exceed"):
        config_admin.set_value(r, "reject_threshold", "0.8", user="u")
    assert r.hget(keys.CONFIG, "reject_threshold") == "0.9"


# ---------------------------------------------------------------------------------------------
# show and reset


def test_show_reports_effective_config_raw_and_version(r: redis.Redis) -> None:
    config_admin.set_value(r, "divert_threshold", "0.4", user="u")
    r.hset(keys.CONFIG, "weight.sweep", "lots")  # a hand edit
    cfg, raw = config_admin.show(r)
    assert cfg.version == 1
    assert cfg.get_float("divert_threshold") == 0.4
    assert cfg.weight("sweep") == 0.5
    assert raw == {"divert_threshold": "0.4", "weight.sweep": "lots"}
    assert any("weight.sweep" in e for e in cfg.errors)


def test_reset_one_key(r: redis.Redis) -> None:
    config_admin.set_value(r, "divert_threshold", "0.4", user="u")
    config_admin.set_value(r, "weight.sweep", "2", user="u")
    assert config_admin.reset(r, "divert_threshold", user="carol") == 1
    assert r.hgetall(keys.CONFIG) == {"weight.sweep": "2"}
    assert r.get(keys.CONFIG_VERSION) == "3"
    e = _audit(r)[-1]
    assert (e["user"], e["action"], e["key"]) == ("carol", "reset", "divert_threshold")
    assert e["old"] == "divert_threshold=0.4"
    assert e["new"] == "defaults"


def test_reset_all(r: redis.Redis) -> None:
    config_admin.set_value(r, "divert_threshold", "0.4", user="u")
    config_admin.set_value(r, "weight.sweep", "2", user="u")
    assert config_admin.reset(r, user="carol") == 2
    assert r.hgetall(keys.CONFIG) == {}
    assert r.get(keys.CONFIG_VERSION) == "3"
    e = _audit(r)[-1]
    assert e["key"] == "*"
    assert e["old"] == "divert_threshold=0.4, weight.sweep=2"
    cfg, _ = config_admin.show(r)
    assert cfg.get_float("divert_threshold") == 0.3


def test_reset_key_not_set_removes_nothing(r: redis.Redis) -> None:
    assert config_admin.reset(r, "weight.sweep", user="u") == 0
    assert r.hgetall(keys.CONFIG) == {}


def test_reset_unknown_key_refused_and_changes_nothing(r: redis.Redis) -> None:
    config_admin.set_value(r, "weight.sweep", "2", user="u")
    before = _state(r)
    with pytest.raises(ValueError, match=r"unknown config key 'weight\.swep'"):
        config_admin.reset(r, "weight.swep", user="u")
    assert _state(r) == before


def test_reset_refused_when_it_would_contradict(r: redis.Redis) -> None:
    config_admin.set_value(r, "reject_threshold", "0.9", user="u")
    config_admin.set_value(r, "divert_threshold", "0.8", user="u")
    config_admin.set_value(r, "sweep.soft", "12", user="u")
    before = _state(r)
    with pytest.raises(ValueError, match="must not exceed"):
        config_admin.reset(r, "reject_threshold", user="u")
    assert _state(r) == before


def test_reset_leaves_a_consistent_config(r: redis.Redis) -> None:
    config_admin.set_value(r, "reject_threshold", "0.9", user="u")
    config_admin.set_value(r, "divert_threshold", "0.5", user="u")
    assert config_admin.reset(r, "reject_threshold", user="u") == 1
    cfg, _ = config_admin.show(r)
    assert cfg.errors == ()
    assert cfg.get_float("divert_threshold") == 0.5


# ---------------------------------------------------------------------------------------------
# audit helpers


def test_os_user_names_sudo_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(getpass, "getuser", lambda: "root")  # what audit.os_user calls
    monkeypatch.setenv("SUDO_USER", "alice")
    assert audit.os_user() == "alice (via sudo as root)"
    monkeypatch.setenv("SUDO_USER", "root")
    assert audit.os_user() == "root"
    monkeypatch.delenv("SUDO_USER")
    assert audit.os_user() == "root"


def test_os_user_without_passwd_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail() -> str:
        raise KeyError("no passwd entry")

    monkeypatch.setattr(getpass, "getuser", fail)
    monkeypatch.delenv("SUDO_USER", raising=False)
    assert audit.os_user().startswith("uid:")


def test_audit_stream_is_capped(r: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit, "AUDIT_MAXLEN", 10)
    for i in range(300):
        config_admin.set_value(r, "weight.sweep", str(i % 10), user="u")
    # approximate trimming: bounded, well below the number of changes
    assert r.xlen(keys.AUDIT) < 300


def test_every_change_mirrors_the_kill_switch(r: redis.Redis) -> None:
    """`spitwall:{cfg}:enabled` follows the effective `enabled` after every change, for readers
    that may not read the config hash (the metrics role)."""
    assert r.get(keys.KILL_SWITCH) is None
    config_admin.set_value(r, "divert_threshold", "0.4")
    assert r.get(keys.KILL_SWITCH) == "1"  # default, written with any change
    config_admin.set_value(r, "enabled", "off")
    assert r.get(keys.KILL_SWITCH) == "0"
    config_admin.set_value(r, "reject_threshold", "0.9")  # another key: still off
    assert r.get(keys.KILL_SWITCH) == "0"
    config_admin.reset(r, "divert_threshold")
    assert r.get(keys.KILL_SWITCH) == "0"
    config_admin.reset(r, "enabled")
    assert r.get(keys.KILL_SWITCH) == "1"
    config_admin.set_value(r, "enabled", "false")
    config_admin.reset(r)  # everything back to defaults
    assert r.get(keys.KILL_SWITCH) == "1"
    with pytest.raises(ValueError):
        config_admin.set_value(r, "enabled", "maybe")
    assert r.get(keys.KILL_SWITCH) == "1"  # a refused change changes nothing
