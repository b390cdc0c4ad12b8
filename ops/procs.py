"""Process and liveness helpers for the lab runner and the integration tests.

Pure stdlib on purpose: the lab must be able to start, probe and stop Redis and Kamailio before
anything else of the project (or redis-py) is importable, and the tests use the same helpers so
that what they exercise is what operators run.

Safety rules these helpers enforce:

* every process is started in its own session, so its pid is also its process-group id and one
  signal reaches the whole tree (Kamailio forks its workers; they must go down with it);
* a pid is only ever signalled after ``/proc/<pid>/cmdline`` shows it still belongs to the program
  we started: pids are reused, and a stale ``lab.json`` must never let us kill a stranger.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "ManagedProcess",
    "ProcessMismatch",
    "free_port",
    "pid_alive",
    "pid_cmdline",
    "pid_matches",
    "redis_ping",
    "sip_options_ping",
    "start_process",
    "stop_pid",
    "wait_until",
]

log = logging.getLogger(__name__)

# Popen objects of the processes this interpreter started. We keep them so that a stopped child is
# reaped (otherwise it lingers as a zombie, which /proc still lists and which would look "alive"),
# and so that Popen's own bookkeeping does not later trip over a pid we reaped behind its back.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


class ProcessMismatch(RuntimeError):
    """The pid is alive but runs something else than expected (pid reuse): we refuse to signal."""


# --------------------------------------------------------------------------------------------
# ports


def _bind_ok(host: str, port: int, kind: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, kind) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def port_free(host: str, port: int, proto: str = "both") -> bool:
    """Whether ``port`` can be bound on ``host`` now for ``proto`` ("udp", "tcp" or "both")."""
    kinds = {"udp": (socket.SOCK_DGRAM,), "tcp": (socket.SOCK_STREAM,)}.get(
        proto, (socket.SOCK_DGRAM, socket.SOCK_STREAM))
    return all(_bind_ok(host, port, kind) for kind in kinds)


def free_port(host: str = "127.0.0.1", proto: str = "udp") -> int:
    """Return a port that is currently free on ``host`` for ``proto`` ("udp", "tcp" or "both").

    The kernel picks the port (bind to 0), which avoids guessing. "both" is for SIP, which listens
    on UDP and TCP with the same number: the kernel's choice for one protocol is checked on the
    other, and we retry until one is free on both. There is an unavoidable race between this check
    and the real server binding the port; callers detect a failed bind by the server exiting.
    """
    kinds = {"udp": socket.SOCK_DGRAM, "tcp": socket.SOCK_STREAM}
    if proto not in (*kinds, "both"):
        raise ValueError(f"proto must be 'udp', 'tcp' or 'both', not {proto!r}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    first = kinds["udp" if proto == "both" else proto]
    for _ in range(200):
        with socket.socket(family, first) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if proto != "both" or _bind_ok(host, port, socket.SOCK_STREAM):
            return port
    raise RuntimeError(f"no port free on both udp and tcp found on {host}")


# --------------------------------------------------------------------------------------------
# process life cycle


def _reap(pid: int) -> None:
    """Collect the exit status of ``pid`` if we started it, so it does not stay a zombie.

    Only our own Popen objects are polled: a blind waitpid() could steal the status of a child
    that other code (subprocess.run in a test, say) is waiting for.
    """
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        del _CHILDREN[pid]


def _proc_state(pid: int) -> str | None:
    """The one-letter state from /proc/<pid>/stat, or None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm (field 2) may contain spaces and parentheses: the state follows the last ')'.
    return stat.rsplit(")", 1)[1].split()[0]


def pid_alive(pid: int) -> bool:
    """True when ``pid`` exists and is not a zombie (a zombie has exited; only its parent's
    bookkeeping keeps it listed)."""
    if pid <= 0:
        return False
    _reap(pid)
    state = _proc_state(pid)
    return state is not None and state not in ("Z", "X")


