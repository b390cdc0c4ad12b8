"""The answering machine (`spitwall media`, started by a lab) against hostile or broken callers.

A small Python UA calls the media server directly on its SIP port (the lab's ``media_uri``):
junk RTP during a call, oversized and malformed SDP offers, a 200 that is never ACKed, and a
caller that never sends RTP. After each, the process must be alive, answer OPTIONS, and the
calls must end by themselves within bounded time.
"""

from __future__ import annotations

import os
import secrets
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from media.sdp import SessionDescription
from ops.procs import pid_alive, sip_options_ping
from tests.integration.helpers import spitwall

pytestmark = pytest.mark.integration

UA_IP = "127.0.0.1"


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: str
    raw: str


def parse(data: bytes) -> tuple[str, dict[str, str], str]:
    text = data.decode("utf-8", "replace")
    head, _, body = text.partition("\r\n\r\n")
    lines = head.split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), value.strip())
    return lines[0], headers, body


class Ua:
    """Just enough of a SIP UA over UDP to place one call on the media server."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((UA_IP, 0))
        self.port = self.sock.getsockname()[1]
        self.rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.rtp.bind((UA_IP, 0))
        self.call_id = secrets.token_hex(10) + "@bad-input"
        self.tag = secrets.token_hex(4)
        self.to_hdr = ""
        self.remote_contact = ""

    def close(self) -> None:
        self.sock.close()
        self.rtp.close()

    def offer(self) -> str:
        return (f"v=0\r\no=- 1 1 IN IP4 {UA_IP}\r\ns=-\r\nc=IN IP4 {UA_IP}\r\nt=0 0\r\n"
                f"m=audio {self.rtp.getsockname()[1]} RTP/AVP 0 101\r\n"
                "a=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n"
                "a=fmtp:101 0-15\r\na=ptime:20\r\n")

    def request(self, method: str, cseq: int, body: str = "", *, uri: str | None = None,
                to: str | None = None, content_length: int | None = None) -> bytes:
        uri = uri or f"sip:15551230000@{self.target[0]}:{self.target[1]}"
        lines = [
            f"{method} {uri} SIP/2.0",
            f"Via: SIP/2.0/UDP {UA_IP}:{self.port};branch=z9hG4bK{secrets.token_hex(8)};rport",
            f'From: "Bad" <sip:bad@{UA_IP}:{self.port}>;tag={self.tag}',
            f"To: {to or f'<sip:15551230000@{self.target[0]}>'}",
            f"Call-ID: {self.call_id}",
            f"CSeq: {cseq} {method}",
            f"Contact: <sip:bad@{UA_IP}:{self.port}>",
            "Max-Forwards: 70",
        ]
        if body:
            lines.append("Content-Type: application/sdp")
        clen = len(body.encode()) if content_length is None else content_length
        lines.append(f"Content-Length: {clen}")
        return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()

    def send(self, data: bytes) -> None:
        self.sock.sendto(data, self.target)

    def recv(self, timeout: float) -> tuple[str, dict[str, str], str] | None:
        self.sock.settimeout(max(0.01, timeout))
        try:
            data, _ = self.sock.recvfrom(65535)
        except TimeoutError:
            return None
        return parse(data)

    def final(self, timeout: float = 5.0) -> Response | None:
        """The first final response to our INVITE (provisionals skipped)."""
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            got = self.recv(left)
            if got is None:
                return None
            first, headers, body = got
            if first.startswith("SIP/2.0 ") and "INVITE" in headers.get("cseq", ""):
                status = int(first.split()[1])
                if status >= 200:
                    return Response(status, headers, body, first)
        return None

    def invite(self, body: str | None = None, **kw: Any) -> Response | None:
        self.send(self.request("INVITE", 1, self.offer() if body is None else body, **kw))
        return self.final()

    def ack(self, ok: Response) -> None:
        self.to_hdr = ok.headers["to"]
        self.remote_contact = ok.headers["contact"].strip("<>").split(">")[0]
        self.send(self.request("ACK", 1, uri=self.remote_contact, to=self.to_hdr))

    def wait_bye(self, timeout: float) -> tuple[float, int]:
        """Wait for the server's BYE (answered 200); returns (when, 200 retransmissions seen)."""
        end = time.monotonic() + timeout
        retrans = 0
        while (left := end - time.monotonic()) > 0:
            got = self.recv(left)
            if got is None:
                break
            first, headers, _ = got
            if first.startswith("SIP/2.0 200") and "INVITE" in headers.get("cseq", ""):
                retrans += 1
            if first.startswith("BYE "):
                reply = ["SIP/2.0 200 OK"] + [
                    f"{name}: {headers[name.lower()]}"
                    for name in ("Via", "From", "To", "Call-ID", "CSeq")
                ] + ["Content-Length: 0"]
                self.send(("\r\n".join(reply) + "\r\n\r\n").encode())
                return time.monotonic(), retrans
        raise AssertionError(f"no BYE from the media server within {timeout:.0f} s")


