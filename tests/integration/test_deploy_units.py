"""The systemd units of deploy/, run as systemd would run them -- without systemd.

There is no systemd as PID 1 here, so each rendered unit is read the way the service manager
reads it: the [Service] keys of the unit and its drop-ins (an empty ``ExecStart=`` clears the
list), the environment from ``Environment=`` and then ``EnvironmentFile=`` (later wins), plus
``$RUNTIME_DIRECTORY`` (what ``RuntimeDirectory=`` sets; a tmp directory here) and
``$CREDENTIALS_DIRECTORY`` (with ``LoadCredential=ID:PATH``: a tmp directory holding a 0400 copy
of PATH named ID, as systemd makes it), and ``ExecStart=``
split into words with ``${VAR}`` replaced inside a word and a lone ``$VAR`` split at whitespace.
That command line is then started as a real process, in / (systemd's default working
directory), with only that environment. The env files are the ones the installer wrote, filled
in as an operator would: the test's redis-server with a Redis ACL user per role (as
`intercept.acl.apply_users` makes them in production), free ports on 127.0.0.1, the state
directory in tmp. Each process must come up (SIP OPTIONS 200, HTTP 200, or alive and working),
talk to Redis as its role's user, and never show the password on its command line; it is stopped
by pid.

Not covered here: the sandboxing (ProtectSystem=, users, ...), which only a real service manager
applies; `systemd-analyze verify` checks the unit syntax (tests/unit/ops/test_deploy.py).
"""

from __future__ import annotations

import contextlib
import glob
import http.client
import json
import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import time
from base64 import b64encode
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from intercept import acl
from media.queue import MessageQueue
from ops.lab import free_sip_port
from ops.procs import (
    free_port,
    pid_alive,
    pid_cmdline,
    sip_options_ping,
    start_process,
    stop_pid,
    wait_until,
)
from scoring import config_admin, keys

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "deploy" / "install.py"
DEBIAN_KAMAILIO = Path("/lib/systemd/system/kamailio.service")
KAMAILIO = Path("/usr/sbin/kamailio")
#: PATH of system services (systemd 252 on Debian 12)
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: keys that accumulate over the unit and its drop-ins; an empty assignment clears them
LIST_KEYS = frozenset({"ExecStart", "ExecStartPre", "ExecStartPost", "ExecStop", "Environment",
                       "EnvironmentFile", "ReadWritePaths", "ReadOnlyPaths", "LoadCredential",
                       "SupplementaryGroups"})
_BRACED = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_LONE = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")

Unit = dict[str, dict[str, list[str]]]


# --------------------------------------------------------------------------------------------
# systemd's reading of unit files, env files and command lines (the subset the units use)


def parse_unit(*paths: Path) -> Unit:
    """A unit file and its drop-ins, merged in order: section -> key -> values."""
    unit: Unit = {}
    for path in paths:
        section = ""
        logical: list[str] = []
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not logical and (not line or line[0] in "#;"):
                continue
            if line.endswith("\\"):  # continuation: backslash-newline becomes a space
                logical.append(line[:-1])
                continue
            logical.append(line)
            text, logical = " ".join(logical), []
            if text.startswith("[") and text.endswith("]"):
                section = text[1:-1]
                continue
            key, sep, value = text.partition("=")
            assert sep, f"{path}: not KEY=VALUE: {text!r}"
            key, value = key.strip(), value.strip()
            values = unit.setdefault(section, {}).setdefault(key, [])
            if key in LIST_KEYS:
                if value:
                    values.append(value)
                else:
                    values.clear()
            else:
                values[:] = [value]
    return unit


def one(unit: Unit, section: str, key: str) -> str:
    values = unit.get(section, {}).get(key, [])
    assert len(values) == 1, f"[{section}] {key}= has {len(values)} values: {values}"
    return values[0]


def read_env_file(path: Path) -> dict[str, str]:
    """systemd's EnvironmentFile= format: KEY=VALUE lines, # and ; comments, optional quotes."""
    env: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not KEY=VALUE: {line!r}"
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key.strip()] = value
    return env


