"""The number database: allow, block and do-not-originate numbers kept in Redis, not in memory.

The in-process lists (`lists.matcher`) suit thousands of entries: every Kamailio child holds
them all and rebuilds them on each change. Carriers' number lists are larger: do-not-originate
registries and robocall feeds run to millions of numbers and change daily. Those live here, one
Redis key per number and list, `spitwall:{num:+15550100}:block`, holding the same msgpack
entry as a list entry (reason, added, expiry, by). A TTL is the key's own TTL.

The proxy reads them in the INVITE's one round trip: with `numbers.lookup` on, the store adds
one MGET per presented caller number (From user and P-Asserted-Identity user, at most two)
to the pipeline it sends anyway; each MGET touches only the number's hash tag, so it is valid
on a Redis Cluster. Nothing is read for callers without a numeric identity.

Bulk changes cannot be one MULTI (a million keys), so an import validates the whole file
first (nothing is written when any line is bad), then writes in pipelined batches and records
one audit entry (list, count, file name, SHA-256) after the last batch. An import interrupted
by a Redis failure says how far it got; running it again is harmless (a SET is idempotent).
`--replace` makes the list equal to the file (a registry's daily full feed): after writing, the
numbers of the list that are not in the file are removed, read from the list's index.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from lists.model import ListEntry, normalise
from lists.store import as_bytes
from scoring import audit, keys

#: lists a number can be on in the database (the in-memory lists have more kinds)
NUMBER_LISTS = keys.NUMBER_LISTS
BATCH = 5_000
MAX_REASON = 200
MAX_LINE = 512


def check_number_list(name: str) -> str:
    if name not in NUMBER_LISTS:
        raise ValueError(f"unknown number list {name!r}; expected one of {', '.join(NUMBER_LISTS)}")
    return name


def _check_ttl(ttl: float | None) -> int | None:
    if ttl is None:
        return None
    if not 1 <= ttl <= 10 * 365 * 86400:
        raise ValueError(f"--ttl must be between 1 second and 10 years, got {ttl:g}")
    return int(ttl)


def _check_reason(reason: str, where: str) -> str:
    if len(reason) > MAX_REASON:
        raise ValueError(f"{where}: reason longer than {MAX_REASON} characters")
    if any(ord(ch) < 32 for ch in reason):
        raise ValueError(f"{where}: reason contains control characters")
    return reason


@dataclass(frozen=True, slots=True)
class NumberLine:
    number: str  # normalised: digits, leading '+' kept
    reason: str


def parse_lines(lines: Iterable[str], source: str = "input") -> list[NumberLine]:
    """Lines of ``NUMBER[,REASON]``; blank lines and ``#`` comments are skipped. A number
    listed twice keeps its last reason. Raises ValueError naming the first bad line."""
    out: dict[str, str] = {}
    for i, raw in enumerate(lines, 1):
        line = raw.rstrip("\r\n")
        if len(line) > MAX_LINE:
            raise ValueError(f"{source}:{i}: line longer than {MAX_LINE} characters")
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        number_text, _, reason = text.partition(",")
        try:
            number = normalise("number", number_text)
        except ValueError as exc:
            raise ValueError(f"{source}:{i}: {exc}") from None
        out[number] = _check_reason(reason.strip(), f"{source}:{i}")
    return [NumberLine(n, r) for n, r in out.items()]


def read_file(path: Path) -> tuple[list[NumberLine], str]:
    """The numbers of ``path`` and the file's SHA-256 (for the audit record)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    return parse_lines(text.splitlines(), str(path)), hashlib.sha256(data).hexdigest()


def unpack_entry(number: str, blob: bytes) -> ListEntry:
    """The entry stored for ``number`` (ValueError for a record that is not one)."""
    try:
        entry = ListEntry.unpack(f"number:{number}", blob)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"bad number record for {number}: {exc}") from None
    except Exception as exc:  # msgpack's own errors for garbage bytes
        raise ValueError(f"bad number record for {number}: {exc!r}") from None
    return entry


