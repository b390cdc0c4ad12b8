"""Kamailio's dialog table on disk, so that calls in progress survive a proxy restart.

Kamailio's dialog module keeps the dialogs spitwall tracks (call-duration feedback, and for an
intercept target's call the case's dialog marker, `$dlg_var(sw_li)`) in shared memory. Without
a database a restart forgets them: the BYE of a call that was up before the restart matches no
dialog, so its duration is not fed back and a target's call gets no Release (and no events of
its later re-INVITEs). kamailio.cfg therefore takes a ``DIALOG_DB`` define (a ``text://`` URL):
the dialog module writes its dialogs and their variables there once, at a clean shutdown, and
reads them at start (``db_mode`` 3: nothing per call). The database is a directory of db_text
tables; this module makes one from the table definitions Kamailio ships (so they match the
installed Kamailio's table versions), and leaves existing tables alone (they hold the dialogs
of the last shutdown).

Only a clean shutdown writes the tables, so after a crash they still hold the dialogs of the
shutdown before, long ended: loaded again, each would end once more at its timeout (a second
Release, a bogus hours-long call in the caller's reputation). Whoever stops Kamailio cleanly
therefore leaves a marker (`mark_clean`: the lab, or the systemd drop-in's ExecStopPost when
``$SERVICE_RESULT`` is ``success``), and `prepare` empties tables that have no marker: after a
crash the calls that were up are forgotten, as without the database, never revived.

    python -m ops.dialogdb DIRECTORY            before Kamailio starts (ExecStartPre, lab)
    python -m ops.dialogdb --started DIRECTORY  once it runs (ExecStartPost, lab)
    python -m ops.dialogdb --stopped DIRECTORY  after it stopped (ExecStopPost, lab)
    python -m ops.dialogdb --redis URL          the Redis store's table versions (below)
    python -m ops.dialogdb --redis-env          the same for $SPITWALL_DIALOG_REDIS, when set
                                                (ExecStartPre)

**Dialogs that survive a crash too: the Redis store.** With ``DIALOG_REDIS`` (a
``redis://HOST:PORT/DB`` URL; kamailio-redis-modules' db_redis) the dialog module writes new and
changed dialogs every ``DIALOG_DB_PERIOD`` seconds from its timer (``db_mode`` 2: nothing in
the INVITE's path) and removes a written dialog when its BYE passes (one round trip in that
worker). A crash then loses only the dialogs younger than the period; the Redis must be this
proxy's own (dialog ids are per Kamailio instance), on its host (the BYE's removal waits for
it), with append-only persistence (it must outlive a crash of Kamailio and of itself). Calls
that ended while the proxy was down are revived with the rest and end at their timeout, which
gives no duration feedback and an intercept ``Release`` with reason ``dialog timeout``.
`prepare_redis` writes the table versions db_redis checks at start (idempotent), and refuses a
Redis holding spitwall's shared state (db_redis' keys have no ``spitwall:`` prefix, no hash tag).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from scoring import keys

#: where Debian's kamailio package installs the db_text table definitions
SCHEMA_DIR = Path("/usr/share/kamailio/dbtext/kamailio")
#: ... and kamailio-redis-modules the db_redis ones (columns line, then the table version)
REDIS_SCHEMA_DIR = Path("/usr/share/kamailio/db_redis/kamailio")
TABLES = ("dialog", "dialog_vars")
#: left by a clean stop (`mark_clean`), taken by the next `prepare`
CLEAN_MARKER = ".clean-stop"


class DialogDbError(Exception):
    """The directory cannot be made or the table definitions are missing."""


def url(directory: Path) -> str:
    """The db_url of the dialog module for `directory` (absolute)."""
    return f"text://{directory.resolve()}"


def mark_clean(directory: Path) -> None:
    """Kamailio stopped cleanly: its dialogs in `directory` are current (see module doc)."""
    try:
        (directory / CLEAN_MARKER).touch(mode=0o600)
    except OSError as exc:
        raise DialogDbError(f"cannot mark {directory} as cleanly stopped: {exc}") from exc


def started(directory: Path) -> None:
    """Kamailio started and read the tables: the clean-stop marker is used up (a crash of
    this run must not pass for a clean stop). Kept until then, so that a start that fails
    does not cost the dialogs."""
    try:
        (directory / CLEAN_MARKER).unlink(missing_ok=True)
    except OSError as exc:
        raise DialogDbError(f"cannot remove {directory / CLEAN_MARKER}: {exc}") from exc


def _drop_rows(path: Path) -> int:
    """Keep only the header line of a db_text table; returns how many rows were dropped."""
    lines = path.read_text().splitlines()
    rows = [line for line in lines[1:] if line.strip()]
    if rows:
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(lines[0] + "\n")
        os.replace(tmp, path)
    return len(rows)


def prepare(directory: Path, schema_dir: Path = SCHEMA_DIR) -> list[str]:
    """Make `directory` a db_text database with the dialog tables (0700; tables 0600).
    Existing tables are kept when the last stop was clean (`mark_clean`), emptied otherwise.
    Returns what it did, one line per file."""
    try:
        version_lines = (schema_dir / "version").read_text().splitlines()
        schemas = {name: (schema_dir / name).read_text() for name in TABLES}
    except OSError as exc:
        raise DialogDbError(f"Kamailio's db_text table definitions are missing ({exc}); "
                            "is the kamailio package installed?") from exc
    if not version_lines:
        raise DialogDbError(f"{schema_dir / 'version'} is empty")
    rows = [line for line in version_lines[1:] if line.split(":")[1:2] and
            line.split(":")[1] in TABLES]
    if len(rows) != len(TABLES):
        raise DialogDbError(f"{schema_dir / 'version'} has no version of {', '.join(TABLES)}")
    done: list[str] = []
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        marker = directory / CLEAN_MARKER
        clean = marker.exists()
        files = {"version": "\n".join([version_lines[0], *rows]) + "\n", **schemas}
        for name, text in files.items():
            path = directory / name
            if path.exists():
                if not clean and name in TABLES:
                    dropped = _drop_rows(path)
                    if dropped:
                        done.append(f"{name}: dropped {dropped} rows (the last stop was not "
                                    "clean: they may have ended since)")
                continue
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(text if text.endswith("\n") else text + "\n")
            done.append(f"{name}: created")
    except OSError as exc:
        raise DialogDbError(f"cannot prepare {directory}: {exc}") from exc
    return done


def check_redis_url(url: str) -> str:
    """``redis://[:PASSWORD@]HOST:PORT/DB`` as db_redis reads it; `DialogDbError` otherwise
    (db_redis speaks neither TLS, nor Sentinel, nor ACL user names)."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme != "redis" or not parts.hostname or port is None or parts.username \
            or not re.fullmatch(r"/\d{1,2}", parts.path or "") or parts.query or parts.fragment:
        raise DialogDbError("the dialog Redis must be a redis://[:PASSWORD@]HOST:PORT/DB URL "
                            f"(db_redis: no TLS, Sentinel or user names), not {_redacted(url)!r}")
    return url


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@", 1)[:200]
    return url[:200]


