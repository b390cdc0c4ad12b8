"""Request floods from one source are dropped before scoring (Kamailio's pike, FLOOD_DENSITY,
live `flood.check`): a flooding source gets (almost) no answers and costs no Redis round trip,
other callers are served, trusted peers are never dropped. Real Kamailio, SIPp, raw UDP."""

from __future__ import annotations

import json
import secrets
import socket
import time
from typing import Any

import pytest

from ops.procs import free_port
from ops.sipp import run_uac
from tests.integration.helpers import rig, rows, spitwall

pytestmark = pytest.mark.integration

DENSITY = 20  # requests per 2 s (pike blocks somewhere between 1x and 3x that)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
RCVBUF = 8 * 1024 * 1024


def burst(port: int, src_ip: str, n: int, wait: float = 1.0) -> int:
    """Send `n` OPTIONS to the proxy itself from `src_ip` as fast as possible; the number of
    200 replies that came back until `wait` seconds after the last one (read as they come,
    into a large socket buffer: a default one holds only ~150 of them)."""
    answered = 0

    def take(sock: socket.socket) -> None:
        nonlocal answered
        while True:
            try:
                data = sock.recv(65535)
            except (BlockingIOError, TimeoutError):
                return
            answered += data.startswith(b"SIP/2.0 200")

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:  # room for every reply (root may exceed net.core.rmem_max)
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        sock.bind((src_ip, free_port(src_ip, "udp")))
        lport = sock.getsockname()[1]
        sock.setblocking(False)
        for i in range(n):
            sock.sendto((f"OPTIONS sip:127.0.0.1:{port} SIP/2.0\r\n"
                         f"Via: SIP/2.0/UDP {src_ip}:{lport};branch=z9hG4bK{secrets.token_hex(6)}"
                         "\r\nMax-Forwards: 70\r\n"
                         f"From: <sip:probe@{src_ip}>;tag={secrets.token_hex(4)}\r\n"
                         f"To: <sip:127.0.0.1:{port}>\r\nCall-ID: {secrets.token_hex(8)}\r\n"
                         f"CSeq: {i + 1} OPTIONS\r\nContent-Length: 0\r\n\r\n").encode(),
                        ("127.0.0.1", port))
            take(sock)
        sock.settimeout(0.05)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            take(sock)
        return answered


def stats(url: str) -> dict[str, int]:
    out: dict[str, int] = json.loads(spitwall("stats", "--json", redis_url=url).stdout)
    return out


@pytest.mark.timeout(120)
def test_a_flooding_source_is_dropped_others_and_trusted_peers_are_served(
        lab_factory: Any) -> None:
    with rig(lab_factory, flood_density=DENSITY) as r:
        answered = burst(r.port, "127.0.50.1", 300)
        assert 1 <= answered <= 150, answered  # the first ones, then (nearly) nothing
        # another caller meanwhile: served as usual
        call = run_uac(r.host, r.port, "127.0.50.2", 1, 5, rows(1, caller="2025550100"))
        assert call.count(200) == 1, call.summary()
        time.sleep(5.2)  # workers add what they counted at most every 5 s
        burst(r.port, "127.0.50.1", 300, wait=0.5)
        assert stats(r.redis_url).get("flood_dropped", 0) >= 100

        # a peering trunk sends as much, and is trusted: never dropped
        assert spitwall("list", "add", "trusted", "ip", "127.0.50.3",
                        redis_url=r.redis_url).returncode == 0
        time.sleep(1.1)  # a flagged source makes the worker look at the lists version
        assert burst(r.port, "127.0.50.3", 300) >= 290

        # the check turned off, live: the flooding source is answered again
        assert spitwall("config", "set", "flood.check", "false",
                        redis_url=r.redis_url).returncode == 0
        time.sleep(1.1)
        assert burst(r.port, "127.0.50.1", 300) >= 290
