"""scoring.store.Store against a real redis-server: counters, TTLs, one round trip, fail-open."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator

import msgpack
import pytest
import redis

from scoring import keys, redisconn
from scoring.config import Config
from scoring.model import Action, CallAttempt, Contribution, Decision
from scoring.store import (
    LUA_DIR,
    OBSERVE,
    RECORD,
    RECORD_VERSION,
    RedisUnavailable,
    Store,
    find_decision,
    pack_decision,
    unpack_decision,
)
from tests.redis_replies import as_fields
from tests.unit.scoring.support import attempt, config, dead_redis_url

# A fixed time at the very start of a 300 s (and so of a 10 s) bucket: every observe of a test
# lands in the same buckets and the previous buckets are empty.
NOW = 1_800_000_000.0
assert NOW % 300 == 0


@pytest.fixture(params=["single", "cluster"])
def url(request: pytest.FixtureRequest) -> str:
    """Every store test runs on one redis-server and on a three-master Redis Cluster."""
    name = "redis_url" if request.param == "single" else "redis_cluster_url"
    value: str = request.getfixturevalue(name)
    return value


@pytest.fixture
def r(url: str) -> Iterator[redis.Redis]:
    client = redisconn.client(url)
    yield client
    client.close()


@pytest.fixture
def store(url: str) -> Iterator[Store]:
    s = Store(url, timeout=2.0)
    yield s
    s.close()


@pytest.fixture
def r1(redis_url: str) -> Iterator[redis.Redis]:
    """One redis-server only: for tests that read its INFO or MONITOR stream."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def store1(redis_url: str) -> Iterator[Store]:
    s = Store(redis_url, timeout=2.0)
    yield s
    s.close()


def _sync(store: Store) -> None:
    """Round trip on the store's own connection: its deferred writes are done after this."""
    store.fetch_config()


# ---------------------------------------------------------------------------------------------
# observe: counters


@pytest.mark.parametrize("n", [1, 4, 9])
def test_rates_count_every_invite_in_both_windows(store: Store, n: int) -> None:
    cfg = Config.defaults()
    sig = None
    for _ in range(n):
        sig = store.observe(attempt(), cfg, now=NOW + 1)
    assert sig is not None
    assert sig.available
    assert sig.ip_rate == {10: float(n), 300: float(n)}
    assert sig.caller_rate == {10: float(n), 300: float(n)}
    assert sig.callee_rate == {10: float(n), 300: float(n)}


def test_rates_are_per_entity(store: Store) -> None:
    cfg = Config.defaults()
    for i in range(3):
        store.observe(attempt(from_user=f"u{i}", ruri_user="100"), cfg, now=NOW)
    sig = store.observe(attempt(source_ip="198.51.100.1", from_user="u0", ruri_user="200"), cfg,
                        now=NOW)
    assert sig.ip_rate[10] == 1.0  # a new source IP
    assert sig.caller_rate[10] == 2.0  # u0@example.com called before from another IP
    assert sig.callee_rate[10] == 1.0  # 200 is a new callee


def test_previous_bucket_is_weighted_by_overlap(store: Store) -> None:
    cfg = Config.defaults()
    for _ in range(4):
        store.observe(attempt(), cfg, now=NOW + 5)  # 10 s bucket k
    sig = store.observe(attempt(), cfg, now=NOW + 12.5)  # bucket k+1, 25% into it
    # short window: 1 + 4 * (1 - 0.25) = 4; long window: same 300 s bucket, 5
    assert sig.ip_rate == {10: 4.0, 300: 5.0}


def test_rate_windows_follow_the_config(store: Store) -> None:
    cfg = config(rate__short_window="2", rate__long_window="60")
    sig = store.observe(attempt(), cfg, now=NOW)
    assert set(sig.ip_rate) == {2, 60}
    assert set(sig.caller_rate) == {2, 60}


def test_distinct_callers_counts_from_users_per_ip(store: Store) -> None:
    cfg = Config.defaults()
    sig = None
    for i in range(7):
        for _ in range(3):  # repeats do not count
            sig = store.observe(attempt(from_user=f"user{i}"), cfg, now=NOW)
    assert sig is not None
    assert sig.distinct_callers == 7
    other = store.observe(attempt(source_ip="198.51.100.9", from_user="user0"), cfg, now=NOW)
    assert other.distinct_callers == 1


def test_distinct_callees_and_recent_list_bounded(store: Store) -> None:
    cfg = config(sweep__recent="5")
    sig = None
    for n in range(100, 112):
        sig = store.observe(attempt(ruri_user=str(n)), cfg, now=NOW)
    assert sig is not None
    assert sig.distinct_callees == 12
    assert sig.recent_callees == ("111", "110", "109", "108", "107")


