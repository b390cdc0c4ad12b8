"""Destination sweep (war dialling): many distinct callees, or sequential numbers, from one
source (an IPv4 address or an IPv6 network, see `scoring.keys.source_id`)."""

from __future__ import annotations

from collections.abc import Iterable

from scoring.checks.base import Context, ramp
from scoring.keys import source_id
from scoring.model import CheckResult

name = "sweep"
shared = True


def longest_sequence(callees: Iterable[str], max_step: int = 2) -> tuple[int, int, int]:
    """Longest run of numeric callees whose sorted values differ by at most `max_step`.

    Returns (length, first, last). Non-numeric callees are ignored; duplicates count once.
    """
    nums = sorted({int(c) for c in callees if c.isascii() and c.isdigit() and len(c) <= 18})
    best = (0, 0, 0)
    start = 0
    for i in range(len(nums)):
        if i > 0 and nums[i] - nums[i - 1] > max_step:
            start = i
        length = i - start + 1
        if length > best[0]:
            best = (length, nums[start], nums[i])
    return best


def check(ctx: Context) -> CheckResult:
    cfg = ctx.config
    n = ctx.signals.distinct_callees
    distinct = ramp(n, cfg.get_float("sweep.soft"), cfg.get_float("sweep.hard"))
    run, first, last = longest_sequence(ctx.signals.recent_callees)
    need = int(cfg["sweep.sequential_min"])
    sequential = 0.0
    if run >= need:
        sequential = 0.5 + 0.5 * ramp(run, need, 2 * need)
    if sequential > distinct:
        return CheckResult(name, sequential, f"{run} sequential callees {first}..{last}")
    if distinct > 0:
        src = source_id(ctx.attempt.source_ip, ctx.config.v6_prefix)
        return CheckResult(name, distinct, f"{n} distinct callees from {src}")
    return CheckResult(name, 0.0)
