"""KEMI side of recording and lawful intercept: where the SDP offers and answers pass.

Called by `kemi.handler` at four points; ordinary calls pay one in-memory lookup at the first
and nothing at the others (the per-transaction reply route is armed only for target calls).
On a target's call these points only *note* what passed -- a work item (JSON) added to
Kamailio's shared-memory queue `li` (mqueue module) -- and the signalling goes on at once: the
events are built, encrypted and queued in Redis by a dedicated Kamailio timer process
(`drain`, run by the rtimer module every 20 ms), so a target's call is not slowed down by the
cryptography (the target cannot notice it by timing). The points:

* initial INVITE (`on_invite`): match against the cached targets; for a match, note the
  Origination/TerminationAttempt, keep the LIIDs in the transaction (`$avp(sw_li)`) and the
  dialog (`$dlg_var(sw_li)`), the offer in `$avp(sw_offer)`, and arm `t_on_reply`;
* replies of that transaction (`on_reply`): an 18x/2xx with SDP completes the offer/answer ->
  key event; 2xx -> Answer; a final failure -> Release. A 2xx carrying the *offer* (the INVITE
  had none) is kept in `$dlg_var(sw_loff)` for the ACK;
* in-dialog requests (`on_in_dialog`): re-INVITE/UPDATE with SDP -> ReKey + keys after the
  answer (same reply route); ACK with SDP answers a late offer -> key event;
* dialog end (`on_dialog_end`): Release.

Nothing is added to or removed from the SIP messages: a target's call is relayed exactly as any
other call. Offer SDPs live in the transaction's AVPs, dialog variables and the `li` queue,
i.e. Kamailio's shared memory, only until the timer process has encrypted the event; keys never
reach logs, Redis or headers. When the queue is full, the item is processed at once in the
SIP worker (slower for that call, nothing lost).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import KSR

from intercept import names
from intercept.tap import Tap, Tapped, decode_matches, encode_matches
from scoring.model import CallAttempt
from scoring.service import ScoringService
from scoring.store import RedisUnavailable

MAX_SDP = 16384  # bytes of an SDP body kept for key extraction (shared memory is finite)
REPLY_ROUTE = "ksr_tap_reply"
QUEUE = "li"  # the mqueue of work items (kamailio.cfg)
DRAIN_MAX = 2000  # items per timer tick, so one tick never runs for long


def _get(name: str) -> str:
    """A pv as text ('' when unset, unreadable or not text)."""
    try:
        value: Any = KSR.pv.get(name)
    except UnicodeDecodeError:
        return ""
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value)


def _body() -> str:
    """The message's SDP body ('' when there is none)."""
    if int(KSR.textops.has_body_type("application/sdp")) <= 0:
        return ""
    return _get("$rb")[:MAX_SDP]


def _indicate_recording() -> None:
    """RFC 7866 §6.3 recording indication: a=record:on under every m= line of this SDP."""
    KSR.textops.replace_body_all("(\r\nm=[^\r\n]*)", "\\1\r\na=record:on")


def _set_dlg(name: str, value: str) -> None:
    KSR.pv.sets(f"$dlg_var({name})", value)


