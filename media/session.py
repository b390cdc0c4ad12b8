"""The media plane of one answering-machine call: greeting out, caller audio in, verdict.

Independent of SIP: the server answers the call, binds an `RtpChannel`, and hands it to
`CallSession.run()`, which plays the greeting and the beep at 20 ms pacing (deadlines on the
event loop's monotonic clock, so timing does not drift with load), feeds every received frame,
stamped with its arrival time relative to the start of the greeting, to the speech-energy test
(`media.detector.SpeechTest`), collects RFC 4733 digits for the CAPTCHA, and records what the
caller says (bounded to `record_seconds`). The outcome tells the server what to do next.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import secrets
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
import numpy.typing as npt

from media import g711
from media.audio import default_prompts, load_pcm
from media.detector import SpeechKind, SpeechTest, SpeechVerdict
from media.rtp import (
    DtmfCollector,
    DtmfEvent,
    MediaClock,
    RtpPacket,
    RtpSender,
    SeqStatus,
    SsrcTracker,
)
from media.sdp import Codec

log = logging.getLogger("spitwall.media.session")

FRAME = 160  # samples per 20 ms at 8 kHz
FRAME_S = 0.02
RATE = 8000
Pcm = npt.NDArray[np.int16]


@dataclass(frozen=True)
class Prompts:
    """Greeting, beep and CAPTCHA digit prompts (8 kHz mono PCM)."""

    greeting: Pcm
    beep: Pcm
    digits: dict[str, Pcm]

    @classmethod
    def load(cls, directory: str | Path) -> Prompts:
        paths = default_prompts(directory)
        return cls(load_pcm(paths["greeting"]), load_pcm(paths["beep"]),
                   {str(d): load_pcm(paths[f"digit{d}"]) for d in range(10)})


@dataclass(frozen=True)
class SessionConfig:
    captcha: str = "unsure"  # off | unsure | always
    listen_after_ms: int = 3000
    captcha_wait_ms: int = 6000
    record_seconds: int = 30
    no_rtp_wait_ms: int = 4000


@dataclass
class Outcome:
    verdict: SpeechVerdict
    captcha: str = "not run"  # not run | passed | failed
    digits: str = ""
    recording: bytearray = field(default_factory=bytearray)
    rtp_received: int = 0
    rtp_garbage: int = 0
    ended_by_caller: bool = False

    @property
    def kind(self) -> str:
        """bot | human | unsure, after the CAPTCHA if one ran."""
        if self.captcha == "passed":
            return "human"
        if self.captcha == "failed":
            return "bot"
        return self.verdict.kind.value


class Pacer:
    """Every call's outgoing RTP deadlines in one heap, served as early as the loop allows.

    Why: a burst of incoming packets (a caller's RTP stack often sends all its streams on one
    20 ms tick) queues a hundred decode-and-analyse steps in the event loop, and a timer that
    falls due behind them waits for all of them. Here an overdue packet is sent by whichever
    callback runs first: the pacer's own timer, any received datagram, any analysis step
    (`run_due`). Lateness is then bounded by one step, not by the backlog.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")

    def at(self, deadline: float, fn: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (deadline, self._seq, fn))
        self._arm()

    def run_due(self) -> None:
        """Send everything due now (cheap when nothing is: one clock read)."""
        if not self._heap or self._heap[0][0] > self.loop.time():
            return
        now = self.loop.time()
        while self._heap and self._heap[0][0] <= now:
            _, _, fn = heapq.heappop(self._heap)
            try:
                fn()
            except Exception:  # one call's send must not stop the others
                log.exception("RTP send failed")
        self._arm()

    def _fire(self) -> None:
        self._timer, self._timer_at = None, float("inf")
        self.run_due()
        self._arm()  # also when nothing was due (another callback sent it first)

    def _arm(self) -> None:
        if not self._heap:
            return
        first = self._heap[0][0]
        if first < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_at(first, self._fire)
            self._timer_at = first


_PACERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Pacer] = \
    weakref.WeakKeyDictionary()


def pacer_for(loop: asyncio.AbstractEventLoop) -> Pacer:
    """The pacer of this event loop (one per loop, made on first use)."""
    pacer = _PACERS.get(loop)
    if pacer is None:
        pacer = _PACERS[loop] = Pacer(loop)
    return pacer


