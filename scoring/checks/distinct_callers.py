"""Many distinct caller URIs from one source IP (VoIP SEAL's "many SIP URIs from one IP").

The store counts distinct From identities per source IP with a HyperLogLog (12 KB at most per
IP, about 0.8% error) over the current and previous `distinct.window`. An IPv6 source is its
network (`source.ipv6_prefix`, /64 by default), so rotating addresses inside it does not help.
"""

from __future__ import annotations

from scoring.checks.base import Context, ramp
from scoring.keys import source_id
from scoring.model import CheckResult

name = "distinct_callers"
shared = True


def check(ctx: Context) -> CheckResult:
    n = ctx.signals.distinct_callers
    cfg = ctx.config
    soft, hard = cfg.get_float(f"{name}.soft"), cfg.get_float(f"{name}.hard")
    score = ramp(n, soft, hard)
    src = source_id(ctx.attempt.source_ip, cfg.v6_prefix)  # an IPv6 source is its network
    reason = f"{n} distinct caller URIs from {src}" if score > 0 else ""
    return CheckResult(name, score, reason)
