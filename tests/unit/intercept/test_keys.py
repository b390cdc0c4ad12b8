"""SDES key extraction: crypto attribute grammar per suite, key methods, masking, a fuzz."""

from __future__ import annotations

import base64
import logging
import random

import pytest

from intercept.keys import SUITES, CryptoAttribute, KeyParam, SsrcAttribute, extract


def crlf(text: str) -> str:
    return "".join(line + "\r\n" for line in text.strip("\n").split("\n"))


KEY30 = bytes(range(30))
B64_30 = base64.b64encode(KEY30).decode()  # 40 chars, no padding

RFC_KEY = "inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz|2^20|1:4"
F8_KEYS = (
    "inline:MTIzNDU2Nzg5QUJDREUwMTIzNDU2Nzg5QUJjZGVm|2^20|1:4;"
    "inline:QUJjZGVmMTIzNDU2Nzg5QUJDREUwMTIzNDU2Nzg5|2^20|2:4"
)

# RFC 4568 §8.1 example offer (key material from the RFC), plus a=ssrc and a second stream.
SDES_OFFER = crlf("""
v=0
o=sam 2890844526 2890842807 IN IP4 10.47.16.5
s=SRTP Discussion
i=A discussion of Secure RTP
c=IN IP4 168.2.17.12
t=2873397496 2873404696
m=audio 49170 RTP/SAVP 0
a=crypto:1 AES_CM_128_HMAC_SHA1_80 """ + RFC_KEY + """ FEC_ORDER=FEC_SRTP
a=crypto:2 F8_128_HMAC_SHA1_80 """ + F8_KEYS + """ FEC_ORDER=FEC_SRTP
a=ssrc:314159 cname:user@example.com
a=ssrc:314159 msid:stream track
a=sendrecv
m=video 51372 RTP/SAVP 96
c=IN IP4 168.2.17.13
a=rtpmap:96 H264/90000
a=crypto:1 AES_256_CM_HMAC_SHA1_32 inline:""" + base64.b64encode(bytes(46)).decode() + """
a=recvonly
""")

SDES_ANSWER = crlf("""
v=0
o=jill 25690844 8070842634 IN IP4 10.47.16.5
s=SRTP Discussion
c=IN IP4 168.2.17.11
t=2873397526 2873405696
m=audio 32640 RTP/SAVP 0
a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR|2^20|1:4
a=ssrc:2718281 cname:jill@example.com
m=video 0 RTP/SAVP 96
""")

GCM = crlf(f"""
v=0
o=- 1 1 IN IP6 2001:db8::1
s=-
c=IN IP6 2001:db8::1
t=0 0
m=audio 4000 RTP/SAVPF 111
a=rtpmap:111 opus/48000/2
a=crypto:7 AEAD_AES_128_GCM inline:{base64.b64encode(bytes(28)).decode().rstrip("=")}
a=crypto:8 AEAD_AES_256_GCM inline:{base64.b64encode(bytes(44)).decode()}|4096
""")

DTLS = crlf("""
v=0
o=- 1 1 IN IP4 192.0.2.1
s=-
c=IN IP4 192.0.2.1
t=0 0
a=fingerprint:sha-256 AB:CD:EF
m=audio 9 UDP/TLS/RTP/SAVPF 111
a=rtpmap:111 opus/48000/2
a=setup:actpass
m=audio 5000 RTP/SAVP 0
""")

ZRTP = crlf("""
v=0
o=- 1 1 IN IP4 192.0.2.1
s=-
c=IN IP4 192.0.2.1
t=0 0
m=audio 5000 RTP/AVP 0
a=zrtp-hash:1.10 fe30efd02423cb054e50efd0248742ac7a52c8f91bc2df881ae642c371ba46df
m=audio 5002 RTP/AVP 8
m=audio 5004 RTP/SAVP 8
a=key-mgmt:mikey AQAFgM0XflABAAAAAAAAAAAAAAsAyO
""")


