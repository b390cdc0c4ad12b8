"""ops.metrics, the Prometheus exporter, against a real redis-server (and the real `spitwall
metrics` process): what Prometheus would read, parsed with prometheus_client's own parser."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from prometheus_client import generate_latest, start_http_server
from prometheus_client.openmetrics.exposition import generate_latest as om_generate
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_parse
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from intercept import acl, names
from lists.store import ListStore
from media.queue import MessageQueue, index_key
from media.server import SendJitter
from media.sip import SipStats
from media.statsfile import write_stats_file
from ops import cli, metrics
from ops.listen import is_loopback, parse_listen
from ops.procs import free_port, pid_alive, wait_until
from scoring import config_admin, keys, redisconn
from tests.conftest import RedisServer
from tests.unit.scoring.support import dead_redis_url

REPO = Path(__file__).resolve().parents[3]
SPITWALL = REPO / ".venv" / "bin" / "spitwall"
PCM = b"\x01\x00\xff\xff" * 800

Labels = tuple[tuple[str, str], ...]
Scrape = dict[str, dict[Labels, float]]


def parse(text: str) -> Scrape:
    """sample name -> {sorted label pairs: value}, through prometheus_client's parser (which
    raises on anything that is not valid exposition format)."""
    out: Scrape = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = tuple(sorted(s.labels.items()))
            assert labels not in out.get(s.name, {}), f"duplicate series {s.name}{labels}"
            out.setdefault(s.name, {})[labels] = s.value
    return out


def scrape(collector: metrics.SpitwallCollector) -> Scrape:
    registry = CollectorRegistry()
    registry.register(collector)
    return parse(generate_latest(registry).decode())


def scrape_openmetrics(collector: metrics.SpitwallCollector) -> Scrape:
    """The same in OpenMetrics, the format Prometheus asks for first (its parser is stricter)."""
    registry = CollectorRegistry()
    registry.register(collector)
    out: Scrape = {}
    text = om_generate(registry).decode()  # type: ignore[no-untyped-call]
    for family in om_parse(text):  # type: ignore[no-untyped-call]
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def val(m: Scrape, name: str, **labels: str) -> float:
    return m[name][tuple(sorted(labels.items()))]


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def collector(redis_url: str) -> Iterator[metrics.SpitwallCollector]:
    c = metrics.SpitwallCollector(redis_url)
    yield c
    c.close()


@pytest.fixture
def users(r: redis.Redis, redis_url: str) -> dict[str, str]:
    """The Redis ACL users of intercept/acl.py on the test's server: role -> URL."""
    passwords = acl.generate_passwords()
    acl.apply_users(r, passwords)
    return {role: acl.user_url(redis_url, role, pw) for role, pw in passwords.items()}


# -- the stats hash ------------------------------------------------------------------------
def test_counters_get_named_metrics_with_labels(r: redis.Redis,
                                                collector: metrics.SpitwallCollector) -> None:
    written = {"action:relay": 30, "action:divert": 4, "action:reject": 2,
               "feedback:short_call": 5, "feedback:report_spam": 1, "scanner_probes": 7,
               "kemi_error:request_route": 1, "check_error:geoip": 3, "check_error:stir": 2,
               "redis_unavailable": 6, "record_lost": 2, "config_reload_failed": 1,
               "pass_token_accepted": 9, "pass_token_refused": 8, "ring_control_stripped": 1,
               "relay_disabled": 11, "media_fallback": 3, "monitor:reject": 4, "emergency": 2,
               "invented_later": 12}
    for field, n in written.items():
        r.hincrby(keys.STATS, field, n)
    m = scrape(collector)
    assert val(m, "spitwall_redis_up") == 1
    assert m["spitwall_decisions_total"] == {(("action", "relay"),): 30,
                                             (("action", "divert"),): 4,
                                             (("action", "reject"),): 2}
    assert val(m, "spitwall_feedback_total", kind="short_call") == 5
    assert val(m, "spitwall_feedback_total", kind="report_spam") == 1
    assert val(m, "spitwall_scanner_probes_total") == 7
    assert val(m, "spitwall_kemi_errors_total", where="request_route") == 1
    assert m["spitwall_check_errors_total"] == {(("check", "geoip"),): 3,
                                                (("check", "stir"),): 2}
    assert m["spitwall_fail_open_total"] == {
        (("event", "redis_unavailable"),): 6, (("event", "record_lost"),): 2,
        (("event", "config_reload_failed"),): 1, (("event", "lists_reload_failed"),): 0}
    assert m["spitwall_pass_tokens_total"] == {(("result", "accepted"),): 9,
                                               (("result", "refused"),): 8}
    assert val(m, "spitwall_ring_control_stripped_total") == 1
    assert val(m, "spitwall_kill_switch_relays_total") == 11
    assert val(m, "spitwall_divert_fallback_total") == 3
    assert m["spitwall_monitor_would_total"] == {(("action", "reject"),): 4}
    assert val(m, "spitwall_emergency_calls_total") == 2
    # a field nobody taught the exporter is not dropped
    assert m["spitwall_counter_total"] == {(("name", "invented_later"),): 12}
    assert val(m, "spitwall_stats_invalid_fields") == 0
    assert "spitwall_label_overflow" not in m
    # every scrape reads Redis afresh
    r.hincrby(keys.STATS, "action:reject", 1)
    assert val(scrape(collector), "spitwall_decisions_total", action="reject") == 3


