"""RTP packets, RFC 4733 events and the collector, the sender's numbering, the receiver tracker
and media clock."""

from __future__ import annotations

import random
import struct

import pytest

from media.rtp import (
    MAX_PACKET,
    DtmfCollector,
    DtmfEvent,
    MediaClock,
    RtpExtension,
    RtpPacket,
    RtpSender,
    SeqStatus,
    SsrcTracker,
)

# A PCMU packet as Wireshark shows it: V=2, PT 0, seq 0x1234, ts 0xdeadbeef, SSRC 0x01020304.
SIMPLE = bytes.fromhex("80001234deadbeef01020304") + b"\xff" * 160


def test_parse_simple() -> None:
    p = RtpPacket.parse(SIMPLE)
    assert (p.version, p.payload_type, p.sequence, p.timestamp, p.ssrc) == (
        2, 0, 0x1234, 0xDEADBEEF, 0x01020304
    )
    assert p.payload == b"\xff" * 160 and not p.marker and p.csrcs == () and p.padding == 0
    assert p.extension is None
    assert p.serialize() == SIMPLE


def test_parse_marker_csrc_extension_padding() -> None:
    header = bytes([0x80 | 0x20 | 0x10 | 2, 0x80 | 101]) + struct.pack("!HII", 7, 8000, 0xAABB)
    csrcs = struct.pack("!II", 1, 2)
    extension = struct.pack("!HH", 0xBEDE, 2) + b"\x10\x01\x00\x00" + b"\x22\x02\x03\x00"
    payload = b"\x01\x8a\x00\xa0"
    padding = b"\x00\x00\x03"
    data = header + csrcs + extension + payload + padding
    p = RtpPacket.parse(data)
    assert p.marker and p.payload_type == 101 and p.csrcs == (1, 2)
    assert p.extension == RtpExtension(0xBEDE, extension[4:])
    assert p.payload == payload and p.padding == 3
    assert p.serialize() == data


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "shorter than the 12-byte header"),
        (SIMPLE[:11], "shorter than the 12-byte header"),
        (bytes([0x40]) + SIMPLE[1:], "version is 1"),
        (bytes([0x00]) + SIMPLE[1:], "version is 0"),
        (bytes([0xC0]) + SIMPLE[1:], "version is 3"),
        (bytes([0x8F]) + SIMPLE[1:12] + b"\x00" * 56, "CSRC list truncated"),
        (bytes([0x90]) + SIMPLE[1:12] + b"\xbe\xde", "header extension truncated"),
        (bytes([0x90]) + SIMPLE[1:12] + b"\xbe\xde\x00\x05" + b"\x00" * 8,
         "header extension truncated"),
        (bytes([0xA0]) + SIMPLE[1:12], "no bytes follow the header"),
        (bytes([0xA0]) + SIMPLE[1:12] + b"\x01\x02\x00", "padding count of 0"),
        (bytes([0xA0]) + SIMPLE[1:12] + b"\x01\x02\x04", "padding count 4 is larger"),
        (bytes([0xA0]) + SIMPLE[1:12] + b"\xff" * 100 + b"\xff", "padding count 255 is larger"),
        (SIMPLE[:12] + bytes(MAX_PACKET - 11), "more than the 1500 accepted"),
    ],
)
def test_parse_rejects(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RtpPacket.parse(data)


def test_padding_may_fill_all_the_payload() -> None:
    data = bytes([0xA0]) + SIMPLE[1:12] + b"\x00\x00\x00\x04"
    p = RtpPacket.parse(data)
    assert p.payload == b"" and p.padding == 4 and p.serialize() == data


def test_largest_packet_accepted() -> None:
    data = SIMPLE[:12] + bytes(MAX_PACKET - 12)
    assert len(RtpPacket.parse(data).payload) == MAX_PACKET - 12


def test_serialize_validates() -> None:
    with pytest.raises(ValueError, match="payload type"):
        RtpPacket(128, 0, 0, 0)
    with pytest.raises(ValueError, match="sequence"):
        RtpPacket(0, 65536, 0, 0)
    with pytest.raises(ValueError, match="timestamp"):
        RtpPacket(0, 0, -1, 0)
    with pytest.raises(ValueError, match="CSRCs"):
        RtpPacket(0, 0, 0, 0, csrcs=tuple(range(16)))
    with pytest.raises(ValueError, match="multiple of 4"):
        RtpExtension(1, b"abc")
    with pytest.raises(ValueError, match="more than 1500"):
        RtpPacket(0, 0, 0, 0, payload=bytes(1489)).serialize()


def test_parse_fuzz_only_value_error() -> None:
    rng = random.Random(4733)
    seeds = [SIMPLE, RtpPacket(8, 1, 2, 3, b"x" * 20, True, (9,), RtpExtension(1, b"abcd"),
                               7).serialize()]
    for _ in range(5000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            op = rng.random()
            if op < 0.5 and data:
                data[rng.randrange(len(data))] = rng.randrange(256)
            elif op < 0.8:
                del data[rng.randrange(len(data) + 1):]
            else:
                data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 40)))
        try:
            packet = RtpPacket.parse(bytes(data))
        except ValueError:
            continue
        assert packet.serialize() == bytes(data[: len(data) - packet.padding]) + (
            bytes(packet.padding - 1) + bytes([packet.padding]) if packet.padding else b""
        )


