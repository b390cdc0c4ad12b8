"""Plain data that crosses the boundary between Kamailio (kemi/) and the engine.

Nothing here knows about KSR or Redis: the KEMI layer fills a `CallAttempt`, the store
fills `Signals`, the engine returns a `Decision`. Keeping these as frozen dataclasses makes the
engine a pure function that unit tests can drive without any process around it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Action(enum.StrEnum):
    """What the proxy does with an initial INVITE."""

    RELAY = "relay"
    DIVERT = "divert"
    REJECT = "reject"


@dataclass(frozen=True, slots=True)
class CallAttempt:
    """An initial INVITE, reduced to the fields the checks look at.

    Strings are already bounded and decoded by the KEMI layer (see `kemi.attempt`); a field the
    message did not carry is the empty string.
    """

    call_id: str
    source_ip: str
    source_port: int = 0
    transport: str = "udp"
    from_uri: str = ""
    from_user: str = ""
    from_domain: str = ""
    from_display: str = ""
    to_uri: str = ""
    to_user: str = ""
    request_uri: str = ""
    ruri_user: str = ""
    ruri_domain: str = ""
    pai: str = ""
    user_agent: str = ""
    contact: str = ""
    has_identity: bool = False
    has_alert_info: bool = False
    has_sdp: bool = False
    identity: str = ""  # raw Identity header(s) (RFC 8224), bounded to 4097 characters
    alert_info: str = ""  # raw Alert-Info header(s), bounded
    call_info: str = ""  # raw Call-Info header(s), bounded
    pass_token: str = ""  # X-Spitwall-Pass from the answering machine's REFER, bounded

    @property
    def caller_key(self) -> str:
        """Identity of the caller for per-caller counters and reputation: `tel:DIGITS` when
        the From user is a phone number (so a number keeps its history across domains and
        gateways), else `user@domain`, lower-cased."""
        return caller_identity(self.from_user, self.from_domain)

    @property
    def callee_key(self) -> str:
        """Identity of the callee used for per-callee counters (Request-URI user@domain)."""
        return f"{self.ruri_user}@{self.ruri_domain}".lower()


@dataclass(frozen=True, slots=True)
class Signals:
    """Shared-state readings for one INVITE, returned by the store's single round trip.

    Counts already include the current INVITE. `recent_callees` is the bounded list of the
    Request-URI users most recently called from the same source IP (newest first).
    """

    ip_rate: dict[int, float] = field(default_factory=dict)
    caller_rate: dict[int, float] = field(default_factory=dict)
    callee_rate: dict[int, float] = field(default_factory=dict)
    distinct_callers: int = 0
    distinct_callees: int = 0
    recent_callees: tuple[str, ...] = ()
    scanner_hits: int = 0
    reputation_caller: float = 0.0  # stored spam reputation in [0, 1] (0 = clean/unknown)
    reputation_caller_t: float = 0.0  # when it was last updated (decay is applied by the check)
    reputation_ip: float = 0.0
    reputation_ip_t: float = 0.0
    config_version: int = 0
    lists_version: int = 0
    available: bool = True
    pass_first_use: bool = False  # this INVITE's pass token had not been used before
    watched: tuple[str | None, ...] = ()  # values of `Store.watch_keys`, same order
    #: number database hits of the caller's numbers (`numbers.lookup`): (list, number, record)
    numbers: tuple[tuple[str, str, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One check's opinion: a score in [0, 1] and a short reason for operators.

    `decisive` is set by list checks: ALLOW relays without scoring, BLOCK rejects.
    """

    name: str
    score: float
    reason: str = ""
    decisive: Action | None = None
    error: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.score <= 1.0:
            raise ValueError(f"check {self.name}: score {self.score} outside [0, 1]")


@dataclass(frozen=True, slots=True)
class Contribution:
    """A check's result with its weight, as shown by `spitwall explain`."""

    name: str
    score: float
    weight: float
    reason: str

    @property
    def value(self) -> float:
        return self.score * self.weight


@dataclass(frozen=True, slots=True)
class Decision:
    """The engine's verdict on one INVITE, with every check's contribution."""

    action: Action
    score: float
    contributions: tuple[Contribution, ...] = ()
    rule: str = "score"
    degraded: bool = False
    #: monitor mode (`mode=monitor`): what scoring decided and was not applied (the call
    #: was relayed); None when the decision was applied
    would: Action | None = None
    #: a relayed call's label, the Call-Info value it goes on with (`scoring.label`); ''
    #: when not labelled
    label: str = ""
    #: why `would` was not applied: "monitor" (mode=monitor) or "optout: <entry>" (the
    #: callee opted out of screening); '' when the decision was applied
    waived: str = ""

    def reasons(self) -> list[str]:
        return [f"{c.name}: {c.reason}" for c in self.contributions if c.reason]

    @property
    def waiver(self) -> str:
        """What kept `would` from being applied: "monitor", "optout", or '' (applied)."""
        if self.would is None:
            return ""
        return self.waived.split(":", 1)[0] or "monitor"


def caller_identity(user: str, domain: str = "") -> str:
    """`tel:DIGITS` for numeric users ('+1 555...' and '1555...' agree), else user@domain."""
    digits = user[1:] if user.startswith("+") else user
    if digits.isascii() and digits.isdigit() and 3 <= len(digits) <= 20:
        return "tel:" + digits
    return f"{user}@{domain}".lower()


def pack_dialog_note(diverted: bool, source_ip: str, caller_key: str) -> str:
    """What the proxy keeps in one dialog variable for the call-end feedback:
    ``D|IP|CALLER`` (D is 1 for a diverted call; the IP has no '|', the caller comes last)."""
    return f"{1 if diverted else 0}|{source_ip}|{caller_key[:256]}"


def unpack_dialog_note(text: str) -> tuple[bool, str, str]:
    """(diverted, source IP, caller key) of `pack_dialog_note`; a malformed or missing note
    reads as diverted (no feedback: the safe default)."""
    flag, sep1, rest = text.partition("|")
    ip, sep2, caller = rest.partition("|")
    if not (sep1 and sep2) or flag not in ("0", "1"):
        return True, "", ""
    return flag == "1", ip, caller
