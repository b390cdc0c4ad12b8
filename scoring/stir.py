"""STIR/SHAKEN: the RFC 8224 Identity header, RFC 8225 PASSporTs with the RFC 8588 "shaken"
extension, and the trust store that tells whose signatures count.

Everything here runs inside a Kamailio child on the INVITE path, so it never touches the network
and never raises from `verify`:

* `IdentityHeader.parse` reads one header value, ``<header>.<payload>.<signature>;info=<URL>;
  alg=ES256;ppt=shaken`` (parameters in any order, ``info`` with or without angle brackets, values
  optionally quoted, ``alg`` defaulting to ES256 when absent as RFC 8224 allows; ``ppt=shaken`` is
  required). The PASSporT compact form (``header..signature``, payload rebuilt from the SIP
  message) cannot carry SHAKEN's ``attest`` and ``origid`` claims and is refused, as ATIS-1000074
  requires the full form. Bounds: the header value at most 4096 bytes, each decoded JSON part at
  most 2048 bytes; base64url must be canonical and unpadded; JSON must be an object without
  duplicate keys; telephone numbers are 1-15 digits. Any violation raises `ValueError` with a
  short, precise message (attacker-supplied values in messages are cut to a few characters).
* `verify` checks, in this order: syntax (above), ``info`` equal to the JOSE ``x5u``, ``iat``
  freshness (at most ``max_age`` + ``skew`` seconds old, at most ``skew`` seconds in the future),
  ``orig.tn`` equal to one of the caller's numbers, ``dest.tn`` containing the callee's number,
  then the leaf certificate for ``x5u`` from the `TrustStore` and the ES256 signature over
  ``header.payload``. Claims are checked before the certificate: a mismatched or stale PASSporT is
  "invalid" whether or not we could verify its signature. Outcomes: "verified", "unverified"
  (no trust store, certificate not cached, not chaining to a trusted CA, outside its validity,
  or an internal error), "invalid" (malformed, forged, stale, mismatched), "absent".
* Numbers are compared as E.164 digits: user-part parameters (``;npdi;rn=...``), a leading ``+``
  and visual separators (``-.()`` and spaces) are removed. A number presented *without* ``+``
  (a national or IDD form) also matches when, after dropping its leading zeros, it equals the
  PASSporT's number, or is a suffix of it at least 7 digits long that leaves 1-3 digits (a
  country code) in front: ``2025550100`` and ``12025550100`` match, so do ``030123456789`` and
  ``4930123456789``.

Signatures are checked with `cryptography` directly rather than PyJWT: we must read the JOSE
header (``x5u``) before we know the key, we want one strict pass with size caps, canonical
base64url and duplicate-key rejection that PyJWT does not do, and the hot path is then a single
ECDSA verification with a public key parsed once and cached. (The tests sign with PyJWT as an
independent encoder, to prove interoperability.)

Trust store layout (`TrustStore.load(directory)`):

* every ``*.pem`` / ``*.crt`` file that does not end in ``.leaf.pem`` holds trusted CA
  certificates (PEM, several per file allowed, or one DER certificate); only certificates with
  BasicConstraints ``CA:TRUE`` are used. They are read once, when the store is loaded.
* leaf certificates live in the same directory as ``<sha256(x5u)>.leaf.pem``: the lower-case hex
  SHA-256 of the exact x5u URL (UTF-8), see `leaf_filename`; the file is what the x5u URL
  serves: the leaf first, optionally followed by its intermediate CA. `write_leaf` writes one
  atomically; the out-of-band fetcher does ``write_leaf(dir, url, fetch_x5u(url, hosts))``.
  Leaf files are read lazily, on the first cache miss for that x5u (one ``open`` of a name
  derived by hashing, so an attacker-chosen x5u can never name another file); a miss is
  remembered for `MISS_TTL` seconds so a flood of unknown x5u URLs costs one failed ``open``
  per URL per TTL.
* a leaf is accepted when it is signed by a trusted CA, or by an intermediate CA (from its own
  bundle) that a trusted CA signed; its key must be EC P-256, it must not be a CA, and its
  KeyUsage, when present, must allow digitalSignature. The validity windows of the whole chain
  are checked at every verification. TNAuthList (RFC 8226) is not checked.

`fetch_x5u` is for the out-of-band fetcher process only (it does blocking network I/O): http(s)
only, no credentials in the URL, allow-listed hosts only, no redirects, bodies up to 16 KB.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import http.client
import json
import logging
import math
import os
import re
import ssl
import tempfile
import time
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

log = logging.getLogger("spitwall.stir")

MAX_HEADER = 4096  # bytes of one Identity header value (all values together in `verify`)
MAX_JSON = 2048  # bytes of the decoded JOSE header and of the decoded claims
MAX_URL = 1024
MAX_CERT_BYTES = 16 * 1024  # an x5u body or a leaf file
MAX_CA_FILE = 1024 * 1024
MAX_DEST_TNS = 64
MAX_VALUES = 4  # Identity header values looked at when several arrive joined by commas
CLOCK_SKEW = 5.0  # seconds of clock difference tolerated around iat
MISS_TTL = 30.0  # seconds a certificate-cache miss is remembered
MAX_LEAVES = 4096  # leaf certificates cached per process
ATTESTATIONS = ("A", "B", "C")

VERIFIED = "verified"
UNVERIFIED = "unverified"
INVALID = "invalid"
ABSENT = "absent"

_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_B64_MAX_JSON = 4 * math.ceil(MAX_JSON / 3)
_SIG_B64_LEN = 86  # 64 bytes, unpadded base64url
_PARAM = re.compile(
    r"""[ \t]*;[ \t]*([A-Za-z0-9._!%*+`'~-]+)[ \t]*"""
    r"""(?:=[ \t]*(<[^<>]*>|"(?:[^"\\]|\\.)*"|[^;<>" \t]+))?[ \t]*"""
)
_URL = re.compile(r"https?://[!-~]{1,1016}", re.IGNORECASE)
_TN = re.compile(r"[0-9]{1,15}")
_VISUAL = str.maketrans("", "", "-.() ")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_ECDSA = ec.ECDSA(hashes.SHA256())


def _show(value: object, limit: int = 24) -> str:
    """A short, printable rendering of an attacker-supplied value for a reason string."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------
# PASSporT


@dataclass(frozen=True, slots=True)
class PassportHeader:
    """The JOSE header of a SHAKEN PASSporT."""

    alg: str
    typ: str
    ppt: str
    x5u: str


@dataclass(frozen=True, slots=True)
class PassportClaims:
    """The claims of a SHAKEN PASSporT; telephone numbers as normalised E.164 digits."""

    attest: str
    dest_tn: tuple[str, ...]
    iat: int
    orig_tn: str
    origid: str


@dataclass(frozen=True, slots=True)
class Passport:
    header: PassportHeader
    claims: PassportClaims

    @classmethod
    def from_json(cls, header: dict[str, Any], claims: dict[str, Any]) -> Passport:
        """Validate decoded JOSE header and claims; ValueError names the first problem."""
        alg = header.get("alg")
        if alg != "ES256":
            raise ValueError(f"JOSE alg {_show(alg)} not allowed (ES256 only)")
        typ = header.get("typ")
        if not isinstance(typ, str) or typ.lower() != "passport":
            raise ValueError(f"JOSE typ {_show(typ)} is not 'passport'")
        ppt = header.get("ppt")
        if ppt != "shaken":
            raise ValueError(f"JOSE ppt {_show(ppt)} is not 'shaken'")
        if "crit" in header:
            raise ValueError("JOSE crit header not supported")
        x5u = header.get("x5u")
        if not isinstance(x5u, str) or not _URL.fullmatch(x5u):
            raise ValueError(f"JOSE x5u {_show(x5u)} is not an http(s) URL")

        attest = claims.get("attest")
        if attest not in ATTESTATIONS:
            raise ValueError(f"attest {_show(attest)} is not A, B or C")
        dest = claims.get("dest")
        if not isinstance(dest, dict):
            raise ValueError("dest claim missing or not an object")
        tns = dest.get("tn")
        if not isinstance(tns, list) or not tns:
            raise ValueError("dest.tn missing or not a non-empty list")
        if len(tns) > MAX_DEST_TNS:
            raise ValueError(f"dest.tn has {len(tns)} numbers, limit {MAX_DEST_TNS}")
        dest_tn = tuple(_claim_tn(t, "dest.tn") for t in tns)
        orig = claims.get("orig")
        if not isinstance(orig, dict):
            raise ValueError("orig claim missing or not an object")
        orig_tn = _claim_tn(orig.get("tn"), "orig.tn")
        iat = claims.get("iat")
        if isinstance(iat, bool) or not isinstance(iat, int | float) or not math.isfinite(iat):
            raise ValueError(f"iat {_show(iat)} is not a number")
        origid = claims.get("origid")
        if not isinstance(origid, str) or not 0 < len(origid) <= 128:
            raise ValueError("origid missing or not a string of 1-128 characters")
        return cls(PassportHeader("ES256", typ, "shaken", x5u),
                   PassportClaims(attest, dest_tn, int(iat), orig_tn, origid))


def _claim_tn(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} {_show(value)} is not a string")
    digits = normalize_tn(value)
    if digits is None:
        raise ValueError(f"{what} {_show(value)} is not a telephone number")
    return digits


def normalize_tn(value: str) -> str | None:
    """E.164 digits of a telephone number or SIP user part, or None when it is not one.

    Drops user-part parameters (';npdi', ';rn=...'), surrounding space, one leading '+' and
    visual separators; what is left must be 1-15 ASCII digits.
    """
    digits = value.split(";", 1)[0].strip().removeprefix("+").translate(_VISUAL)
    return digits if _TN.fullmatch(digits) else None


def same_number(tn: str, presented: str) -> bool:
    """Does a number seen in the SIP message denote the PASSporT's E.164 `tn`?

    Exact digit match; or, for a number presented without '+', after dropping its leading
    zeros: equal, or a suffix of `tn` at least 7 digits long preceded by 1-3 digits.
    """
    digits = normalize_tn(presented)
    if digits is None:
        return False
    if digits == tn:
        return True
    if presented.strip().startswith("+"):
        return False
    national = digits.lstrip("0")
    if national == tn:
        return True
    return len(national) >= 7 and 1 <= len(tn) - len(national) <= 3 and tn.endswith(national)


# ---------------------------------------------------------------------------------------------
# Identity header


@dataclass(frozen=True, slots=True)
class IdentityHeader:
    """One parsed Identity header value with its validated PASSporT."""

    jws: str  # header.payload.signature (base64url)
    info: str
    alg: str
    ppt: str
    passport: Passport
    signing_input: bytes  # ASCII of header.payload
    signature: bytes  # 64 bytes, R || S

    @classmethod
    def parse(cls, text: str) -> IdentityHeader:
        """Parse one header value; raises ValueError with a precise message."""
        _check_text(text)
        text = text.strip()
        if not text:
            raise ValueError("empty Identity header")
        jws, sep, rest = text.partition(";")
        jws = jws.strip()
        if not jws:
            raise ValueError("PASSporT (JWS) missing before the parameters")
        params = _parse_params(sep + rest)
        info = params.get("info")
        if info is None:
            raise ValueError("info parameter missing")
        if info.startswith("<") and info.endswith(">"):
            info = info[1:-1].strip()
        if not _URL.fullmatch(info):
            raise ValueError(f"info {_show(info)} is not an http(s) URL")
        alg = params.get("alg", "ES256")
        if alg != "ES256":
            raise ValueError(f"alg parameter {_show(alg)} not allowed (ES256 only)")
        ppt = params.get("ppt")
        if ppt is None:
            raise ValueError("ppt parameter missing (SHAKEN needs ppt=shaken)")
        if ppt != "shaken":
            raise ValueError(f"ppt parameter {_show(ppt)} is not 'shaken'")

        parts = jws.split(".")
        if len(parts) != 3:
            raise ValueError(f"JWS has {len(parts)} part(s), expected header.payload.signature")
        h64, p64, s64 = parts
        if not h64:
            raise ValueError("JWS header part is empty")
        header = _json_object(_b64_json(h64, "JOSE header"), "JOSE header")
        if header.get("alg") != "ES256":  # before the payload: alg=none/HS256 named as such
            raise ValueError(f"JOSE alg {_show(header.get('alg'))} not allowed (ES256 only)")
        if not p64:
            raise ValueError("compact form (no payload) cannot carry SHAKEN claims")
        claims = _json_object(_b64_json(p64, "payload"), "payload")
        if not s64:
            raise ValueError("JWS signature part is empty")
        if len(s64) != _SIG_B64_LEN:
            raise ValueError(f"signature is {len(s64)} base64url characters, ES256 needs 86")
        signature = _b64url_decode(s64, "signature")
        passport = Passport.from_json(header, claims)
        return cls(jws, info, alg, ppt, passport, f"{h64}.{p64}".encode("ascii"), signature)


def _check_text(text: object) -> None:
    if not isinstance(text, str):
        raise ValueError("Identity header is not text")
    if len(text) > MAX_HEADER:
        raise ValueError(f"Identity header is {len(text)} bytes, limit {MAX_HEADER}")
    if not text.isascii():
        raise ValueError("Identity header has non-ASCII characters")
    if _CONTROL.search(text):
        raise ValueError("Identity header has control characters")


def _parse_params(text: str) -> dict[str, str]:
    params: dict[str, str] = {}
    pos = 0
    while pos < len(text):
        m = _PARAM.match(text, pos)
        if m is None or m.end() == pos:
            raise ValueError(f"malformed header parameter at {_show(text[pos:pos + 16])}")
        name, value = m.group(1).lower(), m.group(2) or ""
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        if name in params:
            raise ValueError(f"duplicate {name} parameter")
        params[name] = value
        pos = m.end()
    return params


def _b64_json(seg: str, what: str) -> bytes:
    if len(seg) > _B64_MAX_JSON:
        raise ValueError(f"{what} exceeds {MAX_JSON} bytes")
    raw = _b64url_decode(seg, what)
    if len(raw) > MAX_JSON:
        raise ValueError(f"{what} exceeds {MAX_JSON} bytes")
    return raw


def _b64url_decode(seg: str, what: str) -> bytes:
    if not _B64URL.fullmatch(seg):
        raise ValueError(f"{what} is not base64url")
    if len(seg) % 4 == 1:
        raise ValueError(f"{what} has an impossible base64url length")
    try:
        raw = base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4))
    except binascii.Error:
        raise ValueError(f"{what} is not base64url") from None
    if b64url(raw) != seg:
        raise ValueError(f"{what} is not canonical base64url")
    return raw


def b64url(raw: bytes) -> str:
    """Unpadded base64url, as JWS uses it."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


class _Duplicate(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Duplicate(f"duplicate key {_show(key)}")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise _Duplicate(f"{name} is not JSON")


_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_no_constant)


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{what} is not UTF-8") from None
    try:
        obj = _DECODER.decode(text)
    except RecursionError:
        raise ValueError(f"{what} JSON nests too deeply") from None
    except _Duplicate as exc:
        raise ValueError(f"{what}: {exc}") from None
    except ValueError as exc:
        raise ValueError(f"{what} is not JSON: {getattr(exc, 'msg', 'syntax error')}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{what} is a JSON {type(obj).__name__}, expected an object")
    return obj


def split_values(text: str) -> list[str]:
    """Header values joined by commas (outside <> and quotes), at most `MAX_VALUES`."""
    if "," not in text:  # the usual case: one value
        return [text.strip()] if text.strip() else []
    out: list[str] = []
    start, depth, quoted, i = 0, 0, False, 0
    while i < len(text):
        c = text[i]
        if quoted:
            if c == "\\":
                i += 1
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c == "<":
            depth += 1
        elif c == ">":
            depth = max(0, depth - 1)
        elif c == "," and depth == 0:
            out.append(text[start:i])
            start = i + 1
        i += 1
    out.append(text[start:])
    return [v for v in (x.strip() for x in out) if v][:MAX_VALUES]


# ---------------------------------------------------------------------------------------------
# trust store


@dataclass(frozen=True, slots=True)
class _Leaf:
    cert: x509.Certificate
    key: ec.EllipticCurvePublicKey
    not_before: float  # the chain's common validity window, epoch seconds
    not_after: float


def leaf_filename(x5u: str) -> str:
    """File name of the leaf certificate for `x5u` in the trust directory."""
    return hashlib.sha256(x5u.encode("utf-8")).hexdigest() + ".leaf.pem"


def write_leaf(directory: str | os.PathLike[str], x5u: str, pem: bytes) -> Path:
    """Store what `x5u` served as its leaf file in `directory`, atomically (for the fetcher)."""
    if len(pem) > MAX_CERT_BYTES:
        raise ValueError(f"certificate is {len(pem)} bytes, limit {MAX_CERT_BYTES}")
    target = Path(directory) / leaf_filename(x5u)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".leaf-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _load_certs(data: bytes) -> list[x509.Certificate]:
    try:
        if b"-----BEGIN" in data:
            certs = x509.load_pem_x509_certificates(data)
        else:
            certs = [x509.load_der_x509_certificate(data)]
    except ValueError as exc:
        raise ValueError(f"not a certificate: {str(exc)[:60]}") from None
    if not certs:
        raise ValueError("no certificate found")
    return certs


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except (x509.ExtensionNotFound, ValueError):
        return False
    return bool(bc.ca)


def _issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _window(*certs: x509.Certificate) -> tuple[float, float]:
    return (max(c.not_valid_before_utc.timestamp() for c in certs),
            min(c.not_valid_after_utc.timestamp() for c in certs))


class TrustStore:
    """Trusted STI CA certificates and a bounded cache of verified leaf certificates by x5u."""

    def __init__(self, cas: Iterable[x509.Certificate] = (),
                 directory: str | os.PathLike[str] | None = None, *,
                 miss_ttl: float = MISS_TTL, max_leaves: int = MAX_LEAVES) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.miss_ttl = miss_ttl
        self.max_leaves = max_leaves
        self.errors: list[str] = []
        self._anchors: dict[x509.Name, list[x509.Certificate]] = {}
        self._leaves: dict[str, _Leaf] = {}
        self._misses: dict[str, tuple[float, str]] = {}
        for cert in cas:
            self.add_ca(cert)

    @classmethod
    def load(cls, directory: str | os.PathLike[str], *, miss_ttl: float = MISS_TTL,
             max_leaves: int = MAX_LEAVES) -> TrustStore:
        """Read the trusted CAs of `directory`; never raises (problems land in `errors`)."""
        store = cls(directory=directory, miss_ttl=miss_ttl, max_leaves=max_leaves)
        root = Path(directory)
        try:
            files = sorted(p for p in root.iterdir()
                           if p.suffix in (".pem", ".crt") and not p.name.endswith(".leaf.pem"))
        except OSError as exc:
            store.errors.append(f"{root}: {exc.strerror or exc}")
            files = []
        for path in files:
            try:
                if path.stat().st_size > MAX_CA_FILE:
                    raise ValueError(f"larger than {MAX_CA_FILE} bytes")
                for cert in _load_certs(path.read_bytes()):
                    store.add_ca(cert)
            except (OSError, ValueError) as exc:
                store.errors.append(f"{path.name}: {exc}")
        if not store._anchors:
            store.errors.append(f"{root}: no trusted CA certificate")
        for err in store.errors:
            log.error("STIR trust store: %s", err)
        return store

    @property
    def ca_count(self) -> int:
        return sum(len(v) for v in self._anchors.values())

    def add_ca(self, cert: x509.Certificate) -> None:
        """Trust `cert` as an issuer of leaf (or intermediate) certificates."""
        if not _is_ca(cert):
            raise ValueError(f"{cert.subject.rfc4514_string()[:60]} is not a CA certificate")
        self._anchors.setdefault(cert.subject, []).append(cert)

    def add_leaf(self, x5u: str, pem: bytes | str, *, now: float | None = None) -> x509.Certificate:
        """Verify what `x5u` serves (leaf first, optional intermediate after it) against the
        trusted CAs and cache it. Raises ValueError, and remembers the refusal for `miss_ttl`
        seconds, when it does not chain, is not an EC P-256 end-entity certificate, or is
        outside its validity at `now` (default: the wall clock)."""
        try:
            leaf = self._build(pem, time.time() if now is None else now)
        except ValueError as exc:
            self._remember_miss(x5u, f"certificate rejected: {exc}")
            raise
        if x5u not in self._leaves and len(self._leaves) >= self.max_leaves:
            self._leaves.pop(next(iter(self._leaves)))
        self._leaves[x5u] = leaf
        self._misses.pop(x5u, None)
        return leaf.cert

    def leaf_for(self, x5u: str, now: float | None = None) -> x509.Certificate | None:
        """The cached (or trust-directory) leaf for `x5u`, valid at `now`; None otherwise."""
        leaf, _ = self._find(x5u, time.time() if now is None else now)
        return None if leaf is None else leaf.cert

    def lookup(self, x5u: str, now: float) -> tuple[ec.EllipticCurvePublicKey | None, str]:
        """The leaf's public key, or None and why (the hot path of `verify`)."""
        leaf, why = self._find(x5u, now)
        return (None, why) if leaf is None else (leaf.key, "")

    def _find(self, x5u: str, now: float) -> tuple[_Leaf | None, str]:
        leaf = self._leaves.get(x5u)
        if leaf is not None:
            if leaf.not_before <= now <= leaf.not_after:
                return leaf, ""
            del self._leaves[x5u]  # perhaps the fetcher has stored a renewed one
            self._misses.pop(x5u, None)
        if not self._anchors:
            return None, "no trusted CA certificates"
        miss = self._misses.get(x5u)
        if miss is not None and miss[0] > time.monotonic():
            return None, miss[1]
        why = "certificate not cached"
        if self.directory is not None:
            path = self.directory / leaf_filename(x5u)
            try:
                with path.open("rb") as f:
                    data = f.read(MAX_CERT_BYTES + 1)
            except FileNotFoundError:
                pass
            except OSError as exc:
                why = f"certificate file unreadable: {exc.strerror or exc}"
            else:
                try:
                    if len(data) > MAX_CERT_BYTES:
                        raise ValueError(f"larger than {MAX_CERT_BYTES} bytes")
                    self.add_leaf(x5u, data, now=now)
                except ValueError as exc:
                    return None, f"certificate rejected: {exc}"
                return self._leaves[x5u], ""
        self._remember_miss(x5u, why)
        return None, why

    def _remember_miss(self, x5u: str, why: str) -> None:
        if len(self._misses) >= self.max_leaves:
            self._misses.clear()
        self._misses[x5u] = (time.monotonic() + self.miss_ttl, why)

    def _build(self, pem: bytes | str, now: float) -> _Leaf:
        data = pem.encode("ascii", "replace") if isinstance(pem, str) else pem
        if len(data) > MAX_CERT_BYTES:
            raise ValueError(f"larger than {MAX_CERT_BYTES} bytes")
        certs = _load_certs(data)
        cert, extra = certs[0], certs[1:4]
        key = cert.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
            raise ValueError("leaf key is not EC P-256")
        if _is_ca(cert):
            raise ValueError("leaf is a CA certificate")
        try:
            ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        except x509.ExtensionNotFound:
            pass
        else:
            if not ku.digital_signature:
                raise ValueError("leaf key usage does not allow digitalSignature")
        window = self._chain_window(cert, extra)
        if window is None:
            raise ValueError("does not chain to a trusted CA")
        if now < window[0]:
            raise ValueError("certificate chain not yet valid")
        if now > window[1]:
            raise ValueError("certificate chain expired")
        return _Leaf(cert, key, window[0], window[1])

    def _chain_window(self, cert: x509.Certificate,
                      extra: Sequence[x509.Certificate]) -> tuple[float, float] | None:
        for anchor in self._anchors.get(cert.issuer, ()):
            if _issued_by(cert, anchor):
                return _window(cert, anchor)
        for inter in extra:
            if inter.subject != cert.issuer or not _is_ca(inter) or not _issued_by(cert, inter):
                continue
            for anchor in self._anchors.get(inter.issuer, ()):
                if _issued_by(inter, anchor):
                    return _window(cert, inter, anchor)
        return None


# ---------------------------------------------------------------------------------------------
# verification


@dataclass(frozen=True, slots=True)
class Verification:
    """Outcome of `verify`. `attest` is the verified attestation, or the claimed one when
    "unverified"; None when "invalid" or "absent"."""

    status: str  # verified | unverified | invalid | absent
    attest: str | None = None
    reason: str = ""
    passport: Passport | None = None


def parse_any(text: str) -> IdentityHeader:
    """The first SHAKEN value of a (possibly comma-joined) Identity header; ValueError with
    the first value's problem when none parses."""
    _check_text(text)
    values = split_values(text)
    if not values:
        raise ValueError("empty Identity header")
    first: ValueError | None = None
    for value in values:
        try:
            return IdentityHeader.parse(value)
        except ValueError as exc:
            first = first or exc
    assert first is not None
    raise first


def verify(identity_text: str, *, orig_tn: str | Sequence[str], dest_tn: str, now: float,
           max_age: float, trust: TrustStore | None, skew: float = CLOCK_SKEW) -> Verification:
    """Verify a SHAKEN Identity header against the call; never raises (see module doc)."""
    try:
        return _verify(identity_text, orig_tn, dest_tn, now, max_age, trust, skew)
    except Exception as exc:  # a bug here must not cost a legitimate call more than "unsigned"
        log.exception("STIR verification failed")
        return Verification(UNVERIFIED, None, f"verification error: {type(exc).__name__}")


def _verify(text: str, orig_tn: str | Sequence[str], dest_tn: str, now: float, max_age: float,
            trust: TrustStore | None, skew: float) -> Verification:
    if not isinstance(text, str) or not text.strip():
        return Verification(ABSENT, None, "no Identity header")
    try:
        ident = parse_any(text)
    except ValueError as exc:
        return Verification(INVALID, None, str(exc))
    pp = ident.passport
    claims = pp.claims
    if ident.info != pp.header.x5u:
        return Verification(INVALID, None, "info parameter differs from x5u", pp)
    age = now - claims.iat
    if age > max_age + skew:
        return Verification(INVALID, None, f"iat {age:.0f} s old (max {max_age:g} s)", pp)
    if age < -skew:
        return Verification(INVALID, None, f"iat {-age:.0f} s in the future", pp)
    callers = (orig_tn,) if isinstance(orig_tn, str) else tuple(orig_tn)
    if not any(same_number(claims.orig_tn, c) for c in callers):
        shown = ", ".join(_show(c, 20) for c in callers if c) or "none"
        return Verification(INVALID, None,
                            f"orig.tn {claims.orig_tn} does not match caller {shown}", pp)
    if not any(same_number(tn, dest_tn) for tn in claims.dest_tn):
        return Verification(INVALID, None,
                            f"dest.tn does not contain callee {_show(dest_tn, 20)}", pp)
    if trust is None:
        return Verification(UNVERIFIED, claims.attest, "no trust store configured", pp)
    key, why = trust.lookup(pp.header.x5u, now)
    if key is None:
        return Verification(UNVERIFIED, claims.attest, why, pp)
    sig = ident.signature
    der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
    try:
        key.verify(der, ident.signing_input, _ECDSA)
    except InvalidSignature:
        return Verification(INVALID, None, "signature does not verify", pp)
    return Verification(VERIFIED, claims.attest, "signature verified", pp)


# ---------------------------------------------------------------------------------------------
# out-of-band x5u fetcher (never call this on the INVITE path)


class FetchError(Exception):
    """An x5u fetch was refused or failed."""


def host_allowed(url: str, allowed_hosts: Iterable[str]) -> bool:
    """Is `url` an http(s) URL, without credentials, on an allow-listed host? An entry
    'host' allows the scheme's default port only; 'host:port' allows exactly that port."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        return False
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname or "@" in parts.netloc:
        return False
    default = 443 if scheme == "https" else 80
    host = parts.hostname.lower()
    allowed = {h.strip().lower() for h in allowed_hosts if h.strip()}
    want = f"{host}:{port if port is not None else default}"
    return want in allowed or (host in allowed and (port is None or port == default))


def fetch_x5u(url: str, allowed_hosts: Iterable[str], timeout: float = 2.0) -> bytes:
    """GET an x5u certificate for the out-of-band fetcher: refuses non-allow-listed hosts
    (before connecting), non-200 answers, redirects, and bodies over 16 KB; `timeout` bounds
    the whole exchange. Raises FetchError."""
    if len(url) > MAX_URL or not host_allowed(url, allowed_hosts):
        raise FetchError(f"x5u {_show(url, 80)} is not on an allow-listed host")
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "", parts.port
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    deadline = time.monotonic() + timeout
    conn: http.client.HTTPConnection
    if parts.scheme.lower() == "https":
        conn = http.client.HTTPSConnection(host, port, timeout=timeout,
                                           context=ssl.create_default_context())
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", target, headers={
            "Accept": "application/pem-certificate-chain, application/x-pem-file, */*",
            "User-Agent": "spitwall-x5u-fetcher"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise FetchError(f"x5u answered HTTP {resp.status}")
        length = resp.getheader("Content-Length")
        if length is not None and length.strip().isdigit() and int(length) > MAX_CERT_BYTES:
            raise FetchError(f"x5u body of {int(length)} bytes exceeds {MAX_CERT_BYTES}")
        body = bytearray()
        while len(body) <= MAX_CERT_BYTES:
            if time.monotonic() > deadline:
                raise FetchError("x5u fetch timed out")
            chunk = resp.read1(4096)
            if not chunk:
                break
            body += chunk
        if len(body) > MAX_CERT_BYTES:
            raise FetchError(f"x5u body exceeds {MAX_CERT_BYTES} bytes")
        return bytes(body)
    except (OSError, http.client.HTTPException) as exc:
        raise FetchError(f"x5u fetch failed: {type(exc).__name__}: {exc}") from None
    finally:
        conn.close()
