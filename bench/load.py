#!/usr/bin/env python3
"""Phase-1 load benchmark: calls per second through the proxy, scoring off vs on, side by side.

One run starts its own lab (redis-server + Kamailio with ``kamailio.cfg``, on loopback and free
ports), a SIPp UAS as the next hop (``tests/sipp/uas.xml``: 180, 200 ms of ringing, 200, ACK,
BYE) and, per round, one SIPp UAC (``tests/sipp/uac.xml``) per source address (127.0.2.1,
127.0.2.2, ...). Rounds alternate between ``enabled=false`` (the kill switch) and
``enabled=true`` (full scoring) in the order off/on, on/off, off/on, ... so that slow drift of
the machine hits both modes alike.

Per round it measures:

* completed calls per second: calls SIPp completed / wall time of the round. The UACs run closed
  loop (``-l``: at most ``--concurrency-off``/``--concurrency-on`` calls in flight, a new call as
  soon as one ends) with a target rate (``--rate``) far above what the proxy sustains, so the
  CPUs, not the offered load, are the limit (the ``busy`` column shows it; the SIPp processes
  share the same CPUs). Each call rings 200 ms at the UAS, so a mode saturates once its calls in
  flight exceed ~0.2 s x its capacity; the rest queue in Kamailio's socket. That queue must stay
  well under 500 ms (SIP T1), or tm retransmits INVITEs to the UAS, whose scenario aborts such
  calls: hence fewer calls in flight with scoring on (capacity ~1,500/s here, 500 in flight =
  ~0.15 s of queue) than off (~4,000/s, 1,200 in flight);
* CPU time per call of every Kamailio process (the main pid and its children, from
  /proc/<pid>/stat), of redis-server and of the SIPp processes: on a noisy, shared machine the
  Kamailio CPU time per call is the more robust capacity measure;
* Redis work per INVITE: deltas of ``INFO commandstats`` (per command, the ones the store sends
  and the ones the Lua scripts run) and of ``INFO stats`` (socket reads, reply writes) divided
  by the INVITEs sent (one per call).

Setup, once, before the rounds (all through the normal interfaces):

* every check's weight is set to 0.001 with ``config set`` (``weight.*``), so the benchmark
  traffic takes the full scoring path (every check runs, against Redis where it needs it) and
  is relayed: 1,000 calls/s from 4 addresses would otherwise be rejected as a campaign.
  Nothing is allow-listed;
* the distinct-caller/-callee HyperLogLogs of each source IP are pre-filled (current and
  previous window), the steady state of a busy source (see ``prefill_sources``);
* Kamailio gets a larger shared memory pool and UDP receive buffer, SIPp larger buffers and no
  UDP retransmissions (see ``BenchLab`` and ``--retrans``): with 1,000 calls in flight the
  defaults measure packet loss and SIP timers, not the proxy.

Run it as ``.venv/bin/python bench/load.py`` (``make bench``); ``--json`` prints a summary as
JSON. Every process it starts is stopped by its pid, also on Ctrl-C, SIGTERM or an error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import redis  # noqa: E402

from ops.lab import Lab, LabError, LabState  # noqa: E402
from ops.sipp import (  # noqa: E402
    UAC_SCENARIO,
    UasProcess,
    free_udp_port,
    sipp_binary,
    start_uas,
    stop_popen,
    write_injection,
)
from scoring import config_admin, keys, redisconn  # noqa: E402
from scoring.config import PARAMS  # noqa: E402
from tests.redis_cluster import ClusterSet  # noqa: E402

#: The weight every check gets for the benchmark: small enough that the sum of all checks stays
#: far below the divert threshold (calls are relayed), not zero, so that no check can be skipped
#: as weightless: every check still runs, against Redis where it needs Redis.
BENCH_WEIGHT = "0.001"

#: Commands the store sends itself on the request path (the rest of commandstats comes from
#: inside observe.lua / record.lua, or from config reloads).
CLIENT_COMMANDS = ("evalsha", "mget", "hincrby", "set")  # set: the callee's last caller
#: Commands the Lua scripts run (Redis 7 counts them in commandstats too), read from the scripts.
SCRIPT_COMMANDS = frozenset(
    name.lower()
    for path in sorted((REPO_ROOT / "scoring" / "lua").glob("*.lua"))
    for name in re.findall(r"redis\.call\(\s*['\"](\w+)['\"]", path.read_text())
)

USER_AGENT = "spitwall-bench/1"
RCVBUF = 4 * 1024 * 1024  # the kernel caps it at net.core.rmem_max anyway
PREFILL = 5000  # members per HyperLogLog: far past the sparse -> dense conversion
MODE_SWITCH_WAIT = 1.2  # > the kill switch's config poll interval (1 s per child)
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------------------ data


@dataclass
class RoundResult:
    """One measured round (one mode, ``calls`` calls)."""

    index: int
    mode: str  # "off" (enabled=false) or "on" (enabled=true)
    calls: int
    successful: int
    failed: int
    wall_s: float
    cps: float
    kamailio_cpu_ms_per_call: float
    redis_cpu_ms_per_call: float
    kamailio_cpu_util: float  # Kamailio CPU seconds per wall second (2.0 = two full cores)
    sipp_cpu_ms_per_call: float  # the UACs and the UAS together
    machine_busy: float  # fraction of all CPUs busy during the round (every process)
    others_cores: float  # CPUs used by processes not ours (other work on the machine: noise)
    invites: int  # INVITEs the UACs sent (one per call; retransmissions are absorbed by tm)
    invites_scored: int  # decisions the store recorded (0 with enabled=false: nothing recorded)
    actions: dict[str, int]
    commands: dict[str, int]  # commandstats deltas (our own INFO excluded)
    redis_reads: int  # socket reads Redis did (total_reads_processed delta, own INFO excluded)
    redis_writes: int  # reply writes (total_writes_processed delta, own INFO excluded)
    retransmissions: int  # SIP retransmissions the UACs sent (sipp Retransmissions(C))
    call_length_ms: float  # mean INVITE-to-BYE-200 time per call (sipp CallLength(C))
    sipp_rc: list[int | None] = field(default_factory=list)

    def per_invite(self, name: str) -> float:
        return self.commands.get(name, 0) / self.invites if self.invites else 0.0


@dataclass
class Settings:
    calls: int
    rounds: int
    rate: float
    concurrency_off: int
    concurrency_on: int
    sources: int
    children: int
    warmup: int
    timeout: float
    shm_mb: int
    rcvbuf: int
    retrans: bool
    mem: str = ""  # Kamailio's memory manager (-x): qm, fm, tlsf; "" = the lab's (tlsf)
    cluster: int = 0  # >0: a Redis Cluster of that many masters instead of one redis-server
    config: tuple[tuple[str, str], ...] = ()  # --set KEY=VALUE, applied after the weights
    dialog_store: str = "text"  # the lab's dialog store: text (db_text) or redis (db_redis)
    hold_ms: int = 0  # the answered call lasts this long before the BYE


# ------------------------------------------------------------------------------------ /proc


def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(ppid, utime + stime in clock ticks) of ``pid``, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = text[text.rindex(")") + 2 :].split()
    # fields[0] is state (field 3); ppid is field 4, utime 14, stime 15 (1-based, man proc).
    return int(fields[1]), int(fields[11]) + int(fields[12])


def _children_of(pid: int) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat is not None and stat[0] == pid:
                found.append(int(entry.name))
    return found


def cpu_seconds(pids: Sequence[int]) -> float:
    total = 0
    for pid in pids:
        stat = _proc_stat(pid)
        if stat is not None:
            total += stat[1]
    return total / CLK_TCK


def machine_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already in user
    return total - idle, total


def children_cpu_seconds() -> float:
    """CPU time of our reaped children (the SIPp UACs)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