def test_an_empty_redis_gives_zeroes_for_the_known_series(
        collector: metrics.SpitwallCollector) -> None:
    m = scrape(collector)
    assert set(m["spitwall_decisions_total"].values()) == {0}
    assert len(m["spitwall_decisions_total"]) == 3
    assert val(m, "spitwall_fail_open_total", event="redis_unavailable") == 0
    assert val(m, "spitwall_enabled") == 1
    assert val(m, "spitwall_config_version") == 0 == val(m, "spitwall_lists_version")
    assert val(m, "spitwall_queue_messages", queue="spam") == 0
    assert m["spitwall_redis_read_failed"] == {(("part", p),): 0
                                               for p in ("stats", "queues", "config")}
    assert m["spitwall_scrape_duration_seconds"][()] >= 0


# -- queues, kill switch, versions ------------------------------------------------------------
def test_queue_sizes_kill_switch_and_versions(r: redis.Redis, tmp_path: Path,
                                              collector: metrics.SpitwallCollector) -> None:
    q = MessageQueue(r, tmp_path / "queue", min_free_bytes=0)
    for i in range(3):
        q.store("spam", PCM, {"caller": f"+1555000{i}"})
    q.store("voicemail", PCM, {"caller": "+15559999"})
    config_admin.set_value(r, "enabled", "false", user="test")
    config_admin.set_value(r, "divert_threshold", "0.4", user="test")
    ListStore(r).add("block", "ip", "198.51.100.7", user="test")
    m = scrape(collector)
    assert m["spitwall_queue_messages"] == {(("queue", "spam"),): 3,
                                            (("queue", "voicemail"),): 1}
    assert val(m, "spitwall_enabled") == 0
    assert val(m, "spitwall_config_version") == 2
    assert val(m, "spitwall_lists_version") == 1
    config_admin.set_value(r, "enabled", "true", user="test")
    m = scrape(collector)
    assert val(m, "spitwall_enabled") == 1 and val(m, "spitwall_config_version") == 3


def test_a_key_of_the_wrong_type_is_reported_not_fatal(
        r: redis.Redis, collector: metrics.SpitwallCollector) -> None:
    r.set(keys.STATS, "not a hash")
    r.set(keys.LISTS_VERSION, "garbage")
    m = scrape(collector)
    assert val(m, "spitwall_redis_up") == 1
    assert val(m, "spitwall_redis_read_failed", part="stats") == 1
    assert val(m, "spitwall_redis_read_failed", part="config") == 1
    assert val(m, "spitwall_redis_read_failed", part="queues") == 0
    assert "spitwall_decisions_total" not in m and "spitwall_lists_version" not in m
    assert val(m, "spitwall_enabled") == 1


# -- hostile and runaway field names --------------------------------------------------------
LABEL_OK = re.compile(r"[A-Za-z0-9_.:~-]{1,64}")


