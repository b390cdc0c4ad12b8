"""Country of a source IP from a MaxMind-format database (GeoIP2/GeoLite2 Country or City).

The service resolves the country once per INVITE, before the checks, with `country_for(config,
ip)`: the GeoIP check scores it and the allow/block lists match it. The database path is the live
config key `geoip.database` ('' = GeoIP off).

Each process holds its own reader, opened on first use (Kamailio forks its children after
`mod_init`, so nothing is opened at import time; a reader inherited across a fork is dropped and
reopened). The file is memory-mapped (the C extension of `maxminddb` when present), so every
child shares the page cache and a lookup costs a few microseconds. A database that cannot be
opened switches GeoIP off for this process (fail-open: calls go on, the check scores 0) with one
logged warning, and opening is retried at most once a minute. A database replaced on disk (e.g.
by `geoipupdate`, which renames a new file into place) is picked up by the same once-a-minute
check; if the new file is unreadable the old reader stays in use.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import re
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass

import geoip2.database
import geoip2.errors
import geoip2.models
from maxminddb import MODE_AUTO

from scoring.config import Config

log = logging.getLogger("spitwall.geo")

RETRY_SECONDS = 60.0  # how often a failed open is retried, and a changed file looked for
MAX_IP_LEN = 64  # longer "addresses" are malformed: never parsed

# Strings of these shapes go straight to the reader (whose C parser rejects malformed IPv6).
# Others are parsed by `ipaddress` first: legacy IPv4 forms the C library would accept ("1.2.3",
# octal "0177.0.0.1") count as malformed, as they do for the lists; IPv4-mapped IPv6, brackets
# and scope ids are handled there.
_PLAIN_IP = re.compile(r"(?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}"
                       r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
                       r"|[0-9A-Fa-f:]{2,39}")

Lookup = Callable[[str | ipaddress.IPv4Address | ipaddress.IPv6Address], geoip2.models.Country]


def _file_id(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class GeoResolver:
    """An open country (or city) database: `country(ip)` returns an ISO 3166-1 code or ""."""

    __slots__ = ("_file", "_lookup", "_reader", "build_epoch", "database_type", "path")

    def __init__(self, reader: geoip2.database.Reader, path: str,
                 file_id: tuple[int, int, int, int] = (0, 0, 0, 0)) -> None:
        meta = reader.metadata()
        self._reader = reader
        self.path = path
        self.database_type: str = meta.database_type
        self.build_epoch: int = int(meta.build_epoch)
        self._file = file_id
        lookup: Lookup
        if "Country" in self.database_type:
            lookup = reader.country
        elif "City" in self.database_type:
            lookup = reader.city
        elif "Enterprise" in self.database_type:
            lookup = reader.enterprise
        else:
            raise ValueError(
                f"GeoIP database {path}: a {self.database_type!r} database has no countries "
                "(expected a GeoIP2/GeoLite2 Country or City database)"
            )
        self._lookup = lookup

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> GeoResolver:
        """Open a MaxMind-format Country or City database (memory-mapped).

        Raises ValueError with a one-line message when the path is empty or relative, the file
        is missing or unreadable, or it is not a MaxMind DB with country data.
        """
        p = os.fspath(path)
        if not p:
            raise ValueError("no GeoIP database configured")
        try:
            st = os.stat(p)
        except FileNotFoundError:
            raise ValueError(f"GeoIP database {p}: no such file") from None
        except OSError as exc:
            raise ValueError(f"GeoIP database {p}: {exc.strerror or exc}") from None
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"GeoIP database {p}: not a regular file")
        try:
            reader = geoip2.database.Reader(p, mode=MODE_AUTO)
        except PermissionError:
            raise ValueError(f"GeoIP database {p}: permission denied") from None
        except Exception as exc:  # InvalidDatabaseError, ValueError (empty file), OSError...
            raise ValueError(f"GeoIP database {p}: not a MaxMind DB file ({exc})") from None
        try:
            return cls(reader, p, _file_id(st))
        except ValueError:
            reader.close()
            raise
        except Exception as exc:  # odd metadata
            reader.close()
            raise ValueError(f"GeoIP database {p}: unreadable metadata ({exc})") from None

    def country(self, ip: str) -> str:
        """ISO code of the country of `ip`, or "" when unknown, not an address, or on any
        error. Never raises. Falls back to the registered country when the database has no
        location country for the network (as MaxMind does for some anycast and satellite
        ranges)."""
        try:
            if not _PLAIN_IP.fullmatch(ip):
                addr = _parse(ip)
                if addr is None:
                    return ""
                rec = self._lookup(addr)
            else:
                rec = self._lookup(ip)
            code = rec.country.iso_code or rec.registered_country.iso_code
        except geoip2.errors.AddressNotFoundError:
            return ""
        except Exception as exc:  # IPv6 in an IPv4-only database, corrupt data, closed reader
            log.debug("GeoIP lookup of %.64r failed: %r", ip, exc)
            return ""
        return code.upper() if isinstance(code, str) else ""

    def changed(self) -> bool:
        """Whether the file at `path` is no longer the one this reader opened."""
        try:
            return _file_id(os.stat(self.path)) != self._file
        except OSError:  # removed: keep using the mapped copy
            return False

    def describe(self) -> str:
        built = datetime.datetime.fromtimestamp(self.build_epoch, datetime.UTC)
        return f"{self.database_type}, built {built:%Y-%m-%d}, {self.path}"

    def close(self) -> None:
        try:
            self._reader.close()
        except Exception as exc:
            log.debug("closing GeoIP database %s: %r", self.path, exc)


def _parse(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """Parse anything but a canonical dotted quad; None when it is not an IP address."""
    if not isinstance(ip, str) or not ip or len(ip) > MAX_IP_LEN:
        return None
    if ip.startswith("[") and ip.endswith("]"):  # Kamailio may bracket IPv6 addresses
        ip = ip[1:-1]
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped  # ::ffff:a.b.c.d from a dual-stack socket
    return addr


# ---- per-process cache -------------------------------------------------------------------


@dataclass(slots=True)
class _Slot:
    resolver: GeoResolver | None
    checked: float  # monotonic time of the last open attempt or change check
    error: str = ""


_slots: dict[str, _Slot] = {}
_pid = 0


def resolver_for(path: str, now: float | None = None) -> GeoResolver | None:
    """This process's resolver for `path`; None when `path` is "" (GeoIP off) or the database
    cannot be opened (logged once; retried at most every `RETRY_SECONDS`). Never raises."""
    global _pid
    if not path:
        return None
    pid = os.getpid()
    if pid != _pid:  # first call in this process, or we were forked: do not share readers
        _slots.clear()
        _pid = pid
    t = time.monotonic() if now is None else now
    slot = _slots.get(path)
    if slot is not None and t - slot.checked < RETRY_SECONDS:
        return slot.resolver
    try:
        return _refresh(path, slot, t)
    except Exception as exc:  # never let GeoIP trouble reach the call path
        log.error("GeoIP resolver for %s: %r", path, exc)
        _slots[path] = _Slot(slot.resolver if slot else None, t, repr(exc))
        return _slots[path].resolver


def _refresh(path: str, slot: _Slot | None, now: float) -> GeoResolver | None:
    if slot is not None and slot.resolver is not None:
        slot.checked = now
        if not slot.resolver.changed():
            return slot.resolver
        try:
            fresh = GeoResolver.open(path)
        except ValueError as exc:
            if str(exc) != slot.error:
                log.warning("GeoIP database changed but cannot be opened, keeping the old one: "
                            "%s", exc)
            slot.error = str(exc)
            return slot.resolver
        slot.resolver.close()
        slot.resolver, slot.error = fresh, ""
        log.info("GeoIP database reloaded: %s", fresh.describe())
        return fresh
    try:
        resolver = GeoResolver.open(path)
    except ValueError as exc:
        if slot is None or str(exc) != slot.error:
            log.warning("GeoIP off: %s (retrying at most every %.0f s)", exc, RETRY_SECONDS)
        _slots[path] = _Slot(None, now, str(exc))
        return None
    _slots[path] = _Slot(resolver, now)
    log.info("GeoIP database opened: %s", resolver.describe())
    return resolver


def country_for(config: Config, ip: str) -> str:
    """Country of `ip` per the live config's `geoip.database`; "" when off, unavailable or
    unknown. Never raises. The service calls it once per INVITE, before the checks."""
    try:
        resolver = resolver_for(config["geoip.database"])
        return resolver.country(ip) if resolver is not None else ""
    except Exception as exc:
        log.error("GeoIP lookup failed: %r", exc)
        return ""


def database_status(path: str) -> str:
    """One line for `spitwall config show`: whether GeoIP is off, working, or broken.

    Opens the file afresh (meant for the CLI, not the call path)."""
    if not path:
        return "off (no database configured)"
    try:
        resolver = GeoResolver.open(path)
    except ValueError as exc:
        return f"unavailable: {exc}"
    try:
        return resolver.describe()
    finally:
        resolver.close()


def reset_cache() -> None:
    """Forget every open resolver (tests; a config change does not need it)."""
    for slot in _slots.values():
        if slot.resolver is not None:
            slot.resolver.close()
    _slots.clear()