def test_recent_list_length_in_redis_is_bounded(store: Store, r: redis.Redis) -> None:
    cfg = config(sweep__recent="5")
    for n in range(40):
        store.observe(attempt(ruri_user=f"{n:04d}"), cfg, now=NOW)
    recent = f"{keys.tag('ip', '192.0.2.10')}:recent"
    assert r.llen(recent) == 5


def test_long_callee_is_cut_in_the_recent_list(store: Store) -> None:
    sig = store.observe(attempt(ruri_user="9" * 100), Config.defaults(), now=NOW)
    assert sig.recent_callees == ("9" * 32,)


def test_scanner_hits_come_back(store: Store) -> None:
    store.note_scanner("192.0.2.10")
    store.note_scanner("192.0.2.10")
    sig = store.observe(attempt(), Config.defaults(), now=NOW)
    assert sig.scanner_hits == 2
    assert store.observe(attempt(source_ip="192.0.2.99"), Config.defaults(),
                         now=NOW).scanner_hits == 0


def test_ipv6_sources_count_per_network(store: Store, r: redis.Redis) -> None:
    """A campaign rotating its IPv6 source inside one /64 is one source for every per-source
    signal; another /64 is another source; the prefix is live config."""
    cfg = Config.defaults()
    for i in range(5):
        sig = store.observe(attempt(source_ip=f"2001:db8:7:1::{i + 1:x}", from_user=f"u{i}",
                                    ruri_user=f"55501{i:02d}"), cfg, now=NOW)
    assert sig.ip_rate == {10: 5.0, 300: 5.0}
    assert sig.distinct_callers == 5 and sig.distinct_callees == 5
    assert len(sig.recent_callees) == 5
    other = store.observe(attempt(source_ip="2001:db8:7:2::1", from_user="u9"), cfg, now=NOW)
    assert other.ip_rate[10] == 1.0 and other.distinct_callers == 1
    store.note_scanner("2001:db8:7:1::ffff")
    assert store.observe(attempt(source_ip="2001:db8:7:1::42"), cfg,
                         now=NOW).scanner_hits == 1
    per_address = config(source__ipv6_prefix="128")
    assert store.observe(attempt(source_ip="2001:db8:7:1::1"), per_address,
                         now=NOW).ip_rate[10] == 1.0
    wider = config(source__ipv6_prefix="48")
    assert store.observe(attempt(source_ip="2001:db8:7:3::1"), wider, now=NOW).ip_rate[10] == 1.0
    assert store.observe(attempt(source_ip="2001:db8:7:4::1"), wider, now=NOW).ip_rate[10] == 2.0
    # rejects and diverts nudge the network's reputation, which every address in it then reads
    d = Decision(Action.REJECT, 1.0, (Contribution("rate_ip", 1.0, 1.0, "x"),), rule="score")
    store.record(attempt(source_ip="2001:db8:7:1::1", call_id="v6"), d, NOW)
    _sync(store)
    assert r.exists("spitwall:{ip:2001:db8:7:1::/64}:rep")
    assert store.observe(attempt(source_ip="2001:db8:7:1::77"), cfg,
                         now=NOW).reputation_ip > 0


def test_a_process_that_only_defers_keeps_its_unread_replies_bounded(
        store: Store, r: redis.Redis) -> None:
    """Kamailio's timer process counts (failure route) without ever making a round trip: its
    deferred replies are read once MAX_PENDING are waiting, not left to pile up."""
    from scoring.store import MAX_PENDING

    store.fetch_config()  # connect
    for _ in range(3 * MAX_PENDING):
        store.count("deferred_only")
        pending = store.cluster.pending if store.cluster is not None else store._pending
        assert pending <= MAX_PENDING
    _sync(store)
    assert r.hget(keys.STATS, "deferred_only") == str(3 * MAX_PENDING).encode()


def test_versions_come_back(store: Store, r: redis.Redis) -> None:
    sig = store.observe(attempt(), Config.defaults(), now=NOW)
    assert (sig.config_version, sig.lists_version) == (0, 0)
    r.set(keys.CONFIG_VERSION, 7)
    r.set(keys.LISTS_VERSION, 3)
    sig = store.observe(attempt(), Config.defaults(), now=NOW)
    assert (sig.config_version, sig.lists_version) == (7, 3)


