"""The number database through the real Kamailio (kamailio.cfg) with SIPp callers: numbers
imported with `spitwall numbers` are looked up in each INVITE's round trip."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ops.sipp import run_uac
from tests.integration.helpers import rig, rows, spitwall

pytestmark = pytest.mark.integration

BLOCKED = "+15550100666"
ALLOWED = "+15550100777"
DNO = "+18005550199"


def _explain(call_id: str, redis_url: str) -> dict[str, Any]:
    out = spitwall("explain", call_id, "--json", redis_url=redis_url)
    assert out.returncode == 0, out.stderr
    data: dict[str, Any] = json.loads(out.stdout)
    return data


def test_imported_numbers_block_allow_and_flag_do_not_originate(lab_factory: Any,
                                                                  tmp_path: Path) -> None:
    with rig(lab_factory) as r:
        feed = tmp_path / "robocalls.txt"
        feed.write_text("# feed of the week\n" + "".join(
            f"+1555020{i:04d},robocall feed\n" for i in range(2000)) + f"{BLOCKED},campaign\n")
        out = spitwall("numbers", "import", "block", str(feed), redis_url=r.redis_url)
        assert out.returncode == 0, out.stderr
        assert "imported 2001 numbers" in out.stdout and "numbers.lookup turned on" in out.stdout
        for lst, number in (("allow", ALLOWED), ("dno", DNO)):
            done = spitwall("numbers", "add", lst, number, redis_url=r.redis_url)
            assert done.returncode == 0, done.stderr
        # every child sees the new config version in its next INVITE's reply
        warm = run_uac(r.host, r.port, "127.0.4.1", 4, 20, rows(4))
        assert warm.count(200) == 4, warm.summary()

        blocked = run_uac(r.host, r.port, "127.0.4.2", 3, 10, rows(3, caller=BLOCKED))
        assert blocked.count(603) == 3, blocked.summary()
        data = _explain(next(iter(blocked.outcomes)), r.redis_url)
        assert data["rule"] == "blocklist"
        assert any("number database" in c["reason"] and "campaign" in c["reason"]
                   for c in data["checks"])

        # allow wins over scoring: a scanner User-Agent is relayed unscored
        allowed = run_uac(r.host, r.port, "127.0.4.3", 2, 10,
                          rows(2, caller=ALLOWED, ua="friendly-scanner"))
        assert allowed.count(200) == 2, allowed.summary()
        assert _explain(next(iter(allowed.outcomes)), r.redis_url)["rule"] == "allowlist"

        clean = run_uac(r.host, r.port, "127.0.4.4", 1, 10, rows(1, caller="+12025550123"))
        spoofed = run_uac(r.host, r.port, "127.0.4.5", 1, 10, rows(1, caller="8005550199"))
        assert clean.count(200) == 1, clean.summary()
        assert None not in spoofed.counts, spoofed.summary()  # relayed, diverted or rejected
        plain, dno = (_explain(next(iter(x.outcomes)), r.redis_url) for x in (clean, spoofed))
        (callerid,) = [c for c in dno["checks"] if c["check"] == "callerid"]
        assert f"caller {DNO} is on the do-not-originate list" in callerid["reason"]
        assert dno["score"] > plain["score"]

        # removing the number takes effect on the next call, without a reload
        assert spitwall("numbers", "remove", "block", BLOCKED,
                        redis_url=r.redis_url).returncode == 0
        again = run_uac(r.host, r.port, "127.0.4.6", 1, 10, rows(1, caller=BLOCKED))
        assert again.count(603) == 0, again.summary()


def test_replace_import_unblocks_numbers_gone_from_the_feed(lab_factory: Any,
                                                            tmp_path: Path) -> None:
    """`numbers import --replace`: yesterday's blocked number that today's feed no longer has
    is relayed again; one still in the feed stays blocked."""
    gone, kept = "+15550300111", "+15550300222"
    with rig(lab_factory) as r:
        feed = tmp_path / "feed.txt"
        feed.write_text(f"{gone}\n{kept}\n")
        assert spitwall("numbers", "import", "block", str(feed),
                        redis_url=r.redis_url).returncode == 0
        warm = run_uac(r.host, r.port, "127.0.4.9", 4, 20, rows(4))  # children see the lookup
        assert warm.count(200) == 4, warm.summary()
        before = run_uac(r.host, r.port, "127.0.4.10", 1, 10, rows(1, caller=gone))
        assert before.count(603) == 1, before.summary()

        feed.write_text(f"{kept}\n")
        out = spitwall("numbers", "import", "block", str(feed), "--replace",
                       redis_url=r.redis_url)
        assert out.returncode == 0 and "removed 1 not in the file" in out.stdout, out
        after = run_uac(r.host, r.port, "127.0.4.10", 1, 10, rows(1, caller=gone))
        assert after.count(200) == 1, after.summary()
        still = run_uac(r.host, r.port, "127.0.4.11", 1, 10, rows(1, caller=kept))
        assert still.count(603) == 1, still.summary()
