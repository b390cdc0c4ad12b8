"""The proxy's side of recording and intercept: match calls, build encrypted events.

Why a separate, KSR-free module: the KEMI layer (`kemi/handler.py`) only reads SIP fields and
hands them here; everything that decides *whether* a call is a target's and *what* goes to the
recipient is plain Python, unit-tested without Kamailio.

Per call the proxy keeps a tiny string, `encode_matches()`, in the transaction (AVP) and the
dialog (dlg_var): the LIIDs that matched and on which side the target is. It never keeps keys
anywhere but in memory while one event is built: `key_events()` parses the offer and answer,
builds the draft's body and envelopes it at once (`intercept.events.envelope`), so what leaves
this module -- an XADD to the event stream -- is ciphertext.

Matching costs no round trip: the target version is read in the same pipeline as the scoring
script (`scoring.store.Store.watch_keys`); the targets are reloaded (one HGETALL) only when it
changes, and validity windows are checked in memory on every call.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgpack
from cryptography import x509

from intercept import names
from intercept.events import (
    CALL_EVENT_CONTENT_TYPE,
    KEY_EVENT_CONTENT_TYPE,
    SMIME_CONTENT_TYPE,
    CallEventKind,
    call_event,
    envelope,
    key_event_body,
)
from intercept.events import Target as Role
from intercept.keys import MediaKeys, extract
from intercept.spool import Spool
from intercept.targets import Match, Target, TargetSnapshot
from scoring.model import CallAttempt, caller_identity
from scoring.store import RedisUnavailable

log = logging.getLogger("spitwall.intercept")

#: events kept in memory per process while Redis cannot take them (re-sent on recovery)
BACKLOG_MAX = 10_000
#: seconds between attempts to replay the spool after Redis refused a write
SPOOL_RETRY = 1.0

Command = list[Any]


@dataclass(frozen=True)
class CallInfo:
    """What identifies the call in a call event."""

    call_id: str
    caller: str  # URI or number as seen in the signalling
    callee: str
    now: float


@dataclass(frozen=True)
class Tapped:
    """One matched case of a call, as kept in the transaction/dialog: LIID and target side."""

    liid: str
    side: str  # caller | callee


def call_identities(attempt: CallAttempt) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(caller identities, callee identities) of an INVITE, normalised like target identities.

    Caller: From, and P-Asserted-Identity when present (a target hiding behind a different From
    is still the target). Callee: Request-URI and To user (at the Request-URI's domain)."""
    callers = {caller_identity(attempt.from_user, attempt.from_domain)}
    pai_user, pai_domain = _uri_user_host(attempt.pai)
    if pai_user:
        callers.add(caller_identity(pai_user, pai_domain))
    callees = {caller_identity(attempt.ruri_user, attempt.ruri_domain)}
    if attempt.to_user:
        callees.add(caller_identity(attempt.to_user, attempt.ruri_domain))
    return tuple(callers), tuple(callees)


def _uri_user_host(text: str) -> tuple[str, str]:
    """user and host of the first sip:/sips:/tel: URI in a header value ('' when none)."""
    t = text.strip()
    if "<" in t:
        t = t.split("<", 1)[1].split(">", 1)[0]
    low = t.lower()
    if low.startswith("tel:"):
        return t[4:].split(";", 1)[0], ""
    if low.startswith(("sip:", "sips:")):
        t = t.split(":", 1)[1]
        user, at, host = t.split(";", 1)[0].partition("@")
        if at:
            return user.split(":", 1)[0], host.split(":", 1)[0]
    return "", ""


def event_id(liid: str, call_id: str, event: str, discriminator: str) -> str:
    """A deterministic event id: the same event seen twice (a retransmitted 200, the same
    answer in a 183 and the 200, a reply handled by another child) gets the same id, so the
    recipient's duplicate check also covers the proxy's repeats."""
    h = hashlib.blake2b(digest_size=16, person=b"spitwall-li-ev")
    for part in (liid, call_id, event, discriminator):
        h.update(part.encode("utf-8", "surrogateescape") + b"\x00")
    return h.hexdigest()


