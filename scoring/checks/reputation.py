"""Reputation of the caller identity and of the source IP (see `scoring.reputation`)."""

from __future__ import annotations

from scoring.checks.base import Context
from scoring.model import CheckResult
from scoring.reputation import decayed

name = "reputation"
shared = True


def check(ctx: Context) -> CheckResult:
    s = ctx.signals
    half = ctx.config.get_float("reputation.half_life")
    caller = decayed(s.reputation_caller, s.reputation_caller_t, ctx.now, half)
    ip = decayed(s.reputation_ip, s.reputation_ip_t, ctx.now, half)
    if caller <= 0.0 and ip <= 0.0:
        return CheckResult(name, 0.0)
    if caller >= ip:
        return CheckResult(name, caller, f"caller reputation {caller:.2f}")
    return CheckResult(name, ip, f"source IP reputation {ip:.2f}")
