"""Delivery rules: back-off schedule, subscription expiry math, the recorder allow-list reader,
the subscription record."""

from __future__ import annotations

import ipaddress

import msgpack
import pytest

from intercept.delivery.policy import (
    IntervalTooBrief,
    Subscription,
    backoff_delay,
    backoff_schedule,
    give_up_after,
    grant_expires,
    hash_ttl,
    match_recorder,
    parse_address,
    parse_recorders,
    parse_source,
    remaining,
    subscription_state,
)


def test_backoff_doubles_and_caps() -> None:
    assert backoff_schedule(8, 1.0, 60.0) == [1, 2, 4, 8, 16, 32, 60]
    assert backoff_schedule(1, 1.0, 60.0) == []
    assert backoff_delay(3, 0.5, 60.0) == 2.0
    assert backoff_delay(500, 1.0, 30.0) == 30.0  # no overflow for huge attempt numbers
    assert backoff_delay(4, 0.0, 10.0) == 0.0


def test_backoff_jitter_bounds() -> None:
    assert backoff_delay(2, 1.0, 60.0, jitter=0.5, rand=lambda: 0.0) == 1.0
    assert backoff_delay(2, 1.0, 60.0, jitter=0.5, rand=lambda: 1.0) == 3.0
    assert backoff_delay(2, 1.0, 60.0, jitter=0.5, rand=lambda: 0.5) == 2.0


@pytest.mark.parametrize("args", [(0, 1.0, 1.0), (1, -1.0, 1.0), (1, 1.0, -1.0)])
def test_backoff_rejects_nonsense(args: tuple[int, float, float]) -> None:
    with pytest.raises(ValueError):
        backoff_delay(*args)
    with pytest.raises(ValueError):
        backoff_delay(1, 1.0, 1.0, jitter=2.0)


def test_give_up_after_is_attempts_times_timeout_plus_waits() -> None:
    # 8 attempts of Timer F (32 s) + 1+2+4+8+16+32+60 s of back-off
    assert give_up_after(8, 1.0, 60.0, 32.0) == 8 * 32 + 123


@pytest.mark.parametrize(("requested", "granted"), [
    (None, 3600), ("0", 0), ("60", 60), (" 120 ", 120), ("3600", 3600), ("86400", 3600),
])
def test_grant_expires(requested: str | None, granted: int) -> None:
    assert grant_expires(requested, default=3600, minimum=60, maximum=3600) == granted


def test_grant_expires_too_brief_and_bad() -> None:
    with pytest.raises(IntervalTooBrief) as too_brief:
        grant_expires("59", default=3600, minimum=60, maximum=3600)
    assert too_brief.value.minimum == 60
    for bad in ("-1", "abc", "1.5", "", "99999999999"):
        with pytest.raises(ValueError):
            grant_expires(bad, default=3600, minimum=60, maximum=3600)
    with pytest.raises(ValueError):
        grant_expires(None, default=10, minimum=60, maximum=3600)


def test_remaining_and_subscription_state() -> None:
    assert remaining(100.0, 40.0) == 60
    assert remaining(100.0, 99.2) == 1  # rounded up: never claim 0 while time is left
    assert remaining(100.0, 100.0) == 0
    assert remaining(100.0, 150.0) == 0
    assert subscription_state(100.0, 40.0) == "active;expires=60"
    assert subscription_state(100.0, 100.0) == "terminated;reason=timeout"


def test_hash_ttl_outlives_the_longest_subscription() -> None:
    assert hash_ttl([], 0.0) is None
    assert hash_ttl([100.0, 400.5, 200.0], 0.0, margin=60) == 401 + 60
    assert hash_ttl([10.0], 50.0, margin=60) == 60  # all expired: gone after the margin


@pytest.mark.parametrize(("text", "net", "port"), [
    ("192.0.2.7", "192.0.2.7/32", None),
    ("192.0.2.7:5060", "192.0.2.7/32", 5060),
    ("10.0.0.0/8", "10.0.0.0/8", None),
    ("10.1.2.3/8", "10.0.0.0/8", None),
    ("::1", "::1/128", None),
    ("[2001:db8::1]:5070", "2001:db8::1/128", 5070),
    ("fd00::/8", "fd00::/8", None),
])
def test_parse_address(text: str, net: str, port: int | None) -> None:
    assert parse_address(text) == (ipaddress.ip_network(net), port)


@pytest.mark.parametrize("text", [
    "", "host.example", "192.0.2.7:0", "192.0.2.7:70000", "192.0.2.7:x", "10.0.0.0/8:5060",
    "[::1", "[::1]x", "300.1.1.1",
])
def test_parse_address_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_address(text)


def _pack(record: object) -> bytes:
    out: bytes = msgpack.packb(record, use_bin_type=True)
    return out


