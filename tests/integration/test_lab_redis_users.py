"""The lab's Redis role users: created with fresh passwords, used by Kamailio and the answering
machine through the environment (never argv), enough for real calls, removed again at `down`."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.exceptions import NoPermissionError

from intercept import acl, names
from ops.lab import Lab
from ops.procs import pid_cmdline
from ops.sipp import run_uac, start_uas
from tests.integration.helpers import rows, spitwall

pytestmark = pytest.mark.integration


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(x.decode().split("=", 1) for x in raw.split(b"\0") if b"=" in x)


def _users_of_clients(url: str) -> set[str]:
    c = redis.Redis.from_url(url, decode_responses=True)
    try:
        return {str(x.get("user")) for x in c.client_list()}
    finally:
        c.close()


def test_own_redis_lab_runs_each_process_as_its_user(tmp_path: Path,
                                                     request: pytest.FixtureRequest) -> None:
    lab = Lab(tmp_path / "users", Path(request.config.getoption("--kamailio-cfg")))
    hop = start_uas("127.0.0.1")
    try:
        state = lab.up(children=1, next_hop=f"sip:127.0.0.1:{hop.port}")
        assert state.own_redis and state.users_file
        users_file = Path(state.users_file)
        assert stat.S_IMODE(users_file.stat().st_mode) == 0o600
        urls = json.loads(users_file.read_text())
        assert set(urls) == set(acl.ROLES)
        assert urls["proxy"].startswith("redis://spitwall-proxy:")
        passwords = {role: str(redis.Redis.from_url(u).connection_pool.connection_kwargs
                               ["password"]) for role, u in urls.items()}
        assert len(set(passwords.values())) == len(acl.ROLES)

        # no password on any command line; the URL is in the (owner-only) environment
        for name, pid in state.pids.items():
            argv = " ".join(pid_cmdline(pid) or [])
            assert not any(pw in argv for pw in passwords.values()), name
        kamailio = state.pids["kamailio"]
        assert "REDIS_URL= " in " ".join(pid_cmdline(kamailio) or []) + " "
        assert _environ(kamailio)["SPITWALL_REDIS"] == urls["proxy"]
        assert _environ(state.pids["media"])["SPITWALL_REDIS"] == urls["media"]
        assert "--redis" not in (pid_cmdline(state.pids["media"]) or [])

        # real calls go through with the proxy user; nothing failed open or errored
        res = run_uac(state.sip_addr, state.sip_port, "127.0.7.1", 3, 5, rows(3))
        assert res.count(200) == 3, res.summary()
        assert {"spitwall-proxy", "spitwall-media"} <= _users_of_clients(state.redis_url)
        stats = spitwall("stats", "--json", redis_url=urls["ops"])
        assert stats.returncode == 0, stats.stderr
        counters = json.loads(stats.stdout)
        assert counters.get("action:relay", 0) >= 3
        assert not any(k.startswith(("kemi_error", "redis_unavailable")) for k in counters)

        # the roles hold: ops cannot see intercept state, the admin can provision
        ops = redis.Redis.from_url(urls["ops"])
        with pytest.raises(NoPermissionError):
            ops.exists(names.TARGETS)
        ops.close()
        out = spitwall("recorder", "allow", "192.0.2.7", redis_url=urls["li-admin"])
        assert out.returncode == 0, out.stderr
        refused = spitwall("recorder", "list", redis_url=urls["ops"])
        assert refused.returncode == 1 and "ACL" in refused.stderr
        # the default user still works (tests and lab tooling use it)
        assert redis.Redis.from_url(state.redis_url).ping()
    finally:
        lab.down()
        hop.close()
    assert not (tmp_path / "users" / "redis-users.json").exists()


def test_shared_redis_labs_keep_their_own_passwords(lab_factory: Any) -> None:
    hop = start_uas("127.0.0.1")
    try:
        first = lab_factory(children=1, redis_users=True)
        second = lab_factory(children=1, redis_users=True, next_hop=f"sip:127.0.0.1:{hop.port}")
        assert first.state is not None and second.state is not None
        assert first.state.users_shared and second.state.users_shared
        a, b = first.state.url_for("proxy"), second.state.url_for("proxy")
        assert a != b
        for url in (a, b):
            assert redis.Redis.from_url(url).ping()
        first.down()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(a).ping()
        assert redis.Redis.from_url(b).ping()  # the other lab is untouched
        state = second.state
        res = run_uac(state.sip_addr, state.sip_port, "127.0.7.2", 2, 5, rows(2))
        assert res.count(200) == 2, res.summary()
        assert "spitwall-proxy" in _users_of_clients(state.redis_url)
    finally:
        hop.close()
