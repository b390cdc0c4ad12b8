"""Redis Sentinel: the whole lab on a `redis+sentinel://` URL, through a master failover.

Real processes on loopback: a master redis-server, a replica, one sentinel (quorum 1, 500 ms
down-after), Kamailio with kamailio.cfg and the lab's other services, all running as their
Redis ACL roles (created by the lab on every data node), SIPp callers. The master is killed:
calls keep being relayed (fail-open) and, once Sentinel has promoted the replica, are scored and
recorded there again, with no restart of anything.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from ops.lab import REDIS_EXPECT, redis_argv
from ops.procs import free_port, pid_alive, redis_ping, start_process, stop_pid, wait_until
from ops.sipp import run_uac
from scoring import keys, redisconn
from scoring.config import Config
from scoring.store import RedisUnavailable, Store, find_decision
from tests.integration.helpers import (
    children_of,
    kill_switch_reaches_the_proxy,
    lab_refuses_url,
    rig,
    rows,
    spitwall,
)
from tests.tls_certs import RedisTls
from tests.unit.scoring.support import attempt

pytestmark = pytest.mark.integration

SERVICE = "spitwall"


@dataclass
class SentinelSet:
    """A master, a replica and a sentinel we started (stopped by pid at teardown)."""

    workdir: Path
    master_port: int = 0
    replica_port: int = 0
    sentinel_port: int = 0
    pids: dict[str, int] = field(default_factory=dict)
    #: TLS only, on every link (clients, replication, sentinel to the data nodes)
    tls: bool = False
    certs: RedisTls | None = None

    @property
    def url(self) -> str:
        # the first sentinel address has nobody listening: discovery must go on to the next
        dead = free_port("127.0.0.1", "tcp")
        hosts = f"127.0.0.1:{dead},127.0.0.1:{self.sentinel_port}/{SERVICE}/0"
        if self.certs is None:
            return f"redis+sentinel://{hosts}"
        return f"rediss+sentinel://{hosts}?ssl_ca_certs={self.certs.ca}"

    def client(self, port: int) -> redis.Redis:
        tls: dict[str, Any] = self.certs.client_kwargs() if self.certs else {}
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2, **tls)

    def start(self) -> None:
        if self.tls:
            self.certs = RedisTls.make(self.workdir / "pki")
        self.master_port = free_port("127.0.0.1", "tcp")
        self._redis("master", self.master_port, [])
        self.replica_port = free_port("127.0.0.1", "tcp")
        self._redis("replica", self.replica_port,
                    ["--replicaof", "127.0.0.1", str(self.master_port)])
        replica = self.client(self.replica_port)
        assert wait_until(
            lambda: replica.info("replication").get("master_link_status") == "up", 10)
        self.sentinel_port = free_port("127.0.0.1", "tcp")
        conf = self.workdir / "sentinel.conf"
        listen = ([f"port {self.sentinel_port}"] if self.certs is None else
                  ["port 0", f"tls-port {self.sentinel_port}",
                   *(f"{k.lstrip('-')} {v}" for k, v in zip(
                       self.certs.server_args()[::2], self.certs.server_args()[1::2],
                       strict=True))])
        conf.write_text("\n".join([
            *listen, "bind 127.0.0.1", "daemonize no",
            f"dir {self.workdir}", f"logfile {self.workdir / 'sentinel.log'}",
            f"sentinel monitor {SERVICE} 127.0.0.1 {self.master_port} 1",
            f"sentinel down-after-milliseconds {SERVICE} 500",
            f"sentinel failover-timeout {SERVICE} 4000",
            "",
        ]))
        self.pids["sentinel"] = start_process(["redis-server", str(conf), "--sentinel"],
                                              self.workdir / "sentinel.out", cwd=self.workdir)
        sentinel = self.client(self.sentinel_port)
        assert wait_until(lambda: self._ping(self.sentinel_port), 10)
        # the sentinel must know the replica before it can promote it
        assert wait_until(lambda: len(sentinel.sentinel_slaves(SERVICE)) == 1, 15)

    def _redis(self, name: str, port: int, extra: list[str]) -> None:
        wd = self.workdir / name
        wd.mkdir(parents=True, exist_ok=True)
        tls = (["--port", "0", "--tls-port", str(port), *self.certs.server_args()]
               if self.certs else [])
        self.pids[name] = start_process([*redis_argv(wd, port), *tls, *extra], wd / "out.log",
                                        cwd=wd)
        assert wait_until(lambda: self._ping(port), 10), f"{name} not up"

    def _ping(self, port: int) -> bool:
        if self.certs is None:
            return redis_ping("127.0.0.1", port, 0.5)
        try:
            return bool(self.client(port).ping())
        except (redis.RedisError, OSError):
            return False

    def master(self) -> int:
        sentinel = self.client(self.sentinel_port)
        addr = sentinel.sentinel_get_master_addr_by_name(SERVICE)
        assert isinstance(addr, tuple), addr
        return int(addr[1])

    def kill_master(self) -> None:
        stop_pid(self.pids.pop("master"), REDIS_EXPECT)

    def stop(self) -> None:
        for name in ("sentinel", "replica", "master"):
            pid = self.pids.pop(name, None)
            if pid is not None and pid_alive(pid):
                stop_pid(pid, REDIS_EXPECT)


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[SentinelSet]:
    s = SentinelSet(tmp_path / "sentinel")
    s.workdir.mkdir()
    try:
        s.start()
        yield s
    finally:
        s.stop()


def _decided(node_port: int, call_ids: Any) -> list[dict[str, Any]]:
    client = redis.Redis(port=node_port, socket_timeout=2)
    return [d for cid in call_ids if (d := find_decision(client, cid)) is not None]


@pytest.mark.parametrize("users", [True, False], ids=["role-users", "default-user"])
def test_lab_runs_on_sentinel_and_survives_a_failover(sentinels: SentinelSet,
                                                      lab_factory: Any, users: bool) -> None:
    """With role users, Kamailio gets its URL from the environment; without, the sentinel URL
    (commas and all) goes through Kamailio's REDIS_URL define."""
    # (sentinels first: the lab is brought down, and its ACL passwords removed, before them)
    url = sentinels.url
    factory = functools.partial(lab_factory, redis_url=url, redis_users=users)
    with rig(factory) as r:
        assert r.lab.state is not None
        if users:
            assert r.lab.state.users_file
            urls = json.loads(Path(r.lab.state.users_file).read_text())
            assert all(u.startswith("redis+sentinel://spitwall-") for u in urls.values()), urls
            # the role users exist on both data nodes (ACLs are not replicated)
            for port in (sentinels.master_port, sentinels.replica_port):
                names = redis.Redis(port=port).acl_users()
                assert {str(n) for n in names} >= {"spitwall-proxy", "spitwall-media"}, port

        res = run_uac(r.host, r.port, "127.0.9.1", 3, 5, rows(3))
        assert res.count(200) == 3, res.summary()
        for inv in r.next_hop.wait_for_invites(3):
            assert inv.headers("X-Spitwall-Score")
        assert len(_decided(sentinels.master_port, res.outcomes)) == 3
        # operators use the same URL
        out = spitwall("explain", next(iter(res.outcomes)), "--json", redis_url=url)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["action"] == "relay"

        workers = children_of(r.kamailio_pid)
        sentinels.kill_master()
        # during the failover: relayed unscored (fail-open), never dropped
        during = run_uac(r.host, r.port, "127.0.9.2", 3, 5, rows(3))
        assert during.count(200) == 3, during.summary()
        assert wait_until(lambda: sentinels.master() == sentinels.replica_port, 20), \
            "sentinel did not promote the replica"

        # scoring resumes on the new master by itself (each child retries once a second)
        scored: list[dict[str, Any]] = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not scored:
            after = run_uac(r.host, r.port, "127.0.9.3", 2, 5, rows(2))
            assert after.count(200) == 2, after.summary()
            scored = [d for d in _decided(sentinels.replica_port, after.outcomes)
                      if not d["degraded"]]
            if not scored:
                time.sleep(0.5)
        assert scored, "no call was scored against the promoted replica"
        assert children_of(r.kamailio_pid) == workers, "a Kamailio child died"
        # live tuning through Sentinel reaches the proxy: the kill switch stops scoring
        assert kill_switch_reaches_the_proxy(r, url, "127.0.9.4"), \
            "the kill switch set through Sentinel did not reach the proxy"