def media_target(lab: Any) -> tuple[str, int]:
    uri = lab.state.media_uri
    return lab.state.sip_addr, int(uri.rsplit(":", 1)[1].split(";", 1)[0])


def assert_healthy(lab: Any) -> None:
    host, port = media_target(lab)
    assert pid_alive(lab.state.pids["media"])
    assert sip_options_ping(host, port, 2.0) == 200
    log = Path(lab.state.logs["media"]).read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]


def rtp(pt: int, seq: int, ts: int, ssrc: int, payload: bytes, marker: bool = False) -> bytes:
    return struct.pack("!BBHII", 0x80, (0x80 if marker else 0) | pt, seq & 0xFFFF,
                       ts & 0xFFFFFFFF, ssrc) + payload


def junk_packets() -> list[bytes]:
    silence = b"\xff" * 160
    return [
        b"", b"\x80", b"\x80\x00\x00", os.urandom(11),  # empty and truncated headers
        os.urandom(172), os.urandom(1400), os.urandom(4000),  # random garbage, oversized
        b"\x00" * 172,  # RTP version 0
        bytes([0x8F]) + rtp(0, 1, 0, 1, b"")[1:],  # CSRC count 15, no CSRC list
        bytes([0x90]) + rtp(0, 2, 0, 1, b"")[1:] + b"\x00\x01\xff\xff",  # extension too long
        bytes([0xA0]) + rtp(0, 3, 0, 1, silence[:10] + b"\xff")[1:],  # padding > packet
        rtp(8, 4, 160, 1, silence),  # PCMA, not negotiated
        rtp(96, 5, 320, 1, silence), rtp(127, 6, 480, 1, b"x"),  # dynamic, not negotiated
        rtp(13, 7, 640, 1, b"\x40"),  # comfort noise
        rtp(101, 8, 800, 1, b"\x01"),  # truncated telephone-event
        rtp(101, 9, 800, 1, b"\xff\x80\xff\xff"),  # telephone-event 255, end
        rtp(0, 10, 960, 1, b""), rtp(0, 11, 1120, 1, b"\xff" * 3),  # empty / odd G.711 payload
    ]


@pytest.fixture
def am_lab(lab_factory: Any) -> Any:
    lab = lab_factory()
    url = lab.state.redis_url
    for k, v in (("divert_threshold", "0"), ("reject_threshold", "0.99"),
                 ("media.captcha", "off"), ("media.record_seconds", "5"),
                 ("media.max_call_seconds", "60")):
        assert spitwall("config", "set", k, v, redis_url=url).returncode == 0, k
    time.sleep(2.2)  # the media server's config poll
    return lab


def answered_call(lab: Any) -> tuple[Ua, Response]:
    ua = Ua(media_target(lab))
    ok = ua.invite()
    assert ok is not None and ok.status == 200, ok
    ua.ack(ok)
    return ua, ok


def remote_rtp(ok: Response) -> tuple[str, int]:
    sdp = SessionDescription.parse(ok.body)
    audio = next(m for m in sdp.media if m.media == "audio")
    return audio.connection_address or "", audio.port


