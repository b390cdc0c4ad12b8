"""lists.model: validation and normalisation of list values, entries and their records."""

from __future__ import annotations

import msgpack
import pytest

from lists.model import (
    KINDS,
    LIST_NAMES,
    MAX_UA_PATTERN,
    ListEntry,
    check_list_name,
    normalise,
    normalise_number,
)


@pytest.mark.parametrize(("kind", "value", "expected"), [
    # ip
    ("ip", "203.0.113.7", "203.0.113.7"),
    ("ip", " 203.0.113.7 ", "203.0.113.7"),
    ("ip", "2001:DB8::1", "2001:db8::1"),
    ("ip", "2001:0db8:0000:0000:0000:0000:0000:0001", "2001:db8::1"),
    ("ip", "::1", "::1"),
    ("ip", "::ffff:192.0.2.1", "::ffff:c000:201"),
    # cidr, non-strict: host bits are dropped
    ("cidr", "192.0.2.77/24", "192.0.2.0/24"),
    ("cidr", "10.1.2.3/8", "10.0.0.0/8"),
    ("cidr", "203.0.113.7", "203.0.113.7/32"),
    ("cidr", "0.0.0.0/0", "0.0.0.0/0"),
    ("cidr", "2001:DB8::1/32", "2001:db8::/32"),
    ("cidr", "2001:db8:1:2::5/64", "2001:db8:1:2::/64"),
    ("cidr", "2001:db8::1", "2001:db8::1/128"),
    # uri
    ("uri", "alice@example.com", "alice@example.com"),
    ("uri", "sip:Alice@Example.COM", "alice@example.com"),
    ("uri", "SIPS:bob@pbx.example.org", "bob@pbx.example.org"),
    ("uri", "sip:+15550100@carrier.example:5060", "+15550100@carrier.example"),
    ("uri", "tel:alice@example.com", "alice@example.com"),
    ("uri", "sip:a.b-c_d@x.y", "a.b-c_d@x.y"),
    # domain
    ("domain", "Example.COM", "example.com"),
    ("domain", "example.com.", "example.com"),
    ("domain", "sub-1.sub.example.co.uk", "sub-1.sub.example.co.uk"),
    ("domain", "localhost", "localhost"),
    # number
    ("number", "+1 (555) 010-9999", "+15550109999"),
    ("number", "15550100", "15550100"),
    ("number", " +44 20 7946 0000 ", "+442079460000"),
    ("number", "112", "112"),
    ("number", "1.555.010.9999", "15550109999"),
    ("number", "1" * 20, "1" * 20),
    # ua
    ("ua", "Friendly-Scanner", "friendly-scanner"),
    ("ua", "  sipcli/* ", "sipcli/*"),
    ("ua", "x" * MAX_UA_PATTERN, "x" * MAX_UA_PATTERN),
    # country
    ("country", "de", "DE"),
    ("country", " Us ", "US"),
])
def test_normalise_valid(kind: str, value: str, expected: str) -> None:
    assert normalise(kind, value) == expected


