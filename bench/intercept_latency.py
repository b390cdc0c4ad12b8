#!/usr/bin/env python3
"""Intercept benchmark: what being a target costs a call, side by side with ordinary calls.

One run starts its own lab (redis-server + Kamailio with ``kamailio.cfg`` + the answering
machine, loopback, free ports) and a SIPp callee (``tests/sipp/uas_srtp.xml``: 180 and 200 at
once, SDES ``a=crypto`` answer). One intercept case is provisioned for caller A; caller B is not
a target. Rounds alternate B (plain) and A (target) calls, in the order plain/target,
target/plain, ... so that drift of the noisy machine hits both alike; each round places
``--calls`` calls at ``--rate`` calls/s (open loop, well below capacity: this measures latency,
not throughput) with ``tests/sipp/uac_srtp.xml`` offering SDES keys.

Per round it reports:

* the response times INVITE sent -> 180 and -> 200 received at the caller (from the
  microsecond timestamps of SIPp's message log; SIPp's own statistics have 1 ms resolution):
  median and 90th percentile. It covers the INVITE's request route (scoring,
  target match, Origination event built and encrypted, queued) and the 180/200 reply routes
  (for a target: key and Answer events built and encrypted, queued);
* Kamailio CPU time per call (all its processes, /proc/<pid>/stat);
* events delivered per call: the lab's delivery worker PUBLISHes them to a recorder in the bench
  process (tests/integration/recorder.py) that acknowledges without decrypting, so the whole
  chain runs as in production (proxy, timer process, Redis stream, worker).

The summary prints the ratios target/plain of the medians over rounds. The target case's
recipient certificate is RSA-2048 (each event costs one RSA encryption of a fresh AES key).
Run: ``.venv/bin/python bench/intercept_latency.py [--calls 400 --rate 100 --rounds 3] [--json]``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import redis  # noqa: E402
from load import _children_of, cpu_seconds, neutralise_scores  # noqa: E402

from intercept import names  # noqa: E402
from intercept.targets import Target, normalise_identity  # noqa: E402
from ops.lab import Lab  # noqa: E402
from ops.sipp import (  # noqa: E402
    SIPP_DIR,
    free_udp_port,
    parse_message_log,
    sipp_binary,
    stop_popen,
)
from tests.integration.recorder import Recorder  # noqa: E402
from tests.intercept_certs import make_recipient  # noqa: E402

SUITE = "AES_CM_128_HMAC_SHA1_80"
SOURCE = "127.0.3.1"
TARGET_CALLER = "+15550100001"
PLAIN_CALLER = "+15550100002"


def _key() -> str:
    return base64.b64encode(os.urandom(30)).decode()


def _media(key: str, ssrc: int) -> list[str]:
    return ["-key", "proto", "RTP/SAVP", "-key", "attr1", f"crypto:1 {SUITE} inline:{key}",
            "-key", "attr2", f"ssrc:{ssrc} cname:bench", "-key", "attr3", "x-none:1"]


def _stamp(ts: str) -> float | None:
    """Seconds from a SIPp message-log separator timestamp ('YYYY-MM-DD HH:MM:SS.us' plus,
    in some versions, a tab and the epoch time with microseconds)."""
    for token in reversed(ts.replace("\t", " ").split()):
        with contextlib.suppress(ValueError):
            value = float(token)
            if value > 1e9:
                return value
    with contextlib.suppress(ValueError):
        return datetime.fromisoformat(ts.strip().replace("\t", " ")[:26]).timestamp()
    return None


def _latencies(log: Path) -> tuple[list[float], list[float]]:
    """Per call (ms, microsecond clock of SIPp's message log): INVITE sent -> 180 received,
    INVITE sent -> 200 received. SIPp's own response-time statistics have 1 ms resolution,
    too coarse here."""
    sent: dict[str, float] = {}
    ringing: list[float] = []
    ok: list[float] = []
    for m in parse_message_log(log):
        t = _stamp(m.timestamp)
        cid = m.call_id
        if t is None or cid is None:
            continue
        if m.direction == "sent" and m.method == "INVITE" and m.cseq_method == "INVITE" \
                and cid not in sent:
            sent[cid] = t
        elif m.direction == "received" and m.cseq_method == "INVITE" and cid in sent:
            if m.status == 180 and len(ringing) < len(sent):
                ringing.append(1000 * (t - sent[cid]))
            elif m.status == 200 and "ok:" + cid not in sent:
                ok.append(1000 * (t - sent[cid]))
                sent["ok:" + cid] = t
    return ringing, ok


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


class InterceptBench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.a = args
        self.workdir = workdir
        self.lab = Lab(workdir / "lab")
        self.uas: subprocess.Popen[bytes] | None = None
        self.client: redis.Redis | None = None
        self.kam_pids: list[int] = []
        # the recorder accepts every PUBLISH (without decrypting: it only acknowledges)
        self.recorder = Recorder(respond=200, decrypt=False)

    def up(self) -> None:
        uas_port = free_udp_port("127.0.0.1")
        (self.workdir / "uas").mkdir(parents=True)
        self.uas = subprocess.Popen(
            [sipp_binary(), "-sf", str(SIPP_DIR / "uas_srtp.xml"), "-i", "127.0.0.1",
             "-p", str(uas_port), "-mi", "127.0.0.1", "-mp", str(free_udp_port("127.0.0.1")),
             "-ci", "127.0.0.1", "-cp", str(free_udp_port("127.0.0.1")), "-nostdin",
             *_media(_key(), 2222)],
            cwd=self.workdir / "uas", stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)
        st = self.lab.up(next_hop=f"sip:127.0.0.1:{uas_port}", children=self.a.children)
        self.kam_pids = [st.pids["kamailio"], *_children_of(st.pids["kamailio"])]
        self.client = redis.Redis.from_url(st.redis_url, socket_timeout=10)
        neutralise_scores(self.client)
        rec = make_recipient("bench-recorder")
        host, port = self.recorder.start("127.0.0.1", 0)
        t = Target(liid="BENCH-1", identities=(normalise_identity(TARGET_CALLER),),
                   deliver_to=f"sip:recorder@{host}:{port}", cert_pem=rec.cert_pem,
                   start=time.time() - 1)
        self.client.hset(names.TARGETS, t.liid, t.pack())
        self.client.incr(names.VERSION)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.lab.down()
        self.recorder.stop()
        if self.uas is not None:
            stop_popen(self.uas)
        if self.client is not None:
            self.client.close()

    def round(self, tag: str, caller: str) -> dict[str, Any]:
        assert self.client is not None and self.lab.state is not None
        st = self.lab.state
        wd = self.workdir / tag
        wd.mkdir(parents=True)
        delivered0 = self.recorder.raw_count
        cpu0 = cpu_seconds(self.kam_pids)
        cmd = [sipp_binary(), f"{st.sip_addr}:{st.sip_port}", "-sf",
               str(SIPP_DIR / "uac_srtp.xml"), "-s", "bob", "-i", SOURCE,
               "-p", str(free_udp_port(SOURCE)), "-mi", SOURCE, "-mp", str(free_udp_port(SOURCE)),
               "-ci", SOURCE, "-cp", str(free_udp_port(SOURCE)), "-m", str(self.a.calls),
               "-r", str(self.a.rate), "-d", "0", "-nostdin", "-key", "caller", caller,
               *_media(_key(), 1111), "-timeout", f"{int(self.a.calls / self.a.rate) + 60}s",
               "-trace_msg", "-message_file", "messages.log"]
        out = subprocess.run(cmd, cwd=wd, capture_output=True, timeout=self.a.calls / self.a.rate
                             + 90, check=False)
        time.sleep(0.5)  # the last BYEs' dialog-end events
        cpu1 = cpu_seconds(self.kam_pids)
        ringing, rtts = _latencies(wd / "messages.log")
        time.sleep(1.0)  # the worker delivers the round's last events
        events = self.recorder.raw_count - delivered0
        return {"round": tag, "rc": out.returncode, "calls": len(rtts),
                "ring_p50_ms": round(statistics.median(ringing), 3) if ringing else None,
                "rtt_p50_ms": round(statistics.median(rtts), 3) if rtts else None,
                "rtt_p90_ms": round(_pct(rtts, 0.9), 3),
                "kam_cpu_ms_per_call": round(1000 * (cpu1 - cpu0) / max(len(rtts), 1), 3),
                "events_per_call": round(events / max(len(rtts), 1), 2)}

    def run(self) -> list[dict[str, Any]]:
        self.round("warmup-t", TARGET_CALLER)
        self.round("warmup-p", PLAIN_CALLER)
        rows = []
        for i in range(self.a.rounds):
            order = (("plain", PLAIN_CALLER), ("target", TARGET_CALLER))
            for mode, caller in (order if i % 2 == 0 else order[::-1]):
                r = self.round(f"r{i + 1}-{mode}", caller)
                r["mode"] = mode
                rows.append(r)
                print(f"{r['round']:<10} calls {r['calls']:>5} rc {r['rc']}  "
                      f"INVITE->180 p50 {r['ring_p50_ms']} ms  "
                      f"INVITE->200 p50 {r['rtt_p50_ms']} ms p90 {r['rtt_p90_ms']} ms  "
                      f"kamailio {r['kam_cpu_ms_per_call']} ms/call  "
                      f"events/call {r['events_per_call']}", flush=True)
        return rows


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def med(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in rows if r["mode"] == mode and r[key] is not None)

    out: dict[str, Any] = {}
    for key in ("ring_p50_ms", "rtt_p50_ms", "rtt_p90_ms", "kam_cpu_ms_per_call",
                "events_per_call"):
        p, t = med("plain", key), med("target", key)
        out[key] = {"plain": p, "target": t, "ratio": round(t / p, 3) if p else None}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=400)
    ap.add_argument("--rate", type=float, default=100.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--children", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="spitwall-bench-li-") as tmp:
        bench = InterceptBench(args, Path(tmp))
        try:
            bench.up()
            rows = bench.run()
        finally:
            bench.close()
    summary = summarise(rows)
    print("\nmedians over rounds (target / plain):")
    for key, v in summary.items():
        print(f"  {key:<22} plain {v['plain']:>8}  target {v['target']:>8}  ratio {v['ratio']}")
    if args.json:
        print(json.dumps({"rows": rows, "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
