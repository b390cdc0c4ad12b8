"""Build small MaxMind-format (GeoIP2/GeoLite2) country databases at test time.

    from tests.geodb import build_country_db
    build_country_db(tmp_path / "geo.mmdb", {"127.50.0.0/16": "KP", "2001:db8::/32": "DE"})

The file has the layout of GeoLite2-Country: an IPv6 tree with IPv4 under ::/96 (so IPv4 and
IPv6 lookups both work), `database_type` "GeoLite2-Country", and records shaped like MaxMind's
(`country.iso_code`, `registered_country.iso_code`, `continent`), so `geoip2.database.Reader`'s
`country()` (and `scoring.geo.GeoResolver`) read it as they read the real thing. Any CIDR may be
used, loopback and private ranges included (the integration tests send from 127.x addresses),
although the real databases carry no records for them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mmdb_writer import MMDBWriter
from netaddr import IPNetwork, IPSet

# Enough continents for the records to look real; unknown codes get "EU".
_CONTINENT = {"KP": "AS", "CN": "AS", "JP": "AS", "IN": "AS", "US": "NA", "CA": "NA",
              "BR": "SA", "NG": "AF", "AU": "OC"}


def country_record(code: str) -> dict[str, Any]:
    """The record MaxMind stores for an address in country `code` (the fields we need)."""
    code = code.upper()
    country = {"iso_code": code, "names": {"en": code}}
    continent = _CONTINENT.get(code, "EU")
    return {
        "continent": {"code": continent, "names": {"en": continent}},
        "country": country,
        "registered_country": dict(country),
    }


def build_country_db(path: str | os.PathLike[str], entries: Mapping[str, str], *,
                     database_type: str = "GeoLite2-Country", ip_version: int = 6,
                     record: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
    """Write a database mapping each CIDR of `entries` to its ISO country code; return its path.

    A more specific CIDR wins over a containing one whatever the order of `entries`.
    `database_type` "GeoLite2-City"/"GeoIP2-City" writes a City database (same records);
    `ip_version=4` writes an IPv4-only tree. `record` overrides whole records per CIDR, for
    records of another shape (e.g. only `registered_country`).
    """
    writer = MMDBWriter(
        ip_version=ip_version,
        database_type=database_type,
        languages=["en"],
        description={"en": "spitwall test country database"},
        ipv4_compatible=ip_version == 6,
        int_type="u32",  # geoname_id-style integers, as MaxMind writes them
        float_type="f64",
    )
    contents: dict[str, Mapping[str, Any]] = {c: country_record(v) for c, v in entries.items()}
    contents.update(record or {})
    # The writer replaces a subtree when a supernet is inserted after its subnets: insert the
    # widest networks first so that the more specific ones win.
    def depth(cidr: str) -> int:  # prefix length in the tree (IPv4 sits under ::/96)
        net = IPNetwork(cidr)
        return int(net.prefixlen) + (96 if ip_version == 6 and net.version == 4 else 0)

    for cidr in sorted(contents, key=depth):
        writer.insert_network(IPSet([IPNetwork(cidr)]), dict(contents[cidr]))
    out = Path(path)
    writer.to_db_file(str(out))
    return out
