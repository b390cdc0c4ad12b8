"""Source country of the call (GeoIP): per-country scores from the live config.

`geoip.country_scores` ("KP:1,XX:0.5") gives each listed country a score in [0, 1]; others
score 0. The country itself comes in the context (`ctx.country`): the service resolves it once
per INVITE with `scoring.geo.country_for`, because the allow/block lists match it as well.
Blocking or allowing a whole country is a list entry (`spitwall list add block country KP`),
not this check.

What `spitwall explain` shows for this check:
- a scored country: "source country KP";
- GeoIP off (`geoip.database` empty), an unlisted or unknown country: score 0, no reason;
- a database configured but not readable in this process: score 0,
  "no signal: GeoIP database unavailable", so an operator sees why the weight did nothing.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from types import MappingProxyType

from scoring import geo
from scoring.checks.base import Context
from scoring.config import parse_country_scores
from scoring.model import CheckResult

log = logging.getLogger("spitwall.checks.geoip")

name = "geoip"
shared = False

UNAVAILABLE = "no signal: GeoIP database unavailable"


@functools.lru_cache(maxsize=8)
def country_scores(text: str) -> Mapping[str, float]:
    """Parsed `geoip.country_scores`, cached per distinct string (read-only mapping)."""
    try:
        return MappingProxyType(parse_country_scores(text))
    except ValueError as exc:  # the config validates it; a bad value here scores nothing
        log.error("geoip.country_scores ignored: %s", exc)
        return MappingProxyType({})


def check(ctx: Context) -> CheckResult:
    path = ctx.config["geoip.database"]
    if not path:
        return CheckResult(name, 0.0)
    code = ctx.country.upper()
    if not code:
        if geo.resolver_for(path) is None:
            return CheckResult(name, 0.0, UNAVAILABLE)
        return CheckResult(name, 0.0)
    score = country_scores(ctx.config["geoip.country_scores"]).get(code, 0.0)
    return CheckResult(name, score, f"source country {code}" if score > 0 else "")
