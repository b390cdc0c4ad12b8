"""What the delivery worker's integration tests share: the worker as a real process
(`python -m intercept.deliver`, Redis URL in the environment), queuing synthetic events, and
waiting on the stream."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from intercept import names
from ops.procs import free_port, sip_options_ping
from ops.sipp import stop_popen
from tests.integration.recorder import synthetic_entry
from tests.redis_replies import as_fields

REPO = Path(__file__).resolve().parents[2]
#: fast SIP and retry timing for tests: T1 50 ms, Timer F 1 s, back-off 0.2 s .. 1 s
FAST = ("--sip-t1", "0.05", "--sip-timeout", "1", "--backoff", "0.2", "--backoff-max", "1")


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    port: int
    consumer: str
    stats_file: Path
    log: Path

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def stats(self) -> dict[str, Any]:
        os.kill(self.proc.pid, signal.SIGUSR1)
        time.sleep(0.1)
        data: dict[str, Any] = json.loads(self.stats_file.read_text())
        return data

    def stop(self) -> None:
        stop_popen(self.proc)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(5)


WorkerFactory = Callable[..., Worker]


@contextmanager
def worker_factory(redis_url: str, tmp_path: Path, *, consumer_prefix: str = "test-",
                   defaults: Sequence[str] = FAST) -> Iterator[WorkerFactory]:
    """``start(*extra, port=None, consumer=None)`` starts a worker and waits until it answers
    OPTIONS; every worker started is stopped (by its pid) on exit."""
    workers: list[Worker] = []

    def start(*extra: str, port: int | None = None, consumer: str | None = None) -> Worker:
        port = port or free_port("127.0.0.1", "udp")
        n = len(workers)
        consumer = consumer or f"{consumer_prefix}{n}"
        stats, log = tmp_path / f"worker{n}.json", tmp_path / f"worker{n}.log"
        env = dict(os.environ, SPITWALL_REDIS=redis_url)  # the URL stays off argv
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "intercept.deliver", "--sip-port", str(port),
                 "--consumer", consumer, "--stats-file", str(stats), *defaults, *extra],
                cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        worker = Worker(proc, port, consumer, stats, log)
        workers.append(worker)
        deadline = time.monotonic() + 15
        while sip_options_ping("127.0.0.1", port, 0.3) != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"worker did not start: {log.read_text()[-2000:]}")
        return worker

    try:
        yield start
    finally:
        for worker in workers:
            stop_popen(worker.proc)


@contextmanager
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    r = redis.Redis.from_url(redis_url)
    try:
        yield r
    finally:
        r.close()


def add(client: redis.Redis, dest: str, cert: bytes, n: int = 1, liid: str = "CASE-1",
        kind: str = "call") -> list[str]:
    """Queue ``n`` synthetic events for ``dest``; their event ids."""
    ids = []
    for _ in range(n):
        eid, fields = synthetic_entry(dest, liid, cert, kind=kind)
        client.xadd(names.EVENTS, as_fields(fields))
        ids.append(eid)
    return ids


def pending(client: redis.Redis) -> int:
    try:
        return int(client.xpending(names.EVENTS, names.EVENTS_GROUP)["pending"])
    except redis.ResponseError:
        return 0


def wait(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()
