"""The request-path Redis store: one round trip of latency per INVITE, fail-open.

Per INVITE the store pipelines, on one connection: the `observe.lua` script for the source
IP, the caller and the callee (one call per entity, each touching only keys of one hash tag, so
the same code is valid on Redis Cluster), an MGET of the config and lists versions and a SET of
the callee's last caller (for in-call spam reports). Writes
whose result the call does not wait for (the decision record, scanner sightings, counters) are
sent without reading the reply; the replies are drained before the next request on the same
connection, so they add no latency. On a Redis Cluster (``redis+cluster://``) the same commands
are routed per slot by `scoring.clusterlink.ClusterLink`: one write per master involved, all
sent before any reply is read, so the latency is still one round trip.

We drive a single `redis.Connection` rather than `Pipeline` because redis-py's pipeline sends
`SCRIPT EXISTS` before every execute that has scripts (a second round trip) and cannot leave a
reply unread. When Redis is unreachable, calls get `Signals(available=False)` and the store
retries the connection at most once per `retry_after` seconds, so a dead Redis costs no time.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgpack
import redis
from redis.exceptions import NoScriptError, ResponseError

from lists.matcher import ListSnapshot
from lists.store import load_lists
from scoring import keys, redisconn
from scoring.clusterlink import ClusterLink, NodeDown
from scoring.config import Config
from scoring.model import Action, CallAttempt, Decision, Signals
from scoring.reputation import caller_rep_key, ip_rep_key, update_command

log = logging.getLogger("spitwall.store")

LUA_DIR = Path(__file__).with_name("lua")
RECORD_VERSION = 1
RECENT_MAX_LEN = 32  # bytes of a callee kept in the recent list


class Script:
    """A Lua script from a `.lua` file next to this module, addressed by its SHA1."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.source = (LUA_DIR / f"{name}.lua").read_text(encoding="utf-8")
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()


OBSERVE = Script("observe")
RECORD = Script("record")
REPUTATION = Script("reputation")
SCRIPTS = (OBSERVE, RECORD, REPUTATION)
LAST_CALLER_TTL = 86400  # how long a callee can report its last caller
#: deferred replies read at the latest before sending more: a process that only defers (Kamailio's
#: timer process counting in the failure route) must not let replies pile up without bound
MAX_PENDING = 256


class RedisUnavailable(Exception):
    """Redis could not be reached or answered out of time."""


