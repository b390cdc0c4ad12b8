"""media/sip.py: the parser on real and hostile input, and the UAS over real loopback UDP.

The UAS tests run a tiny raw-socket UAC (``Peer``) in the same event loop as the UAS; timers
run with a small T1 (or a fake clock where the exact schedule matters).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import heapq
import random
import socket
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import pytest

from media.sip import (
    MAX_MESSAGE_SIZE,
    CallState,
    EndReason,
    NameAddr,
    ServerCall,
    SipMessage,
    SipTimers,
    SipUas,
    SipUri,
    UasConfig,
    Via,
    parse_sipfrag_status,
)

T = TypeVar("T")

SDP_OFFER = (
    "v=0\r\n"
    "o=- 123451 1 IN IP4 127.0.4.4\r\n"
    "s=spitwall-test-uac\r\n"
    "c=IN IP4 127.0.4.4\r\n"
    "t=0 0\r\n"
    "m=audio 26000 RTP/AVP 0 101\r\n"
    "a=rtpmap:0 PCMU/8000\r\n"
    "a=rtpmap:101 telephone-event/8000\r\n"
    "a=fmtp:101 0-15\r\n"
    "a=ptime:20\r\n"
    "a=sendrecv\r\n"
)
SDP_ANSWER = (
    "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=am\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    "m=audio 30000 RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\n"
    "a=rtpmap:101 telephone-event/8000\r\na=sendrecv\r\n"
)

# A SIPp INVITE (tests/sipp/uac.xml) as Kamailio relays it to the answering machine: Kamailio's
# Via on top, SIPp's below, Record-Route, Diversion and the score header added.
KAMAILIO_INVITE = (
    "INVITE sip:spitwall-am@127.0.0.1:25090 SIP/2.0\r\n"
    "Record-Route: <sip:127.0.0.1:25060;lr>\r\n"
    "Via: SIP/2.0/UDP 127.0.0.1:25060;branch=z9hG4bKe3b1.3f5c0a8b6e2cbd1a6f5d5e3c1b2a4f6e.0\r\n"
    "Via: SIP/2.0/UDP 127.0.4.4:25061;branch=z9hG4bK-3891-1-0\r\n"
    'From: "Prize Desk" <sip:spam001@127.0.4.4:25061>;tag=3891SIPpTag001\r\n'
    "To: <sip:4155550001@127.0.0.1:25060>\r\n"
    "Call-ID: 1-3891@127.0.4.4\r\n"
    "CSeq: 1 INVITE\r\n"
    "Contact: <sip:spam001@127.0.4.4:25061;transport=UDP>\r\n"
    "Max-Forwards: 69\r\n"
    "User-Agent: Asterisk PBX 18\r\n"
    "Allow: INVITE, ACK, BYE, CANCEL, OPTIONS\r\n"
    "Content-Type: application/sdp\r\n"
    f"Content-Length: {len(SDP_OFFER)}\r\n"
    "Diversion: <sip:4155550001@127.0.0.1:25060>;reason=unconditional;spitwall-score=0.42\r\n"
    "X-Spitwall-Score: 0.42\r\n"
    "\r\n" + SDP_OFFER
).encode()

COMPACT = (
    "BYE sip:bob@127.0.0.1:5090 SIP/2.0\r\n"
    "v: SIP/2.0/UDP 127.0.0.9:5070;branch=z9hG4bKc1, SIP/2.0/UDP 10.0.0.1;branch=z9hG4bKc0\r\n"
    "f: <sip:alice@127.0.0.9>;tag=a1\r\n"
    "t: Bob <sip:bob@127.0.0.1>;tag=b2\r\n"
    "i: compact-1@127.0.0.9\r\n"
    "CSeq: 7 BYE\r\n"
    "m: <sip:alice@127.0.0.9:5070>\r\n"
    "k: replaces, timer\r\n"
    "s: hello\r\n"
    "e: gzip\r\n"
    "c: text/plain\r\n"
    "l: 5\r\n"
    "\r\n"
    "hello"
).encode("ascii")


# =========================================================================== parsing


def test_parse_kamailio_invite() -> None:
    msg = SipMessage.parse(KAMAILIO_INVITE)
    assert msg.is_request and msg.method == "INVITE"
    assert msg.uri == "sip:spitwall-am@127.0.0.1:25090"
    assert msg.vias == (
        "SIP/2.0/UDP 127.0.0.1:25060;branch=z9hG4bKe3b1.3f5c0a8b6e2cbd1a6f5d5e3c1b2a4f6e.0",
        "SIP/2.0/UDP 127.0.4.4:25061;branch=z9hG4bK-3891-1-0",
    )
    assert msg.branch == "z9hG4bKe3b1.3f5c0a8b6e2cbd1a6f5d5e3c1b2a4f6e.0"
    assert msg.top_via == Via("UDP", "127.0.0.1", 25060, msg.top_via.params)
    assert msg.top_via.sent_by == "127.0.0.1:25060"
    assert msg.from_tag == "3891SIPpTag001"
    assert msg.from_addr.display == "Prize Desk"
    assert msg.to_tag is None
    assert msg.call_id == "1-3891@127.0.4.4"
    assert (msg.cseq.number, msg.cseq.method) == (1, "INVITE")
    assert msg.values("Record-Route") == ["<sip:127.0.0.1:25060;lr>"]
    rr = SipUri.parse(msg.values("Record-Route")[0])
    assert rr.loose_route and rr.address() == ("127.0.0.1", 25060)
    contact = msg.contact
    assert contact is not None
    assert contact.sip_uri == SipUri(
        "sip", "spam001", "127.0.4.4", 25061, (("transport", "UDP"),)
    )
    assert msg.values("Allow") == ["INVITE", "ACK", "BYE", "CANCEL", "OPTIONS"]
    assert msg.get("x-spitwall-score") == "0.42"
    assert (msg.get("Diversion") or "").endswith("spitwall-score=0.42")
    assert msg.content_type == "application/sdp"
    assert msg.body == SDP_OFFER
    # serialize -> parse gives the same message
    assert SipMessage.parse(msg.serialize()) == msg


def test_parse_compact_forms_and_multi_value_via() -> None:
    msg = SipMessage.parse(COMPACT)
    assert msg.call_id == "compact-1@127.0.0.9"
    assert msg.get("Call-ID") == msg.get("i") == msg.get("CALL-ID")
    assert msg.from_tag == "a1" and msg.to_tag == "b2"
    assert msg.to_addr.display == "Bob"
    assert msg.vias == (
        "SIP/2.0/UDP 127.0.0.9:5070;branch=z9hG4bKc1",
        "SIP/2.0/UDP 10.0.0.1;branch=z9hG4bKc0",
    )
    assert msg.branch == "z9hG4bKc1"
    assert msg.values("Supported") == ["replaces", "timer"]
    assert msg.get("Subject") == "hello"
    assert msg.get("content-encoding") == "gzip"
    assert msg.content_type == "text/plain"
    assert msg.body == "hello"
    contact = msg.contact
    assert contact is not None and contact.uri == "sip:alice@127.0.0.9:5070"


def test_parse_response_folding_and_several_via_lines() -> None:
    raw = (
        b"\r\n\r\nSIP/2.0 487 Request   Terminated\r\n"  # leading CRLFs are ignored (7.5)
        b"Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKa\r\n"
        b"Via: SIP/2.0/UDP 127.0.0.2:5062;branch=z9hG4bKb,\r\n"
        b" SIP/2.0/UDP 127.0.0.3:5063;branch=z9hG4bKc\r\n"
        b"From: <sip:a@h>;tag=1\r\n"
        b"To: <sip:b@h>;tag=2\r\n"
        b"Call-ID: x\r\n"
        b"CSeq: 1 INVITE\r\n"
        b"Subject: first\r\n\tsecond\r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    msg = SipMessage.parse(raw)
    assert msg.is_response and msg.status == 487 and msg.reason == "Request   Terminated"
    assert [Via.parse(v).host for v in msg.vias] == ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    assert len(msg.get_all("Via")) == 2
    assert msg.get("Subject") == "first second"
    assert msg.body == ""


def test_body_beyond_content_length_is_discarded_missing_length_takes_the_rest() -> None:
    base = KAMAILIO_INVITE.replace(
        f"Content-Length: {len(SDP_OFFER)}".encode(), b"Content-Length: 4"
    )
    assert SipMessage.parse(base).body == "v=0\r"
    no_len = KAMAILIO_INVITE.replace(f"Content-Length: {len(SDP_OFFER)}\r\n".encode(), b"")
    assert SipMessage.parse(no_len).body == SDP_OFFER


def test_non_utf8_is_kept_and_written_back_unchanged() -> None:
    raw = (
        b"OPTIONS sip:x@127.0.0.1 SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK1\r\n"
        b"From: \"M\xfcller \xff\" <sip:m@127.0.0.1>;tag=1\r\n"
        b"To: <sip:x@127.0.0.1>\r\n"
        b"Call-ID: c1\r\nCSeq: 1 OPTIONS\r\n"
        b"Content-Length: 3\r\n\r\n\x80\x81\xfe"
    )
    msg = SipMessage.parse(raw)
    assert msg.from_addr.display is not None and msg.from_addr.display.startswith("M")
    assert msg.serialize() == raw
    assert SipMessage.parse(msg.serialize()) == msg


BAD_MESSAGES: list[tuple[str, bytes, str]] = [
    ("empty", b"", "empty"),
    ("only crlf", b"\r\n\r\n", "empty"),
    ("oversize", b"OPTIONS sip:a@b SIP/2.0\r\n" + b"X: " + b"a" * MAX_MESSAGE_SIZE, "exceeds"),
    ("no blank line", KAMAILIO_INVITE.split(b"\r\n\r\n")[0], "no empty line"),
    ("negative CL", b"Content-Length: -1", "non-negative"),
    ("absurd CL", b"Content-Length: 999999", "exceeds"),
    ("huge CL", b"Content-Length: 99999999999999999999", "non-negative"),
    ("CL beyond body", b"Content-Length: 5000", "truncated"),
    ("conflicting CL", b"Content-Length: 1\r\nl: 2", "conflicting"),
    ("bad start line", b"HELLO\r\n", "start line"),
    ("SIP/3.0", b"INVITE sip:a@b SIP/3.0\r\n", "version"),
    ("status 700", b"SIP/2.0 700 Weird\r\n", "out of range"),
    ("status 99", b"SIP/2.0 099 Weird\r\n", "out of range"),
    ("bad request-uri", b"INVITE nothing SIP/2.0\r\n", "Request-URI"),
    ("header without colon", b"Foo bar", "without ':'"),
    ("bad header name", b"Fo o: bar", "header name"),
    ("CR in header", b"Subject: a\rb", "CR, LF or NUL"),
    ("NUL in header", b"Subject: a\x00b", "CR, LF or NUL"),
    ("no Via", b"-Via", "missing mandatory header(s): via"),
    ("no From", b"-From", "from"),
    ("no To", b"-To", "to"),
    ("no Call-ID", b"-Call-ID", "call-id"),
    ("no CSeq", b"-CSeq", "cseq"),
    ("CSeq not a number", b"=CSeq: one INVITE", "bad CSeq"),
    ("CSeq no method", b"=CSeq: 1", "bad CSeq"),
    ("CSeq huge", b"=CSeq: 4294967296 INVITE", "2**31"),
    ("CSeq method mismatch", b"=CSeq: 1 BYE", "does not match"),
    ("empty Call-ID", b"=Call-ID: ", "Call-ID"),
    ("bad Via", b"=Via: HTTP/1.1 example.com", "bad Via"),
    ("Via bad port", b"=Via: SIP/2.0/UDP 1.2.3.4:99999;branch=z9hG4bKx", "port"),
    ("From unterminated quote", b'=From: "Eve <sip:e@h>;tag=1', "unterminated"),
    ("From unterminated <", b"=From: <sip:e@h;tag=1", "unterminated"),
    ("To without URI", b"=To: nobody", "bad URI"),
    ("continuation first", b"", "continuation"),
]


def _mutate(name: str, patch: bytes) -> bytes:
    base = KAMAILIO_INVITE
    head, body = base.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    if name in ("empty", "only crlf", "oversize", "no blank line"):
        return patch
    if name in ("bad start line", "SIP/3.0", "status 700", "status 99", "bad request-uri"):
        lines[0] = patch.rstrip(b"\r\n")
    elif name == "continuation first":
        lines.insert(1, b" folded")
    elif patch.startswith(b"-"):
        want = patch[1:].lower() + b":"
        lines = [ln for ln in lines if not ln.lower().startswith(want)]
    elif patch.startswith(b"="):
        hname = patch[1:].split(b":", 1)[0].lower() + b":"
        lines = [patch[1:] if ln.lower().startswith(hname) else ln for ln in lines]
    elif b"Content-Length" in patch or patch.startswith(b"l:"):
        lines = [ln for ln in lines if not ln.lower().startswith(b"content-length:")]
        lines += patch.split(b"\r\n")
    else:
        lines.append(patch)
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


@pytest.mark.parametrize(
    ("name", "patch", "needle"), BAD_MESSAGES, ids=[b[0] for b in BAD_MESSAGES]
)
def test_malformed_messages_raise_value_error(name: str, patch: bytes, needle: str) -> None:
    data = _mutate(name, patch)
    with pytest.raises(ValueError) as err:
        SipMessage.parse(data)
    assert needle.lower() in str(err.value).lower(), (name, str(err.value))


def test_fuzz_parse_raises_only_value_error() -> None:
    rng = random.Random(4242)
    seeds = [KAMAILIO_INVITE, COMPACT, _mutate("x", b"Foo: bar")]
    alphabet = b' \t\r\n:;,<>"@=?\\/%\x00\xff\x80SIPsip0123456789zZ-._[]'
    parsed = 0
    for _ in range(6000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 8)):
            op = rng.random()
            pos = rng.randrange(len(data) + 1)
            if op < 0.35 and data:
                data[min(pos, len(data) - 1)] = rng.choice(alphabet)
            elif op < 0.6:
                data[pos:pos] = bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 6)))
            elif op < 0.8 and data:
                del data[pos : pos + rng.randint(1, 20)]
            elif op < 0.9:
                data = data[:pos]
            else:
                data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 30)))
        try:
            msg = SipMessage.parse(bytes(data))
        except ValueError:
            continue
        parsed += 1
        # whatever parses can be used: lookups, helpers and a round trip
        again = SipMessage.parse(msg.serialize())
        assert again.call_id == msg.call_id
        _ = (msg.branch, msg.from_tag, msg.to_tag, msg.values("Record-Route"), msg.cseq)
        try:
            _ = msg.contact
            for rr in msg.values("Record-Route"):
                SipUri.parse(rr)
        except ValueError:
            pass
    assert parsed > 100  # the mutations do not only produce garbage


def test_fuzz_random_bytes_and_uri_parsers() -> None:
    rng = random.Random(7)
    for _ in range(3000):
        blob = bytes(rng.randrange(256) for _ in range(rng.randint(0, 300)))
        with _only_value_error():
            SipMessage.parse(blob)
        text = blob.decode("latin-1")
        for parser in (SipUri.parse, NameAddr.parse, Via.parse):
            with _only_value_error():
                parser(text)
        with _only_value_error():
            SipUri.parse("sip:" + text)
        with _only_value_error():
            NameAddr.parse('"x" <sip:' + text)


class _only_value_error:
    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> bool:
        return exc_type is None or issubclass(exc_type, ValueError)


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("sip:bob@127.0.0.1:5060;lr", ("sip", "bob", "127.0.0.1", 5060)),
        ("<sip:bob@h.example>", ("sip", "bob", "h.example", None)),
        ('"Bob, \\"the\\" <boss>" <sips:bob:pw@[::1]:5061;transport=tls>;tag=x',
         ("sips", "bob", "[::1]", 5061)),
        ("Bob <sip:+4930123;phone-context=x@gw.example;user=phone>",
         ("sip", "+4930123;phone-context=x", "gw.example", None)),
        ("sip:127.0.0.1:25060;lr;r2=on", ("sip", None, "127.0.0.1", 25060)),
        ("tel:+14155550100;phone-context=+1", ("tel", "+14155550100", "", None)),
        ("sip:b@h?X-Pass=abc%40d&Subject=hi", ("sip", "b", "h", None)),
    ],
)
def test_sip_uri_parse(text: str, expect: tuple[str, str | None, str, int | None]) -> None:
    uri = SipUri.parse(text)
    assert (uri.scheme, uri.user, uri.host, uri.port) == expect
    assert SipUri.parse(str(uri)) == uri


def test_sip_uri_and_name_addr_details() -> None:
    uri = SipUri.parse("sip:b@h?X-Pass=abc%40d")
    assert uri.headers == "X-Pass=abc%40d"
    na = NameAddr.parse('"Bob, \\"the\\" <boss>" <sips:bob:pw@[::1]:5061;transport=tls>;tag=x')
    assert na.display == 'Bob, "the" <boss>'
    assert na.tag == "x"
    assert na.sip_uri.password == "pw" and na.sip_uri.param("transport") == "tls"
    assert na.sip_uri.address() == ("::1", 5061)
    assert NameAddr.parse(str(na)) == na
    addr_spec = NameAddr.parse("sip:alice@h;tag=9")  # addr-spec: ;tag is a header param
    assert addr_spec.uri == "sip:alice@h" and addr_spec.tag == "9"
    assert SipUri.parse("sip:127.0.0.1:25060;lr").loose_route
    assert not SipUri.parse("sip:127.0.0.1").loose_route


@pytest.mark.parametrize(
    "text",
    ["", "bob", "http://x", "sip:", "sip:@h", "sip:b@", "sip:b@h:0", "sip:b@h:65536",
     "sip:b@h:x", "sip:b@[::1", "sip:b@h h", "sip:b@h;;=1", "<sip:b@h", "sip:b@h/x", "tel:"],
)
def test_sip_uri_errors(text: str) -> None:
    with pytest.raises(ValueError):
        SipUri.parse(text)


def test_sipfrag_status() -> None:
    assert parse_sipfrag_status("SIP/2.0 200 OK\r\n") == 200
    assert parse_sipfrag_status("SIP/2.0 100 Trying") == 100
    assert parse_sipfrag_status("sip/2.0 486 Busy Here\r\nX: y\r\n") == 486
    assert parse_sipfrag_status("hello") is None
    assert parse_sipfrag_status("SIP/2.0 999 x") is None


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        UasConfig(overload_status=404)
    with pytest.raises(ValueError):
        UasConfig(max_call_duration=0)
    with pytest.raises(ValueError):
        SipTimers(t1=1.0, t2=0.5)
    with pytest.raises(ValueError):
        UasConfig(contact_user="a b")


# =========================================================================== UAS over UDP

HOST = "127.0.0.1"


def run(coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout))


class Peer(asyncio.DatagramProtocol):
    """A raw-socket SIP peer: sends text, collects what arrives (parsed)."""

    def __init__(self) -> None:
        self.inbox: list[tuple[SipMessage, tuple[str, int]]] = []
        self.raw: list[bytes] = []
        self.event = asyncio.Event()
        self.transport: asyncio.DatagramTransport | None = None
        self.addr: tuple[str, int] = (HOST, 0)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
        sock = transport.get_extra_info("sockname")
        self.addr = (sock[0], sock[1])

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.raw.append(data)
        self.inbox.append((SipMessage.parse(data), (addr[0], addr[1])))
        self.event.set()

    def send(self, data: str | bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(data.encode() if isinstance(data, str) else data, addr)

    async def recv(
        self, pred: Callable[[SipMessage], bool] = lambda m: True, timeout: float = 3.0
    ) -> SipMessage:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for i, (msg, _addr) in enumerate(self.inbox):
                if pred(msg):
                    del self.inbox[i]
                    return msg
            left = deadline - loop.time()
            if left <= 0:
                got = [m.start_line for m, _ in self.inbox]
                raise AssertionError(f"nothing matching arrived in {timeout}s; inbox: {got}")
            self.event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.event.wait(), left)

    async def status(self, code: int, method: str = "INVITE", timeout: float = 3.0) -> SipMessage:
        return await self.recv(
            lambda m: m.status == code and m.cseq.method == method, timeout=timeout
        )

    def count(self, pred: Callable[[SipMessage], bool]) -> int:
        return sum(1 for m, _ in self.inbox if pred(m))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def make_peer() -> Peer:
    loop = asyncio.get_running_loop()
    _t, peer = await loop.create_datagram_endpoint(Peer, local_addr=(HOST, 0))
    return peer


@dataclass
class App:
    """Records what the UAS reported; ``behaviour`` decides what to do with each call."""

    behaviour: Callable[[ServerCall], object] = lambda call: None
    calls: list[ServerCall] = field(default_factory=list)
    events: list[tuple[str, str]] = field(default_factory=list)
    notifies: list[int] = field(default_factory=list)

    def on_invite(self, call: ServerCall) -> None:
        self.calls.append(call)
        call.on_ack = lambda c: self.events.append(("ack", c.call_id))
        call.on_bye = lambda c: self.events.append(("bye", c.call_id))
        call.on_cancel = lambda c: self.events.append(("cancel", c.call_id))
        call.on_end = lambda c, r: self.events.append(("end:" + r.value, c.call_id))
        call.on_notify = lambda c, s: self.notifies.append(s)
        self.behaviour(call)


def answer_now(call: ServerCall) -> None:
    call.ringing()
    call.answer(SDP_ANSWER)


FAST = SipTimers(t1=0.02, t2=0.08, t4=0.1)


async def make_uas(app: App, timers: SipTimers = FAST, **cfg: Any) -> SipUas:
    uas = SipUas(app.on_invite, config=UasConfig(timers=timers, **cfg))
    await uas.start(HOST, 0)
    return uas


def invite(
    peer: Peer, uas: SipUas, call_id: str, *, branch: str | None = None, cseq: int = 1,
    from_tag: str = "ft", via_top: str = "", record_route: str = "", extra: str = "",
    body: str = SDP_OFFER, to_tag: str = "",
) -> str:  # fmt: skip
    host, port = uas.local_address
    ph, pp = peer.addr
    branch = branch or f"z9hG4bK-{call_id}"
    to = f"<sip:am@{host}:{port}>" + (f";tag={to_tag}" if to_tag else "")
    return (
        f"INVITE sip:am@{host}:{port} SIP/2.0\r\n"
        f"{record_route}"
        f"{via_top}"
        f"Via: SIP/2.0/UDP {ph}:{pp};branch={branch}\r\n"
        f'From: "Caller" <sip:caller@{ph}:{pp}>;tag={from_tag}\r\n'
        f"To: {to}\r\n"
        f"Call-ID: {call_id}\r\n"
        f"CSeq: {cseq} INVITE\r\n"
        f"Contact: <sip:caller@{ph}:{pp};transport=udp>\r\n"
        "Max-Forwards: 70\r\n"
        f"{extra}"
        "Content-Type: application/sdp\r\n"
        f"Content-Length: {len(body.encode())}\r\n\r\n{body}"
    )


def request_from_invite(
    inv: str, method: str, *, cseq: int | None = None, branch: str | None = None,
    to: str | None = None, body: str = "", extra: str = "", ruri: str | None = None,
) -> str:  # fmt: skip
    """ACK/CANCEL/BYE/NOTIFY built from an INVITE text (as a UAC would)."""
    msg = SipMessage.parse(inv.encode())
    via = msg.vias[-1]
    if branch is not None:
        via = via.split(";branch=")[0] + f";branch={branch}"
    number = msg.cseq.number if cseq is None else cseq
    return (
        f"{method} {ruri or msg.uri} SIP/2.0\r\n"
        f"Via: {via}\r\n"
        f"From: {msg.get('From')}\r\n"
        f"To: {to if to is not None else msg.get('To')}\r\n"
        f"Call-ID: {msg.call_id}\r\n"
        f"CSeq: {number} {method}\r\n"
        "Max-Forwards: 70\r\n"
        f"{extra}"
        f"Content-Length: {len(body.encode())}\r\n\r\n{body}"
    )


def dialog_request(
    inv: str, ok: SipMessage, method: str, cseq: int, *, body: str = "", extra: str = ""
) -> str:
    """An in-dialog request from the caller (new branch, To with the UAS tag)."""
    return request_from_invite(
        inv, method, cseq=cseq, branch=f"z9hG4bK-{method}-{cseq}-{random.random()}",
        to=ok.get("To"), body=body, extra=extra,
    )  # fmt: skip


async def wait_for(cond: Callable[[], bool], timeout: float = 3.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


def state_of(call: ServerCall) -> CallState:
    """The call's state, read through a function: mypy would otherwise keep an earlier
    `assert call.state is X` narrowing across the awaits that change the state."""
    return call.state


def empty(uas: SipUas) -> bool:
    return all(v == 0 for v in uas.table_sizes().values())


def test_invite_ringing_answer_ack_remote_bye() -> None:
    async def main() -> None:
        app = App(answer_now)
        uas = await make_uas(app)
        peer = await make_peer()
        inv = invite(peer, uas, "call-1")
        peer.send(inv, uas.local_address)
        trying = await peer.status(100)
        assert trying.to_tag is None
        ringing = await peer.status(180)
        ok = await peer.status(200)
        tag = ok.to_tag
        assert tag and ringing.to_tag == tag
        assert ok.body == SDP_ANSWER and ok.content_type == "application/sdp"
        contact = ok.contact
        assert contact is not None and contact.sip_uri.address() == uas.local_address
        assert ok.branch == "z9hG4bK-call-1"
        assert ok.top_via.param("received") is None  # sent-by matched the source
        call = app.calls[0]
        assert call.state is CallState.ANSWERED and call.sdp_offer == SDP_OFFER
        assert call.remote_addr == peer.addr
        peer.send(dialog_request(inv, ok, "ACK", 1), uas.local_address)
        await wait_for(lambda: call.state is CallState.CONFIRMED)
        assert ("ack", "call-1") in app.events
        peer.send(dialog_request(inv, ok, "BYE", 2), uas.local_address)
        bye_ok = await peer.status(200, "BYE")
        assert bye_ok.to_tag == tag
        assert await call.ended == EndReason.REMOTE_BYE
        assert state_of(call) is CallState.ENDED
        assert [e[0] for e in app.events] == ["ack", "end:remote_bye", "bye"]
        assert uas.stats.remote_byes == 1 and uas.stats.answered == 1
        await wait_for(lambda: empty(uas), 3.0)
        # no 200 retransmission after the ACK
        assert peer.count(lambda m: m.status == 200 and m.cseq.method == "INVITE") == 0
        peer.close()
        uas.close()

    run(main())


def test_local_bye_goes_through_the_record_route_set() -> None:
    """Caller -> proxy -> UAS with two Vias and Record-Route; our BYE goes to the proxy with
    Route and the caller's Contact as Request-URI (a loose-routing, record-routing proxy)."""

    async def main() -> None:
        app = App(answer_now)
        uas = await make_uas(app)
        proxy = await make_peer()  # plays the proxy: receives the UAS' responses and BYE
        caller = await make_peer()  # only its address is used in Contact / lower Via
        ph, pp = proxy.addr
        rr = f"Record-Route: <sip:{ph}:{pp};lr;ftag=ft>\r\nRecord-Route: <sip:10.9.9.9;lr>\r\n"
        top = f"Via: SIP/2.0/UDP {ph}:{pp};branch=z9hG4bKproxy1\r\n"
        inv = invite(caller, uas, "call-rr", via_top=top, record_route=rr)
        proxy.send(inv, uas.local_address)
        ok = await proxy.status(200)
        assert ok.branch == "z9hG4bKproxy1" and len(ok.vias) == 2
        assert ok.values("Record-Route") == [f"<sip:{ph}:{pp};lr;ftag=ft>", "<sip:10.9.9.9;lr>"]
        ack = dialog_request(inv, ok, "ACK", 1)
        proxy.send(ack, uas.local_address)
        call = app.calls[0]
        await wait_for(lambda: call.state is CallState.CONFIRMED)
        result = call.bye()
        assert await call.ended == EndReason.LOCAL_BYE
        assert call.state is CallState.ENDING
        bye = await proxy.recv(lambda m: m.method == "BYE")
        assert bye.uri == f"sip:caller@{caller.addr[0]}:{caller.addr[1]};transport=udp"
        assert bye.values("Route") == [f"<sip:{ph}:{pp};lr;ftag=ft>", "<sip:10.9.9.9;lr>"]
        assert bye.from_tag == ok.to_tag and bye.to_tag == "ft"
        assert bye.call_id == "call-rr" and bye.cseq.method == "BYE"
        assert bye.branch and bye.branch.startswith("z9hG4bK")
        assert bye.get("Max-Forwards") == "70"
        proxy.send(_response_to(bye, 200, "OK"), uas.local_address)
        assert await result == 200
        assert state_of(call) is CallState.ENDED
        assert caller.count(lambda m: True) == 0
        await wait_for(lambda: empty(uas))
        for p in (proxy, caller):
            p.close()
        uas.close()

    run(main())


