"""`intercept.deliver.replay` on a real redis-server, and the command line's refusals."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from intercept import names
from intercept.deliver import main, replay
from tests.redis_replies import bytes_entries


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    r = redis.Redis.from_url(redis_url)
    yield r
    r.close()


def _dead(client: redis.Redis, n: int) -> list[bytes]:
    ids = []
    for i in range(n):
        client.xadd(names.DEAD, {"v": "1", "id": f"e{i}", "liid": "L", "dest": "subscribe",
                                 "body": bytes([0, 255, i]), "error": "503", "attempts": "8"})
        ids.append(f"e{i}".encode())
    return ids


def test_replay_moves_oldest_first_and_strips_dead_fields(client: redis.Redis) -> None:
    ids = _dead(client, 5)
    assert replay(client, 2) == 2
    assert client.xlen(names.DEAD) == 3
    moved = bytes_entries(client.xrange(names.EVENTS))
    assert [f[b"id"] for _sid, f in moved] == ids[:2]
    assert moved[0][1] == {b"v": b"1", b"id": b"e0", b"liid": b"L", b"dest": b"subscribe",
                           b"body": bytes([0, 255, 0])}
    assert replay(client, None) == 3
    assert client.xlen(names.DEAD) == 0
    assert [f[b"id"] for _sid, f in bytes_entries(client.xrange(names.EVENTS))] == ids
    assert replay(client, None) == 0
    assert replay(client, 0) == 0


def test_replay_many(client: redis.Redis) -> None:
    _dead(client, 250)
    assert replay(client) == 250
    assert client.xlen(names.EVENTS) == 250 and client.xlen(names.DEAD) == 0


def test_replay_rejects_negative(client: redis.Redis) -> None:
    with pytest.raises(ValueError):
        replay(client, -1)


def test_replay_command(client: redis.Redis, redis_url: str,
                        capsys: pytest.CaptureFixture[str]) -> None:
    _dead(client, 3)
    assert main(["replay", "--redis", redis_url, "--count", "2"]) == 0
    assert capsys.readouterr().out.strip() == "2"
    assert client.xlen(names.DEAD) == 1


@pytest.mark.parametrize("argv", [
    ["--proxy", "kamailio.example:5060"], ["--max-attempts", "0"], ["--claim-idle", "-1"],
    ["--window", "x"],
])
def test_bad_arguments_exit_non_zero(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


def test_inconsistent_settings_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--expires-min", "100", "--expires-max", "50"]) == 2
    assert "expires" in capsys.readouterr().err
