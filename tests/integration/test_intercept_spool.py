"""Intercept events survive a Redis outage and a Kamailio crash (intercept.spool), through the
real Kamailio with SIPp SRTP endpoints: a target's call while Redis is down is spooled to disk,
Kamailio is killed with SIGKILL, and the next Kamailio delivers the events once Redis is back."""

from __future__ import annotations

import base64
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from intercept import names
from ops.lab import Lab
from ops.procs import pid_alive, wait_until
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


def _spooled(spool: Path) -> int:
    return sum(p.stat().st_size for p in spool.glob("li-*.spool"))


def test_events_of_a_call_during_an_outage_survive_a_kamailio_crash(
    lab_factory: Any, tmp_path: Path, redis_server: Any, redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spool = tmp_path / "li-spool"
    monkeypatch.setenv("SPITWALL_LI_SPOOL", str(spool))  # both Kamailios: one spool
    recipient = make_recipient("li-recorder")
    client = redis.Redis.from_url(redis_url)
    caller = f"tgt{uuid.uuid4().hex[:8]}"
    liid = provision(client, recipient, f"{caller}@127.0.0.2")
    k_caller, k_callee = new_key(), new_key()
    try:
        with srtp_uas(tmp_path / "uas", sdes(k_callee, 2222)) as uas:
            # one SIP worker: the one that took the first call has the target loaded when
            # Redis goes (a worker learns the targets' version with each INVITE's round trip)
            first: Lab = lab_factory(next_hop=f"sip:127.0.0.1:{uas.port}", children=1)
            # a call with Redis up: the worker and the timer process have the target loaded
            srtp_call(first, tmp_path / "uac0", caller, "bob", sdes(new_key(), 1000))
            assert [e for e, _ in events_of(client, recipient, liid)][-1] == "Release"
            client.delete(names.EVENTS)

            redis_server.stop()
            call_id = srtp_call(first, tmp_path / "uac1", caller, "bob", sdes(k_caller, 1111))
            assert wait_until(lambda: _spooled(spool) > 0, 10), "nothing was spooled"
            assert stat_mode(spool) == 0o700
            # the call's events are on disk as ciphertext only
            for path in spool.glob("li-*.spool"):
                data = path.read_bytes()
                assert k_caller.encode() not in data and k_callee.encode() not in data
            time.sleep(0.5)  # the Release of the BYE too

            # Kamailio dies without a chance to flush anything
            assert first.state is not None
            main = first.state.pids["kamailio"]
            os.killpg(os.getpgid(main), signal.SIGKILL)
            assert wait_until(lambda: not pid_alive(main), 10)
            first.down()

            redis_server.start()
            second: Lab = lab_factory(next_hop=f"sip:127.0.0.1:{uas.port}", children=2)
            assert second.state is not None
            events = events_of(client, recipient, liid, timeout=15)
            assert wait_until(lambda: _spooled(spool) == 0, 10)
    finally:
        if not redis_server.running():
            redis_server.start()
        unprovision(client, liid)
        client.close()
    names_seen = [e for e, _ in events]
    assert names_seen == ["Origination", "Keys", "Answer", "Release"], names_seen
    keys_body = dict(events)["Keys"]
    assert f"a=x-call-id:{call_id}" in keys_body
    assert attr(keys_body, "crypto") == [f"1 {SUITE} inline:{k_caller} SSRC=1111"]
    assert attr(keys_body, "rcrypto") == [f"1 {SUITE} inline:{k_callee} SSRC=2222"]
    assert base64.b64decode(k_caller)  # the disclosed key is the caller's real one


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_worker_that_never_saw_the_target_intercepts_during_an_outage(
    lab_factory: Any, tmp_path: Path, redis_server: Any, redis_url: str,
) -> None:
    """A target provisioned while the SIP worker is idle, then Redis goes down: the worker
    cannot learn the target from an INVITE's round trip; it takes the targets the timer
    process left in Kamailio's shared memory, and the call's events are spooled and
    delivered once Redis is back."""
    recipient = make_recipient("li-recorder")
    client = redis.Redis.from_url(redis_url)
    caller = f"tgt{uuid.uuid4().hex[:8]}"
    k_caller, k_callee = new_key(), new_key()
    liid = ""
    try:
        with srtp_uas(tmp_path / "uas", sdes(k_callee, 2222)) as uas:
            # one SIP worker, which handles no INVITE before the outage
            lab: Lab = lab_factory(next_hop=f"sip:127.0.0.1:{uas.port}", children=1)
            assert lab.state is not None
            liid = provision(client, recipient, f"{caller}@127.0.0.2")
            time.sleep(2.5)  # the timer process's look at the targets (once a second)

            redis_server.stop()
            call_id = srtp_call(lab, tmp_path / "uac", caller, "bob", sdes(k_caller, 1111))
            spool = Path(lab.workdir) / "li-spool"
            assert wait_until(lambda: _spooled(spool) > 0, 10), "nothing was spooled"
            time.sleep(0.5)  # the Release of the BYE too
            redis_server.start()
            events = events_of(client, recipient, liid, timeout=15)
    finally:
        if not redis_server.running():
            redis_server.start()
        if liid:
            unprovision(client, liid)
        client.close()
    assert [e for e, _ in events] == ["Origination", "Keys", "Answer", "Release"], events
    keys_body = dict(events)["Keys"]
    assert f"a=x-call-id:{call_id}" in keys_body
    assert attr(keys_body, "crypto") == [f"1 {SUITE} inline:{k_caller} SSRC=1111"]
    assert attr(keys_body, "rcrypto") == [f"1 {SUITE} inline:{k_callee} SSRC=2222"]
