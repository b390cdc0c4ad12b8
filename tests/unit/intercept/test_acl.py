"""intercept.acl against a real redis-server: each role can do its job and nothing it must not.

The users are created with the code the lab runs (`apply_users`) on the session redis-server;
every check connects as that user and runs the real command (or the project's real code: the
proxy's Store, the operator CLI, the answering machine's queue), so a missing or excess
permission shows up as it would in production.
"""

from __future__ import annotations

import functools
import json
import os
import re
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.exceptions import NoPermissionError

from intercept import acl, names, provision
from media.queue import MessageQueue, index_key, meta_key
from ops import cli, metrics
from ops.lab import redis_argv
from ops.procs import free_port, pid_alive, redis_ping, start_process, stop_pid, wait_until
from scoring import config_admin, keys, reputation
from scoring.model import Action, Contribution, Decision
from scoring.store import Store
from tests.redis_cluster import ClusterSet
from tests.redis_replies import as_fields, bytes_entries
from tests.unit.intercept.test_provision import make_cert
from tests.unit.scoring.support import attempt

ClientFor = Callable[[str], redis.Redis]
REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def admin(redis_url: str) -> Iterator[redis.Redis]:
    """The ``default`` user (full rights): creates the users and seeds li keys."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def passwords(admin: redis.Redis) -> dict[str, str]:
    pw = acl.generate_passwords()
    acl.apply_users(admin, pw)
    return pw


@pytest.fixture
def urls(redis_url: str, passwords: dict[str, str]) -> dict[str, str]:
    return {role: acl.user_url(redis_url, role, pw) for role, pw in passwords.items()}


@pytest.fixture
def client_for(urls: dict[str, str]) -> Iterator[ClientFor]:
    made: list[redis.Redis] = []

    def make(role: str) -> redis.Redis:
        c = redis.Redis.from_url(urls[role], socket_timeout=5)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture
def li_state(admin: redis.Redis) -> None:
    """Some intercept state, as the admin and the proxy would leave it."""
    target = provision.build_target(liid="CASE-1", identities=["+15551230001"],
                                    deliver_to="sip:li@192.0.2.5", cert_pem=make_cert())
    provision.add_target(admin, target, user="test")
    admin.xadd(names.EVENTS, {"v": "1", "id": "e1", "body": b"\x30\x82"})
    admin.xadd(names.DEAD, {"v": "1", "id": "e0", "body": b"\x30\x82"})


LI_KEYS = [names.TARGETS, names.VERSION, names.AUDIT, names.RECORDERS, names.EVENTS, names.DEAD,
           "spitwall:li:{li}:does-not-exist"]


def _noperm(fn: Callable[[], Any]) -> str:
    with pytest.raises(NoPermissionError) as caught:
        fn()
    return str(caught.value)


# -- the glob patterns ---------------------------------------------------------------------
@pytest.mark.parametrize("key", [
    "spitwall:{cfg}:config", "spitwall:{ip:192.0.2.1}:inv:10:1", "spitwall:{queue}:spam",
    "spitwall:{cfg}:audit", "spitwall:la", "spitwall:l", "spitwall:li", "spitwall:lix:1",
    "spitwall:li{x}:1", "spitwall:", "spitwall:L", "spitwall:Li:x",
])
def test_ops_patterns_allow_every_non_li_key(admin: redis.Redis, passwords: dict[str, str],
                                             key: str) -> None:
    for role in (acl.OPS, acl.MEDIA):
        reply = admin.execute_command("ACL", "DRYRUN", acl.user_name(role), "GET", key)
        assert reply in (b"OK", "OK"), (role, key, reply)


@pytest.mark.parametrize("key", [
    "spitwall:li:", "spitwall:li:{li}:targets", "spitwall:li:{ev}:events", "spitwall:li:x",
    "spitwall:li::", "other", "", "Spitwall:{cfg}:config", "xspitwall:{cfg}:config",
])
def test_ops_patterns_deny_li_and_foreign_keys(admin: redis.Redis, passwords: dict[str, str],
                                               key: str) -> None:
    for role in (acl.OPS, acl.MEDIA):
        reply = admin.execute_command("ACL", "DRYRUN", acl.user_name(role), "GET", key)
        assert b"no permissions" in reply, (role, key, reply)


# -- ops -----------------------------------------------------------------------------------
def test_ops_cannot_read_or_detect_li_keys(client_for: ClientFor, li_state: None) -> None:
    ops = client_for(acl.OPS)
    for key in LI_KEYS:  # existing or not: the same NOPERM, so nothing to detect
        for fn in (lambda k=key: ops.get(k), lambda k=key: ops.exists(k),
                   lambda k=key: ops.type(k), lambda k=key: ops.hgetall(k),
                   lambda k=key: ops.xrange(k), lambda k=key: ops.ttl(k),
                   lambda k=key: ops.delete(k), lambda k=key: ops.hset(k, "a", "b"),
                   lambda k=key: ops.execute_command("OBJECT", "ENCODING", k),
                   lambda k=key: ops.execute_command("MEMORY", "USAGE", k)):
            assert "no permissions" in _noperm(fn)
    # a script reading a key it did not declare is checked too
    script = "return redis.call('GET', 'spitwall:li:{li}:version')"
    with pytest.raises(redis.ResponseError, match=r"can't access|no permissions"):
        ops.eval(script, 0)


@pytest.mark.parametrize("command", [
    ("SCAN", "0"), ("SCAN", "0", "MATCH", "spitwall:li:*"), ("KEYS", "*"), ("DBSIZE",),
    ("RANDOMKEY",), ("MONITOR",), ("INFO", "keyspace"), ("MEMORY", "STATS"),
    ("CLIENT", "LIST"), ("CLIENT", "TRACKING", "on", "BCAST", "PREFIX", "spitwall:li:"),
    ("CONFIG", "GET", "*"), ("DEBUG", "OBJECT", "x"), ("SLOWLOG", "GET"), ("ACL", "LOG"),
    ("ACL", "GETUSER", "spitwall-li-admin"), ("ACL", "LIST"), ("SORT", "spitwall:x"),
    ("FLUSHALL",), ("FLUSHDB",), ("SWAPDB", "0", "1"), ("SUBSCRIBE", "__keyspace@0__:x"),
    ("PSUBSCRIBE", "__keyspace@0__:spitwall:li:*"), ("PUBSUB", "CHANNELS"),
    ("FUNCTION", "LIST"), ("SCRIPT", "FLUSH"), ("CLUSTER", "GETKEYSINSLOT", "0", "10"),
    ("SYNC",), ("LATENCY", "LATEST"), ("OBJECT", "FREQ", "spitwall:x"),
])
def test_ops_cannot_enumerate_keys(client_for: ClientFor, admin: redis.Redis,
                                   command: tuple[str, ...]) -> None:
    why = admin.execute_command("ACL", "DRYRUN", acl.user_name(acl.OPS), *command)
    assert b"no permissions" in why
    if command[0] == "DEBUG":  # refused by enable-debug-command before the ACL check
        return
    ops = client_for(acl.OPS)
    conn = ops.connection_pool.get_connection()
    try:
        conn.send_command(*command)
        with pytest.raises(NoPermissionError):
            conn.read_response()
    finally:
        ops.connection_pool.release(conn)


def test_ops_cli_works_as_ops_user(urls: dict[str, str], tmp_path: Path, admin: redis.Redis,
                                   capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch, li_state: None) -> None:
    """Every kind of operator command, run by the real CLI with the ops user."""
    monkeypatch.delenv("SPITWALL_REDIS", raising=False)
    monkeypatch.setenv("SPITWALL_QUEUE_DIR", str(tmp_path / "queue"))
    # a stored decision and a queued message for explain / queue commands
    store = Store(urls[acl.PROXY], timeout=2.0)
    try:
        dec = Decision(Action.REJECT, 0.9, (Contribution("rate_ip", 0.9, 1.0, "fast"),),
                       rule="score")
        store.record(attempt(call_id="c-ops@x"), dec)
        store.versions()  # drains the deferred replies
    finally:
        store.close()
    media = redis.Redis.from_url(urls[acl.MEDIA])
    msg = MessageQueue(media, tmp_path / "queue").store(
        "spam", b"\x00\x00" * 800, {"caller": "+15550001", "caller_key": "tel:15550001",
                                     "source_ip": "192.0.2.9"})
    media.close()
    trust = tmp_path / "trust"
    trust.mkdir()
    export = tmp_path / "lists.json"
    feed = tmp_path / "feed.txt"
    feed.write_text("+15550100001\n+15550100002,robocalls\n")
    ops_url = urls[acl.OPS]
    commands = [
        ["config", "show"], ["config", "set", "divert_threshold", "0.35"],
        ["config", "set", "stir.trust_dir", str(trust)], ["config", "reset", "divert_threshold"],
        ["list", "add", "block", "ip", "198.51.100.7", "--ttl", "60", "--reason", "t"],
        ["list", "show", "block"], ["list", "export", str(export)],
        ["list", "remove", "block", "ip", "198.51.100.7"], ["list", "import", str(export)],
        ["explain", "c-ops@x"], ["audit"], ["stats"],
        ["report", "+15550002", "spam", "--ip", "192.0.2.8"], ["report", "+15550002", "show"],
        ["queue", "list"], ["queue", "mark", msg.id, "ham"],
        ["queue", "export", msg.id, str(tmp_path)], ["stir", "fetch"],
        ["numbers", "import", "block", str(feed)], ["numbers", "add", "dno", "+18005550199"],
        ["numbers", "check", "+15550100002"], ["numbers", "count"],
        ["numbers", "export", "block", str(tmp_path / "numbers.txt")],
        ["numbers", "remove", "dno", "+18005550199"], ["numbers", "clear", "block"],
    ]
    for argv in commands:
        capsys.readouterr()
        rc = cli.main([*argv, "--redis", ops_url])
        _out, err = capsys.readouterr()
        assert rc == 0, (argv, err)
    # and the intercept commands are refused, with nothing shown
    for argv in (["intercept", "list"], ["intercept", "show", "CASE-1"], ["recorder", "list"],
                 ["intercept", "audit"], ["intercept", "remove", "CASE-1"]):
        rc = cli.main([*argv, "--redis", ops_url])
        out, err = capsys.readouterr()
        assert rc == 1 and "ACL" in err and "CASE" not in out, argv
    assert admin.hexists(names.TARGETS, "CASE-1")


# -- media ---------------------------------------------------------------------------------
def test_media_user_runs_the_answering_machine_calls(client_for: ClientFor,
                                                     tmp_path: Path) -> None:
    media = client_for(acl.MEDIA)
    cfg, _raw = config_admin.show(media)
    q = MessageQueue(media, tmp_path, max_items=1)
    first = q.store("voicemail", b"\x00\x00" * 800, {"caller": "a"})
    q.store("voicemail", b"\x00\x00" * 800, {"caller": "b"})  # trims the first (max_items=1)
    assert [m.meta["caller"] for m in q.list("voicemail")] == ["b"]
    with pytest.raises(ValueError, match="no queued message"):
        q.get(first.id)
    out = reputation.apply_feedback(media, caller="+15550003", ip="192.0.2.3",
                                    kind="report_spam",
                                    half_life=cfg.get_float("reputation.half_life"))
    assert set(out) == {"caller", "ip"}
    assert "no permissions" in _noperm(lambda: media.get(names.TARGETS))
    assert "no permissions" in _noperm(lambda: media.execute_command("SCAN", "0"))
    assert "no permissions" in _noperm(lambda: media.execute_command("FLUSHALL"))


# -- proxy ---------------------------------------------------------------------------------
def test_proxy_store_works_as_proxy_user(urls: dict[str, str], admin: redis.Redis,
                                         caplog: pytest.LogCaptureFixture) -> None:
    """The request-path Store, every method, with the proxy user: no error of any kind."""
    admin.script_flush()  # so the Store also loads its scripts itself
    store = Store(urls[acl.PROXY], timeout=2.0)
    store.watch_keys = (names.VERSION,)  # the intercept hook reads the target version
    try:
        cfg = store.fetch_config()
        lists = store.fetch_lists()
        att = attempt(call_id="c-proxy@x")
        signals = store.observe(att, cfg, numbers=("+15550100001",))  # number database too
        assert signals.available and lists.version == 0
        assert store.lookup_numbers(("+15550100001",)) == ()
        dec = Decision(Action.DIVERT, 0.5, (Contribution("rate_ip", 0.5, 1.0, "x"),),
                       rule="score")
        store.record(att, dec, x5u_miss="https://cert.example/x.pem")
        store.feedback(caller_key="tel:15550004", ip="192.0.2.4", kind="short_call",
                       half_life=86400.0)
        store.note_scanner("192.0.2.5")
        store.count("kemi_error:test")
        store.versions()
        assert store.last_caller("15550100") is not None
        store.fetch_hash(names.TARGETS)
        store.defer([["XADD", names.EVENTS, "*", "v", "1", "id", "e9"]])
        assert store.write([["XADD", names.EVENTS, "*", "v", "1", "id", "e10"]]) == []
        store.versions()
    finally:
        store.close()
    assert "deferred redis write failed" not in caplog.text
    assert store.errors == 0
    assert admin.xlen(names.EVENTS) == 2
    assert admin.hget(keys.STATS, "kemi_error:test") == b"1"


def test_proxy_reads_targets_appends_events_and_nothing_more(client_for: ClientFor,
                                                             li_state: None) -> None:
    proxy = client_for(acl.PROXY)
    assert proxy.hgetall(names.TARGETS)
    assert proxy.get(names.VERSION) == b"1"
    proxy.xadd(names.EVENTS, {"v": "1", "id": "e2", "body": b"x"})
    for fn in (lambda: proxy.xrange(names.EVENTS), lambda: proxy.xlen(names.EVENTS),
               lambda: proxy.xrevrange(names.EVENTS),
               lambda: proxy.xreadgroup("g", "c", {names.EVENTS: ">"}),
               lambda: proxy.hset(names.TARGETS, "X", b"y"),
               lambda: proxy.hdel(names.TARGETS, "CASE-1"), lambda: proxy.delete(names.TARGETS),
               lambda: proxy.incr(names.VERSION), lambda: proxy.set(names.VERSION, "9"),
               lambda: proxy.xadd(names.AUDIT, {"a": "b"}),
               lambda: proxy.xadd(names.DEAD, {"a": "b"}), lambda: proxy.xrange(names.DEAD),
               lambda: proxy.delete(names.EVENTS),
               lambda: proxy.execute_command("XTRIM", names.EVENTS, "MAXLEN", "0"),
               lambda: proxy.hgetall(names.RECORDERS), lambda: proxy.xrange(names.AUDIT),
               lambda: proxy.hgetall(names.SUBSCRIPTIONS),
               lambda: proxy.execute_command("SCAN", "0"), lambda: proxy.keys("*")):
        _noperm(fn)


# -- intercept admin -----------------------------------------------------------------------
def test_admin_provisions_and_cannot_erase_the_audit(client_for: ClientFor, li_state: None,
                                                     admin: redis.Redis) -> None:
    li = client_for(acl.LI_ADMIN)
    target = provision.build_target(liid="CASE-2", identities=["sip:bob@example.com"],
                                    deliver_to="subscribe", cert_pem=make_cert())
    assert provision.add_target(li, target) is False
    assert [t.liid for t in provision.list_targets(li)[0]] == ["CASE-1", "CASE-2"]
    provision.recorder_allow(li, ["192.0.2.50"], user="rec", password="pw")
    provision.recorder_remove(li, ["192.0.2.50"])
    provision.remove_target(li, "CASE-2")
    assert len(provision.audit_tail(li, None)) == 5
    assert provision.audit_integrity(li)["removed"] == 0
    # dead-letter replay: read the dead letter, re-queue it, drop it from the dead stream
    ((dead_id, fields),) = bytes_entries(li.xrange(names.DEAD))
    li.xadd(names.EVENTS, as_fields(fields))
    assert li.xdel(names.DEAD, dead_id) == 1
    audit_len = admin.xlen(names.AUDIT)
    for command in (("DEL", names.AUDIT), ("UNLINK", names.AUDIT),
                    ("XTRIM", names.AUDIT, "MAXLEN", "0"), ("XDEL", names.AUDIT, "0-1"),
                    ("EXPIRE", names.AUDIT, "1"), ("PEXPIRE", names.AUDIT, "1"),
                    ("RENAME", names.AUDIT, "spitwall:li:{li}:old"),
                    ("XSETID", names.AUDIT, "9999999999999-0"), ("DEL", names.TARGETS),
                    ("RESTORE", names.AUDIT, "0", "x", "REPLACE"), ("FLUSHALL",),
                    ("GET", keys.CONFIG_VERSION), ("SCAN", "0"), ("KEYS", "*"),
                    ("CONFIG", "SET", "appendonly", "no")):
        _noperm(functools.partial(li.execute_command, *command))
    assert admin.xlen(names.AUDIT) == audit_len


# -- delivery worker -----------------------------------------------------------------------
def test_deliver_consumes_the_stream(client_for: ClientFor, li_state: None,
                                     admin: redis.Redis) -> None:
    d = client_for(acl.DELIVER)
    d.xgroup_create(names.EVENTS, names.EVENTS_GROUP, id="0", mkstream=True)
    got = d.xreadgroup(names.EVENTS_GROUP, "w1", {names.EVENTS: ">"}, count=10)
    assert isinstance(got, list)  # redis-py's default shape: [[stream, entries]]
    ((_stream, entries),) = got
    (entry_id, _fields) = entries[0]
    assert d.xpending(names.EVENTS, names.EVENTS_GROUP)["pending"] == 1
    d.xautoclaim(names.EVENTS, names.EVENTS_GROUP, "w2", min_idle_time=0)
    d.xclaim(names.EVENTS, names.EVENTS_GROUP, "w1", 0, [entry_id])
    assert d.xack(names.EVENTS, names.EVENTS_GROUP, entry_id) == 1
    d.xinfo_stream(names.EVENTS)
    d.xinfo_groups(names.EVENTS)
    assert d.xlen(names.EVENTS) == 1 and d.xrange(names.DEAD)
    d.xadd(names.DEAD, {"v": "1", "id": "e1"})
    d.xdel(names.EVENTS, entry_id)
    d.hincrby(names.DELIVERY_STATS, "delivered", 1)
    d.hset(names.SUBSCRIPTIONS, "sub1", b"x")
    assert d.hget(names.SUBSCRIPTIONS, "sub1") == b"x"
    d.expire(names.SUBSCRIPTIONS, 3600)
    d.hdel(names.SUBSCRIPTIONS, "sub1")
    d.hgetall(names.RECORDERS)
    assert d.hgetall(names.TARGETS)
    d.get(names.VERSION)
    d.xadd(names.AUDIT, {"ts": f"{time.time():.3f}", "user": "deliver",
                         "action": "subscribe.refused", "liid": "", "address": "192.0.2.99",
                         "detail": json.dumps({})})
    for command in (("DEL", names.AUDIT), ("XTRIM", names.AUDIT, "MAXLEN", "0"),
                    ("XDEL", names.AUDIT, "0-1"), ("DEL", names.EVENTS),
                    ("EXPIRE", names.AUDIT, "1"), ("EXPIRE", names.TARGETS, "1"),
                    ("HSET", keys.CONFIG, "a", "b"), ("GET", keys.CONFIG_VERSION),
                    ("SCAN", "0"), ("FLUSHALL",)):
        _noperm(functools.partial(d.execute_command, *command))
    assert provision.audit_integrity(admin)["removed"] == 0


# -- metrics (the Prometheus exporter, ops/metrics.py) --------------------------------------
def test_metrics_reads_the_exported_keys_and_nothing_more(client_for: ClientFor, li_state: None,
                                                          admin: redis.Redis) -> None:
    admin.hincrby(keys.STATS, "action:relay", 2)
    admin.zadd(index_key("spam"), {"m1": 1.0})
    config_admin.set_value(admin, "enabled", "false", user="test")
    m = client_for(acl.METRICS)
    assert m.ping()
    pipe = m.pipeline(transaction=False)
    metrics.queue_main_reads(pipe)  # what the exporter sends, in one pipeline
    assert pipe.execute() == [{b"action:relay": b"2"}, 1, 0, b"0", b"1", None]
    # not the config hash: it holds the pass-token key
    config_admin.set_value(admin, "media.token_key", "k" * 32, user="test")
    for read in (lambda: m.hget(keys.CONFIG, "media.token_key"),
                 lambda: m.hget(keys.CONFIG, "enabled")):
        assert "no permissions" in _noperm(read)
    assert "no permissions" in _noperm(lambda: m.hgetall(keys.CONFIG))
    for key in [*LI_KEYS, names.DELIVERY_STATS, names.SUBSCRIPTIONS]:
        for fn in (lambda k=key: m.get(k), lambda k=key: m.hgetall(k),
                   lambda k=key: m.execute_command("XLEN", k),
                   lambda k=key: m.execute_command("XINFO", "GROUPS", k),
                   lambda k=key: m.zcard(k), lambda k=key: m.exists(k)):
            assert "no permissions" in _noperm(fn)
    # read-only, and only its own keys: no other operator state, no writes, no enumeration
    for command in (("HINCRBY", keys.STATS, "action:relay", "1"), ("DEL", keys.STATS),
                    ("HSET", keys.CONFIG, "enabled", "true"), ("INCR", keys.CONFIG_VERSION),
                    ("ZADD", index_key("spam"), "1", "x"), ("ZRANGE", index_key("spam"), "0", "-1"),
                    ("HGETALL", meta_key("spam")), ("HGETALL", keys.list_key("block")),
                    ("GET", keys.DECISION_SEQ), ("HGETALL", keys.decision_buckets()[0]),
                    ("XRANGE", keys.AUDIT, "-", "+"), ("EXPIRE", keys.STATS, "1"),
                    ("EVAL", "return 1", "0"), ("SCAN", "0"), ("KEYS", "*"), ("DBSIZE",),
                    ("INFO", "keyspace"), ("CONFIG", "GET", "*"), ("CLIENT", "LIST"),
                    ("FLUSHALL",), ("SUBSCRIBE", "x")):
        _noperm(functools.partial(m.execute_command, *command))
    assert admin.hget(keys.STATS, "action:relay") == b"2"


# -- applying the users --------------------------------------------------------------------
def test_apply_users_is_idempotent_and_resets_passwords(admin: redis.Redis, redis_url: str,
                                                       passwords: dict[str, str]) -> None:
    before = admin.acl_getuser(acl.user_name(acl.PROXY))
    fresh = acl.generate_passwords()
    assert fresh != passwords and all(len(p) == 64 for p in fresh.values())
    assert acl.apply_users(admin, fresh) == [acl.user_name(r) for r in acl.ROLES]
    after = admin.acl_getuser(acl.user_name(acl.PROXY))
    assert before is not None and after is not None
    assert {k: v for k, v in before.items() if k != "passwords"} == \
        {k: v for k, v in after.items() if k != "passwords"}
    old = redis.Redis.from_url(acl.user_url(redis_url, acl.OPS, passwords[acl.OPS]))
    new = redis.Redis.from_url(acl.user_url(redis_url, acl.OPS, fresh[acl.OPS]))
    try:
        with pytest.raises(redis.AuthenticationError):
            old.ping()
        assert new.ping()
    finally:
        old.close()
        new.close()


def test_keep_other_passwords_for_a_shared_redis(admin: redis.Redis, redis_url: str,
                                                 passwords: dict[str, str]) -> None:
    second = acl.generate_passwords([acl.PROXY])
    acl.apply_users(admin, second, keep_other_passwords=True)
    for pw in (passwords[acl.PROXY], second[acl.PROXY]):
        c = redis.Redis.from_url(acl.user_url(redis_url, acl.PROXY, pw))
        assert c.ping()
        c.close()
    acl.remove_passwords(admin, second)
    c = redis.Redis.from_url(acl.user_url(redis_url, acl.PROXY, second[acl.PROXY]))
    with pytest.raises(redis.AuthenticationError):
        c.ping()
    c.close()
    acl.remove_passwords(admin, second)  # already gone: no error
    admin.execute_command("ACL", "DELUSER", acl.user_name(acl.PROXY))
    acl.remove_passwords(admin, second)  # user gone (a restarted Redis): no error
    acl.apply_users(admin, {acl.PROXY: passwords[acl.PROXY]})


def _role_ping(url: str) -> bool:
    c = redis.Redis.from_url(url, socket_timeout=5)
    try:
        return bool(c.ping())
    finally:
        c.close()


def _old_users_file(path: Path, redis_url: str, passwords: dict[str, str]) -> None:
    """The users file as the procedure before `ensure_users_file` left it: one URL per role it
    knew, mode 0600."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({r: acl.user_url(redis_url, r, pw) for r, pw in passwords.items()}, f)


