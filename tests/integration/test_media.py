"""Phase 2 through the real proxy: Kamailio diverts to the answering machine (`spitwall media`,
started by the lab), SIPp callers stream audio generated at test time with espeak-ng + sox."""

from __future__ import annotations

import json
import subprocess
import wave
from pathlib import Path
from typing import Any

import pytest
import redis

from ops.sipp import SIPP_DIR, free_udp_port, sipp_binary, write_injection
from scoring.reputation import read
from tests.integration.helpers import spitwall

pytestmark = pytest.mark.integration

BOT_TEXT = ("Congratulations! You have been selected for a free cruise to the Bahamas. "
            "Press one now to claim your prize before this offer expires.")


def ulaw_wav(text: str, path: Path) -> Path:
    raw = path.with_suffix(".raw.wav")
    subprocess.run(["espeak-ng", "-w", str(raw), text], check=True, capture_output=True)
    subprocess.run(["sox", str(raw), "-r", "8000", "-c", "1", "-e", "u-law", str(path)],
                   check=True, capture_output=True)
    return path


def call(lab: Any, tmp: Path, src_ip: str, caller: str, wav: Path | None,
         loop: int = -1) -> subprocess.CompletedProcess[str]:
    """One SIPp call through the proxy that streams `wav` (or nothing) until the far end
    hangs up."""
    xml = (SIPP_DIR / "uac_rtp.xml").read_text()
    if wav is None:
        start = xml.index("  <nop>")
        xml = xml[:start] + xml[xml.index("</nop>", start) + len("</nop>\n"):]
    else:
        xml = xml.replace("@WAV@", str(wav)).replace("@LOOP@", str(loop))
    scenario = tmp / f"uac_rtp_{caller}.xml"
    scenario.write_text(xml)
    inf = write_injection(tmp / f"{caller}.csv", [(caller, "15551230000", "Caller", "x/1")])
    st = lab.state
    addr = st.sip_addr6 if ":" in src_ip and st.sip_addr6 else st.sip_addr  # the caller's family
    host = f"[{addr}]" if ":" in addr else addr
    cmd = [sipp_binary(), f"{host}:{st.sip_port}", "-sf", str(scenario), "-inf",
           str(inf), "-i", src_ip, "-p", str(free_udp_port(src_ip)), "-mi", src_ip,
           "-mp", str(free_udp_port(src_ip, also_plus=(2,))), "-m", "1", "-nostdin",
           "-timeout", "90", "-timeout_error"]
    if ":" in src_ip:  # sipp's control socket is IPv4 only
        cmd += ["-ci", "127.0.0.1", "-cp", str(free_udp_port("127.0.0.1"))]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp,
                          check=False)


def queue(url: str) -> list[dict[str, Any]]:
    out = spitwall("queue", "list", "--json", redis_url=url)
    assert out.returncode == 0, out.stderr
    data: list[dict[str, Any]] = json.loads(out.stdout)
    return data


@pytest.fixture
def am_lab(lab_factory: Any, request: pytest.FixtureRequest) -> Any:
    lab = lab_factory(**getattr(request, "param", {}))
    url = lab.state.redis_url
    for k, v in (("divert_threshold", "0"), ("reject_threshold", "0.99"),
                 ("media.record_seconds", "5")):
        assert spitwall("config", "set", k, v, redis_url=url).returncode == 0
    return lab


