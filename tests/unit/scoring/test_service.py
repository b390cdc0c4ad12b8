"""scoring.service.ScoringService against a real redis-server: live config, lists, fail-open."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator

import msgpack
import pytest
import redis

from lists.store import ListStore
from scoring import config_admin, keys
from scoring.model import Action
from scoring.service import COUNTER_FLUSH, ScoringService
from scoring.store import Store, find_decision
from tests.conftest import RedisServer
from tests.redis_replies import bytes_hash
from tests.unit.scoring.support import attempt, dead_redis_url

NOW = 1_800_000_000.0


@pytest.fixture
def service(redis_url: str) -> Iterator[ScoringService]:
    store = Store(redis_url, timeout=2.0)
    yield ScoringService(store)
    store.close()


def test_first_score_loads_config_and_lists(service: ScoringService, r: redis.Redis) -> None:
    d = service.score(attempt(), now=NOW)
    assert d.action is Action.RELAY
    assert d.degraded is False
    assert service.config.version == 0
    assert service.lists.version == 0
    assert service.counters["action:relay"] == 1


def test_decision_is_recorded(service: ScoringService, r: redis.Redis) -> None:
    service.score(attempt(call_id="rec-1", user_agent="friendly-scanner"), now=NOW)
    service.store.fetch_config()  # a round trip on the store's connection: deferred writes done
    d = find_decision(r, "rec-1")
    assert d is not None
    assert d["action"] == "reject"
    assert r.hget(keys.STATS, "action:reject") == b"1"


def test_config_version_bump_is_seen_on_next_score(service: ScoringService,
                                                   r: redis.Redis) -> None:
    service.score(attempt(), now=NOW)
    config_admin.reset(r, user="test")  # bumps the version, leaves no override
    config_admin.reset(r, user="test")
    service.score(attempt(), now=NOW)
    assert service.config.version == 2


def test_kill_switch_is_picked_up_on_next_score(service: ScoringService, r: redis.Redis) -> None:
    a = attempt(user_agent="friendly-scanner")
    assert service.score(a, now=NOW).action is Action.REJECT
    config_admin.set_value(r, "enabled", "false", user="test")
    d = service.score(a, now=NOW)
    assert d.action is Action.RELAY
    assert d.rule == "disabled"


def test_threshold_change_is_picked_up_on_next_score(service: ScoringService,
                                                     r: redis.Redis) -> None:
    a = attempt(user_agent="sipvicious")
    assert service.score(a, now=NOW).action is Action.REJECT
    config_admin.set_value(r, "weight.scanner", "0.5", user="test")
    config_admin.set_value(r, "weight.reputation", "0", user="test")  # the reject above
    config_admin.set_value(r, "weight.stir", "0", user="test")  # unsigned calls add 0.1
    config_admin.set_value(r, "reject_threshold", "0.9", user="test")
    d = service.score(a, now=NOW)
    assert d.score == 0.5
    assert d.action is Action.DIVERT


def test_list_add_is_picked_up_on_next_score(service: ScoringService, r: redis.Redis) -> None:
    a = attempt(source_ip="203.0.113.50")
    assert service.score(a, now=NOW).action is Action.RELAY
    ListStore(r).add("block", "ip", "203.0.113.50", reason="abuse", user="test")
    d = service.score(a, now=NOW)
    assert d.action is Action.REJECT
    assert d.rule == "blocklist"
    assert service.lists.version == 1
    ListStore(r).remove("block", "ip", "203.0.113.50", user="test")
    assert service.score(a, now=NOW).action is Action.RELAY


def test_allow_list_add_is_picked_up(service: ScoringService, r: redis.Redis) -> None:
    a = attempt(user_agent="friendly-scanner", from_user="+15550100")
    assert service.score(a, now=NOW).action is Action.REJECT
    ListStore(r).add("allow", "number", "+1 555 0100", user="test")
    d = service.score(a, now=NOW)
    assert (d.action, d.rule) == (Action.RELAY, "allowlist")


def test_lists_are_not_reloaded_without_a_version_change(service: ScoringService,
                                                         r: redis.Redis) -> None:
    service.score(attempt(), now=NOW)
    first = service.lists
    service.score(attempt(), now=NOW)
    assert service.lists is first


def test_shared_state_raises_the_score(service: ScoringService) -> None:
    d = None
    for n in range(100, 112):
        d = service.score(attempt(ruri_user=str(n), call_id=f"c{n}"), now=NOW)
    assert d is not None
    sweep = next(c for c in d.contributions if c.name == "sweep")
    assert sweep.score == 1.0
    assert sweep.reason == "12 sequential callees 100..111"
    # sweep 0.5 + rate_ip 0.35 * 7/15 + rate_caller 0.35 (12 from alice in 10 s) >= 1
    assert d.score == 1.0
    assert d.action is Action.REJECT


def test_dead_redis_fails_open() -> None:
    store = Store(dead_redis_url(), timeout=0.2, retry_after=5)
    service = ScoringService(store)
    started = time.monotonic()
    for i in range(50):
        d = service.score(attempt(call_id=f"c{i}"))
        assert d.action is Action.RELAY
        assert d.degraded is True
    assert time.monotonic() - started < 1.0
    assert service.counters["redis_unavailable"] == 50
    assert service.counters["record_lost"] == 50
    assert store.errors == 1
    assert service.available is False  # the intercept layer falls back to shared memory
    service.sync()
    assert service.available is False


def test_available_follows_the_latest_exchange(redis_server: RedisServer,
                                              redis_url: str) -> None:
    service = ScoringService(Store(redis_url, timeout=0.5, retry_after=0.0))
    service.score(attempt(), now=NOW)
    assert service.available is True
    redis_server.stop()
    try:
        service.score(attempt(), now=NOW)
        assert service.available is False
    finally:
        redis_server.start()
    service.sync()
    assert service.available is True
    service.store.close()


def test_dead_redis_still_rejects_scanners_locally() -> None:
    service = ScoringService(Store(dead_redis_url(), timeout=0.2))
    d = service.score(attempt(user_agent="friendly-scanner"))
    assert d.action is Action.REJECT
    assert d.degraded is True


def test_redis_going_down_mid_life_fails_open(redis_server: object, redis_url: str) -> None:
    store = Store(redis_url, timeout=0.5, retry_after=0.2)
    service = ScoringService(store)
    try:
        assert service.score(attempt()).degraded is False
        redis_server.stop()  # type: ignore[attr-defined]
        d = service.score(attempt())
        assert (d.action, d.degraded) == (Action.RELAY, True)
        redis_server.start()  # type: ignore[attr-defined]
        time.sleep(0.25)
        assert service.score(attempt()).degraded is False
    finally:
        store.close()


def test_scanner_probe_notes_the_source(service: ScoringService, r: redis.Redis) -> None:
    assert service.scanner_probe("198.51.100.7", "Linphone/5.0") is None
    hit = service.scanner_probe("198.51.100.7", "friendly-scanner")
    assert hit is not None
    service.store.fetch_config()
    assert r.get(keys.scan_key("198.51.100.7")) == b"1"
    assert 0 < r.ttl(keys.scan_key("198.51.100.7")) <= 86400
    sig_decision = service.score(attempt(source_ip="198.51.100.7"), now=NOW)
    scanner = next(c for c in sig_decision.contributions if c.name == "scanner")
    assert scanner.score == 0.7


def test_corrupt_list_entry_does_not_break_scoring(service: ScoringService,
                                                   r: redis.Redis) -> None:
    blob = msgpack.packb({"v": 1, "reason": "", "added": 0.0, "expires": 0.0, "by": "x"})
    r.hset(keys.list_key("block"), "cidr:bogus", blob)
    r.incr(keys.LISTS_VERSION)
    d = service.score(attempt(), now=NOW)
    assert d.action is Action.RELAY


def test_lists_key_of_wrong_type_does_not_break_scoring(service: ScoringService,
                                                        r: redis.Redis) -> None:
    r.set(keys.list_key("allow"), "oops")
    r.incr(keys.LISTS_VERSION)
    d = service.score(attempt(), now=NOW)
    assert d.action is Action.RELAY


def test_corrupt_list_entry_does_not_hide_valid_ones(service: ScoringService,
                                                     r: redis.Redis) -> None:
    service.score(attempt(), now=NOW)
    blob = msgpack.packb({"v": 1, "reason": "", "added": 0.0, "expires": 0.0, "by": "x"})
    r.hset(keys.list_key("block"), "cidr:bogus", blob)
    ListStore(r).add("block", "ip", "192.0.2.10", user="test")
    d = service.score(attempt(), now=NOW)
    assert d.action is Action.REJECT


def _evalsha_calls(r: redis.Redis) -> int:
    stats = r.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def test_kill_switch_skips_redis_and_polls_for_reenable(service: ScoringService,
                                                        r: redis.Redis) -> None:
    service.score(attempt(), now=NOW)
    config_admin.set_value(r, "enabled", "false", user="test")
    service.score(attempt(), now=NOW + 0.1)  # learns the new version, relays unscored
    assert service.config["enabled"] is False
    before = _evalsha_calls(r)
    for i in range(20):
        d = service.score(attempt(user_agent="friendly-scanner"), now=NOW + 0.2 + i * 0.01)
        assert d.action is Action.RELAY and d.rule == "disabled"
    assert _evalsha_calls(r) == before, "a disabled proxy must not run the scoring script"
    config_admin.set_value(r, "enabled", "true", user="test")
    # within a second the next call polls the version and scores again
    service.score(attempt(), now=NOW + 1.5)
    d = service.score(attempt(user_agent="friendly-scanner"), now=NOW + 1.6)
    assert d.action is Action.REJECT


def test_a_childs_own_counters_reach_the_stats_hash_once_redis_is_back(
        redis_server: RedisServer, redis_url: str, r: redis.Redis) -> None:
    """Calls that failed open while Redis was down are counted in `spitwall stats` once it is
    back; decisions are not counted twice, and `li_*` counters stay in the process."""
    store = Store(redis_url, timeout=0.5, retry_after=0.0)
    service = ScoringService(store)
    try:
        service.score(attempt(call_id="before"), now=NOW)  # connects, loads the config
        redis_server.stop()
        for i in range(3):
            assert service.score(attempt(call_id=f"down{i}"), now=NOW).degraded
        service.counters["li_calls"] += 1
        assert service.flush_counters() == {}  # down: kept for later
        redis_server.start()
        sent = service.flush_counters()
        assert sent == {"redis_unavailable": 3, "record_lost": 3}
        service.score(attempt(call_id="after"), now=NOW)  # drains the deferred write
        raw: dict[bytes, bytes] = r.hgetall(keys.STATS)  # type: ignore[assignment]
        stats = {k.decode(): int(v) for k, v in raw.items()}
        assert stats["redis_unavailable"] == 3 and stats["record_lost"] == 3
        # "after", recorded with its decision (the restarted Redis lost "before"; the calls
        # while it was down are not decisions in Redis, so they are not counted twice)
        assert stats["action:relay"] == 1
        assert not any(k.startswith("li_") for k in stats)
        assert service.flush_counters() == {}  # nothing new since
        service.counters["check_error:geoip"] += 2
        assert service.flush_counters() == {"check_error:geoip": 2}
    finally:
        store.close()


def test_counters_are_flushed_at_most_every_few_seconds(
        service: ScoringService, r: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    service.score(attempt(call_id="a"), now=NOW)
    service.counters["pass_token_refused"] += 1
    service.score(attempt(call_id="b"), now=NOW)  # within the interval: not flushed
    assert r.hget(keys.STATS, "pass_token_refused") is None
    later = time.monotonic() + COUNTER_FLUSH + 0.1
    monkeypatch.setattr(time, "monotonic", lambda: later)
    service.score(attempt(call_id="c"), now=NOW)  # flushes (deferred) ...
    monkeypatch.undo()
    service.score(attempt(call_id="d"), now=NOW)  # ... read back before this one's trip
    assert r.hget(keys.STATS, "pass_token_refused") == b"1"


def test_kill_switch_relays_are_counted(service: ScoringService, r: redis.Redis,
                                        redis_url: str) -> None:
    service.score(attempt(call_id="a"), now=NOW)
    config_admin.set_value(redis.Redis.from_url(redis_url), "enabled", "false")
    service.score(attempt(call_id="b"), now=NOW)  # sees the new version, reloads
    for i in range(4):
        assert service.score(attempt(call_id=f"off{i}"), now=NOW).rule == "disabled"
    assert service.flush_counters() == {"relay_disabled": 4}


def test_monitor_mode_relays_records_what_it_would_have_done(service: ScoringService,
                                                             r: redis.Redis) -> None:
    """mode=monitor: scored, recorded and counted as usual, but relayed; the record and the
    stats say what enforcing would have done; reputation is not nudged by a reject that did
    not happen; an explicit block-list entry is still applied; enforce applies again."""
    from scoring.reputation import caller_rep_key

    scanner = attempt(call_id="mon-1", user_agent="friendly-scanner", from_user="mallory")
    config_admin.set_value(r, "mode", "monitor", user="test")
    service.score(attempt(call_id="warm-up"), now=NOW)  # the child sees the change
    d = service.score(scanner, now=NOW)
    assert d.action is Action.RELAY and d.would is Action.REJECT and d.rule == "score"
    assert d.score >= 0.7
    ListStore(r).add("block", "ip", "203.0.113.66", reason="abuse", user="test")
    blocked = service.score(attempt(call_id="mon-2", source_ip="203.0.113.66"), now=NOW)
    assert blocked.action is Action.REJECT and blocked.would is None
    service.store.fetch_config()  # a round trip: the deferred writes are done
    rec = find_decision(r, "mon-1")
    assert rec is not None and rec["action"] == "relay" and rec["would"] == "reject"
    assert "would" not in (find_decision(r, "mon-2") or {})
    stats = {k.decode(): int(v) for k, v in bytes_hash(r.hgetall(keys.STATS)).items()}
    assert stats["monitor:reject"] == 1 and stats["action:reject"] == 1  # the block only
    assert not r.exists(caller_rep_key(scanner.caller_key))
    config_admin.set_value(r, "mode", "enforce", user="test")
    again = service.score(attempt(call_id="mon-3", user_agent="friendly-scanner",
                                  from_user="mallory"), now=NOW)
    assert again.action is Action.REJECT and again.would is None


# -- emergency calls (scoring/emergency.py) ---------------------------------------------
def test_an_emergency_call_is_relayed_whatever_the_lists_say(service: ScoringService,
                                                             r: redis.Redis) -> None:
    """From a block-listed source with a scanner User-Agent: relayed, no scoring round trip,
    recorded for explain, counted."""
    service.score(attempt(call_id="warm-up"), now=NOW)
    ListStore(r).add("block", "ip", "203.0.113.9", user="test")
    service.score(attempt(call_id="sync"), now=NOW)  # the child sees the block
    caller = {"source_ip": "203.0.113.9", "user_agent": "friendly-scanner"}
    assert service.score(attempt(call_id="plain", **caller), now=NOW).action is Action.REJECT
    r.config_resetstat()
    d = service.score(attempt(call_id="sos-1", request_uri="sip:911@carrier.example",
                          ruri_user="911", **caller), now=NOW)
    assert d.action is Action.RELAY and d.rule == "emergency" and d.score == 0.0
    assert "never screened" in d.contributions[0].reason
    service.store.fetch_config()  # a round trip: the deferred record is written
    stats = r.info("commandstats")
    # no scoring round trip (3 observe EVALSHAs and an MGET): only the record's EVALSHA
    assert stats["cmdstat_evalsha"]["calls"] == 1 and "cmdstat_mget" not in stats
    rec = find_decision(r, "sos-1")
    assert rec is not None and rec["rule"] == "emergency" and rec["action"] == "relay"
    assert service.counters["emergency"] == 1
    assert service.flush_counters()["emergency"] == 1


def test_the_emergency_codes_are_live_config(service: ScoringService, r: redis.Redis) -> None:
    sos = attempt(call_id="c1", request_uri="sip:999@carrier.example", ruri_user="999",
                  user_agent="friendly-scanner")
    assert service.score(sos, now=NOW).action is Action.REJECT  # 999 is not configured
    config_admin.set_value(r, "emergency.numbers", "112,911,999", user="test")
    service.score(attempt(call_id="sync"), now=NOW)
    assert service.score(sos, now=NOW).rule == "emergency"
    with pytest.raises(ValueError, match=r"emergency\.numbers: invalid value"):
        config_admin.set_value(r, "emergency.numbers", "999,abc", user="test")
    assert r.hget(keys.CONFIG, "emergency.numbers") == b"112,911,999"


def test_the_kill_switch_relays_emergency_calls_without_touching_redis(
    service: ScoringService, r: redis.Redis
) -> None:
    config_admin.set_value(r, "enabled", "false", user="test")
    service.score(attempt(call_id="sync"), now=NOW)
    d = service.score(attempt(call_id="sos-2", request_uri="urn:service:sos"), now=NOW + 0.1)
    assert d.action is Action.RELAY and d.rule == "disabled"


def test_call_end_in_a_process_that_scored_nothing_uses_the_live_config(
        service: ScoringService, r: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh Kamailio process (after a restart) or the timer process sees dialog ends
    without INVITEs: the duration thresholds must be the operator's, not the defaults."""
    config_admin.set_value(r, "reputation.long_call", "2", user="test")
    assert service.call_ended("alice@example.com", "192.0.2.1", 7.0) == "long_call"
    assert service.config.version == 1
    # a config change is seen by an idle process once its look is older than CONFIG_MAX_AGE
    config_admin.set_value(r, "reputation.long_call", "10", user="test")
    assert service.call_ended("alice@example.com", "192.0.2.1", 7.0) == "long_call"  # < 1 s
    clock = time.monotonic() + 5
    monkeypatch.setattr(time, "monotonic", lambda: clock)
    assert service.call_ended("alice@example.com", "192.0.2.1", 7.0) is None
    assert service.config.version == 2


