"""deploy/: the systemd unit templates and their installer (deploy/install.py).

The units are rendered into a temp dir with the repository as @PREFIX@ (so the ExecStart paths
exist: the repository's .venv) and checked with `systemd-analyze verify`, which works offline:
no running systemd is needed. The Kamailio drop-in is verified merged with a copy of Debian's
kamailio.service placed next to it (verify reads NAME.service.d/ beside the unit it is given).
The sysusers.d and tmpfiles.d files are applied to a scratch root with `systemd-sysusers
--root` and `systemd-tmpfiles --root`. Running the units' command lines is
tests/integration/test_deploy_units.py.
"""

from __future__ import annotations

import re
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from deploy import install
from ops import review as review_page

REPO = Path(__file__).resolve().parents[3]
DEBIAN_KAMAILIO = Path("/lib/systemd/system/kamailio.service")
#: env file -> the Redis ACL role (intercept/acl.py) whose user it must name
ENV_ROLES = {"proxy.env": "proxy", "media.env": "media", "deliver.env": "deliver",
             "stir-fetch.env": "ops", "metrics.env": "metrics", "review.env": "ops"}
#: variables systemd itself provides to the units' command lines
SYSTEMD_VARS = {"RUNTIME_DIRECTORY", "CREDENTIALS_DIRECTORY"}
#: service -> its system user (deploy/sysusers.d/spitwall.conf)
SERVICE_USERS = {"spitwall-media.service": "spitwall-media",
                 "spitwall-deliver.service": "spitwall-deliver",
                 "spitwall-stir-fetch.service": "spitwall-stir",
                 "spitwall-metrics.service": "spitwall-metrics",
                 "spitwall-review.service": "spitwall-review"}

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze is not installed")


@dataclass
class Rendered:
    root: Path
    units: Path
    confdir: Path
    statedir: Path
    sysusers: Path
    tmpfiles: Path
    out: str

    def args(self) -> list[str]:
        return ["--prefix", str(REPO), "--confdir", str(self.confdir), "--statedir",
                str(self.statedir), "--unitdir", str(self.units), "--sysusersdir",
                str(self.sysusers), "--tmpfilesdir", str(self.tmpfiles)]


def _layout(root: Path) -> Rendered:
    return Rendered(root, root / "units", root / "etc" / "spitwall", root / "state",
                    root / "sysusers.d", root / "tmpfiles.d", "")