def test_hostile_field_names_cannot_break_the_format(r: redis.Redis,
                                                     collector: metrics.SpitwallCollector) -> None:
    hostile = ["kemi_error:a\nspitwall_enabled 0\n", 'kemi_error:x"} 1\n#',
               "kemi_error:" + "A" * 10240, "kemi_error:" + "A" * 10239 + "B",
               "check_error:\\\\", "kemi_error:", 'evil{name="x"}', "\u00e9t\u00e9 \u202e",
               "x" * 10240]
    for i, field in enumerate(hostile):
        r.hincrby(keys.STATS, field, i + 1)
    r.hset(keys.STATS, b"kemi_error:\xff\xfe", 5)  # not UTF-8
    r.hset(keys.STATS, "action:relay", "not a number")
    r.hset(keys.STATS, "feedback:negative", -3)
    om, text = scrape_openmetrics(collector), scrape(collector)
    for m in (om, text):
        m.pop("spitwall_scrape_duration_seconds")
    assert om == text
    m = scrape(collector)  # parse() raises on a broken exposition or a duplicate series
    assert val(m, "spitwall_enabled") == 1  # the injected line did not become a sample
    labelled = {name: series for name, series in m.items()
                if name in ("spitwall_kemi_errors_total", "spitwall_check_errors_total",
                            "spitwall_counter_total")}
    values = [v for series in labelled.values() for labels in series for _k, v in labels]
    assert values and all(LABEL_OK.fullmatch(v) for v in values), values
    # every field has a series of its own (nothing merged, nothing lost)
    assert sum(len(s) for s in labelled.values()) == len(hostile) + 1
    assert sum(sum(s.values()) for s in labelled.values()) == sum(range(1, 10)) + 5
    assert val(m, "spitwall_stats_invalid_fields") == 2
    assert val(m, "spitwall_decisions_total", action="relay") == 0


def test_label_values_are_bounded() -> None:
    assert metrics.label_value("geoip") == "geoip"
    long = metrics.label_value("x" * 10240)
    assert len(long) == 64 and long != metrics.label_value("x" * 10241)
    assert metrics.label_value("a\nb") != metrics.label_value("a\rb")
    assert LABEL_OK.fullmatch(metrics.label_value(""))


def test_cardinality_is_bounded_per_family(r: redis.Redis,
                                           collector: metrics.SpitwallCollector) -> None:
    r.hset(keys.STATS, mapping={f"check_error:c{i:04}": 1 for i in range(499)})
    r.hset(keys.STATS, f"check_error:{metrics.OTHER}", 1)  # parse() refuses a duplicate
    r.hset(keys.STATS, mapping={f"unknown_{i:04}": 2 for i in range(300)})
    m = scrape(collector)
    checks = m["spitwall_check_errors_total"]
    assert len(checks) == metrics.MAX_SERIES
    assert val(m, "spitwall_check_errors_total", check=metrics.OTHER) == 500 - 199
    assert (("check", "c0000"),) in checks and (("check", "c0199"),) not in checks
    assert sum(checks.values()) == 500  # folded, not lost
    assert len(m["spitwall_counter_total"]) == metrics.MAX_SERIES
    assert sum(m["spitwall_counter_total"].values()) == 600
    assert val(m, "spitwall_label_overflow", family="spitwall_check_errors") == 301
    assert val(m, "spitwall_label_overflow", family="spitwall_counter") == 101


# -- Redis down -------------------------------------------------------------------------------
def test_redis_down_answers_200_with_redis_up_0(tmp_path: Path) -> None:
    c = metrics.SpitwallCollector(dead_redis_url(), media_stats=tmp_path / "missing.json")
    registry = CollectorRegistry()
    registry.register(c)
    port = free_port("127.0.0.1", "tcp")
    httpd, thread = start_http_server(port, "127.0.0.1", registry=registry)
    try:
        start = time.monotonic()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            status, body = resp.status, resp.read().decode()
        assert time.monotonic() - start < 3.0  # no retries with back-off inside a scrape
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)
        c.close()
    assert status == 200
    m = parse(body)
    assert val(m, "spitwall_redis_up") == 0
    assert val(m, "spitwall_media_stats_up") == 0
    assert set(m) == {"spitwall_redis_up", "spitwall_media_stats_up",
                      "spitwall_scrape_duration_seconds"}


