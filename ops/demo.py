"""`make demo`: a lab, a mixed workload through the real proxy, a table of outcomes.

Starts the lab (`spitwall lab up`: redis-server, Kamailio, the answering machine) and a SIPp
UAS as the next hop, then drives, in order:
legitimate callers from several 127.x addresses, a spam campaign rotating caller URIs from one
address, a war-dialling sweep of sequential numbers, a sipvicious svmap + svwar scan, and the
legitimate callers again. Outcomes come from the SIP responses SIPp saw; scores come from the
decisions the proxy recorded in Redis (what `spitwall explain` shows). Everything started is
stopped by pid at the end, also on errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from ops.lab import Lab, LabError
from ops.sipp import UacResult, run_svmap, run_svwar, run_uac, start_uas
from scoring import keys, redisconn
from scoring.store import find_decision, unpack_decision

LEGIT_SOURCES = [f"127.10.0.{i}" for i in range(1, 6)]
CAMPAIGN_SOURCE = "127.20.0.1"
SWEEP_SOURCE = "127.30.0.1"
SVMAP_SOURCE = "127.40.0.1"
SVWAR_SOURCE = "127.40.0.2"


@dataclass
class ClassResult:
    """Outcomes of one traffic class."""

    name: str
    calls: int = 0
    actions: dict[str, int] = field(default_factory=lambda: {"relay": 0, "divert": 0,
                                                            "reject": 0})
    sip: dict[str, int] = field(default_factory=dict)
    scores: list[float] = field(default_factory=list)
    note: str = ""
    example: str = ""

    def add_decision(self, d: dict[str, Any]) -> None:
        self.actions[d["action"]] = self.actions.get(d["action"], 0) + 1
        self.scores.append(float(d["score"]))
        if not self.example and d["action"] != "relay":
            self.example = str(d["call_id"])


def _account(cr: ClassResult, res: UacResult, client: redis.Redis) -> None:
    cr.calls += len(res.outcomes)
    for code in res.outcomes.values():
        label = str(code) if code is not None else "none"
        cr.sip[label] = cr.sip.get(label, 0) + 1
    for cid in res.outcomes:
        d = find_decision(client, cid)
        if d is not None:
            cr.add_decision(d)


def _decisions_from(client: redis.Redis, source_ip: str) -> Iterable[dict[str, Any]]:
    """Decisions whose caller came from `source_ip` (scans the bounded ring: demo-sized)."""
    for bucket in keys.decision_buckets():
        blobs: Any = client.hvals(bucket)
        for blob in blobs:
            d = unpack_decision(blob)
            if str(d["call"]["src"]).startswith(source_ip + ":"):
                yield d


def _legit_round(cr: ClassResult, host: str, port: int, client: redis.Redis, *, calls: int,
                 tag: str) -> None:
    """People: each source calls different numbers, conversations of about 8 s (answered
    calls shorter than `reputation.short_call` count against the caller), all sources at once."""
    def one(i: int, src: str) -> UacResult:
        rows = [(f"user{i}", f"202555{tag}{i}{j}", f"Customer {i}", "Linphone/5.2.0")
                for j in range(calls)]
        return run_uac(host, port, src, len(rows), 1, rows, hold_ms=8000, timeout=90)

    with ThreadPoolExecutor(len(LEGIT_SOURCES)) as pool:
        for res in pool.map(one, range(len(LEGIT_SOURCES)), LEGIT_SOURCES):
            _account(cr, res, client)


def run(workdir: Path, quiet: bool = False) -> list[ClassResult]:
    def say(msg: str) -> None:
        if not quiet:
            print(msg, flush=True)

    lab = Lab(workdir / "lab")
    hop = start_uas("127.0.0.1")
    results: list[ClassResult] = []
    try:
        state = lab.up(next_hop=f"sip:127.0.0.1:{hop.port}", children=4, redis_url=None)
        say(f"lab up: proxy {state.sip_uri}, redis {state.redis_url}, next hop "
            f"127.0.0.1:{hop.port}, answering machine {state.media_uri}")
        client = redisconn.client(state.redis_url)
        host, port = state.sip_addr, state.sip_port

        legit = ClassResult("legitimate callers (5 IPs)")
        say("1/5 legitimate callers from 5 addresses (calls of ~8 s, in parallel) ...")
        _legit_round(legit, host, port, client, calls=4, tag="01")
        results.append(legit)

        say("2/5 spam campaign rotating caller URIs from one address ...")
        camp = ClassResult(f"spam campaign ({CAMPAIGN_SOURCE})")
        rows = [(f"promo{i:03d}", f"3125550{(i * 37) % 1000:03d}", "Prize Center",
                 "Asterisk PBX 18.1") for i in range(40)]
        _account(camp, run_uac(host, port, CAMPAIGN_SOURCE, len(rows), 10, rows,
                               max_concurrent=2, hold_ms=50), client)
        results.append(camp)

        say("3/5 war-dialling sweep of sequential numbers ...")
        sweep = ClassResult(f"war-dialling sweep ({SWEEP_SOURCE})")
        rows = [("dialer", f"{6175550100 + i}", "Survey", "Grandstream GXP2160")
                for i in range(40)]
        _account(sweep, run_uac(host, port, SWEEP_SOURCE, len(rows), 10, rows,
                                max_concurrent=2, hold_ms=50), client)
        results.append(sweep)

        say("4/5 sipvicious: svmap (OPTIONS) and svwar -m INVITE ...")
        svmap = run_svmap(host, SVMAP_SOURCE, port, timeout=30)
        scan = ClassResult(f"sipvicious svmap ({SVMAP_SOURCE})")
        raw_probes: Any = client.get(keys.scan_key(SVMAP_SOURCE))
        probes = int(raw_probes or 0)
        scan.note = (f"{probes} probe(s) dropped; svmap found "
                     f"{'nothing' if svmap.found_nothing else ', '.join(svmap.found)}")
        results.append(scan)
        # 200-299: no emergency short code (112, 911), which spitwall never screens
        svwar = run_svwar(host, port, SVWAR_SOURCE, extensions="200-299", method="INVITE",
                          timeout=120)
        war = ClassResult(f"sipvicious svwar ({SVWAR_SOURCE})")
        for d in _decisions_from(client, SVWAR_SOURCE):
            war.calls += 1
            war.add_decision(d)
        war.note = ("svwar found " + ("no extension" if svwar.found_nothing
                                      else ", ".join(svwar.found)))
        results.append(war)

        say("5/5 the legitimate callers again, after the attacks ...")
        again = ClassResult("legitimate callers, again")
        _legit_round(again, host, port, client, calls=1, tag="09")
        results.append(again)
        diverted = sum(r.actions["divert"] for r in results)
        say(f"next hop received {hop.count_invites()} INVITE(s); the answering machine "
            f"answered {diverted} diverted call(s) (these demo callers hang up at once)")
        return results
    finally:
        hop.close()
        try:
            lab.down()
        except LabError as exc:
            print(f"warning: lab down: {exc}", file=sys.stderr)


def table(results: list[ClassResult]) -> str:
    head = (f"{'traffic class':38} {'calls':>5} {'relay':>6} {'divert':>6} {'reject':>6}  "
            f"{'score min/median/max':22} SIP finals")
    lines = [head, "-" * len(head)]
    for r in results:
        sc = (f"{min(r.scores):.2f} / {statistics.median(r.scores):.2f} / {max(r.scores):.2f}"
              if r.scores else "-")
        sip = ", ".join(f"{k} x{v}" for k, v in sorted(r.sip.items())) or "-"
        lines.append(f"{r.name:38} {r.calls:>5} {r.actions['relay']:>6} {r.actions['divert']:>6} "
                     f"{r.actions['reject']:>6}  {sc:22} {sip}")
        if r.note:
            lines.append(f"{'':38} {r.note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="spitwall-demo", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, help="keep lab files here (default: a temp dir)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    try:
        if args.workdir:
            args.workdir.mkdir(parents=True, exist_ok=True)
            results = run(args.workdir, args.quiet)
        else:
            with tempfile.TemporaryDirectory(prefix="spitwall-demo-") as tmp:
                results = run(Path(tmp), args.quiet)
    except (LabError, OSError, redis.RedisError) as exc:
        print(f"spitwall-demo: error: {exc}", file=sys.stderr)
        return 1
    print()
    print(table(results))
    print(f"\n(demo took {time.monotonic() - t0:.0f} s; all processes stopped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
