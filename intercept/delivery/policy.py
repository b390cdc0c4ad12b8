"""Pure delivery rules: back-off, subscription expiry, the recorder allow-list, subscription state.

Why pure: these decide when an event is given up (dead letter), how long a recorder may stay
subscribed, and who may subscribe at all. They are tested without a network or Redis, and the
worker only wires them to sockets and streams.
"""

from __future__ import annotations

import ipaddress
import math
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import msgpack

from intercept.delivery import digest

SUBSCRIPTION_VERSION = 1

# --------------------------------------------------------------------------- back-off


def backoff_delay(
    attempt: int, base: float, cap: float, *, jitter: float = 0.0,
    rand: Callable[[], float] = random.random,
) -> float:  # fmt: skip
    """Seconds to wait after failed attempt number ``attempt`` (1-based) before the next one:
    ``base * 2**(attempt-1)``, at most ``cap``; ``jitter`` (0..1) spreads it by +-that fraction
    so that many workers retrying one recorder do not beat in step."""
    if attempt < 1:
        raise ValueError("attempt numbers start at 1")
    if base < 0 or cap < 0 or not 0.0 <= jitter <= 1.0:
        raise ValueError("need base >= 0, cap >= 0 and 0 <= jitter <= 1")
    delay = min(cap, base * 2.0 ** min(attempt - 1, 62))
    if jitter:
        delay *= 1.0 + jitter * (2.0 * rand() - 1.0)
    return max(0.0, delay)


def backoff_schedule(max_attempts: int, base: float, cap: float) -> list[float]:
    """The waits between ``max_attempts`` attempts (``max_attempts - 1`` values, no jitter)."""
    return [backoff_delay(n, base, cap) for n in range(1, max_attempts)]


def give_up_after(max_attempts: int, base: float, cap: float, attempt_timeout: float) -> float:
    """Worst-case seconds from the first attempt until an unreachable event is dead-lettered:
    every attempt runs into the transaction timeout, plus every back-off wait."""
    return max_attempts * attempt_timeout + sum(backoff_schedule(max_attempts, base, cap))


# --------------------------------------------------------------------------- expiry


class IntervalTooBrief(ValueError):
    """RFC 6665 4.2.1.1: the requested duration is shorter than we accept (423 + Min-Expires)."""

    def __init__(self, minimum: int) -> None:
        super().__init__(f"subscription duration below the minimum of {minimum} s")
        self.minimum = minimum


def grant_expires(requested: str | None, *, default: int, minimum: int, maximum: int) -> int:
    """The duration granted for a SUBSCRIBE's ``Expires`` (seconds; 0 = unsubscribe).

    No header: the package default. Longer than ``maximum``: shortened to it (a notifier may
    shorten, never lengthen). ``0 < requested < minimum``: `IntervalTooBrief`. Not a number:
    `ValueError` (400)."""
    if not 0 < minimum <= default <= maximum:
        raise ValueError("need 0 < minimum <= default <= maximum")
    if requested is None:
        return default
    text = requested.strip()
    if not text.isdigit() or len(text) > 10:
        raise ValueError(f"Expires {text[:20]!r} is not a number of seconds")
    value = int(text)
    if value == 0:
        return 0
    if value < minimum:
        raise IntervalTooBrief(minimum)
    return min(value, maximum)


def remaining(expires_at: float, now: float) -> int:
    """Whole seconds left (rounded up, never negative): the ``expires=`` of Subscription-State."""
    return max(0, math.ceil(expires_at - now - 1e-9))


def subscription_state(expires_at: float, now: float) -> str:
    """``active;expires=N`` while time is left, else ``terminated;reason=timeout``."""
    left = remaining(expires_at, now)
    return f"active;expires={left}" if left > 0 else "terminated;reason=timeout"


def hash_ttl(expiries: Iterable[float], now: float, margin: int = 60) -> int | None:
    """TTL for the SUBSCRIPTIONS hash: it must outlive the longest subscription, and vanish
    some time after the last one expired even if no worker is left to clean it. None: no
    subscription left (the caller deletes the fields instead)."""
    latest = max(expiries, default=None)
    if latest is None:
        return None
    return remaining(latest, now) + margin


# --------------------------------------------------------------------------- allow-list


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return value if isinstance(value, str) and value else None


