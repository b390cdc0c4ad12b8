"""Audio helpers for the answering machine, its tests and the detection benchmark.

Everything the answering machine plays or analyses is 8 kHz mono signed 16-bit PCM, the format
G.711 decodes to, so the helpers here produce and accept only that (as ``numpy.int16`` arrays).
Speech is synthesised with ``espeak-ng`` and resampled with ``sox`` (both from Debian, installed
by ``vagrant/provision.sh``) instead of shipping recordings: the prompts can be regenerated on
any machine, and tests can make the caller audio they need in a temporary directory.

The numeric helpers (``tone``, ``silence``, ``noise``, ``mix_noise``, ``frames``) are pure numpy
so that tests and the benchmark can build call timelines without any subprocess.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt

RATE = 8000
"""Samples per second of everything in this module (G.711's rate)."""

FRAME_SAMPLES = 160
"""One 20 ms RTP packet at 8 kHz (the usual G.711 ptime)."""

FULL_SCALE = 32768.0

Pcm = npt.NDArray[np.int16]

GREETING_TEXT = (
    "You have reached a screened line. Please wait for the tone, "
    "then say your name and the reason for your call."
)
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
BEEP_HZ = 1000.0
BEEP_MS = 500


class AudioToolError(RuntimeError):
    """espeak-ng or sox is missing or failed; the message says which and why."""


def _run(cmd: list[str]) -> None:
    """Run an external audio tool; turn a missing binary or a failure into one clear error
    (setup scripts print it as is)."""
    if shutil.which(cmd[0]) is None:
        raise AudioToolError(f"{cmd[0]} not found (install it: apt-get install espeak-ng sox)")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=60)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise AudioToolError(f"{cmd[0]} failed ({proc.returncode}): {' '.join(detail[-2:])}")


def synth(
    text: str,
    path: str | os.PathLike[str],
    *,
    voice: str = "en-us",
    speed: int = 160,
    pitch: int = 50,
    rate: int = RATE,
) -> Path:
    """Speak ``text`` into a WAV file at ``path`` (mono, 16-bit, ``rate`` Hz) and return the path.

    espeak-ng writes 22.05 kHz; sox resamples (with its anti-alias filter) to the telephone rate.
    The file appears atomically (written next to the target, then renamed), so a concurrent
    reader or an interrupted setup never sees half a prompt.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".synth-") as tmp:
        raw = Path(tmp) / "espeak.wav"
        out = Path(tmp) / "out.wav"
        _run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(raw), text])
        _run(["sox", str(raw), "-r", str(rate), "-c", "1", "-b", "16", "-e", "signed-integer",
              str(out)])
        os.replace(out, target)
    return target


def load_pcm(path: str | os.PathLike[str]) -> Pcm:
    """Read an 8 kHz mono 16-bit PCM WAV file into an int16 array.

    Anything else (stereo, 8-bit, 16 kHz, a-law WAV, not a WAV at all) raises ``ValueError``
    rather than being converted silently: an operator's greeting in the wrong format should be
    converted once with sox, not resampled badly on every call.
    """
    try:
        with wave.open(str(path), "rb") as wav:
            channels, width, rate = wav.getnchannels(), wav.getsampwidth(), wav.getframerate()
            if (channels, width, rate) != (1, 2, RATE):
                raise ValueError(
                    f"{path}: need 8000 Hz mono 16-bit PCM, got {rate} Hz, {channels} channel(s), "
                    f"{8 * width}-bit"
                )
            data = wav.readframes(wav.getnframes())
    except (wave.Error, EOFError) as exc:
        raise ValueError(f"{path}: not a PCM WAV file ({exc})") from exc
    return np.frombuffer(data, dtype="<i2").astype(np.int16)


def save_pcm(pcm: npt.NDArray[np.generic], path: str | os.PathLike[str]) -> Path:
    """Write int16 samples as an 8 kHz mono 16-bit WAV file (atomically, like ``synth``)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    samples = to_int16(pcm)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".wav-")
    try:
        with os.fdopen(fd, "wb") as fh, wave.open(fh, "wb") as wav:
            wav.setnchannels(1)
            wav.setsampwidth(2)
            wav.setframerate(RATE)
            wav.writeframes(samples.astype("<i2").tobytes())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def to_int16(x: npt.NDArray[np.generic]) -> Pcm:
    """Round and clip to int16: mixing can overshoot, and wrapping around would turn a loud
    sample into a click of the opposite sign."""
    return np.clip(np.rint(np.asarray(x, dtype=np.float64)), -32768, 32767).astype(np.int16)