def test_junk_rtp_and_ssrc_change_do_not_break_the_call(am_lab: Any) -> None:
    ua, ok = answered_call(am_lab)
    try:
        dest = remote_rtp(ok)
        assert dest[1] > 0
        junk = junk_packets()
        start = time.monotonic()
        seq, ts = 100, 0
        frame = b"\x7e\xff" * 80  # quiet mu-law
        for i in range(150):  # 3 s: valid frames, junk in between, SSRC changes half way
            ssrc = 0x1111 if i < 75 else 0x2222
            if i == 75:
                seq, ts = 40000, 123456789
            ua.rtp.sendto(rtp(0, seq, ts, ssrc, frame, marker=i in (0, 75)), dest)
            seq, ts = seq + 1, ts + 160
            ua.rtp.sendto(junk[i % len(junk)], dest)
            if i % 10 == 0:
                for pkt in junk:
                    ua.rtp.sendto(pkt, dest)
            time.sleep(0.02)
        assert_healthy(am_lab)  # mid-call
        when, _ = ua.wait_bye(45.0)
        assert when - start < 45.0
    finally:
        ua.close()
    assert_healthy(am_lab)


@pytest.mark.parametrize(
    "body",
    [
        "hello, this is not SDP\r\n",
        "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
        "m=audio notaport RTP/AVP 0\r\n",
        "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
        "m=video 4000 RTP/AVP 31\r\n",  # no audio
        "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
        "m=audio 4000 RTP/AVP 18\r\na=rtpmap:18 G729/8000\r\n",  # no G.711
        # as large as a UDP datagram allows (~63 KB), with far more lines than an SDP may have
        "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
        "m=audio 4000 RTP/AVP 0\r\n" + "a=x-filler:0123456789\r\n" * 2700,
    ],
    ids=["garbage", "bad-port", "no-audio", "no-g711", "huge"],
)
def test_bad_sdp_is_refused_with_4xx(am_lab: Any, body: str) -> None:
    ua = Ua(media_target(am_lab))
    try:
        res = ua.invite(body)
        assert res is not None, "no final answer"
        assert res.status in (400, 488), res.raw
        # the ACK for the non-2xx final answer (same transaction), as a UA would send it
    finally:
        ua.close()
    assert_healthy(am_lab)


def test_body_beyond_udp_size_and_lying_content_length(am_lab: Any) -> None:
    ua = Ua(media_target(am_lab))
    try:
        # Content-Length says 70,000: more than the datagram holds (and than MAX_SDP_BYTES)
        res = ua.invite(ua.offer(), content_length=70000)
        assert res is None or 400 <= res.status < 500, res
        # a datagram filled up to the UDP limit
        body = ua.offer() + "a=x-filler:" + "z" * 65507
        data = ua.request("INVITE", 1, body)[:65507]
        ua.send(data)
        res = ua.final(3.0)
        assert res is None or 400 <= res.status < 500, res
    finally:
        ua.close()
    assert_healthy(am_lab)


def test_answered_but_never_acked_call_is_given_up(am_lab: Any) -> None:
    ua = Ua(media_target(am_lab))
    try:
        ok = ua.invite()
        assert ok is not None and ok.status == 200
        start = time.monotonic()
        when, retrans = ua.wait_bye(50.0)  # 64*T1 = 32 s, then BYE
        assert retrans >= 3  # the 200 was retransmitted while we stayed silent
        assert when - start < 50.0
    finally:
        ua.close()
    assert_healthy(am_lab)
    ua2, _ok = answered_call(am_lab)  # the tables emptied out: the next call works
    try:
        ua2.wait_bye(45.0)
    finally:
        ua2.close()
    assert_healthy(am_lab)


def test_caller_that_never_sends_rtp_is_bounded(am_lab: Any) -> None:
    start = time.monotonic()
    ua, _ok = answered_call(am_lab)
    try:
        when, _ = ua.wait_bye(45.0)
    finally:
        ua.close()
    assert when - start < 45.0
    out = spitwall("queue", "list", "--json", redis_url=am_lab.state.redis_url)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count('"voicemail"') <= 1  # a voicemail (of silence) or nothing
    assert_healthy(am_lab)
