"""scoring.emergency and the service's handling of emergency calls (real redis-server)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from lists.store import ListStore
from scoring import config_admin, keys
from scoring.emergency import parse_numbers, service
from scoring.model import Action
from scoring.service import ScoringService
from scoring.store import Store, find_decision
from tests.unit.scoring.support import attempt

NOW = 1_800_000_000.0
CODES = frozenset({"112", "911"})


@pytest.mark.parametrize("ruri, user, expected", [
    ("urn:service:sos", "", "urn:service:sos"),
    ("URN:Service:SOS.police", "", "urn:service:sos.police"),
    ("urn:service:sos;foo=bar", "", "urn:service:sos"),
    ("sip:911@carrier.example;user=phone", "911", "911"),
    ("tel:+112", "+112", "112"),
    ("sip:sos@ims.example", "sos", "sos"),
    ("urn:service:sosx", "", None),  # not a sos service
    ("urn:service:counseling", "", None),
    ("sip:9110@carrier.example", "9110", None),
    ("sip:19115550100@carrier.example", "19115550100", None),
    ("sip:bob@carrier.example", "bob", None),
    ("", "", None),
])
def test_service_recognises_emergency_request_uris(ruri: str, user: str,
                                                   expected: str | None) -> None:
    assert service(ruri, user, CODES) == expected


def test_parse_numbers() -> None:
    assert parse_numbers("112, 911,+999,,") == {"112", "911", "999"}
    for bad in ("91a", "1", "1234567", "911;drop"):
        with pytest.raises(ValueError, match="is not 2 to 6 digits"):
            parse_numbers(bad)


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def svc(redis_url: str) -> Iterator[ScoringService]:
    store = Store(redis_url, timeout=2.0)
    yield ScoringService(store)
    store.close()


def test_an_emergency_call_is_relayed_whatever_the_lists_say(svc: ScoringService,
                                                             r: redis.Redis) -> None:
    """From a block-listed source with a scanner User-Agent: relayed, no scoring round trip,
    recorded for explain, counted."""
    svc.score(attempt(call_id="warm-up"), now=NOW)
    ListStore(r).add("block", "ip", "203.0.113.9", user="test")
    svc.score(attempt(call_id="sync"), now=NOW)  # the child sees the block
    caller = {"source_ip": "203.0.113.9", "user_agent": "friendly-scanner"}
    assert svc.score(attempt(call_id="plain", **caller), now=NOW).action is Action.REJECT
    r.config_resetstat()
    d = svc.score(attempt(call_id="sos-1", request_uri="sip:911@carrier.example",
                          ruri_user="911", **caller), now=NOW)
    assert d.action is Action.RELAY and d.rule == "emergency" and d.score == 0.0
    assert "never screened" in d.contributions[0].reason
    svc.store.fetch_config()  # a round trip: the deferred record is written
    stats = r.info("commandstats")
    # no scoring round trip (3 observe EVALSHAs and an MGET): only the record's EVALSHA
    assert stats["cmdstat_evalsha"]["calls"] == 1 and "cmdstat_mget" not in stats
    rec = find_decision(r, "sos-1")
    assert rec is not None and rec["rule"] == "emergency" and rec["action"] == "relay"
    assert svc.counters["emergency"] == 1
    assert svc.flush_counters()["emergency"] == 1


def test_the_emergency_codes_are_live_config(svc: ScoringService, r: redis.Redis) -> None:
    sos = attempt(call_id="c1", request_uri="sip:999@carrier.example", ruri_user="999",
                  user_agent="friendly-scanner")
    assert svc.score(sos, now=NOW).action is Action.REJECT  # 999 is not configured
    config_admin.set_value(r, "emergency.numbers", "112,911,999", user="test")
    svc.score(attempt(call_id="sync"), now=NOW)
    assert svc.score(sos, now=NOW).rule == "emergency"
    with pytest.raises(ValueError, match=r"emergency\.numbers: invalid value"):
        config_admin.set_value(r, "emergency.numbers", "999,abc", user="test")
    assert r.hget(keys.CONFIG, "emergency.numbers") == b"112,911,999"


def test_the_kill_switch_relays_emergency_calls_without_touching_redis(
    svc: ScoringService, r: redis.Redis
) -> None:
    config_admin.set_value(r, "enabled", "false", user="test")
    svc.score(attempt(call_id="sync"), now=NOW)
    d = svc.score(attempt(call_id="sos-2", request_uri="urn:service:sos"), now=NOW + 0.1)
    assert d.action is Action.RELAY and d.rule == "disabled"
