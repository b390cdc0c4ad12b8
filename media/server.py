"""The phase-2 answering machine: SIP UAS + media sessions + outcomes (`spitwall media`).

Kamailio diverts suspicious calls here. For each call: answer (PCMU/PCMA; with `--ring-ms`,
after a 180 Ringing and that long a wait, during which a CANCEL ends the call with 487 and
nothing else happens), run the hidden Turing test and, as configured, the DTMF CAPTCHA
(`media.session`), then act on the verdict:
- bot: keep recording the caller's message (up to `media.record_seconds`), put it in the spam
  queue with caller, callee, time, phase-1 score, phase-2 features and verdict, feed the `bot`
  verdict into the caller's and source's reputation, hang up;
- human: feed `human` into reputation and REFER the caller to the original callee with a pass
  token (`scoring.passtoken`) that the proxy accepts, so the new INVITE skips phase 2; when the
  REFER is refused or the transfer fails, record a voicemail for the callee instead;
- unsure (no CAPTCHA): record a voicemail, no reputation change.
Everything runs on one asyncio loop; blocking work (Redis, files) goes to threads.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import secrets
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import redis

from media.queue import MessageQueue, QueueFull
from media.sdp import SessionDescription, answer_for
from media.session import CallSession, Outcome, Prompts, RtpChannel, SessionConfig
from media.sip import NameAddr, ServerCall, SipUas, UasConfig
from media.statsfile import write_stats_file
from scoring import config_admin, passtoken, redisconn, reputation
from scoring.config import Config
from scoring.model import caller_identity

log = logging.getLogger("spitwall.media")

MAX_RING_MS = 60_000  # --ring-ms: callers give up after about a minute of ringing anyway


@dataclass
class CallInfo:
    """Who called whom, as the proxy told us on the diverted INVITE."""

    caller_uri: str
    caller_key: str
    callee_user: str
    callee_host: str
    source_ip: str
    phase1_score: float | None

    @classmethod
    def from_call(cls, call: ServerCall) -> CallInfo:
        inv = call.invite
        try:
            frm = inv.from_addr.sip_uri
            user, host = frm.user or "", frm.host
        except ValueError:  # a scheme we cannot read: still a caller, with no identity
            user, host = "", ""
        divs = inv.values("Diversion")
        callee_user, callee_host, score = "", "", None
        if divs:
            try:
                na = NameAddr.parse(divs[0])
                u = na.sip_uri
                callee_user = u.user or ""
                callee_host = f"{u.host}:{u.port}" if u.port else u.host
                raw = na.param("spitwall-score")
                score = float(raw) if raw else None
            except ValueError:
                pass
        src = (inv.get("X-Spitwall-Source") or "").strip()[:64]
        return cls(str(inv.get("From") or "")[:256], caller_identity(user, host),
                   callee_user[:64], callee_host[:128], src, score)


@dataclass
class Settings:
    sip_addr: str = "127.0.0.1"
    sip_port: int = 5090
    queue_dir: Path = Path(".lab/queue")
    prompts_dir: Path = Path(".lab/prompts")
    max_calls: int = 150
    transfer_timeout: float = 10.0
    #: where to write `AnsweringMachine.snapshot()` as JSON (every `stats_interval` s, on SIGUSR1
    #: and at exit); None: nowhere
    stats_file: Path | None = None
    stats_interval: float = 1.0
    #: ring this long (180 Ringing, then wait) before answering; 0: answer at once, no 180.
    #: A CANCEL (or the caller's BYE) meanwhile ends the call: 200 for the CANCEL, 487 for
    #: the INVITE (`media.sip`), and no session, verdict, queue entry or feedback.
    ring_ms: int = 0
    #: where RTP sockets bind, at most one address per family (default: `sip_addr`). A caller's
    #: stream is served from the address of its offer's family: a dual-stack machine lists an
    #: IPv4 and an IPv6 address; an offer of a family it has no address for gets 488.
    rtp_addrs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0 <= self.ring_ms <= MAX_RING_MS:
            raise ValueError(f"ring_ms must be within 0-{MAX_RING_MS}")
        addrs = self.rtp_addrs or (self.sip_addr,)
        try:
            parsed = [ipaddress.ip_address(a) for a in addrs]
        except ValueError as exc:
            raise ValueError(f"RTP address: {exc}") from None
        if len({ip.version for ip in parsed}) != len(parsed):
            raise ValueError("at most one RTP address per address family")
        self.rtp_addrs = tuple(str(ip) for ip in parsed)

    def rtp_addr_for(self, remote: str) -> str | None:
        """The local RTP address for a stream to `remote` (an offer's c= address): the one of
        the same family; a host name gets the first address; None: no address of that family."""
        try:
            version = ipaddress.ip_address(remote).version
        except ValueError:
            return self.rtp_addrs[0]
        return next((a for a in self.rtp_addrs if ipaddress.ip_address(a).version == version),
                    None)


@dataclass
class Stats:
    calls: int = 0
    verdicts: dict[str, int] = field(default_factory=dict)
    queued: int = 0
    queue_failures: int = 0
    transfers: int = 0
    call_errors: int = 0
    cancelled_ringing: int = 0  # calls the caller cancelled while we rang (--ring-ms)
    #: offers whose media address family we have no RTP address for (488; see --rtp-addr)
    no_rtp_family: int = 0


class SendJitter:
    """RTP send lateness (how late each packet left after its 20 ms deadline), bounded memory.

    All packets of all finished calls go into a histogram of 0.1 ms bins (the last bin holds
    everything from `MAX_MS` on), so percentiles over all packets cost nothing to keep; the
    last `KEEP_CALLS` calls also keep their own p50/p99/max.
    """

    BIN_MS = 0.1
    MAX_MS = 200.0
    KEEP_CALLS = 1000

    def __init__(self) -> None:
        self.bins = [0] * (int(self.MAX_MS / self.BIN_MS) + 1)
        self.packets = 0
        self.max_ms = 0.0
        self.calls: deque[dict[str, float]] = deque(maxlen=self.KEEP_CALLS)

    def add_call(self, lateness_s: list[float]) -> None:
        if not lateness_s:
            return
        ms = sorted(x * 1000.0 for x in lateness_s)
        last = len(self.bins) - 1
        for v in ms:
            self.bins[min(last, int(v / self.BIN_MS))] += 1
        self.packets += len(ms)
        self.max_ms = max(self.max_ms, ms[-1])
        self.calls.append({"packets": len(ms), "p50_ms": round(ms[len(ms) // 2], 3),
                           "p99_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 3),
                           "max_ms": round(ms[-1], 3)})

    def percentile(self, q: float) -> float | None:
        """Upper edge of the bin holding the q-quantile (ms), None before any packet."""
        if not self.packets:
            return None
        rank = max(1, int(q * self.packets + 0.999999))
        seen = 0
        for i, n in enumerate(self.bins):
            seen += n
            if seen >= rank:
                return min(round((i + 1) * self.BIN_MS, 3), round(self.max_ms, 3))
        return round(self.max_ms, 3)

    def as_dict(self) -> dict[str, Any]:
        return {"packets": self.packets, "calls": len(self.calls),
                "p50_ms": self.percentile(0.5), "p99_ms": self.percentile(0.99),
                "max_ms": round(self.max_ms, 3), "per_call": list(self.calls)}


class AnsweringMachine:
    def __init__(self, settings: Settings, client: redis.Redis) -> None:
        self.s = settings
        self.client = client
        self.queue = MessageQueue(client, settings.queue_dir)
        self.prompts = Prompts.load(settings.prompts_dir)
        self.config = Config.defaults()
        self.stats = Stats()
        self.send_jitter = SendJitter()
        self.uas = SipUas(self._on_invite, config=UasConfig(max_calls=settings.max_calls,
                                                            overload_status=486))
        self._tasks: set[asyncio.Task[None]] = set()
        self._background = 0  # tasks in _tasks that are not calls

    async def start(self) -> None:
        self.queue.clean_partial()
        await self._reload_config()
        await self.uas.start(self.s.sip_addr, self.s.sip_port)
        self._spawn(self._config_loop())
        self._background += 1
        if self.s.stats_file is not None:
            self._spawn(self._stats_loop())
            self._background += 1
        log.info("answering machine on %s:%d", self.s.sip_addr, self.s.sip_port)

    async def _reload_config(self) -> None:
        try:
            cfg, _raw = await asyncio.to_thread(config_admin.show, self.client)
            self.config = cfg
        except redis.RedisError as exc:
            log.warning("config reload failed (keeping the last one): %s", exc)

    async def _config_loop(self) -> None:
        while True:
            await asyncio.sleep(2.0)
            await self._reload_config()

    def snapshot(self) -> dict[str, Any]:
        """Counters for operators and benchmarks (JSON-ready)."""
        st = self.stats
        return {"time": time.time(), "active_calls": len(self._tasks) - self._background,
                "calls": st.calls, "verdicts": dict(st.verdicts), "queued": st.queued,
                "queue_failures": st.queue_failures, "transfers": st.transfers,
                "call_errors": st.call_errors, "cancelled_ringing": st.cancelled_ringing,
                "no_rtp_family": st.no_rtp_family,
                "sip": self.uas.stats.as_dict(),
                "send_lateness": self.send_jitter.as_dict()}

    def write_stats(self) -> None:
        if self.s.stats_file is not None:
            write_stats_file(self.s.stats_file, self.snapshot())

    async def _stats_loop(self) -> None:
        while True:
            self.write_stats()
            await asyncio.sleep(self.s.stats_interval)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_invite(self, call: ServerCall) -> None:
        self.stats.calls += 1
        self._spawn(self._handle(call))

    async def _handle(self, call: ServerCall) -> None:
        channel: RtpChannel | None = None
        session: CallSession | None = None
        try:
            offer_text = call.sdp_offer
            if not offer_text:
                call.reject(488, "Not Acceptable Here")
                return
            try:
                offer = SessionDescription.parse(offer_text)
                audio = next(m for m in offer.media if m.media == "audio" and m.port)
                remote_ip = audio.connection_address or ""
            except (ValueError, StopIteration):
                call.reject(488, "Not Acceptable Here")
                return
            rtp_addr = self.s.rtp_addr_for(remote_ip)
            if rtp_addr is None:  # e.g. an IPv6 caller and no IPv6 --rtp-addr
                self.stats.no_rtp_family += 1
                log.warning("no RTP address of the family of %s (add --rtp-addr): 488",
                            remote_ip[:64])
                call.reject(488, "Not Acceptable Here")
                return
            loop = asyncio.get_running_loop()
            await self._reload_config()  # phase 2 is not latency-bound: always the live config
            # bind the RTP socket first: the answer must carry its port
            _t, proto = await loop.create_datagram_endpoint(
                lambda: RtpChannel(_PENDING_CODEC, (remote_ip, audio.port)),
                local_addr=(rtp_addr, 0))
            channel = proto
            port = _t.get_extra_info("sockname")[1]
            try:
                answer, codec = answer_for(offer, rtp_addr, port,
                                           session_id=secrets.randbits(31))
            except ValueError:
                call.reject(488, "Not Acceptable Here")
                return
            channel.set_codec(codec)
            acked = asyncio.Event()
            call.on_ack = lambda _c: acked.set()
            call.on_end = lambda _c, _r: acked.set()  # caller gone or no ACK: stop waiting
            call.set_time_limit(float(self.config["media.max_call_seconds"]))
            if not await self._ring(call):
                return
            if not call.answer(answer):
                return
            await acked.wait()
            if not call.active or call.ack is None:
                return
            info = CallInfo.from_call(call)
            session = CallSession(channel, self.prompts, SessionConfig(
                captcha=str(self.config["media.captcha"]),
                record_seconds=int(self.config["media.record_seconds"])))
            call.on_bye = lambda _c: session.hangup.set()
            call.on_end = lambda _c, _r: session.hangup.set()
            outcome = await session.run()
            await self._conclude(call, session, outcome, info)
        except Exception:  # one call's bug must not stop the server: logged, counted
            self.stats.call_errors += 1
            log.exception("call %s failed", call.call_id)
        finally:
            if session is not None:
                self.send_jitter.add_call(session.jitter)
            if channel is not None:
                channel.close()
            if call.active:
                call.bye()

    async def _ring(self, call: ServerCall) -> bool:
        """With a ring delay: send 180 Ringing and wait `ring_ms`, or less if the caller
        cancels (the UAS answers the CANCEL and the INVITE itself). True: go on and answer."""
        if self.s.ring_ms <= 0:
            return True  # no 180: through a multi-worker proxy it could overtake the 200
        if not call.ringing():
            return False
        await asyncio.wait({call.ended}, timeout=self.s.ring_ms / 1000)
        if not call.active:
            self.stats.cancelled_ringing += 1
            return False
        return True

    async def _conclude(self, call: ServerCall, session: CallSession, outcome: Outcome,
                        info: CallInfo) -> None:
        kind = outcome.kind
        self.stats.verdicts[kind] = self.stats.verdicts.get(kind, 0) + 1
        meta = {"caller": info.caller_uri, "caller_key": info.caller_key,
                "callee": info.callee_user, "source_ip": info.source_ip,
                "phase1_score": info.phase1_score, "verdict": kind,
                "confidence": outcome.verdict.confidence, "captcha": outcome.captcha,
                "features": outcome.verdict.features, "call_id": call.call_id[:256]}
        if kind == "bot":
            await self._feedback(info, "bot")
            remaining = float(self.config["media.record_seconds"]) - len(session.recording) / 16000
            if remaining > 0 and not session.hangup.is_set():
                await session.record(remaining, beep=False, fresh=False)
            await self._store("spam", session.recording, meta)
            return
        if kind == "human":
            await self._feedback(info, "human")
            if await self._transfer(call, info):
                return
            meta["transfer"] = "failed"
        if session.hangup.is_set() and not session.recording:
            self.stats.verdicts["abandoned"] = self.stats.verdicts.get("abandoned", 0) + 1
            return  # the caller left before saying anything: nothing to keep
        await session.record(float(self.config["media.record_seconds"]))
        await self._store("voicemail", session.recording, meta)

    async def _transfer(self, call: ServerCall, info: CallInfo) -> bool:
        key = str(self.config["media.token_key"])
        if not key or not info.callee_user or not info.callee_host:
            return False
        token = passtoken.issue(key, info.caller_key, info.callee_user,
                                float(self.config["media.token_ttl"]))
        target = f"sip:{quote(info.callee_user, safe='+')}@{info.callee_host}" \
                 f"?X-Spitwall-Pass={quote(token, safe='')}"
        try:
            status = await asyncio.wait_for(call.refer(target), self.s.transfer_timeout)
            if not 200 <= status < 300 or call.transfer is None:
                return False
            final = await asyncio.wait_for(call.transfer, self.s.transfer_timeout)
        except (TimeoutError, ValueError):
            return False
        ok = 200 <= final < 300
        if ok:
            self.stats.transfers += 1
        return ok

    async def _feedback(self, info: CallInfo, kind: str) -> None:
        try:
            await asyncio.to_thread(
                reputation.apply_feedback, self.client, caller=info.caller_key,
                ip=info.source_ip, kind=kind,
                half_life=self.config.get_float("reputation.half_life"),
                v6_prefix=self.config.v6_prefix)
        except (redis.RedisError, ValueError) as exc:
            log.warning("reputation feedback lost: %s", exc)

    async def _store(self, queue: str, pcm: bytearray, meta: dict[str, Any]) -> None:
        try:
            await asyncio.to_thread(self.queue.store, queue, bytes(pcm), meta)
            self.stats.queued += 1
        except (QueueFull, OSError, redis.RedisError) as exc:
            self.stats.queue_failures += 1
            log.error("message not queued: %s", exc)

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        self.write_stats()
        self.uas.close()


class _PendingCodec:
    """Stand-in until the SDP answer fixes the codec (no packet is decoded before that)."""

    payload_type = -1
    name = "pending"
    dtmf_pt = None
    g711_type = None


_PENDING_CODEC: Any = _PendingCodec()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="spitwall media", description="phase-2 answering machine")
    p.add_argument("--redis", default=os.environ.get("SPITWALL_REDIS",
                                                     "redis://127.0.0.1:6379/0"))
    p.add_argument("--sip-addr", default="127.0.0.1")
    p.add_argument("--sip-port", type=int, default=5090)
    p.add_argument("--queue-dir", type=Path, default=Path(".lab/queue"))
    p.add_argument("--prompts-dir", type=Path, default=Path(".lab/prompts"))
    p.add_argument("--max-calls", type=int, default=150)
    p.add_argument("--ring-ms", type=int,
                   default=os.environ.get("SPITWALL_MEDIA_RING_MS") or "0",
                   help="send 180 Ringing and wait this long before answering (a CANCEL "
                        "meanwhile gets 487); 0 (default): answer at once "
                        "(default from $SPITWALL_MEDIA_RING_MS)")
    p.add_argument("--rtp-addr", action="append", default=[], metavar="ADDR",
                   help="bind RTP here (default: --sip-addr); give an IPv4 and an IPv6 address "
                        "to serve callers of both families")
    p.add_argument("--stats-file", type=Path, default=None,
                   help="write counters and RTP send lateness here as JSON (every second, "
                        "on SIGUSR1 and at exit)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        settings = Settings(args.sip_addr, args.sip_port, args.queue_dir, args.prompts_dir,
                            args.max_calls, stats_file=args.stats_file, ring_ms=args.ring_ms,
                            rtp_addrs=tuple(args.rtp_addr))
    except ValueError as exc:
        p.error(str(exc))
    client = redisconn.client(args.redis, socket_timeout=2, socket_connect_timeout=2)

    async def run() -> None:
        am = AnsweringMachine(settings, client)
        await am.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGUSR1, am.write_stats)
        await stop.wait()
        await am.close()

    started = time.monotonic()
    asyncio.run(run())
    log.info("answering machine stopped after %.0f s", time.monotonic() - started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
