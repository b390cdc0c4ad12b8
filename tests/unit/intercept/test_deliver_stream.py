"""Delivery over TCP and TLS: RFC 3261 18.3 framing, transport selection, and the endpoint's
stream transactions against real loopback TCP/TLS SIP responders written here (asyncio streams,
their own framing: a bug in `intercept.delivery.stream` is not mirrored on this side). Test
certificates (CA, server with DNS + IP SANs, client) are made at test time (`tests.tls_certs`).
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest

from intercept.delivery.sipua import (
    NextHop,
    SipEndpoint,
    TransportOptions,
    TxResult,
    build_publish,
    default_port,
    dialog_route,
    select_transport,
    uri_transport,
    via_transport,
)
from intercept.delivery.stream import (
    FramingError,
    StreamFramer,
    client_tls_context,
    failure_reason,
)
from intercept.delivery.worker import Settings, check_entry
from intercept.targets import check_deliver_to, delivery_transport
from media.sip import SipMessage, SipTimers, SipUri
from tests.tls_certs import TestCa

T = TypeVar("T")
BODY = bytes(range(256)) * 5  # 1280 bytes of binary "DER": the PUBLISH is ~1.6 KB


def _msg(n: int = 0, body: bytes = b"") -> bytes:
    head = (f"SIP/2.0 200 OK\r\nVia: SIP/2.0/TCP h;branch=z9hG4bK{n}\r\nFrom: <sip:a@b>;tag=1\r\n"
            f"To: <sip:c@d>;tag=2\r\nCall-ID: c{n}\r\nCSeq: 1 PUBLISH\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


# --------------------------------------------------------------------------- framing


def test_two_messages_in_one_chunk() -> None:
    framer = StreamFramer()
    a, b = _msg(1, b"hello"), _msg(2, b"\r\n\r\nbinary\x00\xff")
    assert framer.feed(a + b) == [a, b]
    assert framer.buffered == 0


def test_message_split_byte_by_byte() -> None:
    framer = StreamFramer()
    wire = _msg(1, BODY) + _msg(2)
    out: list[bytes] = []
    for i in range(len(wire)):
        out += framer.feed(wire[i:i + 1])
    assert out == [_msg(1, BODY), _msg(2)]
    assert SipMessage.parse(out[0]).body.encode("utf-8", "surrogateescape") == BODY


def test_keepalive_crlfs_are_skipped() -> None:
    framer = StreamFramer()
    assert framer.feed(b"\r\n\r\n") == []  # RFC 5626 ping
    assert framer.feed(b"\r\n") == []  # pong
    assert framer.buffered == 0
    assert framer.feed(b"\r\n" + _msg(1) + b"\r\n\r\n" + _msg(2)) == [_msg(1), _msg(2)]


def test_compact_content_length() -> None:
    wire = _msg(1, b"abc").replace(b"Content-Length: 3", b"l: 3")
    assert StreamFramer().feed(wire + _msg(2)) == [wire, _msg(2)]


@pytest.mark.parametrize(("wire", "error"), [
    (_msg(1).replace(b"Content-Length: 0\r\n", b""), "without Content-Length"),
    (_msg(1).replace(b"Content-Length: 0", b"Content-Length: -1"), "invalid Content-Length"),
    (_msg(1).replace(b"Content-Length: 0", b"Content-Length: 0\r\nl: 5"), "conflicting"),
    (_msg(1, b"x" * 101), "over the limit"),
    (b"SIP/2.0 200 OK\r\nX: " + b"a" * 300, "header block over"),
    (b"SIP/2.0 200 OK\r\nX: " + b"a" * 300 + b"\r\n\r\n", "header block over"),
])
def test_framing_errors(wire: bytes, error: str) -> None:
    framer = StreamFramer(max_header=256, max_body=100)
    with pytest.raises(FramingError, match=error):
        framer.feed(wire)


# --------------------------------------------------------------------------- selection


@pytest.mark.parametrize(("uri", "size", "want"), [
    ("sip:r@192.0.2.1", 500, ("udp", False)),
    ("sip:r@192.0.2.1", 1300, ("udp", False)),
    ("sip:r@192.0.2.1", 1301, ("tcp", True)),  # RFC 3261 18.1.1, may fall back to UDP
    ("sip:r@192.0.2.1;transport=udp", 5000, ("udp", False)),  # always UDP
    ("sip:r@192.0.2.1;transport=UDP", 5000, ("udp", False)),
    ("sip:r@192.0.2.1;transport=tcp", 100, ("tcp", False)),  # no fallback
    ("sip:r@192.0.2.1;transport=tls", 100, ("tls", False)),
    ("sips:r@192.0.2.1", 100, ("tls", False)),
    ("sips:r@192.0.2.1;transport=tcp", 100, ("tls", False)),  # RFC 5630
])
def test_transport_selection(uri: str, size: int, want: tuple[str, bool]) -> None:
    assert select_transport(uri_transport(SipUri.parse(uri)), size, 1300) == want


def test_selection_knobs() -> None:
    assert select_transport(None, 5000, 0) == ("udp", False)  # --udp-max 0: never switch
    assert select_transport(None, 5000, 1300, tcp_refused=True) == ("udp", False)
    assert select_transport("tcp", 5000, 1300, tcp_refused=True) == ("tcp", False)
    assert default_port("tls") == 5061 and default_port("tcp") == default_port(None) == 5060


@pytest.mark.parametrize("uri", ["sip:r@h;transport=sctp", "sip:r@h;transport=ws",
                                 "sips:r@h;transport=udp"])
def test_unknown_transports_are_refused(uri: str) -> None:
    with pytest.raises(ValueError):
        uri_transport(SipUri.parse(uri))
    with pytest.raises(ValueError):
        check_deliver_to(uri)
    problem = check_entry({"v": b"1", "id": b"e" * 32, "liid": b"C", "dest": uri.encode(),
                           "body": b"x"})
    assert problem is not None and "destination" in problem


@pytest.mark.parametrize("uri", ["sips:li@mf.example.net", "sips:[2001:db8::1]:5071",
                                 "sip:li@192.0.2.1;transport=tcp", "sip:li@h;transport=TLS",
                                 "sip:li@h;transport=udp", "sip:a;b@h:5080;transport=tcp;lr",
                                 "sip:192.0.2.1"])
def test_supported_destinations_are_accepted(uri: str) -> None:
    assert check_deliver_to(uri) == uri
    assert check_entry({"v": b"1", "id": b"e" * 32, "liid": b"C", "dest": uri.encode(),
                        "body": b"x"}) is None


def test_delivery_transport_table() -> None:
    assert delivery_transport("sip", None) is None
    assert delivery_transport("SIPS", None) == "tls"
    assert delivery_transport("sip", "Tcp") == "tcp"
    with pytest.raises(ValueError):
        check_deliver_to("sip:h;transport=tcp;transport=udp")


def test_via_transport_and_dialog_hop() -> None:
    msg = build_publish("sip:r@192.0.2.1", b"x", local=("192.0.2.9", 5070), content_type="a/b",
                        content_disposition="attachment", branch="z9hG4bKb1")
    tcp = via_transport(msg, "tcp")
    assert tcp.get("Via") == "SIP/2.0/TCP 192.0.2.9:5070;branch=z9hG4bKb1"
    assert tcp.branch == "z9hG4bKb1" and tcp.body == msg.body
    assert via_transport(msg, "tls").get("Via") == "SIP/2.0/TLS 192.0.2.9:5070;branch=z9hG4bKb1"
    route = dialog_route("sip:rec@192.0.2.7;transport=tls", (), ("198.51.100.1", 5060))
    assert route.next_hop == ("192.0.2.7", 5061)
    hop = NextHop.for_uri(SipUri.parse(route.hop_uri), route.next_hop)
    assert hop == NextHop(("192.0.2.7", 5061), "tls", "192.0.2.7")
    route = dialog_route("sip:rec@192.0.2.7", ("<sips:[2001:db8::5];lr>",), ("x", 1))
    assert route.next_hop == ("2001:db8::5", 5061)
    assert NextHop.for_uri(SipUri.parse(route.hop_uri), route.next_hop).server_name == \
        "2001:db8::5"


def test_failure_reasons() -> None:
    assert failure_reason("tcp", ConnectionRefusedError(111, "Connection refused"),
                          connecting=True) == "TCP connection refused"
    assert failure_reason("tls", TimeoutError(), connecting=True) == "TLS connect timeout"
    assert failure_reason("tcp", ConnectionResetError(104, "x")) == \
        "TCP connection reset by the peer"


def test_settings_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="certificate"):
        Settings("redis://x", tls_key=tmp_path / "k")
    with pytest.raises(ValueError, match="udp_max"):
        Settings("redis://x", udp_max=-1)
    with pytest.raises(OSError):
        Settings("redis://x", tls_ca=tmp_path / "missing.pem").tls_context()
    ctx = client_tls_context()
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2 and ctx.check_hostname
    assert ctx.verify_mode == ssl.CERT_REQUIRED


# --------------------------------------------------------------------------- responders


@dataclass
class Responder:
    """A TCP/TLS SIP server for the tests: answers each request with ``code`` after
    ``delay``; ``mode`` changes that (``close``: close at once; ``no_length``: answer without
    Content-Length; ``request_first``: send us an OPTIONS first, then answer)."""

    code: int = 200
    delay: float = 0.0
    mode: str = ""
    ssl: ssl.SSLContext | None = None
    requests: list[bytes] = field(default_factory=list)
    connections: int = 0
    closed: int = 0
    peer_certs: list[Any] = field(default_factory=list)
    their_answers: list[bytes] = field(default_factory=list)
    server: asyncio.Server | None = None
    port: int = 0
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    peers: list[tuple[str, int]] = field(default_factory=list)

    async def start(self, port: int = 0) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", port, ssl=self.ssl)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for writer in self.writers:  # (Python 3.11 has no Server.close_clients)
                writer.close()
            await self.server.wait_closed()

    async def _read(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        found = re.search(rb"\r\n(?:Content-Length|l)\s*:\s*(\d+)", head, re.I)
        body = await reader.readexactly(int(found.group(1))) if found else b""
        return head + body

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        self.peers.append(writer.get_extra_info("peername"))
        if self.ssl is not None:
            self.peer_certs.append(writer.get_extra_info("peercert"))
        try:
            if self.mode == "request_first":
                writer.write(b"OPTIONS sip:x@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:9;"
                             b"branch=z9hG4bKsrv\r\nFrom: <sip:s@x>;tag=s\r\nTo: <sip:c@x>\r\n"
                             b"Call-ID: srv\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n")
            while True:
                try:
                    req = await self._read(reader)
                except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
                    break
                if req.startswith(b"SIP/2.0 "):  # an answer to our OPTIONS
                    self.their_answers.append(req)
                    continue
                self.requests.append(req)
                if self.mode == "close":
                    break
                if self.delay:
                    await asyncio.sleep(self.delay)
                writer.write(self.answer(req))
                await writer.drain()
        finally:
            self.closed += 1
            writer.close()

    def answer(self, req: bytes) -> bytes:
        head = req.split(b"\r\n\r\n", 1)[0].decode()
        keep = [line for line in head.split("\r\n")[1:]
                if line.split(":", 1)[0].lower() in ("via", "from", "to", "call-id", "cseq")]
        keep = [f"{line};tag=srv" if line.lower().startswith("to:") else line for line in keep]
        if self.mode != "no_length":
            keep.append("Content-Length: 0")
        return (f"SIP/2.0 {self.code} Answer\r\n" + "\r\n".join(keep) + "\r\n\r\n").encode()


async def _endpoint(**opts: Any) -> SipEndpoint:
    timeout = opts.pop("timeout", 2.0)
    host = opts.pop("host", "127.0.0.1")
    ep = SipEndpoint(lambda m, a: None, timers=SipTimers(t1=0.01, t2=0.04), timeout=timeout,
                     transports=TransportOptions(**opts))
    await ep.start(host, 0)
    return ep


def _publish(ep: SipEndpoint, dest: str) -> SipMessage:
    return build_publish(dest, BODY, local=ep.local, content_type="application/pkcs7-mime",
                         content_disposition="attachment")


async def _send_publish(ep: SipEndpoint, dest: str, port: int) -> TxResult:
    """One PUBLISH to ``dest`` whose host is the test server on 127.0.0.1:``port``."""
    return await ep.send_request(_publish(ep, dest), NextHop.for_uri(
        SipUri.parse(dest), ("127.0.0.1", port)))


def _run(coro: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(coro())


def _free_port_both() -> int:
    """A port free for TCP (nothing listens: connect is refused) whose UDP twin we bind."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port")


