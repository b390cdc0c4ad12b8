"""Delivery SIP: the PUBLISH and NOTIFY the worker builds, dialog routing, entry checks, and the
UDP endpoint's client/server transactions (real loopback sockets, small T1)."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from intercept.delivery.sipua import (
    SipEndpoint,
    body_bytes,
    build_notify,
    build_publish,
    build_response,
    dialog_route,
)
from intercept.delivery.worker import check_entry, stream_order
from intercept.events import SMIME_CONTENT_DISPOSITION, SMIME_CONTENT_TYPE
from media.sip import SipMessage, SipTimers

BINARY = bytes(range(256)) * 3  # DER is binary: every byte value must survive


def test_publish_is_an_rfc3903_initial_publication() -> None:
    msg = build_publish("sip:li-recorder@192.0.2.50:5080", BINARY, local=("192.0.2.1", 5070),
                        content_type=SMIME_CONTENT_TYPE,
                        content_disposition=SMIME_CONTENT_DISPOSITION, branch="z9hG4bKabc",
                        call_id="cid@192.0.2.1", from_tag="ft")
    wire = msg.serialize()
    assert wire.startswith(b"PUBLISH sip:li-recorder@192.0.2.50:5080 SIP/2.0\r\n")
    parsed = SipMessage.parse(wire)
    assert parsed.get("Via") == "SIP/2.0/UDP 192.0.2.1:5070;branch=z9hG4bKabc;rport"
    assert parsed.get("Max-Forwards") == "70"
    assert parsed.get("From") == "<sip:spitwall-deliver@192.0.2.1:5070>;tag=ft"
    assert parsed.get("To") == "<sip:li-recorder@192.0.2.50:5080>"
    assert parsed.get("Call-ID") == "cid@192.0.2.1"
    assert str(parsed.cseq) == "1 PUBLISH"
    assert parsed.get("Event") == "srtp" and parsed.get("Expires") == "3600"
    assert parsed.get("Content-Type") == SMIME_CONTENT_TYPE
    assert parsed.get("Content-Disposition") == SMIME_CONTENT_DISPOSITION
    assert parsed.get("Content-Length") == str(len(BINARY))
    assert not parsed.has("SIP-If-Match")  # an initial publication
    assert body_bytes(parsed) == BINARY
    names = {n.lower() for n, _ in parsed.headers}
    assert names == {"via", "max-forwards", "from", "to", "call-id", "cseq", "event", "expires",
                     "user-agent", "content-type", "content-disposition", "content-length"}


def test_publish_fresh_identifiers_and_bad_destination() -> None:
    a = build_publish("sip:192.0.2.50", b"x", local=("127.0.0.1", 1), content_type="a/b",
                      content_disposition="attachment")
    b = build_publish("sip:192.0.2.50", b"x", local=("127.0.0.1", 1), content_type="a/b",
                      content_disposition="attachment")
    assert a.branch != b.branch and a.call_id != b.call_id and a.from_tag != b.from_tag
    assert (a.branch or "").startswith("z9hG4bK")
    with pytest.raises(ValueError):
        build_publish("mailto:x@y", b"x", local=("127.0.0.1", 1), content_type="a/b",
                      content_disposition="attachment")
    with pytest.raises(ValueError):
        build_publish("sip:192.0.2.50", b"x", local=("127.0.0.1", 1), content_type="a/b\r\nX: y",
                      content_disposition="attachment")


def test_dialog_route() -> None:
    direct = dialog_route("sip:rec@192.0.2.9:5090", (), ("198.51.100.1", 5060))
    assert (direct.ruri, direct.routes, direct.next_hop) == ("sip:rec@192.0.2.9:5090", (),
                                                             ("192.0.2.9", 5090))
    loose = dialog_route("sip:rec@192.0.2.9:5090",
                         ("<sip:192.0.2.1:5060;lr>", "<sip:192.0.2.2;lr>"), ("x", 1))
    assert loose.ruri == "sip:rec@192.0.2.9:5090"
    assert loose.routes == ("<sip:192.0.2.1:5060;lr>", "<sip:192.0.2.2;lr>")
    assert loose.next_hop == ("192.0.2.1", 5060)
    strict = dialog_route("sip:rec@192.0.2.9", ("<sip:192.0.2.1>",), ("x", 1))
    assert strict.ruri == "sip:192.0.2.1" and strict.routes == ("<sip:rec@192.0.2.9>",)
    named = dialog_route("sip:rec@recorder.example", (), ("198.51.100.1", 5062))
    assert named.next_hop == ("198.51.100.1", 5062)  # no DNS: back where it came from


def test_notify_in_the_dialog() -> None:
    route = dialog_route("sip:rec@192.0.2.9:5090", ("<sip:192.0.2.1;lr>",), ("x", 1))
    msg = build_notify(route=route, local=("192.0.2.5", 5070), call_id="c@h",
                       local_uri_="sip:CASE-1@192.0.2.5", local_tag="lt",
                       remote_uri="sip:rec@192.0.2.9", remote_tag="rt", cseq=7,
                       state="active;expires=60", event_param="3", body=BINARY,
                       content_type=SMIME_CONTENT_TYPE,
                       content_disposition=SMIME_CONTENT_DISPOSITION, branch="z9hG4bKn")
    parsed = SipMessage.parse(msg.serialize())
    assert parsed.method == "NOTIFY" and parsed.uri == "sip:rec@192.0.2.9:5090"
    assert parsed.get_all("Route") == ["<sip:192.0.2.1;lr>"]
    assert parsed.get("From") == "<sip:CASE-1@192.0.2.5>;tag=lt"
    assert parsed.get("To") == "<sip:rec@192.0.2.9>;tag=rt"
    assert str(parsed.cseq) == "7 NOTIFY" and parsed.get("Event") == "srtp;id=3"
    assert parsed.get("Subscription-State") == "active;expires=60"
    assert parsed.get("Contact") == "<sip:spitwall-deliver@192.0.2.5:5070>"
    assert parsed.get("Content-Type") == SMIME_CONTENT_TYPE
    assert body_bytes(parsed) == BINARY
    empty = build_notify(route=route, local=("192.0.2.5", 5070), call_id="c@h",
                         local_uri_="sip:CASE-1@192.0.2.5", local_tag="lt",
                         remote_uri="sip:rec@192.0.2.9", remote_tag="rt", cseq=1,
                         state="terminated;reason=timeout")
    assert not empty.has("Content-Type") and empty.body == ""
    assert empty.get("Event") == "srtp"


def test_response_fills_received_and_tag() -> None:
    req = SipMessage.parse(
        b"SUBSCRIBE sip:CASE-1@192.0.2.5 SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.9:5099;branch="
        b"z9hG4bK1;rport\r\nVia: SIP/2.0/UDP 10.0.0.8;branch=z9hG4bK0\r\nFrom: <sip:r@h>;tag=a"
        b"\r\nTo: <sip:CASE-1@192.0.2.5>\r\nCall-ID: x\r\nCSeq: 4 SUBSCRIBE\r\n\r\n")
    resp = SipMessage.parse(build_response(req, ("203.0.113.4", 40000), 403, "Forbidden",
                                           to_tag="tt").serialize())
    assert resp.status == 403
    assert resp.vias[0] == "SIP/2.0/UDP 10.0.0.9:5099;branch=z9hG4bK1;rport=40000;" \
                           "received=203.0.113.4"
    assert resp.vias[1] == "SIP/2.0/UDP 10.0.0.8;branch=z9hG4bK0"
    assert resp.to_tag == "tt" and str(resp.cseq) == "4 SUBSCRIBE"


def _entry(**over: bytes) -> dict[str, bytes]:
    base = {"v": b"1", "id": b"e" * 32, "liid": b"CASE-1", "dest": b"sip:rec@192.0.2.9",
            "body": b"\x30\x80"}
    base.update(over)
    return base


@pytest.mark.parametrize(("fields", "problem"), [
    (_entry(), None),
    (_entry(dest=b"subscribe"), None),
    (_entry(dest=b"sip:rec@192.0.2.9;transport=udp"), None),
    (_entry(v=b"2"), "unknown entry version"),
    (_entry(body=b""), "entry without 'body'"),
    (_entry(dest=b"mailto:x@y"), "destination is not a SIP URI"),
    (_entry(dest=b"sips:rec@192.0.2.9"), None),
    (_entry(dest=b"sip:rec@192.0.2.9;transport=tcp"), None),
    (_entry(dest=b"sip:rec@192.0.2.9;transport=sctp"), "transport 'sctp'"),
    (_entry(dest=b"subscribe", liid=b"bad liid!"), "LIID"),
])
def test_check_entry(fields: dict[str, bytes], problem: str | None) -> None:
    found = check_entry(fields)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


def test_stream_order() -> None:
    ids = ["1700000000000-10", "1700000000000-2", "1699999999999-99"]
    assert sorted(ids, key=stream_order) == ["1699999999999-99", "1700000000000-2",
                                             "1700000000000-10"]


# --------------------------------------------------------------------------- the endpoint


async def _endpoint(handler: object = None, t1: float = 0.02,
                    timeout: float = 0.5) -> SipEndpoint:
    def ignore(msg: SipMessage, addr: tuple[str, int]) -> None:
        return None

    ep = SipEndpoint(handler or ignore, timers=SipTimers(t1=t1, t2=0.08),  # type: ignore[arg-type]
                     timeout=timeout)
    await ep.start("127.0.0.1", 0)
    return ep


def _publish_to(port: int, ep: SipEndpoint) -> SipMessage:
    return build_publish(f"sip:r@127.0.0.1:{port}", b"x", local=ep.local, content_type="a/b",
                         content_disposition="attachment")


def test_client_transaction_retransmits_then_times_out() -> None:
    async def run() -> tuple[SipMessage | None, float, int]:
        silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        silent.bind(("127.0.0.1", 0))
        silent.setblocking(False)
        ep = await _endpoint()
        started = time.monotonic()
        resp = await ep.request(_publish_to(silent.getsockname()[1], ep), silent.getsockname())
        took = time.monotonic() - started
        copies = 0
        while True:
            try:
                silent.recv(65535)
                copies += 1
            except BlockingIOError:
                break
        ep.close()
        silent.close()
        return resp, took, copies

    resp, took, copies = asyncio.run(run())
    assert resp is None and 0.45 <= took < 1.5
    # Timer E: 20, 40, 80, 80, ... ms until Timer F (500 ms): first send + 7 or 8 copies
    assert 4 <= copies <= 10


def test_client_transaction_final_after_provisional() -> None:
    async def run() -> tuple[int | None, int]:
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        peer.bind(("127.0.0.1", 0))
        peer.setblocking(False)
        ep = await _endpoint(timeout=2.0)
        fut = ep.request(_publish_to(peer.getsockname()[1], ep), peer.getsockname())
        loop = asyncio.get_running_loop()
        data, addr = await loop.sock_recvfrom(peer, 65535)
        req = SipMessage.parse(data)
        peer.sendto(build_response(req, addr, 100, "Trying").serialize(), addr)
        await asyncio.sleep(0.1)
        other = build_response(req, addr, 200, "OK").serialize().replace(
            req.branch.encode(), b"z9hG4bKother")  # type: ignore[union-attr]
        peer.sendto(other, addr)  # not this transaction: ignored
        peer.sendto(build_response(req, addr, 200, "OK").serialize(), addr)
        resp = await fut
        ep.close()
        peer.close()
        return (resp.status if resp else None), ep.stats.unmatched_responses

    status, unmatched = asyncio.run(run())
    assert status == 200 and unmatched == 1


def test_server_transaction_absorbs_retransmissions() -> None:
    async def run() -> tuple[int, list[bytes]]:
        calls: list[SipMessage] = []

        def handler(msg: SipMessage, addr: tuple[str, int]) -> None:
            calls.append(msg)
            ep.respond(msg, addr, 200, "OK", to_tag="t")

        ep = await _endpoint(handler)
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        peer.bind(("127.0.0.1", 0))
        peer.settimeout(1.0)
        lport = peer.getsockname()[1]
        req = (f"OPTIONS sip:127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{lport};"
               f"branch=z9hG4bKsame\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:c@d>\r\nCall-ID: z\r\n"
               f"CSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n").encode()
        replies = []
        loop = asyncio.get_running_loop()
        for _ in range(3):
            peer.sendto(req, ep.local)
            replies.append(await loop.run_in_executor(None, peer.recv, 65535))
        ep.close()
        peer.close()
        return len(calls), replies

    handled, replies = asyncio.run(run())
    assert handled == 1 and len(replies) == 3 and len(set(replies)) == 1
    assert replies[0].startswith(b"SIP/2.0 200 OK")
