"""Event bodies for recording and lawful intercept, and their S/MIME envelope.

Why: issue 5 delivers two kinds of events about a provisioned target's calls, and both must be
unreadable to anyone but the recipient (recorder or mediation function) from the moment they
leave the proxy's memory -- Redis, the delivery worker and the SIP hops only ever see ciphertext.

1. **Key events** (`key_event_body`), the body of the SIP event package ``srtp`` of
   draft-wing-sipping-srtp-key: an ``application/sdp`` document that describes the target's
   media streams with the SRTP keys in use, so that a recorder can decrypt both directions.
   Layout (CRLF lines)::

       v=0
       o=spitwall 0 0 IN IP4 0.0.0.0
       s=srtp
       t=0 0
       a=x-liid:<liid>
       a=x-call-id:<Call-ID of the intercepted call>
       a=x-event-id:<event id>
       a=x-target:offerer|answerer
       m=<media> <peer port> <proto> <formats>        one per m= line of the offer, same order
       c=IN IP4|IP6 <peer address>
       a=x-key-method:sdes|dtls-srtp|zrtp|unknown|none
       a=<target's direction: sendrecv|sendonly|recvonly|inactive>
       a=crypto:<tag> <suite> inline:<key||salt>[|..] [params] [SSRC=<id>]
       a=rcrypto:<tag> <suite> inline:<key||salt>[|..] [params] [SSRC=<id>]

   Which key goes where, relative to the **target** (the party the event is about; the body
   reads as if the target had published it itself, as the draft intends):

   * SDES (RFC 4568 §6.1) keys are declared by the party that *sends* with them. The answer
     carries exactly one ``a=crypto``; its tag selects the offer's line that is in use.
   * ``a=crypto`` = the target's **sending** key: from the target's own SDP (the offer when the
     target is the offerer, the answer when it is the answerer), with ``SSRC=<id>`` for each
     SSRC that the target's SDP announces (``a=ssrc``; one line per SSRC, same tag and key; no
     ``SSRC=`` when none is announced).
   * ``a=rcrypto`` = the target's **receiving** key, i.e. the peer's sending key: from the other
     SDP, with the peer's SSRCs the same way.
   * ``c=`` / ``m=`` port = the **remote** transport address as seen from the target: where the
     peer receives (and, with symmetric RTP, sends from), taken from the peer's SDP. Address
     ``0.0.0.0`` when the peer's SDP has no ``c=``.
   * ``a=x-key-method`` is the method the *answer* settled on (the answer decides). For
     ``dtls-srtp``, ``zrtp``, ``unknown`` and ``none`` no key lines follow: the keys are not in
     signalling (or there are none), and this line tells the agency why. A rejected stream
     (answer port 0) is listed with port 0 and no keys.

   The ``x-`` attributes are ours (the draft identifies the call by the PUBLISH's own headers,
   which do not survive our store-and-forward delivery): the recipient needs the case, the
   intercepted call and an id to discard redeliveries.

2. **Call-identifying events** (`call_event`), CALEA style, message names from ATIS-1000678 /
   PacketCable Electronic Surveillance: ``Origination`` (target calls out),
   ``TerminationAttempt`` (a call to the target), ``Answer``, ``Release``; plus ``ReKey`` (our
   name; new keys or a new key method on re-INVITE/UPDATE) -- its key event carries the keys.
   ``application/json``, UTF-8, keys sorted::

       {"version": 1,                       # this format's version; bump on incompatible change
        "event": "Origination",            # one of CALL_EVENTS
        "event_id": "<32 hex or given>",   # unique per event; recipients drop repeats
        "liid": "<case id>",
        "call_id": "<SIP Call-ID>",
        "time": "2026-01-02T03:04:05.678Z",  # UTC, millisecond precision
        "caller": "<URI or number>", "callee": "<URI or number>",
        "reason": "<text>",                # optional: e.g. "BYE", "487 Request Terminated"
        "media": [                          # optional: per m= line, NO keys
          {"index": 0, "media": "audio", "proto": "RTP/SAVP", "address": "192.0.2.1",
           "port": 4000, "direction": "sendrecv", "key_method": "sdes", "ssrcs": [1234]}]}

3. **Envelope** (`envelope`): S/MIME (RFC 8551) ``application/pkcs7-mime;
   smime-type=enveloped-data`` to the recipient certificate, AES-256-CBC content encryption
   (the library's choice is AES-128/256-CBC; GCM (AuthEnvelopedData) is not offered), RSA key
   transport. The plaintext is a MIME entity (``Content-Type`` of the inner body, then the
   body), as RFC 3261 §23.3 prescribes for S/MIME bodies in SIP. Output is **DER** (binary),
   because SIP carries bodies 8-bit clean and RFC 3261 §23.4 uses binary S/MIME bodies: the
   SIP message supplies the outer headers (`SMIME_CONTENT_TYPE`, `SMIME_CONTENT_DISPOSITION`),
   and base64 with mail headers would add a third of the size for nothing, also in Redis.
"""