def test_parse_recorders_is_tolerant_but_never_drops_credentials() -> None:
    good_ha1 = "0" * 31 + "a"
    raw = {
        b"127.0.0.1": _pack({}),
        b"127.0.0.2:5060": _pack({"user": "rec", "ha1": good_ha1.upper(), "note": "x"}),
        "10.0.0.0/8": b"",  # empty record: address only
        b"192.0.2.1": _pack({"user": "rec", "liids": ["A", "B"]}),
        b"192.0.2.2": _pack({"liids": "A"}),
        b"nonsense": _pack({}),
        b"192.0.2.3": b"\xc1",  # not msgpack: skipped, not read as "no password"
        b"192.0.2.4": _pack({"ha1": good_ha1}),  # ha1 without user
        b"192.0.2.5": _pack({"user": "u", "ha1": "xyz"}),
        b"192.0.2.6": _pack([1, 2]),
        b"192.0.2.7": _pack({"user": "rec", "ha1_sha256": "b" * 64}),  # SHA-256 only
        b"192.0.2.8": _pack({"user": "rec", "ha1": good_ha1, "ha1_sha256": "C" * 64}),
        b"192.0.2.9": _pack({"user": "rec", "ha1_sha256": "c" * 32}),  # an MD5-sized one
        b"192.0.2.10": _pack({"ha1_sha256": "c" * 64}),  # without user
    }
    rules, errors = parse_recorders(raw)
    by_addr = {r.address: r for r in rules}
    assert sorted(by_addr) == ["10.0.0.0/8", "127.0.0.1", "127.0.0.2:5060", "192.0.2.1",
                               "192.0.2.2", "192.0.2.7", "192.0.2.8"]
    assert by_addr["127.0.0.2:5060"].needs_digest and by_addr["127.0.0.2:5060"].ha1 == good_ha1
    assert by_addr["127.0.0.2:5060"].ha1s == {"MD5": good_ha1}
    assert by_addr["192.0.2.7"].needs_digest and by_addr["192.0.2.7"].ha1s == {"SHA-256": "b" * 64}
    # both: SHA-256 offered first (RFC 8760)
    assert list(by_addr["192.0.2.8"].ha1s.items()) == [("SHA-256", "c" * 64), ("MD5", good_ha1)]
    assert not by_addr["127.0.0.1"].needs_digest
    assert by_addr["192.0.2.1"].liids == ("A", "B") and not by_addr["192.0.2.1"].needs_digest
    assert by_addr["192.0.2.2"].liids == ("A",)
    assert len(errors) == 7 and all(isinstance(e, str) for e in errors)
    assert any("ha1_sha256 must be 64 hex digits" in e for e in errors)


def test_match_recorder_most_specific_wins() -> None:
    rules, _ = parse_recorders({
        "127.0.0.0/8": _pack({}),
        "127.0.0.1": _pack({"user": "host", "ha1": "a" * 32}),
        "127.0.0.1:5070": _pack({"user": "port", "ha1": "b" * 32}),
        "::1": _pack({}),
    })
    assert match_recorder(rules, "127.0.0.1", 5070).user == "port"  # type: ignore[union-attr]
    assert match_recorder(rules, "127.0.0.1", 5071).user == "host"  # type: ignore[union-attr]
    assert match_recorder(rules, "127.0.0.9", 1).address == "127.0.0.0/8"  # type: ignore[union-attr]
    assert match_recorder(rules, "::ffff:127.0.0.9", 1) is not None  # IPv4-mapped
    assert match_recorder(rules, "::1", 9).address == "::1"  # type: ignore[union-attr]
    assert match_recorder(rules, "192.0.2.1", 5060) is None
    assert match_recorder(rules, "not-an-ip", 5060) is None


def test_parse_source() -> None:
    assert parse_source("192.0.2.1:5060") == ("192.0.2.1", 5060)
    assert parse_source("[2001:db8::2]:5062") == ("2001:db8::2", 5062)
    for bad in ("192.0.2.1", "10.0.0.0/8", "x:1", "192.0.2.1:99999"):
        with pytest.raises(ValueError):
            parse_source(bad)


def _sub() -> Subscription:
    return Subscription(
        id="ab12", liid="CASE-1", call_id="c1@h", local_tag="lt", remote_tag="rt",
        local_uri="sip:CASE-1@10.0.0.1", remote_uri="sip:rec@10.0.0.2",
        remote_target="sip:rec@10.0.0.2:5070", route_set=("<sip:10.0.0.3;lr>",),
        fallback=("10.0.0.3", 5060), source="10.0.0.2:5070", expires_at=1000.0,
        event_param="7", local_cseq=3, remote_cseq=2, user="rec", created_at=400.0)


def test_subscription_round_trip_and_expiry() -> None:
    sub = _sub()
    assert Subscription.unpack(sub.pack()) == sub
    assert sub.dialog == ("c1@h", "lt")
    assert sub.state(700.0) == "active;expires=300" and not sub.expired(700.0)
    assert sub.expired(1000.0) and sub.state(1000.0) == "terminated;reason=timeout"
    later = sub.refreshed(600, 900.0, remote_cseq=3)
    assert later.expires_at == 1500.0 and later.remote_cseq == 3 and later.id == sub.id


@pytest.mark.parametrize("blob", [b"\xc1", _pack([1]), _pack({"v": 99}), _pack({"v": 1})])
def test_subscription_unpack_rejects(blob: bytes) -> None:
    with pytest.raises(ValueError):
        Subscription.unpack(blob)


def test_reads_the_provisioning_record_format() -> None:
    """What `spitwall recorder allow` stores (intercept.provision.Recorder.pack): empty
    user/ha1 strings mean "address only"."""
    plain = {"v": 1, "address": "192.0.2.8", "user": "", "ha1": "", "liids": [], "at": 1.0,
             "by": "admin"}
    digest_only = {**plain, "address": "192.0.2.9:5060", "user": "rec", "ha1": "f" * 32,
                   "liids": ["CASE-1"]}
    rules, errors = parse_recorders({"192.0.2.8": _pack(plain),
                                     "192.0.2.9:5060": _pack(digest_only)})
    assert errors == []
    by_addr = {r.address: r for r in rules}
    assert not by_addr["192.0.2.8"].needs_digest and by_addr["192.0.2.8"].liids == ()
    assert by_addr["192.0.2.9:5060"].needs_digest and by_addr["192.0.2.9:5060"].user == "rec"
    assert by_addr["192.0.2.9:5060"].liids == ("CASE-1",)