@dataclass(frozen=True)
class RecorderRule:
    """One RECORDERS entry: an address ("IP", "IP:port", "[IPv6]:port" or CIDR) allowed to
    SUBSCRIBE, optionally with digest credentials and a list of LIIDs it may subscribe to."""

    address: str
    network: ipaddress.IPv4Network | ipaddress.IPv6Network
    port: int | None = None
    user: str | None = None
    ha1: str | None = None  # MD5 (RFC 2617)
    liids: tuple[str, ...] = ()  # empty: any LIID
    ha1_sha256: str | None = None  # SHA-256 (RFC 7616, RFC 8760)

    @property
    def needs_digest(self) -> bool:
        return self.ha1 is not None or self.ha1_sha256 is not None

    @property
    def ha1s(self) -> dict[str, str]:
        """Algorithm -> HA1, in order of preference (SHA-256 first): what a challenge offers."""
        found = {digest.SHA256: self.ha1_sha256, digest.MD5: self.ha1}
        return {alg: value for alg, value in found.items() if value is not None}

    @property
    def specificity(self) -> tuple[int, int]:
        """Sort key: a host with a port beats a host, which beats a wider network."""
        return (self.network.prefixlen, 1 if self.port is not None else 0)

    def matches(self, ip: str, port: int) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        if addr.version == 6 and addr.ipv4_mapped is not None and self.network.version == 4:
            addr = addr.ipv4_mapped
        return addr in self.network and (self.port is None or self.port == port)


def parse_address(text: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, int | None]:
    """``1.2.3.4``, ``1.2.3.4:5060``, ``10.0.0.0/8``, ``::1``, ``[::1]:5060``, ``fd00::/8``
    -> (network, port or None). `ValueError` otherwise."""
    t = text.strip()
    port: int | None = None
    if t.startswith("["):
        host, sep, rest = t[1:].partition("]")
        if not sep:
            raise ValueError(f"address {text!r}: unterminated '['")
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                raise ValueError(f"address {text!r}: bad port")
            port = int(rest[1:])
        t = host
    elif t.count(":") == 1:
        t, _, port_text = t.partition(":")
        if not port_text.isdigit():
            raise ValueError(f"address {text!r}: bad port")
        port = int(port_text)
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"address {text!r}: port out of range")
    try:
        network = ipaddress.ip_network(t, strict=False)
    except ValueError:
        raise ValueError(f"address {text!r} is not an IP address or CIDR network") from None
    if port is not None and network.num_addresses != 1:
        raise ValueError(f"address {text!r}: a port needs a single host, not a network")
    return network, port


def _ha1_fields(record: Mapping[Any, Any], user: str | None) -> dict[str, str | None]:
    """A record's ``ha1`` (MD5) and ``ha1_sha256`` (lower-case hex, None when absent);
    `ValueError` when one is not the right number of hex digits or there is no user."""
    hashes: dict[str, str | None] = {}
    for name, algorithm in (("ha1", digest.MD5), ("ha1_sha256", digest.SHA256)):
        value = _text(record.get(name))
        n = digest.HEX_LENGTH[algorithm]
        if value is not None:
            value = value.lower()
            if len(value) != n or user is None or any(c not in "0123456789abcdef"
                                                      for c in value):
                raise ValueError(f"{name} must be {n} hex digits, with a user")
        hashes[name] = value
    return hashes


def parse_recorders(raw: Mapping[Any, Any]) -> tuple[list[RecorderRule], list[str]]:
    """The RECORDERS hash (address -> msgpack dict with optional ``user``, ``ha1`` (MD5),
    ``ha1_sha256``, ``liids``)
    -> rules. Tolerant: a record that is not msgpack or not a dict is read as "no credentials"
    only when it is empty; otherwise it is skipped and reported (an unreadable entry must not
    silently become a password-less one)."""
    rules: list[RecorderRule] = []
    errors: list[str] = []
    for key, blob in raw.items():
        address = _text(key)
        if address is None:
            errors.append(f"recorder entry with an empty address: {key!r}")
            continue
        try:
            network, port = parse_address(address)
        except ValueError as exc:
            errors.append(str(exc))
            continue
        record: Any = {}
        if blob:
            try:
                record = msgpack.unpackb(blob, raw=False)
            except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError,
                    msgpack.StackError) as exc:
                errors.append(f"recorder {address!r}: record is not msgpack ({exc})")
                continue
        if record is None:
            record = {}
        if not isinstance(record, dict):
            errors.append(f"recorder {address!r}: record is not a map")
            continue
        user = _text(record.get("user"))
        try:
            hashes = _ha1_fields(record, user)
        except ValueError as exc:
            errors.append(f"recorder {address!r}: {exc}")
            continue
        liids_raw = record.get("liids") or ()
        if isinstance(liids_raw, str | bytes):
            liids_raw = [liids_raw]
        liids = tuple(x for x in (_text(v) for v in liids_raw) if x)
        rules.append(RecorderRule(address, network, port, user, hashes["ha1"], liids,
                                  hashes["ha1_sha256"]))
    return rules, errors


