"""spitwall's KEMI entry point, loaded by app_python3 (`modparam("app_python3", "load", ...)`).

This file is the only place, with `kemi/attempt.py`, that touches KSR. It routes SIP like a
plain stateful proxy (sanity, max-forwards, record-route, loose-route, CANCEL, OPTIONS
keep-alive) and hands every initial INVITE to the scoring service, then applies the decision:
relay with `X-Spitwall-Score`, divert to the answering machine with `Diversion`, or reject with
603/608. Every route is wrapped in an exception barrier: a Python error is logged and counted and
the call is relayed unscored, never dropped.

Carriers with their own cfg can load this file and call `python_exec("spitwall_invite")` from
their native route for initial INVITEs; it scores the call and sets `$avp(spitwall_rc)` to 1 to
relay (header added), 2 when the call was diverted (R-URI rewritten; relay it), or 0 when a
reply was already sent (reject), and `$avp(spitwall_action)` to relay/divert/reject.
"""

from __future__ import annotations

import logging
import os
import re
import site
import sys
import time
import traceback
from typing import Any


def _root() -> str:
    here: str | None = globals().get("__file__")
    if here:
        return os.path.dirname(os.path.dirname(os.path.abspath(here)))
    return os.environ.get("SPITWALL_ROOT", os.getcwd())


def _add_venv(root: str) -> None:
    """Put the project venv's site-packages (and the repo root) ahead of dist-packages."""
    venv = os.environ.get("SPITWALL_VENV", os.path.join(root, ".venv"))
    ver = f"python{sys.version_info.major}.{sys.version_info.minor}"
    before = list(sys.path)
    sp = os.path.join(venv, "lib", ver, "site-packages")
    if os.path.isdir(sp):
        site.addsitedir(sp)
    added = [p for p in sys.path if p not in before]
    rest = [p for p in sys.path if p in before and p != root]
    sys.path[:] = [root, *added, *rest]


_add_venv(_root())

import KSR  # noqa: E402

from intercept import names as li_names  # noqa: E402
from intercept.spool import Spool  # noqa: E402
from kemi.attempt import build_attempt, clean, read_pv  # noqa: E402
from kemi.tap import KemiTap  # noqa: E402
from scoring import label  # noqa: E402
from scoring.checks import ring_hijack  # noqa: E402
from scoring.checks.base import Context  # noqa: E402
from scoring.model import (  # noqa: E402
    Action,
    CallAttempt,
    Decision,
    Signals,
    pack_dialog_note,
    unpack_dialog_note,
)
from scoring.service import ScoringService  # noqa: E402
from scoring.store import RedisUnavailable, Store  # noqa: E402

# Characters outside RFC 3261 `user`, and '%' not starting a valid escape, get percent-escaped.
_USER_SAFE = re.compile(r"[^A-Za-z0-9\-_.!~*'()&=+$,;?/%]|%(?![0-9A-Fa-f]{2})")
_HOST_SAFE = re.compile(r"^[A-Za-z0-9.\-\[\]:]{1,253}$")


