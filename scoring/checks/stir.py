"""STIR/SHAKEN: score the call by its verified attestation (RFC 8224/8225/8588).

verified A 0.0, verified B 0.15, verified C 0.3, absent `stir.absent_score`, unverified 0.35,
invalid 1.0. The caller's numbers are the From user and the P-Asserted-Identity user, the
callee's is the Request-URI user (the party that will ring: a PASSporT replayed towards another
callee is "invalid"). An empty Identity value counts as absent: it gains a sender nothing over
leaving the header out.

The trust store is loaded once per process, on the first call that needs it, and again only when
`stir.trust_dir` changes (the store then reads leaf files lazily, see `scoring.stir`). Tests and
the KEMI layer may put a ready store in place with `install_trust_store`.
"""

from __future__ import annotations

import time

from scoring.checks.base import Context, _uri_user
from scoring.model import CheckResult
from scoring.stir import ABSENT, INVALID, VERIFIED, TrustStore, verify

name = "stir"
shared = False

SCORES = {"A": 0.0, "B": 0.15, "C": 0.3}
UNVERIFIED_SCORE = 0.35
INVALID_SCORE = 1.0

_loaded: tuple[str, TrustStore | None] | None = None


def trust_store(path: str) -> TrustStore | None:
    """The process's trust store for `path` ('' = none), loaded on first use or path change."""
    global _loaded
    if _loaded is not None and _loaded[0] == path:
        return _loaded[1]
    store = TrustStore.load(path) if path else None
    _loaded = (path, store)
    return store


def install_trust_store(path: str, store: TrustStore | None) -> None:
    """Use `store` while `stir.trust_dir` is `path` (tests; preloading in child_init)."""
    global _loaded
    _loaded = (path, store)


def reset() -> None:
    """Forget the loaded trust store (the next call loads it again)."""
    global _loaded
    _loaded = None


def check(ctx: Context) -> CheckResult:
    a = ctx.attempt
    cfg = ctx.config
    if not a.identity.strip():
        score = cfg.get_float("stir.absent_score")
        return CheckResult(name, score, "no Identity header" if score > 0 else "")
    v = verify(a.identity, orig_tn=(a.from_user, _uri_user(a.pai)), dest_tn=a.ruri_user,
               now=ctx.now if ctx.now > 0 else time.time(), max_age=int(cfg["stir.max_age"]),
               trust=trust_store(str(cfg["stir.trust_dir"])))
    if v.status == VERIFIED and v.attest is not None:
        return CheckResult(name, SCORES[v.attest], f"SHAKEN {v.attest} verified")
    if v.status == INVALID:
        return CheckResult(name, INVALID_SCORE, f"Identity invalid: {v.reason}")
    if v.status == ABSENT:
        return CheckResult(name, cfg.get_float("stir.absent_score"), "no Identity header")
    claimed = f"SHAKEN {v.attest} " if v.attest else "Identity "
    return CheckResult(name, UNVERIFIED_SCORE, f"{claimed}unverified: {v.reason}")
