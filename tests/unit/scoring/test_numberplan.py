"""scoring.numberplan.is_valid_number against phonenumbers.is_valid_number (differential).

The sample is generated on every run from a seeded RNG: 200,000 numbers, see `sample()`. The
seed is fixed (failures reproduce); `NUMBERPLAN_SEED=n` runs the same test on another sample.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import random
import re
from collections.abc import Callable, Iterator
from typing import Any

import phonenumbers
import pytest
from phonenumbers import (
    COUNTRY_CODE_TO_REGION_CODE,
    NumberParseException,
    PhoneMetadata,
    PhoneNumber,
    PhoneNumberDesc,
    PhoneNumberFormat,
    PhoneNumberType,
)

from scoring import numberplan

SAMPLE_SIZE = 200_000
SEED = int(os.environ.get("NUMBERPLAN_SEED") or 1)

#: regions whose national format is parsed back (national prefixes, leading zeros, NANPA)
NATIONAL_REGIONS = ("US", "CA", "GB", "DE", "IT", "FR", "AR", "MX", "BR", "JP", "AU", "RU",
                    "IN", "CN", "CI", "GA", "NZ", "SM", "VA", "JE", "KZ", "AX", "YT", "TA", "BQ")
DESC_FIELDS = ("general_desc", "fixed_line", "mobile", "toll_free", "premium_rate",
               "shared_cost", "personal_number", "voip", "pager", "uan", "voicemail")


def number(cc: int, digits: str) -> PhoneNumber:
    """A PhoneNumber of country code `cc` whose national significant number is `digits`,
    leading zeros as parse sets them."""
    stripped = digits.lstrip("0")
    lead = len(digits) - len(stripped)
    if lead == 0 or stripped == "":
        return PhoneNumber(country_code=cc, national_number=int(digits or "0"))
    return PhoneNumber(country_code=cc, national_number=int(stripped), italian_leading_zero=True,
                       number_of_leading_zeros=None if lead == 1 else lead)


def nsn(num: PhoneNumber) -> str:
    return phonenumbers.national_significant_number(num)


def rand_digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("0123456789") for _ in range(n))


def mutations(rng: random.Random, d: str) -> Iterator[str]:
    """The digits as they are, and near them: one digit changed, inserted, deleted, the tail
    randomised after every prefix length (same leading digits), cut and extended."""
    yield d
    for _ in range(3):
        i = rng.randrange(len(d))
        yield d[:i] + rng.choice("0123456789") + d[i + 1:]
    i = rng.randrange(len(d) + 1)
    yield d[:i] + rng.choice("0123456789") + d[i:]
    i = rng.randrange(len(d))
    yield d[:i] + d[i + 1:]
    for k in range(len(d)):
        yield d[:k] + rand_digits(rng, len(d) - k)
    yield d[:-1]
    yield d[:-2]
    yield d + rand_digits(rng, 1)
    yield d + rand_digits(rng, 2)


def example_numbers() -> list[PhoneNumber]:
    """The example number of every region (geographic and non-geographic) and type."""
    out: list[PhoneNumber] = []
    for region in sorted(phonenumbers.SUPPORTED_REGIONS):
        for t in PhoneNumberType.values():
            ex = phonenumbers.example_number_for_type(region, t)
            if ex is not None:
                out.append(ex)
    for cc in sorted(phonenumbers.COUNTRY_CODES_FOR_NON_GEO_REGIONS):
        md = PhoneMetadata.metadata_for_nongeo_region(cc)
        assert md is not None
        for field in DESC_FIELDS:
            desc = getattr(md, field)
            if desc is not None and desc.example_number:
                out.append(number(cc, desc.example_number))
    return out


def random_match(pattern: str, rng: random.Random) -> str:
    """A random string that the metadata pattern matches in full. Knows the syntax the
    metadata uses (the one scoring.numberplan combines): digits, \\d, [classes], (?:...), |,
    ? and {m,n}."""
    pos = 0

    def alternation() -> str:
        nonlocal pos
        branches = [pos]
        depth = 0
        while pos < len(pattern):  # find the branches of this level, then generate one
            ch = pattern[pos]
            if ch == "[":
                pos = pattern.index("]", pos)
            elif ch == "(":
                depth += 1
            elif ch == ")":
                if depth == 0:
                    break
                depth -= 1
            elif ch == "|" and depth == 0:
                branches.append(pos + 1)
            pos += 1
        end = pos
        pos = rng.choice(branches)
        out = sequence()
        pos = end
        return out

    def sequence() -> str:
        nonlocal pos
        out = []
        while pos < len(pattern) and pattern[pos] not in "|)":
            start = pos
            atom = atom_once()  # parses the atom, moving pos past it
            after = pos
            lo = hi = 1
            if pos < len(pattern) and pattern[pos] == "?":
                lo, pos = 0, pos + 1
            elif pos < len(pattern) and pattern[pos] == "{":
                close = pattern.index("}", pos)
                spec = pattern[pos + 1:close].split(",")
                lo, hi = int(spec[0]), int(spec[-1])
                pos = close + 1
            end = pos
            for i in range(rng.randint(lo, hi)):
                if i == 0:
                    out.append(atom)
                else:  # a fresh draw of the same atom
                    pos = start
                    out.append(atom_once())
                    pos = after
            pos = end
        return "".join(out)

    def atom_once() -> str:
        nonlocal pos
        if pattern.startswith("(?:", pos):
            pos += 3
            out = alternation()
            pos += 1  # ")"
            return out
        if pattern.startswith("\\d", pos):
            pos += 2
            return rng.choice("0123456789")
        if pattern[pos] == "[":
            close = pattern.index("]", pos)
            body = pattern[pos + 1:close].replace("\\d", "0-9")
            pos = close + 1
            chars = [c for i, c in enumerate(body) if c != "-"
                     and not (0 < i < len(body) - 1 and body[i - 1] == "-")]
            for m in re.finditer(r"(\d)-(\d)", body):
                chars += [str(d) for d in range(int(m[1]), int(m[2]) + 1)]
            return rng.choice(chars)
        pos += 1
        return pattern[pos - 1]

    out = alternation()
    assert re.fullmatch(pattern, out), (pattern, out)
    return out


def pattern_numbers(rng: random.Random, per: int, per_shared: int) -> Iterator[PhoneNumber]:
    """Random numbers in the ranges of every desc of every region (geographic and not), `per`
    of each (`per_shared` in regions that share their country code), and each of them with
    one digit changed."""
    for cc, regions in COUNTRY_CODE_TO_REGION_CODE.items():
        for region in regions:
            draws = per if len(regions) == 1 else per_shared
            md = PhoneMetadata.metadata_for_region_or_calling_code(cc, region)
            assert md is not None
            for field in DESC_FIELDS:
                desc = getattr(md, field)
                if desc is None or not desc.national_number_pattern:
                    continue
                for _ in range(draws):
                    d = random_match(desc.national_number_pattern, rng)
                    yield number(cc, d)
                    i = rng.randrange(len(d))
                    yield number(cc, d[:i] + rng.choice("0123456789") + d[i + 1:])


def random_after_every_country_code(rng: random.Random, per: int) -> Iterator[PhoneNumber]:
    for cc in COUNTRY_CODE_TO_REGION_CODE:
        for length in range(1, 18):
            for _ in range(per):
                yield number(cc, rand_digits(rng, length))


def from_examples(rng: random.Random) -> Iterator[PhoneNumber]:
    for ex in example_numbers():
        cc = ex.country_code
        assert cc is not None
        for d in mutations(rng, nsn(ex)):
            if d:
                yield number(cc, d)


def leading_zeros(rng: random.Random, n: int) -> Iterator[PhoneNumber]:
    """italian_leading_zero with every number_of_leading_zeros (None, 0, 1, 2, 3, -1); the
    digits after the zeros random or from an example number."""
    ccs = [*COUNTRY_CODE_TO_REGION_CODE]
    examples = example_numbers()
    for i in range(n):
        if i % 2:
            ex = rng.choice(examples)
            cc, rest = ex.country_code or 0, nsn(ex).lstrip("0") or "0"
        else:
            cc, rest = rng.choice(ccs), rand_digits(rng, rng.randrange(1, 14)).lstrip("0") or "1"
        zeros = rng.choice((None, 0, 1, 1, 2, 3, -1))
        yield PhoneNumber(country_code=cc, national_number=int(rest),
                          italian_leading_zero=True, number_of_leading_zeros=zeros)
        yield PhoneNumber(country_code=cc, national_number=int(rest),
                          italian_leading_zero=False, number_of_leading_zeros=zeros)


def parsed(rng: random.Random, n: int) -> Iterator[PhoneNumber]:
    """What parse makes of text: national formats of (mutated) example numbers and random
    national digits read in NATIONAL_REGIONS, and '+' followed by random digits."""
    by_region: dict[str, list[PhoneNumber]] = {}
    for ex in example_numbers():
        by_region.setdefault(phonenumbers.region_code_for_number(ex) or "ZZ", []).append(ex)
    ccs = [*COUNTRY_CODE_TO_REGION_CODE]
    made = 0
    while made < n:
        kind = made % 3
        if kind == 0:
            region = rng.choice(NATIONAL_REGIONS)
            ex = rng.choice(by_region.get(region) or [phonenumbers.example_number(region)
                                                       or PhoneNumber(country_code=1,
                                                                      national_number=1)])
            text = phonenumbers.format_number(ex, PhoneNumberFormat.NATIONAL)
            positions = [i for i, ch in enumerate(text) if ch.isdigit()]
            i = rng.choice(positions)
            text = text[:i] + rng.choice("0123456789") + text[i + 1:]
        elif kind == 1:
            region = rng.choice(NATIONAL_REGIONS)
            text = rng.choice(("", "0", "00", "1", "8")) + rand_digits(rng, rng.randrange(3, 14))
        else:
            region = "ZZ"
            text = f"+{rng.choice(ccs)}{rand_digits(rng, rng.randrange(1, 16))}"
        with contextlib.suppress(NumberParseException):
            yield phonenumbers.parse(text, region)
        made += 1


def every_npa(rng: random.Random, per: int) -> Iterator[PhoneNumber]:
    """+1 with every NPA 000-999, random NXX-XXXX (half of them with a [2-9] NXX)."""
    for npa in range(1000):
        for i in range(per):
            first = rng.choice("23456789") if i % 2 else rng.choice("0123456789")
            yield number(1, f"{npa:03d}{first}{rand_digits(rng, 6)}")


@functools.cache
def sample(seed: int, size: int = SAMPLE_SIZE) -> list[PhoneNumber]:
    """The numbers of the differential test, shuffled (a tuple: shared by the tests)."""
    rng = random.Random(seed)
    nums = [*random_after_every_country_code(rng, 12),  # 215 x 17 x 12 = 43,860
            *pattern_numbers(rng, 10, 40),  # 48,360
            *from_examples(rng),  # about 25,800
            *leading_zeros(rng, 10_000),  # 20,000
            *parsed(rng, 24_000),  # about 23,200
            *every_npa(rng, 20)]  # 20,000
    ccs = [*COUNTRY_CODE_TO_REGION_CODE]
    weighted = [1, 1, 1, 1, 7, 39, 44, 47, 61, 212, 262, 290, 358, 590, 599, 49, 33, 86, 91, 800,
                882, 883, 979]
    while len(nums) < size:  # the rest: random lengths after random (and multi-region) codes
        cc = rng.choice(weighted) if rng.random() < 0.5 else rng.choice(ccs)
        nums.append(number(cc, rand_digits(rng, rng.randrange(1, 18))))
    rng.shuffle(nums)
    return nums[:size]


def by_country_code(nums: list[PhoneNumber]) -> list[PhoneNumber]:
    """phonenumbers compiles its patterns through re's cache of 512; in a random order of
    countries that cache thrashes and phonenumbers costs 60 us a number instead of 5."""
    return sorted(nums, key=lambda n: n.country_code or 0)


def outcome(f: Callable[[PhoneNumber], bool], num: PhoneNumber) -> object:
    try:
        return f(num)
    except Exception as exc:  # the same exception type is the same answer
        return type(exc)


def test_every_country_code_takes_the_fast_path() -> None:
    """Otherwise the differential test below would compare phonenumbers with itself."""
    ours, theirs = numberplan.fast_path_country_codes()
    assert theirs == []
    assert sorted(ours) == sorted(COUNTRY_CODE_TO_REGION_CODE)


def test_differential_against_phonenumbers() -> None:
    nums = sample(SEED)
    assert len(nums) == SAMPLE_SIZE
    want = {id(n): phonenumbers.is_valid_number(n) for n in by_country_code(nums)}
    mismatches = [(n, want[id(n)]) for n in nums  # ours in the sample's (mixed) order
                  if numberplan.is_valid_number(n) is not want[id(n)]]
    assert not mismatches, (f"seed {SEED}: {len(mismatches)} differ, e.g. "
                            f"{[(repr(n), w) for n, w in mismatches[:5]]}")
    valid = sum(want.values())
    assert SAMPLE_SIZE // 10 < valid < SAMPLE_SIZE // 2  # valid and invalid numbers both


def test_coverage_of_the_sample() -> None:
    """The sample is selected into every region of every country code (region_code_for_number,
    which is_valid_number starts with) and holds valid numbers of almost every region."""
    selected: set[str | None] = set()
    valid: set[str | None] = set()
    for n in by_country_code(sample(SEED)):
        region = phonenumbers.region_code_for_number(n)
        selected.add(region)
        if region is not None and phonenumbers.is_valid_number_for_region(n, region):
            valid.add(region)
    every = {r for rs in COUNTRY_CODE_TO_REGION_CODE.values() for r in rs}
    # EH: MA comes first for +212 and its leading digits [5-8] cover all that EH's general desc
    # admits, so region_code_for_number never returns EH
    assert every - selected == {"EH"}
    assert every - valid == {"EH"}


@pytest.mark.parametrize("num", [
    PhoneNumber(),
    PhoneNumber(country_code=1),
    PhoneNumber(national_number=2015550123),
    PhoneNumber(country_code=0, national_number=2015550123),
    PhoneNumber(country_code=999, national_number=2015550123),
    PhoneNumber(country_code=-1, national_number=2015550123),
    PhoneNumber(country_code=10**30, national_number=2015550123),
    PhoneNumber(country_code=1, national_number=0),
    PhoneNumber(country_code=1, national_number=-2015550123),
    PhoneNumber(country_code=1, national_number=2015550123 * 10**20),
    PhoneNumber(country_code=1, national_number=10**5000),
    PhoneNumber(country_code=39, national_number=10**5000),
    PhoneNumber(country_code=True, national_number=2015550123),
    PhoneNumber(country_code=1, national_number=True),
    PhoneNumber(country_code=39, national_number=212345678, italian_leading_zero=True),
    PhoneNumber(country_code=39, national_number=212345678, italian_leading_zero=True,
                number_of_leading_zeros=0),
    PhoneNumber(country_code=39, national_number=212345678, italian_leading_zero=True,
                number_of_leading_zeros=True),
    PhoneNumber(country_code=39, national_number=6698, italian_leading_zero=True,
                number_of_leading_zeros=-3),
    PhoneNumber(country_code=800, national_number=12345678),
    PhoneNumber(country_code=800, national_number=12345678, italian_leading_zero=True),
    PhoneNumber(country_code=882, national_number=3451234567),
    PhoneNumber(country_code=44, national_number=1624756789),  # IM
    PhoneNumber(country_code=7, national_number=7011234567),  # KZ
    PhoneNumber(country_code=599, national_number=7151234),  # BQ
    PhoneNumber(country_code=1, national_number=8002345678),  # toll free: US, not by NPA
])
def test_corner_cases(num: PhoneNumber) -> None:
    assert outcome(numberplan.is_valid_number, num) == outcome(phonenumbers.is_valid_number, num)


def test_unsupported_metadata_falls_back_to_phonenumbers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Patterns outside the combinable syntax: every country code is left to phonenumbers."""
    monkeypatch.setattr(numberplan, "_SAFE_PATTERN", re.compile(r"\d*"))  # rejects '[', '(?:'
    monkeypatch.setattr(numberplan, "_plans", {})
    monkeypatch.setattr(numberplan, "_validities", {})
    calls: list[PhoneNumber] = []
    real = phonenumbers.is_valid_number

    def spy(num: PhoneNumber) -> bool:
        calls.append(num)
        return real(num)

    monkeypatch.setattr(phonenumbers, "is_valid_number", spy)
    nums = by_country_code(sample(SEED)[:5_000])
    assert [numberplan.is_valid_number(n) for n in nums] == [real(n) for n in nums]
    assert len(calls) == len(nums)  # every answer was phonenumbers'
    _, theirs = numberplan.fast_path_country_codes()
    assert sorted(theirs) == sorted(COUNTRY_CODE_TO_REGION_CODE)