class UdpAnswerer(asyncio.DatagramProtocol):
    """Answers every UDP request 200 (the fallback target)."""

    def __init__(self) -> None:
        self.requests: list[bytes] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.requests.append(data)
        assert self.transport is not None
        self.transport.sendto(Responder().answer(data), addr)


# --------------------------------------------------------------------------- TCP


def test_publish_over_tcp_no_retransmissions() -> None:
    async def run() -> tuple[TxResult, Responder, SipEndpoint]:
        srv = Responder(delay=0.2)  # Timer E would fire ~4 times over UDP meanwhile
        port = await srv.start()
        ep = await _endpoint()
        dest = f"sip:rec@127.0.0.1:{port};transport=tcp"
        result = await _send_publish(ep, dest, port)
        ep.close()
        await srv.stop()
        return result, srv, ep

    result, srv, ep = _run(run)
    assert result.response is not None and result.response.status == 200
    assert result.transport == "tcp" and result.error == ""
    assert len(srv.requests) == 1  # no Timer E on a reliable transport
    req = SipMessage.parse(srv.requests[0])
    assert (req.get("Via") or "").startswith("SIP/2.0/TCP 127.0.0.1:")
    assert "rport" not in (req.get("Via") or "")
    assert req.body.encode("utf-8", "surrogateescape") == BODY
    assert ep.stats.connections_opened == 1 and ep.stats.retransmissions_sent == 0


