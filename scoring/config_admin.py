"""Operator-side config changes: validated, applied with a version bump, audited.

A change is validated against the whole current config first (so `divert_threshold` can never
end up above `reject_threshold`), then written in one MULTI with the version bump and the audit
record. WATCH makes concurrent changes by two operators safe: the later one retries on the
fresh state and is validated again.
"""

from __future__ import annotations

from typing import Any

import redis

from scoring import audit, keys
from scoring.config import PARAMS, Config, check_values, strict_values, validate_change


def _raw(client: redis.Redis) -> dict[str, str]:
    return {_s(k): _s(v) for k, v in client.hgetall(keys.CONFIG).items()}


def _s(x: Any) -> str:
    return x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)


def show(client: redis.Redis) -> tuple[Config, dict[str, str]]:
    """The effective config and the raw overrides stored in Redis."""
    raw = _raw(client)
    version = int(client.get(keys.CONFIG_VERSION) or 0)
    return Config.from_raw(raw, version), raw


def set_value(client: redis.Redis, key: str, text: str, user: str | None = None) -> Any:
    """Set one knob; raises ValueError (nothing changed) when invalid."""
    with client.pipeline(transaction=True) as pipe:
        while True:
            try:
                pipe.watch(keys.CONFIG)  # type: ignore[no-untyped-call]
                raw = {_s(k): _s(v) for k, v in pipe.hgetall(keys.CONFIG).items()}
                value = validate_change(raw, key, text)
                stored = _canonical(value)
                old = raw.get(key, f"{_canonical(PARAMS[key].default)} (default)")
                enabled = value if key == "enabled" else Config.from_raw(raw)["enabled"]
                pipe.multi()
                pipe.hset(keys.CONFIG, key, stored)
                pipe.set(keys.KILL_SWITCH, "1" if enabled else "0")
                pipe.incr(keys.CONFIG_VERSION)
                audit.append(pipe, what="config", action="set", key=key, old=old, new=stored,
                             user=user)
                pipe.execute()
                return value
            except redis.WatchError:
                continue


def reset(client: redis.Redis, key: str | None = None, user: str | None = None) -> int:
    """Back to defaults (one key, or all); returns the number of overrides removed."""
    if key is not None and key not in PARAMS:
        raise ValueError(f"unknown config key {key!r}; see 'spitwall config show'")
    with client.pipeline(transaction=True) as pipe:
        while True:
            try:
                pipe.watch(keys.CONFIG)  # type: ignore[no-untyped-call]
                raw = {_s(k): _s(v) for k, v in pipe.hgetall(keys.CONFIG).items()}
                remaining = {k: v for k, v in raw.items() if key is not None and k != key}
                check_values(strict_values(remaining))  # e.g. divert must stay <= reject
                targets = [key] if key is not None else sorted(raw)
                present = [k for k in targets if k in raw]
                enabled = Config.from_raw(remaining)["enabled"]
                pipe.multi()
                if present:
                    pipe.hdel(keys.CONFIG, *present)
                pipe.set(keys.KILL_SWITCH, "1" if enabled else "0")
                pipe.incr(keys.CONFIG_VERSION)
                audit.append(pipe, what="config", action="reset", key=key or "*",
                             old=", ".join(f"{k}={raw[k]}" for k in present), new="defaults",
                             user=user)
                pipe.execute()
                return len(present)
            except redis.WatchError:
                continue


def _canonical(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.15g}"
    return str(value)
