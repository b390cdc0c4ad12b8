"""The lab runner: ``spitwall lab up|down|status``.

A lab is a set of real processes on loopback -- redis-server (unless an existing Redis is given),
Kamailio with the project's ``kamailio.cfg`` and, once they exist, the answering machine and the
delivery worker -- whose pids, addresses and logs are recorded in ``WORKDIR/lab.json``. ``down``
stops exactly the pids recorded there (after checking /proc that each still runs the program we
started), so a lab never kills anything it did not start, and several labs can run side by side
in different work directories (every port defaults to a free one).

Redis roles: when the lab starts its own redis-server it also creates the ACL users of
`intercept.acl` (``spitwall-ROLE`` for each of the six ``acl.ROLES``, metrics included) with fresh
random passwords, writes their URLs to ``WORKDIR/redis-users.json`` (mode 0600), and starts
Kamailio and the services as their users, passing the URL in ``$SPITWALL_REDIS`` -- never on
the command line, which every local user can read in /proc. The ``default`` user stays as it is
(password-less, all rights) so that tests and lab tooling keep working; a production Redis
should disable it (docs/operations.md). With ``--redis URL`` (an existing Redis) the users are
created only when asked (``--redis-users``): the lab then adds its passwords to the users, so
labs sharing one Redis do not lock each other out, and removes them again at ``down``.

The integration tests drive the same code through :class:`Lab`, so what they exercise is what an
operator runs.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import ipaddress
import json
import logging
import os
import secrets
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from ops import dialogdb
from ops.procs import (
    ProcessMismatch,
    free_port,
    pid_alive,
    pid_matches,
    port_free,
    redis_ping,
    sip_options_ping,
    start_process,
    stop_pid,
    stop_pid_cleanly,
    wait_until,
)

__all__ = [
    "EXTRA_SERVICES",
    "REPO_ROOT",
    "ExtraService",
    "Lab",
    "LabError",
    "LabState",
    "ServiceStatus",
    "SipTls",
    "main",
    "register",
    "start_redis_server",
]

log = logging.getLogger(__name__)

#: The repository root: the parent of the ``ops/`` package. Kamailio gets it as SPITWALL_ROOT so
#: that the cfg can find ``kemi/handler.py`` without any installed path.
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WORKDIR = Path(".lab")
DEFAULT_KAMAILIO_CFG = REPO_ROOT / "kamailio.cfg"
#: the longest dialog timeout the lab accepts (a day), seconds
MAX_DIALOG_TIMEOUT = 86400
#: where the Redis dialog store (`dialog_store="redis"`) keeps its files, under the workdir
DIALOG_REDIS_DIR = "dialog-redis"
DIALOG_STORES = ("text", "redis")
DEFAULT_CHILDREN = 4
STATE_FILE = "lab.json"
LOCK_FILE = "lab.lock"
KAMAILIO_READY_TIMEOUT = 15.0
REDIS_READY_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
LOG_TAIL_LINES = 20
STATE_VERSION = 1
USERS_FILE = "redis-users.json"


class LabError(Exception):
    """An expected failure, reported to the operator as one line (plus an optional log tail)."""

    def __init__(self, message: str, log_tail: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.log_tail = list(log_tail)


@dataclass(frozen=True)
class SipTls:
    """SIP over TLS for the lab's Kamailio: certificate and key (PEM files), an optional CA of
    client certificates, and whether a client certificate is required (mutual TLS)."""

    cert: str
    key: str
    ca: str = ""
    verify: bool = False
    port: int | None = None

    def check(self) -> None:
        for what, path in (("certificate", self.cert), ("key", self.key), ("CA", self.ca)):
            if not path and what == "CA":
                continue
            if not Path(path).is_file():
                raise LabError(f"--sip-tls-{'cert' if what == 'certificate' else what.lower()} "
                               f"{path!r} is not a readable file")
            if '"' in path or not Path(path).is_absolute():
                raise LabError(f"TLS {what} path must be absolute and without quotes: {path!r}")
        if self.verify and not self.ca:
            raise LabError("--sip-tls-verify needs --sip-tls-ca (the CA of client certificates)")


@dataclass
class LabState:
    """Everything needed to reach, probe and stop a running lab; persisted as ``lab.json``.

    ``pids`` is in start order; ``down`` stops in reverse (extra services, then Kamailio, then
    Redis), so nothing loses a dependency while still running. ``expect`` holds, per service, the
    strings /proc/<pid>/cmdline must contain before we signal that pid (pid-reuse guard).
    """

    workdir: str
    sip_addr: str
    sip_port: int
    redis_url: str
    next_hop: str | None
    media_uri: str
    children: int
    kamailio_cfg: str
    own_redis: bool
    pids: dict[str, int] = field(default_factory=dict)
    logs: dict[str, str] = field(default_factory=dict)
    expect: dict[str, list[str]] = field(default_factory=dict)
    started_at: float = 0.0
    version: int = STATE_VERSION
    #: WORKDIR/redis-users.json when the lab created the Redis role users (else None)
    users_file: str | None = None
    #: the users were created on a Redis we do not own: our passwords are removed at `down`
    users_shared: bool = False
    #: the intercept delivery worker (`spitwall deliver`): SUBSCRIBE Event: srtp goes there
    deliver_uri: str = ""
    #: UDP port of the lab's answering machine; 0: the port of ``media_uri`` (unless the lab
    #: was told to divert elsewhere, the answering machine is what ``media_uri`` names)
    media_port: int = 0
    #: dual stack: Kamailio also listens on this IPv6 address, same port ('' = not)
    sip_addr6: str = ""
    #: SIP over TLS (0 = off): Kamailio's TLS port and its certificate, key, optional CA and
    #: whether clients must present a certificate from that CA (mutual TLS)
    sip_tls_port: int = 0
    sip_tls_cert: str = ""
    sip_tls_key: str = ""
    sip_tls_ca: str = ""
    sip_tls_verify: bool = False
    #: the dialog module's db_text directory: dialogs survive a Kamailio restart
    #: (`ops.dialogdb`; '' = none)
    dialog_db: str = ""
    #: the dialog module's timeout, seconds (DIALOG_TIMEOUT; 0 = kamailio.cfg's default)
    dialog_timeout: int = 0
    #: the Redis dialog store (`ops.dialogdb`, "redis"): port of the lab's dialog redis-server
    #: (0 = the db_text store of ``dialog_db``) and how often the dialog module writes (s)
    dialog_redis_port: int = 0
    dialog_db_period: int = 0
    #: requests per 2 s above which a source's requests are dropped (FLOOD_DENSITY; 0 =
    #: kamailio.cfg's default)
    flood_density: int = 0

    def dialog_redis_url(self) -> str:
        """The dialog store's URL with its password (read from its 0600 file), or ''."""
        if not self.dialog_redis_port:
            return ""
        secret = (Path(self.workdir) / DIALOG_REDIS_DIR / "password").read_text().strip()
        return f"redis://:{secret}@127.0.0.1:{self.dialog_redis_port}/0"

    @property
    def sip_uri(self) -> str:
        return f"sip:{_uri_host(self.sip_addr)}:{self.sip_port}"

    def users(self) -> dict[str, str]:
        """Role -> Redis URL with that role's user (empty when the lab made no users)."""
        if not self.users_file:
            return {}
        try:
            data = json.loads(Path(self.users_file).read_text())
        except (OSError, ValueError) as exc:
            raise LabError(f"cannot read {self.users_file}: {exc}") from exc
        if not isinstance(data, dict):
            raise LabError(f"{self.users_file} is not a JSON object")
        return {str(k): str(v) for k, v in data.items()}

    def url_for(self, role: str) -> str:
        """The Redis URL a process of ``role`` (proxy, ops, media, deliver, li-admin) uses:
        its own user when the lab made users, else the lab's Redis URL."""
        return self.users().get(role, self.redis_url)

    def env_for(self, role: str | None) -> dict[str, str]:
        """The environment of a process of ``role``: ours plus SPITWALL_REDIS (the URL, maybe
        with a password, goes through the environment, which only the owner can read)."""
        env = dict(os.environ)
        env["SPITWALL_REDIS"] = self.url_for(role) if role else self.redis_url
        if role == "proxy":  # intercept events Redis refuses wait on disk (intercept.spool)
            env.setdefault("SPITWALL_LI_SPOOL", str(Path(self.workdir) / "li-spool"))
            if self.dialog_redis_port:  # kamailio.cfg: #!trydefenvs DIALOG_REDIS=...
                env["SPITWALL_DIALOG_REDIS"] = self.dialog_redis_url()
                if self.dialog_db_period:
                    env["SPITWALL_DIALOG_DB_PERIOD"] = str(self.dialog_db_period)
        return env

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LabState:
        known = {name for name in cls.__dataclass_fields__}
        return cls(**{key: value for key, value in data.items() if key in known})