def test_connections_come_from_the_sip_address() -> None:
    async def run() -> tuple[TxResult, Responder, SipEndpoint]:
        srv = Responder()
        port = await srv.start()
        ep = await _endpoint(host="127.0.0.3")  # the worker's --sip-addr
        dest = f"sip:rec@127.0.0.1:{port};transport=tcp"
        result = await _send_publish(ep, dest, port)
        ep.close()
        await srv.stop()
        return result, srv, ep

    result, srv, ep = _run(run)
    assert result.response is not None
    assert srv.peers[0][0] == "127.0.0.3"
    via = SipMessage.parse(srv.requests[0]).get("Via") or ""
    assert via.startswith(f"SIP/2.0/TCP 127.0.0.3:{ep.local[1]};branch=")


def test_large_unparametrised_request_goes_over_tcp() -> None:
    async def run() -> tuple[TxResult, TxResult, Responder]:
        srv = Responder()
        port = await srv.start()
        ep = await _endpoint(timeout=0.3)
        dest = f"sip:rec@127.0.0.1:{port}"
        hop = NextHop.for_uri(SipUri.parse(dest), ("127.0.0.1", port))
        big = await ep.send_request(_publish(ep, dest), hop)
        small = build_publish(dest, b"tiny", local=ep.local, content_type="a/b",
                              content_disposition="attachment")
        udp = await ep.send_request(small, hop)  # no UDP listener: Timer F
        ep.close()
        await srv.stop()
        return big, udp, srv

    big, udp, srv = _run(run)
    assert big.transport == "tcp" and big.response is not None and len(srv.requests) == 1
    assert udp.transport == "udp" and udp.response is None  # small: UDP (nobody there)


