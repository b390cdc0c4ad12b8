"""The lab runner against real redis-server and Kamailio (kamailio.cfg) on loopback.

Covers the Python API the other integration tests build on (the ``lab`` fixtures) and the
``spitwall lab`` command line, run as ``python -m ops.lab`` (the same ``register`` that
``spitwall`` mounts, with the same top-level --redis/--json options).
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ops import lab as lab_module
from ops.lab import Lab, LabError
from ops.procs import (
    free_port,
    pid_alive,
    pid_cmdline,
    redis_ping,
    sip_options_ping,
    start_process,
    stop_pid,
    stop_pid_cleanly,
    wait_until,
)

# Fixture types (conftest is not importable as a module under pytest's default import mode).
LabFactory = Callable[..., Lab]
RedisServer = Any

pytestmark = pytest.mark.integration


def _options(lab: Lab) -> int | None:
    assert lab.state is not None
    return sip_options_ping(lab.state.sip_addr, lab.state.sip_port, timeout=2)


def _group_gone(pgid: int) -> bool:
    """No live process left in the group (Kamailio's workers share the main pid's group)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                return False
    return True


# ---------------------------------------------------------------------------------------------
# Python API


def test_lab_fixture_is_up_and_answers(lab: Lab, redis_server: RedisServer) -> None:
    state = lab.state
    assert state is not None
    assert _options(lab) == 200
    assert state.redis_url == redis_server.url
    assert not state.own_redis
    # media: the answering machine; deliver: the intercept delivery worker
    assert list(state.pids) == ["kamailio", "media", "deliver"]
    kamailio = state.pids["kamailio"]
    assert pid_alive(kamailio)
    assert str(lab.workdir) in " ".join(pid_cmdline(kamailio) or [])
    saved = json.loads(lab.state_path.read_text())
    assert saved["sip_port"] == state.sip_port
    assert saved["pids"] == {"kamailio": kamailio, "media": state.pids["media"],
                             "deliver": state.pids["deliver"]}
    assert Path(state.logs["kamailio"]).is_file()
    rows = lab.status()
    assert rows is not None
    assert [(r.name, r.alive, r.answering) for r in rows] == [
        ("redis", True, True),
        ("kamailio", True, True),
        ("media", True, True),
        ("deliver", True, True),
    ]


def test_lab_passes_defines_to_kamailio(lab_factory: LabFactory) -> None:
    lab = lab_factory(next_hop="sip:127.0.0.1:5999", media_port=5998, children=1)
    state = lab.state
    assert state is not None
    assert state.next_hop == "sip:127.0.0.1:5999"
    assert state.media_uri == "sip:spitwall-am@127.0.0.1:5998"
    argv = pid_cmdline(state.pids["kamailio"]) or []
    defines = {argv[i + 1] for i, arg in enumerate(argv) if arg == "-A"}
    assert {
        f"SIP_ADDR={state.sip_addr}",
        f"SIP_PORT={state.sip_port}",
        f"REDIS_URL={state.redis_url}",
        "NEXT_HOP=sip:127.0.0.1:5999",
        "MEDIA_URI=sip:spitwall-am@127.0.0.1:5998",
        "CHILDREN=1",
        f"SPITWALL_ROOT={lab_module.REPO_ROOT}",
    } <= defines
    assert "-DD" in argv and "-E" in argv
    assert argv[argv.index("-x") + 1] == "tlsf"  # the memory manager we measured and deploy
    assert _options(lab) == 200


def test_media_uri_diverts_elsewhere_and_the_answering_machine_still_runs(
        lab_factory: LabFactory) -> None:
    """A test's own UAS as MEDIA_URI: the lab's answering machine runs on a port of its own
    (it used to be started on the UAS' port, fail to bind and die unnoticed)."""
    lab = lab_factory(media_uri="sip:spitwall-am@127.0.0.1:5997", children=1)
    state = lab.state
    assert state is not None
    assert state.media_uri == "sip:spitwall-am@127.0.0.1:5997"
    assert state.media_port not in (0, 5997)
    argv = pid_cmdline(state.pids["kamailio"]) or []
    assert "MEDIA_URI=sip:spitwall-am@127.0.0.1:5997" in argv
    media = pid_cmdline(state.pids["media"]) or []
    assert str(state.media_port) in media
    rows = lab.status()
    assert rows is not None
    assert ("media", True, True) in [(r.name, r.alive, r.answering) for r in rows]
    with pytest.raises(LabError, match="sip: or sips:"):
        Lab(lab.workdir.parent / "other").up(media_uri="http://x", redis_url=state.redis_url)


