"""The delivery worker: Redis consumer group member, PUBLISH sender, ``srtp`` notifier.

Why a separate process: the proxy must never wait for a recorder, so it only XADDs the
encrypted event to `names.EVENTS`; this worker turns that stream into SIP deliveries with the
guarantees issue 5 asks for (at-least-once, acknowledged only after a 2xx, retried with back-off,
reclaimed after a crash, dead-lettered after N failures; recipients drop repeats by event id).

How an entry flows:

1. read with XREADGROUP (new entries), or, at start, this consumer's own pending entries (a
   restart with the same ``--consumer``), or with XAUTOCLAIM from a consumer that has been silent
   for ``claim_idle`` seconds (a crashed or killed worker);
2. queued on the *lane* of its destination (the PUBLISH URI, or ``subscribe`` + LIID): a lane
   sends in stream order, a window of entries at a time while everything succeeds, and one entry
   at a time with back-off once something failed, so a later event does not overtake an earlier
   one to the same destination (it can only happen inside one window when some of it failed);
3. attempt *n* of an entry is its Redis delivery count: the first read counts 1, every retry is
   preceded by an XCLAIM to ourselves (count + 1, idle reset), so the count survives restarts and
   no side table is needed; entries held in memory get their idle time reset (XCLAIM JUSTID)
   every ``claim_idle / 3`` seconds, so that a live worker's back-off is not mistaken for a crash;
4. 2xx -> XACK (batched with the stats in one pipeline); ``max_attempts`` failures -> XADD to
   `names.DEAD` with ``error`` and ``attempts``, then XACK.

PUBLISH and NOTIFY go over UDP, TCP or TLS as their destination URI (or the dialog's next hop)
asks, and over TCP when a request too large for a safe datagram names no transport
(`sipua.select_transport`). Subscriptions (RFC 6665, ``Event: srtp``) are served on the UDP
socket; their state lives in `names.SUBSCRIPTIONS` so a restarted worker resumes them. Nothing
here ever sees plaintext: bodies are DER S/MIME made by the proxy.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import logging
import re
import secrets
import socket
import ssl
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import redis
import redis.asyncio as aredis

from intercept import names
from intercept.delivery import digest
from intercept.delivery.policy import (
    IntervalTooBrief,
    RecorderRule,
    Subscription,
    backoff_delay,
    grant_expires,
    hash_ttl,
    match_recorder,
    parse_recorders,
    parse_source,
)
from intercept.delivery.sipua import (
    ALLOW,
    EVENT_PACKAGE,
    PUBLISH_EXPIRES,
    UDP_MAX,
    Address,
    DialogRoute,
    NextHop,
    SipEndpoint,
    TransportOptions,
    TxResult,
    build_notify,
    build_publish,
    default_port,
    dialog_route,
    is_ip,
    local_uri,
    new_tag,
    uri_transport,
)
from intercept.delivery.stream import client_tls_context
from intercept.events import SMIME_CONTENT_DISPOSITION, SMIME_CONTENT_TYPE
from intercept.targets import SUBSCRIBE, check_liid
from media.sip import SipMessage, SipTimers, SipUri
from media.statsfile import write_stats_file

log = logging.getLogger("spitwall.deliver")

Outcome = Literal["ok", "retry", "fatal"]

_CTYPE_RE = re.compile(r"[\x21-\x7e][\x20-\x7e]{0,200}")
#: CSeq jump for NOTIFYs of a resumed subscription: NOTIFYs sent after the last persisted one
#: (not acknowledged yet) used numbers we do not know; the subscriber must see higher ones
RESUME_CSEQ_JUMP = 1000
#: SUBSCRIBEs being worked on (Redis look-ups, audit) at most; beyond: 503 at once
MAX_SUBSCRIBES_IN_PROGRESS = 200


def _default_consumer(port: int) -> str:
    return f"{socket.gethostname()}-{port}"


@dataclass(frozen=True)
class Settings:
    redis_url: str
    sip_addr: str = "127.0.0.1"
    sip_port: int = 5070
    #: the proxy's (ip, port): only its SUBSCRIBEs may carry X-Spitwall-Source
    proxy: Address | None = None
    consumer: str = ""
    max_attempts: int = 8
    backoff: float = 1.0
    backoff_max: float = 60.0
    jitter: float = 0.1
    claim_idle: float = 60.0
    t1: float = 0.5
    #: Timer F of PUBLISH/NOTIFY (None: 64*T1)
    sip_timeout: float | None = None
    #: PUBLISHes in flight per destination while all goes well
    window: int = 32
    #: NOTIFYs in flight per LIID (1: in-dialog CSeq order is never broken by a retransmission)
    notify_window: int = 1
    read_count: int = 100
    block_ms: int = 1000
    #: entries held in memory at most (reading pauses beyond it)
    max_in_memory: int = 10000
    #: entries held for one destination while it fails; more are left to XAUTOCLAIM later
    lane_cap: int = 1000
    expires_default: int = 3600
    expires_min: int = 60
    expires_max: int = 3600
    max_subscriptions: int = 1000
    stats_file: Path | None = None
    stats_interval: float = 1.0
    #: refused SUBSCRIBEs audited per second at most (burst: 10x); the rest are counted
    audit_rate: float = 10.0
    recorders_ttl: float = 2.0
    #: leave acknowledged entries in EVENTS (default: XDEL them with the XACK)
    keep_delivered: bool = False
    grace: float = 2.0
    #: requests over this size go over TCP when their URI names no transport (0: never)
    udp_max: int = UDP_MAX
    #: a destination whose TCP connect failed gets UDP this long (seconds)
    tcp_fallback_hold: float = 300.0
    connect_timeout: float = 5.0
    #: outbound TCP/TLS connections idle this long are closed (seconds)
    idle_timeout: float = 60.0
    #: TLS: CA bundle (None: the system CAs); client certificate and key for mutual TLS
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if self.backoff < 0 or self.backoff_max < 0:
            raise ValueError("back-off must be >= 0")
        if self.claim_idle <= 0:
            raise ValueError("claim_idle must be > 0")
        if min(self.window, self.notify_window, self.read_count, self.lane_cap) < 1:
            raise ValueError("window, notify_window, read_count and lane_cap must be >= 1")
        if not 0 < self.expires_min <= self.expires_default <= self.expires_max:
            raise ValueError("need 0 < expires_min <= expires_default <= expires_max")
        if self.sip_timeout is not None and self.sip_timeout <= 0:
            raise ValueError("sip_timeout must be > 0")
        if self.udp_max < 0:
            raise ValueError("udp_max must be >= 0 (0: never switch to TCP)")
        if min(self.connect_timeout, self.idle_timeout) <= 0 or self.tcp_fallback_hold < 0:
            raise ValueError("connect and idle timeouts must be > 0, the fallback hold >= 0")
        if self.tls_key is not None and self.tls_cert is None:
            raise ValueError("a TLS key needs its certificate (--tls-cert)")

    def tls_context(self, key_password: str | None = None) -> ssl.SSLContext:
        """The TLS client context these settings describe (`OSError`/`ssl.SSLError` when a
        file is missing or wrong)."""
        return client_tls_context(self.tls_ca, self.tls_cert, self.tls_key, key_password)

    @property
    def consumer_name(self) -> str:
        return self.consumer or _default_consumer(self.sip_port)


def stream_order(sid: str) -> tuple[int, int]:
    ms, _, seq = sid.partition("-")
    return (int(ms), int(seq or 0))


def _s(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


@dataclass(eq=False)
class Entry:
    """One stream entry held in memory until it is acknowledged or dead-lettered."""

    sid: str
    fields: dict[str, bytes]
    count: int  # Redis delivery count = the number of the current/next attempt
    tried: int = 0  # attempts made by this process
    notified: set[str] = field(default_factory=set)  # subscriptions that 2xx'd its NOTIFY
    error: str = ""
    retry_after: float | None = None
    gone: bool = False  # acknowledged elsewhere or deleted from the stream

    @property
    def order(self) -> tuple[int, int]:
        return stream_order(self.sid)

    def text(self, name: str) -> str:
        return _s(self.fields.get(name))

    @property
    def dest(self) -> str:
        return self.text("dest")

    @property
    def liid(self) -> str:
        return self.text("liid")

    @property
    def lane_key(self) -> str:
        return f"{SUBSCRIBE}:{self.liid}" if self.dest == SUBSCRIBE else self.dest

    @property
    def body(self) -> bytes:
        return bytes(self.fields.get("body", b""))

    @property
    def content_type(self) -> str:
        ctype = self.text("ctype")
        return ctype if ctype and _CTYPE_RE.fullmatch(ctype) else SMIME_CONTENT_TYPE


def check_entry(fields: dict[str, bytes]) -> str | None:
    """Why an entry can never be delivered (dead-letter it at once), or None."""
    if _s(fields.get("v")) != names.EVENT_VERSION:
        return f"unknown entry version {_s(fields.get('v'))[:10]!r}"
    for name in ("id", "liid", "dest", "body"):
        if not fields.get(name):
            return f"entry without {name!r}"
    dest = _s(fields["dest"])
    if dest == SUBSCRIBE:
        try:
            check_liid(_s(fields["liid"]))
        except ValueError as exc:
            return str(exc)
        return None
    try:
        uri = SipUri.parse(dest)
    except ValueError as exc:
        return f"destination is not a SIP URI: {exc}"
    if uri.scheme not in ("sip", "sips"):
        return f"destination scheme {uri.scheme}: only sip: and sips: are delivered"
    try:
        uri_transport(uri)
    except ValueError as exc:
        return f"destination: {exc}"
    return None


class Lane:
    """Entries for one destination, in stream order."""

    def __init__(self, key: str, window: int) -> None:
        self.key = key
        self.window = window
        self.entries: list[Entry] = []
        self.more = asyncio.Event()  # entries were added
        self.kick = asyncio.Event()  # stop waiting out the back-off (a subscriber appeared)
        self.recovering = False
        self.retry_at = 0.0
        self.task: asyncio.Task[None] | None = None

    def add(self, entry: Entry) -> None:
        bisect.insort(self.entries, entry, key=lambda e: e.order)
        self.more.set()

    def remove(self, entry: Entry) -> None:
        with contextlib.suppress(ValueError):
            self.entries.remove(entry)


@dataclass
class Counters:
    read: int = 0
    reclaimed: int = 0
    resumed: int = 0
    delivered: int = 0
    published: int = 0
    notified: int = 0
    failed_attempts: int = 0
    dead: int = 0
    malformed: int = 0
    gone: int = 0
    lost: int = 0
    spilled: int = 0
    ack_errors: int = 0
    redis_errors: int = 0
    subscribes: int = 0
    subscriptions_started: int = 0
    subscriptions_refreshed: int = 0
    subscriptions_ended: int = 0
    subscribe_refused: int = 0
    subscribe_challenged: int = 0
    #: verified credentials presented again with a used nonce count: challenged afresh
    subscribe_replayed: int = 0
    audit_suppressed: int = 0
    latency_sum: float = 0.0
    latency_max: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["latency_mean"] = round(self.latency_sum / self.delivered, 6) if self.delivered else 0
        out["latency_sum"] = round(self.latency_sum, 6)
        out["latency_max"] = round(self.latency_max, 6)
        return out


class DeliveryWorker:
    def __init__(self, settings: Settings, client: aredis.Redis, *,
                 tls: ssl.SSLContext | None = None) -> None:
        """``tls``: the TLS client context (default: made from the settings' files)."""
        self.s = settings
        self.redis = client
        self.consumer = settings.consumer_name
        self.stats = Counters()
        timers = SipTimers(t1=settings.t1, t2=max(settings.t1, 4.0))
        transports = TransportOptions(
            udp_max=settings.udp_max, tcp_fallback_hold=settings.tcp_fallback_hold,
            connect_timeout=settings.connect_timeout, idle_timeout=settings.idle_timeout,
            tls=tls if tls is not None else settings.tls_context())
        self.ep = SipEndpoint(self._on_request, timers=timers, timeout=settings.sip_timeout,
                              transports=transports)
        self.nonces = digest.Nonces()
        self.nonce_counts = digest.NonceCounts(self.nonces.lifetime)
        self.lanes: dict[str, Lane] = {}
        self.known: dict[str, Entry] = {}
        self._to_ack: set[str] = set()
        self._unflushed_delivered = 0
        self._ack_wake = asyncio.Event()
        self._flush_lock = asyncio.Lock()
        self._room = asyncio.Event()
        self._room.set()
        #: set once the consumer group exists: the claimer waits for it (its XAUTOCLAIM could
        #: otherwise overtake the reader's XGROUP CREATE on another connection -- seen on a
        #: Redis Cluster -- and fail with NOGROUP)
        self._group_ready = asyncio.Event()
        self.subs: dict[str, Subscription] = {}
        self._by_dialog: dict[tuple[str, str], str] = {}
        #: accepted, first NOTIFY not answered yet: events wait (the first NOTIFY comes first)
        self._unconfirmed: set[str] = set()
        self._expiry: dict[str, asyncio.TimerHandle] = {}
        self._dirty_subs: set[str] = set()
        self._recorders: tuple[float, list[RecorderRule]] | None = None
        self._recorder_errors: list[str] = []
        self._dns: dict[tuple[str, int], tuple[float, Address]] = {}
        self._audit_tokens = settings.audit_rate * 10
        self._audit_at = time.monotonic()
        self._audit_pending_suppressed = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._main: list[asyncio.Task[None]] = []
        self._stopping = False
        self._redis_warned = 0.0
        self._subscribing = 0

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> Address:
        addr = await self.ep.start(self.s.sip_addr, self.s.sip_port)
        await self._load_subscriptions()
        self._main = [asyncio.create_task(self._reader(), name="reader"),
                      asyncio.create_task(self._claimer(), name="claimer"),
                      asyncio.create_task(self._acker(), name="acker")]
        if self.s.stats_file is not None:
            self._main.append(asyncio.create_task(self._stats_loop(), name="stats"))
        log.info("delivery worker %s on udp %s:%d (PUBLISH/NOTIFY also over TCP/TLS)",
                 self.consumer, addr[0], addr[1])
        return addr

    async def stop(self) -> None:
        """Stop reading, let attempts in flight finish for ``grace`` seconds, flush the
        acknowledgements, close. Unacknowledged entries stay pending in the group: the next
        worker takes them over. Subscriptions stay in Redis for it too."""
        self._stopping = True
        for task in self._main:
            task.cancel()
        for lane in self.lanes.values():
            lane.kick.set()
            lane.more.set()
        lane_tasks = [lane.task for lane in self.lanes.values() if lane.task is not None]
        if lane_tasks:
            _done, pending = await asyncio.wait(lane_tasks, timeout=self.s.grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await asyncio.gather(*self._main, return_exceptions=True)
        await self._flush_acks()
        for handle in self._expiry.values():
            handle.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.write_stats()
        self.ep.close()

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    def _redis_down(self, what: str, exc: BaseException) -> None:
        self.stats.redis_errors += 1
        now = time.monotonic()
        if now - self._redis_warned > 10:
            self._redis_warned = now
            log.warning("redis: %s failed: %s", what, exc)

    # ----------------------------------------------------------------- stats

    def snapshot(self) -> dict[str, Any]:
        lanes = list(self.lanes.values())
        return {
            "time": time.time(), "consumer": self.consumer, **self.stats.as_dict(),
            "in_memory": len(self.known), "lanes": len(lanes),
            "lanes_recovering": sum(1 for lane in lanes if lane.recovering),
            "queued": sum(len(lane.entries) for lane in lanes),
            "subscriptions": len(self.subs), "sip": self.ep.stats.as_dict(),
            **self.ep.table_sizes(),
        }

    def write_stats(self) -> None:
        if self.s.stats_file is not None:
            write_stats_file(self.s.stats_file, self.snapshot())

    async def _stats_loop(self) -> None:
        while True:
            self.write_stats()
            await asyncio.sleep(self.s.stats_interval)

    # ----------------------------------------------------------------- reading

    async def _ensure_group(self) -> None:
        while True:
            try:
                await self.redis.xgroup_create(names.EVENTS, names.EVENTS_GROUP, id="0",
                                               mkstream=True)
                self._group_ready.set()
                return
            except redis.ResponseError as exc:
                if "BUSYGROUP" in str(exc):
                    self._group_ready.set()
                    return
                self._redis_down("XGROUP CREATE", exc)
            except (redis.RedisError, OSError) as exc:
                self._redis_down("XGROUP CREATE", exc)
            await asyncio.sleep(1.0)

    async def _reader(self) -> None:
        await self._ensure_group()
        await self._read_own_pending()
        while True:
            if len(self.known) + len(self._to_ack) >= self.s.max_in_memory:
                self._room.clear()
                await self._room.wait()
                continue
            try:
                resp = await self.redis.xreadgroup(
                    names.EVENTS_GROUP, self.consumer, {names.EVENTS: ">"},
                    count=self.s.read_count, block=self.s.block_ms)
            except redis.ResponseError as exc:
                self._redis_down("XREADGROUP", exc)
                if "NOGROUP" in str(exc):
                    await self._ensure_group()
                else:
                    await asyncio.sleep(1.0)
                continue
            except (redis.RedisError, OSError) as exc:
                self._redis_down("XREADGROUP", exc)
                await asyncio.sleep(1.0)
                continue
            for sid, flds in stream_items(resp):
                self.stats.read += 1
                self._admit(sid, flds, 1)

    async def _read_own_pending(self) -> None:
        """A restart under the same consumer name: this consumer's pending entries first."""
        last = "0-0"
        while len(self.known) < self.s.max_in_memory:  # the rest: XAUTOCLAIM, later
            try:
                resp = await self.redis.xreadgroup(
                    names.EVENTS_GROUP, self.consumer, {names.EVENTS: last},
                    count=self.s.read_count)
                items = stream_items(resp)
                if not items:
                    return
                counts = await self._counts([sid for sid, _ in items])
            except (redis.RedisError, OSError) as exc:
                self._redis_down("reading own pending entries", exc)
                await asyncio.sleep(1.0)
                continue
            for sid, flds in items:
                self.stats.resumed += 1
                self._admit(sid, flds, counts.get(sid, 1))
            last = items[-1][0]

    async def _counts(self, ids: Sequence[str]) -> dict[str, int]:
        """Delivery counts of our pending entries ``ids`` (one pipelined round trip)."""
        pipe = self.redis.pipeline(transaction=False)
        for sid in ids:
            pipe.xpending_range(names.EVENTS, names.EVENTS_GROUP, sid, sid, 1,
                                consumername=self.consumer)
        out: dict[str, int] = {}
        for rows in await pipe.execute():
            for row in rows:
                out[_s(row["message_id"])] = int(row["times_delivered"])
        return out

    def _admit(self, sid: str, flds: dict[bytes, bytes] | None, count: int) -> None:
        if sid in self.known or sid in self._to_ack:
            return
        if not flds:  # deleted (trimmed) from the stream while pending: nothing to deliver
            self.stats.lost += 1
            log.warning("event %s was removed from the stream before delivery", sid)
            self._to_ack.add(sid)
            return
        fields = {_s(k): bytes(v) for k, v in flds.items()}
        entry = Entry(sid, fields, max(1, count))
        problem = check_entry(fields)
        if problem is not None:
            self.known[sid] = entry
            self.stats.malformed += 1
            self._spawn(self._dead(entry, f"undeliverable: {problem}"))
            return
        lane = self.lanes.get(entry.lane_key)
        if lane is not None and lane.recovering and len(lane.entries) >= self.s.lane_cap:
            # its destination is failing and enough of its events wait in memory: leave this
            # one pending in the group, not renewed; XAUTOCLAIM offers it again after
            # claim_idle (each offer counts as a delivery), so other destinations go on
            self.stats.spilled += 1
            return
        self.known[sid] = entry
        if lane is None:
            window = self.s.notify_window if entry.dest == SUBSCRIBE else self.s.window
            lane = self.lanes[entry.lane_key] = Lane(entry.lane_key, window)
            lane.task = asyncio.create_task(self._run_lane(lane))
        lane.add(entry)

    async def _claimer(self) -> None:
        interval = max(0.2, min(self.s.claim_idle / 3.0, 10.0))
        await self._group_ready.wait()  # the reader creates it first
        while True:
            try:
                await self._autoclaim()
                await self._renew()
                await self._flush_acks()
                if self._dirty_subs:
                    await self._persist_dirty()
            except redis.ResponseError as exc:
                self._redis_down("claiming", exc)
                if "NOGROUP" in str(exc):
                    await self._ensure_group()
            except (redis.RedisError, OSError) as exc:
                self._redis_down("claiming", exc)
            await asyncio.sleep(interval)

    async def _autoclaim(self) -> None:
        start = "0-0"
        idle_ms = int(self.s.claim_idle * 1000)
        while len(self.known) < self.s.max_in_memory:
            nxt, items, deleted = await self.redis.xautoclaim(
                names.EVENTS, names.EVENTS_GROUP, self.consumer, idle_ms, start,
                count=self.s.read_count)
            for sid in deleted or ():
                self.stats.lost += 1
                log.warning("pending event %s was removed from the stream before delivery",
                            _s(sid))
            fresh = [(sid, flds) for sid, flds in entries(items)
                     if sid not in self.known and sid not in self._to_ack]
            if fresh:
                counts = await self._counts([sid for sid, _ in fresh])
                for sid, flds in fresh:
                    self.stats.reclaimed += 1
                    self._admit(sid, flds, counts.get(sid, 2))
                log.info("reclaimed %d pending event(s) from silent consumers", len(fresh))
            if _s(nxt) in ("0-0", ""):
                return
            start = _s(nxt)

    async def _renew(self) -> None:
        """Reset the idle time of what we hold, so peers do not reclaim it during back-off."""
        ids = list(self.known)
        for i in range(0, len(ids), 500):
            await self.redis.xclaim(names.EVENTS, names.EVENTS_GROUP, self.consumer, 0,
                                    list[Any](ids[i:i + 500]), justid=True)

    # ----------------------------------------------------------------- lanes

    async def _run_lane(self, lane: Lane) -> None:
        try:
            await self._lane_loop(lane)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug must not silently stop a destination: log, restart lane
            log.exception("lane failed; restarting it")
            if not self._stopping:
                await asyncio.sleep(1.0)
                lane.task = asyncio.create_task(self._run_lane(lane))

    async def _lane_loop(self, lane: Lane) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            if not lane.entries:
                lane.more.clear()
                try:
                    await asyncio.wait_for(lane.more.wait(), 60.0)
                except TimeoutError:
                    if not lane.entries and self.lanes.get(lane.key) is lane:
                        del self.lanes[lane.key]
                        return
                continue
            if lane.recovering:
                delay = lane.retry_at - loop.time()
                if delay > 0:
                    lane.kick.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lane.kick.wait(), delay)
                    continue
                head = lane.entries[0]
                outcome = await self._attempt(head)
                if head.gone or outcome == "ok":
                    lane.remove(head)
                    if outcome == "ok":
                        lane.recovering = False
                        await self._ack([head])
                    else:
                        self._forget(head)
                elif outcome == "fatal" or head.count >= self.s.max_attempts:
                    lane.remove(head)
                    await self._dead(head, head.error or "failed")
                    lane.retry_at = loop.time()
                else:
                    lane.retry_at = loop.time() + self._delay(head)
                continue
            batch = lane.entries[: lane.window]
            outcomes = await asyncio.gather(*(self._attempt(e) for e in batch))
            done: list[Entry] = []
            first_failed: Entry | None = None
            for entry, outcome in zip(batch, outcomes, strict=True):
                if entry.gone:
                    lane.remove(entry)
                    self._forget(entry)
                elif outcome == "ok":
                    lane.remove(entry)
                    done.append(entry)
                elif outcome == "fatal" or entry.count >= self.s.max_attempts:
                    lane.remove(entry)
                    await self._dead(entry, entry.error or "failed")
                elif first_failed is None:
                    first_failed = entry
            if done:
                await self._ack(done)
            if first_failed is not None:
                lane.recovering = True
                lane.retry_at = loop.time() + self._delay(first_failed)

    def _delay(self, entry: Entry) -> float:
        delay = backoff_delay(entry.count, self.s.backoff, self.s.backoff_max,
                              jitter=self.s.jitter)
        if entry.retry_after is not None:
            delay = max(delay, min(entry.retry_after, self.s.backoff_max))
        return delay

    async def _attempt(self, entry: Entry) -> Outcome:
        if entry.tried > 0:  # a retry: count it in Redis and make sure it is still ours
            try:
                got = await self.redis.xclaim(names.EVENTS, names.EVENTS_GROUP, self.consumer,
                                              0, [entry.sid])
            except (redis.RedisError, OSError) as exc:
                self._redis_down("XCLAIM before a retry", exc)
                entry.error = "redis unavailable"
                return "retry"
            if not got or not got[0][1]:
                entry.gone = True
                return "retry"
            entry.count += 1
        entry.tried += 1
        entry.retry_after = None
        try:
            if entry.dest == SUBSCRIBE:
                outcome = await self._notify_event(entry)
            else:
                outcome = await self._publish(entry)
        except ValueError as exc:  # cannot be built or sent (too large, bad URI)
            entry.error = f"undeliverable: {exc}"
            outcome = "fatal"
        if outcome != "ok":
            self.stats.failed_attempts += 1
            self._spawn(self._count("failed_attempts"))
        return outcome

    async def _count(self, name: str, n: int = 1) -> None:
        try:
            await self.redis.hincrby(names.DELIVERY_STATS, name, n)
        except (redis.RedisError, OSError) as exc:
            self._redis_down("HINCRBY stats", exc)

    def _forget(self, entry: Entry) -> None:
        if self.known.pop(entry.sid, None) is not None:
            self.stats.gone += 1
        self._room.set()

    # ----------------------------------------------------------------- acknowledging

    async def _ack(self, entries: Sequence[Entry]) -> None:
        now = time.time()
        for entry in entries:
            self.known.pop(entry.sid, None)
            self._to_ack.add(entry.sid)
            self.stats.delivered += 1
            with contextlib.suppress(ValueError):
                lag = max(0.0, now - float(entry.text("ts")))
                self.stats.latency_sum += lag
                self.stats.latency_max = max(self.stats.latency_max, lag)
        self._unflushed_delivered += len(entries)
        self._ack_wake.set()

    async def _acker(self) -> None:
        """Acknowledge in the background, coalescing: a lane goes on with its next event while
        the XACK of the last one is on its way (a crash in between means a redelivery, which
        recipients drop by event id)."""
        while True:
            await self._ack_wake.wait()
            await asyncio.sleep(0.002)  # let a few more gather: one round trip for them all
            self._ack_wake.clear()
            if not await self._flush_acks():
                await asyncio.sleep(0.5)
                self._ack_wake.set()

    async def _flush_acks(self) -> bool:
        """XACK what was delivered, count it, save subscriptions whose CSeq moved: one round
        trip. False when Redis failed (everything stays queued for the next flush)."""
        async with self._flush_lock:
            if not self._to_ack and not self._dirty_subs and not self._unflushed_delivered:
                return True
            ids = list(self._to_ack)
            delivered = self._unflushed_delivered
            dirty = [self.subs[i] for i in self._dirty_subs if i in self.subs]
            pipe = self.redis.pipeline(transaction=False)
            if ids:
                pipe.xack(names.EVENTS, names.EVENTS_GROUP, *ids)
                if not self.s.keep_delivered:  # no ciphertext lingers once it is delivered
                    pipe.xdel(names.EVENTS, *ids)
            if delivered:
                pipe.hincrby(names.DELIVERY_STATS, "delivered", delivered)
            for sub in dirty:
                pipe.hset(names.SUBSCRIPTIONS, sub.id, sub.pack())
            try:
                await pipe.execute()
            except (redis.RedisError, OSError) as exc:
                self.stats.ack_errors += 1
                self._redis_down("XACK", exc)
                return False
            self._to_ack.difference_update(ids)
            self._unflushed_delivered -= delivered
            self._dirty_subs.difference_update(s.id for s in dirty)
            self._room.set()
            return True

    async def _dead(self, entry: Entry, error: str) -> None:
        """Dead-letter: XADD to DEAD (all fields + error + attempts), then XACK. Retried while
        Redis is down; a crash in between leaves it pending (a second dead copy at worst)."""
        fields: dict[str, bytes | str] = dict(entry.fields)
        fields["error"] = error[:500]
        fields["attempts"] = str(entry.count if entry.tried else 0)
        added = False
        while True:
            try:
                if not added:
                    await self.redis.xadd(names.DEAD, fields)  # type: ignore[arg-type]
                    added = True
                pipe = self.redis.pipeline(transaction=False)
                pipe.xack(names.EVENTS, names.EVENTS_GROUP, entry.sid)
                if not self.s.keep_delivered:
                    pipe.xdel(names.EVENTS, entry.sid)
                pipe.hincrby(names.DELIVERY_STATS, "dead", 1)
                await pipe.execute()
                break
            except (redis.RedisError, OSError) as exc:
                self._redis_down("dead-lettering", exc)
                if self._stopping:
                    return
                await asyncio.sleep(1.0)
        self.stats.dead += 1
        self.known.pop(entry.sid, None)
        self._room.set()
        log.warning("event %s dead-lettered after %s attempt(s): %s", entry.sid,
                    fields["attempts"], error[:200])

    # ----------------------------------------------------------------- PUBLISH

    async def _resolve(self, uri: SipUri, port_default: int = 5060) -> Address:
        host = uri.host.strip("[]")
        port = uri.port or port_default
        if is_ip(host):
            return host, port
        now = time.monotonic()
        cached = self._dns.get((host, port))
        if cached is not None and cached[0] > now:
            return cached[1]
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except OSError as exc:
            raise LookupError(f"cannot resolve {host}: {exc}") from None
        addr = (str(infos[0][4][0]), int(infos[0][4][1]))
        if len(self._dns) > 1000:
            self._dns.clear()
        self._dns[(host, port)] = (now + 60.0, addr)
        return addr

    async def _publish(self, entry: Entry) -> Outcome:
        uri = SipUri.parse(entry.dest)
        transport = uri_transport(uri)  # ValueError: undeliverable (check_entry saw to it)
        try:
            addr = await self._resolve(uri, default_port(transport))
        except LookupError as exc:
            entry.error = str(exc)
            return "retry"
        hop = NextHop.for_uri(uri, addr)
        expires = PUBLISH_EXPIRES
        for _ in range(2):  # a 423 with Min-Expires is retried once at once
            msg = build_publish(entry.dest, entry.body, local=self.ep.local,
                                content_type=entry.content_type,
                                content_disposition=SMIME_CONTENT_DISPOSITION, expires=expires)
            result = await self.ep.send_request(msg, hop)
            resp = result.response
            if resp is None:
                entry.error = f"no final response ({result.error})"
                return "retry"
            status = resp.status or 0
            if 200 <= status < 300:
                self.stats.published += 1
                return "ok"
            entry.error = f"{status} {resp.reason}".strip()
            entry.retry_after = _retry_after(resp)
            min_exp = (resp.get("Min-Expires") or "").strip()
            if status == 423 and min_exp.isdigit() and int(min_exp) > expires:
                expires = int(min_exp)
                continue
            return "retry"
        return "retry"

    # ----------------------------------------------------------------- NOTIFY

    def _subs_for(self, liid: str) -> list[Subscription]:
        """The LIID's subscriptions that are live and confirmed by their first NOTIFY."""
        now = time.time()
        return [s for s in self.subs.values() if s.liid == liid and not s.expired(now)
                and s.id not in self._unconfirmed]

    async def _notify_event(self, entry: Entry) -> Outcome:
        subs = self._subs_for(entry.liid)
        todo = [s for s in subs if s.id not in entry.notified]
        if not subs:
            if entry.notified:
                return "ok"  # its subscribers left after they got it
            entry.error = "no active subscription"
            return "retry"
        results = await asyncio.gather(*(
            self._notify(s.id, body=entry.body, content_type=entry.content_type)
            for s in todo))
        for sub, (ok, error) in zip(todo, results, strict=True):
            if ok:
                entry.notified.add(sub.id)
            else:
                entry.error = error
        left = [s for s in self._subs_for(entry.liid) if s.id not in entry.notified]
        if entry.notified and not left:
            self.stats.notified += 1
            return "ok"
        if not entry.error:
            entry.error = "no active subscription"
        return "retry"

    async def _notify(
        self, sub_id: str, *, body: bytes = b"", content_type: str | None = None,
        state: str | None = None,
    ) -> tuple[bool, str]:  # fmt: skip
        """One NOTIFY in the subscription's dialog; (2xx?, error text)."""
        sub = self.subs.get(sub_id)
        if sub is None:
            return False, "subscription ended"
        sub = replace(sub, local_cseq=sub.local_cseq + 1)
        self.subs[sub_id] = sub
        self._dirty_subs.add(sub_id)
        result = await self._send_notify(sub, body=body, content_type=content_type,
                                         state=state)
        resp = result.response
        if resp is None:
            return False, f"NOTIFY: no final response ({result.error})"
        status = resp.status or 0
        if 200 <= status < 300:
            return True, ""
        if status in (481, 404, 410, 489) and sub_id in self.subs:
            # RFC 6665 4.2.2: the subscriber no longer has the dialog: it is gone
            await self._end_subscription(sub_id, f"NOTIFY answered {status}", notify=False)
        return False, f"NOTIFY: {status} {resp.reason}".strip()

    async def _send_notify(
        self, sub: Subscription, *, body: bytes = b"", content_type: str | None = None,
        state: str | None = None,
    ) -> TxResult:  # fmt: skip
        route = dialog_route(sub.remote_target, sub.route_set, sub.fallback)
        try:
            hop = await self._dialog_hop(route)
        except ValueError as exc:
            return TxResult(None, f"next hop {route.hop_uri}: {exc}")
        except LookupError as exc:
            return TxResult(None, str(exc))
        msg = build_notify(
            route=route, local=self.ep.local, call_id=sub.call_id, local_uri_=sub.local_uri,
            local_tag=sub.local_tag, remote_uri=sub.remote_uri, remote_tag=sub.remote_tag,
            cseq=sub.local_cseq, state=state or sub.state(time.time()),
            event_param=sub.event_param, body=body, content_type=content_type,
            content_disposition=SMIME_CONTENT_DISPOSITION if body else None)
        return await self.ep.send_request(msg, hop)

    async def _dialog_hop(self, route: DialogRoute) -> NextHop:
        """The NOTIFY's next hop with the transport its URI asks for. A hop given by name keeps
        going where the SUBSCRIBE came from (``route.next_hop``) over UDP or size-chosen TCP,
        as before; with an explicit TCP/TLS transport the name is resolved, so the connection
        goes to it and TLS verifies that name."""
        uri = SipUri.parse(route.hop_uri)
        hop = NextHop.for_uri(uri, route.next_hop)
        if hop.transport in ("tcp", "tls") and not is_ip(uri.host):
            hop = replace(hop, addr=await self._resolve(uri, default_port(hop.transport)))
        return hop

    # ----------------------------------------------------------------- subscriptions

    async def _load_subscriptions(self) -> None:
        try:
            raw = await self.redis.hgetall(names.SUBSCRIPTIONS)
        except (redis.RedisError, OSError) as exc:
            self._redis_down("loading subscriptions", exc)
            return
        now = time.time()
        stale: list[Any] = []
        for key, blob in raw.items():
            try:
                sub = Subscription.unpack(blob if isinstance(blob, bytes) else blob.encode())
            except ValueError as exc:
                log.warning("subscription record skipped: %s", exc)
                stale.append(key)
                continue
            if sub.expired(now):
                stale.append(key)
                continue
            sub = replace(sub, local_cseq=sub.local_cseq + RESUME_CSEQ_JUMP)
            self._install(sub)
            self._dirty_subs.add(sub.id)
        if stale:
            with contextlib.suppress(redis.RedisError, OSError):
                await self.redis.hdel(names.SUBSCRIPTIONS, *stale)
        if self.subs:
            log.info("resumed %d subscription(s)", len(self.subs))

    def _install(self, sub: Subscription) -> None:
        old = self.subs.get(sub.id)
        if old is not None:
            self._by_dialog.pop(old.dialog, None)
        self.subs[sub.id] = sub
        self._by_dialog[sub.dialog] = sub.id
        handle = self._expiry.pop(sub.id, None)
        if handle is not None:
            handle.cancel()
        delay = max(0.0, sub.expires_at - time.time())
        self._expiry[sub.id] = asyncio.get_running_loop().call_later(
            delay, lambda: self._spawn(self._expire(sub.id)))

    async def _persist(self, sub: Subscription) -> None:
        ttl = hash_ttl((s.expires_at for s in self.subs.values()), time.time())
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(names.SUBSCRIPTIONS, sub.id, sub.pack())
        if ttl is not None:
            pipe.expire(names.SUBSCRIPTIONS, ttl)
        try:
            await pipe.execute()
            self._dirty_subs.discard(sub.id)
        except (redis.RedisError, OSError) as exc:
            self._dirty_subs.add(sub.id)
            self._redis_down("saving a subscription", exc)

    async def _persist_dirty(self) -> None:
        for sub_id in list(self._dirty_subs):
            sub = self.subs.get(sub_id)
            if sub is None:
                self._dirty_subs.discard(sub_id)
            else:
                await self._persist(sub)

    async def _expire(self, sub_id: str) -> None:
        sub = self.subs.get(sub_id)
        if sub is None:
            return
        if not sub.expired(time.time()):  # refreshed meanwhile: timer was replaced
            return
        await self._end_subscription(sub_id, "expired", notify=True)

    async def _end_subscription(self, sub_id: str, reason: str, *, notify: bool) -> None:
        sub = self.subs.get(sub_id)
        if sub is None:
            return
        if notify:  # last NOTIFY first (it needs the dialog), then forget the dialog
            await self._notify(sub_id, state="terminated;reason=timeout")
            if sub_id not in self.subs:  # a 481 to that NOTIFY ended it already
                return
            sub = self.subs[sub_id]
        self.subs.pop(sub_id, None)
        self._unconfirmed.discard(sub_id)
        self._by_dialog.pop(sub.dialog, None)
        self._dirty_subs.discard(sub_id)
        handle = self._expiry.pop(sub_id, None)
        if handle is not None:
            handle.cancel()
        self.stats.subscriptions_ended += 1
        try:
            await self.redis.hdel(names.SUBSCRIPTIONS, sub_id)
        except (redis.RedisError, OSError) as exc:
            self._redis_down("deleting a subscription", exc)
        await self._audit("subscription_ended", sub.source, reason, liid=sub.liid,
                          force=True)

    # ----------------------------------------------------------------- incoming requests

    def _on_request(self, msg: SipMessage, addr: Address) -> None:
        method = msg.method or ""
        if method == "SUBSCRIBE":
            if self._subscribing >= MAX_SUBSCRIBES_IN_PROGRESS:  # a flood: do not queue it
                self.ep.respond(msg, addr, 503, "Service Unavailable", to_tag=new_tag(),
                                extra=[("Retry-After", "5")])
                return
            self._spawn(self._subscribe_task(msg, addr))
        elif method == "OPTIONS":
            self.ep.respond(msg, addr, 200, "OK", to_tag=new_tag(), extra=[
                ("Allow", ALLOW), ("Allow-Events", EVENT_PACKAGE), ("Accept", "*/*")])
        elif method == "CANCEL":
            self.ep.respond(msg, addr, 481, "Call/Transaction Does Not Exist", to_tag=new_tag())
        else:
            self.ep.respond(msg, addr, 405, "Method Not Allowed", to_tag=new_tag(),
                            extra=[("Allow", ALLOW)])

    def _source(self, msg: SipMessage, addr: Address) -> Address | None:
        """The recorder's address: the packet's source, or X-Spitwall-Source when (and only
        when) the packet comes from the configured proxy. None: the proxy sent a bad one."""
        proxy = self.s.proxy
        header = msg.get("X-Spitwall-Source")
        if proxy is not None and header is not None and _same_addr(addr, proxy):
            try:
                return parse_source(header)
            except ValueError:
                return None
        return addr

    async def _recorder_rules(self) -> list[RecorderRule]:
        now = time.monotonic()
        if self._recorders is not None and now - self._recorders[0] < self.s.recorders_ttl:
            return self._recorders[1]
        raw = await self.redis.hgetall(names.RECORDERS)
        rules, errors = parse_recorders(raw)
        if errors and errors != self._recorder_errors:
            for err in errors:
                log.warning("recorder allow-list: %s", err)
        self._recorder_errors = errors
        self._recorders = (now, rules)
        return rules

    async def _refuse(self, msg: SipMessage, addr: Address, source: str, code: int, reason: str,
                      why: str, liid: str = "") -> None:
        self.stats.subscribe_refused += 1
        self.ep.respond(msg, addr, code, reason, to_tag=new_tag())
        self._spawn(self._count("subscribe_refused"))
        await self._audit("subscribe_refused", source, why, liid=liid)

    async def _audit(self, action: str, address: str, reason: str, *, liid: str = "",
                     force: bool = False) -> None:
        now = time.monotonic()
        rate = self.s.audit_rate
        self._audit_tokens = min(rate * 10, self._audit_tokens + (now - self._audit_at) * rate)
        self._audit_at = now
        if not force and self._audit_tokens < 1:
            self._audit_pending_suppressed += 1
            self.stats.audit_suppressed += 1
            return
        self._audit_tokens -= 1
        detail: dict[str, Any] = {"reason": reason}
        if self._audit_pending_suppressed and not force:
            detail["suppressed_before"] = self._audit_pending_suppressed
            self._audit_pending_suppressed = 0
        # the provisioning audit's fields (intercept.provision.append_audit) plus "reason"
        fields: dict[str, str] = {"ts": f"{time.time():.3f}", "user": f"deliver:{self.consumer}",
                                  "action": action, "liid": liid[:64], "address": address,
                                  "reason": reason, "detail": json.dumps(detail)}
        try:
            await self.redis.xadd(names.AUDIT, fields)  # type: ignore[arg-type]
        except (redis.RedisError, OSError) as exc:
            self._redis_down("XADD audit", exc)

    async def _subscribe_task(self, msg: SipMessage, addr: Address) -> None:
        self._subscribing += 1
        try:
            await self._on_subscribe(msg, addr)
        finally:
            self._subscribing -= 1

    async def _on_subscribe(self, msg: SipMessage, addr: Address) -> None:
        self.stats.subscribes += 1
        package, _, params = (msg.get("Event") or "").partition(";")
        if package.strip().lower() != EVENT_PACKAGE:
            self.ep.respond(msg, addr, 489, "Bad Event", to_tag=new_tag(),
                            extra=[("Allow-Events", EVENT_PACKAGE)])
            return
        event_param = _event_id(params)
        src = self._source(msg, addr)
        if src is None:
            await self._refuse(msg, addr, f"{addr[0]}:{addr[1]}", 403, "Forbidden",
                               "malformed X-Spitwall-Source from the proxy")
            return
        source = f"[{src[0]}]:{src[1]}" if ":" in src[0] else f"{src[0]}:{src[1]}"
        try:
            uri_user = SipUri.parse(msg.uri or "").user or ""
        except ValueError:
            uri_user = ""
        try:
            rules = await self._recorder_rules()
        except (redis.RedisError, OSError) as exc:
            self._redis_down("reading the recorder allow-list", exc)
            self.ep.respond(msg, addr, 503, "Service Unavailable", to_tag=new_tag(),
                            extra=[("Retry-After", "5")])
            return
        rule = match_recorder(rules, src[0], src[1])
        if rule is None:
            await self._refuse(msg, addr, source, 403, "Forbidden", "address not allow-listed",
                               uri_user)
            return
        if rule.needs_digest and not await self._check_digest(msg, addr, source, rule, uri_user):
            return
        existing: Subscription | None = None
        if msg.to_tag:  # in the dialog: the Request-URI is our Contact, the LIID the dialog's
            existing = self.subs.get(self._by_dialog.get((msg.call_id, msg.to_tag), ""))
            if existing is None or existing.remote_tag != msg.from_tag:
                self.ep.respond(msg, addr, 481, "Subscription Does Not Exist")
                return
            liid = existing.liid
        else:
            try:
                liid = check_liid(uri_user)
            except ValueError:
                await self._refuse(msg, addr, source, 404, "Not Found",
                                   "no valid LIID in the Request-URI", uri_user)
                return
        if rule.liids and liid not in rule.liids:
            await self._refuse(msg, addr, source, 403, "Forbidden",
                               "LIID not allowed for this recorder", liid)
            return
        try:
            expires = grant_expires(msg.get("Expires"), default=self.s.expires_default,
                                    minimum=self.s.expires_min, maximum=self.s.expires_max)
        except IntervalTooBrief as exc:
            self.ep.respond(msg, addr, 423, "Interval Too Brief", to_tag=new_tag(),
                            extra=[("Min-Expires", str(exc.minimum))])
            return
        except ValueError:
            self.ep.respond(msg, addr, 400, "Bad Expires", to_tag=new_tag())
            return
        if existing is not None:
            await self._resubscribe(msg, addr, source, rule, existing, expires)
        else:
            await self._new_subscription(msg, addr, source, rule, liid, expires, event_param)

    def _challenge(self, msg: SipMessage, addr: Address, rule: RecorderRule, now: float,
                   *, stale: bool = False) -> None:
        """401 with a fresh nonce, one WWW-Authenticate per algorithm the entry has an HA1
        for, SHA-256 first (RFC 8760 2.4)."""
        self.stats.subscribe_challenged += 1
        nonce = self.nonces.new(now)
        self.ep.respond(msg, addr, 401, "Unauthorized", to_tag=new_tag(), extra=[
            ("WWW-Authenticate", digest.challenge(nonce, stale=stale, algorithm=alg))
            for alg in rule.ha1s])

    async def _check_digest(self, msg: SipMessage, addr: Address, source: str,
                            rule: RecorderRule, uri_user: str) -> bool:
        now = time.time()
        value = msg.get("Authorization")
        if value is None:
            self._challenge(msg, addr, rule, now)
            return False
        try:
            creds = digest.parse(value)
        except ValueError:
            await self._refuse(msg, addr, source, 403, "Forbidden", "malformed credentials",
                               uri_user)
            return False
        assert rule.user is not None
        good = digest.verify(creds, method="SUBSCRIBE", user=rule.user, ha1s=rule.ha1s)
        nonce = creds.get("nonce", "")
        nonce_state = self.nonces.check(nonce, now)
        if nonce_state != "ok":  # an old or foreign nonce: challenge again, not a refusal
            self._challenge(msg, addr, rule, now, stale=good and nonce_state == "stale")
            return False
        if not good:
            await self._refuse(msg, addr, source, 403, "Forbidden", "bad credentials", uri_user)
            return False
        if not self.nonce_counts.accept(nonce, creds.get("nc") if creds.get("qop") else None,
                                        now):
            # right credentials, but this nonce count was used before: a replay (or a client
            # that reuses its count); the client answers a fresh nonce, a replayer cannot
            self.stats.subscribe_replayed += 1
            log.info("SUBSCRIBE from %s with a nonce count used before: challenged afresh",
                     source)
            self._challenge(msg, addr, rule, now, stale=True)
            return False
        try:
            digest_user = SipUri.parse(creds.get("uri", "")).user or ""
        except ValueError:
            digest_user = ""
        if digest_user != uri_user:
            await self._refuse(msg, addr, source, 403, "Forbidden",
                               "credentials computed for another URI", uri_user)
            return False
        return True

    def _ok_extra(self, msg: SipMessage, expires: int) -> list[tuple[str, str]]:
        extra = [("Record-Route", rr) for rr in msg.values("Record-Route")]
        extra += [("Expires", str(expires)), ("Contact", f"<{local_uri(self.ep.local)}>"),
                  ("Allow-Events", EVENT_PACKAGE)]
        return extra

    async def _new_subscription(self, msg: SipMessage, addr: Address, source: str,
                                rule: RecorderRule, liid: str, expires: int,
                                event_param: str | None) -> None:
        contact = msg.contact
        if contact is None or not msg.from_tag:
            self.ep.respond(msg, addr, 400, "Missing Contact or From tag", to_tag=new_tag())
            return
        try:
            target = SipUri.parse(contact.uri)
        except ValueError:
            self.ep.respond(msg, addr, 400, "Bad Contact", to_tag=new_tag())
            return
        if target.scheme == "tel":
            self.ep.respond(msg, addr, 400, "Bad Contact", to_tag=new_tag())
            return
        try:  # NOTIFYs must be able to reach the next hop: a transport we speak
            uri_transport(SipUri.parse(dialog_route(contact.uri, msg.values("Record-Route"),
                                                    addr).hop_uri))
        except ValueError:
            self.ep.respond(msg, addr, 400, "Unsupported Transport In Contact Or Route",
                            to_tag=new_tag())
            return
        now = time.time()
        sub = Subscription(
            id=secrets.token_hex(8), liid=liid, call_id=msg.call_id, local_tag=new_tag(),
            remote_tag=msg.from_tag, local_uri=msg.to_addr.uri, remote_uri=msg.from_addr.uri,
            remote_target=contact.uri, route_set=tuple(msg.values("Record-Route")),
            fallback=addr, source=source, expires_at=now + expires, event_param=event_param,
            remote_cseq=msg.cseq.number, user=rule.user, created_at=now, local_cseq=1)
        if expires == 0:  # a fetch (RFC 6665 4.4.3): one terminated NOTIFY, no state kept
            self.ep.respond(msg, addr, 200, "OK", to_tag=sub.local_tag,
                            extra=self._ok_extra(msg, 0))
            await self._send_notify(sub, state="terminated;reason=timeout")
            return
        if len(self.subs) >= self.s.max_subscriptions:
            self.ep.respond(msg, addr, 503, "Service Unavailable", to_tag=new_tag(),
                            extra=[("Retry-After", "60")])
            return
        sub = replace(sub, local_cseq=0)
        self._install(sub)
        self._unconfirmed.add(sub.id)
        self.stats.subscriptions_started += 1
        self.ep.respond(msg, addr, 200, "OK", to_tag=sub.local_tag,
                        extra=self._ok_extra(msg, expires))
        _ok, error = await self._notify(sub.id)  # RFC 6665 4.2.1.1: NOTIFY at once
        self._unconfirmed.discard(sub.id)
        if sub.id in self.subs:
            if error:
                log.info("first NOTIFY of a subscription failed: %s", error)
            self._kick(liid)
        await self._persist(self.subs.get(sub.id, sub))
        await self._audit("subscribe_accepted", source, f"expires {expires}", liid=liid,
                          force=True)

    def _kick(self, liid: str) -> None:
        """A subscriber is ready: the LIID's waiting events stop waiting out their back-off."""
        lane = self.lanes.get(f"{SUBSCRIBE}:{liid}")
        if lane is not None:
            lane.kick.set()

    async def _resubscribe(self, msg: SipMessage, addr: Address, source: str,
                           rule: RecorderRule, sub: Subscription, expires: int) -> None:
        liid = sub.liid
        if rule.user != sub.user:
            await self._refuse(msg, addr, source, 403, "Forbidden",
                               "refresh by another recorder identity", liid)
            return
        if msg.cseq.number <= sub.remote_cseq:
            self.ep.respond(msg, addr, 500, "CSeq Out Of Order")
            return
        self.ep.respond(msg, addr, 200, "OK", extra=self._ok_extra(msg, expires))
        if expires == 0:
            self.subs[sub.id] = replace(sub, remote_cseq=msg.cseq.number)
            await self._end_subscription(sub.id, "unsubscribed", notify=True)
            return
        sub = sub.refreshed(expires, time.time(), msg.cseq.number)
        self._install(sub)
        self.stats.subscriptions_refreshed += 1
        await self._notify(sub.id)
        await self._persist(self.subs.get(sub.id, sub))
        self._kick(liid)


def entries(items: Any) -> list[tuple[str, dict[bytes, bytes] | None]]:
    """[(id, fields)] of an XRANGE/XCLAIM-style reply (fields None or {} when deleted)."""
    return [(_s(sid), flds) for sid, flds in items or ()]


def stream_items(resp: Any) -> list[tuple[str, dict[bytes, bytes] | None]]:
    """[(id, fields)] of an XREADGROUP reply over our one stream."""
    return [item for _stream, items in resp or () for item in entries(items)]


def _event_id(params: str) -> str | None:
    for item in params.split(";"):
        name, _, value = item.partition("=")
        if name.strip().lower() == "id" and value.strip():
            value = value.strip()
            return value if re.fullmatch(r"[A-Za-z0-9.!%*_+`'~-]{1,64}", value) else None
    return None


def _retry_after(resp: SipMessage) -> float | None:
    value = (resp.get("Retry-After") or "").split(";", 1)[0].split("(", 1)[0].strip()
    return float(value) if value.isdigit() else None


def _same_addr(a: Address, b: Address) -> bool:
    return a[1] == b[1] and a[0].strip("[]").lower() == b[0].strip("[]").lower()

