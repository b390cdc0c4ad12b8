"""The delivery worker's SIP endpoint: client transactions out (UDP, TCP, TLS), server
transactions in (UDP), and the place where a request's transport is chosen.

Why not `media.sip.SipUas`: that is an INVITE server (calls, dialogs, REFER); the worker needs
the other half -- many concurrent non-INVITE *client* transactions (PUBLISH, NOTIFY) with RFC 3261
17.1.2 Timer E/F, and small non-INVITE *server* transactions (SUBSCRIBE, OPTIONS) that absorb
retransmissions (Timer J). The message model, parser and serialiser are `media.sip`'s.

Transport (`select_transport`, `SipEndpoint.send_request`): ``sips:`` or ``;transport=tls`` is
TLS, ``;transport=tcp`` TCP, ``;transport=udp`` UDP; with no transport parameter a request goes
over UDP unless it is larger than ``udp_max`` bytes (RFC 3261 18.1.1: 1300), then over TCP --
and if that connection cannot be made, over UDP after all, with the destination remembered as
"no TCP" for a while. Stream connections, framing and TLS are in `intercept.delivery.stream`.

Bodies are binary (DER S/MIME): `SipMessage` keeps bodies as text decoded with
``surrogateescape``, which round-trips every byte, so `body_text` / `body_bytes` convert.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import secrets
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, cast

from intercept.delivery.stream import (
    MAX_BODY,
    MAX_HEADER,
    ConnectError,
    ConnKey,
    StreamConnection,
    StreamPool,
)
from intercept.targets import delivery_transport
from media.sip import (
    MAX_MESSAGE_SIZE,
    NameAddr,
    SipMessage,
    SipTimers,
    SipUri,
    Via,
    send_datagram,
)

log = logging.getLogger(__name__)

Address = tuple[str, int]

USER_AGENT = "spitwall-deliver"
EVENT_PACKAGE = "srtp"
#: RFC 3903 4.1: the initial publication's lifetime we ask for
PUBLISH_EXPIRES = 3600
ALLOW = "SUBSCRIBE, OPTIONS"


def body_text(data: bytes) -> str:
    """Binary body -> the text form `SipMessage` carries (lossless)."""
    return data.decode("utf-8", "surrogateescape")


def body_bytes(msg: SipMessage) -> bytes:
    return msg.body.encode("utf-8", "surrogateescape")


def new_tag() -> str:
    return secrets.token_hex(8)


def new_branch() -> str:
    return "z9hG4bK" + secrets.token_hex(10)


def new_call_id(host: str) -> str:
    return f"{secrets.token_hex(12)}@{uri_host(host)}"


def uri_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _via(local: Address, branch: str) -> str:
    return f"SIP/2.0/UDP {uri_host(local[0])}:{local[1]};branch={branch};rport"


# --------------------------------------------------------------------------- transport

#: RFC 3261 18.1.1: a request larger than this (MTU 1500 - 200) goes over a congestion-
#: controlled transport when its URI names none
UDP_MAX = 1300


def uri_transport(uri: SipUri) -> str | None:
    """``udp``, ``tcp`` or ``tls`` as ``uri`` asks (``sips:`` and ``;transport=tls`` are TLS);
    None when a ``sip:`` URI names none. `ValueError` for transports we do not speak."""
    return delivery_transport(uri.scheme, uri.param("transport"))


def default_port(transport: str | None) -> int:
    return 5061 if transport == "tls" else 5060


@dataclass(frozen=True)
class NextHop:
    """Where a request goes: the address, the transport its URI asks for (None: UDP, or TCP
    when the request is large) and, for TLS, the name the server's certificate must carry (the
    URI host: a DNS name, or an IP literal checked against the IP SANs)."""

    addr: Address
    transport: str | None = None
    server_name: str = ""

    @classmethod
    def for_uri(cls, uri: SipUri, addr: Address) -> NextHop:
        return cls(addr, uri_transport(uri), uri.host.strip("[]"))


def select_transport(explicit: str | None, size: int, udp_max: int,
                     tcp_refused: bool = False) -> tuple[str, bool]:
    """(transport, may fall back to UDP) for a request of ``size`` bytes whose URI asks for
    ``explicit``: an explicit transport is used as is; none means UDP, or TCP when ``size`` is
    over ``udp_max`` (0: never) and the destination did not refuse TCP lately -- and only such
    a TCP attempt falls back to UDP (RFC 3261 18.1.1)."""
    if explicit is not None:
        return explicit, False
    if udp_max > 0 and size > udp_max and not tcp_refused:
        return "tcp", True
    return "udp", False


def via_transport(msg: SipMessage, transport: str) -> SipMessage:
    """``msg`` with its top Via sent over ``transport`` (``SIP/2.0/TCP``, ``/TLS``): same
    sent-by and branch, no ``rport`` (a stream's responses come back on the connection)."""
    headers = list(msg.headers)
    for i, (name, value) in enumerate(headers):
        if name.lower() in ("via", "v"):
            via = Via.parse(value)
            params = tuple(p for p in via.params if p[0].lower() != "rport")
            headers[i] = (name, str(replace(via, transport=transport.upper(), params=params)))
            break
    return replace(msg, headers=tuple(headers))


def local_uri(local: Address, user: str = "spitwall-deliver") -> str:
    return f"sip:{user}@{uri_host(local[0])}:{local[1]}"


# --------------------------------------------------------------------------- builders


def build_publish(
    dest: str, body: bytes, *, local: Address, content_type: str, content_disposition: str,
    branch: str | None = None, call_id: str | None = None, from_tag: str | None = None,
    expires: int = PUBLISH_EXPIRES, user_agent: str = USER_AGENT,
) -> SipMessage:  # fmt: skip
    """An initial publication (RFC 3903 4.1, no SIP-If-Match) of one event to ``dest``.

    Request-URI and To are the destination (the event state compositor's resource); From is
    the worker itself. Nothing in the headers names the case or the target: the LIID, the call
    and the event id are only inside the encrypted body."""
    uri = SipUri.parse(dest)
    ruri = str(uri)
    me = local_uri(local)
    headers: list[tuple[str, str]] = [
        ("Via", _via(local, branch or new_branch())),
        ("Max-Forwards", "70"),
        ("From", f"<{me}>;tag={from_tag or new_tag()}"),
        ("To", f"<{ruri}>"),
        ("Call-ID", call_id or new_call_id(local[0])),
        ("CSeq", "1 PUBLISH"),
        ("Event", EVENT_PACKAGE),
        ("Expires", str(expires)),
        ("User-Agent", user_agent),
        ("Content-Type", content_type),
        ("Content-Disposition", content_disposition),
    ]
    return SipMessage.request("PUBLISH", ruri, headers, body_text(body))


@dataclass(frozen=True)
class DialogRoute:
    """Where an in-dialog request goes (RFC 3261 12.2.1.1): Request-URI, Route values, next hop
    (and the URI it was taken from: its transport and host choose transport and TLS name)."""

    ruri: str
    routes: tuple[str, ...]
    next_hop: Address
    hop_uri: str = ""


def dialog_route(remote_target: str, route_set: Sequence[str], fallback: Address) -> DialogRoute:
    """Request-URI, Route headers and the next hop for a request in a dialog whose remote
    target and route set are given. A next hop that is not an IP literal is not resolved: the
    request goes to ``fallback`` (where the dialog-creating request came from, i.e. the proxy)."""
    target = SipUri.parse(remote_target)
    routes = list(route_set)
    if routes:
        first = NameAddr.parse(routes[0]).sip_uri
        if first.loose_route:
            ruri, hop = str(target), first
        else:  # strict router: its URI becomes the Request-URI, the target the last Route
            ruri = str(replace(first, headers=""))
            routes = [*routes[1:], f"<{target}>"]
            hop = first
    else:
        ruri, hop = str(target), target
    tls = hop.scheme == "sips" or (hop.param("transport") or "").lower() == "tls"
    next_hop = hop.address(5061 if tls else 5060) if is_ip(hop.host) else fallback
    return DialogRoute(ruri, tuple(routes), next_hop, str(replace(hop, headers="")))


def build_notify(
    *, route: DialogRoute, local: Address, call_id: str, local_uri_: str, local_tag: str,
    remote_uri: str, remote_tag: str, cseq: int, state: str, event_param: str | None = None,
    body: bytes = b"", content_type: str | None = None, content_disposition: str | None = None,
    branch: str | None = None, user_agent: str = USER_AGENT,
) -> SipMessage:  # fmt: skip
    """A NOTIFY in a subscription dialog (RFC 6665 4.2.2): Event and Subscription-State, our
    Contact, the dialog's route set; with a body only when one is given (the event)."""
    event = EVENT_PACKAGE + (f";id={event_param}" if event_param else "")
    headers: list[tuple[str, str]] = [
        ("Via", _via(local, branch or new_branch())),
        ("Max-Forwards", "70"),
    ]
    headers += [("Route", r) for r in route.routes]
    headers += [
        ("From", f"<{local_uri_}>;tag={local_tag}"),
        ("To", f"<{remote_uri}>;tag={remote_tag}"),
        ("Call-ID", call_id),
        ("CSeq", f"{cseq} NOTIFY"),
        ("Contact", f"<{local_uri(local)}>"),
        ("Event", event),
        ("Subscription-State", state),
        ("User-Agent", user_agent),
    ]
    if body:
        headers.append(("Content-Type", content_type or "application/octet-stream"))
        if content_disposition:
            headers.append(("Content-Disposition", content_disposition))
    return SipMessage.request("NOTIFY", route.ruri, headers, body_text(body))


def build_response(
    req: SipMessage, src: Address, code: int, reason: str, *, to_tag: str | None = None,
    extra: Sequence[tuple[str, str]] = (), user_agent: str = USER_AGENT,
) -> SipMessage:  # fmt: skip
    """RFC 3261 8.2.6 response: Vias (top one with received/rport), From, To (+tag), Call-ID,
    CSeq, then ``extra``."""
    vias = list(req.vias)
    vias[0] = str(req.top_via.with_received(src))
    headers: list[tuple[str, str]] = [("Via", v) for v in vias]
    headers.append(("From", req.get("From") or ""))
    to = req.get("To") or ""
    if to_tag and code > 100 and not req.to_tag:
        to = f"{to};tag={to_tag}"
    headers += [("To", to), ("Call-ID", req.call_id), ("CSeq", str(req.cseq))]
    headers += list(extra)
    headers.append(("Server", user_agent))
    return SipMessage.response(code, reason, headers)


# --------------------------------------------------------------------------- the endpoint


@dataclass
class EndpointStats:
    datagrams: int = 0
    garbage: int = 0
    requests: int = 0
    request_retransmissions: int = 0
    responses: int = 0
    unmatched_responses: int = 0
    requests_sent: int = 0
    retransmissions_sent: int = 0
    transaction_timeouts: int = 0
    send_errors: int = 0
    stateless_replies: int = 0
    internal_errors: int = 0
    # TCP/TLS (intercept.delivery.stream)
    connections_opened: int = 0
    connections_failed: int = 0
    connections_closed: int = 0
    tcp_fallback_udp: int = 0
    stream_messages: int = 0
    stream_garbage: int = 0
    stream_requests_refused: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class TransportOptions:
    """How the endpoint chooses and runs TCP/TLS (see `select_transport`, `stream`)."""

    #: requests larger than this go over TCP when their URI names no transport (0: never)
    udp_max: int = UDP_MAX
    #: a destination whose TCP connect failed gets UDP for this long (seconds)
    tcp_fallback_hold: float = 300.0
    connect_timeout: float = 5.0
    #: a connection without traffic and transactions this long is closed (seconds)
    idle_timeout: float = 60.0
    #: TLS client context (None: system CAs, no client certificate, made when first needed)
    tls: ssl.SSLContext | None = None
    max_header: int = MAX_HEADER
    max_body: int = MAX_BODY

    def __post_init__(self) -> None:
        if self.udp_max < 0:
            raise ValueError("udp_max must be >= 0")
        if min(self.connect_timeout, self.idle_timeout) <= 0 or self.tcp_fallback_hold < 0:
            raise ValueError("connect and idle timeouts must be > 0, the fallback hold >= 0")


@dataclass(frozen=True)
class TxResult:
    """A client transaction's end: the final response, or None and why (``transaction
    timeout``, ``TCP connection refused``, ``TLS: certificate verify failed: ...``)."""

    response: SipMessage | None
    error: str = ""
    transport: str = "udp"


class _ClientTx:
    __slots__ = ("addr", "branch", "conn", "data", "future", "interval", "method", "proceeding",
                 "reason", "timer_e", "timer_f")  # fmt: skip

    def __init__(self, branch: str, method: str, data: bytes, addr: Address,
                 future: asyncio.Future[SipMessage | None]) -> None:
        self.branch = branch
        self.method = method
        self.data = data
        self.addr = addr
        self.future = future
        self.interval = 0.0
        self.proceeding = False
        self.timer_e: asyncio.TimerHandle | None = None
        self.timer_f: asyncio.TimerHandle | None = None
        self.conn: StreamConnection | None = None  # None: UDP
        self.reason = ""  # why it ended without a response (empty: Timer F)

    def cancel(self) -> None:
        for handle in (self.timer_e, self.timer_f):
            if handle is not None:
                handle.cancel()
        self.timer_e = self.timer_f = None


RequestHandler = Callable[[SipMessage, Address], None]


def _show_addr(addr: Address) -> str:
    return f"{uri_host(addr[0])}:{addr[1]}"


class SipEndpoint(asyncio.DatagramProtocol):
    """The worker's UDP socket, and its outbound TCP/TLS connections. `send_request` runs a
    non-INVITE client transaction over the transport `select_transport` picks and returns a
    `TxResult`; `request` is its UDP-only core (resolves to the final response, None on Timer
    F). Incoming requests (UDP) go to ``on_request`` once (their retransmissions get the cached
    final response, or nothing while it is being worked out); `respond` sends and caches that
    final response. Requests a peer sends on one of our outbound connections get ``501`` (we
    serve nothing there: SUBSCRIBE and OPTIONS are received over UDP only)."""

    def __init__(
        self, on_request: RequestHandler, *, timers: SipTimers | None = None,
        timeout: float | None = None, max_transactions: int = 20000,
        recv_buffer: int = 1 << 21, transports: TransportOptions | None = None,
    ) -> None:  # fmt: skip
        self.on_request = on_request
        self.timers = timers or SipTimers()
        #: Timer F (and J): 64*T1 by default, shorter by configuration
        self.timeout = timeout if timeout is not None else self.timers.timeout
        self.max_transactions = max_transactions
        self.recv_buffer = recv_buffer
        self.stats = EndpointStats()
        self.transports = transports or TransportOptions()
        opts = self.transports
        self.pool = StreamPool(on_message=self._stream_message, on_closed=self._stream_closed,
                               stats=self.stats, tls=opts.tls,
                               connect_timeout=opts.connect_timeout,
                               idle_timeout=opts.idle_timeout, max_header=opts.max_header,
                               max_body=opts.max_body)
        #: destinations whose TCP connect failed -> when to try TCP again (loop time)
        self._no_tcp: dict[Address, float] = {}
        self._transport: asyncio.DatagramTransport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._local: Address = ("127.0.0.1", 0)
        self._client: dict[str, _ClientTx] = {}
        #: server transactions: key -> (cached final response or None while in progress)
        self._server: dict[tuple[str, str, str], tuple[bytes | None, Address]] = {}

    async def start(self, host: str, port: int) -> Address:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        await loop.create_datagram_endpoint(lambda: self, local_addr=(host, port), family=family)
        return self._local

    @property
    def local(self) -> Address:
        return self._local

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)
        self._loop = asyncio.get_running_loop()
        sock = self._transport.get_extra_info("socket")
        if sock is not None and self.recv_buffer > 0:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.recv_buffer)
        name = self._transport.get_extra_info("sockname")
        if name:
            self._local = (str(name[0]), int(name[1]))
            self.pool.source = self._local[0]  # TCP/TLS go out from the same address

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    def error_received(self, exc: Exception) -> None:
        log.debug("UDP error on the delivery socket: %s", exc)

    def close(self) -> None:
        for ctx in list(self._client.values()):
            ctx.cancel()
            if not ctx.future.done():
                ctx.future.set_result(None)
        self._client.clear()
        self._server.clear()
        self.pool.close()
        if self._transport is not None:
            self._transport.close()

    def table_sizes(self) -> dict[str, int]:
        return {"client_transactions": len(self._client),
                "server_transactions": len(self._server), "connections": len(self.pool)}

    # ----------------------------------------------------------------- sending

    def _send(self, data: bytes, addr: Address, *, retransmission: bool = False) -> None:
        send_datagram(self._transport, self.stats, data, addr, retransmission=retransmission)

    def request(self, msg: SipMessage, addr: Address) -> asyncio.Future[SipMessage | None]:
        """Send ``msg`` (its top Via carries our branch) as a non-INVITE client transaction
        (RFC 3261 17.1.2): Timer E retransmits (T1, doubling to T2; T2 once proceeding),
        Timer F gives up. Resolves to the final response, or None on timeout / no socket."""
        if self._loop is None:
            raise RuntimeError("endpoint not started")
        return self._udp_request(msg, msg.serialize(), addr)

    def _udp_request(self, msg: SipMessage, data: bytes,
                     addr: Address) -> asyncio.Future[SipMessage | None]:
        if self._loop is None:
            raise RuntimeError("endpoint not started")
        fut: asyncio.Future[SipMessage | None] = self._loop.create_future()
        branch = msg.branch or ""
        if not branch or branch in self._client:
            raise ValueError("request needs a fresh branch in its top Via")
        if len(data) > MAX_MESSAGE_SIZE:
            raise ValueError(f"message of {len(data)} bytes does not fit a UDP datagram")
        ctx = _ClientTx(branch, msg.method or "", data, addr, fut)
        self._client[branch] = ctx
        self.stats.requests_sent += 1
        self._send(data, addr)
        t1, t2 = self.timers.t1, self.timers.t2
        ctx.interval = t1
        loop = self._loop

        def timer_e() -> None:
            if self._client.get(branch) is not ctx:
                return
            self._send(ctx.data, ctx.addr, retransmission=True)
            ctx.interval = t2 if ctx.proceeding else min(2 * ctx.interval, t2)
            ctx.timer_e = loop.call_later(ctx.interval, timer_e)

        def timer_f() -> None:
            self.stats.transaction_timeouts += 1
            self._client_done(ctx, None)

        ctx.timer_e = loop.call_later(t1, timer_e)
        ctx.timer_f = loop.call_later(self.timeout, timer_f)
        return fut

    def _client_done(self, ctx: _ClientTx, response: SipMessage | None, reason: str = "") -> None:
        ctx.cancel()
        if reason and not ctx.reason:
            ctx.reason = reason
        if self._client.get(ctx.branch) is ctx:
            del self._client[ctx.branch]
        if ctx.conn is not None:
            ctx.conn.pending.discard(ctx.branch)
        if not ctx.future.done():
            ctx.future.set_result(response)

    # ----------------------------------------------------------------- any transport

    def tcp_refused(self, addr: Address) -> bool:
        """Did a TCP connect to ``addr`` fail within the last ``tcp_fallback_hold`` seconds?"""
        until = self._no_tcp.get(addr)
        if until is None:
            return False
        if self._loop is not None and self._loop.time() >= until:
            del self._no_tcp[addr]
            return False
        return True

    async def send_request(self, msg: SipMessage, hop: NextHop) -> TxResult:
        """Run ``msg`` (built with a UDP Via carrying a fresh branch) as a non-INVITE client
        transaction to ``hop`` over the transport `select_transport` picks. Over TCP/TLS the
        top Via says so, there is no Timer E (RFC 3261 17.1.2.2: reliable transport), Timer F
        still applies, and a connection that cannot be made or that closes ends the transaction
        at once with the reason. A size-chosen TCP whose connect fails is retried over UDP
        (RFC 3261 18.1.1) and the destination gets UDP for ``tcp_fallback_hold`` seconds.
        `ValueError` when the request cannot be sent at all (too large, no branch)."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("endpoint not started")
        started = loop.time()
        data = msg.serialize()
        transport, may_fall_back = select_transport(
            hop.transport, len(data), self.transports.udp_max,
            hop.transport is None and self.tcp_refused(hop.addr))
        if transport == "udp":
            return await self._udp_result(msg, data, hop.addr)
        server_name = hop.server_name if transport == "tls" else ""
        key: ConnKey = (transport, hop.addr[0], hop.addr[1], server_name)
        try:
            conn = await self.pool.get(key)
        except ConnectError as exc:
            if not may_fall_back:
                return TxResult(None, exc.reason, transport)
            self.stats.tcp_fallback_udp += 1
            if len(self._no_tcp) >= 10000:
                self._no_tcp.clear()
            self._no_tcp[hop.addr] = loop.time() + self.transports.tcp_fallback_hold
            log.info("%s: %s; sending over UDP (and for %.0f s)", _show_addr(hop.addr),
                     exc.reason, self.transports.tcp_fallback_hold)
            return await self._udp_result(msg, data, hop.addr)
        remaining = self.timeout - (loop.time() - started)
        if remaining <= 0:
            self.stats.transaction_timeouts += 1
            return TxResult(None, "transaction timeout", transport)
        return await self._stream_request(via_transport(msg, transport), conn, remaining)

    async def _udp_result(self, msg: SipMessage, data: bytes, addr: Address) -> TxResult:
        resp = await self._udp_request(msg, data, addr)
        return TxResult(resp, "" if resp is not None else "transaction timeout")

    async def _stream_request(self, msg: SipMessage, conn: StreamConnection,
                              timeout: float) -> TxResult:
        assert self._loop is not None
        branch = msg.branch or ""
        if not branch or branch in self._client:
            raise ValueError("request needs a fresh branch in its top Via")
        data = msg.serialize()
        if len(data) > self.transports.max_header + self.transports.max_body:
            raise ValueError(f"message of {len(data)} bytes is over the stream limit")
        fut: asyncio.Future[SipMessage | None] = self._loop.create_future()
        ctx = _ClientTx(branch, msg.method or "", data, conn.peer, fut)
        ctx.conn = conn
        self._client[branch] = ctx
        conn.pending.add(branch)
        self.stats.requests_sent += 1

        def timer_f() -> None:
            self.stats.transaction_timeouts += 1
            self._client_done(ctx, None, "transaction timeout")

        ctx.timer_f = self._loop.call_later(timeout, timer_f)
        if not conn.send(data):  # closed: _stream_closed ended the transaction already
            self._client_done(ctx, None, conn.reason or "connection closed")
        resp = await fut
        return TxResult(resp, "" if resp is not None else ctx.reason or "transaction timeout",
                        conn.transport)

    def _stream_closed(self, conn: StreamConnection, reason: str) -> None:
        for branch in list(conn.pending):
            ctx = self._client.get(branch)
            if ctx is not None and ctx.conn is conn:
                self._client_done(ctx, None, reason)
        conn.pending.clear()

    def _stream_message(self, data: bytes, conn: StreamConnection) -> None:
        self.stats.stream_messages += 1
        try:
            self._receive_stream(data, conn)
        except Exception:  # one bad message must not stop the worker: logged, counted
            self.stats.internal_errors += 1
            log.exception("internal error handling a message from %r", conn)

    def _receive_stream(self, data: bytes, conn: StreamConnection) -> None:
        try:
            msg = SipMessage.parse(data, max_size=max(len(data), MAX_MESSAGE_SIZE))
        except ValueError as exc:  # framed right, not SIP: the stream is still in step
            self.stats.stream_garbage += 1
            log.debug("dropped a bad message on %r: %s", conn, exc)
            return
        if msg.is_response:
            self.stats.responses += 1
            ctx = self._client.get(msg.branch or "")
            if ctx is None or ctx.conn is not conn or msg.cseq.method != ctx.method:
                self.stats.unmatched_responses += 1
                return
            if (msg.status or 0) >= 200:
                self._client_done(ctx, msg)
            return
        self.stats.requests += 1
        if msg.method == "ACK":
            return
        # we serve nothing on a connection we opened (SUBSCRIBE/OPTIONS come over UDP)
        self.stats.stream_requests_refused += 1
        conn.send(build_response(msg, conn.peer, 501, "Not Implemented",
                                 to_tag=new_tag()).serialize())

    def respond(
        self, req: SipMessage, src: Address, code: int, reason: str, *,
        to_tag: str | None = None, extra: Sequence[tuple[str, str]] = (),
    ) -> None:  # fmt: skip
        """Send the final response to ``req`` and keep it for retransmissions (Timer J)."""
        data = build_response(req, src, code, reason, to_tag=to_tag, extra=extra).serialize()
        self._send(data, src)
        key = self._server_key(req)
        if self._loop is None:
            return
        if key in self._server:
            self._server[key] = (data, src)  # its Timer J runs since the request arrived
        elif len(self._server) >= self.max_transactions:
            self.stats.stateless_replies += 1
        else:
            self._server[key] = (data, src)
            self._loop.call_later(self.timeout, self._server.pop, key, None)

    # ----------------------------------------------------------------- receiving

    @staticmethod
    def _server_key(req: SipMessage) -> tuple[str, str, str]:
        via = req.top_via
        branch = via.branch
        if branch and branch.startswith("z9hG4bK"):
            return (branch, via.sent_by, req.method or "")
        return (f"2543|{req.vias[0]}|{req.from_tag}|{req.cseq.number}", req.call_id,
                req.method or "")

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.stats.datagrams += 1
        try:
            self._receive(data, (str(addr[0]), int(addr[1])))
        except Exception:  # one bad datagram must not stop the worker: logged, counted
            self.stats.internal_errors += 1
            log.exception("internal error handling a datagram from %s", addr)

    def _receive(self, data: bytes, addr: Address) -> None:
        if not data.strip(b"\r\n\t \x00"):
            return  # keepalive
        try:
            msg = SipMessage.parse(data)
        except ValueError as exc:
            self.stats.garbage += 1
            log.debug("dropped a bad datagram from %s:%s: %s", addr[0], addr[1], exc)
            return
        if msg.is_response:
            self.stats.responses += 1
            ctx = self._client.get(msg.branch or "")
            if ctx is None or ctx.conn is not None or msg.cseq.method != ctx.method:
                self.stats.unmatched_responses += 1  # (a stream's answers come on the stream)
                return
            if (msg.status or 0) < 200:
                ctx.proceeding = True
                return
            self._client_done(ctx, msg)
            return
        self.stats.requests += 1
        if msg.method == "ACK":
            return  # only our non-2xx answers to stray INVITEs get ACKs: nothing to do
        key = self._server_key(msg)
        cached = self._server.get(key)
        if cached is not None or key in self._server:
            self.stats.request_retransmissions += 1
            if cached is not None and cached[0] is not None:
                self._send(cached[0], addr, retransmission=True)
            return
        if len(self._server) < self.max_transactions and self._loop is not None:
            self._server[key] = (None, addr)  # in progress: retransmissions are absorbed
            self._loop.call_later(self.timeout, self._server.pop, key, None)
        self.on_request(msg, addr)
