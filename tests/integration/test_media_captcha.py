"""The DTMF CAPTCHA end to end: a silent caller (verdict "unsure") is asked for a digit.

Real lab (Kamailio + Redis + `spitwall media`) with `media.captcha unsure` and no token key, and
the small Python UA of `tests.integration.transferee` as the caller. It offers telephone-event,
streams silence through the greeting, the beep and the listening window, finds out which digit
the answering machine asks for by matching what it receives against the lab's own prompt files
(the machine sends the prompt's PCM mu-law encoded in 160-sample frames, so the bytes match
exactly), and keys in an RFC 4733 digit on the payload type the 200's SDP agreed on. The right
digit makes the caller human (a voicemail, as there is no transfer without a token key); a wrong
one, or none, makes it a bot (the spam queue).
"""

from __future__ import annotations

import json
import time
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from media import g711
from media.audio import load_pcm, tone
from tests.integration.helpers import spitwall
from tests.integration.transferee import FRAME, Dialog, RtpStream, Transferee

pytestmark = pytest.mark.integration

CALLEE = "15551230000"
DTMF_PT = 101
CAPTCHA_WAIT_S = 6.0  # SessionConfig.captcha_wait_ms
LISTEN_S = 3.0  # SessionConfig.listen_after_ms
RECORD_S = 5


@pytest.fixture
def captcha_lab(lab_factory: Any) -> Any:
    lab = lab_factory()
    url = lab.state.redis_url
    for k, v in (("divert_threshold", "0"), ("reject_threshold", "0.99"),
                 ("media.captcha", "unsure"), ("media.record_seconds", str(RECORD_S))):
        res = spitwall("config", "set", k, v, redis_url=url)
        assert res.returncode == 0, res.stderr
    return lab


@pytest.fixture
def caller(captcha_lab: Any) -> Iterator[Transferee]:
    st = captcha_lab.state
    ua = Transferee("127.0.23.1", (st.sip_addr, st.sip_port), user="carol", display="Carol")
    try:
        yield ua
    finally:
        ua.hang_up_and_close()


def wav_seconds(path: Path) -> float:
    with wave.open(str(path)) as w:
        return float(w.getnframes() / w.getframerate())


def encoded_prompts(prompts: Path) -> dict[str, bytes]:
    """Each digit prompt as the machine sends it: mu-law of the PCM padded to whole frames."""
    out: dict[str, bytes] = {}
    for d in range(10):
        pcm = load_pcm(prompts / f"digit{d}.wav")
        n = (len(pcm) + FRAME - 1) // FRAME
        padded = np.zeros(n * FRAME, dtype=np.int16)
        padded[: len(pcm)] = pcm
        out[str(d)] = bytes(g711.ulaw_encode(padded))
    return out


def asked_digit(rtp: RtpStream, encoded: dict[str, bytes]) -> str | None:
    """The digit whose whole prompt is in the received stream (in sequence order), if any.

    The prompts share their start ("Please type the digit"), so only a complete match counts;
    when two would match, the longer one is the one that was sent."""
    frames = sorted(rtp.payloads, key=lambda p: p[0])  # no 16-bit wrap within one call, mostly
    stream = b"".join(p for _, p in list(rtp.payloads))
    ordered = b"".join(p for _, p in frames)
    hits = [d for d, enc in encoded.items() if enc in stream or enc in ordered]
    return max(hits, key=lambda d: len(encoded[d])) if hits else None


def wait_for_prompt(ua: Transferee, d: Dialog, encoded: dict[str, bytes],
                    timeout: float) -> str:
    """Serve SIP while the greeting, beep, listening window and digit prompt come in."""
    assert d.rtp is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        digit = asked_digit(d.rtp, encoded)
        if digit is not None:
            return digit
        if ua.wait_ended(d, timeout=0.1):
            raise AssertionError(f"the machine hung up before the CAPTCHA: {ua.log}")
    raise AssertionError(f"no digit prompt within {timeout:.1f} s "
                         f"({d.rtp.received} RTP packets received)")


