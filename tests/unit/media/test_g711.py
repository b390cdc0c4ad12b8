"""G.711 tables against reference values, a scalar port of the ITU-T G.191 reference code, and
(where this Python still has it) the stdlib's audioop."""

from __future__ import annotations

import importlib
import warnings

import numpy as np
import pytest

from media import g711


def _stl_ulaw_compress(x: int) -> int:
    """Scalar port of G.191 STL g711.c ulaw_compress (one sample)."""
    absno = ((~x) >> 2) + 33 if x < 0 else (x >> 2) + 33
    absno = min(absno, 0x1FFF)
    i = absno >> 6
    segno = 1
    while i:
        segno += 1
        i >>= 1
    high = 8 - segno
    low = 0x0F - ((absno >> segno) & 0x0F)
    code = (high << 4) | low
    return code | 0x80 if x >= 0 else code


def _stl_alaw_compress(x: int) -> int:
    """Scalar port of G.191 STL g711.c alaw_compress (one sample)."""
    ix = (~x) >> 4 if x < 0 else x >> 4
    if ix > 15:
        iexp = 1
        while ix > 16 + 15:
            ix >>= 1
            iexp += 1
        ix -= 16
        ix += iexp << 4
    if x >= 0:
        ix |= 0x80
    return ix ^ 0x55


def _sun_ulaw2linear(u: int) -> int:
    """Sun Microsystems g711.c ulaw2linear (an independent formulation of the decoder)."""
    u = ~u & 0xFF
    t = ((u & 0x0F) << 3) + 0x84
    t <<= (u & 0x70) >> 4
    return 0x84 - t if u & 0x80 else t - 0x84


def _sun_alaw2linear(a: int) -> int:
    a ^= 0x55
    t = (a & 0x0F) << 4
    seg = (a & 0x70) >> 4
    if seg == 0:
        t += 8
    elif seg == 1:
        t += 0x108
    else:
        t += 0x108
        t <<= seg - 1
    return t if a & 0x80 else -t


ALL_CODES = bytes(range(256))
ALL_SAMPLES = np.arange(-32768, 32768, dtype=np.int32).astype(np.int16)


def test_reference_values() -> None:
    assert g711.ulaw_decode(b"\xff\x00\x7f\x80").tolist() == [0, -32124, 0, 32124]
    assert g711.alaw_decode(b"\xd5\x55\xaa\x2a").tolist() == [8, -8, 32256, -32256]
    assert g711.ulaw_encode(np.array([0, 32767, -32768], dtype=np.int16)) == b"\xff\x80\x00"
    assert g711.alaw_encode(np.array([0, -1, 32767, -32768], dtype=np.int16)) == b"\xd5\x55\xaa\x2a"


def test_decode_tables_match_sun_formulation() -> None:
    assert g711.ulaw_decode(ALL_CODES).tolist() == [_sun_ulaw2linear(c) for c in range(256)]
    assert g711.alaw_decode(ALL_CODES).tolist() == [_sun_alaw2linear(c) for c in range(256)]


def test_encode_tables_match_scalar_reference_for_every_sample() -> None:
    samples = ALL_SAMPLES.tolist()
    assert g711.ulaw_encode(ALL_SAMPLES) == bytes(_stl_ulaw_compress(x) for x in samples)
    assert g711.alaw_encode(ALL_SAMPLES) == bytes(_stl_alaw_compress(x) for x in samples)


def test_round_trip_of_all_codes() -> None:
    ulaw = g711.ulaw_encode(g711.ulaw_decode(ALL_CODES))
    alaw = g711.alaw_encode(g711.alaw_decode(ALL_CODES))
    assert alaw == ALL_CODES
    differing = [c for c in range(256) if ulaw[c] != c]
    assert differing == [0x7F]  # -0 and +0 both decode to 0, which encodes as 0xFF
    assert ulaw[0x7F] == 0xFF


def _ulaw_step(code: int) -> int:
    return 8 << ((~code >> 4) & 7)


def _alaw_step(code: int) -> int:
    return 16 << max((((code ^ 0x55) & 0x7F) >> 4) - 1, 0)


