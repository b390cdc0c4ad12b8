"""Self-tests of ops/sipp.py: SIPp UAC -> SIPp UAS and SIPVicious, no Kamailio."""

from __future__ import annotations

import shutil
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from ops import sipp as sipp_mod
from ops.sipp import (
    SipMessage,
    UasProcess,
    free_udp_port,
    parse_message_log,
    run_svmap,
    run_svwar,
    run_uac,
    start_uas,
    venv_bin,
    write_injection,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("sipp") is None, reason="sipp is not installed"),
]

CALLER_IP = "127.0.0.2"
UAS_IP = "127.0.0.3"
SCANNER_IP = "127.0.0.4"

ROWS = [
    ("4915110000001", "100", "Alice", "Linphone/5.2.0"),
    ("4915110000002", "101", "Bob B", "Zoiper rv2.10"),
    ("4915110000003", "102", "", ""),
]


def _has_sipvicious() -> bool:
    try:
        venv_bin()
    except FileNotFoundError:
        return False
    return True


needs_sipvicious = pytest.mark.skipif(not _has_sipvicious(), reason="sipvicious not installed")


@pytest.fixture
def uas(tmp_path: Path) -> Iterator[UasProcess]:
    proc = start_uas(UAS_IP, workdir=tmp_path / "uas")
    try:
        yield proc
    finally:
        proc.close()
    assert not proc.running()


def test_write_injection(tmp_path: Path) -> None:
    path = write_injection(tmp_path / "calls.csv", ROWS)
    assert path.read_text().splitlines() == [
        "SEQUENTIAL",
        "4915110000001;100;Alice;Linphone/5.2.0",
        "4915110000002;101;Bob B;Zoiper rv2.10",
        "4915110000003;102;;",
    ]
    with pytest.raises(ValueError):
        write_injection(tmp_path / "bad.csv", [("1;2", "3", "", "")])
    with pytest.raises(ValueError):
        write_injection(tmp_path / "empty.csv", [])


def test_parse_message_log(tmp_path: Path) -> None:
    log = tmp_path / "m.log"
    log.write_text(
        "----------------------------------------------- 2026-01-01 10:00:00.000000\n"
        "UDP message received [10] bytes :\n\n"
        "INVITE sip:100@127.0.0.3:5070 SIP/2.0\r\n"
        "v: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKabc\r\n"
        "Call-ID: abc@x\r\n"
        "CSeq: 1 INVITE\r\n"
        "X-Spitwall-Score: 0.12\r\n"
        "Content-Length: 0\r\n\r\n\n"
        "----------------------------------------------- 2026-01-01 10:00:00.100000\n"
        "Ignoring provisional UDP message for transaction invite:\n\nSIP/2.0 180 x\r\n\r\n\n"
        "----------------------------------------------- 2026-01-01 10:00:00.200000\n"
        "UDP message sent (10 bytes):\n\n"
        "SIP/2.0 603 Decline\r\nCall-ID: abc@x\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n\n"
    )
    msgs = parse_message_log(log)
    assert [m.direction for m in msgs] == ["received", "sent"]
    inv, rej = msgs
    assert isinstance(inv, SipMessage)
    assert inv.method == "INVITE" and inv.status is None
    assert inv.header("x-spitwall-score") == "0.12"
    assert inv.via_branch == "z9hG4bKabc"  # compact "v:" form
    assert inv.raw.endswith("Content-Length: 0\r\n\r\n")
    assert rej.status == 603 and rej.cseq_method == "INVITE" and rej.call_id == "abc@x"


def test_uac_calls_uas_directly(uas: UasProcess) -> None:
    result = run_uac(UAS_IP, uas.port, CALLER_IP, calls=3, rate=10, injection_rows=ROWS)

    assert not result.timed_out, result.summary()
    assert result.returncode == 0, result.stdout[-2000:] + result.errors
    assert result.counts == {200: 3}, result.summary()
    assert set(result.bye_status.values()) == {200}
    assert result.successful_calls == 3 and result.failed_calls == 0
    assert all(cid.endswith(f"@{CALLER_IP}") for cid in result.outcomes)

    invites = uas.wait_for_invites(3)
    assert uas.count_invites() == 3
    froms = [m.header("From") or "" for m in invites]
    for caller, _callee, name, _ua in ROWS:
        (from_hdr,) = [f for f in froms if f"<sip:{caller}@{CALLER_IP}:" in f]
        assert from_hdr.startswith(f'"{name}" <')
    by_callee = {m.request_uri: m for m in invites}
    assert set(by_callee) == {f"sip:{r[1]}@{UAS_IP}:{uas.port}" for r in ROWS}
    assert by_callee[f"sip:100@{UAS_IP}:{uas.port}"].header("User-Agent") == "Linphone/5.2.0"
    # empty field3: no User-Agent header at all
    assert not by_callee[f"sip:102@{UAS_IP}:{uas.port}"].has_header("User-Agent")
    assert "m=audio" in invites[0].body and "telephone-event/8000" in invites[0].body
    raw = uas.received_invites()
    assert len(raw) == 3 and all(r.startswith("INVITE sip:") for r in raw)
    assert set(uas.outcomes().values()) == {"200"}