class KsrLogHandler(logging.Handler):
    """Send Python logging to Kamailio's log (so it lands where operators look)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = clean(self.format(record), 2000) + "\n"
            if record.levelno >= logging.ERROR:
                KSR.err(text)
            elif record.levelno >= logging.WARNING:
                KSR.warn(text)
            else:
                KSR.info(text)
        except Exception:  # logging must never raise into a route
            self.handleError(record)


log = logging.getLogger("spitwall")


def _setting(define: str, env: str, default: str) -> str:
    """A start-time setting: `-A NAME=value` define, else environment, else default."""
    value = None
    try:
        value = KSR.pv.get(f"$def({define})")
    except Exception as exc:  # $def may be unavailable outside a message context
        log.debug("$def(%s) unavailable: %r", define, exc)
    if value in (None, "", "<null>"):
        value = os.environ.get(env, default)
    text = str(value).strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1]
    return text


def sip_uri(user: str, domain: str, port: str = "") -> str:
    """A SIP URI safe to place inside <> of a header we add (port kept unless default)."""
    host = domain if _HOST_SAFE.match(domain) else "invalid"
    if port.isdigit() and port not in ("", "5060") and host != "invalid":
        host = f"{host}:{int(port)}"
    esc = _USER_SAFE.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode()), user)
    return f"sip:{esc}@{host}" if esc else f"sip:{host}"


class Handler:
    """The object app_python3 calls for every route."""

    def __init__(self) -> None:
        self.service: ScoringService | None = None
        self.pid = 0
        self.redis_url = "redis://127.0.0.1:6379/0"
        self.next_hop = ""
        self.media_uri = ""
        self.deliver_uri = ""
        self.li_spool = ""
        self.timeout = 0.2
        self.errors = 0
        self.ktap = KemiTap()
        #: the latest INVITE's action (relay/divert/reject), for `spitwall_invite`'s AVP
        self.last_action = "relay"
        #: whether the current INVITE was already marked (intercept match, dialog tracking)
        self._marked = False

    # -- lifecycle ---------------------------------------------------------------------
    def child_init(self, rank: int) -> int:
        try:
            self._settings()
            if rank >= 0 or rank == -1:  # SIP workers and other forked children
                self._ensure_service()
        except Exception as exc:  # logged with traceback and counted
            self._barrier(exc, "child_init")
        return 0

    def _settings(self) -> None:
        self.redis_url = _setting("REDIS_URL", "SPITWALL_REDIS", "redis://127.0.0.1:6379/0")
        nh = _setting("NEXT_HOP", "SPITWALL_NEXT_HOP", "")
        self.next_hop = "" if nh.lower() in ("", "none") else nh
        mu = _setting("MEDIA_URI", "SPITWALL_MEDIA_URI", "")
        self.media_uri = "" if mu.lower() in ("", "none") else mu
        du = _setting("DELIVER_URI", "SPITWALL_DELIVER_URI", "")
        self.deliver_uri = "" if du.lower() in ("", "none") else du
        try:
            self.timeout = float(_setting("REDIS_TIMEOUT", "SPITWALL_REDIS_TIMEOUT", "0.2"))
        except ValueError:
            self.timeout = 0.2
        # intercept events Redis refuses go to disk here ('' = kept in memory only)
        self.li_spool = _setting("LI_SPOOL", "SPITWALL_LI_SPOOL", "")

    def _ensure_service(self) -> ScoringService:
        # Connections are per process: make them after fork, never at import time.
        if self.service is None or self.pid != os.getpid():
            self.pid = os.getpid()
            store = Store(self.redis_url, timeout=self.timeout)
            store.watch_keys = (li_names.VERSION,)  # intercept targets' version, same trip
            self.service = ScoringService(store)
            self.ktap = KemiTap()
            if self.li_spool:
                try:
                    self.ktap.tap.spool = Spool(self.li_spool)
                except OSError as exc:  # events then wait in memory, as without a spool
                    self.service.counters["li_spool_unusable"] += 1
                    KSR.err(f"spitwall: intercept spool {clean(self.li_spool, 200)} unusable "
                            f"({exc.strerror}); events Redis refuses are kept in memory\n")
        return self.service

    def _barrier(self, exc: Exception, where: str) -> None:
        """Log a Python error with its traceback and count it (`spitwall stats`:
        `kemi_error:<where>`); the caller then lets the call go on unscored."""
        self.errors += 1
        text = "".join(traceback.format_exception(exc, limit=6)).replace("\n", " | ")
        KSR.err(f"spitwall: error in {where} (call goes on unscored): {clean(text, 1500)}\n")
        if self.service is not None:
            try:
                self.service.store.count(f"kemi_error:{where}")
            except Exception as count_exc:  # counting must not raise out of the barrier
                KSR.err(f"spitwall: could not count the error: {clean(repr(count_exc), 200)}\n")

    # -- routes ------------------------------------------------------------------------
    def ksr_request_route(self, msg: Any) -> int:
        try:
            return self._request_route()
        except Exception as exc:  # logged with traceback and counted
            self._barrier(exc, "request_route")
            # Last resort: keep the call alive.
            if KSR.tm.t_relay() < 0:
                KSR.sl.sl_reply_error()
            return 1

    def ksr_reply_route(self, msg: Any) -> int:
        return 1

    def ksr_onsend_route(self, msg: Any) -> int:
        return 1

    def ksr_failure_manage(self, msg: Any) -> int:
        try:
            if KSR.tm.t_is_canceled() > 0:
                return 1
            self._media_fallback()
        except Exception as exc:  # logged with traceback and counted
            self._barrier(exc, "failure_route")
        return 1

    def spitwall_failure(self, msg: Any) -> int:
        """The failure-route entry point for native cfgs (`python_exec("spitwall_failure")` in
        the failure_route armed for INVITEs): relays a diverted call the answering machine did
        not take (`media.fallback`). Returns 1 when it relayed a new branch, -1 otherwise
        (nothing to do, fallback off, or an error: the failure goes back to the caller)."""
        try:
            if KSR.tm.t_is_canceled() > 0:
                return -1
            return 1 if self._media_fallback() else -1
        except Exception as exc:  # logged with traceback and counted
            self._barrier(exc, "failure_route")
            return -1

    def _media_fallback(self) -> bool:
        """A diverted call the answering machine did not take (no reply within `media.timeout`,
        overloaded, refused): relay it to the callee after all, unless `media.fallback` is
        `reject`. Fail-open, as when Redis is down: a broken answering machine must not drop
        the calls it would have let through."""
        orig = KSR.pv.get("$avp(sw_orig_ru)")
        if not isinstance(orig, str) or not orig:
            return False  # not a diverted call, or already fallen back once
        KSR.pv.unset("$avp(sw_orig_ru)")
        svc = self._ensure_service()
        # a rare event, and after a timeout we run in tm's timer process, whose config is not
        # refreshed by INVITE replies: make sure it is the live one (one round trip)
        svc.sync()
        code = read_pv("$T_reply_code", 8)
        if str(svc.config["media.fallback"]) != "relay":
            log.info("answering machine failed (%s); media.fallback=reject", code)
            return False
        # the new branch carries what was saved before the divert headers (t_save_lumps)
        KSR.pv.sets("$ru", orig)
        if self.next_hop:
            KSR.pv.sets("$du", self.next_hop)
        else:
            KSR.pv.unset("$du")
        header = str(svc.config["score_header"])
        score = read_pv("$avp(sw_score)", 8)
        if header and score:
            KSR.hdr.append(f"{header}: {score}\r\n")
        KSR.tm.t_reset_fr()
        if KSR.tm.t_relay() < 0:
            log.warning("answering machine failed (%s) and the fallback relay failed", code)
            return False
        log.info("answering machine failed (%s): diverted call relayed to the callee", code)
        # the callee may answer now: the call's end is evidence about the caller again
        note = read_pv("$dlg_var(sw)", 340)
        if note:
            diverted, ip, caller = unpack_dialog_note(note)
            if diverted and (ip or caller):
                KSR.pv.sets("$dlg_var(sw)", pack_dialog_note(False, ip, caller))
        # counted at once: a timeout runs this in tm's timer process, which scores no calls
        # and so never flushes the counters a SIP worker flushes
        try:
            svc.store.count("media_fallback")
        except RedisUnavailable:
            svc.counters["record_lost"] += 1
        return True

    def ksr_tap_reply(self, msg: Any) -> int:
        """Per-transaction reply route, armed only for intercept/recording target calls."""
        try:
            self.ktap.on_reply(self._ensure_service())
        except Exception as exc:  # logged with traceback and counted; the reply goes on
            self._barrier(exc, "tap_reply")
        return 1

    def ksr_li_timer(self, msg: Any, evname: str = "") -> int:
        """rtimer process: build, encrypt and queue the intercept events noted by the call
        path (off the signalling path: a target's call is not slowed down)."""
        try:
            self.ktap.drain(self._ensure_service())
        except Exception as exc:  # logged with traceback and counted; next tick goes on
            self._barrier(exc, "li_timer")
        return 1

    def ksr_branch_manage(self, msg: Any) -> int:
        return 1

    def ksr_onreply_manage(self, msg: Any) -> int:
        return 1

    # -- request routing -----------------------------------------------------------------
    def _request_route(self) -> int:
        if self._flooding():
            return 1  # dropped, unanswered: a reply would feed the flood
        if self.service is not None:
            # what this worker counted on its own (fail-open INVITEs, ...) goes to `spitwall
            # stats` at most every 5 s: on any request, not only INVITEs -- a worker may see
            # only ACKs, BYEs and replies for a long while
            self.service.maybe_flush_counters()
        if KSR.maxfwd.process_maxfwd(10) < 0:
            KSR.sl.sl_send_reply(483, "Too Many Hops")
            return 1
        if KSR.sanity.sanity_check(17895, 7) < 0:
            KSR.err(f"spitwall: malformed request from {KSR.pv.get('$si')}\n")
            return 1

        if not KSR.is_INVITE() and not KSR.is_ACK() and not KSR.is_CANCEL() \
                and KSR.siputils.has_totag() < 0 and self._scanner_non_invite():
            return 1

        if KSR.is_OPTIONS() and KSR.is_myself_ruri() and KSR.pv.get("$rU") is None:
            KSR.sl.sl_send_reply(200, "Keepalive")
            return 1

        if KSR.is_CANCEL():
            if KSR.tm.t_check_trans() > 0:
                self._relay(set_next_hop=False)
            return 1

        if KSR.siputils.has_totag() > 0:
            return self._within_dialog()

        if KSR.tm.t_check_trans() == 0:  # retransmission absorbed by tm
            return 1
        if KSR.is_ACK():  # stray ACK without transaction
            return 1

        self._strip_own_headers()
        if KSR.is_method_in("IS"):  # INVITE or SUBSCRIBE open dialogs through us
            KSR.rr.record_route()

        if self._report_request():
            return 1

        if KSR.is_INVITE():
            rc = self._score_invite()
            if rc == 0:
                return 1
            self._relay(set_next_hop=(rc == 1))
            return 1
        if KSR.is_SUBSCRIBE() and self.deliver_uri and self._srtp_subscribe():
            return 1
        self._relay(set_next_hop=True)
        return 1

    def _flooding(self) -> bool:
        """A request flood from one source (Kamailio's pike, FLOOD_DENSITY): True when this
        request is to be dropped before any other work -- no scoring, no Redis, no reply.
        Sources on the trusted or allow list (peering trunks) are never dropped."""
        svc = self.service
        if svc is None or not svc.config["flood.check"] or KSR.pike.pike_check_req() > 0:
            return False
        # a flagged source is rare: make sure the config and lists (a trunk just trusted, the
        # check just turned off) are the live ones -- at most one round trip a second
        svc.fresh()
        if not svc.config["flood.check"]:
            return False
        source = read_pv("$si", 64)
        if svc.lists.trusted.match(ip=source) or svc.lists.allow.match(ip=source):
            return False
        svc.counters["flood_dropped"] += 1
        svc.maybe_flush_counters()
        return True

    def _srtp_subscribe(self) -> bool:
        """Recorders SUBSCRIBE to the proxy for the `srtp` event package (key disclosure):
        hand them to the delivery worker, which authorises them by their real source."""
        event = read_pv("$hdr(Event)", 64).split(";", 1)[0].strip().lower()
        if event != "srtp":
            return False
        KSR.hdr.append(f"X-Spitwall-Source: {read_pv('$si', 64)}:{read_pv('$sp', 8)}\r\n")
        KSR.pv.sets("$du", self.deliver_uri)
        self._relay(set_next_hop=False)
        return True

    def _report_request(self) -> bool:
        """In-call spam reports: a MESSAGE to the report URI ('spam' or 'ok' in the body) or
        an INVITE to the feature code, from the callee; they report the callee's last caller.
        Returns True when the request was handled here."""
        svc = self._ensure_service()
        user = read_pv("$rU", 64)
        if not user:
            return False
        if KSR.is_MESSAGE() and user == str(svc.config["reputation.report_uri_user"]):
            body = read_pv("$rb", 64).strip().lower()
            kind = "report_ok" if body.startswith(("ok", "ham", "not spam")) else "report_spam"
        elif KSR.is_INVITE() and user == str(svc.config["reputation.feature_code"]):
            kind = "report_spam"
        else:
            return False
        # Reports must come through a trusted peer (the core that authenticated the callee):
        # otherwise anyone could forge a From and smear a callee's last caller.
        source = read_pv("$si", 64)
        svc.sync()  # a rare request: make sure this child has the current trusted list
        if svc.lists.trusted.match(ip=source) is None:
            KSR.sl.sl_send_reply(403, "Forbidden")
            return True
        reporter = read_pv("$fU", 64)
        found = svc.report_last_caller(reporter, kind) if reporter else None
        if KSR.is_MESSAGE():
            if found:
                KSR.sl.sl_send_reply(202, "Report Accepted")
            else:
                KSR.sl.sl_send_reply(404, "No Recent Caller")
        else:
            KSR.sl.sl_send_reply(603, "Report Recorded" if found else "No Recent Caller")
        return True

    def _within_dialog(self) -> int:
        if KSR.rr.loose_route() > 0:
            if KSR.is_INVITE() or KSR.is_UPDATE() or KSR.is_ACK() or KSR.is_PRACK():
                try:
                    self.ktap.on_in_dialog(self._ensure_service())
                except Exception as exc:  # logged with traceback and counted; call goes on
                    self._barrier(exc, "tap_in_dialog")
            self._relay(set_next_hop=False)
            return 1
        if KSR.is_ACK():
            if KSR.tm.t_check_trans() > 0:
                self._relay(set_next_hop=False)
            return 1
        KSR.sl.sl_send_reply(404, "Not here")
        return 1

    def _relay(self, *, set_next_hop: bool) -> None:
        if set_next_hop and self.next_hop and KSR.pv.get("$du") is None:
            KSR.pv.sets("$du", self.next_hop)
        if KSR.is_INVITE():
            KSR.tm.t_on_failure("ksr_failure_manage")
        if KSR.tm.t_relay() < 0:
            KSR.sl.sl_reply_error()

    def _strip_own_headers(self) -> None:
        """Callers must not forge the headers that we add for the core."""
        svc = self.service
        name = str(svc.config["score_header"]) if svc is not None else "X-Spitwall-Score"
        for header in {name, "X-Spitwall-Score", "X-Spitwall-Pass", "X-Spitwall-Source"}:
            if header and KSR.hdr.is_present(header) > 0:
                KSR.hdr.remove(header)

    def _scanner_non_invite(self) -> bool:
        """Drop or reject out-of-dialog non-INVITE requests from scanner User-Agents."""
        svc = self._ensure_service()
        ua = read_pv("$ua", 256)
        if not ua:
            return False
        hit = svc.scanner_probe(read_pv("$si", 64), ua)
        if hit is None:
            return False
        action = str(svc.config["scanner.non_invite"])
        if action == "ignore":
            return False
        if action == "reject":
            KSR.sl.sl_send_reply(403, "Forbidden")
        return True  # drop: say nothing

    def _strip_ring_control(self, svc: ScoringService, attempt: CallAttempt) -> None:
        """Ring hijack: untrusted callers must not pick the ring tone or auto-answer, nor
        label their own call (a forged `scoring.label` Call-Info)."""
        if not svc.config["ring_hijack.strip"]:
            return
        alert, control = ring_hijack.findings(attempt)
        forged = bool(attempt.call_info) and label.forged(attempt.call_info)
        if not (alert or control or forged):
            return
        ctx = Context(attempt, Signals(), svc.config, svc.lists)
        if ring_hijack.is_trusted(ctx):
            return
        if alert:
            KSR.hdr.remove("Alert-Info")
        if forged or (attempt.call_info and ring_hijack.hostile_call_info(attempt.call_info)):
            KSR.hdr.remove("Call-Info")
        svc.counters["ring_control_stripped"] += 1

    def _track_dialog(self, attempt: CallAttempt, *, diverted: bool) -> None:
        """Let the dialog module tell us when (and how long after answer) the call ends."""
        if KSR.dialog.dlg_manage() < 0:
            return
        # one dialog variable, not three: each write takes the dialog's lock and shared memory
        KSR.pv.sets("$dlg_var(sw)", pack_dialog_note(diverted, attempt.source_ip,
                                                     attempt.caller_key))

    def ksr_dialog_event(self, msg: Any, evname: str) -> int:
        """dialog:end of a call we scored: its duration is evidence about the caller.

        A dialog ends with the BYE we relay (the event sees that BYE) or, with no BYE through
        us, at its timeout (the event sees a stand-in message Kamailio makes up): then the
        call ended at some unknown time before, so its "duration" (the timeout, hours) says
        nothing about the caller -- counted as `dialog_timeout`, no reputation feedback."""
        try:
            if evname != "dialog:end":
                return 1
            by_bye = bool(KSR.is_BYE())
            if read_pv("$dlg_var(sw_li)", 8):
                self.ktap.on_dialog_end(self._ensure_service(),
                                        "BYE" if by_bye else "dialog timeout")
            diverted, ip, caller = unpack_dialog_note(read_pv("$dlg_var(sw)", 340))
            if not by_bye:
                svc = self._ensure_service()
                try:  # counted at once: timeouts run in the dialog timer's process
                    svc.store.count("dialog_timeout")
                except RedisUnavailable:
                    svc.counters["record_lost"] += 1
                return 1
            if diverted:
                return 1  # diverted: the answering machine gives its own verdict
            start = int(KSR.pv.get("$dlg(start_ts)") or 0)
            if start > 0 and (caller or ip):
                self._ensure_service().call_ended(caller, ip, time.time() - start)
        except Exception as exc:  # logged with traceback and counted
            self._barrier(exc, "dialog_event")
        return 1

    # -- scoring -------------------------------------------------------------------------
    def spitwall_invite(self, msg: Any) -> int:
        """Score an initial INVITE and apply the decision: the entry point for native cfgs
        (`python_exec("spitwall_invite")`), which read the outcome from `$avp(spitwall_rc)`
        and `$avp(spitwall_action)`.

        Returns 1 relay, 2 diverted (relay to the new R-URI), 0 reply already sent.
        """
        rc = self._score_invite()
        try:
            KSR.pv.seti("$avp(spitwall_rc)", rc)
            KSR.pv.sets("$avp(spitwall_action)", self.last_action)
        except Exception as exc:  # logged with traceback and counted
            self._barrier(exc, "avp")
        return rc

    def _score_invite(self) -> int:
        """Score and apply (our own request route; no AVPs needed there)."""
        self.last_action = "relay"
        try:
            svc = self._ensure_service()
            attempt = build_attempt()
            decision = svc.score(attempt)
        except Exception as exc:  # logged with traceback and counted
            self._barrier(exc, "scoring")
            return 1
        self._marked = False
        try:
            rc = self._apply(decision, svc, attempt)
        except Exception as exc:  # logged with traceback and counted
            self._barrier(exc, "apply")
            return 1
        if not self._marked:  # a diverted call was marked before its divert headers
            self._mark_call(svc, decision, attempt, rc)
        self.last_action = decision.action.value
        return rc

    def _mark_call(self, svc: ScoringService, decision: Decision, attempt: CallAttempt,
                   rc: int) -> None:
        """Intercept matching and dialog tracking of a call after its decision (`rc` as
        `spitwall_invite` returns it). A diverted call is marked before `t_save_lumps`, so
        that the answering-machine fallback's branch (`_media_fallback`) carries the dialog's
        Record-Route parameter and its in-dialog requests and end are seen like any call's."""
        self._marked = True
        try:
            self.ktap.on_invite(svc, attempt, rc, int(svc.config["reject_code"]))
        except Exception as exc:  # logged with traceback and counted; the call goes on
            self._barrier(exc, "tap_invite")
        # With the kill switch on, dialogs are still tracked while intercept targets exist:
        # for every call alike (a target's call must look like anyone else's).
        # Emergency calls give no duration feedback (a short call to 112 is no spam signal).
        unscored = decision.rule in ("disabled", "emergency")
        if rc and (not unscored or self.ktap.active()):
            # dialogs of every call alike while intercept targets exist (a target's call
            # must look like anyone else's), else only for the call-duration feedback
            if svc.config["reputation.call_duration"] or self.ktap.active():
                # the note's "diverted" flag means: no duration feedback at the dialog's end
                self._track_dialog(attempt,
                                   diverted=(rc == 2 or decision.rule == "emergency"))
            self.ktap.track(attempt)

    def _apply(self, decision: Decision, svc: ScoringService, attempt: CallAttempt) -> int:
        if decision.action is Action.REJECT:
            code = int(svc.config["reject_code"])
            KSR.tm.t_newtran()
            url = str(svc.config["reject.call_info_url"])
            if code == 608 and url:
                # RFC 8688: where the called party can reach the operator about the block
                KSR.hdr.append_to_reply(f"Call-Info: <{url}>;purpose=jwscard\r\n")
            KSR.tm.t_reply(code, "Rejected" if code == 608 else "Decline")
            return 0
        self._strip_ring_control(svc, attempt)
        if decision.action is Action.DIVERT and self.media_uri:
            orig = sip_uri(read_pv("$rU", 128), read_pv("$rd", 128), read_pv("$rp", 8))
            # If the answering machine fails, the failure route relays the call to the callee
            # (media.fallback): it needs the R-URI, and a copy of the message without the
            # divert headers below (t_save_lumps keeps what was changed so far: our stripped
            # headers, Record-Route, ring control).
            ruri = KSR.pv.get("$ru")
            KSR.pv.sets("$avp(sw_orig_ru)", ruri if isinstance(ruri, str) and ruri else orig)
            KSR.pv.sets("$avp(sw_score)", f"{decision.score:.2f}")
            # the dialog's Record-Route parameter and the recording indication go into the
            # saved lumps: the fallback's branch to the callee must carry them
            self._mark_call(svc, decision, attempt, 2)
            if KSR.tm.t_newtran() > 0:
                KSR.tm.t_save_lumps()
            KSR.tm.t_set_fr(0, int(svc.config.get_float("media.timeout") * 1000))
            KSR.hdr.append(
                f"Diversion: <{orig}>;reason=unknown;counter=1;"
                f"spitwall-score={decision.score:.2f}\r\n"
            )
            # the answering machine learns the caller's real source (for reputation)
            KSR.hdr.append(f"X-Spitwall-Source: {attempt.source_ip}\r\n")
            KSR.pv.sets("$ru", self.media_uri)
            KSR.pv.unset("$du")
            return 2
        if decision.action is Action.DIVERT:
            log.warning("divert decided but no MEDIA_URI configured: relaying")
        header = str(svc.config["score_header"])
        if header and decision.rule not in ("disabled", "allowlist", "emergency"):
            KSR.hdr.append(f"{header}: {decision.score:.2f}\r\n")
        if decision.label:  # "spam likely", for the callee's phone (scoring.label)
            KSR.hdr.append(f"Call-Info: {decision.label}\r\n")
        return 1


def mod_init() -> Handler:
    root = logging.getLogger("spitwall")
    if not any(isinstance(h, KsrLogHandler) for h in root.handlers):
        h = KsrLogHandler()
        h.setFormatter(logging.Formatter("spitwall %(name)s: %(message)s"))
        root.addHandler(h)
        root.setLevel(logging.INFO)
        root.propagate = False
    return Handler()
