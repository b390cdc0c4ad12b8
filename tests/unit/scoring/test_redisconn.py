"""Redis URL forms, Sentinel included: parsing is strict and its errors name the wrong part."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis
import redis.asyncio.sentinel
import redis.sentinel

from scoring import redisconn
from scoring.redisconn import ClusterUrl, SentinelUrl
from tests.redis_cluster import ClusterSet


def test_full_sentinel_url_is_parsed() -> None:
    u = SentinelUrl.parse("redis+sentinel://proxy:s%40cret@10.0.0.1:26380,[::1],sent-b/spit/3"
                          "?sentinel_password=pw&sentinel_timeout=0.5")
    assert u.sentinels == (("10.0.0.1", 26380), ("::1", 26379), ("sent-b", 26379))
    assert (u.service, u.db) == ("spit", 3)
    assert (u.username, u.password) == ("proxy", "s@cret")
    assert (u.sentinel_username, u.sentinel_password, u.sentinel_timeout) == (None, "pw", 0.5)


def test_defaults_and_password_only_credentials() -> None:
    u = SentinelUrl.parse("redis+sentinel://secret@h/mymaster")
    assert u.sentinels == (("h", 26379),)
    assert (u.service, u.db, u.username, u.password) == ("mymaster", 0, None, "secret")
    assert SentinelUrl.parse("REDIS+SENTINEL://h:1/m/").db == 0


@pytest.mark.parametrize(("url", "message"), [
    ("redis://h/0", "not a redis+sentinel:// or rediss+sentinel:// URL"),
    ("redis+sentinel://h:26379", "service name"),
    ("redis+sentinel://h:26379/", "service name"),
    ("redis+sentinel://h/bad name", "service name must be"),
    ("redis+sentinel://h/m/x", "database must be"),
    ("redis+sentinel://h/m/1/2", "path must be"),
    ("redis+sentinel://h:0/m", "bad sentinel port"),
    ("redis+sentinel://h:99999/m", "bad sentinel port"),
    ("redis+sentinel://h:abc/m", "bad sentinel port"),
    ("redis+sentinel://h,,i/m", "empty sentinel address"),
    ("redis+sentinel://[::1/m", "bad IPv6"),
    ("redis+sentinel://h/m?password=x", "unknown sentinel URL parameter 'password'"),
    ("redis+sentinel://h/m?sentinel_timeout=0", "sentinel_timeout"),
    ("redis+sentinel://h/m?sentinel_timeout=abc", "sentinel_timeout"),
    ("redis+sentinel://h/m#frag", "fragment"),
])
def test_malformed_urls_are_refused_precisely(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("+", r"\+")):
        SentinelUrl.parse(url)


def test_errors_never_echo_the_password() -> None:
    with pytest.raises(ValueError) as err:
        SentinelUrl.parse("redis+sentinel://u:topsecret@h:1/m/x")
    assert "topsecret" not in str(err.value)


def test_credentials_are_replaced_round_trip() -> None:
    u = SentinelUrl.parse("redis+sentinel://old:pw@[::1]:1,h:2/svc/4?sentinel_password=s p")
    url = u.with_credentials("spitwall-proxy", "n:e/w@")
    again = SentinelUrl.parse(url)
    assert again == SentinelUrl(u.sentinels, "svc", 4, "spitwall-proxy", "n:e/w@",
                                None, "s p", None)


def test_redacted_hides_passwords() -> None:
    assert redisconn.redacted("redis://u:pw@h:1/0") == "redis://u:***@h:1/0"
    assert redisconn.redacted("redis+sentinel://u:pw@a:1,b:2/m?sentinel_password=x&y=1") == \
        "redis+sentinel://u:***@a:1,b:2/m?sentinel_password=***&y=1"
    assert redisconn.redacted("redis://h:1/0") == "redis://h:1/0"


def test_plain_urls_go_to_redis_py(redis_url: str) -> None:
    c = redisconn.client(redis_url, socket_timeout=2)
    try:
        assert c.ping()
    finally:
        c.close()
    pool = redisconn.connection_pool(redis_url)
    assert type(pool) is redis.ConnectionPool


def test_sentinel_pool_asks_the_sentinels_lazily() -> None:
    """Building a client does not connect: a Kamailio child can be set up while Redis and the
    sentinels are down, and fails open at the first call instead."""
    pool = redisconn.connection_pool("redis+sentinel://127.0.0.1:1/m", socket_timeout=0.2)
    assert isinstance(pool, redis.sentinel.SentinelConnectionPool)
    conn = pool.make_connection()
    with pytest.raises(redis.ConnectionError):
        conn.connect()  # type: ignore[no-untyped-call]


# ---------------------------------------------------------------------------------------------
# redis+cluster://


def test_cluster_url_is_parsed() -> None:
    u = ClusterUrl.parse("redis+cluster://proxy:s%40cret@10.0.0.1:7000,[::1],node-c:7002/0")
    assert u.nodes == (("10.0.0.1", 7000), ("::1", 6379), ("node-c", 7002))
    assert (u.username, u.password) == ("proxy", "s@cret")
    assert ClusterUrl.parse("REDIS+CLUSTER://pw@h") == ClusterUrl((("h", 6379),), None, "pw")
    assert redisconn.is_cluster("redis+cluster://h") and not redisconn.is_cluster("redis://h")


@pytest.mark.parametrize(("url", "message"), [
    ("redis://h/0", "not a redis+cluster:// or rediss+cluster:// URL"),
    ("redis+cluster://h:7000/1", "only database 0"),
    ("redis+cluster://h:7000/0/x", "only database 0"),
    ("redis+cluster://h:0", "bad cluster node port"),
    ("redis+cluster://h:x", "bad cluster node port"),
    ("redis+cluster://h,,i", "empty cluster node address"),
    ("redis+cluster://[::1", "bad IPv6 cluster node"),
    ("redis+cluster://h?timeout=1", "takes no parameters"),
    ("redis+cluster://h?ssl_ca_certs=/x", "TLS options belong to rediss"),
    ("rediss+cluster://h?ssl_ca_cert=/x", "unknown cluster URL parameter 'ssl_ca_cert'"),
    ("rediss+cluster://h?ssl_cert_reqs=maybe", "ssl_cert_reqs must be"),
    ("rediss+cluster://h?ssl_check_hostname=1", "ssl_check_hostname must be"),
    ("rediss+cluster://h?ssl_certfile=", "needs a file path"),
    ("redis+cluster://h#x", "fragment"),
])
def test_malformed_cluster_urls_are_refused_precisely(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("+", r"\+")):
        ClusterUrl.parse(url)
    if redisconn.is_cluster(url):
        with pytest.raises(ValueError):
            redisconn.check_url(url)


def test_cluster_credentials_round_trip_and_redaction() -> None:
    u = ClusterUrl.parse("redis+cluster://a:b@h1:1,[::1]:2")
    url = u.with_credentials("spitwall-ops", "n:e/w@")
    assert ClusterUrl.parse(url) == ClusterUrl(u.nodes, "spitwall-ops", "n:e/w@")
    assert "n:e/w@" not in redisconn.redacted(url) and "n%3Ae%2Fw%40" not in \
        redisconn.redacted(url)
    with pytest.raises(ValueError, match="one pool per node"):
        redisconn.connection_pool(url)


def test_cluster_clients_find_every_node(redis_cluster: ClusterSet) -> None:
    url = redis_cluster.url  # its first seed is dead: the next one is asked
    c = redisconn.client(url, socket_timeout=2)
    try:
        for i in range(20):  # routed by slot: lands on several masters
            c.set(f"spitwall:{{ip:192.0.2.{i}}}:probe", i)
        assert [int(c.get(f"spitwall:{{ip:192.0.2.{i}}}:probe") or -1)
                for i in range(20)] == list(range(20))
    finally:
        c.close()
    nodes = redisconn.node_clients(url, socket_timeout=2)
    assert sorted(n.connection_pool.connection_kwargs["port"] for n in nodes) == \
        sorted(redis_cluster.ports)
    holding = [n for n in nodes if n.keys("spitwall:{ip:*:probe")]
    assert len(holding) >= 2
    for n in nodes:
        n.close()


def test_tls_cluster_url_keeps_its_options() -> None:
    u = ClusterUrl.parse("rediss+cluster://u:p@h:7000/0?ssl_ca_certs=/etc/ca.pem"
                         "&ssl_check_hostname=false&ssl_cert_reqs=required")
    assert u.tls and u.nodes == (("h", 7000),)
    kw = u.redis_kwargs(socket_timeout=1)
    assert kw["ssl"] is True and kw["ssl_ca_certs"] == "/etc/ca.pem"
    assert kw["ssl_check_hostname"] is False and kw["ssl_cert_reqs"] == "required"
    assert "ssl" not in u.node_kwargs() and u.connection_class() is redis.SSLConnection
    again = ClusterUrl.parse(u.with_credentials("spitwall-proxy", "x"))
    assert again == ClusterUrl(u.nodes, "spitwall-proxy", "x", True, u.tls_options)
    assert ClusterUrl.parse("redis+cluster://h").connection_class() is redis.Connection


def test_a_dead_sentinel_is_skipped_at_once() -> None:
    """redis-py's clients retry a refused connection with back-off (about 4 s each); towards
    the sentinels we do not: the next sentinel is the retry, and a Kamailio child asks them at
    every reconnection, on an INVITE."""
    u = SentinelUrl.parse("redis+sentinel://127.0.0.1:1,127.0.0.1:2/svc/0")
    t0 = time.monotonic()
    with pytest.raises(redis.sentinel.MasterNotFoundError):
        u.sentinel(socket_timeout=0.2,
                   socket_connect_timeout=0.2).discover_master("svc")  # type: ignore[no-untyped-call]
    assert time.monotonic() - t0 < 1.0  # was 8 s for these two dead sentinels


def test_a_dead_sentinel_is_skipped_at_once_by_asyncio_clients_too() -> None:
    u = SentinelUrl.parse("redis+sentinel://127.0.0.1:1,127.0.0.1:2/svc/0")
    sentinel = u.async_sentinel(socket_timeout=0.2, socket_connect_timeout=0.2)
    assert all(type(s.get_retry()).__module__ == "redis.asyncio.retry"
               for s in sentinel.sentinels)

    async def discover() -> None:
        await sentinel.discover_master("svc")

    t0 = time.monotonic()
    with pytest.raises(redis.asyncio.sentinel.MasterNotFoundError):
        asyncio.run(discover())
    assert time.monotonic() - t0 < 1.0