def test_connection_refused_falls_back_to_udp_and_is_remembered() -> None:
    async def run() -> tuple[list[TxResult], UdpAnswerer, SipEndpoint, TxResult]:
        port = _free_port_both()
        loop = asyncio.get_running_loop()
        answerer = UdpAnswerer()
        transport, _ = await loop.create_datagram_endpoint(lambda: answerer,
                                                           local_addr=("127.0.0.1", port))
        ep = await _endpoint()
        dest = f"sip:rec@127.0.0.1:{port}"
        hop = NextHop.for_uri(SipUri.parse(dest), ("127.0.0.1", port))
        results = [await ep.send_request(_publish(ep, dest), hop) for _ in range(3)]
        explicit = f"sip:rec@127.0.0.1:{port};transport=tcp"
        started = time.monotonic()
        failed = await ep.send_request(_publish(ep, explicit), NextHop.for_uri(
            SipUri.parse(explicit), ("127.0.0.1", port)))
        assert time.monotonic() - started < 1.0  # at once, not after Timer F
        ep.close()
        transport.close()
        return results, answerer, ep, failed

    results, answerer, ep, failed = _run(run)
    assert all(r.response is not None and r.response.status == 200 for r in results)
    assert [r.transport for r in results] == ["udp"] * 3
    assert len(answerer.requests) == 3
    assert (SipMessage.parse(answerer.requests[0]).get("Via") or "").startswith("SIP/2.0/UDP")
    # one refused connect, then UDP straight away for this destination (remembered)
    assert ep.stats.tcp_fallback_udp == 1
    assert failed.response is None and failed.error == "TCP connection refused"
    assert ep.stats.connections_failed == 2  # the first big one + the explicit ;transport=tcp


