"""ops.procs: ports, process life cycle and the raw Redis/SIP probes.

The probes are checked against tiny in-test servers on loopback, so the unit tests stay fast and
need neither Redis nor Kamailio; the real servers are covered by tests/integration/test_lab.py.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ops import procs
from ops.procs import (
    ManagedProcess,
    ProcessMismatch,
    free_port,
    pid_alive,
    pid_cmdline,
    redis_ping,
    sip_options_ping,
    start_process,
    stop_pid,
    wait_until,
)

PY = sys.executable


# ---------------------------------------------------------------------------------------------
# free_port


@pytest.mark.parametrize("proto", ["udp", "tcp", "both"])
def test_free_port_is_bindable(proto: str) -> None:
    port = free_port("127.0.0.1", proto)
    assert 1024 <= port <= 65535
    kinds = {"udp": [socket.SOCK_DGRAM], "tcp": [socket.SOCK_STREAM]}
    for kind in kinds.get(proto, [socket.SOCK_DGRAM, socket.SOCK_STREAM]):
        with socket.socket(socket.AF_INET, kind) as sock:
            sock.bind(("127.0.0.1", port))


def test_free_port_rejects_unknown_proto() -> None:
    with pytest.raises(ValueError, match="proto"):
        free_port(proto="sctp")


# ---------------------------------------------------------------------------------------------
# wait_until


def test_wait_until_true_at_once() -> None:
    started = time.monotonic()
    assert wait_until(lambda: True, timeout=5)
    assert time.monotonic() - started < 0.5


def test_wait_until_gives_up_after_timeout() -> None:
    started = time.monotonic()
    assert not wait_until(lambda: False, timeout=0.3, interval=0.05)
    assert 0.25 <= time.monotonic() - started < 2


def test_wait_until_polls_until_true() -> None:
    calls: list[int] = []

    def third_time() -> bool:
        calls.append(1)
        return len(calls) >= 3

    assert wait_until(third_time, timeout=5, interval=0.01)
    assert len(calls) == 3


# ---------------------------------------------------------------------------------------------
# process life cycle


@pytest.fixture
def started(tmp_path: Path) -> Iterator[Callable[[str], int]]:
    """Start ``python -c CODE`` processes; any left running are stopped by pid afterwards."""
    pids: list[int] = []

    def start(code: str) -> int:
        pid = start_process([PY, "-c", code], tmp_path / f"p{len(pids)}.log", cwd=tmp_path)
        pids.append(pid)
        return pid

    yield start
    for pid in pids:
        if pid_alive(pid):
            stop_pid(pid, PY, timeout=2)


SLEEPER = "import time; print('ready', flush=True); time.sleep(60)"


def _ready(log: Path) -> Callable[[], bool]:
    return lambda: log.exists() and "ready" in log.read_text()


def test_start_process_new_session_and_log(tmp_path: Path, started: Callable[[str], int]) -> None:
    pid = started(
        "import os, sys; print('hello', flush=True); sys.stderr.write('err\\n'); "
        "import time; time.sleep(60)"
    )
    assert pid_alive(pid)
    assert os.getpgid(pid) == pid and os.getsid(pid) == pid
    log = tmp_path / "p0.log"
    assert wait_until(lambda: "err" in log.read_text(), 5)
    assert "hello" in log.read_text()
    assert (pid_cmdline(pid) or [""])[0] == PY


def test_stop_pid_terminates_whole_group(tmp_path: Path, started: Callable[[str], int]) -> None:
    # A parent with two forked workers, like Kamailio: all three must be gone after stop_pid.
    code = (
        "import os, time\n"
        "kids = []\n"
        "for _ in range(2):\n"
        "    kid = os.fork()\n"
        "    if kid == 0:\n"
        "        time.sleep(60)\n"
        "        os._exit(0)\n"
        "    kids.append(kid)\n"
        "open('kids', 'w').write(' '.join(map(str, kids)))\n"
        "time.sleep(60)\n"
    )
    pid = started(code)
    kids_file = tmp_path / "kids"
    assert wait_until(lambda: kids_file.exists() and kids_file.read_text().count(" ") == 1, 5)
    kids = [int(k) for k in kids_file.read_text().split()]
    assert all(pid_alive(k) for k in kids)
    assert stop_pid(pid, PY, timeout=5)
    assert not pid_alive(pid)
    assert wait_until(lambda: not any(pid_alive(k) for k in kids), 5)


def test_stop_pid_escalates_to_sigkill(tmp_path: Path, started: Callable[[str], int]) -> None:
    pid = started(
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready', flush=True); time.sleep(60)"
    )
    assert wait_until(_ready(tmp_path / "p0.log"), 5)
    started_at = time.monotonic()
    assert stop_pid(pid, PY, timeout=0.5)
    assert not pid_alive(pid)
    assert time.monotonic() - started_at < 5


def test_stop_pid_refuses_foreign_program(tmp_path: Path, started: Callable[[str], int]) -> None:
    # The pid-reuse guard: lab.json says "kamailio", but the pid now runs something else.
    pid = started(SLEEPER)
    assert wait_until(_ready(tmp_path / "p0.log"), 5)
    with pytest.raises(ProcessMismatch):
        stop_pid(pid, "kamailio", timeout=1)
    with pytest.raises(ProcessMismatch):
        stop_pid(pid, [PY, "not-in-its-argv"], timeout=1)
    assert pid_alive(pid)
    assert stop_pid(pid, [PY, "time.sleep"], timeout=5)


def test_stop_pid_on_gone_process_is_false(started: Callable[[str], int]) -> None:
    pid = started("pass")
    assert wait_until(lambda: not pid_alive(pid), 5)
    assert stop_pid(pid, PY, timeout=1) is False


def test_pid_alive_edge_cases() -> None:
    assert pid_alive(os.getpid())
    assert not pid_alive(0)
    assert not pid_alive(-1)


def test_pid_alive_treats_unreaped_zombie_as_dead(tmp_path: Path) -> None:
    # A child that exited but was not waited for is still listed in /proc (state Z).
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    try:
        assert wait_until(lambda: procs._proc_state(pid) == "Z", 5)
        assert not pid_alive(pid)
    finally:
        os.waitpid(pid, 0)


def test_managed_process_start_stop(tmp_path: Path) -> None:
    proc = ManagedProcess([PY, "-c", SLEEPER], tmp_path / "m.log")
    assert proc.expect == os.path.basename(PY)
    pid = proc.start()
    try:
        assert proc.alive()
        with pytest.raises(RuntimeError, match="already running"):
            proc.start()
        assert proc.stop(timeout=5)
        assert not pid_alive(pid)
        assert not proc.alive()
        assert proc.stop() is False
    finally:
        if pid_alive(pid):
            os.killpg(pid, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------
# redis_ping against a fake RESP server


def _serve_tcp(handler: Callable[[socket.socket], None]) -> tuple[int, threading.Thread]:
    listener = socket.create_server(("127.0.0.1", 0))
    port = int(listener.getsockname()[1])

    def run() -> None:
        with listener:
            listener.settimeout(5)
            conn, _ = listener.accept()
            with conn:
                handler(conn)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return port, thread


def test_redis_ping_pong() -> None:
    seen: list[bytes] = []

    def handler(conn: socket.socket) -> None:
        seen.append(conn.recv(64))
        conn.sendall(b"+PONG\r\n")

    port, thread = _serve_tcp(handler)
    assert redis_ping("127.0.0.1", port, timeout=2)
    thread.join(5)
    assert seen == [b"PING\r\n"]


def test_redis_ping_with_auth() -> None:
    seen: list[bytes] = []

    def handler(conn: socket.socket) -> None:
        seen.append(conn.recv(256))
        conn.sendall(b"+OK\r\n")
        seen.append(conn.recv(64))
        conn.sendall(b"+PONG\r\n")

    port, thread = _serve_tcp(handler)
    assert redis_ping("127.0.0.1", port, timeout=2, username="ops", password="s3cret")
    thread.join(5)
    assert seen[0] == b"*3\r\n$4\r\nAUTH\r\n$3\r\nops\r\n$6\r\ns3cret\r\n"
    assert seen[1] == b"*1\r\n$4\r\nPING\r\n"


def test_redis_ping_error_reply_is_false() -> None:
    def handler(conn: socket.socket) -> None:
        conn.recv(64)
        conn.sendall(b"-NOAUTH Authentication required.\r\n")

    port, thread = _serve_tcp(handler)
    assert not redis_ping("127.0.0.1", port, timeout=2)
    thread.join(5)


def test_redis_ping_nobody_listening() -> None:
    assert not redis_ping("127.0.0.1", free_port(proto="tcp"), timeout=0.5)


def test_redis_ping_silent_server_times_out() -> None:
    done = threading.Event()

    def handler(conn: socket.socket) -> None:
        conn.recv(64)
        done.wait(5)

    port, thread = _serve_tcp(handler)
    started = time.monotonic()
    assert not redis_ping("127.0.0.1", port, timeout=0.3)
    assert time.monotonic() - started < 2
    done.set()
    thread.join(5)


# ---------------------------------------------------------------------------------------------
# sip_options_ping against a fake UDP SIP server


def _headers(request: str) -> dict[str, str]:
    head = request.split("\r\n\r\n", 1)[0].split("\r\n")[1:]
    return {line.split(":", 1)[0].lower(): line.split(":", 1)[1].strip() for line in head}


def _reply(request: str, code: int, call_id: str | None = None) -> bytes:
    hdr = _headers(request)
    return (
        f"SIP/2.0 {code} Whatever\r\n"
        f"Via: {hdr['via']}\r\nFrom: {hdr['from']}\r\nTo: {hdr['to']};tag=x\r\n"
        f"Call-ID: {call_id or hdr['call-id']}\r\nCSeq: {hdr['cseq']}\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def _serve_udp(
    replies: Callable[[str], list[bytes]],
) -> tuple[int, list[str], threading.Thread]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    received: list[str] = []

    def run() -> None:
        with sock:
            sock.settimeout(5)
            data, peer = sock.recvfrom(65535)
            received.append(data.decode())
            for datagram in replies(data.decode()):
                sock.sendto(datagram, peer)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return port, received, thread


def test_sip_options_ping_well_formed_and_returns_final_code() -> None:
    port, received, thread = _serve_udp(
        lambda req: [_reply(req, 200, call_id="someone-else"), _reply(req, 100), _reply(req, 200)]
    )
    assert sip_options_ping("127.0.0.1", port, timeout=2) == 200
    thread.join(5)
    request = received[0]
    assert request.startswith(f"OPTIONS sip:127.0.0.1:{port} SIP/2.0\r\n")
    assert request.endswith("\r\n\r\n")
    hdr = _headers(request)
    assert hdr["via"].startswith("SIP/2.0/UDP 127.0.0.1:")
    assert ";branch=z9hG4bK" in hdr["via"]
    assert ";tag=" in hdr["from"]
    assert hdr["to"] == f"<sip:127.0.0.1:{port}>"
    assert hdr["call-id"]
    assert hdr["cseq"] == "1 OPTIONS"
    assert hdr["max-forwards"] == "70"
    assert hdr["content-length"] == "0"


def test_sip_options_ping_other_codes() -> None:
    port, _, thread = _serve_udp(lambda req: [_reply(req, 403)])
    assert sip_options_ping("127.0.0.1", port, timeout=2) == 403
    thread.join(5)


def test_sip_options_ping_timeout_is_none() -> None:
    port, _, thread = _serve_udp(lambda req: [b"garbage", _reply(req, 180)])
    started = time.monotonic()
    assert sip_options_ping("127.0.0.1", port, timeout=0.3) is None
    assert time.monotonic() - started < 2
    thread.join(5)


def test_sip_options_ping_nobody_listening() -> None:
    assert sip_options_ping("127.0.0.1", free_port(proto="udp"), timeout=0.5) is None
