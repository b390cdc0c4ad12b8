"""A small blocking SIP user agent for the phase-2 transfer tests: it calls through the proxy,
streams RTP, and plays the transferee of a REFER (RFC 3515).

Plain UDP sockets with timeouts (every wait has a deadline, so a broken peer fails the test
instead of hanging it); messages are built and parsed with `media.sip.SipMessage`. One RTP
thread per call paces 20 ms PCMU frames on absolute deadlines and drains what comes back.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from urllib.parse import unquote

import numpy as np
import numpy.typing as npt

from media import g711
from media.rtp import DtmfEvent, RtpPacket, RtpSender
from media.sip import NameAddr, SipMessage, SipUri

T1 = 0.5
FRAME = 160
MAX_KEPT = 6000  # received PCMU payloads an RtpStream keeps (two minutes at 20 ms)


def _branch() -> str:
    return "z9hG4bK" + secrets.token_hex(8)


class RtpStream:
    """Sends `pcm` as PCMU at 20 ms pacing (then silence) from a bound socket until stopped."""

    def __init__(self, sock: socket.socket, pcm: npt.NDArray[np.int16]) -> None:
        self.sock = sock
        self.pcm = pcm
        self.remote: tuple[str, int] | None = None
        self.sender = RtpSender(0)
        self.received = 0
        #: (sequence, payload) of the PCMU packets received, in arrival order (bounded)
        self.payloads: deque[tuple[int, bytes]] = deque(maxlen=MAX_KEPT)
        self._dtmf: deque[list[tuple[bool, DtmfEvent]]] = deque()  # key presses to send
        self._next_pcm: npt.NDArray[np.int16] | None = None
        self.dtmf_pt: int | None = None
        self.dtmf_sent = 0  # telephone-event packets sent
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self, remote: tuple[str, int]) -> None:
        self.remote = remote
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2.0)

    def send_dtmf(self, digit: str, pt: int, duration: int = 800) -> None:
        """Queue one RFC 4733 key press on payload type `pt`: updates every 20 ms with the
        event's start timestamp (marker on the first), then the end packet three times. The
        audio pauses while it is sent; the stream's timestamp keeps running."""
        self.dtmf_pt = pt
        steps = list(range(FRAME, duration, FRAME)) or [duration]
        packets = [(i == 0, DtmfEvent.from_digit(digit, duration=d)) for i, d in enumerate(steps)]
        packets += [(False, DtmfEvent.from_digit(digit, end=True, duration=duration))] * 3
        self._dtmf.append(packets)

    def play(self, pcm: npt.NDArray[np.int16]) -> None:
        """Send `pcm` next (then silence), instead of what is left of the current audio."""
        self._next_pcm = pcm

    def _drain(self) -> None:
        while True:
            try:
                data = self.sock.recv(2048)
            except (BlockingIOError, TimeoutError, OSError):
                return
            self.received += 1
            try:
                pkt = RtpPacket.parse(data)
            except ValueError:
                continue
            if pkt.payload_type == 0:
                self.payloads.append((pkt.sequence, pkt.payload))

    def _send_event(self, packets: list[tuple[bool, DtmfEvent]], start_ts: int) -> None:
        assert self.remote is not None and self.dtmf_pt is not None
        marker, event = packets.pop(0)
        pkt = RtpPacket(self.dtmf_pt, self.sender.sequence, start_ts, self.sender.ssrc,
                        event.serialize(), marker=marker)
        with contextlib.suppress(OSError):
            self.sock.sendto(pkt.serialize(), self.remote)
        self.sender.sequence = (self.sender.sequence + 1) % (1 << 16)
        self.dtmf_sent += 1

    def _run(self) -> None:
        assert self.remote is not None
        self.sock.setblocking(False)
        n = (len(self.pcm) + FRAME - 1) // FRAME
        padded = np.zeros(n * FRAME, dtype=np.int16)
        padded[: len(self.pcm)] = self.pcm
        encoded = g711.ulaw_encode(padded)
        quiet = g711.ulaw_encode(np.zeros(FRAME, dtype=np.int16))
        t = time.monotonic()
        i = 0
        event: list[tuple[bool, DtmfEvent]] = []
        event_ts = 0
        while not self._stop.is_set():
            if self._next_pcm is not None:
                pcm, self._next_pcm = self._next_pcm, None
                n = (len(pcm) + FRAME - 1) // FRAME
                padded = np.zeros(n * FRAME, dtype=np.int16)
                padded[: len(pcm)] = pcm
                encoded = g711.ulaw_encode(padded)
                i = 0
            if not event and self._dtmf:
                event, event_ts = self._dtmf.popleft(), self.sender.timestamp
            if event:
                self._send_event(event, event_ts)
                self.sender.timestamp = (self.sender.timestamp + FRAME) % (1 << 32)
            else:
                payload = encoded[i * FRAME:(i + 1) * FRAME] if i < n else quiet
                with contextlib.suppress(OSError):
                    self.sock.sendto(self.sender.next_packet(payload), self.remote)
                i += 1
            self._drain()
            t += 0.02
            delay = t - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)


