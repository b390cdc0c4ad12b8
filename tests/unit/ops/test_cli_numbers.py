"""`spitwall numbers`: the number database from the command line, against a real redis-server."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from scoring import keys
from tests.redis_replies import str_entries

Result = tuple[int, str, str]
Run = Callable[..., Result]


def test_import_turns_the_lookup_on_then_check_count_export(
    run: Run, r: redis.Redis, tmp_path: Path
) -> None:
    feed = tmp_path / "dno.txt"
    feed.write_text("# inbound-only lines\n+18005550199,bank IVR\n+1 800 555 0100\n\n")
    rc, out, err = run("numbers", "import", "dno", str(feed), "--reason", "registry")
    assert (rc, err) == (0, "")
    assert out == "imported 2 numbers into the dno number list; numbers.lookup turned on\n"
    assert r.hget(keys.CONFIG, "numbers.lookup") == "true"
    rc, out, _ = run("numbers", "check", "+18005550100", "--json")
    assert json.loads(out)["dno"]["reason"] == "registry"
    rc, out, _ = run("numbers", "import", "dno", str(feed), "--json", "--reason", "registry")
    data = json.loads(out)
    assert rc == 0 and data["imported"] == 2 and data["lookup_turned_on"] is False
    rc, out, _ = run("numbers", "check", "+18005550100")
    assert out.startswith("dno    +18005550100")
    rc, out, _ = run("numbers", "count", "--json")
    assert json.loads(out) == {"allow": 0, "block": 0, "dno": 2}
    rc, out, _ = run("numbers", "export", "dno", str(tmp_path / "out.txt"))
    assert rc == 0 and out == f"exported 2 numbers to {tmp_path / 'out.txt'}\n"
    assert (tmp_path / "out.txt").read_text() == "+18005550100,registry\n+18005550199,bank IVR\n"
    actions = [e["action"] for _id, e in str_entries(r.xrange(keys.AUDIT))]
    assert actions == ["import dno", "set", "import dno"]


def test_import_replace_removes_what_the_feed_no_longer_has(
    run: Run, r: redis.Redis, tmp_path: Path
) -> None:
    feed = tmp_path / "dno.txt"
    feed.write_text("+18005550100\n+18005550101\n+18005550102\n")
    assert run("numbers", "import", "dno", str(feed))[0] == 0
    feed.write_text("+18005550101\n+18005550103\n")
    rc, out, err = run("numbers", "import", "dno", str(feed), "--replace")
    assert (rc, err) == (0, "")
    assert out == "imported 2 numbers into the dno number list, removed 2 not in the file\n"
    rc, out, _ = run("numbers", "import", "dno", str(feed), "--replace", "--json")
    assert json.loads(out)["removed"] == 0
    run("numbers", "export", "dno", str(tmp_path / "out.txt"))
    assert (tmp_path / "out.txt").read_text() == "+18005550101\n+18005550103\n"
    # a bad line in the feed: nothing is written, nothing removed
    feed.write_text("+18005550101\nnot a number\n")
    rc, _out, err = run("numbers", "import", "dno", str(feed), "--replace")
    assert rc != 0 and "dno.txt:2" in err
    assert json.loads(run("numbers", "count", "--json")[1])["dno"] == 2


def test_add_remove_clear(run: Run, r: redis.Redis) -> None:
    rc, out, _ = run("numbers", "add", "block", "+15550100666", "--ttl", "60")
    assert rc == 0 and out.startswith("added +15550100666 to the block number list until ")
    assert 0 < r.ttl(keys.number_key("+15550100666", "block")) <= 60
    rc, out, err = run("numbers", "remove", "block", "+15550100667")
    assert (rc, out) == (1, "") and err == ("spitwall: error: +15550100667 is not on the block "
                                            "number list\n")
    assert run("numbers", "remove", "block", "+15550100666")[0] == 0
    run("numbers", "add", "allow", "+15550100001")
    rc, out, _ = run("numbers", "clear", "allow")
    assert (rc, out) == (0, "removed 1 numbers from the allow number list\n")
    assert run("numbers", "check", "+15550100001")[1] == "+15550100001 is on no number list\n"


@pytest.mark.parametrize("argv, message", [
    (("numbers", "import", "scanner", "x"), "invalid choice: 'scanner'"),
    (("numbers", "add", "block", "alice"), "not a phone number: 'alice'"),
    (("numbers", "add", "block", "+15550100", "--ttl", "-5"), "--ttl"),
    (("numbers", "import", "block", "/nonexistent/feed.txt"), "cannot read /nonexistent"),
    (("numbers", "check", "++1"), "not a phone number"),
])
def test_bad_input_is_one_line_and_changes_nothing(
    run: Run, r: redis.Redis, argv: tuple[str, ...], message: str
) -> None:
    rc, out, err = run(*argv)
    assert rc == 2 and out == "" and err.count("\n") == 1 and message in err, err
    assert r.dbsize() == 0


def test_a_bad_line_anywhere_imports_nothing(run: Run, r: redis.Redis, tmp_path: Path) -> None:
    feed = tmp_path / "feed.txt"
    feed.write_text("".join(f"+1555010{i:04d}\n" for i in range(5000)) + "+1555-CALL-NOW\n")
    rc, _out, err = run("numbers", "import", "block", str(feed))
    assert rc == 2 and err == (f"spitwall: error: {feed}:5001: not a phone number: "
                               "'+1555-CALL-NOW'\n")
    assert r.dbsize() == 0
