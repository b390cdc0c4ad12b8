"""The check interface: a named function of a `Context` returning a `CheckResult`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from lists.matcher import ListHit, ListSnapshot
from lists.numberdb import unpack_entry
from scoring.config import Config
from scoring.model import CallAttempt, CheckResult, Signals


@dataclass(frozen=True, slots=True)
class Context:
    """Everything a check may look at for one INVITE; all of it already in memory."""

    attempt: CallAttempt
    signals: Signals
    config: Config
    lists: ListSnapshot
    country: str = ""  # ISO code of the source IP (GeoIP), "" when unknown or GeoIP is off
    now: float = 0.0  # wall-clock time of the INVITE (seconds)


class Check(Protocol):
    """A scoring check. `shared` checks need the Redis signals and say so when they are absent."""

    name: str
    shared: bool

    def __call__(self, ctx: Context) -> CheckResult: ...


def ramp(value: float, soft: float, hard: float) -> float:
    """0 at or below `soft`, 1 at or above `hard`, linear in between."""
    if value <= soft:
        return 0.0
    if value >= hard or hard <= soft:
        return 1.0
    return (value - soft) / (hard - soft)


def caller_numbers(attempt: CallAttempt) -> tuple[str, ...]:
    """Numbers the caller presents: From user and P-Asserted-Identity user, when numeric."""
    out = []
    for user in (attempt.from_user, _uri_user(attempt.pai)):
        digits = user.lstrip("+")
        if digits and digits.isdigit():
            out.append(user)
    return tuple(out)


def number_db_hit(ctx: Context, name: str) -> ListHit | None:
    """The caller's number on list ``name`` of the number database (`lists.numberdb`), if the
    INVITE's round trip found it there; unreadable and expired records do not match."""
    for list_name, number, blob in ctx.signals.numbers:
        if list_name != name:
            continue
        try:
            entry = unpack_entry(number, blob)
        except ValueError:
            continue
        if not entry.expired(ctx.now or None):
            return ListHit(entry, f"number {number} (number database)")
    return None


def _uri_user(value: str) -> str:
    v = value
    if "<" in v:
        v = v.split("<", 1)[1].split(">", 1)[0]
    for scheme in ("sip:", "sips:", "tel:"):
        if v.lower().startswith(scheme):
            v = v[len(scheme):]
            break
    return v.split("@", 1)[0].split(";", 1)[0]
