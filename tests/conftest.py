"""Shared fixtures: real redis-server and real Kamailio labs on loopback.

Everything is started through ops.procs / ops.lab -- the code operators use -- on free ports, and
stopped by pid at teardown, so tests never touch a system Redis or Kamailio (no 5060/6379).

* ``redis_server`` (session): one redis-server for the whole run; ``.stop()``/``.start()`` let a
  test take it down (fail-open) and bring it back on the same port.
* ``redis_url`` (function): that server, restarted if a test stopped it, after FLUSHALL.
* ``redis_cluster`` (session): a Redis Cluster of three masters (no replicas) for the whole run;
  ``redis_cluster_url`` (function): its ``redis+cluster://`` URL after FLUSHALL on every master.
* ``lab_factory`` (function): ``lab_factory(next_hop=..., media_port=..., children=...)`` starts a
  Lab in tmp_path that uses the session Redis; every lab it made is brought down at teardown.
* ``lab`` (function): ``lab_factory()`` with defaults; parametrize it indirectly with a dict of
  the same keyword arguments to change them.

``--kamailio-cfg PATH`` runs the labs with another config than the repository's kamailio.cfg.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from ops.lab import (
    DEFAULT_KAMAILIO_CFG,
    PORT_RACE_ATTEMPTS,
    Lab,
    LabError,
    lost_port_race,
    start_redis_server,
)
from ops.procs import free_port, pid_alive, redis_ping, stop_pid
from tests.redis_cluster import ClusterSet


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--kamailio-cfg",
        default=str(DEFAULT_KAMAILIO_CFG),
        help="Kamailio config the lab fixtures run (default: the repository's kamailio.cfg)",
    )


@dataclass
class RedisServer:
    """A redis-server we own, restartable on the same port."""

    workdir: Path
    host: str = "127.0.0.1"
    port: int = field(default_factory=lambda: free_port("127.0.0.1", "tcp"))
    pid: int | None = None
    started: bool = False

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def running(self) -> bool:
        return self.pid is not None and pid_alive(self.pid)

    def start(self) -> None:
        """(Re)start on the same port; waits until it answers PING."""
        if self.running():
            return
        for attempt in range(1, PORT_RACE_ATTEMPTS + 1):
            try:
                self.pid = start_redis_server(self.workdir, self.port, self.host)
                return
            except LabError as exc:
                # the first start may take a new port; a restart must keep its port
                if self.started or attempt == PORT_RACE_ATTEMPTS or not lost_port_race(exc):
                    raise
                self.port = free_port(self.host, "tcp")
            finally:
                self.started = self.started or self.pid is not None

    def stop(self) -> None:
        """Stop it (by pid, verified); later commands to it fail as if Redis went down."""
        if self.pid is not None:
            stop_pid(self.pid, "redis-server")
            self.pid = None


def _flushall(host: str, port: int) -> None:
    with socket.create_connection((host, port), timeout=2.0) as sock:
        sock.sendall(b"FLUSHALL\r\n")
        reply = sock.recv(64)
    if not reply.startswith(b"+OK"):
        raise RuntimeError(f"FLUSHALL on {host}:{port} answered {reply!r}")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    if not redis_server.running() or not redis_ping(redis_server.host, redis_server.port):
        redis_server.stop()
        redis_server.start()
    _flushall(redis_server.host, redis_server.port)
    return redis_server.url


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    """A client of the test's (flushed) Redis, replies as bytes. Modules that want decoded
    replies define their own `r` (tests/unit/ops/conftest.py)."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterSet]:
    cluster = ClusterSet(tmp_path_factory.mktemp("cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def redis_cluster_url(redis_cluster: ClusterSet) -> str:
    if len(redis_cluster.running()) != redis_cluster.masters or not redis_cluster.healthy():
        pytest.fail("the session's Redis Cluster lost a node (a test must use its own cluster "
                    "to kill nodes)")
    redis_cluster.flushall()
    return redis_cluster.url


LabFactory = Callable[..., Lab]


@pytest.fixture
def lab_factory(
    request: pytest.FixtureRequest, tmp_path: Path, redis_url: str
) -> Iterator[LabFactory]:
    cfg = Path(request.config.getoption("--kamailio-cfg"))
    labs: list[Lab] = []

    def make(
        next_hop: str | None = None,
        media_port: int | None = None,
        children: int = 2,
        **up_kwargs: Any,
    ) -> Lab:
        lab = Lab(tmp_path / f"lab{len(labs)}", kamailio_cfg=cfg)
        labs.append(lab)
        up_kwargs.setdefault("redis_url", redis_url)
        lab.up(next_hop=next_hop, media_port=media_port, children=children, **up_kwargs)
        return lab

    try:
        yield make
    finally:
        errors: list[str] = []
        for lab in reversed(labs):
            try:
                _state, warnings = lab.down()
            except LabError as exc:
                errors.append(f"{lab.workdir}: {exc}")
            else:
                errors.extend(warnings)
        if errors:
            pytest.fail("lab teardown: " + "; ".join(errors))


@pytest.fixture
def lab(request: pytest.FixtureRequest, lab_factory: LabFactory) -> Lab:
    params: dict[str, Any] = getattr(request, "param", None) or {}
    return lab_factory(**params)
