"""Translate a Kamailio message (through KSR) into a plain, bounded `CallAttempt`.

Header values are attacker-controlled. Each one is cut to a fixed length and stripped of
control characters here, once, so nothing downstream (Redis keys, logs, headers we add) ever
sees a 10 KB From or a CR/LF inside a display name.
"""

from __future__ import annotations

from typing import Any

import KSR

from scoring.model import CallAttempt

LIMITS = {"call_id": 256, "uri": 256, "user": 128, "domain": 128, "display": 64, "ua": 256}
_CONTROL = dict.fromkeys(range(32), None) | {127: None}


def clean(value: Any, limit: int) -> str:
    """A printable, bounded string; None and non-strings become ''."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    elif not isinstance(value, str):
        value = str(value)
    text: str = value[: limit * 2].translate(_CONTROL)[:limit]
    return text


def read_pv(name: str, limit: int) -> str:
    """Read a pseudo-variable; non-UTF-8 bytes (which make KSR.pv.get raise) are read again
    hex-encoded by a Kamailio transformation and decoded with replacement characters."""
    try:
        return clean(KSR.pv.get(name), limit)
    except UnicodeDecodeError:
        hexed = KSR.pv.get(f"$({name[1:]}{{s.encode.hexa}})") or ""
        try:
            raw = bytes.fromhex(str(hexed)[: limit * 8])
        except ValueError:
            return ""
        return clean(raw.decode("utf-8", "replace"), limit)


def _present(header: str) -> bool:
    return int(KSR.hdr.is_present(header)) > 0


#: What `build_attempt` reads, in one Kamailio format evaluated by one KEMI call (`KSR.pvx.evalx`)
#: instead of one `KSR.pv.get` per field: (pseudo-variable, length limit). The source address,
#: which callers cannot choose, comes first; a separator inside a hostile header shows up as a
#: wrong field count, and such a request is read field by field instead (`_read_each`).
_FIELDS: tuple[tuple[str, int], ...] = (
    ("$si", 64), ("$sp", 8), ("$pr", 8),
    ("$hdrc(Content-Type)", 8), ("$hdrc(Identity)", 8), ("$hdrc(Alert-Info)", 8),
    ("$hdrc(Call-Info)", 8), ("$hdrc(X-Spitwall-Pass)", 8), ("$hdrc(User-Agent)", 8),
    ("$hdrc(Contact)", 8),
    ("$ci", LIMITS["call_id"]), ("$fu", LIMITS["uri"]), ("$fU", LIMITS["user"]),
    ("$fd", LIMITS["domain"]), ("$fn", LIMITS["display"]), ("$tu", LIMITS["uri"]),
    ("$tU", LIMITS["user"]), ("$ru", LIMITS["uri"]), ("$rU", LIMITS["user"]),
    ("$rd", LIMITS["domain"]), ("$ai", LIMITS["uri"]), ("$ua", LIMITS["ua"]),
    ("$ct", LIMITS["uri"]),
)
_SEP = "\x1f"  # ASCII unit separator
_FORMAT = _SEP.join(name for name, _ in _FIELDS)
_SCRATCH = "$var(spitwall_attempt)"
_NULL = "<null>"  # how a format prints an absent value
#: fields whose header may literally say "<null>": absent only when the header is
#: (a Call-ID is always there: sanity checks it)
_LITERAL_WHEN = {"$ua": "$hdrc(User-Agent)", "$ct": "$hdrc(Contact)", "$ci": ""}


def _read_all() -> dict[str, str] | None:
    """Every field of `_FIELDS` in two KEMI calls, or None when that cannot be trusted (the
    format failed, e.g. longer than Kamailio's pv buffer; non-UTF-8 bytes; a separator in a
    header value)."""
    try:
        if KSR.pvx.evalx(_SCRATCH, _FORMAT) < 0:
            return None
        text = KSR.pv.get(_SCRATCH)
    except UnicodeDecodeError:
        return None
    if not isinstance(text, str):
        return None
    parts = text.split(_SEP)
    if len(parts) != len(_FIELDS):
        return None
    raw = dict(zip((name for name, _ in _FIELDS), parts, strict=True))
    values: dict[str, str] = {}
    for name, limit in _FIELDS:
        part = raw[name]
        if part == _NULL:
            count = _LITERAL_WHEN.get(name)
            if count is None or (count and raw[count] in ("", "0")):
                part = ""
        values[name] = clean(part, limit)
    return values


def _read_each() -> dict[str, str]:
    """The same fields read one by one (the slow path, for the odd request)."""
    values: dict[str, str] = {}
    for name, limit in _FIELDS:
        if name.startswith("$hdrc("):
            values[name] = "1" if _present(name[6:-1]) else "0"
        else:
            values[name] = read_pv(name, limit)
    return values


def build_attempt() -> CallAttempt:
    """The current request as a `CallAttempt` (call only from a request route)."""
    v = _read_all() or _read_each()
    try:
        port = int(v["$sp"] or 0)
    except ValueError:
        port = 0

    def present(header: str) -> bool:
        return v[f"$hdrc({header})"] not in ("", "0")

    sdp = present("Content-Type") and int(KSR.textops.has_body_type("application/sdp")) > 0
    return CallAttempt(
        call_id=v["$ci"],
        source_ip=v["$si"],
        source_port=port,
        transport=v["$pr"].lower() or "udp",
        from_uri=v["$fu"],
        from_user=v["$fU"],
        from_domain=v["$fd"].lower(),
        from_display=v["$fn"],
        to_uri=v["$tu"],
        to_user=v["$tU"],
        request_uri=v["$ru"],
        ruri_user=v["$rU"],
        ruri_domain=v["$rd"].lower(),
        pai=v["$ai"],
        user_agent=v["$ua"],
        contact=v["$ct"],
        has_identity=present("Identity"),
        has_alert_info=present("Alert-Info"),
        has_sdp=sdp,
        # all Identity headers, comma-joined; one byte over the cap lets the parser see "too big"
        identity=read_pv("$(hdr(Identity)[*])", 4097) if present("Identity") else "",
        alert_info=read_pv("$hdr(Alert-Info)", 512) if present("Alert-Info") else "",
        call_info=read_pv("$hdr(Call-Info)", 512) if present("Call-Info") else "",
        pass_token=read_pv("$hdr(X-Spitwall-Pass)", 512) if present("X-Spitwall-Pass") else "",
    )
