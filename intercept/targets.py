"""Provisioned intercept and recording targets: the record, identity matching, the snapshot.

A target record says *who* (one or more identities: SIP URI user@domain and/or E.164 number),
*which side* (as caller, as callee or both), *when* (validity window), *where to* (the SIP URI
of the recorder or mediation function to PUBLISH to, or ``subscribe`` for the LIID's
subscribers), *to whom* (the recipient certificate events are encrypted to) and *what*
(keys, call events). Identities are normalised exactly as the scoring layer names callers
(`scoring.model.caller_identity`): ``tel:DIGITS`` for numbers, ``user@domain`` otherwise, so a
target number matches whatever domain or ``+`` prefix the call uses.

Pure: the proxy builds a `TargetSnapshot` from the Redis hash when the version changes and
matches each call in memory (no round trip).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from scoring.model import caller_identity

RECORD_VERSION = 1
MODES = ("intercept", "recording")
SIDES = ("caller", "callee")
DELIVERABLES = ("keys", "events")
SUBSCRIBE = "subscribe"
#: transports a delivery destination may name (`delivery_transport`)
DELIVERY_TRANSPORTS = ("udp", "tcp", "tls")

_LIID = re.compile(r"[A-Za-z0-9._\-]{1,64}")
_NUMBER = re.compile(r"\+?[0-9]{3,20}")
_USER = re.compile(r"[A-Za-z0-9\-_.!~*'()&=+$,;?/%]{1,128}")
_HOST = re.compile(r"[A-Za-z0-9.\-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]")
_DELIVER_URI = re.compile(
    r"sips?:(?:[A-Za-z0-9\-_.!~*'()&=+$,;?/%]{1,128}@)?"
    r"(?:[A-Za-z0-9.\-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?(?:;[A-Za-z0-9=\-_.]{1,64})*"
)


def _show(text: object, limit: int = 60) -> str:
    s = repr(text)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def normalise_identity(text: str) -> str:
    """A target identity as given by the operator -> the form calls are matched on.

    Accepts ``+15551230001``, ``15551230001``, ``tel:+15551230001``, ``sip:alice@example.com``,
    ``sips:...``, ``alice@example.com``. `ValueError` for anything else."""
    if not isinstance(text, str):
        raise ValueError(f"target must be text, not {type(text).__name__}")
    t = text.strip()
    low = t.lower()
    if low.startswith("tel:"):
        num = t[4:].split(";", 1)[0].replace("-", "").replace(".", "")
        if not _NUMBER.fullmatch(num):
            raise ValueError(f"target {_show(text)}: tel: URI must hold a number of 3-20 digits")
        return caller_identity(num)
    if _NUMBER.fullmatch(t.replace(" ", "").replace("-", "")):
        return caller_identity(t.replace(" ", "").replace("-", ""))
    if low.startswith(("sip:", "sips:")):
        t = t.split(":", 1)[1]
    t = t.split(";", 1)[0]
    if t.startswith("<") or ">" in t:
        raise ValueError(f"target {_show(text)}: give a bare URI, not a name-addr")
    user, at, hostport = t.rpartition("@")
    host = hostport.split("]", 1)[0] + "]" if hostport.startswith("[") else \
        hostport.split(":", 1)[0]
    if not at or not _USER.fullmatch(user) or not _HOST.fullmatch(host):
        raise ValueError(f"target {_show(text)} is neither a number nor a SIP URI user@domain")
    return caller_identity(user, host)


def unpack_record(blob: bytes, version: int, what: str) -> dict[str, Any]:
    """A versioned msgpack record (dict with "v") -> the dict; `ValueError` names `what`."""
    try:
        d = msgpack.unpackb(blob, raw=False)
    except (ValueError, msgpack.ExtraData) as exc:
        raise ValueError(f"{what} record is not msgpack: {exc}") from None
    if not isinstance(d, dict) or d.get("v") != version:
        raise ValueError(f"unknown {what} record version")
    return d


def check_liid(liid: str) -> str:
    if not isinstance(liid, str) or not _LIID.fullmatch(liid):
        raise ValueError(f"LIID {_show(liid)} must be 1-64 characters of A-Z a-z 0-9 . _ -")
    return liid


def delivery_transport(scheme: str, transport: str | None) -> str | None:
    """The transport a destination URI asks for: ``udp``, ``tcp`` or ``tls``; None when a
    ``sip:`` URI names none (the delivery worker then picks UDP, or TCP for a large request).

    ``sips:`` is TLS (RFC 3261 26.2; with ``;transport=tcp`` too, RFC 5630), and so is the
    deprecated but common ``;transport=tls``. `ValueError` for a transport the worker does not
    speak (sctp, ws, ...) and for ``sips:`` over UDP."""
    scheme = scheme.lower()
    value = transport.lower() if transport is not None else None
    if value is not None and value not in DELIVERY_TRANSPORTS:
        raise ValueError(f"transport {_show(value, 20)} is not one of "
                         f"{', '.join(DELIVERY_TRANSPORTS)}")
    if scheme == "sips":
        if value == "udp":
            raise ValueError("a sips: URI cannot be reached over UDP")
        return "tls"
    return value


def _uri_transport(uri: str) -> str | None:
    """The ``transport`` parameter of a URI that matched `_DELIVER_URI` (None: absent)."""
    hostpart = uri.split(":", 1)[1].rpartition("@")[2]  # the user part may hold ';'
    found: str | None = None
    for param in hostpart.split(";")[1:]:
        name, _, value = param.partition("=")
        if name.lower() == "transport":
            if found is not None:
                raise ValueError("more than one transport parameter")
            found = value
    return found


def check_deliver_to(uri: str) -> str:
    """A provisioned destination: ``subscribe``, or a ``sip:``/``sips:`` URI whose transport
    (if any) the delivery worker speaks: ``;transport=udp|tcp|tls``."""
    if uri == SUBSCRIBE:
        return uri
    if not isinstance(uri, str) or not _DELIVER_URI.fullmatch(uri):
        raise ValueError(f"delivery destination {_show(uri)} is not a SIP URI "
                         f"(sip:[user@]host[:port] or sips:...) or '{SUBSCRIBE}'")
    try:
        delivery_transport(uri.split(":", 1)[0], _uri_transport(uri))
    except ValueError as exc:
        raise ValueError(f"delivery destination {_show(uri)}: {exc}") from None
    return uri


def check_certificate(pem: bytes) -> x509.Certificate:
    """The recipient certificate: PEM X.509 with an RSA key (what S/MIME enveloping needs)."""
    try:
        cert = x509.load_pem_x509_certificate(bytes(pem))
    except (ValueError, TypeError):
        raise ValueError("recipient certificate is not a PEM X.509 certificate") from None
    if not isinstance(cert.public_key(), rsa.RSAPublicKey):
        raise ValueError("recipient certificate must carry an RSA key (S/MIME key transport)")
    return cert


@dataclass(frozen=True)
class Target:
    """One provisioned case (LIID) for one or more identities."""

    liid: str
    identities: tuple[str, ...]  # normalised (`normalise_identity`)
    deliver_to: str
    cert_pem: bytes
    start: float
    end: float | None = None
    sides: tuple[str, ...] = SIDES
    deliver: tuple[str, ...] = DELIVERABLES
    mode: str = "intercept"
    given: tuple[str, ...] = ()  # identities as the operator typed them (for `show`)
    created_at: float = 0.0
    created_by: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_liid(self.liid)
        if not self.identities:
            raise ValueError("a target needs at least one identity")
        check_deliver_to(self.deliver_to)
        if self.mode not in MODES:
            raise ValueError(f"mode {_show(self.mode)} is not one of {', '.join(MODES)}")
        if not self.sides or any(s not in SIDES for s in self.sides):
            raise ValueError(f"match sides {_show(self.sides)} must be from {', '.join(SIDES)}")
        if not self.deliver or any(d not in DELIVERABLES for d in self.deliver):
            raise ValueError(f"deliver {_show(self.deliver)} must be from "
                             f"{', '.join(DELIVERABLES)}")
        if self.end is not None and self.end <= self.start:
            raise ValueError("end time must be after start time")

    def active(self, now: float) -> bool:
        return self.start <= now and (self.end is None or now < self.end)

    def pack(self) -> bytes:
        blob: bytes = msgpack.packb({
            "v": RECORD_VERSION, "liid": self.liid, "ids": list(self.identities),
            "given": list(self.given), "to": self.deliver_to, "cert": self.cert_pem,
            "start": self.start, "end": self.end, "sides": list(self.sides),
            "deliver": list(self.deliver), "mode": self.mode, "at": self.created_at,
            "by": self.created_by,
        }, use_bin_type=True)
        return blob

    @classmethod
    def unpack(cls, blob: bytes) -> Target:
        d = unpack_record(blob, RECORD_VERSION, "target")
        try:
            return cls(
                liid=d["liid"], identities=tuple(d["ids"]), deliver_to=d["to"],
                cert_pem=bytes(d["cert"]), start=float(d["start"]),
                end=None if d["end"] is None else float(d["end"]), sides=tuple(d["sides"]),
                deliver=tuple(d["deliver"]), mode=d["mode"], given=tuple(d.get("given", ())),
                created_at=float(d.get("at", 0.0)), created_by=str(d.get("by", "")),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"target record incomplete: {exc!r}") from None


def unpack_targets(raw: Mapping[Any, bytes]) -> tuple[list[Target], list[tuple[Any, ValueError]]]:
    """The readable records of the TARGETS hash, and (field, error) for each other one."""
    good: list[Target] = []
    bad: list[tuple[Any, ValueError]] = []
    for key, blob in raw.items():
        try:
            good.append(Target.unpack(blob))
        except ValueError as exc:
            bad.append((key, exc))
    return good, bad


@dataclass(frozen=True)
class Match:
    """A call matched a target: which case, and which side of the call the target is on."""

    target: Target
    side: str  # caller | callee


class TargetSnapshot:
    """All targets, indexed by identity, for in-memory matching on every call."""

    def __init__(self, targets: Iterable[Target] = (), version: int = 0) -> None:
        self.version = version
        self.targets = tuple(targets)
        self._by_id: dict[str, list[Target]] = {}
        for t in self.targets:
            for ident in t.identities:
                self._by_id.setdefault(ident, []).append(t)

    def __len__(self) -> int:
        return len(self.targets)

    @classmethod
    def from_hash(cls, raw: Mapping[Any, bytes], version: int) -> tuple[TargetSnapshot,
                                                                              list[str]]:
        """Build from the TARGETS hash; unreadable records are skipped and reported."""
        good, bad = unpack_targets(raw)
        return cls(good, version), [f"target {_show(key)}: {exc}" for key, exc in bad]

    def match(self, caller_ids: Iterable[str], callee_ids: Iterable[str],
              now: float) -> list[Match]:
        """Active targets among the call's caller and callee identities (each LIID once;
        a call between two targets of the same case matches as caller)."""
        if not self._by_id:
            return []
        found: dict[str, Match] = {}
        for side, ids in (("caller", caller_ids), ("callee", callee_ids)):
            for ident in ids:
                for t in self._by_id.get(ident, ()):
                    if side in t.sides and t.active(now) and t.liid not in found:
                        found[t.liid] = Match(t, side)
        return list(found.values())