def test_unsupported_pattern_syntax_is_refused() -> None:
    for pattern in (r"(\d)\1", r"^1\d{3}$", r"(?=1)\d+", r"(?i)1", r"1(?:2", r"[12", "1+", "a"):
        with pytest.raises(numberplan._Unsupported):
            numberplan._checked(pattern)
    assert numberplan._checked(r"(?:2[0-8]|3[1-9])\d{6,7}|[58]\d?") != ""


PIECES = (r"\d", r"\d{2}", r"[01]\d{0,3}", r"2\d?", r"1[02]\d{2}", r"0(?:1|2\d)",
          r"(?:12|2)\d{0,2}", r"[12]{3}", r"0\d{3}", r"1", "")


def synthetic_metadata(rng: random.Random) -> PhoneMetadata:
    """Unregistered metadata with short patterns, random possible lengths (empty = as the
    general desc), absent descs, empty patterns, and fixed line = mobile pattern."""

    def desc() -> PhoneNumberDesc | None:
        if rng.random() < 0.2:
            return None
        pattern = "|".join(rng.sample(PIECES, rng.randint(1, 2)))
        lengths = tuple(sorted(rng.sample(range(1, 5), rng.randint(0, 3))))
        return PhoneNumberDesc(national_number_pattern=pattern, possible_length=lengths)

    fields: dict[str, Any] = {name: desc() for name in DESC_FIELDS}
    if rng.random() < 0.4 and fields["fixed_line"] is not None:  # same pattern, other lengths
        fields["mobile"] = PhoneNumberDesc(
            national_number_pattern=fields["fixed_line"].national_number_pattern,
            possible_length=tuple(sorted(rng.sample(range(1, 5), rng.randint(0, 3)))))
    return PhoneMetadata(id="XX", country_code=999, register=False, **fields)


