"""List entries: what an operator can allow or block, validated and normalised.

A list entry is (kind, value) with an optional expiry and reason. Values are normalised once,
here, so that matching in the request path is a set or prefix lookup, never a parse.
"""

from __future__ import annotations

import ipaddress
import re
import time
from dataclasses import dataclass

import msgpack

LIST_NAMES = ("allow", "block", "scanner", "dno", "trusted", "optout")
KINDS = ("ip", "cidr", "uri", "domain", "number", "ua", "country")

_DOMAIN = re.compile(r"^(?=.{1,253}$)([a-z0-9](?:[a-z0-9\-]{0,61}[a-z0-9])?\.)*"
                     r"[a-z0-9](?:[a-z0-9\-]{0,61}[a-z0-9])?$")
_USER = re.compile(r"^[A-Za-z0-9\-_.!~*'()&=+$,;?/%#]{1,128}$")
_COUNTRY = re.compile(r"^[A-Z]{2}$")
MAX_UA_PATTERN = 128
RECORD_VERSION = 1


def normalise_number(text: str) -> str:
    """Digits of a phone number, with a leading '+' kept: '+1 (555) 010-9999' -> '+15550109999'."""
    t = text.strip()
    plus = t.startswith("+")
    digits = "".join(ch for ch in t if ch.isdigit())
    return ("+" if plus else "") + digits


def normalise(kind: str, value: str) -> str:
    """Validate and normalise one value; raises ValueError with a precise message."""
    if kind not in KINDS:
        raise ValueError(f"unknown list kind {kind!r}; expected one of {', '.join(KINDS)}")
    v = value.strip()
    if not v:
        raise ValueError(f"empty {kind} value")
    if kind == "ip":
        try:
            return str(ipaddress.ip_address(v))
        except ValueError:
            raise ValueError(f"not an IP address: {v!r}") from None
    if kind == "cidr":
        try:
            return str(ipaddress.ip_network(v, strict=False))
        except ValueError:
            raise ValueError(f"not a CIDR network: {v!r}") from None
    if kind == "uri":
        low = v.lower()
        if low.startswith(("sip:", "sips:", "tel:")):
            low = low.split(":", 1)[1]
        if low.count("@") != 1:
            raise ValueError(f"not a SIP URI (user@domain): {v!r}")
        user, domain = low.split("@")
        if not _USER.match(user) or not _DOMAIN.match(domain.split(":")[0]):
            raise ValueError(f"not a SIP URI (user@domain): {v!r}")
        return f"{user}@{domain.split(':')[0]}"
    if kind == "domain":
        low = v.lower().rstrip(".")
        if not _DOMAIN.match(low):
            raise ValueError(f"not a domain name: {v!r}")
        return low
    if kind == "number":
        n = normalise_number(v)
        digits = n.lstrip("+")
        if not 3 <= len(digits) <= 20 or "+" in v.lstrip()[1:] or any(
            ch not in "0123456789+-(). " for ch in v
        ):
            raise ValueError(f"not a phone number: {v!r}")
        return n
    if kind == "ua":
        if len(v) > MAX_UA_PATTERN:
            raise ValueError(f"User-Agent pattern longer than {MAX_UA_PATTERN} characters")
        if any(ord(ch) < 32 for ch in v):
            raise ValueError("User-Agent pattern contains control characters")
        return v.lower()
    # country
    up = v.upper()
    if not _COUNTRY.match(up):
        raise ValueError(f"not an ISO 3166-1 alpha-2 country code: {v!r}")
    return up


def check_list_name(name: str) -> str:
    if name not in LIST_NAMES:
        raise ValueError(f"unknown list {name!r}; expected one of {', '.join(LIST_NAMES)}")
    return name


@dataclass(frozen=True, slots=True)
class ListEntry:
    """One entry of the allow, block or scanner list."""

    kind: str
    value: str
    reason: str = ""
    added: float = 0.0
    expires: float = 0.0  # 0: never
    by: str = ""

    @property
    def field(self) -> str:
        return f"{self.kind}:{self.value}"

    def expired(self, now: float | None = None) -> bool:
        return self.expires > 0 and (now if now is not None else time.time()) >= self.expires

    def pack(self) -> bytes:
        blob: bytes = msgpack.packb(
            {"v": RECORD_VERSION, "reason": self.reason, "added": self.added,
             "expires": self.expires, "by": self.by},
            use_bin_type=True,
        )
        return blob

    @classmethod
    def unpack(cls, field: str, blob: bytes) -> ListEntry:
        """Rebuild an entry from its Redis hash field and msgpack value."""
        kind, sep, value = field.partition(":")
        if not sep or kind not in KINDS:
            raise ValueError(f"bad list field {field!r}")
        data = msgpack.unpackb(blob, raw=False)
        if not isinstance(data, dict):
            raise ValueError(f"bad list record for {field!r}")
        return cls(kind, value, str(data.get("reason", "")), float(data.get("added", 0.0)),
                   float(data.get("expires", 0.0)), str(data.get("by", "")))

    def as_json(self) -> dict[str, object]:
        return {"kind": self.kind, "value": self.value, "reason": self.reason,
                "added": self.added, "expires": self.expires or None, "by": self.by}