def samples_for(ms: float) -> int:
    """Number of samples in ``ms`` milliseconds at 8 kHz."""
    return round(ms * RATE / 1000)


def duration_ms(pcm: npt.NDArray[np.generic]) -> float:
    """Length of ``pcm`` in milliseconds."""
    return len(pcm) * 1000.0 / RATE


def silence(ms: float) -> Pcm:
    """Digital silence: what a phone with no microphone noise (or a muted bot) sends."""
    return np.zeros(samples_for(ms), dtype=np.int16)


def tone(freq: float, ms: float, *, dbfs: float = -10.0, ramp_ms: float = 5.0) -> Pcm:
    """A sine beep at ``dbfs`` (peak level). The 5 ms raised-cosine ramps avoid the clicks that
    a hard on/off would add (and that a VAD on the other side might take for speech)."""
    n = samples_for(ms)
    t = np.arange(n) / RATE
    amp = FULL_SCALE * 10 ** (dbfs / 20)
    x = amp * np.sin(2 * np.pi * freq * t)
    r = min(samples_for(ramp_ms), n // 2)
    if r > 0:
        ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(r) / r)
        x[:r] *= ramp
        x[n - r:] *= ramp[::-1]
    return to_int16(x)


def dbfs(x: npt.NDArray[np.generic]) -> float:
    """RMS level of ``x`` relative to full scale (a full-scale square wave is 0 dBFS); -inf for
    digital silence or an empty array."""
    if len(x) == 0:
        return float("-inf")
    power = float(np.mean(np.square(np.asarray(x, dtype=np.float64)))) / FULL_SCALE**2
    return 10 * np.log10(power) if power > 0 else float("-inf")


def noise(ms: float, level_dbfs: float, seed: int, *, color: str = "white") -> Pcm:
    """Stationary noise of ``color`` (white, pink or brown) at an RMS of ``level_dbfs``.

    Pink and brown noise are made by shaping white noise's spectrum (1/f, 1/f^2 power), which
    is what room hum, traffic and a car interior look like more than white noise does.
    """
    n = samples_for(ms)
    if n == 0:
        return np.zeros(0, dtype=np.int16)
    x = _colored(n, np.random.default_rng(seed), color)
    return to_int16(_scale_to(x, level_dbfs))


def _colored(n: int, rng: np.random.Generator, color: str) -> npt.NDArray[np.float64]:
    white = rng.standard_normal(n)
    if color == "white":
        return white
    exponent = {"pink": 0.5, "brown": 1.0}.get(color)
    if exponent is None:
        raise ValueError(f"unknown noise color {color!r} (white, pink, brown)")
    spectrum = np.fft.rfft(white)
    f = np.fft.rfftfreq(n, 1 / RATE)
    f[0] = f[1] if n > 1 else 1.0
    shaped: npt.NDArray[np.float64] = np.fft.irfft(spectrum / f**exponent, n)
    return shaped


def _scale_to(x: npt.NDArray[np.float64], level_dbfs: float) -> npt.NDArray[np.float64]:
    rms = float(np.sqrt(np.mean(np.square(x))))
    if rms == 0:
        return x
    return x * (FULL_SCALE * 10 ** (level_dbfs / 20) / rms)


def active_level(pcm: npt.NDArray[np.generic], *, range_db: float = 30.0) -> float:
    """RMS level (dBFS) of the active part of ``pcm``: the 20 ms frames within ``range_db`` of the
    loudest one. A mostly silent call timeline thus has the level of the speech in it, which
    is what a signal-to-noise ratio should refer to. -inf for digital silence."""
    x = np.asarray(pcm, dtype=np.float64)
    n = len(x) // FRAME_SAMPLES
    if n == 0:
        return dbfs(x)
    power = np.mean(np.square(x[: n * FRAME_SAMPLES].reshape(n, FRAME_SAMPLES)), axis=1)
    peak = float(power.max())
    if peak <= 0:
        return float("-inf")
    active = power[power >= peak * 10 ** (-range_db / 10)]
    return float(10 * np.log10(float(active.mean()) / FULL_SCALE**2))


def mix_noise(pcm: Pcm, snr_db: float, seed: int, *, color: str = "white") -> Pcm:
    """Add stationary noise ``snr_db`` below the active level of ``pcm`` (see ``active_level``).

    Raises ``ValueError`` on digital silence, where a ratio has no reference: use ``noise`` with
    an absolute level instead.
    """
    level = active_level(pcm)
    if not np.isfinite(level):
        raise ValueError("mix_noise: the signal is silent; use noise() with an absolute level")
    n = _scale_to(_colored(len(pcm), np.random.default_rng(seed), color), level - snr_db)
    return to_int16(pcm.astype(np.float64) + n)