def test_rfc4568_offer() -> None:
    media = extract(SDES_OFFER)
    assert [m.index for m in media] == [0, 1]
    audio, video = media
    assert (audio.media, audio.proto, audio.address, audio.port) == (
        "audio", "RTP/SAVP", "168.2.17.12", 49170,
    )
    assert audio.direction == "sendrecv" and audio.key_method == "sdes"
    assert audio.formats == ("0",)
    first, second = audio.crypto
    assert (first.tag, first.suite, first.session_params) == (
        1, "AES_CM_128_HMAC_SHA1_80", ("FEC_ORDER=FEC_SRTP",),
    )
    (key,) = first.keys
    raw = base64.b64decode("WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz")
    assert (key.key, key.salt) == (raw[:16], raw[16:])
    assert (key.lifetime, key.mki, key.mki_length) == (2**20, 1, 4)
    assert [k.mki for k in second.keys] == [1, 2]
    assert audio.ssrc_ids == (314159,)
    assert audio.ssrcs[0] == SsrcAttribute(314159, "cname", "user@example.com")
    assert (video.address, video.direction) == ("168.2.17.13", "recvonly")
    assert video.crypto[0].suite == "AES_256_CM_HMAC_SHA1_32"
    assert video.crypto[0].key_length == 32


def test_answer_and_rejected_stream() -> None:
    audio, video = extract(SDES_ANSWER.encode())
    assert audio.key_method == "sdes" and audio.ssrc_ids == (2718281,)
    assert video.port == 0 and video.crypto == () and video.key_method == "unknown"


def test_gcm_unpadded_and_decimal_lifetime() -> None:
    (audio,) = extract(GCM)
    assert audio.address == "2001:db8::1"
    a128, a256 = audio.crypto
    assert (len(a128.keys[0].key), len(a128.keys[0].salt)) == (16, 12)
    assert (len(a256.keys[0].key), len(a256.keys[0].salt)) == (32, 12)
    assert a256.keys[0].lifetime == 4096
    assert a256.serialize().endswith("|4096")


def test_key_methods() -> None:
    dtls, savp_fp = extract(DTLS)
    assert dtls.key_method == "dtls-srtp" and dtls.fingerprints == ("sha-256 AB:CD:EF",)
    assert savp_fp.key_method == "dtls-srtp"  # session-level fingerprint
    zrtp, plain, mikey = extract(ZRTP)
    assert (zrtp.key_method, plain.key_method, mikey.key_method) == ("zrtp", "none", "unknown")
    assert zrtp.crypto == ()


def test_dtls_proto_wins_over_crypto() -> None:
    text = DTLS.replace("a=setup:actpass", f"a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:{B64_30}")
    assert extract(text)[0].key_method == "dtls-srtp"


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_every_suite_checks_length(suite: str) -> None:
    key_len, salt_len = SUITES[suite]
    good = base64.b64encode(bytes(key_len + salt_len)).decode()
    parsed = CryptoAttribute.parse(f"1 {suite} inline:{good}")
    assert len(parsed.keys[0].key) == key_len and len(parsed.keys[0].salt) == salt_len
    for wrong in (key_len + salt_len - 1, key_len + salt_len + 1):
        bad = base64.b64encode(bytes(wrong)).decode()
        with pytest.raises(ValueError, match=f"{suite} needs {key_len + salt_len} bytes"):
            CryptoAttribute.parse(f"1 {suite} inline:{bad}")


def test_serialize_round_trip() -> None:
    for value in (
        f"1 AES_CM_128_HMAC_SHA1_80 inline:{B64_30}",
        f"2 AES_CM_128_HMAC_SHA1_32 inline:{B64_30}|2^31|255:1 KDR=24 UNENCRYPTED_SRTCP",
        f"3 AES_CM_128_HMAC_SHA1_80 inline:{B64_30}|1:2;inline:{B64_30}|2^10|2:2",
        f"4 AES_CM_128_HMAC_SHA1_80 inline:{B64_30}|1000",
    ):
        parsed = CryptoAttribute.parse(value)
        assert parsed.serialize() == value
        assert CryptoAttribute.parse(parsed.serialize()) == parsed


