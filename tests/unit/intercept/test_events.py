"""srtp key event bodies, CALEA-style call events, and S/MIME envelope round trips."""

from __future__ import annotations

import base64
import datetime as dt
import json
from email.parser import BytesParser

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

from intercept.events import (
    CALL_EVENT_VERSION,
    CALL_EVENTS,
    KEY_EVENT_CONTENT_TYPE,
    call_event,
    envelope,
    key_event_body,
)
from intercept.keys import CryptoAttribute, extract
from media.sdp import SessionDescription
from tests.unit.intercept.test_keys import DTLS, SDES_ANSWER, SDES_OFFER

OFFER_KEY = "WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz|2^20|1:4"
ANSWER_KEY = "PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR|2^20|1:4"


def _self_signed(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "recorder.test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def recipient() -> tuple[rsa.RSAPrivateKey, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key, _self_signed(key)


def open_envelope(der: bytes, key: rsa.RSAPrivateKey, cert_pem: bytes) -> tuple[str, bytes]:
    """Test-only: decrypt DER enveloped-data, split the MIME entity into (Content-Type, body)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    entity = pkcs7.pkcs7_decrypt_der(der, cert, key, [])
    head, sep, body = entity.partition(b"\r\n\r\n")
    assert sep, "inner entity has no header/body separator"
    message = BytesParser().parsebytes(head + b"\r\n\r\n")
    return str(message["Content-Type"]), body


def _attrs(body: str, name: str) -> list[str]:
    return [line[len(name) + 3:] for line in body.split("\r\n") if line.startswith(f"a={name}:")]


def test_target_offerer_keys_and_ssrc() -> None:
    body = key_event_body(
        extract(SDES_OFFER), extract(SDES_ANSWER),
        call_id="a84b4c76e66710@pc33.example.com", liid="CASE-1", event_id="e1", target="offerer",
    )
    sdp = SessionDescription.parse(body)  # the body is valid SDP
    assert sdp.attribute_values("x-liid") == ["CASE-1"]
    assert sdp.attribute_values("x-call-id") == ["a84b4c76e66710@pc33.example.com"]
    assert sdp.attribute_values("x-event-id") == ["e1"]
    assert sdp.attribute_values("x-target") == ["offerer"]
    audio, video = sdp.media
    # remote transport address = the answerer's
    assert (audio.connection_address, audio.port) == ("168.2.17.11", 32640)
    assert audio.attribute_values("x-key-method") == ["sdes"]
    assert audio.direction == "sendrecv"
    assert audio.attribute_values("crypto") == [
        f"1 AES_CM_128_HMAC_SHA1_80 inline:{OFFER_KEY} FEC_ORDER=FEC_SRTP SSRC=314159"
    ]
    assert audio.attribute_values("rcrypto") == [
        f"1 AES_CM_128_HMAC_SHA1_80 inline:{ANSWER_KEY} SSRC=2718281"
    ]
    # rejected video: listed, port 0, no keys
    assert video.port == 0 and not video.has_attribute("crypto")
    assert not video.has_attribute("rcrypto")


def test_target_answerer_swaps_sides() -> None:
    body = key_event_body(
        extract(SDES_OFFER), extract(SDES_ANSWER),
        call_id="c1", liid="CASE-1", event_id="e2", target="answerer",
    )
    audio = SessionDescription.parse(body).media[0]
    assert (audio.connection_address, audio.port) == ("168.2.17.12", 49170)
    assert _attrs(body, "crypto") == [f"1 AES_CM_128_HMAC_SHA1_80 inline:{ANSWER_KEY} SSRC=2718281"]
    assert _attrs(body, "rcrypto") == [
        f"1 AES_CM_128_HMAC_SHA1_80 inline:{OFFER_KEY} FEC_ORDER=FEC_SRTP SSRC=314159"
    ]
    # the disclosed keys parse back (minus our SSRC= session param)
    crypto = CryptoAttribute.parse(_attrs(body, "crypto")[0])
    assert crypto.session_params == ("SSRC=2718281",)


def test_answer_selects_offer_tag_and_multiple_ssrcs() -> None:
    answer = SDES_ANSWER.replace(
        f"a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:{ANSWER_KEY}",
        f"a=crypto:2 F8_128_HMAC_SHA1_80 inline:{ANSWER_KEY}",
    ).replace("a=ssrc:2718281 cname:jill@example.com",
              "a=ssrc:11 cname:j\r\na=ssrc:12 cname:j\r\na=ssrc:11 label:x")
    body = key_event_body(extract(SDES_OFFER), extract(answer),
                          call_id="c", liid="L", event_id="e", target="offerer")
    crypto = _attrs(body, "crypto")
    assert len(crypto) == 1 and crypto[0].startswith("2 F8_128_HMAC_SHA1_80 ")
    assert ";" in crypto[0]  # both MKI keys of the offered line
    assert [r.rsplit(" ", 1)[1] for r in _attrs(body, "rcrypto")] == ["SSRC=11", "SSRC=12"]


def test_no_keys_in_signalling() -> None:
    answer = DTLS.replace("m=audio 9 ", "m=audio 7000 ")
    body = key_event_body(extract(DTLS), extract(answer),
                          call_id="c", liid="L", event_id="e", target="offerer")
    assert body.count("a=x-key-method:dtls-srtp") == 2
    assert "crypto" not in body


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"answer": []}, "offer has 2 m= lines, answer 0"),
        ({"offer": [], "answer": []}, "offer has no m= line"),
        ({"liid": "has space"}, "liid 'has space' must be"),
        ({"call_id": "a\r\nb"}, "call_id"),
        ({"event_id": ""}, "event_id"),
        ({"target": "caller"}, "target must be"),
        ({"answer_text": SDES_ANSWER.replace("a=crypto:1 ", "a=crypto:9 ")},
         "tag 9 is not in the offer"),
        ({"answer_text": SDES_ANSWER.replace("m=video 0", "m=text 0")},
         "offer has 'video', answer 'text'"),
    ],
)
def test_key_event_errors(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {
        "offer": extract(SDES_OFFER),
        "answer": extract(str(kwargs.pop("answer_text", SDES_ANSWER))),
        "call_id": "c", "liid": "L", "event_id": "e", "target": "offerer",
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        key_event_body(**args)  # type: ignore[arg-type]


def test_call_event_format() -> None:
    time = dt.datetime(2026, 1, 2, 4, 4, 5, 678901, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    text = call_event(
        "Release", liid="CASE-1", call_id="c@h", time=time, caller="sip:alice@example.com",
        callee="+15551234567", event_id="abc", reason="BYE", media=extract(SDES_OFFER),
    )
    event = json.loads(text)
    assert event == {
        "version": CALL_EVENT_VERSION, "event": "Release", "event_id": "abc",
        "liid": "CASE-1", "call_id": "c@h", "time": "2026-01-02T03:04:05.678Z",
        "caller": "sip:alice@example.com", "callee": "+15551234567", "reason": "BYE",
        "media": [
            {"index": 0, "media": "audio", "proto": "RTP/SAVP", "address": "168.2.17.12",
             "port": 49170, "direction": "sendrecv", "key_method": "sdes", "ssrcs": [314159]},
            {"index": 1, "media": "video", "proto": "RTP/SAVP", "address": "168.2.17.13",
             "port": 51372, "direction": "recvonly", "key_method": "sdes", "ssrcs": []},
        ],
    }
    assert "inline" not in text and "WVNf" not in text  # never keys


def test_call_event_kinds_and_ids() -> None:
    now = dt.datetime.now(dt.UTC)
    ids = set()
    for kind in CALL_EVENTS:
        event = json.loads(call_event(kind, liid="L", call_id="c", time=now, caller="a",  # type: ignore[arg-type]
                                      callee="b"))
        assert event["event"] == kind and "media" not in event and "reason" not in event
        ids.add(event["event_id"])
    assert len(ids) == len(CALL_EVENTS)
    assert set(CALL_EVENTS) == {"Origination", "TerminationAttempt", "Answer", "Release", "ReKey"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "Hangup"}, "kind 'Hangup' is not one of"),
        ({"time": dt.datetime(2026, 1, 1)}, "timezone-aware"),
        ({"liid": ""}, "liid must be 1-"),
        ({"caller": "a\nb"}, "control character"),
        ({"event_id": "x y"}, "event_id"),
        ({"callee": 5}, "callee must be str"),
    ],
)
def test_call_event_errors(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {
        "kind": "Answer", "liid": "L", "call_id": "c", "time": dt.datetime.now(dt.UTC),
        "caller": "a", "callee": "b",
    }
    args.update(kwargs)
    kind = args.pop("kind")
    with pytest.raises(ValueError, match=message):
        call_event(kind, **args)  # type: ignore[arg-type]


def test_envelope_round_trip_key_event(recipient: tuple[rsa.RSAPrivateKey, bytes]) -> None:
    key, cert = recipient
    body = key_event_body(extract(SDES_OFFER), extract(SDES_ANSWER),
                          call_id="c", liid="L", event_id="e", target="offerer").encode()
    der = envelope(body, KEY_EVENT_CONTENT_TYPE, cert)
    assert b"inline:" not in der and base64.b64decode(OFFER_KEY.split("|")[0]) not in der
    assert der[:1] == b"\x30"  # DER SEQUENCE
    content_type, opened = open_envelope(der, key, cert)
    assert content_type == "application/sdp" and opened == body
    # AES-256-CBC: the content-encryption OID appears in the DER
    assert bytes.fromhex("060960864801650304012a") in der  # 2.16.840.1.101.3.4.1.42


def test_envelope_round_trip_binary_and_json(recipient: tuple[rsa.RSAPrivateKey, bytes]) -> None:
    key, cert = recipient
    for body, ctype in (
        (bytes(range(256)) + b"\r\n\n\r", "application/octet-stream"),
        (call_event("Answer", liid="L", call_id="c", time=dt.datetime.now(dt.UTC), caller="é",
                    callee="b").encode(), "application/json; charset=utf-8"),
        (b"", "application/sdp"),
    ):
        der = envelope(body, ctype, cert)
        assert open_envelope(der, key, cert) == (ctype, body)
        assert der != envelope(body, ctype, cert)  # fresh content key each time


def test_envelope_wrong_key_fails(recipient: tuple[rsa.RSAPrivateKey, bytes]) -> None:
    _key, cert = recipient
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    der = envelope(b"v=0\r\n", "application/sdp", cert)
    with pytest.raises(ValueError):
        pkcs7.pkcs7_decrypt_der(der, x509.load_pem_x509_certificate(_self_signed(other)),
                                other, [])


def test_envelope_errors(recipient: tuple[rsa.RSAPrivateKey, bytes]) -> None:
    _key, cert = recipient
    with pytest.raises(ValueError, match="content type"):
        envelope(b"x", "application/sdp\r\nX-Evil: 1", cert)
    with pytest.raises(ValueError, match="content type"):
        envelope(b"x", "sdp", cert)
    with pytest.raises(ValueError, match=r"not a PEM X\.509 certificate"):
        envelope(b"x", "application/sdp", b"-----BEGIN CERTIFICATE-----\nAAAA\n")
    with pytest.raises(ValueError, match=r"not a PEM X\.509 certificate"):
        envelope(b"x", "application/sdp", b"junk")
    ec_cert = _self_signed(ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(ValueError, match="recipient certificate unusable"):
        envelope(b"x", "application/sdp", ec_cert)
    with pytest.raises(ValueError, match="body must be bytes"):
        envelope("x", "application/sdp", cert)  # type: ignore[arg-type]
