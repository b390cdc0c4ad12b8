"""GeoIP: the resolver over a MaxMind-format database built here with mmdb-writer, its
per-process cache, and the geoip check."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import geoip2.database
import pytest

from lists.model import ListEntry
from scoring import geo
from scoring.checks import geoip
from scoring.checks.base import Context
from scoring.engine import decide
from scoring.geo import GeoResolver, country_for, database_status, resolver_for
from tests.geodb import build_country_db, country_record
from tests.unit.scoring.support import config, ctx, snapshot

ENTRIES = {
    "127.50.0.0/16": "KP",
    "127.50.7.0/24": "DE",  # more specific than the /16: wins
    "127.60.0.0/16": "us",  # lower case in the source: upper-cased in the record
    "198.51.100.0/24": "CN",
    "2001:db8::/32": "JP",
    "2001:db8:ff::/48": "FR",
    "::1/128": "NO",
}


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    geo.reset_cache()
    yield
    geo.reset_cache()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return build_country_db(tmp_path / "country.mmdb", ENTRIES)


@pytest.fixture
def resolver(db: Path) -> Iterator[GeoResolver]:
    r = GeoResolver.open(db)
    yield r
    r.close()


# ---------------------------------------------------------------------------------------------
# the test database is what geoip2 expects


def test_geoip2_reads_the_built_database(db: Path) -> None:
    with geoip2.database.Reader(str(db)) as reader:
        meta = reader.metadata()
        assert meta.database_type == "GeoLite2-Country"
        assert meta.ip_version == 6
        resp = reader.country("127.50.1.2")
        assert resp.country.iso_code == "KP"
        assert resp.registered_country.iso_code == "KP"
        assert resp.continent.code == "AS"
        assert reader.country("2001:db8::7").country.iso_code == "JP"
        assert reader.country("127.60.0.1").country.iso_code == "US"


def test_build_order_does_not_matter(tmp_path: Path) -> None:
    # the narrow network listed first, the wide one after: the narrow one still wins
    path = build_country_db(tmp_path / "o.mmdb", {"10.1.2.0/24": "DE", "10.0.0.0/8": "KP"})
    r = GeoResolver.open(path)
    assert (r.country("10.1.2.3"), r.country("10.1.3.3"), r.country("10.200.0.1")) == (
        "DE", "KP", "KP")


# ---------------------------------------------------------------------------------------------
# GeoResolver


@pytest.mark.parametrize(("ip", "code"), [
    ("127.50.0.1", "KP"),
    ("127.50.255.254", "KP"),
    ("127.50.7.9", "DE"),
    ("127.60.3.3", "US"),
    ("198.51.100.200", "CN"),
    ("2001:db8::1", "JP"),
    ("2001:0db8:0000:0000:0000:0000:0000:0001", "JP"),  # Kamailio prints IPv6 uncompressed
    ("[2001:db8::1]", "JP"),
    ("2001:db8:ff::5", "FR"),
    ("2001:DB8:FF::5", "FR"),
    ("::1", "NO"),
    ("::ffff:127.50.0.1", "KP"),  # IPv4-mapped, from a dual-stack socket
])
def test_country_found(resolver: GeoResolver, ip: str, code: str) -> None:
    assert resolver.country(ip) == code


@pytest.mark.parametrize("ip", [
    # unknown: not in the database
    "127.51.0.1", "8.8.8.8", "198.51.101.1", "2001:db9::1",
    # private and link-local: real databases have no records for them
    "10.0.0.1", "192.168.1.1", "172.16.0.1", "fe80::1", "fe80::1%eth0", "fc00::1",
    # malformed
    "", "localhost", "example.com", "1.2.3", "0177.50.0.1", "127.50.0.1 ", " 127.50.0.1",
    "127.50.0.256", "127.50.0.1:5060", "2001:db8::1::2", "[2001:db8::1", "x" * 5000,
    "127.50.0.1\x00", "\u0661\u0662\u0667.50.0.1",
])
def test_country_unknown_private_or_malformed_is_empty(resolver: GeoResolver, ip: str) -> None:
    assert resolver.country(ip) == ""


@pytest.mark.parametrize("junk", [None, 5, b"127.50.0.1", 3.5])
def test_country_never_raises_on_wrong_types(resolver: GeoResolver, junk: Any) -> None:
    assert resolver.country(cast(str, junk)) == ""


def test_country_after_close_is_empty(db: Path) -> None:
    r = GeoResolver.open(db)
    r.close()
    assert r.country("127.50.0.1") == ""


def test_ipv6_lookup_in_an_ipv4_only_database(tmp_path: Path) -> None:
    path = build_country_db(tmp_path / "v4.mmdb", {"127.50.0.0/16": "KP"}, ip_version=4)
    r = GeoResolver.open(path)
    assert r.country("127.50.0.1") == "KP"
    assert r.country("2001:db8::1") == ""


@pytest.mark.parametrize("kind", ["GeoLite2-City", "GeoIP2-City", "GeoIP2-Country",
                                  "DBIP-Country-Lite", "GeoIP2-Enterprise"])
def test_country_and_city_layouts_are_accepted(tmp_path: Path, kind: str) -> None:
    path = build_country_db(tmp_path / "c.mmdb", {"127.50.0.0/16": "KP"}, database_type=kind)
    r = GeoResolver.open(path)
    assert r.database_type == kind
    assert r.country("127.50.0.1") == "KP"


def test_registered_country_is_the_fallback(tmp_path: Path) -> None:
    only_registered = {"registered_country": {"iso_code": "SE", "names": {"en": "Sweden"}}}
    no_country: dict[str, Any] = {"continent": {"code": "EU"}}
    path = build_country_db(tmp_path / "r.mmdb", {}, record={
        "127.70.0.0/16": only_registered, "127.71.0.0/16": no_country,
        "127.72.0.0/16": country_record("KP")})
    r = GeoResolver.open(path)
    assert r.country("127.70.0.1") == "SE"
    assert r.country("127.71.0.1") == ""
    assert r.country("127.72.0.1") == "KP"


def test_open_errors_are_value_errors(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.mmdb"
    garbage.write_bytes(os.urandom(4096))
    empty = tmp_path / "empty.mmdb"
    empty.write_bytes(b"")
    text = tmp_path / "readme.txt"
    text.write_text("this is not a database\n" * 50)
    for path, expect in [
        (tmp_path / "missing.mmdb", "no such file"),
        (garbage, "not a MaxMind DB file"),
        (empty, "not a MaxMind DB file"),
        (text, "not a MaxMind DB file"),
        (tmp_path, "not a regular file"),
    ]:
        with pytest.raises(ValueError, match=expect) as info:
            GeoResolver.open(path)
        assert str(path) in str(info.value)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="no GeoIP database configured"):
        GeoResolver.open("")


def test_open_refuses_a_database_without_countries(tmp_path: Path) -> None:
    path = build_country_db(tmp_path / "asn.mmdb", {}, database_type="GeoLite2-ASN",
                            record={"127.50.0.0/16": {"autonomous_system_number": 64500}})
    with pytest.raises(ValueError, match="'GeoLite2-ASN' database has no countries"):
        GeoResolver.open(path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_open_unreadable_file(db: Path) -> None:
    db.chmod(0)
    with pytest.raises(ValueError, match="permission denied"):
        GeoResolver.open(db)


def test_describe(resolver: GeoResolver, db: Path) -> None:
    text = resolver.describe()
    assert text.startswith("GeoLite2-Country, built 20")
    assert str(db) in text


# ---------------------------------------------------------------------------------------------
# per-process cache


def test_resolver_for_off_is_none() -> None:
    assert resolver_for("") is None


def test_resolver_for_opens_once_per_path(db: Path, tmp_path: Path) -> None:
    r1 = resolver_for(str(db))
    assert r1 is not None
    assert resolver_for(str(db)) is r1
    other = build_country_db(tmp_path / "other.mmdb", {"127.50.0.0/16": "CN"})
    r2 = resolver_for(str(other))
    assert r2 is not None and r2 is not r1
    assert (r1.country("127.50.0.1"), r2.country("127.50.0.1")) == ("KP", "CN")


def test_resolver_for_reopens_after_a_fork(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    r1 = resolver_for(str(db))
    monkeypatch.setattr(geo, "_pid", -1)  # as if this process were a freshly forked child
    r2 = resolver_for(str(db))
    assert r1 is not None and r2 is not None and r2 is not r1
    assert r2.country("127.50.0.1") == "KP"


def test_resolver_for_missing_file_logs_once_and_retries_each_minute(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "later.mmdb"
    t0 = 1000.0
    with caplog.at_level(logging.WARNING, logger="spitwall.geo"):
        for dt in (0.0, 1.0, 30.0, 59.0, 61.0, 200.0):  # two retries (61, 200), no success
            assert resolver_for(str(path), now=t0 + dt) is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "GeoIP off" in warnings[0].getMessage() and "no such file" in warnings[0].getMessage()

    build_country_db(path, {"127.50.0.0/16": "KP"})
    assert resolver_for(str(path), now=t0 + 230.0) is None  # last attempt at 200: not yet
    r = resolver_for(str(path), now=t0 + 261.0)
    assert r is not None and r.country("127.50.0.1") == "KP"


def test_resolver_for_garbage_file_does_not_raise(tmp_path: Path) -> None:
    path = tmp_path / "garbage.mmdb"
    path.write_bytes(b"\x00" * 1000)
    assert resolver_for(str(path)) is None
    assert resolver_for(str(path)) is None


def test_replaced_database_is_picked_up(tmp_path: Path,
                                        caplog: pytest.LogCaptureFixture) -> None:
    path = build_country_db(tmp_path / "geo.mmdb", {"127.50.0.0/16": "KP"})
    t0 = 5000.0
    r1 = resolver_for(str(path), now=t0)
    assert r1 is not None and r1.country("127.50.0.1") == "KP"
    # geoipupdate writes a new file and renames it into place
    build_country_db(tmp_path / "geo.mmdb.new", {"127.50.0.0/16": "CN"})
    os.replace(tmp_path / "geo.mmdb.new", path)
    assert resolver_for(str(path), now=t0 + 10) is r1  # not checked yet
    r2 = resolver_for(str(path), now=t0 + 61)
    assert r2 is not None and r2 is not r1
    assert r2.country("127.50.0.1") == "CN"
    # a broken replacement keeps the working reader, with one warning
    bad = tmp_path / "geo.mmdb.bad"
    bad.write_bytes(b"not a database")
    os.replace(bad, path)
    with caplog.at_level(logging.WARNING, logger="spitwall.geo"):
        assert resolver_for(str(path), now=t0 + 130) is r2
        assert resolver_for(str(path), now=t0 + 200) is r2
    assert r2.country("127.50.0.1") == "CN"
    assert sum("keeping the old one" in r.getMessage() for r in caplog.records) == 1
    # removed altogether: keep going with what is mapped
    path.unlink()
    assert resolver_for(str(path), now=t0 + 300) is r2
    assert r2.country("127.50.0.1") == "CN"


def test_country_for(db: Path) -> None:
    cfg = config(geoip__database=str(db))
    assert country_for(cfg, "127.50.0.1") == "KP"
    assert country_for(cfg, "2001:db8::1") == "JP"
    assert country_for(cfg, "8.8.8.8") == ""
    assert country_for(cfg, "not an ip") == ""
    assert country_for(config(), "127.50.0.1") == ""  # off by default
    assert country_for(config(geoip__database="/nonexistent/geo.mmdb"), "127.50.0.1") == ""


def test_database_status(db: Path, tmp_path: Path) -> None:
    assert database_status("") == "off (no database configured)"
    assert database_status(str(db)).startswith("GeoLite2-Country, built ")
    missing = database_status(str(tmp_path / "nope.mmdb"))
    assert missing.startswith("unavailable: ") and "no such file" in missing


# ---------------------------------------------------------------------------------------------
# the check

SCORES = "KP:1,CN:0.6,US:0"


def test_check_identity() -> None:
    assert geoip.name == "geoip"
    assert geoip.shared is False


@pytest.mark.parametrize(("country", "score", "reason"), [
    ("KP", 1.0, "source country KP"),
    ("kp", 1.0, "source country KP"),
    ("CN", 0.6, "source country CN"),
    ("US", 0.0, ""),  # listed with 0
    ("DE", 0.0, ""),  # not listed
    ("", 0.0, ""),  # unknown
])
def test_check_scores_per_country(db: Path, country: str, score: float, reason: str) -> None:
    c = ctx(cfg=config(geoip__database=str(db), geoip__country_scores=SCORES))
    r = geoip.check(_with_country(c, country))
    assert r.name == "geoip" and r.reason == reason
    assert r.score == pytest.approx(score)


def test_check_is_off_without_database() -> None:
    c = ctx(cfg=config(geoip__country_scores=SCORES))
    for country in ("KP", ""):
        r = geoip.check(_with_country(c, country))
        assert (r.score, r.reason) == (0.0, "")


def test_check_says_when_the_database_is_unavailable(tmp_path: Path) -> None:
    cfg = config(geoip__database=str(tmp_path / "missing.mmdb"), geoip__country_scores=SCORES)
    r = geoip.check(ctx(cfg=cfg))
    assert (r.score, r.reason) == (0.0, geoip.UNAVAILABLE)


def test_check_without_country_scores_scores_nothing(db: Path) -> None:
    r = geoip.check(_with_country(ctx(cfg=config(geoip__database=str(db))), "KP"))
    assert (r.score, r.reason) == (0.0, "")


def test_country_scores_are_parsed_once_per_string() -> None:
    geoip.country_scores.cache_clear()
    a = geoip.country_scores("KP:1,XX:0.5")
    b = geoip.country_scores("KP:1,XX:0.5")
    assert a is b and dict(a) == {"KP": 1.0, "XX": 0.5}
    assert geoip.country_scores.cache_info().hits == 1
    with pytest.raises(TypeError):
        a["KP"] = 0.0  # type: ignore[index]
    assert dict(geoip.country_scores("KP:2")) == {}  # invalid (never passes the config): nothing


def test_check_in_the_engine(db: Path) -> None:
    """Resolved as the service will do it: country_for, then the check through decide()."""
    cfg = config(geoip__database=str(db), geoip__country_scores=SCORES, weight__geoip="0.5")
    base = ctx(cfg=cfg)
    country = country_for(cfg, "127.50.3.3")
    c = _with_country(base, country)
    d = decide(c, checks=(("geoip", geoip.check, False),))
    (contribution,) = d.contributions
    assert (contribution.name, contribution.score, contribution.weight) == ("geoip", 1.0, 0.5)
    assert d.score == 0.5
    assert d.reasons() == ["geoip: source country KP"]


def test_country_reaches_the_lists(db: Path) -> None:
    cfg = config(geoip__database=str(db))
    lists = snapshot(block=[ListEntry("country", "KP", "no calls from there")])
    hit = lists.block.match(ip="127.50.3.3", country=country_for(cfg, "127.50.3.3"))
    assert hit is not None and hit.on == "country KP"
    assert lists.block.match(ip="127.50.7.3", country=country_for(cfg, "127.50.7.3")) is None


def _with_country(c: Context, country: str) -> Context:
    return replace(c, country=country)


# ---------------------------------------------------------------------------------------------
# cost (printed, not asserted)


def test_lookup_cost(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    r = resolver_for(str(db))
    assert r is not None
    cfg = config(geoip__database=str(db))
    n = 20000
    cases: dict[str, Callable[[], str]] = {
        "IPv4 hit": lambda: r.country("127.50.3.3"),
        "IPv4 miss": lambda: r.country("8.8.8.8"),
        "IPv6 hit": lambda: r.country("2001:db8::1"),
        "IPv6 uncompressed": lambda: r.country("2001:0db8:0000:0000:0000:0000:0000:0001"),
        "malformed": lambda: r.country("not-an-ip"),
        "country_for (cache+lookup)": lambda: country_for(cfg, "127.50.3.3"),
    }
    lines = []
    for label, fn in cases.items():
        fn()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        lines.append(f"{label:28} {(time.perf_counter() - t) / n * 1e6:6.2f} us/lookup")
    with capsys.disabled():
        print(f"\nGeoIP lookup cost ({r.database_type}, mode auto):\n  " + "\n  ".join(lines))
