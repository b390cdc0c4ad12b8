"""A test recorder: a real SIP endpoint on loopback that receives ``Event: srtp`` deliveries.

Why: the delivery worker (and the lead's end-to-end tests through Kamailio) must be checked
against something that behaves like a recording / mediation host on the wire -- UDP, SIP
transactions, an S/MIME body it must decrypt with its own private key -- not a mock. It runs an
asyncio loop in a background thread of the test process, so tests keep a plain blocking API:

    rec = Recorder(private_key, cert_pem)
    host, port = rec.start("127.0.0.1", 0)      # PUBLISH target: sip:rec@host:port
    rec.respond = None                           # down: answers nothing (503 etc. also work)
    rec.stop(); rec.start(host, port)            # restart on the same port
    rec.subscribe(("127.0.0.1", worker_port), "LIID-1", user="u", password="p")
    rec.wait_for(5); rec.events                  # decrypted, de-duplicated by event id
    rec.raw_count                                # event bodies received, duplicates included

Its SIP (client transaction of SUBSCRIBE, digest answer, dialog matching of NOTIFY) is written
here independently of `intercept.delivery`, with `media.sip.SipMessage` for parsing only, so a
bug in the worker's SIP code is not mirrored on this side.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import re
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

from media.sip import NameAddr, SipMessage, SipUri

Address = tuple[str, int]

_EVENT_ID_SDP = re.compile(r"^a=x-event-id:(\S+)\s*$", re.M)


@dataclass(frozen=True)
class ReceivedEvent:
    """One event as the recorder got it the first time (later copies only bump raw_count)."""

    event_id: str
    method: str  # PUBLISH or NOTIFY
    content_type: str  # of the decrypted inner entity: application/sdp or application/json
    body: bytes  # the decrypted inner body (ciphertext when the recorder does not decrypt)
    headers: tuple[tuple[str, str], ...]  # the outer SIP request's headers
    request_uri: str
    source: Address
    received_at: float

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        low = name.lower()
        return next((v for n, v in self.headers if n.lower() == low), None)


@dataclass
class SubscriptionInfo:
    """The subscriber side of one dialog."""

    liid: str
    call_id: str
    local_tag: str
    target: Address  # where the SUBSCRIBE went (the worker, or the proxy)
    ruri: str
    remote_tag: str | None = None
    remote_target: str | None = None
    route_set: tuple[str, ...] = ()
    cseq: int = 1
    expires: int | None = None  # granted by the last 2xx
    status: int | None = None  # final status of the last SUBSCRIBE
    states: list[str] = field(default_factory=list)  # Subscription-State of every NOTIFY
    terminated: bool = False
    notify_cseqs: list[int] = field(default_factory=list)


def recipient_keypair(common_name: str = "recorder.test") -> tuple[rsa.RSAPrivateKey, bytes]:
    """A fresh RSA key and a self-signed certificate (PEM) for it: the recorder's identity that
    events are encrypted to (``spitwall intercept add --cert``)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=2)).sign(key, hashes.SHA256()))
    return key, cert.public_bytes(serialization.Encoding.PEM)


def open_smime(der: bytes, key: rsa.RSAPrivateKey, cert: x509.Certificate) -> tuple[str, bytes]:
    """Decrypt DER enveloped-data; the plaintext is a MIME entity: (inner Content-Type, body)."""
    entity = pkcs7.pkcs7_decrypt_der(der, cert, key, [])
    head, sep, body = entity.partition(b"\r\n\r\n")
    if not sep:
        raise ValueError("decrypted entity has no header/body separator")
    ctype = ""
    for line in head.decode("ascii", "replace").split("\r\n"):
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-type":
            ctype = value.strip()
    return ctype, body


