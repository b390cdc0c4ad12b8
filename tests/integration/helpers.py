"""Shared bits of the proxy integration tests: a lab with a next hop and an answering machine
(both SIPp UASes), child-process snapshots, and the CLI run as operators run it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ops.lab import Lab
from ops.sipp import UasProcess, free_udp_port, start_uas

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
def rig(lab_factory: object, children: int = 2) -> Iterator[Rig]:
    """A lab whose next hop is a SIPp UAS on 127.0.0.1 and whose MEDIA_URI is another one."""
    hop = start_uas("127.0.0.1")
    am_port = free_udp_port("127.0.0.1")
    am = start_uas("127.0.0.1", am_port)
    try:
        lab = lab_factory(next_hop=f"sip:127.0.0.1:{hop.port}",  # type: ignore[operator]
                          media_port=am_port, children=children)
        yield Rig(lab, hop, am)
    finally:
        hop.close()
        am.close()


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