def pid_cmdline(pid: int) -> list[str] | None:
    """The argv of ``pid`` as /proc shows it (programs may rewrite it: redis-server does), or
    None if the process is gone."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def pid_matches(pid: int, expect: str | Sequence[str]) -> bool:
    """True when /proc/<pid>/cmdline contains ``expect`` (every string of it, if several)."""
    cmdline = pid_cmdline(pid)
    if cmdline is None:
        return False
    text = " ".join(cmdline)
    needles = [expect] if isinstance(expect, str) else list(expect)
    return all(needle in text for needle in needles)


def _group_members(pgid: int) -> list[int]:
    """Live pids whose process group is ``pgid`` (Kamailio's forked workers, for instance)."""
    members: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        # after the comm: state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    """Poll ``predicate`` until it returns True or ``timeout`` seconds pass; return its last value.

    Used instead of fixed sleeps so that start-up is as fast as the slowest real service and a
    hung one is reported after a bounded time. The predicate is always evaluated at least once,
    and once more at the deadline.
    """
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(interval, remaining))


def _signal_group_or_pid(pid: int, sig: signal.Signals) -> None:
    """Signal the whole group when ``pid`` leads one (we start everything that way), else just
    the pid (someone else started it; its group may hold unrelated processes)."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def stop_pid(pid: int, expect_cmd_substring: str | Sequence[str], timeout: float = 10.0) -> bool:
    """Stop ``pid`` and its process group: SIGTERM, wait up to ``timeout``, then SIGKILL.

    ``expect_cmd_substring`` (one string, or several that must all appear) is checked against
    /proc/<pid>/cmdline first, because the pid may have been reused since we recorded it.

    Returns True when the process was running and is now stopped, False when it was already gone.
    Raises ProcessMismatch (and signals nothing) when the pid now belongs to another program.
    """
    return _stop(pid, expect_cmd_substring, timeout) != "gone"


def stop_pid_cleanly(pid: int, expect_cmd_substring: str | Sequence[str],
                     timeout: float = 10.0) -> bool:
    """`stop_pid`, returning whether the process ended on its own after SIGTERM (its
    shutdown code ran: Kamailio writes its dialogs then); False when it had to be killed or
    was gone already."""
    return _stop(pid, expect_cmd_substring, timeout) == "clean"


def _stop(pid: int, expect_cmd_substring: str | Sequence[str], timeout: float) -> str:
    """'gone', 'clean' (ended after SIGTERM) or 'killed'."""
    if not pid_alive(pid):
        _CHILDREN.pop(pid, None)
        return "gone"
    if not pid_matches(pid, expect_cmd_substring):
        raise ProcessMismatch(
            f"pid {pid} runs {' '.join(pid_cmdline(pid) or ['?'])!r}, "
            f"not {expect_cmd_substring!r}; not signalling it"
        )
    leads_group = _safe_getpgid(pid) == pid
    _signal_group_or_pid(pid, signal.SIGTERM)
    outcome = "clean"
    if not wait_until(lambda: not pid_alive(pid), timeout, 0.05):
        log.warning("pid %d ignored SIGTERM for %.1fs; sending SIGKILL", pid, timeout)
        _signal_group_or_pid(pid, signal.SIGKILL)
        wait_until(lambda: not pid_alive(pid), 5.0, 0.05)
        outcome = "killed"
    # The leader is gone; its workers normally exit with it. Whatever is left in the group is
    # still ours (the kernel does not reuse a pid while it names a live group): finish it.
    if leads_group and not wait_until(lambda: not _group_members(pid), min(timeout, 5.0), 0.05):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        wait_until(lambda: not _group_members(pid), 5.0, 0.05)
    _reap(pid)
    _CHILDREN.pop(pid, None)
    return outcome


def _safe_getpgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def start_process(
    argv: Sequence[str],
    log_path: Path,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> int:
    """Start ``argv`` in a new session with stdout and stderr appended to ``log_path``.

    Returns the pid, which is also the process-group id (see stop_pid). stdin is /dev/null so a
    service never reads the operator's terminal. The log is opened in append mode so that a
    program writing its own log to the same file (redis-server --logfile) interleaves cleanly.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log_file:
        child = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=dict(env) if env is not None else None,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    _CHILDREN[child.pid] = child
    return child.pid


@dataclass
class ManagedProcess:
    """One program we start and later stop by its pid, verified by its command line.

    ``expect`` is what /proc/<pid>/cmdline must contain for stop() to signal the pid; it defaults
    to the basename of argv[0]. Programs that rewrite their argv (redis-server shows
    ``redis-server 127.0.0.1:PORT``) need an explicit value.
    """

    argv: Sequence[str]
    log_path: Path
    cwd: Path | None = None
    env: Mapping[str, str] | None = None
    expect: str | Sequence[str] = ""
    pid: int | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if not self.expect:
            self.expect = os.path.basename(self.argv[0])

    def start(self) -> int:
        """Start the program; refuses if this object already runs one (no silent orphans)."""
        if self.pid is not None and pid_alive(self.pid):
            raise RuntimeError(f"{self.argv[0]} already running as pid {self.pid}")
        self.pid = start_process(self.argv, self.log_path, self.cwd, self.env)
        return self.pid

    def alive(self) -> bool:
        return self.pid is not None and pid_alive(self.pid)

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop the program (see stop_pid); True if it was running."""
        if self.pid is None:
            return False
        stopped = stop_pid(self.pid, self.expect, timeout)
        self.pid = None
        return stopped


# --------------------------------------------------------------------------------------------
# probes


def _resp_command(*args: str) -> bytes:
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def _read_line(sock: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"\r\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        buf += chunk
    return buf


def redis_ping(
    host: str,
    port: int,
    timeout: float = 1.0,
    *,
    username: str | None = None,
    password: str | None = None,
) -> bool:
    """True when a Redis server at host:port answers PING with +PONG.

    A raw socket, so the lab and the tests can probe before (or without) redis-py. With
    ``password`` (and optionally ``username``, for ACL users) an AUTH is sent first.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            if password is not None:
                auth = ("AUTH", username, password) if username else ("AUTH", password)
                sock.sendall(_resp_command(*auth))
                if not _read_line(sock).startswith(b"+OK"):
                    return False
                sock.sendall(_resp_command("PING"))
            else:
                sock.sendall(b"PING\r\n")
            return _read_line(sock).startswith(b"+PONG")
    except OSError:
        return False


def _uri_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def sip_options_ping(
    host: str, port: int, timeout: float = 1.0, src_host: str = "127.0.0.1"
) -> int | None:
    """Send one SIP OPTIONS over UDP to host:port and return the final status code, or None.

    The request is complete and RFC 3261-valid (Via with a magic-cookie branch and rport, tags,
    Call-ID, CSeq, Max-Forwards, Content-Length) so that a strict proxy answers it as it would a
    real keep-alive. Provisional (1xx) replies and replies to other requests are skipped. None
    means nothing usable arrived within ``timeout`` (or the network refused the datagram, which
    on loopback is how "nobody listens" shows up).
    """
    family = socket.AF_INET6 if ":" in src_host else socket.AF_INET
    branch = "z9hG4bK" + secrets.token_hex(8)
    call_id = secrets.token_hex(12) + "@spitwall-probe"
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.bind((src_host, 0))
        lport = int(sock.getsockname()[1])
        src = _uri_host(src_host)
        target = f"{_uri_host(host)}:{port}"
        msg = (
            f"OPTIONS sip:{target} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {src}:{lport};branch={branch};rport\r\n"
            "Max-Forwards: 70\r\n"
            f"From: <sip:spitwall-probe@{src}:{lport}>;tag={secrets.token_hex(6)}\r\n"
            f"To: <sip:{target}>\r\n"
            f"Call-ID: {call_id}\r\n"
            "CSeq: 1 OPTIONS\r\n"
            f"Contact: <sip:spitwall-probe@{src}:{lport}>\r\n"
            "Accept: application/sdp\r\n"
            "User-Agent: spitwall-lab-probe\r\n"
            "Content-Length: 0\r\n"
            "\r\n"
        )
        deadline = time.monotonic() + timeout
        try:
            sock.sendto(msg.encode(), (host, port))
            while (remaining := deadline - time.monotonic()) > 0:
                sock.settimeout(remaining)
                data = sock.recv(65535)
                code = _final_status(data, call_id)
                if code is not None:
                    return code
        except TimeoutError:
            return None
        except OSError as exc:
            if exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                return None
            raise
    return None


def _final_status(data: bytes, call_id: str) -> int | None:
    """Status code of a final reply to our request (matched by Call-ID), else None."""
    try:
        text = data.decode("utf-8", errors="replace")
        status_line, _, rest = text.partition("\r\n")
        version, code_text, *_ = status_line.split(" ", 2)
        code = int(code_text)
    except ValueError:
        return None
    if version != "SIP/2.0" or code < 200:
        return None
    for line in rest.split("\r\n"):
        name, _, value = line.partition(":")
        if name.strip().lower() in ("call-id", "i"):
            return code if value.strip() == call_id else None
    return None
