"""Builders shared by the unit tests: hand-made attempts, signals, configs and contexts."""

from __future__ import annotations

import socket
from typing import Any

from lists.matcher import ListSnapshot
from lists.model import ListEntry
from scoring.checks.base import Context
from scoring.config import Config
from scoring.model import CallAttempt, Signals


def attempt(**kw: Any) -> CallAttempt:
    """A plausible INVITE; keyword arguments override single fields."""
    base: dict[str, Any] = {
        "call_id": "call-1@test",
        "source_ip": "192.0.2.10",
        "source_port": 5060,
        "from_uri": "sip:alice@example.com",
        "from_user": "alice",
        "from_domain": "example.com",
        "request_uri": "sip:15550100@carrier.example",
        "ruri_user": "15550100",
        "ruri_domain": "carrier.example",
        "user_agent": "Linphone/5.0",
    }
    base.update(kw)
    return CallAttempt(**base)


def config(**overrides: str) -> Config:
    """A config parsed from raw strings (keys with '__' for '.'), failing on any error."""
    raw = {k.replace("__", "."): v for k, v in overrides.items()}
    cfg = Config.from_raw(raw)
    assert cfg.errors == (), cfg.errors
    return cfg


def snapshot(allow: list[ListEntry] | None = None, block: list[ListEntry] | None = None,
             scanner: list[ListEntry] | None = None, version: int = 0) -> ListSnapshot:
    return ListSnapshot({"allow": allow or [], "block": block or [], "scanner": scanner or []},
                        version)


def ctx(att: CallAttempt | None = None, sig: Signals | None = None, cfg: Config | None = None,
        lists: ListSnapshot | None = None) -> Context:
    return Context(att or attempt(), sig or Signals(), cfg or Config.defaults(),
                   lists or ListSnapshot.empty())


def closed_port() -> int:
    """A loopback TCP port nobody listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def dead_redis_url() -> str:
    return f"redis://127.0.0.1:{closed_port()}/0"
