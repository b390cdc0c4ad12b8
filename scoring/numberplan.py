"""`is_valid_number`: what `phonenumbers.is_valid_number` returns, from precompiled matchers.

Why this is hand-written: the caller-ID check (`scoring/checks/callerid.py`) runs on every
INVITE inside Kamailio's SIP workers, and a campaign that rotates caller IDs misses its parse
cache every time. For such a number `phonenumbers.is_valid_number` does its work in Python:
`region_code_for_number` walks the regions of the country code (25 for +1) and, for a region
without leading digits, `_number_type_helper` makes up to 11 `_is_number_matching_desc` calls
(a possible-length test, a `re.compile` cache lookup and a regex match each); then
`is_valid_number_for_region` runs the type helper once more. Measured side by side with
`.venv/bin/python bench/numberplan.py` (2 vCPUs, Python 3.11, phonenumbers 9.0.43; best of 7
rounds of 5,000 numbers, µs per call, phonenumbers / this module): random +1 numbers
14.3 / 1.01 (14x), random +44 9.6 / 0.99 (10x), random +49 5.5 / 0.52 (11x), valid US numbers
7.4 / 0.61 (12x), random numbers after random country codes 27.9 / 0.48 (phonenumbers
compiles through re's cache of 512 patterns, too small for all regions); the caller-ID
`_classify` of a random +1 number 33.8 -> 20.1 µs (`parse` is most of the rest). The first
number of a country code builds its plan: 2.8 ms for +1 (metadata already loaded).

How: per country code, on its first use (cached for the process), the region selection of
`region_code_for_number` becomes a list of steps in the regions' order: a run of consecutive
regions with `leading_digits` is one compiled alternation `(?:ld1)()|(?:ld2)()|...` whose
`match` picks the same first region as the loop (the empty group after each branch names it);
a region without leading digits is a full validity test. Per region (per metadata object) and
per national-number length, "type != UNKNOWN" is one compiled pattern,
`(?=(?:general)\\Z)(?:type1|type2|...)`, over the type descs whose `possible_length` admits the
length (an empty list admits every length, as `_is_number_matching_desc` has it; a desc without
pattern or with an empty one never matches); `mobile` only when
`same_mobile_and_fixed_line_pattern` is false, as in `_number_type_helper`. The checks of
`is_valid_number_for_region` (metadata present, the region's country code equal to the
number's, "001" for the non-geographical entities 800, 808, 870, 878, 881, 882, 883, 888 and
979 via `metadata_for_nongeo_region`) are made once per (country code, region), when the
region is first selected; a length's pattern is compiled on the first number of that length.
The national significant number is built as `national_significant_number` builds it
(`italian_leading_zero`, `number_of_leading_zeros` None meaning 1).

Exactness: patterns are only combined when made of the regex syntax the metadata uses today
(digits, `\\d`, character classes, `(?:`, `|`, `?`, `{m,n}`; no capturing groups, anchors,
lookarounds or flags) and when each compiles on its own. A country code with any other
pattern (found when its plan, a region or a length is first built) is handed to
`phonenumbers.is_valid_number` from then on, and so is every number whose `country_code`,
`national_number` or `number_of_leading_zeros` is not a plain int. With phonenumbers 9.0.43
no country code falls back. `tests/unit/scoring/test_numberplan.py` compares the results with
phonenumbers on 200,000 numbers generated per run (random digits after every country code,
random numbers in the ranges of every desc of every region, mutated example numbers of every
region and type, leading zeros, national formats parsed back, every +1 NPA), and the
per-region part against `_number_type_helper` on synthetic metadata.

Depends only on phonenumbers' public metadata objects: `PhoneMetadata.metadata_for_region`,
`metadata_for_nongeo_region` and `metadata_for_region_or_calling_code`,
`COUNTRY_CODE_TO_REGION_CODE`, the fields of `PhoneMetadata` (`leading_digits`,
`country_code`, `same_mobile_and_fixed_line_pattern`, the type descs) and of
`PhoneNumberDesc` (`national_number_pattern`, `possible_length`).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Sequence
from typing import Final

import phonenumbers
from phonenumbers import COUNTRY_CODE_TO_REGION_CODE, PhoneMetadata, PhoneNumberDesc

__all__ = ["fast_path_country_codes", "is_valid_number"]

NON_GEO: Final = "001"  # phonenumbers' REGION_CODE_FOR_NON_GEO_ENTITY

#: the descs `_number_type_helper` tests after the general desc, `mobile` excluded (see above)
_TYPE_FIELDS: Final = ("premium_rate", "toll_free", "shared_cost", "voip", "personal_number",
                       "pager", "uan", "voicemail", "fixed_line")

#: the regex syntax this module knows how to combine (all the metadata uses); else fall back
_SAFE_PATTERN: Final = re.compile(r"(?:\(\?:|\\d|[0-9\[\]\-|){},?])*")

#: matchers of lengths up to this are kept per length (a hostile number may have any length)
_MAX_CACHED_LENGTH: Final = 64

_Matcher = Callable[[str], "re.Match[str] | None"]
_Plan = Callable[[str], bool]


class _Unsupported(Exception):
    """Metadata this module does not reproduce exactly: use phonenumbers for this country code."""


def _compile(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise _Unsupported(pattern) from exc


def _checked(pattern: str) -> str:
    """`pattern`, if it is made of the syntax that can be combined and compiles on its own."""
    if _SAFE_PATTERN.fullmatch(pattern) is None:
        raise _Unsupported(pattern)
    _compile(pattern)  # unbalanced and the like: phonenumbers would raise, leave it to it
    return pattern


def _admits(desc: PhoneNumberDesc | None, length: int | None) -> str | None:
    """The desc's pattern if `_is_number_matching_desc` can be true for a number of `length`
    digits (None: a length that no desc of the region lists), else None."""
    if desc is None:
        return None
    lengths = desc.possible_length
    if len(lengths) > 0 and (length is None or length not in lengths):
        return None
    pattern = desc.national_number_pattern
    if pattern is None or len(pattern) == 0:  # as `_match_national_number`: never matches
        return None
    return _checked(pattern)


class _Validity:
    """`_number_type_helper(nsn, metadata) != UNKNOWN` as one compiled pattern per length,
    each compiled on first use of its length."""

    __slots__ = ("_by_length", "_descs", "_general", "_lengths", "_other")

    def __init__(self, md: PhoneMetadata) -> None:
        descs = [getattr(md, field) for field in _TYPE_FIELDS]
        if not md.same_mobile_and_fixed_line_pattern:
            descs.append(md.mobile)
        lengths: set[int] = set()
        for desc in (md.general_desc, *descs):
            if desc is not None:
                if any(type(n) is not int for n in desc.possible_length):
                    raise _Unsupported(repr(desc))
                if desc.national_number_pattern and \
                        _SAFE_PATTERN.fullmatch(desc.national_number_pattern) is None:
                    raise _Unsupported(desc.national_number_pattern)  # compiled on first use
                lengths.update(desc.possible_length)
        self._general: PhoneNumberDesc | None = md.general_desc
        self._descs: tuple[PhoneNumberDesc | None, ...] = tuple(descs)
        self._lengths = frozenset(lengths)
        self._by_length: dict[int, _Matcher | None] = {}
        self._other: list[_Matcher | None] = []  # the matcher of any other length, once built

    def _matcher(self, length: int | None) -> _Matcher | None:
        general = _admits(self._general, length)
        if general is None:
            return None
        types = list(dict.fromkeys(p for d in self._descs
                                   if (p := _admits(d, length)) is not None))
        if not types:
            return None
        either = "|".join(f"(?:{p})" for p in types)
        return _compile(f"(?=(?:{general})\\Z)(?:{either})").fullmatch

    def _build(self, length: int) -> _Matcher | None:
        if length in self._lengths:
            matcher = self._matcher(length)
        else:
            if not self._other:
                self._other.append(self._matcher(None))
            matcher = self._other[0]
        if length <= _MAX_CACHED_LENGTH:
            self._by_length[length] = matcher
        return matcher

    def __call__(self, nsn: str) -> bool:
        try:
            matcher = self._by_length[len(nsn)]
        except KeyError:
            matcher = self._build(len(nsn))
        return matcher is not None and matcher(nsn) is not None


_validities: dict[int, tuple[PhoneMetadata, _Validity]] = {}  # by id() of the metadata


def _validity(md: PhoneMetadata) -> _Validity:
    cached = _validities.get(id(md))
    if cached is None or cached[0] is not md:
        cached = _validities[id(md)] = (md, _Validity(md))
    return cached[1]


def _always_false(nsn: str) -> bool:
    return False


def _always_true(nsn: str) -> bool:
    return True


def _for_region(cc: int, region: str) -> _Plan:
    """`is_valid_number_for_region(number, region)` for the numbers of country code `cc`, as a
    test of their national significant number."""
    md = PhoneMetadata.metadata_for_region_or_calling_code(cc, region.upper())
    if md is None:
        return _always_false
    if region != NON_GEO:
        # country_code_for_valid_region(region): the same metadata_for_region(region.upper())
        region_md = PhoneMetadata.metadata_for_region(region.upper(), None)
        if region_md is None or cc != region_md.country_code:
            return _always_false
    return _validity(md)


class _Selection:
    """`region_code_for_number` over several regions, then `is_valid_number_for_region`."""

    __slots__ = ("_cc", "_steps")

    def __init__(self, cc: int, regions: Sequence[str]) -> None:
        # A step is (full test, None, [final], (region,)) for a region without leading digits,
        # or (None, leading-digits alternation, finals, regions) for a run of consecutive
        # regions with leading digits. A final is is_valid_number_for_region(number, region),
        # made on the region's first selection (None until then).
        self._cc = cc
        steps: list[tuple[_Validity | None, _Matcher | None, list[_Plan | None],
                          tuple[str, ...]]] = []
        run: list[tuple[str, str]] = []  # (leading_digits, region)

        def close_run() -> None:
            if run:
                either = "|".join(f"(?:{_checked(ld)})()" for ld, _ in run)
                steps.append((None, _compile(either).match, [None] * len(run),
                              tuple(r for _, r in run)))
                run.clear()

        for region in regions:
            md = PhoneMetadata.metadata_for_region(region.upper(), None)
            if md is None:
                continue
            if md.leading_digits is not None:
                run.append((md.leading_digits, region))
                continue
            close_run()
            selected = _validity(md)
            final = _for_region(cc, region)
            # the same metadata and country code: valid for selection = valid for the region
            steps.append((selected, None, [_always_true if final is selected else final],
                          (region,)))
        close_run()
        self._steps = tuple(steps)

    def __call__(self, nsn: str) -> bool:
        for full, leading, finals, regions in self._steps:
            if full is not None:
                if not full(nsn):
                    continue
                i = 0
            elif leading is not None and (m := leading(nsn)) is not None:
                if m.lastindex is None:  # cannot be: every branch ends in its empty group
                    raise _Unsupported(regions)
                i = m.lastindex - 1
            else:
                continue
            final = finals[i]
            if final is None:
                final = finals[i] = _for_region(self._cc, regions[i])
            return final(nsn)
        return False  # region_code_for_number: None


def _never(nsn: str) -> bool:
    """Plan of a country code whose numbers are invalid whatever their national number."""
    return False


_plans: dict[int, _Plan | None] = {}  # None: left to phonenumbers
_lock = threading.Lock()


def _plan(cc: int) -> _Plan | None:
    with _lock:
        if cc not in _plans:
            regions = COUNTRY_CODE_TO_REGION_CODE[cc]
            try:
                if len(regions) == 1:
                    plan = _for_region(cc, regions[0])
                    _plans[cc] = _never if plan is _always_false else plan
                else:
                    _plans[cc] = _Selection(cc, regions)
            except _Unsupported:
                _plans[cc] = None
        return _plans[cc]


def is_valid_number(num: phonenumbers.PhoneNumber) -> bool:
    """Exactly `phonenumbers.is_valid_number(num)`, without its per-call Python loops."""
    cc = num.country_code
    nn = num.national_number
    if type(cc) is not int or type(nn) is not int:
        return phonenumbers.is_valid_number(num)
    try:
        plan = _plans[cc]
    except KeyError:
        if cc not in COUNTRY_CODE_TO_REGION_CODE:
            return False  # region_code_for_number: None
        plan = _plan(cc)
    if plan is _never:
        return False  # decided before phonenumbers looks at the national number
    if plan is None:
        return phonenumbers.is_valid_number(num)
    # national_significant_number(num)
    if num.italian_leading_zero:
        zeros = num.number_of_leading_zeros
        if zeros is None:
            nsn = "0" + str(nn)
        elif type(zeros) is int:
            nsn = "0" * zeros + str(nn)  # "" for zeros <= 0, as its `if num_zeros > 0`
        else:
            return phonenumbers.is_valid_number(num)
    else:
        nsn = str(nn)
    try:
        return plan(nsn)
    except _Unsupported:  # met on the first use of a region or length: phonenumbers from now
        with _lock:
            _plans[cc] = None
        return phonenumbers.is_valid_number(num)


def fast_path_country_codes() -> tuple[list[int], list[int]]:
    """(country codes answered here, country codes left to phonenumbers), from what the
    metadata of each country code's regions holds; builds every matcher. For the tests."""
    ours: list[int] = []
    theirs: list[int] = []
    for cc, regions in COUNTRY_CODE_TO_REGION_CODE.items():
        plan = _plan(cc)
        try:
            for region in regions:
                md = PhoneMetadata.metadata_for_region_or_calling_code(cc, region.upper())
                if md is not None:
                    validity = _validity(md)
                    for length in (*sorted(validity._lengths), 0):
                        validity._build(length)
        except _Unsupported:
            with _lock:
                _plans[cc] = plan = None
        (ours if plan is not None else theirs).append(cc)
    return ours, theirs
