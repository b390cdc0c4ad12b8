"""The lab's services beyond the proxy on a Redis Cluster: the phase-2 answering machine and the
intercept delivery worker, every process as its Redis ACL role (`redis_users=True`).

Real processes on loopback: three cluster masters (no replicas), Kamailio with kamailio.cfg,
`spitwall media` and `spitwall deliver` as the lab starts them, SIPp callers, the CLI.

* A caller diverted to the real answering machine talks from the first packet: the machine
  (as ``spitwall-media``) judges it a bot, stores the message in the spam queue and feeds the
  verdict to the caller's and the source IP's reputation, which live in their own hash tags
  on whichever masters hold those slots; operators (``spitwall-ops``) see it with
  `spitwall queue list`.
* A target provisioned by the intercept admin (``spitwall-li-admin``) calls with SDES keys:
  the proxy appends the encrypted events to the ``{ev}`` stream on its master, and the
  delivery worker (``spitwall-deliver``) PUBLISHes them to a test recorder, which decrypts
  them and decrypts the caller's SRTP with the disclosed key.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from intercept import names
from ops.lab import Lab
from scoring import redisconn, reputation
from tests.integration.helpers import spitwall
from tests.integration.test_intercept_e2e import _ip, _recorder, check_published_call
from tests.integration.test_intercept_proxy import new_key, sdes, srtp_call, srtp_uas
from tests.integration.test_media import BOT_TEXT, call, queue, ulaw_wav
from tests.redis_cluster import ClusterSet

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

HALF_LIFE = 3 * 86400  # the default reputation.half_life
#: what must not appear in a lab process' log after these calls
SUSPECT = ("Traceback", "ERROR", "CRITICAL", "NOPERM", "CROSSSLOT", "MOVED", "lost",
           "not queued", "failed")
#: the proxy's counters (`spitwall stats`) that say something went wrong
BAD_COUNTERS = ("kemi_error", "redis_unavailable", "record_lost", "config_reload_failed",
                "lists_reload_failed", "check_error", "li_queue_full", "li_backlog")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[ClusterSet]:
    c = ClusterSet(tmp_path / "cluster", replicas=0)
    try:
        c.start()
        yield c
    finally:
        c.stop()


def _cluster_lab(cluster: ClusterSet, lab_factory: Any, **kwargs: Any) -> Lab:
    lab: Lab = lab_factory(redis_url=cluster.url, redis_users=True, **kwargs)
    assert lab.state is not None and lab.state.users_file
    for role in ("proxy", "ops", "media", "deliver", "li-admin"):
        assert lab.state.url_for(role).startswith(f"redis+cluster://spitwall-{role}:"), role
    return lab


def _log_problems(lab: Lab) -> list[str]:
    """Tracebacks and errors in the lab's process logs, and the proxy's error counters."""
    assert lab.state is not None
    found = []
    for name, path in lab.state.logs.items():
        text = Path(path).read_text(errors="replace")
        found += [f"{name}: {line}" for line in text.splitlines()
                  if any(word in line for word in SUSPECT)]
    found += [f"stats: {k}={v}" for k, v in _proxy_stats(lab).items()
              if k.startswith(BAD_COUNTERS)]
    return found


def _proxy_stats(lab: Lab) -> dict[str, int]:
    """The proxy's counters, as an operator reads them (`spitwall stats`, the ops user)."""
    assert lab.state is not None
    stats = spitwall("stats", "--json", redis_url=lab.state.url_for("ops"))
    assert stats.returncode == 0, stats.stderr
    data: dict[str, int] = json.loads(stats.stdout)
    return data


def _deliver_stats(lab: Lab) -> dict[str, Any]:
    """The lab's delivery worker's counters, written on SIGUSR1."""
    assert lab.state is not None
    path = Path(lab.state.workdir) / "deliver-stats.json"
    before = path.stat().st_mtime_ns if path.exists() else 0
    os.kill(lab.state.pids["deliver"], signal.SIGUSR1)
    deadline = time.monotonic() + 5
    while (not path.exists() or path.stat().st_mtime_ns == before) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _node(cluster: ClusterSet, key: str) -> redis.Redis:
    """A plain connection to the master that holds ``key``'s slot (not a cluster client)."""
    return cluster.node(cluster.master_of(key))


