"""Digest for SUBSCRIBE: the examples of RFC 2617 and RFC 7616 (MD5, SHA-256), verification,
stateless nonces, nonce-count replay protection."""

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
    assert digest.verify(creds, method="GET", user="Mufasa", ha1s={"MD5": key},
                         realm="testrealm@host.com")
    assert not digest.verify(creds, method="POST", user="Mufasa", ha1s={"MD5": key},
                             realm="testrealm@host.com")
    # an entry with only a SHA-256 HA1 does not accept MD5 answers
    assert not digest.verify(creds, method="GET", user="Mufasa",
                             ha1s={"SHA-256": "0" * 64}, realm="testrealm@host.com")


# RFC 7616 section 3.9.1: the same request answered with SHA-256 and with MD5
RFC7616 = {"realm": "http-auth@example.org", "uri": "/dir/index.html",
           "nonce": "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v",
           "cnonce": "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ", "nc": "00000001"}


@pytest.mark.parametrize(("algorithm", "expected"), [
    ("SHA-256", "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"),
    ("MD5", "8ca523f5e9506fed4657c9700eebdbec"),
])
def test_rfc7616_example(algorithm: str, expected: str) -> None:
    key = digest.ha1("Mufasa", "Circle of Life", RFC7616["realm"], algorithm)
    assert len(key) == digest.HEX_LENGTH[algorithm]
    got = digest.response(key, RFC7616["nonce"], "GET", RFC7616["uri"], qop="auth",
                          nc=RFC7616["nc"], cnonce=RFC7616["cnonce"], algorithm=algorithm)
    assert got == expected
    creds = {**RFC7616, "username": "Mufasa", "qop": "auth", "algorithm": algorithm,
             "response": expected}
    assert digest.verify(creds, method="GET", user="Mufasa", ha1s={algorithm: key},
                         realm=RFC7616["realm"])
    # the same answer under the other algorithm's name is wrong
    other = "MD5" if algorithm == "SHA-256" else "SHA-256"
    assert not digest.verify({**creds, "algorithm": other}, method="GET", user="Mufasa",
                             ha1s={algorithm: key, other: key}, realm=RFC7616["realm"])


def test_ha1_is_what_the_allow_list_stores() -> None:
    assert digest.ha1("rec", "pw") == digest.md5_hex("rec:spitwall:pw")
    assert len(digest.ha1("rec", "pw")) == 32


def _answer(nonces: digest.Nonces, now: float, password: str = "pw",
            uri: str = "sip:CASE-1@10.0.0.1", algorithm: str = "MD5") -> dict[str, str]:
    challenge = digest.parse(digest.challenge(nonces.new(now), algorithm=algorithm))
    return digest.parse(digest.authorization("rec", password, method="SUBSCRIBE", uri=uri,
                                             challenge_params=challenge))


def test_client_answer_verifies() -> None:
    nonces = digest.Nonces()
    for alg in digest.ALGORITHMS:
        creds = _answer(nonces, 1000.0, algorithm=alg)
        assert creds["algorithm"] == alg
        assert nonces.check(creds["nonce"], 1000.0) == "ok"
        ha1s = {a: digest.ha1("rec", "pw", algorithm=a) for a in digest.ALGORITHMS}
        assert digest.verify(creds, method="SUBSCRIBE", user="rec", ha1s=ha1s)
        assert digest.verify(creds, method="SUBSCRIBE", user="rec", ha1s={alg: ha1s[alg]})
        other = {a: h for a, h in ha1s.items() if a != alg}
        assert not digest.verify(creds, method="SUBSCRIBE", user="rec", ha1s=other)
        assert not digest.verify(creds, method="SUBSCRIBE", user="rec",
                                 ha1s={alg: digest.ha1("rec", "other", algorithm=alg)})
        assert not digest.verify(creds, method="SUBSCRIBE", user="other", ha1s=ha1s)
        wrong = _answer(nonces, 1000.0, password="guess", algorithm=alg)
        assert not digest.verify(wrong, method="SUBSCRIBE", user="rec", ha1s=ha1s)


def test_verify_rejects_incomplete_or_foreign_parameters() -> None:
    nonces = digest.Nonces()
    good = _answer(nonces, 0.0)
    key = {"MD5": digest.ha1("rec", "pw")}
    for change in ({"realm": "other"}, {"algorithm": "SHA-256"}, {"qop": "auth-int"},
                   {"response": ""}, {"uri": ""}, {"algorithm": "MD5-sess"},
                   {"algorithm": "SHA-512-256"}):
        assert not digest.verify({**good, **change}, method="SUBSCRIBE", user="rec",
                                 ha1s=key)
    no_nc = {k: v for k, v in good.items() if k != "nc"}
    assert not digest.verify(no_nc, method="SUBSCRIBE", user="rec", ha1s=key)
    # RFC 2069 style (no qop) is still understood, for MD5 only (RFC 7616: qop is required)
    nonce = nonces.new(0.0)
    legacy = {"username": "rec", "realm": "spitwall", "nonce": nonce, "uri": "sip:x@y",
              "response": digest.response(key["MD5"], nonce, "SUBSCRIBE", "sip:x@y")}
    assert digest.verify(legacy, method="SUBSCRIBE", user="rec", ha1s=key)
    sha = digest.ha1("rec", "pw", algorithm="SHA-256")
    legacy_sha = {**legacy, "algorithm": "SHA-256", "response": digest.response(
        sha, nonce, "SUBSCRIBE", "sip:x@y", algorithm="SHA-256")}
    assert not digest.verify(legacy_sha, method="SUBSCRIBE", user="rec", ha1s={"SHA-256": sha})