@dataclass(frozen=True)
class ExtraService:
    """A further lab process started after Kamailio (hook for later issues).

    ``argv`` builds the command line from the lab state, ``ready`` says whether the service
    answers (polled until ``timeout``), ``expect`` gives the cmdline substrings that identify it.
    ``redis_role`` (an `intercept.acl` role) selects the Redis user: the process gets its URL in
    ``$SPITWALL_REDIS`` (`LabState.env_for`); keep ``--redis`` out of ``argv``.
    """

    name: str
    argv: Callable[[LabState], list[str]]
    ready: Callable[[LabState], bool]
    expect: Callable[[LabState], list[str]]
    timeout: float = 15.0
    redis_role: str | None = None


#: Services the lab starts after Kamailio: the answering machine (``media/``) and the intercept
#: delivery worker (``intercept/``), appended below.
EXTRA_SERVICES: list[ExtraService] = []


def _media_port(state: LabState) -> int:
    if state.media_port:
        return state.media_port
    return int(state.media_uri.rsplit(":", 1)[1].split(";", 1)[0])


def _media_argv(state: LabState) -> list[str]:
    work = Path(state.workdir)  # the Redis URL comes in $SPITWALL_REDIS (redis_role)
    return [sys.executable, "-m", "media.server",
            "--sip-addr", state.sip_addr, "--sip-port", str(_media_port(state)),
            "--queue-dir", str(work / "queue"), "--prompts-dir", str(work / "prompts"),
            # dual stack: RTP for callers of either family
            *(["--rtp-addr", state.sip_addr, "--rtp-addr", state.sip_addr6]
              if state.sip_addr6 else [])]


def _deliver_port(state: LabState) -> int:
    return int(state.deliver_uri.rsplit(":", 1)[1].split(";", 1)[0])


def _deliver_argv(state: LabState) -> list[str]:
    work = Path(state.workdir)
    return [sys.executable, "-m", "intercept.deliver", "--sip-addr", state.sip_addr,
            "--sip-port", str(_deliver_port(state)),
            "--proxy", f"{_uri_host(state.sip_addr)}:{state.sip_port}",
            "--stats-file", str(work / "deliver-stats.json")]


#: The phase-2 answering machine (`spitwall media`), on the MEDIA_URI port Kamailio diverts to.
#: The first start synthesises the prompts with espeak-ng, hence the longer timeout.
EXTRA_SERVICES.append(ExtraService(
    name="media",
    argv=_media_argv,
    ready=lambda st: sip_options_ping(st.sip_addr, _media_port(st), 0.5,
                                     src_host=st.sip_addr) == 200,
    expect=lambda st: ["media.server", str(_media_port(st))],
    timeout=90.0,
    redis_role="media",
))

#: The intercept delivery worker (`spitwall deliver`), on the DELIVER_URI port; it runs as the
#: Redis user `spitwall-deliver` when the lab created the users.
EXTRA_SERVICES.append(ExtraService(
    name="deliver",
    argv=_deliver_argv,
    ready=lambda st: sip_options_ping(st.sip_addr, _deliver_port(st), 0.5,
                                     src_host=st.sip_addr) == 200,
    expect=lambda st: ["intercept.deliver", str(_deliver_port(st))],
    timeout=30.0,
    redis_role="deliver",
))


@dataclass
class ServiceStatus:
    """One row of ``lab status``. ``answering`` is None when the service cannot be probed."""

    name: str
    pid: int | None
    alive: bool
    answering: bool | None
    address: str

    @property
    def ok(self) -> bool:
        return self.alive and self.answering is not False


# --------------------------------------------------------------------------------------------
# helpers


