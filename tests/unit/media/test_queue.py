"""The spam and voicemail queues against a real redis-server and a real directory."""

from __future__ import annotations

import wave
from pathlib import Path

import pytest
import redis

from media.queue import MessageQueue, QueueFull, index_key, meta_key
from ops.cli import main

PCM = b"\x01\x00\xff\xff" * 4000  # 1 s at 8 kHz


@pytest.fixture
def q(redis_url: str, tmp_path: Path) -> MessageQueue:
    return MessageQueue(redis.Redis.from_url(redis_url), tmp_path / "queue", max_items=5,
                        min_free_bytes=0)


def test_store_writes_a_complete_wav_then_indexes_it(q: MessageQueue) -> None:
    m = q.store("spam", PCM, {"caller": "sip:bot@x", "verdict": "bot"})
    assert m.path.exists() and not list(m.path.parent.glob("*.part"))
    with wave.open(str(m.path)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (8000, 1, 2)
        assert w.readframes(w.getnframes()) == PCM
    got = q.get(m.id)
    assert got.meta["caller"] == "sip:bot@x" and got.meta["seconds"] == 1.0
    assert [x.id for x in q.list("spam")] == [m.id]
    assert list(q.list("voicemail")) == []


def test_queue_is_bounded_oldest_go_with_their_files(q: MessageQueue) -> None:
    made = [q.store("spam", PCM, {"n": i}) for i in range(8)]
    kept = [m.id for m in q.list("spam", limit=100)]
    assert len(kept) == 5 and set(kept) == {m.id for m in made[3:]}
    assert all(not m.path.exists() for m in made[:3])
    assert q.client.hlen(meta_key("spam")) == 5 == q.client.zcard(index_key("spam"))


def test_full_disk_refuses_and_writes_nothing(redis_url: str, tmp_path: Path) -> None:
    q = MessageQueue(redis.Redis.from_url(redis_url), tmp_path / "q", min_free_bytes=1 << 62)
    with pytest.raises(QueueFull):
        q.store("spam", PCM, {})
    assert list((tmp_path / "q" / "spam").iterdir()) == []
    assert list(q.list()) == []


def test_partial_files_are_cleaned(q: MessageQueue) -> None:
    d = q.dir / "spam"
    d.mkdir(parents=True)
    (d / "123-abcd.wav.part").write_bytes(b"RIFF")
    assert q.clean_partial() == 1
    assert not list(d.glob("*.part"))


def test_mark_export_and_bad_ids(q: MessageQueue, tmp_path: Path) -> None:
    m = q.store("voicemail", PCM, {"caller": "alice"})
    assert q.mark(m.id, "ham").meta["mark"] == "ham"
    out = q.export(m.id, tmp_path)
    assert out.read_bytes() == m.path.read_bytes()
    for bad in ("../../etc/passwd", "", "x" * 100):
        with pytest.raises(ValueError):
            q.get(bad)
    with pytest.raises(ValueError):
        q.mark(m.id, "maybe")


def test_cli_queue_list_mark_export(q: MessageQueue, redis_url: str, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    m = q.store("spam", PCM, {"caller": "sip:bot@x", "caller_key": "tel:4155550100",
                              "source_ip": "192.0.2.7", "verdict": "bot"})
    assert main(["--redis", redis_url, "queue", "list", "--json"]) == 0
    assert m.id in capsys.readouterr().out
    assert main(["--redis", redis_url, "queue", "mark", m.id, "spam"]) == 0
    rep = q.client.hget("spitwall:{caller:tel:4155550100}:rep", "s")
    assert rep is not None and float(rep) > 0.5
    assert main(["--redis", redis_url, "queue", "export", m.id, str(tmp_path / "x.wav")]) == 0
    assert (tmp_path / "x.wav").exists()
    capsys.readouterr()
    assert main(["--redis", redis_url, "queue", "mark", "nope", "spam"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