def _response_to(req: SipMessage, code: int, reason: str, to_tag: str = "") -> str:
    to = req.get("To") or ""
    if to_tag and not req.to_tag:
        to += f";tag={to_tag}"
    vias = "".join(f"Via: {v}\r\n" for v in req.vias)
    return (
        f"SIP/2.0 {code} {reason}\r\n{vias}From: {req.get('From')}\r\nTo: {to}\r\n"
        f"Call-ID: {req.call_id}\r\nCSeq: {req.cseq}\r\nContent-Length: 0\r\n\r\n"
    )


def test_strict_route_and_hostname_route() -> None:
    async def main() -> None:
        app = App(answer_now)
        uas = await make_uas(app)
        peer = await make_peer()
        ph, pp = peer.addr
        # strict router (no ;lr): its URI is the Request-URI, the remote target the last Route
        inv = invite(peer, uas, "strict", record_route=f"Record-Route: <sip:{ph}:{pp}>\r\n")
        peer.send(inv, uas.local_address)
        ok = await peer.status(200)
        peer.send(dialog_request(inv, ok, "ACK", 1), uas.local_address)
        await wait_for(lambda: app.calls[0].state is CallState.CONFIRMED)
        app.calls[0].bye()
        bye = await peer.recv(lambda m: m.method == "BYE")
        assert bye.uri == f"sip:{ph}:{pp}"
        assert bye.values("Route") == [f"<sip:caller@{ph}:{pp};transport=udp>"]
        peer.send(_response_to(bye, 200, "OK"), uas.local_address)
        # a proxy known by host name: no DNS, the BYE goes where the INVITE came from
        inv2 = invite(peer, uas, "named", record_route="Record-Route: <sip:proxy.invalid;lr>\r\n")
        peer.send(inv2, uas.local_address)
        ok2 = await peer.recv(lambda m: m.status == 200 and m.call_id == "named")
        peer.send(dialog_request(inv2, ok2, "ACK", 1), uas.local_address)
        await wait_for(lambda: app.calls[1].state is CallState.CONFIRMED)
        app.calls[1].bye()
        bye2 = await peer.recv(lambda m: m.method == "BYE" and m.call_id == "named")
        assert bye2.values("Route") == ["<sip:proxy.invalid;lr>"]
        peer.close()
        uas.close()

    run(main())