def test_labelled_relay_is_recorded_and_counted(service: ScoringService,
                                                r: redis.Redis) -> None:
    config_admin.set_value(r, "label.threshold", "0", user="test")
    service.sync()  # the service sees the new config
    d = service.score(attempt(call_id="lab-1"), now=NOW)
    assert d.action is Action.RELAY
    assert d.label.startswith("<data:,>;purpose=info;type=spam;confidence=")
    service.store.fetch_config()  # the deferred writes are done
    rec = find_decision(r, "lab-1")
    assert rec is not None and rec["label"] == d.label
    assert r.hget(keys.STATS, "labelled") == b"1"
    config_admin.set_value(r, "label.threshold", "1", user="test")
    service.sync()
    assert service.score(attempt(call_id="lab-2"), now=NOW).label == ""


def test_an_opted_out_callee_gets_its_calls_relayed_but_explicit_blocks_apply(
        service: ScoringService, r: redis.Redis) -> None:
    """Subscribers may opt out of screening (analytics-based blocking): their calls are
    relayed, with what scoring would have done recorded and counted; operator blocks stay."""
    scanner = attempt(call_id="opt-1", user_agent="friendly-scanner", ruri_user="+15550177")
    assert service.score(scanner, now=NOW).action is Action.REJECT
    ListStore(r).add("optout", "number", "+1 555 0177", reason="subscriber request",
                     user="test")
    d = service.score(dataclasses.replace(scanner, call_id="opt-2"), now=NOW)
    assert (d.action, d.would, d.rule) == (Action.RELAY, Action.REJECT, "score")
    assert d.waived == "optout: number +15550177"
    assert service.counters["optout:reject"] == 1
    service.store.fetch_config()  # the deferred writes are done
    rec = find_decision(r, "opt-2")
    assert rec is not None and rec["would"] == "reject" and rec["waived"] == d.waived
    assert r.hget(keys.STATS, "optout:reject") == b"1"
    # other callees are screened as before; an explicit block still rejects the opted-out one
    other = dataclasses.replace(scanner, call_id="opt-3", ruri_user="+15550178")
    assert service.score(other, now=NOW).action is Action.REJECT
    ListStore(r).add("block", "ip", scanner.source_ip, reason="abuse", user="test")
    d = service.score(dataclasses.replace(scanner, call_id="opt-4"), now=NOW)
    assert (d.action, d.rule, d.would) == (Action.REJECT, "blocklist", None)


def test_opt_out_in_e164_matches_a_national_request_uri(service: ScoringService,
                                                        r: redis.Redis) -> None:
    ListStore(r).add("optout", "number", "+14155550199", user="test")
    national = attempt(call_id="opt-5", user_agent="friendly-scanner", ruri_user="4155550199")
    d = service.score(national, now=NOW)
    assert (d.action, d.would) == (Action.RELAY, Action.REJECT)
    assert d.waived == "optout: number +14155550199"
    other = dataclasses.replace(national, call_id="opt-6", ruri_user="4155550198")
    assert service.score(other, now=NOW).action is Action.REJECT
