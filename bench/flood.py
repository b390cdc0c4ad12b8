#!/usr/bin/env python3
"""A request flood from one source against legitimate calls, `flood.check` on and off, side
by side in one run.

    .venv/bin/python bench/flood.py [--rounds 2] [--seconds 10] [--legit-rate 200]
                                    [--flood-rate 2000]

Starts its own lab (redis-server, Kamailio with kamailio.cfg's default FLOOD_DENSITY, the
answering machine, the delivery worker) and a SIPp UAS as the next hop, every check's weight
set to 0.001 as in bench/load.py (so every call, the flood's too, takes the full scoring path
and is relayed when it is not dropped). Per round, for ``--seconds``: legitimate callers from
4 addresses (127.0.3.1-4; ``--legit-rate`` calls/s in all, far below the flood limit each) and
one flooding UAC on 127.0.70.1 placing ``--flood-rate`` INVITEs a second (no retransmissions;
a call not answered within 1 s is abandoned). Rounds alternate ``flood.check`` true and false
(on, off, off, on, ...). Printed per round: the legitimate calls completed and failed and
their mean call setup time (INVITE to 200), the flood's calls answered, Kamailio's CPU (all
processes) and Redis' CPU per second of the round, and the Redis commands per second. Every
process is stopped by its pid.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.load import (  # noqa: E402
    BenchLab,
    UacFleet,
    _children_of,
    _stat_int,
    _stat_ms,
    cpu_seconds,
    neutralise_scores,
    read_sipp_stats,
)
from ops.sipp import start_uas  # noqa: E402
from scoring import config_admin, redisconn  # noqa: E402

RCVBUF = 4 * 1024 * 1024
LEGIT = [f"127.0.3.{i + 1}" for i in range(4)]
FLOODER = "127.0.70.1"


def commands(client: Any) -> int:
    """Commands Redis has run so far (INFO commandstats, all commands)."""
    info = client.info("commandstats")
    return sum(int(v.get("calls", 0)) for k, v in info.items() if k.startswith("cmdstat_"))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2, help="rounds per mode (2)")
    p.add_argument("--seconds", type=int, default=10, help="length of a round (10)")
    p.add_argument("--legit-rate", type=int, default=200, help="legitimate calls/s (200)")
    p.add_argument("--flood-rate", type=int, default=2000, help="flood INVITEs/s (2000)")
    args = p.parse_args(argv)
    if min(args.rounds, args.seconds, args.legit_rate, args.flood_rate) < 1:
        p.error("every option must be at least 1")
    with tempfile.TemporaryDirectory(prefix="spitwall-flood-") as tmp:
        wd = Path(tmp)
        uas = start_uas("127.0.0.1", trace_msg=False, workdir=wd / "uas",
                        extra_args=["-buff_size", str(RCVBUF), "-nr"])
        lab = BenchLab(wd / "lab", 1024, RCVBUF)
        try:
            st = lab.up(next_hop=uas.uri, children=4)
            client = redisconn.client(st.redis_url, socket_timeout=10)
            neutralise_scores(client)
            kamailio = [st.pids["kamailio"], *_children_of(st.pids["kamailio"])]
            redis_pid = st.pids["redis"]
            target = (st.sip_addr, st.sip_port)
            print(f"lab: kamailio on {st.sip_addr}:{st.sip_port}, 4 children; legitimate "
                  f"{args.legit_rate} calls/s from {len(LEGIT)} addresses, flood "
                  f"{args.flood_rate} INVITEs/s from {FLOODER}, {args.seconds} s per round")
            print("round flood.check  legit ok failed setup ms  flood answered  kam CPU/s  "
                  "redis CPU/s  redis cmds/s")
            order = ("true", "false", "false", "true")
            for i in range(args.rounds * 2):
                mode = order[i % 4]
                config_admin.set_value(client, "flood.check", mode, user="bench")
                time.sleep(1.5)  # workers learn it with the next INVITE (or a flagged source)
                c0, r0, n0 = cpu_seconds(kamailio), cpu_seconds([redis_pid]), commands(client)
                t0 = time.monotonic()
                legit, flood = UacFleet(), UacFleet()
                try:
                    legit_stats = legit.start(
                        wd / f"r{i}" / "legit", target, LEGIT, args.legit_rate * args.seconds,
                        args.legit_rate, args.legit_rate * 2, args.seconds + 30, RCVBUF, True)
                    flood_stats = flood.start(
                        wd / f"r{i}" / "flood", target, [FLOODER],
                        args.flood_rate * args.seconds, args.flood_rate, 1_000_000,
                        args.seconds + 5, RCVBUF, True, recv_timeout_ms=1000)
                    legit.wait(args.seconds + 40)
                finally:
                    legit.stop()
                    flood.stop()
                wall = time.monotonic() - t0
                c1, r1, n1 = cpu_seconds(kamailio), cpu_seconds([redis_pid]), commands(client)
                ls = [read_sipp_stats(f) for f in legit_stats]
                fs = [read_sipp_stats(f) for f in flood_stats]
                ok = sum(_stat_int(s, "SuccessfulCall(C)") for s in ls)
                failed = sum(_stat_int(s, "FailedCall(C)") for s in ls)
                setup = (sum(_stat_ms(s, "ResponseTime1(C)") * _stat_int(s, "SuccessfulCall(C)")
                             for s in ls) / ok) if ok else 0.0
                answered = sum(_stat_int(s, "SuccessfulCall(C)") for s in fs)
                print(f"{i + 1:5} {mode:11} {ok:8} {failed:6} {setup:8.1f} {answered:15}"
                      f" {(c1 - c0) / wall:10.2f} {(r1 - r0) / wall:12.2f}"
                      f" {(n1 - n0) / wall:13.0f}", flush=True)
                time.sleep(3)  # the flooder's pike entry cools down between rounds
        finally:
            lab.down()
            uas.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
