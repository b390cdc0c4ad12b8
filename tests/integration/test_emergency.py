"""Emergency calls through the real Kamailio (kamailio.cfg): never screened. A block-listed
source with a scanner User-Agent reaches 911 (SIPp) and urn:service:sos (a hand-made INVITE:
SIPp's scenarios call sip: URIs), while its other calls are rejected."""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest

from ops.sipp import run_uac
from tests.integration.helpers import rig, rows, spitwall

pytestmark = pytest.mark.integration

SRC = "127.0.6.6"
SDP = (b"v=0\r\no=- 1 1 IN IP4 127.0.6.6\r\ns=-\r\nc=IN IP4 127.0.6.6\r\nt=0 0\r\n"
       b"m=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n")


def _sos_invite(port: int, call_id: str) -> bytes:
    return (b"INVITE urn:service:sos SIP/2.0\r\n"
            b"Via: SIP/2.0/UDP 127.0.6.6:%d;branch=z9hG4bKsos1\r\n"
            b"Max-Forwards: 70\r\n"
            b"From: <sip:alice@127.0.6.6>;tag=s1\r\nTo: <urn:service:sos>\r\n"
            b"Call-ID: %s\r\nCSeq: 1 INVITE\r\nUser-Agent: friendly-scanner\r\n"
            b"Contact: <sip:alice@127.0.6.6:%d>\r\nContent-Type: application/sdp\r\n"
            b"Content-Length: %d\r\n\r\n" % (port, call_id.encode(), port, len(SDP))) + SDP


def test_emergency_calls_pass_a_block_listed_scanner(lab_factory: Any) -> None:
    with rig(lab_factory) as r:
        assert spitwall("list", "add", "block", "ip", SRC, redis_url=r.redis_url).returncode == 0
        other = run_uac(r.host, r.port, SRC, 1, 10, rows(1, ua="friendly-scanner"))
        assert other.count(603) == 1, other.summary()

        sos = run_uac(r.host, r.port, SRC, 2, 10, rows(2, callee="911", ua="friendly-scanner"))
        assert sos.count(200) == 2, sos.summary()
        relayed = r.next_hop.wait_for_invites(2)
        assert len(relayed) == 2
        for inv in relayed:
            assert (inv.request_uri or "").startswith("sip:911@")
            assert not inv.has_header("X-Spitwall-Score")
        data = json.loads(spitwall("explain", next(iter(sos.outcomes)), "--json",
                                   redis_url=r.redis_url).stdout)
        assert data["rule"] == "emergency" and data["action"] == "relay"

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((SRC, 0))
            s.settimeout(5)
            s.sendto(_sos_invite(s.getsockname()[1], "sos-urn-1@127.0.6.6"), (r.host, r.port))
            codes = []
            while 200 not in codes:
                reply = s.recv(65535)
                codes.append(int(reply.split(b" ", 2)[1]))
        assert 603 not in codes
        urn = r.next_hop.wait_for_invites(3)[-1]
        assert urn.request_uri == "urn:service:sos"
        stats = json.loads(spitwall("stats", "--json", redis_url=r.redis_url).stdout)
        assert stats.get("action:reject") == 1
