"""Pass tokens: issued by the answering machine, verified by the proxy."""

from __future__ import annotations

from dataclasses import replace

import pytest

from scoring import config_admin, passtoken
from scoring.model import CallAttempt
from scoring.service import ScoringService
from scoring.store import Store

KEY = "k" * 32
NOW = 1_800_000_000.0


def test_round_trip() -> None:
    tok = passtoken.issue(KEY, "tel:14155550100", "bob", 30, now=NOW)
    got = passtoken.verify(KEY, tok, caller="tel:14155550100", callee="bob", now=NOW + 10)
    assert got.expires == NOW + 30


@pytest.mark.parametrize(("mutate", "why"), [
    (lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"), "signature"),
    (lambda t: "x" + t, "signature"),
    (lambda t: t.replace(".", ""), "malformed"),
    (lambda t: t + "." + t, "malformed"),
    (lambda t: "", "malformed"),
    (lambda t: "a" * 600 + "." + "b", "malformed"),
])
def test_tampered_tokens_are_refused(mutate: object, why: str) -> None:
    tok = passtoken.issue(KEY, "alice@example.com", "bob", 30, now=NOW)
    with pytest.raises(ValueError, match=why):
        passtoken.verify(KEY, mutate(tok), caller="alice@example.com", callee="bob",  # type: ignore[operator]
                         now=NOW)


def test_expired_wrong_call_wrong_key() -> None:
    tok = passtoken.issue(KEY, "alice@example.com", "bob", 30, now=NOW)
    with pytest.raises(ValueError, match="expired"):
        passtoken.verify(KEY, tok, caller="alice@example.com", callee="bob", now=NOW + 31)
    with pytest.raises(ValueError, match="another call"):
        passtoken.verify(KEY, tok, caller="mallory@example.com", callee="bob", now=NOW)
    with pytest.raises(ValueError, match="another call"):
        passtoken.verify(KEY, tok, caller="alice@example.com", callee="carol", now=NOW)
    with pytest.raises(ValueError, match="signature"):
        passtoken.verify("z" * 32, tok, caller="alice@example.com", callee="bob", now=NOW)
    with pytest.raises(ValueError, match="no token key"):
        passtoken.verify("", tok, caller="alice@example.com", callee="bob", now=NOW)
    with pytest.raises(ValueError, match="16"):
        passtoken.issue("short", "a", "b", 30)


def test_service_relays_a_valid_pass_unscored(redis_url: str) -> None:
    import redis

    r = redis.Redis.from_url(redis_url)
    config_admin.set_value(r, "media.token_key", KEY, user="test")
    svc = ScoringService(Store(redis_url, timeout=2.0))
    base = CallAttempt(call_id="p1", source_ip="192.0.2.1", from_user="14155550100",
                       from_domain="x", ruri_user="bob", user_agent="friendly-scanner")
    svc.score(base, now=NOW)  # learn the config
    tok = passtoken.issue(KEY, "tel:14155550100", "bob", 30, now=NOW)
    d = svc.score(replace(base, call_id="p2", pass_token=tok), now=NOW + 1)
    assert d.rule == "pass" and d.action.value == "relay"
    forged = tok[:-2] + "AA"
    d = svc.score(replace(base, call_id="p3", pass_token=forged), now=NOW + 1)
    assert d.rule == "score" and d.action.value == "reject"
    assert svc.counters["pass_token_refused"] == 1


def test_a_pass_token_counts_once(redis_url: str) -> None:
    import redis

    r = redis.Redis.from_url(redis_url)
    config_admin.set_value(r, "media.token_key", KEY, user="test")
    svc = ScoringService(Store(redis_url, timeout=2.0))
    base = CallAttempt(call_id="q1", source_ip="192.0.2.2", from_user="alice",
                       from_domain="x.org", ruri_user="bob", user_agent="friendly-scanner")
    svc.score(base, now=NOW)
    tok = passtoken.issue(KEY, "alice@x.org", "bob", 30, now=NOW)
    first = svc.score(replace(base, call_id="q2", pass_token=tok), now=NOW + 1)
    again = svc.score(replace(base, call_id="q3", pass_token=tok), now=NOW + 2)
    assert first.rule == "pass"
    assert again.rule == "score" and again.action.value == "reject"
