"""media/sip.py against SIPp: a SipUas in its own process answers every INVITE with a fixed
PCMU SDP and hangs up after a while; SIPp (tests/sipp/uac.xml through ops.sipp.run_uac) calls it.

The server is a small script run with this interpreter; it prints ``READY host port`` once
bound, and on SIGTERM writes its counters to a JSON file and exits. It is stopped by its pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ops import lab as lab_mod
from ops.sipp import free_udp_port, run_uac
from scoring.engine import DEFAULT_CHECKS
from tests.integration.helpers import spitwall

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("sipp") is None, reason="sipp is not installed"),
]

REPO = Path(__file__).resolve().parents[2]
SERVER_IP = "127.0.0.1"
CALLER_IP = "127.0.7.7"

SERVER_SCRIPT = r'''
import asyncio, json, signal, sys
from media.sip import SipUas, UasConfig

HOST, PORT, HANGUP, STATS = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
SDP = (
    "v=0\r\n"
    "o=- 4242 1 IN IP4 {ip}\r\n"
    "s=spitwall-am\r\n"
    "c=IN IP4 {ip}\r\n"
    "t=0 0\r\n"
    "m=audio 40000 RTP/AVP 0 101\r\n"
    "a=rtpmap:0 PCMU/8000\r\n"
    "a=rtpmap:101 telephone-event/8000\r\n"
    "a=fmtp:101 0-15\r\n"
    "a=ptime:20\r\n"
    "a=sendrecv\r\n"
)


async def main() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    byes = []

    def on_ack(call):
        loop.call_later(HANGUP, lambda: byes.append(call.bye()))

    def on_invite(call):
        call.on_ack = on_ack
        call.ringing()
        # not at once: a multi-worker proxy (Kamailio) may relay a 180 sent right before the
        # 200 after it, and SIPp aborts a call on a 180 that follows the 200
        loop.call_later(0.1, call.answer, SDP.format(ip=HOST))

    uas = SipUas(on_invite, config=UasConfig(max_calls=50))
    host, port = await uas.start(HOST, PORT)
    print("READY", host, port, flush=True)
    await stop.wait()
    results = [f.result() for f in byes if f.done()]
    with open(STATS, "w") as out:
        json.dump({"stats": uas.stats.as_dict(), "tables": uas.table_sizes(),
                   "active": uas.active_calls, "bye_results": results,
                   "bye_pending": sum(1 for f in byes if not f.done())}, out)
    uas.close()


asyncio.run(main())
'''


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    stats_path: Path

    def stop(self) -> dict[str, Any]:
        """SIGTERM by pid (SIGKILL if it hangs); returns the counters it wrote."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        if not self.stats_path.exists():
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
            raise AssertionError(f"server wrote no stats (rc={self.proc.returncode}): {err}")
        data: dict[str, Any] = json.loads(self.stats_path.read_text())
        return data


@contextlib.contextmanager
def sip_server(tmp_path: Path, hangup: float) -> Iterator[Server]:
    script = tmp_path / "sip_server.py"
    script.write_text(SERVER_SCRIPT)
    port = free_udp_port(SERVER_IP)
    stats = tmp_path / "server_stats.json"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, str(script), SERVER_IP, str(port), str(hangup), str(stats)],
        cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    server = Server(proc, port, stats)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 15)
        line = proc.stdout.readline().decode() if ready else ""
        assert line.split()[:1] == ["READY"], f"server did not start: {line!r}"
        assert int(line.split()[2]) == port
        yield server
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _rows(n: int) -> list[tuple[str, str, str, str]]:
    return [(f"49151{i:06d}", "4155550100", "Caller", "SIPp") for i in range(n)]