@dataclass
class Dialog:
    """The UAC side of one call: what in-dialog requests need (RFC 3261 12.1.2)."""

    call_id: str
    local_tag: str
    from_value: str
    to_value: str  # with the remote tag once established
    remote_target: str = ""
    route_set: list[str] = field(default_factory=list)
    local_cseq: int = 1
    invite_status: int = 0
    ended: bool = False
    rtp: RtpStream | None = None
    dtmf_pt: int | None = None  # the telephone-event payload type of the 200's SDP


class Transferee:
    """A caller that follows a REFER: one SIP socket, outbound proxy = the spitwall proxy."""

    def __init__(self, ip: str, proxy: tuple[str, int], user: str = "alice",
                 display: str = "Alice") -> None:
        self.ip = ip
        self.proxy = proxy
        self.user = user
        self.display = display
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((ip, 0))
        self.port = self.sock.getsockname()[1]
        self.pending: list[tuple[SipMessage, tuple[str, int]]] = []  # requests not yet handled
        self.dialogs: dict[str, Dialog] = {}
        self.log: list[str] = []  # start lines, for failure messages
        self._rtp_socks: list[socket.socket] = []

    @property
    def contact(self) -> str:
        return f"<sip:{self.user}@{self.ip}:{self.port}>"

    def hang_up_and_close(self, timeout: float = 3.0) -> None:
        """Test teardown: BYE every answered call still up (nothing left in the proxy or the
        answering machine), then close."""
        for d in self.dialogs.values():
            if d.invite_status == 200 and not d.ended:
                self.bye(d, timeout=timeout)
        self.close()

    def close(self) -> None:
        for d in self.dialogs.values():
            if d.rtp is not None:
                d.rtp.stop()
        for s in self._rtp_socks:
            s.close()
        self.sock.close()

    # ------------------------------------------------------------------ transport

    def send(self, msg: SipMessage, addr: tuple[str, int] | None = None) -> None:
        self.log.append(f"> {msg.start_line} ({msg.call_id[:20]})")
        self.sock.sendto(msg.serialize(), addr or self.proxy)

    def _recv(self, deadline: float) -> tuple[SipMessage, tuple[str, int]] | None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        self.sock.settimeout(min(remaining, 0.2))
        try:
            data, addr = self.sock.recvfrom(65535)
        except TimeoutError:
            return None
        msg = SipMessage.parse(data)
        self.log.append(f"< {msg.start_line} ({msg.call_id[:20]})")
        return msg, (addr[0], addr[1])

    def _dispatch(self, msg: SipMessage, addr: tuple[str, int]) -> SipMessage | None:
        """Handle what needs no decision (BYE, retransmitted 2xx); return the rest."""
        if msg.is_request:
            d = self.dialogs.get(msg.call_id)
            if msg.method == "BYE":
                self.reply(msg, addr, 200, "OK")
                if d is not None:
                    d.ended = True
                    if d.rtp is not None:
                        d.rtp.stop()
                return None
            if msg.method == "ACK":
                return None
            self.pending.append((msg, addr))
            return None
        if msg.cseq.method == "INVITE" and msg.status == 200:
            d = self.dialogs.get(msg.call_id)
            if d is not None and d.invite_status == 200:  # retransmitted 200: ACK again
                self._ack(d, msg.cseq.number)
                return None
        return msg

    def wait_response(self, call_id: str, method: str, timeout: float,
                      retransmit: SipMessage | None = None) -> SipMessage | None:
        """The final response to our `method` in `call_id` (provisionals stop Timer E)."""
        deadline = time.monotonic() + timeout
        interval, next_tx = T1, time.monotonic() + T1
        while time.monotonic() < deadline:
            got = self._recv(min(deadline, next_tx))
            if got is None:
                if retransmit is not None and time.monotonic() >= next_tx:
                    self.send(retransmit)
                    interval = min(2 * interval, 4.0)
                    next_tx = time.monotonic() + interval
                continue
            msg = self._dispatch(*got)
            if msg is None or msg.call_id != call_id or msg.cseq.method != method:
                continue
            if msg.status is not None and msg.status < 200:
                retransmit = None
                continue
            return msg
        return None

    def wait_request(self, method: str, timeout: float,
                     call_id: str | None = None) -> tuple[SipMessage, tuple[str, int]] | None:
        deadline = time.monotonic() + timeout
        while True:
            for item in self.pending:
                if item[0].method == method and (call_id is None or item[0].call_id == call_id):
                    self.pending.remove(item)
                    return item
            if time.monotonic() >= deadline:
                return None
            got = self._recv(deadline)
            if got is not None:
                self._dispatch(*got)

    def wait_ended(self, d: Dialog, timeout: float) -> bool:
        """Serve the socket until the far end hung up `d` (True) or `timeout` passed."""
        deadline = time.monotonic() + timeout
        while not d.ended and time.monotonic() < deadline:
            got = self._recv(deadline)
            if got is not None:
                self._dispatch(*got)
        return d.ended

    def reply(self, req: SipMessage, addr: tuple[str, int], code: int, reason: str,
              extra: list[tuple[str, str]] | None = None) -> None:
        headers = [("Via", v) for v in req.vias]
        to = req.get("To") or ""
        if not req.to_tag:
            to += f";tag={secrets.token_hex(4)}"
        headers += [("From", req.get("From") or ""), ("To", to), ("Call-ID", req.call_id),
                    ("CSeq", str(req.cseq)), ("Contact", self.contact)]
        headers += extra or []
        self.send(SipMessage.response(code, reason, headers), addr)

    # ------------------------------------------------------------------ calls

    def _sdp(self, rtp_port: int, dtmf_pt: int | None = None) -> str:
        sid = secrets.randbelow(10**9)
        fmts, dtmf = "0", ""
        if dtmf_pt is not None:
            fmts = f"0 {dtmf_pt}"
            dtmf = f"a=rtpmap:{dtmf_pt} telephone-event/8000\r\na=fmtp:{dtmf_pt} 0-15\r\n"
        return (f"v=0\r\no=- {sid} {sid} IN IP4 {self.ip}\r\ns=-\r\nc=IN IP4 {self.ip}\r\n"
                f"t=0 0\r\nm=audio {rtp_port} RTP/AVP {fmts}\r\na=rtpmap:0 PCMU/8000\r\n"
                f"{dtmf}a=ptime:20\r\na=sendrecv\r\n")

    def invite(self, ruri: str, *, extra: list[tuple[str, str]] | None = None,
               pcm: npt.NDArray[np.int16] | None = None, timeout: float = 15.0,
               dtmf_pt: int | None = None) -> Dialog:
        """INVITE `ruri` through the proxy; on 200, ACK (loose routing) and start RTP.

        With `dtmf_pt`, the offer also lists telephone-event on that payload type; the one
        the 200's SDP agreed on ends up in `Dialog.dtmf_pt`."""
        rtp_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rtp_sock.bind((self.ip, 0))
        self._rtp_socks.append(rtp_sock)
        call_id = f"{secrets.token_hex(8)}@{self.ip}"
        tag = secrets.token_hex(4)
        to_uri = str(SipUri.parse(ruri))
        d = Dialog(call_id, tag, f'"{self.display}" <sip:{self.user}@{self.ip}>;tag={tag}',
                   f"<{to_uri}>")
        self.dialogs[call_id] = d
        headers = [("Via", f"SIP/2.0/UDP {self.ip}:{self.port};branch={_branch()};rport"),
                   ("Max-Forwards", "70"), ("From", d.from_value), ("To", d.to_value),
                   ("Call-ID", call_id), ("CSeq", "1 INVITE"), ("Contact", self.contact),
                   ("User-Agent", "spitwall-test-transferee"), *(extra or []),
                   ("Content-Type", "application/sdp")]
        req = SipMessage.request("INVITE", ruri, headers, self._sdp(rtp_sock.getsockname()[1],
                                                                     dtmf_pt))
        self.send(req)
        resp = self.wait_response(call_id, "INVITE", timeout, retransmit=req)
        if resp is None:
            d.invite_status = 408
            d.ended = True
            return d
        d.invite_status = resp.status or 0
        if resp.status != 200:
            d.ended = True  # the proxy's transaction layer ACKs non-2xx finals hop by hop
            self._ack_non2xx(req, resp)
            return d
        d.to_value = resp.get("To") or d.to_value
        contact = resp.contact
        d.remote_target = contact.uri if contact is not None else to_uri
        d.route_set = list(reversed(resp.values("Record-Route")))  # UAC: reversed (12.1.2)
        self._ack(d, 1)
        remote = self._media_address(resp.body)
        m = re.search(r"^a=rtpmap:(\d+) telephone-event/", resp.body, re.M | re.I)
        d.dtmf_pt = int(m.group(1)) if m else None
        if pcm is not None and remote is not None:
            d.rtp = RtpStream(rtp_sock, pcm)
            d.rtp.start(remote)
        return d

    @staticmethod
    def _media_address(sdp: str) -> tuple[str, int] | None:
        ip, port = "", 0
        for line in sdp.splitlines():
            if line.startswith("c=IN IP4 "):
                ip = line.split()[-1]
            elif line.startswith("m=audio "):
                port = int(line.split()[1])
        return (ip, port) if ip and port else None

    def _in_dialog(self, d: Dialog, method: str, cseq: int | None = None,
                   extra: list[tuple[str, str]] | None = None,
                   body: str = "") -> SipMessage:
        """A request in `d` per RFC 3261 12.2.1.1 (loose routing: R-URI = remote target)."""
        if cseq is None:
            d.local_cseq += 1
            cseq = d.local_cseq
        routes = list(d.route_set)
        if routes and not NameAddr.parse(routes[0]).sip_uri.loose_route:
            raise AssertionError(f"strict router in the route set: {routes}")
        headers = [("Via", f"SIP/2.0/UDP {self.ip}:{self.port};branch={_branch()};rport"),
                   ("Max-Forwards", "70"), *[("Route", r) for r in routes],
                   ("From", d.from_value), ("To", d.to_value), ("Call-ID", d.call_id),
                   ("CSeq", f"{cseq} {method}"), ("Contact", self.contact), *(extra or [])]
        return SipMessage.request(method, d.remote_target, headers, body)

    def _next_hop(self, d: Dialog) -> tuple[str, int]:
        if d.route_set:
            return NameAddr.parse(d.route_set[0]).sip_uri.address()
        return self.proxy

    def _ack(self, d: Dialog, cseq: int) -> None:
        self.send(self._in_dialog(d, "ACK", cseq), self._next_hop(d))

    def _ack_non2xx(self, req: SipMessage, resp: SipMessage) -> None:
        headers = [("Via", req.vias[0]), ("Max-Forwards", "70"),
                   ("From", req.get("From") or ""), ("To", resp.get("To") or ""),
                   ("Call-ID", req.call_id), ("CSeq", f"{req.cseq.number} ACK")]
        self.send(SipMessage.request("ACK", req.uri or "", headers))

    def request(self, d: Dialog, method: str, extra: list[tuple[str, str]] | None = None,
                body: str = "", timeout: float = 10.0) -> int:
        """Send an in-dialog request; its final status (0 on timeout)."""
        req = self._in_dialog(d, method, extra=extra, body=body)
        self.send(req, self._next_hop(d))
        resp = self.wait_response(d.call_id, method, timeout, retransmit=req)
        return resp.status or 0 if resp is not None else 0

    def bye(self, d: Dialog, timeout: float = 10.0) -> int:
        if d.rtp is not None:
            d.rtp.stop()
        if d.ended:
            return 0
        d.ended = True
        return self.request(d, "BYE", timeout=timeout)


def refer_target(refer: SipMessage) -> tuple[str, list[tuple[str, str]]]:
    """(Request-URI, headers) of the INVITE a REFER asks for (RFC 3261 19.1.5: the URI's
    `?name=value&...` part, URL-decoded, becomes headers of the request)."""
    value = refer.get("Refer-To")
    assert value, f"REFER without Refer-To: {refer.start_line}"
    uri = SipUri.parse(NameAddr.parse(value).uri)
    headers: list[tuple[str, str]] = []
    for item in filter(None, uri.headers.split("&")):
        name, _, val = item.partition("=")
        headers.append((unquote(name), unquote(val)))
    return str(SipUri(uri.scheme, uri.user, uri.host, uri.port, uri.params)), headers