def event_id_of(content_type: str, body: bytes) -> str:
    """The event id inside a key event (SDP ``a=x-event-id:``) or a call event (JSON)."""
    base = content_type.split(";", 1)[0].strip().lower()
    if base == "application/sdp":
        found = _EVENT_ID_SDP.search(body.decode("utf-8", "replace"))
        if found:
            return found.group(1)
    elif base == "application/json":
        value = json.loads(body).get("event_id")
        if isinstance(value, str) and value:
            return value
    raise ValueError(f"no event id in the {base or 'untyped'} body")


SDES_OFFER = (
    "v=0\r\no=alice 1 1 IN IP4 192.0.2.10\r\ns=-\r\nc=IN IP4 192.0.2.10\r\nt=0 0\r\n"
    "m=audio 40000 RTP/SAVP 0\r\n"
    "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz\r\n"
    "a=ssrc:1111 cname:a\r\n")
SDES_ANSWER = (
    "v=0\r\no=bob 1 1 IN IP4 192.0.2.20\r\ns=-\r\nc=IN IP4 192.0.2.20\r\nt=0 0\r\n"
    "m=audio 50000 RTP/SAVP 0\r\n"
    "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR\r\n"
    "a=ssrc:2222 cname:b\r\n")


def synthetic_entry(
    dest: str, liid: str, cert_pem: bytes, *, kind: str = "call", event_id: str | None = None,
    mode: str = "intercept",
) -> tuple[str, dict[str, str | bytes]]:  # fmt: skip
    """(event id, EVENTS stream fields) as the proxy would XADD them, for tests that feed the
    worker directly: a CALEA call event (``kind="call"``, JSON) or an ``srtp`` key event
    (``kind="keys"``, SDP with SDES keys), S/MIME-enveloped to ``cert_pem``."""
    from intercept.events import (
        CALL_EVENT_CONTENT_TYPE,
        KEY_EVENT_CONTENT_TYPE,
        SMIME_CONTENT_TYPE,
        call_event,
        envelope,
        key_event_body,
    )
    from intercept.keys import extract

    eid = event_id or secrets.token_hex(16)
    call_id = f"{secrets.token_hex(8)}@192.0.2.10"
    if kind == "keys":
        body = key_event_body(extract(SDES_OFFER), extract(SDES_ANSWER), call_id=call_id,
                              liid=liid, event_id=eid, target="offerer")
        inner, event = KEY_EVENT_CONTENT_TYPE, "Keys"
    else:
        body = call_event("Origination", liid=liid, call_id=call_id,
                          time=dt.datetime.now(dt.UTC), caller="+15551230001",
                          callee="+15551230002", event_id=eid)
        inner, event = CALL_EVENT_CONTENT_TYPE, "Origination"
    fields: dict[str, str | bytes] = {
        "v": "1", "id": eid, "liid": liid, "mode": mode, "kind": kind, "event": event,
        "dest": dest, "ts": f"{time.time():.3f}", "ctype": SMIME_CONTENT_TYPE,
        "body": envelope(body.encode(), inner, cert_pem),
    }
    return eid, fields


def _hash(algorithm: str, text: str) -> str:
    name = {"MD5": "md5", "SHA-256": "sha256"}[algorithm]
    return hashlib.new(name, text.encode(), usedforsecurity=False).hexdigest()


def _digest_params(value: str) -> dict[str, str]:
    _scheme, _, rest = value.partition(" ")
    out: dict[str, str] = {}
    for found in re.finditer(r'([A-Za-z0-9_-]+)\s*=\s*("[^"]*"|[^,\s]+)', rest):
        out[found.group(1).lower()] = found.group(2).strip('"')
    return out


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, owner: Recorder) -> None:
        self.owner = owner
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        try:
            self.owner._receive(data, (str(addr[0]), int(addr[1])))
        except Exception as exc:  # keep serving; the test sees it in errors
            self.owner.errors.append(f"internal: {exc!r}")