def redis_versions(schema_dir: Path = REDIS_SCHEMA_DIR) -> dict[str, int]:
    """Table -> version of the dialog tables, from the db_redis schema files."""
    versions: dict[str, int] = {}
    for name in TABLES:
        try:
            lines = (schema_dir / name).read_text().splitlines()
        except OSError as exc:
            raise DialogDbError(f"db_redis table definitions are missing ({exc}); is the "
                                "kamailio-redis-modules package installed?") from exc
        if len(lines) < 2 or not lines[1].strip().isdigit():
            raise DialogDbError(f"{schema_dir / name}: no table version on its second line")
        versions[name] = int(lines[1])
    return versions


def prepare_redis(url: str, schema_dir: Path = REDIS_SCHEMA_DIR,
                  timeout: float = 2.0) -> list[str]:
    """Write the dialog tables' versions into the dialog Redis (db_redis' ``version`` table:
    ``version:entry::<table>``), as the dialog module checks them at start. Idempotent;
    the dialogs there are kept (that is the point). Returns what it wrote."""
    import redis

    check_redis_url(url)
    versions = redis_versions(schema_dir)
    client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        # db_redis' keys have neither the spitwall: prefix nor hash tags: they must not land
        # in the shared Redis (DESIGN.md's key contract), so refuse one that holds ours
        _cursor, ours = client.scan(0, match=f"{keys.PREFIX}:*", count=1000)
        if ours or client.exists(keys.CONFIG_VERSION, keys.LISTS_VERSION, keys.STATS):
            raise DialogDbError(f"{_redacted(url)} holds spitwall's shared state: the dialog "
                                "store must be a Redis of its own (the proxy's, on its host)")
        pipe = client.pipeline(transaction=True)
        for name, version in versions.items():
            pipe.hset(f"version:entry::{name}",
                      mapping={"table_name": name, "table_version": version})
        pipe.execute()
    except redis.RedisError as exc:
        raise DialogDbError(f"cannot write the dialog table versions to "
                            f"{_redacted(url)}: {exc}") from exc
    finally:
        client.close()
    return [f"{name}: version {version}" for name, version in versions.items()]


#: the environment variable kamailio.cfg reads the Redis store's URL from (#!trydefenvs)
REDIS_ENV = "SPITWALL_DIALOG_REDIS"


def redis_from_env(env: Mapping[str, str]) -> str | None:
    """The Redis store's URL from ``env`` (None: not set, the db_text store is used).
    `DialogDbError` when it is set but empty: kamailio.cfg would then define DIALOG_REDIS as
    an empty URL and fail to start, so the line must go."""
    if REDIS_ENV not in env:
        return None
    url = env[REDIS_ENV].strip()
    if not url:
        raise DialogDbError(f"{REDIS_ENV} is set but empty: remove the line (db_text store) "
                            "or give the dialog Redis's URL")
    return check_redis_url(url)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["--redis-env"]:
        try:
            url = redis_from_env(os.environ)
            if url is None:
                print(f"{REDIS_ENV} not set: dialogs go to the db_text store")
                return 0
            done = prepare_redis(url)
        except DialogDbError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"{_redacted(url)}: " + "; ".join(done))
        return 0
    step = args.pop(0) if args and args[0] in ("--started", "--stopped", "--redis") else ""
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m ops.dialogdb [--started|--stopped] DIRECTORY\n"
              "       python -m ops.dialogdb --redis URL | --redis-env", file=sys.stderr)
        return 2
    if step == "--redis":
        try:
            done = prepare_redis(args[0])
        except DialogDbError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"{_redacted(args[0])}: " + "; ".join(done))
        return 0
    directory = Path(args[0])
    try:
        if step == "--started":
            started(directory)
            return 0
        if step == "--stopped":
            # systemd's ExecStopPost: SERVICE_RESULT is "success" after a clean stop
            result = os.environ.get("SERVICE_RESULT", "success")
            if result == "success":
                mark_clean(directory)
            print(f"{directory}: stop {'clean' if result == 'success' else 'not clean'} "
                  f"({result})")
            return 0
        done = prepare(directory)
    except DialogDbError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{directory}: " + ("; ".join(done) if done else "ready"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
