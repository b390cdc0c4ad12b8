"""Live configuration: the operator's knobs, their types, ranges and defaults.

The config lives in the Redis hash `spitwall:{cfg}:config` as strings (what the operator typed);
`spitwall:{cfg}:version` is bumped on every change. Kamailio children hold a parsed `Config` and
learn about a new version from the reply of the per-INVITE script, so a change takes effect on
the next call without an extra round trip per call. Values that fail validation are refused by
the CLI; a bad value that still reaches Redis (hand edit) is ignored with a logged error, and the
default is used, so a typo never takes the proxy down.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from scoring.emergency import parse_numbers

_HEADER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9\-]{0,63}$")


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _header(text: str) -> str:
    text = text.strip()
    if text and not _HEADER_NAME.match(text):
        raise ValueError(f"not a SIP header name: {text!r}")
    return text


@dataclass(frozen=True)
class Param:
    """One knob: its parser, default, bounds and a line of help."""

    name: str
    kind: str  # bool | float | int | str | choice
    default: Any
    help: str
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] = ()
    validator: Callable[[str], Any] | None = None

    def parse(self, text: str) -> Any:
        if not isinstance(text, str):
            raise ValueError(f"{self.name}: expected text")
        value: Any
        try:
            if self.kind == "bool":
                value = _bool(text)
            elif self.kind == "float":
                value = float(text)
                if value != value:  # NaN
                    raise ValueError("NaN")
            elif self.kind == "int":
                value = int(text, 10)
            elif self.kind == "header":
                value = _header(text)
            elif self.kind == "choice":
                value = text.strip().lower()
                if value not in self.choices:
                    raise ValueError(f"expected one of {', '.join(self.choices)}")
            elif self.validator is not None:
                value = self.validator(text)
            else:
                value = text
        except ValueError as exc:
            raise ValueError(f"{self.name}: invalid value {text!r}: {exc}") from None
        if self.lo is not None and value < self.lo:
            raise ValueError(f"{self.name}: {value} is below the minimum {self.lo:g}")
        if self.hi is not None and value > self.hi:
            raise ValueError(f"{self.name}: {value} is above the maximum {self.hi:g}")
        return value


CHECKS = ("rate_ip", "rate_caller", "rate_callee", "distinct_callers", "sweep", "scanner",
          "reputation", "callerid", "stir", "geoip", "ring_hijack")

_DEFAULT_WEIGHTS = {
    "rate_ip": 0.35,
    "rate_caller": 0.35,
    "rate_callee": 0.25,
    "distinct_callers": 0.5,
    "sweep": 0.5,
    "scanner": 1.0,
    "reputation": 0.6,
    "callerid": 0.4,
    "stir": 0.4,
    "geoip": 0.3,
    "ring_hijack": 0.2,
}


def _abs_path(text: str) -> str:
    t = text.strip()
    if t and not t.startswith("/"):
        raise ValueError("expected an absolute path (or empty to switch it off)")
    return t


def _region(text: str) -> str:
    t = text.strip().upper()
    if not re.fullmatch(r"[A-Z]{2}", t):
        raise ValueError("expected an ISO 3166-1 alpha-2 region code such as US or DE")
    return t


def parse_country_scores(text: str) -> dict[str, float]:
    """'KP:1,XX:0.5' -> {'KP': 1.0, 'XX': 0.5}; scores in [0, 1]."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        code, sep, num = part.partition(":")
        code = code.strip().upper()
        if not sep or not re.fullmatch(r"[A-Z]{2}", code):
            raise ValueError(f"expected CC:SCORE pairs, got {part!r}")
        score = float(num)
        if not 0.0 <= score <= 1.0:
            raise ValueError(f"score for {code} must be within [0, 1]")
        out[code] = score
    return out


def _country_scores(text: str) -> str:
    parse_country_scores(text)
    return ",".join(p.strip().upper() for p in text.split(",") if p.strip())


def parse_hosts(text: str) -> tuple[str, ...]:
    """Comma-separated host names (lower-cased)."""
    hosts = tuple(h.strip().lower() for h in text.split(",") if h.strip())
    for h in hosts:
        if not re.fullmatch(r"[a-z0-9.\-]{1,253}(:[0-9]{1,5})?", h):
            raise ValueError(f"not a host name: {h!r}")
    return hosts


