"""Fixtures of the `spitwall` CLI tests: the CLI run in-process against the test's Redis."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import redis

from ops import cli

Result = tuple[int, str, str]
Run = Callable[..., Result]


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str], redis_url: str,
        monkeypatch: pytest.MonkeyPatch) -> Run:
    """run(*argv) -> (exit code, stdout, stderr); `--redis URL` is appended unless given."""
    monkeypatch.delenv("SPITWALL_REDIS", raising=False)

    def _run(*argv: str, redis_arg: bool = True) -> Result:
        args = [*argv, "--redis", redis_url] if redis_arg and "--redis" not in argv else [*argv]
        capsys.readouterr()
        try:
            rc = cli.main(args)
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 1
        out, err = capsys.readouterr()
        return rc, out, err

    return _run