def test_hostile_identities_are_counted_safely(store: Store, r: redis.Redis) -> None:
    evil = attempt(from_user="x" * 10_000, from_domain="{cfg}", ruri_user="a}b{c\r\n",
                   source_ip="{cfg}")
    sig = store.observe(evil, Config.defaults(), now=NOW)
    assert sig.ip_rate[10] == 1.0
    for k in r.scan_iter("*"):
        name = k.decode("utf-8", "surrogateescape")
        assert len(name) < 200
        assert name.count("{") == 1 and name.count("}") == 1
        assert not name.startswith("spitwall:{cfg}")


# ---------------------------------------------------------------------------------------------
# every key has a TTL, except the few fixed-size operator/record keys


def test_every_written_key_has_a_ttl(store: Store, r: redis.Redis) -> None:
    cfg = Config.defaults()
    for i in range(5):
        a = attempt(call_id=f"c{i}", from_user=f"u{i}", ruri_user=str(100 + i))
        store.observe(a, cfg, now=time.time())
        store.record(a, Decision(Action.RELAY, 0.0))
    store.note_scanner("192.0.2.10")
    store.count("custom")
    store.observe(attempt(from_user="", from_domain="", ruri_user=""), cfg)
    _sync(store)
    no_ttl = set()
    names = []
    for k in r.scan_iter("*"):
        name = k.decode()
        names.append(name)
        assert name.startswith("spitwall:")
        ttl = r.ttl(k)
        if ttl == -1:
            no_ttl.add(name)
        else:
            assert ttl > 0, name
    assert no_ttl == {keys.DECISION_SEQ, keys.STATS}
    # and the request path really wrote per-entity keys of every family
    for part in (":inv:10:", ":inv:300:", ":callers:", ":callees:", ":recent", ":scan",
                 "{caller:", "{callee:", "{dec}:b0"):
        assert any(part in n for n in names), part


def test_ttls_match_the_windows(store: Store, r: redis.Redis) -> None:
    now = time.time()
    store.observe(attempt(), Config.defaults(), now=now)
    base = keys.tag("ip", "192.0.2.10")
    cur10, _, cur300, _ = keys.rate_keys(base, (10, 300), now)
    assert 0 < r.ttl(cur10) <= 20
    assert 20 < r.ttl(cur300) <= 600
    assert 300 < r.ttl(keys.source_keys(base, 300, now)[0]) <= 600
    assert 0 < r.ttl(f"{base}:recent") <= 300


# ---------------------------------------------------------------------------------------------
# one round trip per INVITE


def _commandstats(r: redis.Redis) -> dict[str, int]:
    info = r.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in info.items()}


def _lua_commands(path: str) -> set[str]:
    text = (LUA_DIR / path).read_text()
    return {m.lower() for m in re.findall(r"redis\.call\('(\w+)'", text)}


def test_observe_is_three_evalsha_one_mget_one_set(store1: Store, r1: redis.Redis) -> None:
    store, r = store1, r1
    cfg = Config.defaults()
    store.observe(attempt(), cfg, now=NOW)  # warm-up: connect and SCRIPT LOAD
    r.ping()
    before = _commandstats(r)
    store.observe(attempt(), cfg, now=NOW)
    after = _commandstats(r)
    delta = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    delta.pop("info", None)
    assert delta.pop("evalsha") == 3
    assert delta.pop("mget") == 1
    assert delta.pop("set") == 1  # the callee's last caller
    # whatever is left was run by the scripts themselves, never by the client
    assert set(delta) <= _lua_commands("observe.lua"), delta
    assert "script|load" not in delta and "script|exists" not in delta


def _monitor(host: str, port: int) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=5)
    sock.sendall(b"MONITOR\r\n")
    assert sock.recv(5) == b"+OK\r\n"
    return sock


def test_observe_sends_exactly_five_commands(store1: Store, r1: redis.Redis) -> None:
    """MONITOR tells the client's commands from the scripts' ones ('[0 lua]')."""
    store, r = store1, r1
    cfg = Config.defaults()
    store.observe(attempt(), cfg, now=NOW)
    store.record(attempt(), Decision(Action.RELAY, 0.0), now=NOW)
    store.observe(attempt(), cfg, now=NOW)  # drains the deferred record replies
    kw = r.connection_pool.connection_kwargs
    host, port = store._conn._sock.getsockname()[:2]
    me = f"{host}:{port}"
    sock = _monitor(kw["host"], kw["port"])
    try:
        store.observe(attempt(), cfg, now=NOW)
        r.echo("end-of-test-marker")
        buf = b""
        deadline = time.monotonic() + 5
        while b"end-of-test-marker" not in buf and time.monotonic() < deadline:
            buf += sock.recv(65536)
    finally:
        sock.close()
    client_cmds = []
    script_cmds = 0
    for line in buf.decode("utf-8", "replace").splitlines():
        m = re.match(r'^\+[\d.]+ \[\d+ ([^\]]+)\] "(\w+)"', line)
        assert m or not line.startswith("+"), line
        if m and m.group(1) == me:
            client_cmds.append(m.group(2).lower())
        elif m and m.group(1) == "lua":
            script_cmds += 1
    assert script_cmds > 10  # the stream was read: the scripts' own commands are in it
    assert client_cmds == ["evalsha", "evalsha", "evalsha", "mget", "set"]


