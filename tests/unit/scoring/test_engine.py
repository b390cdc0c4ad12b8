"""scoring.engine.decide: lists first, weighted sum, thresholds, failing checks, fail-open."""

from __future__ import annotations

import pytest

from lists.matcher import ListSnapshot
from lists.model import ListEntry
from scoring.checks.base import Context
from scoring.config import Config
from scoring.engine import DEFAULT_CHECKS, CheckFn, decide
from scoring.model import Action, CheckResult, Contribution, Decision, Signals
from tests.unit.scoring.support import attempt, config, ctx, snapshot


def fixed(name: str, score: float, reason: str = "") -> tuple[str, CheckFn, bool]:
    def fn(_ctx: Context) -> CheckResult:
        return CheckResult(name, score, reason)
    return (name, fn, True)


def boom(_ctx: Context) -> CheckResult:
    raise RuntimeError("kaput")


# ---------------------------------------------------------------------------------------------
# the default checks on a quiet call and on a noisy one


def quiet(**overrides: str) -> Config:
    """Defaults, except that a call without an Identity header adds nothing (by default an
    unsigned call gets stir.absent_score so that a SHAKEN A call scores below it)."""
    return config(stir__absent_score="0", **overrides)


def test_unsigned_call_carries_the_stir_absent_score_by_default() -> None:
    d = decide(ctx(sig=Signals(ip_rate={10: 1, 300: 1})))
    assert d.score == pytest.approx(0.25 * 0.4)
    assert d.reasons() == ["stir: no Identity header"]
    assert d.action is Action.RELAY


def test_quiet_call_relays_with_every_check_listed() -> None:
    d = decide(ctx(sig=Signals(ip_rate={10: 1, 300: 1}), cfg=quiet()))
    assert d.action is Action.RELAY
    assert d.score == 0.0
    assert d.rule == "score"
    assert d.degraded is False
    assert [c.name for c in d.contributions] == [n for n, _, _ in DEFAULT_CHECKS]
    assert d.reasons() == []


def test_scanner_user_agent_rejects() -> None:
    d = decide(ctx(att=attempt(user_agent="friendly-scanner")))
    assert d.action is Action.REJECT
    assert d.score == 1.0
    scanner = next(c for c in d.contributions if c.name == "scanner")
    assert scanner.value == 1.0


def test_weights_multiply_scores_and_sum() -> None:
    sig = Signals(ip_rate={10: 20.0, 300: 0.0}, distinct_callers=10)
    d = decide(ctx(sig=sig, cfg=quiet()))
    by = {c.name: c for c in d.contributions}
    assert by["rate_ip"].value == pytest.approx(0.35)
    assert by["distinct_callers"].value == pytest.approx(0.5)
    assert d.score == pytest.approx(0.85)
    assert d.action is Action.REJECT
    assert "rate_ip: " in d.reasons()[0]


def test_total_is_capped_at_one() -> None:
    checks = [fixed("scanner", 1.0), fixed("sweep", 1.0)]
    d = decide(ctx(), checks)
    assert d.score == 1.0


def test_weight_change_in_config_applies() -> None:
    cfg = quiet(weight__scanner="0.2")
    d = decide(ctx(att=attempt(user_agent="sipvicious"), cfg=cfg))
    assert d.score == pytest.approx(0.2)
    assert d.action is Action.RELAY


# ---------------------------------------------------------------------------------------------
# thresholds: inclusive boundaries


@pytest.mark.parametrize(("score", "action"), [
    (0.0, Action.RELAY), (0.2999, Action.RELAY), (0.3, Action.DIVERT), (0.5, Action.DIVERT),
    (0.6999, Action.DIVERT), (0.7, Action.REJECT), (0.95, Action.REJECT), (1.0, Action.REJECT),
])
def test_default_thresholds(score: float, action: Action) -> None:
    d = decide(ctx(), [fixed("scanner", score)])  # weight.scanner = 1.0
    assert d.score == pytest.approx(score)
    assert d.action is action


def test_sum_reaching_threshold_exactly_counts_as_reached() -> None:
    # 0.1 + 0.2 is 0.30000000000000004 in floats; 0.35 * x sums can fall just short too.
    checks = [fixed("scanner", 0.1), fixed("sweep", 0.4)]  # 0.1 * 1.0 + 0.4 * 0.5
    d = decide(ctx(), checks)
    assert d.score == 0.3
    assert d.action is Action.DIVERT


@pytest.mark.parametrize(("divert", "reject", "score", "action"), [
    ("0.5", "0.5", 0.5, Action.REJECT),
    ("0.5", "0.5", 0.4999, Action.RELAY),
    ("0", "1", 0.0, Action.DIVERT),
    ("0", "1", 0.9999, Action.DIVERT),
    ("0", "1", 1.0, Action.REJECT),
    ("1", "1", 0.9999, Action.RELAY),
])
def test_configured_thresholds(divert: str, reject: str, score: float, action: Action) -> None:
    cfg = config(divert_threshold=divert, reject_threshold=reject)
    assert decide(ctx(cfg=cfg), [fixed("scanner", score)]).action is action


# ---------------------------------------------------------------------------------------------
# kill switch and lists


def test_disabled_relays_unscored() -> None:
    cfg = config(enabled="false")
    lst = snapshot(block=[ListEntry("ip", "192.0.2.10")])
    called: list[str] = []

    def spy(_ctx: Context) -> CheckResult:
        called.append("x")
        return CheckResult("scanner", 1.0)

    d = decide(ctx(att=attempt(user_agent="friendly-scanner"), cfg=cfg, lists=lst),
               [("scanner", spy, False)])
    assert d == Decision(Action.RELAY, 0.0, rule="disabled")
    assert called == []


