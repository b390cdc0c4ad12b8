"""Emergency calls are never screened: relayed at once, unscored, whatever the lists say.

A carrier must complete emergency calls (112, 911, ...) from anyone, including callers it would
otherwise reject: a block-listed source, a caller with a spam reputation, a number on the
do-not-originate list, a call during a campaign from the same address. So an INVITE whose
Request-URI is an emergency service is relayed before any check runs and without the scoring
round trip; it is recorded (for `spitwall explain`) and counted.

An emergency service is recognised by the Request-URI only (the routing target, not To):
an RFC 5031 service URN (`urn:service:sos`, `urn:service:sos.police`, ...), the user `sos`
(`sip:sos@...`, used in IMS), or a user that is one of the configured short codes
(`emergency.numbers`, default `112,911`; digits, a leading `+` ignored). Protecting PSAPs
from floods of calls (TDoS) is not this module's job: it only makes sure spitwall never stands
between a caller and an emergency service.
"""

from __future__ import annotations

import functools
import re

_CODE = re.compile(r"^[0-9]{2,6}$")
SERVICE_URN = "urn:service:sos"


@functools.lru_cache(maxsize=8)
def parse_numbers(text: str) -> frozenset[str]:
    """'112, 911' -> {'112', '911'}; ValueError naming a bad entry (2 to 6 digits each)."""
    out = set()
    for part in text.split(","):
        code = part.strip().lstrip("+")
        if not code:
            continue
        if not _CODE.match(code):
            raise ValueError(f"emergency number {part.strip()[:20]!r} is not 2 to 6 digits")
        out.add(code)
    return frozenset(out)


def service(request_uri: str, ruri_user: str, numbers: frozenset[str]) -> str | None:
    """The emergency service this Request-URI calls (for the record), or None."""
    uri = request_uri[:64].lower()
    if uri.startswith(SERVICE_URN) and (len(uri) == len(SERVICE_URN)
                                        or uri[len(SERVICE_URN)] in ".;"):
        return uri.split(";", 1)[0]
    user = ruri_user[:16]
    if user.lower() == "sos":
        return "sos"
    code = user[1:] if user.startswith("+") else user
    return code if code in numbers else None