class RtpChannel(asyncio.DatagramProtocol):
    """One call's RTP socket: decodes the agreed codec, collects DTMF, sends our stream.

    The far end is the address in the SDP offer; like most media servers we also latch onto the
    address the caller's RTP actually comes from (symmetric RTP, for NAT). Garbage, other
    payload types and oversized packets are counted and dropped.
    """

    def __init__(self, codec: Codec, remote: tuple[str, int]) -> None:
        self.codec = codec
        self.remote = remote
        self.transport: asyncio.DatagramTransport | None = None
        # (arrival, SSRC, RTP timestamp, audio) of every audio packet, in arrival order
        self.frames: asyncio.Queue[tuple[float, int, int, Pcm]] = asyncio.Queue(maxsize=500)
        self.digits: asyncio.Queue[str] = asyncio.Queue(maxsize=32)
        self.dtmf = DtmfCollector()
        self.tracker = SsrcTracker()
        self.received = 0
        self.garbage = 0
        self.latched = False
        self._g711 = codec.g711_type
        self._loop = asyncio.get_event_loop()

    def set_codec(self, codec: Codec) -> None:
        """Fix the codec once the SDP answer is known (the socket is bound before it)."""
        self.codec = codec
        self._g711 = codec.g711_type

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        pacer_for(self._loop).run_due()  # overdue sends first
        try:
            pkt = RtpPacket.parse(data)
        except ValueError:
            self.garbage += 1
            return
        if not self.latched:
            self.remote, self.latched = (addr[0], addr[1]), True
        if self.tracker.observe(pkt.ssrc, pkt.sequence) in (SeqStatus.DUPLICATE, SeqStatus.STALE):
            return
        if pkt.payload_type == self.codec.payload_type and self._g711 is not None:
            self.received += 1
            try:
                pcm = g711.decode(self._g711, pkt.payload)
            except ValueError:
                self.garbage += 1
                return
            if not self.frames.full():
                self.frames.put_nowait((self._loop.time(), pkt.ssrc, pkt.timestamp, pcm))
        elif self.codec.dtmf_pt is not None and pkt.payload_type == self.codec.dtmf_pt:
            try:
                digit = self.dtmf.feed(pkt.timestamp, DtmfEvent.parse(pkt.payload), pkt.marker)
            except ValueError:
                self.garbage += 1
                return
            if digit and not self.digits.full():
                self.digits.put_nowait(digit)
        else:
            self.garbage += 1

    def send(self, packet: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(packet, self.remote)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class TimedFeed:
    """Feeds the caller's audio to a `SpeechTest`, placed in time by its RTP timestamps.

    Arrival times are taken when this process's event loop gets round to a packet; a loop that
    stalls (a busy CPU, another call's work) takes a burst of packets in at once, and 300 ms of
    the caller's audio would land on one 20 ms slot of the test: a "hello?" said 0.3 s into the
    greeting would look like speech under way when it started. `MediaClock` spreads a burst
    back over the time its timestamps cover, but only once it has seen the burst's last
    packet; so each packet is held until a packet that arrived `delay` seconds after it has
    been seen (or `flush`), then placed with what the clock knows by then.
    """

    def __init__(self, test: SpeechTest, t0: float, delay: float = 0.1) -> None:
        self.test = test
        self.t0 = t0
        self.delay = delay
        self.clock = MediaClock(RATE)
        self._pending: deque[tuple[float, int, int, Pcm]] = deque()  # arrival, run, ext, pcm

    def add(self, arrival: float, ssrc: int, timestamp: int, pcm: Pcm) -> None:
        run, ext = self.clock.observe(arrival, ssrc, timestamp)
        self._pending.append((arrival, run, ext, pcm))
        self._release(arrival - self.delay)

    def flush(self) -> None:
        """Place everything held (before asking the test for its result)."""
        self._release(None)

    def _release(self, until: float | None) -> None:
        while self._pending and (until is None or self._pending[0][0] <= until):
            arrival, run, ext, pcm = self._pending.popleft()
            at = self.clock.time(run, ext)
            self.test.add_frame(((arrival if at is None else at) - self.t0) * 1000.0, pcm)


class CallSession:
    """Runs the hidden Turing test (and the CAPTCHA) on one answered call."""

    def __init__(self, channel: RtpChannel, prompts: Prompts, cfg: SessionConfig) -> None:
        self.ch = channel
        self.prompts = prompts
        self.cfg = cfg
        g = channel.codec.g711_type
        if g is None:
            raise ValueError(f"codec {channel.codec.name} is not G.711")
        self.g711_type = g
        self.sender = RtpSender(channel.codec.payload_type)
        self.hangup = asyncio.Event()
        self.recording = bytearray()
        self.max_record = cfg.record_seconds * 8000 * 2
        self.jitter: list[float] = []  # send lateness, seconds

    async def _play(self, pcm: Pcm, start: float | None = None) -> float:
        """Send `pcm` as 20 ms packets on absolute deadlines; returns the end deadline.

        Each packet is sent by the loop's `Pacer` (a callback that schedules the next one), not
        by a coroutine that sleeps: with 100 calls that is 5,000 sends a second, and the pacer
        sends an overdue packet from whatever callback runs first. A hangup stops the chain."""
        loop = asyncio.get_running_loop()
        t0 = loop.time() if start is None else start
        n = (len(pcm) + FRAME - 1) // FRAME
        padded = np.zeros(n * FRAME, dtype=np.int16)
        padded[: len(pcm)] = pcm
        encoded = g711.encode(self.g711_type, padded)
        done: asyncio.Future[None] = loop.create_future()

        def send(i: int) -> None:
            if done.done():
                return
            if i >= n or self.hangup.is_set():
                done.set_result(None)
                return
            deadline = t0 + i * FRAME_S
            self.jitter.append(max(0.0, loop.time() - deadline))
            try:
                self.ch.send(self.sender.next_packet(encoded[i * FRAME:(i + 1) * FRAME]))
            except Exception as exc:  # a send error ends the prompt, not the event loop
                done.set_exception(exc)
                return
            pacer.at(deadline + FRAME_S, lambda: send(i + 1))

        pacer = pacer_for(loop)
        pacer.at(t0, lambda: send(0))
        hangup = asyncio.ensure_future(self.hangup.wait())
        try:
            await asyncio.wait((done, hangup), return_when=asyncio.FIRST_COMPLETED)
        finally:
            hangup.cancel()
        if not done.done():
            done.set_result(None)  # hung up: the chain stops at its next callback
        elif done.exception() is not None:
            raise cast(BaseException, done.exception())
        return t0 + n * FRAME_S

    async def _silence(self, ms: int, start: float) -> float:
        return await self._play(np.zeros(int(ms * 8), dtype=np.int16), start)

    async def _consume(self, feed: TimedFeed) -> None:
        pacer = pacer_for(asyncio.get_running_loop())
        while True:
            arrival, ssrc, timestamp, pcm = await self.ch.frames.get()
            pacer.run_due()  # overdue sends before this frame's analysis
            feed.add(arrival, ssrc, timestamp, pcm)
            if len(self.recording) < self.max_record:
                self.recording += pcm.astype("<i2").tobytes()

    async def run(self) -> Outcome:
        loop = asyncio.get_running_loop()
        greet_ms = int(len(self.prompts.greeting) / 8)
        beep_ms = int(len(self.prompts.beep) / 8)
        test = SpeechTest(greet_ms, beep_ms, self.cfg.listen_after_ms)
        t0 = loop.time()
        feed = TimedFeed(test, t0)
        consumer = asyncio.create_task(self._consume(feed))
        try:
            t = await self._play(self.prompts.greeting, t0)
            t = await self._play(self.prompts.beep, t)
            await self._silence(self.cfg.listen_after_ms, t)
            await asyncio.sleep(0.05)  # let the last frames in
            feed.flush()
            verdict = test.result()
            out = Outcome(verdict)
            run_captcha = self.cfg.captcha == "always" or (
                self.cfg.captcha == "unsure" and verdict.kind is SpeechKind.UNSURE)
            if run_captcha and not self.hangup.is_set():
                await self._captcha(out)
            return out
        finally:
            consumer.cancel()
            out_rx = self.ch.received
            log.debug("session done: %d RTP packets received", out_rx)

    async def _captcha(self, out: Outcome) -> None:
        digit = str(secrets.randbelow(10))
        while not self.ch.digits.empty():
            self.ch.digits.get_nowait()
        await self._play(self.prompts.digits[digit])
        try:
            got = await asyncio.wait_for(self.ch.digits.get(), self.cfg.captcha_wait_ms / 1000)
        except TimeoutError:
            got = ""
        out.digits = got
        out.captcha = "passed" if got == digit else "failed"

    async def record(self, seconds: float, *, beep: bool = True,
                     fresh: bool = True) -> bytearray:
        """Record the caller (after a beep) until `seconds`, the size bound, or hang-up.

        `fresh` starts a new message (a voicemail: what was heard during the greeting is not
        part of it); without it the recording continues the one made since the greeting
        started (a bot's message that began over the greeting)."""
        loop = asyncio.get_running_loop()
        if fresh:
            self.recording = bytearray()
            while not self.ch.frames.empty():  # frames queued before the beep
                self.ch.frames.get_nowait()
        if beep:
            await self._play(self.prompts.beep)
        end = loop.time() + seconds
        t = loop.time()
        while loop.time() < end and not self.hangup.is_set() \
                and len(self.recording) < self.max_record:
            try:
                *_, pcm = await asyncio.wait_for(self.ch.frames.get(), 0.2)
            except TimeoutError:
                pass
            else:
                self.recording += pcm.astype("<i2").tobytes()
            if loop.time() - t >= FRAME_S:  # keep our stream alive (comfort silence)
                t = await self._silence(20, loop.time())
        return self.recording