# ------------------------------------------------------------------------------------ redis


def redis_snapshot(
    client: redis.Redis, nodes: Sequence[redis.Redis] = ()
) -> tuple[dict[str, int], int, int, dict[str, int]]:
    """(commandstats calls per command, reads, writes, decision counters), summed over
    ``nodes`` (the masters of a cluster; default: ``client``'s one server).

    Commands of our own: HGETALL, then INFO on every node. Between two snapshots, Redis
    therefore counts `own_reads` reads (the second snapshot's HGETALL and INFOs), as many reply
    writes (the first INFOs' replies and the second HGETALL's; the second INFOs' replies are
    written after INFO ran), one HGETALL and an INFO per node: the callers subtract them.
    """
    raw = client.hgetall(keys.STATS)
    counters = {_s(k): int(v) for k, v in raw.items()}
    commands: dict[str, int] = {}
    reads = writes = 0
    for node in nodes or [client]:
        info: dict[str, Any] = node.info("commandstats", "stats")
        for name, value in info.items():
            if name.startswith("cmdstat_") and isinstance(value, dict):
                key = name[len("cmdstat_") :]
                commands[key] = commands.get(key, 0) + int(value.get("calls", 0))
        reads += int(info.get("total_reads_processed", 0))
        writes += int(info.get("total_writes_processed", 0))
    return commands, reads, writes, counters


def own_traffic(n_nodes: int) -> tuple[dict[str, int], int]:
    """What two `redis_snapshot`s over ``n_nodes`` add between them: commands, and reads (=
    reply writes)."""
    return {"info": n_nodes, "hgetall": 1}, n_nodes + 1


def _s(x: Any) -> str:
    return x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def neutralise_scores(client: redis.Redis) -> list[str]:
    """Give every check (every ``weight.*`` knob the config has) a tiny weight: all checks run,
    the total stays far below the divert threshold, the calls are relayed. Returns the keys."""
    names = sorted(k for k in PARAMS if k.startswith("weight."))
    for name in names:
        config_admin.set_value(client, name, BENCH_WEIGHT, user="bench")
    return names


def prefill_sources(client: redis.Redis, sources: Sequence[str], members: int = PREFILL) -> None:
    """Put every source IP in the steady state of a busy source before the first round: the
    distinct-caller and distinct-callee HyperLogLogs of the current *and* the previous window
    exist and are dense. Otherwise the first rounds run on small, sparse sketches and a missing
    previous window (observe.lua's two-key PFCOUNT is much cheaper then), and Redis' cost per
    INVITE drifts upwards during the run, or jumps when a window boundary passes."""
    dw = int(config_admin.show(client)[0]["distinct.window"])
    now = time.time()
    pipe = client.pipeline(transaction=False)
    for src in sources:
        hlls = keys.source_keys(keys.tag("ip", src), dw, now)[:4]
        for key in hlls:
            for start in range(0, members, 1000):
                pipe.pfadd(key, *(f"prefill-{start + i}" for i in range(1000)))
            pipe.expire(key, 2 * dw)
    pipe.execute()


