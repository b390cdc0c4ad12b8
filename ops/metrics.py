"""`spitwall metrics`: a Prometheus exporter for the proxy's counters, the queues and the
answering machine.

Why: carriers watch their network with Prometheus, and the numbers that tell whether spitwall is
healthy (decisions, fail-open events, check errors, queue sizes, the kill switch) live in Redis,
where only someone with shell access to Redis could see them. The exporter is a custom collector
(`prometheus_client.registry.Collector`): nothing is cached, every scrape reads Redis afresh in
one short pipeline, so what Prometheus sees is what Redis holds at that moment.

Rules it keeps:

* a dead or slow Redis never fails a scrape: short socket timeouts, no retries, and the scrape
  still answers 200 with ``spitwall_redis_up 0`` and no other Redis-derived series;
* label values come from Redis hash fields and a JSON file, so they are bounded: characters
  outside ``[A-Za-z0-9_.:-]`` become ``_``, a value that had to change (or is longer than
  `MAX_LABEL`) gets a short digest of the original so two fields never merge by accident, and a
  family has at most `MAX_SERIES` series (the rest is summed into ``_other``);
* intercept activity is need-to-know (`intercept.acl`): nothing under ``spitwall:li:`` is read
  unless an intercept role's URL is given (``--li-redis``), which belongs on an exporter inside
  the LI domain only;
* the HTTP endpoint has no authentication: it listens on loopback unless told otherwise.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import re
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import redis
from prometheus_client import start_http_server
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from intercept import names
from media.queue import QUEUES, index_key
from scoring import keys, redisconn
from scoring.config import Config
from scoring.model import Action

log = logging.getLogger("spitwall.metrics")

DEFAULT_LISTEN = "127.0.0.1:9464"
#: seconds to connect to / wait for Redis in one scrape (Prometheus' default timeout is 10 s)
REDIS_TIMEOUT = 1.0
#: series per family at most (the last one is `OTHER`, the sum of what did not fit)
MAX_SERIES = 200
#: characters of a label value at most
MAX_LABEL = 64
OTHER = "_other"
#: a larger answering-machine stats file is not read (the real one is a few tens of KB)
MEDIA_STATS_MAX_BYTES = 4 << 20

_UNSAFE = re.compile(r"[^A-Za-z0-9_.:\-]")
_REDIS_DOWN = (redis.RedisError, RedisClusterException, OSError)


def label_value(text: str) -> str:
    """A label value that is safe whatever ``text`` holds: at most `MAX_LABEL` characters of
    ``[A-Za-z0-9_.:-]``; when ``text`` had to change, ``~`` and a digest of it keep the result
    apart from every other field's."""
    clean = _UNSAFE.sub("_", text)
    if clean == text and 0 < len(text) <= MAX_LABEL:
        return text
    digest = hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=4).hexdigest()
    return f"{clean[:MAX_LABEL - 9]}~{digest}"


def _text(x: Any) -> str:
    return x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)


def _number(x: Any) -> float | None:
    """A counter value (non-negative, finite) or None for anything else."""
    try:
        v = float(_text(x)) if isinstance(x, bytes | str) else float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v >= 0 else None


class Family:
    """One metric family whose label values come from data: bounded as `label_value` says,
    at most `MAX_SERIES` series, same-label samples summed (so the exposition never holds a
    duplicate series, which Prometheus would reject)."""

    def __init__(self, name: str, doc: str, label: str | None = None, *,
                 gauge: bool = False, init: Iterable[str] = ()) -> None:
        self.name, self.doc, self.label, self.gauge = name, doc, label, gauge
        self.values: dict[str, float] = dict.fromkeys(init, 0.0)
        self.folded = 0  # label values summed into OTHER

    def add(self, value: float, label: str = "") -> None:
        key = label_value(label) if self.label else ""
        self.values[key] = self.values.get(key, 0.0) + value

    def metric(self) -> Metric:
        labels = [self.label] if self.label else None
        family: CounterMetricFamily | GaugeMetricFamily = (
            GaugeMetricFamily(self.name, self.doc, labels=labels) if self.gauge
            else CounterMetricFamily(self.name, self.doc, labels=labels))
        if not self.label:
            family.add_metric([], self.values.get("", 0.0))
            return family
        values = self.values
        if len(values) > MAX_SERIES:
            # a field that is itself named OTHER is folded too, so OTHER appears once
            ordered = sorted(n for n in values if n != OTHER)
            keep, rest = ordered[:MAX_SERIES - 1], ordered[MAX_SERIES - 1:]
            self.folded = len(rest) + (OTHER in values)
            other = values.get(OTHER, 0.0) + sum(values[n] for n in rest)
            values = {**{n: values[n] for n in keep}, OTHER: other}
        for n in sorted(values):
            family.add_metric([n], values[n])
        return family


