"""RTP (RFC 3550) packets, RFC 4733 DTMF events, a sender's stream state and a receiver's
sequence/SSRC tracker: the wire layer of the answering machine.

Why hand-written: what the answering machine needs is a 12-byte header, a DTMF payload of four
bytes and some sequence-number arithmetic. The RTP code on PyPI is either part of a whole WebRTC
stack (``aiortc``: ICE, DTLS, codecs through PyAV) or covers the header alone (``rtp`` 0.0.4,
December 2023: mutable packet objects, no RFC 4733 events, no sequence tracking, no documented
behaviour on malformed input). Owning these few hundred lines lets every parse failure be a
`ValueError` with a precise message, which is what the receive loop counts and drops.

* `RtpPacket.parse` accepts exactly what RFC 3550 §5.1 allows (version 2, CSRC list, header
  extension, padding) and refuses, with `ValueError`: packets under 12 bytes or over
  `MAX_PACKET` (1500) bytes, another version, a CSRC list or header extension running past the
  end, a padding count of zero or larger than what follows the header. `serialize` is its
  inverse (padding bytes are written as zeros followed by the count).
* `DtmfEvent` is the 4-byte RFC 4733 §2.3 telephone-event payload; `DtmfCollector` turns the
  packet stream of key presses into digits: one digit per event, however many intermediate and
  repeated end packets the sender emits, keyed by the event's RTP timestamp (§2.5.1.2: all
  packets of one event carry its start timestamp).
* `RtpSender` numbers an outgoing stream: random SSRC, sequence number and timestamp (RFC 3550
  §5.1), marker bit on the first packet, sequence +1 mod 2**16, timestamp + samples mod 2**32.
* `SsrcTracker` follows the incoming stream: SSRC changes, lost, duplicate and late packets by
  extended sequence number over a sliding window of `SsrcTracker.WINDOW` packets, in constant
  memory whatever the sender does.
* `MediaClock` places the incoming audio in time by its RTP timestamps, so that a receive loop
  that stalls and then takes a burst of packets in at once does not squash their audio.
"""

from __future__ import annotations

import enum
import secrets
import struct
from collections import deque
from dataclasses import dataclass

MAX_PACKET = 1500
"""Largest RTP packet accepted or produced (an Ethernet MTU; G.711 at 20 ms is 172 bytes)."""

RTP_VERSION = 2
_HEADER = struct.Struct("!BBHII")
_SEQ_MOD = 1 << 16
_TS_MOD = 1 << 32


def _check_range(name: str, value: int, bits: int) -> None:
    if not 0 <= value < (1 << bits):
        raise ValueError(f"{name} {value} is out of range (0..{(1 << bits) - 1})")


@dataclass(frozen=True, slots=True)
class RtpExtension:
    """An RTP header extension (RFC 3550 §5.3.1): 16-bit profile word and its data.

    ``data`` is a whole number of 32-bit words (RFC 8285 one- and two-byte extensions are not
    decoded further: nothing here uses them)."""

    profile: int
    data: bytes = b""

    def __post_init__(self) -> None:
        _check_range("extension profile", self.profile, 16)
        if len(self.data) % 4:
            raise ValueError(f"extension data is {len(self.data)} bytes, not a multiple of 4")
        if len(self.data) // 4 >= _SEQ_MOD:
            raise ValueError("extension data is longer than 65535 words")


