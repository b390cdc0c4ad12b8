#!/usr/bin/env python3
"""What Redis Cluster routing costs the request path: `Store.observe` + `Store.record` per
INVITE on one redis-server and on a three-master cluster, side by side in one run.

    .venv/bin/python bench/cluster_store.py [--n 5000] [--rounds 5]

Starts its own redis-server and its own cluster (three masters, no replicas) on free loopback
ports and stops them by pid. Each round runs `--n` INVITEs (random source IPs, callers and
callees, as `bench/load.py` sends them) through one `Store` per backend, the backends taking
turns. Printed per backend: the client's CPU time per INVITE (process time: packing, routing,
parsing, syscalls -- what a Kamailio child spends), the wall time per INVITE (one awaited round
trip plus the client's work; the servers share the machine's CPUs), and the Redis servers' CPU
per INVITE (from /proc, all cluster masters summed); best and median round, and the ratios.
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
if str(REPO_ROOT) not in sys.path:  # for tests.redis_cluster (tests/ is not installed)
    sys.path.insert(0, str(REPO_ROOT))

from bench.sidebyside import print_table, proc_cpu  # noqa: E402
from ops.lab import start_redis_server  # noqa: E402
from ops.procs import free_port, stop_pid  # noqa: E402
from scoring.config import Config  # noqa: E402
from scoring.model import Action, CallAttempt, Decision  # noqa: E402
from scoring.store import Store  # noqa: E402
from tests.redis_cluster import ClusterSet  # noqa: E402


def attempts(rng: random.Random, n: int) -> list[CallAttempt]:
    return [CallAttempt(call_id=f"bench-{rng.getrandbits(64):x}",
                        source_ip=f"127.0.{rng.randrange(2, 250)}.{rng.randrange(1, 250)}",
                        source_port=5060, transport="udp",
                        from_user=f"+1{rng.randrange(2_000_000_000, 9_999_999_999)}",
                        from_domain="example.net",
                        ruri_user=f"+1{rng.randrange(2_000_000_000, 9_999_999_999)}",
                        ruri_domain="example.com", user_agent="bench")
            for _ in range(n)]


def run_round(store: Store, calls: Sequence[CallAttempt], cfg: Config,
              server_pids: Sequence[int]) -> tuple[float, float, float]:
    """(client CPU µs, wall µs, servers' CPU µs) per INVITE."""
    decision = Decision(Action.RELAY, 0.1)
    s0, c0, w0 = proc_cpu(server_pids), time.process_time(), time.perf_counter()
    for a in calls:
        store.observe(a, cfg)
        store.record(a, decision)
    store.versions()  # read the last deferred replies
    w1, c1, s1 = time.perf_counter(), time.process_time(), proc_cpu(server_pids)
    n = len(calls)
    return (c1 - c0) / n * 1e6, (w1 - w0) / n * 1e6, (s1 - s0) / n * 1e6


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=5000, help="INVITEs per round and backend (5000)")
    p.add_argument("--rounds", type=int, default=5, help="rounds per backend (5)")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    if args.n < 1 or args.rounds < 1:
        p.error("--n and --rounds must be positive")
    rng = random.Random(args.seed)
    cfg = Config.defaults()
    with tempfile.TemporaryDirectory(prefix="spitwall-bench-") as tmp:
        work = Path(tmp)
        (work / "single").mkdir()
        port = free_port("127.0.0.1", "tcp")
        single_pid = start_redis_server(work / "single", port)
        cluster = ClusterSet(work / "cluster")
        try:
            cluster.start()
            backends = {"single": (Store(f"redis://127.0.0.1:{port}/0", timeout=2.0),
                                   [single_pid]),
                        "cluster": (Store(cluster.url, timeout=2.0),
                                    list(cluster.pids.values()))}
            for store, _ in backends.values():  # connect, load scripts, learn the slot map
                for a in attempts(rng, 200):
                    store.observe(a, cfg)
            results: dict[str, list[tuple[float, float, float]]] = {k: [] for k in backends}
            for _ in range(args.rounds):
                calls = attempts(rng, args.n)  # the same INVITEs for both backends
                for name, (store, pids) in backends.items():
                    results[name].append(run_round(store, calls, cfg, pids))
            for store, _ in backends.values():
                store.close()
        finally:
            cluster.stop()
            stop_pid(single_pid, "redis-server")
    print(f"{args.rounds} rounds x {args.n} INVITEs per backend (observe + record), alternating")
    print_table("backend", results, ("cluster", "single"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