def test_answering_machine_on_a_cluster_queues_the_bot_and_feeds_reputation(
        cluster: ClusterSet, lab_factory: Any, tmp_path: Path) -> None:
    lab = _cluster_lab(cluster, lab_factory)
    assert lab.state is not None
    ops = lab.state.url_for("ops")
    for k, v in (("divert_threshold", "0"), ("reject_threshold", "0.99"),
                 ("media.record_seconds", "5")):
        out = spitwall("config", "set", k, v, redis_url=ops)
        assert out.returncode == 0, out.stderr

    wav = ulaw_wav(BOT_TEXT, tmp_path / "bot.wav")
    res = call(lab, tmp_path, "127.0.23.1", "promo7", wav)
    assert res.returncode == 0, res.stdout[-1500:]

    items = queue(ops)  # `spitwall queue list --json` as the ops user, on the cluster URL
    assert [i["queue"] for i in items] == ["spam"], items
    msg = items[0]
    assert msg["verdict"] == "bot" and msg["caller_key"] == "promo7@127.0.23.1", msg
    assert msg["source_ip"] == "127.0.23.1" and msg["callee"] == "15551230000", msg
    assert msg["phase1_score"] is not None, msg  # the Diversion header's score reached it
    explained = spitwall("explain", msg["call_id"], "--json", redis_url=ops)
    assert explained.returncode == 0, explained.stderr
    assert json.loads(explained.stdout)["action"] == "divert"
    assert _proxy_stats(lab).get("action:divert") == 1
    with wave.open(msg["path"]) as w:
        assert w.getframerate() == 8000 and w.getnframes() >= 8000 * 4
    # the queue record is on the master of the {queue} slot
    assert _node(cluster, "spitwall:{queue}:spam").hexists("spitwall:{queue}:spam", msg["id"])

    # the bot verdict reached both reputations, each on the master of its own hash tag
    caller_key = reputation.caller_rep_key("promo7@127.0.23.1")
    ip_key = reputation.ip_rep_key("127.0.23.1")
    for key in (caller_key, ip_key):
        raw = _node(cluster, key).hgetall(key)
        assert float(raw[b"s"]) >= 0.5, (key, raw)
        assert int(raw[b"n"]) >= 2, (key, raw)  # the proxy's divert nudge, then the verdict
    client = redisconn.client(cluster.url, socket_timeout=2)
    try:
        rep = reputation.read(client, caller="promo7@127.0.23.1", ip="127.0.23.1",
                              half_life=HALF_LIFE)
    finally:
        client.close()
    assert rep["caller"]["score"] >= 0.5 and rep["ip"]["score"] >= 0.5, rep

    # an operator marks it: the record changes on the cluster
    marked = spitwall("queue", "mark", msg["id"], "spam", redis_url=ops)
    assert marked.returncode == 0, marked.stderr
    assert [i["mark"] for i in queue(ops)] == ["spam"]
    assert _log_problems(lab) == []


def test_delivery_worker_on_a_cluster_publishes_a_targets_keys(
        cluster: ClusterSet, lab_factory: Any, tmp_path: Path) -> None:
    rec, pem = _recorder(tmp_path)
    host, port = rec.start(_ip(), 0)
    caller, liid = f"tgt{uuid.uuid4().hex[:8]}", f"CL-{uuid.uuid4().hex[:8]}"
    k_caller, k_callee = new_key(), new_key()
    try:
        with srtp_uas(tmp_path / "uas", sdes(k_callee, 2222)) as uas:
            lab = _cluster_lab(cluster, lab_factory, children=2,
                               next_hop=f"sip:127.0.0.1:{uas.port}")
            assert lab.state is not None
            admin = lab.state.url_for("li-admin")  # provisioning as the intercept admin
            added = spitwall("intercept", "add", "--liid", liid, "--target",
                             f"sip:{caller}@127.0.0.2", "--deliver-to",
                             f"sip:recorder@{host}:{port}", "--cert", str(pem), redis_url=admin)
            assert added.returncode == 0, added.stderr
            try:
                call_id = srtp_call(lab, tmp_path / "uac", caller, "bob", sdes(k_caller, 1111))
                assert rec.wait_until(
                    lambda: any(e.json().get("event") == "Release" for e in rec.events
                                if e.content_type == "application/json"), timeout=20), \
                    [e.content_type for e in rec.events]
            finally:
                removed = spitwall("intercept", "remove", liid, redis_url=admin)
        assert removed.returncode == 0, removed.stderr
        events = rec.events
    finally:
        rec.stop()
    check_published_call(events, call_id, liid, k_caller, k_callee)

    # the stream and the worker's counters are on the {ev} master; all acknowledged
    ev = _node(cluster, names.EVENTS)
    deadline = time.monotonic() + 5
    while int(ev.hget(names.DELIVERY_STATS, "delivered") or 0) < 4 \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert int(ev.hget(names.DELIVERY_STATS, "delivered") or 0) == 4
    assert int(ev.xpending(names.EVENTS, names.EVENTS_GROUP)["pending"]) == 0
    assert ev.xlen(names.DEAD) == 0
    assert _deliver_stats(lab)["redis_errors"] == 0  # not even a transient one
    # provisioning went through the {li} master, audited
    li = _node(cluster, names.AUDIT)
    assert li.xlen(names.AUDIT) >= 2  # target.add, target.remove
    assert not li.hexists(names.TARGETS, liid)
    assert _log_problems(lab) == []