@pytest.fixture
def rendered(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Rendered:
    r = _layout(tmp_path)
    assert install.main(r.args()) == 0
    r.out = capsys.readouterr().out
    return r


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _verify(unit: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", "verify", "--man=no", unit.name], cwd=unit.parent,
                          capture_output=True, text=True, timeout=60, check=False)


def _exec_start(text: str) -> str:
    """The last non-empty ExecStart= of a unit file, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", text)
    starts = [m.group(1) for m in re.finditer(r"^ExecStart=(.*)$", joined, re.M) if m.group(1)]
    return starts[-1]


def _values(text: str, key: str) -> list[str]:
    """Every ``KEY=value`` of a unit file (continuation lines joined), in order."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [m.group(1) for m in re.finditer(rf"^{key}=(.*)$", joined, re.M)]


def _option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def _env_keys(path: Path) -> set[str]:
    keys = set()
    for line in path.read_text().splitlines():
        m = re.match(r"#?([A-Z_][A-Z0-9_]*)=", line.strip())
        if m:
            keys.add(m.group(1))
    return keys


# --------------------------------------------------------------------------------------------
# rendering


def test_renders_every_unit_env_file_and_config(rendered: Rendered) -> None:
    names = {p.relative_to(rendered.root).as_posix() for p in _files(rendered.root)}
    assert names == {
        "units/spitwall-media.service", "units/spitwall-deliver.service",
        "units/spitwall-stir-fetch.service", "units/spitwall-metrics.service",
        "units/spitwall-review.service", "units/kamailio.service.d/spitwall.conf",
        "sysusers.d/spitwall.conf", "tmpfiles.d/spitwall.conf",
        *(f"etc/spitwall/{env}" for env in ENV_ROLES),
        *(f"etc/spitwall/{env}.example" for env in ENV_ROLES),
        "etc/spitwall/review.users", "etc/spitwall/review.users.example",
    }
    assert set(install.SERVICES) == set(SERVICE_USERS)
    assert set(install.ENV_FILES) == set(ENV_ROLES)
    for path in _files(rendered.root):
        text = path.read_text()
        assert not re.search(r"@[A-Z]+@", text), f"placeholder left in {path}"
        mode = stat.S_IMODE(path.stat().st_mode)
        secret = path.suffix == ".env" or path.name in install.SECRET_FILES
        assert mode == (0o600 if secret else 0o644), f"{path}: {mode:o}"
    media = (rendered.units / "spitwall-media.service").read_text()
    assert f"ExecStart={REPO}/.venv/bin/spitwall media" in media
    assert f"ReadWritePaths={rendered.statedir}/media" in media
    assert f"EnvironmentFile={rendered.confdir}/media.env" in media
    assert "systemctl daemon-reload" in rendered.out
    assert "systemctl enable --now spitwall-media.service" in rendered.out
    # the operator's services are enabled on their own, once their files are filled in
    enables = [line for line in rendered.out.splitlines() if "systemctl enable --now" in line]
    assert len(enables) == 2 and "spitwall-review" not in enables[0], enables
    assert enables[1].strip() == ("systemctl enable --now spitwall-metrics.service "
                                  "spitwall-review.service")


@pytest.mark.parametrize(("service", "user"), sorted(SERVICE_USERS.items()))
def test_every_service_runs_as_its_own_user_hardened(rendered: Rendered, service: str,
                                                     user: str) -> None:
    text = (rendered.units / service).read_text()
    assert _values(text, "User") == [user] and _values(text, "Group") == [user]
    for key, value in (("Type", "exec"), ("Restart", "on-failure"), ("ProtectSystem", "strict"),
                       ("NoNewPrivileges", "yes"), ("CapabilityBoundingSet", ""),
                       ("ProtectHome", "yes"), ("PrivateTmp", "yes"), ("UMask", "0027")):
        assert _values(text, key) == [value], f"{service}: {key}="


def test_metrics_reads_the_answering_machines_stats_file_and_writes_nothing(
    rendered: Rendered,
) -> None:
    media = (rendered.units / "spitwall-media.service").read_text()
    metrics = (rendered.units / "spitwall-metrics.service").read_text()
    assert _values(media, "RuntimeDirectory") == ["spitwall-media"]  # = /run/spitwall-media
    assert _values(media, "RuntimeDirectoryMode") == ["0750"]  # group spitwall-media may read
    argv = _exec_start(metrics).split()
    assert argv[:2] == [f"{REPO}/.venv/bin/spitwall", "metrics"]
    media_argv = _exec_start(media).split()
    assert _option(media_argv, "--stats-file") == "${RUNTIME_DIRECTORY}/stats.json"
    assert _option(argv, "--media-stats") == "/run/spitwall-media/stats.json"
    assert _option(argv, "--listen") == "${SPITWALL_METRICS_LISTEN}"
    assert _values(metrics, "SupplementaryGroups") == ["spitwall-media"]
    assert _values(metrics, "EnvironmentFile") == [f"{rendered.confdir}/metrics.env"]
    assert not _values(metrics, "ReadWritePaths") and not _values(metrics, "RuntimeDirectory")
    example = (rendered.confdir / "metrics.env.example").read_text()
    assert re.search(r"^SPITWALL_METRICS_LISTEN=127\.0\.0\.1:9464$", example, re.M)
    assert re.search(r"^#SPITWALL_LI_REDIS=", example, re.M)  # off unless asked for


def test_review_reads_the_queue_and_gets_its_users_as_a_credential(rendered: Rendered) -> None:
    media = (rendered.units / "spitwall-media.service").read_text()
    review = (rendered.units / "spitwall-review.service").read_text()
    argv = _exec_start(review).split()
    assert argv[:2] == [f"{REPO}/.venv/bin/spitwall", "review"]
    queue = f"{rendered.statedir}/media/queue"
    assert _option(argv, "--queue-dir") == _option(_exec_start(media).split(), "--queue-dir")
    assert _option(argv, "--queue-dir") == queue
    assert _option(argv, "--listen") == "${SPITWALL_REVIEW_LISTEN}"
    # the users file stays root's (0600); systemd hands the service a copy
    assert _values(review, "LoadCredential") == [f"review.users:{rendered.confdir}/review.users"]
    assert _option(argv, "--auth-file") == "${CREDENTIALS_DIRECTORY}/review.users"
    assert "--no-auth" not in argv
    assert _values(review, "SupplementaryGroups") == ["spitwall-media"]
    assert _values(review, "ReadOnlyPaths") == [queue]
    assert not _values(review, "ReadWritePaths") and not _values(review, "RuntimeDirectory")
    assert _values(review, "EnvironmentFile") == [f"{rendered.confdir}/review.env"]
    example = (rendered.confdir / "review.env.example").read_text()
    assert re.search(r"^SPITWALL_REVIEW_LISTEN=127\.0\.0\.1:8088$", example, re.M)
    # the installed users file holds no user yet: the page refuses to start without one
    users = rendered.confdir / "review.users"
    with pytest.raises(ValueError, match="no user:password line"):
        review_page.load_users(users)
    assert not review_page.auth_file_too_open(users)


def test_units_and_examples_hold_no_secrets(rendered: Rendered) -> None:
    for path in [*rendered.units.rglob("*.service"), *rendered.units.rglob("*.conf")]:
        for line in path.read_text().splitlines():
            if line.startswith("#"):
                continue
            assert not re.search(r"rediss?(\+sentinel)?://", line), f"{path}: {line}"
            assert "SPITWALL_REDIS=" not in line, f"{path}: {line}"
    for env, role in ENV_ROLES.items():
        text = (rendered.confdir / f"{env}.example").read_text()
        urls = re.findall(r"^SPITWALL_REDIS=(.*)$", text, re.M)
        assert urls == [f"redis://spitwall-{role}:CHANGE-ME@127.0.0.1:6379/0"], env
        for line in text.splitlines():
            if "PASSWORD" in line and not line.startswith("#"):
                assert line.endswith("CHANGE-ME"), f"{env}: {line}"


def test_every_variable_a_command_line_uses_is_in_its_env_example(rendered: Rendered) -> None:
    units = [*rendered.units.glob("*.service"), rendered.units / install.DROPIN]
    for unit in units:
        text = unit.read_text()
        env_file = re.search(r"^EnvironmentFile=(\S+)$", text, re.M)
        assert env_file, unit
        example = Path(env_file.group(1) + ".example")
        assert example.parent == rendered.confdir
        used = set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", _exec_start(text)))
        set_in_unit = set(re.findall(r"\b([A-Z_][A-Z0-9_]*)=", " ".join(
            re.findall(r"^Environment=(.*)$", text, re.M))))
        missing = used - _env_keys(example) - set_in_unit - SYSTEMD_VARS
        assert not missing, f"{unit.name} uses {sorted(missing)}, not in {example.name}"


def test_the_proxy_redis_url_is_never_on_kamailios_command_line(rendered: Rendered) -> None:
    line = _exec_start((rendered.units / install.DROPIN).read_text())
    assert " -A REDIS_URL= " in line  # empty: kemi/handler.py falls back to $SPITWALL_REDIS
    assert not re.search(r"\$\{?SPITWALL_REDIS(\}|\s|$)", line)
    assert "-P ${RUNTIME_DIRECTORY}/kamailio.pid" in line  # = Debian's PIDFile= under systemd
    assert f"'SPITWALL_HANDLER=\"{REPO}/kemi/handler.py\"'" in line


# --------------------------------------------------------------------------------------------
# systemd-analyze verify, sysusers, tmpfiles


@needs_analyze
@pytest.mark.parametrize("name", install.SERVICES)
def test_systemd_analyze_verify_accepts_the_service(rendered: Rendered, name: str) -> None:
    done = _verify(rendered.units / name)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr


@needs_analyze
@pytest.mark.skipif(not DEBIAN_KAMAILIO.is_file(),
                    reason="Debian's kamailio package (kamailio.service) is not installed")
def test_systemd_analyze_verify_accepts_kamailio_with_the_dropin(rendered: Rendered) -> None:
    unit = rendered.units / "kamailio.service"
    shutil.copy(DEBIAN_KAMAILIO, unit)
    done = _verify(unit)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
    # ... and verify does read the drop-in: without clearing Debian's ExecStart it fails
    dropin = rendered.units / install.DROPIN
    dropin.write_text(dropin.read_text().replace("ExecStart=\nExecStart=", "ExecStart="))
    broken = _verify(unit)
    assert broken.returncode != 0 and "more than one ExecStart" in broken.stderr, broken.stderr


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None
                    or shutil.which("systemd-tmpfiles") is None,
                    reason="systemd-sysusers / systemd-tmpfiles are not installed")
