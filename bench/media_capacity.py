#!/usr/bin/env python3
"""Phase-2 capacity benchmark: concurrent diverted calls on the answering machine.

Issue 4 ("Capacity") asks for at least 100 concurrent diverted calls on this 2-core machine
with an RTP send jitter p99 of at most 5 ms and no lost recordings, and for calls beyond a
configured limit to be refused (486/503) and counted. One run does two rounds, each on its own
lab (``ops.lab.Lab``: its own redis-server, Kamailio with ``kamailio.cfg``, and the answering
machine as service ``media``, all on loopback and free ports):

* capacity: every ``weight.*`` 0.001 (so that a burst from one source is not refused as a
  campaign by phase 1), ``divert_threshold 0``, ``reject_threshold 0.99``, ``media.captcha off``,
  ``media.record_seconds 5``; one SIPp UAC (``tests/sipp/uac_rtp.xml``) places ``--calls``
  calls (default 100) all at once (``-l N -m N -r --rate``) through Kamailio, each streaming a
  looping bot message (espeak-ng + sox) until the answering machine hangs up. Measured: calls
  completed (SIPp), the answering machine's RTP send lateness over all packets (p50/p99/max:
  how late each 20 ms packet left after its deadline; from the ``--stats-file`` JSON the
  media server writes), spam-queue entries vs calls (no lost recordings), and the CPU used
  by the media process (% of one core over the round, and CPU seconds per call);
* limit: the media server runs with ``--max-calls --limit`` (default 20) and ``--limit-calls``
  calls (default 40) are offered at once; the final answers the caller gets are counted from
  SIPp's message log (200 vs 486/503), next to the media server's own ``overload_rejects``.

Run it as ``.venv/bin/python bench/media_capacity.py``; ``--json`` prints the summary as JSON.
Every process it starts is stopped by pid, also on Ctrl-C or an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import redis  # noqa: E402

from media.queue import MessageQueue  # noqa: E402
from ops.lab import ExtraService, Lab, LabState  # noqa: E402
from ops.procs import pid_alive  # noqa: E402
from ops.sipp import (  # noqa: E402
    SIPP_DIR,
    free_udp_port,
    parse_message_log,
    sipp_binary,
    stop_popen,
    write_injection,
)
from scoring import config_admin  # noqa: E402
from scoring.config import PARAMS  # noqa: E402

BOT_TEXT = (
    "Congratulations! You have been selected for a free cruise to the Bahamas. "
    "Press one now to claim your prize before this offer expires."
)
CONFIG = {
    "divert_threshold": "0",
    "reject_threshold": "0.99",
    "media.captcha": "off",
    "media.record_seconds": "5",
}
CLK_TCK = os.sysconf("SC_CLK_TCK")
JITTER_TARGET_MS = 5.0


@dataclass
class RoundResult:
    name: str
    offered: int
    max_calls: int
    wall_s: float = 0.0
    sipp_rc: int | None = None
    successful: int = 0
    failed: int = 0
    finals: dict[str, int] = field(default_factory=dict)  # final status seen by the caller
    media_calls: int = 0
    overload_rejects: int = 0
    verdicts: dict[str, int] = field(default_factory=dict)
    queued: int = 0
    queue_failures: int = 0
    spam_entries: int = 0
    packets: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    worst_call_p99_ms: float | None = None
    media_cpu_s: float = 0.0
    media_cpu_pct: float = 0.0
    peak_active: int = 0


class CapacityLab(Lab):
    """A lab whose answering machine writes a stats file and has a call limit."""

    def __init__(self, workdir: Path, max_calls: int) -> None:
        super().__init__(workdir)
        self.max_calls = max_calls
        self.stats_file = workdir / "media-stats.json"

    def _start_extra(self, state: LabState, service: ExtraService) -> None:
        if service.name == "media":
            base = service.argv
            extra = ["--max-calls", str(self.max_calls), "--stats-file", str(self.stats_file)]
            service = dataclasses.replace(service, argv=lambda st: base(st) + extra)
        super()._start_extra(state, service)


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def read_stats(path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data


def bot_wav(workdir: Path) -> Path:
    raw, wav = workdir / "bot.raw.wav", workdir / "bot.wav"
    subprocess.run(["espeak-ng", "-w", str(raw), BOT_TEXT], check=True, capture_output=True)
    subprocess.run(
        ["sox", str(raw), "-r", "8000", "-c", "1", "-e", "u-law", str(wav)],
        check=True,
        capture_output=True,
    )
    return wav


def run_round(name: str, calls: int, max_calls: int, rate: float, wav: Path, base: Path,
              log: Any) -> RoundResult:
    res = RoundResult(name, calls, max_calls)
    wd = base / name
    wd.mkdir(parents=True)
    lab = CapacityLab(wd / "lab", max_calls)
    sipp: subprocess.Popen[bytes] | None = None
    try:
        log(f"[{name}] starting lab (media --max-calls {max_calls})")
        state = lab.up()
        client = redis.Redis.from_url(state.redis_url)
        # 100 calls in a second from one source look like a campaign to phase 1 (603): every
        # check gets a tiny weight (as in bench/load.py), so all calls are diverted, none refused
        for key in sorted(k for k in PARAMS if k.startswith("weight.")):
            config_admin.set_value(client, key, "0.001", user="bench")
        for key, value in CONFIG.items():
            config_admin.set_value(client, key, value, user="bench")
        time.sleep(2.5)  # the media server reloads its config every 2 s (and on each call)
        media_pid = state.pids["media"]
        xml = (SIPP_DIR / "uac_rtp.xml").read_text()
        scenario = wd / "uac_rtp.xml"
        scenario.write_text(xml.replace("@WAV@", str(wav)).replace("@LOOP@", "-1"))
        rows = [(f"bot{i}", "15551230000", "Bench", "spitwall-bench/1") for i in range(calls)]
        inf = write_injection(wd / "calls.csv", rows)
        src = "127.0.31.1"
        cmd = [
            sipp_binary(), f"{state.sip_addr}:{state.sip_port}",
            "-sf", str(scenario), "-inf", str(inf),
            "-i", src, "-p", str(free_udp_port(src)),
            "-mi", src, "-mp", str(free_udp_port(src, also_plus=(2,))),
            "-m", str(calls), "-l", str(calls), "-r", f"{rate:g}", "-rp", "1000",
            "-nostdin", "-timeout", "120s", "-timeout_error",
            "-trace_stat", "-stf", str(wd / "stat.csv"),
            "-trace_msg", "-message_file", str(wd / "messages.log"),
        ]  # fmt: skip
        cpu0, t0 = cpu_seconds(media_pid), time.monotonic()
        log(f"[{name}] {calls} calls at {rate:g}/s")
        with (wd / "sipp.out").open("wb") as out:
            sipp = subprocess.Popen(cmd, cwd=wd, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        while sipp.poll() is None and time.monotonic() - t0 < 150:
            st = read_stats(lab.stats_file)
            res.peak_active = max(res.peak_active, int(st.get("active_calls", 0)))
            time.sleep(0.25)
        if sipp.poll() is None:
            log(f"[{name}] sipp did not finish in time: stopping it")
        stop_popen(sipp)
        res.sipp_rc = sipp.returncode
        # let the answering machine finish storing (the BYE goes out after the store)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            st = read_stats(lab.stats_file)
            if st and int(st.get("active_calls", 1)) == 0:
                break
            time.sleep(0.25)
        res.wall_s = time.monotonic() - t0
        res.media_cpu_s = cpu_seconds(media_pid) - cpu0
        res.media_cpu_pct = 100.0 * res.media_cpu_s / res.wall_s
        os.kill(media_pid, signal.SIGUSR1)
        time.sleep(0.5)
        st = read_stats(lab.stats_file)
        sip, lat = st.get("sip", {}), st.get("send_lateness", {})
        res.media_calls = int(st.get("calls", 0))
        res.overload_rejects = int(sip.get("overload_rejects", 0))
        res.verdicts = dict(st.get("verdicts", {}))
        res.queued = int(st.get("queued", 0))
        res.queue_failures = int(st.get("queue_failures", 0))
        res.packets = int(lat.get("packets", 0))
        res.p50_ms, res.p99_ms = lat.get("p50_ms"), lat.get("p99_ms")
        res.max_ms = lat.get("max_ms")
        per_call = [c["p99_ms"] for c in lat.get("per_call", [])]
        res.worst_call_p99_ms = max(per_call) if per_call else None
        mq = MessageQueue(client, wd / "lab" / "queue")
        res.spam_entries = sum(1 for _ in mq.list("spam", limit=10 * calls + 10))
        finals: Counter[str] = Counter()
        for cid, status in final_statuses(wd / "messages.log").items():
            del cid
            finals[str(status) if status is not None else "none"] += 1
        res.finals = dict(sorted(finals.items()))
        stats = read_sipp_stat(wd / "stat.csv")
        res.successful = int(stats.get("SuccessfulCall(C)", 0) or 0)
        res.failed = int(stats.get("FailedCall(C)", 0) or 0)
        if not pid_alive(media_pid):
            log(f"[{name}] the media server died (see {wd / 'lab' / 'media.log'})")
    finally:
        if sipp is not None:
            stop_popen(sipp)
        lab.down()
    return res


def final_statuses(path: Path) -> dict[str, int | None]:
    """Call-ID -> final status of the INVITE, as the caller received it."""
    out: dict[str, int | None] = {}
    if not path.exists():
        return out
    for msg in parse_message_log(path):
        cid = msg.call_id
        if cid is None:
            continue
        out.setdefault(cid, None)
        status = msg.status
        if msg.is_response and msg.cseq_method == "INVITE" and status and status >= 200:
            out[cid] = status
    return out


def read_sipp_stat(path: Path) -> dict[str, str]:
    try:
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    except OSError:
        return {}
    if len(lines) < 2:
        return {}
    head, last = lines[0].split(";"), lines[-1].split(";")
    return dict(zip(head, last, strict=False))


def render(rounds: Sequence[RoundResult]) -> str:
    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    lines = [
        f"{'round':<9}{'offered':>8}{'limit':>6}{'ok':>5}{'fail':>5}  {'finals':<22}"
        f"{'peak':>5}{'queued':>7}{'spam':>5}{'lost':>5}{'pkts':>8}{'p50ms':>7}{'p99ms':>7}"
        f"{'maxms':>7}{'cpu%':>6}{'cpu/call':>9}{'wall':>6}",
    ]
    for r in rounds:
        finals = ",".join(f"{k}:{v}" for k, v in r.finals.items())
        answered = r.finals.get("200", 0)
        lost = answered - r.queued - r.queue_failures
        per_call = r.media_cpu_s / max(1, answered)
        lines.append(
            f"{r.name:<9}{r.offered:>8}{r.max_calls:>6}{r.successful:>5}{r.failed:>5}  "
            f"{finals:<22}{r.peak_active:>5}{r.queued:>7}{r.spam_entries:>5}{lost:>5}"
            f"{r.packets:>8}{f(r.p50_ms):>7}{f(r.p99_ms):>7}{f(r.max_ms):>7}"
            f"{r.media_cpu_pct:>6.0f}{per_call * 1000:>7.0f}ms{r.wall_s:>6.0f}"
        )
    return "\n".join(lines)


def verdicts(rounds: Sequence[RoundResult]) -> list[str]:
    cap, lim = rounds[0], rounds[1] if len(rounds) > 1 else None
    out = [
        f"capacity: {cap.finals.get('200', 0)}/{cap.offered} answered, {cap.successful} "
        f"completed, peak {cap.peak_active} concurrent on the media server",
        f"send lateness p99 {f2(cap.p99_ms)} ms (target <= {JITTER_TARGET_MS:g}): "
        f"{'PASS' if cap.p99_ms is not None and cap.p99_ms <= JITTER_TARGET_MS else 'FAIL'}",
        f"recordings: {cap.queued} queued, {cap.queue_failures} queue failures, "
        f"{cap.spam_entries} spam entries for {cap.finals.get('200', 0)} answered calls: "
        f"{'PASS' if cap.spam_entries >= cap.finals.get('200', 0) > 0 else 'FAIL'}",
    ]
    if lim is not None:
        refused = lim.finals.get("486", 0) + lim.finals.get("503", 0)
        out.append(
            f"limit {lim.max_calls}: {lim.finals.get('200', 0)} answered, {refused} refused "
            f"(486/503) of {lim.offered}; media server counted {lim.overload_rejects} "
            f"overload rejects"
        )
    return out


def f2(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    p.add_argument("--calls", type=int, default=100, help="concurrent calls (default 100)")
    p.add_argument("--rate", type=float, default=50.0, help="new calls per second (default 50)")
    p.add_argument("--max-calls", type=int, default=150,
                   help="media --max-calls in the capacity round (default 150)")
    p.add_argument("--limit", type=int, default=20, help="media --max-calls in the limit round")
    p.add_argument("--limit-calls", type=int, default=40, help="calls offered in the limit round")
    p.add_argument("--no-limit", action="store_true", help="skip the limit round")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    base = Path(tempfile.mkdtemp(prefix="spitwall-media-cap-"))
    rounds: list[RoundResult] = []
    try:
        wav = bot_wav(base)
        rounds.append(run_round("capacity", args.calls, args.max_calls, args.rate, wav, base, log))
        if not args.no_limit:
            rounds.append(run_round("limit", args.limit_calls, args.limit, 100.0, wav, base, log))
    finally:
        if not args.keep:
            subprocess.run(["rm", "-rf", str(base)], check=False)
        else:
            log(f"work directory kept: {base}")
    if args.json:
        print(json.dumps({"rounds": [asdict(r) for r in rounds], "notes": verdicts(rounds)},
                         indent=2))
    else:
        print(render(rounds))
        print()
        print("\n".join(verdicts(rounds)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
