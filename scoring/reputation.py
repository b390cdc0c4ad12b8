"""Reputation: a decaying spam score per caller identity and per source IP, fed by outcomes.

A reputation is a score in [0, 1] (0 = clean or unknown, 1 = spam) stored with the time of its
last update in `spitwall:{caller:ID}:rep` / `spitwall:{ip:IP}:rep`. It decays by half every
`reputation.half_life` seconds, so old evidence fades and nobody is blocked forever. Each
observation moves it towards 0 (good) or 1 (spam) by a step that says how much we trust that kind
of evidence. The per-INVITE script returns the stored (score, time) pairs with the rate counters,
so reading reputation costs no extra round trip; updates happen off the INVITE path (call end,
reports, phase-2 verdicts) or as deferred writes after a decision.

Who writes what:
- the proxy: `short_call` / `long_call` when a dialog ends, `reject` / `divert` after decisions;
- the answering machine (phase 2): `bot` / `human` verdicts via `apply_feedback`;
- callees: `report_spam` / `report_ok` by SIP MESSAGE or feature code through the proxy, and
  operators by `spitwall report CALLER spam|ok`.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

from scoring import keys
from scoring.model import caller_identity

LUA = Path(__file__).with_name("lua") / "reputation.lua"
SOURCE = LUA.read_text(encoding="utf-8")
SHA = hashlib.sha1(SOURCE.encode()).hexdigest()

#: kind -> (target, step): where an observation pulls the score, and how far.
FEEDBACK: dict[str, tuple[float, float]] = {
    "short_call": (1.0, 0.15),
    "long_call": (0.0, 0.2),
    "reject": (1.0, 0.05),
    "divert": (1.0, 0.03),
    "bot": (1.0, 0.5),
    "human": (0.0, 0.5),
    "report_spam": (1.0, 0.6),
    "report_ok": (0.0, 0.6),
}
TTL_HALF_LIVES = 8  # after 8 half-lives a score is below 0.4% of what it was: drop the key


def caller_rep_key(caller_key: str) -> str:
    return f"{keys.tag('caller', caller_key)}:rep"


def ip_rep_key(ip: str, v6_prefix: int = keys.DEFAULT_V6_PREFIX) -> str:
    """Reputation of a source: an IPv4 address or an IPv6 network (`keys.source_id`)."""
    return f"{keys.source_tag(ip, v6_prefix)}:rep"


def decayed(score: float, updated: float, now: float, half_life: float) -> float:
    """The stored score as of `now`."""
    if score <= 0.0 or updated <= 0.0:
        return max(0.0, min(1.0, score))
    age = max(0.0, now - updated)
    return max(0.0, min(1.0, float(score * 0.5 ** (age / half_life))))


def update_command(key: str, kind: str, now: float, half_life: float) -> list[str]:
    """The EVALSHA command moving the reputation at `key` by one observation of `kind`."""
    if kind not in FEEDBACK:
        raise ValueError(f"unknown feedback {kind!r}; expected one of {', '.join(FEEDBACK)}")
    target, step = FEEDBACK[kind]
    ttl = int(half_life * TTL_HALF_LIVES)
    return ["EVALSHA", SHA, "1", key, f"{now:.3f}", f"{half_life:g}", f"{target:g}", f"{step:g}",
            str(ttl)]


def apply_feedback(client: Any, *, caller: str = "", ip: str = "", kind: str,
                   half_life: float, now: float | None = None,
                   v6_prefix: int = keys.DEFAULT_V6_PREFIX) -> dict[str, float]:
    """Apply one observation to a caller and/or a source IP (redis-py client; not the INVITE
    path). `caller` is a number or a SIP URI/user@domain. Returns the new scores."""
    t = time.time() if now is None else now
    if kind not in FEEDBACK:
        raise ValueError(f"unknown feedback {kind!r}; expected one of {', '.join(FEEDBACK)}")
    script = client.register_script(SOURCE)
    target, step = FEEDBACK[kind]
    ttl = int(half_life * TTL_HALF_LIVES)
    out: dict[str, float] = {}
    for label, key in (("caller", caller_rep_key(normalise_caller(caller)) if caller else ""),
                       ("ip", ip_rep_key(ip, v6_prefix) if ip else "")):
        if key:
            res = script(keys=[key], args=[f"{t:.3f}", f"{half_life:g}", f"{target:g}",
                                           f"{step:g}", str(ttl)])
            out[label] = float(res)
    return out


def normalise_caller(text: str) -> str:
    """Operator input ('+1 555 010 0199', 'sip:alice@example.com', 'tel:+1555...') to the
    caller identity the proxy uses."""
    t = text.strip()
    low = t.lower()
    for scheme in ("sip:", "sips:", "tel:"):
        if low.startswith(scheme):
            t = t[len(scheme):]
            break
    user, _, domain = t.partition("@")
    user = user.split(";", 1)[0]
    compact = "".join(ch for ch in user if ch not in " -().")
    if compact.lstrip("+").isascii() and compact.lstrip("+").isdigit():
        user = compact
    if not user or len(user) > 128:
        raise ValueError(f"not a caller number or SIP URI: {text!r}")
    return caller_identity(user, domain.split(";", 1)[0])


def read(client: Any, *, caller: str = "", ip: str = "", half_life: float,
         now: float | None = None,
         v6_prefix: int = keys.DEFAULT_V6_PREFIX) -> dict[str, dict[str, float]]:
    """Current (decayed) reputations, for `spitwall report --show` and tests."""
    t = time.time() if now is None else now
    out: dict[str, dict[str, float]] = {}
    for label, key in (("caller", caller_rep_key(normalise_caller(caller)) if caller else ""),
                       ("ip", ip_rep_key(ip, v6_prefix) if ip else "")):
        if key:
            raw = client.hgetall(key)
            s = float(raw.get(b"s", 0) or 0)
            u = float(raw.get(b"t", 0) or 0)
            out[label] = {"score": decayed(s, u, t, half_life), "events": float(raw.get(b"n", 0)),
                          "updated": u}
    return out
