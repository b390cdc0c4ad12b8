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