def test_lowercase_suite_is_normalised() -> None:
    assert CryptoAttribute.parse(f"1 aes_cm_128_hmac_sha1_80 inline:{B64_30}").suite == (
        "AES_CM_128_HMAC_SHA1_80"
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "expected at least 3"),
        ("1 AES_CM_128_HMAC_SHA1_80", "expected at least 3"),
        (f"x AES_CM_128_HMAC_SHA1_80 inline:{B64_30}", "tag 'x' is not 1-9 digits"),
        (f"1234567890 AES_CM_128_HMAC_SHA1_80 inline:{B64_30}", "tag"),
        (f"1 AES_CM_999 inline:{B64_30}", "suite 'AES_CM_999' is not one of"),
        (f"1 AES_CM_128_HMAC_SHA1_80 uri:{B64_30}", "method 'uri' is not 'inline'"),
        (f"1 AES_CM_128_HMAC_SHA1_80 {B64_30}", "is not 'inline'"),
        ("1 AES_CM_128_HMAC_SHA1_80 inline:", "inline key is empty"),
        ("1 AES_CM_128_HMAC_SHA1_80 inline:!!!!", "not base64"),
        ("1 AES_CM_128_HMAC_SHA1_80 inline:QUJD=", "not valid base64"),
        (f"1 AES_CM_128_HMAC_SHA1_80 inline:{B64_30}|2^49", "larger than 2\\^48"),
        (f"1 AES_CM_128_HMAC_SHA1_80 inline:{B64_30}|0", "not in 1..2\\^48"),
        (f"1 AES_CM_128_HMAC_SHA1_80 inline:{B64_30}|2^x", "is not '2\\^<n>'"),
        (f"1 AES_CM_128_HMAC_SHA1_80 inline:{B64_30}|1:0", "MKI length 0 is not in 1..128"),
        (f"1 AES_CM_128_HMAC_SHA1_80 inline:{B64_30}|1:129", "MKI length 129"),
        (f"1 AES_CM_128_HMAC_SHA1_80 inline:{B64_30}|256:1", "does not fit in 1 byte"),
        (f"1 AES_CM_128_HMAC_SHA1_80 inline:{B64_30}|a:1", "MKI 'a:1' is not"),
        (f"1 AES_CM_128_HMAC_SHA1_80 inline:{B64_30}|1:1|2^20", "lifetime comes after"),
        (f"1 AES_CM_128_HMAC_SHA1_80 inline:{B64_30}|2^20|2^20", "two lifetime"),
        (f"1 AES_CM_128_HMAC_SHA1_80 inline:{B64_30}|1:1|2:1", "two MKI"),
        (f"1 AES_CM_128_HMAC_SHA1_80 inline:{B64_30}|1|2|3", "at most 2 allowed"),
        (f"1 AES_CM_128_HMAC_SHA1_80 inline:{B64_30};inline:{B64_30}", "not every one has"),
        (f"1 AES_CM_128_HMAC_SHA1_80 inline:{B64_30}|1:1;inline:{B64_30}|2:2",
         "different MKI lengths"),
        (f"1 AES_CM_128_HMAC_SHA1_80 inline:{B64_30}|1:1;inline:{B64_30}|1:1", "repeat an MKI"),
        (f"1 AES_CM_128_HMAC_SHA1_80 inline:{B64_30} KDR=\x01", "not visible ASCII"),
    ],
)
def test_crypto_errors(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CryptoAttribute.parse(value)


def test_errors_never_quote_the_key() -> None:
    wrong = base64.b64encode(b"secret-key-material-xyz").decode()
    for value in (f"1 AES_CM_128_HMAC_SHA1_80 inline:{wrong}",
                  f"1 AES_CM_128_HMAC_SHA1_80 inline:{wrong}@"):
        with pytest.raises(ValueError) as info:
            CryptoAttribute.parse(value)
        assert wrong not in str(info.value)


def test_repr_masks_key(caplog: pytest.LogCaptureFixture) -> None:
    media = extract(SDES_OFFER)
    crypto = media[0].crypto[0]
    secret = "WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz"
    raw = base64.b64decode(secret)
    with caplog.at_level(logging.INFO):
        logging.getLogger("test").info("media %s %r %s", media, crypto, crypto.keys[0])
    for text in (repr(media), str(media), repr(crypto), str(crypto), caplog.text,
                 repr(crypto.keys), f"{crypto}", f"{crypto.keys[0]}"):
        assert secret not in text
        assert repr(raw[:16]) not in text and repr(raw) not in text
        assert raw[:16].hex() not in text
    assert "masked" in repr(crypto) and "masked" in repr(crypto.keys[0])
    assert isinstance(crypto.keys[0], KeyParam)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "SDP is empty"),
        (SDES_OFFER.replace("a=crypto:1 AES_CM_128_HMAC_SHA1_80",
                            "a=crypto:1 AES_CM_128_HMAC_SHA1_81"),
         "m= line 1 \\(audio\\): crypto suite"),
        (SDES_OFFER.replace("a=crypto:2 ", "a=crypto:1 "), "two a=crypto lines with tag 1"),
        (SDES_OFFER.replace("a=ssrc:314159 cname", "a=ssrc:4294967296 cname"),
         "larger than 2\\^32-1"),
        (SDES_OFFER.replace("a=ssrc:314159 cname:user@example.com", "a=ssrc:x"),
         "is not '<ssrc-id>"),
    ],
)
def test_extract_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        extract(text)


