"""SIPp and SIPVicious drivers for the lab, the demo, the benchmarks and the integration tests
(loopback only). The scenarios live in tests/sipp/.

Processes: every helper starts its tool with ``subprocess.Popen`` in a new session, in the
foreground (no ``-bg``), and stops it by its pid (SIGTERM, then SIGKILL) in a ``finally``,
so nothing outlives a failed or timed-out test. Every address must be in 127.0.0.0/8; ports
are probed free ones (never 5060 by assumption).

Scenarios (``tests/sipp/``):

* ``uac.xml`` reads its calls from an injection CSV (:func:`write_injection`): ``field0``
  caller user (From/Contact), ``field1`` callee user (Request-URI
  ``sip:[field1]@[remote_ip]:[remote_port]`` and To), ``field2`` From display name,
  ``field3`` User-Agent (empty: no User-Agent header at all). A 2xx is ACKed and BYEd through
  the Record-Route set (``rrs="true"`` + ``[routes]``); a 3xx-6xx final (603, 608, 486, ...)
  branches to a label that ACKs it, so a rejected call ends as a *successful* sipp run. Each
  finished call logs ``OUTCOME <call-id> invite=<code> bye=<code|->`` (``-trace_logs``);
  the runner merges those lines with the message log (``-trace_msg``), which also covers
  calls sipp aborted (unlisted code, no answer).
* ``uas.xml`` answers OPTIONS 200; INVITE to an unknown user 404 (when ``known_users`` is
  given), else 180, ~200 ms of ringing (a CANCEL then gets 200 + 487), then 200 with SDP
  (Record-Route echoed), ACK, BYE 200. Received INVITEs are read back from its message log.

SIPVicious 0.3.8 facts (read from its source, checked against the sipp UAS):

* User-Agent: both svmap and svwar send ``User-Agent: friendly-scanner`` by default (the
  ``useragent`` default of ``svhelper.makeRequest``; no option changes it). svmap's From is
  ``"sipvicious"<sip:100@1.1.1.1>`` (``--fromname``), To = From, Request-URI
  ``sip:100@<host>``; svwar uses From = To = ``"<ext>"<sip:<ext>@<host>>``. Both encode
  their state in the From tag (hex), and a reply is matched back by that tag.
* svmap sends OPTIONS by default (``-m`` changes it) and reports every host:port that sends
  back anything parseable as SIP (any status, 404 and 403 included), with the Server or
  User-Agent header of the reply. Only silence hides a host from svmap.
* svwar (default method REGISTER; we use ``-m INVITE``) first sends the request to a random
  32-bit number and keeps the reply's fingerprint as "bad user": the final status line, plus
  the Reason header for INVITE. Provisionals are ignored (for INVITE, a 180 gets a CANCEL,
  ``--disablecancel`` turns that off; finals are ACKed, a 200 also gets a BYE). Then every
  extension whose final reply differs from the bad-user fingerprint is reported as existing:
  401/403/407 -> ``reqauth``, 200 -> ``noauth``, 500 -> retried, anything else -> ``weird``.
  A reply identical to the bad user's means "does not exist". So the proxy looks empty when it
  answers every extension, the random probe included, with the same status line and Reason
  (e.g. 603 to everything from that source: svwar walks the whole range and finds nothing),
  or never answers: no reply to the probe within 3 s ends the scan ("No server response",
  exit 30). Also seen here: a 401/403/407 to the probe aborts the scan at once (unless
  ``--force``), and an identical reply outside 404/481/503/480/603/200/100/180 (486, 487,
  ...) stops it after the second request ("We got an unknown response"); both find nothing.
* Binding: svmap honours ``-b IP``. svwar 0.3.8 accepts ``-b`` but its ``main()`` never passes
  it on (it binds 0.0.0.0 and writes the host name's address in Via), so :func:`run_svwar`
  runs it through the venv's python with a small shim that supplies the bind address.
  Both default to local port 5060 (``-P``); the helpers always pass a free port.
  Exit codes: 40 = something found, 30 = network trouble / no answer, 0 = nothing found.
"""

from __future__ import annotations

import contextlib
import csv
import io
import ipaddress
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from media.sip import canonical_name

