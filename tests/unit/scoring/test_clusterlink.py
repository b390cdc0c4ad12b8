"""scoring.clusterlink through the store, on real Redis Clusters: routing per slot, one write per
master, MOVED/ASK after a reshard, NOSCRIPT, a master killed and its replica promoted.

(`tests/unit/scoring/test_store.py` runs every store test on a cluster as well.)"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.crc import key_slot

from scoring import keys, redisconn
from scoring.clusterlink import ClusterLink, command_key
from scoring.config import Config
from scoring.model import Action, CallAttempt, Decision
from scoring.redisconn import ClusterUrl
from scoring.store import RedisUnavailable, Store, last_caller_key, pack
from tests.redis_cluster import ClusterSet
from tests.tls_certs import TestCa
from tests.unit.scoring.support import attempt

NOW = 1_800_000_000.0


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[ClusterSet]:
    """A cluster this test may reshard (the session's stays as it is)."""
    c = ClusterSet(tmp_path / "cluster")
    try:
        c.start()
        yield c
    finally:
        c.stop()


def _masters_holding(cluster: ClusterSet, pattern: str) -> set[int]:
    return {p for p in cluster.running() if cluster.node(p).keys(pattern)}


def test_command_key_positions() -> None:
    assert command_key(["EVALSHA", "ab", "2", "k1", "k2", "arg"]) == b"k1"
    assert command_key(["EVALSHA", "ab", "0", "arg"]) is None
    assert command_key(["MGET", "a", "b"]) == b"a"
    assert command_key(["SET", b"\xff{x}", "1"]) == b"\xff{x}"
    assert command_key(["SCRIPT", "LOAD", "return 1"]) is None
    assert command_key(["PING"]) is None


def test_keyless_command_is_refused(redis_cluster_url: str) -> None:
    link = ClusterLink(ClusterUrl.parse(redis_cluster_url), [], socket_timeout=2)
    with pytest.raises(ValueError, match="no key"):
        link.roundtrip([["PING"]], pack)
    link.close()


def test_entities_spread_over_masters_and_are_counted_once(
        redis_cluster: ClusterSet, redis_cluster_url: str) -> None:
    store = Store(redis_cluster_url, timeout=2.0)
    try:
        cfg = Config.defaults()
        for i in range(30):
            sig = store.observe(attempt(source_ip=f"192.0.2.{i}", from_user=f"+1555010{i:04d}",
                                        ruri_user=f"+1555020{i:04d}"), cfg, now=NOW)
            assert sig.ip_rate[10] == 1.0 and sig.caller_rate[10] == 1.0
        assert store.cluster is not None
        assert len(store.cluster._conns) == 3  # one connection per master, no more
        assert _masters_holding(redis_cluster, "spitwall:{ip:*") == set(redis_cluster.running())
        assert _masters_holding(redis_cluster, "spitwall:{caller:*") == \
            set(redis_cluster.running())
        assert store.cluster.redirects == 0
    finally:
        store.close()


def test_one_write_per_master_per_invite(redis_cluster_url: str,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """All writes go out before the first reply is read (latency of the slowest master)."""
    store = Store(redis_cluster_url, timeout=2.0)
    cfg = Config.defaults()
    try:
        store.observe(attempt(), cfg, now=NOW)  # connect, load scripts
        assert store.cluster is not None
        events: list[str] = []
        for addr, conn in store.cluster._conns.items():
            send, read = conn.send_packed_command, conn.read_response

            def logged_send(cmd: object, *a: object, _s: object = send, _n: object = addr,
                            **k: object) -> object:
                events.append(f"send {_n}")
                return _s(cmd, *a, **k)  # type: ignore[operator]

            def logged_read(*a: object, _r: object = read, _n: object = addr,
                            **k: object) -> object:
                events.append(f"read {_n}")
                return _r(*a, **k)  # type: ignore[operator]

            monkeypatch.setattr(conn, "send_packed_command", logged_send)
            monkeypatch.setattr(conn, "read_response", logged_read)
        store.observe(attempt(), cfg, now=NOW)
        sends = [e for e in events if e.startswith("send")]
        first_read = next(i for i, e in enumerate(events) if e.startswith("read"))
        assert len(sends) == len(set(sends)) >= 2  # one write per master involved
        assert all(e.startswith("send") for e in events[:first_read])
        assert len(sends) == first_read
    finally:
        store.close()


def test_reshard_moved_is_followed_for_reads_and_deferred_writes(own_cluster: ClusterSet) -> None:
    store = Store(own_cluster.url, timeout=2.0)
    cfg = Config.defaults()
    a = attempt(source_ip="198.51.100.7")
    ip_key = keys.rate_keys(keys.tag("ip", "198.51.100.7"), cfg.rate_windows, NOW)[0]
    try:
        assert store.observe(a, cfg, now=NOW).ip_rate[10] == 1.0
        store.count("before-move")
        src = own_cluster.master_of(ip_key)
        dst = next(p for p in own_cluster.running() if p != src)
        own_cluster.move_slot(ip_key, dst)
        stats_master = own_cluster.master_of(keys.STATS)
        own_cluster.move_slot(keys.STATS, next(p for p in own_cluster.running()
                                               if p != stats_master))
        store.count("after-move")  # sent to the old master: MOVED, sent again when drained
        sig = store.observe(a, cfg, now=NOW)  # stale map: MOVED, followed once
        assert sig.ip_rate[10] == 2.0  # the migrated counter went on, counted once
        assert own_cluster.master_of(ip_key) == dst
        assert own_cluster.node(dst).exists(ip_key)
        store.observe(attempt(source_ip="198.51.100.8"), cfg, now=NOW)  # drains everything
        assert store.cluster is not None and store.cluster.pending == 0
        client = redis.Redis(port=own_cluster.master_of(keys.STATS))
        counters = client.hgetall(keys.STATS)
        assert counters[b"after-move"] == b"1" and counters[b"before-move"] == b"1"
        assert store.cluster.redirects >= 2
    finally:
        store.close()


def test_ask_during_a_migration_is_followed(own_cluster: ClusterSet) -> None:
    """A slot half-way through a migration: a key that already moved is answered ASK by the
    old master; the link asks the importing master, this once, without relearning the map."""
    store = Store(own_cluster.url, timeout=2.0)
    try:
        key = f"{keys.tag('pass', 'x')}:used"
        store.fetch_hash(key + "-warmup")  # learn the map now (stale from here on)
        src = own_cluster.master_of(key)
        dst = next(p for p in own_cluster.running() if p != src)
        own_cluster.move_slot(key, dst, finish=False)
        assert store.cluster is not None
        replies = store.cluster.roundtrip([["SET", key, "1", "NX", "EX", "60"]], pack)
        assert replies == [True] or replies == [b"OK"], replies
        pipe = own_cluster.node(dst).pipeline(transaction=False)  # one connection
        pipe.execute_command("ASKING")  # type: ignore[no-untyped-call]
        pipe.get(key)
        assert pipe.execute() == [True, b"1"]  # written on the importing master
        with pytest.raises(redis.exceptions.AskError):  # the old master has not got it
            own_cluster.node(src).exists(key)
        assert store.cluster.redirects == 1
    finally:
        store.close()


def test_a_killed_master_fails_open_then_its_replica_takes_over(tmp_path: Path) -> None:
    cluster = ClusterSet(tmp_path / "cluster", replicas=1, timeout_ms=500)
    try:
        cluster.start()
        store = Store(cluster.url, timeout=0.3, retry_after=0.2)
        cfg = Config.defaults()
        a = attempt(source_ip="203.0.113.50")
        ip_key = keys.rate_keys(keys.tag("ip", "203.0.113.50"), cfg.rate_windows, NOW)[0]
        assert store.observe(a, cfg, now=NOW).ip_rate[10] == 1.0
        victim = cluster.master_of(ip_key)
        # wait until the replica has the counter (replication is asynchronous)
        replica = next(p for p in cluster.running()
                       if cluster.node(p).info("replication").get("role") == "slave"
                       and cluster.node(p).info("replication").get("master_port") == victim)
        deadline = time.monotonic() + 5

        def replica_has_it() -> bool:
            reader = cluster.node(replica).pipeline(transaction=False)  # one connection
            reader.execute_command("READONLY")  # type: ignore[no-untyped-call]
            reader.get(ip_key)
            return reader.execute()[1] is not None

        while not replica_has_it() and time.monotonic() < deadline:
            time.sleep(0.05)
        cluster.kill(victim)
        t0 = time.monotonic()
        with pytest.raises(RedisUnavailable):
            store.observe(a, cfg, now=NOW)
        assert time.monotonic() - t0 < 2.0  # fails open fast, no hang
        # the replica is promoted (cluster-node-timeout 500 ms); scoring resumes there
        got = None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                got = store.observe(a, cfg, now=NOW)
                break
            except RedisUnavailable:
                time.sleep(0.2)
        assert got is not None, "scoring did not resume after the failover"
        assert got.ip_rate[10] >= 2.0  # the replica had the count; it went on
        assert cluster.master_of(ip_key) == replica
        store.close()
    finally:
        cluster.stop()


def test_no_node_answers_is_unavailable_fast() -> None:
    with socket.socket() as s1, socket.socket() as s2:
        s1.bind(("127.0.0.1", 0))
        s2.bind(("127.0.0.1", 0))
        url = (f"redis+cluster://127.0.0.1:{s1.getsockname()[1]},"
               f"127.0.0.1:{s2.getsockname()[1]}")
    store = Store(url, timeout=0.2, retry_after=5)
    t0 = time.monotonic()
    with pytest.raises(RedisUnavailable, match="no Redis Cluster node answered"):
        store.observe(attempt(), Config.defaults(), now=NOW)
    with pytest.raises(RedisUnavailable, match="marked down"):  # not retried for 5 s
        store.observe(attempt(), Config.defaults(), now=NOW)
    assert time.monotonic() - t0 < 2.0


def test_tls_cluster_verified_end_to_end(tmp_path: Path) -> None:
    """rediss+cluster://: the store, the redis-py clients and node discovery over TLS only,
    certificates and host names verified; a wrong CA or plain TCP fails open, never hangs."""
    cluster = ClusterSet(tmp_path / "cluster", tls=True)
    try:
        cluster.start()
        url = cluster.url
        assert url.startswith("rediss+cluster://")
        store = Store(url, timeout=2.0)
        try:
            for i in range(10):
                sig = store.observe(attempt(source_ip=f"192.0.2.{i}"), Config.defaults(), now=NOW)
                assert sig.available and sig.ip_rate[10] == 1.0
            assert store.cluster is not None and len(store.cluster._conns) == 3
        finally:
            store.close()
        client = redisconn.client(url, socket_timeout=2)
        try:
            assert int(client.get(keys.rate_keys(keys.tag("ip", "192.0.2.3"), (10,), NOW)[0])
                       or 0) == 1
        finally:
            client.close()

        async def via_asyncio() -> int:
            ac = redisconn.async_client(url, socket_timeout=2)
            try:
                return int(await ac.get(keys.rate_keys(keys.tag("ip", "192.0.2.4"), (10,),
                                                       NOW)[0]) or 0)
            finally:
                await ac.aclose()

        assert asyncio.run(via_asyncio()) == 1
        nodes = redisconn.node_clients(url, socket_timeout=2)
        assert len(nodes) == 3 and all(n.ping() for n in nodes)
        for n in nodes:
            n.close()

        other_ca = TestCa("some other CA").write(tmp_path, "other")
        assert cluster.certs is not None
        wrong = url.replace(str(cluster.certs.ca), str(other_ca))
        plain = url.replace("rediss+cluster://", "redis+cluster://").split("/0?")[0]
        for bad in (wrong, plain):
            s = Store(bad, timeout=0.5, retry_after=5)
            t0 = time.monotonic()
            with pytest.raises(RedisUnavailable):
                s.observe(attempt(), Config.defaults(), now=NOW)
            assert time.monotonic() - t0 < 5
            s.close()
    finally:
        cluster.stop()


def test_a_plain_server_behind_a_cluster_url_is_unavailable(redis_url: str) -> None:
    """A redis+cluster:// URL that reaches a non-cluster server (or a user without CLUSTER
    SLOTS) fails open with the server's reason, like an unreachable cluster."""
    port = redis.Redis.from_url(redis_url).connection_pool.connection_kwargs["port"]
    store = Store(f"redis+cluster://127.0.0.1:{port}", timeout=0.5, retry_after=5)
    with pytest.raises(RedisUnavailable, match="cluster support disabled"):
        store.observe(attempt(), Config.defaults(), now=NOW)
    store.close()


def _masters_of(a: CallAttempt, owners: dict[int, int]) -> set[int]:
    """The masters an INVITE's observe round trip touches."""
    tags = [keys.tag("ip", a.source_ip), keys.tag("caller", a.caller_key),
            keys.tag("callee", a.callee_key), keys.CONFIG_VERSION,
            last_caller_key(a.ruri_user)]
    return {owners[key_slot(t.encode())] for t in tags}


def test_one_dead_master_fails_open_only_the_invites_that_need_it(tmp_path: Path) -> None:
    """Per-master fail-open: with cluster-require-full-coverage no the other masters go on
    serving their slots; INVITEs whose keys all live there are still scored while the dead
    master's are relayed unscored, fast (it is marked down, not dialled per INVITE)."""
    cluster = ClusterSet(tmp_path / "cluster", timeout_ms=500,
                         extra=["--cluster-require-full-coverage", "no"])
    try:
        cluster.start()
        owners = cluster.slot_owners()
        cfg_master = owners[key_slot(keys.CONFIG_VERSION.encode())]
        victim = next(p for p in cluster.running() if p != cfg_master)
        candidates = [attempt(source_ip=f"198.51.100.{i}", from_user=f"+1555013{i:04d}",
                              ruri_user=f"+1555023{i:04d}") for i in range(200)]
        spared = [a for a in candidates if victim not in _masters_of(a, owners)]
        hit = [a for a in candidates if victim in _masters_of(a, owners)]
        assert spared and hit
        store = Store(cluster.url, timeout=0.3, retry_after=30)
        cfg = Config.defaults()
        for a in (spared[0], hit[0]):
            assert store.observe(a, cfg, now=NOW).available
        cluster.kill(victim)
        with pytest.raises(RedisUnavailable):
            store.observe(hit[0], cfg, now=NOW)
        t0 = time.monotonic()
        for a in hit[1:6]:  # marked down: no connect attempt per INVITE
            with pytest.raises(RedisUnavailable, match="marked down"):
                store.observe(a, cfg, now=NOW)
        assert time.monotonic() - t0 < 1.0
        for a in spared[:5]:  # the store as a whole is not marked down
            sig = store.observe(a, cfg, now=NOW)
            assert sig.available and sig.ip_rate[10] >= 1.0
        assert store.observe(spared[0], cfg, now=NOW).ip_rate[10] == 3.0  # counting went on
        store.record(spared[0], Decision(Action.RELAY, 0.1), now=NOW)  # deferred, may be dropped
        store.close()
    finally:
        cluster.stop()
