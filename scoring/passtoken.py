"""Pass tokens: the answering machine's proof that a diverted caller is a person.

When phase 2 judges a caller human, it REFERs the caller back to the original callee with a
short-lived token in the `X-Spitwall-Pass` header (carried in the Refer-To URI). The proxy
verifies it and relays that INVITE without scoring, so the caller is not diverted again. The
token binds the caller identity, the callee user and an expiry, signed with HMAC-SHA256 under
`media.token_key` (shared by proxy and answering machine through the live config).
Format: base64url(caller|callee|expiry) "." base64url(hmac)[:22] — short enough for a header.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from dataclasses import dataclass

MAX_TOKEN = 512


@dataclass(frozen=True, slots=True)
class PassToken:
    caller: str
    callee: str
    expires: float


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(key: str, body: str) -> str:
    return _b64(hmac.new(key.encode(), body.encode(), hashlib.sha256).digest())[:22]


def issue(key: str, caller: str, callee: str, ttl: float, now: float | None = None) -> str:
    if len(key) < 16:
        raise ValueError("media.token_key must be at least 16 characters")
    t = time.time() if now is None else now
    body = _b64(f"{caller}|{callee}|{int(t + ttl)}".encode())
    return f"{body}.{_mac(key, body)}"


def verify(key: str, token: str, *, caller: str, callee: str,
           now: float | None = None) -> PassToken:
    """The token's content if it is authentic, unexpired and for this caller and callee;
    raises ValueError saying why not."""
    if not key or len(key) < 16:
        raise ValueError("no token key configured")
    if not token or len(token) > MAX_TOKEN or token.count(".") != 1:
        raise ValueError("malformed pass token")
    body, mac = token.split(".")
    if not hmac.compare_digest(_mac(key, body), mac):
        raise ValueError("pass token signature mismatch")
    try:
        t_caller, t_callee, exp = _unb64(body).decode().rsplit("|", 2)
        expires = float(int(exp))
    except (ValueError, UnicodeDecodeError):
        raise ValueError("malformed pass token") from None
    if (time.time() if now is None else now) > expires:
        raise ValueError("pass token expired")
    if t_caller != caller or t_callee != callee:
        raise ValueError("pass token issued for another call")
    return PassToken(t_caller, t_callee, expires)