def test_down_stops_exactly_the_lab(lab_factory: LabFactory) -> None:
    first, second = lab_factory(), lab_factory()
    assert first.state is not None and second.state is not None
    kamailio = first.state.pids["kamailio"]
    addr, port = first.state.sip_addr, first.state.sip_port
    state, warnings = first.down()
    assert state is not None and warnings == []
    assert not pid_alive(kamailio)
    assert wait_until(lambda: _group_gone(kamailio), 5)
    assert not first.state_path.exists()
    assert sip_options_ping(addr, port, 0.5) is None
    # the other lab is untouched
    assert _options(second) == 200
    assert first.down() == (None, [])
    assert first.status() is None


def test_up_refuses_when_already_up(lab: Lab) -> None:
    assert lab.state is not None
    again = Lab(lab.workdir, lab.kamailio_cfg)
    with pytest.raises(LabError, match="already up"):
        again.up(redis_url=lab.state.redis_url)
    assert _options(lab) == 200


def test_up_replaces_stale_state(lab_factory: LabFactory) -> None:
    lab = lab_factory()
    assert lab.state is not None
    stop_pid(lab.state.pids["kamailio"], "kamailio")
    stop_pid(lab.state.pids["media"], "media.server")
    stop_pid(lab.state.pids["deliver"], "intercept.deliver")
    rows = lab.status()
    assert rows is not None and not all(r.ok for r in rows)
    state = lab.up(redis_url=lab.state.redis_url, children=1)
    assert sip_options_ping(state.sip_addr, state.sip_port, 2) == 200


