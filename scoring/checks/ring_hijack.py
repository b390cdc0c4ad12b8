"""Ring hijack ("Ringjacker"): callers must not control the callee's phone.

`Alert-Info` picks the ring tone (or, with vendor parameters such as `info=alert-autoanswer`,
makes the phone answer by itself), and `Call-Info` with `answer-after` does the same. From
untrusted sources the KEMI layer removes them (`ring_hijack.strip`); this check scores their
presence: a spammer's INVITE carries them far more often than a carrier peer's.
Trusted peers are the `trusted` list (ip, cidr, domain, ...).
"""

from __future__ import annotations

from scoring.checks.base import Context
from scoring.model import CallAttempt, CheckResult

name = "ring_hijack"
shared = False

_AUTO_ANSWER = ("answer-after", "autoanswer", "auto-answer", "auto_answer", "intercom")


def is_trusted(ctx: Context) -> bool:
    a = ctx.attempt
    return ctx.lists.trusted.size > 0 and ctx.lists.trusted.match(
        ip=a.source_ip, user=a.from_user, domain=a.from_domain) is not None


def hostile_call_info(value: str) -> bool:
    """A Call-Info value that asks the phone to ring differently or answer by itself."""
    low = value.lower()
    return any(w in low for w in _AUTO_ANSWER) or "ring" in low


def findings(attempt: CallAttempt) -> tuple[bool, bool]:
    """(has Alert-Info, has auto-answer or ring-tone Call-Info)."""
    auto = any(w in attempt.alert_info.lower() for w in _AUTO_ANSWER)
    return bool(attempt.alert_info) or attempt.has_alert_info, auto or hostile_call_info(
        attempt.call_info)


def check(ctx: Context) -> CheckResult:
    alert, control = findings(ctx.attempt)
    if not (alert or control) or is_trusted(ctx):
        return CheckResult(name, 0.0)
    if control:
        return CheckResult(name, 1.0, "untrusted caller asks the phone to auto-answer/ring")
    return CheckResult(name, 0.5, "untrusted caller sets Alert-Info")
