"""lists.matcher: in-process matching of a call's identities against one list."""

from __future__ import annotations

import time

import pytest

from lists.matcher import SEED_SCANNERS, ListMatcher, ListSnapshot
from lists.model import ListEntry, normalise


def entry(kind: str, value: str, **kw: object) -> ListEntry:
    return ListEntry(kind, normalise(kind, value), **kw)  # type: ignore[arg-type]


def m(*entries: ListEntry) -> ListMatcher:
    return ListMatcher(entries)


# ---------------------------------------------------------------------------------------------
# ip and cidr


def test_ip_exact() -> None:
    lst = m(entry("ip", "203.0.113.7"))
    hit = lst.match(ip="203.0.113.7")
    assert hit is not None and hit.on == "ip 203.0.113.7"
    assert lst.match(ip="203.0.113.8") is None
    assert lst.match(ip="") is None


def test_ipv6_exact_normalised_form() -> None:
    lst = m(entry("ip", "2001:DB8::1"))
    assert lst.match(ip="2001:db8::1") is not None
    assert lst.match(ip="2001:db8::2") is None


@pytest.mark.parametrize("ip", ["2001:DB8:0:0:0:0:0:1", "2001:0db8::0001", "2001:DB8::1"])
def test_ipv6_exact_any_spelling(ip: str) -> None:
    assert m(entry("ip", "2001:db8::1")).match(ip=ip) is not None


@pytest.mark.parametrize(("net", "inside", "outside"), [
    ("192.0.2.0/24", ["192.0.2.0", "192.0.2.1", "192.0.2.255"], ["192.0.3.0", "192.0.1.255"]),
    ("10.0.0.0/8", ["10.0.0.1", "10.255.255.255"], ["11.0.0.0", "9.255.255.255"]),
    ("198.51.100.128/25", ["198.51.100.128", "198.51.100.200"], ["198.51.100.127"]),
    ("203.0.113.7/32", ["203.0.113.7"], ["203.0.113.6", "203.0.113.8"]),
    ("172.16.0.0/12", ["172.31.255.255", "172.16.0.0"], ["172.32.0.0", "172.15.255.255"]),
    ("0.0.0.0/0", ["1.2.3.4", "255.255.255.255"], ["2001:db8::1"]),
    ("2001:db8::/32", ["2001:db8::1", "2001:db8:ffff::1", "2001:DB8:0:0:0:0:0:1"],
     ["2001:db9::1", "192.0.2.1"]),
    ("2001:db8:1:2::/64", ["2001:db8:1:2::abcd"], ["2001:db8:1:3::1"]),
    ("2001:db8::1/128", ["2001:db8::1"], ["2001:db8::2"]),
    ("::/0", ["::1", "2001:db8::1"], ["127.0.0.1"]),
])
def test_cidr(net: str, inside: list[str], outside: list[str]) -> None:
    lst = m(entry("cidr", net))
    for ip in inside:
        hit = lst.match(ip=ip)
        assert hit is not None, ip
        assert hit.on.startswith("cidr ")
    for ip in outside:
        assert lst.match(ip=ip) is None, ip


def test_several_prefix_lengths_together() -> None:
    lst = m(entry("cidr", "10.0.0.0/8", reason="wide"), entry("cidr", "192.0.2.0/28"),
            entry("cidr", "2001:db8::/48"), entry("cidr", "198.51.100.0/22"))
    assert lst.match(ip="10.9.9.9") is not None
    assert lst.match(ip="192.0.2.15") is not None
    assert lst.match(ip="192.0.2.16") is None
    assert lst.match(ip="198.51.103.1") is not None
    assert lst.match(ip="198.51.104.1") is None
    assert lst.match(ip="2001:db8:0:ffff::1") is not None
    assert lst.match(ip="2001:db8:1::1") is None


def test_cidr_with_a_non_ip_source_does_not_raise() -> None:
    assert m(entry("cidr", "10.0.0.0/8")).match(ip="not-an-ip") is None


# ---------------------------------------------------------------------------------------------
# uri, domain, number


