"""In-process list matching for the request path: set and prefix lookups, no parsing.

Each Kamailio child keeps a `ListMatcher` built from the Redis lists and rebuilds it only when
the lists version (returned with every INVITE's script reply) changes. Expired entries are
skipped at match time, so an entry's TTL holds even before the next rebuild.
"""

from __future__ import annotations

import contextlib
import fnmatch
import ipaddress
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from lists.model import ListEntry, normalise_number


@dataclass(frozen=True, slots=True)
class ListHit:
    """Which entry matched and on what."""

    entry: ListEntry
    on: str


class ListMatcher:
    """Matches a call's identities against one list (allow, block or scanner)."""

    def __init__(self, entries: Iterable[ListEntry]) -> None:
        self._exact: dict[tuple[str, str], ListEntry] = {}
        self._nets: dict[int, dict[ipaddress.IPv4Network | ipaddress.IPv6Network, ListEntry]] = {}
        #: User-Agent patterns: (the pattern's match or search, entry), in list order, and all
        #: of them in one regex, so that the usual User-Agent (no pattern) costs one scan
        self._ua: list[tuple[Callable[[str], re.Match[str] | None], ListEntry]] = []
        self._ua_any: re.Pattern[str] | None = None
        self.size = 0
        anchored: list[str] = []
        for e in entries:
            self.size += 1
            if e.kind == "cidr":
                net = ipaddress.ip_network(e.value, strict=False)
                self._nets.setdefault(net.prefixlen * 10 + net.version, {})[net] = e
            elif e.kind == "ua":
                rx = _ua_regex(e.value)
                glob = _is_glob(e.value)
                self._ua.append((rx.match if glob else rx.search, e))
                anchored.append(rf"\A(?:{rx.pattern})" if glob else rx.pattern)
            else:
                self._exact[(e.kind, e.value)] = e
        if anchored:
            self._ua_any = re.compile("|".join(f"(?:{p})" for p in anchored), re.IGNORECASE)

    def _get(self, kind: str, value: str, now: float) -> ListEntry | None:
        e = self._exact.get((kind, value))
        return e if e is not None and not e.expired(now) else None

    def match(self, *, ip: str = "", user: str = "", domain: str = "", numbers: Iterable[str] = (),
              user_agent: str = "", country: str = "", now: float | None = None) -> ListHit | None:
        """First matching entry, most specific identity first."""
        t = time.time() if now is None else now
        if ip:
            if ":" in ip:  # Kamailio prints IPv6 uncompressed; entries are compressed
                with contextlib.suppress(ValueError):
                    ip = str(ipaddress.ip_address(ip))
            e = self._get("ip", ip, t)
            if e:
                return ListHit(e, f"ip {ip}")
            if self._nets:
                hit = self._match_net(ip, t)
                if hit:
                    return hit
        if user and domain:
            uri = f"{user}@{domain}".lower()
            e = self._get("uri", uri, t)
            if e:
                return ListHit(e, f"uri {uri}")
        if domain:
            d = domain.lower()
            while d:
                e = self._get("domain", d, t)
                if e:
                    return ListHit(e, f"domain {domain.lower()}")
                _, _, d = d.partition(".")
        for n in numbers:
            num = normalise_number(n)
            if len(num.lstrip("+")) >= 3:
                e = self._get("number", num, t)
                if e:
                    return ListHit(e, f"number {num}")
        if user_agent and self._ua_any is not None:
            low = user_agent.lower()
            if self._ua_any.search(low):  # some pattern matches: which is the first live one
                for find, e in self._ua:
                    if not e.expired(t) and find(low):
                        return ListHit(e, f"user-agent {e.value!r}")
        if country:
            e = self._get("country", country.upper(), t)
            if e:
                return ListHit(e, f"country {country.upper()}")
        return None

    def _match_net(self, ip: str, now: float) -> ListHit | None:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return None
        for key, nets in self._nets.items():
            prefix, version = divmod(key, 10)
            if version != addr.version:
                continue
            net = ipaddress.ip_network(f"{addr}/{prefix}", strict=False)
            e = nets.get(net)
            if e is not None and not e.expired(now):
                return ListHit(e, f"cidr {net}")
        return None


def _is_glob(pattern: str) -> bool:
    return any(ch in pattern for ch in "*?[")


def _ua_regex(pattern: str) -> re.Pattern[str]:
    """A glob (`*`, `?`) anchored to the whole User-Agent, or else a plain substring.

    Globs are translated by fnmatch, whose regexes have no nested quantifiers, so a hostile
    User-Agent cannot make matching slow.
    """
    if _is_glob(pattern):
        return re.compile(fnmatch.translate(pattern), re.IGNORECASE)
    return re.compile(re.escape(pattern), re.IGNORECASE)


def _load_seed() -> tuple[str, ...]:
    path = __file__.rsplit("/", 1)[0] + "/seed/scanners.txt"
    with open(path, encoding="utf-8") as fh:
        return tuple(
            line.strip().lower() for line in fh if line.strip() and not line.startswith("#")
        )


SEED_SCANNERS: tuple[str, ...] = _load_seed()


class ListSnapshot:
    """The allow, block and scanner lists of one lists version, ready to match."""

    __slots__ = ("allow", "block", "dno", "optout", "scanner", "trusted", "version")

    def __init__(self, entries: dict[str, list[ListEntry]], version: int = 0) -> None:
        self.version = version
        self.allow = ListMatcher(entries.get("allow", ()))
        self.block = ListMatcher(entries.get("block", ()))
        # do-not-originate numbers: numbers that never place calls (caller-ID check)
        self.dno = ListMatcher(entries.get("dno", ()))
        # peers trusted to send Alert-Info / ring-tone Call-Info (ring hijack check)
        self.trusted = ListMatcher(entries.get("trusted", ()))
        # callees who opted out of screening: their calls are relayed (explicit blocks apply)
        self.optout = ListMatcher(entries.get("optout", ()))
        seed = [ListEntry("ua", p, "shipped scanner seed list") for p in SEED_SCANNERS]
        self.scanner = ListMatcher(seed + [e for e in entries.get("scanner", ()) if e.kind == "ua"])

    @classmethod
    def empty(cls) -> ListSnapshot:
        return cls({}, 0)

    def is_scanner(self, user_agent: str) -> ListHit | None:
        return self.scanner.match(user_agent=user_agent) if user_agent else None
