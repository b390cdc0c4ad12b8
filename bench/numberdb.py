#!/usr/bin/env python3
"""The number database at carrier size: import rate, Redis memory per number, and what the
lookup adds to an INVITE's scoring, side by side in one run.

    .venv/bin/python bench/numberdb.py [--numbers 1000000] [--n 5000] [--rounds 5]

Starts its own redis-server on a free loopback port and stops it by pid. First it imports
`--numbers` random E.164 numbers into the block list with `NumberDb.import_numbers` (what
`spitwall numbers import` runs after validating the file) and prints numbers per second and
Redis `used_memory` per number. Then `ScoringService.score` runs `--n` INVITEs per round with
`numbers.lookup` off and on, alternating (which goes first alternates too; fresh INVITEs alike
for both; `--hit-share` of the callers are on the list, none by default), and prints the
client's CPU time per INVITE (what a Kamailio child spends), the wall time per INVITE and
Redis' CPU per INVITE, best and median, and the ratios on/off.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import redis  # noqa: E402

from bench.sidebyside import print_table, proc_cpu  # noqa: E402
from lists.numberdb import NumberDb, NumberLine  # noqa: E402
from ops.lab import start_redis_server  # noqa: E402
from ops.procs import free_port, stop_pid  # noqa: E402
from scoring import config_admin  # noqa: E402
from scoring.model import CallAttempt  # noqa: E402
from scoring.service import ScoringService  # noqa: E402
from scoring.store import Store  # noqa: E402


def number(rng: random.Random) -> str:
    return f"+1{rng.randrange(2_000_000_000, 9_999_999_999)}"


def attempts(rng: random.Random, n: int, listed: Sequence[str],
             hit_share: float = 0.0) -> list[CallAttempt]:
    out = []
    for _ in range(n):
        caller = rng.choice(listed) if rng.random() < hit_share else number(rng)
        out.append(CallAttempt(call_id=f"bench-{rng.getrandbits(64):x}",
                               source_ip=f"127.0.{rng.randrange(2, 250)}.{rng.randrange(1, 250)}",
                               source_port=5060, from_user=caller, from_domain="example.net",
                               ruri_user=number(rng), ruri_domain="example.com",
                               user_agent="bench"))
    return out


def run_round(service: ScoringService, calls: Sequence[CallAttempt],
              redis_pid: int) -> tuple[float, float, float]:
    """(client CPU µs, wall µs, Redis CPU µs) per INVITE."""
    s0, c0, w0 = proc_cpu([redis_pid]), time.process_time(), time.perf_counter()
    for a in calls:
        service.score(a)
    service.store.versions()  # read the last deferred replies
    w1, c1, s1 = time.perf_counter(), time.process_time(), proc_cpu([redis_pid])
    n = len(calls)
    return (c1 - c0) / n * 1e6, (w1 - w0) / n * 1e6, (s1 - s0) / n * 1e6


def set_lookup(client: redis.Redis, service: ScoringService, on: bool,
               rng: random.Random) -> None:
    config_admin.set_value(client, "numbers.lookup", "true" if on else "false", user="bench")
    for a in attempts(rng, 5, ["+12025550123"]):  # the service picks the change up
        service.score(a)
    assert service.config["numbers.lookup"] is on


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--numbers", type=int, default=1_000_000,
                   help="numbers imported into the block list (1000000)")
    p.add_argument("--n", type=int, default=5000, help="INVITEs per round and mode (5000)")
    p.add_argument("--rounds", type=int, default=5, help="rounds per mode (5)")
    p.add_argument("--hit-share", type=float, default=0.0,
                   help="share of callers on the block list (0: the lookup's own cost; with "
                        "hits, rejected calls skip the checks and are cheaper)")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    if args.numbers < 10 or args.n < 1 or args.rounds < 1 or not 0 <= args.hit_share <= 1:
        p.error("--numbers must be >= 10, --n and --rounds positive, --hit-share in [0, 1]")
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="spitwall-bench-") as tmp:
        port = free_port("127.0.0.1", "tcp")
        pid = start_redis_server(Path(tmp), port)
        url = f"redis://127.0.0.1:{port}/0"
        client = redis.Redis.from_url(url)
        store = Store(url, timeout=2.0)
        try:
            listed = sorted({number(rng) for _ in range(args.numbers)})
            items = [NumberLine(n, "") for n in listed]
            mem0 = int(client.info("memory")["used_memory"])
            t0 = time.perf_counter()
            NumberDb(client).import_numbers("block", items, source="bench", reason="feed",
                                            user="bench")
            took = time.perf_counter() - t0
            mem1 = int(client.info("memory")["used_memory"])
            print(f"import: {len(items)} numbers in {took:.1f} s = {len(items) / took:,.0f} "
                  f"numbers/s; Redis memory {(mem1 - mem0) / len(items):.0f} bytes per number "
                  f"({(mem1 - mem0) / 2**20:.0f} MiB)")

            service = ScoringService(store)
            for a in attempts(rng, 200, listed):  # connect, load scripts and config
                service.score(a)
            results: dict[str, list[tuple[float, float, float]]] = {"off": [], "on": []}
            for i in range(args.rounds):
                # fresh INVITEs for each mode (a repeated INVITE finds its counters existing,
                # which is cheaper), and the order alternates
                for mode in (("off", "on") if i % 2 == 0 else ("on", "off")):
                    calls = attempts(rng, args.n, listed, args.hit_share)
                    set_lookup(client, service, mode == "on", rng)
                    results[mode].append(run_round(service, calls, pid))
        finally:
            store.close()
            client.close()
            stop_pid(pid, "redis-server")
    print(f"{args.rounds} rounds x {args.n} INVITEs per mode (ScoringService.score: observe, "
          f"checks, record), alternating; {args.hit_share:.0%} of callers on the block list")
    print_table("lookup", results, ("on", "off"), digits=3)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
