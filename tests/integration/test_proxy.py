"""Phase 1 through the real proxy: Kamailio + app_python3 + Redis, driven by SIPp and sipvicious.

Every test starts its own lab (Kamailio on a free port, the session redis-server) and SIPp
UASes for the next hop and the answering machine, and stops them by pid.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import redis

from ops.sipp import run_svmap, run_svwar, run_uac
from tests.integration.helpers import children_of, rig, rows, spitwall

pytestmark = pytest.mark.integration


def test_clean_caller_is_relayed_with_score_header(lab_factory: Any) -> None:
    with rig(lab_factory) as r:
        res = run_uac(r.host, r.port, "127.0.1.1", 3, 5, rows(3))
        assert res.count(200) == 3, res.summary()
        invites = r.next_hop.wait_for_invites(3)
        assert len(invites) == 3
        for inv in invites:
            values = inv.headers("X-Spitwall-Score")
            assert len(values) == 1
            assert 0.0 <= float(values[0]) < 0.3
            assert inv.headers("Record-Route"), "the proxy must record-route"
        assert r.machine.count_invites() == 0
        # every call is explainable by Call-ID
        cid = next(iter(res.outcomes))
        out = spitwall("explain", cid, "--json", redis_url=r.redis_url)
        assert out.returncode == 0, out.stderr
        data = json.loads(out.stdout)
        assert data["action"] == "relay"
        assert {c["check"] for c in data["checks"]} >= {"rate_ip", "distinct_callers", "sweep",
                                                        "scanner"}


def test_block_listed_ip_gets_603(lab_factory: Any) -> None:
    with rig(lab_factory) as r:
        out = spitwall("list", "add", "block", "ip", "127.0.2.9", "--reason", "test",
                       redis_url=r.redis_url)
        assert out.returncode == 0, out.stderr
        res = run_uac(r.host, r.port, "127.0.2.9", 2, 5, rows(2))
        assert res.count(603) == 2, res.summary()
        assert r.next_hop.count_invites() == 0
        # the reply says nothing a spammer could tune against
        reply = res.final_response(next(iter(res.outcomes)))
        assert reply is not None
        assert reply.first_line == "SIP/2.0 603 Decline"
        assert not reply.has_header("X-Spitwall-Score")
        # another source is unaffected
        ok = run_uac(r.host, r.port, "127.0.2.10", 1, 5, rows(1))
        assert ok.count(200) == 1, ok.summary()


def test_allow_listed_caller_is_relayed_unscored(lab_factory: Any) -> None:
    with rig(lab_factory) as r:
        spitwall("list", "add", "allow", "ip", "127.0.3.3", redis_url=r.redis_url)
        # a scanner User-Agent would be rejected, but allow wins over scoring
        res = run_uac(r.host, r.port, "127.0.3.3", 2, 5, rows(2, ua="friendly-scanner"))
        assert res.count(200) == 2, res.summary()
        for inv in r.next_hop.wait_for_invites(2):
            assert not inv.has_header("X-Spitwall-Score")
        data = json.loads(spitwall("explain", next(iter(res.outcomes)), "--json",
                                   redis_url=r.redis_url).stdout)
        assert data["rule"] == "allowlist"


def test_uri_rotating_campaign_is_diverted_then_rejected(lab_factory: Any) -> None:
    with rig(lab_factory) as r:
        n = 30
        campaign = [(f"spam{i:03d}", f"4155550{i:03d}", "Prize Desk", "Asterisk PBX 18")
                    for i in range(n)]
        res = run_uac(r.host, r.port, "127.0.4.4", n, 10, campaign, max_concurrent=1,
                      hold_ms=50)
        client = redis.Redis.from_url(r.redis_url)
        from scoring.store import find_decision

        actions = []
        for inv in res.sent_invites():
            d = find_decision(client, inv.call_id or "")
            assert d is not None, f"no decision for {inv.call_id}"
            actions.append(d["action"])
        assert len(actions) == n
        first_divert = actions.index("divert")
        first_reject = actions.index("reject")
        assert 0 < first_divert < first_reject, actions
        assert actions[0] == "relay"
        assert actions[-5:] == ["reject"] * 5, actions
        # once rejected, never relayed again within the campaign
        assert "relay" not in actions[first_reject:], actions
        # diverted calls reached the answering machine with a Diversion header
        diverted = r.machine.wait_for_invites(actions.count("divert"))
        assert len(diverted) == actions.count("divert")
        for inv in diverted:
            div = inv.header("Diversion") or ""
            assert div.startswith("<sip:4155550") and "spitwall-score=" in div, div
        assert res.count(603) == actions.count("reject")


def test_svwar_invite_scan_finds_nothing_and_is_recorded(lab_factory: Any) -> None:
    with rig(lab_factory) as r:
        # extensions without the emergency short codes (112, 911): those are never screened,
        # not even for a scanner (tests/integration/test_emergency.py)
        sv = run_svwar(r.host, r.port, "127.0.5.5", extensions="200-230", method="INVITE",
                       timeout=90)
        assert sv.found_nothing, sv.output
        assert r.next_hop.count_invites() == 0, "no scanner INVITE may reach the core"
        stats = json.loads(spitwall("stats", "--json", redis_url=r.redis_url).stdout)
        assert stats.get("action:reject", 0) >= 10, stats


def test_svmap_sees_nothing_and_source_is_remembered(lab_factory: Any) -> None:
    with rig(lab_factory) as r:
        sv = run_svmap(r.host, "127.0.6.6", r.port, timeout=30)
        assert sv.found_nothing, sv.output
        client = redis.Redis.from_url(r.redis_url)
        assert int(client.get("spitwall:{ip:127.0.6.6}:scan") or 0) >= 1
        # a later INVITE from that IP, even with an innocent User-Agent, scores as a scanner
        res = run_uac(r.host, r.port, "127.0.6.6", 1, 5, rows(1))
        from scoring.store import find_decision

        d = find_decision(client, next(iter(res.outcomes)))
        assert d is not None
        scanner = next(c for c in d["checks"] if c[0] == "scanner")
        assert scanner[1] > 0, d
        # the proxy still answers ordinary OPTIONS pings
        from ops.procs import sip_options_ping

        assert sip_options_ping(r.host, r.port, 2.0, src_host="127.0.6.7") == 200


def test_config_change_applies_within_a_second_without_restart(lab_factory: Any) -> None:
    with rig(lab_factory) as r:
        res = run_uac(r.host, r.port, "127.0.7.7", 2, 5, rows(2))
        assert res.count(200) == 2
        workers = children_of(r.kamailio_pid)
        out = spitwall("config", "set", "score_header", "X-Screened", redis_url=r.redis_url)
        assert out.returncode == 0, out.stderr
        t0 = time.monotonic()
        res = run_uac(r.host, r.port, "127.0.7.7", 1, 5, rows(1), hold_ms=0)
        assert res.count(200) == 1
        inv = r.next_hop.wait_for_invites(3)[-1]
        assert inv.has_header("X-Screened") and not inv.has_header("X-Spitwall-Score")
        assert time.monotonic() - t0 < 5  # sipp start-up included; the change was at once
        # the kill switch relays unscored
        spitwall("config", "set", "enabled", "false", redis_url=r.redis_url)
        spitwall("list", "add", "block", "ip", "127.0.7.8", redis_url=r.redis_url)
        res = run_uac(r.host, r.port, "127.0.7.7", 1, 5, rows(1, ua="friendly-scanner"))
        assert res.count(200) == 1
        assert children_of(r.kamailio_pid) == workers, "no restart, no child replaced"
        # invalid values are refused and change nothing
        bad = spitwall("config", "set", "divert_threshold", "1.5", redis_url=r.redis_url)
        assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1


def test_fail_open_when_redis_is_down_and_recovery(lab_factory: Any, redis_server: Any) -> None:
    with rig(lab_factory) as r:
        assert run_uac(r.host, r.port, "127.0.8.8", 1, 5, rows(1)).count(200) == 1
        workers = children_of(r.kamailio_pid)
        redis_server.stop()
        try:
            res = run_uac(r.host, r.port, "127.0.8.8", 4, 5, rows(4))
            assert res.count(200) == 4, res.summary()
            assert children_of(r.kamailio_pid) == workers, "a child died"
        finally:
            redis_server.start()
        time.sleep(1.2)  # the store retries Redis at most once a second per child
        res = run_uac(r.host, r.port, "127.0.8.8", 4, 5, rows(4))
        assert res.count(200) == 4, res.summary()
        client = redis.Redis.from_url(r.redis_url)
        from scoring.store import find_decision

        found = [find_decision(client, cid) for cid in res.outcomes]
        assert any(d is not None and not d["degraded"] for d in found), found
        # the calls that failed open are counted in `spitwall stats` once Redis is back (each
        # child flushes its own counters at most every few seconds, on its next request)
        deadline = time.monotonic() + 20
        unscored = 0
        while unscored < 4 and time.monotonic() < deadline:
            run_uac(r.host, r.port, "127.0.8.9", 2, 5, rows(2))
            out = spitwall("stats", "--json", redis_url=r.redis_url)
            assert out.returncode == 0, out.stderr
            unscored = json.loads(out.stdout).get("redis_unavailable", 0)
        assert unscored == 4
        assert children_of(r.kamailio_pid) == workers


def test_cancel_follows_the_invite_transaction(lab_factory: Any, tmp_path: Any) -> None:
    import subprocess

    from ops.sipp import SIPP_DIR, free_udp_port, sipp_binary

    with rig(lab_factory) as r:
        cmd = [sipp_binary(), f"{r.host}:{r.port}", "-sf", str(SIPP_DIR / "uac_cancel.xml"),
               "-i", "127.0.10.1", "-p", str(free_udp_port("127.0.10.1")), "-m", "2",
               "-r", "2", "-nostdin", "-timeout", "20", "-timeout_error",
               "-mp", str(free_udp_port("127.0.10.1", also_plus=(2,)))]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=tmp_path,
                              check=False)
        assert proc.returncode == 0, proc.stdout[-2000:]
        cancels = [m for m in r.next_hop.messages() if m.method == "CANCEL"]
        assert len({m.call_id for m in cancels}) == 2