def _hosts(text: str) -> str:
    return ",".join(parse_hosts(text))


def _secret(text: str) -> str:
    t = text.strip()
    if t and (len(t) < 16 or len(t) > 256 or not t.isprintable()):
        raise ValueError("expected 16-256 printable characters (or empty to switch tokens off)")
    return t


SECRET_KEYS = ("media.token_key",)


def _http_url(text: str) -> str:
    t = text.strip()
    if t and (not re.fullmatch(r"https?://[^\s<>\"]{1,500}", t)):
        raise ValueError("expected an http(s) URL without spaces, quotes or <>")
    return t


def _label_url(text: str) -> str:
    t = text.strip()
    if t == "data:,":
        return t
    if not t or not re.fullmatch(r"https?://[^\s<>\"]{1,500}", t):
        raise ValueError("expected an http(s) URL without spaces, quotes or <>, or data:,")
    return t


def _label_params(text: str) -> str:
    t = text.strip().strip(";")
    token = r"[A-Za-z0-9.!%*_+`'~-]+"
    if not re.fullmatch(rf"{token}(={token})?(;{token}(={token})?)*", t) or len(t) > 200:
        raise ValueError("expected header parameters like purpose=info;type=spam")
    if "purpose=" not in t.lower():
        raise ValueError("a Call-Info label needs a purpose parameter (purpose=info)")
    if "confidence=" in t.lower():
        raise ValueError("confidence is added from the call's score; leave it out")
    return t


def _emergency_numbers(text: str) -> str:
    return ",".join(sorted(parse_numbers(text)))