def test_200_retransmitted_until_ack_missing_then_failed_and_byed() -> None:
    async def main() -> None:
        app = App(answer_now)
        uas = await make_uas(app)
        peer = await make_peer()
        inv = invite(peer, uas, "no-ack")
        peer.send(inv, uas.local_address)
        call_started = asyncio.get_running_loop().time()
        bye = await peer.recv(lambda m: m.method == "BYE", timeout=5.0)
        elapsed = asyncio.get_running_loop().time() - call_started
        assert elapsed >= 64 * FAST.t1 * 0.9
        oks = peer.count(lambda m: m.status == 200 and m.cseq.method == "INVITE")
        # 0, T1, 3T1, 7T1 then every T2: 0.02 0.06 0.14 0.22 ... < 1.28 -> 1 + 17 sends
        assert 12 <= oks <= 19, oks
        call = app.calls[0]
        assert call.end_reason is EndReason.ACK_TIMEOUT
        assert uas.stats.ack_timeouts == 1
        peer.send(_response_to(bye, 200, "OK"), uas.local_address)
        assert call.bye_result is not None and await call.bye_result == 200
        await wait_for(lambda: empty(uas))
        peer.close()
        uas.close()

    run(main())


class FakeClock:
    """A clock whose time moves only with advance(); runs due callbacks in order."""

    @dataclass(order=True)
    class _Handle:
        when: float
        seq: int
        callback: Callable[[], None] = field(compare=False)
        cancelled: bool = field(default=False, compare=False)

        def cancel(self) -> None:
            self.cancelled = True

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[FakeClock._Handle] = []
        self._seq = 0

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[[], None]) -> FakeClock._Handle:
        self._seq += 1
        handle = FakeClock._Handle(self.now + delay, self._seq, callback)
        heapq.heappush(self._heap, handle)
        return handle

    def advance(self, dt: float) -> None:
        target = self.now + dt
        while self._heap and self._heap[0].when <= target + 1e-9:
            handle = heapq.heappop(self._heap)
            if handle.cancelled:
                continue
            self.now = handle.when
            handle.callback()
        self.now = target

    def pending(self) -> int:
        return sum(1 for h in self._heap if not h.cancelled)


