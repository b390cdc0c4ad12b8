"""Digest authentication for recorders that SUBSCRIBE: RFC 7616 / RFC 8760 with SHA-256
(preferred) and MD5 (RFC 2617, for older recorders), qop=auth, nonce-count replay protection.

Why: a recorder's allow-list entry may carry credentials (``user`` and the HA1 of each
algorithm, ``hex H(user:"spitwall":password)``); an address alone is spoofable on some
networks, so such recorders must also prove the password. The worker stores only HA1s, never
the password. Written by hand (a few hashes) because the Python digest libraries are HTTP
clients; ours is the server side of SIP's challenge (RFC 3261 22, RFC 8760).

A challenge carries one ``WWW-Authenticate`` per algorithm the entry has an HA1 for, SHA-256
first (RFC 8760 2.4: the client picks the first it supports). Nonces are stateless:
``<unix time hex>.<random salt>.<HMAC-SHA256(secret, time.salt)>``, so no table grows with
the number of challenges an attacker provokes; a nonce older than its lifetime is answered with
``stale=true`` (the client retries with the new nonce, no new password prompt). The secret is
per process: a restarted worker re-challenges once.

Replays (`NonceCounts`): credentials that verified are remembered per nonce with their nonce
count (``nc``); the same or a lower count again is a replay (RFC 7616 3.3: the server keeps
track of ``nc`` to detect replays) and is challenged afresh. Credentials without qop (RFC 2069
style, MD5 only) carry no count: their nonce is good once. Only verified credentials create
entries, and the table is bounded by age (the nonce lifetime) and size.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections import OrderedDict
from collections.abc import Mapping

REALM = "spitwall"
SHA256 = "SHA-256"
MD5 = "MD5"
#: the algorithms we speak, in order of preference (RFC 8760)
ALGORITHMS = (SHA256, MD5)
_HASHES = {SHA256: "sha256", MD5: "md5"}
#: hex digits of each algorithm's hashes
HEX_LENGTH = {SHA256: 64, MD5: 32}

_PARAM = re.compile(r'\s*([A-Za-z0-9_-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s,"]*)\s*(?:,|$)')


def hash_hex(algorithm: str, text: str) -> str:
    """``H(text)`` of ``algorithm`` (`SHA256` or `MD5`) as lower-case hex."""
    return hashlib.new(_HASHES[algorithm], text.encode("utf-8"),
                       usedforsecurity=False).hexdigest()


def md5_hex(text: str) -> str:
    return hash_hex(MD5, text)


def ha1(user: str, password: str, realm: str = REALM, algorithm: str = MD5) -> str:
    """HA1 = H(user:realm:password), what the RECORDERS entry stores per algorithm."""
    return hash_hex(algorithm, f"{user}:{realm}:{password}")


def response(
    ha1_hex: str, nonce: str, method: str, uri: str, *, qop: str | None = None,
    nc: str | None = None, cnonce: str | None = None, algorithm: str = MD5,
) -> str:  # fmt: skip
    """The ``response`` value (RFC 7616 3.4.1) for qop=auth or no qop (RFC 2069 style)."""
    ha2 = hash_hex(algorithm, f"{method}:{uri}")
    if qop:
        return hash_hex(algorithm, f"{ha1_hex}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")
    return hash_hex(algorithm, f"{ha1_hex}:{nonce}:{ha2}")


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


def algorithm_of(creds: Mapping[str, str]) -> str | None:
    """The credentials' algorithm in our spelling (absent = MD5, RFC 2617); None when it is
    one we do not speak (``-sess`` variants, SHA-512-256, ...)."""
    name = creds.get("algorithm", MD5).upper()
    return name if name in _HASHES else None


class Nonces:
    """Issue and check stateless, time-limited nonces."""

    def __init__(self, lifetime: float = 300.0, secret: bytes | None = None) -> None:
        self.lifetime = lifetime
        self._secret = secret or secrets.token_bytes(32)

    def _mac(self, text: str) -> str:
        return hmac.new(self._secret, text.encode(), hashlib.sha256).hexdigest()[:32]

    def new(self, now: float) -> str:
        """A nonce of its own for every challenge (the salt: two recorders challenged in the
        same second must not share one, or the first one's count would refuse the other's)."""
        head = f"{int(now):x}.{secrets.token_hex(8)}"
        return f"{head}.{self._mac(head)}"

    def check(self, nonce: str, now: float) -> str:
        """"ok", "stale" (ours, but too old) or "bad" (not ours)."""
        stamp, salt, mac = [*nonce.split("."), "", ""][:3]
        if nonce.count(".") != 2 or not re.fullmatch(r"[0-9a-f]{1,12}", stamp) \
                or not re.fullmatch(r"[0-9a-f]{16}", salt):
            return "bad"
        if not hmac.compare_digest(mac, self._mac(f"{stamp}.{salt}")):
            return "bad"
        age = now - int(stamp, 16)
        return "ok" if -5.0 <= age <= self.lifetime else "stale"


class NonceCounts:
    """The highest nonce count accepted per nonce, to refuse replayed credentials.

    ``accept(nonce, nc, now)`` for credentials that verified and whose nonce is fresh: True
    (and remembered) when ``nc`` is higher than any accepted before with this nonce, False for
    a replay. ``nc`` None (no qop): the nonce is good once. Entries are dropped once their
    nonce can no longer be fresh (``lifetime`` + 5 s of clock slack) and, beyond ``max_entries``,
    oldest first (that nonce is then refused as a replay, safe: the client gets a new one)."""

    def __init__(self, lifetime: float = 300.0, max_entries: int = 10_000) -> None:
        self.lifetime = lifetime + 5.0
        self.max_entries = max_entries
        self._seen: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self._evicted_before = 0.0  # entries first seen before this may have been evicted

    def accept(self, nonce: str, nc: str | None, now: float) -> bool:
        self._expire(now)
        if nc is None:
            count = 0
        elif re.fullmatch(r"[0-9a-fA-F]{8}", nc):
            count = int(nc, 16)
            if count == 0:
                return False
        else:
            return False
        seen = self._seen.get(nonce)
        if seen is not None and (nc is None or count <= seen[0]):
            return False
        if seen is None and self._evicted_before and self._first_seen_evicted(nonce):
            return False
        self._seen[nonce] = (count, seen[1] if seen else now)
        if seen is None:
            while len(self._seen) > self.max_entries:
                _old, (_n, at) = self._seen.popitem(last=False)
                self._evicted_before = max(self._evicted_before, at + 1e-9)
        return True

    def _first_seen_evicted(self, nonce: str) -> bool:
        """Could this nonce have been accepted and then evicted for size? Our nonces carry
        the time they were issued: one issued before the newest evicted entry was first seen
        may have been (refused: the client gets a new nonce)."""
        stamp = nonce.partition(".")[0]
        try:
            issued = int(stamp, 16)
        except ValueError:
            return True
        return issued < self._evicted_before

    def _expire(self, now: float) -> None:
        while self._seen:
            nonce, (_count, at) = next(iter(self._seen.items()))
            if now - at <= self.lifetime:
                break
            del self._seen[nonce]

    def __len__(self) -> int:
        return len(self._seen)


def challenge(nonce: str, *, stale: bool = False, realm: str = REALM,
              algorithm: str = MD5) -> str:
    """A ``WWW-Authenticate`` value of a 401 (one per algorithm offered)."""
    extra = ", stale=true" if stale else ""
    return f'Digest realm="{realm}", nonce="{nonce}", algorithm={algorithm}, qop="auth"{extra}'


def verify(
    creds: dict[str, str], *, method: str, user: str, ha1s: Mapping[str, str],
    realm: str = REALM,
) -> bool:  # fmt: skip
    """True when ``creds`` (from `parse`) are a correct answer for ``user``, with the HA1 of
    the credentials' algorithm from ``ha1s`` (algorithm -> hex; an algorithm the entry has no
    HA1 for is refused). The nonce is checked separately (`Nonces.check`, `NonceCounts`); the
    digest-uri is the one the client hashed (a proxy may have rewritten the Request-URI), the
    caller compares its user part. RFC 7616 makes qop mandatory, so SHA-256 needs it."""
    if creds.get("username") != user or creds.get("realm") != realm:
        return False
    algorithm = algorithm_of(creds)
    ha1_hex = ha1s.get(algorithm) if algorithm else None
    if algorithm is None or not ha1_hex:
        return False
    nonce, uri, got = creds.get("nonce"), creds.get("uri"), creds.get("response")
    if not nonce or not uri or not got:
        return False
    qop = creds.get("qop")
    if qop is not None:
        if qop != "auth" or not creds.get("nc") or not creds.get("cnonce"):
            return False
        want = response(ha1_hex, nonce, method, uri, qop=qop, nc=creds["nc"],
                        cnonce=creds["cnonce"], algorithm=algorithm)
    elif algorithm == MD5:
        want = response(ha1_hex, nonce, method, uri)
    else:
        return False
    return hmac.compare_digest(want, got.lower())


def authorization(
    user: str, password: str, *, method: str, uri: str, challenge_params: dict[str, str],
    cnonce: str | None = None, nc: int = 1,
) -> str:  # fmt: skip
    """Client side (tests, tools): the ``Authorization`` value answering a challenge."""
    realm = challenge_params.get("realm", REALM)
    nonce = challenge_params["nonce"]
    algorithm = algorithm_of(challenge_params) or MD5
    key = ha1(user, password, realm, algorithm)
    qop_offer = [q.strip() for q in challenge_params.get("qop", "").split(",") if q.strip()]
    if "auth" in qop_offer:
        cn = cnonce or secrets.token_hex(8)
        ncs = f"{nc:08x}"
        resp = response(key, nonce, method, uri, qop="auth", nc=ncs, cnonce=cn,
                        algorithm=algorithm)
        return (f'Digest username="{user}", realm="{realm}", nonce="{nonce}", uri="{uri}", '
                f'response="{resp}", algorithm={algorithm}, qop=auth, nc={ncs}, '
                f'cnonce="{cn}"')
    resp = response(key, nonce, method, uri, algorithm=algorithm)
    return (f'Digest username="{user}", realm="{realm}", nonce="{nonce}", uri="{uri}", '
            f'response="{resp}", algorithm={algorithm}')
