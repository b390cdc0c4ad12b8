"""Shared bits of the proxy integration tests: a lab with a next hop and an answering machine
(both SIPp UASes), child-process snapshots, and the CLI run as operators run it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ops.lab import Lab
from ops.sipp import UasProcess, free_udp_port, run_uac, start_uas

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Rig:
    lab: Lab
    next_hop: UasProcess
    machine: UasProcess  # stands in for the phase-2 answering machine

    @property
    def host(self) -> str:
        assert self.lab.state is not None
        return self.lab.state.sip_addr

    @property
    def port(self) -> int:
        assert self.lab.state is not None
        return self.lab.state.sip_port

    @property
    def redis_url(self) -> str:
        assert self.lab.state is not None
        return self.lab.state.redis_url

    @property
    def kamailio_pid(self) -> int:
        assert self.lab.state is not None
        return self.lab.state.pids["kamailio"]


@contextmanager
def rig(lab_factory: object, children: int = 2, addr: str = "127.0.0.1",
        **up: Any) -> Iterator[Rig]:
    """A lab on `addr` whose next hop is a SIPp UAS there and whose MEDIA_URI is another one
    (``up``: more arguments of `Lab.up`)."""
    host = f"[{addr}]" if ":" in addr else addr
    with ExitStack() as stack:  # a UAS that started is stopped even if the next one fails
        hop = stack.enter_context(start_uas(addr))
        am_port = free_udp_port(addr)
        am = stack.enter_context(start_uas(addr, am_port))
        # MEDIA_URI names the UAS; the lab's own answering machine runs on a port of its own
        lab = lab_factory(next_hop=f"sip:{host}:{hop.port}",  # type: ignore[operator]
                          media_uri=f"sip:spitwall-am@{host}:{am_port}", children=children,
                          sip_addr=addr, **up)
        yield Rig(lab, hop, am)


def children_of(pid: int) -> set[int]:
    """Pids of the Kamailio main process' children (the workers)."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    return {int(x) for x in out.stdout.split()}


def spitwall(*args: str, redis_url: str) -> subprocess.CompletedProcess[str]:
    """Run the installed CLI as an operator would."""
    exe = Path(sys.executable).with_name("spitwall")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "ops.cli"]
    env = dict(os.environ, SPITWALL_REDIS=redis_url)
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, check=False,
                          timeout=30, cwd=REPO)


def rows(n: int, caller: str = "alice", callee: str = "bob", ua: str = "Linphone/5.2",
         display: str = "Alice") -> list[tuple[str, str, str, str]]:
    return [(caller, callee, display, ua) for _ in range(n)]


SDP = (b"v=0\r\no=- 1 1 IN IP4 127.0.9.1\r\ns=-\r\nc=IN IP4 127.0.9.1\r\nt=0 0\r\n"
       b"m=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n")


def invite(n: int, port: int, src_port: int, *, ruri_user: bytes = b"bob",
           from_hdr: bytes | None = None, extra: bytes = b"", ua: bytes = b"Linphone/5.2",
           body: bytes = SDP, content_length: bytes | None = None,
           src_ip: str = "127.0.9.1", method: bytes = b"INVITE",
           content_type: bytes = b"application/sdp") -> bytes:
    """A hand-made request (INVITE by default) for inputs SIPp cannot produce."""
    cl = content_length if content_length is not None else str(len(body)).encode()
    ip = src_ip.encode()
    frm = from_hdr or b'"Alice" <sip:alice@' + ip + b">;tag=t" + str(n).encode()
    return (method + b" sip:" + ruri_user + b"@127.0.0.1:" + str(port).encode() + b" SIP/2.0\r\n"
            b"Via: SIP/2.0/UDP " + ip + b":" + str(src_port).encode()
            + b";branch=z9hG4bKbad" + str(n).encode() + b"\r\n"
            b"Max-Forwards: 70\r\n"
            b"From: " + frm + b"\r\n"
            b"To: <sip:bob@127.0.0.1>\r\n"
            b"Call-ID: bad-" + str(n).encode() + b"@" + ip + b"\r\n"
            b"CSeq: 1 " + method + b"\r\n"
            b"Contact: <sip:alice@" + ip + b":" + str(src_port).encode() + b">\r\n"
            b"User-Agent: " + ua + b"\r\n" + extra +
            b"Content-Type: " + content_type + b"\r\n"
            b"Content-Length: " + cl + b"\r\n\r\n" + body)


def send_all(port: int, messages: list[bytes], src_port: int,
             src_ip: str = "127.0.9.1") -> list[bytes]:
    """Send each request from src_ip:src_port and collect whatever comes back."""
    replies: list[bytes] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((src_ip, src_port))
        s.settimeout(0.3)
        for m in messages:
            s.sendto(m, ("127.0.0.1", port))
            try:
                while True:
                    replies.append(s.recv(65535))
            except TimeoutError:
                pass
    return replies


def kill_switch_reaches_the_proxy(r: Rig, url: str, source: str, timeout: float = 15) -> bool:
    """Set ``enabled false`` through ``url`` and call from ``source`` until two calls in a row
    are relayed without X-Spitwall-Score (after a Redis failover, a child that has had no call
    since still holds a dead connection: its first INVITE fails open, scored without Redis,
    and it reconnects a second later). Every call must be relayed."""
    assert spitwall("config", "set", "enabled", "false", redis_url=url).returncode == 0
    unscored = 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and unscored < 2:
        off = run_uac(r.host, r.port, source, 1, 5, rows(1))
        assert off.count(200) == 1, off.summary()
        relayed = {m.call_id: m for m in r.next_hop.invite_messages()}
        cid = next(iter(off.outcomes))
        assert cid in relayed
        unscored = 0 if relayed[cid].headers("X-Spitwall-Score") else unscored + 1
        if not unscored:
            time.sleep(0.5)
    return unscored == 2


def lab_refuses_url(workdir: Path, url: str, message: str) -> None:
    """`spitwall lab up --redis URL` fails with one line naming ``message``, nothing started."""
    out = spitwall("lab", "up", "--workdir", str(workdir), "--redis", url,
                   redis_url="redis://127.0.0.1:1/0")
    assert out.returncode != 0
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not (workdir / "lab.json").exists()
