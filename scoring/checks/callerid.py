"""Caller-ID plausibility: does the number the caller presents make sense for this call?

Caller ID costs a spammer nothing to forge, and robocallers forge it on purpose, so the number
itself carries signals that no rate counter sees:

- **Invalid numbers.** Autodialers fill the From header with whatever their software produces:
  numbers outside any numbering plan, the wrong length for their country, placeholders such as
  0000000000. A carrier-originated call carries a number that someone could call back.
- **Caller equal to callee.** "You are calling yourself" is a classic spoofing trick to get past
  screening (and to make the callee curious).
- **Neighbour spoofing.** Robocallers present a number that shares the callee's area code and
  exchange (US: the first 6 digits, NPA-NXX), because people answer what looks like a local
  call. Same country, same leading `callerid.neighbour_digits` digits, different number.
- **Do-not-originate numbers.** Numbers that never place calls (inbound-only service lines,
  government and bank hotlines that scammers imitate, unassigned ranges) listed by the
  operator in the `dno` list. A call *from* one of them is spoofed by definition.
- **P-Asserted-Identity disagreeing with From.** Inside a trust domain the PAI is the network's
  idea of the caller; a different From is a (weak) hint that the displayed number is invented.

The check looks at the From user and, when present, the P-Asserted-Identity user, and compares
them with the callee (Request-URI user, else the To user). Each signal has its own sub-score;
the check returns the highest and a reason naming it (the others are listed briefly):

====  ===============================================================================
1.0   caller (From or PAI) is on the do-not-originate list
0.9   caller equals callee (same E.164 number)
0.8   absurd number: one digit repeated (0000000000), too short, too long
0.7   not a valid number: unparseable yet digit-like, unknown country code, a length
      that no number in its country has, non-ASCII digits, '+' inside the number
0.6   neighbour spoofing (both numbers valid, same country, same leading digits)
0.5   possible but not valid (right length, but a range that is not assigned)
0.4   PAI and From are both numbers but different ones
====  ===============================================================================

Only numbers are judged: a From user such as `alice` or `sip:bob@example.com` is a legitimate
SIP identity and gives no signal. A user counts as a number when it consists of digits and an
optional leading '+' (visual separators `-.()` and spaces allowed, %-escapes decoded). National
numbers are read in the plan of `callerid.region`; `00`/`011` international prefixes are read as
that region dials them. An unsupported region makes national numbers "no signal" (only `+E.164`
numbers are judged), so a config typo cannot flag every call.

Everything here is pure (no Redis, no KSR) and never raises on hostile input; the work per
string is bounded (at most 256 characters looked at, at most 32 handed to `phonenumbers`) and
the parse of each distinct (text, region) is cached per process.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from urllib.parse import unquote

import phonenumbers
from phonenumbers import NumberParseException, PhoneNumberFormat, ValidationResult

from lists.model import normalise_number
from scoring import numberplan
from scoring.checks.base import Context, caller_numbers, number_db_hit
from scoring.model import CallAttempt, CheckResult

name = "callerid"
shared = False

SCORE_DNO = 1.0
SCORE_SELF = 0.9
SCORE_ABSURD = 0.8
SCORE_INVALID = 0.7
SCORE_NEIGHBOUR = 0.6
SCORE_UNASSIGNED = 0.5
SCORE_PAI_MISMATCH = 0.4

MAX_SCAN = 256  # characters of a user part we look at at all
MAX_PARSE = 32  # longest digit string handed to phonenumbers (E.164 is at most 15 digits)
MIN_DIGITS = 3
CACHE_SIZE = 4096
_CACHE_KEY_MAX = 64  # longer texts (hostile) are classified without filling the cache

_SEPARATORS = dict.fromkeys(map(ord, " \t-.()"), None)


@dataclass(frozen=True, slots=True)
class Number:
    """A user part that is meant to be a phone number, and what the numbering plan says of it.

    `show` is the number as presented (printable, bounded) for reasons and logs.
    `score` is the plausibility sub-score (0.0 for a valid number) and `why` its reason.
    `e164`, `country` and `nsn` (national significant number) are set when it parsed.
    `raw` is the ASCII digit string as presented (leading '+' kept), '' when not ASCII.
    """

    show: str
    score: float
    why: str = ""
    e164: str = ""
    country: int = 0
    nsn: str = ""
    valid: bool = False
    raw: str = ""


#: users of at most this many digits without a leading "+" are PBX extensions: no opinion
EXTENSION_MAX_DIGITS = 6

def classify(text: str, region: str) -> Number | None:
    """What `text` (a user part) is as a phone number; None when it is not meant as one.

    Never raises. `region` should be a region `phonenumbers` supports (see `plan_region`).
    """
    try:
        if len(text) > _CACHE_KEY_MAX:
            return _classify(text, region)
        return _classify_cached(text, region)
    except Exception:  # phonenumbers on hostile input: count as invalid, never raise
        return Number(_show(text), SCORE_INVALID, "is not a valid number")


def plan_region(configured: str) -> str:
    """The configured region if phonenumbers knows its plan, else 'ZZ' (unknown region)."""
    region = configured.strip().upper()
    return region if region in phonenumbers.SUPPORTED_REGIONS else "ZZ"


def _classify(text: str, region: str) -> Number | None:
    t = text.strip()
    if not t:
        return None
    if len(t) > MAX_SCAN:
        head = t[:MAX_SCAN].translate(_SEPARATORS)
        if _digit_like(head):
            return Number(_show(t), SCORE_ABSURD, "is too long")
        return None
    if "%" in t:
        t = unquote(t, errors="replace")
    s = t.translate(_SEPARATORS)
    if not _digit_like(s):
        return None
    show = _show(s)
    if not s.isascii():
        return Number(show, SCORE_INVALID, "uses non-ASCII digits")
    if "+" in s[1:]:
        return Number(show, SCORE_INVALID, "has '+' inside the number")
    digits = s.lstrip("+")
    if len(s) > MAX_PARSE:
        return Number(show, SCORE_ABSURD, "is too long", raw=s)
    if not s.startswith("+") and len(digits) <= EXTENSION_MAX_DIGITS:
        return None  # a PBX extension (1001, 4711): internal numbering, not a phone number
    if len(digits) < MIN_DIGITS:
        return Number(show, SCORE_ABSURD, "is too short", raw=s)
    repeated = len(digits) >= 4 and len(set(digits)) == 1
    try:
        num = phonenumbers.parse(s, region)
    except NumberParseException as exc:
        if repeated:
            return Number(show, SCORE_ABSURD, "repeats one digit", raw=s)
        if exc.error_type == NumberParseException.INVALID_COUNTRY_CODE:
            if region == "ZZ" and not s.startswith("+"):
                return None  # no plan to read a national number in: no opinion
            return Number(show, SCORE_INVALID, "has an unknown country code", raw=s)
        if exc.error_type in (NumberParseException.TOO_SHORT_NSN,
                              NumberParseException.TOO_SHORT_AFTER_IDD):
            return Number(show, SCORE_ABSURD, "is too short", raw=s)
        if exc.error_type == NumberParseException.TOO_LONG:
            return Number(show, SCORE_ABSURD, "is too long", raw=s)
        return Number(show, SCORE_INVALID, "is not a valid number", raw=s)
    e164 = phonenumbers.format_number(num, PhoneNumberFormat.E164)
    nsn = phonenumbers.national_significant_number(num)
    score, why = _plan_verdict(num, nsn, repeated)
    return Number(show, score, why, e164, num.country_code or 0, nsn, score == 0.0, s)


def _plan_verdict(num: phonenumbers.PhoneNumber, nsn: str,
                  repeated: bool) -> tuple[float, str]:
    """(sub-score, reason) of a parsed number; (0.0, '') when it is a valid number."""
    if repeated or (len(nsn) >= 4 and len(set(nsn)) == 1):
        return SCORE_ABSURD, "repeats one digit"
    possible = phonenumbers.is_possible_number_with_reason(num)
    if possible == ValidationResult.TOO_SHORT:
        return SCORE_ABSURD, "is too short"
    if possible == ValidationResult.TOO_LONG:
        return SCORE_ABSURD, "is too long"
    if possible == ValidationResult.INVALID_COUNTRY_CODE:
        return SCORE_INVALID, "has an unknown country code"
    if possible not in (ValidationResult.IS_POSSIBLE, ValidationResult.IS_POSSIBLE_LOCAL_ONLY):
        return SCORE_INVALID, "has a length no number in its country has"
    if not numberplan.is_valid_number(num):
        return SCORE_UNASSIGNED, "is not in an assigned number range"
    return 0.0, ""


_classify_cached = functools.lru_cache(maxsize=CACHE_SIZE)(_classify)


def _digit_like(s: str) -> bool:
    """Digits (any script) and '+' only, with at least one digit."""
    d = s.replace("+", "")
    return d != "" and d.isdigit()


def _show(text: str, limit: int = 20) -> str:
    """A printable, bounded rendering of attacker-supplied text for reasons and logs."""
    out = "".join(ch if 32 < ord(ch) < 127 else "?" for ch in text[:limit])
    return out + ("..." if len(text) > limit else "")


def uri_user(value: str) -> str:
    """User part of a header value or URI: '"Bob" <sip:+1555@x;user=phone>' -> '+1555'.

    Accepts a bare user too ('+1555;npdi' -> '+1555'). Only the first URI of a list is read.
    """
    v = value[: MAX_SCAN * 4]
    if "<" in v:
        v = v.split("<", 1)[1].split(">", 1)[0]
    v = v.strip()
    low = v[:5].lower()
    for scheme in ("sips:", "sip:", "tel:"):
        if low.startswith(scheme):
            v = v[len(scheme):]
            break
    return v.split("@", 1)[0].split(";", 1)[0]


def caller_parties(attempt: CallAttempt, region: str) -> tuple[Number | None, Number | None]:
    """(From, P-Asserted-Identity) as numbers; None where not a number or absent."""
    from_user = attempt.from_user or (uri_user(attempt.from_uri) if attempt.from_uri else "")
    from_n = classify(uri_user(from_user), region) if from_user else None
    pai_n = classify(uri_user(attempt.pai), region) if attempt.pai else None
    return from_n, pai_n


def callee_party(attempt: CallAttempt, region: str) -> Number | None:
    """The callee (Request-URI user, else To user) as a number; None when not a number."""
    callee_user = attempt.ruri_user or attempt.to_user
    return classify(uri_user(callee_user), region) if callee_user else None


def callee_numbers(attempt: CallAttempt, region: str) -> tuple[str, ...]:
    """The callee's numbers for the lists matched on the callee (`optout`): the Request-URI
    and To users as presented and the callee in E.164 where it parses in `region` (an entry
    +14155550199 matches a national 4155550199 in the Request-URI)."""
    out = [attempt.ruri_user, attempt.to_user]
    party = callee_party(attempt, plan_region(region))
    if party is not None and party.e164:
        out.append(party.e164)
    return tuple(n for n in out if n)


#: most numbers of one call looked up in the number database (From and PAI, each as
#: presented and in E.164)
MAX_LOOKUP = 4


def lookup_numbers(attempt: CallAttempt, region: str) -> tuple[str, ...]:
    """The caller's numbers to look up in the number database (`numbers.lookup`): From and
    P-Asserted-Identity users as presented (digits, '+' kept) and, where they parse, in E.164
    (a national '5550100' is also found as '+15550100'); each once. The parse is the cached
    one this check makes anyway."""
    out: list[str] = []
    found = [normalise_number(n) for n in caller_numbers(attempt)]
    found += [n.e164 for n in caller_parties(attempt, plan_region(region)) if n and n.e164]
    for norm in found:
        if 3 <= len(norm.lstrip("+")) <= 20 and norm not in out:
            out.append(norm)
    return tuple(out[:MAX_LOOKUP])


def check(ctx: Context) -> CheckResult:
    region = plan_region(str(ctx.config["callerid.region"]))
    shared_digits = int(ctx.config["callerid.neighbour_digits"])
    from_n, pai_n = caller_parties(ctx.attempt, region)
    callers = [(label, n) for label, n in (("From", from_n), ("PAI", pai_n)) if n is not None]
    if not callers:
        return CheckResult(name, 0.0)  # a named caller: nothing to judge, callee not parsed
    # Parsing costs tens of microseconds: parse the callee only when it can equal a caller or
    # share its leading national digits, i.e. when those digits occur in the callee at all.
    callee_digits = "".join(ch for ch in (ctx.attempt.ruri_user or ctx.attempt.to_user)[:64]
                            if ch.isascii() and ch.isdigit())
    related = any(n.nsn and n.nsn[:shared_digits] in callee_digits for _, n in callers)
    callee = callee_party(ctx.attempt, region) if related else None

    found: list[tuple[float, str, str]] = []  # (score, reason, short tag)

    if ctx.lists.dno.size or ctx.signals.numbers:
        hit = None
        if ctx.lists.dno.size:
            keys = [k for _, n in callers for k in (n.e164, n.raw) if k]
            hit = ctx.lists.dno.match(numbers=keys, now=ctx.now or None)
        if hit is None:
            hit = number_db_hit(ctx, "dno")
        if hit is not None:
            on, db, _ = hit.on.removeprefix("number ").partition(" (number database)")
            where = " (number database)" if db else ""
            found.append((SCORE_DNO, f"caller {on} is on the do-not-originate list{where}",
                          "dno"))

    for label, n in callers:
        if n.score > 0.0:
            found.append((n.score, f"{label} {n.show} {n.why}", f"invalid {label}"))

    if callee is not None and callee.e164:
        same = next((n for _, n in callers if n.e164 == callee.e164), None)
        if same is not None:
            found.append((SCORE_SELF, f"caller {same.e164} equals the callee", "caller=callee"))
        elif callee.valid:
            for label, n in callers:
                # no caller equals the callee here, so the same country means another number
                if (n.valid and n.country == callee.country
                        and n.nsn[:shared_digits] == callee.nsn[:shared_digits]):
                    found.append((SCORE_NEIGHBOUR,
                                  f"neighbour spoofing: {label} {n.e164} shares the callee's "
                                  f"first {shared_digits} digits", "neighbour"))
                    break

    if from_n is not None and pai_n is not None and from_n.e164 and pai_n.e164 \
            and from_n.e164 != pai_n.e164:
        found.append((SCORE_PAI_MISMATCH, f"PAI {pai_n.e164} differs from From {from_n.e164}",
                      "PAI!=From"))

    if not found:
        return CheckResult(name, 0.0)
    found.sort(key=lambda f: -f[0])  # stable: equal scores keep the order above
    score, reason, _ = found[0]
    others = list(dict.fromkeys(tag for _, _, tag in found[1:]))
    if others:
        reason = f"{reason} (also: {', '.join(others)})"
    return CheckResult(name, score, reason)