def test_lab_refuses_a_malformed_sentinel_url(tmp_path: Path) -> None:
    lab_refuses_url(tmp_path / "lab", "redis+sentinel://127.0.0.1:1/", "service name")


def test_tls_sentinel_store_clients_and_failover(tmp_path: Path) -> None:
    """rediss+sentinel://: TLS to the sentinel and to the data nodes, certificates verified;
    the store scores, fails open when the master dies and follows the promoted replica; the
    redis-py clients work; a wrong CA fails open."""
    s = SentinelSet(tmp_path / "sentinel", tls=True)
    s.workdir.mkdir()
    try:
        s.start()
        url = s.url
        assert url.startswith("rediss+sentinel://")
        store = Store(url, timeout=0.5, retry_after=0.2)
        cfg = Config.defaults()
        a = attempt(source_ip="203.0.113.77")
        assert store.observe(a, cfg).available
        client = redisconn.client(url, socket_timeout=2)
        assert client.exists(keys.tag("ip", "203.0.113.77") + ":rep") in (0, 1)
        assert client.ping()
        client.close()

        async def via_asyncio() -> bool:
            ac = redisconn.async_client(url, socket_timeout=2)
            try:
                return bool(await ac.ping())
            finally:
                await ac.aclose()

        assert asyncio.run(via_asyncio())
        s.kill_master()
        with pytest.raises(RedisUnavailable):
            store.observe(a, cfg)
        assert wait_until(lambda: s.master() == s.replica_port, 20), "no promotion"
        scored = False
        deadline = time.monotonic() + 15
        while not scored and time.monotonic() < deadline:
            try:
                scored = store.observe(a, cfg).available
            except RedisUnavailable:
                time.sleep(0.2)
        assert scored, "scoring did not resume on the promoted replica over TLS"
        store.close()
        assert s.certs is not None
        other = RedisTls.make(tmp_path / "other")
        wrong = Store(url.replace(str(s.certs.ca), str(other.ca)), timeout=0.5, retry_after=5)
        with pytest.raises(RedisUnavailable):
            wrong.observe(a, cfg)
        wrong.close()
    finally:
        s.stop()