@pytest.mark.parametrize(("am_lab", "src", "rep_key"), [
    ({}, "127.0.21.1", "spitwall:{ip:127.0.21.1}:rep"),
    # an IPv6 lab, and a dual-stack one (SIP to the answering machine over IPv4, RTP over
    # IPv6: --rtp-addr); the verdict lands on the caller's /64, not on its address
    ({"sip_addr": "::1"}, "::1", "spitwall:{ip:::/64}:rep"),
    ({"sip_addr6": "::1"}, "::1", "spitwall:{ip:::/64}:rep"),
], ids=["ipv4", "ipv6-lab", "dual-stack-lab"], indirect=["am_lab"])
def test_bot_talking_from_the_first_packet_ends_in_the_spam_queue(
        am_lab: Any, tmp_path: Path, src: str, rep_key: str) -> None:
    wav = ulaw_wav(BOT_TEXT, tmp_path / "bot.wav")
    res = call(am_lab, tmp_path, src, "promo1", wav)
    assert res.returncode == 0, res.stdout[-1500:]
    url = am_lab.state.redis_url
    items = queue(url)
    assert [i["queue"] for i in items] == ["spam"], items
    msg = items[0]
    caller = f"promo1@{src}" if ":" not in src else "promo1@[::1]"
    assert msg["verdict"] == "bot" and msg["caller_key"] == caller
    assert msg["callee"] == "15551230000" and msg["source_ip"] == src
    assert msg["features"]["onset_ms"] < 500
    with wave.open(msg["path"]) as w:
        assert w.getframerate() == 8000 and w.getnframes() >= 8000 * 4  # the message
    client = redis.Redis.from_url(url)
    rep = read(client, caller=caller, ip=src, half_life=3 * 86400)
    assert rep["caller"]["score"] >= 0.5 and rep["ip"]["score"] >= 0.5
    assert client.exists(rep_key)
    if ":" in src:
        assert not client.exists("spitwall:{ip:::1}:rep")  # not per address


def test_silent_caller_without_captcha_leaves_a_voicemail(am_lab: Any, tmp_path: Path) -> None:
    url = am_lab.state.redis_url
    assert spitwall("config", "set", "media.captcha", "off", redis_url=url).returncode == 0
    res = call(am_lab, tmp_path, "127.0.21.2", "quiet1", None)
    assert res.returncode == 0, res.stdout[-1500:]
    items = queue(url)
    assert [i["queue"] for i in items] == ["voicemail"], items
    assert items[0]["verdict"] == "unsure" and items[0]["features"]["no_rtp"] == 1.0
    rep = read(redis.Redis.from_url(url), caller="quiet1@127.0.21.2", half_life=3 * 86400)
    assert rep["caller"]["score"] < 0.05  # only the divert nudge; "unsure" changes nothing


def test_hello_then_answer_after_the_beep_is_judged_human(am_lab: Any, tmp_path: Path) -> None:
    """A person who says "hello?" at pickup, listens, and speaks after the beep passes. With no
    token key there is no transfer, so the call ends as a voicemail with the verdict human."""
    prompts = Path(am_lab.state.workdir) / "prompts"
    with wave.open(str(prompts / "greeting.wav")) as w:
        greet_s = w.getnframes() / w.getframerate()
    with wave.open(str(prompts / "beep.wav")) as w:
        beep_s = w.getnframes() / w.getframerate()
    hello = ulaw_wav("Hello?", tmp_path / "hello.wav")
    answer = ulaw_wav("Hi, this is Alice. I am calling about dinner on Friday.",
                      tmp_path / "answer.wav")
    person = tmp_path / "person.wav"
    subprocess.run(["sox", str(hello), "-e", "signed-integer", "-b", "16", str(tmp_path / "a.wav"),
                    "pad", "0.3", "0"], check=True)
    subprocess.run(["sox", str(answer), "-e", "signed-integer", "-b", "16",
                    str(tmp_path / "b.wav")], check=True)
    gap = greet_s + beep_s + 0.5
    subprocess.run(["sox", str(tmp_path / "a.wav"), str(tmp_path / "a_pad.wav"), "pad", "0",
                    f"{gap:.2f}", "trim", "0", f"{gap:.2f}"], check=True)
    subprocess.run(["sox", str(tmp_path / "a_pad.wav"), str(tmp_path / "b.wav"), "-r", "8000",
                    "-c", "1", "-e", "u-law", str(person)], check=True)
    res = call(am_lab, tmp_path, "127.0.21.3", "alice", person, loop=1)
    assert res.returncode == 0, res.stdout[-1500:]
    items = queue(am_lab.state.redis_url)
    assert len(items) == 1, items
    assert items[0]["verdict"] == "human", json.dumps(items[0]["features"])
    assert items[0]["queue"] == "voicemail"
    assert items[0]["features"]["hellos"] >= 1
