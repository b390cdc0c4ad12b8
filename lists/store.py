"""Operator-side list management in Redis: add, remove, show, import, export.

Every change runs in one MULTI with the lists-version bump and its audit record, so Kamailio
children pick it up on their next INVITE and the audit trail cannot miss a change.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import redis

from lists.model import LIST_NAMES, ListEntry, check_list_name, normalise
from scoring import audit, keys

EXPORT_VERSION = 1
log = logging.getLogger("spitwall.lists")


def load_lists(client: redis.Redis) -> dict[str, list[ListEntry]]:
    """All entries of all lists; malformed records are skipped (they cannot be matched)."""
    pipe = client.pipeline(transaction=False)
    for name in LIST_NAMES:
        pipe.hgetall(keys.list_key(name))
    out: dict[str, list[ListEntry]] = {}
    for name, raw in zip(LIST_NAMES, pipe.execute(), strict=True):
        entries = []
        for f, blob in raw.items():
            field = f.decode("utf-8", "replace") if isinstance(f, bytes) else str(f)
            try:
                entry = ListEntry.unpack(field, blob)
                if normalise(entry.kind, entry.value) != entry.value:
                    raise ValueError("value not in normal form")
                entries.append(entry)
            except (ValueError, TypeError) as exc:  # hand-edited garbage: cannot match
                log.warning("list %s: skipping unreadable entry %r: %s", name, field, exc)
        out[name] = entries
    return out


class ListStore:
    """Mutations of the allow/block/scanner lists, each audited."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def add(self, name: str, kind: str, value: str, *, ttl: float | None = None,
            reason: str = "", user: str | None = None) -> ListEntry:
        check_list_name(name)
        norm = normalise(kind, value)
        if ttl is not None and not 0 < ttl <= 10 * 365 * 86400:
            raise ValueError(f"--ttl must be between 1 second and 10 years, got {ttl:g}")
        _check_text(reason, "--reason")
        now = time.time()
        entry = ListEntry(kind, norm, reason, now, now + ttl if ttl else 0.0,
                          user or audit.os_user())
        key = keys.list_key(name)
        old = as_bytes(self.client.hget(key, entry.field))
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(key, entry.field, entry.pack())
        pipe.incr(keys.LISTS_VERSION)
        audit.append(pipe, what="list", action=f"add {name}", key=entry.field,
                     old=_describe(entry.field, old), new=json.dumps(entry.as_json()),
                     user=entry.by)
        pipe.execute()
        return entry

    def remove(self, name: str, kind: str, value: str, *, user: str | None = None) -> bool:
        check_list_name(name)
        norm = normalise(kind, value)
        key = keys.list_key(name)
        field = f"{kind}:{norm}"
        old = as_bytes(self.client.hget(key, field))
        if old is None:
            return False
        pipe = self.client.pipeline(transaction=True)
        pipe.hdel(key, field)
        pipe.incr(keys.LISTS_VERSION)
        audit.append(pipe, what="list", action=f"remove {name}", key=field,
                     old=_describe(field, old), new="", user=user)
        pipe.execute()
        return True

    def show(self, name: str, kind: str | None = None) -> list[ListEntry]:
        check_list_name(name)
        now = time.time()
        entries = load_lists(self.client)[name]
        return sorted((e for e in entries if (kind is None or e.kind == kind)
                       and not e.expired(now)), key=lambda e: (e.kind, e.value))

    def export(self, path: Path) -> int:
        data = load_lists(self.client)
        now = time.time()
        lists = {n: [e.as_json() for e in sorted(es, key=lambda e: e.field)
                     if not e.expired(now)] for n, es in data.items()}
        doc = {"version": EXPORT_VERSION, "exported": now, "lists": lists}
        path.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        return sum(len(v) for v in lists.values())

    def import_file(self, path: Path, *, user: str | None = None) -> int:
        """Import an export file; all entries are validated first, nothing changes on error."""
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read {path}: {exc}") from None
        if not isinstance(doc, dict) or doc.get("version") != EXPORT_VERSION:
            raise ValueError(f"{path}: not a spitwall list export (version {EXPORT_VERSION})")
        lists = doc.get("lists")
        if not isinstance(lists, dict):
            raise ValueError(f"{path}: missing 'lists'")
        now = time.time()
        who = user or audit.os_user()
        staged: list[tuple[str, ListEntry]] = []
        for name, items in lists.items():
            check_list_name(name)
            if not isinstance(items, list):
                raise ValueError(f"{path}: list {name!r} is not an array")
            for i, item in enumerate(items):
                staged.append((name, _entry_from_json(item, now, who, f"{path}: {name}[{i}]")))
        pipe = self.client.pipeline(transaction=True)
        for name, entry in staged:
            pipe.hset(keys.list_key(name), entry.field, entry.pack())
        pipe.incr(keys.LISTS_VERSION)
        audit.append(pipe, what="list", action="import", key=str(path), old="",
                     new=f"{len(staged)} entries", user=who)
        pipe.execute()
        return len(staged)


def _entry_from_json(item: Any, now: float, who: str, where: str) -> ListEntry:
    if not isinstance(item, dict):
        raise ValueError(f"{where}: not an object")
    try:
        norm = normalise(str(item["kind"]), str(item["value"]))
    except KeyError as exc:
        raise ValueError(f"{where}: missing {exc}") from None
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    expires = item.get("expires") or 0.0
    added = item.get("added") or now
    for name, v in (("expires", expires), ("added", added)):
        if not isinstance(v, int | float) or isinstance(v, bool):
            raise ValueError(f"{where}: {name} must be a number")
    reason, by = str(item.get("reason") or "")[:200], str(item.get("by") or who)[:200]
    for name, text in (("reason", reason), ("by", by)):
        _check_text(text, f"{where}: {name}")
    return ListEntry(str(item["kind"]), norm, reason, float(added), float(expires), by)


def _check_text(text: str, what: str) -> None:
    if len(text) > 200 or any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise ValueError(f"{what} must be at most 200 printable characters")


def _describe(field: str, blob: bytes | None) -> str:
    if blob is None:
        return ""
    try:
        return json.dumps(ListEntry.unpack(field, blob).as_json())
    except (ValueError, TypeError):
        return "<unreadable>"


def as_bytes(x: Any) -> bytes | None:
    """A Redis reply as bytes (None stays None), whatever the client's decoding."""
    if x is None or isinstance(x, bytes):
        return x
    return str(x).encode()