def _uri_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _binary(name: str, fallback: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    if Path(fallback).is_file():
        return fallback
    raise LabError(f"{name} not found (PATH or {fallback}); run `make setup`")


def _log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return []
    return text.splitlines()[-lines:]


def _rotate_log(path: Path) -> None:
    """Keep the previous run's log as ``*.1``, so each run's log holds only that run."""
    if path.exists():
        path.replace(path.with_name(path.name + ".1"))


def _redis_endpoint(url: str) -> tuple[str, int, str | None, str | None] | None:
    """host, port, username, password of a ``redis://`` URL; None for schemes a raw-socket
    PING cannot probe (TLS, unix sockets)."""
    parts = urlsplit(url)
    if parts.scheme != "redis":
        return None
    try:
        port = parts.port or 6379
    except ValueError:
        return None
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    return parts.hostname or "127.0.0.1", port, username, password


def _redis_answers(url: str, timeout: float = 1.0) -> bool:
    """PING through a raw socket where that can be done (plain ``redis://``), else through
    redis-py (TLS, unix sockets, Sentinel: the sentinels are asked for the master first)."""
    endpoint = _redis_endpoint(url)
    if endpoint is not None:
        host, port, username, password = endpoint
        return redis_ping(host, port, timeout, username=username, password=password)
    import redis

    from scoring import redisconn

    try:
        client = redisconn.client(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError):
        return False


def _kamailio_answers(state: LabState, timeout: float = 1.0) -> bool:
    addrs = [a for a in (state.sip_addr, state.sip_addr6) if a]
    return all(sip_options_ping(addr, state.sip_port, timeout, src_host=addr) == 200
               for addr in addrs) and (
        not state.sip_tls_port or all(_tcp_listens(a, state.sip_tls_port, timeout)
                                      for a in addrs))


def _tcp_listens(addr: str, port: int, timeout: float) -> bool:
    """Something accepts TCP connections on addr:port (the TLS listener; no handshake, which
    with mutual TLS would need a client certificate)."""
    try:
        with socket.create_connection((addr, port), timeout=timeout):
            return True
    except OSError:
        return False


#: how often `up` starts everything again when a server lost a port picked for it (below)
PORT_RACE_ATTEMPTS = 3
_ADDR_IN_USE = ("Address already in use", "EADDRINUSE", "[Errno 98]")


def lost_port_race(exc: LabError) -> bool:
    """Whether a server failed because its port, free when the lab picked it, was taken before
    the server bound it (another program's socket in between: a picked port is a probe, not a
    reservation). The server's log tail or the message says so."""
    text = "\n".join([str(exc), *exc.log_tail])
    return any(marker in text for marker in _ADDR_IN_USE)


def free_sip_port(addr: str, addr6: str = "", proto: str = "both") -> int:
    """A port free for UDP and TCP (or `proto`) on `addr` and, for a dual-stack lab, on
    `addr6` too."""
    for _ in range(50):
        port = free_port(addr, proto)
        if not addr6 or port_free(addr6, port, proto):
            return port
    raise LabError(f"no SIP port free on both {addr} and {addr6}")


def redis_argv(workdir: Path, port: int, bind: str = "127.0.0.1") -> list[str]:
    """redis-server as a throwaway: no persistence, foreground (so our pid is the server)."""
    return [
        _binary("redis-server", "/usr/bin/redis-server"),
        "--bind", bind,
        "--port", str(port),
        "--save", "",
        "--appendonly", "no",
        "--daemonize", "no",
        "--dir", str(workdir),
        "--logfile", str(workdir / "redis.log"),
    ]  # fmt: skip


#: redis-server rewrites its argv to "redis-server HOST:PORT", so only the name is reliable.
REDIS_EXPECT = ["redis-server"]


def start_redis_server(
    workdir: Path,
    port: int,
    bind: str = "127.0.0.1",
    timeout: float = REDIS_READY_TIMEOUT,
) -> int:
    """Start redis-server in ``workdir`` on ``bind:port`` and wait for PING; return its pid.

    On failure the process is stopped and LabError carries the tail of ``redis.log``. The test
    fixtures use this too, to restart Redis on the same port after a fail-open test.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "redis.log"
    pid = start_process(redis_argv(workdir, port, bind), log_path, cwd=workdir)
    try:
        ready = wait_until(lambda: redis_ping(bind, port, 0.5) or not pid_alive(pid), timeout)
    except BaseException:
        # Interrupted (Ctrl-C) before the caller could record the pid: do not leave it behind.
        stop_pid(pid, REDIS_EXPECT, STOP_TIMEOUT)
        raise
    if ready and pid_alive(pid):
        return pid
    alive = pid_alive(pid)
    with contextlib.suppress(ProcessMismatch):
        stop_pid(pid, REDIS_EXPECT, STOP_TIMEOUT)
    why = f"did not answer PING within {timeout:.0f}s" if alive else "exited during start-up"
    raise LabError(f"redis-server on {bind}:{port} {why} (see {log_path})", _log_tail(log_path))


# --------------------------------------------------------------------------------------------
# the lab


class Lab:
    """A lab in one work directory. Methods raise LabError for anything the operator must fix."""

    #: Kamailio's memory manager (-x): TLSF, as in deploy/ (measured: 0.12-0.17 ms less CPU per
    #: call than Kamailio's default qm; docs/benchmarks.md)
    mem_manager = "tlsf"

    def __init__(self, workdir: Path, kamailio_cfg: Path | None = None) -> None:
        self.workdir = Path(workdir).resolve()
        self.kamailio_cfg = Path(kamailio_cfg or DEFAULT_KAMAILIO_CFG).resolve()
        self.state: LabState | None = None

    @property
    def state_path(self) -> Path:
        return self.workdir / STATE_FILE

    # -- persistence --------------------------------------------------------------------------

    def load(self) -> LabState | None:
        """The recorded state, or None when no lab.json exists."""
        try:
            data = json.loads(self.state_path.read_text())
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            state = LabState.from_dict(data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            raise LabError(f"cannot read {self.state_path}: {exc}") from exc
        self.state = state
        return state

    def _save(self, state: LabState) -> None:
        """Write atomically, so a crash never leaves a half-written file that hides live pids."""
        tmp = self.state_path.with_suffix(".json.tmp")
        tmp.write_text(state.to_json() + "\n")
        tmp.replace(self.state_path)
        self.state = state

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise up/down in one workdir (two concurrent `up`s would both see it empty)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        with (self.workdir / LOCK_FILE).open("a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise LabError(
                    f"another `spitwall lab` command is running in {self.workdir}"
                ) from exc
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _live_pids(self, state: LabState) -> dict[str, int]:
        """Recorded pids that still run what we started (a reused pid does not count)."""
        return {
            name: pid
            for name, pid in state.pids.items()
            if pid_alive(pid) and pid_matches(pid, state.expect.get(name) or [name])
        }

    # -- up -------------------------------------------------------------------------------------

    def up(
        self,
        *,
        sip_addr: str = "127.0.0.1",
        sip_port: int | None = None,
        redis_url: str | None = None,
        redis_port: int | None = None,
        next_hop: str | None = None,
        media_port: int | None = None,
        children: int = DEFAULT_CHILDREN,
        timeout: float = KAMAILIO_READY_TIMEOUT,
        redis_users: bool | None = None,
        media_uri: str | None = None,
        sip_addr6: str | None = None,
        sip_tls: SipTls | None = None,
        dialog_timeout: int = 0,
        dialog_store: str = "text",
        dialog_db_period: int = 0,
        flood_density: int = 0,
    ) -> LabState:
        """Start the lab and return once every service answers.

        ``flood_density`` (0 = kamailio.cfg's default): a source sending more requests than
        this per 2 s is dropped before scoring (`FLOOD_DENSITY`, Kamailio's pike).

        ``dialog_store``: where Kamailio keeps its dialogs across restarts: "text" (a db_text
        directory, written at a clean stop) or "redis" (a redis-server of the lab's own with
        append-only persistence, written every ``dialog_db_period`` seconds: dialogs also
        survive a crash; `ops.dialogdb`).

        ``dialog_timeout`` (seconds, 0 = kamailio.cfg's default) is how long Kamailio tracks a
        call that sees no BYE (`-A DIALOG_TIMEOUT`).

        ``sip_tls`` adds SIP over TLS listeners (Kamailio's tls module) with that certificate.

        ``sip_addr6`` (an IPv6 address) makes Kamailio dual stack: it also listens there, on the
        same port, and relays between IPv4 and IPv6 (the other services stay on ``sip_addr``).

        ``media_uri`` makes Kamailio divert to another answering machine than the lab's own
        (which still runs, on ``media_port`` or a free port), e.g. a test's SIP UAS.

        ``redis_url`` uses an existing Redis (nothing is started for it); otherwise redis-server
        runs on ``redis_port`` (default: a free one). ``redis_users`` creates the Redis role
        users and runs each process as its role (default: only on a Redis the lab starts). On
        any failure everything started so far is stopped again, lab.json is removed, and
        LabError (with Kamailio's log tail when it is the culprit) is raised.
        """
        _validate_up(sip_addr, redis_url, redis_port, next_hop, children)
        if not 0 <= dialog_timeout <= MAX_DIALOG_TIMEOUT:
            raise LabError(f"--dialog-timeout must be between 1 and {MAX_DIALOG_TIMEOUT} "
                           f"seconds, not {dialog_timeout}")
        if dialog_store not in DIALOG_STORES:
            raise LabError(f"--dialog-store must be one of {', '.join(DIALOG_STORES)}, "
                           f"not {dialog_store[:40]!r}")
        if dialog_db_period and dialog_store != "redis":
            raise LabError("--dialog-db-period is for --dialog-store redis (the text store is "
                           "written at a clean stop)")
        if not 0 <= flood_density <= 10_000_000:
            raise LabError(f"--flood-density must be between 1 and 10000000, not "
                           f"{flood_density}")
        if not 0 <= dialog_db_period <= 3600:
            raise LabError(f"--dialog-db-period must be between 1 and 3600 seconds, not "
                           f"{dialog_db_period}")
        if sip_addr6 is not None:
            try:
                v6 = ipaddress.ip_address(sip_addr6)
            except ValueError:
                v6 = None
            if not isinstance(v6, ipaddress.IPv6Address):
                raise LabError(f"--sip-addr6 must be an IPv6 address, not {sip_addr6[:80]!r}")
            if ":" in sip_addr:
                raise LabError("--sip-addr6 adds IPv6 to an IPv4 --sip-addr; "
                               f"{sip_addr} is IPv6 already")
            sip_addr6 = str(v6)
        if sip_tls is not None:
            sip_tls.check()
        if media_uri is not None and (not media_uri.startswith(("sip:", "sips:"))
                                      or any(ch.isspace() for ch in media_uri)):
            raise LabError(f"media URI must be a sip: or sips: URI, not {media_uri[:80]!r}")
        if not self.kamailio_cfg.is_file():
            raise LabError(f"Kamailio config {self.kamailio_cfg} not found")
        with self._locked():
            previous = self.load()
            if previous is not None:
                live = self._live_pids(previous)
                if live:
                    running = ", ".join(f"{name} pid {pid}" for name, pid in live.items())
                    raise LabError(
                        f"a lab is already up in {self.workdir} ({running}); "
                        "run `spitwall lab down` first"
                    )
                log.info("removing stale %s (no recorded process is alive)", self.state_path)
                self.state_path.unlink()
            for attempt in range(1, PORT_RACE_ATTEMPTS + 1):
                try:
                    return self._start_all(
                        sip_addr, sip_port, redis_url, redis_port, next_hop, media_port, children,
                        timeout, redis_users, media_uri, sip_addr6 or "", sip_tls,
                        dialog_timeout, dialog_store, dialog_db_period, flood_density,
                    )
                except LabError as exc:
                    if attempt == PORT_RACE_ATTEMPTS or not lost_port_race(exc):
                        raise
                    # everything started is stopped again; the free ports are picked anew
                    log.warning("%s: a port was taken before its server bound it; "
                                "starting again (attempt %d)", exc, attempt + 1)
            raise AssertionError("unreachable")

    def _start_all(
        self,
        sip_addr: str,
        sip_port: int | None,
        redis_url: str | None,
        redis_port: int | None,
        next_hop: str | None,
        media_port: int | None,
        children: int,
        timeout: float,
        redis_users: bool | None = None,
        media_uri: str | None = None,
        sip_addr6: str = "",
        sip_tls: SipTls | None = None,
        dialog_timeout: int = 0,
        dialog_store: str = "text",
        dialog_db_period: int = 0,
        flood_density: int = 0,
    ) -> LabState:
        own_redis = redis_url is None
        make_users = own_redis if redis_users is None else redis_users
        if own_redis:
            redis_port = redis_port or free_port("127.0.0.1", "tcp")
            redis_url = f"redis://127.0.0.1:{redis_port}/0"
        assert redis_url is not None
        sip_port = sip_port or free_sip_port(sip_addr, sip_addr6)
        media_port = media_port or free_port(sip_addr, "udp")
        state = LabState(
            workdir=str(self.workdir),
            sip_addr=sip_addr,
            sip_port=sip_port,
            redis_url=redis_url,
            next_hop=next_hop,
            media_uri=media_uri or f"sip:spitwall-am@{_uri_host(sip_addr)}:{media_port}",
            media_port=media_port,
            deliver_uri=f"sip:spitwall-li@{_uri_host(sip_addr)}:{free_port(sip_addr, 'udp')}",
            children=children,
            kamailio_cfg=str(self.kamailio_cfg),
            own_redis=own_redis,
            started_at=time.time(),
            sip_addr6=sip_addr6,
            dialog_timeout=dialog_timeout,
            flood_density=flood_density,
        )
        if dialog_store == "redis":
            state.dialog_redis_port = free_port("127.0.0.1", "tcp")
            state.dialog_db_period = dialog_db_period
        elif '"' not in str(self.workdir):  # a cfg string define cannot hold a quote
            state.dialog_db = str((self.workdir / "dialogs").resolve())
        if sip_tls is not None:
            state.sip_tls_port = sip_tls.port or free_sip_port(sip_addr, sip_addr6, "tcp")
            state.sip_tls_cert, state.sip_tls_key = sip_tls.cert, sip_tls.key
            state.sip_tls_ca, state.sip_tls_verify = sip_tls.ca, sip_tls.verify
        try:
            if own_redis:
                self._start_redis(state, redis_port or 0)
            elif not _redis_answers(redis_url, 2.0):
                raise LabError(f"Redis at {redis_url} does not answer PING")
            if make_users:
                self._create_users(state, shared=not own_redis)
            if state.dialog_redis_port:
                self._start_dialog_redis(state)
            self._start_kamailio(state, timeout)
            for service in EXTRA_SERVICES:
                self._start_extra(state, service)
        except BaseException:
            # Interrupted or failed: leave nothing running and no lab.json behind, then re-raise.
            self._stop_recorded(state)
            self._drop_users(state)
            with contextlib.suppress(FileNotFoundError):
                self.state_path.unlink()
            self.state = None
            raise
        return state

    def _record(
        self, state: LabState, name: str, pid: int, log_path: Path, expect: list[str]
    ) -> None:
        """Record a pid as soon as it exists, so `down` can stop it even if `up` is killed."""
        state.pids[name] = pid
        state.logs[name] = str(log_path)
        state.expect[name] = expect
        self._save(state)

    def _start_redis(self, state: LabState, port: int) -> None:
        log_path = self.workdir / "redis.log"
        _rotate_log(log_path)
        # start_redis_server waits for PING itself; record the pid only once it is known good,
        # since on failure it has already stopped the process.
        pid = start_redis_server(self.workdir, port)
        self._record(state, "redis", pid, log_path, REDIS_EXPECT)

    def _start_dialog_redis(self, state: LabState) -> None:
        """The Redis dialog store: a redis-server of this lab's own on loopback, with a
        password (in a 0600 config file, not on a command line) and append-only persistence
        flushed by the kernel, as deploy/redis/redis-spitwall-dialogs.conf for a proxy host."""
        directory = self.workdir / DIALOG_REDIS_DIR
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        secret_path = directory / "password"
        if not secret_path.exists():
            fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_hex(24) + "\n")
        secret = secret_path.read_text().strip()
        conf = directory / "redis.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(f"bind 127.0.0.1\nport {state.dialog_redis_port}\nrequirepass {secret}\n"
                      f"dir {json.dumps(str(directory))}\nsave \"\"\nappendonly yes\n"
                      "appendfsync no\ndaemonize no\n")
        log_path = directory / "redis.log"
        _rotate_log(log_path)
        argv = [_binary("redis-server", "/usr/bin/redis-server"), str(conf),
                "--logfile", str(log_path)]
        pid = start_process(argv, log_path, cwd=directory)
        self._record(state, "dialog-redis", pid, log_path, REDIS_EXPECT)
        url = state.dialog_redis_url()
        if not wait_until(lambda: not pid_alive(pid) or _redis_answers(url, 0.5),
                          REDIS_READY_TIMEOUT, 0.05) or not pid_alive(pid):
            raise LabError(f"the dialog redis-server on 127.0.0.1:{state.dialog_redis_port} "
                           f"did not start (see {log_path})", _log_tail(log_path))

    def _create_users(self, state: LabState, *, shared: bool) -> None:
        """Create the Redis role users with fresh passwords; their URLs go to redis-users.json
        (0600). ``shared``: add our passwords to the users instead of resetting them."""
        import redis

        from intercept import acl
        from scoring import redisconn

        passwords = acl.generate_passwords()
        urls = {role: acl.user_url(state.redis_url, role, pw) for role, pw in passwords.items()}
        path = self.workdir / USERS_FILE
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(urls, indent=2) + "\n")
        state.users_file = str(path)
        state.users_shared = shared
        self._save(state)  # recorded before the users exist, so a failure cleans them up
        try:
            # every data node: ACL users are not replicated, and a replica may become master
            nodes = redisconn.node_clients(state.redis_url, socket_timeout=5,
                                           socket_connect_timeout=3)
        except (redis.RedisError, ValueError) as exc:
            raise LabError(f"cannot reach the Redis nodes of {redisconn.redacted(state.redis_url)}"
                           f": {exc}") from exc
        try:
            for client in nodes:
                acl.apply_users(client, passwords, keep_other_passwords=shared)
        except (redis.RedisError, ValueError) as exc:
            raise LabError("cannot create the Redis role users on "
                           f"{redisconn.redacted(state.redis_url)}: {exc}") from exc
        finally:
            for client in nodes:
                client.close()

    def _drop_users(self, state: LabState) -> list[str]:
        """Undo `_create_users`: on a shared Redis take our passwords away again; remove the
        users file. Returns warnings (never raises: `down` must go on)."""
        if not state.users_file:
            return []
        warnings: list[str] = []
        if state.users_shared:
            import redis

            from intercept import acl
            from scoring import redisconn

            try:
                urls = state.users()
                passwords = {role: unquote(urlsplit(u).password or "") for role, u in urls.items()}
                nodes = redisconn.node_clients(state.redis_url, socket_timeout=3,
                                               socket_connect_timeout=2)
                try:
                    for client in nodes:
                        acl.remove_passwords(client, {r: p for r, p in passwords.items() if p})
                finally:
                    for client in nodes:
                        client.close()
            except (LabError, redis.RedisError, ValueError) as exc:  # down goes on regardless
                warnings.append(f"could not remove the lab's Redis passwords: {exc}")
        Path(state.users_file).unlink(missing_ok=True)
        return warnings

    def kamailio_argv(self, state: LabState) -> list[str]:
        """The Kamailio command line: foreground (-DD) so our pid is the main process, logging to
        stderr (-E), runtime files under the workdir, everything else as -A defines. With Redis
        role users the REDIS_URL define is empty, so the handler takes $SPITWALL_REDIS (the
        proxy user's URL, password included, stays off the command line)."""
        redis_define = "" if state.users_file else state.redis_url
        return [
            _binary("kamailio", "/usr/sbin/kamailio"),
            "-f", state.kamailio_cfg,
            "-DD", "-E",
            "-x", self.mem_manager,
            "-Y", str(self.workdir / "run"),
            "-w", str(self.workdir),
            "-A", f"SIP_ADDR={state.sip_addr}",
            *(["-A", f"SIP_ADDR6={state.sip_addr6}"] if state.sip_addr6 else []),
            "-A", f"SIP_PORT={state.sip_port}",
            *(self._tls_defines(state) if state.sip_tls_port else []),
            "-A", f"REDIS_URL={redis_define}",
            "-A", f"NEXT_HOP={state.next_hop or 'none'}",
            "-A", f"MEDIA_URI={state.media_uri}",
            "-A", f"DELIVER_URI={state.deliver_uri or 'none'}",
            "-A", f"CHILDREN={state.children}",
            *(["-A", f"DIALOG_TIMEOUT={state.dialog_timeout}"] if state.dialog_timeout else []),
            *(["-A", f"FLOOD_DENSITY={state.flood_density}"] if state.flood_density else []),
            *(["-A", f'DIALOG_DB="{dialogdb.url(Path(state.dialog_db))}"']
              if state.dialog_db else []),
            "-A", f"SPITWALL_ROOT={REPO_ROOT}",
            # kamailio.cfg loads the handler by path; a string define must carry its quotes.
            "-A", f'SPITWALL_HANDLER="{REPO_ROOT / "kemi" / "handler.py"}"',
        ]  # fmt: skip

    @staticmethod
    def _tls_defines(state: LabState) -> list[str]:
        # string defines carry their quotes (paths were checked: no quote inside)
        out = ["-A", f"SIP_TLS_PORT={state.sip_tls_port}",
               "-A", f'TLS_CERT="{state.sip_tls_cert}"', "-A", f'TLS_KEY="{state.sip_tls_key}"',
               "-A", f"TLS_VERIFY={int(state.sip_tls_verify)}"]
        if state.sip_tls_ca:
            out += ["-A", f'TLS_CA="{state.sip_tls_ca}"']
        return out

    def _start_kamailio(self, state: LabState, timeout: float) -> None:
        try:
            if state.dialog_db:
                dialogdb.prepare(Path(state.dialog_db))
            if state.dialog_redis_port:
                dialogdb.prepare_redis(state.dialog_redis_url())
        except dialogdb.DialogDbError as exc:
            raise LabError(str(exc)) from exc
        log_path = self.workdir / "kamailio.log"
        _rotate_log(log_path)
        (self.workdir / "run").mkdir(parents=True, exist_ok=True)
        pid = start_process(self.kamailio_argv(state), log_path, cwd=self.workdir,
                            env=state.env_for("proxy"))
        # The workdir is in Kamailio's argv (-w), so it tells this lab's Kamailio from any other.
        self._record(state, "kamailio", pid, log_path, ["kamailio", str(self.workdir)])
        wait_until(lambda: not pid_alive(pid) or _kamailio_answers(state, 0.5), timeout, 0.1)
        if pid_alive(pid) and _kamailio_answers(state, 1.0):
            if state.dialog_db:
                try:
                    dialogdb.started(Path(state.dialog_db))
                except dialogdb.DialogDbError as exc:
                    raise LabError(str(exc)) from exc
            return
        why = (
            f"did not answer OPTIONS with 200 within {timeout:.0f}s"
            if pid_alive(pid)
            else "exited during start-up"
        )
        # Stop it before reading the log, so its last words are in the tail.
        with contextlib.suppress(ProcessMismatch):
            stop_pid(pid, state.expect["kamailio"], STOP_TIMEOUT)
        raise LabError(
            f"kamailio on {state.sip_addr}:{state.sip_port} {why} (see {log_path})",
            _log_tail(log_path),
        )

    @staticmethod
    def _stop_kamailio(state: LabState) -> None:
        """SIGTERM; when Kamailio ends on its own (it wrote its dialogs), mark the dialog
        database clean, as the systemd drop-in's ExecStopPost does (`ops.dialogdb`)."""
        clean = stop_pid_cleanly(state.pids["kamailio"], state.expect["kamailio"], STOP_TIMEOUT)
        if clean and state.dialog_db:
            try:
                dialogdb.mark_clean(Path(state.dialog_db))
            except dialogdb.DialogDbError as exc:  # the next start forgets the dialogs
                log.warning("%s", exc)

    def _start_extra(self, state: LabState, service: ExtraService) -> None:
        log_path = self.workdir / f"{service.name}.log"
        _rotate_log(log_path)
        pid = start_process(service.argv(state), log_path, cwd=self.workdir,
                            env=state.env_for(service.redis_role))
        self._record(state, service.name, pid, log_path, service.expect(state))
        if not wait_until(lambda: service.ready(state) or not pid_alive(pid), service.timeout):
            raise LabError(f"{service.name} did not become ready (see {log_path})",
                           _log_tail(log_path))
        if not pid_alive(pid):
            raise LabError(f"{service.name} exited during start-up (see {log_path})",
                           _log_tail(log_path))

    # -- down -----------------------------------------------------------------------------------

    def _stop_recorded(self, state: LabState) -> list[str]:
        """Stop the recorded pids in reverse start order; return warnings (never raises for a
        single service, so one odd pid does not leave the others running)."""
        warnings: list[str] = []
        for name in reversed(list(state.pids)):
            pid = state.pids[name]
            try:
                if name == "kamailio":
                    self._stop_kamailio(state)
                else:
                    stop_pid(pid, state.expect.get(name) or [name], STOP_TIMEOUT)
            except ProcessMismatch as exc:
                warnings.append(f"{name}: {exc}")
            except PermissionError as exc:
                warnings.append(f"{name}: cannot signal pid {pid}: {exc}")
        return warnings

    def down(self) -> tuple[LabState | None, list[str]]:
        """Stop exactly the processes recorded in lab.json and remove it.

        Returns the state that was stopped (None when no lab was up) and warnings about pids that
        were left alone because they no longer run what we started.
        """
        with self._locked():
            state = self.load()
            if state is None:
                return None, []
            warnings = self._stop_recorded(state)
            warnings += self._drop_users(state)
            self.state_path.unlink(missing_ok=True)
            self.state = None
            return state, warnings

    def restart_kamailio(self, timeout: float = KAMAILIO_READY_TIMEOUT) -> LabState:
        """Stop Kamailio cleanly (SIGTERM: it writes its dialogs to the dialog database) and
        start it again with the same addresses, ports and settings, as an operator's
        `systemctl restart kamailio` would. The other services keep running."""
        with self._locked():
            state = self.load()
            if state is None or "kamailio" not in state.pids:
                raise LabError(f"no lab with a Kamailio is up in {self.workdir}")
            try:
                self._stop_kamailio(state)
            except ProcessMismatch as exc:
                raise LabError(f"kamailio: {exc}") from exc
            self._start_kamailio(state, timeout)
            self.state = state
            return state

    # -- status ---------------------------------------------------------------------------------

    def status(self) -> list[ServiceStatus] | None:
        """Per service: pid, alive, answering. None when no lab.json exists."""
        state = self.load()
        if state is None:
            return None
        rows: list[ServiceStatus] = []
        if not state.own_redis:
            rows.append(
                ServiceStatus("redis", None, True, _redis_answers(state.redis_url), state.redis_url)
            )
        extras = {service.name: service for service in EXTRA_SERVICES}
        for name, pid in state.pids.items():
            alive = pid_alive(pid) and pid_matches(pid, state.expect.get(name) or [name])
            answering: bool | None
            if name == "redis":
                answering = _redis_answers(state.redis_url) if alive else False
                address = state.redis_url
            elif name == "dialog-redis":
                answering = _redis_answers(state.dialog_redis_url()) if alive else False
                address = f"127.0.0.1:{state.dialog_redis_port}"
            elif name == "kamailio":
                answering = _kamailio_answers(state) if alive else False
                address = f"udp+tcp {_uri_host(state.sip_addr)}:{state.sip_port}"
            elif name in extras:
                answering = extras[name].ready(state) if alive else False
                address = ""
            else:
                answering, address = None, ""
            rows.append(ServiceStatus(name, pid, alive, answering, address))
        return rows


def _validate_up(
    sip_addr: str,
    redis_url: str | None,
    redis_port: int | None,
    next_hop: str | None,
    children: int,
) -> None:
    try:
        ipaddress.ip_address(sip_addr)
    except ValueError as exc:
        raise LabError(f"--sip-addr must be an IP address, not {sip_addr!r}") from exc
    if redis_url is not None and redis_port is not None:
        raise LabError("--redis-port starts our own Redis; it cannot be combined with --redis")
    if redis_url is not None:
        from scoring import redisconn

        scheme = urlsplit(redis_url).scheme
        special = (*redisconn.SENTINEL_SCHEMES, *redisconn.CLUSTER_SCHEMES)
        if scheme not in ("redis", "rediss", "unix", *special):
            raise LabError("--redis must be a redis://, rediss://, unix://, redis[s]+sentinel:// "
                           "or redis[s]+cluster:// URL, not "
                           f"{redisconn.redacted(redis_url)!r}")
        if scheme in special:
            try:
                redisconn.check_url(redis_url)
            except ValueError as exc:
                raise LabError(f"--redis: {exc}") from exc
    if next_hop is not None and (
        not next_hop.startswith(("sip:", "sips:")) or any(ch.isspace() for ch in next_hop)
    ):
        raise LabError(f"--next-hop must look like sip:HOST:PORT, not {next_hop!r}")
    if not 1 <= children <= 256:
        raise LabError(f"--children must be between 1 and 256, not {children}")


# --------------------------------------------------------------------------------------------
# command line


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range 1-65535: {value}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value}")
    return value


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workdir",
        type=Path,
        default=DEFAULT_WORKDIR,
        help="directory for lab.json, logs and runtime files (default: ./.lab)",
    )
    # SUPPRESS: a subcommand default would otherwise overwrite the top-level --json/--redis.
    parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``lab up|down|status`` to the spitwall CLI. Each subcommand sets ``func(args) -> int``
    (the exit code); ``args.redis`` (None unless given) and ``args.json`` come from the top-level
    parser and may be repeated on the subcommand."""
    lab = subparsers.add_parser(
        "lab",
        help="run a local lab (Redis, Kamailio) on loopback",
        description="Start, stop and inspect a lab of real processes on loopback.",
    )
    commands = lab.add_subparsers(dest="lab_command", metavar="{up,down,status}", required=True)

    up = commands.add_parser(
        "up",
        help="start the lab and wait until every service answers",
        description="Start redis-server (unless --redis is given) and Kamailio with kamailio.cfg "
        "on loopback; return when they answer (Redis PING, SIP OPTIONS 200).",
    )
    _add_common(up)
    up.add_argument(
        "--redis", default=argparse.SUPPRESS, metavar="URL", help="use this Redis, start none"
    )
    up.add_argument("--sip-addr", default="127.0.0.1", help="SIP listen address")
    up.add_argument("--sip-addr6", metavar="IPV6",
                    help="dual stack: Kamailio also listens on this IPv6 address (e.g. ::1)")
    up.add_argument("--sip-tls-cert", metavar="PEM", type=Path,
                    help="SIP over TLS: the proxy's certificate (with --sip-tls-key)")
    up.add_argument("--sip-tls-key", metavar="PEM", type=Path, help="its private key")
    up.add_argument("--sip-tls-ca", metavar="PEM", type=Path,
                    help="CA of client certificates (for --sip-tls-verify)")
    up.add_argument("--sip-tls-verify", action="store_true",
                    help="mutual TLS: only clients with a certificate from --sip-tls-ca")
    up.add_argument("--sip-tls-port", type=_port, help="TLS port (default: a free one)")
    up.add_argument("--sip-port", type=_port, help="SIP port, udp and tcp (default: a free one)")
    up.add_argument("--redis-port", type=_port, help="port of our redis-server (default: free)")
    up.add_argument("--next-hop", metavar="sip:HOST:PORT", help="where relayed calls go")
    up.add_argument("--media-port", type=_port, help="answering-machine port in MEDIA_URI")
    up.add_argument(
        "--children", type=_positive, default=DEFAULT_CHILDREN, help="Kamailio UDP workers"
    )
    up.add_argument("--dialog-store", choices=DIALOG_STORES, default="text",
                    help="where Kamailio keeps its dialogs across restarts: text (written at "
                         "a clean stop) or redis (a dialog redis-server of the lab's own, "
                         "written every --dialog-db-period seconds: also across a crash)")
    up.add_argument("--dialog-db-period", type=_positive, default=0, metavar="SECONDS",
                    help="--dialog-store redis: how often new dialogs are written "
                         "(default: kamailio.cfg's, 2)")
    up.add_argument("--flood-density", type=_positive, default=0, metavar="N",
                    help="a source sending more than N requests per 2 s is dropped before "
                         "scoring (default: kamailio.cfg's, 1000)")
    up.add_argument("--dialog-timeout", type=_positive, default=0, metavar="SECONDS",
                    help="how long Kamailio tracks a call without a BYE (default: "
                         "kamailio.cfg's, 14400)")
    up.add_argument(
        "--redis-users",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="create the Redis role users (spitwall-proxy, -ops, -media, -deliver, -li-admin) "
        "and run each process as its user; default: only on a Redis the lab starts",
    )
    up.add_argument(
        "--kamailio-cfg",
        type=Path,
        default=DEFAULT_KAMAILIO_CFG,
        help=f"Kamailio config (default: {DEFAULT_KAMAILIO_CFG})",
    )
    up.set_defaults(func=_cmd_up)

    down = commands.add_parser(
        "down", help="stop the lab's processes", description="Stop exactly the lab's processes."
    )
    _add_common(down)
    down.set_defaults(func=_cmd_down)

    restart = commands.add_parser(
        "restart-proxy",
        help="restart the lab's Kamailio cleanly (calls in progress survive)",
        description="Stop Kamailio with SIGTERM and start it again with the same addresses "
                    "and ports, as `systemctl restart kamailio` would; its dialogs go through "
                    "the dialog database, so answered calls are still observed when they end.",
    )
    _add_common(restart)
    restart.set_defaults(func=_cmd_restart_proxy)

    status = commands.add_parser(
        "status",
        help="show whether each service is alive and answering (exit 1 if not)",
        description="Per service: pid, alive, answering. Exits 1 if anything is down.",
    )
    _add_common(status)
    status.set_defaults(func=_cmd_status)


def _fail(command: str, exc: LabError) -> int:
    for line in exc.log_tail:
        print(f"  | {line}", file=sys.stderr)
    print(f"spitwall lab {command}: error: {exc}", file=sys.stderr)
    return 1


def _cmd_up(args: argparse.Namespace) -> int:
    lab = Lab(args.workdir, args.kamailio_cfg)
    tls: SipTls | None = None
    if args.sip_tls_cert or args.sip_tls_key:
        if not (args.sip_tls_cert and args.sip_tls_key):
            return _fail("up", LabError("--sip-tls-cert and --sip-tls-key go together"))
        tls = SipTls(str(args.sip_tls_cert.absolute()), str(args.sip_tls_key.absolute()),
                     str(args.sip_tls_ca.absolute()) if args.sip_tls_ca else "",
                     args.sip_tls_verify, args.sip_tls_port)
    elif args.sip_tls_ca or args.sip_tls_verify or args.sip_tls_port:
        return _fail("up", LabError("--sip-tls-ca/--sip-tls-verify/--sip-tls-port need "
                                    "--sip-tls-cert and --sip-tls-key"))
    try:
        state = lab.up(
            sip_addr=args.sip_addr,
            sip_port=args.sip_port,
            redis_url=getattr(args, "redis", None),
            redis_port=args.redis_port,
            next_hop=args.next_hop,
            media_port=args.media_port,
            children=args.children,
            redis_users=args.redis_users,
            sip_addr6=args.sip_addr6,
            sip_tls=tls,
            dialog_timeout=args.dialog_timeout,
            dialog_store=args.dialog_store,
            dialog_db_period=args.dialog_db_period,
            flood_density=args.flood_density,
        )
    except LabError as exc:
        if exc.log_tail:
            print(f"last lines of the log ({lab.workdir}):", file=sys.stderr)
        return _fail("up", exc)
    if getattr(args, "json", False):
        print(state.to_json())
        return 0
    host = _uri_host(state.sip_addr)
    print(f"lab up in {state.workdir}")
    print(f"  SIP proxy   udp:{host}:{state.sip_port}  tcp:{host}:{state.sip_port}")
    if state.sip_addr6:
        host6 = _uri_host(state.sip_addr6)
        print(f"              udp:{host6}:{state.sip_port}  tcp:{host6}:{state.sip_port}")
    if state.sip_tls_port:
        mutual = ", client certificates required" if state.sip_tls_verify else ""
        print(f"              tls:{host}:{state.sip_tls_port}{mutual}")
    from scoring import redisconn

    redis_owner = f"redis-server pid {state.pids['redis']}" if state.own_redis else "external"
    print(f"  Redis       {redisconn.redacted(state.redis_url)}  ({redis_owner})")
    if state.users_file:
        print(f"  Redis users {state.users_file}  (role URLs with passwords, mode 0600)")
    print(f"  next hop    {state.next_hop or 'none'}")
    print(f"  media URI   {state.media_uri}")
    if state.deliver_uri:
        print(f"  deliver URI {state.deliver_uri}  (intercept delivery worker; SUBSCRIBE srtp)")
    print("  pids        " + ", ".join(f"{name} {pid}" for name, pid in state.pids.items()))
    print("  logs        " + ", ".join(state.logs.values()))
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    lab = Lab(args.workdir)
    try:
        state, warnings = lab.down()
    except LabError as exc:
        return _fail("down", exc)
    for warning in warnings:
        print(f"spitwall lab down: warning: {warning}", file=sys.stderr)
    if getattr(args, "json", False):
        stopped = state.pids if state else {}
        print(json.dumps({"workdir": str(lab.workdir), "stopped": stopped, "warnings": warnings}))
    elif state is None:
        print(f"no lab is up in {lab.workdir}")
    else:
        print("stopped " + ", ".join(f"{n} (pid {p})" for n, p in reversed(state.pids.items())))
    return 0


def _cmd_restart_proxy(args: argparse.Namespace) -> int:
    lab = Lab(args.workdir)
    try:
        state = lab.restart_kamailio()
    except LabError as exc:
        return _fail("restart-proxy", exc)
    pid = state.pids["kamailio"]
    if getattr(args, "json", False):
        print(json.dumps({"workdir": str(lab.workdir), "kamailio": pid}))
    else:
        kept = state.dialog_db or (f"the dialog Redis on 127.0.0.1:{state.dialog_redis_port} "
                                   "(those older than its write period)"
                                   if state.dialog_redis_port else "nothing")
        print(f"kamailio restarted (pid {pid}); dialogs kept in {kept}")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    lab = Lab(args.workdir)
    try:
        rows = lab.status()
    except LabError as exc:
        return _fail("status", exc)
    ok = bool(rows) and all(row.ok for row in rows or [])
    if getattr(args, "json", False):
        services = [asdict(row) | {"ok": row.ok} for row in rows or []]
        print(json.dumps({"workdir": str(lab.workdir), "up": ok, "services": services}))
        return 0 if ok else 1
    if rows is None:
        print(f"no lab is up in {lab.workdir}")
        return 1
    for row in rows:
        pid = "external" if row.pid is None else f"pid {row.pid}"
        alive = "alive" if row.alive else "DEAD"
        answer = {True: "answering", False: "NOT ANSWERING", None: "not probed"}[row.answering]
        print(f"{row.name:<12} {pid:<12} {alive:<6} {answer:<14} {row.address}".rstrip())
    return 0 if ok else 1


def _standalone_parser() -> argparse.ArgumentParser:
    """The lab alone, with the top-level options ops/cli.py provides (for `python -m ops.lab`)."""
    parser = argparse.ArgumentParser(prog="spitwall")
    parser.add_argument("--redis", default=None, metavar="URL", help="use this Redis")
    parser.add_argument("--json", action="store_true", help="print JSON")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point for ``python -m ops.lab lab up|down|status`` (same as ``spitwall lab``)."""
    logging.basicConfig(level=os.environ.get("SPITWALL_LOG", "WARNING").upper())
    args = _standalone_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)


if __name__ == "__main__":
    sys.exit(main())
