"""The scoring service one Kamailio child holds: store, live config, cached lists, engine.

It is KSR-free so that tests and benchmarks can drive it directly against a real Redis. The
config and lists are re-read only when the versions returned with an INVITE's script reply
change: a `spitwall config set` is seen by the next call of every child, at no extra round trip
for calls in between.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter

from lists.matcher import ListHit, ListSnapshot
from scoring import emergency, label, passtoken
from scoring.checks.base import Context
from scoring.checks.callerid import callee_numbers, lookup_numbers
from scoring.config import Config, parse_hosts
from scoring.engine import decide
from scoring.geo import country_for
from scoring.model import Action, CallAttempt, Contribution, Decision, Signals
from scoring.stir import IdentityHeader, host_allowed
from scoring.store import RedisUnavailable, Store

log = logging.getLogger("spitwall.service")

DISABLED_POLL = 1.0  # seconds between config-version polls while the kill switch is on
COUNTER_FLUSH = 5.0  # seconds between flushes of a child's own counters to `spitwall stats`
#: a child's counters that only it knows (fail-open events, refused tokens, ...) and that it
#: adds to the shared `spitwall stats` hash. Decisions, feedback and scanner sightings are
#: already counted in Redis with the write that records them; `li_*` counters never leave the
#: process (intercept activity is need-to-know; the stats hash is readable by every operator).
FLUSHED_COUNTERS = frozenset({
    "redis_unavailable", "record_lost", "pass_token_accepted", "pass_token_refused",
    "config_reload_failed", "lists_reload_failed", "ring_control_stripped", "relay_disabled",
    "emergency", "flood_dropped",
})
FLUSHED_PREFIXES = ("check_error:",)
#: seconds a process trusts its config without a look at Redis's versions (`fresh`)
CONFIG_MAX_AGE = 1.0
#: decisions that monitor mode still applies: explicit operator blocks, not scoring
MONITOR_ENFORCES = frozenset({"blocklist"})


class ScoringService:
    """Scores initial INVITEs; never raises for Redis trouble (fail-open)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.config = Config.defaults()
        self.config.version = -1  # unknown: load on the first reply
        self.lists = ListSnapshot.empty()
        self.lists.version = -1
        self.counters: Counter[str] = Counter()
        self._last_poll = 0.0
        self._flushed: Counter[str] = Counter()  # what `flush_counters` has sent
        self._last_flush = time.monotonic()
        #: values of `store.watch_keys` from the latest round trip (None: not read yet)
        self.watched: tuple[str | None, ...] | None = None
        #: whether the latest exchange with Redis (an INVITE's round trip, a version poll)
        #: got through; False: `watched` and the config may be stale
        self.available = True
        #: when the config and lists versions were last compared with Redis (monotonic)
        self._checked_at = -CONFIG_MAX_AGE

    def score(self, attempt: CallAttempt, now: float | None = None) -> Decision:
        t = time.time() if now is None else now
        if not self.config["enabled"] and self.config.version >= 0:
            return self._disabled(t)  # relays every call, emergency calls too
        called = emergency.service(attempt.request_uri, attempt.ruri_user,
                                   emergency.parse_numbers(str(self.config["emergency.numbers"])))
        if called is not None:
            return self._emergency(attempt, called, t)
        try:
            looked_up = bool(self.config["numbers.lookup"])
            numbers = (lookup_numbers(attempt, str(self.config["callerid.region"]))
                       if looked_up else ())
            signals = self.store.observe(attempt, self.config, t, numbers)
        except RedisUnavailable as exc:
            self.counters["redis_unavailable"] += 1
            self.available = False
            log.debug("scoring without shared state: %s", exc)
            signals = Signals(available=False)
        else:
            self.available = True
            self._refresh(signals)
            self.watched = signals.watched
            if self.config["numbers.lookup"] and not looked_up:
                signals = self._late_lookup(attempt, signals)
        country = country_for(self.config, attempt.source_ip)
        ctx = Context(attempt, signals, self.config, self.lists, country=country, now=t)
        decision = self._pass(attempt, signals, t) or decide(ctx, on_error=self._check_failed)
        if decision.action is not Action.RELAY and decision.rule not in MONITOR_ENFORCES:
            waived = "monitor" if self.config["mode"] == "monitor" else self._opted_out(attempt)
            if waived:
                would = decision.action
                decision = dataclasses.replace(decision, action=Action.RELAY, would=would,
                                               waived=waived)
                self.counters[f"{decision.waiver}:{would.value}"] += 1
        tag = label.header(decision, self.config)
        if tag is not None:
            decision = dataclasses.replace(decision, label=tag)
        self.counters[f"action:{decision.action.value}"] += 1
        x5u = self._x5u_miss(attempt, decision)
        try:
            self.store.record(attempt, decision, t,
                              half_life=self.config.get_float("reputation.half_life"), x5u_miss=x5u,
                              v6_prefix=self.config.v6_prefix)
        except RedisUnavailable:
            self.counters["record_lost"] += 1
        self.maybe_flush_counters()
        return decision

    def _late_lookup(self, attempt: CallAttempt, signals: Signals) -> Signals:
        """`numbers.lookup` was off when this INVITE's round trip was sent and is on in the
        config its reply loaded: look the numbers up now (once per child and change), so a
        number imported with `spitwall numbers import` counts from the first call on."""
        numbers = lookup_numbers(attempt, str(self.config["callerid.region"]))
        if not numbers:
            return signals
        try:
            return dataclasses.replace(signals, numbers=self.store.lookup_numbers(numbers))
        except RedisUnavailable as exc:
            self.counters["redis_unavailable"] += 1
            log.debug("number lookup failed: %s", exc)
            return signals

    def _emergency(self, attempt: CallAttempt, called: str, now: float) -> Decision:
        """An emergency call: relayed unscored, no rate counted, no round trip; recorded."""
        self.counters["emergency"] += 1
        self.counters["action:relay"] += 1
        decision = Decision(Action.RELAY, 0.0, (Contribution(
            "emergency", 0.0, 0.0, f"emergency call ({called[:40]}): never screened"),),
            rule="emergency")
        try:
            self.store.record(attempt, decision, now)
        except RedisUnavailable:
            self.counters["record_lost"] += 1
        self.maybe_flush_counters()
        return decision

    def _pass(self, attempt: CallAttempt, signals: Signals, now: float) -> Decision | None:
        """A caller the answering machine judged human comes back with a pass token: relay
        without scoring (so it is not diverted again). A token counts once (claimed in Redis in
        the INVITE's round trip); without Redis it cannot be checked and is not honoured."""
        if not attempt.pass_token:
            return None
        if not signals.pass_first_use:
            self.counters["pass_token_refused"] += 1
            log.info("pass token refused: already used, or Redis unavailable")
            return None
        try:
            passtoken.verify(str(self.config["media.token_key"]), attempt.pass_token,
                             caller=attempt.caller_key, callee=attempt.ruri_user, now=now)
        except ValueError as exc:
            self.counters["pass_token_refused"] += 1
            log.info("pass token refused: %s", exc)
            return None
        self.counters["pass_token_accepted"] += 1
        return Decision(Action.RELAY, 0.0, (Contribution("pass", 0.0, 1.0,
                        "pass token from the answering machine"),), rule="pass")

    def _x5u_miss(self, attempt: CallAttempt, decision: Decision) -> str:
        """The certificate URL of a PASSporT we could not check because its certificate is
        not cached (and may be fetched: its host is allow-listed), for the x5u fetcher."""
        if not attempt.identity:
            return ""
        for c in decision.contributions:
            if c.name == "stir" and c.reason.endswith("certificate not cached"):
                try:
                    url = IdentityHeader.parse(attempt.identity.split(",")[0]).passport.header.x5u
                except ValueError:
                    return ""
                hosts = parse_hosts(str(self.config["stir.x5u_hosts"]))
                return url if host_allowed(url, hosts) else ""
        return ""

    def _opted_out(self, attempt: CallAttempt) -> str:
        """"optout: <entry>" when the callee is on the `optout` list (subscribers who chose
        not to have their calls screened: their calls are relayed, and labelled when
        labelling is on; explicit blocks still apply), else ''."""
        if not self.lists.optout.size:
            return ""
        region = str(self.config["callerid.region"])
        hit = self.lists.optout.match(user=attempt.ruri_user, domain=attempt.ruri_domain,
                                      numbers=callee_numbers(attempt, region))
        return f"optout: {hit.on}" if hit is not None else ""

    def _disabled(self, now: float) -> Decision:
        """Kill switch on: relay unscored, touch Redis only to poll the config version, at
        most once per `DISABLED_POLL` seconds per child."""
        self.counters["action:relay"] += 1
        self.counters["relay_disabled"] += 1
        if now - self._last_poll >= DISABLED_POLL:
            self._last_poll = now
            self.sync()
            self.maybe_flush_counters()
        return Decision(Action.RELAY, 0.0, rule="disabled")

    def maybe_flush_counters(self) -> None:
        """Flush at most once per `COUNTER_FLUSH` seconds (a clock read per call otherwise)."""
        if time.monotonic() - self._last_flush >= COUNTER_FLUSH:
            self.flush_counters()

    def flush_counters(self) -> dict[str, int]:
        """Add what this child counted since the last flush to the shared stats hash (one
        deferred write, no wait). While Redis is down the counts wait for the next flush,
        so calls that failed open while it was down are counted once it is back. Returns
        what was sent."""
        self._last_flush = time.monotonic()
        delta = {k: n - self._flushed[k] for k, n in self.counters.items()
                 if (k in FLUSHED_COUNTERS or k.startswith(FLUSHED_PREFIXES))
                 and n > self._flushed[k]}
        if not delta:
            return {}
        try:
            self.store.count_many(delta)
        except RedisUnavailable:
            return {}
        self._flushed.update(delta)
        return delta

    def sync(self) -> None:
        """Reload config and lists now if their versions changed (one round trip; for rare
        requests such as reports, not for INVITEs, whose script reply carries the versions)."""
        try:
            cfg_v, lists_v, self.watched = self.store.versions()
        except RedisUnavailable:
            # not counted as `redis_unavailable`, which counts INVITEs scored without Redis:
            # the intercept timer polls once a second, also through an outage
            self.available = False
            return
        self.available = True
        self._refresh(Signals(config_version=cfg_v, lists_version=lists_v))

    def call_ended(self, caller_key: str, ip: str, duration: float) -> str | None:
        """Feed an answered call's duration into reputation; returns the feedback kind."""
        self.fresh()
        cfg = self.config
        if duration < cfg.get_float("reputation.short_call"):
            kind = "short_call"
        elif duration > cfg.get_float("reputation.long_call"):
            kind = "long_call"
        else:
            return None
        try:
            self.store.feedback(caller_key=caller_key, ip=ip, kind=kind,
                                half_life=cfg.get_float("reputation.half_life"),
                                v6_prefix=cfg.v6_prefix)
        except RedisUnavailable:
            self.counters["record_lost"] += 1
            return None
        self.counters[f"feedback:{kind}"] += 1
        return kind

    def report_last_caller(self, reporter_user: str, kind: str) -> tuple[str, str] | None:
        """A callee reports its last caller (spam or ok); returns (caller, ip) or None."""
        try:
            found = self.store.last_caller(reporter_user)
            if found is None:
                return None
            caller, ip = found
            self.store.feedback(caller_key=caller, ip=ip, kind=kind,
                                half_life=self.config.get_float("reputation.half_life"),
                                v6_prefix=self.config.v6_prefix)
        except RedisUnavailable:
            self.counters["record_lost"] += 1
            return None
        self.counters[f"feedback:{kind}"] += 1
        return found

    def scanner_probe(self, source_ip: str, user_agent: str) -> ListHit | None:
        """For requests we do not score: is this a scanner? If so, remember the source."""
        hit = self.lists.is_scanner(user_agent)
        if hit is not None:
            self.counters["scanner_probe"] += 1
            try:
                self.store.note_scanner(source_ip, v6_prefix=self.config.v6_prefix)
            except RedisUnavailable:
                self.counters["record_lost"] += 1
        return hit

    def fresh(self) -> None:
        """Make sure the config is the live one before work outside INVITEs (a dialog's end):
        a process that handled no INVITE for `CONFIG_MAX_AGE` seconds -- just started, say,
        or Kamailio's timer process -- looks at the versions first (one round trip); a busy
        one learns them from every INVITE's reply and pays nothing."""
        if time.monotonic() - self._checked_at >= CONFIG_MAX_AGE:
            self.sync()

    def _refresh(self, signals: Signals) -> None:
        self._checked_at = time.monotonic()
        if signals.config_version != self.config.version:
            try:
                self.config = self.store.fetch_config()
                log.info("config version %d loaded", self.config.version)
            except Exception as exc:  # keep scoring with the config we have
                self.counters["config_reload_failed"] += 1
                log.warning("config reload failed: %r", exc)
        if signals.lists_version != self.lists.version:
            try:
                self.lists = self.store.fetch_lists()
                log.info("lists version %d loaded", self.lists.version)
            except Exception as exc:  # keep scoring with the lists we have
                self.counters["lists_reload_failed"] += 1
                log.warning("lists reload failed: %r", exc)

    def _check_failed(self, name: str, exc: BaseException) -> None:
        self.counters[f"check_error:{name}"] += 1