def test_sipp_calls_answered_and_hung_up_by_the_machine(tmp_path: Path) -> None:
    """20 calls: 100/180/200 with our SDP, ACK, and our BYE after 1 s, during SIPp's hold."""
    with sip_server(tmp_path, hangup=1.0) as server:
        started = time.monotonic()
        res = run_uac(
            SERVER_IP, server.port, CALLER_IP, calls=20, rate=20, injection_rows=_rows(20),
            hold_ms=8000, timeout=60, max_concurrent=20, workdir=tmp_path / "uac",
        )  # fmt: skip
        elapsed = time.monotonic() - started
        time.sleep(0.5)
        data = server.stop()
    assert res.count(200) == 20, res.summary()
    assert sorted(res.remote_hangups) == sorted(res.outcomes), res.remote_hangups
    assert elapsed < 8, f"the machine's BYE must end the calls before the 8 s hold: {elapsed}"
    for cid in res.outcomes:
        ok = res.final_response(cid)
        assert ok is not None and ok.status == 200
        assert "m=audio 40000 RTP/AVP 0 101" in ok.body and "a=rtpmap:0 PCMU/8000" in ok.body
        assert ok.header("Contact") and ok.header("Content-Type") == "application/sdp"
    received = [m for m in res.messages if m.direction == "received"]
    assert sum(1 for m in received if m.status == 100) >= 20
    assert sum(1 for m in received if m.status == 180) >= 20
    byes = [m for m in received if m.method == "BYE"]
    assert {m.call_id for m in byes} == set(res.outcomes)
    stats = data["stats"]
    assert stats["invites"] == 20 and stats["answered"] == 20
    assert stats["local_byes"] == 20 and stats["remote_byes"] == 0
    assert stats["ack_timeouts"] == 0 and stats["bye_timeouts"] == 0
    assert stats["garbage"] == 0 and stats["internal_errors"] == 0
    assert data["bye_results"] == [200] * 20 and data["bye_pending"] == 0
    assert data["active"] == 0 and data["tables"]["calls"] == 0


def test_sipp_caller_hangs_up_first(tmp_path: Path) -> None:
    """SIPp's scenario BYEs after 200 ms: the machine answers 200 and ends its calls."""
    with sip_server(tmp_path, hangup=5.0) as server:
        res = run_uac(
            SERVER_IP, server.port, CALLER_IP, calls=20, rate=20, injection_rows=_rows(20),
            hold_ms=200, timeout=60, max_concurrent=20, workdir=tmp_path / "uac",
        )  # fmt: skip
        time.sleep(0.5)
        data = server.stop()
    assert res.count(200) == 20, res.summary()
    assert res.remote_hangups == []
    assert list(res.bye_status.values()) == [200] * 20, res.bye_status
    assert res.successful_calls == 20, res.stats
    stats = data["stats"]
    assert stats["remote_byes"] == 20 and stats["local_byes"] == 0
    assert stats["garbage"] == 0 and stats["internal_errors"] == 0
    assert data["active"] == 0 and data["tables"]["calls"] == 0


def test_through_kamailio_record_route(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lab_factory: Any
) -> None:
    """Kamailio diverts every call (divert_threshold 0) to the SipUas and record-routes: our
    BYE must reach SIPp through it (Route set + Contact), and SIPp's BYE must reach us.

    The lab's own answering machine is left out: our test server takes the media port."""
    others = [svc for svc in lab_mod.EXTRA_SERVICES if svc.name != "media"]
    monkeypatch.setattr(lab_mod, "EXTRA_SERVICES", others)
    with sip_server(tmp_path, hangup=1.0) as server:
        lab = lab_factory(next_hop=f"sip:127.0.0.1:{free_udp_port('127.0.0.1')}",
                          media_port=server.port, children=2)  # fmt: skip
        assert lab.state is not None
        # every call scores 0 and is diverted (no rate check may reject a repeated caller)
        settings = [(f"weight.{name}", "0") for name, _fn, _redis in DEFAULT_CHECKS]
        for key, value in [*settings, ("divert_threshold", "0")]:
            done = spitwall("config", "set", key, value, redis_url=lab.state.redis_url)
            assert done.returncode == 0, done.stderr
        host, port = lab.state.sip_addr, lab.state.sip_port
        ours = run_uac(host, port, CALLER_IP, calls=10, rate=10, injection_rows=_rows(10),
                       hold_ms=8000, timeout=60, workdir=tmp_path / "uac1")  # fmt: skip
        theirs = run_uac(host, port, "127.0.7.8", calls=10, rate=10, injection_rows=_rows(10),
                         hold_ms=200, timeout=60, workdir=tmp_path / "uac2")  # fmt: skip
        time.sleep(0.5)
        data = server.stop()
    assert ours.count(200) == 10, ours.summary()
    assert sorted(ours.remote_hangups) == sorted(ours.outcomes)
    for msg in ours.messages:
        if msg.direction == "received" and msg.method == "BYE":
            assert msg.header("Via") and "spitwall-am" not in (msg.request_uri or "")
    assert theirs.count(200) == 10, theirs.summary()
    assert list(theirs.bye_status.values()) == [200] * 10, theirs.bye_status
    stats = data["stats"]
    assert stats["invites"] == 20, stats
    assert stats["local_byes"] == 10 and stats["remote_byes"] == 10, stats
    assert stats["bye_timeouts"] == 0 and stats["ack_timeouts"] == 0, stats
    # bye() on a call the caller already hung up is a no-op that resolves to 0
    assert [r for r in data["bye_results"] if r] == [200] * 10, data
    assert data["bye_pending"] == 0, data
    assert data["active"] == 0