def test_allowlist_wins_over_blocklist_and_scanner() -> None:
    lst = snapshot(allow=[ListEntry("uri", "alice@example.com", "partner")],
                   block=[ListEntry("ip", "192.0.2.10")])
    d = decide(ctx(att=attempt(user_agent="friendly-scanner"), lists=lst))
    assert d.action is Action.RELAY
    assert d.rule == "allowlist"
    assert d.score == 0.0
    assert d.contributions == (Contribution("allowlist", 0.0, 1.0,
                                            "allow-listed uri alice@example.com (partner)"),)


def test_blocklist_rejects_even_a_quiet_call() -> None:
    lst = snapshot(block=[ListEntry("cidr", "192.0.2.0/24", "abuse")])
    d = decide(ctx(lists=lst))
    assert d.action is Action.REJECT
    assert d.rule == "blocklist"
    assert d.score == 1.0
    assert d.reasons() == ["blocklist: block-listed cidr 192.0.2.0/24 (abuse)"]


def test_lists_apply_when_redis_is_down() -> None:
    lst = snapshot(block=[ListEntry("ip", "192.0.2.10")])
    d = decide(ctx(sig=Signals(available=False), lists=lst))
    assert d.action is Action.REJECT
    assert d.rule == "blocklist"


def test_expired_list_entry_is_ignored() -> None:
    lst = snapshot(block=[ListEntry("ip", "192.0.2.10", expires=1.0)])
    assert decide(ctx(lists=lst)).action is Action.RELAY


def test_broken_list_counts_as_no_hit_and_reports() -> None:
    class Broken:
        size = 1

        def match(self, **_kw: object) -> None:
            raise RuntimeError("corrupt list")

    lst = ListSnapshot.empty()
    lst.allow = Broken()  # type: ignore[assignment]
    errors: list[tuple[str, BaseException]] = []
    d = decide(ctx(lists=lst), on_error=lambda n, e: errors.append((n, e)))
    assert d.action is Action.RELAY
    assert d.rule == "score"
    assert [n for n, _ in errors] == ["allowlist"]


# ---------------------------------------------------------------------------------------------
# failing checks and Redis down


def test_raising_check_counts_zero_and_calls_on_error() -> None:
    errors: list[tuple[str, BaseException]] = []
    checks = [("sweep", boom, True), fixed("scanner", 0.4, "ua")]
    d = decide(ctx(), checks, on_error=lambda n, e: errors.append((n, e)))
    assert d.score == pytest.approx(0.4)
    assert d.action is Action.DIVERT
    sweep = d.contributions[0]
    assert sweep == Contribution("sweep", 0.0, 0.5, "check failed: RuntimeError")
    assert len(errors) == 1
    assert errors[0][0] == "sweep"
    assert isinstance(errors[0][1], RuntimeError)


def test_raising_check_without_on_error_does_not_raise() -> None:
    d = decide(ctx(), [("scanner", boom, False)])
    assert d.action is Action.RELAY
    assert d.contributions[0].reason == "check failed: RuntimeError"


def test_check_returning_out_of_range_score_counts_as_failure() -> None:
    errors: list[str] = []
    d = decide(ctx(), [fixed("scanner", 1.5)], on_error=lambda n, e: errors.append(n))
    assert d.score == 0.0
    assert errors == ["scanner"]


def test_redis_unavailable_shared_checks_contribute_zero() -> None:
    sig = Signals(ip_rate={10: 1000.0, 300: 1000.0}, distinct_callers=100, available=False)
    d = decide(ctx(sig=sig, cfg=quiet()))
    assert d.degraded is True
    assert d.action is Action.RELAY
    assert d.score == 0.0
    shared = {name for name, _fn, needs_redis in DEFAULT_CHECKS if needs_redis}
    assert {"rate_ip", "distinct_callers", "sweep", "reputation"} <= shared
    for c in d.contributions:
        if c.name not in shared:
            assert c.reason == ""
        else:
            assert c.score == 0.0
            assert c.reason == "no signal: Redis unavailable"


def test_redis_unavailable_local_checks_still_count() -> None:
    d = decide(ctx(att=attempt(user_agent="sipvicious"), sig=Signals(available=False)))
    assert d.degraded is True
    assert d.action is Action.REJECT


def test_redis_unavailable_shared_check_is_not_called() -> None:
    d = decide(ctx(sig=Signals(available=False)), [("sweep", boom, True)],
               on_error=lambda n, e: pytest.fail("shared check ran without Redis"))
    assert d.contributions[0].reason == "no signal: Redis unavailable"


# ---------------------------------------------------------------------------------------------
# model bits the engine relies on


@pytest.mark.parametrize("score", [-0.01, 1.01, float("nan")])
def test_check_result_refuses_out_of_range(score: float) -> None:
    with pytest.raises(ValueError, match="outside"):
        CheckResult("x", score)


def test_decision_reasons_skip_empty() -> None:
    d = Decision(Action.DIVERT, 0.5, (Contribution("a", 0.5, 1.0, "why"),
                                      Contribution("b", 0.0, 1.0, "")))
    assert d.reasons() == ["a: why"]
    assert d.contributions[0].value == 0.5


def test_attempt_keys_are_lower_case() -> None:
    a = attempt(from_user="Alice", from_domain="Example.COM", ruri_user="Bob",
                ruri_domain="PBX.example")
    assert a.caller_key == "alice@example.com"
    assert a.callee_key == "bob@pbx.example"