def test_fallback_memory_expires() -> None:
    async def run() -> SipEndpoint:
        port = _free_port_both()
        loop = asyncio.get_running_loop()
        answerer = UdpAnswerer()
        transport, _ = await loop.create_datagram_endpoint(lambda: answerer,
                                                           local_addr=("127.0.0.1", port))
        ep = await _endpoint(tcp_fallback_hold=0.2)
        dest = f"sip:rec@127.0.0.1:{port}"
        hop = NextHop.for_uri(SipUri.parse(dest), ("127.0.0.1", port))
        await ep.send_request(_publish(ep, dest), hop)
        await asyncio.sleep(0.3)
        await ep.send_request(_publish(ep, dest), hop)  # tries TCP again, falls back again
        ep.close()
        transport.close()
        return ep

    ep = _run(run)
    assert ep.stats.tcp_fallback_udp == 2 and ep.stats.connections_failed == 2


def test_one_connection_reused_by_concurrent_and_later_transactions() -> None:
    async def run() -> tuple[list[TxResult], Responder, SipEndpoint]:
        srv = Responder(delay=0.05)
        port = await srv.start()
        ep = await _endpoint()
        dest = f"sip:rec@127.0.0.1:{port};transport=tcp"
        hop = NextHop.for_uri(SipUri.parse(dest), ("127.0.0.1", port))
        results = list(await asyncio.gather(*(ep.send_request(_publish(ep, dest), hop)
                                              for _ in range(2))))
        results.append(await ep.send_request(_publish(ep, dest), hop))
        sizes = ep.table_sizes()
        ep.close()
        await srv.stop()
        assert sizes["connections"] == 1 and sizes["client_transactions"] == 0
        return results, srv, ep

    results, srv, ep = _run(run)
    assert all(r.response is not None and r.response.status == 200 for r in results)
    assert srv.connections == 1 and len(srv.requests) == 3
    assert ep.stats.connections_opened == 1