def test_nonces_are_stateless_and_expire() -> None:
    nonces = digest.Nonces(lifetime=300.0, secret=b"k" * 32)
    nonce = nonces.new(1000.0)
    assert nonces.check(nonce, 1299.0) == "ok"
    assert nonces.check(nonce, 1301.0) == "stale"
    assert digest.Nonces(secret=b"k" * 32).check(nonce, 1000.0) == "ok"  # same secret
    assert digest.Nonces(secret=b"x" * 32).check(nonce, 1000.0) == "bad"  # another process
    stamp, salt, mac = nonce.split(".")
    assert nonces.check(f"{int(stamp, 16) + 1000:x}.{salt}.{mac}", 2000.0) == "bad"  # tampered
    assert nonces.check(f"{stamp}.{'0' * 16}.{mac}", 1000.0) == "bad"  # another salt
    for junk in ("", "abc", ".", "..", "zz.00", f"{stamp}.{mac}", "1" * 40 + f".{salt}.{mac}",
                 f"{stamp}.{salt}.{mac}.x", f"{stamp}.{salt[:-1]}.{mac}"):
        assert nonces.check(junk, 1000.0) == "bad"
    # every challenge has a nonce of its own, also within one second
    assert len({nonces.new(1000.0) for _ in range(50)}) == 50


def test_challenge_header() -> None:
    value = digest.challenge("n1")
    assert value == 'Digest realm="spitwall", nonce="n1", algorithm=MD5, qop="auth"'
    assert digest.challenge("n1", algorithm="SHA-256") == \
        'Digest realm="spitwall", nonce="n1", algorithm=SHA-256, qop="auth"'
    assert digest.challenge("n1", stale=True).endswith(", stale=true")
    assert digest.parse(value)["realm"] == "spitwall"


@pytest.mark.parametrize("value", ["", "Basic abc", "Digest", 'Digest username="a", ,',
                                   'Digest a="1", a="2"', 'Digest username="unterminated'])
def test_parse_rejects(value: str) -> None:
    with pytest.raises(ValueError):
        digest.parse(value)


def test_parse_quoted_escapes() -> None:
    assert digest.parse(r'Digest username="a\"b", realm=x')["username"] == 'a"b'


def test_nonce_counts_refuse_replays() -> None:
    nonces = digest.Nonces(secret=b"k" * 32)
    counts = digest.NonceCounts(lifetime=300.0)
    n1, n2 = nonces.new(1000.0), nonces.new(1001.0)
    assert counts.accept(n1, "00000001", 1000.0)
    assert not counts.accept(n1, "00000001", 1000.5)  # the same credentials again: a replay
    assert counts.accept(n1, "00000002", 1001.0)  # the client's next request with the nonce
    assert not counts.accept(n1, "00000001", 1002.0)  # older than the newest: a replay
    assert counts.accept(n2, "00000001", 1002.0)  # counts are per nonce
    for junk in ("", "1", "0000000g", "000000001", "00000000"):
        assert not counts.accept(n2, junk, 1002.0)
    # without qop there is no count: a nonce is good once
    n3 = nonces.new(1003.0)
    assert counts.accept(n3, None, 1003.0) and not counts.accept(n3, None, 1003.1)
    # entries go once their nonce cannot be fresh any more (it is then challenged as stale)
    assert len(counts) == 3
    assert counts.accept(nonces.new(1400.0), "00000001", 1400.0)
    assert len(counts) == 1


def test_nonce_counts_are_bounded_and_stay_safe_when_full() -> None:
    nonces = digest.Nonces(secret=b"k" * 32)
    counts = digest.NonceCounts(lifetime=300.0, max_entries=3)
    issued = [nonces.new(1000.0 + i) for i in range(5)]
    for i, n in enumerate(issued):
        assert counts.accept(n, "00000001", 1000.0 + i)
    assert len(counts) == 3
    # the evicted ones are not forgotten as used: replaying them is still refused
    assert not counts.accept(issued[0], "00000001", 1006.0)
    assert not counts.accept(issued[1], "00000001", 1006.0)
    # a nonce issued before the eviction but never used is refused too (a new one is sent)
    assert not counts.accept(nonces.new(1001.0), "00000001", 1006.0)
    assert counts.accept(nonces.new(1006.0), "00000001", 1006.0)  # fresh ones work
    assert not counts.accept(issued[4], "00000001", 1006.0)  # still remembered
    assert counts.accept(issued[4], "00000002", 1006.0)


def test_client_authorization_follows_the_challenge() -> None:
    nonces = digest.Nonces()
    for alg in digest.ALGORITHMS:
        params = digest.parse(digest.challenge(nonces.new(0.0), algorithm=alg))
        creds = digest.parse(digest.authorization("rec", "pw", method="SUBSCRIBE",
                                                  uri="sip:C@h", challenge_params=params, nc=7))
        assert creds["algorithm"] == alg and creds["nc"] == "00000007"
        assert digest.verify(creds, method="SUBSCRIBE", user="rec",
                             ha1s={alg: digest.ha1("rec", "pw", algorithm=alg)})