def test_redis_that_goes_down_and_comes_back(redis_server: RedisServer, r: redis.Redis,
                                             collector: metrics.SpitwallCollector) -> None:
    r.hincrby(keys.STATS, "action:relay", 2)
    assert val(scrape(collector), "spitwall_redis_up") == 1
    redis_server.stop()
    try:
        m = scrape(collector)
        assert val(m, "spitwall_redis_up") == 0 and "spitwall_decisions_total" not in m
    finally:
        redis_server.start()
    m = scrape(collector)
    assert val(m, "spitwall_redis_up") == 1
    assert "spitwall_decisions_total" in m


def test_a_redis_cluster(redis_cluster_url: str) -> None:
    client = redisconn.client(redis_cluster_url, socket_timeout=2)
    try:
        client.hincrby(keys.STATS, "action:divert", 4)
        client.zadd(index_key("voicemail"), {"m1": 1.0, "m2": 2.0})
        config_admin.set_value(client, "enabled", "false", user="test")
    finally:
        client.close()
    c = metrics.SpitwallCollector(redis_cluster_url)
    try:
        m = scrape(c)
    finally:
        c.close()
    assert val(m, "spitwall_redis_up") == 1
    assert val(m, "spitwall_decisions_total", action="divert") == 4
    assert val(m, "spitwall_queue_messages", queue="voicemail") == 2
    assert val(m, "spitwall_enabled") == 0


# -- intercept: need-to-know ----------------------------------------------------------------
def _li_activity(r: redis.Redis) -> None:
    r.hset(names.DELIVERY_STATS, mapping={"delivered": 42, "dead": 3, "failed_attempts": 5,
                                          "subscribe_refused": 1, "retried_later": 2})
    for i in range(4):
        r.xadd(names.EVENTS, {"v": "1", "id": f"e{i}", "body": b"\x30\x82"})
    r.xadd(names.DEAD, {"v": "1", "id": "d0", "body": b"\x30\x82"})


def test_intercept_keys_are_not_read_by_default(r: redis.Redis, redis_url: str,
                                                users: dict[str, str], tmp_path: Path) -> None:
    _li_activity(r)
    r.hincrby(keys.STATS, "action:reject", 3)
    MessageQueue(r, tmp_path / "queue", min_free_bytes=0).store("spam", PCM, {})
    default = metrics.SpitwallCollector(redis_url)  # the default user: could read li keys
    try:
        m = scrape(default)
    finally:
        default.close()
    assert not [n for n in m if n.startswith("spitwall_li_")]
    # the proof: the metrics user cannot read a single li key, and the exporter run as that
    # user reads everything it exports without one refusal
    r.execute_command("ACL", "LOG", "RESET")
    as_metrics = metrics.SpitwallCollector(users[acl.METRICS])
    try:
        m = scrape(as_metrics)
    finally:
        as_metrics.close()
    assert r.execute_command("ACL", "LOG") == []
    assert val(m, "spitwall_redis_up") == 1
    assert set(m["spitwall_redis_read_failed"].values()) == {0}
    assert val(m, "spitwall_decisions_total", action="reject") == 3
    assert val(m, "spitwall_queue_messages", queue="spam") == 1
    assert val(m, "spitwall_enabled") == 1
    assert not [n for n in m if n.startswith("spitwall_li_")]


def test_li_redis_exports_the_delivery_worker(r: redis.Redis, redis_url: str,
                                              users: dict[str, str]) -> None:
    _li_activity(r)
    c = metrics.SpitwallCollector(users[acl.METRICS], li_redis_url=users[acl.DELIVER])
    try:
        m = scrape(c)  # before the worker made its consumer group
        assert val(m, "spitwall_li_redis_up") == 1 and val(m, "spitwall_li_read_failed") == 0
        assert "spitwall_li_events_pending" not in m
        r.xgroup_create(names.EVENTS, names.EVENTS_GROUP, id="0")
        r.xreadgroup(names.EVENTS_GROUP, "w1", {names.EVENTS: ">"}, count=1)
        m = scrape(c)
    finally:
        c.close()
    assert val(m, "spitwall_redis_up") == 1
    assert val(m, "spitwall_li_events_delivered_total") == 42
    assert val(m, "spitwall_li_events_dead_lettered_total") == 3
    assert val(m, "spitwall_li_delivery_failed_attempts_total") == 5
    assert val(m, "spitwall_li_subscribe_refused_total") == 1
    assert m["spitwall_li_counter_total"] == {(("name", "retried_later"),): 2}
    assert val(m, "spitwall_li_events_backlog") == 4
    assert val(m, "spitwall_li_events_pending") == 1
    assert val(m, "spitwall_li_events_lag") == 3
    assert val(m, "spitwall_li_delivery_consumers") == 1
    assert val(m, "spitwall_li_dead_letters") == 1
    assert val(m, "spitwall_li_read_failed") == 0