class RecordingUas(SipUas):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent: list[tuple[float, SipMessage]] = []

    def _send(self, data: bytes, addr: tuple[str, int], *, retransmission: bool = False) -> None:
        self.sent.append((self.clock.time(), SipMessage.parse(data)))
        super()._send(data, addr, retransmission=retransmission)


def test_retransmission_schedule_with_a_fake_clock() -> None:
    """RFC 3261 timers exactly, default T1=0.5/T2=4: 2xx (13.3.1.4), BYE Timer E/F."""

    async def main() -> None:
        clock = FakeClock()
        app = App(answer_now)
        uas = RecordingUas(app.on_invite, config=UasConfig(), clock=clock)
        await uas.start(HOST, 0)
        peer = await make_peer()
        peer.send(invite(peer, uas, "sched"), uas.local_address)
        await wait_for(lambda: len(app.calls) == 1)
        for _ in range(700):  # 70 s in 100 ms steps
            clock.advance(0.1)
        oks = [t for t, m in uas.sent if m.status == 200]
        assert oks == pytest.approx([0, 0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5])
        byes = [t for t, m in uas.sent if m.method == "BYE"]
        # BYE at 64*T1 = 32, Timer E: +0.5 +1 +2 +4 +4 ..., Timer F at 32 + 32 = 64
        assert byes == pytest.approx([32, 32.5, 33.5, 35.5, 39.5, 43.5, 47.5, 51.5, 55.5,
                                      59.5, 63.5])  # fmt: skip
        call = app.calls[0]
        assert call.state is CallState.ENDED and call.end_reason is EndReason.ACK_TIMEOUT
        assert call.bye_result is not None and call.bye_result.result() == 408
        assert uas.stats.bye_timeouts == 1
        assert empty(uas) and clock.pending() == 0
        peer.close()
        uas.close()

    run(main())


