"""SIP scanner fingerprints: User-Agent patterns (seed list plus operator additions), and
source IPs that the proxy saw scanning recently (any method, e.g. svmap's OPTIONS)."""

from __future__ import annotations

from scoring.checks.base import Context
from scoring.model import CheckResult

name = "scanner"
shared = False


def check(ctx: Context) -> CheckResult:
    hit = ctx.lists.is_scanner(ctx.attempt.user_agent)
    if hit is not None:
        return CheckResult(name, 1.0, f"scanner {hit.on}")
    if ctx.signals.scanner_hits > 0:
        return CheckResult(name, 0.7, f"source seen scanning ({ctx.signals.scanner_hits} probes)")
    return CheckResult(name, 0.0)