def set_level(pcm: Pcm, level_dbfs: float) -> Pcm:
    """Scale ``pcm`` so that its active level (see ``active_level``) is ``level_dbfs``."""
    level = active_level(pcm)
    if not np.isfinite(level):
        return pcm.copy()
    return to_int16(pcm.astype(np.float64) * 10 ** ((level_dbfs - level) / 20))


def frames(pcm: npt.NDArray[np.generic], size: int = FRAME_SAMPLES) -> Iterator[Pcm]:
    """Cut ``pcm`` into consecutive frames of ``size`` samples (20 ms by default), the unit that
    RTP carries; a last partial frame is padded with silence so no audio is dropped."""
    x = to_int16(np.asarray(pcm)) if np.asarray(pcm).dtype != np.int16 else np.asarray(pcm)
    for start in range(0, len(x), size):
        chunk = x[start:start + size]
        if len(chunk) < size:
            chunk = np.concatenate([chunk, np.zeros(size - len(chunk), dtype=np.int16)])
        yield chunk


def place(timeline: Pcm, clip: npt.NDArray[np.generic], at_ms: float) -> None:
    """Add ``clip`` into ``timeline`` (in place) starting at ``at_ms``; parts that fall outside
    the timeline (a negative start, or past its end) are cut off. The benchmark and the tests
    build caller timelines aligned to the greeting start with it."""
    start = samples_for(at_ms)
    c = np.asarray(clip, dtype=np.float64)
    if start < 0:
        c = c[-start:]
        start = 0
    c = c[: max(0, len(timeline) - start)]
    if len(c) == 0:
        return
    seg = timeline[start:start + len(c)].astype(np.float64) + c
    timeline[start:start + len(c)] = to_int16(seg)


def default_prompts(
    directory: str | os.PathLike[str], *, voice: str = "en-us", speed: int = 160
) -> dict[str, Path]:
    """Create the answering machine's default prompts in ``directory`` and return them by name.

    ``greeting`` (the screened-line message), ``beep`` (1 kHz, 500 ms) and ``digit0`` ...
    ``digit9`` ("Please type the digit seven", for the DTMF CAPTCHA). Files that already exist
    are kept, so this is cheap to run on every setup and never overwrites a greeting that an
    operator replaced with their own recording.
    """
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    prompts: dict[str, Path] = {"greeting": root / "greeting.wav", "beep": root / "beep.wav"}
    if not prompts["greeting"].exists():
        synth(GREETING_TEXT, prompts["greeting"], voice=voice, speed=speed)
    if not prompts["beep"].exists():
        save_pcm(tone(BEEP_HZ, BEEP_MS), prompts["beep"])
    for digit, word in enumerate(DIGIT_WORDS):
        path = root / f"digit{digit}.wav"
        prompts[f"digit{digit}"] = path
        if not path.exists():
            synth(f"Please type the digit {word}.", path, voice=voice, speed=speed)
    return prompts


def burst(kind: str, ms: float, level_dbfs: float, seed: int) -> Pcm:
    """A non-speech sound a listening person makes: ``"breath"`` (soft band-limited noise that
    swells and fades) or ``"cough"`` (a loud broadband burst with a sharp attack and a fast
    decay). The detector must not take either for a bot talking over the greeting.
    """
    n = samples_for(ms)
    if n == 0:
        return np.zeros(0, dtype=np.int16)
    rng = np.random.default_rng(seed)
    spectrum = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / RATE)
    if kind == "breath":
        # mostly 300-2500 Hz, the rush of air through the mouth and nose
        spectrum *= np.exp(-0.5 * ((f - 1200) / 700) ** 2)
        env = np.hanning(n) ** 0.7
    elif kind == "cough":
        # a burst with energy low down and a long high tail; ~10 ms attack, decays over `ms`
        spectrum *= 1 / (1 + (f / 900) ** 1.5)
        t = np.arange(n) / RATE
        env = (1 - np.exp(-t / 0.01)) * np.exp(-t / (ms / 4000))
    else:
        raise ValueError(f"unknown burst kind {kind!r} (breath, cough)")
    x = np.fft.irfft(spectrum, n) * env
    # level = RMS of the loudest part, like active_level for speech
    peak_rms = float(np.sqrt(np.max(np.convolve(np.square(x), np.ones(80) / 80, "same"))))
    if peak_rms == 0:
        return np.zeros(n, dtype=np.int16)
    return to_int16(x * (FULL_SCALE * 10 ** (level_dbfs / 20) / peak_rms))