# ---------------------------------------------------------------------------------------------
# decisions: record and find, the bounded ring


def _decision() -> Decision:
    return Decision(Action.DIVERT, 0.42, (Contribution("rate_ip", 0.6, 0.35, "12 INVITEs/10s"),
                                          Contribution("sweep", 0.0, 0.5, "")), degraded=False)


def test_record_then_find(store: Store, r: redis.Redis) -> None:
    a = attempt(call_id="abc-123@host", user_agent="Linphone/5.0")
    store.record(a, _decision(), now=NOW)
    _sync(store)
    d = find_decision(r, "abc-123@host")
    assert d is not None
    assert d["v"] == RECORD_VERSION
    assert d["call_id"] == "abc-123@host"
    assert d["action"] == "divert"
    assert d["score"] == 0.42
    assert d["rule"] == "score"
    assert d["degraded"] is False
    assert d["ts"] == NOW
    assert d["checks"] == [["rate_ip", 0.6, 0.35, "12 INVITEs/10s"], ["sweep", 0.0, 0.5, ""]]
    assert d["call"] == {"src": "192.0.2.10:5060/udp", "from": "sip:alice@example.com",
                         "ruri": "sip:15550100@carrier.example", "ua": "Linphone/5.0"}
    assert r.hget(keys.STATS, "action:divert") == b"1"
    assert find_decision(r, "other") is None


def test_ring_stays_bounded(store: Store, r: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keys, "DECISION_BUCKET_SIZE", 5)
    for i in range(30):
        store.record(attempt(call_id=f"call-{i}"), _decision(), now=NOW)
    _sync(store)
    for i in range(15, 30):
        assert find_decision(r, f"call-{i}") is not None, i
    total = sum(r.hlen(b) for b in keys.decision_buckets())
    assert 15 <= total <= 20
    assert find_decision(r, "call-0") is None
    for b in keys.decision_buckets():
        assert r.hlen(b) <= 5
        assert r.ttl(b) > 0


def test_pack_unpack_round_trip_and_bounds() -> None:
    a = attempt(from_uri="sip:" + "x" * 1000 + "@evil", user_agent="u" * 1000)
    data = unpack_decision(pack_decision(a, _decision(), NOW))
    assert len(data["call"]["from"]) == 256
    assert len(data["call"]["ua"]) == 128


def test_unpack_refuses_unknown_version() -> None:
    with pytest.raises(ValueError, match="version"):
        unpack_decision(msgpack.packb({"v": 99}))
    with pytest.raises(ValueError, match="version"):
        unpack_decision(msgpack.packb([1, 2]))