def test_dtmf_event_parse_and_serialize() -> None:
    e = DtmfEvent.parse(bytes([11, 0x80 | 10, 0x03, 0x20]))
    assert (e.event, e.end, e.volume, e.duration, e.digit) == (11, True, 10, 800, "#")
    assert e.serialize() == bytes([11, 0x8A, 0x03, 0x20])
    assert DtmfEvent.parse(bytes([5, 0x40 | 7, 0, 160])) == DtmfEvent(5, False, 7, 160)  # R bit
    assert [DtmfEvent(i).digit for i in range(17)] == [*"0123456789*#ABCD", None]
    assert DtmfEvent.from_digit("b", end=True).serialize()[:2] == bytes([13, 0x80 | 10])
    with pytest.raises(ValueError, match="expected 4"):
        DtmfEvent.parse(b"\x01\x02\x03")
    with pytest.raises(ValueError, match="expected 4"):
        DtmfEvent.parse(b"\x01\x02\x03\x04\x05")
    with pytest.raises(ValueError, match="not a DTMF digit"):
        DtmfEvent.from_digit("E")
    with pytest.raises(ValueError, match="volume"):
        DtmfEvent(1, volume=64)


Packet = tuple[int, DtmfEvent, bool]  # timestamp, event, marker


def _press(digit: str, ts: int, *, steps: int = 5, ends: int = 3) -> list[Packet]:
    """The packets a typical sender emits for one key press (RFC 4733 §2.5.1)."""
    packets = [(ts, DtmfEvent.from_digit(digit, duration=160 * (i + 1)), i == 0)
               for i in range(steps)]
    packets += [(ts, DtmfEvent.from_digit(digit, end=True, duration=160 * (steps + 1)), False)
                for _ in range(ends)]
    return packets


def test_collector_reports_each_press_once() -> None:
    collector = DtmfCollector()
    stream = _press("1", 1000) + _press("2", 3000) + _press("2", 5000) + _press("#", 7000)
    got = [d for ts, ev, m in stream if (d := collector.feed(ts, ev, m))]
    assert got == ["1", "2", "2", "#"]


def test_collector_lost_start_and_end_packets_and_reordering() -> None:
    collector = DtmfCollector()
    a = _press("4", 100)[2:]  # first packets lost
    b = _press("5", 900)[:2]  # all end packets lost
    c = _press("6", 1800)
    stream = a[:3] + b + c[:1] + a[3:] + c[1:] + b  # late repeats of earlier presses
    got = [d for ts, ev, m in stream if (d := collector.feed(ts, ev, m))]
    assert got == ["4", "5", "6"]


def test_collector_same_timestamp_different_keys() -> None:
    collector = DtmfCollector()
    stream = _press("7", 500) + _press("8", 500)  # a sender that does not advance timestamps
    assert [d for ts, ev, m in stream if (d := collector.feed(ts, ev, m))] == ["7", "8"]


def test_collector_long_event_segments() -> None:
    collector = DtmfCollector()
    first = DtmfEvent(9, duration=0xFFFF)
    assert collector.feed(10_000, DtmfEvent(9, duration=160), True) == "9"
    assert collector.feed(10_000, first) is None
    assert collector.feed(10_000 + 0xFFFF, DtmfEvent(9, duration=800)) is None  # segment 2
    assert collector.feed(10_000 + 0xFFFF, DtmfEvent(9, end=True, duration=1600)) is None
    assert collector.feed(200_000, DtmfEvent(9, duration=160), True) == "9"  # a new press


