"""IPv6 through the real proxy: Kamailio, the answering machine and the delivery worker on ::1,
SIPp callers from ::1, and per-source state kept per IPv6 network (`source.ipv6_prefix`).

Loopback offers one IPv6 address (::1), so address rotation inside a /64 is tested in
tests/unit/scoring/test_store.py against Redis; here the whole path runs over IPv6.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis

from ops.sipp import run_uac, start_uas
from tests.integration.helpers import rig, rows, spitwall

pytestmark = pytest.mark.integration

V6 = "::1"
NETWORK = "::/64"  # ::1's /64: the source every per-source key is named by


def test_ipv6_caller_is_scored_and_relayed(lab_factory: Any) -> None:
    with rig(lab_factory, addr=V6) as r:
        assert r.lab.state is not None
        assert r.lab.state.sip_addr == V6
        res = run_uac(V6, r.port, V6, 2, 5, rows(2))
        assert res.count(200) == 2, res.summary()
        invites = r.next_hop.wait_for_invites(2)
        for inv in invites:
            (score,) = inv.headers("X-Spitwall-Score")
            assert 0.0 <= float(score) < 0.3
            assert any("[::1]" in rr for rr in inv.headers("Record-Route"))
        out = spitwall("explain", next(iter(res.outcomes)), "--json", redis_url=r.redis_url)
        assert out.returncode == 0, out.stderr
        data = json.loads(out.stdout)
        assert data["action"] == "relay"
        client = redis.Redis.from_url(r.redis_url)
        assert client.keys("spitwall:{ip:" + NETWORK + "}:inv:*"), "per-network rate keys"
        assert not client.keys("spitwall:{ip:::1}:*"), "no per-address keys for IPv6"


def test_ipv6_campaign_is_diverted_then_rejected(lab_factory: Any) -> None:
    with rig(lab_factory, addr=V6) as r:
        campaign = [(f"+1555{i:07d}", f"1800{i:06d}", "", "Asterisk PBX") for i in range(14)]
        res = run_uac(V6, r.port, V6, len(campaign), 20, campaign)
        codes = [res.outcomes[cid] for cid in sorted(res.outcomes)]
        assert res.count(200) >= 1, res.summary()  # the first calls look clean
        assert r.machine.count_invites() >= 1, "diverted to the answering machine over IPv6"
        assert res.count(603) >= 1, (codes, res.summary())
        div = r.machine.wait_for_invites(1)[0]
        assert div.headers("Diversion")
        (source,) = div.headers("X-Spitwall-Source")
        assert source == V6


@pytest.mark.parametrize(("caller_addr", "hop_addr"), [("::1", "127.0.0.1"),
                                                       ("127.0.0.1", "::1")])
def test_dual_stack_relays_across_address_families(lab_factory: Any, caller_addr: str,
                                                   hop_addr: str) -> None:
    """Kamailio on 127.0.0.1 and ::1 (SIP_ADDR6): a call from one family to a next hop of the
    other is scored, relayed, and its ACK and BYE find their way back through the proxy."""
    with start_uas(hop_addr) as hop:
        hop_host = f"[{hop_addr}]" if ":" in hop_addr else hop_addr
        lab = lab_factory(next_hop=f"sip:{hop_host}:{hop.port}", sip_addr6="::1")
        assert lab.state.sip_addr6 == "::1"
        res = run_uac(caller_addr, lab.state.sip_port, caller_addr, 2, 5, rows(2))
        assert res.count(200) == 2, res.summary()
        assert all(code == 200 for code in res.bye_status.values()), res.bye_status
        invites = hop.wait_for_invites(2)
        for inv in invites:
            assert inv.headers("X-Spitwall-Score")
            # double record-routing: one entry per side, IPv4 and IPv6
            routes = ",".join(inv.headers("Record-Route"))
            assert "[::1]" in routes and "127.0.0.1" in routes, routes
        assert {m.method for m in hop.messages()} >= {"INVITE", "ACK", "BYE"}


@pytest.mark.parametrize(("args", "message"), [
    (["--sip-addr6", "127.0.0.2"], "--sip-addr6 must be an IPv6 address"),
    (["--sip-addr6", "not-an-address"], "--sip-addr6 must be an IPv6 address"),
    (["--sip-addr", "::1", "--sip-addr6", "::1"], "IPv6 already"),
])
def test_lab_refuses_bad_dual_stack_arguments(tmp_path: Any, redis_url: str, args: list[str],
                                              message: str) -> None:
    out = spitwall("lab", "up", "--workdir", str(tmp_path / "lab"), "--redis", redis_url, *args,
                   redis_url=redis_url)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], out.stderr
    assert not (tmp_path / "lab" / "lab.json").exists()
