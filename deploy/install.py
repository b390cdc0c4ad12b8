#!/usr/bin/python3
"""Render spitwall's systemd units for this machine (stdlib only; run it as root).

    deploy/install.py [--prefix /opt/spitwall] [--confdir /etc/spitwall]
                      [--statedir /var/lib/spitwall] [--unitdir /etc/systemd/system]
                      [--sysusersdir /etc/sysusers.d] [--tmpfilesdir /etc/tmpfiles.d] [--dry-run]

Replaces @PREFIX@, @CONFDIR@ and @STATEDIR@ in the templates under deploy/ and writes:

* UNITDIR/spitwall-{media,deliver,stir-fetch,metrics,review}.service and
  UNITDIR/kamailio.service.d/spitwall.conf (a drop-in for Debian's kamailio.service), mode 0644,
  replaced on every run;
* SYSUSERSDIR/spitwall.conf and TMPFILESDIR/spitwall.conf (the users and the state directories);
* CONFDIR/ROLE.env.example (refreshed on every run, no secrets) and CONFDIR/ROLE.env, mode 0600,
  created from the example only when it does not exist: an env file is never overwritten; the
  same for CONFDIR/review.users (the review page's users, passed to it with LoadCredential=).

Then prints the commands that remain (systemd-sysusers, systemd-tmpfiles, systemctl). Bad
arguments give one line on stderr and exit 2, before anything is written. docs/deployment.md.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

DEPLOY = Path(__file__).resolve().parent

#: the services this kit installs (Kamailio's own unit is Debian's, with our drop-in)
SERVICES = ("spitwall-media.service", "spitwall-deliver.service", "spitwall-stir-fetch.service",
            "spitwall-metrics.service", "spitwall-review.service")
#: the operator's services among them: enabled on their own once their files are filled in
OPTIONAL_SERVICES = ("spitwall-metrics.service", "spitwall-review.service")
DROPIN = "kamailio.service.d/spitwall.conf"
#: env file per role (the Redis user of intercept/acl.py the service runs as is named inside)
ENV_FILES = ("proxy.env", "media.env", "deliver.env", "stir-fetch.env", "metrics.env",
             "review.env")
#: other root-only files with secrets, handled like the env files (example + never overwritten)
SECRET_FILES = ("review.users",)
#: what the prefix must hold for the rendered units to run
PREFIX_NEEDS = (".venv/bin/spitwall", "kamailio.cfg", "kemi/handler.py")

#: Paths go into unit files unquoted: no spaces, quotes, `$` (variables), `%` (specifiers), `\`.
_SAFE_PATH = re.compile(r"/[A-Za-z0-9._+/-]*")
_PLACEHOLDER = re.compile(r"@[A-Z]+@")


class UsageError(Exception):
    """A bad argument: reported as one line, exit 2, nothing written."""


@dataclass(frozen=True)
class Output:
    """One file to write: ``keep`` means never replace an existing file."""

    path: Path
    text: str
    mode: int
    keep: bool = False


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="install.py",
                description="Render spitwall's systemd units (docs/deployment.md).")
    p.add_argument("--prefix", default="/opt/spitwall", help="the clone, with .venv (make setup)")
    p.add_argument("--confdir", default="/etc/spitwall", help="env files (default /etc/spitwall)")
    p.add_argument("--statedir", default="/var/lib/spitwall", help="queues, prompts, STIR certs")
    p.add_argument("--unitdir", default="/etc/systemd/system", help="where units go")
    p.add_argument("--sysusersdir", default="/etc/sysusers.d", help="sysusers.d(5) directory")
    p.add_argument("--tmpfilesdir", default="/etc/tmpfiles.d", help="tmpfiles.d(5) directory")
    p.add_argument("--dry-run", action="store_true",
                   help="print what would be written; write nothing")
    return p


def _path(option: str, value: str) -> Path:
    if not value.startswith("/"):
        raise UsageError(f"{option} must be an absolute path, not {value!r}")
    norm = os.path.normpath(value)
    if not _SAFE_PATH.fullmatch(norm):
        raise UsageError(f"{option} {value!r}: only letters, digits and . _ + - / are allowed "
                         "(the path goes into unit files unquoted)")
    if norm == "/":
        raise UsageError(f"{option} must not be /")
    return Path(norm)


def render(text: str, values: dict[str, str]) -> str:
    """``text`` with every @NAME@ replaced; an unknown placeholder is an error (a template bug)."""
    for name, value in values.items():
        text = text.replace(f"@{name}@", value)
    left = _PLACEHOLDER.search(text)
    if left:
        raise ValueError(f"unknown placeholder {left.group()} in a template")
    return text


def plan(args: argparse.Namespace) -> list[Output]:
    """Check the arguments and return the files to write (nothing is written here)."""
    prefix = _path("--prefix", args.prefix)
    dirs = {opt: _path(f"--{opt}", getattr(args, opt))
            for opt in ("confdir", "statedir", "unitdir", "sysusersdir", "tmpfilesdir")}
    missing = [need for need in PREFIX_NEEDS if not (prefix / need).exists()]
    if missing:
        raise UsageError(f"--prefix {prefix}: no {missing[0]} there (clone spitwall into it and "
                         "run `make setup` first)")
    values = {"PREFIX": str(prefix), "CONFDIR": str(dirs["confdir"]),
              "STATEDIR": str(dirs["statedir"])}

    def from_template(src: str) -> str:
        return render((DEPLOY / src).read_text(), values)

    out = [Output(dirs["unitdir"] / name, from_template(f"systemd/{name}"), 0o644)
           for name in SERVICES]
    out.append(Output(dirs["unitdir"] / DROPIN, from_template(f"systemd/{DROPIN}"), 0o644))
    out.append(Output(dirs["sysusersdir"] / "spitwall.conf",
                      from_template("sysusers.d/spitwall.conf"), 0o644))
    out.append(Output(dirs["tmpfilesdir"] / "spitwall.conf",
                      from_template("tmpfiles.d/spitwall.conf"), 0o644))
    for env in (*ENV_FILES, *SECRET_FILES):
        example = from_template(f"env/{env}.example")
        out.append(Output(dirs["confdir"] / f"{env}.example", example, 0o644))
        out.append(Output(dirs["confdir"] / env, example, 0o600, keep=True))
    return out


def _write(item: Output) -> bool:
    """Write one file atomically with its mode; False when ``keep`` found it already there."""
    item.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    if item.keep:
        try:  # O_EXCL: created with mode 0600 from the start, never replacing an existing file
            fd = os.open(item.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, item.mode)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(item.text)
        return True
    fd, tmp = tempfile.mkstemp(dir=item.path.parent, prefix=f".{item.path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(item.text)
        os.chmod(tmp, item.mode)
        os.replace(tmp, item.path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


def next_steps(args: argparse.Namespace) -> list[str]:
    sysusers = Path(os.path.normpath(args.sysusersdir)) / "spitwall.conf"
    tmpfiles = Path(os.path.normpath(args.tmpfilesdir)) / "spitwall.conf"
    confdir = Path(os.path.normpath(args.confdir))
    envs = str(confdir / "{") + ",".join(
        env.removesuffix(".env") for env in ENV_FILES) + "}.env"
    return [
        f"systemd-sysusers {sysusers}",
        f"systemd-tmpfiles --create {tmpfiles}",
        f"# fill in {envs}: Redis role URLs, addresses (docs/deployment.md)",
        "systemctl daemon-reload",
        "systemctl enable --now " + " ".join(s for s in SERVICES if s not in OPTIONAL_SERVICES),
        "systemctl enable kamailio.service && systemctl restart kamailio.service",
        f"# optional, once metrics.env, review.env and {confdir / 'review.users'} are filled in:",
        "systemctl enable --now " + " ".join(OPTIONAL_SERVICES),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        outputs = plan(args)
    except UsageError as exc:
        print(f"install.py: error: {exc}", file=sys.stderr)
        return 2
    verb = "would write" if args.dry_run else "wrote"
    for item in outputs:
        try:
            written = (not (item.keep and item.path.exists())) if args.dry_run else _write(item)
        except OSError as exc:
            print(f"install.py: error: cannot write {item.path}: {exc.strerror or exc}",
                  file=sys.stderr)
            return 1
        if written:
            print(f"{verb:<11} {item.path} (mode {item.mode:04o})")
        else:
            print(f"{'kept':<11} {item.path} (exists; env files are never overwritten)")
    print("\nnext, as root:" if not args.dry_run else "\nthen, as root:")
    for line in next_steps(args):
        print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