class Recorder:
    """See the module docstring. Thread-safe to read from the test thread."""

    def __init__(
        self, private_key: rsa.RSAPrivateKey | None = None, cert_pem: bytes | None = None, *,
        respond: int | None = 200, decrypt: bool = True, user: str = "recorder",
    ) -> None:  # fmt: skip
        self.key = private_key
        self.cert = x509.load_pem_x509_certificate(cert_pem) if cert_pem else None
        #: final status for PUBLISH and event NOTIFYs; None: silent (as if down)
        self.respond: int | None = respond
        self.decrypt = decrypt and private_key is not None and self.cert is not None
        self.user = user
        #: digest algorithms this recorder answers with, in the order it prefers them
        self.digest_algorithms: tuple[str, ...] = ("SHA-256", "MD5")
        #: the Authorization values it sent (a test may replay one)
        self.authorizations: list[str] = []
        self.errors: list[str] = []
        self.requests: list[tuple[SipMessage, Address]] = []
        self.subscriptions: list[SubscriptionInfo] = []
        self._events: dict[str, ReceivedEvent] = {}
        self._order: list[str] = []
        self._raw = 0
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._server_tx: dict[str, bytes | None] = {}
        self._client_tx: dict[str, asyncio.Future[SipMessage]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._proto: _Protocol | None = None
        self._address: Address | None = None

    # ----------------------------------------------------------------- lifecycle

    def start(self, host: str = "127.0.0.1", port: int = 0) -> Address:
        """Bind ``host:port`` (0: a free one) and serve; returns the bound address."""
        if self._thread is not None:
            raise RuntimeError("recorder already started")
        loop = asyncio.new_event_loop()
        ready: list[Address | BaseException] = []
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)

            async def bind() -> None:
                transport, proto = await loop.create_datagram_endpoint(
                    lambda: _Protocol(self), local_addr=(host, port))
                self._proto = proto
                name = transport.get_extra_info("sockname")
                ready.append((str(name[0]), int(name[1])))

            try:
                loop.run_until_complete(bind())
            except BaseException as exc:  # bind failed: report to start()
                ready.append(exc)
                started.set()
                loop.close()
                return
            started.set()
            loop.run_forever()
            if self._proto is not None and self._proto.transport is not None:
                self._proto.transport.close()
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()

        thread = threading.Thread(target=run, name=f"recorder-{port}", daemon=True)
        thread.start()
        started.wait(10)
        result = ready[0] if ready else RuntimeError("recorder did not start")
        if isinstance(result, BaseException):
            thread.join(5)
            raise result
        self._loop, self._thread, self._address = loop, thread, result
        return result

    def stop(self) -> None:
        """Close the socket and the loop (state and received events are kept)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        self._loop = self._thread = None
        self._proto = None
        self._server_tx.clear()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def address(self) -> Address:
        if self._address is None:
            raise RuntimeError("recorder not started")
        return self._address

    @property
    def uri(self) -> str:
        host, port = self.address
        return f"sip:{self.user}@{host}:{port}"

    @property
    def running(self) -> bool:
        return self._thread is not None

    # ----------------------------------------------------------------- results

    @property
    def events(self) -> list[ReceivedEvent]:
        """Distinct events in the order they first arrived."""
        with self._lock:
            return [self._events[i] for i in self._order]

    @property
    def event_ids(self) -> list[str]:
        with self._lock:
            return list(self._order)

    @property
    def raw_count(self) -> int:
        """Event bodies received, redeliveries included (SIP retransmissions not)."""
        with self._lock:
            return self._raw

    def reset(self) -> None:
        """Forget received events, requests and subscriptions (between benchmark rounds)."""
        with self._lock:
            self._events.clear()
            self._order.clear()
            self._raw = 0
            self.requests.clear()
            self.subscriptions.clear()
            self.errors.clear()

    def wait_for(self, n: int, timeout: float = 10.0) -> bool:
        """Wait until at least ``n`` distinct events arrived."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._order) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def wait_until(self, predicate: Any, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.02)
        return bool(predicate())

    # ----------------------------------------------------------------- receiving

    def _send(self, data: bytes, addr: Address) -> None:
        proto = self._proto
        if proto is not None and proto.transport is not None:
            proto.transport.sendto(data, addr)

    def _receive(self, data: bytes, addr: Address) -> None:
        try:
            msg = SipMessage.parse(data)
        except ValueError as exc:
            self.errors.append(f"unparsable datagram: {exc}")
            return
        if msg.is_response:
            fut = self._client_tx.get(msg.branch or "")
            if fut is not None and not fut.done() and (msg.status or 0) >= 200:
                fut.set_result(msg)
            return
        if msg.method == "ACK":
            return
        key = f"{msg.branch}|{msg.method}"
        if key in self._server_tx:  # a retransmission
            cached = self._server_tx[key]
            if cached is not None:
                self._send(cached, addr)
            return
        if msg.method in ("PUBLISH", "NOTIFY") and self.respond is None:
            return  # down: as if nothing listened
        self.requests.append((msg, addr))
        if msg.method == "PUBLISH":
            self._on_publish(msg, addr, key)
        elif msg.method == "NOTIFY":
            self._on_notify(msg, addr, key)
        elif msg.method == "OPTIONS":
            self._reply(msg, addr, key, 200, "OK")
        else:
            self._reply(msg, addr, key, 405, "Method Not Allowed", [("Allow", "PUBLISH, NOTIFY")])

    def _reply(self, msg: SipMessage, addr: Address, key: str, code: int, reason: str,
               extra: Sequence[tuple[str, str]] = ()) -> None:
        top = msg.top_via.with_received(addr)
        headers = [("Via", str(top))] + [("Via", v) for v in msg.vias[1:]]
        to = msg.get("To") or ""
        if not msg.to_tag:
            to += f";tag={secrets.token_hex(4)}"
        headers += [("From", msg.get("From") or ""), ("To", to), ("Call-ID", msg.call_id),
                    ("CSeq", str(msg.cseq)), *extra]
        data = SipMessage.response(code, reason, headers).serialize()
        self._server_tx[key] = data
        self._send(data, addr)

    def _take_event(self, msg: SipMessage, addr: Address) -> bool:
        """Decrypt and record the body; False when it is not a readable event."""
        der = msg.body.encode("utf-8", "surrogateescape")
        if not der:
            return True
        ctype = (msg.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        if ctype != "application/pkcs7-mime":
            self.errors.append(f"{msg.method} body of type {ctype!r}, not S/MIME")
            return False
        try:
            if self.decrypt:
                assert self.key is not None and self.cert is not None
                inner_type, body = open_smime(der, self.key, self.cert)
                event_id = event_id_of(inner_type, body)
            else:
                inner_type, body = "application/pkcs7-mime", der
                event_id = hashlib.sha256(der).hexdigest()
        except (ValueError, KeyError, json.JSONDecodeError) as exc:
            self.errors.append(f"{msg.method} body unreadable: {exc}")
            return False
        with self._cond:
            self._raw += 1
            if event_id not in self._events:
                self._events[event_id] = ReceivedEvent(
                    event_id, msg.method or "", inner_type, body, msg.headers, msg.uri or "",
                    addr, time.time())
                self._order.append(event_id)
                self._cond.notify_all()
        return True

    def _on_publish(self, msg: SipMessage, addr: Address, key: str) -> None:
        code = self.respond or 200
        if (msg.get("Event") or "").split(";", 1)[0].strip().lower() != "srtp":
            self._reply(msg, addr, key, 489, "Bad Event", [("Allow-Events", "srtp")])
            return
        if code >= 300:
            self._reply(msg, addr, key, code, "Failure")
            return
        if not self._take_event(msg, addr):
            self._reply(msg, addr, key, 415, "Unsupported Media Type")
            return
        expires = (msg.get("Expires") or "3600").strip()
        self._reply(msg, addr, key, 200, "OK", [
            ("SIP-ETag", secrets.token_hex(6)), ("Expires", str(min(int(expires), 3600)))])

    def _dialog(self, msg: SipMessage) -> SubscriptionInfo | None:
        for sub in self.subscriptions:  # RFC 6665 4.1.2.4: Call-ID + our tag (To tag)
            if sub.call_id == msg.call_id and sub.local_tag == msg.to_tag:
                return sub
        return None

    def _on_notify(self, msg: SipMessage, addr: Address, key: str) -> None:
        sub = self._dialog(msg)
        if sub is None or sub.terminated:
            self._reply(msg, addr, key, 481, "Subscription Does Not Exist")
            return
        state = msg.get("Subscription-State") or ""
        has_body = bool(msg.body)
        code = self.respond or 200
        if has_body and code >= 300:
            self._reply(msg, addr, key, code, "Failure")
            return
        if has_body and not self._take_event(msg, addr):
            self._reply(msg, addr, key, 415, "Unsupported Media Type")
            return
        with self._lock:
            sub.states.append(state)
            sub.notify_cseqs.append(msg.cseq.number)
            if sub.remote_tag is None:
                sub.remote_tag = msg.from_tag
            if state.split(";", 1)[0].strip().lower() == "terminated":
                sub.terminated = True
        self._reply(msg, addr, key, 200, "OK")

    # ----------------------------------------------------------------- subscribing

    def _run(self, coro: Any, timeout: float) -> Any:
        if self._loop is None:
            raise RuntimeError("recorder not started")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _transaction(self, data_for: Any, dest: Address, t1: float = 0.1,
                           timeout: float = 8.0) -> SipMessage | None:
        branch = "z9hG4bK" + secrets.token_hex(8)
        data = data_for(branch)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[SipMessage] = loop.create_future()
        self._client_tx[branch] = fut
        deadline = loop.time() + timeout
        interval = t1
        try:
            while True:
                self._send(data, dest)
                left = deadline - loop.time()
                if left <= 0:
                    return None
                with contextlib.suppress(TimeoutError):
                    return await asyncio.wait_for(asyncio.shield(fut), min(interval, left))
                interval = min(interval * 2, 4.0)
        finally:
            self._client_tx.pop(branch, None)

    def _subscribe_request(self, sub: SubscriptionInfo, branch: str, expires: int,
                           auth: str | None, extra: Sequence[tuple[str, str]]) -> bytes:
        host, port = self.address
        me = f"sip:{self.user}@{host}:{port}"
        to = f"<{sub.ruri}>" + (f";tag={sub.remote_tag}" if sub.remote_tag else "")
        ruri = sub.remote_target if sub.remote_tag and sub.remote_target else sub.ruri
        headers = [("Via", f"SIP/2.0/UDP {host}:{port};branch={branch};rport"),
                   ("Max-Forwards", "70")]
        if sub.remote_tag:
            headers += [("Route", r) for r in sub.route_set]
        headers += [("From", f"<{me}>;tag={sub.local_tag}"), ("To", to),
                    ("Call-ID", sub.call_id), ("CSeq", f"{sub.cseq} SUBSCRIBE"),
                    ("Contact", f"<{me}>"), ("Event", "srtp"), ("Expires", str(expires)),
                    ("Accept", "application/pkcs7-mime")]
        if auth:
            headers.append(("Authorization", auth))
        headers += list(extra)
        return SipMessage.request("SUBSCRIBE", ruri, headers).serialize()

    def _authorization(self, challenges: Sequence[str], user: str, password: str, uri: str,
                       nc: int) -> str:
        """Answer the first challenge (RFC 8760: the server's preference) whose algorithm is
        one of `digest_algorithms`."""
        offered = [_digest_params(c) for c in challenges]
        p = next((c for c in offered
                  if c.get("algorithm", "MD5").upper() in self.digest_algorithms),
                 offered[0] if offered else {})
        alg = p.get("algorithm", "MD5").upper()
        alg = alg if alg in self.digest_algorithms else "MD5"  # what an RFC 2617 client does
        realm, nonce = p.get("realm", ""), p.get("nonce", "")
        ha1 = _hash(alg, f"{user}:{realm}:{password}")
        ha2 = _hash(alg, f"SUBSCRIBE:{uri}")
        cnonce = secrets.token_hex(6)
        ncs = f"{nc:08x}"
        resp = _hash(alg, f"{ha1}:{nonce}:{ncs}:{cnonce}:auth:{ha2}")
        value = (f'Digest username="{user}", realm="{realm}", nonce="{nonce}", uri="{uri}", '
                 f'response="{resp}", algorithm={alg}, qop=auth, nc={ncs}, cnonce="{cnonce}"')
        self.authorizations.append(value)
        return value

    async def _subscribe(
        self, sub: SubscriptionInfo, expires: int, user: str | None, password: str | None,
        extra: Sequence[tuple[str, str]],
    ) -> SipMessage | None:  # fmt: skip
        auth: str | None = None
        resp: SipMessage | None = None
        for round_ in range(3):
            creds = auth
            resp = await self._transaction(
                lambda b, creds=creds: self._subscribe_request(sub, b, expires, creds, extra),
                sub.target)
            if resp is None:
                sub.status = None
                return None
            sub.status = resp.status
            if resp.status == 401 and user is not None and password is not None and round_ < 2:
                uri = sub.remote_target if sub.remote_tag and sub.remote_target else sub.ruri
                auth = self._authorization(resp.values("WWW-Authenticate"), user, password,
                                           uri, round_ + 1)
                sub.cseq += 1
                continue
            break
        assert resp is not None
        if resp.status is not None and 200 <= resp.status < 300:
            with self._lock:
                if sub.remote_tag is None:
                    sub.remote_tag = resp.to_tag
                    contact = resp.contact
                    sub.remote_target = contact.uri if contact is not None else None
                    sub.route_set = tuple(reversed(resp.values("Record-Route")))
                exp = (resp.get("Expires") or "").strip()
                sub.expires = int(exp) if exp.isdigit() else None
        return resp

    def subscribe(
        self, target: Address, liid: str, *, expires: int = 600, user: str | None = None,
        password: str | None = None, ruri_host: str | None = None,
        headers: Sequence[tuple[str, str]] = (), timeout: float = 15.0,
    ) -> SubscriptionInfo:  # fmt: skip
        """SUBSCRIBE ``sip:LIID@target`` (``Event: srtp``), answering a 401 with the given
        credentials. Returns the subscription; its ``status`` is the final status (None: no
        answer) and ``expires`` the granted duration."""
        host = ruri_host or f"{target[0]}:{target[1]}"
        host_local = self.address[0]
        sub = SubscriptionInfo(liid=liid, call_id=f"{secrets.token_hex(10)}@{host_local}",
                               local_tag=secrets.token_hex(4), target=target,
                               ruri=f"sip:{liid}@{host}")
        with self._lock:
            self.subscriptions.append(sub)
        self._run(self._subscribe(sub, expires, user, password, headers), timeout)
        return sub

    def refresh(
        self, sub: SubscriptionInfo, expires: int, *, user: str | None = None,
        password: str | None = None, headers: Sequence[tuple[str, str]] = (),
        timeout: float = 15.0,
    ) -> int | None:  # fmt: skip
        """Re-SUBSCRIBE in the dialog (``expires=0``: unsubscribe); the final status."""
        sub.cseq += 1
        self._run(self._subscribe(sub, expires, user, password, headers), timeout)
        return sub.status

    def unsubscribe(self, sub: SubscriptionInfo, **kw: Any) -> int | None:
        return self.refresh(sub, 0, **kw)


def parse_name_addr_uri(value: str) -> SipUri:
    """Helper for tests: the SIP URI inside a header value such as Contact or Route."""
    return NameAddr.parse(value).sip_uri
