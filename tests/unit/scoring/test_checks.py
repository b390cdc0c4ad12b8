"""The checks, one by one, with hand-made attempts, signals and list snapshots."""

from __future__ import annotations

from typing import Any

import pytest

from lists.model import ListEntry
from scoring.checks import distinct_callers, lists, scanner, sweep
from scoring.checks.base import _uri_user, caller_numbers, ramp
from scoring.checks.rate import rate_callee, rate_caller, rate_ip
from scoring.model import Action, CheckResult, Signals
from tests.unit.scoring.support import attempt, config, ctx, snapshot

# ---------------------------------------------------------------------------------------------
# ramp


@pytest.mark.parametrize(("value", "expected"), [
    (-5, 0.0), (0, 0.0), (5, 0.0), (5.15, 0.01), (10, 1 / 3), (12.5, 0.5), (20, 1.0),
    (1e9, 1.0),
])
def test_ramp(value: float, expected: float) -> None:
    assert ramp(value, 5, 20) == pytest.approx(expected, abs=1e-6)


def test_ramp_is_monotonic() -> None:
    values = [ramp(x / 10, 3, 10) for x in range(0, 150)]
    assert values == sorted(values)
    assert values[0] == 0.0 and values[-1] == 1.0


@pytest.mark.parametrize(("soft", "hard"), [(5, 5), (5, 3)])
def test_ramp_degenerate_is_a_step(soft: float, hard: float) -> None:
    assert ramp(soft, soft, hard) == 0.0
    assert ramp(soft + 0.01, soft, hard) == 1.0


# ---------------------------------------------------------------------------------------------
# caller numbers (From user and P-Asserted-Identity)


@pytest.mark.parametrize(("pai", "user"), [
    ("<sip:+15550100@carrier.example>", "+15550100"),
    ('"Bob" <sip:15550100@carrier.example;user=phone>', "15550100"),
    ("<tel:+15550100>", "+15550100"),
    ("tel:+15550100;verstat=TN-Validation-Passed", "+15550100"),
    ("sips:15550100@x", "15550100"),
    ("SIP:15550100@x", "15550100"),
    ("", ""),
])
def test_uri_user(pai: str, user: str) -> None:
    assert _uri_user(pai) == user


def test_caller_numbers_from_user_and_pai() -> None:
    a = attempt(from_user="+15550199", pai="<sip:15550100@carrier>")
    assert caller_numbers(a) == ("+15550199", "15550100")


def test_caller_numbers_skips_names() -> None:
    a = attempt(from_user="alice", pai="<sip:bob@carrier>")
    assert caller_numbers(a) == ()
    assert caller_numbers(attempt(from_user="+", pai="")) == ()


# ---------------------------------------------------------------------------------------------
# rate checks: the highest ramp over the two windows


_LOW = {10: 1.0, 300: 1.0}


@pytest.mark.parametrize(("check", "sig"), [(rate_ip, Signals(ip_rate=_LOW)),
                                            (rate_caller, Signals(caller_rate=_LOW)),
                                            (rate_callee, Signals(callee_rate=_LOW))])
def test_rate_zero_without_traffic(check: Any, sig: Signals) -> None:
    r = check(ctx(sig=sig))
    assert r.score == 0.0
    assert r.reason == ""
    assert r.name == check.name


def test_rate_ip_short_window_ramp() -> None:
    # rate_ip.short: soft 5, hard 20
    r = rate_ip(ctx(sig=Signals(ip_rate={10: 12.5, 300: 0.0})))
    assert r.score == pytest.approx(0.5)
    assert "INVITEs/10s per ip" in r.reason
    assert "soft 5, hard 20" in r.reason


def test_rate_ip_long_window_wins_when_higher() -> None:
    # short: 6 -> (6-5)/15 = 0.067; long (60..300): 300 -> 1.0
    r = rate_ip(ctx(sig=Signals(ip_rate={10: 6.0, 300: 300.0})))
    assert r.score == 1.0
    assert "/300s" in r.reason