def encode_matches(matches: Iterable[Tapped | Match]) -> str:
    """'liid:side,liid:side' (LIIDs are [A-Za-z0-9._-], so the separators are safe)."""
    out = []
    for m in matches:
        liid = m.liid if isinstance(m, Tapped) else m.target.liid
        out.append(f"{liid}:{m.side}")
    return ",".join(out)


def decode_matches(text: str | None) -> list[Tapped]:
    out: list[Tapped] = []
    for part in (text or "").split(","):
        liid, _, side = part.partition(":")
        if liid and side in ("caller", "callee"):
            out.append(Tapped(liid, side))
    return out


def pack_targets(raw: Mapping[Any, bytes], version: int) -> str:
    """The targets hash as one text value (msgpack, base64) for Kamailio's shared memory,
    where the timer process leaves it for SIP workers that cannot reach Redis."""
    data = {bytes(k if isinstance(k, bytes) else str(k).encode()): bytes(v)
            for k, v in raw.items()}
    return base64.b64encode(msgpack.packb([version, data], use_bin_type=True)).decode("ascii")


def unpack_targets(text: str) -> tuple[int, dict[bytes, bytes]]:
    """(version, targets hash) of `pack_targets`; ValueError when it is not one."""
    try:
        version, data = msgpack.unpackb(base64.b64decode(text.encode("ascii"), validate=True),
                                        raw=True)
    except (binascii.Error, ValueError, TypeError, UnicodeEncodeError,
            msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise ValueError(f"shared targets: not a packed targets hash ({exc})") from exc
    if not isinstance(version, int) or not isinstance(data, dict) or not all(
            isinstance(k, bytes) and isinstance(v, bytes) for k, v in data.items()):
        raise ValueError("shared targets: not a packed targets hash (wrong shape)")
    return version, data


class Tap:
    """Per-process target cache and event factory (one per Kamailio child)."""

    def __init__(self) -> None:
        self.snapshot = TargetSnapshot(version=-1)
        #: the targets hash the snapshot was made of (`pack_targets`)
        self.raw: dict[Any, bytes] = {}
        self._certs: dict[bytes, x509.Certificate] = {}  # parsed recipient certificates
        self.backlog: deque[Command] = deque(maxlen=BACKLOG_MAX)
        self.lost = 0  # events dropped because the backlog overflowed
        #: with a spool directory, events Redis refuses go to disk instead of `backlog`
        self.spool: Spool | None = None
        self._spool_retry_at = 0.0
        self.errors = 0  # events that could not be built (malformed SDP, bad record)

    # -- targets ---------------------------------------------------------------------------
    def stale(self, version: str | None) -> bool:
        """Whether the cached targets differ from `version` (the VERSION key's value)."""
        try:
            v = int(version or 0)
        except ValueError:
            v = 0
        return v != self.snapshot.version

    def load(self, raw: Mapping[Any, bytes], version: str | None) -> None:
        try:
            v = int(version or 0)
        except ValueError:
            v = 0
        snapshot, errors = TargetSnapshot.from_hash(raw, v)
        for err in errors:
            log.error("intercept: %s", err)
        self.snapshot = snapshot
        self.raw = dict(raw)

    def refresh(self, version: str | None,
                fetch: Callable[[], Mapping[Any, bytes]]) -> None:
        if self.stale(version):
            self.load(fetch(), version)

    def target(self, liid: str) -> Target | None:
        return next((t for t in self.snapshot.targets if t.liid == liid), None)

    def match(self, attempt: CallAttempt, now: float) -> list[Match]:
        if not len(self.snapshot):
            return []
        callers, callees = call_identities(attempt)
        return self.snapshot.match(callers, callees, now)

    # -- events ----------------------------------------------------------------------------
    def _entry(self, target: Target, kind: str, event: str, event_id: str, ctype: str,
               body: bytes, now: float) -> Command:
        cert = self._certs.get(target.cert_pem)
        if cert is None:
            cert = x509.load_pem_x509_certificate(target.cert_pem)
            if len(self._certs) > 1000:
                self._certs.clear()
            self._certs[target.cert_pem] = cert
        sealed = envelope(body, ctype, cert)
        fields = {
            "v": names.EVENT_VERSION, "id": event_id, "liid": target.liid, "mode": target.mode,
            "kind": kind, "event": event, "dest": target.deliver_to, "ts": f"{now:.3f}",
            "ctype": SMIME_CONTENT_TYPE, "body": sealed,
        }
        cmd: Command = ["XADD", names.EVENTS, "*"]
        for name in names.EVENT_FIELDS:
            cmd += [name, fields[name]]
        return cmd

    def call_events(self, tapped: Sequence[Tapped], kind: CallEventKind | None, call: CallInfo,
                    *, discriminator: str, reason: str | None = None,
                    media: Sequence[MediaKeys] = ()) -> list[Command]:
        """One call-identifying event per matched case that wants events. `kind` None means
        by side: Origination when the target calls, TerminationAttempt when it is called.
        `discriminator` tells this event from others of the same kind in the call (e.g. the
        CSeq); see `event_id`."""
        out: list[Command] = []
        call_id, caller, callee, now = call.call_id, call.caller, call.callee, call.now
        when = datetime.fromtimestamp(now, UTC)
        for tp in tapped:
            target = self.target(tp.liid)
            if target is None or "events" not in target.deliver:
                continue
            name: CallEventKind = kind or (
                "Origination" if tp.side == "caller" else "TerminationAttempt")
            eid = event_id(target.liid, call_id, name, discriminator)
            try:
                body = call_event(name, liid=target.liid, call_id=call_id or "-", time=when,
                                  caller=caller or "-", callee=callee or "-",
                                  event_id=eid, reason=reason, media=media)
                out.append(self._entry(target, "call", name, eid, CALL_EVENT_CONTENT_TYPE,
                                       body.encode("utf-8"), now))
            except ValueError as exc:
                self.errors += 1
                log.error("intercept: %s event for %s not built: %s", name, target.liid, exc)
        return out

    def key_events(self, tapped: Sequence[Tapped], offer_sdp: str | bytes,
                   answer_sdp: str | bytes, *, offerer_side: str, call_id: str,
                   now: float) -> tuple[list[Command], list[MediaKeys]]:
        """Key events (the draft's body) for one completed offer/answer, one per matched case
        that wants keys; also returns the answer's media (for a ReKey call event). A malformed
        offer or answer yields no key event (counted, logged without the SDP)."""
        try:
            offer = extract(offer_sdp)
            answer = extract(answer_sdp)
        except ValueError as exc:
            self.errors += 1
            log.error("intercept: SDP of call %.64s not usable for keys: %s", call_id, exc)
            return [], []
        out: list[Command] = []
        for tp in tapped:
            target = self.target(tp.liid)
            if target is None or "keys" not in target.deliver:
                continue
            role: Role = "offerer" if tp.side == offerer_side else "answerer"
            try:
                # the id derives from the keys themselves (one-way), so the same offer/answer
                # seen in a 183 and again in the 200 is one event for the recipient
                probe = key_event_body(offer, answer, call_id=call_id or "-", liid=target.liid,
                                       event_id="-", target=role)
                digest = hashlib.blake2b(probe.encode(), digest_size=16).hexdigest()
                eid = event_id(target.liid, call_id, "Keys", digest)
                body = key_event_body(offer, answer, call_id=call_id or "-", liid=target.liid,
                                      event_id=eid, target=role)
                out.append(self._entry(target, "keys", "Keys", eid, KEY_EVENT_CONTENT_TYPE,
                                       body.encode("utf-8"), now))
            except ValueError as exc:
                self.errors += 1
                log.error("intercept: key event for %s not built: %s", target.liid, exc)
        return out, answer

    # -- work items from the call path -------------------------------------------------------
    def handle(self, kind: str, item: Mapping[str, Any]) -> list[Command]:
        """The events for one work item queued by the call path (see `kemi.tap`): kinds
        ``invite``, ``reply``, ``ack`` and ``end``; unknown kinds give no event, malformed
        fields are counted in `errors` and give no event (never an exception)."""
        try:
            return self._handle(kind, item)
        except (ValueError, TypeError, AttributeError) as exc:
            self.errors += 1
            log.error("intercept: %s work item not usable: %s", kind[:16], exc)
            return []

    def _handle(self, kind: str, item: Mapping[str, Any]) -> list[Command]:
        tapped = decode_matches(str(item.get("li", "")))
        if not tapped:
            return []
        now = float(item.get("now") or 0.0)
        call_id = str(item.get("call_id", ""))[:256]
        call = CallInfo(call_id, str(item.get("caller", ""))[:256],
                        str(item.get("callee", ""))[:256], now)
        cseq = str(item.get("cseq", ""))[:32]
        if kind == "invite":
            cmds = self.call_events(tapped, None, call, discriminator=f"invite:{cseq}")
            if item.get("rc") == 0:
                cmds += self.call_events(tapped, "Release", call, discriminator=f"invite:{cseq}",
                                         reason=f"{item.get('reject', '')} rejected".strip())
            return cmds
        if kind == "reply":
            return self._reply(tapped, item, call, cseq)
        if kind == "ack":
            offer, answer = str(item.get("offer", "")), str(item.get("answer", ""))
            if not (offer and answer):
                return []
            keyed, _ = self.key_events(tapped, offer, answer,
                                       offerer_side=str(item.get("offerer", "callee")),
                                       call_id=call_id, now=now)
            return keyed
        if kind == "end":
            return self.call_events(tapped, "Release", call, discriminator="end",
                                    reason=str(item.get("reason", ""))[:128] or None)
        return []

    def _reply(self, tapped: Sequence[Tapped], item: Mapping[str, Any], call: CallInfo,
               cseq: str) -> list[Command]:
        status = int(item.get("status") or 0)
        rekey = bool(item.get("rekey"))
        offer, answer = str(item.get("offer", "")), str(item.get("answer", ""))
        cmds: list[Command] = []
        media: list[MediaKeys] = []
        if offer and answer and 180 <= status < 300:
            keyed, media = self.key_events(tapped, offer, answer,
                                           offerer_side=str(item.get("offerer", "caller")),
                                           call_id=call.call_id, now=call.now)
            cmds += keyed
        if item.get("keys_only"):
            return cmds
        if 200 <= status < 300:
            kind: CallEventKind = "ReKey" if rekey else "Answer"
            cmds += self.call_events(tapped, kind, call, discriminator=f"{kind}:{cseq}",
                                     media=media)
        elif status >= 300 and not rekey:
            reason = f"{status} {str(item.get('reason', ''))[:64]}".strip()
            cmds += self.call_events(tapped, "Release", call, discriminator=f"final:{cseq}",
                                     reason=reason)
        return cmds

    # -- durable hand-off --------------------------------------------------------------------
    def flush(self, commands: Sequence[Command], send: Callable[[Sequence[Command]], None],
              now: float | None = None) -> None:
        """Send the backlog and `commands` with `send` (a deferred pipeline write). When it
        raises (Redis down), everything is kept in the bounded backlog for the next call, or
        with a spool (`intercept.spool`), on disk, where a crash cannot lose it."""
        if self.spool is not None:
            self._flush_spooled(self.spool, commands, send,
                                time.monotonic() if now is None else now)
            return
        pending = [*self.backlog, *commands]
        if not pending:
            return
        try:
            send(pending)
        except (RedisUnavailable, ConnectionError, OSError):  # the caller counts it
            self.backlog.clear()
            overflow = max(0, len(pending) - BACKLOG_MAX)
            self.lost += overflow
            self.backlog.extend(pending[overflow:])
            raise
        self.backlog.clear()

    def _flush_spooled(self, spool: Spool, commands: Sequence[Command],
                       send: Callable[[Sequence[Command]], None], now: float) -> None:
        """Spooled events first (every process's, oldest first), then `commands`; whatever
        Redis refuses is appended to this process's spool file. After a refusal the spool is
        not read again for `SPOOL_RETRY` seconds: new events go behind it, in order."""
        if now < self._spool_retry_at and spool.pending(now):
            # waiting out a refusal is no refusal itself: it must not postpone the retry
            spool.append(commands)
            raise RedisUnavailable("intercept spool: waiting before the next replay")
        try:
            if spool.pending(now):
                spool.replay(send)
            if commands:
                send(commands)
        except (RedisUnavailable, ConnectionError, OSError):  # the caller counts it
            self._spool_retry_at = now + SPOOL_RETRY
            spool.append(commands)
            raise

