"""What the SIP workers note about a target's call, and how the timer process reads it.

Why: a target must not be able to tell by timing that it is a target, so the SIP workers do as
little as possible for its messages: one read of the whole message (``$mb``) and one add to
Kamailio's shared-memory queue, no parsing, no JSON, one dialog variable. Everything else --
finding Call-ID, CSeq, tags, the SDP, pairing an answer with its offer, remembering a late
offer for the ACK, who sent a re-INVITE -- happens here, in the one timer process that builds
the events, with per-call state in its own memory (`Calls`). The result is the work items
`intercept.tap.Tap.handle` takes (kinds ``invite``, ``reply``, ``ack``, ``end``).

A note is a queue key and a value (both text): the key ``KIND NOW CODE [...]`` (``NOW``: epoch
seconds when the SIP worker saw the message; ``CODE``: `intercept.tap.encode_matches`, which has
no spaces) and the value the raw SIP message. Kinds: ``invite NOW CODE RC REJECT``, ``reply NOW
CODE``, ``request NOW CODE`` (in-dialog INVITE/UPDATE/PRACK/ACK), ``end NOW CODE`` (value
``CALL-ID \\n REASON``).

The message reader is written by hand on purpose: Kamailio has already accepted (and relayed)
the message, so it must not be rejected here for anything a strict parser (`media.sip`) would
refuse, or the case would lose its events; it needs only five headers and the body, and never
raises. Multipart bodies (SIP-I/SIP-T) are split by the standard library's MIME parser.
"""

from __future__ import annotations

import email
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

MAX_CALLS = 100_000  # calls the timer process remembers (least recently active go first)
MAX_SDP = 16384  # characters of an SDP body used for key extraction
MAX_MULTIPART = 65536  # characters of a multipart body searched for its SDP part
RECORDING = "|rec"  # suffix of a dialog's code when the call is recorded with indication

_COMPACT = {"i": "call-id", "f": "from", "t": "to", "c": "content-type", "l": "content-length"}
_WANTED = frozenset(("call-id", "cseq", "from", "to", "content-type"))


@dataclass(frozen=True, slots=True)
class RawMessage:
    """The few parts of a SIP message the intercept events need."""

    method: str  # request method, or the CSeq method of a response
    status: int  # 0 for a request
    reason: str
    ruri: str
    call_id: str
    cseq: str  # the CSeq number
    from_uri: str
    from_tag: str
    to_uri: str
    sdp: str  # the body when it is application/sdp, else ""

    @classmethod
    def read(cls, text: str) -> RawMessage:
        """Best-effort reading of a message Kamailio has accepted: missing parts are ""."""
        head, sep, body = text.partition("\r\n\r\n")
        if not sep:
            head, sep, body = text.partition("\n\n")
        lines = head.replace("\r\n", "\n").split("\n")
        start = lines[0].strip() if lines else ""
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon:
                continue
            key = name.strip().lower()
            key = _COMPACT.get(key, key)
            if key in _WANTED and key not in headers:
                headers[key] = value.strip()
        method, status, reason, ruri = "", 0, "", ""
        parts = start.split(" ", 2)
        if parts[0].upper().startswith("SIP/"):
            if len(parts) > 1 and parts[1].isdigit():
                status = int(parts[1])
            reason = parts[2] if len(parts) > 2 else ""
        elif len(parts) >= 2:
            method, ruri = parts[0].upper(), parts[1]
        cseq_parts = headers.get("cseq", "").split()
        cseq = cseq_parts[0] if cseq_parts else ""
        if not method and len(cseq_parts) > 1:
            method = cseq_parts[1].upper()
        ctype_value = headers.get("content-type", "")
        ctype = ctype_value.split(";", 1)[0].strip().lower()
        if ctype == "application/sdp":
            sdp = body[:MAX_SDP] if body.strip() else ""
        elif ctype.startswith("multipart/"):
            sdp = sdp_part(ctype_value, body)
        else:
            sdp = ""
        from_uri, from_tag = _name_addr(headers.get("from", ""))
        to_uri, _ = _name_addr(headers.get("to", ""))
        return cls(method=method, status=status, reason=reason[:64], ruri=ruri[:256],
                   call_id=headers.get("call-id", "")[:256], cseq=cseq[:32],
                   from_uri=from_uri, from_tag=from_tag, to_uri=to_uri, sdp=sdp)


