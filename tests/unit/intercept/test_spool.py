"""intercept.spool: events Redis refused, on disk; with real files, locks and forked writers."""

from __future__ import annotations

import contextlib
import fcntl
import multiprocessing
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from intercept.spool import Spool
from intercept.tap import SPOOL_RETRY, Tap
from scoring.store import RedisUnavailable


def xadd(n: int, tag: str = "e") -> list[Any]:
    return ["XADD", "spitwall:li:{ev}:events", "*", "id", f"{tag}{n}", "body", b"\x00\xff" * 8]


class Sink:
    def __init__(self) -> None:
        self.got: list[list[Any]] = []
        self.down = False

    def __call__(self, commands: Sequence[list[Any]]) -> None:
        if self.down:
            raise RedisUnavailable("redis marked down")
        self.got += [list(c) for c in commands]

    def ids(self) -> list[str]:
        return [str(c[4]) for c in self.got]


def test_append_then_replay_in_order_and_remove(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "li")
    assert stat.S_IMODE((tmp_path / "li").stat().st_mode) == 0o700
    assert spool.append([xadd(1), xadd(2)]) and spool.append([xadd(3)])
    assert stat.S_IMODE(spool.own_path.stat().st_mode) == 0o600
    assert spool.pending()
    sink = Sink()
    assert spool.replay(sink) == 3
    assert sink.ids() == ["e1", "e2", "e3"] and sink.got[0][6] == b"\x00\xff" * 8
    assert not spool.own_path.exists() and not spool.pending(now=1e12)
    assert (spool.spooled, spool.replayed, spool.lost) == (3, 3, 0)


def test_a_dead_processs_file_is_replayed_oldest_first(tmp_path: Path) -> None:
    old = Spool(tmp_path, pid=11111)  # the Kamailio child that died
    old.append([xadd(1, "old")])
    os.utime(old.own_path, (1, 1))
    ours = Spool(tmp_path)
    ours.append([xadd(1, "new")])
    sink = Sink()
    assert ours.replay(sink) == 2
    assert sink.ids() == ["old1", "new1"] and ours.files() == []


def test_a_file_locked_by_its_writer_waits_for_the_next_replay(tmp_path: Path) -> None:
    writer = Spool(tmp_path, pid=22222)
    writer.append([xadd(1)])
    fd = os.open(writer.own_path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a writer in the middle of its append
        sink = Sink()
        assert Spool(tmp_path).replay(sink) == 0 and writer.own_path.exists()
    finally:
        os.close(fd)
    assert Spool(tmp_path).replay(sink) == 1 and sink.ids() == ["e1"]


def test_a_torn_last_frame_is_skipped_and_counted(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.append([xadd(1)])
    spool.append([xadd(2)])
    size = spool.own_path.stat().st_size
    os.truncate(spool.own_path, size - 5)  # the crash came in the middle of the second write
    sink = Sink()
    assert spool.replay(sink) == 1 and sink.ids() == ["e1"] and spool.lost == 1


def test_garbage_in_a_file_is_skipped_and_counted(tmp_path: Path) -> None:
    (tmp_path / "li-33333.spool").write_bytes(b"\xc1\xc1 not msgpack")
    spool = Spool(tmp_path)
    sink = Sink()
    assert spool.replay(sink) == 0 and spool.lost == 1 and spool.files() == []


def test_a_full_spool_drops_and_counts(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=200)
    assert spool.append([xadd(1)])
    assert not spool.append([xadd(i) for i in range(2, 12)])
    assert spool.lost == 10 and spool.spooled == 1


def test_a_failed_replay_keeps_the_file_and_sends_again(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.append([xadd(1), xadd(2)])
    sink = Sink()
    sink.down = True
    with pytest.raises(RedisUnavailable):
        spool.replay(sink)
    assert spool.own_path.exists() and spool.pending()
    sink.down = False
    assert spool.replay(sink) == 2


def _refused_at_100(directory: Path) -> tuple[Tap, Spool, Sink]:
    """A tap with a spool whose first event (e1) Redis refused at t=100; Redis is down."""
    tap = Tap()
    spool = tap.spool = Spool(directory)
    sink = Sink()
    sink.down = True
    with pytest.raises(RedisUnavailable):
        tap.flush([xadd(1)], sink, now=100.0)
    return tap, spool, sink


def test_tap_spools_what_redis_refuses_and_sends_it_first_when_back(tmp_path: Path) -> None:
    tap, _spool, sink = _refused_at_100(tmp_path)
    assert tap.spool is not None
    assert not tap.backlog and tap.spool.spooled == 1
    sink.down = False
    # within SPOOL_RETRY of the refusal the spool is not read: new events go behind it
    with pytest.raises(RedisUnavailable):
        tap.flush([xadd(2)], sink, now=100.0 + SPOOL_RETRY / 2)
    assert sink.got == [] and tap.spool.spooled == 2
    tap.flush([xadd(3)], sink, now=100.0 + SPOOL_RETRY * 2)
    assert sink.ids() == ["e1", "e2", "e3"] and tap.spool.files() == []
    tap.flush([xadd(4)], sink, now=200.0)  # nothing spooled: straight through
    assert sink.ids()[-1] == "e4"


def test_frequent_flushes_do_not_postpone_the_replay_forever(tmp_path: Path) -> None:
    """The timer process flushes every 20 ms while the spool is pending: waiting out
    SPOOL_RETRY must not itself count as a refusal that starts the wait again."""
    tap, spool, sink = _refused_at_100(tmp_path)
    sink.down = False  # Redis is back at once
    now = 100.0
    while now < 100.0 + 3 * SPOOL_RETRY and not sink.got:
        now += 0.02
        with contextlib.suppress(RedisUnavailable):
            tap.flush([], sink, now=now)
    assert sink.ids() == ["e1"], "the spool was never replayed"
    assert now <= 100.0 + SPOOL_RETRY + 0.05
    assert spool.files() == []


def _writer(directory: str, frames: int) -> None:
    spool = Spool(directory)
    for i in range(frames):
        spool.append([xadd(i, f"p{os.getpid()}-")])


def test_writers_and_a_replayer_at_once_lose_nothing(tmp_path: Path) -> None:
    """Two forked writers append while this process replays over and over: every event
    arrives (a file removed under a waiting writer is replaced, never written into)."""
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), 300)) for _ in range(2)]
    for p in procs:
        p.start()
    replayer = Spool(tmp_path)
    sink = Sink()
    while any(p.is_alive() for p in procs):
        replayer.replay(sink)
    for p in procs:
        p.join(10)
        assert p.exitcode == 0
    replayer.replay(sink)
    expected = {f"p{p.pid}-{i}" for p in procs for i in range(300)}
    assert set(sink.ids()) == expected and replayer.files() == []


def test_pending_stays_true_within_a_scan_interval_until_a_replay(tmp_path: Path) -> None:
    """The timer asks before flushing and the flush asks again: both must see the file a
    crashed Kamailio left (a look at the directory is at most once a second)."""
    Spool(tmp_path, pid=44444).append([xadd(1)])
    spool = Spool(tmp_path)
    assert spool.pending(now=10.0) and spool.pending(now=10.1)
    sink = Sink()
    assert spool.replay(sink) == 1
    assert not spool.pending(now=10.2) and not spool.pending(now=20.0)