# -- the decision counters hash (scoring.keys.STATS) --------------------------------------
#: field prefix -> (family, help, label)
PREFIXED: dict[str, tuple[str, str, str]] = {
    "action:": ("spitwall_decisions",
                "Calls the proxy scored and recorded, by action (kill-switch relays and "
                "decisions whose record was lost are counted apart).", "action"),
    "monitor:": ("spitwall_monitor_would",
                 "Monitor mode (mode=monitor): calls relayed that scoring would have diverted "
                 "or rejected, by that action (they are in spitwall_decisions_total as relay).",
                 "action"),
    "optout:": ("spitwall_optout_would",
                "Callees on the optout list: calls relayed that scoring would have diverted "
                "or rejected, by that action (in spitwall_decisions_total as relay).",
                "action"),
    "feedback:": ("spitwall_feedback",
                  "Reputation feedback recorded by the proxy (call ends, in-call reports).",
                  "kind"),
    "kemi_error:": ("spitwall_kemi_errors",
                    "Exceptions caught in the Kamailio handler; the call went on unscored.",
                    "where"),
    "check_error:": ("spitwall_check_errors",
                     "Checks that raised and counted as no signal (the call was scored "
                     "without them).", "check"),
}
#: exact field -> (family, help, label, label value)
EXACT: dict[str, tuple[str, str, str | None, str]] = {}
_FAIL_OPEN = ("spitwall_fail_open",
              "Fail-open events of the Kamailio children: redis_unavailable (a round trip "
              "failed; the call was decided on local signals only), record_lost (a decision or "
              "feedback write was lost), config_reload_failed / lists_reload_failed (the child "
              "kept its previous config / lists).", "event")
for _f in ("redis_unavailable", "record_lost", "config_reload_failed", "lists_reload_failed"):
    EXACT[_f] = (*_FAIL_OPEN, _f)
_TOKENS = ("spitwall_pass_tokens",
           "Pass tokens of the answering machine presented by callers, by result.", "result")
EXACT["pass_token_accepted"] = (*_TOKENS, "accepted")
EXACT["pass_token_refused"] = (*_TOKENS, "refused")
EXACT["scanner_probes"] = ("spitwall_scanner_probes",
                           "Requests from known scanner User-Agents.", None, "")
EXACT["relay_disabled"] = ("spitwall_kill_switch_relays",
                           "Calls relayed unscored because the kill switch was off (not in "
                           "spitwall_decisions_total).", None, "")
EXACT["ring_control_stripped"] = ("spitwall_ring_control_stripped",
                                  "INVITEs whose Alert-Info / Call-Info ring control was "
                                  "removed (ring hijack).", None, "")
EXACT["emergency"] = ("spitwall_emergency_calls",
                      "Emergency calls (emergency.numbers, urn:service:sos) relayed unscored "
                      "(also in spitwall_decisions_total as relay).", None, "")
EXACT["labelled"] = ("spitwall_labelled_calls",
                     "Relayed calls that went on with a spam label (Call-Info, "
                     "label.threshold; also in spitwall_decisions_total as relay).", None, "")
EXACT["media_fallback"] = ("spitwall_divert_fallback",
                           "Diverted calls relayed to the callee because the answering machine "
                           "did not take them (media.fallback=relay).", None, "")
EXACT["flood_dropped"] = ("spitwall_flood_dropped",
                          "Requests dropped unanswered, before scoring, because their source "
                          "sent more than FLOOD_DENSITY per 2 s (flood.check).", None, "")
EXACT["dialog_timeout"] = ("spitwall_dialog_timeouts",
                           "Tracked calls that ended at the dialog timeout, not with a BYE "
                           "through the proxy (no call-duration feedback).", None, "")
