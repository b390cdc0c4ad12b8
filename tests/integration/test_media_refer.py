"""Issue 4 end to end: a caller the answering machine judges human is put through.

Real lab (Kamailio + Redis + `spitwall media`), a SIPp UAS as the original callee's next hop,
and a small Python UA (`tests.integration.transferee`) as the caller: it stays silent during
the greeting and the beep, speaks after them, follows the machine's REFER with a new INVITE
that carries the pass token from the Refer-To URI, and the proxy relays that INVITE to the
callee (token accepted, header stripped) instead of diverting it again. A forged or expired
token gets no such treatment.
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

from media.audio import load_pcm, synth
from ops.sipp import UasProcess, start_uas
from scoring import passtoken
from tests.integration.helpers import spitwall
from tests.integration.transferee import Dialog, Transferee, refer_target

pytestmark = pytest.mark.integration

TOKEN_KEY = "0123456789abcdef0123456789ABCDEF"  # 32 characters
CALLEE = "15551230000"
SPEECH = "Hi, this is Alice. I am calling about dinner on Friday."
NOTIFY_HEADERS = [("Event", "refer"), ("Subscription-State", "terminated;reason=noresource"),
                  ("Content-Type", "message/sipfrag")]


@pytest.fixture
def refer_lab(lab_factory: Any) -> Iterator[tuple[Any, UasProcess]]:
    uas = start_uas("127.0.0.1")
    try:
        lab = lab_factory(next_hop=f"sip:127.0.0.1:{uas.port}")
        url = lab.state.redis_url
        for k, v in (("divert_threshold", "0"), ("reject_threshold", "0.99"),
                     ("media.token_key", TOKEN_KEY), ("media.captcha", "off"),
                     ("media.record_seconds", "5")):
            res = spitwall("config", "set", k, v, redis_url=url)
            assert res.returncode == 0, res.stderr
        yield lab, uas
    finally:
        uas.close()


@pytest.fixture
def caller(refer_lab: tuple[Any, UasProcess]) -> Iterator[Transferee]:
    st = refer_lab[0].state
    ua = Transferee("127.0.22.1", (st.sip_addr, st.sip_port))
    try:
        yield ua
    finally:
        ua.hang_up_and_close()


def explain(lab: Any, call_id: str, timeout: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        res = spitwall("explain", call_id, "--json", redis_url=lab.state.redis_url)
        if res.returncode == 0:
            data: dict[str, Any] = json.loads(res.stdout)
            return data
        if time.monotonic() > deadline:
            raise AssertionError(f"no decision for {call_id}: {res.stderr}")
        time.sleep(0.2)


def wav_seconds(path: Path) -> float:
    with wave.open(str(path)) as w:
        return float(w.getnframes() / w.getframerate())


def uas_invites(uas: UasProcess, call_id: str, timeout: float = 5.0) -> list[Any]:
    deadline = time.monotonic() + timeout
    while True:
        found = [m for m in uas.invite_messages() if m.call_id == call_id]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_silent_then_speaking_caller_is_put_through(refer_lab: tuple[Any, UasProcess],
                                                    caller: Transferee,
                                                    tmp_path: Path) -> None:
    lab, uas = refer_lab
    st = lab.state
    prompts = Path(st.workdir) / "prompts"
    lead_s = wav_seconds(prompts / "greeting.wav") + wav_seconds(prompts / "beep.wav")
    speech = load_pcm(synth(SPEECH, tmp_path / "speech.wav"))
    pcm = np.concatenate([np.zeros(int((lead_s + 0.4) * 8000), dtype=np.int16), speech])

    first = caller.invite(f"sip:{CALLEE}@{st.sip_addr}:{st.sip_port}", pcm=pcm)
    assert first.invite_status == 200, caller.log
    assert first.route_set, "the proxy must record-route the diverted call"
    d1 = explain(lab, first.call_id)
    assert d1["action"] == "divert", d1

    # greeting + beep + 3 s listening window, then the REFER
    got = caller.wait_request("REFER", timeout=lead_s + 15.0, call_id=first.call_id)
    assert got is not None, caller.log
    refer, addr = got
    caller.reply(refer, addr, 202, "Accepted")
    assert first.rtp is not None and first.rtp.received > 0  # the greeting reached us
    first.rtp.stop()

    ruri, headers = refer_target(refer)
    assert [name for name, _ in headers] == ["X-Spitwall-Pass"], refer.get("Refer-To")
    assert ruri.startswith(f"sip:{CALLEE}@"), ruri
    token = headers[0][1]
    assert "%" not in token and token.count(".") == 1

    second = caller.invite(ruri, extra=headers)
    assert second.call_id != first.call_id
    sipfrag = f"SIP/2.0 {second.invite_status} {'OK' if second.invite_status == 200 else 'X'}"
    notify = caller.request(first, "NOTIFY", extra=NOTIFY_HEADERS, body=sipfrag + "\r\n")
    assert second.invite_status == 200, caller.log
    assert notify == 200, caller.log

    relayed = uas_invites(uas, second.call_id)
    assert relayed, "the callee's next hop never saw the transferred INVITE"
    inv = relayed[0]
    assert (inv.request_uri or "").startswith(f"sip:{CALLEE}@"), inv.first_line
    assert not inv.has_header("X-Spitwall-Pass"), inv.raw  # the proxy strips the token
    assert not any(m.call_id == first.call_id for m in uas.invite_messages())

    d2 = explain(lab, second.call_id)
    assert d2["rule"] == "pass" and d2["action"] == "relay", d2

    # the machine hangs up its leg once the transfer succeeded; we hang up the new call
    assert caller.wait_ended(first, timeout=10.0), caller.log
    assert caller.bye(second) == 200, caller.log
    res = spitwall("queue", "list", "--json", redis_url=st.redis_url)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == []  # put through: no voicemail, no spam entry


@pytest.mark.parametrize("kind", ["forged", "expired", "other_callee", "garbage"])
def test_bad_pass_token_is_scored_normally(refer_lab: tuple[Any, UasProcess],
                                          caller: Transferee, kind: str) -> None:
    lab, uas = refer_lab
    st = lab.state
    me = f"{caller.user}@{caller.ip}"
    token = {
        "forged": passtoken.issue("f" * 32, me, CALLEE, 60),
        "expired": passtoken.issue(TOKEN_KEY, me, CALLEE, 60, now=time.time() - 3600),
        "other_callee": passtoken.issue(TOKEN_KEY, me, "15559990000", 60),
        "garbage": "not-a-token",
    }[kind]
    d: Dialog = caller.invite(f"sip:{CALLEE}@{st.sip_addr}:{st.sip_port}",
                              extra=[("X-Spitwall-Pass", token)])
    decision = explain(lab, d.call_id)
    assert decision["rule"] != "pass", decision
    assert decision["action"] == "divert", decision  # divert_threshold 0: diverted again
    assert d.invite_status == 200, caller.log  # the answering machine took it
    assert caller.bye(d) == 200, caller.log
    assert uas_invites(uas, d.call_id, timeout=0.5) == []