def sdp_part(content_type: str, body: str) -> str:
    """The first application/sdp part of a multipart body (RFC 5621; SIP-I/SIP-T calls carry
    ISUP beside the SDP), "" when there is none or the body is not usable. Nested multiparts
    are searched too (the stdlib MIME parser walks them)."""
    if len(body) > MAX_MULTIPART:
        return ""
    try:
        msg = email.message_from_string(f"Content-Type: {content_type}\r\n\r\n{body}")
        for part in msg.walk():
            if part.get_content_type() == "application/sdp":
                payload = part.get_payload()
                if isinstance(payload, str) and payload.strip():
                    return payload[:MAX_SDP]
    except Exception:  # the stdlib parser is lenient; whatever it still raises gives no SDP
        return ""
    return ""


def _name_addr(value: str) -> tuple[str, str]:
    """(URI, tag) of a From/To value: ``"Name" <sip:a@b>;tag=x`` or ``sip:a@b;tag=x``."""
    lt, gt = value.find("<"), value.rfind(">")
    if 0 <= lt < gt:
        uri, params = value[lt + 1:gt], value[gt + 1:]
    else:
        uri, _, params = value.partition(";")
        params = ";" + params
    tag = ""
    for param in params.split(";"):
        name, _, val = param.partition("=")
        if name.strip().lower() == "tag":
            tag = val.strip()
    return uri.strip()[:256], tag[:128]


@dataclass
class CallRecord:
    """What the timer process remembers about one target call."""

    code: str
    caller: str
    callee: str
    from_tag: str  # the caller's tag: who sends an in-dialog request
    #: open offers by transaction (`_txn`): (SDP, offerer side, is a re-offer)
    offers: dict[str, tuple[str, str, bool]] = field(default_factory=dict)
    late: tuple[str, str] | None = None  # an offer in a 2xx: (SDP, side that made it)


class Calls:
    """Per-call state of the timer process, bounded (`MAX_CALLS`, least recently active
    forgotten first; a forgotten call still gets its events, with less context)."""

    def __init__(self, limit: int = MAX_CALLS) -> None:
        self.limit = limit
        self._calls: OrderedDict[str, CallRecord] = OrderedDict()
        self.forgotten = 0

    def __len__(self) -> int:
        return len(self._calls)

    def get(self, call_id: str) -> CallRecord | None:
        rec = self._calls.get(call_id)
        if rec is not None:
            self._calls.move_to_end(call_id)
        return rec

    def put(self, call_id: str, rec: CallRecord) -> None:
        self._calls[call_id] = rec
        self._calls.move_to_end(call_id)
        while len(self._calls) > self.limit:
            self._calls.popitem(last=False)
            self.forgotten += 1

    def drop(self, call_id: str) -> None:
        self._calls.pop(call_id, None)


def _other(side: str) -> str:
    return "callee" if side == "caller" else "caller"


def _txn(msg: RawMessage) -> str:
    """A transaction's key in a dialog: CSeq number and method, and the sender's tag (each
    side counts its own CSeq; a reply carries the request's From tag)."""
    return f"{msg.cseq} {msg.method} {msg.from_tag}"