class Store:
    """Per-process access to Redis for the request path (one per Kamailio child)."""

    def __init__(self, url: str, *, timeout: float = 0.2, retry_after: float = 1.0) -> None:
        self.url = url
        self.redacted_url = redisconn.redacted(url)  # for logs: never a password
        self.timeout = timeout
        #: Redis Cluster: commands are routed per slot by `ClusterLink` (None: one server)
        self.cluster: ClusterLink | None = None
        self.pool: redis.ConnectionPool | None = None
        if redisconn.is_cluster(url):
            self.cluster = ClusterLink(redisconn.ClusterUrl.parse(url),
                                       [s.source for s in SCRIPTS], retry_after=retry_after,
                                       socket_timeout=timeout, socket_connect_timeout=timeout)
        else:
            self.pool = redisconn.connection_pool(
                url, socket_timeout=timeout, socket_connect_timeout=timeout
            )
        self._client: redis.Redis | None = None
        self.retry_after = retry_after
        self._conn: Any = None
        self._pending = 0
        self._down_until = 0.0
        self.errors = 0
        #: Extra keys read (GET) in the same round trip as every INVITE's scoring and every
        #: version poll, e.g. another layer's version counter (the intercept targets): their
        #: values come back in `Signals.watched`, so that layer needs no round trip of its own.
        self.watch_keys: tuple[str, ...] = ()

    # -- connection management ---------------------------------------------------------
    def _connection(self) -> Any:
        if self._conn is not None:
            return self._conn
        if time.monotonic() < self._down_until:
            raise RedisUnavailable("redis marked down")
        assert self.pool is not None
        conn = self.pool.make_connection()
        try:
            conn.connect()  # type: ignore[no-untyped-call]
            for s in SCRIPTS:  # registered once per connection, i.e. once per child
                conn.send_command("SCRIPT", "LOAD", s.source)  # type: ignore[no-untyped-call]
                conn.read_response()
        except (redis.ConnectionError, redis.TimeoutError, OSError, ResponseError) as exc:
            # ResponseError: e.g. NOPERM on SCRIPT LOAD (a misconfigured user): as good as down
            conn.disconnect()  # type: ignore[no-untyped-call]
            self._mark_down(exc)
            raise RedisUnavailable(str(exc)) from exc
        self._conn = conn
        self._pending = 0
        return conn

    def _mark_down(self, exc: BaseException) -> None:
        self.errors += 1
        log.warning("redis %s unavailable (%s); failing open for %.1fs", self.redacted_url, exc,
                    self.retry_after)
        if self._conn is not None:
            try:
                self._conn.disconnect()
            except (redis.RedisError, OSError) as close_exc:
                log.debug("disconnect failed: %r", close_exc)
        self._conn = None
        self._pending = 0
        if self.cluster is not None:
            self.cluster.close()
        self._down_until = time.monotonic() + self.retry_after

    def close(self) -> None:
        if self._conn is not None:
            self._conn.disconnect()
            self._conn = None
        if self.cluster is not None:
            self.cluster.close()
        if self._client is not None:
            self._client.close()
            self._client = None

    def _cluster_call(self, send: Any, commands: Sequence[Sequence[Any]]) -> Any:
        if time.monotonic() < self._down_until:
            raise RedisUnavailable("redis marked down")
        try:
            return send(commands, pack)
        except NodeDown as exc:  # one master: this request fails open, the others go on
            self.errors += 1
            raise RedisUnavailable(str(exc)) from exc
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            self._mark_down(exc)
            raise RedisUnavailable(str(exc)) from exc

    def _drain(self, conn: Any) -> None:
        while self._pending:
            self._pending -= 1
            try:
                conn.read_response()
            except ResponseError as exc:  # a deferred write failed: log, do not fail the call
                log.error("deferred redis write failed: %s", exc)

    def _roundtrip(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Send commands in one write and read their replies; errors come back as values."""
        if self.cluster is not None:
            replies: list[Any] = self._cluster_call(self.cluster.roundtrip, commands)
            return replies
        try:
            conn = self._connection()
            self._drain(conn)
            conn.send_packed_command([pack(commands)])
            replies = []
            for _ in commands:
                try:
                    replies.append(conn.read_response())
                except ResponseError as exc:
                    replies.append(exc)
            return replies
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            self._mark_down(exc)
            raise RedisUnavailable(str(exc)) from exc

    def _defer(self, commands: Sequence[Sequence[Any]]) -> None:
        """Send commands without waiting for their replies (read before the next request)."""
        if self.cluster is not None:
            self._cluster_call(self.cluster.defer, commands)  # bounded there too (MAX_PENDING)
            return
        try:
            conn = self._connection()
            if self._pending >= MAX_PENDING:
                self._drain(conn)
            conn.send_packed_command([pack(commands)])
            self._pending += len(commands)
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            self._mark_down(exc)
            raise RedisUnavailable(str(exc)) from exc

    # -- request path ------------------------------------------------------------------
    def observe(self, attempt: CallAttempt, cfg: Config, now: float | None = None,
                numbers: Sequence[str] = ()) -> Signals:
        """Count this INVITE and read everything the shared checks need: one round trip.

        ``numbers`` (normalised caller numbers) are looked up in the number database in the
        same round trip: one MGET per number, over its keys on every list."""
        t = time.time() if now is None else now
        windows = cfg.rate_windows
        n = len(windows)
        dw = int(cfg["distinct.window"])
        recent_max = int(cfg["sweep.recent"])
        head = [f"{t:.3f}", str(n), *[str(w) for w in windows]]
        ip_base = keys.source_tag(attempt.source_ip, cfg.v6_prefix)
        caller = attempt.caller_key
        caller_base = keys.tag("caller", caller)
        callee_base = keys.tag("callee", attempt.callee_key)
        source = ["EVALSHA", OBSERVE.sha, str(2 * n + 7),
                  *keys.rate_keys(ip_base, windows, t), *keys.source_keys(ip_base, dw, t),
                  f"{ip_base}:rep",
                  "ip", *head, caller[:256], attempt.ruri_user[:RECENT_MAX_LEN], str(dw),
                  str(recent_max)]
        per_caller = ["EVALSHA", OBSERVE.sha, str(2 * n + 1),
                      *keys.rate_keys(caller_base, windows, t), f"{caller_base}:rep",
                      "caller", *head]
        per_callee = ["EVALSHA", OBSERVE.sha, str(2 * n),
                      *keys.rate_keys(callee_base, windows, t), "callee", *head]
        versions = ["MGET", keys.CONFIG_VERSION, keys.LISTS_VERSION]
        commands = [source, per_caller, per_callee, versions]
        commands += [["GET", k] for k in self.watch_keys]
        commands += [["MGET", *keys.number_keys(n)] for n in numbers]
        if attempt.ruri_user:  # who called last, for the callee's in-call spam report
            commands.append(["SET", last_caller_key(attempt.ruri_user),
                             f"{caller}|{attempt.source_ip}"[:300], "EX", str(LAST_CALLER_TTL)])
        if attempt.pass_token:  # single use: the first INVITE with this token claims it
            claim = hashlib.sha1(attempt.pass_token.encode("utf-8", "replace")).hexdigest()
            ttl = str(int(cfg["media.token_ttl"]) + 5)
            commands.append(["SET", f"{keys.tag('pass', claim)}:used", "1", "NX", "EX", ttl])
        replies = self._roundtrip(commands)
        if any(isinstance(r, NoScriptError) for r in replies):
            self._load_scripts()
            replies = self._roundtrip(commands)
        for r in replies:
            if isinstance(r, Exception):
                raise RedisUnavailable(f"redis error: {r}")
        src = [_s(x) for x in replies[0]]
        cal = [_s(x) for x in replies[1]]
        cee = [_s(x) for x in replies[2]]
        cfg_v, lists_v = replies[3]
        nw = len(self.watch_keys)
        watched = tuple(None if r is None else _s(r) for r in replies[4:4 + nw])
        hits = _number_hits(numbers, replies[4 + nw:4 + nw + len(numbers)])
        pass_reply = 4 + nw + len(numbers) + (1 if attempt.ruri_user else 0)
        return Signals(
            ip_rate={w: float(src[i]) for i, w in enumerate(windows)},
            caller_rate={w: float(cal[i]) for i, w in enumerate(windows)},
            callee_rate={w: float(cee[i]) for i, w in enumerate(windows)},
            distinct_callers=int(src[n]), distinct_callees=int(src[n + 1]),
            scanner_hits=int(src[n + 2]),
            reputation_ip=_f(src[n + 3]), reputation_ip_t=_f(src[n + 4]),
            recent_callees=tuple(src[n + 5:]),
            reputation_caller=_f(cal[n]), reputation_caller_t=_f(cal[n + 1]),
            config_version=int(cfg_v or 0), lists_version=int(lists_v or 0),
            pass_first_use=len(replies) > pass_reply and replies[pass_reply] is not None,
            watched=watched,
            numbers=hits,
        )

    def lookup_numbers(self, numbers: Sequence[str]) -> tuple[tuple[str, str, bytes], ...]:
        """The number database's records of ``numbers`` in a round trip of their own (for
        the first INVITE after `numbers.lookup` was turned on: its round trip was sent with
        the config of before)."""
        replies = self._roundtrip([["MGET", *keys.number_keys(n)] for n in numbers])
        for r in replies:
            if isinstance(r, Exception):
                raise RedisUnavailable(f"redis error: {r}")
        return _number_hits(numbers, replies)

    def _load_scripts(self) -> None:
        self._roundtrip([["SCRIPT", "LOAD", s.source] for s in SCRIPTS])

    def record(self, attempt: CallAttempt, decision: Decision, now: float | None = None,
               half_life: float = 3 * 86400.0, x5u_miss: str = "",
               v6_prefix: int = keys.DEFAULT_V6_PREFIX) -> None:
        """Store the decision by Call-ID, count it, and let rejects/diverts nudge the caller's
        and source's reputation; deferred (no wait for the replies)."""
        t = time.time() if now is None else now
        blob = pack_decision(attempt, decision, t)
        ring = keys.decision_buckets()
        commands: list[list[Any]] = [
            ["EVALSHA", RECORD.sha, str(1 + len(ring)), keys.DECISION_SEQ, *ring,
             attempt.call_id, blob, str(keys.DECISION_BUCKET_SIZE), str(keys.DECISION_TTL)],
            ["HINCRBY", keys.STATS, f"action:{decision.action.value}", "1"],
        ]
        if decision.would is not None:  # monitor mode or opt-out: what would have been done
            commands.append(["HINCRBY", keys.STATS,
                             f"{decision.waiver}:{decision.would.value}", "1"])
        if decision.label:
            commands.append(["HINCRBY", keys.STATS, "labelled", "1"])
        if decision.rule == "score" and decision.action is not Action.RELAY:
            kind = decision.action.value  # reject | divert
            commands.append(update_command(caller_rep_key(attempt.caller_key), kind, t, half_life))
            commands.append(update_command(ip_rep_key(attempt.source_ip, v6_prefix), kind, t,
                                           half_life))
        if x5u_miss:  # for the out-of-band certificate fetcher; bounded list
            commands += [["LPUSH", keys.X5U_MISSES, x5u_miss[:500]],
                         ["LTRIM", keys.X5U_MISSES, "0", str(keys.X5U_MISSES_MAX - 1)],
                         ["EXPIRE", keys.X5U_MISSES, "3600"]]
        self._defer(commands)

    def feedback(self, *, caller_key: str, ip: str, kind: str, half_life: float,
                 now: float | None = None, v6_prefix: int = keys.DEFAULT_V6_PREFIX) -> None:
        """Reputation observation from the proxy (e.g. a call's duration); deferred."""
        t = time.time() if now is None else now
        commands = [update_command(k, kind, t, half_life)
                    for k in (caller_rep_key(caller_key) if caller_key else "",
                              ip_rep_key(ip, v6_prefix) if ip else "") if k]
        commands.append(["HINCRBY", keys.STATS, f"feedback:{kind}", "1"])
        self._defer(commands)

    def last_caller(self, callee_user: str) -> tuple[str, str] | None:
        """Who last called `callee_user` through us: (caller identity, source IP)."""
        (reply,) = self._roundtrip([["GET", last_caller_key(callee_user)]])
        if reply is None or isinstance(reply, Exception):
            return None
        caller, _, ip = _s(reply).rpartition("|")
        return (caller, ip) if caller else None

    def note_scanner(self, ip: str, ttl: int = 86400,
                     v6_prefix: int = keys.DEFAULT_V6_PREFIX) -> None:
        """Remember that `ip` (its IPv6 network) sent a scanner fingerprint (deferred)."""
        key = keys.scan_key(ip, v6_prefix)
        self._defer([["INCR", key], ["EXPIRE", key, str(ttl)],
                     ["HINCRBY", keys.STATS, "scanner_probes", "1"]])

    def count(self, field: str, n: int = 1) -> None:
        self._defer([["HINCRBY", keys.STATS, field, str(n)]])

    def count_many(self, fields: dict[str, int]) -> None:
        """Add to several counters of `spitwall stats` in one deferred write."""
        if fields:
            self._defer([["HINCRBY", keys.STATS, k, str(n)] for k, n in sorted(fields.items())])

    def versions(self) -> tuple[int, int, tuple[str | None, ...]]:
        """Config and lists versions and the watched keys (polled while the kill switch is on
        and before rare requests)."""
        replies = self._roundtrip([["MGET", keys.CONFIG_VERSION, keys.LISTS_VERSION],
                                   *[["GET", k] for k in self.watch_keys]])
        for r in replies:
            if isinstance(r, Exception):
                raise RedisUnavailable(str(r))
        cfg_v, lists_v = replies[0]
        watched = tuple(None if r is None else _s(r) for r in replies[1:])
        return int(cfg_v or 0), int(lists_v or 0), watched

    def fetch_hash(self, key: str) -> dict[bytes, bytes]:
        """HGETALL of one key (for state reloaded only when its version changed)."""
        (reply,) = self._roundtrip([["HGETALL", key]])
        if isinstance(reply, Exception):
            raise RedisUnavailable(str(reply))
        if isinstance(reply, dict):
            return dict(reply)
        return dict(zip(reply[0::2], reply[1::2], strict=True))

    def write(self, commands: Sequence[Sequence[Any]]) -> list[Exception]:
        """Send and read the replies (one round trip), for writes that must not be lost
        silently: a write into a connection whose server died is only noticed when its reply
        is read. RedisUnavailable when Redis cannot be reached or the connection fails;
        otherwise the commands' own errors (e.g. NOPERM), which retrying would not mend."""
        if not commands:
            return []
        return [r for r in self._roundtrip(commands) if isinstance(r, Exception)]

    def defer(self, commands: Sequence[Sequence[Any]]) -> None:
        """Write without waiting for the replies (they are read before the next request)."""
        self._defer(commands)

    # -- config and lists (only when their version changed) ----------------------------
    def fetch_config(self) -> Config:
        replies = self._roundtrip([["HGETALL", keys.CONFIG], ["GET", keys.CONFIG_VERSION]])
        raw_pairs, version = replies
        if isinstance(raw_pairs, Exception):
            raise RedisUnavailable(str(raw_pairs))
        if isinstance(raw_pairs, dict):
            pairs = list(raw_pairs.items())
        else:
            pairs = list(zip(raw_pairs[0::2], raw_pairs[1::2], strict=True))
        raw = {_s(k): _s(v) for k, v in pairs}
        cfg = Config.from_raw(raw, int(version or 0))
        for err in cfg.errors:
            log.error("config: %s", err)
        return cfg

    def client(self) -> redis.Redis:
        """A redis-py client on the same server(s), for rare multi-step reads."""
        if self._client is None:
            if self.pool is not None:
                self._client = redis.Redis(connection_pool=self.pool)
            else:
                self._client = redisconn.client(self.url, socket_timeout=self.timeout,
                                                socket_connect_timeout=self.timeout)
        return self._client

    def fetch_lists(self) -> ListSnapshot:
        try:
            client = self.client()
            version = int(client.get(keys.LISTS_VERSION) or 0)
            return ListSnapshot(load_lists(client), version)
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            if self._client is not None and self.cluster is not None:
                self._client.close()  # a RedisCluster keeps its own topology: start afresh
                self._client = None
            self._mark_down(exc)
            raise RedisUnavailable(str(exc)) from exc