def test_collector_ignores_non_dtmf_and_wraps_timestamps() -> None:
    collector = DtmfCollector()
    assert collector.feed(5, DtmfEvent(16)) is None  # flash
    assert collector.feed(0xFFFFFF00, DtmfEvent(3), True) == "3"
    assert collector.feed(0x10, DtmfEvent(3), True) == "3"


def test_collector_memory_is_bounded() -> None:
    collector = DtmfCollector()
    for i in range(10_000):
        collector.feed(i * 1000, DtmfEvent(i % 16), True)
    assert len(collector._seen) == DtmfCollector.MEMORY


def test_collector_feed_packet() -> None:
    collector = DtmfCollector()
    pkt = RtpPacket(101, 1, 4242, 7, DtmfEvent(0).serialize(), marker=True)
    assert collector.feed_packet(RtpPacket.parse(pkt.serialize())) == "0"
    with pytest.raises(ValueError):
        collector.feed_packet(RtpPacket(101, 2, 4243, 7, b"\xff" * 160))


def test_sender_numbering_and_wrap() -> None:
    sender = RtpSender(0, ssrc=0x11223344, sequence=65534, timestamp=0xFFFFFF00)
    frames = [sender.next_packet(bytes([i]) * 160) for i in range(4)]
    packets = [RtpPacket.parse(f) for f in frames]
    assert [p.sequence for p in packets] == [65534, 65535, 0, 1]
    assert [p.timestamp for p in packets] == [0xFFFFFF00, 0xFFFFFFA0, 0x40, 0xE0]
    assert [p.marker for p in packets] == [True, False, False, False]
    assert {p.ssrc for p in packets} == {0x11223344}
    assert packets[2].payload == b"\x02" * 160
    assert sender.next_packet(b"\x00" * 160, marker=True)[1] == 0x80
    assert sender.packets_sent == 5 and sender.octets_sent == 800


def test_sender_randomises_and_validates() -> None:
    senders = [RtpSender(8) for _ in range(20)]
    assert len({s.ssrc for s in senders}) > 15
    assert len({s.sequence for s in senders}) > 15
    assert len({s.timestamp for s in senders}) > 15
    first = RtpPacket.parse(senders[0].next_packet(b"\xd5" * 160))
    assert first.payload_type == 8 and first.marker
    with pytest.raises(ValueError):
        RtpSender(128)
    with pytest.raises(ValueError):
        RtpSender(0).next_packet(bytes(MAX_PACKET))


def test_tracker_in_order_loss_duplicates_late() -> None:
    t = SsrcTracker()
    assert t.observe(1, 100) is SeqStatus.FIRST
    assert t.observe(1, 101) is SeqStatus.IN_ORDER
    assert t.observe(1, 104) is SeqStatus.IN_ORDER  # 102, 103 lost
    assert t.lost == 2
    assert t.observe(1, 103) is SeqStatus.LATE
    assert t.observe(1, 103) is SeqStatus.DUPLICATE
    assert t.observe(1, 104) is SeqStatus.DUPLICATE
    assert t.observe(1, 99) is SeqStatus.LATE  # before the first one: never counted lost
    s = t.stats()
    assert (s.received, s.lost, s.duplicates, s.late, s.ssrc_changes) == (5, 1, 2, 2, 0)


def test_tracker_wraps() -> None:
    t = SsrcTracker()
    seqs = [*range(65530, 65536), *range(0, 10)]
    seqs.remove(2)
    for seq in seqs:
        assert t.observe(7, seq) in (SeqStatus.FIRST, SeqStatus.IN_ORDER)
    assert t.lost == 1 and t.highest_sequence == 65536 + 9
    assert t.observe(7, 65535) is SeqStatus.DUPLICATE  # behind the wrap, still in the window
    assert t.observe(7, 2) is SeqStatus.LATE and t.lost == 0