def load_credentials(unit: Unit, creds_dir: Path) -> Path | None:
    """``LoadCredential=ID:PATH`` as systemd does it at start: PATH read (by root: a missing file
    fails the start), its content written to ``creds_dir/ID`` with mode 0400. None without
    credentials (then systemd sets no $CREDENTIALS_DIRECTORY)."""
    specs = unit["Service"].get("LoadCredential", [])
    if not specs:
        return None
    creds_dir.mkdir(parents=True, exist_ok=True)
    creds_dir.chmod(0o700)  # systemd's: private to the service's user
    for spec in specs:
        cred_id, sep, source = spec.partition(":")
        assert sep and source.startswith("/"), f"LoadCredential={spec}: not ID:/ABSOLUTE/PATH"
        assert Path(source).is_file(), f"LoadCredential={spec}: no such file (start fails)"
        target = creds_dir / cred_id
        target.unlink(missing_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        with os.fdopen(fd, "wb") as f:
            f.write(Path(source).read_bytes())
    return creds_dir


def service_env(unit: Unit, runtime_dir: Path,
                credentials_dir: Path | None = None) -> dict[str, str]:
    """The environment systemd gives the service: its own variables, then Environment=, then
    EnvironmentFile= (a leading '-' makes a file optional; globs allowed), later ones winning."""
    env = {"PATH": SYSTEMD_PATH, "HOME": "/", "RUNTIME_DIRECTORY": str(runtime_dir)}
    if credentials_dir is not None:
        env["CREDENTIALS_DIRECTORY"] = str(credentials_dir)
    service = unit["Service"]
    for assignments in service.get("Environment", []):
        for word in shlex.split(assignments):
            key, _, value = word.partition("=")
            env[key] = value
    for spec in service.get("EnvironmentFile", []):
        optional = spec.startswith("-")
        pattern = spec.removeprefix("-")
        files = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        for name in files:
            if optional and not Path(name).is_file():
                continue
            env.update(read_env_file(Path(name)))
    return env


def exec_argv(unit: Unit, env: Mapping[str, str]) -> list[str]:
    """ExecStart= as systemd turns it into argv: words (quotes as in the shell), then ``${VAR}``
    replaced within a word and a word that is exactly ``$VAR`` split at whitespace."""
    return _argv(one(unit, "Service", "ExecStart"), env)


def exec_argvs(unit: Unit, key: str, env: Mapping[str, str]) -> list[list[str]]:
    """Every command line of a list key (ExecStartPre=, ExecStartPost=, ExecStopPost=)."""
    return [_argv(line, env) for line in unit["Service"].get(key, [])]


def _argv(line: str, env: Mapping[str, str]) -> list[str]:
    assert line[0] not in "-@:+!", f"ExecStart prefixes are not modelled here: {line!r}"
    assert "%" not in line and "\\" not in line, f"specifiers/escapes not modelled: {line!r}"
    argv: list[str] = []
    for word in shlex.split(line):
        lone = _LONE.fullmatch(word)
        if lone:
            argv.extend(env.get(lone.group(1), "").split())
            continue
        word = _BRACED.sub(lambda m: env.get(m.group(1), ""), word)
        assert "$" not in word, f"unbraced variable inside a word is not expanded: {word!r}"
        argv.append(word)
    return argv


def fill_env(path: Path, values: Mapping[str, str]) -> None:
    """Set KEY=VALUE lines of an installed env file, as an operator edits it; every key must
    already be in it (the example names every variable the unit uses), set or commented out
    as ``#KEY=...`` (an optional one: the operator removes the ``#``)."""
    lines = path.read_text().splitlines()
    missing = set(values)
    for commented in (False, True):  # a set line first; else "#KEY=" (no space: not prose)
        for i, line in enumerate(lines):
            if line.startswith("#") != commented or (commented and line[1:2].isspace()):
                continue
            key = line.removeprefix("#").partition("=")[0].strip()
            if key in missing and "=" in line:
                lines[i] = f"{key}={values[key]}"
                missing.discard(key)
    assert not missing, f"{path.name} does not name {sorted(missing)}"
    path.write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------
# the deployment under test


@dataclass
class Deployment:
    root: Path
    units: Path
    confdir: Path
    statedir: Path
    redis_url: str
    passwords: dict[str, str]

    def url(self, role: str) -> str:
        return acl.user_url(self.redis_url, role, self.passwords[role])

    def runtime(self, name: str) -> Path:
        path = self.root / "run" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def command(self, unit: Unit, runtime: Path) -> tuple[list[str], dict[str, str]]:
        creds = load_credentials(unit, self.root / "credentials" / runtime.name)
        env = service_env(unit, runtime, creds)
        return exec_argv(unit, env), env


@pytest.fixture
def deployment(tmp_path: Path, redis_url: str) -> Iterator[Deployment]:
    """deploy/install.py run as an operator runs it (system python), the state directories that
    systemd-tmpfiles would create, and the Redis role users on the test's redis-server."""
    d = Deployment(root=tmp_path, units=tmp_path / "units", confdir=tmp_path / "etc",
                   statedir=tmp_path / "state", redis_url=redis_url,
                   passwords=acl.generate_passwords())
    done = subprocess.run(
        ["/usr/bin/python3", str(INSTALL), "--prefix", str(REPO), "--confdir", str(d.confdir),
         "--statedir", str(d.statedir), "--unitdir", str(d.units),
         "--sysusersdir", str(tmp_path / "sysusers"), "--tmpfilesdir", str(tmp_path / "tmpfiles")],
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    for sub in ("media", "media/queue", "stir", "li-spool", "dialogs"):  # tmpfiles.d
        (d.statedir / sub).mkdir(parents=True)
    admin = redis.Redis.from_url(redis_url)
    acl.apply_users(admin, d.passwords, keep_other_passwords=True)
    try:
        yield d
    finally:
        acl.remove_passwords(admin, d.passwords)
        admin.close()


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def _connected_users(redis_url: str) -> set[str]:
    client = redis.Redis.from_url(redis_url)
    try:
        return {str(c.get("user", "")) for c in client.client_list()}
    finally:
        client.close()


def _assert_no_secret(pids: Sequence[int], password: str) -> None:
    for pid in pids:
        cmdline = " ".join(pid_cmdline(pid) or [])
        assert password not in cmdline, f"pid {pid} shows the Redis password in its argv"


@contextlib.contextmanager
def running(argv: list[str], env: Mapping[str, str], log: Path,
            expect: list[str]) -> Iterator[int]:
    """A Type=exec service: argv started in / with exactly ``env``; stopped by pid."""
    pid = start_process(argv, log, cwd=Path("/"), env=env)
    try:
        yield pid
    finally:
        stop_pid(pid, expect)


@contextlib.contextmanager
def _started(d: Deployment, unit_file: str, configure: Callable[[int], None], proto: str,
             ready: Callable[[int], bool], what: str, timeout: float,
             argv_map: Callable[[str], str] = lambda word: word,
             ) -> Iterator[tuple[int, int, list[str], Path, Path]]:
    """Fill the env file for a free ``proto`` port (``configure(port)``), run the unit's command
    line (each word through ``argv_map``) and wait until ``ready(port)``; yields pid, port, the
    unit's argv (before ``argv_map``), runtime dir and log. A port some other program took since
    free_port() chose it ("Address already in use") is replaced by another one (three tries)."""
    name = unit_file.removesuffix(".service")
    for attempt in range(3):
        port = free_port("127.0.0.1", proto)
        configure(port)
        runtime = d.runtime(name)
        argv, env = d.command(parse_unit(d.units / unit_file), runtime)
        log = d.root / f"{name}-{attempt}.log"
        pid = start_process([argv_map(w) for w in argv], log, cwd=Path("/"), env=env)
        try:
            def settled(p: int = pid, n: int = port) -> bool:
                return ready(n) or not pid_alive(p)

            answered = wait_until(settled, timeout)
            if not pid_alive(pid) and "Address already in use" in _log_tail(log):
                continue
            assert answered and pid_alive(pid), (f"no {what} on 127.0.0.1:{port} within "
                                                 f"{timeout:.0f}s; log:\n{_log_tail(log)}")
            yield pid, port, argv, runtime, log
            return
        finally:
            stop_pid(pid, ["spitwall", str(port)])
    pytest.fail(f"{name}: three free ports were taken before it could bind them")


@contextlib.contextmanager
def answering(d: Deployment, unit_file: str, configure: Callable[[int], None],
              timeout: float) -> Iterator[tuple[int, int, list[str], Path]]:
    """A SIP service up from its unit (200 to OPTIONS); yields pid, port, argv, runtime dir."""
    with _started(d, unit_file, configure, "udp",
                  lambda n: sip_options_ping("127.0.0.1", n, 0.5) == 200,
                  "200 to OPTIONS", timeout) as (pid, port, argv, runtime, _log):
        yield pid, port, argv, runtime


def test_media_service_comes_up_as_the_media_role(deployment: Deployment) -> None:
    d = deployment

    def configure(port: int) -> None:
        fill_env(d.confdir / "media.env", {
            "SPITWALL_REDIS": d.url("media"), "SPITWALL_MEDIA_ADDR": "127.0.0.1",
            "SPITWALL_MEDIA_PORT": str(port), "SPITWALL_MEDIA_RING_MS": "0",
            "SPITWALL_MEDIA_OPTS": "--max-calls 10"})

    # the first start synthesises the prompts (espeak-ng, sox)
    with answering(d, "spitwall-media.service", configure, 90.0) as (pid, port, argv, runtime):
        assert argv[:2] == [str(REPO / ".venv/bin/spitwall"), "media"]
        assert argv[argv.index("--sip-port") + 1] == str(port)
        assert argv[-2:] == ["--max-calls", "10"] and "--redis" not in argv
        _assert_no_secret([pid], d.passwords["media"])
        assert wait_until(lambda: "spitwall-media" in _connected_users(d.redis_url), 5.0)
        assert wait_until((runtime / "stats.json").is_file, 5.0), "no stats file in the runtime dir"
        assert (d.statedir / "media" / "prompts" / "greeting.wav").is_file()
        assert (d.statedir / "media" / "queue").is_dir()
        assert pid_alive(pid)


def test_deliver_service_comes_up_as_the_deliver_role(deployment: Deployment) -> None:
    d = deployment
    proxy = f"127.0.0.1:{free_port('127.0.0.1', 'both')}"

    def configure(port: int) -> None:
        fill_env(d.confdir / "deliver.env", {
            "SPITWALL_REDIS": d.url("deliver"), "SPITWALL_DELIVER_ADDR": "127.0.0.1",
            "SPITWALL_DELIVER_PORT": str(port), "SPITWALL_PROXY": proxy,
            "SPITWALL_DELIVER_OPTS": ""})

    with answering(d, "spitwall-deliver.service", configure, 30.0) as (pid, port, argv, runtime):
        assert argv[:2] == [str(REPO / ".venv/bin/spitwall"), "deliver"]
        assert argv[argv.index("--sip-port") + 1] == str(port)
        assert argv[argv.index("--proxy") + 1] == proxy and "--redis" not in argv
        _assert_no_secret([pid], d.passwords["deliver"])
        assert wait_until(lambda: "spitwall-deliver" in _connected_users(d.redis_url), 5.0)
        stats = runtime / "stats.json"
        assert wait_until(stats.is_file, 5.0), "no stats file in the runtime dir"
        assert isinstance(json.loads(stats.read_text()), dict)


def test_stir_fetch_service_runs_the_loop_as_the_ops_role(deployment: Deployment) -> None:
    d = deployment
    admin = redis.Redis.from_url(d.redis_url)
    try:
        config_admin.set_value(admin, "stir.trust_dir", str(d.statedir / "stir"), user="test")
        admin.lpush(keys.X5U_MISSES, "https://x5u.not-allowed.example/cert.pem")
        fill_env(d.confdir / "stir-fetch.env", {
            "SPITWALL_REDIS": d.url("ops"), "SPITWALL_STIR_OPTS": "--interval 0.2 --timeout 1"})
        unit = parse_unit(d.units / "spitwall-stir-fetch.service")
        argv, env = d.command(unit, d.runtime("spitwall-stir-fetch"))
        assert argv == [str(REPO / ".venv/bin/spitwall"), "stir", "fetch", "--loop",
                        "--interval", "0.2", "--timeout", "1"]
        log = d.root / "stir-fetch.log"
        with running(argv, env, log, ["spitwall", "stir", "fetch"]) as pid:
            # the queued URL is taken (and refused: its host is not allow-listed)
            assert wait_until(lambda: admin.llen(keys.X5U_MISSES) == 0 or not pid_alive(pid),
                              15.0)
            time.sleep(1.0)
            assert pid_alive(pid), f"the fetcher exited; log:\n{_log_tail(log)}"
            assert admin.llen(keys.X5U_MISSES) == 0
            _assert_no_secret([pid], d.passwords["ops"])
            assert "spitwall-ops" in _connected_users(d.redis_url)
        text = log.read_text(errors="replace")
        assert "not on an allow-listed host" in text and "Traceback" not in text, text
    finally:
        admin.close()


# --------------------------------------------------------------------------------------------
# the operator's HTTP services (Type=exec): the exporter and the review page


def _http(port: int, method: str, path: str, headers: Mapping[str, str] | None = None,
          body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request to 127.0.0.1:port; (status, headers, body). Redirects are not followed."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def _up(port: int, path: str) -> bool:
    try:
        _http(port, "GET", path)
    except OSError:
        return False
    return True


@contextlib.contextmanager
def serving(d: Deployment, unit_file: str, configure: Callable[[int], None], probe: str,
            timeout: float, argv_map: Callable[[str], str] = lambda word: word,
            ) -> Iterator[tuple[int, int, list[str], Path]]:
    """An HTTP service up from its unit (``probe`` answers); yields pid, port, argv, log."""
    with _started(d, unit_file, configure, "tcp", lambda n: _up(n, probe),
                  f"HTTP answer at {probe}", timeout, argv_map) as (pid, port, argv, _rt, log):
        yield pid, port, argv, log


def _metric(text: str, series: str) -> float:
    """The value of one series (``name`` or ``name{labels}``) of a Prometheus text page."""
    for line in text.splitlines():
        key, _, value = line.rpartition(" ")
        if key == series:
            return float(value)
    raise AssertionError(f"no {series} in:\n{text}")


def test_metrics_service_exports_as_the_metrics_role(deployment: Deployment) -> None:
    d = deployment
    admin = redis.Redis.from_url(d.redis_url)
    # /run/spitwall-media: the answering machine's RuntimeDirectory= (its unit says so)
    media_unit = parse_unit(d.units / "spitwall-media.service")
    assert one(media_unit, "Service", "RuntimeDirectory") == "spitwall-media"
    media_run = d.runtime("spitwall-media")
    (media_run / "stats.json").write_text(json.dumps({"active_calls": 2, "calls": 7}))

    def under_run(word: str) -> str:  # /run/X stands for the tmp run directory here
        return str(d.root / "run" / word.removeprefix("/run/")) if word.startswith("/run/") \
            else word

    def configure(port: int) -> None:
        fill_env(d.confdir / "metrics.env", {
            "SPITWALL_REDIS": d.url("metrics"), "SPITWALL_METRICS_LISTEN": f"127.0.0.1:{port}",
            "SPITWALL_METRICS_OPTS": ""})

    try:
        admin.hset(keys.STATS, mapping={"action:relay": 5, "action:divert": 2})
        with serving(d, "spitwall-metrics.service", configure, "/metrics", 30.0,
                     argv_map=under_run) as (pid, port, argv, log):
            assert argv[:2] == [str(REPO / ".venv/bin/spitwall"), "metrics"]
            assert argv[argv.index("--listen") + 1] == f"127.0.0.1:{port}"
            assert argv[argv.index("--media-stats") + 1] == "/run/spitwall-media/stats.json"
            assert "--redis" not in argv and "--li-redis" not in argv
            status, headers, body = _http(port, "GET", "/metrics")
            assert status == 200 and headers["content-type"].startswith("text/plain"), headers
            text = body.decode()
            assert _metric(text, "spitwall_redis_up") == 1
            assert _metric(text, 'spitwall_decisions_total{action="relay"}') == 5
            assert _metric(text, 'spitwall_decisions_total{action="divert"}') == 2
            for part in ("stats", "queues", "config"):  # the role may read all it needs
                assert _metric(text, f'spitwall_redis_read_failed{{part="{part}"}}') == 0
            assert _metric(text, "spitwall_media_stats_up") == 1
            assert _metric(text, "spitwall_media_active_calls") == 2
            assert "spitwall_li_" not in text  # no intercept counters unless asked for
            _assert_no_secret([pid], d.passwords["metrics"])
            assert "spitwall-metrics" in _connected_users(d.redis_url)
            assert pid_alive(pid)
        assert "Traceback" not in log.read_text(errors="replace")
    finally:
        admin.close()


def test_review_service_serves_and_marks_as_the_ops_role(deployment: Deployment) -> None:
    d = deployment
    admin = redis.Redis.from_url(d.redis_url)
    # what the answering machine leaves: a recording under the queue dir, indexed in Redis
    queue_dir = d.statedir / "media" / "queue"
    msg = MessageQueue(admin, queue_dir).store(
        "spam", b"\x00\x01" * 800, {"caller": "<sip:+15551230001@198.51.100.7>",
                                     "caller_key": "+15551230001", "source_ip": "198.51.100.7"})
    # the operator's users file: root's, 0600 (the service gets a copy as a credential)
    users = d.confdir / "review.users"
    users.write_text("# operators\nalice:open-sesame-7\n")
    users.chmod(0o600)
    auth = {"Authorization": "Basic " + b64encode(b"alice:open-sesame-7").decode()}

    def configure(port: int) -> None:
        fill_env(d.confdir / "review.env", {
            "SPITWALL_REDIS": d.url("ops"), "SPITWALL_REVIEW_LISTEN": f"127.0.0.1:{port}",
            "SPITWALL_REVIEW_OPTS": ""})

    try:
        with serving(d, "spitwall-review.service", configure, "/", 30.0) as (
                pid, port, argv, log):
            creds = d.root / "credentials" / "spitwall-review"
            assert argv[:2] == [str(REPO / ".venv/bin/spitwall"), "review"]
            assert argv[argv.index("--auth-file") + 1] == str(creds / "review.users")
            assert argv[argv.index("--queue-dir") + 1] == str(queue_dir)
            assert "--no-auth" not in argv and "--redis" not in argv
            assert _http(port, "GET", "/")[0] == 401  # the credential's users are enforced
            status, _headers, body = _http(port, "GET", "/", auth)
            page = body.decode()
            assert status == 200 and f'id="m-{msg.id}"' in page, page[:500]
            status, headers, wav = _http(port, "GET", f"/audio/{msg.id}.wav", auth)
            assert status == 200 and wav.startswith(b"RIFF"), (status, wav[:40])
            csrf = re.search(r'name="csrf" value="([^"]+)"', page)
            assert csrf, page[:500]
            form = f"id={msg.id}&verdict=spam&csrf={csrf.group(1)}".encode()
            status, headers, _ = _http(port, "POST", "/mark", {
                **auth, "Content-Type": "application/x-www-form-urlencoded"}, form)
            assert status == 303, headers
            marked = MessageQueue(admin, queue_dir).get(msg.id).meta
            assert marked["mark"] == "spam" and marked["marked_by"] == "alice (review page)"
            _assert_no_secret([pid], d.passwords["ops"])
            _assert_no_secret([pid], "open-sesame-7")
            assert "spitwall-ops" in _connected_users(d.redis_url)
            assert pid_alive(pid)
        text = log.read_text(errors="replace")
        # the credential (0400, the service user's) passes the "too open" check
        assert "Traceback" not in text and "readable by others" not in text, text
    finally:
        admin.close()


# --------------------------------------------------------------------------------------------
# Kamailio: Debian's kamailio.service with our drop-in (Type=forking, PIDFile=)


def _kamailio_pids(marker: str) -> list[int]:
    """Live processes whose command line contains ``marker`` (our run directory)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and pid_alive(int(entry.name)):
            cmdline = pid_cmdline(int(entry.name)) or []
            if cmdline and "kamailio" in cmdline[0] and marker in " ".join(cmdline):
                pids.append(int(entry.name))
    return pids


def _send_invite(port: int) -> bytes:
    """One initial INVITE to the proxy over UDP; returns its first reply (100 Trying or final)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        lport = int(sock.getsockname()[1])
        call_id = secrets.token_hex(8)
        msg = (f"INVITE sip:+15551230002@127.0.0.1:{port} SIP/2.0\r\n"
               f"Via: SIP/2.0/UDP 127.0.0.1:{lport};branch=z9hG4bK{secrets.token_hex(6)};rport\r\n"
               "Max-Forwards: 70\r\n"
               f"From: <sip:+15551230001@127.0.0.1>;tag={secrets.token_hex(4)}\r\n"
               "To: <sip:+15551230002@127.0.0.1>\r\n"
               f"Call-ID: {call_id}@deploy-test\r\n"
               "CSeq: 1 INVITE\r\n"
               f"Contact: <sip:+15551230001@127.0.0.1:{lport}>\r\n"
               "Content-Length: 0\r\n\r\n")
        sock.sendto(msg.encode(), ("127.0.0.1", port))
        sock.settimeout(5.0)
        return sock.recv(65535)


@contextlib.contextmanager
def dialog_redis(root: Path) -> Iterator[str]:
    """redis-server with deploy/redis/redis-spitwall-dialogs.conf as an operator installs it
    (their password; a free port and tmp dir instead of 6380 and /var/lib/redis; no systemd
    notification); yields the URL for SPITWALL_DIALOG_REDIS. Stopped by pid."""
    secret = secrets.token_hex(12)
    port = free_port("127.0.0.1", "tcp")
    conf = (REPO / "deploy" / "redis" / "redis-spitwall-dialogs.conf").read_text()
    conf = (conf.replace("requirepass CHANGE-ME", f"requirepass {secret}")
            .replace("port 6380", f"port {port}").replace("bind 127.0.0.1 -::1", "bind 127.0.0.1")
            .replace("dir /var/lib/redis", f"dir {root}")
            .replace("supervised systemd", "supervised no"))
    root.mkdir(parents=True, exist_ok=True)
    (root / "redis.conf").write_text(conf)
    url = f"redis://:{secret}@127.0.0.1:{port}/0"
    with running(["/usr/bin/redis-server", str(root / "redis.conf")], dict(os.environ),
                 root / "redis.log", ["redis-server"]):
        assert wait_until(lambda: _ping(url), 10.0), _log_tail(root / "redis.log")
        yield url


def _clients(url: str) -> int:
    """Connections to the dialog Redis besides our own."""
    client = redis.Redis.from_url(url, socket_timeout=2.0)
    try:
        return int(client.info("clients")["connected_clients"]) - 1
    finally:
        client.close()


def _ping(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=0.5).ping())
    except redis.RedisError:
        return False


@pytest.mark.skipif(not DEBIAN_KAMAILIO.is_file() or not KAMAILIO.is_file(),
                    reason="Debian's kamailio package (kamailio.service) is not installed")
@pytest.mark.parametrize("store", ["text", "redis"])
def test_kamailio_with_the_dropin_answers_and_scores_as_the_proxy_role(
    deployment: Deployment, store: str,
) -> None:
    """`store` = redis: proxy.env names a dialog Redis run with the shipped configuration
    (the dialog store that survives a crash); the drop-in writes its table versions and
    Kamailio uses it, the password never on a command line."""
    with contextlib.ExitStack() as stack:
        dialog_url = (stack.enter_context(dialog_redis(deployment.root / "dialog-redis"))
                      if store == "redis" else "")
        _kamailio_with_the_dropin(deployment, dialog_url)


def _kamailio_with_the_dropin(d: Deployment, dialog_url: str) -> None:
    port = free_sip_port("127.0.0.1", "::1")
    fill_env(d.confdir / "proxy.env", {
        "SPITWALL_KAMAILIO_OPTS": "-A SIP_ADDR6=::1",  # dual stack
        "SPITWALL_REDIS": d.url("proxy"), "SPITWALL_SIP_ADDR": "127.0.0.1",
        "SPITWALL_SIP_PORT": str(port), "SPITWALL_CHILDREN": "2", "SPITWALL_TCP_CHILDREN": "1",
        "SPITWALL_LOG_LEVEL": "2",
        "SPITWALL_NEXT_HOP": f"sip:127.0.0.1:{free_port('127.0.0.1', 'udp')}",
        "SPITWALL_MEDIA_URI": "", "SPITWALL_DELIVER_URI": "", "SPITWALL_REDIS_TIMEOUT": "0.2",
        **({"SPITWALL_DIALOG_REDIS": dialog_url} if dialog_url else {})})
    unit = parse_unit(DEBIAN_KAMAILIO, d.units / "kamailio.service.d" / "spitwall.conf")
    assert one(unit, "Service", "Type") == "forking"
    assert one(unit, "Service", "RuntimeDirectory") == "kamailio"
    pidfile = one(unit, "Service", "PIDFile")
    runtime = d.runtime("kamailio")  # stands for /run/kamailio
    argv, env = d.command(unit, runtime)
    # the pid file Kamailio writes is the PIDFile= systemd reads (with /run/kamailio here)
    assert pidfile == "/run/kamailio/kamailio.pid"
    assert argv[argv.index("-P") + 1] == str(runtime / "kamailio.pid")
    assert argv[argv.index("-f") + 1] == str(REPO / "kamailio.cfg")
    assert "REDIS_URL=" in argv and not any("redis://" in a or "rediss://" in a for a in argv)
    assert f'SPITWALL_HANDLER="{REPO}/kemi/handler.py"' in argv
    assert env["SPITWALL_REDIS"] == d.url("proxy")
    dialogs = d.statedir / "dialogs"
    assert f'DIALOG_DB="text://{dialogs}"' in argv

    def run_hooks(key: str, extra: Mapping[str, str] | None = None) -> None:
        for hook in exec_argvs(unit, key, env):
            done = subprocess.run(hook, env={**env, **(extra or {})}, cwd="/",
                                  capture_output=True, text=True, timeout=60, check=False)
            assert done.returncode == 0, f"{key}={hook}: {done.stderr}"

    run_hooks("ExecStartPre")  # the dialog database's tables
    assert sorted(p.name for p in dialogs.iterdir()) == ["dialog", "dialog_vars", "version"]
    if dialog_url:  # the Redis store's table versions, which db_redis checks at start
        assert env["SPITWALL_DIALOG_REDIS"] == dialog_url
        versions = redis.Redis.from_url(dialog_url).hgetall("version:entry::dialog")
        assert versions[b"table_name"] == b"dialog" and versions[b"table_version"].isdigit()
    log = d.root / "kamailio.log"
    with log.open("ab") as out:
        # Type=forking: systemd waits for the first process to exit, then reads PIDFile=
        creator = subprocess.Popen(argv, env=env, cwd="/", stdin=subprocess.DEVNULL,
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rc = creator.wait(timeout=60)
    except subprocess.TimeoutExpired:
        stop_pid(creator.pid, "kamailio")
        creator.wait(timeout=10)
        pytest.fail(f"kamailio did not daemonize within 60 s; log:\n{_log_tail(log)}")
    marker = str(runtime)
    pid = 0
    try:
        assert rc == 0, f"kamailio exited {rc}; log:\n{_log_tail(log)}"
        pid = int((runtime / "kamailio.pid").read_text().strip())
        assert pid_alive(pid)
        run_hooks("ExecStartPost")  # (a DIALOG_DB it cannot open fails Kamailio's start)
        # the creator exits only once the workers listen: OPTIONS is answered at once
        assert sip_options_ping("127.0.0.1", port, 2.0) == 200
        assert sip_options_ping("::1", port, 2.0, src_host="::1") == 200  # SIP_ADDR6
        ctl = runtime / "kamailio_ctl"
        assert ctl.exists(), "the ctl socket is not in the run dir"
        if shutil.which("kamcmd"):  # docs/deployment.md's health check
            uptime = subprocess.run(["kamcmd", "-s", f"unix:{ctl}", "core.uptime"],
                                    capture_output=True, text=True, timeout=10, check=False)
            assert uptime.returncode == 0 and "uptime" in uptime.stdout, uptime
        workers = _kamailio_pids(marker)
        assert pid in workers and len(workers) > 3
        _assert_no_secret(workers, d.passwords["proxy"])
        if dialog_url:  # Kamailio connected to it (db_redis): the password stays in the env
            _assert_no_secret(workers, dialog_url.split("@")[0].rsplit(":", 1)[1])
            assert wait_until(lambda: _clients(dialog_url) >= 1, 10.0)

        reply = _send_invite(port)
        assert reply.startswith(b"SIP/2.0 "), reply[:80]
        assert wait_until(lambda: "spitwall-proxy" in _connected_users(d.redis_url), 10.0)
        # an operator's health check: `spitwall stats` with the ops user counts the call
        stats = subprocess.run(
            [str(REPO / ".venv/bin/spitwall"), "stats", "--json"], capture_output=True,
            text=True, timeout=30, check=False,
            env={**os.environ, "SPITWALL_REDIS": d.url("ops")})
        assert stats.returncode == 0, stats.stderr
        assert sum(json.loads(stats.stdout).values()) > 0, stats.stdout
    finally:
        if pid:
            with contextlib.suppress(ProcessLookupError):
                stop_pid(pid, ["kamailio", marker])
        left = []
        if not wait_until(lambda: not _kamailio_pids(marker), 10.0):
            left = _kamailio_pids(marker)
            for worker in left:  # each verified by its command line
                stop_pid(worker, ["kamailio", marker], 5.0)
        assert not left, f"kamailio processes left after stopping the main pid: {left}"
    # systemd runs ExecStopPost= with SERVICE_RESULT=success after a clean stop
    run_hooks("ExecStopPost", {"SERVICE_RESULT": "success"})
    assert (dialogs / ".clean-stop").exists()

