"""KEMI side of recording and lawful intercept: where the SDP offers and answers pass.

Called by `kemi.handler` at four points; ordinary calls pay one in-memory lookup at the first
and nothing at the others (the per-transaction reply route is armed only for target calls).
On a target's call the SIP worker only *notes* the message -- one read of the whole message
(``$mb``) and one add to Kamailio's shared-memory queue `li` (mqueue module), see
`intercept.notes` for the format -- and the signalling goes on at once. A dedicated Kamailio
timer process (`drain`, run by the rtimer module every 20 ms) reads the notes, pairs offers with
answers from its own per-call memory, builds, encrypts and queues the events in Redis; so a
target's call is not slowed down by parsing or cryptography (the target cannot notice it by
timing: bench/intercept_latency.py). The points:

* initial INVITE (`on_invite`): match against the cached targets; for a match, note the
  INVITE, arm `t_on_reply`, keep the LIIDs in the transaction (`$avp(sw_li)`) and, by
  `track`, in the dialog (`$dlg_var(sw_li)`);
* replies of that transaction (`on_reply`): every reply from 180 on is noted (the timer process
  makes key, Answer and Release events of them);
* in-dialog requests (`on_in_dialog`): re-INVITE/UPDATE/ACK of a target's dialog are noted
  (re-offers, ReKey, a late offer answered in the ACK), and a re-INVITE/UPDATE arms the reply
  route;
* dialog end (`on_dialog_end`): Release.

Nothing is added to or removed from the SIP messages of an intercept: a target's call is
relayed exactly as any other call (recording mode may announce itself, see
`li.recording_indication`). Messages with keys live in Kamailio's shared memory (the `li`
queue) and the timer process's memory only until the event is encrypted; keys never reach logs,
Redis or headers. When the queue is full, the note is read at once in the SIP worker (slower for
that call, nothing lost; a reply read there lacks the timer process's memory of the offer, so
its key event holds only the answer's keys).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import KSR

from intercept import names
from intercept.notes import RECORDING, NoteReader
from intercept.tap import Tap, Tapped, decode_matches, encode_matches, pack_targets, unpack_targets
from scoring.model import CallAttempt
from scoring.service import ScoringService
from scoring.store import RedisUnavailable

MAX_NOTE = 65536  # characters of a noted message (shared memory is finite)
REPLY_ROUTE = "ksr_tap_reply"
QUEUE = "li"  # the mqueue of notes (kamailio.cfg)
DRAIN_MAX = 2000  # notes per timer tick, so one tick never runs for long
#: Kamailio shared variables where the timer process leaves the current targets (version, and
#: `pack_targets` of the hash) for SIP workers that cannot reach Redis
SHARED_VERSION = "$shv(sw_li_ver)"
SHARED_TARGETS = "$shv(sw_li_tgt)"
PUBLISH_EVERY = 1.0  # seconds between the timer process's looks at the targets' version


def _get(name: str) -> str:
    """A pv as text ('' when unset, unreadable or not text)."""
    try:
        value: Any = KSR.pv.get(name)
    except UnicodeDecodeError:
        return ""
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value)


def _message() -> str:
    """The current message as text. When it is not valid UTF-8 (a hostile header, say), it is
    read again hex-encoded by a Kamailio transformation and decoded with replacement
    characters: the SDP and the headers the events need are ASCII and come through intact."""
    try:
        value: Any = KSR.pv.get("$mb")
        return value[:MAX_NOTE] if isinstance(value, str) else ""
    except UnicodeDecodeError:
        pass
    hexed = KSR.pv.get("$(mb{s.encode.hexa})") or ""
    try:
        raw = bytes.fromhex(str(hexed)[:2 * MAX_NOTE])
    except ValueError:
        return ""
    return raw.decode("utf-8", "replace")


def _indicate_recording() -> None:
    """RFC 7866 §6.3 recording indication: a=record:on under every m= line of this SDP."""
    if int(KSR.textops.has_body_type("application/sdp")) > 0:
        KSR.textops.replace_body_all("(\r\nm=[^\r\n]*)", "\\1\r\na=record:on")


class KemiTap:
    """Holds the per-process `Tap` (and, in the timer process, the `NoteReader`) and talks to
    Kamailio for them."""

    def __init__(self) -> None:
        self.tap = Tap()
        self.reader = NoteReader()
        self._niced = False
        #: the dialog marker `on_invite` decided on last, for `track` (None: no marker)
        self._code: str | None = None
        self._publish_at = 0.0  # timer process: next look at the targets' version
        self._published = -1  # timer process: the version in shared memory

    # -- state ---------------------------------------------------------------------------
    def sync(self, svc: ScoringService) -> None:
        """Reload targets if the version read with the last round trip changed."""
        if svc.watched is None or not svc.watched:
            return
        self.tap.refresh(svc.watched[0], lambda: svc.store.fetch_hash(names.TARGETS))

    def active(self) -> bool:
        return len(self.tap.snapshot) > 0

    def publish(self, svc: ScoringService, now: float | None = None) -> bool:
        """Timer process, once a second: bring the targets up to date (one round trip) and
        leave them in Kamailio's shared memory when they changed, for the SIP workers that
        cannot reach Redis (`from_shared`). Returns whether it published."""
        t = time.monotonic() if now is None else now
        if t < self._publish_at:
            return False
        self._publish_at = t + PUBLISH_EVERY
        svc.sync()
        if not svc.available:
            return False
        self.sync(svc)
        version = self.tap.snapshot.version
        if version == self._published or version < 0:
            return False
        # the hash first, then the version: a worker that sees the new version finds the
        # new hash (one that reads between the two loads the new hash once more later)
        KSR.pv.sets(SHARED_TARGETS, pack_targets(self.tap.raw, version))
        KSR.pv.seti(SHARED_VERSION, version)
        self._published = version
        return True

    def from_shared(self, svc: ScoringService) -> bool:
        """A SIP worker whose INVITE round trip failed (Redis down): take the targets the
        timer process left in shared memory if they are newer than this process's. A worker
        that handled no INVITE since a target was provisioned would otherwise not know it
        for the whole outage. Returns whether it loaded them."""
        shared = KSR.pv.get(SHARED_VERSION)
        if not isinstance(shared, int) or shared <= max(0, self.tap.snapshot.version):
            return False  # nothing published yet (0), or nothing newer
        try:
            version, raw = unpack_targets(_get(SHARED_TARGETS))
        except ValueError as exc:
            svc.counters["li_shared_targets_bad"] += 1
            KSR.err(f"spitwall: {exc}\n")
            return False
        self.tap.load(raw, str(version))
        svc.counters["li_shared_targets_loaded"] += 1
        return True

    def _note(self, svc: ScoringService, key: str, message: str) -> None:
        """Hand a note to the timer process; read it here if the queue is full."""
        if int(KSR.mqueue.mq_add(QUEUE, key, message)) > 0:
            return
        svc.counters["li_queue_full"] += 1
        self._queue(svc, self._events(svc, key, message))

    def _events(self, svc: ScoringService, key: str, message: str) -> list[list[Any]]:
        work = self.reader.read(key, message)
        if work is None:
            return []
        kind, item = work
        tapped = decode_matches(str(item.get("li", "")))
        if any(self.tap.target(t.liid) is None for t in tapped):
            svc.sync()  # a case this process has not loaded yet
            self.sync(svc)
        return self.tap.handle(kind, item)

    def _queue(self, svc: ScoringService, commands: list[list[Any]]) -> None:
        def write(cmds: Sequence[list[Any]]) -> None:
            # awaited (this is the timer process, off the signalling path): a deferred write
            # into a connection whose Redis just died would be lost without an error
            for err in svc.store.write(cmds):
                svc.counters["li_write_error"] += 1
                KSR.err(f"spitwall: intercept event refused by Redis: {err!r:.200}\n")

        try:
            self.tap.flush(commands, write)
        except RedisUnavailable:
            if commands:  # kept (in memory, or in the spool) for a later write
                svc.counters["li_backlog"] += 1

    # -- the timer process ---------------------------------------------------------------
    def drain(self, svc: ScoringService) -> int:
        """Read the notes, build, encrypt and queue their events (rtimer process)."""
        if not self._niced:
            # This process only does deferred work: under CPU contention the SIP workers go
            # first, so the cryptography never shows in a target's signalling timing.
            self._niced = True
            try:
                os.nice(10)
            except OSError as exc:
                svc.counters["li_nice_failed"] += 1
                KSR.warn(f"spitwall: could not lower the intercept timer's priority: {exc}\n")
        self.publish(svc)
        n = 0
        if int(KSR.mqueue.mq_size(QUEUE)) <= 0:
            spool = self.tap.spool
            if self.tap.backlog or (spool is not None and spool.pending()):
                # retry what Redis refused; with a spool also what other processes (or a
                # Kamailio that died) left there: the spool's own look is once a second
                self._queue(svc, [])
            return 0
        svc.sync()  # once per busy tick: current targets (the version rides along)
        self.sync(svc)
        commands: list[list[Any]] = []
        while n < DRAIN_MAX and int(KSR.mqueue.mq_fetch(QUEUE)) > 0:
            n += 1
            key = _get(f"$mqk({QUEUE})")
            try:
                commands += self._events(svc, key, _get(f"$mqv({QUEUE})"))
            except Exception as exc:  # one bad note must not cost the tick's other events
                svc.counters["li_item_error"] += 1
                KSR.err(f"spitwall: intercept note {key[:16]!r} failed: {exc!r:.200}\n")
        self._queue(svc, commands)  # one write for the whole tick, in order
        return n

    # -- initial INVITE ------------------------------------------------------------------
    def on_invite(self, svc: ScoringService, attempt: CallAttempt, rc: int,
                  reject_code: int) -> bool:
        """After the scoring decision; `rc` 0 means a reject was already sent. Returns
        whether the call is a target's. With `li.uniform` (default), while any target exists,
        every relayed call gets the reply route and the transaction marker, a target's call
        only adds the note (one message read, one queue add); `track` then marks the dialog
        alike."""
        if svc.available:
            self.sync(svc)
        else:
            self.from_shared(svc)
        now = time.time()
        matches = self.tap.match(attempt, now)
        self._code = None
        if not matches:
            if rc != 0 and self.active() and svc.config["li.uniform"]:
                KSR.tm.t_on_reply(REPLY_ROUTE)
                KSR.pv.sets("$avp(sw_li)", "")
                self._code = ""
            return False
        code = encode_matches(Tapped(m.target.liid, m.side) for m in matches)
        if rc != 0:
            KSR.tm.t_on_reply(REPLY_ROUTE)
            # Recording (not intercept) may be announced, when the operator turns it on.
            if any(m.target.mode == "recording" for m in matches) and \
                    svc.config["li.recording_indication"]:
                _indicate_recording()
                code += RECORDING
            KSR.pv.sets("$avp(sw_li)", code)
            self._code = code
        self._note(svc, f"invite {now:.6f} {code} {rc} {reject_code}", _message())
        svc.counters["li_calls"] += 1
        return rc != 0

    def track(self, attempt: CallAttempt) -> None:
        """The dialog's marker (after `dlg_manage`): the LIIDs for a target's call, empty for
        the others under `li.uniform`."""
        if self._code is not None:
            KSR.pv.sets("$dlg_var(sw_li)", self._code)
            self._code = None

    # -- replies of a target transaction -------------------------------------------------
    def on_reply(self, svc: ScoringService) -> None:
        code = _get("$avp(sw_li)")
        if not code:
            return  # not a target's (the route runs for every call under li.uniform)
        try:
            status = int(_get("$rs") or 0)
        except ValueError:
            return
        if status < 180:
            return
        if code.endswith(RECORDING) and status < 300:
            _indicate_recording()
        self._note(svc, f"reply {time.time():.6f} {code}", _message())

    # -- in-dialog requests ----------------------------------------------------------------
    def on_in_dialog(self, svc: ScoringService) -> None:
        """Called for in-dialog INVITE, UPDATE, PRACK and ACK after loose_route (before
        relaying)."""
        code = _get("$dlg_var(sw_li)")
        if not code:
            if not KSR.is_ACK() and self.active() and svc.config["li.uniform"]:
                KSR.pv.sets("$avp(sw_li)", "")
                KSR.tm.t_on_reply(REPLY_ROUTE)
            return
        if not KSR.is_ACK():
            if code.endswith(RECORDING):
                _indicate_recording()
            KSR.pv.sets("$avp(sw_li)", code)
            KSR.tm.t_on_reply(REPLY_ROUTE)
        self._note(svc, f"request {time.time():.6f} {code}", _message())

    # -- dialog end --------------------------------------------------------------------------
    def on_dialog_end(self, svc: ScoringService, reason: str) -> None:
        code = _get("$dlg_var(sw_li)")
        if not decode_matches(code.removesuffix(RECORDING)):
            return
        self._note(svc, f"end {time.time():.6f} {code}",
                   f"{_get('$dlg(callid)')[:256]}\n{reason}")
