#!/usr/bin/env python3
"""µs per call of `phonenumbers.is_valid_number` and `scoring.numberplan.is_valid_number`,
side by side on the same inputs in the same run, and what it makes of the caller-ID check.

    .venv/bin/python bench/numberplan.py [--n 5000] [--rounds 7] [--seed 1]

Inputs (parsed once, outside the timing): random +1 numbers ("+1" and 10 random digits, what
`bench/load.py` sends as callers), random +44 and +49 numbers (10 random digits; +49 also
11), valid US numbers, and random numbers (6 to 12 digits) after random country codes (all
215; see the note printed at the end). The caller-ID row times
`callerid._classify(text, "US")` (no LRU cache) on random +1 texts, with phonenumbers'
`is_valid_number` patched in as "before". Every case runs `--rounds` times, the two
implementations alternating; printed is the best round (and the median), in µs per call.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable, Sequence
from typing import TypeVar
from unittest import mock

import phonenumbers
from phonenumbers import COUNTRY_CODE_TO_REGION_CODE, PhoneNumber

from scoring import numberplan
from scoring.checks import callerid

T = TypeVar("T")


def digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("0123456789") for _ in range(n))


def parsed(texts: Sequence[str]) -> list[PhoneNumber]:
    return [phonenumbers.parse(t, None) for t in texts]


def valid_us(rng: random.Random, n: int) -> list[PhoneNumber]:
    out: list[PhoneNumber] = []
    while len(out) < n:
        num = phonenumbers.parse(f"+1{rng.choice('23456789')}{digits(rng, 9)}", None)
        if phonenumbers.is_valid_number(num) and phonenumbers.region_code_for_number(num) == "US":
            out.append(num)
    return out


def per_call(cases: Sequence[Callable[[T], object]], xs: Sequence[T],
             rounds: int) -> list[tuple[float, float]]:
    """(best, median) µs per call of each function over xs, the functions taking turns."""
    times: list[list[float]] = [[] for _ in cases]
    for _ in range(rounds):
        for i, f in enumerate(cases):
            t0 = time.perf_counter()
            for x in xs:
                f(x)
            times[i].append((time.perf_counter() - t0) / len(xs) * 1e6)
    return [(min(t), statistics.median(t)) for t in times]


def classify(text: str) -> object:
    return callerid._classify(text, "US")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--n", type=int, default=5000, help="inputs per case (default 5000)")
    ap.add_argument("--rounds", type=int, default=7, help="rounds per case (default 7)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    n = args.n

    # first use: the +1 plan (metadata already loaded by phonenumbers)
    for cc in COUNTRY_CODE_TO_REGION_CODE[1]:
        phonenumbers.PhoneMetadata.metadata_for_region(cc)
    first = phonenumbers.parse("+12015550123", None)
    t0 = time.perf_counter()
    numberplan.is_valid_number(first)
    built_ms = (time.perf_counter() - t0) * 1e3

    ccs = list(COUNTRY_CODE_TO_REGION_CODE)
    cases: list[tuple[str, list[PhoneNumber]]] = [
        ("random +1", parsed([f"+1{digits(rng, 10)}" for _ in range(n)])),
        ("random +44", parsed([f"+44{digits(rng, 10)}" for _ in range(n)])),
        ("random +49", parsed([f"+49{digits(rng, rng.choice((10, 11)))}" for _ in range(n)])),
        ("valid US", valid_us(rng, n)),
        ("random country codes", [PhoneNumber(country_code=rng.choice(ccs),
                                              national_number=int(digits(rng, rng.randint(6, 12))))
                                  for _ in range(n)]),
    ]
    for _, nums in cases:  # compile what either side compiles on first use
        for num in nums:
            assert numberplan.is_valid_number(num) is phonenumbers.is_valid_number(num)

    print(f"is_valid_number, µs per call, best (median) of {args.rounds} rounds of {n} numbers")
    print(f"{'inputs':<22} {'valid':>6} {'phonenumbers':>16} {'numberplan':>14} {'speed-up':>9}")
    for label, nums in cases:
        (pn, pn_med), (ours, ours_med) = per_call(
            [phonenumbers.is_valid_number, numberplan.is_valid_number], nums, args.rounds)
        share = sum(map(phonenumbers.is_valid_number, nums)) / len(nums)
        print(f"{label:<22} {share:>6.0%} {pn:>7.2f} ({pn_med:>6.2f}) "
              f"{ours:>5.2f} ({ours_med:>5.2f}) {pn / ours:>8.1f}x")

    texts = [f"+1{digits(rng, 10)}" for _ in range(n)]
    before: list[tuple[float, float]] = []
    after: list[tuple[float, float]] = []
    for _ in range(args.rounds):  # alternating: phonenumbers patched in (before), then ours
        with mock.patch.object(numberplan, "is_valid_number", phonenumbers.is_valid_number):
            before += per_call([classify], texts, 1)
        after += per_call([classify], texts, 1)
    b, a = min(x[0] for x in before), min(x[0] for x in after)
    b_med, a_med = statistics.median(x[0] for x in before), statistics.median(x[0] for x in after)
    print(f"\ncallerid._classify(random +1, 'US'), no cache, µs per call: before {b:.2f} "
          f"({b_med:.2f}), after {a:.2f} ({a_med:.2f}), {b / a:.2f}x")
    print(f"first use of +1 (plan and US pattern built; metadata loaded): {built_ms:.1f} ms")
    print("note: phonenumbers compiles its patterns with re.compile, whose cache (512 entries) "
          "is too small\nfor the patterns of all regions: numbers from many countries make it "
          "recompile ('random country codes')")


if __name__ == "__main__":
    main()