class NumberDb:
    """Operator-side changes to the number database; every change is audited.

    Besides the number's key, each list keeps an index: `keys.NUMBER_INDEX_BUCKETS` sorted sets
    (`spitwall:{numidx:block:17}`, the bucket chosen by a CRC of the number) whose members are
    the numbers and whose scores are their expiry (`+inf`: none). Counting, exporting and
    clearing a list read the index, never the keyspace: the operator's Redis role may not SCAN
    (it would reveal the intercept keys' names), and a SCAN is O(all keys). Expired members are
    pruned from the index whenever it is read or written."""

    def __init__(self, client: redis.Redis, batch: int = BATCH) -> None:
        self.client = client
        self.batch = batch

    def _write(self, name: str, items: list[NumberLine], *, ttl: int | None, reason: str,
               user: str) -> Iterator[int]:
        now = time.time()
        expires = now + ttl if ttl else 0.0
        score = expires or "+inf"
        for start in range(0, len(items), self.batch):
            pipe = self.client.pipeline(transaction=False)
            for item in items[start:start + self.batch]:
                entry = ListEntry("number", item.number, item.reason or reason, now, expires,
                                  user)
                pipe.set(keys.number_key(item.number, name), entry.pack(), ex=ttl)
                pipe.zadd(keys.number_index_key(item.number, name), {item.number: score})
            pipe.execute()
            yield min(start + self.batch, len(items))

    def import_numbers(self, name: str, items: list[NumberLine], *, source: str,
                       digest: str = "", ttl: float | None = None, reason: str = "",
                       user: str | None = None, replace: bool = False) -> tuple[int, int]:
        """Write every number (already validated); with `replace`, then remove the list's
        numbers that are not in `items` (the list becomes the file: a daily full feed). One
        audit record at the end. Returns (written, removed). A Redis failure part-way raises
        `ImportInterrupted` saying how far it got (running it again finishes the job)."""
        check_number_list(name)
        seconds = _check_ttl(ttl)
        _check_reason(reason, "--reason")
        by = user or audit.os_user()
        done = removed = 0
        try:
            for written in self._write(name, items, ttl=seconds, reason=reason, user=by):
                done = written
            self._prune(name)
            if replace:
                keep = {item.number for item in items}
                for count in self._remove_others(name, keep):
                    removed = count
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            raise ImportInterrupted(done, len(items), exc, removed=removed) from exc
        record: dict[str, Any] = {"numbers": len(items), "sha256": digest, "ttl": seconds,
                                  "reason": reason}
        if replace:
            record["removed"] = removed
        self._audit(f"{'replace' if replace else 'import'} {name}", source, json.dumps(record),
                    by)
        return len(items), removed

    def _remove_others(self, name: str, keep: set[str]) -> Iterator[int]:
        """Remove the list's numbers that are not in `keep`, bucket by bucket from the index
        (written first, so a number is never missing while it is on both); yields the
        running count of removed numbers."""
        removed = 0
        for idx in keys.number_index_keys(name):
            gone = [m for m in self._members(idx) if m not in keep]
            for start in range(0, len(gone), self.batch):
                chunk = gone[start:start + self.batch]
                pipe = self.client.pipeline(transaction=False)
                for number in chunk:
                    pipe.unlink(keys.number_key(number, name))
                pipe.zrem(idx, *chunk)
                pipe.execute()
                removed += len(chunk)
            yield removed

    def add(self, name: str, number: str, *, ttl: float | None = None, reason: str = "",
            user: str | None = None) -> ListEntry:
        check_number_list(name)
        seconds = _check_ttl(ttl)
        _check_reason(reason, "--reason")
        norm = normalise("number", number)
        old = as_bytes(self.client.get(keys.number_key(norm, name)))
        by = user or audit.os_user()
        next(self._write(name, [NumberLine(norm, reason)], ttl=seconds, reason=reason, user=by))
        entry = self.check(norm)[name]
        self._audit(f"add {name}", norm, json.dumps(entry.as_json()), by,
                    old=_describe(norm, old))
        return entry

    def remove(self, name: str, number: str, *, user: str | None = None) -> bool:
        check_number_list(name)
        norm = normalise("number", number)
        key = keys.number_key(norm, name)
        old = as_bytes(self.client.get(key))
        self.client.zrem(keys.number_index_key(norm, name), norm)
        if old is None:
            return False
        self.client.delete(key)
        self._audit(f"remove {name}", norm, "", user or audit.os_user(),
                    old=_describe(norm, old))
        return True

    def check(self, number: str) -> dict[str, ListEntry]:
        """On which lists ``number`` is (unreadable records are reported as such)."""
        norm = normalise("number", number)
        found: dict[str, ListEntry] = {}
        values = self.client.mget(keys.number_keys(norm))
        for name, value in zip(NUMBER_LISTS, values, strict=True):
            blob = as_bytes(value)
            if blob is not None:
                found[name] = unpack_entry(norm, blob)
        return found

    def _prune(self, name: str) -> None:
        """Drop index members whose expiry has passed (their keys expired by their TTL)."""
        now = time.time()
        pipe = self.client.pipeline(transaction=False)
        for idx in keys.number_index_keys(name):
            pipe.zremrangebyscore(idx, "-inf", now)
        pipe.execute()

    def numbers(self, name: str) -> Iterator[str]:
        """Every number on the list (from its index, expired ones pruned first)."""
        check_number_list(name)
        self._prune(name)
        for idx in keys.number_index_keys(name):
            yield from self._members(idx)

    def _members(self, idx: str) -> list[str]:
        """The numbers of one index bucket."""
        return [m.decode() if isinstance(m, bytes) else str(m)
                for m in self.client.zrange(idx, 0, -1)]

    def count(self, name: str) -> int:
        check_number_list(name)
        self._prune(name)
        pipe = self.client.pipeline(transaction=False)
        for idx in keys.number_index_keys(name):
            pipe.zcard(idx)
        return sum(int(n) for n in pipe.execute())

    def export(self, name: str, path: Path) -> int:
        """Write ``NUMBER,REASON`` lines (the import format), sorted; returns how many."""
        rows: list[str] = []
        batch: list[str] = []

        def flush() -> None:
            for number, blob in zip(batch, self._get_each(name, batch), strict=True):
                if blob is None:
                    continue  # expired meanwhile
                entry = unpack_entry(number, blob)
                rows.append(f"{number},{entry.reason}" if entry.reason else number)
            batch.clear()

        for number in self.numbers(name):
            batch.append(number)
            if len(batch) >= self.batch:
                flush()
        flush()
        rows.sort()
        path.write_text("".join(f"{r}\n" for r in rows), encoding="utf-8")
        return len(rows)

    def clear(self, name: str, *, user: str | None = None) -> int:
        """Remove every number of one list, and its index; one audit record."""
        check_number_list(name)
        removed = 0
        for idx in keys.number_index_keys(name):
            members = self._members(idx)
            for start in range(0, len(members), self.batch):
                pipe = self.client.pipeline(transaction=False)
                for number in members[start:start + self.batch]:
                    pipe.unlink(keys.number_key(number, name))
                removed += sum(int(x) for x in pipe.execute())
            self.client.delete(idx)
        self._audit(f"clear {name}", name, json.dumps({"removed": removed}),
                    user or audit.os_user())
        return removed

    def _get_each(self, name: str, numbers: list[str]) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        for number in numbers:  # one GET per key: keys of different numbers are in other slots
            pipe.get(keys.number_key(number, name))
        return [as_bytes(v) for v in pipe.execute()]

    def _audit(self, action: str, key: str, new: str, user: str, old: str = "") -> None:
        pipe = self.client.pipeline(transaction=True)
        audit.append(pipe, what="numbers", action=action, key=key, old=old, new=new, user=user)
        pipe.execute()


class ImportInterrupted(Exception):
    """Redis failed part-way through an import; the numbers before `done` were written."""

    def __init__(self, done: int, total: int, cause: BaseException, removed: int = 0) -> None:
        gone = f", {removed} others removed" if removed else ""
        super().__init__(f"import interrupted after {done} of {total} numbers{gone} ({cause}); "
                         "running it again is safe")
        self.done = done
        self.total = total
        self.removed = removed


def _describe(number: str, blob: bytes | None) -> str:
    if blob is None:
        return ""
    try:
        return json.dumps(unpack_entry(number, blob).as_json())
    except ValueError:
        return "(unreadable record)"