def test_rejected_calls_end_cleanly(tmp_path: Path) -> None:
    with start_uas(UAS_IP, known_users=["100"], workdir=tmp_path / "uas") as uas:
        result = run_uac(UAS_IP, uas.port, CALLER_IP, calls=3, rate=20, injection_rows=ROWS)
    assert result.counts == {200: 1, 404: 2}, result.summary()
    assert result.answered == 1 and result.rejected == 2 and result.unanswered == 0
    # a rejected call is a successful scenario run: the final was ACKed and the call ended
    assert result.returncode == 0 and result.failed_calls == 0
    rejected = [cid for cid, code in result.outcomes.items() if code == 404]
    final = result.final_response(rejected[0])
    assert final is not None and final.status == 404
    acks = [m for m in result.messages if m.method == "ACK" and m.call_id == rejected[0]]
    assert len(acks) == 1 and acks[0].via_branch == final.via_branch


def test_unanswered_calls_are_counted(tmp_path: Path) -> None:
    # nobody listens on this port: INVITEs go unanswered until recv_timeout
    silent_port = free_udp_port(UAS_IP)
    result = run_uac(
        UAS_IP, silent_port, CALLER_IP, calls=2, rate=20, injection_rows=ROWS,
        timeout=20, recv_timeout_ms=1500,
    )  # fmt: skip
    assert result.counts == {None: 2}, result.summary()
    assert result.failed_calls == 2


@needs_sipvicious
def test_svmap_finds_the_uas(uas: UasProcess) -> None:
    result = run_svmap(UAS_IP, SCANNER_IP, uas.port, timeout=30)
    assert not result.timed_out
    assert result.found == [uas.address], result.output
    assert result.details[uas.address] == "spitwall-test-uas"
    options = [m for m in uas.messages() if m.method == "OPTIONS"]
    assert options and options[0].header("User-Agent") == "friendly-scanner"
    assert f"SIP/2.0/UDP {SCANNER_IP}:" in (options[0].header("Via") or "")


@needs_sipvicious
def test_svmap_finds_nothing_on_a_silent_port() -> None:
    result = run_svmap(UAS_IP, SCANNER_IP, free_udp_port(UAS_IP), timeout=30)
    assert not result.timed_out
    assert result.found_nothing, result.output
    assert "found nothing" in result.output


@needs_sipvicious
def test_svwar_invite_finds_the_existing_extensions(tmp_path: Path) -> None:
    with start_uas(UAS_IP, known_users=["103", "107"], workdir=tmp_path / "uas") as uas:
        result = run_svwar(UAS_IP, uas.port, SCANNER_IP, extensions="100-110", timeout=60)
        invites = uas.invite_messages()
    assert not result.timed_out
    assert sorted(result.found) == ["103", "107"], result.output
    assert result.returncode == 40
    # bound to the scanner address, with its default User-Agent
    assert invites and all(f"{SCANNER_IP}:" in (m.header("Via") or "") for m in invites)
    assert {m.header("User-Agent") for m in invites} == {"friendly-scanner"}


@needs_sipvicious
def test_svwar_invite_finds_nothing_when_all_answers_look_alike(uas: UasProcess) -> None:
    # every extension (and svwar's random probe) gets the same 180 -> CANCEL -> 487
    result = run_svwar(UAS_IP, uas.port, SCANNER_IP, extensions="100-105", timeout=60)
    assert not result.timed_out
    assert result.found_nothing, result.output
    assert uas.count_invites() >= 2


class _Squatter:
    """Makes the first media-port probe on ``ip`` return a port another socket holds: the
    race sipp can lose between our probe and its bind (seen once in CI: errno 98)."""

    def __init__(self, ip: str) -> None:
        self.ip = ip
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((ip, free_udp_port(ip)))
        self.handed_out = 0

    def __call__(self, ip: str, *, also_plus: Sequence[int] = ()) -> int:
        if ip == self.ip and also_plus and not self.handed_out:
            self.handed_out += 1
            port: int = self.sock.getsockname()[1]
            return port
        return free_udp_port(ip, also_plus=also_plus)


@pytest.mark.parametrize("side", ["uac", "uas"])
def test_a_lost_port_race_is_retried_on_fresh_ports(
    side: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    squatter = _Squatter(CALLER_IP if side == "uac" else UAS_IP)
    taken = squatter.sock.getsockname()[1]
    monkeypatch.setattr(sipp_mod, "free_udp_port", squatter)
    try:
        with start_uas(UAS_IP, workdir=tmp_path / "uas") as uas:
            result = run_uac(UAS_IP, uas.port, CALLER_IP, calls=1, rate=10,
                             injection_rows=ROWS[:1], workdir=tmp_path / "uac")  # fmt: skip
            uas_cmd = uas.command
    finally:
        squatter.sock.close()
    assert squatter.handed_out == 1
    final_cmd = result.command if side == "uac" else uas_cmd
    assert final_cmd[final_cmd.index("-mp") + 1] != str(taken)
    assert result.returncode == 0 and result.counts == {200: 1}, result.summary()