class NoteReader:
    """Turns the SIP workers' notes into `Tap.handle` work items, in the order noted."""

    def __init__(self, calls: Calls | None = None) -> None:
        self.calls = calls if calls is not None else Calls()
        self.bad = 0  # notes that could not be used (malformed key)

    def read(self, key: str, value: str) -> tuple[str, dict[str, Any]] | None:
        """The (kind, item) for one note, or None when it gives no event by itself."""
        parts = key.split(" ")
        kind = parts[0]
        try:
            now = float(parts[1])
            code = parts[2].removesuffix(RECORDING)
        except (IndexError, ValueError):
            self.bad += 1
            return None
        if kind == "end":
            call_id, _, reason = value.partition("\n")
            rec = self.calls.get(call_id)
            self.calls.drop(call_id)
            return "end", {"li": code, "call_id": call_id[:256], "now": now,
                           "caller": rec.caller if rec else "",
                           "callee": rec.callee if rec else "", "reason": reason[:128]}
        msg = RawMessage.read(value)
        if kind == "invite":
            return self._invite(msg, code, now, parts[3:])
        if kind == "reply":
            return self._reply(msg, code, now)
        if kind == "request":
            return self._request(msg, code, now)
        self.bad += 1
        return None

    def _invite(self, msg: RawMessage, code: str, now: float,
                rest: list[str]) -> tuple[str, dict[str, Any]]:
        rc = int(rest[0]) if rest and rest[0].lstrip("-").isdigit() else 1
        reject = rest[1] if len(rest) > 1 else ""
        rec = CallRecord(code, msg.from_uri, msg.ruri, msg.from_tag)
        if msg.sdp:
            rec.offers[_txn(msg)] = (msg.sdp, "caller", False)
        if rc != 0:
            self.calls.put(msg.call_id, rec)
        return "invite", {"li": code, "call_id": msg.call_id, "caller": msg.from_uri,
                          "callee": msg.ruri, "cseq": msg.cseq, "rc": rc, "reject": reject,
                          "now": now}

    def _reply(self, msg: RawMessage, code: str, now: float) -> tuple[str, dict[str, Any]] | None:
        if msg.status < 180:
            return None
        rec = self.calls.get(msg.call_id)
        offer, offerer, rekey = ("", "caller", False)
        txn = _txn(msg)
        if rec is not None:
            offer, offerer, rekey = rec.offers.get(txn, ("", "caller", False))
            if msg.status >= 200:
                rec.offers.pop(txn, None)
        answer = msg.sdp if msg.status < 300 else ""
        if answer and not offer and rec is not None and msg.method == "INVITE":
            # late offer: the 2xx, or a reliable 18x (RFC 3262), of an INVITE without SDP
            # offers; the ACK (or the PRACK) will answer
            rec.late = (answer, _other(offerer))
        if msg.status >= 300 and not rekey and msg.method == "INVITE":
            self.calls.drop(msg.call_id)
        return "reply", {"li": code, "status": msg.status, "reason": msg.reason,
                         "call_id": msg.call_id, "cseq": msg.cseq,
                         "caller": rec.caller if rec else msg.from_uri,
                         "callee": rec.callee if rec else msg.to_uri, "rekey": rekey,
                         # a PRACK's reply has keys (an offer in the PRACK) but no call event
                         "keys_only": msg.method == "PRACK",
                         "offerer": offerer, "offer": offer if answer else "", "answer": answer,
                         "now": now}

    def _request(self, msg: RawMessage, code: str,
                 now: float) -> tuple[str, dict[str, Any]] | None:
        rec = self.calls.get(msg.call_id)
        if rec is None:  # forgotten (or noted before this process started): start over
            rec = CallRecord(code, msg.from_uri, msg.to_uri, msg.from_tag)
            self.calls.put(msg.call_id, rec)
        sender = "caller" if msg.from_tag == rec.from_tag else "callee"
        if msg.method == "PRACK" and msg.sdp and rec.late is not None:
            offer, offerer = rec.late  # the answer to a reliable 18x's offer
            rec.late = None
            return "ack", {"li": code, "call_id": msg.call_id, "offer": offer,
                           "answer": msg.sdp, "offerer": offerer, "now": now}
        if msg.method == "ACK":
            if msg.sdp and rec.late is not None:
                offer, offerer = rec.late
                rec.late = None
                return "ack", {"li": code, "call_id": msg.call_id, "offer": offer,
                               "answer": msg.sdp, "offerer": offerer, "now": now}
            return None
        if msg.method in ("INVITE", "UPDATE", "PRACK") and msg.sdp:
            rec.offers[_txn(msg)] = (msg.sdp, sender, msg.method != "PRACK")
        elif msg.method == "INVITE":
            # an offerless re-INVITE: its 2xx will offer (late offer), a re-key all the same
            rec.offers[_txn(msg)] = ("", sender, True)
        return None
