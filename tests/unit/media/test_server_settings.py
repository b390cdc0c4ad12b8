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


def test_rtp_address_follows_the_offers_family() -> None:
    v4 = Settings(sip_addr="127.0.0.1")
    assert v4.rtp_addrs == ("127.0.0.1",)
    assert v4.rtp_addr_for("127.0.0.9") == "127.0.0.1"
    assert v4.rtp_addr_for("::1") is None  # IPv6 caller, no IPv6 address: the server says 488
    assert v4.rtp_addr_for("media.example.net") == "127.0.0.1"  # a name: the first address
    dual = Settings(sip_addr="127.0.0.1", rtp_addrs=("127.0.0.1", "::1"))
    assert dual.rtp_addr_for("::1") == "::1" and dual.rtp_addr_for("127.0.0.9") == "127.0.0.1"
    assert dual.rtp_addr_for("::ffff:127.0.0.9") == "::1"  # an IPv6 address all the same
    assert Settings(sip_addr="::1").rtp_addr_for("::1") == "::1"


@pytest.mark.parametrize("addrs", [("127.0.0.1", "127.0.0.2"), ("::1", "::1"), ("nowhere",),
                                   ("127.0.0.1", "")])
def test_bad_rtp_addresses_are_refused(addrs: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match=r"RTP address|one RTP address per"):
        Settings(rtp_addrs=addrs)


def test_bad_rtp_address_stops_the_server_before_it_starts(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--rtp-addr", "not-an-ip", "--redis", "redis://127.0.0.1:1/0"])
    assert exc.value.code == 2
    assert "RTP address" in capsys.readouterr().err