def _params() -> dict[str, Param]:
    p: list[Param] = [
        Param("enabled", "bool", True, "kill switch: false relays every call unscored"),
        Param("mode", "choice", "enforce",
              "enforce: apply decisions; monitor: score, record and count every call as "
              "usual but relay it (block-listed callers are still rejected), for roll-out "
              "and tuning", choices=("enforce", "monitor")),
        Param("emergency.numbers", "str", "112,911",
              "short codes of emergency services (comma-separated digits): calls to them, and "
              "to urn:service:sos, are relayed unscored whatever the lists say",
              validator=_emergency_numbers),
        Param("divert_threshold", "float", 0.3, "score at or above which calls are diverted",
              0.0, 1.0),
        Param("reject_threshold", "float", 0.7, "score at or above which calls are rejected",
              0.0, 1.0),
        Param("reject_code", "choice", "603", "SIP status for rejects: 603 or 608 (RFC 8688)",
              choices=("603", "608")),
        Param("score_header", "header", "X-Spitwall-Score",
              "header added to relayed INVITEs; empty disables it"),
        Param("rate.short_window", "int", 10, "short rate window, seconds", 1, 3600),
        Param("rate.long_window", "int", 300, "long rate window, seconds", 1, 86400),
        Param("distinct.window", "int", 300,
              "window for distinct callers/callees per source IP, seconds", 10, 86400),
        Param("sweep.recent", "int", 20, "callees remembered per source for the sequence test",
              5, 100),
        Param("sweep.sequential_min", "int", 5,
              "sequential callee numbers from one source that count as war dialling", 3, 100),
        Param("scanner.non_invite", "choice", "drop",
              "what to do with non-INVITE requests from scanner User-Agents",
              choices=("drop", "reject", "ignore")),
        Param("flood.check", "bool", True,
              "drop, before scoring and unanswered, the requests of a source sending more than "
              "FLOOD_DENSITY per 2 s (Kamailio's pike; trusted and allow-listed sources never)"),
        Param("label.threshold", "float", 1.0,
              "relayed calls scoring at least this get a Call-Info label (spam likely, with "
              "the score as confidence); 1.0 labels none", 0.0, 1.0),
        Param("label.info_url", "str", "data:,",
              "URI of the label's Call-Info (a page about the label; data:, for none)",
              validator=_label_url),
        Param("label.params", "str", "purpose=info;type=spam",
              "the label's Call-Info parameters before ;confidence=N "
              "(draft-ietf-sipcore-callinfo-spam)", validator=_label_params),
        Param("reject.call_info_url", "str", "",
              "608 only: URL of the operator's jCard for the Call-Info header (RFC 8688)",
              validator=_http_url),
        Param("source.ipv6_prefix", "int", 64,
              "IPv6 sources are counted (rates, distinct callers, sweeps, scanner sightings, "
              "reputation) per network of this many bits", 32, 128),
        Param("numbers.lookup", "bool", False,
              "look the caller's numbers up in the number database (`spitwall numbers`) in "
              "the INVITE's round trip; `numbers import` and `numbers add` turn it on"),
        Param("reputation.half_life", "float", 3 * 86400.0,
              "seconds for a reputation to decay to half", 60.0, 365 * 86400.0),
        Param("reputation.call_duration", "bool", True,
              "track answered calls (Kamailio's dialog module) to feed their duration into "
              "reputation; false saves the dialog tracking's cost per call"),
        Param("reputation.short_call", "float", 6.0,
              "answered calls shorter than this (s) count as a spam signal", 0.0, 600.0),
        Param("reputation.long_call", "float", 60.0,
              "answered calls longer than this (s) count as a good signal", 1.0, 86400.0),
        Param("reputation.report_uri_user", "str", "spam-report",
              "user part of the URI that in-call reports (SIP MESSAGE) are sent to"),
        Param("reputation.feature_code", "str", "*66",
              "dialled code that reports the last caller as spam ('' disables)"),
        Param("callerid.region", "str", "US", "numbering plan region for national numbers",
              validator=_region),
        Param("callerid.neighbour_digits", "int", 6,
              "leading digits a caller must share with the callee to count as neighbour spoofing",
              3, 12),
        Param("stir.trust_dir", "str", "", "directory of trusted STI CA certificates (PEM)",
              validator=_abs_path),
        Param("stir.max_age", "int", 60, "PASSporT iat freshness, seconds", 5, 3600),
        Param("stir.absent_score", "float", 0.25, "score of a call without Identity header",
              0.0, 1.0),
        Param("stir.x5u_hosts", "str", "", "hosts certificates may be fetched from (x5u)",
              validator=_hosts),
        Param("geoip.database", "str", "", "MaxMind-format country database ('' = off)",
              validator=_abs_path),
        Param("geoip.country_scores", "str", "", "per-country scores, e.g. 'KP:1,XX:0.5'",
              validator=_country_scores),
        Param("media.token_key", "str", "",
              "HMAC key shared by proxy and answering machine for pass tokens (>= 16 chars)",
              validator=_secret),
        Param("media.token_ttl", "int", 60, "seconds a pass token is valid", 5, 3600),
        Param("media.captcha", "choice", "unsure", "DTMF CAPTCHA: off, on unsure verdicts, always",
              choices=("off", "unsure", "always")),
        Param("media.max_call_seconds", "int", 90, "answering machine session limit", 10, 3600),
        Param("media.fallback", "choice", "relay",
              "a diverted call the answering machine cannot take (down, overloaded, refused): "
              "relay it to the callee (fail-open) or reject it with the machine's failure",
              choices=("relay", "reject")),
        Param("media.timeout", "float", 2.0,
              "seconds without any reply from the answering machine before it counts as down",
              0.5, 30.0),
        Param("media.record_seconds", "int", 30, "longest message recorded", 5, 600),
        Param("media.queue_max_items", "int", 10000, "spam + voicemail queue bound (oldest go)",
              10, 10_000_000),
        Param("ring_hijack.strip", "bool", True,
              "remove caller-supplied Alert-Info and ring-tone Call-Info from untrusted calls"),
        Param("li.recording_indication", "bool", False,
              "recording-mode targets only (never intercept): tell both parties the call is "
              "recorded with a=record:on (RFC 7866) in every SDP of the call"),
        Param("li.uniform", "bool", True,
              "while any intercept/recording target exists, every relayed call takes the "
              "intercept path's reply route and markers, so a target's call differs only by its "
              "note (timing: docs/benchmarks.md#intercept)"),
    ]
    for check in CHECKS:
        p.append(Param(f"weight.{check}", "float", _DEFAULT_WEIGHTS[check],
                       f"weight of the {check} check", 0.0, 10.0))
    # Ramp parameters: score 0 at or below `soft`, 1 at or above `hard`, linear between.
    ramps = {
        "rate_ip.short": (5, 20), "rate_ip.long": (60, 300),
        "rate_caller.short": (3, 10), "rate_caller.long": (20, 100),
        "rate_callee.short": (3, 10), "rate_callee.long": (20, 100),
        "distinct_callers": (3, 10),
        "sweep": (8, 30),
    }
    for stem, (soft, hard) in ramps.items():
        p.append(Param(f"{stem}.soft", "float", float(soft), f"{stem}: count where scoring starts",
                       0.0, 1e9))
        p.append(Param(f"{stem}.hard", "float", float(hard), f"{stem}: count that scores 1.0",
                       0.0, 1e9))
    return {x.name: x for x in p}


