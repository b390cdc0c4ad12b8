"""Calls in progress survive a clean Kamailio restart (`systemctl restart kamailio`): the
dialog module writes its dialogs to the dialog database (`ops.dialogdb`, kamailio.cfg's
DIALOG_DB) at shutdown and the next Kamailio reads them, so a call that was answered before
the restart still ends as a tracked call: an intercept target's call gets its Release, a
plain call its call-duration feedback. Real Kamailio, SIPp SRTP endpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from ops.lab import Lab
from ops.procs import pid_alive, wait_until
from ops.sipp import UacResult, run_uac, start_uas
from scoring import config_admin
from tests.integration.helpers import rows, spitwall
from tests.integration.test_intercept_proxy import (
    SUITE,
    attr,
    events_of,
    new_key,
    provision,
    sdes,
    srtp_call,
    srtp_uas,
    unprovision,
)
from tests.intercept_certs import make_recipient

pytestmark = pytest.mark.integration

HOLD_MS = 6000  # the call is up this long after the ACK; Kamailio restarts meanwhile


def dialogs(lab: Lab, state: str = "call-id:") -> int:
    """How many dialogs the running Kamailio tracks (its ctl socket, `kamcmd dlg.list`);
    `state="state: 4"` counts the confirmed ones."""
    assert lab.state is not None
    out = subprocess.run(["kamcmd", "-s", f"unix:{lab.workdir / 'kamailio_ctl'}", "dlg.list"],
                         capture_output=True, text=True, timeout=10, check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout.count(state)


def rows_on_disk(lab: Lab) -> int:
    assert lab.state is not None
    table = Path(lab.state.dialog_db) / "dialog"
    return len([line for line in table.read_text().splitlines()[1:] if line.strip()])


def _call_in_background(lab: Lab, workdir: Path, caller: str) -> tuple[threading.Thread,
                                                                       list[Any]]:
    result: list[Any] = []

    def run() -> None:
        try:
            result.append(srtp_call(lab, workdir, caller, "bob", sdes(new_key(), 1111),
                                    hold_ms=HOLD_MS))
        except BaseException as exc:  # handed to the test thread
            result.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def uac_in_background(port: int, src_ip: str, calls: int,
                      hold_ms: int) -> tuple[threading.Thread, list[UacResult]]:
    """`calls` plain calls from `src_ip` to the proxy on `port`, each held `hold_ms` after its
    ACK, in a thread; the list gets the SIPp result when they are done."""
    result: list[UacResult] = []
    thread = threading.Thread(target=lambda: result.append(run_uac(
        "127.0.0.1", port, src_ip, calls, 5, rows(calls), hold_ms=hold_ms)), daemon=True)
    thread.start()
    return thread, result


def target_call_across(lab_factory: Any, tmp_path: Path, redis_url: str,
                       interrupt: Callable[[Lab], None], **up: Any) -> Lab:
    """An intercept target's SRTP call is answered through a fresh lab (``up``: more
    `Lab.up` arguments), ``interrupt(lab)`` restarts Kamailio meanwhile (cleanly, or after a
    crash), then the call ends with its BYE: asserts that the case still got its Release (for
    that call, reason BYE) and the caller its call-duration feedback. Returns the lab (up)."""
    recipient = make_recipient("li-recorder")
    client = redis.Redis.from_url(redis_url)
    caller = f"tgt{uuid.uuid4().hex[:8]}"
    liid = provision(client, recipient, f"{caller}@127.0.0.2")
    config_admin.set_value(client, "reputation.long_call", "2", user="test")
    try:
        with srtp_uas(tmp_path / "uas", sdes(new_key(), 2222)) as uas:
            lab: Lab = lab_factory(next_hop=f"sip:127.0.0.1:{uas.port}", children=2, **up)
            assert lab.state is not None
            thread, result = _call_in_background(lab, tmp_path / "uac", caller)
            answered = events_of(client, recipient, liid, wait_for="Answer")
            assert [e for e, _ in answered] == ["Origination", "Keys", "Answer"], answered
            old_pid = lab.state.pids["kamailio"]

            interrupt(lab)
            assert lab.state.pids["kamailio"] != old_pid
            assert dialogs(lab) == 1  # the new Kamailio knows the call

            thread.join(timeout=40)
            assert not thread.is_alive(), "the call did not end"
            assert isinstance(result[0], str), result  # SIPp's BYE got its 200
            call_id = result[0]
            events = events_of(client, recipient, liid, wait_for="Release", timeout=15)
            # the call's end is fed back to the caller's reputation (6 s > long_call = 2 s)
            shown = json.loads(spitwall("report", f"{caller}@127.0.0.2", "show", "--json",
                                        redis_url=redis_url).stdout)
    finally:
        unprovision(client, liid)
        client.close()
    assert [e for e, _ in events] == ["Origination", "Keys", "Answer", "Release"], events
    release = json.loads(dict(events)["Release"].split("\r\n\r\n", 1)[1])
    assert release["call_id"] == call_id and release["reason"] == "BYE"
    assert shown["caller"]["events"] == 1, shown
    assert attr(dict(events)["Keys"], "crypto")[0].startswith(f"1 {SUITE} inline:")
    return lab


@pytest.mark.timeout(120)
def test_target_call_up_across_a_restart_gets_its_release(
        lab_factory: Any, tmp_path: Path, redis_url: str) -> None:
    def restart(lab: Lab) -> None:
        assert lab.state is not None and lab.state.dialog_db  # the db_text store, the default
        lab.restart_kamailio()  # clean: the dialog is written at the shutdown, read at start

    target_call_across(lab_factory, tmp_path, redis_url, restart)


@pytest.mark.timeout(120)
def test_dialogs_that_ended_before_a_crash_are_not_revived(lab_factory: Any) -> None:
    """Only a clean shutdown writes the dialog table: after a crash it still holds the dialogs
    of the shutdown before, ended since. The next start must not revive them."""
    with start_uas("127.0.0.1") as hop:
        lab: Lab = lab_factory(next_hop=f"sip:127.0.0.1:{hop.port}", children=2)
        assert lab.state is not None
        port = lab.state.sip_port
        thread, result = uac_in_background(port, "127.0.41.1", 1, 4000)
        assert wait_until(lambda: dialogs(lab, "state: 4") == 1, 10)  # answered and ACKed
        lab.restart_kamailio()  # clean: the call's dialog is written and read again
        assert dialogs(lab) == 1
        thread.join(timeout=30)
        assert result and result[0].count(200) == 1, result
        assert all(code == 200 for code in result[0].bye_status.values())
        assert wait_until(lambda: dialogs(lab) == 0, 5)  # the BYE ended it
        assert rows_on_disk(lab) == 1  # ... but the table on disk still has it

        main = lab.state.pids["kamailio"]
        os.killpg(os.getpgid(main), signal.SIGKILL)  # a crash: nothing is written
        assert wait_until(lambda: not pid_alive(main), 10)
        lab.restart_kamailio()
        assert rows_on_disk(lab) == 0
        assert dialogs(lab) == 0
