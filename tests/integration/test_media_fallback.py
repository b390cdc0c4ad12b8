"""A diverted call the answering machine cannot take is relayed to the callee after all
(`media.fallback=relay`, the default: fail-open), or refused (`media.fallback=reject`).

Real Kamailio, real SIPp next hop; the "answering machine" is a dead port (no reply: timeout
after `media.timeout`) or a SIPp UAS that refuses every callee (404).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from ops.lab import Lab
from ops.sipp import UasProcess, free_udp_port, run_uac, start_uas
from tests.integration.helpers import rows, spitwall

pytestmark = pytest.mark.integration


@contextmanager
def diverting_lab(lab_factory: Any, machine_port: int, fallback: str = "relay"
                  ) -> Iterator[tuple[Lab, UasProcess]]:
    """A lab that diverts every call to 127.0.0.1:`machine_port`; the next hop is a UAS."""
    with start_uas("127.0.0.1") as hop:
        lab: Lab = lab_factory(next_hop=f"sip:127.0.0.1:{hop.port}",
                               media_uri=f"sip:spitwall-am@127.0.0.1:{machine_port}")
        assert lab.state is not None
        for key, value in (("divert_threshold", "0"), ("reject_threshold", "0.99"),
                           ("media.timeout", "1"), ("media.fallback", fallback)):
            out = spitwall("config", "set", key, value, redis_url=lab.state.redis_url)
            assert out.returncode == 0, out.stderr
        yield lab, hop


def _stats(lab: Lab) -> dict[str, int]:
    assert lab.state is not None
    out = spitwall("stats", "--json", redis_url=lab.state.redis_url)
    assert out.returncode == 0, out.stderr
    data: dict[str, int] = json.loads(out.stdout)
    return data


def test_dead_answering_machine_falls_back_to_the_callee(lab_factory: Any) -> None:
    dead = free_udp_port("127.0.0.1")  # nothing listens: no reply at all
    with diverting_lab(lab_factory, dead) as (lab, hop):
        assert lab.state is not None
        started = time.monotonic()
        res = run_uac("127.0.0.1", lab.state.sip_port, "127.0.31.1", 2, 5, rows(2))
        assert res.count(200) == 2, res.summary()
        assert time.monotonic() - started >= 1.0  # each waited media.timeout first
        assert all(code == 200 for code in res.bye_status.values()), res.bye_status
        invites = hop.wait_for_invites(2)
        for inv in invites:
            # the callee gets the call as if relayed: scored, no divert headers
            assert inv.headers("X-Spitwall-Score")
            assert not inv.headers("Diversion") and not inv.headers("X-Spitwall-Source")
            assert inv.first_line.startswith("INVITE sip:bob@"), inv.first_line
        # counted in `spitwall stats` (each child flushes its counters every few seconds);
        # the relayed calls' ends feed the caller's reputation like any relayed call's
        deadline = time.monotonic() + 20
        while (_stats(lab).get("media_fallback", 0) < 2
               or _stats(lab).get("feedback:short_call", 0) < 2) \
                and time.monotonic() < deadline:
            run_uac("127.0.0.1", lab.state.sip_port, "127.0.31.2", 1, 5, rows(1))
        stats = _stats(lab)
        assert stats.get("media_fallback", 0) >= 2, stats
        assert stats.get("feedback:short_call", 0) >= 2, stats


def test_refusing_answering_machine_falls_back_to_the_callee(lab_factory: Any) -> None:
    # the "machine" answers 404 to everyone
    with start_uas("127.0.0.1", known_users=["nobody"]) as machine, \
            diverting_lab(lab_factory, machine.port) as (lab, hop):
        assert lab.state is not None
        res = run_uac("127.0.0.1", lab.state.sip_port, "127.0.31.3", 1, 5, rows(1))
        assert res.count(200) == 1, res.summary()
        assert machine.count_invites() == 1  # it was asked first
        assert hop.count_invites() == 1


def test_fallback_reject_returns_the_machines_failure(lab_factory: Any) -> None:
    dead = free_udp_port("127.0.0.1")
    with diverting_lab(lab_factory, dead, fallback="reject") as (lab, hop):
        assert lab.state is not None
        res = run_uac("127.0.0.1", lab.state.sip_port, "127.0.31.4", 1, 5, rows(1))
        assert res.count(408) == 1, res.summary()  # tm's own timeout reply
        assert hop.count_invites() == 0
