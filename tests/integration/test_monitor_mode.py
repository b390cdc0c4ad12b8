"""Monitor mode (`mode=monitor`) through the real Kamailio with SIPp: a campaign that enforce
mode diverts and rejects is relayed to the callee, every call recorded with what enforcing
would have done; a block-listed source is still rejected; `mode=enforce` applies at once."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis

from ops.sipp import run_uac
from scoring.store import find_decision
from tests.integration.helpers import rig, spitwall

pytestmark = pytest.mark.integration


def _campaign(n: int, start: int = 0) -> list[tuple[str, str, str, str]]:
    return [(f"spam{i:03d}", f"4155550{i:03d}", "Prize Desk", "Asterisk PBX 18")
            for i in range(start, start + n)]


def test_monitor_mode_relays_a_campaign_and_records_what_it_would_do(lab_factory: Any) -> None:
    with rig(lab_factory) as r:
        out = spitwall("config", "set", "mode", "monitor", redis_url=r.redis_url)
        assert out.returncode == 0, out.stderr
        n = 30
        res = run_uac(r.host, r.port, "127.0.5.4", n, 10, _campaign(n), max_concurrent=1,
                      hold_ms=50)
        assert res.count(200) == n, res.summary()
        assert r.machine.count_invites() == 0  # nothing diverted
        relayed = r.next_hop.wait_for_invites(n)
        assert len(relayed) == n
        client = redis.Redis.from_url(r.redis_url)
        try:
            records = [find_decision(client, inv.call_id or "") for inv in res.sent_invites()]
        finally:
            client.close()
        assert all(d is not None and d["action"] == "relay" for d in records)
        would = [d.get("would") for d in records if d is not None]
        assert "reject" in would and "divert" in would, would
        # the score header carries the score that enforcing would have acted on
        scores = sorted(float(inv.header("X-Spitwall-Score") or 0) for inv in relayed)
        assert scores[-1] >= 0.7
        rejected = next(d for d in records if d is not None and d.get("would") == "reject")
        text = spitwall("explain", rejected["call_id"], redis_url=r.redis_url).stdout
        assert "would have been REJECT; relayed (mode=monitor)" in text
        stats = json.loads(spitwall("stats", "--json", redis_url=r.redis_url).stdout)
        assert stats["monitor:reject"] == would.count("reject")
        assert stats["monitor:divert"] == would.count("divert")

        # an explicit block is the operator's decision, applied in monitor mode too
        assert spitwall("list", "add", "block", "ip", "127.0.5.5",
                        redis_url=r.redis_url).returncode == 0
        blocked = run_uac(r.host, r.port, "127.0.5.5", 1, 10, _campaign(1))
        assert blocked.count(603) == 1, blocked.summary()

        # back to enforce: the same campaign is rejected from the next call on
        assert spitwall("config", "set", "mode", "enforce", redis_url=r.redis_url).returncode == 0
        after = run_uac(r.host, r.port, "127.0.5.4", 3, 10, _campaign(3, start=n),
                        max_concurrent=1)
        assert after.count(603) == 3, after.summary()


def test_opted_out_callee_gets_the_campaign_labelled_others_do_not(lab_factory: Any) -> None:
    """A subscriber on the optout list: the campaign's calls to it are relayed (with the
    spam label when labelling is on) and recorded with what screening would have done;
    the same campaign to another callee is rejected."""
    with rig(lab_factory) as r:
        for args in (("list", "add", "optout", "number", "4155550999", "--reason", "request"),
                     ("config", "set", "label.threshold", "0.2")):
            out = spitwall(*args, redis_url=r.redis_url)
            assert out.returncode == 0, out.stderr
        n = 25
        rows = [(f"spam{i:03d}", "4155550999", "Prize Desk", "Asterisk PBX 18") for i in range(n)]
        res = run_uac(r.host, r.port, "127.0.5.6", n, 10, rows, max_concurrent=1, hold_ms=50)
        assert res.count(200) == n, res.summary()
        assert r.machine.count_invites() == 0
        relayed = r.next_hop.wait_for_invites(n)
        client = redis.Redis.from_url(r.redis_url)
        try:
            records = [find_decision(client, inv.call_id or "") for inv in res.sent_invites()]
        finally:
            client.close()
        would = [d.get("would") for d in records if d is not None]
        assert "reject" in would, would
        rejected = next(d for d in records if d is not None and d.get("would") == "reject")
        text = spitwall("explain", rejected["call_id"], redis_url=r.redis_url).stdout
        assert "would have been REJECT; relayed (callee opted out: number 4155550999)" in text
        # the label tells the subscriber's phone what screening thought of the call
        loud = [inv for inv in relayed if float(inv.header("X-Spitwall-Score") or 0) >= 0.7]
        assert loud and all(inv.headers("Call-Info") for inv in loud)
        stats = json.loads(spitwall("stats", "--json", redis_url=r.redis_url).stdout)
        assert stats["optout:reject"] == would.count("reject")
        assert "monitor:reject" not in stats

        # the same campaign to a callee who did not opt out is screened
        other = [(f"spam{i:03d}", "4155550998", "Prize Desk", "Asterisk PBX 18")
                 for i in range(n, n + 3)]
        after = run_uac(r.host, r.port, "127.0.5.6", 3, 10, other, max_concurrent=1)
        assert after.count(603) == 3, after.summary()