def pack(commands: Sequence[Sequence[Any]]) -> bytes:
    """RESP-encode commands (str, bytes or int arguments) into one buffer.

    Written by hand because redis-py's general packer costs more CPU per INVITE than the rest of
    the store; our arguments are always str, bytes or int, which this handles directly.
    """
    out: list[bytes] = []
    for cmd in commands:
        out.append(b"*%d\r\n" % len(cmd))
        for arg in cmd:
            b = arg if isinstance(arg, bytes) else str(arg).encode("utf-8", "surrogateescape")
            out.append(b"$%d\r\n%b\r\n" % (len(b), b))
    return b"".join(out)


def last_caller_key(callee_user: str) -> str:
    return f"{keys.tag('last', callee_user[:RECENT_MAX_LEN] or '-')}:caller"


def _f(x: str) -> float:
    try:
        return float(x)
    except ValueError:
        return 0.0


def _s(x: Any) -> str:
    return x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)


def _number_hits(numbers: Sequence[str],
                 replies: Sequence[Any]) -> tuple[tuple[str, str, bytes], ...]:
    """(list, number, record) for every list a number is on, from one MGET per number."""
    return tuple((name, number, blob)
                 for number, found in zip(numbers, replies, strict=True)
                 for name, blob in zip(keys.NUMBER_LISTS, found, strict=True)
                 if blob is not None)