def test_ensure_users_file_adds_a_new_role_and_keeps_every_password(
    admin: redis.Redis, redis_url: str, tmp_path: Path,
) -> None:
    """An upgrade that adds a role (metrics): the re-run creates that user with a fresh password,
    written to the file, and leaves every other password as it was (running services go on)."""
    before = [r for r in acl.ROLES if r != acl.METRICS]
    old = acl.generate_passwords(before)
    acl.apply_users(admin, old)
    admin.execute_command("ACL", "DELUSER", acl.user_name(acl.METRICS))
    path = tmp_path / "spitwall-redis-users.json"
    _old_users_file(path, redis_url, old)
    old_urls = json.loads(path.read_text())
    # a role a newer version knew (the file survived a rollback): kept, not applied
    old_urls["future-role"] = "redis://spitwall-future-role:f00d@127.0.0.1:6379/0"
    path.write_text(json.dumps(old_urls))

    admin_url = redis_url.replace("redis://", "redis://default:admin-secret@")
    passwords, added = acl.ensure_users_file(path, admin_url)
    assert added == [acl.METRICS]
    assert list(passwords) == list(acl.ROLES)
    assert {r: passwords[r] for r in before} == old
    assert len(passwords[acl.METRICS]) == 64
    urls = json.loads(path.read_text())
    assert {r: urls[r] for r in old_urls} == old_urls  # existing entries untouched
    assert urls[acl.METRICS] == acl.user_url(redis_url, acl.METRICS, passwords[acl.METRICS])
    assert "admin-secret" not in path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left

    assert acl.apply_users(admin, passwords) == [acl.user_name(r) for r in acl.ROLES]
    for role in acl.ROLES:  # the old URLs still work, and the new role's too
        assert _role_ping(urls[role]), role
    metrics = redis.Redis.from_url(urls[acl.METRICS], socket_timeout=5)
    try:
        assert metrics.hgetall(keys.STATS) == {}
        _noperm(functools.partial(metrics.hgetall, keys.CONFIG))
    finally:
        metrics.close()

    # nothing missing: same passwords, the file is not rewritten
    st = path.stat()
    again, added = acl.ensure_users_file(path, admin_url)
    assert (again, added) == (passwords, [])
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (st.st_ino, st.st_mtime_ns)


