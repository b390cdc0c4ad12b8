"""Hostile INVITEs through the real proxy: no child crashes, nothing unescaped reaches the
headers we add, no unbounded Redis keys, and legitimate calls keep working."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis

from ops.sipp import free_udp_port, run_uac
from tests.integration.helpers import children_of, invite, rig, rows, send_all, spitwall

pytestmark = pytest.mark.integration

def test_hostile_headers_never_crash_or_leak(lab_factory: Any) -> None:
    with rig(lab_factory) as r:
        workers = children_of(r.kamailio_pid)
        src_port = free_udp_port("127.0.9.1")
        huge = b"A" * 10_000
        msgs = [
            # 10 KB From user and display name
            invite(1, r.port, src_port, from_hdr=b'"' + huge + b'" <sip:' + huge
                   + b"@127.0.9.1>;tag=a1"),
            # non-UTF-8 bytes in display name, User-Agent and From user
            invite(2, r.port, src_port, from_hdr=b'"\xff\xfe\xc3\x28" <sip:\xe9t\xe9@127.0.9.1>'
                   b";tag=a2", ua=b"\xff\xfe bot \x80"),
            # CRLF inside a display name: smuggles a score header of its own
            invite(3, r.port, src_port, from_hdr=b'"evil\r\nX-Spitwall-Score: 0.00" '
                   b"<sip:eve@127.0.9.1>;tag=a3"),
            # a forged score header, twice
            invite(4, r.port, src_port, extra=b"X-Spitwall-Score: 0.00\r\n"
                   b"x-spitwall-score: -1\r\n"),
            # absurd Content-Length
            invite(5, r.port, src_port, content_length=b"99999999999"),
            invite(6, r.port, src_port, content_length=b"-5"),
            # malformed and oversized STIR Identity headers, unparseable numbers
            invite(8, r.port, src_port, extra=b"Identity: " + b"e30." * 2000 + b";info=<x>\r\n"),
            invite(9, r.port, src_port, extra=b"Identity: a.b.c;info=<http://x>;alg=none\r\n",
                   from_hdr=b"<sip:+1+2+3\xd9\xa4@127.0.9.1>;tag=a9"),
            # truncated garbage and an empty datagram
            b"INVITE sip:bob@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP",
            b"\x00\x01\x02" * 100,
        ]
        replies = send_all(r.port, msgs, src_port)
        assert replies, "the proxy answered nothing at all"
        time.sleep(0.5)
        assert children_of(r.kamailio_pid) == workers, "a Kamailio child died"

        # What reached the core carries exactly one well-formed score header of ours.
        for inv in r.next_hop.invite_messages():
            values = inv.headers("X-Spitwall-Score")
            assert len(values) == 1, inv.raw[:400]
            assert 0.0 <= float(values[0]) <= 1.0

        # Redis keys stay short and printable whatever the caller sent.
        client = redis.Redis.from_url(r.redis_url)
        for key in client.scan_iter(count=1000):
            assert len(key) <= 200, key[:80]
            assert all(32 <= b < 127 for b in key), key
        # the 10 KB caller is recorded with bounded fields
        from scoring.store import find_decision

        d = find_decision(client, "bad-1@127.0.9.1")
        assert d is not None and len(d["call"]["from"]) <= 256
        for n in (8, 9):  # hostile Identity headers count as invalid, never as an error
            d = find_decision(client, f"bad-{n}@127.0.9.1")
            assert d is not None, n
            stir = next(c for c in d["checks"] if c[0] == "stir")
            assert stir[1] == 1.0 and stir[3].startswith("Identity invalid"), stir

        # legitimate calls still go through
        res = run_uac(r.host, r.port, "127.0.9.2", 2, 5, rows(2))
        assert res.count(200) == 2, res.summary()


def test_diversion_header_escapes_hostile_request_uri(lab_factory: Any) -> None:
    with rig(lab_factory) as r:
        assert spitwall("config", "set", "divert_threshold", "0", redis_url=r.redis_url) \
            .returncode == 0
        user = b'bob%0D%0AX-Evil"<>%zz'
        src_port = free_udp_port("127.0.9.1")
        send_all(r.port, [invite(7, r.port, src_port, ruri_user=user)], src_port)
        got = r.machine.wait_for_invites(1)
        assert got, "the diverted INVITE did not reach the answering machine"
        div = got[0].header("Diversion") or ""
        # valid escapes kept, quote and angle brackets escaped, a stray '%' escaped
        assert div.startswith(f"<sip:bob%0D%0AX-Evil%22%3C%3E%25zz@127.0.0.1:{r.port}>"), div
        assert "X-Evil" not in "".join(h for h, _ in got[0].header_items if h != "Diversion")
        assert not got[0].has_header("X-Evil")


def test_separator_bytes_in_headers_do_not_shift_fields(lab_factory: Any) -> None:
    """Control bytes (ASCII 0x1F, a separator in many formats) and the string "<null>"
    (Kamailio's rendering of an absent value) in headers shift or blank no field: the source,
    the caller and the User-Agent stay what they are."""
    with rig(lab_factory) as r:
        src_port = free_udp_port("127.0.9.3")
        msgs = [
            invite(21, r.port, src_port, src_ip="127.0.9.3",
                   from_hdr=b'"a\x1f127.6.6.6\x1f1" <sip:+14155550100@127.0.9.3>;tag=s1',
                   ua=b"friendly-scanner\x1fLinphone"),
            invite(22, r.port, src_port, src_ip="127.0.9.3", ua=b"<null>"),
            invite(23, r.port, src_port, src_ip="127.0.9.3", ua=b"x",
                   extra=b"P-Asserted-Identity: <sip:+14155550123@127.0.9.3>\r\n"),
        ]
        send_all(r.port, msgs, src_port, src_ip="127.0.9.3")
        time.sleep(0.5)
        client = redis.Redis.from_url(r.redis_url)
        from scoring.store import find_decision

        d = find_decision(client, "bad-21@127.0.9.3")
        assert d is not None
        assert d["call"]["src"].startswith("127.0.9.3:"), d["call"]
        assert d["call"]["from"] == "sip:+14155550100@127.0.9.3", d["call"]
        assert d["call"]["ua"] == "friendly-scanner\x1fLinphone"[:128].replace("\x1f", ""), d
        scanner = next(c for c in d["checks"] if c[0] == "scanner")
        assert scanner[1] == 1.0, scanner  # still seen as the scanner it is
        d = find_decision(client, "bad-22@127.0.9.3")
        assert d is not None and d["call"]["ua"] == "<null>", d  # literal, not "absent"
        d = find_decision(client, "bad-23@127.0.9.3")
        assert d is not None and d["call"]["ua"] == "x", d