UNKNOWN = ("spitwall_counter", "Counters of the stats hash that this exporter does not know "
           "by name (the field is the label).", "name")


def stats_families(raw: Mapping[Any, Any]) -> tuple[list[Family], int]:
    """The families of the stats hash, known ones with every label initialised to 0 (so the
    first increase shows in rate()); returns them and the number of fields that were not a
    counter value."""
    fams: dict[str, Family] = {
        "spitwall_decisions": Family(*PREFIXED["action:"],
                                     init=[a.value for a in Action]),
    }
    for name, doc, label in PREFIXED.values():
        fams.setdefault(name, Family(name, doc, label))
    for name, doc, exact_label, fixed in EXACT.values():
        fams.setdefault(name, Family(name, doc, exact_label))
        fams[name].values.setdefault(label_value(fixed) if exact_label else "", 0.0)
    fams[UNKNOWN[0]] = Family(*UNKNOWN)
    invalid = 0
    for k, v in raw.items():
        field, count = _text(k), _number(v)
        if count is None:
            invalid += 1
            continue
        if field in EXACT:
            name, _doc, _label, fixed = EXACT[field]
            fams[name].add(count, fixed)
            continue
        for prefix, (name, _doc, _label) in PREFIXED.items():
            if field.startswith(prefix):
                fams[name].add(count, field[len(prefix):])
                break
        else:
            fams[UNKNOWN[0]].add(count, field)
    return list(fams.values()), invalid


# -- the answering machine's stats file (media.server.AnsweringMachine.snapshot) ----------
MEDIA_COUNTERS = {
    "calls": ("spitwall_media_calls", "Calls the answering machine received."),
    "queued": ("spitwall_media_queued", "Messages stored in the spam or voicemail queue."),
    "queue_failures": ("spitwall_media_queue_failures",
                       "Messages that could not be stored (disk full, Redis error)."),
    "transfers": ("spitwall_media_transfers", "Callers judged human and transferred on."),
    "call_errors": ("spitwall_media_call_errors", "Calls that ended on an internal error."),
    "cancelled_ringing": ("spitwall_media_cancelled_ringing",
                          "Calls the caller cancelled while the machine was ringing."),
}


#: top-level numbers of the snapshot that are not counters
MEDIA_GAUGES = ("time", "active_calls")