def test_sysusers_and_tmpfiles_create_the_users_and_state_dirs(
    rendered: Rendered, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for cmd in (["systemd-sysusers", f"--root={root}", str(rendered.sysusers / "spitwall.conf")],
                ["systemd-tmpfiles", f"--root={root}", "--create",
                 str(rendered.tmpfiles / "spitwall.conf")]):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, f"{cmd[0]}: {done.stderr}"
    uids = {line.split(":")[0]: int(line.split(":")[2])
            for line in (root / "etc" / "passwd").read_text().splitlines()}
    groups = {line.split(":")[0]: line.split(":")[3]
              for line in (root / "etc" / "group").read_text().splitlines()}
    for user in SERVICE_USERS.values():
        assert user in uids and user in groups
    assert "kamailio" in groups["spitwall-stir"].split(",")  # Kamailio reads the trust dir
    # the exporter reads the stats file, the review page the recordings
    assert sorted(groups["spitwall-media"].split(",")) == ["spitwall-metrics", "spitwall-review"]
    state = root / str(rendered.statedir).lstrip("/")
    for sub, owner in (("media", "spitwall-media"), ("media/queue", "spitwall-media"),
                       ("stir", "spitwall-stir")):
        st = (state / sub).stat()
        assert st.st_uid == uids[owner] and stat.S_IMODE(st.st_mode) == 0o750, sub
    for sub in ("li-spool", "dialogs"):  # Kamailio's only
        st = (state / sub).stat()
        assert st.st_uid == uids["kamailio"] and stat.S_IMODE(st.st_mode) == 0o700, sub


# --------------------------------------------------------------------------------------------
# the installer's behaviour


@pytest.mark.parametrize(("change", "message"), [
    (["--prefix", "opt/spitwall"], "--prefix must be an absolute path"),
    (["--confdir", "/etc/spit wall"], "only letters, digits"),
    (["--statedir", "/var/lib/spit%wall"], "only letters, digits"),
    (["--unitdir", "/etc/systemd/$x"], "only letters, digits"),
    (["--statedir", "/"], "--statedir must not be /"),
    (["--prefix", "/nonexistent/spitwall"], "no .venv/bin/spitwall there"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["--unitdir"], "expected one argument"),
])
def test_bad_arguments_give_one_line_and_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: list[str], message: str
) -> None:
    r = _layout(tmp_path / "out")
    args = r.args()
    opt = change[0]
    if opt in args:
        i = args.index(opt)
        del args[i:i + 2]
    assert install.main([*args, *change]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("install.py: error: "), captured.err
    assert message in lines[0]
    assert not (tmp_path / "out").exists()


def test_dry_run_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    r = _layout(tmp_path / "out")
    assert install.main([*r.args(), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert not (tmp_path / "out").exists()
    would = [line for line in out.splitlines() if line.startswith("would write")]
    # units, the drop-in, sysusers, tmpfiles, and an example plus a file per env/secret file
    assert len(would) == len(install.SERVICES) + 3 + 2 * (
        len(install.ENV_FILES) + len(install.SECRET_FILES)) == 22
    assert f"would write {r.units}/spitwall-media.service" in out
    assert "systemctl daemon-reload" in out


def test_env_files_are_never_overwritten(
    rendered: Rendered, capsys: pytest.CaptureFixture[str]
) -> None:
    proxy = rendered.confdir / "proxy.env"
    proxy.write_text("SPITWALL_REDIS=redis://spitwall-proxy:the-real-one@10.0.0.5:6379/0\n")
    proxy.chmod(0o640)
    example = rendered.confdir / "media.env.example"
    example.write_text("stale\n")
    (rendered.confdir / "deliver.env").unlink()
    users = rendered.confdir / "review.users"
    users.write_text("alice:the-real-one\n")
    assert install.main(rendered.args()) == 0
    out = capsys.readouterr().out
    assert users.read_text() == "alice:the-real-one\n"
    assert f"kept        {users} (exists; env files are never overwritten)" in out
    assert proxy.read_text() == "SPITWALL_REDIS=redis://spitwall-proxy:the-real-one@10.0.0.5:6379/0\n"
    assert stat.S_IMODE(proxy.stat().st_mode) == 0o640
    assert f"kept        {proxy} (exists; env files are never overwritten)" in out
    assert f"kept        {rendered.confdir / 'media.env'}" in out
    # a missing env file is created again (0600, from the example); examples are refreshed
    deliver = rendered.confdir / "deliver.env"
    assert f"wrote       {deliver} (mode 0600)" in out
    assert stat.S_IMODE(deliver.stat().st_mode) == 0o600
    assert "SPITWALL_DELIVER_PORT=5070" in deliver.read_text()
    assert "SPITWALL_MEDIA_PORT=" in example.read_text()


def test_the_installer_runs_with_debians_python_alone(tmp_path: Path) -> None:
    """stdlib only: it runs with /usr/bin/python3 -I (no venv, no site-packages, no cwd)."""
    r = _layout(tmp_path)
    done = subprocess.run(["/usr/bin/python3", "-I", str(REPO / "deploy" / "install.py"),
                           *r.args()], capture_output=True, text=True, timeout=60,
                          check=False, cwd="/")
    assert done.returncode == 0, done.stderr
    assert (r.units / "spitwall-deliver.service").is_file()