REPO_ROOT = Path(__file__).resolve().parent.parent
TESTS_DIR = REPO_ROOT / "tests"
SIPP_DIR = TESTS_DIR / "sipp"
UAC_SCENARIO = SIPP_DIR / "uac.xml"
UAS_SCENARIO = SIPP_DIR / "uas.xml"

#: file name the UAS scenario's <lookup> refers to (relative to the UAS working directory)
UAS_USERS_FILE = "uas_users.csv"

_PORT_RANGE = (20000, 32000)  # below Linux's ephemeral range, so the kernel never hands it out

_SEPARATOR_RE = re.compile(r"^-{47}(?: (?P<ts>.*))?$", re.MULTILINE)
_DIRECTION_RE = re.compile(r"^(?P<transport>\w+) message (?P<dir>sent|received)\b")
_OUTCOME_RE = re.compile(r"OUTCOME (?P<cid>\S+) invite=(?P<inv>\S*) bye=(?P<bye>\S*)")


_SVWAR_SHIM = (
    "import os, sys\n"
    "from sipvicious import svwar\n"
    "_init = svwar.TakeASip.__init__\n"
    "def _bound_init(self, *a, **kw):\n"
    "    kw.setdefault('bindingip', os.environ['SPITWALL_SV_BIND'])\n"
    "    _init(self, *a, **kw)\n"
    "svwar.TakeASip.__init__ = _bound_init\n"
    "sys.argv[0] = 'sipvicious_svwar'\n"
    "svwar.main()\n"
)


# --------------------------------------------------------------------------- tools, addresses


def sipp_binary() -> str:
    """Path of the sipp executable (``$SIPP`` overrides)."""
    found = os.environ.get("SIPP") or shutil.which("sipp") or "/usr/bin/sipp"
    return found


def venv_bin() -> Path:
    """The bin directory that holds the sipvicious scripts (the project venv)."""
    candidates = [Path(sys.executable).parent, REPO_ROOT / ".venv" / "bin"]
    for cand in candidates:
        if (cand / "sipvicious_svmap").exists():
            return cand
    which = shutil.which("sipvicious_svmap")
    if which:
        return Path(which).parent
    raise FileNotFoundError("sipvicious is not installed (no sipvicious_svmap found)")


def _check_loopback(*addrs: str) -> None:
    for addr in addrs:
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError as exc:
            raise ValueError(f"not an IP address: {addr!r} (loopback only)") from exc
        if not ip.is_loopback:
            raise ValueError(f"{addr} is not in 127.0.0.0/8 or ::1 (loopback only)")


def _uri_host(ip: str) -> str:
    """An address as a SIP URI or sipp target host: IPv6 in brackets."""
    return f"[{ip}]" if ":" in ip else ip


def _control_ip(ip: str) -> str:
    """Where sipp's remote-control socket binds: sipp 3.6 opens it as IPv4 only (binding it
    to ::1 fails with EAFNOSUPPORT), so IPv6 runs put it on 127.0.0.1."""
    return "127.0.0.1" if ":" in ip else ip


