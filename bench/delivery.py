#!/usr/bin/env python3
"""Delivery throughput of the intercept delivery worker (issue 5, "Measure").

What it measures: how many events per second one worker process (`python -m intercept.deliver`,
as the lab runs it) takes from the Redis stream to a recorder and acknowledges, in both modes:

* ``publish``: ``--events`` entries (default 5000) with a SIP URI destination are pre-loaded
  into `intercept.names.EVENTS`, then a worker is started; it PUBLISHes each to the test
  recorder (`tests/integration/recorder.py`, a real SIP endpoint on loopback) and XACKs after
  the 200;
* ``notify``: the recorder SUBSCRIBEs (allow-listed) to a first worker, which is stopped (the
  subscription stays in Redis); the same number of ``subscribe`` entries for that LIID are
  pre-loaded, and a worker with the same consumer name and port resumes the subscription and
  sends one NOTIFY per event.

Each event is a real S/MIME envelope (a CALEA call event encrypted to a fresh RSA-2048
certificate), made before the clock starts. Reported per round: the rate seen by the recorder
(distinct events between the first and the last arrival), the time until the worker had
acknowledged all of them (from its start, so it includes start-up), and the worker's CPU time
per event. Rounds alternate between the modes (``--rounds``, default 2 each); the summary is
the median, with the publish/notify ratio. The recorder does not decrypt by default (it would
compete for the same CPUs; ``--decrypt`` turns it on) and then de-duplicates by ciphertext hash.

Everything runs on loopback and free ports: its own redis-server, the workers, the recorder in
this process. Every process is stopped by its pid. ``--json`` prints the summary as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import msgpack  # noqa: E402
import redis  # noqa: E402

from intercept import names  # noqa: E402
from ops.lab import start_redis_server  # noqa: E402
from ops.procs import free_port, sip_options_ping, stop_pid  # noqa: E402
from ops.sipp import stop_popen  # noqa: E402
from tests.integration.recorder import Recorder, recipient_keypair, synthetic_entry  # noqa: E402
from tests.redis_replies import as_fields  # noqa: E402

LIID = "BENCH-1"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_worker(url: str, port: int, consumer: str, stats: Path, log: Path,
                 window: int, notify_window: int) -> subprocess.Popen[bytes]:
    env = dict(os.environ, SPITWALL_REDIS=url)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "intercept.deliver", "--sip-port", str(port),
             "--consumer", consumer, "--stats-file", str(stats), "--window", str(window),
             "--notify-window", str(notify_window),
             "--log-level", "WARNING"],
            cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT)
    return proc


def wait_ready(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + 20
    while sip_options_ping("127.0.0.1", port, 0.3) != 200:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"worker did not start:\n{log.read_text()[-2000:]}")


def pending(client: redis.Redis) -> int:
    try:
        return int(client.xpending(names.EVENTS, names.EVENTS_GROUP)["pending"])
    except redis.ResponseError:
        return -1


def preload(client: redis.Redis, entries: list[dict[str, Any]]) -> None:
    pipe = client.pipeline(transaction=False)
    for i, fields in enumerate(entries):
        pipe.xadd(names.EVENTS, as_fields(fields))
        if i % 500 == 499:
            pipe.execute()
    pipe.execute()


def one_round(mode: str, client: redis.Redis, url: str, rec: Recorder, cert: bytes, n: int,
              work: Path, window: int, notify_window: int, timeout: float) -> dict[str, Any]:
    client.flushall()
    rec.reset()
    port = free_port("127.0.0.1", "udp")
    tag = f"{mode}-{time.monotonic_ns()}"
    stats, log = work / f"{tag}.json", work / f"{tag}.log"
    dest = rec.uri if mode == "publish" else "subscribe"
    entries = [synthetic_entry(dest, LIID, cert)[1] for _ in range(n)]
    if mode == "notify":
        client.hset(names.RECORDERS, "127.0.0.1", msgpack.packb({}, use_bin_type=True))
        first = start_worker(url, port, tag, stats, log, window, notify_window)
        try:
            wait_ready(first, port, log)
            sub = rec.subscribe(("127.0.0.1", port), LIID, expires=3600)
            if sub.status != 200:
                raise SystemExit(f"SUBSCRIBE answered {sub.status}")
        finally:
            stop_popen(first)
    preload(client, entries)
    started = time.monotonic()
    proc = start_worker(url, port, tag, stats, log, window, notify_window)
    try:
        deadline = started + timeout
        while len(rec.event_ids) < n and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        while pending(client) != 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        acked_after = time.monotonic() - started
        cpu = cpu_seconds(proc.pid) if proc.poll() is None else float("nan")
    finally:
        stop_popen(proc)
    events = rec.events
    got = len(events)
    if got >= 2:
        span = events[-1].received_at - events[0].received_at
        rate = (got - 1) / span if span > 0 else float("inf")
    else:
        span, rate = 0.0, 0.0
    worker = json.loads(stats.read_text()) if stats.exists() else {}
    return {"mode": mode, "events": n, "received": got, "raw": rec.raw_count,
            "duplicates": rec.raw_count - got, "pending_after": pending(client),
            "dead": client.xlen(names.DEAD), "span_s": round(span, 3),
            "events_per_s": round(rate, 1), "all_acked_after_s": round(acked_after, 3),
            "worker_cpu_s": round(cpu, 3), "cpu_ms_per_event": round(1000 * cpu / n, 4),
            "latency_mean_s": worker.get("latency_mean"),
            "retransmissions": worker.get("sip", {}).get("retransmissions_sent")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=2, help="rounds per mode (alternating)")
    p.add_argument("--window", type=int, default=32, help="worker --window (PUBLISH)")
    p.add_argument("--notify-window", type=int, default=1,
                   help="worker --notify-window (NOTIFYs in flight per LIID, default 1)")
    p.add_argument("--decrypt", action="store_true", help="the recorder decrypts every event")
    p.add_argument("--timeout", type=float, default=300.0, help="per round, seconds")
    p.add_argument("--modes", default="publish,notify")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if not modes or any(m not in ("publish", "notify") for m in modes):
        p.error("--modes takes publish and/or notify")

    key, cert = recipient_keypair("bench-recorder")
    rec = Recorder(key, cert, decrypt=args.decrypt)
    rec.start("127.0.0.1", 0)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="spitwall-delivery-bench-") as tmp:
        work = Path(tmp)
        rport = free_port("127.0.0.1", "tcp")
        rpid = start_redis_server(work, rport, "127.0.0.1")
        url = f"redis://127.0.0.1:{rport}/0"
        client = redis.Redis.from_url(url)
        try:
            for _ in range(args.rounds):
                for mode in modes:
                    res = one_round(mode, client, url, rec, cert, args.events, work,
                                    args.window, args.notify_window, args.timeout)
                    results.append(res)
                    if not args.json:
                        print(f"{mode:8s} {res['received']:6d}/{res['events']} events "
                              f"{res['events_per_s']:9.1f} ev/s  all acked after "
                              f"{res['all_acked_after_s']:.2f} s  worker CPU "
                              f"{res['cpu_ms_per_event']:.3f} ms/ev  dup {res['duplicates']}"
                              f"  pending {res['pending_after']}  dead {res['dead']}",
                              flush=True)
        finally:
            client.close()
            stop_pid(rpid, "redis-server")
            rec.stop()
    summary: dict[str, Any] = {"events": args.events, "rounds": args.rounds,
                               "window": args.window, "notify_window": args.notify_window,
                               "decrypt": args.decrypt, "cpus": os.cpu_count(), "runs": results}
    for mode in modes:
        rates = [r["events_per_s"] for r in results if r["mode"] == mode]
        cpu = [r["cpu_ms_per_event"] for r in results if r["mode"] == mode]
        summary[mode] = {"events_per_s_median": statistics.median(rates),
                         "cpu_ms_per_event_median": statistics.median(cpu)}
    if len(modes) == 2 and summary["notify"]["events_per_s_median"]:
        summary["publish_to_notify_ratio"] = round(
            summary["publish"]["events_per_s_median"]
            / summary["notify"]["events_per_s_median"], 2)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print()
        for mode in modes:
            print(f"{mode:8s} median {summary[mode]['events_per_s_median']:9.1f} events/s, "
                  f"worker CPU {summary[mode]['cpu_ms_per_event_median']:.3f} ms/event "
                  f"({args.events} events pre-loaded, {args.rounds} round(s), "
                  f"{os.cpu_count()} CPUs)")
        if "publish_to_notify_ratio" in summary:
            print(f"PUBLISH / NOTIFY throughput ratio: {summary['publish_to_notify_ratio']}")
    ok = all(r["received"] == r["events"] and r["pending_after"] == 0 for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
