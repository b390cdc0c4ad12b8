"""Allow and block lists: decisive checks. Allow relays unscored, block rejects."""

from __future__ import annotations

from scoring.checks.base import Context, caller_numbers, number_db_hit
from scoring.model import Action, CheckResult


def _match(ctx: Context, which: str) -> CheckResult | None:
    a = ctx.attempt
    matcher = ctx.lists.allow if which == "allow" else ctx.lists.block
    hit = None
    if matcher.size:
        hit = matcher.match(ip=a.source_ip, user=a.from_user, domain=a.from_domain,
                            numbers=caller_numbers(a), user_agent=a.user_agent,
                            country=ctx.country)
    if hit is None and ctx.signals.numbers:
        hit = number_db_hit(ctx, which)
    if hit is None:
        return None
    reason = f"{which}-listed {hit.on}" + (f" ({hit.entry.reason})" if hit.entry.reason else "")
    action = Action.RELAY if which == "allow" else Action.REJECT
    return CheckResult(f"{which}list", 0.0 if which == "allow" else 1.0, reason, decisive=action)


def allowlist(ctx: Context) -> CheckResult | None:
    return _match(ctx, "allow")


def blocklist(ctx: Context) -> CheckResult | None:
    return _match(ctx, "block")
