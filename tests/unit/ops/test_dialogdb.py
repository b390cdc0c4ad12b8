"""ops.dialogdb: the dialog module's db_text directory, kept after a clean stop only, and the
Redis store's table versions (against a real redis-server)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import redis

from ops import dialogdb
from ops.procs import free_port

ROW = "1:1665:11589:call-1@example:sip\\:alice@example:tag1\n"


def _rows(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines()[1:] if line.strip()]


def test_prepare_makes_the_tables_from_kamailios_definitions(tmp_path: Path) -> None:
    db = tmp_path / "dialogs"
    done = dialogdb.prepare(db)
    assert sorted(done) == ["dialog: created", "dialog_vars: created", "version: created"]
    assert stat.S_IMODE(db.stat().st_mode) == 0o700
    for name in ("version", "dialog", "dialog_vars"):
        assert stat.S_IMODE((db / name).stat().st_mode) == 0o600
    version = (db / "version").read_text().splitlines()
    assert version[0] == (dialogdb.SCHEMA_DIR / "version").read_text().splitlines()[0]
    assert sorted(line.split(":")[1] for line in version[1:]) == ["dialog", "dialog_vars"]
    assert (db / "dialog").read_text() == (dialogdb.SCHEMA_DIR / "dialog").read_text()
    assert dialogdb.url(db) == f"text://{db.resolve()}"


def test_tables_of_a_clean_stop_are_kept_until_the_next_start(tmp_path: Path) -> None:
    db = tmp_path / "dialogs"
    dialogdb.prepare(db)
    with (db / "dialog").open("a") as f:
        f.write(ROW)  # what Kamailio wrote at its shutdown
    dialogdb.mark_clean(db)
    assert dialogdb.prepare(db) == []
    assert _rows(db / "dialog") == [ROW.strip()]
    # a start that fails leaves the marker: the next attempt still keeps the dialogs
    assert dialogdb.prepare(db) == []
    assert _rows(db / "dialog") == [ROW.strip()]
    dialogdb.started(db)
    assert not (db / dialogdb.CLEAN_MARKER).exists()


def test_tables_left_by_a_crash_are_emptied(tmp_path: Path) -> None:
    db = tmp_path / "dialogs"
    dialogdb.prepare(db)
    header = (db / "dialog").read_text().splitlines()[0]
    with (db / "dialog").open("a") as f:
        f.write(ROW)
    with (db / "dialog_vars").open("a") as f:
        f.write("1:1665:11589:sw:0|192.0.2.1|alice@example\n")
    dialogdb.started(db)  # this run then dies without writing (no marker)
    done = dialogdb.prepare(db)
    assert sorted(d.split(":")[0] for d in done) == ["dialog", "dialog_vars"]
    assert all("dropped 1 rows" in d for d in done)
    assert _rows(db / "dialog") == [] and _rows(db / "dialog_vars") == []
    assert (db / "dialog").read_text() == header + "\n"
    assert stat.S_IMODE((db / "dialog").stat().st_mode) == 0o600


def test_missing_definitions_are_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(dialogdb.DialogDbError, match="definitions are missing"):
        dialogdb.prepare(tmp_path / "dialogs", schema_dir=tmp_path / "nowhere")
    schema = tmp_path / "schema"
    schema.mkdir()
    for name in ("dialog", "dialog_vars"):
        (schema / name).write_text("id(int,auto)\n")
    (schema / "version").write_text("id(int,auto) table_name(string) table_version(int)\n"
                                    "0:dialog:7\n")
    with pytest.raises(dialogdb.DialogDbError, match="no version of"):
        dialogdb.prepare(tmp_path / "dialogs", schema_dir=schema)


def test_unwritable_directory_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(dialogdb.DialogDbError, match="cannot prepare"):
        dialogdb.prepare(blocker / "dialogs")


def test_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                     capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "dialogs"
    assert dialogdb.main([str(db)]) == 0
    assert "created" in capsys.readouterr().out
    monkeypatch.setenv("SERVICE_RESULT", "signal")  # systemd: killed
    assert dialogdb.main(["--stopped", str(db)]) == 0
    assert "not clean" in capsys.readouterr().out
    assert not (db / dialogdb.CLEAN_MARKER).exists()
    monkeypatch.setenv("SERVICE_RESULT", "success")
    assert dialogdb.main(["--stopped", str(db)]) == 0
    assert (db / dialogdb.CLEAN_MARKER).exists()
    assert dialogdb.main(["--started", str(db)]) == 0
    assert not (db / dialogdb.CLEAN_MARKER).exists()
    for bad in ([], ["--bogus", str(db)], [str(db), str(db)], ["--stopped"]):
        assert dialogdb.main(bad) == 2
    assert "usage" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert dialogdb.main([str(blocker / "dialogs")]) == 1
    assert capsys.readouterr().err.startswith("error: cannot prepare")


# -- the Redis store (db_redis) ---------------------------------------------------------------


def test_prepare_redis_writes_the_table_versions(r: redis.Redis, redis_url: str) -> None:
    r.hset("dialog:entry::1:2", mapping={"callid": "c1"})  # a dialog of the last run: kept
    done = dialogdb.prepare_redis(redis_url)
    shipped = dialogdb.redis_versions()
    assert done == [f"{name}: version {v}" for name, v in shipped.items()]
    for name, version in shipped.items():
        row = r.hgetall(f"version:entry::{name}")
        assert row == {"table_name": name, "table_version": str(version)}
    assert dialogdb.prepare_redis(redis_url) == done  # idempotent
    assert r.hget("dialog:entry::1:2", "callid") == "c1"
    # the versions are the ones kamailio-redis-modules ships (line 2 of each schema file)
    assert shipped["dialog"] == int(
        (dialogdb.REDIS_SCHEMA_DIR / "dialog").read_text().splitlines()[1])


@pytest.mark.parametrize("url", [
    "rediss://127.0.0.1:6380/0", "redis+sentinel://h:26379/m", "redis://user:pw@127.0.0.1:1/0",
    "redis://127.0.0.1/0", "redis://127.0.0.1:6380", "redis://127.0.0.1:6380/x",
    "redis://127.0.0.1:99999/0", "unix:///run/redis.sock", "",
])
def test_redis_urls_db_redis_cannot_use_are_refused(url: str) -> None:
    with pytest.raises(dialogdb.DialogDbError, match="redis://"):
        dialogdb.check_redis_url(url)


def test_redis_url_errors_do_not_show_the_password(tmp_path: Path) -> None:
    with pytest.raises(dialogdb.DialogDbError) as err:
        dialogdb.check_redis_url("redis://:s3cret@127.0.0.1/0")
    assert "s3cret" not in str(err.value) and ":***@" in str(err.value)
    assert dialogdb.check_redis_url("redis://:s3cret@127.0.0.1:6380/0")
    with pytest.raises(dialogdb.DialogDbError, match="kamailio-redis-modules"):
        dialogdb.redis_versions(tmp_path)
    # a Redis that does not answer: a clear error, not a traceback
    with pytest.raises(dialogdb.DialogDbError, match="cannot write") as err:
        dialogdb.prepare_redis(f"redis://:s3cret@127.0.0.1:{free_port('127.0.0.1', 'tcp')}/0",
                               timeout=0.5)
    assert "s3cret" not in str(err.value)


def test_redis_env_for_systemd(redis_url: str, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    assert dialogdb.redis_from_env({}) is None
    with pytest.raises(dialogdb.DialogDbError, match="set but empty"):
        dialogdb.redis_from_env({dialogdb.REDIS_ENV: " "})
    monkeypatch.delenv(dialogdb.REDIS_ENV, raising=False)
    assert dialogdb.main(["--redis-env"]) == 0
    assert "not set" in capsys.readouterr().out
    monkeypatch.setenv(dialogdb.REDIS_ENV, "")
    assert dialogdb.main(["--redis-env"]) == 1
    assert "remove the line" in capsys.readouterr().err
    monkeypatch.setenv(dialogdb.REDIS_ENV, redis_url)
    assert dialogdb.main(["--redis-env"]) == 0
    assert "dialog: version" in capsys.readouterr().out
    assert dialogdb.main(["--redis", redis_url]) == 0
    assert dialogdb.main(["--redis", "rediss://x:1/0"]) == 1
    assert dialogdb.main(["--redis"]) == 2


def test_the_shared_redis_is_refused_as_dialog_store(r: redis.Redis, redis_url: str) -> None:
    """db_redis' keys carry no spitwall: prefix nor hash tag: not in spitwall's own Redis."""
    from scoring import keys

    r.set(keys.CONFIG_VERSION, 3)
    with pytest.raises(dialogdb.DialogDbError, match="a Redis of its own"):
        dialogdb.prepare_redis(redis_url)
    assert not r.exists("version:entry::dialog")
    r.delete(keys.CONFIG_VERSION)
    r.set("spitwall:{ip:192.0.2.1}:inv:10:1", 1)  # any key of ours
    with pytest.raises(dialogdb.DialogDbError, match="a Redis of its own"):
        dialogdb.prepare_redis(redis_url)