def queue_items(url: str, timeout: float = 5.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        res = spitwall("queue", "list", "--json", redis_url=url)
        assert res.returncode == 0, res.stderr
        items: list[dict[str, Any]] = json.loads(res.stdout)
        if items or time.monotonic() > deadline:
            return items
        time.sleep(0.2)


def call_until_prompt(lab: Any, ua: Transferee) -> tuple[Dialog, str, float]:
    """Call, stay silent, and return the dialog, the asked digit and the prompt's length."""
    st = lab.state
    prompts = Path(st.workdir) / "prompts"
    encoded = encoded_prompts(prompts)
    lead_s = wav_seconds(prompts / "greeting.wav") + wav_seconds(prompts / "beep.wav")
    longest = max(len(e) for e in encoded.values()) / 8000
    d = ua.invite(f"sip:{CALLEE}@{st.sip_addr}:{st.sip_port}",
                  pcm=np.zeros(FRAME, dtype=np.int16), dtmf_pt=DTMF_PT)
    assert d.invite_status == 200, ua.log
    assert d.rtp is not None
    assert d.dtmf_pt is not None, "the 200's SDP agreed on no telephone-event"
    digit = wait_for_prompt(ua, d, encoded, timeout=lead_s + LISTEN_S + longest + 8.0)
    return d, digit, len(encoded[digit]) / 8000


def test_caller_who_types_the_asked_digit_is_human(captcha_lab: Any,
                                                   caller: Transferee) -> None:
    d, digit, _prompt_s = call_until_prompt(captcha_lab, caller)
    assert d.rtp is not None and d.dtmf_pt is not None
    d.rtp.send_dtmf(digit, d.dtmf_pt)
    # no token key: no REFER, a voicemail (beep + up to record_seconds), then the machine's BYE
    assert caller.wait_ended(d, timeout=CAPTCHA_WAIT_S + RECORD_S + 10.0), caller.log
    assert d.rtp.dtmf_sent >= 4  # the whole key press went out (the call lasted)
    assert caller.wait_request("REFER", timeout=0.1, call_id=d.call_id) is None
    items = queue_items(captcha_lab.state.redis_url)
    assert len(items) == 1, items
    msg = items[0]
    assert msg["queue"] == "voicemail", msg
    assert msg["verdict"] == "human" and msg["captcha"] == "passed", msg
    assert msg["caller_key"] == f"carol@{caller.ip}" and msg["callee"] == CALLEE, msg
    assert msg["features"]["no_rtp"] == 0.0, msg["features"]  # our silence did arrive
    with wave.open(msg["path"]) as w:
        assert w.getframerate() == 8000 and w.getnframes() > 0


@pytest.mark.parametrize("answer", ["wrong", "none"])
def test_caller_who_fails_the_captcha_is_a_bot(captcha_lab: Any, caller: Transferee,
                                              answer: str) -> None:
    d, digit, prompt_s = call_until_prompt(captcha_lab, caller)
    assert d.rtp is not None and d.dtmf_pt is not None
    if answer == "wrong":
        d.rtp.send_dtmf(str((int(digit) + 1) % 10), d.dtmf_pt)
    # the machine waits captcha_wait_ms after the prompt for a digit, then hangs up on a bot
    assert caller.wait_ended(d, timeout=prompt_s + CAPTCHA_WAIT_S + 10.0), caller.log
    assert (d.rtp.dtmf_sent >= 1) == (answer == "wrong")  # one is enough to end it
    items = queue_items(captcha_lab.state.redis_url)
    assert len(items) == 1, items
    msg = items[0]
    assert msg["queue"] == "spam", msg
    assert msg["verdict"] == "bot" and msg["captcha"] == "failed", msg
    assert msg["caller_key"] == f"carol@{caller.ip}" and msg["callee"] == CALLEE, msg


def test_voicemail_after_the_captcha_keeps_the_callers_message(captcha_lab: Any,
                                                               caller: Transferee) -> None:
    d, digit, _prompt_s = call_until_prompt(captcha_lab, caller)
    assert d.rtp is not None and d.dtmf_pt is not None
    d.rtp.send_dtmf(digit, d.dtmf_pt)
    d.rtp.play(tone(440, (RECORD_S + 1) * 1000, dbfs=-6.0))  # "the message", after the digit
    sent = time.monotonic()
    assert caller.wait_ended(d, timeout=CAPTCHA_WAIT_S + RECORD_S + 10.0), caller.log
    recorded_s = time.monotonic() - sent
    items = queue_items(captcha_lab.state.redis_url)
    assert [(i["queue"], i["captcha"]) for i in items] == [("voicemail", "passed")], items
    with wave.open(items[0]["path"]) as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    loud_s = int(np.count_nonzero(np.abs(pcm) > 3000)) / 8000
    assert recorded_s >= RECORD_S - 1.0, f"the machine hung up {recorded_s:.2f} s after the digit"
    assert loud_s >= 1.0, f"the voicemail holds {loud_s:.2f} s of the caller's tone"