def test_reject_retransmitted_until_ack_timer_g_h_with_fake_clock() -> None:
    async def main() -> None:
        clock = FakeClock()
        app = App(lambda c: c.reject(603, "Decline"))
        uas = RecordingUas(app.on_invite, config=UasConfig(), clock=clock)
        await uas.start(HOST, 0)
        peer = await make_peer()
        inv = invite(peer, uas, "rej")
        peer.send(inv, uas.local_address)
        await wait_for(lambda: len(app.calls) == 1)
        for _ in range(400):
            clock.advance(0.1)
        finals = [t for t, m in uas.sent if m.status == 603]
        assert finals == pytest.approx([0, 0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5,
                                        31.5])  # fmt: skip
        assert uas.stats.final_ack_timeouts == 1 and empty(uas)
        # with the ACK: no retransmission after it, Timer I (T4) then gone
        peer.send(invite(peer, uas, "rej2"), uas.local_address)
        await wait_for(lambda: len(app.calls) == 2)
        rej = await peer.recv(lambda m: m.status == 603 and m.call_id == "rej2")
        clock.advance(0.6)
        peer.send(request_from_invite(invite(peer, uas, "rej2"), "ACK", to=rej.get("To")),
                  uas.local_address)  # fmt: skip
        await wait_for(lambda: uas.table_sizes()["server_transactions"] == 1 and
                       uas._server_tx[next(iter(uas._server_tx))].state == "confirmed")
        sent_before = len(uas.sent)
        clock.advance(4.9)
        assert len(uas.sent) == sent_before and uas.table_sizes()["server_transactions"] == 1
        clock.advance(0.2)
        assert empty(uas)
        assert app.calls[1].end_reason is EndReason.REJECTED
        peer.close()
        uas.close()

    run(main())


def test_cancel_before_answer() -> None:
    async def main() -> None:
        app = App(lambda c: c.ringing())
        uas = await make_uas(app)
        peer = await make_peer()
        inv = invite(peer, uas, "cancel-1")
        peer.send(inv, uas.local_address)
        ringing = await peer.status(180)
        peer.send(request_from_invite(inv, "CANCEL"), uas.local_address)
        cancel_ok = await peer.status(200, "CANCEL")
        terminated = await peer.status(487)
        assert terminated.to_tag == ringing.to_tag == cancel_ok.to_tag
        call = app.calls[0]
        assert await call.ended == EndReason.CANCELLED
        assert ("cancel", "cancel-1") in app.events
        assert call.answer(SDP_ANSWER) is False  # too late: no exception
        peer.send(request_from_invite(inv, "ACK", to=terminated.get("To")), uas.local_address)
        await asyncio.sleep(0.15)
        assert peer.count(lambda m: m.status == 487) == 0  # the ACK stopped Timer G
        # a retransmitted CANCEL gets the same 200, an unknown one 481
        peer.send(request_from_invite(inv, "CANCEL"), uas.local_address)
        again = await peer.status(200, "CANCEL")
        assert again.to_tag == cancel_ok.to_tag
        peer.send(request_from_invite(inv, "CANCEL", branch="z9hG4bKother"), uas.local_address)
        await peer.status(481, "CANCEL")
        assert uas.stats.cancelled == 1
        await wait_for(lambda: empty(uas))
        peer.close()
        uas.close()

    run(main())


