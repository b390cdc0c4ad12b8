"""`spitwall deliver`: the durable delivery worker of encrypted intercept/recording events.

Why a process of its own: the proxy appends each already-encrypted event to the Redis stream
`intercept.names.EVENTS` and moves on; this worker does the slow, failure-prone part (SIP
PUBLISH to the provisioned recorder, NOTIFY to recorders that SUBSCRIBEd with ``Event: srtp``),
acknowledges an event only after a 2xx, retries with back-off, reclaims what a crashed worker
left pending, and dead-letters after ``--max-attempts`` failures. `replay` puts dead letters back.
The machinery is in `intercept.delivery`; the wire format and the rules are documented in
``docs/intercept-delivery.md``.

PUBLISH/NOTIFY go over UDP, TCP or TLS as the destination URI says (``sips:``,
``;transport=tcp|tls|udp``), and over TCP when a request is larger than ``--udp-max`` and its
URI names no transport; ``--tls-ca``/``--tls-cert``/``--tls-key`` set up (mutual) TLS.

Run: ``python -m intercept.deliver --sip-port 5070 [options]`` (Redis URL from ``--redis`` or,
to keep a password off the command line, ``$SPITWALL_REDIS``; an encrypted TLS key's password
only from ``$SPITWALL_TLS_KEY_PASSWORD``);
``python -m intercept.deliver replay [--count N]`` re-queues dead letters.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import ssl
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from intercept import names
from intercept.delivery.policy import parse_source
from intercept.delivery.worker import DeliveryWorker, Settings
from scoring import redisconn

__all__ = ["main", "replay"]

log = logging.getLogger("spitwall.deliver")

DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
#: environment variable holding the password of an encrypted --tls-key (never on argv)
TLS_KEY_PASSWORD_ENV = "SPITWALL_TLS_KEY_PASSWORD"
#: fields a dead letter adds to the event's own (dropped again on replay)
DEAD_FIELDS = ("error", "attempts")


def replay(client: redis.Redis, count: int | None = None) -> int:
    """Move up to ``count`` (None: all) entries from `names.DEAD` back to `names.EVENTS`, oldest
    first: each gets a new stream id and keeps its event id and fields (without the dead-letter
    ``error``/``attempts``), then is XDELed from DEAD. Returns how many moved. Copy before
    delete, so a failure in between leaves a duplicate (recipients drop it by event id), never a
    loss."""
    if count is not None and count < 0:
        raise ValueError("count must be >= 0")
    moved = 0
    start = "-"
    while count is None or moved < count:
        batch = 100 if count is None else min(100, count - moved)
        if batch <= 0:
            break
        rows: Any = client.xrange(names.DEAD, min=start, max="+", count=batch)
        if not rows:
            break
        pipe = client.pipeline(transaction=False)
        ids: list[Any] = []
        for sid, fields in rows:
            clean = {k: v for k, v in fields.items()
                     if (k.decode() if isinstance(k, bytes) else k) not in DEAD_FIELDS}
            pipe.xadd(names.EVENTS, clean)
            ids.append(sid)
        pipe.execute()
        client.xdel(names.DEAD, *ids)
        moved += len(ids)
        last = ids[-1].decode() if isinstance(ids[-1], bytes) else str(ids[-1])
        start = f"({last}"
    return moved


def _host_port(text: str) -> tuple[str, int]:
    try:
        return parse_source(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not IP:PORT ({exc})") from None


def _positive(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    def check(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
        return value
    return check


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="spitwall deliver",
        description="deliver encrypted intercept/recording events: SIP PUBLISH, and NOTIFY to "
                    "recorders that SUBSCRIBE with Event: srtp")
    p.add_argument("--redis", default=None,
                   help="Redis URL (default: $SPITWALL_REDIS, else " + DEFAULT_REDIS + ")")
    p.add_argument("--sip-addr", default="127.0.0.1", help="UDP address to listen on")
    p.add_argument("--sip-port", type=int, default=5070, help="UDP port (default 5070)")
    p.add_argument("--proxy", type=_host_port, default=None, metavar="IP:PORT",
                   help="the proxy's address: only SUBSCRIBEs from it may name the recorder's "
                        "real address in X-Spitwall-Source")
    p.add_argument("--consumer", default="",
                   help="consumer name in the group (default HOSTNAME-SIPPORT; keep it stable "
                        "so a restart resumes its own pending events at once)")
    p.add_argument("--max-attempts", type=_positive(int), default=8,
                   help="attempts before an event is dead-lettered (default 8)")
    p.add_argument("--backoff", type=float, default=1.0,
                   help="back-off base in seconds: waits are base*2^(n-1) (default 1)")
    p.add_argument("--backoff-max", type=float, default=60.0,
                   help="longest back-off wait in seconds (default 60)")
    p.add_argument("--claim-idle", type=_positive(float), default=60.0,
                   help="reclaim other consumers' events pending longer than this (s, default 60)")
    p.add_argument("--sip-t1", type=_positive(float), default=0.5,
                   help="SIP T1 in seconds (retransmission base, default 0.5)")
    p.add_argument("--sip-timeout", type=_positive(float), default=None,
                   help="Timer F of PUBLISH/NOTIFY in seconds (default 64*T1)")
    p.add_argument("--window", type=_positive(int), default=32,
                   help="PUBLISHes in flight per destination (default 32)")
    p.add_argument("--notify-window", type=_positive(int), default=1,
                   help="NOTIFYs in flight per LIID (default 1: a lost and retransmitted NOTIFY "
                        "can never arrive after a later one's higher CSeq)")
    p.add_argument("--lane-cap", type=_positive(int), default=1000,
                   help="events held in memory for one failing destination; more wait in the "
                        "group for a later XAUTOCLAIM (default 1000)")
    p.add_argument("--max-in-memory", type=_positive(int), default=10000,
                   help="events held in memory in all (reading pauses beyond; default 10000)")
    p.add_argument("--keep-delivered", action="store_true",
                   help="leave delivered events in the stream (default: XDEL them with the "
                        "XACK, so no ciphertext lingers in Redis)")
    p.add_argument("--expires-min", type=_positive(int), default=60)
    p.add_argument("--expires-max", type=_positive(int), default=3600)
    t = p.add_argument_group("transport (PUBLISH/NOTIFY; SUBSCRIBE is received over UDP only)")
    t.add_argument("--udp-max", type=_non_negative_int, default=1300, metavar="BYTES",
                   help="a request larger than this goes over TCP when its URI names no "
                        "transport (RFC 3261 18.1.1; default 1300, 0: never)")
    t.add_argument("--tcp-fallback-hold", type=float, default=300.0, metavar="S",
                   help="after such a TCP connect failed (the request then went over UDP), "
                        "use UDP for that destination this long (default 300)")
    t.add_argument("--connect-timeout", type=_positive(float), default=5.0, metavar="S",
                   help="TCP connect + TLS handshake timeout (default 5)")
    t.add_argument("--idle-timeout", type=_positive(float), default=60.0, metavar="S",
                   help="close a TCP/TLS connection idle this long (default 60)")
    t.add_argument("--tls-ca", type=Path, default=None, metavar="FILE",
                   help="PEM CA bundle that TLS servers are verified against (default: the "
                        "system CAs)")
    t.add_argument("--tls-cert", type=Path, default=None, metavar="FILE",
                   help="PEM client certificate chain for mutual TLS (may hold the key too)")
    t.add_argument("--tls-key", type=Path, default=None, metavar="FILE",
                   help="PEM private key of --tls-cert (if encrypted, its password from $"
                        + TLS_KEY_PASSWORD_ENV + ")")
    p.add_argument("--stats-file", type=Path, default=None,
                   help="write counters as JSON here (every second, on SIGUSR1 and at exit)")
    p.add_argument("--log-level", default="INFO")
    return p


def _replay_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="spitwall deliver replay",
                                description="re-queue dead-lettered events for delivery")
    p.add_argument("--redis", default=None)
    p.add_argument("--count", type=int, default=None, help="at most this many (default all)")
    args = p.parse_args(argv)
    url = args.redis or os.environ.get("SPITWALL_REDIS") or DEFAULT_REDIS
    try:
        client = redisconn.client(url, socket_timeout=5, socket_connect_timeout=3)
        moved = replay(client, args.count)
    except (redis.RedisError, OSError, ValueError) as exc:
        print(f"spitwall deliver replay: {exc}", file=sys.stderr)
        return 1
    print(moved)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["replay"]:
        return _replay_main(argv[1:])
    if argv[:1] == ["run"]:
        argv = argv[1:]
    args = _parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(name)s: %(message)s")
    url = args.redis or os.environ.get("SPITWALL_REDIS") or DEFAULT_REDIS
    try:
        redisconn.check_url(url)
        settings = Settings(
            redis_url=url, sip_addr=args.sip_addr, sip_port=args.sip_port, proxy=args.proxy,
            consumer=args.consumer, max_attempts=args.max_attempts, backoff=args.backoff,
            backoff_max=args.backoff_max, claim_idle=args.claim_idle, t1=args.sip_t1,
            sip_timeout=args.sip_timeout, window=args.window,
            notify_window=args.notify_window, lane_cap=args.lane_cap,
            max_in_memory=args.max_in_memory, keep_delivered=args.keep_delivered,
            expires_min=args.expires_min,
            expires_max=args.expires_max,
            expires_default=min(max(3600, args.expires_min), args.expires_max),
            stats_file=args.stats_file, udp_max=args.udp_max,
            tcp_fallback_hold=args.tcp_fallback_hold, connect_timeout=args.connect_timeout,
            idle_timeout=args.idle_timeout, tls_ca=args.tls_ca, tls_cert=args.tls_cert,
            tls_key=args.tls_key)
    except ValueError as exc:
        print(f"spitwall deliver: {exc}", file=sys.stderr)
        return 2
    try:  # bad TLS files are a start-up error, not a failure at the first TLS event
        tls = settings.tls_context(os.environ.get(TLS_KEY_PASSWORD_ENV))
    except (OSError, ssl.SSLError) as exc:
        print(f"spitwall deliver: TLS set-up: {exc}", file=sys.stderr)
        return 2

    async def run() -> None:
        client = redisconn.async_client(url, socket_timeout=5, socket_connect_timeout=3,
                                        health_check_interval=30)
        worker = DeliveryWorker(settings, client, tls=tls)
        try:
            await worker.start()
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            loop.add_signal_handler(signal.SIGUSR1, worker.write_stats)
            await stop.wait()
            log.info("stopping")
            await worker.stop()
        finally:
            await client.aclose()

    started = time.monotonic()
    try:
        asyncio.run(run())
    except OSError as exc:  # the SIP port is taken, typically
        print(f"spitwall deliver: {exc}", file=sys.stderr)
        return 1
    log.info("delivery worker stopped after %.0f s", time.monotonic() - started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
