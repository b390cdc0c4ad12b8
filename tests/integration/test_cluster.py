"""Redis Cluster: the whole lab on a `redis+cluster://` URL, through a reshard and a failover.

Real processes on loopback: three masters with a replica each (cluster-node-timeout 500 ms),
Kamailio with kamailio.cfg and the lab's other services running as their Redis ACL roles
(created by the lab on all six nodes), SIPp callers, the CLI. Every INVITE's commands go to
the masters of their hash tags; operators use the same URL for live tuning, lists and explain.
A slot is moved under traffic, then a master is killed: calls keep being relayed (fail-open)
and are scored again once its replica is promoted, with no restart of anything.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from ops.sipp import run_uac
from scoring import keys, redisconn
from scoring.store import find_decision
from tests.integration.helpers import (
    children_of,
    kill_switch_reaches_the_proxy,
    lab_refuses_url,
    rig,
    rows,
    spitwall,
)
from tests.redis_cluster import ClusterSet

pytestmark = pytest.mark.integration


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[ClusterSet]:
    c = ClusterSet(tmp_path / "cluster", replicas=1, timeout_ms=500)
    try:
        c.start()
        yield c
    finally:
        c.stop()


def _decided(url: str, call_ids: Any) -> list[dict[str, Any]]:
    client = redisconn.client(url, socket_timeout=2)
    try:
        return [d for cid in call_ids if (d := find_decision(client, cid)) is not None]
    finally:
        client.close()


def test_lab_runs_on_a_cluster_through_reshard_and_failover(cluster: ClusterSet,
                                                            lab_factory: Any) -> None:
    url = cluster.url  # (cluster first: the lab and its ACL passwords go before it)
    factory = functools.partial(lab_factory, redis_url=url, redis_users=True)
    with rig(factory) as r:
        assert r.lab.state is not None and r.lab.state.users_file
        urls = json.loads(Path(r.lab.state.users_file).read_text())
        assert all(u.startswith("redis+cluster://spitwall-") for u in urls.values()), urls
        for port in cluster.ports:  # ACL users are per node: all six have them
            names = {str(n) for n in redis.Redis(port=port).acl_users()}
            assert names >= {"spitwall-proxy", "spitwall-ops", "spitwall-media"}, port

        res = run_uac(r.host, r.port, "127.0.10.1", 3, 5, rows(3))
        assert res.count(200) == 3, res.summary()
        for inv in r.next_hop.wait_for_invites(3):
            assert inv.headers("X-Spitwall-Score")
        decided = _decided(url, res.outcomes)
        assert len(decided) == 3 and not any(d["degraded"] for d in decided), decided
        # the per-entity counters really are spread over the masters
        holders = {p for p in cluster.running() if redis.Redis(port=p).keys("spitwall:{*:inv:*")}
        assert len(holders) >= 2, holders

        # operators use the same URL: explain, a block-list entry (MULTI with its audit
        # record, one slot), live config
        out = spitwall("explain", next(iter(res.outcomes)), "--json", redis_url=url)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["action"] == "relay"
        added = spitwall("list", "add", "block", "ip", "127.0.10.2", "--reason", "test",
                         redis_url=url)
        assert added.returncode == 0, added.stderr
        audit = spitwall("audit", "--json", redis_url=url)
        assert audit.returncode == 0 and "127.0.10.2" in audit.stdout, audit.stderr
        deadline = time.monotonic() + 10
        while True:  # children reload the lists within a second of the version change
            blocked = run_uac(r.host, r.port, "127.0.10.2", 1, 5, rows(1))
            if blocked.count(603) == 1 or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert blocked.count(603) == 1, blocked.summary()

        # a reshard under the proxy: the source IP's counters move to another master; the
        # children follow MOVED and go on counting where the counter is now
        ip = "127.0.10.3"
        first = run_uac(r.host, r.port, ip, 2, 5, rows(2))
        assert first.count(200) == 2, first.summary()
        ip_key = keys.rate_keys(keys.tag("ip", ip), (10,), time.time())[0]
        src = cluster.master_of(ip_key)
        cluster.move_slot(ip_key, next(p for p in cluster.running()
                                       if p != src and redis.Redis(port=p).info(
                                           "replication")["role"] == "master"))
        after_move = run_uac(r.host, r.port, ip, 2, 5, rows(2))
        assert after_move.count(200) == 2, after_move.summary()
        moved = _decided(url, after_move.outcomes)
        assert len(moved) == 2 and not any(d["degraded"] for d in moved), moved

        # a master dies: fail-open, then its replica is promoted and scoring resumes
        workers = children_of(r.kamailio_pid)
        victim = cluster.master_of(keys.CONFIG_VERSION)  # every INVITE reads it
        cluster.kill(victim)
        during = run_uac(r.host, r.port, "127.0.10.4", 3, 5, rows(3))
        assert during.count(200) == 3, during.summary()
        scored: list[dict[str, Any]] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not scored:
            later = run_uac(r.host, r.port, "127.0.10.5", 2, 5, rows(2))
            assert later.count(200) == 2, later.summary()
            try:
                scored = [d for d in _decided(url, later.outcomes) if not d["degraded"]]
            except redis.RedisError:
                scored = []
            if not scored:
                time.sleep(0.5)
        assert scored, "no call was scored after the replica's promotion"
        assert cluster.master_of(keys.CONFIG_VERSION) != victim
        assert children_of(r.kamailio_pid) == workers, "a Kamailio child died"

        # live tuning on the promoted master reaches the proxy: the kill switch
        assert kill_switch_reaches_the_proxy(r, url, "127.0.10.6"), \
            "the kill switch set on the cluster did not reach the proxy"


def test_lab_refuses_a_malformed_cluster_url(tmp_path: Path) -> None:
    lab_refuses_url(tmp_path / "lab", "redis+cluster://127.0.0.1:1/3", "only database 0")


def test_kamailio_scores_on_a_tls_cluster_through_its_define(tmp_path: Path,
                                                             lab_factory: Any) -> None:
    """A rediss+cluster:// URL (commas, '?', '=', '/' and all) goes through Kamailio's
    REDIS_URL define; the children score over TLS."""
    cluster = ClusterSet(tmp_path / "cluster", tls=True)
    try:
        cluster.start()
        url = cluster.url
        with rig(functools.partial(lab_factory, redis_url=url, redis_users=False)) as r:
            res = run_uac(r.host, r.port, "127.0.10.7", 3, 5, rows(3))
            assert res.count(200) == 3, res.summary()
            for inv in r.next_hop.wait_for_invites(3):
                assert inv.headers("X-Spitwall-Score")
            decided = _decided(url, res.outcomes)
            assert len(decided) == 3 and not any(d["degraded"] for d in decided), decided
    finally:
        cluster.stop()


def test_a_node_that_loses_its_probed_port_starts_on_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The test harness itself: a cluster node whose port was taken between the probe and
    redis-server's bind is started again on a fresh port (the same race `lab up` handles)."""
    import socket

    from tests import redis_cluster

    squatter = socket.socket()
    squatter.bind(("127.0.0.1", redis_cluster.cluster_port()))
    squatter.listen()
    taken = squatter.getsockname()[1]
    real = redis_cluster.cluster_port
    handed: list[int] = []

    def probe() -> int:
        if not handed:
            handed.append(taken)
            return int(taken)
        return real()

    monkeypatch.setattr(redis_cluster, "cluster_port", probe)
    c = ClusterSet(tmp_path / "cluster", masters=3)
    try:
        c.start()
        assert handed == [taken] and taken not in c.ports and len(c.ports) == 3
        assert c.healthy()
    finally:
        c.stop()
        squatter.close()