def test_cancel_after_answer_does_not_end_the_call() -> None:
    async def main() -> None:
        app = App(answer_now)
        uas = await make_uas(app)
        peer = await make_peer()
        inv = invite(peer, uas, "late-cancel")
        peer.send(inv, uas.local_address)
        ok = await peer.status(200)
        peer.send(request_from_invite(inv, "CANCEL"), uas.local_address)
        await peer.status(200, "CANCEL")
        peer.send(dialog_request(inv, ok, "ACK", 1), uas.local_address)
        await wait_for(lambda: app.calls[0].state is CallState.CONFIRMED)
        assert peer.count(lambda m: m.status == 487) == 0
        uas.close()
        peer.close()

    run(main())


def test_invite_retransmission_gets_the_last_response() -> None:
    async def main() -> None:
        app = App()
        uas = await make_uas(app)
        peer = await make_peer()
        inv = invite(peer, uas, "retrans")
        peer.send(inv, uas.local_address)
        await peer.status(100)
        peer.send(inv, uas.local_address)
        await peer.status(100)
        call = app.calls[0]
        call.ringing()
        await peer.status(180)
        peer.send(inv, uas.local_address)
        await peer.status(180)
        call.answer(SDP_ANSWER)
        ok = await peer.status(200)
        peer.send(inv, uas.local_address)
        ok2 = await peer.status(200)
        assert ok2.to_tag == ok.to_tag and ok2.body == SDP_ANSWER
        peer.send(dialog_request(inv, ok, "ACK", 1), uas.local_address)
        await wait_for(lambda: call.state is CallState.CONFIRMED)
        # long after Timer L, while the call is on, a copy is still absorbed, not a new call
        await asyncio.sleep(64 * FAST.t1 + 0.1)
        peer.send(inv, uas.local_address)
        await peer.status(200)
        assert len(app.calls) == 1
        assert uas.stats.invites == 1 and uas.stats.invite_retransmissions == 4
        # same Call-ID, new branch and CSeq, no To tag: that is a new INVITE (a new call)
        peer.send(invite(peer, uas, "retrans", branch="z9hG4bKnew", cseq=2), uas.local_address)
        await wait_for(lambda: len(app.calls) == 2)
        uas.close()
        peer.close()

    run(main())


def test_refer_then_notify_sipfrag() -> None:
    async def main() -> None:
        app = App(answer_now)
        uas = await make_uas(app)
        peer = await make_peer()
        inv = invite(peer, uas, "refer-1")
        peer.send(inv, uas.local_address)
        ok = await peer.status(200)
        call = app.calls[0]
        early = call.refer("sip:bob@127.0.0.1")
        assert early.done() and early.result() == 481  # not confirmed yet
        peer.send(dialog_request(inv, ok, "ACK", 1), uas.local_address)
        await wait_for(lambda: call.state is CallState.CONFIRMED)
        result = call.refer("sip:bob@127.0.0.1:5060?X-Spitwall-Pass=tok123",
                            [("X-Reason", "human")])  # fmt: skip
        refer = await peer.recv(lambda m: m.method == "REFER")
        assert refer.get("Refer-To") == "<sip:bob@127.0.0.1:5060?X-Spitwall-Pass=tok123>"
        assert refer.get("X-Reason") == "human"
        assert refer.get("Referred-By") == f"<{uas.contact_uri}>"
        assert refer.uri == f"sip:caller@{peer.addr[0]}:{peer.addr[1]};transport=udp"
        assert refer.from_tag == ok.to_tag and refer.to_tag == "ft"
        # a lost 202: Timer E resends the REFER
        again = await peer.recv(lambda m: m.method == "REFER")
        assert again.branch == refer.branch
        peer.send(_response_to(refer, 202, "Accepted"), uas.local_address)
        assert await result == 202
        assert call.transfer is not None and not call.transfer.done()
        notify_extra = "Event: refer\r\nSubscription-State: active;expires=60\r\n"
        frag = "Content-Type: message/sipfrag;version=2.0\r\n"
        peer.send(dialog_request(inv, ok, "NOTIFY", 2, body="SIP/2.0 100 Trying\r\n",
                                 extra=notify_extra + frag), uas.local_address)  # fmt: skip
        await peer.status(200, "NOTIFY")
        done_extra = "Event: refer\r\nSubscription-State: terminated;reason=noresource\r\n"
        peer.send(dialog_request(inv, ok, "NOTIFY", 3, body="SIP/2.0 200 OK\r\n",
                                 extra=done_extra + frag), uas.local_address)  # fmt: skip
        await peer.status(200, "NOTIFY")
        assert await call.transfer == 200
        assert app.notifies == [100, 200]
        # a NOTIFY for another event package: 489; an older CSeq: 500
        peer.send(dialog_request(inv, ok, "NOTIFY", 4, extra="Event: dialog\r\n"),
                  uas.local_address)  # fmt: skip
        await peer.status(489, "NOTIFY")
        peer.send(dialog_request(inv, ok, "NOTIFY", 1, extra="Event: refer\r\n"),
                  uas.local_address)  # fmt: skip
        await peer.status(500, "NOTIFY")
        # the transferee hangs up
        peer.send(dialog_request(inv, ok, "BYE", 5), uas.local_address)
        await peer.status(200, "BYE")
        assert await call.ended == EndReason.REMOTE_BYE
        await wait_for(lambda: empty(uas))
        uas.close()
        peer.close()

    run(main())


def test_refer_rejected_and_refer_timeout() -> None:
    async def main() -> None:
        app = App(answer_now)
        uas = await make_uas(app)
        peer = await make_peer()
        inv = invite(peer, uas, "refer-2")
        peer.send(inv, uas.local_address)
        ok = await peer.status(200)
        peer.send(dialog_request(inv, ok, "ACK", 1), uas.local_address)
        call = app.calls[0]
        await wait_for(lambda: call.state is CallState.CONFIRMED)
        fut = call.refer("sip:bob@127.0.0.1")
        refer = await peer.recv(lambda m: m.method == "REFER")
        peer.send(_response_to(refer, 405, "Method Not Allowed"), uas.local_address)
        assert await fut == 405
        assert call.transfer is not None and await call.transfer == 405
        fut2 = call.refer("sip:bob@127.0.0.1")
        assert await asyncio.wait_for(fut2, 5) == 408  # never answered: Timer F
        assert call.transfer is not None and call.transfer.result() == 408
        uas.close()
        peer.close()

    run(main())


@pytest.mark.parametrize(("status", "retry"), [(486, None), (503, "7")])
def test_capacity_limit(status: int, retry: str | None) -> None:
    async def main() -> None:
        app = App(lambda c: c.ringing())
        uas = await make_uas(app, max_calls=2, overload_status=status, retry_after=7)
        peer = await make_peer()
        for i in range(2):
            peer.send(invite(peer, uas, f"cap-{i}"), uas.local_address)
            def ringing(m: SipMessage, i: int = i) -> bool:
                return m.status == 180 and m.call_id == f"cap-{i}"

            await peer.recv(ringing)
        inv = invite(peer, uas, "cap-2")
        peer.send(inv, uas.local_address)
        busy = await peer.status(status)
        assert busy.call_id == "cap-2" and busy.get("Retry-After") == retry
        assert busy.to_tag
        assert uas.stats.overload_rejects == 1 and len(app.calls) == 2
        assert peer.count(lambda m: m.status == 100 and m.call_id == "cap-2") == 0
        peer.send(request_from_invite(inv, "ACK", to=busy.get("To")), uas.local_address)
        # one call ends: room again
        app.calls[0].reject(486)
        peer.send(invite(peer, uas, "cap-3"), uas.local_address)
        await peer.recv(lambda m: m.status == 180 and m.call_id == "cap-3")
        uas.close()
        peer.close()

    run(main())