def test_idle_connection_is_closed() -> None:
    async def run() -> tuple[Responder, SipEndpoint, int]:
        srv = Responder()
        port = await srv.start()
        ep = await _endpoint(idle_timeout=0.3)
        dest = f"sip:rec@127.0.0.1:{port};transport=tcp"
        hop = NextHop.for_uri(SipUri.parse(dest), ("127.0.0.1", port))
        await ep.send_request(_publish(ep, dest), hop)
        await asyncio.sleep(0.15)
        assert len(ep.pool) == 1
        await asyncio.sleep(0.45)
        closed_while_idle = srv.closed
        assert len(ep.pool) == 0
        await ep.send_request(_publish(ep, dest), hop)  # a new connection
        ep.close()
        await srv.stop()
        return srv, ep, closed_while_idle

    srv, ep, closed_while_idle = _run(run)
    assert closed_while_idle == 1  # the server saw our close
    assert srv.connections == 2 and ep.stats.connections_opened == 2
    assert ep.stats.connections_closed == 2  # idle + at endpoint close


def test_connection_closed_fails_outstanding_transaction_at_once() -> None:
    async def run() -> tuple[TxResult, float]:
        srv = Responder(mode="close")
        port = await srv.start()
        ep = await _endpoint(timeout=5.0)
        dest = f"sip:rec@127.0.0.1:{port};transport=tcp"
        started = time.monotonic()
        result = await _send_publish(ep, dest, port)
        took = time.monotonic() - started
        ep.close()
        await srv.stop()
        return result, took

    result, took = _run(run)
    assert result.response is None and result.error == "TCP connection closed by the peer"
    assert took < 1.0


def test_answer_without_content_length_closes_the_connection() -> None:
    async def run() -> tuple[TxResult, SipEndpoint]:
        srv = Responder(mode="no_length")
        port = await srv.start()
        ep = await _endpoint(timeout=5.0)
        dest = f"sip:rec@127.0.0.1:{port};transport=tcp"
        result = await _send_publish(ep, dest, port)
        ep.close()
        await srv.stop()
        return result, ep

    result, ep = _run(run)
    assert result.response is None and "Content-Length" in result.error
    assert result.error.startswith("TCP: ")
    assert ep.stats.stream_garbage == 1 and ep.stats.connections_closed == 1


def test_request_on_our_connection_gets_501() -> None:
    async def run() -> tuple[TxResult, Responder, SipEndpoint]:
        srv = Responder(mode="request_first")
        port = await srv.start()
        ep = await _endpoint()
        dest = f"sip:rec@127.0.0.1:{port};transport=tcp"
        result = await _send_publish(ep, dest, port)
        ep.close()
        await srv.stop()
        return result, srv, ep

    result, srv, ep = _run(run)
    assert result.response is not None and result.response.status == 200
    assert srv.their_answers[0].startswith(b"SIP/2.0 501 Not Implemented\r\n")
    assert ep.stats.stream_requests_refused == 1


def test_no_answer_on_tcp_is_timer_f() -> None:
    async def run() -> tuple[TxResult, Responder, float]:
        srv = Responder(delay=3.0)
        port = await srv.start()
        ep = await _endpoint(timeout=0.4)
        dest = f"sip:rec@127.0.0.1:{port};transport=tcp"
        started = time.monotonic()
        result = await _send_publish(ep, dest, port)
        took = time.monotonic() - started
        ep.close()
        await srv.stop()
        return result, srv, took

    result, srv, took = _run(run)
    assert result.response is None and result.error == "transaction timeout"
    assert 0.35 <= took < 1.5 and len(srv.requests) == 1


