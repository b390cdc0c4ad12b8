"""SIP over TCP and TLS for the delivery worker: RFC 3261 18.3 framing, persistent connections.

Why: an event PUBLISH/NOTIFY is ~1.6 KB (its DER S/MIME body alone ~1.2 KB). Over UDP on a
1500-byte MTU path it is fragmented, firewalls drop fragments, and lawful-intercept events would
end as dead letters; RFC 3261 18.1.1 asks for a congestion-controlled transport above 1300
bytes, and carriers provision LI handover over TCP or (mutual) TLS. `sipua.SipEndpoint` decides
which transport a request takes; this module only connects, frames and carries the bytes.

What is hand-written and why: the connections are the standard library's (asyncio streams,
`ssl`); no maintained Python library frames SIP on a byte stream, so the ~80 lines of RFC 3261
18.3 framing are here -- headers up to CRLFCRLF, then exactly Content-Length body bytes, with
limits against a hostile peer:

* `StreamFramer`     -- bytes in, whole messages out. Content-Length is mandatory on a stream:
  missing or invalid is a `FramingError` and the connection is closed (a byte stream cannot be
  resynchronised without it). CRLFs between messages (RFC 5626 3.5.1 keep-alives) are skipped.
  The header block and the body are capped (64 KB / 1 MB by default).
* `StreamConnection` -- one connection, its reader task, its idle timer, and the branches of
  the client transactions waiting on it (failed at once when it closes).
* `StreamPool`       -- one connection per (transport, IP, port, TLS server name), reused by
  every transaction to it; concurrent first users share one connect attempt.
* `client_tls_context` -- the TLS client context: a CA file or the system CAs, an optional
  client certificate (mutual TLS), TLS >= 1.2, host name verification.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

#: (transport "tcp" | "tls", IP, port, TLS server name or "")
ConnKey = tuple[str, str, int, str]

MAX_HEADER = 64 * 1024
MAX_BODY = 1024 * 1024
#: bytes queued for a peer that does not read before the connection is given up
MAX_WRITE_BUFFER = 4 * 1024 * 1024
READ_CHUNK = 64 * 1024


class FramingError(ValueError):
    """The byte stream is not SIP framed as RFC 3261 18.3 requires: close the connection."""


class StreamCounters(Protocol):
    """The counters this module keeps (`sipua.EndpointStats` has them)."""

    connections_opened: int
    connections_failed: int
    connections_closed: int
    stream_garbage: int


def _content_length(head: bytes) -> int:
    found: int | None = None
    for line in head.split(b"\r\n")[1:]:
        name, colon, value = line.partition(b":")
        if not colon or line[:1] in (b" ", b"\t"):
            continue
        if name.strip().lower() not in (b"content-length", b"l"):
            continue
        text = value.strip()
        if not text.isdigit() or len(text) > 10:
            raise FramingError(f"invalid Content-Length {text[:20]!r}")
        length = int(text)
        if found is not None and found != length:
            raise FramingError("conflicting Content-Length headers")
        found = length
    if found is None:
        raise FramingError("message without Content-Length (mandatory on a stream)")
    return found


class StreamFramer:
    """RFC 3261 18.3: split a byte stream into SIP messages. `feed` returns the messages the
    bytes completed (possibly none, possibly several) or raises `FramingError`."""

    def __init__(self, max_header: int = MAX_HEADER, max_body: int = MAX_BODY) -> None:
        self.max_header = max_header
        self.max_body = max_body
        self._buf = bytearray()
        self._need: int | None = None  # size of the message at the head, once its headers end
        self._scanned = 0  # bytes already searched for CRLFCRLF (no rescans byte by byte)

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf
        buf += data
        out: list[bytes] = []
        while True:
            if self._need is None:
                skip = 0
                while skip < len(buf) and buf[skip] in (0x0D, 0x0A):
                    skip += 1
                if skip:  # keep-alive CRLFs (or the CRLFCRLF ping) between messages
                    del buf[:skip]
                    self._scanned = 0
                if not buf:
                    break
                end = buf.find(b"\r\n\r\n", max(0, self._scanned - 3))
                if end < 0:
                    if len(buf) > self.max_header:
                        raise FramingError(f"header block over {self.max_header} bytes")
                    self._scanned = len(buf)
                    break
                if end + 4 > self.max_header:
                    raise FramingError(f"header block over {self.max_header} bytes")
                length = _content_length(bytes(buf[:end]))
                if length > self.max_body:
                    raise FramingError(f"Content-Length {length} over the limit of "
                                       f"{self.max_body}")
                self._need = end + 4 + length
            if len(buf) < self._need:
                break
            out.append(bytes(buf[: self._need]))
            del buf[: self._need]
            self._need = None
            self._scanned = 0
        return out


# --------------------------------------------------------------------------- reasons


def label(transport: str) -> str:
    return "TLS" if transport == "tls" else "TCP"


def failure_reason(transport: str, exc: BaseException, *, connecting: bool = False) -> str:
    """A short text for the worker's error / dead letter, e.g. ``TCP connection refused``,
    ``TLS: certificate verify failed: Hostname mismatch, ...``."""
    name = label(transport)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS: certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        text = exc.reason or exc.strerror or str(exc)
        return f"TLS: {str(text).lower().replace('_', ' ')}"
    if isinstance(exc, TimeoutError):
        return f"{name} connect timeout" if connecting else f"{name} timeout"
    if isinstance(exc, ConnectionRefusedError):
        return f"{name} connection refused"
    if isinstance(exc, ConnectionResetError):
        return f"{name} connection reset by the peer"
    if isinstance(exc, OSError):
        if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            return f"{name}: {'host' if exc.errno == errno.EHOSTUNREACH else 'network'} " \
                   "unreachable"
        what = (exc.strerror or str(exc) or type(exc).__name__).lower()
        return f"{name} connect failed: {what}" if connecting else f"{name}: {what}"
    return f"{name}: {exc}"


class ConnectError(Exception):
    """The connection could not be established (the reason is `failure_reason`'s text)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------- TLS


def client_tls_context(cafile: Path | str | None = None, certfile: Path | str | None = None,
                       keyfile: Path | str | None = None,
                       key_password: str | None = None) -> ssl.SSLContext:
    """The TLS client context of the worker: verifies the server's chain against ``cafile``
    (default: the system CAs) and its name against the URI host (an IP literal host is checked
    against the certificate's IP SANs: Python does that when ``server_hostname`` is an IP);
    TLS 1.2 at least; with ``certfile`` (and ``keyfile``, unless the key is in the same PEM) it
    presents a client certificate, for mutual TLS. An encrypted key takes ``key_password``
    (never prompted for). Raises `OSError` / `ssl.SSLError` for unreadable or bad files."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                     cafile=str(cafile) if cafile is not None else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    if certfile is not None:
        password = key_password or ""  # "" instead of None: OpenSSL must never prompt
        ctx.load_cert_chain(str(certfile), str(keyfile) if keyfile is not None else None,
                            password=lambda: password)
    return ctx


# --------------------------------------------------------------------------- connections

MessageHandler = Callable[[bytes, "StreamConnection"], None]
ClosedHandler = Callable[["StreamConnection", str], None]


class StreamConnection:
    """One outbound TCP/TLS connection: reads and frames in its own task, hands each message to
    ``on_message``, closes itself on a framing error, EOF, an error, or after ``idle_timeout``
    without traffic and without transactions waiting (``pending``)."""

    def __init__(
        self, key: ConnKey, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
        on_message: MessageHandler, on_closed: ClosedHandler, stats: StreamCounters,
        idle_timeout: float, max_header: int = MAX_HEADER, max_body: int = MAX_BODY,
    ) -> None:  # fmt: skip
        self.key = key
        self.reader = reader
        self.writer = writer
        self.on_message = on_message
        self.on_closed = on_closed
        self.stats = stats
        self.idle_timeout = idle_timeout
        self.framer = StreamFramer(max_header, max_body)
        self.pending: set[str] = set()
        self.closed = False
        self.reason = ""
        self.messages = 0
        self._loop = asyncio.get_running_loop()
        self.last_used = self._loop.time()
        peer = writer.get_extra_info("peername")
        self.peer: tuple[str, int] = (str(peer[0]), int(peer[1])) if peer else (key[1], key[2])
        self._idle: asyncio.TimerHandle | None = self._loop.call_later(idle_timeout,
                                                                       self._idle_check)
        self._task = self._loop.create_task(self._read_loop(), name=f"sip-{self}")

    def __repr__(self) -> str:
        return f"{label(self.transport)} {self.key[1]}:{self.key[2]}"

    @property
    def transport(self) -> str:
        return self.key[0]

    def send(self, data: bytes) -> bool:
        """Queue ``data``; False (and the connection closed) when that is not possible."""
        if self.closed:
            return False
        transport = self.writer.transport
        if transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
            self.close(f"{label(self.transport)}: the peer does not read (send buffer full)",
                       abort=True)
            return False
        try:
            self.writer.write(data)
        except (OSError, RuntimeError) as exc:
            self.close(failure_reason(self.transport, exc), abort=True)
            return False
        self.last_used = self._loop.time()
        return True

    async def _read_loop(self) -> None:
        name = label(self.transport)
        reason = f"{name} connection closed by the peer"
        try:
            while True:
                data = await self.reader.read(READ_CHUNK)
                if not data:
                    if self.transport == "tls" and not self.messages:
                        # TLS 1.3: a server that refuses our certificate (or its absence)
                        # does so after our handshake completed, often with just a close
                        reason += " before any message (client certificate refused?)"
                    break
                self.last_used = self._loop.time()
                try:
                    messages = self.framer.feed(data)
                except FramingError as exc:
                    self.stats.stream_garbage += 1
                    reason = f"{name}: {exc}"
                    log.info("closing %s: %s", self, exc)
                    break
                for message in messages:
                    self.messages += 1
                    self.on_message(message, self)
                    if self.closed:
                        return
        except asyncio.CancelledError:
            raise
        except (OSError, EOFError) as exc:  # ssl.SSLError is an OSError
            reason = failure_reason(self.transport, exc)
        self.close(reason, abort=True)

    def _idle_check(self) -> None:
        self._idle = None
        if self.closed:
            return
        now = self._loop.time()
        due = self.last_used + self.idle_timeout
        if self.pending or now < due:
            self._idle = self._loop.call_later(max(due - now, 0.05) if not self.pending
                                               else self.idle_timeout, self._idle_check)
            return
        self.close(f"{label(self.transport)} connection idle", abort=False)

    def close(self, reason: str, *, abort: bool = False) -> None:
        """Close (idempotent): ``abort`` drops what is unsent (errors); otherwise the queued
        bytes are flushed first (and TLS says close_notify). ``on_closed`` runs once."""
        if self.closed:
            return
        self.closed = True
        self.reason = reason
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        with contextlib.suppress(RuntimeError):
            if self._task is not asyncio.current_task():
                self._task.cancel()
        transport = self.writer.transport
        if abort:
            transport.abort()
        else:
            transport.close()
        self.on_closed(self, reason)


class StreamPool:
    """Connections by `ConnKey`. `get` returns the open one or connects (connect timeout, TLS
    handshake included); concurrent callers for one key share that attempt. `ConnectError`
    when it fails. Closed connections leave the pool; ``on_closed`` is told (with the reason)
    so their transactions fail at once."""

    def __init__(
        self, *, on_message: MessageHandler, on_closed: ClosedHandler, stats: StreamCounters,
        tls: ssl.SSLContext | None = None, connect_timeout: float = 5.0,
        idle_timeout: float = 60.0, max_header: int = MAX_HEADER, max_body: int = MAX_BODY,
        source: str | None = None,
    ) -> None:  # fmt: skip
        self.on_message = on_message
        self.on_closed = on_closed
        self.stats = stats
        self.tls = tls
        #: local IP connections are made from (the worker's SIP address: what peers' firewalls
        #: and our Via expect); None or a wildcard: the kernel chooses
        self.source = source
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.max_header = max_header
        self.max_body = max_body
        self._conns: dict[ConnKey, StreamConnection] = {}
        self._connecting: dict[ConnKey, asyncio.Task[StreamConnection]] = {}

    def __len__(self) -> int:
        return len(self._conns)

    def connection(self, key: ConnKey) -> StreamConnection | None:
        conn = self._conns.get(key)
        return conn if conn is not None and not conn.closed else None

    async def get(self, key: ConnKey) -> StreamConnection:
        conn = self.connection(key)
        if conn is not None:
            return conn
        task = self._connecting.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._connect(key))
            self._connecting[key] = task

            def forget(done: asyncio.Task[StreamConnection], key: ConnKey = key) -> None:
                if self._connecting.get(key) is done:
                    del self._connecting[key]
                if not done.cancelled():
                    done.exception()  # retrieved: no "never retrieved" warning for a failure

            task.add_done_callback(forget)
        return await asyncio.shield(task)

    async def _connect(self, key: ConnKey) -> StreamConnection:
        transport, host, port, server_name = key
        ctx: ssl.SSLContext | None = None
        if transport == "tls":
            if self.tls is None:
                self.tls = client_tls_context()
            ctx = self.tls
        source = self.source
        local = (source, 0) if source and source not in ("0.0.0.0", "::") \
            and (":" in source) == (":" in host) else None
        try:
            async with asyncio.timeout(self.connect_timeout):
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=ctx, server_hostname=(server_name or host) if ctx else None,
                    limit=READ_CHUNK, local_addr=local)
        except (OSError, TimeoutError) as exc:
            self.stats.connections_failed += 1
            reason = failure_reason(transport, exc, connecting=True)
            log.info("%s %s:%d (%s): %s", label(transport), host, port, server_name or "-",
                     reason)
            raise ConnectError(reason) from None
        self.stats.connections_opened += 1
        old = self._conns.get(key)
        if old is not None:
            old.close("replaced", abort=True)
        conn = StreamConnection(key, reader, writer, on_message=self.on_message,
                                on_closed=self._closed, stats=self.stats,
                                idle_timeout=self.idle_timeout, max_header=self.max_header,
                                max_body=self.max_body)
        self._conns[key] = conn
        log.debug("connected %s", conn)
        return conn

    def _closed(self, conn: StreamConnection, reason: str) -> None:
        self.stats.connections_closed += 1
        if self._conns.get(conn.key) is conn:
            del self._conns[conn.key]
        log.debug("closed %s: %s", conn, reason)
        self.on_closed(conn, reason)

    def close(self) -> None:
        """Close every connection (flushing what is queued) and stop connecting."""
        for task in list(self._connecting.values()):
            task.cancel()
        self._connecting.clear()
        for conn in list(self._conns.values()):
            conn.close("endpoint closed", abort=False)
        self._conns.clear()