def test_script_sha_matches_source() -> None:
    import hashlib

    for s in (OBSERVE, RECORD):
        assert s.sha == hashlib.sha1(s.source.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# fail-open: Redis down, NOSCRIPT


def test_dead_redis_raises_fast_and_is_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(dead_redis_url(), timeout=0.2, retry_after=0.3)
    made: list[int] = []
    assert store.pool is not None
    real = store.pool.make_connection

    def counting() -> object:
        made.append(1)
        return real()

    monkeypatch.setattr(store.pool, "make_connection", counting)
    a, cfg = attempt(), Config.defaults()
    started = time.monotonic()
    with pytest.raises(RedisUnavailable):
        store.observe(a, cfg, now=NOW)
    assert time.monotonic() - started < 0.5
    assert made == [1]
    assert store.errors == 1
    for _ in range(20):  # within retry_after: no new connection attempt at all
        with pytest.raises(RedisUnavailable, match="marked down"):
            store.observe(a, cfg, now=NOW)
        with pytest.raises(RedisUnavailable):
            store.record(a, Decision(Action.RELAY, 0.0))
    assert made == [1]
    assert time.monotonic() - started < 0.3
    time.sleep(0.35)
    with pytest.raises(RedisUnavailable):
        store.observe(a, cfg, now=NOW)
    assert made == [1, 1]  # retried once retry_after had passed
    assert store.errors == 2


def test_recovers_when_redis_comes_back(redis_server: object, redis_url: str) -> None:
    store = Store(redis_url, timeout=0.5, retry_after=0.2)
    try:
        assert store.observe(attempt(), Config.defaults(), now=NOW).available
        redis_server.stop()  # type: ignore[attr-defined]
        with pytest.raises(RedisUnavailable):
            store.observe(attempt(), Config.defaults(), now=NOW)
        redis_server.start()  # type: ignore[attr-defined]
        time.sleep(0.25)
        sig = store.observe(attempt(), Config.defaults(), now=NOW)
        assert sig.available
    finally:
        store.close()


def test_noscript_after_script_flush_recovers(store: Store, r: redis.Redis) -> None:
    cfg = Config.defaults()
    store.observe(attempt(), cfg, now=NOW)
    r.script_flush()
    assert r.script_exists(OBSERVE.sha) == [False]
    sig = store.observe(attempt(), cfg, now=NOW)
    assert sig.ip_rate[10] == 2.0  # counted once per observe, not twice
    if store.cluster is None:
        assert r.script_exists(OBSERVE.sha, RECORD.sha) == [True, True]
    else:  # reloaded only on the masters that answered NOSCRIPT (SCRIPT EXISTS needs all)
        assert store.cluster.redirects == 1
    store.record(attempt(call_id="after-flush"), _decision(), now=NOW)
    _sync(store)
    assert find_decision(r, "after-flush") is not None


def test_redis_error_reply_becomes_unavailable(store: Store, r: redis.Redis) -> None:
    cfg = Config.defaults()
    base = keys.tag("ip", "192.0.2.10")
    r.hset(keys.source_keys(base, 300, NOW)[4], "x", "y")  # `recent` of the wrong type
    with pytest.raises(RedisUnavailable, match="redis error"):
        store.observe(attempt(), cfg, now=NOW)


@pytest.mark.parametrize("raw", [
    pytest.param({"enabled": "false"}, id="one-override"),
    pytest.param({"divert_threshold": "0.4", "weight.sweep": "2"}, id="two-overrides"),
])
def test_fetch_config_applies_overrides(store: Store, r: redis.Redis,
                                        raw: dict[str, str]) -> None:
    """Regression: redis-py 8 speaks RESP3, where HGETALL is a map, not a flat list."""
    r.hset(keys.CONFIG, mapping=as_fields(raw))
    r.set(keys.CONFIG_VERSION, 5)
    cfg = store.fetch_config()
    assert cfg.version == 5
    assert cfg.errors == ()
    expected = Config.from_raw(raw).as_dict()
    assert cfg.as_dict() == expected


def test_fetch_config_without_overrides(store: Store, r: redis.Redis) -> None:
    r.set(keys.CONFIG_VERSION, 5)
    cfg = store.fetch_config()
    assert cfg.version == 5
    assert cfg.as_dict() == Config.defaults().as_dict()


def test_fetch_lists(store: Store, r: redis.Redis) -> None:
    from lists.store import ListStore

    ListStore(r).add("block", "ip", "203.0.113.9", user="u")
    lists = store.fetch_lists()
    assert lists.version == 1
    assert lists.block.match(ip="203.0.113.9") is not None


def test_deferred_write_failure_does_not_fail_the_next_call(store: Store, r: redis.Redis) -> None:
    r.set(keys.STATS, "not a hash")
    store.count("x")  # HINCRBY on a string: WRONGTYPE, read and logged later
    sig = store.observe(attempt(), Config.defaults(), now=NOW)
    assert sig.available


def test_attempt_without_identities(store: Store) -> None:
    sig = store.observe(CallAttempt(call_id="x", source_ip=""), Config.defaults(), now=NOW)
    assert sig.distinct_callers == 1
    assert sig.distinct_callees == 0
    assert sig.recent_callees == ()


def test_a_user_without_script_load_fails_open_and_is_not_retried(redis_url: str,
                                                                   r1: redis.Redis) -> None:
    """A misconfigured Redis user (no SCRIPT LOAD) is as good as Redis down: fail open, retry
    after `retry_after`, no exception other than RedisUnavailable."""
    r1.execute_command("ACL", "SETUSER", "noscripts", "on", ">pw", "~*", "+@all", "-script")
    try:
        url = redis_url.replace("redis://", "redis://noscripts:pw@")
        store = Store(url, timeout=0.5, retry_after=5)
        with pytest.raises(RedisUnavailable, match="script"):
            store.observe(attempt(), Config.defaults(), now=NOW)
        with pytest.raises(RedisUnavailable, match="marked down"):
            store.observe(attempt(), Config.defaults(), now=NOW)
        store.close()
    finally:
        r1.execute_command("ACL", "DELUSER", "noscripts")