# ------------------------------------------------------------------------------------ sipp


class UacFleet:
    """The SIPp UACs of one round, one per source address; stopped by pid in ``stop``."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(
        self,
        workdir: Path,
        target: tuple[str, int],
        sources: Sequence[str],
        calls: int,
        rate: float,
        concurrency: int,
        timeout: float,
        rcvbuf: int = 0,
        no_retrans: bool = False,
        hold_ms: int = 0,
        recv_timeout_ms: int = 10_000,
    ) -> list[Path]:
        """Start one sipp per source with its share of calls/rate/concurrency; return the
        paths of their statistics files."""
        stat_files: list[Path] = []
        rng = random.Random()
        n = len(sources)
        for i, src in enumerate(sources):
            share = calls // n + (1 if i < calls % n else 0)
            if share == 0:
                continue
            wd = workdir / f"uac{i}"
            wd.mkdir(parents=True, exist_ok=True)
            # Many distinct callers and callees, random (so no sequential-callee runs).
            rows = [
                (f"+1{rng.randrange(10**9, 10**10)}", f"{rng.randrange(10**9, 10**10)}",
                 "Bench", USER_AGENT)
                for _ in range(share)
            ]  # fmt: skip
            inf = write_injection(wd / "calls.csv", rows)
            stat = wd / "stat.csv"
            cmd = [
                sipp_binary(), f"{target[0]}:{target[1]}",
                "-sf", str(UAC_SCENARIO), "-inf", str(inf),
                "-i", src, "-p", str(free_udp_port(src)),
                "-mi", src, "-mp", str(free_udp_port(src, also_plus=(2,))),
                "-ci", src, "-cp", str(free_udp_port(src)),
                "-m", str(share),
                "-r", f"{max(rate / n, 1):g}", "-rp", "1000",
                "-l", str(max(concurrency // n, 1)),
                "-d", str(hold_ms),
                "-recv_timeout", str(recv_timeout_ms),
                "-timeout", f"{max(1, int(timeout))}s",
                "-nostdin",
                "-trace_stat", "-stf", str(stat),
                "-trace_err", "-error_file", str(wd / "errors.log"),
            ]  # fmt: skip
            if rcvbuf:
                cmd += ["-buff_size", str(rcvbuf)]
            if no_retrans:
                cmd.append("-nr")
            with (wd / "out.txt").open("wb") as out:
                proc = subprocess.Popen(
                    cmd, cwd=wd, stdin=subprocess.DEVNULL, stdout=out,
                    stderr=subprocess.STDOUT, start_new_session=True,
                )  # fmt: skip
            self.procs.append(proc)
            stat_files.append(stat)
        return stat_files

    def wait(self, timeout: float) -> list[int | None]:
        deadline = time.monotonic() + timeout
        codes: list[int | None] = []
        for proc in self.procs:
            try:
                codes.append(proc.wait(timeout=max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                codes.append(None)
        return codes

    def stop(self) -> None:
        for proc in self.procs:
            stop_popen(proc)
        self.procs = []


def read_sipp_stats(path: Path) -> dict[str, str]:
    """The last line of a sipp -trace_stat CSV, by column name."""
    if not path.exists():
        return {}
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    if len(lines) < 2:
        return {}
    header, last = lines[0].split(";"), lines[-1].split(";")
    return dict(zip(header, last, strict=False))


def _stat_int(stats: dict[str, str], column: str) -> int:
    value = stats.get(column, "")
    return int(value) if value.isdigit() else 0


def _stat_ms(stats: dict[str, str], column: str) -> float:
    """A sipp duration column, ``HH:MM:SS:uuuuuu``, in milliseconds (0.0 if absent)."""
    parts = stats.get(column, "").split(":")
    if len(parts) != 4 or not all(p.isdigit() for p in parts):
        return 0.0
    h, m, sec, usec = (int(p) for p in parts)
    return (h * 3600 + m * 60 + sec) * 1000 + usec / 1000


# ------------------------------------------------------------------------------------ bench


#: the benchmark's few sources send thousands of requests per second each, as a peering trunk
#: would: far above kamailio.cfg's per-source flood limit. The flood check still runs for
#: every request (its cost is measured), it just never fires.
FLOOD_DENSITY = 1_000_000


class BenchLab(Lab):
    """The project's lab with two start-time sizes raised for a saturation test (both are
    command-line options of Kamailio; ``kamailio.cfg`` and the lab leave them at the defaults):

    * shared memory (``-m``, default 64 MB): every transaction stays in shared memory for tm's
      wait timer (5 s) after it completes, so at ~1,500 calls/s (an INVITE and a BYE
      transaction per call) the default pool runs out ("could not allocate shared memory from
      shm pool", 500 replies) and throughput collapses into SIP timeouts;
    * the UDP receive buffer (``-b``, Kamailio probes up to 512 KB by default): the closed-loop
      load keeps hundreds of calls in flight, and when the children are slower than the
      arrivals the backlog must queue in the socket instead of being dropped and retransmitted
      500 ms later (which measures SIP timers, not the proxy).
    """

    def __init__(self, workdir: Path, shm_mb: int, rcvbuf: int, mem: str = "") -> None:
        super().__init__(workdir)
        self.shm_mb = shm_mb
        self.rcvbuf = rcvbuf
        if mem:
            self.mem_manager = mem

    def kamailio_argv(self, state: LabState) -> list[str]:
        argv = super().kamailio_argv(state)
        if self.shm_mb:
            argv += ["-m", str(self.shm_mb)]
        if self.rcvbuf:
            argv += ["-b", str(self.rcvbuf)]
        return argv


class Bench:
    """Owns every process of one benchmark run; ``close`` stops them all by pid."""

    def __init__(self, settings: Settings, workdir: Path, log: Any) -> None:
        self.s = settings
        self.workdir = workdir
        self.log = log
        self.lab = BenchLab(workdir / "lab", settings.shm_mb, settings.rcvbuf, settings.mem)
        self.lab_state: LabState | None = None
        self.uas: UasProcess | None = None
        self.fleet: UacFleet | None = None
        self.client: redis.Redis | None = None
        self.kamailio_pids: list[int] = []
        self.redis_pids: list[int] = []
        self.redis_nodes: list[redis.Redis] = []  # the masters whose INFO we sum
        self.cluster: ClusterSet | None = None
        self.sources = [f"127.0.2.{i + 1}" for i in range(settings.sources)]

    # -- lifecycle ----------------------------------------------------------------------
    def up(self) -> None:
        extra = ["-buff_size", str(self.s.rcvbuf)] if self.s.rcvbuf else []
        if not self.s.retrans:
            extra.append("-nr")
        self.uas = start_uas(
            "127.0.0.1", trace_msg=False, workdir=self.workdir / "uas", extra_args=extra
        )
        self.log(f"next hop: sipp UAS pid {self.uas.pid} on {self.uas.address}")
        if self.s.cluster:
            self.cluster = ClusterSet(self.workdir / "cluster", masters=self.s.cluster)
            self.cluster.start()
            self.lab_state = self.lab.up(next_hop=self.uas.uri, children=self.s.children,
                                         redis_url=self.cluster.url,
                                         dialog_store=self.s.dialog_store,
                                         flood_density=FLOOD_DENSITY)
            self.redis_pids = list(self.cluster.pids.values())
            self.redis_nodes = [self.cluster.node(p) for p in self.cluster.running()]
            where = f"Redis Cluster of {self.s.cluster} masters, pids {self.redis_pids}"
        else:
            self.lab_state = self.lab.up(next_hop=self.uas.uri, children=self.s.children,
                                         dialog_store=self.s.dialog_store,
                                         flood_density=FLOOD_DENSITY)
            self.redis_pids = [self.lab_state.pids["redis"]]
            where = f"redis-server pid {self.redis_pids[0]}"
        if "dialog-redis" in self.lab_state.pids:  # its CPU counts in the Redis columns
            self.redis_pids.append(self.lab_state.pids["dialog-redis"])
            where += f", dialog redis-server pid {self.lab_state.pids['dialog-redis']}"
        st = self.lab_state
        self.log(
            f"lab: kamailio pid {st.pids['kamailio']} on {st.sip_addr}:{st.sip_port}, "
            f"{st.children} children; {where} {st.redis_url}"
        )
        main_pid = st.pids["kamailio"]
        self.kamailio_pids = [main_pid, *_children_of(main_pid)]
        self.client = redisconn.client(st.redis_url, socket_timeout=10)
        weights = neutralise_scores(self.client)
        self.log(f"config: {', '.join(weights)} = {BENCH_WEIGHT} (every check runs, calls relay)")
        for key, value in self.s.config:
            config_admin.set_value(self.client, key, value, user="bench")
            self.log(f"config: {key} = {value} (--set)")
        prefill_sources(self.client, self.sources)

    def close(self) -> None:
        if self.fleet is not None:
            self.fleet.stop()
            self.fleet = None
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.close()
        try:
            self.lab.down()
        except LabError as exc:
            print(f"bench: lab down: {exc}", file=sys.stderr)
        if self.uas is not None:
            self.uas.close()
            self.uas = None
        for node in self.redis_nodes:
            with contextlib.suppress(Exception):
                node.close()
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None

    # -- rounds -------------------------------------------------------------------------
    def set_mode(self, mode: str) -> None:
        assert self.client is not None
        config_admin.set_value(
            self.client, "enabled", "true" if mode == "on" else "false", user="bench"
        )

    def run_calls(
        self, tag: str, calls: int, mode: str
    ) -> tuple[float, list[dict[str, str]], list[int | None]]:
        """Place ``calls`` calls; return (wall seconds, sipp stats per UAC, exit codes)."""
        concurrency = self.s.concurrency_on if mode == "on" else self.s.concurrency_off
        assert self.lab_state is not None
        fleet = UacFleet()
        self.fleet = fleet
        try:
            start = time.monotonic()
            stat_files = fleet.start(
                self.workdir / tag, (self.lab_state.sip_addr, self.lab_state.sip_port),
                self.sources, calls, self.s.rate, concurrency, self.s.timeout,
                self.s.rcvbuf, not self.s.retrans, self.s.hold_ms,
            )  # fmt: skip
            codes = fleet.wait(self.s.timeout + 10)
            wall = time.monotonic() - start
        finally:
            fleet.stop()
            self.fleet = None
        return wall, [read_sipp_stats(p) for p in stat_files], codes

    def measure_round(self, index: int, mode: str) -> RoundResult:
        assert self.client is not None and self.redis_pids
        self.set_mode(mode)
        # A child learns about a new config version from its next INVITE's reply, or, while
        # the kill switch is on, from a version poll at most once a second on its next INVITE
        # (scoring/service.py). Wait past that second, then warm up with unmeasured calls so
        # that every child reloads the config (one extra round trip) outside the measurement.
        time.sleep(MODE_SWITCH_WAIT)
        if self.s.warmup:
            self.run_calls(f"r{index}-warmup", self.s.warmup, mode)
        time.sleep(0.3)
        cmd0, reads0, writes0, counters0 = redis_snapshot(self.client, self.redis_nodes)
        assert self.uas is not None
        busy0, total0 = machine_ticks()
        sipp0 = children_cpu_seconds() + cpu_seconds([self.uas.pid])
        kam0, red0 = cpu_seconds(self.kamailio_pids), cpu_seconds(self.redis_pids)
        wall, stats, codes = self.run_calls(f"r{index}-{mode}", self.s.calls, mode)
        kam1, red1 = cpu_seconds(self.kamailio_pids), cpu_seconds(self.redis_pids)
        sipp1 = children_cpu_seconds() + cpu_seconds([self.uas.pid])
        busy1, total1 = machine_ticks()
        ours = (kam1 - kam0) + (red1 - red0) + (sipp1 - sipp0)
        others = (busy1 - busy0) / CLK_TCK - ours
        time.sleep(0.3)  # deferred writes of the last calls reach Redis
        cmd1, reads1, writes1, counters1 = redis_snapshot(self.client, self.redis_nodes)
        own_commands, own_io = own_traffic(len(self.redis_nodes) or 1)
        ok = sum(_stat_int(st, "SuccessfulCall(C)") for st in stats)
        failed = sum(_stat_int(st, "FailedCall(C)") for st in stats)
        counters = _delta(counters1, counters0)
        actions = {k.split(":", 1)[1]: v for k, v in counters.items() if k.startswith("action:")}
        commands = _delta(cmd1, cmd0)
        for name, own in own_commands.items():
            commands[name] = commands.get(name, 0) - own
        commands = {k: v for k, v in commands.items() if v}
        done = max(ok, 1)
        length = (
            sum(_stat_ms(st, "CallLength(C)") * _stat_int(st, "SuccessfulCall(C)") for st in stats)
            / done
        )
        return RoundResult(
            index=index, mode=mode, calls=self.s.calls, successful=ok, failed=failed,
            wall_s=round(wall, 3), cps=round(ok / wall, 1) if wall > 0 else 0.0,
            kamailio_cpu_ms_per_call=round(1000 * (kam1 - kam0) / done, 3),
            redis_cpu_ms_per_call=round(1000 * (red1 - red0) / done, 3),
            kamailio_cpu_util=round((kam1 - kam0) / wall, 2) if wall > 0 else 0.0,
            sipp_cpu_ms_per_call=round(1000 * (sipp1 - sipp0) / done, 3),
            machine_busy=round((busy1 - busy0) / max(total1 - total0, 1), 3),
            others_cores=round(max(0.0, others) / wall, 2) if wall > 0 else 0.0,
            invites=ok + failed, invites_scored=sum(actions.values()), actions=actions,
            commands=commands,
            redis_reads=reads1 - reads0 - own_io, redis_writes=writes1 - writes0 - own_io,
            retransmissions=sum(_stat_int(st, "Retransmissions(C)") for st in stats),
            call_length_ms=round(length, 1), sipp_rc=codes,
        )  # fmt: skip

    def run(self) -> list[RoundResult]:
        results: list[RoundResult] = []
        # Warm the whole path (scripts loaded, Python imports done, config read) first.
        self.set_mode("on")
        self.run_calls("warmup", max(self.s.warmup, 200), "on")
        index = 0
        for pair in range(self.s.rounds):
            order = ("off", "on") if pair % 2 == 0 else ("on", "off")
            for mode in order:
                index += 1
                r = self.measure_round(index, mode)
                results.append(r)
                self.log(_row(r))
        return results


# ------------------------------------------------------------------------------------ report


HEADER = (
    f"{'round':>5} {'mode':<4} {'calls':>6} {'fail':>4} {'retr':>4} {'wall s':>6} "
    f"{'calls/s':>7} {'call ms':>7} {'kam ms/call':>11} {'kam cores':>9} {'redis ms/call':>13} "
    f"{'sipp ms/call':>12} {'busy':>4} {'others':>6} {'evalsha/INV':>11} {'reads/INV':>9}"
)


def _row(r: RoundResult) -> str:
    inv = r.invites or 1
    evalsha = r.commands.get("evalsha", 0) / inv
    return (
        f"{r.index:>5} {r.mode:<4} {r.calls:>6} {r.failed:>4} {r.retransmissions:>4} "
        f"{r.wall_s:>6.2f} {r.cps:>7.0f} {r.call_length_ms:>7.0f} "
        f"{r.kamailio_cpu_ms_per_call:>11.3f} {r.kamailio_cpu_util:>9.2f} "
        f"{r.redis_cpu_ms_per_call:>13.3f} {r.sipp_cpu_ms_per_call:>12.3f} "
        f"{r.machine_busy:>4.0%} {r.others_cores:>6.2f} {evalsha:>11.2f} "
        f"{r.redis_reads / inv:>9.2f}"
    )


def summarise(results: Sequence[RoundResult], settings: Settings) -> dict[str, Any]:
    def med(mode: str, attr: str) -> float:
        return float(statistics.median(getattr(r, attr) for r in results if r.mode == mode))

    summary: dict[str, Any] = {
        "settings": asdict(settings),
        "machine": machine(),
        "code": code_version(),
    }
    modes: dict[str, Any] = {}
    for mode in ("off", "on"):
        rs = [r for r in results if r.mode == mode]
        invites = sum(r.invites for r in rs)
        commands: dict[str, int] = {}
        for r in rs:
            for k, v in r.commands.items():
                commands[k] = commands.get(k, 0) + v
        modes[mode] = {
            "median_cps": med(mode, "cps"),
            "median_kamailio_cpu_ms_per_call": med(mode, "kamailio_cpu_ms_per_call"),
            "median_redis_cpu_ms_per_call": med(mode, "redis_cpu_ms_per_call"),
            "invites": invites,
            "invites_scored": sum(r.invites_scored for r in rs),
            "calls_completed": sum(r.successful for r in rs),
            "calls_failed": sum(r.failed for r in rs),
            "actions": _sum_dicts(r.actions for r in rs),
            "commands_per_invite": {
                k: round(v / invites, 3) for k, v in sorted(commands.items()) if invites
            },
            "redis_reads_per_invite": round(sum(r.redis_reads for r in rs) / invites, 3)
            if invites else None,
            "redis_writes_per_invite": round(sum(r.redis_writes for r in rs) / invites, 3)
            if invites else None,
        }  # fmt: skip
    summary["modes"] = modes
    off, on = modes["off"], modes["on"]
    summary["ratio_cps"] = (
        round(on["median_cps"] / off["median_cps"], 3) if off["median_cps"] else None
    )
    on_cpu = on["median_kamailio_cpu_ms_per_call"]
    summary["ratio_cpu"] = (
        round(off["median_kamailio_cpu_ms_per_call"] / on_cpu, 3) if on_cpu else None
    )
    proxy_off = off["median_kamailio_cpu_ms_per_call"] + off["median_redis_cpu_ms_per_call"]
    proxy_on = on["median_kamailio_cpu_ms_per_call"] + on["median_redis_cpu_ms_per_call"]
    summary["ratio_cpu_with_redis"] = round(proxy_off / proxy_on, 3) if proxy_on else None
    cpi = on["commands_per_invite"]
    # Each observe pipeline carries exactly one MGET, and nothing else on the request path
    # sends MGET: MGETs per INVITE = awaited round trips per INVITE (plus rare config reloads).
    summary["round_trips_per_invite"] = round(cpi.get("mget", 0.0) + cpi.get("hgetall", 0.0), 3)
    summary["notes"] = notes(results)
    summary["rounds"] = [asdict(r) for r in results]
    return summary


SATURATED = 0.85  # machine busy fraction below which a round was not CPU-bound


def notes(results: Sequence[RoundResult]) -> list[str]:
    """Things that make a round's numbers suspect, in words."""
    out: list[str] = []
    for r in results:
        where = f"round {r.index} ({r.mode})"
        if r.failed:
            out.append(f"{where}: {r.failed} calls failed (keep the logs with --workdir)")
        if r.retransmissions:
            out.append(f"{where}: {r.retransmissions} SIP retransmissions")
        if r.mode == "on" and r.invites_scored != r.invites:
            out.append(f"{where}: {r.invites_scored} of {r.invites} INVITEs were scored")
        if r.mode == "on" and set(r.actions) - {"relay"}:
            out.append(f"{where}: not every call was relayed: {_fmt_actions(r.actions)}")
        if r.mode == "off" and r.invites_scored:
            out.append(f"{where}: {r.invites_scored} decisions recorded with enabled=false")
        if r.machine_busy < SATURATED:
            out.append(
                f"{where}: CPUs only {r.machine_busy:.0%} busy: calls/s was limited by "
                f"the offered load (raise --concurrency-{r.mode}), not by the machine"
            )
    return out


def _sum_dicts(dicts: Iterator[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def code_version() -> dict[str, Any]:
    """The commit the measured code comes from, and the files that differ from it."""

    def git(*args: str) -> str:
        try:
            out = subprocess.run(
                ["git", "-C", str(REPO_ROOT), *args],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            )
        except (OSError, subprocess.SubprocessError):
            return ""
        return out.stdout.rstrip("\n")

    commit = git("rev-parse", "--short", "HEAD").strip()
    if not commit:
        return {"root": str(REPO_ROOT), "commit": None, "dirty": []}
    dirty = git("status", "--porcelain", "--", "kemi", "scoring", "lists", "ops", "kamailio.cfg")
    return {
        "root": str(REPO_ROOT),
        "commit": commit,
        "dirty": [line[3:] for line in dirty.splitlines()],
    }


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def render(summary: dict[str, Any], results: Sequence[RoundResult]) -> str:
    m = summary["machine"]
    s = summary["settings"]
    code = summary["code"]
    version = f"commit {code['commit']}" if code["commit"] else "not a git checkout"
    if code["dirty"]:
        version += f", with uncommitted changes to {', '.join(code['dirty'])}"
    lines = [
        f"machine: {m['nproc']} CPUs, {m['cpu']}, Linux {m['kernel']}",
        f"code: {code['root']} ({version})",
        f"settings: {s['calls']} calls/round, {s['rounds']} rounds per mode, target "
        f"{s['rate']:g} calls/s, at most {s['concurrency_off']} (off) / {s['concurrency_on']} "
        "(on) calls in flight, "
        f"{s['sources']} source IPs, {s['children']} Kamailio children, memory manager "
        f"{s.get('mem') or Lab.mem_manager}, Redis "
        + (f"Cluster of {s['cluster']} masters" if s.get("cluster") else "one redis-server"),
        "",
        HEADER,
        *(_row(r) for r in results),
        "",
        f"{'':<26}{'enabled=false':>16}{'enabled=true':>16}",
    ]
    off, on = summary["modes"]["off"], summary["modes"]["on"]
    lines.append(f"{'median calls/s':<26}{off['median_cps']:>16.1f}{on['median_cps']:>16.1f}")
    lines.append(
        f"{'median Kamailio CPU ms/call':<26}"
        f"{off['median_kamailio_cpu_ms_per_call']:>16.3f}"
        f"{on['median_kamailio_cpu_ms_per_call']:>16.3f}"
    )
    lines.append(
        f"{'median Redis CPU ms/call':<26}"
        f"{off['median_redis_cpu_ms_per_call']:>16.3f}"
        f"{on['median_redis_cpu_ms_per_call']:>16.3f}"
    )
    lines.append(
        f"{'decisions':<26}{_fmt_actions(off['actions']):>16}{_fmt_actions(on['actions']):>16}"
    )
    lines.append("")
    lines.append(
        "Redis commands per INVITE (INFO commandstats delta / INVITEs sent; store = sent by "
        "scoring/store.py, in Lua = run by its scripts, both = either)"
    )
    names = sorted(
        set(off["commands_per_invite"]) | set(on["commands_per_invite"]),
        key=lambda n: (n not in CLIENT_COMMANDS, n),
    )
    for name in names:
        if name in CLIENT_COMMANDS:
            origin = "both" if name in SCRIPT_COMMANDS else "store"
        else:
            origin = "in Lua" if name in SCRIPT_COMMANDS else "other"
        lines.append(
            f"  {name:<12} {origin:<7}{off['commands_per_invite'].get(name, 0):>13.3f}"
            f"{on['commands_per_invite'].get(name, 0):>16.3f}"
        )
    lines.append(
        f"  {'socket reads by Redis':<20}{_fmt(off['redis_reads_per_invite']):>13}"
        f"{_fmt(on['redis_reads_per_invite']):>16}"
    )
    lines.append(
        f"  {'reply writes by Redis':<20}{_fmt(off['redis_writes_per_invite']):>13}"
        f"{_fmt(on['redis_writes_per_invite']):>16}"
    )
    lines.append(
        f"awaited round trips per INVITE (scoring on): {summary['round_trips_per_invite']:.3f}"
    )
    lines.append("")
    lines.extend(f"note: {n}" for n in summary["notes"])
    lines.append(
        f"capacity ratios on/off (goal >= 0.8): calls/s {_fmt(summary['ratio_cps'])}, "
        f"Kamailio CPU per call {_fmt(summary['ratio_cpu'])}, "
        f"Kamailio + Redis CPU per call {_fmt(summary['ratio_cpu_with_redis'])}"
    )
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _fmt_actions(actions: dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(actions.items())) or "-"


# ------------------------------------------------------------------------------------ main


def _cluster_masters(text: str) -> int:
    n = int(text) if text.isdigit() else -1
    if n != 0 and not 3 <= n <= 16:
        raise argparse.ArgumentTypeError(
            f"a Redis Cluster needs 3 to 16 masters here, not {text!r}")
    return n


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value}")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/load.py",
        description="Calls per second through the proxy, enabled=false vs enabled=true, "
        "alternating rounds; Redis commands per INVITE.",
    )
    p.add_argument("--calls", type=_positive, default=20000, help="calls per round (20000)")
    p.add_argument("--rounds", type=_positive, default=3, help="rounds per mode (3)")
    p.add_argument(
        "--rate",
        type=float,
        default=8000.0,
        help="target calls/s offered, summed over the UACs (8000)",
    )
    p.add_argument(
        "--concurrency-off",
        type=_positive,
        default=2000,
        help="calls in flight at most with enabled=false, summed over the UACs (2000)",
    )
    p.add_argument(
        "--concurrency-on",
        type=_positive,
        default=500,
        help="calls in flight at most with enabled=true, summed over the UACs (500)",
    )
    p.add_argument("--sources", type=_positive, default=4, help="source IPs 127.0.2.N (4)")
    p.add_argument("--children", type=_positive, default=4, help="Kamailio UDP children (4)")
    p.add_argument(
        "--warmup", type=int, default=100, help="unmeasured calls after each mode switch (100)"
    )
    p.add_argument(
        "--shm",
        type=int,
        default=1024,
        help="Kamailio shared memory, MB (-m); 0 = Kamailio's default, 64 (1024)",
    )
    p.add_argument(
        "--rcvbuf",
        type=int,
        default=RCVBUF,
        help=f"Kamailio's and SIPp's UDP buffer limit, bytes (-b, -buff_size); "
        f"0 = their defaults ({RCVBUF})",
    )
    p.add_argument(
        "--retrans",
        action="store_true",
        help="let SIPp retransmit (UDP timers, T1 = 500 ms); by default -nr: the "
        "buffers are large enough that loopback loses nothing, and the closed loop "
        "queues calls for longer than T1 when scoring is on",
    )
    p.add_argument(
        "--mem",
        choices=("qm", "fm", "tlsf"),
        default="",
        help="Kamailio's memory manager (-x, shared and private memory); default: the lab's "
        "(tlsf; Kamailio's own default is qm)",
    )
    p.add_argument(
        "--hold-ms",
        type=int,
        default=0,
        help="answered calls last this long (ms) before the UAC's BYE (default 0; calls in "
        "flight grow by rate x hold, raise --concurrency-on/-off with it)",
    )
    p.add_argument(
        "--dialog-store",
        choices=("text", "redis"),
        default="text",
        help="where Kamailio keeps its dialogs (lab --dialog-store): text (db_text, written at "
        "a clean stop; the default) or redis (a dialog redis-server written every 2 s; its CPU "
        "counts in the redis columns)",
    )
    p.add_argument(
        "--redis-cluster",
        type=_cluster_masters,
        default=0,
        metavar="MASTERS",
        help="run Redis as a cluster of this many masters (redis+cluster://; default: one "
        "redis-server)",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="settings",
                   help="live config to set after the benchmark's own (repeatable), e.g. "
                        "--set reputation.call_duration=false")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per round at most")
    p.add_argument("--workdir", type=Path, help="keep logs here (default: a temporary dir)")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    args = p.parse_args(argv)
    if args.rate <= 0:
        p.error("--rate must be > 0")
    if not 0 <= args.hold_ms <= 60_000:
        p.error("--hold-ms must be between 0 and 60000")
    if args.sources > 254:
        p.error("--sources must be at most 254")
    args.config = []
    for item in args.settings:
        key, sep, value = item.partition("=")
        if not sep or key not in PARAMS:
            p.error(f"--set {item!r}: expected KEY=VALUE with a config key (spitwall config show)")
        try:
            PARAMS[key].parse(value)
        except ValueError as exc:
            p.error(f"--set {item!r}: {exc}")
        args.config.append((key, value))
    return args


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings(
        calls=args.calls, rounds=args.rounds, rate=args.rate,
        concurrency_off=args.concurrency_off, concurrency_on=args.concurrency_on,
        sources=args.sources, children=args.children, warmup=max(0, args.warmup),
        timeout=args.timeout, shm_mb=args.shm, rcvbuf=args.rcvbuf, retrans=args.retrans,
        mem=args.mem, cluster=args.redis_cluster, config=tuple(args.config),
        dialog_store=args.dialog_store, hold_ms=args.hold_ms,
    )  # fmt: skip
    for tool in ("kamailio", "redis-server"):
        if (
            shutil.which(tool) is None
            and not Path(f"/usr/sbin/{tool}").exists()
            and not Path(f"/usr/bin/{tool}").exists()
        ):
            print(f"bench: {tool} not found; run `make setup`", file=sys.stderr)
            return 1

    def log(text: str) -> None:
        print(text, file=sys.stderr if args.json else sys.stdout, flush=True)

    # Ctrl-C and SIGTERM both unwind through the ``finally`` that stops every process (also
    # when we were started with SIGINT ignored, as background jobs of a script are).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    keep = args.workdir is not None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="spitwall-bench-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    bench = Bench(settings, workdir, log)
    started = time.monotonic()
    try:
        bench.up()
        log(HEADER)
        results = bench.run()
    except KeyboardInterrupt:
        print("bench: interrupted; stopping everything", file=sys.stderr)
        return 130
    except (LabError, RuntimeError, redis.RedisError, OSError) as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        for line in getattr(exc, "log_tail", []):
            print(f"  | {line}", file=sys.stderr)
        return 1
    finally:
        bench.close()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    summary = summarise(results, settings)
    summary["duration_s"] = round(time.monotonic() - started, 1)
    if args.json:
        print(json.dumps(summary, indent=1, sort_keys=True))
    else:
        print()
        print(render(summary, results))
        print(f"(whole run {summary['duration_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
