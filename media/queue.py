"""The spam voicemail queue and the regular voicemail queue: WAV files plus metadata in Redis.

A message is written as `<dir>/<queue>/<id>.wav.part`, flushed and fsync'ed, then renamed to
`<id>.wav` (atomic on one filesystem), and only then is its metadata (msgpack, versioned) added
to `spitwall:{queue}:<queue>` with its time in the index `spitwall:{queue}:<queue>:index`. So a
crash or a full disk leaves at worst a `.part` file (removed at the next start), never an entry
without audio or half a WAV. The queues are bounded: beyond `max_items` the oldest messages go,
files first; and nothing is written when free space would fall under `min_free_bytes`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import time
import wave
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from scoring import config_admin, keys, reputation

QUEUES = ("spam", "voicemail")
VERDICTS = ("spam", "ham")
RECORD_VERSION = 1
_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-")


class QueueFull(Exception):
    """Not enough disk space to store a message."""


def meta_key(queue: str) -> str:
    return f"{keys.PREFIX}:{{queue}}:{queue}"


def index_key(queue: str) -> str:
    return f"{keys.PREFIX}:{{queue}}:{queue}:index"


@dataclass(frozen=True)
class Message:
    id: str
    queue: str
    meta: dict[str, Any]
    path: Path


class MessageQueue:
    """Store, list, export and mark queued messages."""

    def __init__(self, client: Any, directory: str | os.PathLike[str], *,
                 max_items: int = 10_000, min_free_bytes: int = 64 * 1024 * 1024) -> None:
        self.client = client
        self.dir = Path(directory)
        self.max_items = max_items
        self.min_free_bytes = min_free_bytes

    def _qdir(self, queue: str) -> Path:
        if queue not in QUEUES:
            raise ValueError(f"unknown queue {queue!r}; expected one of {', '.join(QUEUES)}")
        d = self.dir / queue
        d.mkdir(parents=True, exist_ok=True)
        return d

    def clean_partial(self) -> int:
        """Remove `.part` files left by a crash (call at start-up)."""
        n = 0
        for q in QUEUES:
            for p in self._qdir(q).glob("*.part"):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    n += 1
        return n

    def store(self, queue: str, pcm16: bytes, meta: dict[str, Any], *,
              rate: int = 8000) -> Message:
        """Write one message (16-bit mono PCM) atomically and index it."""
        d = self._qdir(queue)
        need = len(pcm16) + 4096
        if shutil.disk_usage(d).free - need < self.min_free_bytes:
            raise QueueFull(f"less than {self.min_free_bytes} bytes free in {d}")
        mid = f"{int(time.time())}-{secrets.token_hex(4)}"
        final = d / f"{mid}.wav"
        part = d / f"{mid}.wav.part"
        try:
            with open(part, "wb") as fh:
                with wave.open(fh, "wb") as w:
                    w.setnchannels(1)
                    w.setsampwidth(2)
                    w.setframerate(rate)
                    w.writeframes(pcm16)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(part, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                part.unlink()
            raise
        record = {"v": RECORD_VERSION, "id": mid, "queue": queue, "ts": time.time(),
                  "seconds": round(len(pcm16) / 2 / rate, 2), "path": str(final.resolve()),
                  "mark": "", **meta}
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(meta_key(queue), mid, msgpack.packb(record, use_bin_type=True))
        pipe.zadd(index_key(queue), {mid: record["ts"]})
        pipe.execute()
        self._trim(queue)
        return Message(mid, queue, record, final)

    def _trim(self, queue: str) -> None:
        excess = int(self.client.zcard(index_key(queue))) - self.max_items
        if excess <= 0:
            return
        for raw in self.client.zrange(index_key(queue), 0, excess - 1):
            mid = raw.decode() if isinstance(raw, bytes) else str(raw)
            self.delete(queue, mid)

    def delete(self, queue: str, mid: str) -> None:
        safe_id(mid)
        blob = self.client.hget(meta_key(queue), mid)
        if blob:
            with contextlib.suppress(FileNotFoundError, KeyError):
                Path(msgpack.unpackb(blob, raw=False)["path"]).unlink()
        pipe = self.client.pipeline(transaction=True)
        pipe.hdel(meta_key(queue), mid)
        pipe.zrem(index_key(queue), mid)
        pipe.execute()

    def get(self, mid: str) -> Message:
        safe_id(mid)
        for q in QUEUES:
            blob = self.client.hget(meta_key(q), mid)
            if blob:
                meta = msgpack.unpackb(blob, raw=False)
                return Message(mid, q, meta, Path(meta["path"]))
        raise ValueError(f"no queued message {mid!r}")

    def list(self, queue: str | None = None, limit: int = 100) -> Iterator[Message]:
        for q in ([queue] if queue else list(QUEUES)):
            if q not in QUEUES:
                raise ValueError(f"unknown queue {q!r}; expected one of {', '.join(QUEUES)}")
            ids = self.client.zrevrange(index_key(q), 0, limit - 1)
            blobs = self.client.hmget(meta_key(q), ids) if ids else []
            for raw_id, blob in zip(ids, blobs, strict=True):
                if blob:
                    mid = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
                    meta = msgpack.unpackb(blob, raw=False)
                    yield Message(mid, q, meta, Path(meta["path"]))

    def mark(self, mid: str, verdict: str, *, by: str | None = None) -> Message:
        """Record the operator's verdict (and who gave it, for the audit trail). Only the
        metadata changes: use `mark_with_feedback` to also feed reputation."""
        if verdict not in VERDICTS:
            raise ValueError("mark must be spam or ham")
        msg = self.get(mid)
        meta = {**msg.meta, "mark": verdict, "marked": time.time()}
        if by:
            meta["marked_by"] = by[:128]
        self.client.hset(meta_key(msg.queue), mid, msgpack.packb(meta, use_bin_type=True))
        return Message(mid, msg.queue, meta, msg.path)

    def export(self, mid: str, dest: str | os.PathLike[str]) -> Path:
        msg = self.get(mid)
        out = Path(dest)
        if out.is_dir():
            out = out / msg.path.name
        shutil.copyfile(msg.path, out)
        return out


def mark_with_feedback(queue: MessageQueue, mid: str, verdict: str, *,
                       by: str | None = None) -> Message:
    """Mark a message and feed the verdict to the caller's and source IP's reputation
    (`report_spam` / `report_ok`, the live config's half-life).

    The one implementation behind `spitwall queue mark` and the review web page, so that the two
    cannot diverge. Marking twice feeds reputation twice, like two `spitwall report`s."""
    msg = queue.mark(mid, verdict, by=by)
    cfg, _raw = config_admin.show(queue.client)
    caller, ip = str(msg.meta.get("caller_key", "")), str(msg.meta.get("source_ip", ""))
    if caller or ip:
        reputation.apply_feedback(queue.client, caller=caller, ip=ip,
                                  kind="report_spam" if verdict == "spam" else "report_ok",
                                  half_life=cfg.get_float("reputation.half_life"),
                                  v6_prefix=cfg.v6_prefix)
    return msg


def safe_id(mid: str) -> str:
    """`mid` if it is a well-formed message id (what `store` makes: letters, digits, '-'; at
    most 64; ASCII only), else ValueError: ids end up in file names, so nothing else may pass."""
    if not mid or len(mid) > 64 or not all(c in _ID_CHARS for c in mid):
        raise ValueError(f"not a message id: {mid!r}")
    return mid
