"""spitwall called from a native Kamailio cfg (examples/kamailio-native.cfg) with
python_exec("spitwall_invite"): the cfg routes, spitwall scores, the AVPs carry the outcome."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ops.lab import REPO_ROOT, Lab
from ops.sipp import run_uac
from tests.integration.helpers import rig, rows, spitwall

pytestmark = pytest.mark.integration

NATIVE_CFG = REPO_ROOT / "examples" / "kamailio-native.cfg"


@pytest.fixture
def native_factory(tmp_path: Path, redis_url: str) -> Iterator[Any]:
    labs: list[Lab] = []

    def make(**kwargs: Any) -> Lab:
        lab = Lab(tmp_path / f"native{len(labs)}", kamailio_cfg=NATIVE_CFG)
        labs.append(lab)
        lab.up(redis_url=redis_url, **kwargs)
        return lab

    try:
        yield make
    finally:
        for lab in reversed(labs):
            lab.down()


def _avp_lines(lab: Lab) -> list[str]:
    assert lab.state is not None
    log = Path(lab.state.logs["kamailio"]).read_text(errors="replace")
    return [line.split("native cfg: ", 1)[1] for line in log.splitlines()
            if "native cfg: spitwall_rc=" in line]


def test_relay_reject_and_divert_through_python_exec(native_factory: Any) -> None:
    with rig(native_factory) as r:
        # relay: scored, header added, the cfg sends it to its next hop
        res = run_uac(r.host, r.port, "127.0.10.1", 2, 5, rows(2))
        assert res.count(200) == 2, res.summary()
        for inv in r.next_hop.wait_for_invites(2):
            assert len(inv.headers("X-Spitwall-Score")) == 1
        data = json.loads(spitwall("explain", next(iter(res.outcomes)), "--json",
                                   redis_url=r.redis_url).stdout)
        assert data["action"] == "relay" and data["rule"] == "score"

        # reject: spitwall sends the 603 itself, the cfg stops
        assert spitwall("list", "add", "block", "ip", "127.0.10.2",
                        redis_url=r.redis_url).returncode == 0
        res = run_uac(r.host, r.port, "127.0.10.2", 1, 5, rows(1))
        assert res.count(603) == 1, res.summary()

        # divert: every call above 0 goes to the answering machine, with Diversion
        assert spitwall("config", "set", "divert_threshold", "0.0001",
                        redis_url=r.redis_url).returncode == 0
        res = run_uac(r.host, r.port, "127.0.10.3", 1, 5, rows(1, ua="Asterisk PBX 18"),
                      max_concurrent=1)
        assert res.count(200) == 1, res.summary()
        diverted = r.machine.wait_for_invites(1)
        assert diverted and diverted[0].headers("Diversion")
        assert r.next_hop.count_invites() == 2

        # python_exec returns spitwall_invite's value, and 0 ends the route (Kamailio's rule
        # for functions): the rejected call never reaches the cfg's next line
        assert _avp_lines(r.lab) == ["spitwall_rc=1 action=relay"] * 2 + [
            "spitwall_rc=2 action=divert"]


def test_native_failure_route_relays_when_the_answering_machine_is_dead(
        native_factory: Any) -> None:
    """`python_exec("spitwall_failure")` in the cfg's failure route: a diverted call whose
    answering machine never answers reaches the callee after `media.timeout`."""
    from ops.sipp import free_udp_port, start_uas

    with start_uas("127.0.0.1") as hop:
        dead = free_udp_port("127.0.0.1")
        lab = native_factory(next_hop=f"sip:127.0.0.1:{hop.port}",
                             media_uri=f"sip:spitwall-am@127.0.0.1:{dead}")
        url = lab.state.redis_url
        for key, value in (("divert_threshold", "0"), ("reject_threshold", "0.99"),
                           ("media.timeout", "1")):
            assert spitwall("config", "set", key, value, redis_url=url).returncode == 0
        res = run_uac("127.0.0.1", lab.state.sip_port, "127.0.10.4", 1, 5, rows(1))
        assert res.count(200) == 1, res.summary()
        (inv,) = hop.wait_for_invites(1)
        assert inv.headers("X-Spitwall-Score") and not inv.headers("Diversion")
        assert _avp_lines(lab) == ["spitwall_rc=2 action=divert"]