def pack_decision(attempt: CallAttempt, decision: Decision, now: float) -> bytes:
    """The stored decision record (msgpack, versioned): what `spitwall explain` shows."""
    blob: bytes = msgpack.packb({
        "v": RECORD_VERSION,
        "ts": round(now, 3),
        "call_id": attempt.call_id,
        "action": decision.action.value,
        "score": decision.score,
        "rule": decision.rule,
        "degraded": decision.degraded,
        **({"would": decision.would.value} if decision.would is not None else {}),
        **({"label": decision.label[:300]} if decision.label else {}),
        **({"waived": decision.waived[:300]} if decision.waived else {}),
        "checks": [[c.name, round(c.score, 4), c.weight, c.reason]
                   for c in decision.contributions],
        "call": {"src": f"{attempt.source_ip}:{attempt.source_port}/{attempt.transport}",
                 "from": attempt.from_uri[:256], "ruri": attempt.request_uri[:256],
                 "ua": attempt.user_agent[:128]},
    }, use_bin_type=True)
    return blob


def unpack_decision(blob: bytes) -> dict[str, Any]:
    data = msgpack.unpackb(blob, raw=False)
    if not isinstance(data, dict) or data.get("v") != RECORD_VERSION:
        raise ValueError("unknown decision record version")
    return data


def find_decision(client: redis.Redis, call_id: str) -> dict[str, Any] | None:
    """Look a decision up by Call-ID across the ring (one pipelined round trip)."""
    pipe = client.pipeline(transaction=False)
    for b in keys.decision_buckets():
        pipe.hget(b, call_id)
    for blob in pipe.execute():
        if blob:
            return unpack_decision(blob)
    return None