def test_uri_is_case_insensitive() -> None:
    lst = m(entry("uri", "sip:Alice@Example.com"))
    hit = lst.match(user="ALICE", domain="example.COM")
    assert hit is not None and hit.on == "uri alice@example.com"
    assert lst.match(user="alice", domain="example.org") is None
    assert lst.match(user="alice") is None  # no domain: no URI


def test_domain_and_subdomains() -> None:
    lst = m(entry("domain", "spam.example"))
    for d in ("spam.example", "SPAM.example", "a.spam.example", "x.y.z.spam.example"):
        hit = lst.match(domain=d)
        assert hit is not None, d
        assert hit.on == f"domain {d.lower()}"
    for d in ("notspam.example", "spam.example.org", "example", "spam"):
        assert lst.match(domain=d) is None, d


def test_number_via_from_and_pai() -> None:
    lst = m(entry("number", "+1 555 010 0100"))
    hit = lst.match(numbers=["+15550100100"])
    assert hit is not None and hit.on == "number +15550100100"
    assert lst.match(numbers=["alice", "+15550100100"]) is not None  # PAI second
    assert lst.match(numbers=["+1-555-010-0100"]) is not None  # normalised at match time
    assert lst.match(numbers=["15550100100"]) is None  # national vs E.164 differ
    assert lst.match(numbers=["12"]) is None


def test_short_numbers_need_three_digits() -> None:
    lst = m(ListEntry("number", "12"))  # cannot be added normally; must never match anyway
    assert lst.match(numbers=["12"]) is None


# ---------------------------------------------------------------------------------------------
# user agents


@pytest.mark.parametrize(("pattern", "ua", "hits"), [
    ("sipvicious", "SIPVicious 0.3.4", True),
    ("sipvicious", "friendly sipvicious scanner", True),
    ("sipvicious", "sipvicio", False),
    ("evil*", "Evil-Dialer 2.0", True),
    ("evil*", "evil", True),
    ("*dialer", "my-DIALER", True),
    ("*dialer", "dialer 2", False),
    ("sipcli/v?.?", "sipcli/v1.8", True),
    ("sipcli/v?.?", "sipcli/v1.88", False),
    ("a.b", "axb", False),  # a plain pattern is a literal substring, not a regex
    ("(x+)+y", "(x+)+y here", True),
])
def test_user_agent_substring_and_glob(pattern: str, ua: str, hits: bool) -> None:
    lst = m(entry("ua", pattern))
    assert (lst.match(user_agent=ua) is not None) is hits


@pytest.mark.parametrize(("pattern", "ua"), [("evil*", "not-evil-phone"),
                                             ("sipcli/*", "Linphone sipcli/1"),
                                             ("friendly*", "unfriendly UA")])
def test_glob_is_anchored_at_the_start(pattern: str, ua: str) -> None:
    assert m(entry("ua", pattern)).match(user_agent=ua) is None


def test_hostile_user_agent_is_matched_fast() -> None:
    lst = m(entry("ua", "*a*a*a*a*a*a*b"), entry("ua", "x?y?z*"))
    started = time.perf_counter()
    assert lst.match(user_agent="a" * 5000) is None
    assert time.perf_counter() - started < 0.5


# ---------------------------------------------------------------------------------------------
# country, order, expiry


def test_country() -> None:
    lst = m(entry("country", "xx"))
    assert lst.match(country="xx") is not None
    assert lst.match(country="YY") is None


def test_most_specific_identity_first() -> None:
    lst = m(entry("ua", "linphone", reason="ua"), entry("domain", "example.com", reason="dom"),
            entry("ip", "192.0.2.1", reason="ip"))
    hit = lst.match(ip="192.0.2.1", user="alice", domain="example.com", user_agent="Linphone")
    assert hit is not None and hit.entry.reason == "ip"
    hit = lst.match(ip="192.0.2.2", user="alice", domain="example.com", user_agent="Linphone")
    assert hit is not None and hit.entry.reason == "dom"