_JUNK = ["\x00", "\r", "\n", " ", ":", "|", ";", "^", "2^", "=", "==", "/", "é", "😀", "\ud83d",
         "0", "9" * 30, "-1", "inline:", "AEAD_AES_256_GCM", "a=crypto:", "a=ssrc:", "UDP/TLS"]


def _mutate(rng: random.Random, text: str) -> str | bytes:
    lines = text.split("\r\n")
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(6)
        i = rng.randrange(len(lines))
        if op == 0:
            del lines[i]
        elif op == 1:
            lines.insert(i, lines[rng.randrange(len(lines))])
        elif op in (2, 3) and lines[i]:
            j = rng.randrange(len(lines[i]))
            lines[i] = lines[i][:j] + rng.choice(_JUNK) + lines[i][j + (op == 2):]
        elif op == 4:
            lines[i] = lines[i][: rng.randrange(len(lines[i]) + 1)]
        else:
            j = rng.randrange(len(lines[i]) + 1)
            lines[i] = lines[i][:j] + chr(rng.randrange(0x20, 0x3000)) + lines[i][j:]
    out = "\r\n".join(lines)
    if rng.random() < 0.15:
        data = bytearray(out.encode("utf-8", "surrogatepass"))
        data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)
    return out


def test_fuzz_only_value_error() -> None:
    """Random mutations of SDES offers and answers: `extract` returns or raises ValueError."""
    rng = random.Random(4568)
    samples = [SDES_OFFER, SDES_ANSWER, GCM]
    extracted = with_keys = 0
    for _ in range(5000):
        text = _mutate(rng, rng.choice(samples))
        try:
            media = extract(text)
        except ValueError:
            continue
        extracted += 1
        for m in media:
            repr(m)
            for crypto in m.crypto:
                with_keys += 1
                assert CryptoAttribute.parse(crypto.serialize()) == crypto
    assert extracted > 600 and with_keys > 1000  # the fuzz gets past the SDP parser


def test_fuzz_crypto_value_only_value_error() -> None:
    rng = random.Random(6188)
    value = f"1 AES_CM_128_HMAC_SHA1_80 inline:{B64_30}|2^20|1:4;inline:{B64_30}|2:4 KDR=1"
    ok = 0
    for _ in range(3000):
        chars = list(value)
        for _ in range(rng.randint(1, 3)):
            j = rng.randrange(len(chars))
            chars[j] = rng.choice(_JUNK)
        try:
            CryptoAttribute.parse("".join(chars))
            ok += 1
        except ValueError:
            pass
    assert ok > 0