@pytest.mark.parametrize(("kind", "value", "message"), [
    ("ip", "203.0.113.256", "not an IP address"),
    ("ip", "203.0.113.0/24", "not an IP address"),
    ("ip", "example.com", "not an IP address"),
    ("ip", "2001:db8:::1", "not an IP address"),
    ("cidr", "192.0.2.0/33", "not a CIDR network"),
    ("cidr", "2001:db8::/129", "not a CIDR network"),
    ("cidr", "banana/8", "not a CIDR network"),
    ("uri", "alice", "not a SIP URI"),
    ("uri", "sip:alice", "not a SIP URI"),
    ("uri", "tel:+15550100", "not a SIP URI"),
    ("uri", "a@b@c", "not a SIP URI"),
    ("uri", "@example.com", "not a SIP URI"),
    ("uri", "alice@", "not a SIP URI"),
    ("uri", "al ice@example.com", "not a SIP URI"),
    ("uri", "alice@exa_mple.com", "not a SIP URI"),
    ("uri", "alice@example.com;transport=tcp", "not a SIP URI"),
    ("uri", "alice@" + "a" * 64 + ".com", "not a SIP URI"),
    ("uri", "a" * 129 + "@example.com", "not a SIP URI"),
    ("domain", "exa mple.com", "not a domain name"),
    ("domain", "-example.com", "not a domain name"),
    ("domain", "example..com", "not a domain name"),
    ("domain", "a" * 64 + ".com", "not a domain name"),
    ("domain", ("a" * 60 + ".") * 5 + "com", "not a domain name"),
    ("domain", "*.example.com", "not a domain name"),
    ("number", "12", "not a phone number"),
    ("number", "1" * 21, "not a phone number"),
    ("number", "555-CALL-NOW", "not a phone number"),
    ("number", "+", "not a phone number"),
    ("number", "١٢٣٤٥", "not a phone number"),
    ("ua", "x" * (MAX_UA_PATTERN + 1), "longer than"),
    ("ua", "evil\r\nscanner", "control characters"),
    ("ua", "tab\there", "control characters"),
    ("country", "DEU", "not an ISO 3166-1"),
    ("country", "D1", "not an ISO 3166-1"),
    ("country", "Ä", "not an ISO 3166-1"),
])
def test_normalise_invalid(kind: str, value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        normalise(kind, value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("value", ["", "   "])
def test_normalise_empty_refused(kind: str, value: str) -> None:
    with pytest.raises(ValueError, match=f"empty {kind} value"):
        normalise(kind, value)


def test_normalise_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown list kind 'email'; expected one of ip, cidr"):
        normalise("email", "a@b.c")


@pytest.mark.parametrize("value", ["555+0100", "++15550100", "1+2+3+4"])
def test_number_with_misplaced_plus_refused(value: str) -> None:
    with pytest.raises(ValueError, match="not a phone number"):
        normalise("number", value)


@pytest.mark.parametrize(("text", "expected"), [
    ("+1 (555) 010-9999", "+15550109999"), ("5550100", "5550100"), ("", ""), ("+", "+"),
    ("abc", ""),
])
def test_normalise_number(text: str, expected: str) -> None:
    assert normalise_number(text) == expected


@pytest.mark.parametrize("name", LIST_NAMES)
def test_list_names(name: str) -> None:
    assert check_list_name(name) == name


@pytest.mark.parametrize("name", ["Allow", "white", "", "blocklist"])
def test_unknown_list_name(name: str) -> None:
    with pytest.raises(ValueError, match="unknown list"):
        check_list_name(name)


# ---------------------------------------------------------------------------------------------
# ListEntry


def test_entry_field_and_pack_round_trip() -> None:
    e = ListEntry("cidr", "2001:db8::/32", "abuse", 100.0, 200.0, "alice")
    assert e.field == "cidr:2001:db8::/32"
    back = ListEntry.unpack(e.field, e.pack())
    assert back == e


def test_entry_record_is_versioned_msgpack() -> None:
    data = msgpack.unpackb(ListEntry("ip", "192.0.2.1").pack(), raw=False)
    assert data["v"] == 1
    assert set(data) == {"v", "reason", "added", "expires", "by"}


@pytest.mark.parametrize(("field", "blob"), [
    ("nokind", msgpack.packb({})),
    ("email:a@b", msgpack.packb({})),
    ("ip:1.2.3.4", msgpack.packb([1, 2])),
    ("ip:1.2.3.4", b"\xc1"),
])
def test_entry_unpack_refuses_garbage(field: str, blob: bytes) -> None:
    with pytest.raises(ValueError):
        ListEntry.unpack(field, blob)


@pytest.mark.parametrize(("expires", "now", "expired"), [
    (0.0, 1e12, False), (100.0, 99.9, False), (100.0, 100.0, True), (100.0, 101.0, True),
])
def test_entry_expiry(expires: float, now: float, expired: bool) -> None:
    assert ListEntry("ip", "192.0.2.1", expires=expires).expired(now) is expired


def test_entry_expiry_uses_wall_clock() -> None:
    assert ListEntry("ip", "192.0.2.1", expires=1.0).expired() is True
    assert ListEntry("ip", "192.0.2.1", expires=4e9).expired() is False


def test_entry_as_json() -> None:
    j = ListEntry("ip", "192.0.2.1", "r", 5.0, 0.0, "bob").as_json()
    assert j == {"kind": "ip", "value": "192.0.2.1", "reason": "r", "added": 5.0,
                 "expires": None, "by": "bob"}