def test_li_redis_with_a_user_that_may_not_read_it(r: redis.Redis,
                                                   users: dict[str, str]) -> None:
    _li_activity(r)
    c = metrics.SpitwallCollector(users[acl.METRICS], li_redis_url=users[acl.OPS])
    try:
        m = scrape(c)
    finally:
        c.close()
    assert val(m, "spitwall_li_redis_up") == 1 and val(m, "spitwall_li_read_failed") == 1
    assert "spitwall_li_events_delivered_total" not in m
    assert "spitwall_li_events_backlog" not in m


def test_li_redis_down(redis_url: str) -> None:
    c = metrics.SpitwallCollector(redis_url, li_redis_url=dead_redis_url())
    try:
        m = scrape(c)
    finally:
        c.close()
    assert val(m, "spitwall_redis_up") == 1 and val(m, "spitwall_li_redis_up") == 0
    assert [n for n in m if n.startswith("spitwall_li_")] == ["spitwall_li_redis_up"]


# -- the answering machine's stats file ------------------------------------------------------
def _media_snapshot() -> dict[str, object]:
    """A snapshot in the shape of media.server.AnsweringMachine.snapshot, from the real
    SipStats and SendJitter classes."""
    sip = SipStats(requests=20, invites=9, answered=8, send_errors=1)
    jitter = SendJitter()
    jitter.add_call([0.0001 * i for i in range(100)])
    return {"time": time.time() - 2.0, "active_calls": 2, "calls": 9,
            "verdicts": {"bot": 5, "human": 2, "unsure": 1}, "queued": 5, "queue_failures": 1,
            "transfers": 2, "call_errors": 0, "cancelled_ringing": 1, "no_rtp_family": 3,
            "sip": sip.as_dict(), "send_lateness": jitter.as_dict()}


def test_media_stats_file(redis_url: str, tmp_path: Path) -> None:
    path = tmp_path / "stats.json"
    write_stats_file(path, _media_snapshot())
    c = metrics.SpitwallCollector(redis_url, media_stats=path)
    try:
        m = scrape(c)
        assert val(m, "spitwall_media_stats_up") == 1
        assert 2.0 <= val(m, "spitwall_media_stats_age_seconds") < 60
        assert val(m, "spitwall_media_active_calls") == 2
        assert val(m, "spitwall_media_calls_total") == 9
        assert m["spitwall_media_verdicts_total"] == {(("verdict", "bot"),): 5,
                                                      (("verdict", "human"),): 2,
                                                      (("verdict", "unsure"),): 1}
        assert val(m, "spitwall_media_queued_total") == 5
        assert val(m, "spitwall_media_queue_failures_total") == 1
        assert val(m, "spitwall_media_transfers_total") == 2
        assert val(m, "spitwall_media_cancelled_ringing_total") == 1
        # a field the exporter does not know by name is not dropped
        assert m["spitwall_media_counter_total"] == {(("name", "no_rtp_family"),): 3}
        assert val(m, "spitwall_media_sip_events_total", event="invites") == 9
        assert val(m, "spitwall_media_sip_events_total", event="send_errors") == 1
        assert len(m["spitwall_media_sip_events_total"]) == len(SipStats().as_dict())
        assert 0 < val(m, "spitwall_media_send_lateness_seconds", quantile="0.5") < \
            val(m, "spitwall_media_send_lateness_seconds", quantile="1") < 0.011
        for bad in (b"{not json", b"[1, 2]", b"", b"\xff\xfe"):
            path.write_bytes(bad)
            m = scrape(c)
            assert val(m, "spitwall_media_stats_up") == 0, bad
            assert not [n for n in m if n.startswith("spitwall_media_") and n !=
                        "spitwall_media_stats_up"]
            assert val(m, "spitwall_redis_up") == 1
        path.unlink()
        assert val(scrape(c), "spitwall_media_stats_up") == 0
        path.write_text(json.dumps({"calls": "many", "verdicts": {"x" * 5000: 1, "y": "z"}}))
        m = scrape(c)
        assert val(m, "spitwall_media_stats_up") == 1
        assert "spitwall_media_calls_total" not in m
        ((labels, n),) = m["spitwall_media_verdicts_total"].items()
        assert n == 1 and len(labels[0][1]) == 64
    finally:
        c.close()


