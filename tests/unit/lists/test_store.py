"""lists.store.ListStore against a real redis-server: changes, versions, audit, import/export."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from lists.model import LIST_NAMES
from lists.store import EXPORT_VERSION, ListStore, load_lists
from scoring import keys
from tests.redis_replies import bytes_entries


@pytest.fixture
def ls(r: redis.Redis) -> ListStore:
    return ListStore(r)


def _audit(r: redis.Redis) -> list[dict[str, str]]:
    return [{k.decode(): v.decode() for k, v in f.items()}
            for _id, f in bytes_entries(r.xrange(keys.AUDIT))]


def _snapshot(r: redis.Redis) -> dict[str, Any]:
    """Everything a list change may touch."""
    return {
        "lists": {n: r.hgetall(keys.list_key(n)) for n in ("allow", "block", "scanner")},
        "version": r.get(keys.LISTS_VERSION),
        "audit": r.xlen(keys.AUDIT),
    }


# ---------------------------------------------------------------------------------------------
# add, remove, show


def test_add_stores_normalised_bumps_version_and_audits(ls: ListStore, r: redis.Redis) -> None:
    e = ls.add("block", "cidr", "192.0.2.77/24", reason="abuse", user="alice")
    assert (e.kind, e.value, e.reason, e.by, e.expires) == ("cidr", "192.0.2.0/24", "abuse",
                                                             "alice", 0.0)
    assert abs(e.added - time.time()) < 5
    assert r.hkeys(keys.list_key("block")) == [b"cidr:192.0.2.0/24"]
    assert r.get(keys.LISTS_VERSION) == b"1"
    [a] = _audit(r)
    assert (a["user"], a["what"], a["action"], a["key"]) == ("alice", "list", "add block",
                                                             "cidr:192.0.2.0/24")
    assert a["old"] == ""
    assert json.loads(a["new"])["reason"] == "abuse"


def test_add_again_records_the_old_entry(ls: ListStore, r: redis.Redis) -> None:
    ls.add("allow", "ip", "192.0.2.1", reason="first", user="a")
    ls.add("allow", "ip", "192.0.2.1", reason="second", user="b")
    assert r.hlen(keys.list_key("allow")) == 1
    last = _audit(r)[-1]
    assert json.loads(last["old"])["reason"] == "first"
    assert json.loads(last["new"])["reason"] == "second"
    assert r.get(keys.LISTS_VERSION) == b"2"


def test_add_with_ttl(ls: ListStore) -> None:
    e = ls.add("block", "ip", "192.0.2.1", ttl=60, user="u")
    assert 59 <= e.expires - e.added <= 61
    assert [x.value for x in ls.show("block")] == ["192.0.2.1"]


@pytest.mark.parametrize(("args", "kw", "message"), [
    (("blocklist", "ip", "192.0.2.1"), {}, "unknown list"),
    (("block", "email", "a@b.c"), {}, "unknown list kind"),
    (("block", "ip", "999.0.0.1"), {}, "not an IP address"),
    (("block", "ip", "192.0.2.1"), {"ttl": 0}, "--ttl"),
    (("block", "ip", "192.0.2.1"), {"ttl": -5}, "--ttl"),
    (("block", "ip", "192.0.2.1"), {"ttl": 11 * 365 * 86400}, "--ttl"),
    (("block", "ip", "192.0.2.1"), {"reason": "x" * 201}, "--reason"),
    (("block", "ip", "192.0.2.1"), {"reason": "evil\r\nline"}, "--reason"),
])
def test_invalid_add_changes_nothing(ls: ListStore, r: redis.Redis, args: tuple[str, ...],
                                     kw: dict[str, Any], message: str) -> None:
    ls.add("allow", "ip", "198.51.100.1", user="u")
    before = _snapshot(r)
    with pytest.raises(ValueError, match=message):
        ls.add(*args, user="u", **kw)
    assert _snapshot(r) == before


def test_remove(ls: ListStore, r: redis.Redis) -> None:
    ls.add("block", "uri", "sip:Spam@Example.com", user="u")
    assert ls.remove("block", "uri", "spam@example.com", user="bob") is True
    assert r.hlen(keys.list_key("block")) == 0
    assert r.get(keys.LISTS_VERSION) == b"2"
    a = _audit(r)[-1]
    assert (a["user"], a["action"], a["key"], a["new"]) == ("bob", "remove block",
                                                            "uri:spam@example.com", "")
    assert json.loads(a["old"])["value"] == "spam@example.com"


def test_remove_absent_changes_nothing(ls: ListStore, r: redis.Redis) -> None:
    ls.add("block", "ip", "192.0.2.1", user="u")
    before = _snapshot(r)
    assert ls.remove("block", "ip", "192.0.2.2", user="u") is False
    assert ls.remove("allow", "ip", "192.0.2.1", user="u") is False
    assert _snapshot(r) == before


def test_show_sorted_filtered_and_without_expired(ls: ListStore, r: redis.Redis) -> None:
    ls.add("block", "ip", "192.0.2.9", user="u")
    ls.add("block", "domain", "spam.example", user="u")
    ls.add("block", "ip", "192.0.2.1", user="u")
    ls.add("allow", "ip", "198.51.100.1", user="u")
    ls.add("block", "ip", "192.0.2.5", ttl=0.05, user="u")
    time.sleep(0.1)
    shown = ls.show("block")
    assert [(e.kind, e.value) for e in shown] == [("domain", "spam.example"),
                                                  ("ip", "192.0.2.1"), ("ip", "192.0.2.9")]
    assert [e.value for e in ls.show("block", "domain")] == ["spam.example"]
    assert [e.value for e in ls.show("allow")] == ["198.51.100.1"]
    with pytest.raises(ValueError, match="unknown list"):
        ls.show("nope")


def test_load_lists_skips_unreadable_records(ls: ListStore, r: redis.Redis) -> None:
    ls.add("block", "ip", "192.0.2.1", user="u")
    r.hset(keys.list_key("block"), "garbage", b"\xc1")
    r.hset(keys.list_key("block"), "ip:192.0.2.2", b"not msgpack \xc1")
    data = load_lists(r)
    assert [e.value for e in data["block"]] == ["192.0.2.1"]
    assert data["allow"] == [] and data["scanner"] == []


# ---------------------------------------------------------------------------------------------
# export and import


def _fill(ls: ListStore) -> None:
    ls.add("allow", "ip", "198.51.100.1", reason="pbx", user="alice")
    ls.add("allow", "number", "+1 555 0100", user="alice")
    ls.add("block", "cidr", "2001:db8::/32", reason="abuse", ttl=3600, user="bob")
    ls.add("block", "uri", "spam@example.com", user="bob")
    ls.add("block", "domain", "spam.example", user="bob")
    ls.add("scanner", "ua", "evil-dialer*", user="carol")
    ls.add("block", "country", "xx", user="bob")


def test_export_import_round_trip(ls: ListStore, r: redis.Redis, tmp_path: Path) -> None:
    _fill(ls)
    ls.add("block", "ip", "192.0.2.99", ttl=0.05, user="u")  # expired before the export
    time.sleep(0.1)
    before = {n: ls.show(n) for n in ("allow", "block", "scanner")}
    path = tmp_path / "lists.json"
    assert ls.export(path) == 7
    doc = json.loads(path.read_text())
    assert doc["version"] == EXPORT_VERSION
    assert set(doc["lists"]) == set(LIST_NAMES)

    r.flushall()
    assert ls.import_file(path, user="dave") == 7
    after = {n: ls.show(n) for n in ("allow", "block", "scanner")}
    assert after == before  # kinds, values, reasons, added, expires and authors survive
    assert r.get(keys.LISTS_VERSION) == b"1"
    [a] = _audit(r)
    assert (a["user"], a["action"], a["key"], a["new"]) == ("dave", "import", str(path),
                                                            "7 entries")


def test_export_to_unwritable_path_raises_oserror(ls: ListStore, tmp_path: Path) -> None:
    with pytest.raises(OSError):
        ls.export(tmp_path / "missing-dir" / "x.json")


def _write(tmp_path: Path, doc: Any) -> Path:
    p = tmp_path / "import.json"
    p.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return p


GOOD = {"kind": "ip", "value": "203.0.113.1"}


@pytest.mark.parametrize(("doc", "message"), [
    ("{not json", "cannot read"),
    ([], "not a spitwall list export"),
    ({"version": 2, "lists": {}}, "not a spitwall list export"),
    ({"version": 1}, "missing 'lists'"),
    ({"version": 1, "lists": []}, "missing 'lists'"),
    ({"version": 1, "lists": {"nope": []}}, "unknown list 'nope'"),
    ({"version": 1, "lists": {"block": {}}}, "is not an array"),
    ({"version": 1, "lists": {"block": [GOOD, "x"]}}, r"block\[1\]: not an object"),
    ({"version": 1, "lists": {"block": [GOOD, {"value": "1.2.3.4"}]}}, "missing 'kind'"),
    ({"version": 1, "lists": {"block": [GOOD, {"kind": "ip"}]}}, "missing 'value'"),
    ({"version": 1, "lists": {"block": [GOOD, {"kind": "ip", "value": "1.2.3"}]}},
     r"block\[1\]: not an IP address"),
    ({"version": 1, "lists": {"allow": [GOOD], "block": [{"kind": "mac", "value": "x"}]}},
     "unknown list kind"),
    ({"version": 1, "lists": {"block": [dict(GOOD, expires="soon")]}},
     "expires must be a number"),
])
def test_bad_import_changes_nothing(ls: ListStore, r: redis.Redis, tmp_path: Path, doc: Any,
                                    message: str) -> None:
    _fill(ls)
    before = _snapshot(r)
    with pytest.raises(ValueError, match=message):
        ls.import_file(_write(tmp_path, doc), user="u")
    assert _snapshot(r) == before


def test_import_of_missing_file(ls: ListStore, r: redis.Redis, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read"):
        ls.import_file(tmp_path / "nope.json", user="u")
    assert r.keys("*") == []


def test_import_of_non_utf8_file(ls: ListStore, r: redis.Redis, tmp_path: Path) -> None:
    p = tmp_path / "bin.json"
    p.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match="cannot read"):
        ls.import_file(p, user="u")
    assert r.keys("*") == []


@pytest.mark.parametrize("added", [[1], {"a": 1}])
def test_import_wrong_type_is_a_value_error(ls: ListStore, r: redis.Redis, tmp_path: Path,
                                            added: Any) -> None:
    doc = {"version": 1, "lists": {"block": [dict(GOOD, added=added)]}}
    with pytest.raises(ValueError):
        ls.import_file(_write(tmp_path, doc), user="u")


def test_import_normalises_and_fills_defaults(ls: ListStore, tmp_path: Path) -> None:
    doc = {"version": 1, "lists": {"block": [{"kind": "cidr", "value": "10.1.2.3/8"},
                                             {"kind": "uri", "value": "sip:Bob@X.org",
                                              "reason": "r" * 500}]}}
    assert ls.import_file(_write(tmp_path, doc), user="erin") == 2
    shown = {e.value: e for e in ls.show("block")}
    assert set(shown) == {"10.0.0.0/8", "bob@x.org"}
    assert shown["10.0.0.0/8"].by == "erin"
    assert shown["10.0.0.0/8"].added > 0
    assert len(shown["bob@x.org"].reason) == 200


def test_import_empty_lists(ls: ListStore, r: redis.Redis, tmp_path: Path) -> None:
    assert ls.import_file(_write(tmp_path, {"version": 1, "lists": {}}), user="u") == 0
    assert r.get(keys.LISTS_VERSION) == b"1"


def test_import_refuses_or_cleans_control_characters(ls: ListStore, tmp_path: Path) -> None:
    doc = {"version": 1, "lists": {"block": [dict(GOOD, reason="x\r\nfake line\x1b[2J")]}}
    try:
        ls.import_file(_write(tmp_path, doc), user="u")
    except ValueError:
        return
    for e in ls.show("block"):
        assert not any(ord(c) < 32 for c in e.reason + e.by)
