"""The Redis dialog store: calls in progress also survive a Kamailio *crash*. With
``SPITWALL_DIALOG_REDIS`` (`ops.dialogdb`, kamailio.cfg's DIALOG_REDIS) the dialog module
writes new dialogs from its timer every DIALOG_DB_PERIOD seconds into a Redis of the proxy's
own (append-only) and removes them at their BYE; after a SIGKILL the next Kamailio reads them
back, so an intercept target's call answered before the crash still gets its Release and a
plain call its call-duration feedback. Real Kamailio (db_redis), redis-server, SIPp."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis

from ops.lab import Lab
from ops.procs import pid_alive, pid_cmdline, wait_until
from ops.sipp import run_uac, start_uas
from tests.integration.helpers import rows
from tests.integration.test_restart import (
    dialogs,
    target_call_across,
    uac_in_background,
)

pytestmark = pytest.mark.integration


def stored(lab: Lab) -> int:
    """Dialogs in the lab's dialog Redis (db_redis: one hash per dialog)."""
    assert lab.state is not None
    client = redis.Redis.from_url(lab.state.dialog_redis_url())
    try:
        return len(client.keys("dialog:entry::*"))
    finally:
        client.close()


def crash(lab: Lab) -> None:
    """SIGKILL Kamailio's process group: nothing is written at shutdown."""
    assert lab.state is not None
    main = lab.state.pids["kamailio"]
    os.killpg(os.getpgid(main), signal.SIGKILL)
    assert wait_until(lambda: not pid_alive(main), 10)


@pytest.mark.timeout(120)
def test_target_call_up_across_a_crash_gets_its_release(
        lab_factory: Any, tmp_path: Path, redis_url: str) -> None:
    def crash_and_start(lab: Lab) -> None:
        assert lab.state is not None and lab.state.dialog_redis_port
        assert not lab.state.dialog_db  # the Redis store replaces the db_text one
        secret = lab.state.dialog_redis_url().split(":")[2].split("@")[0]
        assert secret not in " ".join(pid_cmdline(lab.state.pids["kamailio"]) or [])
        assert wait_until(lambda: stored(lab) == 1, 5)  # the dialog timer wrote it
        crash(lab)
        lab.restart_kamailio()  # reads it back from Redis

    lab = target_call_across(lab_factory, tmp_path, redis_url, crash_and_start,
                             dialog_store="redis", dialog_db_period=1)
    assert wait_until(lambda: stored(lab) == 0, 5)  # the BYE removed it


@pytest.mark.timeout(120)
def test_ended_calls_leave_the_store_and_are_not_revived(lab_factory: Any) -> None:
    """A call that ended (BYE through us) is removed from Redis: a crash afterwards revives
    nothing. A written dialog survives a clean restart too, and its BYE then removes it."""
    with start_uas("127.0.0.1") as hop:
        lab: Lab = lab_factory(next_hop=f"sip:127.0.0.1:{hop.port}", children=2,
                               dialog_store="redis", dialog_db_period=1)
        assert lab.state is not None
        port = lab.state.sip_port
        ended = run_uac("127.0.0.1", port, "127.0.41.2", 1, 5, rows(1), hold_ms=2500)
        assert ended.count(200) == 1 and set(ended.bye_status.values()) == {200}
        assert wait_until(lambda: stored(lab) == 0 and dialogs(lab) == 0, 5)
        crash(lab)
        lab.restart_kamailio()
        assert dialogs(lab) == 0

        thread, result = uac_in_background(port, "127.0.41.3", 1, 4000)
        assert wait_until(lambda: dialogs(lab, "state: 4") == 1, 10)
        # written by the dialog timer within the period (a clean stop does not write what the
        # timer has not written yet: db_mode 2 leaves the main process no database handle)
        assert wait_until(lambda: stored(lab) == 1, 5)
        restarted = subprocess.run(  # as an operator: `spitwall lab restart-proxy`
            [sys.executable, "-m", "ops.cli", "lab", "restart-proxy", "--workdir",
             str(lab.workdir)], capture_output=True, text=True, timeout=60, check=False)
        assert restarted.returncode == 0, restarted.stderr
        assert "dialogs kept in the dialog Redis on 127.0.0.1:" in restarted.stdout
        assert dialogs(lab) == 1
        thread.join(timeout=30)
        assert result and set(result[0].bye_status.values()) == {200}, result
        assert wait_until(lambda: dialogs(lab) == 0 and stored(lab) == 0, 5)
        rows_ = lab.status()
        assert rows_ is not None
        assert ("dialog-redis", True, True) in [(r.name, r.alive, r.answering) for r in rows_]


@pytest.mark.timeout(120)
def test_calls_go_on_when_the_dialog_redis_is_down(lab_factory: Any) -> None:
    """The dialog Redis killed (connection refused): Kamailio logs its failed writes and
    removals, and every call is still relayed and ended; the scoring Redis is not involved."""
    with start_uas("127.0.0.1") as hop:
        lab: Lab = lab_factory(next_hop=f"sip:127.0.0.1:{hop.port}", children=2,
                               dialog_store="redis", dialog_db_period=1)
        assert lab.state is not None
        port = lab.state.sip_port
        thread, result = uac_in_background(port, "127.0.41.4", 2, 3000)
        assert wait_until(lambda: stored(lab) == 2, 8)  # written: their BYEs must remove them
        dialog_redis = lab.state.pids["dialog-redis"]
        os.kill(dialog_redis, signal.SIGKILL)
        assert wait_until(lambda: not pid_alive(dialog_redis), 5)
        thread.join(timeout=30)
        assert result and result[0].count(200) == 2, result
        assert set(result[0].bye_status.values()) == {200}, result[0].bye_status
        more = run_uac("127.0.0.1", port, "127.0.41.5", 3, 5, rows(3), hold_ms=1500)
        assert more.count(200) == 3 and set(more.bye_status.values()) == {200}
        assert wait_until(lambda: dialogs(lab) == 0, 8)  # ended ones linger a moment
        assert pid_alive(lab.state.pids["kamailio"])
        rows_ = lab.status()
        assert rows_ is not None
        assert ("dialog-redis", False, False) in [(r.name, r.alive, r.answering) for r in rows_]
