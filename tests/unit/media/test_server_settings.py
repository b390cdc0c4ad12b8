"""media.server settings: the ring delay (`--ring-ms`, `$SPITWALL_MEDIA_RING_MS`) is checked
before anything starts. The ring itself is tested end to end in
tests/integration/test_media_cancel.py."""

from __future__ import annotations

import pytest

from media.server import MAX_RING_MS, Settings, main


def test_ring_delay_bounds() -> None:
    assert Settings().ring_ms == 0  # answer at once, as before
    assert Settings(ring_ms=MAX_RING_MS).ring_ms == MAX_RING_MS
    for bad in (-1, MAX_RING_MS + 1):
        with pytest.raises(ValueError, match="ring_ms"):
            Settings(ring_ms=bad)


@pytest.mark.parametrize("argv,env", [
    (["--ring-ms", "abc"], None), (["--ring-ms", "-5"], None), ([], "soon"), ([], "999999"),
])
def test_bad_ring_delay_stops_the_server_before_it_starts(
        argv: list[str], env: str | None, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    if env is not None:
        monkeypatch.setenv("SPITWALL_MEDIA_RING_MS", env)
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--redis", "redis://127.0.0.1:1/0"])
    assert exc.value.code == 2
    assert "ring" in capsys.readouterr().err