from __future__ import annotations

import ipaddress
import json
import re
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Literal

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.serialization import pkcs7

from intercept.keys import CryptoAttribute, MediaKeys

CALL_EVENT_VERSION = 1
CALL_EVENTS = ("Origination", "TerminationAttempt", "Answer", "Release", "ReKey")
CallEventKind = Literal["Origination", "TerminationAttempt", "Answer", "Release", "ReKey"]
Target = Literal["offerer", "answerer"]

KEY_EVENT_CONTENT_TYPE = "application/sdp"
CALL_EVENT_CONTENT_TYPE = "application/json"
SMIME_CONTENT_TYPE = 'application/pkcs7-mime; smime-type=enveloped-data; name="smime.p7m"'
SMIME_CONTENT_DISPOSITION = 'attachment; handling=required; filename="smime.p7m"'

MAX_FIELD = 1024

_SDP_VALUE = re.compile(r"[\x21-\x7e]+")  # one SDP token-ish field: visible ASCII, no spaces
_CONTENT_TYPE = re.compile(
    r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+/[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+"
    r"(?:\s*;\s*[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+=(?:[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+|\"[^\"\\\r\n]*\"))*"
)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _show(text: str, limit: int = 40) -> str:
    return repr(text[:limit] + "...") if len(text) > limit else repr(text)


def _sdp_field(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be str, not {type(value).__name__}")
    if not value or len(value) > MAX_FIELD or not _SDP_VALUE.fullmatch(value):
        raise ValueError(
            f"{what} {_show(value)} must be 1-{MAX_FIELD} visible ASCII characters, no spaces"
        )
    return value


def _text_field(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be str, not {type(value).__name__}")
    if not value or len(value) > MAX_FIELD:
        raise ValueError(f"{what} must be 1-{MAX_FIELD} characters")
    if _CONTROL.search(value):
        raise ValueError(f"{what} {_show(value)} contains a control character")
    return value


def _connection(address: str | None) -> str:
    if address is None:
        return "IN IP4 0.0.0.0"
    try:
        version = ipaddress.ip_address(address).version
    except ValueError:
        version = 4  # a host name: RFC 8866 examples use IP4
    return f"IN IP{version} {address}"


def _key_lines(
    name: str, crypto: CryptoAttribute | None, ssrcs: tuple[int, ...]
) -> list[str]:
    if crypto is None:
        return []
    if not ssrcs:
        return [f"a={name}:{crypto.serialize()}"]
    return [f"a={name}:{crypto.serialize((f'SSRC={ssrc}',))}" for ssrc in ssrcs]


def _chosen(offer: MediaKeys, answer: MediaKeys) -> tuple[CryptoAttribute, CryptoAttribute]:
    """(offer's crypto in use, answer's crypto) for an SDES stream the answer accepted."""
    answer_crypto = answer.crypto[0]
    offer_crypto = offer.crypto_by_tag(answer_crypto.tag)
    if offer_crypto is None:
        raise ValueError(f"answer's crypto tag {answer_crypto.tag} is not in the offer")
    if offer_crypto.suite != answer_crypto.suite:
        raise ValueError(
            f"answer's crypto tag {answer_crypto.tag} has suite {answer_crypto.suite}, "
            f"the offer's {offer_crypto.suite}"
        )
    return offer_crypto, answer_crypto


def _media_section(offer: MediaKeys, answer: MediaKeys, target: Target) -> list[str]:
    if offer.media != answer.media:
        raise ValueError(
            f"m= line {offer.index + 1}: offer has {offer.media!r}, answer {answer.media!r}"
        )
    own, peer = (offer, answer) if target == "offerer" else (answer, offer)
    formats = " ".join(peer.formats or own.formats or ("0",))
    port = 0 if answer.port == 0 else peer.port
    lines = [
        f"m={peer.media} {port} {peer.proto} {formats}",
        f"c={_connection(peer.address)}",
        f"a=x-key-method:{answer.key_method}",
        f"a={own.direction}",
    ]
    if answer.port == 0 or answer.key_method != "sdes" or not answer.crypto:
        return lines
    offer_crypto, answer_crypto = _chosen(offer, answer)
    own_crypto, peer_crypto = (
        (offer_crypto, answer_crypto) if target == "offerer" else (answer_crypto, offer_crypto)
    )
    lines += _key_lines("crypto", own_crypto, own.ssrc_ids)
    lines += _key_lines("rcrypto", peer_crypto, peer.ssrc_ids)
    return lines


def key_event_body(
    offer: Sequence[MediaKeys],
    answer: Sequence[MediaKeys],
    *,
    call_id: str,
    liid: str,
    event_id: str,
    target: Target,
) -> str:
    """The ``srtp`` event body (``application/sdp``) for one offer/answer exchange of a call,
    from the point of view of ``target`` (see the module docstring for the exact layout).

    ``offer`` and ``answer`` are `intercept.keys.extract` results; they must have the same
    number of m= lines with the same media types (RFC 3264 §6). `ValueError` otherwise, or when
    the answer selects a crypto tag the offer does not have, or a field is not a visible-ASCII
    token. The result CONTAINS KEYS: pass it straight to `envelope`, never log or store it."""
    if target not in ("offerer", "answerer"):
        raise ValueError(f"target must be 'offerer' or 'answerer', not {target!r}")
    fields = [
        _sdp_field(liid, "liid"),
        _sdp_field(call_id, "call_id"),
        _sdp_field(event_id, "event_id"),
    ]
    if not offer:
        raise ValueError("offer has no m= line")
    if len(offer) != len(answer):
        raise ValueError(f"offer has {len(offer)} m= lines, answer {len(answer)}")
    lines = [
        "v=0",
        "o=spitwall 0 0 IN IP4 0.0.0.0",
        "s=srtp",
        "t=0 0",
        f"a=x-liid:{fields[0]}",
        f"a=x-call-id:{fields[1]}",
        f"a=x-event-id:{fields[2]}",
        f"a=x-target:{target}",
    ]
    for offered, answered in zip(offer, answer, strict=True):
        lines += _media_section(offered, answered, target)
    return "\r\n".join(lines) + "\r\n"


def _media_summary(media: MediaKeys) -> dict[str, object]:
    return {
        "index": media.index,
        "media": media.media,
        "proto": media.proto,
        "address": media.address,
        "port": media.port,
        "direction": media.direction,
        "key_method": media.key_method,
        "ssrcs": list(media.ssrc_ids),
    }


def call_event(
    kind: CallEventKind,
    *,
    liid: str,
    call_id: str,
    time: datetime,
    caller: str,
    callee: str,
    event_id: str | None = None,
    reason: str | None = None,
    media: Sequence[MediaKeys] = (),
) -> str:
    """A call-identifying event as JSON text (format in the module docstring; never contains
    keys, only each stream's key method). ``time`` must be timezone-aware; ``event_id``
    defaults to a fresh random UUID (hex) -- generate it once and keep it with the event, so
    that redeliveries carry the same id. `ValueError` on an unknown kind or a bad field."""
    if kind not in CALL_EVENTS:
        raise ValueError(f"call event kind {kind!r} is not one of {', '.join(CALL_EVENTS)}")
    if not isinstance(time, datetime) or time.utcoffset() is None:
        raise ValueError("call event time must be a timezone-aware datetime")
    offset = time.utcoffset() or timedelta(0)
    utc = (time.replace(tzinfo=None) - offset).isoformat(timespec="milliseconds") + "Z"
    event: dict[str, object] = {
        "version": CALL_EVENT_VERSION,
        "event": kind,
        "event_id": uuid.uuid4().hex if event_id is None else _sdp_field(event_id, "event_id"),
        "liid": _text_field(liid, "liid"),
        "call_id": _text_field(call_id, "call_id"),
        "time": utc,
        "caller": _text_field(caller, "caller"),
        "callee": _text_field(callee, "callee"),
    }
    if reason is not None:
        event["reason"] = _text_field(reason, "reason")
    if media:
        event["media"] = [_media_summary(m) for m in media]
    return json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def envelope(body: bytes, content_type: str,
             recipient_cert_pem: bytes | x509.Certificate) -> bytes:
    """``body`` (of type ``content_type``) as DER S/MIME enveloped-data for the certificate's
    RSA key, AES-256-CBC. The encrypted entity is ``Content-Type: <content_type>`` CRLF CRLF
    ``body``. Send it with `SMIME_CONTENT_TYPE` and `SMIME_CONTENT_DISPOSITION`.

    `ValueError` when the content type is not ``type/subtype[; param=value]`` on one line, the
    PEM holds no certificate, or the certificate's key is not RSA (the only key transport
    `cryptography` offers for PKCS#7 enveloping)."""
    if not isinstance(body, bytes | bytearray):
        raise ValueError(f"body must be bytes, not {type(body).__name__}")
    if not isinstance(content_type, str) or not _CONTENT_TYPE.fullmatch(content_type):
        raise ValueError(f"content type {_show(str(content_type))} is not 'type/subtype[;...]'")
    if isinstance(recipient_cert_pem, x509.Certificate):  # already parsed (hot path)
        certificate = recipient_cert_pem
    else:
        try:
            certificate = x509.load_pem_x509_certificate(bytes(recipient_cert_pem))
        except (ValueError, TypeError):
            raise ValueError("recipient certificate is not a PEM X.509 certificate") from None
    entity = f"Content-Type: {content_type}\r\n\r\n".encode("ascii") + bytes(body)
    try:
        builder = pkcs7.PKCS7EnvelopeBuilder().set_data(entity).add_recipient(certificate)
    except (TypeError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"recipient certificate unusable: {exc}") from None
    return builder.set_content_encryption_algorithm(algorithms.AES256).encrypt(
        serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary]
    )