def test_ensure_users_file_first_run_and_bad_files(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    passwords, added = acl.ensure_users_file(path, "redis://10.0.0.5:6380/2")
    assert added == list(acl.ROLES) and list(passwords) == list(acl.ROLES)
    urls = json.loads(path.read_text())
    assert urls == {r: acl.user_url("redis://10.0.0.5:6380/2", r, pw)
                    for r, pw in passwords.items()}
    assert {r: acl.password_of(u) for r, u in urls.items()} == passwords
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert acl.password_of("redis://u:p%2Fq@h/0") == "p/q"
    for text, message in (("{not json", "not a JSON users file"),
                          ('["redis://x"]', "JSON object of role"),
                          ('{"ops": 1}', "JSON object of role"),
                          ('{"ops": "redis://spitwall-ops@127.0.0.1/0"}', "has no password")):
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            acl.ensure_users_file(path, "redis://127.0.0.1:6379/0")
        assert path.read_text() == text  # a bad file is left alone
    kept, fresh = acl.complete_passwords({acl.OPS: "keep-me", "gone": "x"}, [acl.OPS, acl.MEDIA])
    assert kept[acl.OPS] == "keep-me" and fresh == [acl.MEDIA] and set(kept) == {"ops", "media"}


def _documented_script() -> str:
    """The Redis-user script of docs/deployment.md, section 2 (the heredoc), as printed."""
    text = (REPO / "docs" / "deployment.md").read_text()
    section = text[text.index("## 2. Redis role users"):text.index("## 3.")]
    found = re.search(r"<<'EOF'\n(.*?)\nEOF\n", section, re.S)
    assert found, "no heredoc in docs/deployment.md section 2"
    return found.group(1)


def test_the_documented_user_script_upgrades_a_users_file(tmp_path: Path) -> None:
    """docs/deployment.md's script, run as documented against a redis-server with an aclfile
    (ACL SAVE must work), over a users file without the metrics role, then once more."""
    workdir = tmp_path / "redis"
    workdir.mkdir()
    aclfile = workdir / "users.acl"
    aclfile.touch()
    port = free_port("127.0.0.1", "tcp")
    pid = start_process([*redis_argv(workdir, port), "--aclfile", str(aclfile)],
                        workdir / "stdout.log", cwd=workdir)
    try:
        assert wait_until(lambda: redis_ping("127.0.0.1", port, 0.5) or not pid_alive(pid), 15)
        url = f"redis://127.0.0.1:{port}/0"
        old = acl.generate_passwords([r for r in acl.ROLES if r != acl.METRICS])
        node = redis.Redis.from_url(url)
        try:
            acl.apply_users(node, old)
        finally:
            node.close()
        users = tmp_path / "spitwall-redis-users.json"
        _old_users_file(users, url, old)

        def run() -> str:
            done = subprocess.run([sys.executable, "-", str(users)], input=_documented_script(),
                                  capture_output=True, text=True, timeout=60, cwd=REPO,
                                  env={**os.environ, "SPITWALL_REDIS_ADMIN": url}, check=False)
            assert done.returncode == 0, done.stderr
            return done.stdout

        assert "new roles: metrics" in run()
        urls = json.loads(users.read_text())
        assert set(urls) == set(acl.ROLES)
        assert {r: acl.password_of(urls[r]) for r in old} == old
        for role in acl.ROLES:
            assert _role_ping(urls[role]), role
        saved = aclfile.read_text()
        assert all(f"user {acl.user_name(r)} " in saved for r in acl.ROLES), saved
        first = users.read_text()
        assert "new roles: none" in run()
        assert users.read_text() == first
        assert _role_ping(urls[acl.METRICS])
    finally:
        stop_pid(pid, "redis-server")


def test_user_url_and_errors() -> None:
    assert acl.user_url("redis://127.0.0.1:6390/0", acl.PROXY, "ab12") == \
        "redis://spitwall-proxy:ab12@127.0.0.1:6390/0"
    assert acl.user_url("redis://old:pw@[::1]:6390/2", acl.LI_ADMIN, "x") == \
        "redis://spitwall-li-admin:x@[::1]:6390/2"
    assert acl.user_url("redis://localhost", acl.OPS, "p/q") == \
        "redis://spitwall-ops:p%2Fq@localhost/0"
    with pytest.raises(ValueError, match="unix"):
        acl.user_url("unix:///tmp/redis.sock", acl.OPS, "x")
    with pytest.raises(ValueError, match="unknown Redis role"):
        acl.rules("root")
    with pytest.raises(ValueError, match="password"):
        acl.apply_users(None, {acl.OPS: "has space"})
    assert "spitwall-ops: " in acl.describe()


def test_user_url_on_a_cluster() -> None:
    assert acl.user_url("redis+cluster://old:pw@10.0.0.1:7000,[::1]", acl.PROXY, "ab") == \
        "redis+cluster://spitwall-proxy:ab@10.0.0.1:7000,[::1]:6379/0"


def test_cluster_discovery_is_allowed_only_on_cluster_nodes(
        admin: redis.Redis, redis_cluster: ClusterSet, passwords: dict[str, str]) -> None:
    """Every role may learn the slot map on a cluster node (its client needs it), and only
    there: on a plain server CLUSTER stays denied."""
    node = redis.Redis(port=redis_cluster.ports[0], socket_timeout=5)
    acl.apply_users(node, passwords)
    acl.apply_users(admin, passwords)
    try:
        for role in acl.ROLES:
            on_cluster = redis.Redis(port=redis_cluster.ports[0], username=acl.user_name(role),
                                     password=passwords[role], socket_timeout=5)
            assert on_cluster.execute_command("CLUSTER", "SLOTS"), role
            assert on_cluster.execute_command("CLUSTER", "KEYSLOT", "spitwall:{cfg}:x")
            on_cluster.close()
            kw = admin.connection_pool.connection_kwargs
            plain = redis.Redis(host=kw["host"], port=kw["port"], username=acl.user_name(role),
                                password=passwords[role], socket_timeout=5)
            with pytest.raises(NoPermissionError):
                plain.execute_command("CLUSTER", "SLOTS")
            plain.close()
    finally:
        for name in map(acl.user_name, acl.ROLES):
            node.execute_command("ACL", "DELUSER", name)
        node.close()
