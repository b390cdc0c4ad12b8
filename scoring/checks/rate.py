"""INVITE rates in sliding windows, per source IP, per caller URI and per callee.

The store keeps a sliding-window counter per window (current bucket plus the previous bucket
weighted by how much of it still overlaps the window): O(1) memory per entity, unlike a sorted
set of timestamps whose size an attacker controls.
"""

from __future__ import annotations

from dataclasses import dataclass

from scoring.checks.base import Context, ramp
from scoring.model import CheckResult


@dataclass(frozen=True, slots=True)
class RateCheck:
    """Scores the highest ramp over the short and long windows of one entity's INVITE rate."""

    name: str
    entity: str  # ip | caller | callee
    shared: bool = True

    def __call__(self, ctx: Context) -> CheckResult:
        s = ctx.signals
        rates = {"ip": s.ip_rate, "caller": s.caller_rate, "callee": s.callee_rate}[self.entity]
        cfg = ctx.config
        scored = []
        for span, window in zip(("short", "long"), cfg.rate_windows, strict=True):
            count = rates.get(window, 0.0)
            soft = cfg.get_float(f"{self.name}.{span}.soft")
            hard = cfg.get_float(f"{self.name}.{span}.hard")
            why = f"{count:.0f} INVITEs/{window}s per {self.entity} (soft {soft:g}, hard {hard:g})"
            scored.append((ramp(count, soft, hard), why))
        best, why = max(scored, key=lambda x: x[0])
        return CheckResult(self.name, best, why if best > 0 else "")


rate_ip = RateCheck("rate_ip", "ip")
rate_caller = RateCheck("rate_caller", "caller")
rate_callee = RateCheck("rate_callee", "callee")
