"""scoring.keys: key names are a contract, and hostile identities must not shape them."""

from __future__ import annotations

import re

import pytest

from scoring import keys

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_KEY = 200

HOSTILE = [
    pytest.param("A" * 10_240, id="10KB"),
    pytest.param(b"caller\xff\xfe@evil".decode("utf-8", "surrogateescape"), id="non-utf8"),
    pytest.param("alice\r\nX-Evil: 1@example.com", id="crlf"),
    pytest.param("{ip:1.2.3.4}", id="braces"),
    pytest.param("a}b{c", id="reversed-braces"),
    pytest.param("}", id="close-brace"),
    pytest.param("alice@example.com\x00", id="nul"),
    pytest.param("bob smith@example.com", id="space"),
    pytest.param("", id="empty"),
    pytest.param("ünïcödé@example.com", id="unicode"),
    pytest.param("x" * 65, id="65-chars"),
]


def _check_key(key: str) -> None:
    assert key.startswith(f"{keys.PREFIX}:")
    assert len(key) <= MAX_KEY, len(key)
    assert not _CONTROL.search(key), repr(key)
    assert key.count("{") == 1 and key.count("}") == 1, key
    assert key.index("{") < key.index("}")
    key.encode("utf-8")  # no lone surrogates either


@pytest.mark.parametrize("value", HOSTILE)
def test_entity_id_of_hostile_values_is_short_and_safe(value: str) -> None:
    eid = keys.entity_id(value)
    assert 1 <= len(eid) <= 64
    assert "{" not in eid and "}" not in eid
    assert not _CONTROL.search(eid)
    eid.encode("ascii")


@pytest.mark.parametrize("value", HOSTILE)
@pytest.mark.parametrize("kind", ["ip", "caller", "callee"])
def test_every_derived_key_keeps_one_hash_tag(kind: str, value: str) -> None:
    base = keys.tag(kind, value)
    _check_key(base)
    for k in keys.rate_keys(base, (10, 300), 1_700_000_000.0):
        _check_key(k)
    for k in keys.source_keys(base, 300, 1_700_000_000.0):
        _check_key(k)
    _check_key(keys.scan_key(value))


@pytest.mark.parametrize("value", [
    pytest.param("1.2.3.4\n", id="trailing-LF"),
    pytest.param("alice@example.com\n", id="caller-LF"),
])
def test_trailing_newline_is_not_kept_verbatim(value: str) -> None:
    assert "\n" not in keys.entity_id(value)


@pytest.mark.parametrize("value", ["203.0.113.7", "2001:db8::1", "alice@example.com",
                                   "+15550100@carrier.example", "[2001:db8::1]", "a" * 64])
def test_safe_values_are_kept_readable(value: str) -> None:
    assert keys.entity_id(value) == value


def test_digest_is_stable_and_distinguishes_values() -> None:
    a, b = "x" * 100, "x" * 99 + "y"
    assert keys.entity_id(a) == keys.entity_id(a)
    assert keys.entity_id(a) != keys.entity_id(b)
    assert keys.entity_id(a).startswith("h")
    # a digested value can never collide with a readable one that looks the same
    assert keys.entity_id("caller\r\n") != keys.entity_id("caller")


def test_surrogateescape_values_differ_from_their_replacement() -> None:
    raw1 = b"a\xff".decode("utf-8", "surrogateescape")
    raw2 = b"a\xfe".decode("utf-8", "surrogateescape")
    assert keys.entity_id(raw1) != keys.entity_id(raw2)


def test_contract_key_names() -> None:
    assert keys.tag("ip", "203.0.113.7") == "spitwall:{ip:203.0.113.7}"
    assert keys.CONFIG == "spitwall:{cfg}:config"
    assert keys.CONFIG_VERSION == "spitwall:{cfg}:version"
    assert keys.LISTS_VERSION == "spitwall:{cfg}:lists_version"
    assert keys.list_key("allow") == "spitwall:{cfg}:list:allow"
    assert keys.AUDIT == "spitwall:{cfg}:audit"
    assert keys.scan_key("203.0.113.7") == "spitwall:{ip:203.0.113.7}:scan"
    assert keys.decision_buckets() == [f"spitwall:{{dec}}:b{i}"
                                       for i in range(keys.DECISION_BUCKETS)]
    for k in (keys.CONFIG, keys.CONFIG_VERSION, keys.LISTS_VERSION, keys.AUDIT, keys.STATS,
              keys.DECISION_SEQ, *keys.decision_buckets()):
        _check_key(k)


def test_rate_keys_current_and_previous_bucket_per_window() -> None:
    base = keys.tag("ip", "192.0.2.1")
    got = keys.rate_keys(base, (10, 300), 1005.0)
    assert got == [f"{base}:inv:10:100", f"{base}:inv:10:99",
                   f"{base}:inv:300:3", f"{base}:inv:300:2"]


def test_rate_keys_bucket_boundary() -> None:
    base = "b"
    assert keys.rate_keys(base, (10,), 1009.999)[0] == "b:inv:10:100"
    assert keys.rate_keys(base, (10,), 1010.0)[0] == "b:inv:10:101"


def test_source_keys_layout() -> None:
    got = keys.source_keys("b", 300, 600.0)
    assert got == ["b:callers:300:2", "b:callers:300:1", "b:callees:300:2", "b:callees:300:1",
                   "b:recent", "b:scan"]


@pytest.mark.parametrize(("ip", "prefix", "expected"), [
    ("203.0.113.7", 64, "203.0.113.7"),
    ("2001:db8:7:1::5", 64, "2001:db8:7:1::/64"),
    ("2001:db8:7:1:ffff:ffff:ffff:ffff", 64, "2001:db8:7:1::/64"),
    ("2001:DB8:7:1::5", 64, "2001:db8:7:1::/64"),  # canonical form: one key per network
    ("[2001:db8:7:1::5]", 64, "2001:db8:7:1::/64"),
    ("2001:db8:7:1ff::5", 56, "2001:db8:7:100::/56"),
    ("2001:db8:7:1::5", 128, "2001:db8:7:1::5"),
    ("::1", 64, "::/64"),
    ("::ffff:192.0.2.1", 64, "192.0.2.1"),  # IPv4-mapped: the IPv4 address
    ("not:an:address::x", 64, "not:an:address::x"),  # left to entity_id
    ("", 64, ""),
])
def test_source_id_aggregates_ipv6_by_network(ip: str, prefix: int, expected: str) -> None:
    assert keys.source_id(ip, prefix) == expected


def test_source_tags_of_ipv6_networks_stay_readable_and_bounded() -> None:
    assert keys.source_tag("2001:db8:7:1::5") == "spitwall:{ip:2001:db8:7:1::/64}"
    assert keys.source_tag("2001:db8:7:2::5") != keys.source_tag("2001:db8:7:1::5")
    longest = keys.source_tag("2001:db8:aaaa:bbbb:cccc:dddd:eeee:ffff", 127)
    _check_key(longest)
    assert keys.scan_key("2001:db8:7:1::9") == "spitwall:{ip:2001:db8:7:1::/64}:scan"
    for value in ("A" * 10_240 + ":", "::" + "\r\n" * 100):
        _check_key(keys.source_tag(value))