def test_type_matching_on_synthetic_metadata() -> None:
    """The per-region core (type != UNKNOWN) against phonenumbers' own `_number_type_helper`
    on metadata that exercises what the real metadata may not: lengths outside a desc's
    possible_length that its pattern matches, same fixed-line and mobile patterns with
    different lengths, missing descs and empty patterns. Every string of 0-2 of up to 5
    digits on 400 metadata objects."""
    helper = getattr(phonenumbers.phonenumberutil, "_number_type_helper")  # noqa: B009
    rng = random.Random(SEED)
    strings = ["".join(p) for n in range(6) for p in itertools.product("012", repeat=n)]
    seen_same = 0
    for _ in range(400):
        md = synthetic_metadata(rng)
        seen_same += md.same_mobile_and_fixed_line_pattern
        ours = numberplan._Validity(md)
        for s in strings:
            assert ours(s) is (helper(s, md) != PhoneNumberType.UNKNOWN), (md, s)
    assert seen_same > 50


def test_validity_for_any_region() -> None:
    """The is_valid_number_for_region half (country code = the region's, "001" for the
    non-geographical entities) for numbers put to regions that are not theirs too."""
    rng = random.Random(SEED)
    regions = [*sorted(phonenumbers.SUPPORTED_REGIONS), "001"]
    nums = by_country_code([n for n in sample(SEED)[:20_000]
                            if n.country_code in COUNTRY_CODE_TO_REGION_CODE])
    for num in nums:
        cc = num.country_code
        assert cc is not None
        own = COUNTRY_CODE_TO_REGION_CODE[cc]
        region = rng.choice(own) if rng.random() < 0.5 else rng.choice(regions)
        ours = numberplan._for_region(cc, region)(nsn(num))
        assert ours is phonenumbers.is_valid_number_for_region(num, region), (num, region)