class KemiTap:
    """Holds the per-process `Tap` and talks to Kamailio for it."""

    def __init__(self) -> None:
        self.tap = Tap()
        self._niced = False

    # -- state ---------------------------------------------------------------------------
    def sync(self, svc: ScoringService) -> None:
        """Reload targets if the version read with the last round trip changed."""
        if svc.watched is None or not svc.watched:
            return
        self.tap.refresh(svc.watched[0], lambda: svc.store.fetch_hash(names.TARGETS))

    def active(self) -> bool:
        return len(self.tap.snapshot) > 0

    def _note(self, svc: ScoringService, kind: str, item: dict[str, Any]) -> None:
        """Hand a work item to the timer process; process it here if the queue is full."""
        item["now"] = time.time()
        text = json.dumps(item, separators=(",", ":"))
        if int(KSR.mqueue.mq_add(QUEUE, kind, text)) > 0:
            return
        svc.counters["li_queue_full"] += 1
        self._process(svc, kind, item)

    def _process(self, svc: ScoringService, kind: str, item: dict[str, Any]) -> None:
        self._queue(svc, self._events(svc, kind, item))

    def _events(self, svc: ScoringService, kind: str, item: dict[str, Any]) -> list[list[Any]]:
        tapped = decode_matches(str(item.get("li", "")))
        if any(self.tap.target(t.liid) is None for t in tapped):
            svc.sync()  # a case this process has not loaded yet
            self.sync(svc)
        return self.tap.handle(kind, item)

    def _queue(self, svc: ScoringService, commands: list[list[Any]]) -> None:
        try:
            self.tap.flush(commands, svc.store.defer)
        except RedisUnavailable:
            svc.counters["li_backlog"] += 1

    # -- the timer process ---------------------------------------------------------------
    def drain(self, svc: ScoringService) -> int:
        """Build, encrypt and queue the events of the noted work items (rtimer process)."""
        if not self._niced:
            # This process only does deferred work: under CPU contention the SIP workers go
            # first, so the cryptography never shows in a target's signalling timing.
            self._niced = True
            try:
                os.nice(10)
            except OSError as exc:
                svc.counters["li_nice_failed"] += 1
                KSR.warn(f"spitwall: could not lower the intercept timer's priority: {exc}\n")
        n = 0
        if int(KSR.mqueue.mq_size(QUEUE)) <= 0:
            if self.tap.backlog:
                self._queue(svc, [])  # retry what Redis refused
            return 0
        svc.sync()  # once per busy tick: current targets (the version rides along)
        self.sync(svc)
        commands: list[list[Any]] = []
        while n < DRAIN_MAX and int(KSR.mqueue.mq_fetch(QUEUE)) > 0:
            n += 1
            kind = _get(f"$mqk({QUEUE})")
            try:
                item = json.loads(_get(f"$mqv({QUEUE})"))
            except ValueError:
                svc.counters["li_bad_item"] += 1
                continue
            if isinstance(item, dict):
                try:
                    commands += self._events(svc, kind, item)
                except Exception as exc:  # one bad item must not cost the tick's other events
                    svc.counters["li_item_error"] += 1
                    KSR.err(f"spitwall: intercept {kind[:16]} item failed: {exc!r:.200}\n")
        self._queue(svc, commands)  # one write for the whole tick, in order
        return n

    # -- initial INVITE ------------------------------------------------------------------
    def on_invite(self, svc: ScoringService, attempt: CallAttempt, rc: int,
                  reject_code: int) -> bool:
        """After the scoring decision; `rc` 0 means a reject was already sent. Returns
        whether the call is a target's (the caller must then make sure the dialog is
        tracked)."""
        self.sync(svc)
        matches = self.tap.match(attempt, time.time())
        if not matches:
            return False
        code = encode_matches(Tapped(m.target.liid, m.side) for m in matches)
        # Recording (not intercept) may be announced, when the operator turns it on.
        indicate = bool(svc.config["li.recording_indication"]) and any(
            m.target.mode == "recording" for m in matches)
        self._note(svc, "invite", {"li": code, "call_id": attempt.call_id,
                                   "caller": attempt.from_uri, "callee": attempt.request_uri,
                                   "cseq": _get("$cs"), "rc": rc, "reject": reject_code})
        if rc != 0:
            KSR.pv.sets("$avp(sw_li)", code)
            KSR.pv.sets("$avp(sw_offerer)", "caller")
            offer = _body()
            if offer:
                KSR.pv.sets("$avp(sw_offer)", offer)
                if indicate:
                    _indicate_recording()
            if indicate:
                KSR.pv.sets("$avp(sw_rec)", "1")
            KSR.tm.t_on_reply(REPLY_ROUTE)
        svc.counters["li_calls"] += 1
        return rc != 0

    def track(self, attempt: CallAttempt) -> None:
        """Dialog variables of a target call (after `dlg_manage`)."""
        code = _get("$avp(sw_li)")
        if not code:
            return
        _set_dlg("sw_li", code)
        _set_dlg("sw_rec", _get("$avp(sw_rec)"))
        _set_dlg("sw_ft", _get("$ft")[:128])
        _set_dlg("sw_from", attempt.from_uri)
        _set_dlg("sw_to", attempt.request_uri)

    # -- replies of a target transaction -------------------------------------------------
    def on_reply(self, svc: ScoringService) -> None:
        code = _get("$avp(sw_li)")
        if not code:
            return
        try:
            status = int(_get("$rs") or 0)
        except ValueError:
            return
        if status < 180:
            return
        body = _body() if status < 300 else ""
        if status < 200 and not body:
            return  # a 180 without SDP says nothing we report
        if body and _get("$avp(sw_rec)") == "1":
            _indicate_recording()
        offer = _get("$avp(sw_offer)")
        offerer = _get("$avp(sw_offerer)") or "caller"
        if body and not offer and 200 <= status < 300:
            # late offer: the 2xx offers, the ACK will answer
            _set_dlg("sw_loff", body)
            _set_dlg("sw_loffr", "callee" if offerer == "caller" else "caller")
        self._note(svc, "reply", {
            "li": code, "status": status, "reason": _get("$rr")[:64],
            "call_id": _get("$ci")[:256], "cseq": _get("$cs"), "caller": _get("$fu")[:256],
            "callee": _get("$tu")[:256], "rekey": _get("$avp(sw_rekey)") == "1",
            "offerer": offerer, "offer": offer if body else "", "answer": body})

    # -- in-dialog requests ----------------------------------------------------------------
    def on_in_dialog(self, svc: ScoringService) -> None:
        """Called for in-dialog requests after loose_route (before relaying)."""
        if not (KSR.is_INVITE() or KSR.is_UPDATE() or KSR.is_ACK()):
            return
        code = _get("$dlg_var(sw_li)")
        if not decode_matches(code):
            return
        sender = "caller" if _get("$ft")[:128] == _get("$dlg_var(sw_ft)") else "callee"
        body = _body()
        if KSR.is_ACK():
            late = _get("$dlg_var(sw_loff)")
            if body and late:
                _set_dlg("sw_loff", "")
                self._note(svc, "ack", {"li": code, "call_id": _get("$ci")[:256],
                                        "offer": late, "answer": body,
                                        "offerer": _get("$dlg_var(sw_loffr)") or "callee"})
            return
        if body and _get("$dlg_var(sw_rec)") == "1":
            _indicate_recording()
        # re-INVITE or UPDATE: new offer; keys (and ReKey) when the answer comes back
        if _get("$dlg_var(sw_rec)") == "1":
            KSR.pv.sets("$avp(sw_rec)", "1")
        KSR.pv.sets("$avp(sw_li)", code)
        KSR.pv.sets("$avp(sw_offerer)", sender)
        KSR.pv.sets("$avp(sw_rekey)", "1")
        if body:
            KSR.pv.sets("$avp(sw_offer)", body)
        KSR.tm.t_on_reply(REPLY_ROUTE)

    # -- dialog end --------------------------------------------------------------------------
    def on_dialog_end(self, svc: ScoringService, reason: str) -> None:
        code = _get("$dlg_var(sw_li)")
        if not decode_matches(code):
            return
        self._note(svc, "end", {"li": code, "call_id": _get("$dlg(callid)")[:256],
                                "caller": _get("$dlg_var(sw_from)"),
                                "callee": _get("$dlg_var(sw_to)"), "reason": reason})
