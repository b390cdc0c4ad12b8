"""Caller-ID plausibility check: numbering plans, caller = callee, neighbour spoofing,
do-not-originate list, PAI vs From, and hostile input."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import phonenumbers
import pytest

from lists.matcher import ListSnapshot
from lists.model import ListEntry
from scoring.checks import callerid
from scoring.model import CheckResult
from tests.unit.scoring.support import attempt, config, ctx

# The digits of 4155550123 in other scripts (written as code points: ruff flags the glyphs).
FULLWIDTH = "".join(chr(0xFF10 + int(d)) for d in "4155550123")
MATH_BOLD = "".join(chr(0x1D7CE + int(d)) for d in "4155550123")
# A valid US callee that shares no leading digits with the callers used below.
CALLEE_US = "+13125550142"


def run(lists: ListSnapshot | None = None, region: str = "US", digits: int = 6,
        **fields: Any) -> CheckResult:
    fields.setdefault("ruri_user", CALLEE_US)
    cfg = config(callerid__region=region, callerid__neighbour_digits=str(digits))
    return callerid.check(ctx(attempt(**fields), cfg=cfg, lists=lists))


def dno(*numbers: str, expires: float = 0.0) -> ListSnapshot:
    return ListSnapshot({"dno": [ListEntry("number", n, expires=expires) for n in numbers]}, 1)


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    callerid._classify_cached.cache_clear()
    yield
    callerid._classify_cached.cache_clear()


def test_module_shape() -> None:
    assert callerid.name == "callerid"
    assert callerid.shared is False
    r = run(from_user="+14155550123")
    assert isinstance(r, CheckResult) and r.name == "callerid"


# ---------------------------------------------------------------------------------------------
# valid numbers: no signal


@pytest.mark.parametrize(("region", "from_user", "ruri_user"), [
    ("US", "+14155550123", CALLEE_US),
    ("US", "4155550123", CALLEE_US),  # national, US plan
    ("US", "14155550123", CALLEE_US),  # national with trunk prefix 1
    ("US", "+1-415-555-0123", CALLEE_US),  # visual separators
    ("US", "+1 (415) 555.0123", CALLEE_US),
    ("US", "%2B14155550123", CALLEE_US),  # %-escaped '+'
    ("US", "+14155550123;npdi", CALLEE_US),  # user parameters
    ("US", "011493012345678", CALLEE_US),  # US international prefix, German number
    ("US", "+442079460000", CALLEE_US),
    ("DE", "+493012345678", "+498912345678"),
    ("DE", "03012345678", "08912345678"),  # national, German plan
    ("DE", "00442079460000", "08912345678"),  # German international prefix, UK number
    ("GB", "02079460000", "01614960000"),
    ("GB", "+442079460000", "+441614960000"),
])
def test_valid_numbers_score_zero(region: str, from_user: str, ruri_user: str) -> None:
    r = run(region=region, from_user=from_user, ruri_user=ruri_user)
    assert (r.score, r.reason) == (0.0, "")


def test_valid_pai_tel_uri_and_sip_uri_score_zero() -> None:
    assert run(from_user="+14155550123", pai="<tel:+1-415-555-0123>").score == 0.0
    assert run(from_user="+14155550123",
               pai='"Alice" <sip:4155550123@carrier.example;user=phone>').score == 0.0


@pytest.mark.parametrize("text", [
    "+14155550123", "4155550123", "tel:+14155550123", "sip:+14155550123@x", "+1 415 555 0123",
    "%2B14155550123", "+14155550123;npdi", "<sip:+14155550123;npdi;rn=x@carrier>",
])
def test_classify_normalises_to_e164(text: str) -> None:
    n = callerid.classify(callerid.uri_user(text), "US")
    assert n is not None
    assert (n.e164, n.country, n.nsn, n.valid, n.score) == (
        "+14155550123", 1, "4155550123", True, 0.0)


# ---------------------------------------------------------------------------------------------
# names are not numbers


@pytest.mark.parametrize("user", [
    "alice", "bob.smith", "user1001", "1001abc", "anonymous", "Anonymous", "*66", "+", "+-+",
    "", "alice@example.com",
])
def test_named_users_give_no_signal(user: str) -> None:
    assert callerid.classify(user, "US") is None
    r = run(from_user=user, from_domain="example.com", pai="<sip:bob@example.com>")
    assert (r.score, r.reason) == (0.0, "")


# ---------------------------------------------------------------------------------------------
# invalid numbers


@pytest.mark.parametrize(("from_user", "score", "why"), [
    ("0000000000", 0.8, "repeats one digit"),
    ("1111111111", 0.8, "repeats one digit"),
    ("+11111111111", 0.8, "repeats one digit"),
    ("+9999999999", 0.8, "repeats one digit"),  # unparseable (country code 999), still absurd
    ("+10000000000", 0.8, "repeats one digit"),  # the national number is all zeros
    ("+12", 0.8, "is too short"),
    ("+1", 0.8, "is too short"),
    ("+1415555012345678", 0.8, "is too long"),
    ("4" * 40, 0.8, "is too long"),
    ("4155550123" * 4, 0.8, "is too long"),  # 40 digits: never handed to phonenumbers
    ("+99912345678", 0.7, "has an unknown country code"),
    ("1+4155550123", 0.7, "has '+' inside the number"),
    ("++14155550123", 0.7, "has '+' inside the number"),
    ("²²²", 0.7, "uses non-ASCII digits"),
    ("٤١٥٥٥٥٠١٢٣", 0.7, "uses non-ASCII digits"),  # Arabic-Indic digits
    (FULLWIDTH, 0.7, "uses non-ASCII digits"),
    ("5551234", 0.5, "is not in an assigned number range"),  # 7 digits: local only
    ("+11235550123", 0.5, "is not in an assigned number range"),  # area code 123
])
def test_invalid_numbers(from_user: str, score: float, why: str) -> None:
    assert from_user  # (PBX extensions such as 1001 are tested below)
    r = run(from_user=from_user)
    assert r.score == score
    assert why in r.reason
    assert r.reason.startswith("From ")


def test_from_uri_is_read_when_from_user_is_empty() -> None:
    r = run(from_user="", from_uri="tel:0000000000")
    assert r.score == 0.8
    assert r.reason == "From 0000000000 repeats one digit"


def test_invalid_pai_is_scored_too() -> None:
    r = run(from_user="alice", pai="<sip:0000000000@carrier.example>")
    assert r.score == 0.8
    assert r.reason.startswith("PAI 0000000000 repeats one digit")


def test_unsupported_region_judges_only_e164_numbers() -> None:
    assert callerid.plan_region("XX") == "ZZ"
    assert callerid.plan_region("de") == "DE"
    assert run(region="XX", from_user="4155550123", ruri_user="").score == 0.0
    assert run(region="XX", from_user="+14155550123", ruri_user="").score == 0.0
    assert run(region="XX", from_user="+99912345678", ruri_user="").score == 0.7


def test_region_decides_national_numbers() -> None:
    # A German national number is nonsense in the US plan and valid in the German one.
    assert run(region="US", from_user="03012345678").score > 0.0
    assert run(region="DE", from_user="03012345678", ruri_user="08912345678").score == 0.0


# ---------------------------------------------------------------------------------------------
# caller equal to callee


@pytest.mark.parametrize(("from_user", "ruri_user"), [
    ("+14155550123", "+14155550123"),
    ("4155550123", "+14155550123"),  # same number, different notation
    ("+14155550123", "1-415-555-0123"),
])
def test_caller_equal_to_callee(from_user: str, ruri_user: str) -> None:
    r = run(from_user=from_user, ruri_user=ruri_user)
    assert r.score == 0.9
    assert r.reason == "caller +14155550123 equals the callee"


def test_pai_equal_to_callee() -> None:
    r = run(from_user="alice", pai="<tel:+14155550123>", ruri_user="4155550123")
    assert r.score == 0.9


def test_callee_falls_back_to_to_user() -> None:
    r = run(from_user="+14155550123", ruri_user="", to_user="4155550123")
    assert r.score == 0.9


def test_named_caller_and_callee_with_same_name_give_no_signal() -> None:
    assert run(from_user="alice", ruri_user="alice").score == 0.0


# ---------------------------------------------------------------------------------------------
# neighbour spoofing


def test_neighbour_spoofing_fires() -> None:
    r = run(from_user="+14155550123", ruri_user="+14155550199")
    assert r.score == 0.6
    assert r.reason == "neighbour spoofing: From +14155550123 shares the callee's first 6 digits"


def test_neighbour_spoofing_needs_shared_leading_digits() -> None:
    assert run(from_user="+12125550123", ruri_user="+14155550199").score == 0.0
    # 415-556 vs 415-555: five digits shared, six asked for
    assert run(from_user="+14155560123", ruri_user="+14155550199").score == 0.0


@pytest.mark.parametrize(("digits", "score"), [(3, 0.6), (8, 0.6), (9, 0.0), (12, 0.0)])
def test_neighbour_digits_is_configurable(digits: int, score: float) -> None:
    # +1 415 555 0123 vs +1 415 555 0199: the national numbers share 8 leading digits
    assert run(digits=digits, from_user="+14155550123", ruri_user="+14155550199").score == score


def test_neighbour_spoofing_needs_the_same_country() -> None:
    # both national numbers start with 301234, but one is German and one American
    assert run(from_user="+493012345678", ruri_user="+13012345679").score == 0.0
    assert run(from_user="+13012345678", ruri_user="+13012345679").score == 0.6


def test_neighbour_spoofing_needs_valid_numbers() -> None:
    # the callee is too short to be a valid number: no neighbour comparison
    r = run(from_user="+14155550123", ruri_user="+1415555")
    assert "neighbour" not in r.reason
    assert r.score == 0.0


def test_neighbour_spoofing_through_pai() -> None:
    r = run(from_user="alice", pai="<sip:+14155550123@carrier>", ruri_user="+14155550199")
    assert r.score == 0.6
    assert "PAI +14155550123" in r.reason


# ---------------------------------------------------------------------------------------------
# do-not-originate list


@pytest.mark.parametrize(("from_user", "pai"), [
    ("+18005550100", ""),
    ("8005550100", ""),  # national notation, matched through E.164
    ("1-800-555-0100", ""),
    ("alice", "<sip:+18005550100@carrier.example>"),
    ("+14155550123", "<tel:+18005550100>"),
])
def test_dno_match(from_user: str, pai: str) -> None:
    r = run(lists=dno("+18005550100"), from_user=from_user, pai=pai)
    assert r.score == 1.0
    assert r.reason.startswith("caller +18005550100 is on the do-not-originate list")


def test_dno_no_match_for_other_numbers_or_other_lists() -> None:
    assert run(lists=dno("+18005550100"), from_user="+18005550101").score == 0.0
    block = ListSnapshot({"block": [ListEntry("number", "+18005550100")]}, 1)
    assert run(lists=block, from_user="+18005550100").score == 0.0


def test_dno_expired_entry_does_not_match() -> None:
    assert run(lists=dno("+18005550100", expires=1.0), from_user="+18005550100").score == 0.0


def test_dno_reason_lists_other_signals() -> None:
    r = run(lists=dno("+18005550100"), from_user="+18005550100", pai="<tel:+14155550123>",
            ruri_user="+14155550199")
    assert r.score == 1.0
    assert r.reason == ("caller +18005550100 is on the do-not-originate list "
                        "(also: neighbour, PAI!=From)")


# ---------------------------------------------------------------------------------------------
# P-Asserted-Identity against From


def test_pai_disagreeing_with_from() -> None:
    r = run(from_user="+14155550123", pai='"Bob" <sip:+12125550100@carrier.example>')
    assert r.score == 0.4
    assert r.reason == "PAI +12125550100 differs from From +14155550123"


@pytest.mark.parametrize("pai", [
    "", "<sip:+14155550123@carrier.example>", "<tel:4155550123>", "<sip:alice@example.com>",
    "garbage <<<", "<sip:@x>",
])
def test_pai_agreeing_missing_or_named_gives_no_signal(pai: str) -> None:
    assert run(from_user="+14155550123", pai=pai).score == 0.0


def test_strongest_signal_wins_and_others_are_mentioned() -> None:
    r = run(from_user="5551234", pai="<tel:+14155550123>")
    assert r.score == 0.5
    assert r.reason == "From 5551234 is not in an assigned number range (also: PAI!=From)"
    # the stronger signal is found after the weaker one, and still named first
    r = run(from_user="5551234", ruri_user="555-1234")
    assert r.score == 0.9
    assert r.reason == "caller +15551234 equals the callee (also: invalid From)"


# ---------------------------------------------------------------------------------------------
# hostile input: never raises, bounded work


HOSTILE = [
    "9" * 10_000, "a1" * 5_000, "+" * 10_000, "²²²", "+-+", "\x00", "\x00" * 50, "%", "%%2B",
    "%00%00", "%2B%2B1", "٤١٥٥٥٥٠١٢٣", "😀", "+1😀4155550123", "<sip:", "<", ">", ";", "@",
    "tel:", "sip:@", " ", "\t+1 415\t555 0123", "0" * 33, "+" + "1" * 31, "1\n2\n3", "\u200b123",
    "+1\u00a0415", FULLWIDTH, MATH_BOLD,
]


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_values_never_raise(value: str) -> None:
    for field in ("from_user", "pai", "ruri_user", "to_user", "from_uri"):
        kw: dict[str, Any] = {field: value}
        if field != "from_user":
            kw["from_user"] = "+14155550123"
        r = run(lists=dno("+18005550100"), **kw)
        assert 0.0 <= r.score <= 1.0


@pytest.mark.parametrize(("value", "score"), [
    ("9" * 10_000, 0.8),  # a 10 KB number: too long
    ("a1" * 5_000, 0.0),  # a 10 KB name: not a number
    ("²²²", 0.7),
    ("+-+", 0.0),
    ("\x00", 0.0),
    ("\x00" * 50, 0.0),
])
def test_hostile_from_users_score(value: str, score: float) -> None:
    assert run(from_user=value).score == score


def test_only_the_head_of_a_huge_value_is_looked_at() -> None:
    # digits for the first MAX_SCAN characters: judged as a (far too long) number without
    # scanning the rest
    r = run(from_user="1" * callerid.MAX_SCAN + "alice" * 1000)
    assert r.score == 0.8
    assert r.reason.endswith("is too long")


def test_long_strings_never_reach_phonenumbers(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    real = phonenumbers.parse

    def spy(number: str, region: str | None = None) -> phonenumbers.PhoneNumber:
        seen.append(len(number))
        return real(number, region)

    monkeypatch.setattr(phonenumbers, "parse", spy)
    for value in ("1" * 33, "4155550123" * 4, "9" * 10_000, "+" + "4" * 40, "+14155550123"):
        run(from_user=value, pai=f"<tel:{value}>", ruri_user=value)
    assert seen, "the spy saw no call at all"
    assert max(seen) <= callerid.MAX_PARSE


def test_classify_never_raises_when_phonenumbers_does(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(number: str, region: str | None = None) -> phonenumbers.PhoneNumber:
        raise RuntimeError("bug in the library")

    monkeypatch.setattr(phonenumbers, "parse", broken)
    n = callerid.classify("4155550123", "US")
    assert n is not None and n.score == 0.7


def test_reason_text_is_printable_and_bounded() -> None:
    r = run(from_user="²" * 100)
    assert r.score == 0.7
    assert r.reason.isprintable() and r.reason.isascii()
    assert len(r.reason) < 80


def test_parsing_is_cached() -> None:
    callerid.classify("+14155550123", "US")
    before = callerid._classify_cached.cache_info()
    callerid.classify("+14155550123", "US")
    after = callerid._classify_cached.cache_info()
    assert after.hits == before.hits + 1
    assert after.currsize == before.currsize
    callerid.classify("9" * 1000, "US")  # hostile lengths do not fill the cache
    assert callerid._classify_cached.cache_info().currsize == after.currsize


def test_named_caller_costs_no_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = phonenumbers.parse

    def spy(number: str, region: str | None = None) -> phonenumbers.PhoneNumber:
        calls.append(number)
        return real(number, region)

    monkeypatch.setattr(phonenumbers, "parse", spy)
    assert run(from_user="alice", ruri_user="+14155550199").score == 0.0
    assert calls == []
    run(from_user="+14155550123", ruri_user="+14155550199")
    assert calls == ["+14155550123", "+14155550199"]


@pytest.mark.parametrize("ext", ["12", "1001", "4711", "100200"])
def test_short_numeric_users_are_pbx_extensions(ext: str) -> None:
    r = run(from_user=ext)
    assert r.score == 0.0, r.reason
