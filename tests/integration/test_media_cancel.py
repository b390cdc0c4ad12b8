"""A diverted call cancelled before the answering machine answers, through the real proxy.

The answering machine normally answers at once; with a ring delay (`spitwall media --ring-ms`,
here through `$SPITWALL_MEDIA_RING_MS`, which the lab passes on to it) it sends 180 Ringing and
waits. A SIPp caller (tests/sipp/uac_cancel.xml) cancels on the 180: Kamailio answers the
CANCEL with 200, relays it in the INVITE's transaction, and the answering machine's 487 comes
back through it (the two in either order). Nothing else may happen: no session, no queue
entry, no phase-2 verdict in the caller's or the source's reputation (only the proxy's own
divert observation).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from ops.sipp import SIPP_DIR, free_udp_port, sipp_binary, write_injection
from scoring.reputation import read
from tests.integration.helpers import spitwall
from tests.integration.test_media import BOT_TEXT, call, queue, ulaw_wav

pytestmark = pytest.mark.integration

RING_MS = 3000
HALF_LIFE = 3 * 86400


@pytest.fixture
def ringing_lab(lab_factory: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("SPITWALL_MEDIA_RING_MS", str(RING_MS))  # inherited by `media.server`
    lab = lab_factory()
    url = lab.state.redis_url
    for k, v in (("divert_threshold", "0"), ("reject_threshold", "0.99"),
                 ("media.captcha", "off"), ("media.record_seconds", "5")):
        assert spitwall("config", "set", k, v, redis_url=url).returncode == 0
    return lab


def either_order_scenario(tmp: Path) -> Path:
    """tests/sipp/uac_cancel.xml, taking the CANCEL's 200 and the INVITE's 487 in either order.

    The proxy answers the CANCEL itself and relays it; the answering machine's 487 may be
    relayed by another Kamailio child before the 200 leaves (RFC 3261 orders neither). The
    ACK for the 487 is sent as soon as it arrives, so that it carries the 487's To tag."""
    xml = (SIPP_DIR / "uac_cancel.xml").read_text()
    recvs = '  <recv response="200" />\n  <recv response="487" />\n'
    head, tail = xml.split(recvs)
    ack = tail[: tail.index("</send>") + len("</send>")]
    rest = tail[len(ack):]
    path = tmp / "uac_cancel_either.xml"
    path.write_text(
        head
        + '  <recv response="200" optional="true" next="cancel_ok" />\n'
        + '  <recv response="487" />\n' + ack + '\n'
        + '  <recv response="200" next="done" />\n'
        + '  <label id="cancel_ok" />\n'
        + '  <recv response="487" />\n' + ack + '\n'
        + '  <label id="done" />\n' + rest)
    return path


def cancel_call(lab: Any, tmp: Path, src_ip: str) -> subprocess.CompletedProcess[str]:
    """INVITE through the proxy, CANCEL on the 180; succeeds on 200 (CANCEL) + 487 (INVITE)."""
    inf = write_injection(tmp / "cancel.csv", [("carol", "bob", "Carol", "Linphone/5.2.0")])
    st = lab.state
    cmd = [sipp_binary(), f"{st.sip_addr}:{st.sip_port}", "-sf", str(either_order_scenario(tmp)),
           "-inf", str(inf), "-i", src_ip, "-p", str(free_udp_port(src_ip)), "-mi", src_ip,
           "-mp", str(free_udp_port(src_ip, also_plus=(2,))), "-m", "1", "-nostdin",
           "-timeout", "20", "-timeout_error", "-trace_err"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=40, cwd=tmp,
                          check=False)


def test_cancel_while_the_answering_machine_rings(ringing_lab: Any, tmp_path: Path) -> None:
    url = ringing_lab.state.redis_url
    started = time.monotonic()
    res = cancel_call(ringing_lab, tmp_path, "127.0.22.1")
    errors = "".join(p.read_text() for p in tmp_path.glob("*errors.log"))
    assert res.returncode == 0, (res.stdout[-1500:], errors[-1500:])
    assert time.monotonic() - started < RING_MS / 1000  # cancelled while ringing, not after
    time.sleep(RING_MS / 1000 + 1.0)  # past the moment it would have answered
    assert queue(url) == []
    rep = read(redis.Redis.from_url(url), caller="carol@127.0.22.1", ip="127.0.22.1",
               half_life=HALF_LIFE)
    # the proxy's divert nudge (one observation, 0.03 towards spam) and nothing else: a
    # phase-2 verdict would be a second observation, "bot" 0.5 towards spam
    assert rep["caller"]["events"] == 1 and rep["caller"]["score"] < 0.05, rep
    assert rep["ip"]["events"] == 1 and rep["ip"]["score"] < 0.05, rep
    log = (Path(ringing_lab.state.workdir) / "media.log").read_text()
    assert "failed" not in log and "Traceback" not in log, log[-2000:]


def test_a_call_not_cancelled_is_answered_after_the_ring(ringing_lab: Any,
                                                         tmp_path: Path) -> None:
    """The ring delay only delays: a bot that waits is still answered, judged and queued."""
    wav = ulaw_wav(BOT_TEXT, tmp_path / "bot.wav")
    started = time.monotonic()
    res = call(ringing_lab, tmp_path, "127.0.22.2", "promo2", wav)
    assert res.returncode == 0, res.stdout[-1500:]
    assert time.monotonic() - started > RING_MS / 1000
    items = queue(ringing_lab.state.redis_url)
    assert [(i["queue"], i["verdict"]) for i in items] == [("spam", "bot")], items