def test_bye_before_ack_waits_for_the_ack_and_bye_before_answer_is_480() -> None:
    async def main() -> None:
        app = App(answer_now)
        uas = await make_uas(app, timers=SipTimers(t1=0.05, t2=0.2, t4=0.1))
        peer = await make_peer()
        inv = invite(peer, uas, "early-bye")
        peer.send(inv, uas.local_address)
        ok = await peer.status(200)
        call = app.calls[0]
        result = call.bye()
        assert call.state is CallState.ENDING and call.end_reason is EndReason.LOCAL_BYE
        await asyncio.sleep(0.1)
        assert peer.count(lambda m: m.method == "BYE") == 0
        peer.send(dialog_request(inv, ok, "ACK", 1), uas.local_address)
        bye = await peer.recv(lambda m: m.method == "BYE")
        peer.send(_response_to(bye, 200, "OK"), uas.local_address)
        assert await result == 200
        assert ("ack", "early-bye") not in app.events  # the session had already ended
        # bye() while ringing: 480 to the INVITE
        app.behaviour = lambda c: c.ringing()
        inv2 = invite(peer, uas, "ring-bye")
        peer.send(inv2, uas.local_address)
        await peer.recv(lambda m: m.status == 180 and m.call_id == "ring-bye")
        assert await app.calls[1].bye() == 0
        await peer.recv(lambda m: m.status == 480 and m.call_id == "ring-bye")
        uas.close()
        peer.close()

    run(main())


def test_session_time_limit() -> None:
    async def main() -> None:
        app = App(answer_now)
        uas = await make_uas(app, max_call_duration=0.3)
        peer = await make_peer()
        inv = invite(peer, uas, "limit")
        peer.send(inv, uas.local_address)
        ok = await peer.status(200)
        peer.send(dialog_request(inv, ok, "ACK", 1), uas.local_address)
        bye = await peer.recv(lambda m: m.method == "BYE", timeout=3)
        assert app.calls[0].end_reason is EndReason.TIME_LIMIT
        peer.send(_response_to(bye, 200, "OK"), uas.local_address)
        # an unanswered call hits the limit too: 480
        app.behaviour = lambda c: c.ringing()
        peer.send(invite(peer, uas, "limit-ring"), uas.local_address)
        await peer.recv(lambda m: m.status == 480 and m.call_id == "limit-ring", timeout=3)
        assert uas.stats.time_limits == 2
        # set_time_limit() per call
        app.behaviour = answer_now
        peer.send(invite(peer, uas, "limit-short"), uas.local_address)
        await wait_for(lambda: len(app.calls) == 3)
        app.calls[2].set_time_limit(0.05)
        await asyncio.wait_for(app.calls[2].ended, 1.0)
        assert app.calls[2].end_reason is EndReason.TIME_LIMIT
        uas.close()
        peer.close()

    run(main())


def test_remote_bye_crossing_and_retransmitted_after_end() -> None:
    async def main() -> None:
        app = App(answer_now)
        uas = await make_uas(app)
        peer = await make_peer()
        inv = invite(peer, uas, "cross")
        peer.send(inv, uas.local_address)
        ok = await peer.status(200)
        peer.send(dialog_request(inv, ok, "ACK", 1), uas.local_address)
        call = app.calls[0]
        await wait_for(lambda: call.state is CallState.CONFIRMED)
        ours = call.bye()
        our_bye = await peer.recv(lambda m: m.method == "BYE")
        their_bye = dialog_request(inv, ok, "BYE", 2)
        peer.send(their_bye, uas.local_address)
        first = await peer.status(200, "BYE")
        peer.send(their_bye, uas.local_address)  # retransmission: the same 200 again
        second = await peer.status(200, "BYE")
        assert first == second
        peer.send(_response_to(our_bye, 481, "Call/Transaction Does Not Exist"),
                  uas.local_address)  # fmt: skip
        assert await ours == 481
        assert call.state is CallState.ENDED and call.end_reason is EndReason.LOCAL_BYE
        await wait_for(lambda: empty(uas))
        uas.close()
        peer.close()

    run(main())


def test_out_of_dialog_requests_garbage_and_stray_responses() -> None:
    async def main() -> None:
        app = App(answer_now)
        uas = await make_uas(app)
        peer = await make_peer()
        inv = invite(peer, uas, "ood")
        opts = inv.replace("INVITE", "OPTIONS")
        peer.send(opts, uas.local_address)
        ok = await peer.status(200, "OPTIONS")
        assert "INVITE" in ok.values("Allow") and ok.to_tag
        for method, code in (("REGISTER", 405), ("SUBSCRIBE", 405), ("MESSAGE", 405),
                             ("BYE", 481), ("NOTIFY", 481), ("INFO", 481)):  # fmt: skip
            peer.send(request_from_invite(inv, method, branch=f"z9hG4bK{method}"),
                      uas.local_address)  # fmt: skip
            resp = await peer.status(code, method)
            if code == 405:
                assert resp.get("Allow")
        # in-dialog request for an unknown dialog
        peer.send(request_from_invite(inv, "BYE", to="<sip:am@h>;tag=nope", branch="z9hG4bKx"),
                  uas.local_address)  # fmt: skip
        await peer.status(481, "BYE")
        # INVITE with a To tag of no dialog: 481 too
        peer.send(invite(peer, uas, "ood-tag", to_tag="zzz"), uas.local_address)
        await peer.status(481)
        # Require of an extension we do not have
        peer.send(invite(peer, uas, "ood-100rel", extra="Require: 100rel\r\n"),
                  uas.local_address)  # fmt: skip
        bad_ext = await peer.status(420)
        assert bad_ext.get("Unsupported") == "100rel"
        # INVITE without Contact: 400
        no_contact = "\r\n".join(
            ln for ln in invite(peer, uas, "ood-nc").split("\r\n") if not ln.startswith("Contact")
        )
        peer.send(no_contact, uas.local_address)
        await peer.status(400)
        # garbage, keepalives, responses to nothing: counted, dropped, never raised
        for junk in (b"\x00\xff" * 50, b"GET / HTTP/1.1\r\n\r\n", b"\r\n\r\n", b"",
                     KAMAILIO_INVITE[:200], b"SIP/2.0 200 OK\r\n\r\n", b"A" * 70000):  # fmt: skip
            if len(junk) < 65000:
                peer.send(junk, uas.local_address)
            uas.datagram_received(junk, peer.addr)
        stray = _response_to(SipMessage.parse(inv.encode()), 200, "OK", to_tag="q")
        peer.send(stray, uas.local_address)
        await asyncio.sleep(0.05)
        assert uas.stats.garbage >= 8 and uas.stats.keepalives >= 2
        assert uas.stats.unmatched_responses == 1
        assert uas.stats.internal_errors == 0 and uas.stats.bad_requests == 1
        assert app.calls == []
        # the UAS still works
        peer.send(invite(peer, uas, "after-junk"), uas.local_address)
        await peer.recv(lambda m: m.status == 200 and m.call_id == "after-junk")
        uas.close()
        peer.close()

    run(main())


