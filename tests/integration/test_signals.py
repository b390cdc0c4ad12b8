"""Issue 3 signals through the real proxy: reputation (operator and in-call reports, short
calls), ring hijack, 608."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import redis

from ops.sipp import SipMessage, free_udp_port, run_uac
from scoring.store import find_decision
from tests.integration.helpers import invite, rig, rows, send_all, spitwall

pytestmark = pytest.mark.integration


def _decision(url: str, call_id: str) -> dict[str, Any]:
    d = find_decision(redis.Redis.from_url(url), call_id)
    assert d is not None, call_id
    return d


def _check(d: dict[str, Any], name: str) -> list[Any]:
    return next(c for c in d["checks"] if c[0] == name)


def test_caller_reported_as_spam_is_diverted_next_time(lab_factory: Any) -> None:
    with rig(lab_factory) as r:
        caller = "4155550142"
        first = run_uac(r.host, r.port, "127.0.11.1", 1, 5, rows(1, caller=caller))
        assert _decision(r.redis_url, next(iter(first.outcomes)))["action"] == "relay"
        out = spitwall("report", caller, "spam", redis_url=r.redis_url)
        assert out.returncode == 0, out.stderr
        nxt = run_uac(r.host, r.port, "127.0.11.1", 1, 5, rows(1, caller=caller))
        d = _decision(r.redis_url, next(iter(nxt.outcomes)))
        assert d["action"] == "divert", d
        assert _check(d, "reputation")[1] > 0.5
        assert r.machine.count_invites() == 1


def test_in_call_message_report_from_trusted_core(lab_factory: Any) -> None:
    with rig(lab_factory) as r:
        caller = "3125550177"
        run_uac(r.host, r.port, "127.0.11.2", 1, 5, rows(1, caller=caller, callee="6175550123"))
        port = free_udp_port("127.0.11.9")
        msg = invite(1, r.port, port, method=b"MESSAGE", ruri_user=b"spam-report",
                     from_hdr=b"<sip:6175550123@127.0.11.9>;tag=m1", body=b"spam",
                     content_type=b"text/plain", src_ip="127.0.11.9")
        # not a trusted peer: refused, nothing changes
        replies = send_all(r.port, [msg], port, src_ip="127.0.11.9")
        assert replies and replies[-1].startswith(b"SIP/2.0 403"), replies
        spitwall("list", "add", "trusted", "ip", "127.0.11.9", redis_url=r.redis_url)
        # the lists version is picked up with the next INVITE the child handles
        run_uac(r.host, r.port, "127.0.11.3", 2, 5, rows(2, caller="bystander"))
        replies = send_all(r.port, [msg.replace(b"branch=z9hG4bKbad1", b"branch=z9hG4bKm2")],
                           port, src_ip="127.0.11.9")
        assert any(x.startswith(b"SIP/2.0 202") for x in replies), replies
        shown = json.loads(spitwall("report", caller, "show", "--json",
                                    redis_url=r.redis_url).stdout)
        assert shown["caller"]["score"] > 0.5
        nxt = run_uac(r.host, r.port, "127.0.11.2", 1, 5, rows(1, caller=caller))
        assert _decision(r.redis_url, next(iter(nxt.outcomes)))["action"] == "divert"


def test_short_answered_calls_raise_the_callers_score(lab_factory: Any) -> None:
    with rig(lab_factory) as r:
        # keep these calls relayed: only the duration feedback is under test here
        for k, v in (("reject_threshold", "0.95"), ("divert_threshold", "0.9")):
            assert spitwall("config", "set", k, v, redis_url=r.redis_url).returncode == 0
        caller = "2025550199"
        scores = []
        for _ in range(3):
            res = run_uac(r.host, r.port, "127.0.12.1", 2, 5,
                          rows(2, caller=caller), hold_ms=100)
            assert res.count(200) == 2, res.summary()
            time.sleep(0.3)  # dialog:end runs when the BYE's 200 passes
            shown = json.loads(spitwall("report", caller, "show", "--json",
                                        redis_url=r.redis_url).stdout)
            scores.append(shown["caller"]["score"])
        assert 0 < scores[0] < scores[1] < scores[2], scores
        stats = json.loads(spitwall("stats", "--json", redis_url=r.redis_url).stdout)
        assert stats.get("feedback:short_call", 0) == 6, stats


def test_call_duration_feedback_can_be_turned_off(lab_factory: Any) -> None:
    """`reputation.call_duration=false`: no dialog tracking, so short calls feed nothing (the
    capacity trade-off measured in docs/benchmarks.md); turned on again, they do."""
    with rig(lab_factory) as r:
        for k, v in (("reject_threshold", "0.95"), ("divert_threshold", "0.9"),
                     ("reputation.call_duration", "false")):
            assert spitwall("config", "set", k, v, redis_url=r.redis_url).returncode == 0
        caller = "2025550188"
        res = run_uac(r.host, r.port, "127.0.12.2", 2, 5, rows(2, caller=caller), hold_ms=100)
        assert res.count(200) == 2, res.summary()
        assert all(code == 200 for code in res.bye_status.values()), res.bye_status
        time.sleep(0.3)
        stats = json.loads(spitwall("stats", "--json", redis_url=r.redis_url).stdout)
        assert stats.get("feedback:short_call", 0) == 0, stats
        assert spitwall("config", "set", "reputation.call_duration", "true",
                        redis_url=r.redis_url).returncode == 0
        res = run_uac(r.host, r.port, "127.0.12.2", 2, 5, rows(2, caller=caller), hold_ms=100)
        assert res.count(200) == 2, res.summary()
        time.sleep(0.3)
        stats = json.loads(spitwall("stats", "--json", redis_url=r.redis_url).stdout)
        assert stats.get("feedback:short_call", 0) == 2, stats


def test_dialog_timeout_is_no_call_duration(lab_factory: Any) -> None:
    """A call whose BYE does not come through the proxy before the dialog times out ended at
    an unknown time: no duration feedback (it used to count as a long call, i.e. good
    reputation), counted as `dialog_timeout`. A call ended by a BYE in time still counts."""
    with rig(lab_factory, dialog_timeout=3) as r:
        for k, v in (("reject_threshold", "0.95"), ("divert_threshold", "0.9"),
                     ("reputation.short_call", "0.5"), ("reputation.long_call", "1")):
            assert spitwall("config", "set", k, v, redis_url=r.redis_url).returncode == 0
        caller = "2025550177"

        def call(hold_ms: int) -> tuple[dict[str, int], dict[str, Any]]:
            """One call from `caller` ended by its BYE after `hold_ms`: (stats, reputation)."""
            res = run_uac(r.host, r.port, "127.0.12.3", 1, 5, rows(1, caller=caller),
                          hold_ms=hold_ms)
            assert res.count(200) == 1 and set(res.bye_status.values()) == {200}, res.summary()
            time.sleep(0.3)
            stats = json.loads(spitwall("stats", "--json", redis_url=r.redis_url).stdout)
            shown = json.loads(spitwall("report", caller, "show", "--json",
                                        redis_url=r.redis_url).stdout)
            return stats, shown["caller"]

        # a "long" call here, ended before the timeout (after 2-3 s: whole timer ticks)
        stats, before = call(1400)
        assert stats.get("feedback:long_call", 0) == 1, stats
        assert stats.get("dialog_timeout", 0) == 0, stats
        # the BYE comes after 5 s, the dialog timed out at 2-3 s: the BYE is still relayed
        # (record-routed), but the call's "duration" is unknown
        stats, after = call(5000)
        assert stats.get("dialog_timeout", 0) == 1, stats
        assert stats.get("feedback:long_call", 0) == 1, stats
        assert after["events"] == before["events"], (before, after)


def test_alert_info_from_untrusted_caller_never_reaches_next_hop(lab_factory: Any) -> None:
    with rig(lab_factory) as r:
        # relay, not divert, so that the next hop shows what the core would get
        assert spitwall("config", "set", "divert_threshold", "0.5",
                        redis_url=r.redis_url).returncode == 0
        hostile = (b"Alert-Info: <http://127.0.0.1/ring.wav>;info=alert-autoanswer\r\n"
                   b"Call-Info: <sip:127.0.0.1>;answer-after=0\r\n")
        port = free_udp_port("127.0.13.1")
        send_all(r.port, [invite(31, r.port, port, extra=hostile, src_ip="127.0.13.1")], port,
                 src_ip="127.0.13.1")
        got = r.next_hop.wait_for_invites(1)
        assert got and not got[0].has_header("Alert-Info") and not got[0].has_header("Call-Info")
        d = _decision(r.redis_url, "bad-31@127.0.13.1")
        assert _check(d, "ring_hijack")[1] == 1.0
        # a trusted peer keeps its Alert-Info
        spitwall("list", "add", "trusted", "cidr", "127.0.14.0/24", redis_url=r.redis_url)
        run_uac(r.host, r.port, "127.0.13.2", 1, 5, rows(1))  # children learn the new list
        run_uac(r.host, r.port, "127.0.13.3", 1, 5, rows(1))
        port = free_udp_port("127.0.14.1")
        send_all(r.port, [invite(32, r.port, port, extra=b"Alert-Info: <urn:alert:service:"
                                 b"normal>\r\n", src_ip="127.0.14.1")], port,
                 src_ip="127.0.14.1")
        deadline = time.monotonic() + 5
        kept: list[SipMessage] = []
        while time.monotonic() < deadline and not kept:
            kept = [m for m in r.next_hop.invite_messages() if m.call_id == "bad-32@127.0.14.1"]
            time.sleep(0.1)
        assert kept and kept[0].has_header("Alert-Info")


def test_suspicious_relayed_call_is_labelled_and_a_forged_label_removed(
        lab_factory: Any) -> None:
    """label.threshold: a relayed call goes on with our Call-Info label (confidence = score
    in percent); the label the caller wrote itself never reaches the next hop."""
    with rig(lab_factory) as r:
        for k, v in (("reject_threshold", "0.95"), ("divert_threshold", "0.9"),
                     ("label.threshold", "0"), ("label.info_url", "https://operator.example/s")):
            assert spitwall("config", "set", k, v, redis_url=r.redis_url).returncode == 0
        forged = b"Call-Info: <https://evil.example/>;purpose=info;type=not-spam;confidence=0\r\n"
        port = free_udp_port("127.0.16.1")
        send_all(r.port, [invite(41, r.port, port, extra=forged, src_ip="127.0.16.1")], port,
                 src_ip="127.0.16.1")
        got = r.next_hop.wait_for_invites(1)
        assert got, "the call was not relayed"
        labels = got[0].headers("Call-Info")
        score = float(got[0].header("X-Spitwall-Score") or "nan")
        assert labels == [f"<https://operator.example/s>;purpose=info;type=spam;"
                          f"confidence={round(score * 100)}"], labels
        d = _decision(r.redis_url, "bad-41@127.0.16.1")
        assert d["action"] == "relay" and d["label"] == labels[0]
        shown = spitwall("explain", "bad-41@127.0.16.1", redis_url=r.redis_url).stdout
        assert f"label     Call-Info: {labels[0]}" in shown
        stats = json.loads(spitwall("stats", "--json", redis_url=r.redis_url).stdout)
        assert stats.get("labelled") == 1, stats


def test_608_with_operator_call_info(lab_factory: Any) -> None:
    with rig(lab_factory) as r:
        for k, v in (("reject_code", "608"),
                     ("reject.call_info_url", "https://operator.example/jcard.json")):
            assert spitwall("config", "set", k, v, redis_url=r.redis_url).returncode == 0
        res = run_uac(r.host, r.port, "127.0.15.1", 1, 5, rows(1, ua="friendly-scanner"))
        assert res.count(608) == 1, res.summary()
        reply = res.final_response(next(iter(res.outcomes)))
        assert reply is not None and reply.first_line == "SIP/2.0 608 Rejected"
        assert reply.header("Call-Info") == "<https://operator.example/jcard.json>;purpose=jwscard"


def test_geoip_country_scores_and_country_block(lab_factory: Any, tmp_path: Any) -> None:
    from tests.geodb import build_country_db

    db = build_country_db(tmp_path / "geo.mmdb", {"127.50.0.0/16": "KP", "127.51.0.0/16": "DE"})
    with rig(lab_factory) as r:
        shown = spitwall("config", "show", redis_url=r.redis_url).stdout
        assert "GeoIP: off" in shown
        for k, v in (("geoip.database", str(db)), ("geoip.country_scores", "KP:1")):
            out = spitwall("config", "set", k, v, redis_url=r.redis_url)
            assert out.returncode == 0, out.stderr
        kp = run_uac(r.host, r.port, "127.50.0.1", 1, 5, rows(1))
        d = _decision(r.redis_url, next(iter(kp.outcomes)))
        assert _check(d, "geoip")[1:] == [1.0, 0.3, "source country KP"], d
        assert d["action"] == "divert"
        de = run_uac(r.host, r.port, "127.51.0.1", 1, 5, rows(1))
        assert _decision(r.redis_url, next(iter(de.outcomes)))["action"] == "relay"
        spitwall("list", "add", "block", "country", "DE", redis_url=r.redis_url)
        de = run_uac(r.host, r.port, "127.51.0.2", 1, 5, rows(1))
        assert de.count(603) == 1, de.summary()


def test_neighbour_spoofed_call_scores_higher(lab_factory: Any) -> None:
    with rig(lab_factory) as r:
        far = run_uac(r.host, r.port, "127.0.16.1", 1, 5,
                      rows(1, caller="2125550123", callee="4155550199"))
        near = run_uac(r.host, r.port, "127.0.16.2", 1, 5,
                       rows(1, caller="4155550123", callee="4155550199"))
        d_far = _decision(r.redis_url, next(iter(far.outcomes)))
        d_near = _decision(r.redis_url, next(iter(near.outcomes)))
        assert _check(d_far, "callerid")[1] == 0.0, d_far
        assert _check(d_near, "callerid")[1] > 0.0, d_near
        assert "neighbour" in _check(d_near, "callerid")[3]
        assert d_near["score"] > d_far["score"]