def test_rate_short_window_wins_when_higher() -> None:
    # rate_caller short 3..10 -> 10 is 1.0; long 20..100 -> 60 is 0.5
    r = rate_caller(ctx(sig=Signals(caller_rate={10: 10.0, 300: 60.0})))
    assert r.score == 1.0
    assert "/10s per caller" in r.reason


def test_rate_callee_uses_callee_counters_only() -> None:
    sig = Signals(ip_rate={10: 999.0}, caller_rate={10: 999.0}, callee_rate={10: 6.5, 300: 0})
    assert rate_callee(ctx(sig=sig)).score == pytest.approx(0.5)


def test_rate_follows_configured_windows_and_ramps() -> None:
    cfg = config(rate__short_window="5", rate__long_window="60", rate_ip__short__soft="0",
                 rate_ip__short__hard="4")
    r = rate_ip(ctx(sig=Signals(ip_rate={5: 2.0, 10: 999.0}), cfg=cfg))
    assert r.score == pytest.approx(0.5)
    assert "/5s" in r.reason


def test_rate_missing_window_counts_zero() -> None:
    assert rate_ip(ctx(sig=Signals(ip_rate={}))).score == 0.0


# ---------------------------------------------------------------------------------------------
# distinct callers per source IP


@pytest.mark.parametrize(("n", "score"), [(0, 0.0), (3, 0.0), (4, 1 / 7), (10, 1.0), (500, 1.0)])
def test_distinct_callers(n: int, score: float) -> None:
    r = distinct_callers.check(ctx(sig=Signals(distinct_callers=n)))
    assert r.score == pytest.approx(score)
    assert r.name == "distinct_callers"
    if score > 0:
        assert f"{n} distinct caller URIs from 192.0.2.10" == r.reason
    else:
        assert r.reason == ""


# ---------------------------------------------------------------------------------------------
# sweep: sequential callees and distinct callees


def test_longest_sequence_finds_the_run() -> None:
    callees = [str(n) for n in range(110, 99, -1)]  # newest first, as the store returns them
    assert sweep.longest_sequence(callees) == (11, 100, 110)


def test_longest_sequence_tolerates_small_gaps_and_duplicates() -> None:
    assert sweep.longest_sequence(["100", "102", "104", "104", "106"]) == (4, 100, 106)
    assert sweep.longest_sequence(["100", "103", "106"]) == (1, 100, 100)
    assert sweep.longest_sequence(["100", "103", "106"], max_step=3) == (3, 100, 106)


def test_longest_sequence_ignores_non_numeric_and_huge() -> None:
    got = sweep.longest_sequence(["alice", "", "+15550100", "1" * 19, "5", "6"])
    assert got == (2, 5, 6)
    assert sweep.longest_sequence([]) == (0, 0, 0)


def test_longest_sequence_survives_unicode_digit_callee() -> None:
    callees = [str(n) for n in range(100, 111)] + ["²"]
    assert sweep.longest_sequence(callees) == (11, 100, 110)


def test_sweep_sequential_run_scores_high() -> None:
    callees = tuple(str(n) for n in range(110, 99, -1))
    r = sweep.check(ctx(sig=Signals(recent_callees=callees, distinct_callees=11)))
    # 11 sequential >= 2 * sequential_min (5): 0.5 + 0.5 * 1.0
    assert r.score == 1.0
    assert r.reason == "11 sequential callees 100..110"


def test_sweep_sequential_at_minimum_scores_half() -> None:
    callees = ("104", "103", "102", "101", "100")
    r = sweep.check(ctx(sig=Signals(recent_callees=callees, distinct_callees=5)))
    assert r.score == 0.5
    assert "5 sequential callees" in r.reason


def test_sweep_below_sequential_min_is_zero() -> None:
    callees = ("103", "102", "101", "100")
    assert sweep.check(ctx(sig=Signals(recent_callees=callees, distinct_callees=4))).score == 0.0


def test_sweep_random_numbers_score_zero() -> None:
    callees = ("4915112345678", "33612345678", "15550100", "442079460000", "81312345678",
               "61212345678", "8613800138000")
    r = sweep.check(ctx(sig=Signals(recent_callees=callees, distinct_callees=len(callees))))
    assert r.score == 0.0
    assert r.reason == ""