def read_media_stats(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; OSError or ValueError when it is missing, too large or not
    a JSON object."""
    with path.open("rb") as f:
        data = f.read(MEDIA_STATS_MAX_BYTES + 1)
    if len(data) > MEDIA_STATS_MAX_BYTES:
        raise ValueError(f"larger than {MEDIA_STATS_MAX_BYTES} bytes")
    snap = json.loads(data)
    if not isinstance(snap, dict):
        raise ValueError("not a JSON object")
    return snap


def media_families(snap: Mapping[str, Any], now: float) -> list[Family]:
    """Counters and gauges of one snapshot; fields missing or of the wrong type are left out."""
    out: list[Family] = []
    when = _number(snap.get("time"))
    if when is not None:
        age = Family("spitwall_media_stats_age_seconds",
                     "Seconds since the answering machine wrote its stats file (it rewrites it "
                     "every second: a growing age means it stopped).", gauge=True)
        age.add(max(0.0, now - when))
        out.append(age)
    active = _number(snap.get("active_calls"))
    if active is not None:
        fam = Family("spitwall_media_active_calls", "Calls in progress on the answering machine.",
                     gauge=True)
        fam.add(active)
        out.append(fam)
    for field, (name, doc) in MEDIA_COUNTERS.items():
        v = _number(snap.get(field))
        if v is not None:
            fam = Family(name, doc)
            fam.add(v)
            out.append(fam)
    # a counter the answering machine gained later is exported, not dropped
    other = Family("spitwall_media_counter", "Other counters of the answering machine's stats "
                   "file (the field is the label).", "name")
    for field, value in snap.items():
        n = None if isinstance(value, bool) else _number(value)
        if n is not None and field not in MEDIA_COUNTERS and field not in MEDIA_GAUGES:
            other.add(n, str(field))
    out.append(other)
    for field, name, doc, label in (
            ("verdicts", "spitwall_media_verdicts",
             "Verdicts of the answering machine (bot, human, unsure, abandoned, ...).",
             "verdict"),
            ("sip", "spitwall_media_sip_events",
             "SIP counters of the answering machine's UAS (requests, answered, "
             "retransmissions, errors, ...).", "event")):
        table = snap.get(field)
        if isinstance(table, dict):
            fam = Family(name, doc, label)
            for k, v in table.items():
                n = _number(v)
                if n is not None:
                    fam.add(n, str(k))
            out.append(fam)
    lateness = snap.get("send_lateness")
    if isinstance(lateness, dict):
        fam = Family("spitwall_media_send_lateness_seconds",
                     "How late RTP packets left after their 20 ms deadline, over all packets "
                     "since start (quantile 1 = the maximum).", "quantile", gauge=True)
        for key, q in (("p50_ms", "0.5"), ("p99_ms", "0.99"), ("max_ms", "1")):
            ms = _number(lateness.get(key))
            if ms is not None:
                fam.add(ms / 1000.0, q)
        out.append(fam)
    return out


# -- intercept (only with --li-redis) -----------------------------------------------------
LI_COUNTERS = {
    "delivered": ("spitwall_li_events_delivered", "Intercept events delivered (2xx)."),
    "dead": ("spitwall_li_events_dead_lettered",
             "Intercept events moved to the dead-letter stream after too many failures."),
    "failed_attempts": ("spitwall_li_delivery_failed_attempts",
                        "Delivery attempts that failed (retried later)."),
    "subscribe_refused": ("spitwall_li_subscribe_refused",
                          "SUBSCRIBEs (Event: srtp) the delivery worker refused."),
}


def li_families(raw: Mapping[Any, Any]) -> list[Family]:
    fams = {k: Family(name, doc) for k, (name, doc) in LI_COUNTERS.items()}
    other = Family("spitwall_li_counter", "Delivery-worker counters this exporter does not "
                   "know by name.", "name")
    for k, v in raw.items():
        field, n = _text(k), _number(v)
        if n is None:
            continue
        if field in fams:
            fams[field].add(n)
        else:
            other.add(n, field)
    return [*fams.values(), other]


def _group(groups: Any, name: str) -> Mapping[str, Any] | None:
    if not isinstance(groups, list):
        return None
    for g in groups:
        if isinstance(g, dict):
            g = {_text(k): v for k, v in g.items()}
            if _text(g.get("name")) == name:
                return g
    return None


# -- Redis clients ------------------------------------------------------------------------
class LazyClient:
    """A client made on first use and dropped after a connection failure (a cluster client
    must reach a seed node to be made at all), so a Redis that is down when the exporter
    starts, or that moves, is found again at a later scrape."""

    def __init__(self, url: str, timeout: float) -> None:
        self.url = url
        self.timeout = timeout
        self._client: redis.Redis | None = None

    def get(self) -> redis.Redis:
        if self._client is None:
            # no retries with back-off: a refused connection must cost milliseconds, not the
            # seconds redis-py's default retry policy would spend inside one scrape
            self._client = redisconn.client(
                self.url, socket_timeout=self.timeout, socket_connect_timeout=self.timeout,
                retry=Retry(NoBackoff(), 0))
        return self._client

    def drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(*_REDIS_DOWN):
                client.close()


def _pipeline(client: redis.Redis, build: Callable[[Any], None]) -> list[Any]:
    """Run the commands ``build`` queues, in one pipeline; a command's error (NOPERM,
    WRONGTYPE) comes back in its place, a connection failure raises."""
    pipe = client.pipeline(transaction=False)
    build(pipe)
    return list(pipe.execute(raise_on_error=False))


# -- the collector ------------------------------------------------------------------------
@dataclass
class _Part:
    """What one group of replies produced (for ``spitwall_redis_read_failed``)."""

    name: str
    failed: bool = False


class SpitwallCollector(Collector):
    """Reads Redis (and the optional files) at every `collect` call; scrapes are serialised
    so a burst of them does not multiply the load on Redis."""

    def __init__(self, redis_url: str, *, media_stats: Path | None = None,
                 li_redis_url: str | None = None, timeout: float = REDIS_TIMEOUT) -> None:
        self.main = LazyClient(redis_url, timeout)
        self.li = LazyClient(li_redis_url, timeout) if li_redis_url else None
        self.media_stats = media_stats
        self._lock = threading.Lock()

    def close(self) -> None:
        self.main.drop()
        if self.li is not None:
            self.li.drop()

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            start = time.monotonic()
            metrics = [*self._main(), *self._media(), *self._intercept()]
            took = GaugeMetricFamily("spitwall_scrape_duration_seconds",
                                     "Seconds this scrape took to read Redis and the files.",
                                     value=time.monotonic() - start)
        yield from metrics
        yield took

    # -- main Redis
    def _main(self) -> list[Metric]:
        up = GaugeMetricFamily("spitwall_redis_up",
                               "1 when Redis answered this scrape's reads, else 0.", labels=[])
        try:
            replies = _pipeline(self.main.get(), queue_main_reads)
        except _REDIS_DOWN as exc:
            log.warning("Redis %s unreachable: %s", redisconn.redacted(self.main.url), exc)
            self.main.drop()
            up.add_metric([], 0)
            return [up]
        up.add_metric([], 1)
        out: list[Metric] = [up]
        stats, *rest = replies
        queue_replies, (enabled, cfg_version, lists_version) = (rest[:len(QUEUES)],
                                                                rest[len(QUEUES):])
        parts = [_Part("stats"), _Part("queues"), _Part("config")]
        if isinstance(stats, dict):
            fams, invalid = stats_families(stats)
            out += [f.metric() for f in fams]
            out.append(GaugeMetricFamily(
                "spitwall_stats_invalid_fields",
                "Fields of the stats hash whose value is not a counter (left out).",
                value=invalid))
            overflow = {f.name: f.folded for f in fams if f.folded}
            if overflow:
                out.append(_overflow_metric(overflow))
        else:
            parts[0].failed = True
            _log_reply("stats hash", stats)
        queues = Family("spitwall_queue_messages",
                        "Messages in the spam and voicemail queues.", "queue", gauge=True)
        for q, n in zip(QUEUES, queue_replies, strict=True):
            if isinstance(n, int):
                queues.add(n, q)
            else:
                parts[1].failed = True
                _log_reply(f"queue {q}", n)
        out.append(queues.metric())
        out += _config_metrics(enabled, cfg_version, lists_version, parts[2])
        failed = GaugeMetricFamily("spitwall_redis_read_failed",
                                   "1 when a part of this scrape's reads was refused (ACL) or "
                                   "found a key of the wrong type.", labels=["part"])
        for p in parts:
            failed.add_metric([p.name], int(p.failed))
        out.append(failed)
        return out

    # -- the answering machine's file
    def _media(self) -> list[Metric]:
        if self.media_stats is None:
            return []
        up = GaugeMetricFamily("spitwall_media_stats_up",
                               "1 when the answering machine's stats file was read, else 0.",
                               labels=[])
        try:
            snap = read_media_stats(self.media_stats)
        except (OSError, ValueError) as exc:
            log.warning("media stats file %s not read: %s", self.media_stats, exc)
            up.add_metric([], 0)
            return [up]
        up.add_metric([], 1)
        return [up, *(f.metric() for f in media_families(snap, time.time()))]

    # -- intercept
    def _intercept(self) -> list[Metric]:
        if self.li is None:
            return []
        up = GaugeMetricFamily("spitwall_li_redis_up",
                               "1 when the intercept Redis (--li-redis) answered, else 0.",
                               labels=[])
        try:
            stats, backlog, dead, groups = _pipeline(self.li.get(), _queue_li_reads)
        except _REDIS_DOWN as exc:
            log.warning("intercept Redis %s unreachable: %s",
                        redisconn.redacted(self.li.url), exc)
            self.li.drop()
            up.add_metric([], 0)
            return [up]
        up.add_metric([], 1)
        out: list[Metric] = [up]
        failed = False
        if isinstance(stats, dict):
            out += [f.metric() for f in li_families(stats)]
        else:
            failed = True
            _log_reply("delivery stats", stats)
        for reply, name, doc in (
                (backlog, "spitwall_li_events_backlog",
                 "Entries in the intercept event stream (not yet delivered and removed)."),
                (dead, "spitwall_li_dead_letters", "Entries in the dead-letter stream.")):
            if isinstance(reply, int):
                out.append(GaugeMetricFamily(name, doc, value=reply))
            else:
                failed = True
                _log_reply(name, reply)
        group = _group(groups, names.EVENTS_GROUP)
        for field, name, doc in (
                ("pending", "spitwall_li_events_pending",
                 "Events read by a delivery worker and not yet acknowledged."),
                ("lag", "spitwall_li_events_lag",
                 "Events no delivery worker has read yet."),
                ("consumers", "spitwall_li_delivery_consumers",
                 "Delivery workers known to the consumer group.")):
            v = _number(group.get(field)) if group is not None else None
            if v is not None:
                out.append(GaugeMetricFamily(name, doc, value=v))
        out.append(GaugeMetricFamily("spitwall_li_read_failed",
                                     "1 when a read on the intercept Redis was refused (ACL) "
                                     "or found a key of the wrong type.", value=int(failed)))
        return out


def queue_main_reads(pipe: Any) -> None:
    """The exporter's reads of the operator's Redis (one pipeline; what the metrics role
    may read, tests/unit/intercept/test_acl.py)."""
    pipe.hgetall(keys.STATS)
    for q in QUEUES:
        pipe.zcard(index_key(q))
    # the kill switch's mirror, not the config hash: the hash also holds secrets
    # (media.token_key) that have no business in the exporter
    pipe.get(keys.KILL_SWITCH)
    pipe.get(keys.CONFIG_VERSION)
    pipe.get(keys.LISTS_VERSION)


def _queue_li_reads(pipe: Any) -> None:
    pipe.hgetall(names.DELIVERY_STATS)
    pipe.xlen(names.EVENTS)
    pipe.xlen(names.DEAD)
    pipe.xinfo_groups(names.EVENTS)  # "no such key" before the worker made the group


def _config_metrics(enabled: Any, cfg_version: Any, lists_version: Any,
                    part: _Part) -> list[Metric]:
    out: list[Metric] = []
    if isinstance(enabled, Exception):
        part.failed = True
        _log_reply("config", enabled)
    else:
        # parsed as the proxy parses it (an invalid value means the default, on). No mirror yet
        # (no config change since the mirror exists): the default, on.
        cfg = Config.from_raw({} if enabled is None else {"enabled": _text(enabled)})
        out.append(GaugeMetricFamily(
            "spitwall_enabled", "The kill switch: 1 scores calls, 0 relays every call unscored.",
            value=int(bool(cfg["enabled"]))))
    for reply, name, doc in (
            (cfg_version, "spitwall_config_version",
             "Version of the live config (bumped by every change)."),
            (lists_version, "spitwall_lists_version",
             "Version of the allow/block/scanner lists (bumped by every change).")):
        v = None if isinstance(reply, Exception) else _number(reply or 0)
        if v is None:
            part.failed = True
            _log_reply(name, reply)
        else:
            out.append(GaugeMetricFamily(name, doc, value=v))
    return out


def _overflow_metric(overflow: Mapping[str, int]) -> Metric:
    fam = GaugeMetricFamily("spitwall_label_overflow",
                            f"Label values summed into {OTHER!r} because their family had more "
                            f"than {MAX_SERIES} series.", labels=["family"])
    for name, n in sorted(overflow.items()):
        fam.add_metric([name], n)
    return fam


def _log_reply(what: str, reply: Any) -> None:
    log.warning("%s: unexpected Redis reply: %s", what, str(reply)[:200])


# -- serving ------------------------------------------------------------------------------
def serve(collector: SpitwallCollector, host: str, port: int,
          ready: Callable[[str], None] = print) -> None:
    """Serve ``/metrics`` on host:port until SIGTERM or SIGINT; OSError when it cannot bind.
    ``ready`` gets the URL once the socket listens."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        httpd, _thread = start_http_server(port, host, registry=registry)
        try:
            bound = httpd.server_address[1]
            shown = f"[{host}]" if ":" in host else host
            ready(f"http://{shown}:{bound}/metrics")
            while not stop.wait(1.0):
                pass
        finally:
            httpd.shutdown()
            httpd.server_close()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        collector.close()
