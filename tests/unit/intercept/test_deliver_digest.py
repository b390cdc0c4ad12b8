"""RFC 2617 digest for SUBSCRIBE: the RFC's own example, verification, stateless nonces."""

from __future__ import annotations

import pytest

from intercept.delivery import digest

# RFC 2617 section 3.5
RFC_AUTH = ('Digest username="Mufasa", realm="testrealm@host.com", '
            'nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", uri="/dir/index.html", qop=auth, '
            'nc=00000001, cnonce="0a4f113b", response="6629fae49393a05397450978507c4ef1", '
            'opaque="5ccc069c403ebaf9f0171e9517f40e41"')


def test_rfc2617_example() -> None:
    key = digest.ha1("Mufasa", "Circle Of Life", "testrealm@host.com")
    assert digest.response(key, "dcd98b7102dd2f0e8b11d0f600bfb0c093", "GET", "/dir/index.html",
                           qop="auth", nc="00000001", cnonce="0a4f113b") == \
        "6629fae49393a05397450978507c4ef1"
    creds = digest.parse(RFC_AUTH)
    assert creds["username"] == "Mufasa" and creds["nc"] == "00000001"
    assert digest.verify(creds, method="GET", user="Mufasa", ha1_hex=key,
                         realm="testrealm@host.com")
    assert not digest.verify(creds, method="POST", user="Mufasa", ha1_hex=key,
                             realm="testrealm@host.com")


def test_ha1_is_what_the_allow_list_stores() -> None:
    assert digest.ha1("rec", "pw") == digest.md5_hex("rec:spitwall:pw")
    assert len(digest.ha1("rec", "pw")) == 32


def _answer(nonces: digest.Nonces, now: float, password: str = "pw",
            uri: str = "sip:CASE-1@10.0.0.1") -> dict[str, str]:
    challenge = digest.parse(digest.challenge(nonces.new(now)))
    return digest.parse(digest.authorization("rec", password, method="SUBSCRIBE", uri=uri,
                                             challenge_params=challenge))


def test_client_answer_verifies() -> None:
    nonces = digest.Nonces()
    creds = _answer(nonces, 1000.0)
    assert nonces.check(creds["nonce"], 1000.0) == "ok"
    assert digest.verify(creds, method="SUBSCRIBE", user="rec", ha1_hex=digest.ha1("rec", "pw"))
    assert not digest.verify(creds, method="SUBSCRIBE", user="rec",
                             ha1_hex=digest.ha1("rec", "other"))
    assert not digest.verify(creds, method="SUBSCRIBE", user="other",
                             ha1_hex=digest.ha1("rec", "pw"))
    wrong = _answer(nonces, 1000.0, password="guess")
    assert not digest.verify(wrong, method="SUBSCRIBE", user="rec",
                             ha1_hex=digest.ha1("rec", "pw"))


def test_verify_rejects_incomplete_or_foreign_parameters() -> None:
    nonces = digest.Nonces()
    good = _answer(nonces, 0.0)
    key = digest.ha1("rec", "pw")
    for change in ({"realm": "other"}, {"algorithm": "SHA-256"}, {"qop": "auth-int"},
                   {"response": ""}, {"uri": ""}):
        assert not digest.verify({**good, **change}, method="SUBSCRIBE", user="rec",
                                 ha1_hex=key)
    no_nc = {k: v for k, v in good.items() if k != "nc"}
    assert not digest.verify(no_nc, method="SUBSCRIBE", user="rec", ha1_hex=key)
    # RFC 2069 style (no qop) is still understood
    nonce = nonces.new(0.0)
    legacy = {"username": "rec", "realm": "spitwall", "nonce": nonce, "uri": "sip:x@y",
              "response": digest.response(key, nonce, "SUBSCRIBE", "sip:x@y")}
    assert digest.verify(legacy, method="SUBSCRIBE", user="rec", ha1_hex=key)


def test_nonces_are_stateless_and_expire() -> None:
    nonces = digest.Nonces(lifetime=300.0, secret=b"k" * 32)
    nonce = nonces.new(1000.0)
    assert nonces.check(nonce, 1299.0) == "ok"
    assert nonces.check(nonce, 1301.0) == "stale"
    assert digest.Nonces(secret=b"k" * 32).check(nonce, 1000.0) == "ok"  # same secret
    assert digest.Nonces(secret=b"x" * 32).check(nonce, 1000.0) == "bad"  # another process
    stamp, _, mac = nonce.partition(".")
    assert nonces.check(f"{int(stamp, 16) + 1000:x}.{mac}", 2000.0) == "bad"  # tampered
    for junk in ("", "abc", ".", "zz.00", "1" * 40 + "." + mac):
        assert nonces.check(junk, 1000.0) == "bad"


def test_challenge_header() -> None:
    value = digest.challenge("n1")
    assert value == 'Digest realm="spitwall", nonce="n1", algorithm=MD5, qop="auth"'
    assert digest.challenge("n1", stale=True).endswith(", stale=true")
    assert digest.parse(value)["realm"] == "spitwall"


@pytest.mark.parametrize("value", ["", "Basic abc", "Digest", 'Digest username="a", ,',
                                   'Digest a="1", a="2"', 'Digest username="unterminated'])
def test_parse_rejects(value: str) -> None:
    with pytest.raises(ValueError):
        digest.parse(value)


def test_parse_quoted_escapes() -> None:
    assert digest.parse(r'Digest username="a\"b", realm=x')["username"] == 'a"b'