def match_recorder(rules: Iterable[RecorderRule], ip: str, port: int) -> RecorderRule | None:
    """The most specific rule that allows ``ip:port``, None when no rule does."""
    best: RecorderRule | None = None
    for rule in rules:
        if rule.matches(ip, port) and (best is None or rule.specificity > best.specificity):
            best = rule
    return best


def parse_source(value: str) -> tuple[str, int]:
    """``X-Spitwall-Source: IP:PORT`` (or ``[IPv6]:PORT``) -> (ip, port); `ValueError`."""
    network, port = parse_address(value)
    if port is None or network.num_addresses != 1:
        raise ValueError(f"source {value[:60]!r} is not IP:PORT")
    return str(network.network_address), port


# --------------------------------------------------------------------------- subscriptions


@dataclass(frozen=True)
class Subscription:
    """One accepted ``Event: srtp`` subscription: the dialog (RFC 6665 4.1.2, RFC 3261 12.1.1
    from the notifier's side) and what it receives (the LIID's ``subscribe`` events)."""

    id: str
    liid: str
    call_id: str
    local_tag: str  # our To tag
    remote_tag: str  # the subscriber's From tag
    local_uri: str  # the SUBSCRIBE's To URI: our From in NOTIFYs
    remote_uri: str  # the SUBSCRIBE's From URI: the To of NOTIFYs
    remote_target: str  # the subscriber's Contact URI: the Request-URI of NOTIFYs
    route_set: tuple[str, ...]  # Record-Route of the SUBSCRIBE, in order
    fallback: tuple[str, int]  # where the SUBSCRIBE came from (next hop if a host is a name)
    source: str  # the authorised recorder address ("ip:port")
    expires_at: float  # unix time
    event_param: str | None = None  # the Event header's id parameter, echoed in NOTIFYs
    local_cseq: int = 0
    remote_cseq: int = 0
    user: str | None = None
    created_at: float = 0.0
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def dialog(self) -> tuple[str, str]:
        return (self.call_id, self.local_tag)

    def expired(self, now: float) -> bool:
        return remaining(self.expires_at, now) <= 0

    def state(self, now: float) -> str:
        return subscription_state(self.expires_at, now)

    def refreshed(self, expires: int, now: float, remote_cseq: int) -> Subscription:
        return replace(self, expires_at=now + expires, remote_cseq=remote_cseq)

    def pack(self) -> bytes:
        blob: bytes = msgpack.packb({
            "v": SUBSCRIPTION_VERSION, "id": self.id, "liid": self.liid, "cid": self.call_id,
            "ltag": self.local_tag, "rtag": self.remote_tag, "luri": self.local_uri,
            "ruri": self.remote_uri, "target": self.remote_target, "routes": list(self.route_set),
            "fb": list(self.fallback), "src": self.source, "exp": self.expires_at,
            "ev": self.event_param, "lcseq": self.local_cseq, "rcseq": self.remote_cseq,
            "user": self.user, "at": self.created_at,
        }, use_bin_type=True)
        return blob

    @classmethod
    def unpack(cls, blob: bytes) -> Subscription:
        try:
            d = msgpack.unpackb(blob, raw=False)
        except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError,
                msgpack.StackError) as exc:
            raise ValueError(f"subscription record is not msgpack: {exc}") from None
        if not isinstance(d, dict) or d.get("v") != SUBSCRIPTION_VERSION:
            raise ValueError("unknown subscription record version")
        try:
            host, port = d["fb"]
            return cls(
                id=str(d["id"]), liid=str(d["liid"]), call_id=str(d["cid"]),
                local_tag=str(d["ltag"]), remote_tag=str(d["rtag"]), local_uri=str(d["luri"]),
                remote_uri=str(d["ruri"]), remote_target=str(d["target"]),
                route_set=tuple(str(r) for r in d["routes"]), fallback=(str(host), int(port)),
                source=str(d["src"]), expires_at=float(d["exp"]),
                event_param=None if d.get("ev") is None else str(d["ev"]),
                local_cseq=int(d.get("lcseq", 0)), remote_cseq=int(d.get("rcseq", 0)),
                user=None if d.get("user") is None else str(d["user"]),
                created_at=float(d.get("at", 0.0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"subscription record incomplete: {exc!r}") from None