def test_reinvite_is_refused_and_session_stays() -> None:
    async def main() -> None:
        app = App(answer_now)
        uas = await make_uas(app)
        peer = await make_peer()
        inv = invite(peer, uas, "reinv")
        peer.send(inv, uas.local_address)
        ok = await peer.status(200)
        peer.send(dialog_request(inv, ok, "ACK", 1), uas.local_address)
        call = app.calls[0]
        await wait_for(lambda: call.state is CallState.CONFIRMED)
        tag = ok.to_tag or ""
        reinv = invite(peer, uas, "reinv", branch="z9hG4bKre", cseq=2, to_tag=tag)
        peer.send(reinv, uas.local_address)
        await peer.status(488)
        peer.send(request_from_invite(reinv, "ACK", to=ok.get("To")), uas.local_address)
        await asyncio.sleep(0.05)
        assert call.state is CallState.CONFIRMED and len(app.calls) == 1
        uas.close()
        peer.close()

    run(main())


def test_callback_errors_are_contained() -> None:
    async def main() -> None:
        def boom(call: ServerCall) -> None:
            raise RuntimeError("application bug")

        uas = SipUas(boom, config=UasConfig(timers=FAST))
        await uas.start(HOST, 0)
        peer = await make_peer()
        peer.send(invite(peer, uas, "boom"), uas.local_address)
        await peer.status(500)
        assert uas.stats.callback_errors == 1 and uas.stats.internal_errors == 0

        def bad_ack(call: ServerCall) -> None:
            call.on_ack = lambda c: 1 / 0
            answer_now(call)

        uas.on_invite = bad_ack
        inv = invite(peer, uas, "bad-ack")
        peer.send(inv, uas.local_address)
        ok = await peer.status(200)
        peer.send(dialog_request(inv, ok, "ACK", 1), uas.local_address)
        await wait_for(lambda: uas.stats.callback_errors == 2)
        uas.close()
        peer.close()

    run(main())


def test_transaction_table_bound_gives_stateless_replies() -> None:
    async def main() -> None:
        app = App(answer_now)
        uas = await make_uas(app, max_transactions=5)
        peer = await make_peer()
        inv = invite(peer, uas, "tt")
        for i in range(20):
            peer.send(request_from_invite(inv, "OPTIONS", branch=f"z9hG4bKo{i}"),
                      uas.local_address)  # fmt: skip
        for _ in range(20):
            await peer.status(200, "OPTIONS")
        assert uas.table_sizes()["server_transactions"] == 5
        assert uas.stats.stateless_replies == 15
        peer.send(inv, uas.local_address)
        await peer.status(503)
        await wait_for(lambda: empty(uas))
        uas.close()
        peer.close()

    run(main())


def test_shutdown_byes_answered_calls_and_480s_ringing_ones() -> None:
    async def main() -> None:
        app = App(answer_now)
        uas = await make_uas(app)
        peer = await make_peer()
        inv = invite(peer, uas, "sd-1")
        peer.send(inv, uas.local_address)
        ok = await peer.status(200)
        peer.send(dialog_request(inv, ok, "ACK", 1), uas.local_address)
        await wait_for(lambda: app.calls[0].state is CallState.CONFIRMED)
        app.behaviour = lambda c: c.ringing()
        peer.send(invite(peer, uas, "sd-2"), uas.local_address)
        await peer.recv(lambda m: m.status == 180 and m.call_id == "sd-2")

        async def answer_bye() -> None:
            bye = await peer.recv(lambda m: m.method == "BYE")
            peer.send(_response_to(bye, 200, "OK"), uas.local_address)

        responder = asyncio.ensure_future(answer_bye())
        await uas.shutdown(timeout=2.0)
        await responder
        await peer.recv(lambda m: m.status == 480 and m.call_id == "sd-2")
        assert [c.end_reason for c in app.calls] == [EndReason.SHUTDOWN, EndReason.SHUTDOWN]
        assert empty(uas)
        await asyncio.wait_for(uas.wait_closed(), 1)
        peer.close()

    run(main())


def test_ten_thousand_calls_leave_empty_tables() -> None:
    """10,000 calls in every kind of ending; then tables empty and no call object alive."""

    async def main() -> None:
        # T1 = 20 ms: fast enough for 10,000 calls, yet a loaded machine's late ACK (the peer
        # runs in this process) stays well inside Timer H (64 x T1 = 1.28 s), so only the
        # "no_ack" calls end by ACK timeout
        timers = SipTimers(t1=0.02, t2=0.08, t4=0.08)
        kinds = ("remote_bye", "local_bye", "cancel", "reject", "no_ack")

        def behaviour(call: ServerCall) -> None:
            kind = call.call_id.split("/")[0]
            if kind == "reject":
                call.reject(603, "Decline")
            elif kind == "cancel":
                call.ringing()
            else:
                answer_now(call)

        app = App(behaviour)
        app.events = _NullList()
        uas = await make_uas(app, timers=timers, max_calls=1000, max_transactions=20000)
        peer = await make_peer()
        dest = uas.local_address
        total = 10_000
        window = 120  # calls in flight at once (a burst larger than this overflows buffers)
        done_ids: set[str] = set()
        invs: dict[str, str] = {}
        pending: set[str] = set()
        started = finished = 0
        loop = asyncio.get_running_loop()
        last_progress = loop.time()
        while finished < total:
            while started < total and len(pending) < window:
                cid = f"{kinds[started % len(kinds)]}/{started}"
                invs[cid] = invite(peer, uas, cid, from_tag=f"t{started}")
                pending.add(cid)
                peer.send(invs[cid], dest)
                started += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(peer.event.wait(), 0.5)
            peer.event.clear()
            inbox, peer.inbox = peer.inbox, []

            def finish(cid: str) -> None:
                nonlocal finished, last_progress
                if cid in pending:
                    pending.discard(cid)
                    finished += 1
                    last_progress = loop.time()

            for msg, _a in inbox:
                cid = msg.call_id
                kind = cid.split("/")[0]
                inv = invs.get(cid)
                if inv is None:
                    continue
                if msg.method == "BYE":
                    peer.send(_response_to(msg, 200, "OK"), dest)
                    if kind in ("local_bye", "no_ack"):
                        finish(cid)
                    continue
                method, status = msg.cseq.method, msg.status or 0
                if method == "INVITE" and status == 180 and kind == "cancel":
                    peer.send(request_from_invite(inv, "CANCEL"), dest)
                elif method == "INVITE" and status >= 300:
                    peer.send(request_from_invite(inv, "ACK", to=msg.get("To")), dest)
                    finish(cid)
                elif method == "INVITE" and status == 200 and cid not in done_ids:
                    done_ids.add(cid)
                    if kind == "no_ack":
                        continue
                    peer.send(dialog_request(inv, msg, "ACK", 1), dest)
                    if kind == "remote_bye":
                        peer.send(dialog_request(inv, msg, "BYE", 2), dest)
                    else:
                        uas.calls[(cid, msg.to_tag or "")].bye()
                elif method == "BYE" and status == 200:
                    finish(cid)
            assert loop.time() - last_progress < 10, f"calls stuck: {sorted(pending)[:5]}"
        await wait_for(lambda: empty(uas), 10.0)
        stats = uas.stats
        assert stats.invites == total
        assert stats.internal_errors == 0 and stats.garbage == 0
        assert stats.remote_byes == total // 5 and stats.cancelled == total // 5
        assert stats.ack_timeouts == total // 5
        ends = [c.end_reason for c in app.calls]
        assert ends.count(EndReason.ACK_TIMEOUT) == total // 5
        assert all(c.state is CallState.ENDED for c in app.calls)
        app.calls.clear()
        peer.inbox.clear()
        gc.collect()
        alive = sum(1 for o in gc.get_objects() if isinstance(o, ServerCall))
        assert alive == 0, f"{alive} ServerCall objects still referenced"
        uas.close()
        peer.close()

    run(main(), timeout=240)


class _NullList(list[tuple[str, str]]):
    def append(self, item: tuple[str, str]) -> None:
        return None
