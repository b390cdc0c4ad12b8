#!/usr/bin/env python3
"""Intercept benchmark: can a target tell by timing that it is a target?

One run starts its own lab (redis-server + Kamailio with ``kamailio.cfg`` + the answering
machine + the delivery worker, loopback, free ports) and a SIPp callee
(``tests/sipp/uas_srtp.xml``: 180 and 200 at once, SDES ``a=crypto`` answer). One intercept case
is provisioned for the target caller; its events go, through the lab's delivery worker, to a
recorder in this process (tests/integration/recorder.py) that acknowledges every PUBLISH
without decrypting, so the whole chain runs as in production.

Two layouts:

* ``mixed`` (default; the issue's question): per round the target and two plain callers place
  ``--calls`` calls each *at the same time*, about ``--rate``/3 calls/s each at random times (4
  simulated SIPp users with exponential pauses; periodic callers would meet the delivery work
  of the target's own calls at a fixed phase), each from its own source address and start
  position, rotated over the rounds. Rounds are the statistical units (calls of one round share
  a source, a SIPp process and the machine's state): per round the target effect (target minus
  the plain callers' mean) and the A/A difference (plain_b minus plain_a, what noise alone
  gives), then their means over rounds with 95 % t-intervals. ``--uniform true,false``
  alternates ``li.uniform`` round by round.
* ``alternate``: rounds of one caller alone, plain and target alternating (order plain/target,
  target/plain, ...), periodic at ``--rate``; adds Kamailio's CPU time per call (what a target's
  call costs the machine).

Latencies: INVITE sent -> 180 and -> 200 received, from the microsecond timestamps of SIPp's
message log and, in the mixed layout when run as root, from the kernel's receive timestamps of
the packets at the proxy's port (bench/wiretime.py: INVITE in -> 180/200 out), which no client's
event loop delays. ``--keep-capture DIR`` keeps that capture and the call labels.

Run: ``.venv/bin/python bench/intercept_latency.py [--rounds 6 --calls 400 --rate 100]
[--uniform true,false] [--layout alternate] [--json]``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import shutil
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
from load import MODE_SWITCH_WAIT, _children_of, cpu_seconds, neutralise_scores  # noqa: E402
from wiretime import read as read_capture  # noqa: E402

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
from scoring import config_admin  # noqa: E402
from tests.integration.recorder import Recorder  # noqa: E402
from tests.intercept_certs import make_recipient  # noqa: E402

SUITE = "AES_CM_128_HMAC_SHA1_80"
SOURCES = ["127.0.3.1", "127.0.3.2", "127.0.3.3"]
TARGET_CALLER = "+15550100001"
PLAIN_CALLER = "+15550100002"
#: the mixed layout's three callers: two plain ones (their difference is the noise) and the target
MIXED = (("plain_a", PLAIN_CALLER), ("plain_b", "+15550100003"), ("target", TARGET_CALLER))
USERS = 4  # simulated users per caller with random arrivals
CALL_MS = 10  # about how long one benchmark call lasts (INVITE to the BYE's 200)


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


def _call_ids(log: Path) -> set[str]:
    return {m.call_id for m in parse_message_log(log) if m.call_id}


def _wire_latencies(capture: Path, proxy: str, calls: dict[str, str]
                    ) -> dict[str, dict[str, list[float]]]:
    """Per caller label, from the kernel's packet timestamps (bench/wiretime.py): INVITE
    arriving at the proxy -> the proxy's 180 and 200 leaving towards the caller (ms)."""
    invite: dict[str, float] = {}
    out: dict[str, dict[str, list[float]]] = {}
    seen: set[tuple[str, int]] = set()
    for pkt in read_capture(capture):
        label = calls.get(pkt.call_id)
        if label is None:
            continue
        if pkt.dst == proxy and pkt.method == "INVITE" and pkt.cseq_method == "INVITE":
            invite.setdefault(pkt.call_id, pkt.t)
        elif pkt.src == proxy and pkt.cseq_method == "INVITE" and pkt.call_id in invite \
                and pkt.status in (180, 200) and not pkt.dst.startswith("127.0.0.1:"):
            key = (pkt.call_id, pkt.status)
            if key in seen:
                continue
            seen.add(key)
            cell = out.setdefault(label, {"ring": [], "ok": []})
            cell["ring" if pkt.status == 180 else "ok"].append(
                1000 * (pkt.t - invite[pkt.call_id]))
    return out


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
        self.sniffer: subprocess.Popen[bytes] | None = None
        self.capture = workdir / "wire.tsv"

    def start_sniffer(self) -> bool:
        """Kernel timestamps of the proxy's packets (bench/wiretime.py); False without root."""
        assert self.lab.state is not None
        self.sniffer = subprocess.Popen(
            [sys.executable, str(BENCH_DIR / "wiretime.py"), "--out", str(self.capture),
             "--port", str(self.lab.state.sip_port)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.sniffer.poll() is None:
            if self.capture.exists() and self.capture.read_text().startswith("ready"):
                return True
            time.sleep(0.05)
        stop_popen(self.sniffer)
        self.sniffer = None
        return False

    def stop_sniffer(self) -> None:
        if self.sniffer is not None:
            stop_popen(self.sniffer)
            self.sniffer = None

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
        self.stop_sniffer()
        if self.uas is not None:
            stop_popen(self.uas)
        if self.client is not None:
            self.client.close()

    def _uac(self, wd: Path, source: str, caller: str, calls: int, rate: float,
             key: str, random_arrivals: bool = False) -> subprocess.Popen[bytes]:
        """One SIPp caller: periodic calls at `rate` (SIPp's -r), or with `random_arrivals`
        about `rate` calls/s at random times (USERS simulated users, each waiting an
        exponentially distributed pause before each call: a Poisson-like stream)."""
        assert self.lab.state is not None
        st = self.lab.state
        wd.mkdir(parents=True)
        if random_arrivals:
            scenario = wd / "uac_srtp_random.xml"
            mean_ms = max(1, round(1000 * USERS / rate - CALL_MS))
            text = (SIPP_DIR / "uac_srtp.xml").read_text(encoding="iso-8859-1")
            first = text.index("<send")
            scenario.write_text(text[:first] + f'<pause distribution="exponential" '
                                f'mean="{mean_ms}"/>\n  ' + text[first:], encoding="iso-8859-1")
            pacing = ["-users", str(USERS)]
        else:
            scenario = SIPP_DIR / "uac_srtp.xml"
            pacing = ["-r", str(rate)]
        cmd = [sipp_binary(), f"{st.sip_addr}:{st.sip_port}", "-sf",
               str(scenario), "-s", "bob", "-i", source,
               "-p", str(free_udp_port(source)), "-mi", source, "-mp", str(free_udp_port(source)),
               "-ci", source, "-cp", str(free_udp_port(source)), "-m", str(calls),
               *pacing, "-d", "0", "-nostdin", "-key", "caller", caller,
               *_media(key, 1111), "-timeout", f"{int(calls / rate) + 60}s",
               "-trace_msg", "-message_file", "messages.log", "-trace_err"]
        return subprocess.Popen(cmd, cwd=wd, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)

    def _wait(self, procs: list[subprocess.Popen[bytes]], calls: int, rate: float) -> list[int]:
        deadline = time.monotonic() + calls / rate + 90
        rcs = []
        for proc in procs:
            try:
                rcs.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                stop_popen(proc)
                rcs.append(-1)
        return rcs

    def round(self, tag: str, caller: str) -> dict[str, Any]:
        """Alternating layout: one caller's calls alone in the round."""
        assert self.client is not None
        wd = self.workdir / tag
        delivered0 = self.recorder.raw_count
        cpu0 = cpu_seconds(self.kam_pids)
        proc = self._uac(wd, SOURCES[0], caller, self.a.calls, self.a.rate, _key())
        rc = self._wait([proc], self.a.calls, self.a.rate)[0]
        time.sleep(0.5)  # the last BYEs' dialog-end events
        cpu1 = cpu_seconds(self.kam_pids)
        ringing, rtts = _latencies(wd / "messages.log")
        time.sleep(1.0)  # the worker delivers the round's last events
        events = self.recorder.raw_count - delivered0
        return {"round": tag, "rc": rc, "calls": len(rtts),
                "ring_p50_ms": round(statistics.median(ringing), 3) if ringing else None,
                "rtt_p50_ms": round(statistics.median(rtts), 3) if rtts else None,
                "rtt_p90_ms": round(_pct(rtts, 0.9), 3),
                "kam_cpu_ms_per_call": round(1000 * (cpu1 - cpu0) / max(len(rtts), 1), 3),
                "events_per_call": round(events / max(len(rtts), 1), 2)}

    def mixed_round(self, index: int, rotation: int) -> dict[str, Any]:
        """Mixed layout: the target's calls and two plain callers' calls at the same time.

        Each caller places its calls at random times (about the mean rate / 3: periodic
        callers would meet the delivery work of the target's own calls at a fixed phase, a
        benchmark artefact) from its own source address and start position (SIPp processes
        are started one after the other); `rotation` (0-2) rotates both over the callers, so
        that over rounds each caller had each of them."""
        delivered0 = self.recorder.raw_count
        rate = self.a.rate / len(MIXED)
        rot = rotation % 3
        sources = SOURCES[rot:] + SOURCES[:rot]
        order = list(range(len(MIXED)))
        order = order[rot:] + order[:rot]
        procs: list[subprocess.Popen[bytes] | None] = [None] * len(MIXED)
        for i in order:
            label, caller = MIXED[i]
            procs[i] = self._uac(self.workdir / f"m{index}-{label}", sources[i], caller,
                                 self.a.calls, rate, _key(), random_arrivals=True)
        rcs = self._wait([p for p in procs if p is not None], self.a.calls, rate)
        time.sleep(1.5)  # the worker delivers the round's last events
        out: dict[str, Any] = {"round": f"m{index}", "rcs": rcs,
                               "events": self.recorder.raw_count - delivered0}
        calls: dict[str, str] = {}
        for label, _caller in MIXED:
            log = self.workdir / f"m{index}-{label}" / "messages.log"
            ringing, ok = _latencies(log)
            out[label] = {"ring": ringing, "ok": ok}
            calls.update(dict.fromkeys(_call_ids(log), label))
        out["calls"] = calls
        return out

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

    def run_mixed(self) -> list[dict[str, Any]]:
        """Rounds of the mixed layout. Each row holds SIPp's latencies per caller and, with
        root, the wire latencies (`row["wire"]`)."""
        self.round("warmup-t", TARGET_CALLER)
        if not self.start_sniffer():
            print("no wire timestamps (bench/wiretime.py needs root): SIPp's clock only",
                  flush=True)
        assert self.client is not None
        rows = []
        uniform = self.a.uniform
        for i in range(self.a.rounds * len(uniform)):
            setting = uniform[i % len(uniform)]
            if len(uniform) > 1 or i == 0:
                config_admin.set_value(self.client, "li.uniform", setting, user="bench")
                time.sleep(MODE_SWITCH_WAIT)
            r = self.mixed_round(i + 1, rotation=i // len(uniform))
            r["setting"] = setting
            rows.append(r)
            cells = "  ".join(
                f"{label} n {len(r[label]['ok'])} 180 p50 {_pct(r[label]['ring'], 0.5):.3f} "
                f"200 p50 {_pct(r[label]['ok'], 0.5):.3f} p90 {_pct(r[label]['ok'], 0.9):.3f}"
                for label, _ in MIXED)
            print(f"{r['round']:<4} li.uniform {setting} rc {r['rcs']} events {r['events']}  "
                  f"{cells}", flush=True)
        if self.sniffer is not None:
            self.stop_sniffer()
            assert self.lab.state is not None
            proxy = f"{self.lab.state.sip_addr}:{self.lab.state.sip_port}"
            for r in rows:
                r["wire"] = _wire_latencies(self.capture, proxy, r["calls"])
            if self.a.keep_capture:
                keep = Path(self.a.keep_capture)
                keep.mkdir(parents=True, exist_ok=True)
                shutil.copy(self.capture, keep / "wire.tsv")
                calls = {cid: f"{lab}@{r['setting']}" for r in rows
                         for cid, lab in r["calls"].items()}
                (keep / "calls.json").write_text(json.dumps({"proxy": proxy, "calls": calls}))
        return rows


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def med(mode: str, key: str) -> float:
        values = [r[key] for r in rows if r["mode"] == mode and r[key] is not None]
        return float(statistics.median(values))

    out: dict[str, Any] = {}
    for key in ("ring_p50_ms", "rtt_p50_ms", "rtt_p90_ms", "kam_cpu_ms_per_call",
                "events_per_call"):
        p, t = med("plain", key), med("target", key)
        out[key] = {"plain": p, "target": t, "ratio": round(t / p, 3) if p else None}
    return out


#: t quantiles (two-sided 95 %) for the round-level intervals, by degrees of freedom
_T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26,
        10: 2.23, 12: 2.18, 15: 2.13, 20: 2.09, 30: 2.04}


def _t95(df: int) -> float:
    if df < 1:
        return float("nan")
    return _T95[max(k for k in _T95 if k <= df)]


def _interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95 % t-interval of per-round values."""
    if len(values) < 2:
        m = values[0] if values else float("nan")
        return m, float("nan"), float("nan")
    m = statistics.fmean(values)
    half = _t95(len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return m, m - half, m + half


STATS = (("180 p50", "ring", 0.5), ("200 p50", "ok", 0.5), ("200 p90", "ok", 0.9),
         ("200 p99", "ok", 0.99))


def summarise_mixed(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Rounds are the units: calls within one round share a source address, a SIPp process and
    the machine's state, so they are not independent (pooling them understates the noise).

    Per round and statistic: the A/A difference plain_b - plain_a (what noise alone gives
    two identical callers at the same time) and the target effect target - mean(plain_a,
    plain_b); over rounds: the mean with its 95 % t-interval, and for A/A also the spread."""
    out: dict[str, Any] = {"rounds": len(rows),
                           "calls": {label: sum(len(r[label]["ok"]) for r in rows)
                                     for label, _ in MIXED}}
    for name, k, q in STATS:
        aa, eff, levels = [], [], []
        for r in rows:
            pa, pb, pt = (_pct(r[label][k], q) for label in ("plain_a", "plain_b", "target"))
            aa.append(pb - pa)
            eff.append(pt - (pa + pb) / 2)
            levels.append((pa + pb) / 2)
        out[name] = {"plain": statistics.fmean(levels), "target_effect": _interval(eff),
                     "aa": _interval(aa),
                     "aa_sd": statistics.stdev(aa) if len(aa) > 1 else float("nan"),
                     "per_round_effect": [round(x, 3) for x in eff],
                     "per_round_aa": [round(x, 3) for x in aa]}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layout", choices=("mixed", "alternate"), default="mixed",
                    help="mixed: target and two plain callers at the same time (can the target "
                         "tell?); alternate: rounds of one caller alone (what a target call "
                         "costs the proxy in CPU)")
    ap.add_argument("--calls", type=int, default=400, help="calls per caller and round")
    ap.add_argument("--rate", type=float, default=100.0, help="calls/s of all callers together")
    ap.add_argument("--rounds", type=int, default=6,
                    help="rounds (mixed: a multiple of 3 gives each caller each rotation)")
    ap.add_argument("--children", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--uniform", type=lambda v: v.split(","), default=["true"],
                    help="mixed layout: li.uniform; 'true,false' alternates round by round")
    ap.add_argument("--keep-capture", metavar="DIR",
                    help="mixed layout: keep the packet capture and the call labels in DIR")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="spitwall-bench-li-") as tmp:
        bench = InterceptBench(args, Path(tmp))
        try:
            bench.up()
            rows = bench.run_mixed() if args.layout == "mixed" else bench.run()
        finally:
            bench.close()
    if args.layout == "mixed":
        summaries: dict[str, Any] = {}
        for setting in args.uniform:
            mine = [r for r in rows if r["setting"] == setting]
            summaries[f"li.uniform {setting}, sipp"] = summarise_mixed(mine)
            if all("wire" in r for r in mine):
                summaries[f"li.uniform {setting}, wire"] = summarise_mixed(
                    [r["wire"] for r in mine])
        for name, mixed in summaries.items():
            clock = ("SIPp's message log (the caller's view)" if name.endswith("sipp") else
                     "kernel timestamps at the proxy's port (INVITE in -> 180/200 out)")
            print(f"\n{name.split(',')[0]}: {clock}; {mixed['rounds']} rounds, calls "
                  f"{mixed['calls']}; ms; mean over rounds [95 % t-interval]:")
            print(f"  {'':<8} {'plain':>7}  {'target - plains':<26} {'A/A: plain_b - plain_a':<26}"
                  " A/A sd")
            for key, _k, _q in STATS:
                v = mixed[key]
                e, aa = v["target_effect"], v["aa"]
                print(f"  {key:<8} {v['plain']:7.3f}  {e[0]:+.3f} [{e[1]:+.3f}, {e[2]:+.3f}]"
                      f"      {aa[0]:+.3f} [{aa[1]:+.3f}, {aa[2]:+.3f}]      {v['aa_sd']:.3f}")
        if args.json:
            print(json.dumps({"summary": summaries}, indent=2))
        return 0
    summary = summarise(rows)
    print("\nmedians over rounds (target / plain):")
    for key, v in summary.items():
        print(f"  {key:<22} plain {v['plain']:>8}  target {v['target']:>8}  ratio {v['ratio']}")
    if args.json:
        print(json.dumps({"rows": rows, "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
