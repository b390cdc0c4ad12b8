"""`spitwall stir fetch`: the out-of-band certificate fetcher for STIR/SHAKEN.

The INVITE path never touches the network: when a PASSporT's certificate (x5u) is not cached,
the call counts as "unverified" and the proxy pushes the URL (only for allow-listed hosts) onto
the bounded list `spitwall:{stir}:x5u_misses`. This worker pops those URLs, fetches each from an
allow-listed host (`stir.x5u_hosts`, bounded size and time), checks that it chains to the trust
store, and writes it into `stir.trust_dir` as `<sha256(url)>.leaf.pem`, where every Kamailio
child finds it on its next miss for that URL (misses are re-checked after 30 s).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from scoring import config_admin, keys
from scoring.config import parse_hosts
from scoring.stir import FetchError, TrustStore, fetch_x5u, leaf_filename, write_leaf

log = logging.getLogger("spitwall.stir_fetch")


@dataclass
class FetchReport:
    fetched: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


def fetch_pending(client: redis.Redis, *, max_urls: int = 100,
                  timeout: float = 2.0) -> FetchReport:
    """Drain up to `max_urls` URLs from the miss list and fetch what is allowed."""
    cfg, _raw = config_admin.show(client)
    trust_dir = str(cfg["stir.trust_dir"])
    hosts = parse_hosts(str(cfg["stir.x5u_hosts"]))
    report = FetchReport()
    if not trust_dir:
        raise ValueError("stir.trust_dir is not set: nowhere to store certificates")
    store = TrustStore.load(trust_dir)
    seen: set[str] = set()
    for _ in range(max_urls):
        raw: Any = client.rpop(keys.X5U_MISSES)
        if raw is None:
            break
        url = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        if url in seen:
            continue
        seen.add(url)
        try:
            body = fetch_x5u(url, hosts, timeout=timeout)
            store.add_leaf(url, body)  # raises ValueError unless it chains to a trusted CA
            write_leaf(trust_dir, url, body)
        except (FetchError, ValueError, OSError) as exc:
            report.failed[url] = str(exc)
            log.warning("x5u %s: %s", url[:120], exc)
            continue
        report.fetched.append(f"{url} -> {leaf_filename(url)}")
    return report


def run_forever(client: redis.Redis, interval: float = 1.0, timeout: float = 2.0) -> None:
    while True:
        try:
            fetch_pending(client, timeout=timeout)
        except (redis.RedisError, ValueError) as exc:
            log.error("stir fetch: %s", exc)
        time.sleep(interval)