@pytest.mark.parametrize(("n", "score"), [(8, 0.0), (19, 0.5), (30, 1.0), (1000, 1.0)])
def test_sweep_distinct_callees(n: int, score: float) -> None:
    r = sweep.check(ctx(sig=Signals(distinct_callees=n)))
    assert r.score == pytest.approx(score)
    if score:
        assert r.reason == f"{n} distinct callees from 192.0.2.10"


def test_sweep_takes_the_higher_of_sequence_and_distinct() -> None:
    callees = ("104", "103", "102", "101", "100")  # sequential 0.5
    r = sweep.check(ctx(sig=Signals(recent_callees=callees, distinct_callees=30)))
    assert r.score == 1.0
    assert "distinct callees" in r.reason


def test_sweep_sequential_min_is_configurable() -> None:
    cfg = config(sweep__sequential_min="3")
    r = sweep.check(ctx(sig=Signals(recent_callees=("7", "8", "9")), cfg=cfg))
    assert r.score == 0.5


# ---------------------------------------------------------------------------------------------
# scanner


@pytest.mark.parametrize("ua", ["friendly-scanner", "sipvicious 0.3.4", "sipcli/v1.8"])
def test_scanner_user_agent(ua: str) -> None:
    r = scanner.check(ctx(att=attempt(user_agent=ua)))
    assert r.score == 1.0
    assert r.reason.startswith("scanner user-agent")


def test_scanner_operator_pattern() -> None:
    lists_ = snapshot(scanner=[ListEntry("ua", "evil-dialer*")])
    r = scanner.check(ctx(att=attempt(user_agent="Evil-Dialer 2.0"), lists=lists_))
    assert r.score == 1.0


def test_scanner_hits_from_signals() -> None:
    r = scanner.check(ctx(sig=Signals(scanner_hits=3)))
    assert r.score == 0.7
    assert r.reason == "source seen scanning (3 probes)"


def test_scanner_clean() -> None:
    r = scanner.check(ctx())
    assert r == CheckResult("scanner", 0.0)


def test_scanner_no_user_agent() -> None:
    assert scanner.check(ctx(att=attempt(user_agent=""))).score == 0.0


# ---------------------------------------------------------------------------------------------
# list checks


def test_lists_empty_never_match() -> None:
    assert lists.allowlist(ctx()) is None
    assert lists.blocklist(ctx()) is None


def test_allowlist_hit_is_decisive_relay() -> None:
    lst = snapshot(allow=[ListEntry("ip", "192.0.2.10", "our PBX")])
    r = lists.allowlist(ctx(lists=lst))
    assert r is not None
    assert r.decisive is Action.RELAY
    assert r.score == 0.0
    assert r.name == "allowlist"
    assert r.reason == "allow-listed ip 192.0.2.10 (our PBX)"
    assert lists.blocklist(ctx(lists=lst)) is None


def test_blocklist_hit_is_decisive_reject() -> None:
    lst = snapshot(block=[ListEntry("domain", "example.com")])
    r = lists.blocklist(ctx(lists=lst))
    assert r is not None
    assert r.decisive is Action.REJECT
    assert r.score == 1.0
    assert r.reason == "block-listed domain example.com"


def test_blocklist_number_via_pai() -> None:
    lst = snapshot(block=[ListEntry("number", "+15550100")])
    a = attempt(from_user="anonymous", pai="<sip:+1-555-0100@x>")
    assert lists.blocklist(ctx(att=a, lists=lst)) is None  # visual separators: not numeric
    a = attempt(from_user="anonymous", pai="<tel:+15550100>")
    r = lists.blocklist(ctx(att=a, lists=lst))
    assert r is not None and r.reason == "block-listed number +15550100"


def test_blocklist_uri_and_user_agent() -> None:
    lst = snapshot(block=[ListEntry("uri", "alice@example.com"), ListEntry("ua", "badphone")])
    r = lists.blocklist(ctx(att=attempt(from_user="ALICE"), lists=lst))
    assert r is not None and "uri alice@example.com" in r.reason
    r = lists.blocklist(ctx(att=attempt(from_user="bob", user_agent="BadPhone 1"), lists=lst))
    assert r is not None and "user-agent" in r.reason