def test_tracker_ssrc_change_resync_and_stale() -> None:
    t = SsrcTracker()
    for seq in range(10):
        t.observe(1, seq)
    assert t.observe(2, 5000) is SeqStatus.FIRST and t.ssrc_changes == 1 and t.ssrc == 2
    assert t.observe(2, 5001) is SeqStatus.IN_ORDER
    assert t.observe(2, 40_000) is SeqStatus.STALE  # a jump: dropped until confirmed
    assert t.observe(2, 5002) is SeqStatus.IN_ORDER
    assert t.observe(2, 40_000) is SeqStatus.STALE
    assert t.observe(2, 40_001) is SeqStatus.RESYNC and t.lost == 0
    for seq in range(40_002, 42_000):
        t.observe(2, seq)
    assert t.observe(2, 40_500) is SeqStatus.STALE
    assert t.observe(2, 1000) is SeqStatus.STALE  # behind: renumbered downwards
    assert t.observe(2, 1001) is SeqStatus.RESYNC
    assert t.observe(1, 10) is SeqStatus.FIRST and t.ssrc_changes == 2
    assert t.stats().stale == 4 and t.stats().resyncs == 2 and t.lost == 0


def test_tracker_random_stream_is_accurate_and_bounded() -> None:
    rng = random.Random(3550)
    t = SsrcTracker()
    sent = list(range(50_000))
    dropped = set(rng.sample(sent, 2000))
    arrivals = [s for s in sent if s not in dropped]
    for i in range(0, len(arrivals) - 3, 97):  # local reordering
        arrivals[i], arrivals[i + 2] = arrivals[i + 2], arrivals[i]
    dups = rng.sample(arrivals, 300)
    stream = [*arrivals]
    for d in dups:
        stream.insert(stream.index(d) + 1, d)
    for seq in stream:
        t.observe(0xABC, (seq + 60_000) % 65536)
    assert t.lost == len(dropped)
    assert t.duplicates == len(dups)
    assert t.received == len(arrivals)
    assert t._mask.bit_length() <= SsrcTracker.WINDOW


# ---------------------------------------------------------------------------------------------
# MediaClock


def _times(clock: MediaClock, packets: list[tuple[float, int, int]]) -> list[float | None]:
    keys = [clock.observe(*p) for p in packets]
    return [clock.time(run, ext) for run, ext in keys]


def test_clock_spreads_a_burst_back_over_the_time_it_covers() -> None:
    # 20 ms packets sent from t=1.0; the receiver stalls and takes the first 15 in at 1.30,
    # then the rest arrive in pace
    ts0 = 4_000_000_000  # wraps past 2**32 on the way
    packets = [(max(1.30, 1.0 + 0.02 * k) + 0.001, 7, (ts0 + 160 * k) % 2**32)
               for k in range(40)]
    clock = MediaClock()
    times = _times(clock, packets)
    assert times == pytest.approx([1.001 + 0.02 * k for k in range(40)])
    # placed as they come in, the burst would all sit at 1.30
    early = MediaClock()
    first = [early.time(*early.observe(*p)) for p in packets[:15]]
    assert first[0] == pytest.approx(1.301) and first[14] == pytest.approx(1.301)


def test_clock_takes_late_packets_and_keeps_the_least_delayed_pace() -> None:
    clock = MediaClock()
    packets = [(10.00, 1, 800), (10.021, 1, 960), (10.060, 1, 1280), (10.061, 1, 1120),
               (10.085, 1, 1440)]  # the packet of ts 1120 came after 1280; jitter of 1-5 ms
    times = _times(clock, packets)
    assert times == pytest.approx([10.0, 10.02, 10.06, 10.04, 10.08], abs=1e-9)
    assert clock.observe(10.2, 1, 640) == (1, -160)  # older than the first: negative
    assert clock.time(1, -160) == pytest.approx(9.98)


def test_clock_starts_a_new_run_on_ssrc_change_and_timestamp_jump() -> None:
    clock = MediaClock(max_skew=1.0)
    assert clock.observe(5.0, 1, 1000) == (1, 0)
    assert clock.observe(5.02, 1, 1160) == (1, 160)
    assert clock.observe(5.04, 2, 999_999) == (2, 0)  # new SSRC
    assert clock.time(1, 160) is None  # that run is over: the caller uses the arrival
    assert clock.time(2, 0) == pytest.approx(5.04)
    assert clock.observe(5.06, 2, 999_999 + 160 + 8000 * 3600) == (3, 0)  # jumped an hour
    assert clock.observe(5.08, 2, 999_999 + 320 + 8000 * 3600) == (3, 160)
    assert clock.time(3, 160) == pytest.approx(5.08)
    assert clock.run == 3 and clock.ssrc == 2
    with pytest.raises(ValueError):
        clock.observe(5.1, 2, 2**32)
    with pytest.raises(ValueError):
        MediaClock(rate=0)
