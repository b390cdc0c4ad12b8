"""media.session.TimedFeed: the caller's audio reaches the speech test placed by its RTP
timestamps, so a stall of the receive loop does not move a "hello?" to the greeting's start."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from media import audio
from media.detector import SpeechTest
from media.session import TimedFeed

pytestmark = pytest.mark.skipif(
    shutil.which("espeak-ng") is None or shutil.which("sox") is None,
    reason="needs espeak-ng and sox (apt-get install espeak-ng sox)",
)

GREETING_MS, BEEP_MS, AFTER_MS = 6000, 500, 3000


@pytest.fixture(scope="module")
def caller(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """A person's side: "hello?" 400 ms into the greeting, then silence."""
    d = Path(tmp_path_factory.mktemp("feed"))
    hello = audio.load_pcm(audio.synth("Hello?", d / "hello.wav"))
    energy = np.array([audio.dbfs(f) for f in audio.frames(hello)])
    active = np.flatnonzero(energy > -50)
    hello = audio.set_level(hello[active[0] * 160:(active[-1] + 1) * 160], -20.0)
    x = audio.silence(GREETING_MS + BEEP_MS + AFTER_MS)
    audio.place(x, hello, 400)
    return x


def arrivals(n: int, stall_until: float) -> list[float]:
    """Packet k sent at 20k ms (t0 = 0, 1 ms network delay); the receive loop is stalled until
    `stall_until` and then takes everything waiting at once."""
    return [max(0.02 * k + 0.001, stall_until) for k in range(n)]


def run(pcm: np.ndarray, times: list[float], feed_it: bool) -> SpeechTest:
    test = SpeechTest(GREETING_MS, BEEP_MS, AFTER_MS)
    feed = TimedFeed(test, t0=0.0)
    ts0 = 2**32 - 3200  # the timestamps wrap during the call
    for k, (t, frame) in enumerate(zip(times, audio.frames(pcm), strict=False)):
        if feed_it:
            feed.add(t, 0x1234, (ts0 + 160 * k) % 2**32, frame)
        else:  # by arrival time, as before
            test.add_frame(t * 1000.0, frame)
    feed.flush()
    return test


def test_a_stalled_receive_loop_does_not_move_the_hello(caller: np.ndarray) -> None:
    n = len(caller) // 160
    stalled = arrivals(n, stall_until=0.6)  # the first 30 packets arrive at once at 0.6 s
    v = run(caller, stalled, feed_it=True).result()
    assert v.features["onset_ms"] == pytest.approx(400, abs=60)
    assert v.features["hellos"] == 1 and v.features["talk_ms"] == 0
    assert v.features["frames_duplicate"] == 0
    # by arrival time the hello lands at 0.6 s, squashed, over frames already taken
    squashed = run(caller, stalled, feed_it=False).result()
    assert squashed.features["frames_duplicate"] > 20


def test_frames_are_held_until_later_ones_arrive_and_flushed(caller: np.ndarray) -> None:
    test = SpeechTest(GREETING_MS, BEEP_MS, AFTER_MS)
    feed = TimedFeed(test, t0=0.0, delay=0.09)
    frames = list(audio.frames(caller))
    for k in range(10):
        feed.add(0.02 * k, 1, 160 * k, frames[k])
    # 0.18 s seen: the frames up to 0.09 s before (0-0.08 s) are placed, the last five held
    assert int(test.result().features["frames_received"]) == 5
    feed.flush()
    assert int(test.result().features["frames_received"]) == 10