# --------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    ca = TestCa()
    server = ca.issue("recorder.test", dns=["recorder.test"], ips=["127.0.0.1"]).write(d, "srv")
    client = ca.issue("spitwall-deliver", client=True).write(d, "cli")
    return {"ca": ca.write(d), "srv_cert": server.cert, "srv_key": server.key,
            "cli_cert": client.cert, "cli_key": client.key}


def _server_ctx(pki: dict[str, Path], *, require_client: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pki["srv_cert"], pki["srv_key"])
    if require_client:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(pki["ca"])
    return ctx


def _tls_publish(pki: dict[str, Path], server_name: str, *, client_tls: ssl.SSLContext,
                 require_client: bool = False) -> tuple[TxResult, Responder, float]:
    async def run() -> tuple[TxResult, Responder, float]:
        srv = Responder(ssl=_server_ctx(pki, require_client=require_client))
        port = await srv.start()
        ep = await _endpoint(tls=client_tls, timeout=5.0)
        host = f"[{server_name}]" if ":" in server_name else server_name
        dest = f"sips:rec@{host}:{port}"
        started = time.monotonic()
        result = await _send_publish(ep, dest, port)
        took = time.monotonic() - started
        ep.close()
        await srv.stop()
        return result, srv, took

    out: tuple[TxResult, Responder, float] = _run(run)
    return out


@pytest.mark.parametrize("server_name", ["127.0.0.1", "recorder.test"])
def test_tls_publish_verified_by_ip_and_by_name(pki: dict[str, Path], server_name: str) -> None:
    result, srv, _ = _tls_publish(pki, server_name, client_tls=client_tls_context(pki["ca"]))
    assert result.response is not None and result.response.status == 200, result.error
    assert result.transport == "tls"
    req = SipMessage.parse(srv.requests[0])
    assert (req.get("Via") or "").startswith("SIP/2.0/TLS ")
    assert req.uri == f"sips:rec@{server_name}:{srv.port}"


def test_tls_wrong_host_name_fails_with_verify_error(pki: dict[str, Path]) -> None:
    result, srv, took = _tls_publish(pki, "other.test", client_tls=client_tls_context(pki["ca"]))
    assert result.response is None and took < 2.0
    assert result.error.startswith("TLS: certificate verify failed: Hostname mismatch"), \
        result.error
    assert srv.requests == []


def test_tls_unknown_ca_fails(pki: dict[str, Path]) -> None:
    result, srv, _ = _tls_publish(pki, "127.0.0.1", client_tls=client_tls_context())
    assert result.response is None
    assert result.error.startswith("TLS: certificate verify failed:"), result.error
    assert srv.requests == []


def test_mutual_tls(pki: dict[str, Path]) -> None:
    ctx = client_tls_context(pki["ca"], pki["cli_cert"], pki["cli_key"])
    result, srv, _ = _tls_publish(pki, "127.0.0.1", client_tls=ctx, require_client=True)
    assert result.response is not None and result.response.status == 200, result.error
    subject = dict(item[0] for item in srv.peer_certs[0]["subject"])
    assert subject["commonName"] == "spitwall-deliver"


def test_mutual_tls_without_client_certificate_fails(pki: dict[str, Path]) -> None:
    result, srv, took = _tls_publish(pki, "127.0.0.1", client_tls=client_tls_context(pki["ca"]),
                                     require_client=True)
    assert result.response is None and took < 2.0  # the server's alert ends it, not Timer F
    assert result.error.startswith("TLS"), result.error
    assert srv.requests == []


def test_encrypted_client_key_takes_the_password(pki: dict[str, Path],
                                                 tmp_path: Path) -> None:
    ca = TestCa()
    paths = ca.issue("c", client=True).write(tmp_path, "enc", password=b"s3cret")
    client_tls_context(None, paths.cert, paths.key, "s3cret")
    with pytest.raises(ssl.SSLError):
        client_tls_context(None, paths.cert, paths.key, None)  # no prompt: an error