# -- the CLI ----------------------------------------------------------------------------------
def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status, resp.read().decode()


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


def test_spitwall_metrics_process_serves_and_stops_on_sigterm(
        r: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    r.hincrby(keys.STATS, "action:divert", 5)
    stats = tmp_path / "media.json"
    write_stats_file(stats, _media_snapshot())
    port = free_port("127.0.0.1", "tcp")
    env = {k: v for k, v in os.environ.items() if k not in ("SPITWALL_REDIS", "SPITWALL_LI_REDIS")}
    proc = subprocess.Popen(
        [str(SPITWALL), "metrics", "--listen", f"127.0.0.1:{port}", "--redis", redis_url,
         "--media-stats", str(stats)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert wait_until(lambda: _listening(port) or proc.poll() is not None, 20.0)
        assert proc.poll() is None, proc.communicate()
        status, body = _get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200
        m = parse(body)
        assert val(m, "spitwall_redis_up") == 1
        assert val(m, "spitwall_decisions_total", action="divert") == 5
        assert val(m, "spitwall_media_stats_up") == 1
        assert not [n for n in m if n.startswith("spitwall_li_")]
        os.kill(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        assert f"http://127.0.0.1:{port}/metrics" in out
        assert "warning" not in err
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)
    assert not pid_alive(proc.pid)


@pytest.mark.parametrize("listen", [
    "127.0.0.1", "127.0.0.1:", ":9464", "127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:http",
    "::1:9464", "[127.0.0.1]:9464", "example.com:9464", "[]:9464", "127.0.0.1:94 64",
    "A" * 10240 + ":9464",
])
def test_bad_listen_is_a_one_line_error(listen: str, capsys: pytest.CaptureFixture[str],
                                        redis_url: str) -> None:
    rc = cli.main(["metrics", "--listen", listen, "--redis", redis_url])
    out, err = capsys.readouterr()
    assert rc == cli.EXIT_FAIL and out == ""
    assert err.startswith("spitwall: error: bad --listen") and err.count("\n") == 1, err
    assert len(err) < 300


def test_parse_listen_accepts() -> None:
    assert parse_listen("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_listen("localhost:1") == ("127.0.0.1", 1)
    assert parse_listen("[::1]:9464") == ("::1", 9464)
    assert parse_listen("0.0.0.0:9464") == ("0.0.0.0", 9464)
    assert is_loopback("::1") and is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0")


def test_cli_errors_bad_urls_and_a_busy_port(capsys: pytest.CaptureFixture[str],
                                             redis_url: str) -> None:
    rc = cli.main(["metrics", "--redis", "redis://u:secret@127.0.0.1:notaport/0"])
    _out, err = capsys.readouterr()
    assert rc == cli.EXIT_FAIL and err.startswith("spitwall: error: bad --redis URL")
    assert "secret" not in err
    rc = cli.main(["metrics", "--redis", redis_url, "--li-redis", "redis+sentinel://h/"])
    _out, err = capsys.readouterr()
    assert rc == cli.EXIT_FAIL and err.startswith("spitwall: error: bad --li-redis URL")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc = cli.main(["metrics", "--redis", redis_url, "--listen", f"127.0.0.1:{port}"])
    _out, err = capsys.readouterr()
    assert rc == cli.EXIT_FAIL and "cannot listen on" in err and err.count("\n") == 1


def test_a_non_loopback_listen_warns(capsys: pytest.CaptureFixture[str],
                                     redis_url: str) -> None:
    """The warning comes before the bind; 192.0.2.1 (TEST-NET-1) is not ours, so the bind
    fails and nothing listens off loopback."""
    rc = cli.main(["metrics", "--redis", redis_url, "--listen", "192.0.2.1:9464"])
    _out, err = capsys.readouterr()
    lines = err.splitlines()
    assert lines[0].startswith("spitwall: warning: 192.0.2.1:9464 is not a loopback address")
    assert "no authentication" in lines[0]
    assert rc == cli.EXIT_FAIL and lines[-1].startswith("spitwall: error: cannot listen on")