def _udp_port_free(ip: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind((ip, port))
        except OSError:
            return False
    return True


def free_udp_port(ip: str, *, also_plus: Sequence[int] = ()) -> int:
    """A UDP port free on ``ip`` (and ``port + n`` for each n in ``also_plus``).

    Probed in 20000-31999 (outside the kernel's ephemeral range). Racy by nature: the caller
    should bind it soon.
    """
    _check_loopback(ip)
    rng = random.Random()
    for _ in range(500):
        port = rng.randrange(_PORT_RANGE[0], _PORT_RANGE[1] - 4, 2)
        if all(_udp_port_free(ip, port + off) for off in (0, *also_plus)):
            return port
    raise RuntimeError(f"no free UDP port found on {ip}")


def stop_popen(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """Stop one process we started, by its pid: SIGTERM, then SIGKILL; always reaped."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
        return
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=grace)


_BIND_ATTEMPTS = 3
_PORT_RACE_RE = re.compile(r"Unable to bind .*errno = 98\b")


def _lost_port_race(rc: int | None, errors: str) -> bool:
    """Whether sipp stopped at start-up because a port probed free was taken before it bound
    it (EADDRINUSE): :func:`free_udp_port` is a probe, so the caller retries on fresh ports."""
    return rc not in (0, None) and _PORT_RACE_RE.search(errors) is not None


def _run_foreground(
    cmd: Sequence[str], cwd: Path, timeout: float, env: dict[str, str] | None = None
) -> tuple[int | None, str, str, bool]:
    """Run ``cmd`` to completion (or ``timeout``); return (rc, stdout, stderr, timed_out)."""
    out_path = cwd / "stdout.txt"
    err_path = cwd / "stderr.txt"
    timed_out = False
    with out_path.open("wb") as out, err_path.open("wb") as err:
        proc = subprocess.Popen(
            list(cmd),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
            env=env,
        )
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            stop_popen(proc)
    rc = None if timed_out else proc.returncode
    return (
        rc,
        out_path.read_text(errors="replace"),
        err_path.read_text(errors="replace"),
        timed_out,
    )


@contextlib.contextmanager
def _workdir(path: Path | None, prefix: str) -> Iterator[Path]:
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


# --------------------------------------------------------------------------- SIP messages


@dataclass(frozen=True)
class SipMessage:
    """One SIP message from a sipp message log (``-trace_msg``)."""

    direction: str  # "sent" or "received"
    raw: str
    timestamp: str = ""

    @property
    def first_line(self) -> str:
        return self.raw.split("\n", 1)[0].rstrip("\r")

    @property
    def is_response(self) -> bool:
        return self.first_line.startswith("SIP/2.0 ")

    @property
    def method(self) -> str | None:
        """Request method, or None for a response."""
        if self.is_response:
            return None
        return self.first_line.split(" ", 1)[0]

    @property
    def status(self) -> int | None:
        """Response status code, or None for a request."""
        if not self.is_response:
            return None
        parts = self.first_line.split(" ", 2)
        try:
            return int(parts[1])
        except (IndexError, ValueError):
            return None

    @property
    def request_uri(self) -> str | None:
        if self.is_response:
            return None
        parts = self.first_line.split(" ")
        return parts[1] if len(parts) > 1 else None

    def _split(self) -> tuple[list[tuple[str, str]], str]:
        text = self.raw.replace("\r\n", "\n")
        head, _, body = text.partition("\n\n")
        headers: list[tuple[str, str]] = []
        for line in head.split("\n")[1:]:
            if line[:1] in (" ", "\t") and headers:  # folded continuation line
                name, value = headers[-1]
                headers[-1] = (name, f"{value} {line.strip()}")
                continue
            name, sep, value = line.partition(":")
            if sep:
                headers.append((name.strip(), value.strip()))
        return headers, body

    @property
    def header_items(self) -> list[tuple[str, str]]:
        """All headers, in order, as (name as written, value)."""
        return self._split()[0]

    def headers(self, name: str) -> list[str]:
        """Values of every header called ``name`` (case-insensitive, compact forms too)."""
        want = canonical_name(name)
        return [value for hname, value in self.header_items if canonical_name(hname) == want]

    def header(self, name: str) -> str | None:
        """Value of the first header called ``name``, or None."""
        values = self.headers(name)
        return values[0] if values else None

    def has_header(self, name: str) -> bool:
        return bool(self.headers(name))

    @property
    def body(self) -> str:
        return self._split()[1]

    @property
    def call_id(self) -> str | None:
        return self.header("Call-ID")

    @property
    def cseq_method(self) -> str | None:
        cseq = self.header("CSeq")
        if not cseq:
            return None
        parts = cseq.split()
        return parts[1] if len(parts) > 1 else None

    @property
    def via_branch(self) -> str | None:
        via = self.header("Via")
        if not via:
            return None
        match = re.search(r";\s*branch=([^;,\s]+)", via)
        return match.group(1) if match else None


def parse_message_log(path: Path) -> list[SipMessage]:
    """Parse a sipp ``-trace_msg`` log into messages (other log entries are skipped)."""
    if not path.exists():
        return []
    text = path.read_bytes().decode("utf-8", errors="replace")  # keep the \r\n intact
    messages: list[SipMessage] = []
    marks = list(_SEPARATOR_RE.finditer(text))
    for idx, mark in enumerate(marks):
        end = marks[idx + 1].start() if idx + 1 < len(marks) else len(text)
        chunk = text[mark.end() : end].lstrip("\n")
        title, sep, rest = chunk.partition("\n")
        found = _DIRECTION_RE.match(title)
        if not found or not sep:
            continue
        raw = rest.lstrip("\n").rstrip("\n")
        if raw.endswith("\r"):
            raw += "\n"
        if not raw:
            continue
        messages.append(SipMessage(found.group("dir"), raw, mark.group("ts") or ""))
    return messages


# --------------------------------------------------------------------------- injection file


def write_injection(path: Path | str, rows: Sequence[tuple[str, str, str, str]]) -> Path:
    """Write a sipp injection CSV (``SEQUENTIAL`` header, ``;``-separated fields).

    Rows are (caller user, callee user, From display name, User-Agent). sipp has no escaping:
    values may not contain ``;`` or line breaks, ``"`` would break the quoted display name,
    and a line starting with ``#`` would be skipped as a comment.
    """
    if not rows:
        raise ValueError("an injection file needs at least one row")
    lines = ["SEQUENTIAL"]
    for row in rows:
        if len(row) != 4:
            raise ValueError(f"injection row needs 4 fields, got {len(row)}: {row!r}")
        for value in row:
            if any(ch in value for ch in ';\r\n"'):
                raise ValueError(f"injection value {value!r} contains ';', '\"' or a newline")
        line = ";".join(row)
        if line.startswith("#"):
            raise ValueError(f"injection row {row!r} would be read as a comment")
        lines.append(line)
    out = Path(path)
    out.write_text("\n".join(lines) + "\n")
    return out


# --------------------------------------------------------------------------- UAC


@dataclass
class UacResult:
    """What a :func:`run_uac` run did, per call."""

    command: list[str]
    returncode: int | None  # None when we had to stop sipp (timeout)
    timed_out: bool
    calls: int  # calls requested (-m)
    outcomes: dict[str, int | None]  # Call-ID -> final status of the INVITE (None: no final)
    bye_status: dict[str, int | None]  # Call-ID -> status of the reply to our BYE
    remote_hangups: list[str]  # Call-IDs where the far end sent the BYE (sipp: failed call)
    messages: list[SipMessage]
    stats: dict[str, str]  # last line of sipp's -trace_stat CSV, by column name
    log_lines: list[str]
    stdout: str
    stderr: str
    errors: str  # sipp's error log (-trace_err)

    @property
    def counts(self) -> Counter[int | None]:
        """How many calls ended with each final INVITE status (None: no final answer)."""
        counts: Counter[int | None] = Counter(self.outcomes.values())
        missing = self.calls - len(self.outcomes)
        if missing > 0:
            counts[None] += missing
        return counts

    def count(self, status: int | None) -> int:
        return self.counts.get(status, 0)

    @property
    def answered(self) -> int:
        return sum(n for code, n in self.counts.items() if code is not None and code < 300)

    @property
    def rejected(self) -> int:
        return sum(n for code, n in self.counts.items() if code is not None and code >= 300)

    @property
    def unanswered(self) -> int:
        return self.count(None)

    @property
    def successful_calls(self) -> int | None:
        """sipp's own SuccessfulCall(C) counter (rejected calls count as successful runs)."""
        value = self.stats.get("SuccessfulCall(C)")
        return int(value) if value and value.isdigit() else None

    @property
    def failed_calls(self) -> int | None:
        value = self.stats.get("FailedCall(C)")
        return int(value) if value and value.isdigit() else None

    def final_response(self, call_id: str) -> SipMessage | None:
        """The first final response to the INVITE of ``call_id`` (needs the message log)."""
        for msg in self.messages:
            if (
                msg.direction == "received"
                and msg.is_response
                and msg.call_id == call_id
                and msg.cseq_method == "INVITE"
                and (msg.status or 0) >= 200
            ):
                return msg
        return None

    def sent_invites(self) -> list[SipMessage]:
        return [m for m in self.messages if m.direction == "sent" and m.method == "INVITE"]

    def summary(self) -> str:
        parts = ", ".join(f"{k}: {v}" for k, v in sorted(self.counts.items(), key=str))
        return f"rc={self.returncode} timed_out={self.timed_out} outcomes={{{parts}}}"


def _read_stats(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    if len(lines) < 2:
        return {}
    reader = csv.reader(io.StringIO("\n".join([lines[0], lines[-1]])), delimiter=";")
    header, last = next(reader), next(reader)
    return dict(zip(header, last, strict=False))


def _code(text: str) -> int | None:
    return int(text) if text.isdigit() else None


def run_uac(
    target_host: str,
    target_port: int,
    src_ip: str,
    calls: int,
    rate: float,
    injection_rows: Sequence[tuple[str, str, str, str]],
    timeout: float = 60.0,
    extra_args: Sequence[str] = (),
    *,
    src_port: int | None = None,
    hold_ms: int = 200,
    recv_timeout_ms: int = 10_000,
    max_concurrent: int | None = None,
    trace_msg: bool = True,
    workdir: Path | None = None,
) -> UacResult:
    """Place ``calls`` calls at ``rate`` calls/s from ``src_ip`` to ``target_host:port``.

    Runs ``tests/sipp/uac.xml`` in the foreground, ends by itself (``-m``), and is stopped by
    pid after ``timeout`` seconds at the latest. ``hold_ms`` is the pause between ACK and BYE
    (``-d``); a call without a final answer is abandoned after ``recv_timeout_ms``. Outcomes
    come from the scenario's OUTCOME log lines and, with ``trace_msg``, the message log
    (which alone sees calls sipp aborted, and BYEs from the far end: ``remote_hangups``).
    ``extra_args`` go to sipp last (e.g. ``["-max_invite_retrans", "2"]``).
    """
    _check_loopback(target_host, src_ip)
    if calls < 1:
        raise ValueError("calls must be >= 1")
    if rate <= 0:
        raise ValueError("rate must be > 0")
    with _workdir(workdir, "sipp-uac-") as wd:
        inf = write_injection(wd / "uac_calls.csv", injection_rows)
        msg_log = wd / "uac_messages.log"
        log_file = wd / "uac_logs.log"
        err_file = wd / "uac_errors.log"
        stat_file = wd / "uac_stat.csv"
        for attempt in range(1, _BIND_ATTEMPTS + 1):
            port = src_port or free_udp_port(src_ip)
            media_port = free_udp_port(src_ip, also_plus=(2,))
            ctrl_port = free_udp_port(_control_ip(src_ip))
            cmd = [
                sipp_binary(),
                f"{_uri_host(target_host)}:{target_port}",
                "-sf", str(UAC_SCENARIO),
                "-inf", str(inf),
                "-i", src_ip,
                "-p", str(port),
                "-mi", src_ip,
                "-mp", str(media_port),
                "-ci", _control_ip(src_ip),
                "-cp", str(ctrl_port),
                "-m", str(calls),
                "-r", f"{rate:g}",
                "-d", str(hold_ms),
                "-recv_timeout", str(recv_timeout_ms),
                "-timeout", f"{max(1, int(timeout))}s",
                "-nostdin",
                "-trace_logs", "-log_file", str(log_file),
                "-trace_err", "-error_file", str(err_file),
                "-trace_stat", "-stf", str(stat_file),
            ]  # fmt: skip
            if max_concurrent is not None:
                cmd += ["-l", str(max_concurrent)]
            if trace_msg:
                cmd += ["-trace_msg", "-message_file", str(msg_log)]
            cmd += list(extra_args)

            rc, out, err, timed_out = _run_foreground(cmd, wd, timeout + 5.0)
            errors = err_file.read_text(errors="replace") if err_file.exists() else ""
            if attempt == _BIND_ATTEMPTS or not _lost_port_race(rc, err + errors):
                break
            for stale in (msg_log, log_file, err_file, stat_file):
                stale.unlink(missing_ok=True)

        log_lines = log_file.read_text(errors="replace").splitlines() if log_file.exists() else []
        outcomes: dict[str, int | None] = {}
        bye_status: dict[str, int | None] = {}
        for line in log_lines:
            found = _OUTCOME_RE.search(line)
            if found:
                cid = found.group("cid")
                outcomes[cid] = _code(found.group("inv"))
                bye_status[cid] = _code(found.group("bye"))
        messages = parse_message_log(msg_log)
        finals: dict[str, int] = {}
        remote_hangups: list[str] = []
        for msg in messages:
            cid = msg.call_id
            if cid is None:
                continue
            if msg.direction == "sent" and msg.method == "INVITE":
                outcomes.setdefault(cid, None)
            elif msg.direction == "received" and msg.method == "BYE":
                if cid not in remote_hangups:
                    remote_hangups.append(cid)
            elif (
                msg.direction == "received"
                and msg.cseq_method == "INVITE"
                and (msg.status or 0) >= 200
            ):
                finals.setdefault(cid, msg.status or 0)
        for cid, code in finals.items():
            if outcomes.get(cid) is None:
                outcomes[cid] = code
        return UacResult(
            command=cmd,
            returncode=rc,
            timed_out=timed_out,
            calls=calls,
            outcomes=outcomes,
            bye_status=bye_status,
            remote_hangups=remote_hangups,
            messages=messages,
            stats=_read_stats(stat_file),
            log_lines=log_lines,
            stdout=out,
            stderr=err,
            errors=errors,
        )


# --------------------------------------------------------------------------- UAS


@dataclass
class UasProcess:
    """A running ``tests/sipp/uas.xml`` (see :func:`start_uas`). Stop it with :meth:`stop`."""

    proc: subprocess.Popen[bytes]
    ip: str
    port: int
    workdir: Path
    command: list[str]
    _tmp: tempfile.TemporaryDirectory[str] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"

    @property
    def uri(self) -> str:
        return f"sip:{self.ip}:{self.port}"

    @property
    def message_log(self) -> Path:
        return self.workdir / "uas_messages.log"

    @property
    def log_file(self) -> Path:
        return self.workdir / "uas_logs.log"

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        """Stop sipp by its pid (idempotent). The logs stay readable until the object dies."""
        stop_popen(self.proc)

    def close(self) -> None:
        """Stop and remove the working directory if we created it."""
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> UasProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def messages(self) -> list[SipMessage]:
        return parse_message_log(self.message_log)

    def invite_messages(self, unique: bool = True) -> list[SipMessage]:
        """Received INVITEs; with ``unique``, retransmissions (same Call-ID, CSeq and top
        Via branch) are counted once."""
        seen: set[tuple[str | None, str | None, str | None]] = set()
        result: list[SipMessage] = []
        for msg in self.messages():
            if msg.direction != "received" or msg.method != "INVITE":
                continue
            key = (msg.call_id, msg.header("CSeq"), msg.via_branch)
            if unique and key in seen:
                continue
            seen.add(key)
            result.append(msg)
        return result

    def received_invites(self, unique: bool = True) -> list[str]:
        """Raw text of every INVITE the UAS received (as the proxy sent it)."""
        return [msg.raw for msg in self.invite_messages(unique)]

    def count_invites(self, unique: bool = True) -> int:
        return len(self.invite_messages(unique))

    def wait_for_invites(self, count: int, timeout: float = 5.0) -> list[SipMessage]:
        """Poll the message log until ``count`` INVITEs arrived (or timeout); return them."""
        deadline = time.monotonic() + timeout
        invites = self.invite_messages()
        while len(invites) < count and time.monotonic() < deadline:
            time.sleep(0.05)
            invites = self.invite_messages()
        return invites

    def outcomes(self) -> dict[str, str]:
        """Call-ID -> what the UAS did: "200", "404", "487" or "OPTIONS"."""
        result: dict[str, str] = {}
        if not self.log_file.exists():
            return result
        for line in self.log_file.read_text(errors="replace").splitlines():
            parts = line.split()
            if len(parts) == 2:
                result[parts[0]] = parts[1]
        return result

    def output(self) -> str:
        """sipp's stdout and stderr so far (for assertion messages)."""
        chunks = []
        for name in ("stdout.txt", "stderr.txt"):
            path = self.workdir / name
            if path.exists():
                chunks.append(path.read_text(errors="replace"))
        return "\n".join(chunks)


def start_uas(
    bind_ip: str,
    port: int | None = None,
    *,
    known_users: Sequence[str] | None = None,
    trace_msg: bool = True,
    workdir: Path | None = None,
    extra_args: Sequence[str] = (),
    ready_timeout: float = 5.0,
) -> UasProcess:
    """Start ``tests/sipp/uas.xml`` on ``bind_ip:port`` (a free port when None).

    ``known_users``: the extensions that exist (others get 404); None = all exist. Returns
    once sipp holds its SIP port. The caller must :meth:`UasProcess.stop` it (or use it as a
    context manager); the process runs in its own session.
    """
    _check_loopback(bind_ip)
    tmp: tempfile.TemporaryDirectory[str] | None = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="sipp-uas-")
        wd = Path(tmp.name)
    else:
        wd = workdir
        wd.mkdir(parents=True, exist_ok=True)
    users = list(known_users) if known_users is not None else ["*"]
    for user in users:
        if not user or any(ch in user for ch in ";\r\n") or user.startswith("#"):
            raise ValueError(f"bad known user {user!r}")
    (wd / UAS_USERS_FILE).write_text("SEQUENTIAL\n" + "\n".join(users) + "\n")
    for attempt in range(1, _BIND_ATTEMPTS + 1):
        uas = _spawn_uas(bind_ip, port or free_udp_port(bind_ip), wd, tmp, trace_msg, extra_args)
        try:
            _wait_bound(uas, ready_timeout)
        except _PortRace:
            if attempt == _BIND_ATTEMPTS:
                uas.close()
                raise
            uas.stop()  # keeps the working directory for the next attempt
            for name in ("uas_logs.log", "uas_errors.log", "uas_messages.log"):
                (wd / name).unlink(missing_ok=True)
            continue
        except BaseException:
            uas.close()
            raise
        break
    return uas


class _PortRace(RuntimeError):
    """sipp lost a probed port to another process before binding it (see _lost_port_race)."""


def _spawn_uas(
    bind_ip: str,
    sip_port: int,
    wd: Path,
    tmp: tempfile.TemporaryDirectory[str] | None,
    trace_msg: bool,
    extra_args: Sequence[str],
) -> UasProcess:
    media_port = free_udp_port(bind_ip, also_plus=(2,))
    ctrl_port = free_udp_port(_control_ip(bind_ip))
    cmd = [
        sipp_binary(),
        "-sf", str(UAS_SCENARIO),
        "-i", bind_ip,
        "-p", str(sip_port),
        "-mi", bind_ip,
        "-mp", str(media_port),
        "-ci", _control_ip(bind_ip),
        "-cp", str(ctrl_port),
        "-inf", UAS_USERS_FILE,
        "-infindex", UAS_USERS_FILE, "0",
        "-aa",
        "-nostdin",
        "-trace_logs", "-log_file", "uas_logs.log",
        "-trace_err", "-error_file", "uas_errors.log",
    ]  # fmt: skip
    if trace_msg:
        cmd += ["-trace_msg", "-message_file", "uas_messages.log"]
    cmd += list(extra_args)
    out = (wd / "stdout.txt").open("wb")
    err = (wd / "stderr.txt").open("wb")
    try:
        proc = subprocess.Popen(
            cmd,
            cwd=wd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
    finally:
        out.close()
        err.close()
    return UasProcess(proc=proc, ip=bind_ip, port=sip_port, workdir=wd, command=cmd, _tmp=tmp)


def _wait_bound(uas: UasProcess, ready_timeout: float) -> None:
    """Return once the UAS holds its SIP port; _PortRace if it lost a probed port."""
    deadline = time.monotonic() + ready_timeout
    while True:
        if uas.proc.poll() is not None:
            output = uas.output()
            errors = uas.workdir / "uas_errors.log"
            if _lost_port_race(
                uas.proc.returncode,
                output + (errors.read_text(errors="replace") if errors.exists() else ""),
            ):
                raise _PortRace(output[-2000:])
            raise RuntimeError(f"sipp UAS exited with {uas.proc.returncode}: {output[-2000:]}")
        if not _udp_port_free(uas.ip, uas.port):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"sipp UAS did not bind {uas.ip}:{uas.port} in time")
        time.sleep(0.05)


# --------------------------------------------------------------------------- SIPVicious


@dataclass
class SvResult:
    """Output of one svmap / svwar run."""

    tool: str
    command: list[str]
    returncode: int | None  # None when we had to stop it (timeout)
    timed_out: bool
    stdout: str
    stderr: str
    found: list[str]  # svwar: extensions; svmap: "host:port"
    details: dict[str, str]  # svwar: ext -> reqauth/noauth/weird; svmap: host:port -> UA

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    @property
    def found_nothing(self) -> bool:
        return not self.found


def _parse_table(text: str) -> dict[str, str]:
    """Rows of sipvicious' result table (``| key | value |`` after the ``+===`` rule)."""
    rows: dict[str, str] = {}
    in_body = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("+="):
            in_body = True
            continue
        if not in_body:
            continue
        if stripped.startswith("+-"):
            continue
        if not stripped.startswith("|"):
            in_body = False
            continue
        cells = stripped.strip("|").split("|", 1)
        if len(cells) == 2 and cells[0].strip():
            rows[cells[0].strip()] = cells[1].strip()
    return rows


def _run_sv(
    tool: str, cmd: list[str], timeout: float, env_extra: dict[str, str] | None = None
) -> SvResult:
    env = dict(os.environ)
    if env_extra:
        env.update(env_extra)
    with _workdir(None, f"{tool}-") as wd:
        env["HOME"] = str(wd)  # keeps any ~/.sipvicious session state out of the real home
        rc, out, err, timed_out = _run_foreground(cmd, wd, timeout, env=env)
    details = _parse_table(out)
    return SvResult(
        tool=tool,
        command=cmd,
        returncode=rc,
        timed_out=timed_out,
        stdout=out,
        stderr=err,
        found=list(details),
        details=details,
    )


def run_svmap(
    target: str,
    src_ip: str,
    port: int | str,
    timeout: float = 30.0,
    *,
    method: str = "OPTIONS",
    src_port: int | None = None,
    extra_args: Sequence[str] = (),
) -> SvResult:
    """Run ``sipvicious_svmap`` from ``src_ip`` against ``target`` (an IP in 127/8).

    ``port`` may be a sipvicious port spec (``"5060,5070-5080"``). ``found`` lists the
    ``host:port`` that answered, ``details`` their User-Agent/Server.
    """
    _check_loopback(target, src_ip)
    local = src_port or free_udp_port(src_ip)
    cmd = [
        str(venv_bin() / "sipvicious_svmap"),
        "-b", src_ip,
        "-P", str(local),
        "-p", str(port),
        "-m", method,
        *extra_args,
        target,
    ]  # fmt: skip
    return _run_sv("svmap", cmd, timeout)


def run_svwar(
    target_host: str,
    target_port: int,
    src_ip: str,
    extensions: str = "100-120",
    method: str = "INVITE",
    timeout: float = 60.0,
    *,
    src_port: int | None = None,
    max_time: int = 5,
    extra_args: Sequence[str] = (),
) -> SvResult:
    """Run svwar from ``src_ip`` against ``target_host:target_port`` for ``extensions``.

    Runs the venv's python with a shim so svwar really binds ``src_ip`` (0.3.8 ignores
    ``-b``). ``max_time`` is ``--maximumtime``: stop after that many seconds without any
    reply. ``found`` lists the extensions svwar reported, ``details`` how it classed them.
    """
    _check_loopback(target_host, src_ip)
    local = src_port or free_udp_port(src_ip)
    python = venv_bin() / "python"
    cmd = [
        str(python if python.exists() else Path(sys.executable)),
        "-c", _SVWAR_SHIM,
        "-b", src_ip,
        "-x", src_ip,
        "-P", str(local),
        "-p", str(target_port),
        "-m", method,
        "-e", extensions,
        "--maximumtime", str(max_time),
        *extra_args,
        target_host,
    ]  # fmt: skip
    return _run_sv("svwar", cmd, timeout, {"SPITWALL_SV_BIND": src_ip})