@dataclass(frozen=True, slots=True)
class RtpPacket:
    """One RTP packet (RFC 3550 §5.1). The version is always 2.

    ``padding`` is the number of padding bytes at the end, count byte included (0: no padding,
    P bit clear); ``payload`` excludes them.
    """

    payload_type: int
    sequence: int
    timestamp: int
    ssrc: int
    payload: bytes = b""
    marker: bool = False
    csrcs: tuple[int, ...] = ()
    extension: RtpExtension | None = None
    padding: int = 0

    def __post_init__(self) -> None:
        _check_range("payload type", self.payload_type, 7)
        _check_range("sequence number", self.sequence, 16)
        _check_range("timestamp", self.timestamp, 32)
        _check_range("SSRC", self.ssrc, 32)
        if len(self.csrcs) > 15:
            raise ValueError(f"{len(self.csrcs)} CSRCs, at most 15 fit the CC field")
        for csrc in self.csrcs:
            _check_range("CSRC", csrc, 32)
        if not 0 <= self.padding <= 255:
            raise ValueError(f"padding {self.padding} is out of range (0..255)")

    @property
    def version(self) -> int:
        return RTP_VERSION

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> RtpPacket:
        """Parse one datagram; `ValueError` names what is wrong with it."""
        data = bytes(data)
        size = len(data)
        if size > MAX_PACKET:
            raise ValueError(f"RTP packet is {size} bytes, more than the {MAX_PACKET} accepted")
        if size < _HEADER.size:
            raise ValueError(f"RTP packet is {size} bytes, shorter than the 12-byte header")
        b0, b1, sequence, timestamp, ssrc = _HEADER.unpack_from(data)
        version = b0 >> 6
        if version != RTP_VERSION:
            raise ValueError(f"RTP version is {version}, expected 2")
        has_padding = bool(b0 & 0x20)
        has_extension = bool(b0 & 0x10)
        csrc_count = b0 & 0x0F
        offset = _HEADER.size
        end = offset + 4 * csrc_count
        if end > size:
            raise ValueError(
                f"CSRC list truncated: CC={csrc_count} needs {end} header bytes, "
                f"packet has {size}"
            )
        csrcs = struct.unpack_from(f"!{csrc_count}I", data, offset)
        offset = end
        extension = None
        if has_extension:
            if offset + 4 > size:
                raise ValueError(
                    f"header extension truncated: its 4-byte header needs {offset + 4} bytes, "
                    f"packet has {size}"
                )
            profile, words = struct.unpack_from("!HH", data, offset)
            end = offset + 4 + 4 * words
            if end > size:
                raise ValueError(
                    f"header extension truncated: {words} words need {end} bytes, "
                    f"packet has {size}"
                )
            extension = RtpExtension(profile, data[offset + 4 : end])
            offset = end
        padding = 0
        if has_padding:
            if size == offset:
                raise ValueError("padding bit set but no bytes follow the header")
            padding = data[-1]
            if padding == 0:
                raise ValueError("padding bit set with a padding count of 0")
            if padding > size - offset:
                raise ValueError(
                    f"padding count {padding} is larger than the {size - offset} bytes "
                    "after the header"
                )
        return cls(
            payload_type=b1 & 0x7F,
            sequence=sequence,
            timestamp=timestamp,
            ssrc=ssrc,
            payload=data[offset : size - padding],
            marker=bool(b1 & 0x80),
            csrcs=tuple(csrcs),
            extension=extension,
            padding=padding,
        )

    def serialize(self) -> bytes:
        """The packet on the wire; `ValueError` if it would exceed `MAX_PACKET` bytes."""
        b0 = (
            (RTP_VERSION << 6)
            | (0x20 if self.padding else 0)
            | (0x10 if self.extension is not None else 0)
            | len(self.csrcs)
        )
        b1 = (0x80 if self.marker else 0) | self.payload_type
        parts = [
            _HEADER.pack(b0, b1, self.sequence, self.timestamp, self.ssrc),
            struct.pack(f"!{len(self.csrcs)}I", *self.csrcs),
        ]
        if self.extension is not None:
            ext = self.extension
            parts.append(struct.pack("!HH", ext.profile, len(ext.data) // 4) + ext.data)
        parts.append(self.payload)
        if self.padding:
            parts.append(bytes(self.padding - 1) + bytes([self.padding]))
        out = b"".join(parts)
        if len(out) > MAX_PACKET:
            raise ValueError(f"RTP packet would be {len(out)} bytes, more than {MAX_PACKET}")
        return out


DTMF_EVENTS = "0123456789*#ABCD"
"""RFC 4733 §3.2: events 0-15 are the DTMF digits in this order."""


@dataclass(frozen=True, slots=True)
class DtmfEvent:
    """An RFC 4733 telephone-event payload: event code, end bit, volume (0..63, in -dBm0) and
    duration (in RTP timestamp units since the event's start timestamp).

    Events 16-255 (flash, modem and fax tones, ...) parse too; their `digit` is None.
    """

    event: int
    end: bool = False
    volume: int = 10
    duration: int = 0

    SIZE = 4

    def __post_init__(self) -> None:
        _check_range("event", self.event, 8)
        _check_range("volume", self.volume, 6)
        _check_range("duration", self.duration, 16)

    @property
    def digit(self) -> str | None:
        """'0'-'9', '*', '#', 'A'-'D' for events 0-15, else None."""
        return DTMF_EVENTS[self.event] if self.event < len(DTMF_EVENTS) else None

    @classmethod
    def from_digit(
        cls, digit: str, *, end: bool = False, volume: int = 10, duration: int = 0
    ) -> DtmfEvent:
        """The event for a DTMF character (case-insensitive)."""
        index = DTMF_EVENTS.find(digit.upper()) if len(digit) == 1 else -1
        if index < 0:
            raise ValueError(f"{digit!r} is not a DTMF digit (0-9, *, #, A-D)")
        return cls(index, end=end, volume=volume, duration=duration)

    @classmethod
    def parse(cls, payload: bytes | bytearray | memoryview) -> DtmfEvent:
        """Parse a telephone-event payload: exactly 4 bytes (RFC 4733 §2.3; redundant events
        come wrapped in RFC 2198, which this does not unwrap). The reserved bit is ignored."""
        if len(payload) != cls.SIZE:
            raise ValueError(f"telephone-event payload is {len(payload)} bytes, expected 4")
        event, flags, duration = struct.unpack("!BBH", payload)
        return cls(event=event, end=bool(flags & 0x80), volume=flags & 0x3F, duration=duration)

    def serialize(self) -> bytes:
        return struct.pack(
            "!BBH", self.event, (0x80 if self.end else 0) | self.volume, self.duration
        )


class DtmfCollector:
    """Reports each key press once from a stream of telephone-event packets.

    A sender emits, per key press, a first packet (marker bit set), updates every 50 ms or so
    with growing duration, and the final packet with the end bit three times; all of them carry
    the event's start timestamp (RFC 4733 §2.5.1). `feed` returns the digit on the first packet
    of a (timestamp, event) it has not seen -- so a press whose end packets are all lost still
    counts, and two different keys that a faulty sender stamps alike both count -- and None for
    every other packet. The last `MEMORY` presses are remembered, so late or reordered packets
    of earlier presses are not reported again.

    A key held longer than 65535 timestamp units (8.2 s at 8 kHz) is sent as several segments
    with new timestamps (§2.5.2.3); a segment that continues the previous, unended event with
    the same code, without the marker bit, right where its duration ended, is not a new press.
    """

    MEMORY = 32

    def __init__(self) -> None:
        self._seen: deque[tuple[int, int]] = deque(maxlen=self.MEMORY)
        self._last: tuple[int, int, bool, int] | None = None  # timestamp, event, ended, duration

    def feed(self, timestamp: int, event: DtmfEvent, marker: bool = False) -> str | None:
        """Take one packet's RTP timestamp, event and marker bit; the new digit or None.

        Non-DTMF events (16-255) are tracked like digits but never returned."""
        key = (timestamp, event.event)
        last = self._last
        if key in self._seen:
            if last is not None and (last[0], last[1]) == key:
                self._last = (
                    timestamp, last[1], last[2] or event.end, max(last[3], event.duration)
                )
            return None
        self._seen.append(key)
        continuation = (
            last is not None
            and not marker
            and not last[2]
            and last[1] == event.event
            and last[3] >= 0xFFFF - 8000
            and 0 < (timestamp - last[0]) % _TS_MOD <= 0xFFFF
        )
        self._last = (timestamp, event.event, event.end, event.duration)
        return None if continuation else event.digit

    def feed_packet(self, packet: RtpPacket) -> str | None:
        """`feed` with an RTP packet of the negotiated telephone-event type.

        `ValueError` when its payload is not a telephone event."""
        return self.feed(packet.timestamp, DtmfEvent.parse(packet.payload), packet.marker)


class RtpSender:
    """Numbering state of one outgoing RTP stream of fixed-rate frames (G.711: one timestamp
    unit per payload byte).

    SSRC, first sequence number and first timestamp are random unless given (RFC 3550 §5.1:
    unpredictable, for the little that buys against off-path injection). Not thread-safe: one
    sender per stream, driven by that stream's pacing loop.
    """

    def __init__(
        self,
        payload_type: int,
        *,
        ssrc: int | None = None,
        sequence: int | None = None,
        timestamp: int | None = None,
    ) -> None:
        _check_range("payload type", payload_type, 7)
        self.payload_type = payload_type
        self.ssrc = secrets.randbits(32) if ssrc is None else ssrc
        self.sequence = secrets.randbits(16) if sequence is None else sequence
        self.timestamp = secrets.randbits(32) if timestamp is None else timestamp
        _check_range("SSRC", self.ssrc, 32)
        _check_range("sequence number", self.sequence, 16)
        _check_range("timestamp", self.timestamp, 32)
        self.packets_sent = 0
        self.octets_sent = 0

    def next_packet(self, payload: bytes, marker: bool = False) -> bytes:
        """The next packet carrying ``payload``; sets the marker on the stream's first packet
        (and when asked, e.g. at the start of a talkspurt after silence)."""
        if len(payload) + _HEADER.size > MAX_PACKET:
            raise ValueError(f"payload of {len(payload)} bytes makes a packet over {MAX_PACKET}")
        first = self.packets_sent == 0
        header = _HEADER.pack(
            0x80,
            (0x80 if marker or first else 0) | self.payload_type,
            self.sequence,
            self.timestamp,
            self.ssrc,
        )
        self.sequence = (self.sequence + 1) % _SEQ_MOD
        self.timestamp = (self.timestamp + len(payload)) % _TS_MOD
        self.packets_sent += 1
        self.octets_sent += len(payload)
        return header + payload


class SeqStatus(enum.Enum):
    """What `SsrcTracker.observe` made of a packet."""

    FIRST = "first"  # first packet of the stream, or of a new SSRC
    IN_ORDER = "in_order"  # ahead of everything seen so far (a gap before it counts as lost)
    LATE = "late"  # behind the highest seen, not seen before: reordered, no longer lost
    DUPLICATE = "duplicate"  # seen before (within the window): drop it
    STALE = "stale"  # too far from the highest to place (a jump, or behind the window): drop it
    RESYNC = "resync"  # the second packet in a row after a jump: the sender renumbered


@dataclass(frozen=True, slots=True)
class TrackerStats:
    received: int
    lost: int
    duplicates: int
    late: int
    stale: int
    resyncs: int
    ssrc_changes: int


class SsrcTracker:
    """Follows the SSRC and sequence numbers of one incoming stream (RFC 3550 §A.1 in spirit).

    Sequence numbers are extended past 16 bits (wrap-around); the receipt of the last `WINDOW`
    sequence numbers below the highest one is a bitmask, so memory is constant. A gap counts its
    packets as lost at once; one that arrives late is taken off `lost` again. A packet more than
    `MAX_DROPOUT` ahead or further behind than the window is `STALE` (dropped, not a loss); if
    the next packet follows it in sequence, the sender has renumbered and the tracker restarts
    there (`RESYNC`), as RFC 3550 §A.1 does. A packet numbered before the source's first one is
    `LATE` but was never counted lost. A new SSRC resets the window and counts an SSRC change;
    the counters are kept across sources.
    """

    WINDOW = 1024
    MAX_DROPOUT = 3000

    def __init__(self) -> None:
        self.ssrc: int | None = None
        self._highest = 0  # extended sequence number of the highest packet seen
        self._base = 0  # extended sequence number of the source's first packet
        self._bad_seq: int | None = None  # after a STALE packet: the sequence that confirms it
        self._mask = 0  # bit i: highest - i was received
        self.received = 0
        self.lost = 0
        self.duplicates = 0
        self.late = 0
        self.stale = 0
        self.resyncs = 0
        self.ssrc_changes = 0

    def _restart(self, sequence: int) -> None:
        self._highest = self._base = sequence
        self._mask = 1
        self._bad_seq = None

    def observe(self, ssrc: int, sequence: int) -> SeqStatus:
        """Account for one received packet."""
        _check_range("sequence number", sequence, 16)
        if ssrc != self.ssrc:
            if self.ssrc is not None:
                self.ssrc_changes += 1
            self.ssrc = ssrc
            self._restart(sequence)
            self.received += 1
            return SeqStatus.FIRST
        delta = (sequence - self._highest) % _SEQ_MOD
        if delta == 0:
            self.duplicates += 1
            return SeqStatus.DUPLICATE
        back = _SEQ_MOD - delta
        if delta > self.MAX_DROPOUT and back >= self.WINDOW:
            if sequence == self._bad_seq:
                self.resyncs += 1
                self._restart(sequence)
                self.received += 1
                return SeqStatus.RESYNC
            self._bad_seq = (sequence + 1) % _SEQ_MOD
            self.stale += 1
            return SeqStatus.STALE
        self._bad_seq = None
        if delta <= self.MAX_DROPOUT:
            self.lost += delta - 1
            self._highest += delta
            self._mask = ((self._mask << delta) | 1) & ((1 << self.WINDOW) - 1)
            self.received += 1
            return SeqStatus.IN_ORDER
        bit = 1 << back
        if self._mask & bit:
            self.duplicates += 1
            return SeqStatus.DUPLICATE
        self._mask |= bit
        if self._highest - back > self._base:
            self.lost -= 1  # it was counted lost when the gap was seen
        self.late += 1
        self.received += 1
        return SeqStatus.LATE

    @property
    def highest_sequence(self) -> int:
        """Highest sequence number of the current source, extended past 16 bits: its first
        packet's sequence number plus the packets since (so it grows by 2**16 per wrap)."""
        return self._highest

    def stats(self) -> TrackerStats:
        return TrackerStats(
            received=self.received,
            lost=self.lost,
            duplicates=self.duplicates,
            late=self.late,
            stale=self.stale,
            resyncs=self.resyncs,
            ssrc_changes=self.ssrc_changes,
        )


class MediaClock:
    """When the audio of each received packet began, on the receiver's clock, from the RTP
    timestamps rather than from the arrival times.

    Arrival times are what the network and the receiver's own scheduling make of the sender's
    pacing: a receive loop that stalls for 300 ms (another call's work, a busy CPU) takes 15
    packets in at the same instant, which would put 300 ms of audio on one 20 ms slot. RTP
    timestamps keep the sender's pacing. The clock maps them onto local time with the smallest
    ``arrival - timestamp / rate`` seen in the current *run* (the least-delayed packet: later
    packets were only held up, never early), so a burst is spread back over the time it
    covers once its last packet, or any packet after it, is in.

    A run ends, and a new one starts from the packet that ends it, at an SSRC change or when a
    packet's ``arrival - timestamp / rate`` is more than ``max_skew`` (seconds) away from the
    run's (a sender that jumped its timestamps, or a stall longer than that). Timestamps are
    extended past 32 bits (wrap-around, late packets); memory is constant, whatever the sender
    does.
    """

    def __init__(self, rate: int = 8000, max_skew: float = 1.0) -> None:
        if rate <= 0 or max_skew <= 0:
            raise ValueError("rate and max_skew must be positive")
        self.rate = rate
        self.max_skew = max_skew
        self.ssrc: int | None = None
        self.run = 0  # counts runs; the first packet starts run 1
        self._offset = 0.0  # min(arrival - extended / rate) over the current run
        self._high_ts = 0  # raw timestamp of the highest packet of the run
        self._high_ext = 0  # its extended timestamp (samples since the run's first packet)

    def observe(self, arrival: float, ssrc: int, timestamp: int) -> tuple[int, int]:
        """Take in one packet; returns its run and its extended timestamp (samples from the
        run's first packet; negative for a late packet from before it), for ``time``."""
        _check_range("timestamp", timestamp, 32)
        if ssrc != self.ssrc:
            self.ssrc = ssrc
            return self._restart(arrival, timestamp)
        delta = (timestamp - self._high_ts) % _TS_MOD
        if delta >= _TS_MOD // 2:
            delta -= _TS_MOD  # behind the highest: a late packet
        ext = self._high_ext + delta
        value = arrival - ext / self.rate
        if abs(value - self._offset) > self.max_skew:
            return self._restart(arrival, timestamp)
        self._offset = min(self._offset, value)
        if delta > 0:
            self._high_ts, self._high_ext = timestamp, ext
        return self.run, ext

    def _restart(self, arrival: float, timestamp: int) -> tuple[int, int]:
        self.run += 1
        self._offset = arrival
        self._high_ts, self._high_ext = timestamp, 0
        return self.run, 0

    def time(self, run: int, ext: int) -> float | None:
        """When the audio of a packet that ``observe`` returned ``(run, ext)`` for began, with
        what the clock knows now; None when its run is over (the caller falls back to the
        packet's arrival)."""
        if run != self.run:
            return None
        return self._offset + ext / self.rate
