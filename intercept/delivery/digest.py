"""RFC 2617 digest authentication (MD5, qop=auth) for recorders that SUBSCRIBE.

Why: a recorder's allow-list entry may carry credentials (``user`` and
``ha1 = hex MD5(user:"spitwall":password)``); an address alone is spoofable on some networks, so
such recorders must also prove the password. The worker stores only HA1, never the password.

Nonces are stateless: ``<unix time hex>.<HMAC-SHA256(secret, time)>``, so no table grows with
the number of challenges an attacker provokes; a nonce older than its lifetime is answered with
``stale=true`` (the client retries with the new nonce, no new password prompt). The secret is
per process: a restarted worker re-challenges once.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

REALM = "spitwall"

_PARAM = re.compile(r'\s*([A-Za-z0-9_-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s,"]*)\s*(?:,|$)')


def md5_hex(text: str) -> str:
    return hashlib.md5(text.encode("utf-8"), usedforsecurity=False).hexdigest()


def ha1(user: str, password: str, realm: str = REALM) -> str:
    """HA1 = MD5(user:realm:password), what the RECORDERS entry stores."""
    return md5_hex(f"{user}:{realm}:{password}")


def response(
    ha1_hex: str, nonce: str, method: str, uri: str, *, qop: str | None = None,
    nc: str | None = None, cnonce: str | None = None,
) -> str:  # fmt: skip
    """The ``response`` value (RFC 2617 3.2.2.1) for qop=auth or no qop (RFC 2069 style)."""
    ha2 = md5_hex(f"{method}:{uri}")
    if qop:
        return md5_hex(f"{ha1_hex}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")
    return md5_hex(f"{ha1_hex}:{nonce}:{ha2}")


def parse(value: str) -> dict[str, str]:
    """``Digest username="a", realm="b", ...`` -> {"username": "a", ...} (names lower-case,
    quotes removed). `ValueError` when it is not a Digest credential."""
    scheme, _, rest = value.strip().partition(" ")
    if scheme.lower() != "digest" or not rest.strip():
        raise ValueError("not a Digest credential")
    out: dict[str, str] = {}
    pos = 0
    rest = rest.strip()
    while pos < len(rest):
        found = _PARAM.match(rest, pos)
        if not found or found.end() == pos:
            raise ValueError(f"bad Digest parameter at {rest[pos:pos + 30]!r}")
        name, raw = found.group(1).lower(), found.group(2)
        if raw.startswith('"'):
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        if name in out:
            raise ValueError(f"Digest parameter {name} given twice")
        out[name] = raw
        pos = found.end()
    return out


class Nonces:
    """Issue and check stateless, time-limited nonces."""

    def __init__(self, lifetime: float = 300.0, secret: bytes | None = None) -> None:
        self.lifetime = lifetime
        self._secret = secret or secrets.token_bytes(32)

    def _mac(self, stamp: str) -> str:
        return hmac.new(self._secret, stamp.encode(), hashlib.sha256).hexdigest()[:32]

    def new(self, now: float) -> str:
        stamp = f"{int(now):x}"
        return f"{stamp}.{self._mac(stamp)}"

    def check(self, nonce: str, now: float) -> str:
        """"ok", "stale" (ours, but too old) or "bad" (not ours)."""
        stamp, dot, mac = nonce.partition(".")
        if not dot or not re.fullmatch(r"[0-9a-f]{1,12}", stamp):
            return "bad"
        if not hmac.compare_digest(mac, self._mac(stamp)):
            return "bad"
        age = now - int(stamp, 16)
        return "ok" if -5.0 <= age <= self.lifetime else "stale"


def challenge(nonce: str, *, stale: bool = False, realm: str = REALM) -> str:
    """The ``WWW-Authenticate`` value of a 401."""
    extra = ", stale=true" if stale else ""
    return f'Digest realm="{realm}", nonce="{nonce}", algorithm=MD5, qop="auth"{extra}'


def verify(
    creds: dict[str, str], *, method: str, user: str, ha1_hex: str, realm: str = REALM
) -> bool:
    """True when ``creds`` (from `parse`) are a correct answer for ``user`` with ``ha1_hex``.
    The nonce is checked separately (`Nonces.check`); the digest-uri is the one the client
    hashed (a proxy may have rewritten the Request-URI), the caller compares its user part."""
    if creds.get("username") != user or creds.get("realm") != realm:
        return False
    if creds.get("algorithm", "MD5").upper() != "MD5":
        return False
    nonce, uri, got = creds.get("nonce"), creds.get("uri"), creds.get("response")
    if not nonce or not uri or not got:
        return False
    qop = creds.get("qop")
    if qop is not None:
        if qop != "auth" or not creds.get("nc") or not creds.get("cnonce"):
            return False
        want = response(ha1_hex, nonce, method, uri, qop=qop, nc=creds["nc"],
                        cnonce=creds["cnonce"])
    else:
        want = response(ha1_hex, nonce, method, uri)
    return hmac.compare_digest(want, got.lower())


def authorization(
    user: str, password: str, *, method: str, uri: str, challenge_params: dict[str, str],
    cnonce: str | None = None, nc: int = 1,
) -> str:  # fmt: skip
    """Client side (tests, tools): the ``Authorization`` value answering a challenge."""
    realm = challenge_params.get("realm", REALM)
    nonce = challenge_params["nonce"]
    key = ha1(user, password, realm)
    qop_offer = [q.strip() for q in challenge_params.get("qop", "").split(",") if q.strip()]
    if "auth" in qop_offer:
        cn = cnonce or secrets.token_hex(8)
        ncs = f"{nc:08x}"
        resp = response(key, nonce, method, uri, qop="auth", nc=ncs, cnonce=cn)
        return (f'Digest username="{user}", realm="{realm}", nonce="{nonce}", uri="{uri}", '
                f'response="{resp}", algorithm=MD5, qop=auth, nc={ncs}, cnonce="{cn}"')
    resp = response(key, nonce, method, uri)
    return (f'Digest username="{user}", realm="{realm}", nonce="{nonce}", uri="{uri}", '
            f'response="{resp}", algorithm=MD5')