@pytest.mark.parametrize(("kind", "value", "kw"), [
    ("ip", "192.0.2.1", {"ip": "192.0.2.1"}),
    ("cidr", "192.0.2.0/24", {"ip": "192.0.2.1"}),
    ("uri", "alice@example.com", {"user": "alice", "domain": "example.com"}),
    ("domain", "example.com", {"domain": "a.example.com"}),
    ("number", "+15550100", {"numbers": ["+15550100"]}),
    ("ua", "badphone", {"user_agent": "BadPhone/1"}),
    ("country", "XX", {"country": "XX"}),
])
def test_expiry_is_honoured_at_match_time(kind: str, value: str, kw: dict[str, object]) -> None:
    lst = m(ListEntry(kind, value, expires=1000.0))
    assert lst.match(now=999.0, **kw) is not None  # type: ignore[arg-type]
    assert lst.match(now=1000.0, **kw) is None  # type: ignore[arg-type]
    assert lst.match(**kw) is None  # type: ignore[arg-type]  # wall clock: long expired


def test_expired_entry_does_not_hide_a_live_one() -> None:
    lst = m(ListEntry("cidr", "10.0.0.0/8", expires=1.0),
            ListEntry("cidr", "10.1.0.0/16", reason="live"))
    hit = lst.match(ip="10.1.2.3")
    assert hit is not None and hit.entry.reason == "live"


def test_size_counts_entries() -> None:
    assert m().size == 0
    assert m(entry("ip", "192.0.2.1"), entry("cidr", "10.0.0.0/8"), entry("ua", "x")).size == 3


# ---------------------------------------------------------------------------------------------
# snapshot and the shipped scanner seed


@pytest.mark.parametrize("ua", ["friendly-scanner", "sipvicious", "sipcli/v1.8",
                                "VaxSIPUserAgent/3.1", "SIPVicious/0.3.4", "Friendly-Scanner"])
def test_seed_scanner_list_matches(ua: str) -> None:
    assert ListSnapshot.empty().is_scanner(ua) is not None


@pytest.mark.parametrize("ua", ["Linphone/5.0", "Asterisk PBX 20", "Zoiper rv2.10",
                                "MicroSIP/3.21.3", "FreeSWITCH-mod_sofia/1.10", "Yealink SIP-T46S",
                                "Cisco-SIPGateway/IOS-15.x", "Grandstream GXP2170", ""])
def test_seed_scanner_list_spares_real_phones(ua: str) -> None:
    assert ListSnapshot.empty().is_scanner(ua) is None


def test_seed_is_loaded_lower_case_without_comments() -> None:
    assert "friendly-scanner" in SEED_SCANNERS
    assert all(p == p.lower() and p and not p.startswith("#") for p in SEED_SCANNERS)


def test_snapshot_scanner_list_takes_only_ua_entries() -> None:
    snap = ListSnapshot({"scanner": [ListEntry("ua", "evil-dialer"),
                                     ListEntry("ip", "192.0.2.1")]}, 4)
    assert snap.version == 4
    assert snap.is_scanner("Evil-Dialer") is not None
    assert snap.scanner.size == len(SEED_SCANNERS) + 1


def test_snapshot_lists_are_separate() -> None:
    snap = ListSnapshot({"allow": [ListEntry("ip", "192.0.2.1")],
                         "block": [ListEntry("ip", "192.0.2.2")]})
    assert snap.allow.match(ip="192.0.2.1") is not None
    assert snap.allow.match(ip="192.0.2.2") is None
    assert snap.block.match(ip="192.0.2.2") is not None


def test_user_agent_patterns_keep_list_order_and_expiry() -> None:
    """All patterns are searched in one regex first; the hit is still the first live entry."""
    old = entry("ua", "scan*", reason="old", expires=100.0)
    lst = m(old, entry("ua", "scanner", reason="live"), entry("ua", "zz", reason="other"))
    hit = lst.match(user_agent="Scanner-9000", now=50.0)
    assert hit is not None and hit.entry.reason == "old"  # first in order, not yet expired
    hit = lst.match(user_agent="Scanner-9000", now=200.0)
    assert hit is not None and hit.entry.reason == "live" and hit.on == "user-agent 'scanner'"
    assert m(old).match(user_agent="scanner", now=200.0) is None  # only an expired one matches
    assert lst.match(user_agent="xscan", now=50.0) is None  # the glob stays anchored