PARAMS: dict[str, Param] = _params()


def _cross_check(values: Mapping[str, Any]) -> None:
    """Constraints between knobs; raises ValueError naming the conflict."""
    if values["divert_threshold"] > values["reject_threshold"]:
        raise ValueError(
            f"divert_threshold ({values['divert_threshold']:g}) must not exceed "
            f"reject_threshold ({values['reject_threshold']:g})"
        )
    if values["rate.short_window"] >= values["rate.long_window"]:
        raise ValueError("rate.short_window must be shorter than rate.long_window")
    for name, v in values.items():
        if name.endswith(".soft"):
            hard = values[name[: -len(".soft")] + ".hard"]
            if v >= hard:
                raise ValueError(f"{name} ({v:g}) must be below {name[:-5]}.hard ({hard:g})")


class Config:
    """A parsed, validated snapshot of the live config."""

    __slots__ = ("_values", "errors", "version")

    def __init__(self, values: Mapping[str, Any], version: int = 0,
                 errors: tuple[str, ...] = ()) -> None:
        self._values = dict(values)
        self.version = version
        self.errors = errors

    @classmethod
    def defaults(cls) -> Config:
        return cls({k: p.default for k, p in PARAMS.items()})

    @classmethod
    def from_raw(cls, raw: Mapping[str, str], version: int = 0) -> Config:
        """Parse the Redis hash; unknown or invalid entries fall back to defaults."""
        values = {k: p.default for k, p in PARAMS.items()}
        errors: list[str] = []
        for key, text in raw.items():
            param = PARAMS.get(key)
            if param is None:
                errors.append(f"unknown key {key!r} ignored")
                continue
            try:
                values[key] = param.parse(text)
            except ValueError as exc:
                errors.append(str(exc))
        try:
            _cross_check(values)
        except ValueError as exc:
            errors.append(f"{exc}; using defaults for thresholds and ramps")
            for key, p in PARAMS.items():
                if key.endswith((".soft", ".hard", "_threshold", "_window")):
                    values[key] = p.default
        return cls(values, version, tuple(errors))

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def get_float(self, key: str) -> float:
        return float(self._values[key])

    def weight(self, check: str) -> float:
        return float(self._values.get(f"weight.{check}", 0.0))

    def as_dict(self) -> dict[str, Any]:
        return dict(self._values)

    @property
    def rate_windows(self) -> tuple[int, int]:
        return (int(self["rate.short_window"]), int(self["rate.long_window"]))

    @property
    def v6_prefix(self) -> int:
        return int(self["source.ipv6_prefix"])


def validate_change(current_raw: Mapping[str, str], key: str, text: str) -> Any:
    """Validate `key = text` against the current config; return the parsed value.

    Raises ValueError with a one-line message when the key is unknown, the value is out of
    range, or the change would contradict another knob (e.g. divert above reject).
    """
    param = PARAMS.get(key)
    if param is None:
        close = [k for k in PARAMS if k.split(".")[-1] == key.split(".")[-1]][:3]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"unknown config key {key!r}{hint}; see 'spitwall config show'")
    value = param.parse(text)
    merged = strict_values(current_raw)
    merged[key] = value
    _cross_check(merged)
    return value


def strict_values(raw: Mapping[str, str]) -> dict[str, Any]:
    """Defaults overlaid with each stored override, without the cross-check fallback of
    `Config.from_raw` (unknown or unparseable stored values are skipped)."""
    values = {k: p.default for k, p in PARAMS.items()}
    for k, text in raw.items():
        p = PARAMS.get(k)
        if p is None:
            continue
        try:
            values[k] = p.parse(text)
        except ValueError:
            continue
    return values


def check_values(values: Mapping[str, Any]) -> None:
    """Raise ValueError when knobs contradict each other."""
    _cross_check(values)


Parser = Callable[[str], Any]