def test_own_redis_started_and_stopped_in_order(
    tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    lab = Lab(tmp_path / "own", Path(request.config.getoption("--kamailio-cfg")))
    try:
        state = lab.up(children=1)
        assert state.own_redis
        assert list(state.pids) == ["redis", "kamailio", "media", "deliver"]
        host_port = state.redis_url.removeprefix("redis://").removesuffix("/0")
        host, port = host_port.rsplit(":", 1)
        assert redis_ping(host, int(port))
        assert "redis-server" in " ".join(pid_cmdline(state.pids["redis"]) or [])
        assert (lab.workdir / "redis.log").is_file()

        stopped: list[str] = []

        def recording(real: Callable[..., bool]) -> Callable[..., bool]:
            def stop(pid: int, expect: str | list[str], timeout: float = 10.0) -> bool:
                stopped.append(next(n for n, p in state.pids.items() if p == pid))
                return real(pid, expect, timeout)
            return stop

        # Kamailio is stopped by stop_pid_cleanly (a clean stop marks its dialog database)
        monkeypatch.setattr(lab_module, "stop_pid", recording(stop_pid))
        monkeypatch.setattr(lab_module, "stop_pid_cleanly", recording(stop_pid_cleanly))
        lab.down()
        assert stopped == ["deliver", "media", "kamailio", "redis"]
        assert not redis_ping(host, int(port), 0.5)
        assert not any(pid_alive(pid) for pid in state.pids.values())
    finally:
        monkeypatch.undo()
        lab.down()


def test_down_leaves_reused_pid_alone(lab: Lab, tmp_path: Path) -> None:
    # Simulate pid reuse: lab.json names a pid that now runs something else.
    stranger = start_process(
        [sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "stranger.log"
    )
    try:
        assert lab.state is not None
        real_kamailio = lab.state.pids["kamailio"]
        data = json.loads(lab.state_path.read_text())
        data["pids"]["kamailio"] = stranger
        lab.state_path.write_text(json.dumps(data))
        rows = lab.status()
        assert rows is not None
        assert [(r.name, r.alive) for r in rows] == [("redis", True), ("kamailio", False),
                                                     ("media", True), ("deliver", True)]
        state, warnings = lab.down()
        assert state is not None
        assert pid_alive(stranger)
        assert len(warnings) == 1 and "not signalling" in warnings[0]
        assert not lab.state_path.exists()
    finally:
        stop_pid(stranger, sys.executable, 5)
        stop_pid(real_kamailio, "kamailio", 10)


def test_broken_config_fails_cleanly(tmp_path: Path, redis_url: str) -> None:
    cfg = tmp_path / "broken.cfg"
    cfg.write_text('#!KAMAILIO\nlisten=udp:SIP_ADDR:SIP_PORT\nloadmodule "no_such_module.so"\n')
    lab = Lab(tmp_path / "broken", cfg)
    with pytest.raises(LabError, match="exited during start-up") as caught:
        lab.up(redis_url=redis_url)
    assert any("no_such_module" in line for line in caught.value.log_tail)
    assert not lab.state_path.exists()
    assert lab.status() is None


def test_unreachable_redis_is_refused(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    lab = Lab(tmp_path / "noredis", Path(request.config.getoption("--kamailio-cfg")))
    with pytest.raises(LabError, match="does not answer PING"):
        lab.up(redis_url="redis://127.0.0.1:1/0")
    assert not lab.state_path.exists()


def test_redis_server_fixture_restarts(redis_server: RedisServer, redis_url: str) -> None:
    port = redis_server.port
    redis_server.stop()
    assert not redis_ping(redis_server.host, port, 0.5)
    redis_server.start()
    assert redis_server.port == port
    assert redis_ping(redis_server.host, port)


# ---------------------------------------------------------------------------------------------
# command line


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ops.lab", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=lab_module.REPO_ROOT,
    )


def test_cli_up_status_down(tmp_path: Path, redis_url: str, request: pytest.FixtureRequest) -> None:
    workdir = str(tmp_path / "cli")
    cfg = request.config.getoption("--kamailio-cfg")
    up = _cli("--redis", redis_url, "--json", "lab", "up", "--workdir", workdir,
              "--kamailio-cfg", cfg, "--children", "1")  # fmt: skip
    try:
        assert up.returncode == 0, up.stderr
        state = json.loads(up.stdout)
        assert state["redis_url"] == redis_url
        assert sip_options_ping(state["sip_addr"], state["sip_port"], 2) == 200

        status = _cli("lab", "status", "--workdir", workdir, "--json")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["up"] is True

        text = _cli("lab", "status", "--workdir", workdir)
        assert text.returncode == 0 and "kamailio" in text.stdout

        restarted = _cli("lab", "restart-proxy", "--workdir", workdir, "--json")
        assert restarted.returncode == 0, restarted.stderr
        new_pid = json.loads(restarted.stdout)["kamailio"]
        assert new_pid != state["pids"]["kamailio"] and pid_alive(new_pid)
        assert not pid_alive(state["pids"]["kamailio"])
        assert sip_options_ping(state["sip_addr"], state["sip_port"], 2) == 200  # same port
        assert not (Path(workdir) / "dialogs" / ".clean-stop").exists()  # used up
        state["pids"]["kamailio"] = new_pid

        again = _cli("--redis", redis_url, "lab", "up", "--workdir", workdir, "--kamailio-cfg", cfg)
        assert again.returncode == 1
        assert again.stderr.strip().count("\n") == 0
        assert "already up" in again.stderr and "Traceback" not in again.stderr
    finally:
        down = _cli("lab", "down", "--workdir", workdir)
    assert down.returncode == 0, down.stderr
    assert "stopped deliver" in down.stdout and "media (pid" in down.stdout
    assert "kamailio (pid" in down.stdout
    assert not pid_alive(state["pids"]["kamailio"])

    status = _cli("lab", "status", "--workdir", workdir)
    assert status.returncode == 1
    assert "no lab is up" in status.stdout
    nothing = _cli("lab", "down", "--workdir", workdir)
    assert nothing.returncode == 0 and "no lab is up" in nothing.stdout
    missing = _cli("lab", "restart-proxy", "--workdir", workdir)
    assert missing.returncode == 1 and "no lab with a Kamailio is up" in missing.stderr


def test_cli_status_exits_1_when_kamailio_died(lab: Lab) -> None:
    assert lab.state is not None
    stop_pid(lab.state.pids["kamailio"], "kamailio")
    status = _cli("lab", "status", "--workdir", str(lab.workdir))
    assert status.returncode == 1
    assert "DEAD" in status.stdout


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    workdir = str(tmp_path / "err")
    bad_hop = _cli("lab", "up", "--workdir", workdir, "--next-hop", "nonsense")
    assert bad_hop.returncode == 1
    assert bad_hop.stderr.strip() == (
        "spitwall lab up: error: --next-hop must look like sip:HOST:PORT, not 'nonsense'"
    )
    bad_port = _cli("lab", "up", "--workdir", workdir, "--sip-port", "70000")
    assert bad_port.returncode == 2
    assert bad_port.stderr.strip().splitlines()[-1].endswith("port out of range 1-65535: 70000")
    assert "Traceback" not in bad_port.stderr
    long_dialogs = _cli("lab", "up", "--workdir", workdir, "--dialog-timeout", "90000")
    assert long_dialogs.returncode == 1
    assert long_dialogs.stderr.strip() == ("spitwall lab up: error: --dialog-timeout must be "
                                           "between 1 and 86400 seconds, not 90000")
    no_dialogs = _cli("lab", "up", "--workdir", workdir, "--dialog-timeout", "0")
    assert no_dialogs.returncode == 2 and "must be at least 1" in no_dialogs.stderr
    period = _cli("lab", "up", "--workdir", workdir, "--dialog-db-period", "5")
    assert period.returncode == 1
    assert period.stderr.strip() == ("spitwall lab up: error: --dialog-db-period is for "
                                     "--dialog-store redis (the text store is written at a "
                                     "clean stop)")
    store = _cli("lab", "up", "--workdir", workdir, "--dialog-store", "mysql")
    assert store.returncode == 2 and "invalid choice: 'mysql'" in store.stderr


def test_cli_broken_config_prints_log_tail(tmp_path: Path, redis_url: str) -> None:
    cfg = tmp_path / "broken.cfg"
    cfg.write_text('#!KAMAILIO\nlisten=udp:SIP_ADDR:SIP_PORT\nloadmodule "no_such_module.so"\n')
    result = _cli("--redis", redis_url, "lab", "up", "--workdir", str(tmp_path / "b"),
                  "--kamailio-cfg", str(cfg))  # fmt: skip
    assert result.returncode == 1
    assert "no_such_module" in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("spitwall lab up: error: kamailio on 127.0.0.1:")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("lab", [{"next_hop": "sip:127.0.0.1:5997", "children": 1}], indirect=True)
def test_lab_fixture_indirect_parameters(lab: Lab) -> None:
    assert lab.state is not None
    assert lab.state.next_hop == "sip:127.0.0.1:5997"
    assert lab.state.children == 1
    assert _options(lab) == 200


@pytest.mark.parametrize("proto, loser", [("tcp", "redis"), ("both", "kamailio"), ("udp", "media")])
def test_up_starts_again_when_a_server_loses_its_picked_port(
    proto: str, loser: str, tmp_path: Path, request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """A picked port is a probe: another socket can take it before the server binds it. The
    first port picked for ``proto`` is handed out while a socket of ours holds it; `up` must
    notice the server's "Address already in use", stop what it started and start again."""
    kind = socket.SOCK_DGRAM if proto != "tcp" else socket.SOCK_STREAM
    squatter = socket.socket(socket.AF_INET, kind)
    squatter.bind(("127.0.0.1", 0))
    if kind == socket.SOCK_STREAM:
        squatter.listen()
    taken: int = squatter.getsockname()[1]
    handed: list[int] = []

    def picked_port(host: str = "127.0.0.1", want: str = "udp") -> int:
        if want == proto and not handed:
            handed.append(taken)
            return taken
        return free_port(host, want)

    monkeypatch.setattr(lab_module, "free_port", picked_port)
    lab = Lab(tmp_path / "race", Path(request.config.getoption("--kamailio-cfg")))
    try:
        with caplog.at_level(logging.WARNING, logger=lab_module.__name__):
            state = lab.up(children=1)
        records = caplog.records
        assert handed == [taken]
        assert taken not in (state.sip_port, state.media_port)
        assert f"127.0.0.1:{taken}/" not in state.redis_url
        assert sip_options_ping(state.sip_addr, state.sip_port, 2) == 200
        assert any(loser in r.getMessage() and "starting again" in r.getMessage()
                   for r in records), [r.getMessage() for r in records]
        assert all(pid_alive(pid) for pid in state.pids.values())
    finally:
        lab.down()
        squatter.close()