@pytest.mark.parametrize(
    ("encode", "decode", "step_of", "clip", "slack"),
    [
        (g711.ulaw_encode, g711.ulaw_decode, _ulaw_step, 32124, 4),  # 16 → 14 bits
        (g711.alaw_encode, g711.alaw_decode, _alaw_step, 32256, 16),  # 16 → 13 bits
    ],
)
def test_quantisation_error_is_within_half_a_step(  # type: ignore[no-untyped-def]
    encode, decode, step_of, clip, slack
) -> None:
    """Every sample decodes to the middle of the quantisation interval it falls in: within half
    that interval's step (plus the truncation of 16 to 14/13 bits), never with the wrong sign."""
    steps = np.array([step_of(c) for c in range(256)])
    codes = np.frombuffer(encode(ALL_SAMPLES), np.uint8)
    back = decode(codes.tobytes()).astype(np.int32)
    x = np.clip(ALL_SAMPLES.astype(np.int32), -clip, clip)
    assert np.all(np.abs(back - x) <= steps[codes] // 2 + slack)
    assert np.all(np.sign(back) * np.sign(x) >= 0)


def test_monotonic() -> None:
    for encode, decode in ((g711.ulaw_encode, g711.ulaw_decode),
                           (g711.alaw_encode, g711.alaw_decode)):
        back = decode(encode(ALL_SAMPLES))
        assert np.all(np.diff(back.astype(np.int32)) >= 0)


def test_against_audioop_where_available() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            audioop = importlib.import_module("audioop")
        except ImportError:
            pytest.skip("audioop was removed in Python 3.13")
    raw = ALL_SAMPLES.tobytes()
    assert g711.ulaw_decode(ALL_CODES).tobytes() == audioop.ulaw2lin(ALL_CODES, 2)
    assert g711.alaw_decode(ALL_CODES).tobytes() == audioop.alaw2lin(ALL_CODES, 2)
    assert g711.alaw_encode(ALL_SAMPLES) == audioop.lin2alaw(raw, 2)
    ours = np.frombuffer(g711.ulaw_encode(ALL_SAMPLES), np.uint8)
    theirs = np.frombuffer(audioop.lin2ulaw(raw, 2), np.uint8)
    # Sun's code (audioop) truncates negative samples with >> instead of the STL's one's
    # complement: the two differ only for negative samples, by one code, on a threshold.
    diff = np.nonzero(ours != theirs)[0]
    assert np.all(ALL_SAMPLES[diff] < 0)
    assert np.all(np.abs(ours[diff].astype(int) - theirs[diff].astype(int)) == 1)
    assert len(diff) < 600


def test_types_and_shapes() -> None:
    pcm = g711.ulaw_decode(bytearray(b"\x01\x02"))
    assert pcm.dtype == np.int16 and pcm.shape == (2,)
    assert g711.alaw_decode(memoryview(b"")).shape == (0,)
    assert g711.ulaw_encode(np.zeros(0, dtype=np.int16)) == b""
    # wider integers are clipped, not wrapped
    assert g711.ulaw_encode(np.array([70000, -70000])) == g711.ulaw_encode(
        np.array([32767, -32768], dtype=np.int16)
    )
    assert g711.alaw_encode([1, 2, 3]) == g711.alaw_encode(np.array([1, 2, 3], dtype=np.int16))
    with pytest.raises(ValueError, match="integers"):
        g711.ulaw_encode(np.array([0.5]))


def test_decode_by_payload_type() -> None:
    data = bytes(range(0, 256, 3))
    assert np.array_equal(g711.decode(0, data), g711.ulaw_decode(data))
    assert np.array_equal(g711.decode(8, data), g711.alaw_decode(data))
    assert g711.encode(8, g711.decode(8, data)) == data
    for pt in (3, 9, 18, 101, -1):
        with pytest.raises(ValueError, match=r"not G\.711"):
            g711.decode(pt, data)
        with pytest.raises(ValueError, match=r"not G\.711"):
            g711.encode(pt, np.zeros(1, dtype=np.int16))


def test_tables_are_read_only() -> None:
    with pytest.raises(ValueError):
        g711._ULAW_DECODE[0] = 1
