"""The pure scoring engine: checks in, `Decision` out.

total = min(1, sum(weight_i * score_i)); each check's weight times score is its contribution,
so `spitwall explain` can show exactly why a call scored what it did. Lists are decisive and
come first: allow relays without scoring, block rejects. A check that raises counts as "no
signal" (score 0, marked as an error), never as a reason to drop a call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from scoring.checks import (
    callerid,
    distinct_callers,
    geoip,
    lists,
    reputation,
    ring_hijack,
    scanner,
    stir,
    sweep,
)
from scoring.checks.base import Context
from scoring.checks.rate import rate_callee, rate_caller, rate_ip
from scoring.model import Action, CheckResult, Contribution, Decision

log = logging.getLogger("spitwall.engine")

CheckFn = Callable[[Context], CheckResult]

# (name, function, needs Redis signals)
DEFAULT_CHECKS: tuple[tuple[str, CheckFn, bool], ...] = (
    ("rate_ip", rate_ip, True),
    ("rate_caller", rate_caller, True),
    ("rate_callee", rate_callee, True),
    ("distinct_callers", distinct_callers.check, True),
    ("sweep", sweep.check, True),
    ("scanner", scanner.check, False),
    ("reputation", reputation.check, True),
    ("ring_hijack", ring_hijack.check, False),
    ("geoip", geoip.check, False),
    ("callerid", callerid.check, False),
    ("stir", stir.check, False),
)


def decide(ctx: Context, checks: Sequence[tuple[str, CheckFn, bool]] = DEFAULT_CHECKS,
           on_error: Callable[[str, BaseException], None] | None = None) -> Decision:
    """Score one INVITE. Never raises for a failing check."""
    cfg = ctx.config
    if not cfg["enabled"]:
        return Decision(Action.RELAY, 0.0, rule="disabled")

    for listed in (lists.allowlist, lists.blocklist):
        try:
            hit = listed(ctx)
        except Exception as exc:  # a broken list must not drop calls
            _report(on_error, listed.__name__, exc)
            continue
        if hit is not None and hit.decisive is not None:
            c = Contribution(hit.name, hit.score, 1.0, hit.reason)
            return Decision(hit.decisive, hit.score, (c,), rule=hit.name)

    degraded = not ctx.signals.available
    contributions = []
    for name, fn, shared in checks:
        weight = cfg.weight(name)
        if shared and degraded:
            contributions.append(Contribution(name, 0.0, weight, "no signal: Redis unavailable"))
            continue
        try:
            r = fn(ctx)
        except Exception as exc:  # a failing check is "no signal", logged and counted
            _report(on_error, name, exc)
            why = f"check failed: {type(exc).__name__}"
            contributions.append(Contribution(name, 0.0, weight, why))
            continue
        contributions.append(Contribution(name, r.score, weight, r.reason))

    total = min(1.0, sum(c.value for c in contributions))
    total = round(total, 4)
    if total >= cfg.get_float("reject_threshold"):
        action = Action.REJECT
    elif total >= cfg.get_float("divert_threshold"):
        action = Action.DIVERT
    else:
        action = Action.RELAY
    return Decision(action, total, tuple(contributions), rule="score", degraded=degraded)


def _report(on_error: Callable[[str, BaseException], None] | None, name: str,
            exc: BaseException) -> None:
    log.error("check %s failed: %r", name, exc)
    if on_error is not None:
        on_error(name, exc)
