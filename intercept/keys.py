"""SRTP key extraction from one SDP body (offer or answer): SDES ``a=crypto`` (RFC 4568),
``a=ssrc`` (RFC 5576), and the keying method of each ``m=`` line.

Why this exists: the proxy sees every offer and answer of a call; with SDES the SRTP master keys
travel in those bodies, so a recorder or the intercept mediation function can decrypt the media
once it has them (issue 5, draft-wing-sipping-srtp-key). With DTLS-SRTP (``a=fingerprint``,
``UDP/TLS/RTP/SAVP``) or ZRTP (``a=zrtp-hash``) the keys are negotiated on the media path and are
*not* in signalling: `MediaKeys.key_method` says so, so that the event can tell the agency why no
key came instead of silently sending nothing.

Why so strict: the input is attacker-controlled (any caller writes the offer), and a crypto line
that is half-understood is worse than none -- a recorder handed a key with the wrong length or
the wrong MKI cannot decrypt and nobody notices until the recording is needed. So every parser
here either returns a fully checked value or raises `ValueError` naming what is wrong; nothing
else escapes (fuzzed in ``tests/unit/intercept/test_keys.py``).

Why the masking `__repr__`: key material must exist only in the proxy's memory and the
S/MIME-enveloped event (never in logs, Redis, headers or files). A dataclass's default repr would
print the key the first time anyone logs a `MediaKeys` or an exception carrying one, so
`KeyParam` and `CryptoAttribute` print ``key=<masked>`` instead; `CryptoAttribute.serialize` is the
one deliberate way to get the key text back (for the event body). Error messages never quote
the ``inline:`` value either.

RFC 4568 grammar as implemented (§9.1, with the suites of RFC 4568 §6.2, RFC 6188 and RFC 7714)::

    a=crypto:<tag> <crypto-suite> <key-params> [<session-param> ...]
    tag          = 1*9DIGIT
    key-params   = key-param *(";" key-param)
    key-param    = "inline:" <base64(key || salt)> ["|" lifetime] ["|" mki-value ":" mki-length]
    lifetime     = ["2^"] 1*DIGIT              ; 1 .. 2^48 packets (every suite's maximum)
    mki-length   = 1 .. 128 (bytes); mki-value < 256^mki-length

Several key params need an MKI each, all of the same length, with distinct values (RFC 4568
§6.1: the MKI is how the receiver tells the keys apart). Base64 padding may be omitted (seen in
the wild); anything outside the base64 alphabet is an error.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from media.sdp import MediaDescription, SessionDescription

# suite -> (master key bytes, master salt bytes)
SUITES: dict[str, tuple[int, int]] = {
    "AES_CM_128_HMAC_SHA1_80": (16, 14),  # RFC 4568 §6.2.1
    "AES_CM_128_HMAC_SHA1_32": (16, 14),  # RFC 4568 §6.2.2
    "F8_128_HMAC_SHA1_80": (16, 14),  # RFC 4568 §6.2.3
    "AES_192_CM_HMAC_SHA1_80": (24, 14),  # RFC 6188
    "AES_192_CM_HMAC_SHA1_32": (24, 14),  # RFC 6188
    "AES_256_CM_HMAC_SHA1_80": (32, 14),  # RFC 6188
    "AES_256_CM_HMAC_SHA1_32": (32, 14),  # RFC 6188
    "AEAD_AES_128_GCM": (16, 12),  # RFC 7714 §14.2
    "AEAD_AES_256_GCM": (32, 12),  # RFC 7714 §14.2
}

MAX_LIFETIME = 2**48
MAX_MKI_LENGTH = 128
MAX_KEY_PARAMS = 16
MAX_CRYPTO_VALUE = 4096

KEY_METHODS = ("sdes", "dtls-srtp", "zrtp", "unknown", "none")

_TAG = re.compile(r"[0-9]{1,9}")
_SUITE = re.compile(r"[A-Za-z0-9_]{1,64}")
_B64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")
_LIFETIME = re.compile(r"(2\^)?([0-9]{1,20})")
_MKI = re.compile(r"([0-9]{1,310}):([0-9]{1,3})")  # 128-byte MKI: up to 309 decimal digits
_SESSION_PARAM = re.compile(r"[\x21-\x7e]{1,256}")
_SSRC = re.compile(r"([0-9]{1,10})\s+([!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+)(?::(.*))?", re.DOTALL)


def _show(text: str, limit: int = 40) -> str:
    return repr(text[:limit] + "...") if len(text) > limit else repr(text)


@dataclass(frozen=True, slots=True, repr=False)
class KeyParam:
    """One ``inline:`` key param: master key and salt (split per suite), lifetime in packets
    (None: the suite's default), MKI value and length in bytes (None: no MKI).
    ``lifetime_power`` records whether the lifetime was written ``2^n`` (for `serialize`)."""

    key: bytes
    salt: bytes
    lifetime: int | None = None
    mki: int | None = None
    mki_length: int | None = None
    lifetime_power: bool = True

    def __repr__(self) -> str:
        return (
            f"KeyParam(key=<masked {len(self.key)} bytes>, salt=<masked {len(self.salt)} bytes>,"
            f" lifetime={self.lifetime!r}, mki={self.mki!r}, mki_length={self.mki_length!r})"
        )

    __str__ = __repr__

    @classmethod
    def parse(cls, text: str, suite: str) -> KeyParam:
        """Parse ``inline:<key||salt>[|lifetime][|mki:length]`` for ``suite`` (a known suite)."""
        method, sep, info = text.partition(":")
        if not sep or method != "inline":
            raise ValueError(f"key param method {_show(method, 20)} is not 'inline'")
        parts = info.split("|")
        if len(parts) > 3:
            raise ValueError(f"key param has {len(parts) - 1} '|' fields, at most 2 allowed")
        material = _decode_key(parts[0])
        key_len, salt_len = SUITES[suite]
        if len(material) != key_len + salt_len:
            raise ValueError(
                f"{suite} needs {key_len + salt_len} bytes of key||salt "
                f"({key_len} + {salt_len}), inline key has {len(material)}"
            )
        lifetime: int | None = None
        power = True
        mki: int | None = None
        mki_length: int | None = None
        for position, field_text in enumerate(parts[1:], 1):
            if ":" in field_text:
                if mki is not None:
                    raise ValueError("key param has two MKI fields")
                mki, mki_length = _parse_mki(field_text)
            else:
                if mki is not None:
                    raise ValueError("key param lifetime comes after the MKI")
                if lifetime is not None or position != 1:
                    raise ValueError("key param has two lifetime fields")
                lifetime, power = _parse_lifetime(field_text)
        return cls(material[:key_len], material[key_len:], lifetime, mki, mki_length, power)

    def serialize(self) -> str:
        """The key param text, KEY MATERIAL INCLUDED: only for the enveloped event body."""
        text = "inline:" + base64.b64encode(self.key + self.salt).decode("ascii")
        if self.lifetime is not None:
            exponent = self.lifetime.bit_length() - 1
            if self.lifetime_power and self.lifetime == 1 << exponent:
                text += f"|2^{exponent}"
            else:
                text += f"|{self.lifetime}"
        if self.mki is not None:
            text += f"|{self.mki}:{self.mki_length}"
        return text


def _decode_key(text: str) -> bytes:
    if not text:
        raise ValueError("inline key is empty")
    if len(text) > 1024 or not _B64.fullmatch(text):
        raise ValueError("inline key is not base64 (RFC 4648 alphabet)")
    if len(text) % 4 == 1 or ("=" in text and len(text) % 4):
        raise ValueError("inline key is not valid base64 (bad length or padding)")
    padded = text + "=" * (-len(text) % 4)
    try:
        return base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("inline key is not valid base64") from None


def _parse_lifetime(text: str) -> tuple[int, bool]:
    match = _LIFETIME.fullmatch(text)
    if not match:
        raise ValueError(f"key lifetime {_show(text)} is not '2^<n>' or a decimal number")
    if match[1]:
        exponent = int(match[2])
        if exponent > 48:
            raise ValueError(f"key lifetime 2^{exponent} is larger than 2^48")
        return 1 << exponent, True
    value = int(match[2])
    if not 1 <= value <= MAX_LIFETIME:
        raise ValueError(f"key lifetime {value} is not in 1..2^48")
    return value, False


def _parse_mki(text: str) -> tuple[int, int]:
    match = _MKI.fullmatch(text)
    if not match:
        raise ValueError(f"MKI {_show(text)} is not '<value>:<length>'")
    length = int(match[2])
    if not 1 <= length <= MAX_MKI_LENGTH:
        raise ValueError(f"MKI length {length} is not in 1..{MAX_MKI_LENGTH}")
    value = int(match[1])
    if value.bit_length() > 8 * length:
        raise ValueError(f"MKI value does not fit in {length} byte(s)")
    return value, length


@dataclass(frozen=True, slots=True, repr=False)
class CryptoAttribute:
    """One ``a=crypto`` value: tag, suite (upper case), key params, session params as sent."""

    tag: int
    suite: str
    keys: tuple[KeyParam, ...]
    session_params: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return (
            f"CryptoAttribute(tag={self.tag}, suite={self.suite!r}, "
            f"keys=<{len(self.keys)} masked>, session_params={self.session_params!r})"
        )

    __str__ = __repr__

    @property
    def key_length(self) -> int:
        return SUITES[self.suite][0]

    @classmethod
    def parse(cls, value: str) -> CryptoAttribute:
        """Parse the value of an ``a=crypto`` line (what follows ``a=crypto:``)."""
        if not isinstance(value, str):
            raise ValueError(f"crypto value must be str, not {type(value).__name__}")
        if len(value) > MAX_CRYPTO_VALUE:
            raise ValueError(f"crypto value is longer than {MAX_CRYPTO_VALUE} characters")
        fields = value.split()
        if len(fields) < 3:
            raise ValueError(
                f"crypto has {len(fields)} fields, expected at least 3 (tag suite key-params)"
            )
        tag_text, suite_text, key_text, *session = fields
        if not _TAG.fullmatch(tag_text):
            raise ValueError(f"crypto tag {_show(tag_text)} is not 1-9 digits")
        if not _SUITE.fullmatch(suite_text) or suite_text.upper() not in SUITES:
            raise ValueError(
                f"crypto suite {_show(suite_text)} is not one of {', '.join(SUITES)}"
            )
        suite = suite_text.upper()
        pieces = key_text.split(";")
        if len(pieces) > MAX_KEY_PARAMS:
            raise ValueError(f"crypto has more than {MAX_KEY_PARAMS} key params")
        keys: list[KeyParam] = []
        for number, piece in enumerate(pieces, 1):
            try:
                keys.append(KeyParam.parse(piece, suite))
            except ValueError as exc:
                raise ValueError(f"crypto key param {number}: {exc}") from None
        if len(keys) > 1:
            if any(k.mki is None for k in keys):
                raise ValueError("crypto has several key params but not every one has an MKI")
            if len({k.mki_length for k in keys}) != 1:
                raise ValueError("crypto key params have different MKI lengths")
            if len({k.mki for k in keys}) != len(keys):
                raise ValueError("crypto key params repeat an MKI value")
        for param in session:
            if not _SESSION_PARAM.fullmatch(param):
                raise ValueError(f"crypto session param {_show(param)} is not visible ASCII")
        return cls(int(tag_text), suite, tuple(keys), tuple(session))

    def serialize(self, extra_params: tuple[str, ...] = ()) -> str:
        """The ``a=crypto`` value, KEY MATERIAL INCLUDED: only for the enveloped event body.
        ``extra_params`` are appended as session params (e.g. ``SSRC=...``)."""
        keys = ";".join(k.serialize() for k in self.keys)
        return " ".join((str(self.tag), self.suite, keys, *self.session_params, *extra_params))


@dataclass(frozen=True, slots=True)
class SsrcAttribute:
    """An ``a=ssrc:<id> <attribute>[:<value>]`` line (RFC 5576)."""

    ssrc: int
    attribute: str
    value: str | None = None

    @classmethod
    def parse(cls, value: str) -> SsrcAttribute:
        match = _SSRC.fullmatch(value.strip())
        if not match:
            raise ValueError(f"ssrc {_show(value)} is not '<ssrc-id> <attribute>[:<value>]'")
        ssrc = int(match[1])
        if ssrc > 0xFFFFFFFF:
            raise ValueError(f"ssrc id {ssrc} is larger than 2^32-1")
        return cls(ssrc, match[2], match[3])


@dataclass(frozen=True, slots=True)
class MediaKeys:
    """What one ``m=`` line says about its SRTP keys.

    ``key_method`` is, in this order of precedence:

    * ``"dtls-srtp"``: the protocol is ``UDP/TLS/...`` (crypto lines there are ignored by the
      endpoints, RFC 5764), or there is no ``a=crypto`` but an ``a=fingerprint`` (media or
      session level): keys are negotiated in the DTLS handshake, not in signalling;
    * ``"sdes"``: ``a=crypto`` lines are present (``crypto`` holds them, offer order);
    * ``"zrtp"``: ``a=zrtp-hash`` (RFC 6189), keys agreed on the media path;
    * ``"unknown"``: a secure profile (``SAVP``/``SAVPF``) with none of the above (e.g. MIKEY
      ``a=key-mgmt``): encrypted, keys not disclosed by us;
    * ``"none"``: plain RTP (``RTP/AVP``...) or a non-RTP stream: nothing is encrypted.

    ``address`` is the media-level ``c=``, else the session's (None when neither); ``port`` 0
    marks a rejected or disabled stream; ``formats`` are the m= line's formats as sent.
    """

    index: int
    media: str
    proto: str
    address: str | None
    port: int
    direction: str
    key_method: str
    formats: tuple[str, ...] = ()
    crypto: tuple[CryptoAttribute, ...] = ()
    ssrcs: tuple[SsrcAttribute, ...] = ()
    fingerprints: tuple[str, ...] = ()

    @property
    def ssrc_ids(self) -> tuple[int, ...]:
        """The distinct SSRC ids of the ``a=ssrc`` lines, first-seen order."""
        return tuple(dict.fromkeys(s.ssrc for s in self.ssrcs))

    def crypto_by_tag(self, tag: int) -> CryptoAttribute | None:
        return next((c for c in self.crypto if c.tag == tag), None)


def _key_method(media: MediaDescription, crypto: bool, fingerprint: bool, zrtp: bool) -> str:
    parts = media.proto.upper().split("/")
    if ("TLS" in parts and "UDP" in parts) or parts[:2] == ["TCP", "TLS"]:
        return "dtls-srtp"
    if crypto:
        return "sdes"
    if fingerprint:
        return "dtls-srtp"
    if zrtp:
        return "zrtp"
    if any(p in ("SAVP", "SAVPF") for p in parts):
        return "unknown"
    return "none"


def _media_keys(index: int, media: MediaDescription, session: SessionDescription) -> MediaKeys:
    crypto: list[CryptoAttribute] = []
    for value in media.attribute_values("crypto"):
        attribute = CryptoAttribute.parse(value)
        if any(c.tag == attribute.tag for c in crypto):
            raise ValueError(f"two a=crypto lines with tag {attribute.tag}")
        crypto.append(attribute)
    ssrcs = tuple(SsrcAttribute.parse(v) for v in media.attribute_values("ssrc"))
    fingerprints = tuple(
        media.attribute_values("fingerprint") or session.attribute_values("fingerprint")
    )
    zrtp = media.has_attribute("zrtp-hash") or bool(session.attribute_values("zrtp-hash"))
    return MediaKeys(
        index=index,
        media=media.media,
        proto=media.proto,
        address=media.connection_address,
        port=media.port,
        direction=media.direction,
        key_method=_key_method(media, bool(crypto), bool(fingerprints), zrtp),
        formats=media.formats,
        crypto=tuple(crypto),
        ssrcs=ssrcs,
        fingerprints=fingerprints,
    )


def extract(sdp_text: str | bytes) -> list[MediaKeys]:
    """The keys and keying method of every ``m=`` line of one SDP body, in order.

    `ValueError` (naming the m= line and the problem, never quoting key material) for any
    malformed SDP, crypto or ssrc line; no other exception."""
    session = SessionDescription.parse(sdp_text)
    out: list[MediaKeys] = []
    for index, media in enumerate(session.media):
        try:
            out.append(_media_keys(index, media, session))
        except ValueError as exc:
            raise ValueError(f"m= line {index + 1} ({media.media}): {exc}") from None
    return out
