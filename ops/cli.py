"""`spitwall`: the operator's command-line tool (contract in docs/DESIGN.md).

Every command takes `--redis URL` (default `$SPITWALL_REDIS`, else redis://127.0.0.1:6379/0)
and `--json` where it prints data. Bad input gets one line on stderr and a non-zero exit, and
changes nothing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import redis

from scoring import redisconn

DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
EXIT_USAGE = 2
EXIT_FAIL = 1


class CliError(Exception):
    """A one-line, user-facing error."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(EXIT_USAGE)


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--redis", metavar="URL", default=argparse.SUPPRESS,
                   help="Redis URL (default: $SPITWALL_REDIS or " + DEFAULT_REDIS + ")")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                   help="print JSON")
    return p


def redis_url(args: argparse.Namespace) -> str:
    return getattr(args, "redis", None) or os.environ.get("SPITWALL_REDIS") or DEFAULT_REDIS


def client(args: argparse.Namespace) -> redis.Redis:
    url = redis_url(args)
    try:
        c = redisconn.client(url, socket_timeout=5, socket_connect_timeout=3)
        c.ping()
    except ValueError as exc:
        raise CliError(f"bad --redis URL {redisconn.redacted(url)!r}: {exc}") from None
    except redis.RedisError as exc:
        raise CliError(f"cannot reach Redis at {redisconn.redacted(url)}: {exc}") from None
    return c


def emit(args: argparse.Namespace, data: Any, text: Callable[[], str]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, indent=1, sort_keys=True, default=str))
    else:
        print(text())


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


# -- config ------------------------------------------------------------------------------
def cmd_config_show(args: argparse.Namespace) -> int:
    from scoring import config_admin
    from scoring.config import PARAMS, SECRET_KEYS
    from scoring.geo import database_status

    cfg, raw = config_admin.show(client(args))
    rows = {k: {"value": "(secret, set)" if k in SECRET_KEYS and cfg[k] else cfg[k],
                "default": p.default, "set": k in raw, "help": p.help}
            for k, p in PARAMS.items()}
    data = {"version": cfg.version, "config": rows, "errors": list(cfg.errors),
            "geoip": database_status(str(cfg["geoip.database"]))}

    def text() -> str:
        lines = [f"config version {cfg.version}"]
        for k, r in rows.items():
            mark = "*" if r["set"] else " "
            lines.append(f"{mark} {k:28} {_fmt(r['value']):>18}   {r['help']}")
        lines.append("(* = set by an operator; others are defaults)")
        lines.append(f"GeoIP: {database_status(str(cfg['geoip.database']))}")
        lines += [f"warning: {e}" for e in cfg.errors]
        return "\n".join(lines)

    emit(args, data, text)
    return 0


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:g}"
    return repr(v) if v == "" else str(v)


def cmd_config_set(args: argparse.Namespace) -> int:
    from scoring import config_admin

    value = config_admin.set_value(client(args), args.key, args.value)
    note = ""
    if args.key == "geoip.database" and value:
        from scoring.geo import database_status

        note = f" (here: {database_status(str(value))})"  # Kamailio may run elsewhere
    emit(args, {"key": args.key, "value": value},
         lambda: f"{args.key} = {_fmt(value)}{note}")
    return 0


def cmd_config_reset(args: argparse.Namespace) -> int:
    from scoring import config_admin

    n = config_admin.reset(client(args), args.key)
    what = args.key or "all keys"
    emit(args, {"reset": args.key or "*", "removed": n},
         lambda: f"reset {what} to defaults ({n} override(s) removed)")
    return 0


# -- lists -------------------------------------------------------------------------------
def cmd_list_add(args: argparse.Namespace) -> int:
    from lists.store import ListStore

    if args.value is None:
        raise CliError("list add needs a VALUE")
    e = ListStore(client(args)).add(args.list, args.kind, args.value, ttl=args.ttl,
                                    reason=args.reason or "")
    emit(args, e.as_json(), lambda: f"added {e.kind} {e.value} to the {args.list} list"
         + (f" until {_when(e.expires)}" if e.expires else ""))
    return 0


def cmd_list_remove(args: argparse.Namespace) -> int:
    from lists.store import ListStore

    if args.value is None:
        raise CliError("list remove needs a VALUE")
    if not ListStore(client(args)).remove(args.list, args.kind, args.value):
        raise CliError(f"{args.kind} {args.value} is not on the {args.list} list")
    emit(args, {"removed": True}, lambda: f"removed {args.kind} {args.value} from {args.list}")
    return 0


def cmd_list_show(args: argparse.Namespace) -> int:
    from lists.model import KINDS
    from lists.store import ListStore

    if args.kind is not None and args.kind not in KINDS:
        raise CliError(f"unknown list kind {args.kind!r}; expected one of {', '.join(KINDS)}")
    entries = ListStore(client(args)).show(args.list, args.kind)

    def text() -> str:
        if not entries:
            return f"the {args.list} list is empty"
        return "\n".join(
            f"{e.kind:8} {e.value:40} expires {_when(e.expires):22} {e.reason}" for e in entries
        )

    emit(args, [e.as_json() for e in entries], text)
    return 0


def cmd_list_import(args: argparse.Namespace) -> int:
    from lists.store import ListStore

    n = ListStore(client(args)).import_file(Path(args.file))
    emit(args, {"imported": n}, lambda: f"imported {n} entries from {args.file}")
    return 0


def cmd_list_export(args: argparse.Namespace) -> int:
    from lists.store import ListStore

    try:
        n = ListStore(client(args)).export(Path(args.file))
    except OSError as exc:
        raise CliError(f"cannot write {args.file}: {exc.strerror}") from None
    emit(args, {"exported": n}, lambda: f"exported {n} entries to {args.file}")
    return 0


# -- number database ---------------------------------------------------------------------
def _lookup_on(c: redis.Redis) -> bool:
    """Turn `numbers.lookup` on (audited) if it is off; True when this call turned it on."""
    from scoring import config_admin

    cfg, _raw = config_admin.show(c)
    if cfg["numbers.lookup"]:
        return False
    config_admin.set_value(c, "numbers.lookup", "true")
    return True


def _lookup_note(turned_on: bool) -> str:
    return "; numbers.lookup turned on" if turned_on else ""


def cmd_numbers_import(args: argparse.Namespace) -> int:
    from lists.numberdb import ImportInterrupted, NumberDb, check_number_list, read_file

    check_number_list(args.list)
    items, digest = read_file(Path(args.file))  # all lines validated before anything is written
    c = client(args)
    try:
        n, removed = NumberDb(c).import_numbers(
            args.list, items, source=Path(args.file).name, digest=digest, ttl=args.ttl,
            reason=args.reason or "", replace=args.replace)
    except ImportInterrupted as exc:
        raise CliError(str(exc)) from None
    on = _lookup_on(c)
    data: dict[str, Any] = {"imported": n, "list": args.list, "sha256": digest,
                            "lookup_turned_on": on}
    if args.replace:
        data["removed"] = removed
    gone = f", removed {removed} not in the file" if args.replace else ""
    emit(args, data, lambda: f"imported {n} numbers into the {args.list} number list{gone}"
                             f"{_lookup_note(on)}")
    return 0


def cmd_numbers_add(args: argparse.Namespace) -> int:
    from lists.numberdb import NumberDb

    c = client(args)
    e = NumberDb(c).add(args.list, args.number, ttl=args.ttl, reason=args.reason or "")
    on = _lookup_on(c)
    emit(args, {**e.as_json(), "list": args.list, "lookup_turned_on": on},
         lambda: f"added {e.value} to the {args.list} number list"
         + (f" until {_when(e.expires)}" if e.expires else "") + _lookup_note(on))
    return 0


def cmd_numbers_remove(args: argparse.Namespace) -> int:
    from lists.numberdb import NumberDb

    if not NumberDb(client(args)).remove(args.list, args.number):
        raise CliError(f"{args.number} is not on the {args.list} number list")
    emit(args, {"removed": True}, lambda: f"removed {args.number} from the {args.list} numbers")
    return 0


def cmd_numbers_check(args: argparse.Namespace) -> int:
    from lists.numberdb import NumberDb

    found = NumberDb(client(args)).check(args.number)

    def text() -> str:
        if not found:
            return f"{args.number} is on no number list"
        return "\n".join(f"{name:6} {e.value:22} expires {_when(e.expires):22} {e.reason}"
                         for name, e in found.items())

    emit(args, {name: e.as_json() for name, e in found.items()}, text)
    return 0


def cmd_numbers_count(args: argparse.Namespace) -> int:
    from lists.numberdb import NUMBER_LISTS, NumberDb

    db = NumberDb(client(args))
    counts = {name: db.count(name) for name in ([args.list] if args.list else NUMBER_LISTS)}
    emit(args, counts, lambda: "\n".join(f"{k:6} {v}" for k, v in counts.items()))
    return 0


def cmd_numbers_export(args: argparse.Namespace) -> int:
    from lists.numberdb import NumberDb, check_number_list

    check_number_list(args.list)
    try:
        n = NumberDb(client(args)).export(args.list, Path(args.file))
    except OSError as exc:
        raise CliError(f"cannot write {args.file}: {exc.strerror}") from None
    emit(args, {"exported": n}, lambda: f"exported {n} numbers to {args.file}")
    return 0


def cmd_numbers_clear(args: argparse.Namespace) -> int:
    from lists.numberdb import NumberDb, check_number_list

    check_number_list(args.list)
    n = NumberDb(client(args)).clear(args.list)
    emit(args, {"removed": n}, lambda: f"removed {n} numbers from the {args.list} number list")
    return 0


# -- explain -----------------------------------------------------------------------------
def _waived_line(d: dict[str, Any]) -> str:
    """Why a decision was not applied: monitor mode (records before opt-out existed say
    nothing more) or the callee's opt-out."""
    waived = str(d.get("waived") or "monitor")
    would = str(d["would"]).upper()
    if waived.startswith("optout"):
        entry = waived.partition(":")[2].strip()
        return f"opt-out   would have been {would}; relayed (callee opted out: {entry})"
    return f"monitor   would have been {would}; relayed (mode=monitor)"


def cmd_explain(args: argparse.Namespace) -> int:
    from scoring.store import find_decision

    d = find_decision(client(args), args.call_id)
    if d is None:
        raise CliError(f"no decision recorded for Call-ID {args.call_id!r}")
    checks = [{"check": n, "score": s, "weight": w, "contribution": round(s * w, 4),
               "reason": r} for n, s, w, r in d["checks"]]
    data = {**{k: v for k, v in d.items() if k != "checks"}, "checks": checks}

    def text() -> str:
        lines = [f"Call-ID   {d['call_id']}",
                 f"time      {_when(d['ts'])}",
                 f"call      {d['call']['from']} -> {d['call']['ruri']} from {d['call']['src']}",
                 f"UA        {d['call']['ua']}",
                 f"decision  {d['action'].upper()}  score {d['score']:.2f}  (rule: {d['rule']}"
                 + (", degraded: Redis unavailable" if d["degraded"] else "") + ")",
                 *([_waived_line(d)] if d.get("would") else []),
                 *([f"label     Call-Info: {d['label']}"] if d.get("label") else []),
                 "",
                 f"{'check':18} {'score':>6} {'weight':>7} {'contrib':>8}  reason"]
        for c in checks:
            lines.append(f"{c['check']:18} {c['score']:6.2f} {c['weight']:7.2f} "
                         f"{c['contribution']:8.3f}  {c['reason']}")
        return "\n".join(lines)

    emit(args, data, text)
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from scoring import keys

    rows = []
    entries: Any = client(args).xrevrange(keys.AUDIT, count=args.count)
    for _id, fields in entries or []:
        rows.append({_text(k): _text(v) for k, v in fields.items()})

    def text() -> str:
        return "\n".join(
            f"{_when(float(r['ts']))} {r['user']:14} {r['what']:6} {r['action']:14} {r['key']}: "
            f"{r['old'] or '-'} -> {r['new'] or '-'}" for r in reversed(rows)
        ) or "no audit records"

    emit(args, rows, text)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from scoring import config_admin, reputation

    reputation.normalise_caller(args.caller)  # refuses empty or absurd input before Redis
    if args.ip:
        from lists.model import normalise

        args.ip = normalise("ip", args.ip)
    c = client(args)
    cfg, _raw = config_admin.show(c)
    half, v6 = cfg.get_float("reputation.half_life"), cfg.v6_prefix
    if args.verdict == "show":
        data = reputation.read(c, caller=args.caller, ip=args.ip or "", half_life=half,
                               v6_prefix=v6)
    else:
        kind = "report_spam" if args.verdict == "spam" else "report_ok"
        reputation.apply_feedback(c, caller=args.caller, ip=args.ip or "", kind=kind,
                                  half_life=half, v6_prefix=v6)
        data = reputation.read(c, caller=args.caller, ip=args.ip or "", half_life=half,
                               v6_prefix=v6)
        c.xadd(keys_audit(), {"ts": f"{time.time():.3f}", "user": os_user(), "what": "report",
                              "action": kind, "key": args.caller,
                              "old": "", "new": json.dumps(data)},
               maxlen=100_000, approximate=True)

    def text() -> str:
        return "\n".join(f"{k:7} reputation {v['score']:.2f} ({int(v['events'])} events)"
                         for k, v in data.items())

    emit(args, data, text)
    return 0


def keys_audit() -> str:
    from scoring import keys

    return keys.AUDIT


def os_user() -> str:
    from scoring.audit import os_user as _user

    return _user()


def cmd_stir_fetch(args: argparse.Namespace) -> int:
    from ops.stir_fetch import fetch_pending, run_forever

    c = client(args)
    if args.loop:
        run_forever(c, interval=args.interval, timeout=args.timeout)
        return 0
    rep = fetch_pending(c, timeout=args.timeout)
    data = {"fetched": rep.fetched, "failed": rep.failed}
    emit(args, data, lambda: "\n".join(
        [f"fetched {u}" for u in rep.fetched]
        + [f"failed  {u}: {why}" for u, why in rep.failed.items()]) or "nothing to fetch")
    return 0


def _queue(args: argparse.Namespace) -> Any:
    from media.queue import MessageQueue

    return MessageQueue(client(args), os.environ.get("SPITWALL_QUEUE_DIR", ".lab/queue"))


def _msg_json(m: Any) -> dict[str, Any]:
    return {"id": m.id, "queue": m.queue, **m.meta}


def cmd_queue_list(args: argparse.Namespace) -> int:
    msgs = list(_queue(args).list(args.queue, limit=args.limit))
    data = [_msg_json(m) for m in msgs]

    def text() -> str:
        return "\n".join(
            f"{m.id:22} {m.queue:9} {_when(m.meta.get('ts')):21} {m.meta.get('seconds', 0):5.1f}s "
            f"{str(m.meta.get('caller', ''))[:28]:28} -> {str(m.meta.get('callee', ''))[:20]:20} "
            f"{m.meta.get('verdict', ''):6} {m.meta.get('mark', '')}" for m in msgs
        ) or "the queue is empty"

    emit(args, data, text)
    return 0


def cmd_queue_export(args: argparse.Namespace) -> int:
    try:
        out = _queue(args).export(args.id, args.dest)
    except OSError as exc:
        raise CliError(f"cannot export {args.id}: {exc.strerror or exc}") from None
    emit(args, {"exported": str(out)}, lambda: f"exported {args.id} to {out}")
    return 0


def cmd_queue_play(args: argparse.Namespace) -> int:
    import shutil
    import subprocess

    msg = _queue(args).get(args.id)
    player = shutil.which("play") or shutil.which("aplay")
    if player is None:
        raise CliError(f"no audio player (sox 'play' or 'aplay'); the file is {msg.path}")
    rc = subprocess.run([player, "-q", str(msg.path)], check=False).returncode
    if rc != 0:
        raise CliError(f"{player} failed (exit {rc}); the file is {msg.path}")
    return 0


def cmd_queue_mark(args: argparse.Namespace) -> int:
    from media.queue import mark_with_feedback

    msg = mark_with_feedback(_queue(args), args.id, args.verdict, by=os_user())
    emit(args, _msg_json(msg), lambda: f"marked {args.id} as {args.verdict}")
    return 0


def cmd_review(args: argparse.Namespace) -> int:
    """The review web page in the foreground (ops/review.py); SIGTERM/SIGINT stop it, exit 0.
    Redis is not required at start: the page answers 503 until it is back."""
    import logging

    from media.queue import MessageQueue
    from ops import review
    from ops.listen import is_loopback, parse_listen

    try:
        host, port = parse_listen(args.listen, review.DEFAULT_LISTEN, any_port=True)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    users: dict[str, str] | None = None
    if args.auth_file is not None:
        try:
            users = review.load_users(args.auth_file)
            too_open = review.auth_file_too_open(args.auth_file)
        except OSError as exc:
            raise CliError(f"cannot read --auth-file {args.auth_file}: "
                           f"{exc.strerror or exc}") from None
        except ValueError as exc:
            raise CliError(str(exc)) from None
        if too_open:
            sys.stderr.write(f"spitwall: warning: {args.auth_file} is readable by others "
                             "(chmod 600 it)\n")
    elif not is_loopback(host):
        raise CliError(f"refusing to serve {host} without --auth-file (--no-auth is for "
                       "loopback addresses only)")
    elif not args.no_auth:
        raise CliError("give --auth-file FILE (user:password lines), or --no-auth to serve "
                       "this loopback address without a password")
    url = redis_url(args)
    try:
        c = redisconn.client(url, socket_timeout=5, socket_connect_timeout=3)
    except ValueError as exc:
        raise CliError(f"bad --redis URL {redisconn.redacted(url)!r}: {exc}") from None
    queue_dir = args.queue_dir or os.environ.get("SPITWALL_QUEUE_DIR", ".lab/queue")
    app = review.ReviewApp(MessageQueue(c, queue_dir), users=users)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def ready(server: review.ReviewServer) -> None:
        shown = f"[{host}]" if ":" in host else host
        print(f"spitwall review: http://{shown}:{server.server_port}/ (queue dir {queue_dir}, "
              f"Redis {redisconn.redacted(url)}{'' if users else ', no authentication'})",
              flush=True)

    try:
        return review.serve(app, host, port, ready=ready)
    except OSError as exc:
        raise CliError(f"cannot listen on {args.listen}: {exc.strerror or exc}") from None


def cmd_media(args: argparse.Namespace) -> int:
    from media.server import main as media_main

    rest = list(args.rest)
    if getattr(args, "redis", None) and "--redis" not in rest:
        rest = ["--redis", args.redis, *rest]
    return media_main(rest)


def cmd_stats(args: argparse.Namespace) -> int:
    from scoring import keys

    raw: Any = client(args).hgetall(keys.STATS)
    data = {_text(k): int(v) for k, v in raw.items()}
    emit(args, data, lambda: "\n".join(f"{k:24} {v}" for k, v in sorted(data.items()))
         or "no calls counted yet")
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    """The Prometheus exporter in the foreground (ops/metrics.py); SIGTERM/SIGINT stop it,
    exit 0. Redis is not required at start: scrapes say spitwall_redis_up 0 until it is back."""
    import logging

    from ops import metrics
    from ops.listen import is_loopback, parse_listen

    try:
        host, port = parse_listen(args.listen, metrics.DEFAULT_LISTEN)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    url = redis_url(args)
    li_url: str | None = args.li_redis or os.environ.get("SPITWALL_LI_REDIS") or None
    for what, u in (("--redis", url), ("--li-redis", li_url)):
        try:
            if u is not None:
                redisconn.check_url(u)
        except ValueError as exc:
            raise CliError(f"bad {what} URL {redisconn.redacted(str(u))!r}: {exc}") from None
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not is_loopback(host):
        sys.stderr.write(f"spitwall: warning: {args.listen} is not a loopback address and the "
                         "metrics endpoint has no authentication: anyone who reaches it reads "
                         "the counters (firewall it to your Prometheus)\n")
    collector = metrics.SpitwallCollector(
        url, media_stats=Path(args.media_stats) if args.media_stats else None,
        li_redis_url=li_url)

    def ready(endpoint: str) -> None:
        li = f"; intercept counters from {redisconn.redacted(li_url)}" if li_url else ""
        print(f"spitwall metrics: {endpoint} (Redis {redisconn.redacted(url)}{li})", flush=True)

    try:
        metrics.serve(collector, host, port, ready=ready)
    except OSError as exc:
        raise CliError(f"cannot listen on {args.listen}: {exc.strerror or exc}") from None
    return 0


# -- intercept (the intercept role only: use the spitwall-li-admin Redis user) -----------
def _iso_time(text: str) -> float:
    """ISO 8601 with a zone (``2026-11-27T10:00:00Z``, ``...+01:00``) -> unix time."""
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not an ISO time: {text!r} (e.g. 2026-11-27T10:00:00Z)") from None
    if when.tzinfo is None or when.utcoffset() is None:
        raise argparse.ArgumentTypeError(
            f"time {text!r} has no zone; add Z or an offset such as +01:00")
    return when.timestamp()


def _csv(choices: Sequence[str], what: str) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
        bad = [x for x in items if x not in choices]
        if not items or bad:
            raise argparse.ArgumentTypeError(
                f"{what} must be a comma list of {', '.join(choices)}, not {text!r}")
        return items
    return parse


def _read_file(path: str, what: str, limit: int = 1 << 20) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise CliError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise CliError(f"{what} {path} is larger than {limit} bytes")
    return data


def _target_json(target: Any) -> dict[str, Any]:
    from intercept.provision import iso as _iso
    from intercept.provision import target_summary

    d = target_summary(target)
    d["start"], d["end"] = _iso(d["start"]), _iso(d["end"])
    d["created_at"] = _iso(d["created_at"])
    cert = d["cert"]
    cert["not_before"], cert["not_after"] = _iso(cert["not_before"]), _iso(cert["not_after"])
    return d


def cmd_intercept_add(args: argparse.Namespace) -> int:
    from intercept.provision import add_target, build_target
    from intercept.targets import DELIVERABLES, SIDES, check_deliver_to

    check_deliver_to(args.deliver_to)
    if args.end is not None and args.start is not None and args.end <= args.start:
        raise ValueError("end time must be after start time")
    pem = _read_file(args.cert, "certificate")
    target = build_target(
        liid=args.liid, identities=args.target, deliver_to=args.deliver_to, cert_pem=pem,
        start=args.start, end=args.end, sides=args.match or SIDES,
        deliver=args.deliver or DELIVERABLES, mode=args.mode)
    replaced = add_target(client(args), target, replace=args.replace)
    data = _target_json(target)
    verb = "replaced" if replaced else "added"
    emit(args, data, lambda: (
        f"{verb} {target.mode} target {target.liid}: {', '.join(target.identities)} "
        f"({'/'.join(target.sides)}), {'+'.join(target.deliver)} to {target.deliver_to}, "
        f"{_when(target.start)} until {_when(target.end) if target.end else 'removed'}; "
        f"cert {data['cert']['subject']} SHA-256 {data['cert']['sha256'][:23]}..."))
    return 0


def cmd_intercept_list(args: argparse.Namespace) -> int:
    from intercept.provision import list_targets

    targets, errors = list_targets(client(args))
    for e in errors:
        sys.stderr.write(f"spitwall: warning: {e}\n")
    data = [_target_json(t) for t in targets]

    def text() -> str:
        if not targets:
            return "no targets"
        return "\n".join(
            f"{d['liid']:20} {d['mode']:9} {'active' if d['active'] else 'inactive':8} "
            f"{d['start'] or '-':20} -> {d['end'] or '-':20} {d['deliver_to']:28} "
            f"{','.join(d['identities'])}" for d in data)

    emit(args, data, text)
    return 0


def cmd_intercept_show(args: argparse.Namespace) -> int:
    from intercept.provision import show_target

    try:
        target = show_target(client(args), args.liid)
    except LookupError as exc:
        raise CliError(str(exc)) from None
    print(json.dumps(_target_json(target), indent=1, sort_keys=True))
    return 0


def cmd_intercept_remove(args: argparse.Namespace) -> int:
    from intercept.provision import remove_target

    try:
        remove_target(client(args), args.liid)
    except LookupError as exc:
        raise CliError(str(exc)) from None
    emit(args, {"removed": args.liid}, lambda: f"removed target {args.liid}")
    return 0


def cmd_intercept_audit(args: argparse.Namespace) -> int:
    from intercept.provision import audit_integrity, audit_tail

    c = client(args)
    rows = audit_tail(c, args.n)
    integrity = audit_integrity(c)

    known = ("id", "ts", "user", "by", "action", "liid", "address")

    def line(r: dict[str, Any]) -> str:
        try:
            when = _when(float(r.get("ts") or 0))
        except ValueError:
            when = str(r.get("ts"))
        subject = " ".join(x for x in (r.get("liid"), r.get("address")) if x) or "-"
        rest = {k: v for k, v in r.items() if k not in known}
        return (f"{when} {r.get('user') or r.get('by') or '?':14} {r.get('action', ''):18} "
                f"{subject:22} {json.dumps(rest, sort_keys=True)}")

    def text() -> str:
        lines = [line(r) for r in rows]
        if not lines:
            lines.append("no intercept audit records")
        if integrity["removed"]:
            lines.append(f"WARNING: {integrity['removed']} audit entries were removed "
                         f"({integrity['entries_added']} added, {integrity['length']} kept)")
        return "\n".join(lines)

    emit(args, {"entries": rows, **integrity}, text)
    return 0


def _recorder_password(args: argparse.Namespace) -> str | None:
    if args.user is None:
        if args.password_file:
            raise CliError("--password-file needs --user")
        return None
    if args.password_file:
        data = _read_file(args.password_file, "password file", 4096)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise CliError(f"password file {args.password_file} is not UTF-8") from None
        return text.rstrip("\r\n")
    if not sys.stdin.isatty():
        raise CliError("--user needs --password-file (no terminal to prompt on)")
    import getpass

    first = getpass.getpass(f"password for recorder user {args.user}: ")
    if getpass.getpass("again: ") != first:
        raise CliError("the passwords differ")
    return first


def cmd_recorder_allow(args: argparse.Namespace) -> int:
    from intercept.provision import normalise_address, recorder_allow
    from intercept.targets import check_liid

    for a in args.address:
        normalise_address(a)  # before any prompt
    for liid in args.liid or ():
        check_liid(liid)
    if args.no_md5 and args.user is None:
        raise CliError("--no-md5 needs --user")
    password = _recorder_password(args)
    recs = recorder_allow(client(args), args.address, user=args.user or "", password=password,
                          liids=args.liid or (), md5=not args.no_md5)
    emit(args, [r.as_json() for r in recs], lambda: "\n".join(
        f"allowed {r.address}"
        + (f" (digest user {r.user}, {'/'.join(r.algorithms)})" if r.user else "")
        + (f" for {', '.join(r.liids)}" if r.liids else "") for r in recs))
    return 0


def cmd_recorder_list(args: argparse.Namespace) -> int:
    from intercept.provision import recorder_list

    recs, errors = recorder_list(client(args))
    for e in errors:
        sys.stderr.write(f"spitwall: warning: {e}\n")
    emit(args, [r.as_json() for r in recs], lambda: "\n".join(
        f"{r.address:45} {('user ' + r.user) if r.user else 'address only':24} "
        f"{'/'.join(r.algorithms) or '-':14} "
        f"{','.join(r.liids) or 'any LIID':20} {_when(r.created_at)} by {r.created_by}"
        for r in recs) or "no recorders allowed")
    return 0


def cmd_recorder_remove(args: argparse.Namespace) -> int:
    from intercept.provision import recorder_remove

    try:
        gone = recorder_remove(client(args), args.address)
    except LookupError as exc:
        raise CliError(str(exc)) from None
    emit(args, {"removed": gone}, lambda: "\n".join(f"removed {a}" for a in gone))
    return 0


def cmd_deliver(args: argparse.Namespace) -> int:
    rest = list(args.rest)
    import importlib

    try:  # written separately; imported only when asked for
        deliver: Any = importlib.import_module("intercept.deliver")
    except ImportError as exc:
        raise CliError(f"the delivery worker is not available: {exc}") from None
    if not (hasattr(deliver, "main") and hasattr(deliver, "replay")):
        raise CliError("the delivery worker is not available: intercept.deliver has no "
                       "main()/replay()")
    if rest[:1] == ["replay"]:
        rp = Parser(prog="spitwall deliver replay", parents=[_common()],
                    description="re-queue dead-lettered events (intercept admin role)")
        rp.add_argument("--count", type=int, metavar="N", help="at most N events (default all)")
        sub_args = rp.parse_args(rest[1:])
        if getattr(sub_args, "redis", None) is None and getattr(args, "redis", None):
            sub_args.redis = args.redis
        if sub_args.count is not None and sub_args.count < 1:
            raise ValueError("--count must be at least 1")
        from intercept.provision import append_audit

        c = client(sub_args)
        n = int(deliver.replay(c, sub_args.count))
        append_audit(c, "deliver.replay", detail={"count": sub_args.count, "replayed": n})
        emit(sub_args, {"replayed": n}, lambda: f"re-queued {n} dead-lettered event(s)")
        return 0
    if getattr(args, "redis", None) and "--redis" not in rest:
        rest = ["--redis", args.redis, *rest]
    return int(deliver.main(rest))


# -- parser ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from lists.model import KINDS, LIST_NAMES

    common = _common()
    top = Parser(prog="spitwall", description="spitwall operator tool", parents=[common])
    sub: Any = top.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True

    try:
        from ops import lab
    except ImportError:  # the lab runner is optional for operators without the repo
        lab = None  # type: ignore[assignment]
    if lab is not None:
        lab.register(sub)

    cfg = sub.add_parser("config", help="show or tune the live config")
    csub: Any = cfg.add_subparsers(dest="action", metavar="ACTION", parser_class=Parser)
    csub.required = True
    csub.add_parser("show", parents=[common], help="effective config").set_defaults(
        func=cmd_config_show)
    s = csub.add_parser("set", parents=[common], help="set KEY to VALUE (validated, audited)")
    s.add_argument("key")
    s.add_argument("value")
    s.set_defaults(func=cmd_config_set)
    r = csub.add_parser("reset", parents=[common], help="back to defaults (one KEY or all)")
    r.add_argument("key", nargs="?")
    r.set_defaults(func=cmd_config_reset)

    lst = sub.add_parser("list", help="allow/block/scanner lists")
    lsub: Any = lst.add_subparsers(dest="action", metavar="ACTION", parser_class=Parser)
    lsub.required = True
    for action, func, needs_value in (("add", cmd_list_add, True),
                                      ("remove", cmd_list_remove, True),
                                      ("show", cmd_list_show, False)):
        p = lsub.add_parser(action, parents=[common], help=f"{action} list entries")
        p.add_argument("list", choices=LIST_NAMES)
        if needs_value:
            p.add_argument("kind", choices=KINDS)
            p.add_argument("value", nargs="?")
        else:
            p.add_argument("kind", nargs="?")
        if action == "add":
            p.add_argument("--ttl", type=_positive, metavar="SECONDS")
            p.add_argument("--reason", metavar="TEXT")
        p.set_defaults(func=func)
    for action, func in (("import", cmd_list_import), ("export", cmd_list_export)):
        p = lsub.add_parser(action, parents=[common], help=f"{action} all lists (JSON file)")
        p.add_argument("file")
        p.set_defaults(func=func)

    nb = sub.add_parser("numbers", help="the number database: millions of allow/block/dno "
                        "numbers, looked up in Redis")
    nsub: Any = nb.add_subparsers(dest="action", metavar="ACTION", parser_class=Parser)
    nsub.required = True
    number_lists = ("allow", "block", "dno")
    p = nsub.add_parser("import", parents=[common],
                        help="add the numbers of a file (NUMBER[,REASON] per line)")
    p.add_argument("list", choices=number_lists)
    p.add_argument("file")
    p.add_argument("--ttl", type=_positive, metavar="SECONDS")
    p.add_argument("--reason", metavar="TEXT", help="for lines without their own reason")
    p.add_argument("--replace", action="store_true",
                   help="then remove the list's numbers that are not in the file (the list "
                        "becomes the file: a full feed)")
    p.set_defaults(func=cmd_numbers_import)
    p = nsub.add_parser("add", parents=[common], help="add one number")
    p.add_argument("list", choices=number_lists)
    p.add_argument("number")
    p.add_argument("--ttl", type=_positive, metavar="SECONDS")
    p.add_argument("--reason", metavar="TEXT")
    p.set_defaults(func=cmd_numbers_add)
    p = nsub.add_parser("remove", parents=[common], help="remove one number")
    p.add_argument("list", choices=number_lists)
    p.add_argument("number")
    p.set_defaults(func=cmd_numbers_remove)
    p = nsub.add_parser("check", parents=[common], help="on which lists a number is")
    p.add_argument("number")
    p.set_defaults(func=cmd_numbers_check)
    p = nsub.add_parser("count", parents=[common], help="numbers per list (scans Redis)")
    p.add_argument("list", nargs="?", choices=number_lists)
    p.set_defaults(func=cmd_numbers_count)
    p = nsub.add_parser("export", parents=[common], help="write a list in the import format")
    p.add_argument("list", choices=number_lists)
    p.add_argument("file")
    p.set_defaults(func=cmd_numbers_export)
    p = nsub.add_parser("clear", parents=[common], help="remove every number of a list")
    p.add_argument("list", choices=number_lists)
    p.set_defaults(func=cmd_numbers_clear)

    ex = sub.add_parser("explain", parents=[common], help="why a call got its decision")
    ex.add_argument("call_id", metavar="CALL-ID")
    ex.set_defaults(func=cmd_explain)

    au = sub.add_parser("audit", parents=[common], help="recent config and list changes")
    au.add_argument("--count", type=int, default=50)
    au.set_defaults(func=cmd_audit)

    rp = sub.add_parser("report", parents=[common],
                        help="report a caller as spam or ok (or show its reputation)")
    rp.add_argument("caller", metavar="CALLER", help="number or SIP URI")
    rp.add_argument("verdict", choices=("spam", "ok", "show"))
    rp.add_argument("--ip", metavar="IP", help="also the source IP's reputation")
    rp.set_defaults(func=cmd_report)

    stp = sub.add_parser("stir", help="STIR/SHAKEN certificate fetcher (out of band)")
    ssub: Any = stp.add_subparsers(dest="action", metavar="ACTION", parser_class=Parser)
    ssub.required = True
    sf = ssub.add_parser("fetch", parents=[common],
                         help="fetch certificates of unverified PASSporTs (allow-listed hosts)")
    sf.add_argument("--loop", action="store_true", help="keep running (a worker)")
    sf.add_argument("--interval", type=_positive, default=1.0, metavar="SECONDS")
    sf.add_argument("--timeout", type=_positive, default=2.0, metavar="SECONDS")
    sf.set_defaults(func=cmd_stir_fetch)

    qp = sub.add_parser("queue", help="spam voicemail and voicemail queues")
    qsub: Any = qp.add_subparsers(dest="action", metavar="ACTION", parser_class=Parser)
    qsub.required = True
    ql = qsub.add_parser("list", parents=[common], help="newest messages first")
    ql.add_argument("queue", nargs="?", choices=("spam", "voicemail"))
    ql.add_argument("--limit", type=int, default=50)
    ql.set_defaults(func=cmd_queue_list)
    qe = qsub.add_parser("export", parents=[common], help="copy a message's WAV")
    qe.add_argument("id")
    qe.add_argument("dest", metavar="FILE-OR-DIR")
    qe.set_defaults(func=cmd_queue_export)
    qy = qsub.add_parser("play", parents=[common], help="play a message (sox 'play')")
    qy.add_argument("id")
    qy.set_defaults(func=cmd_queue_play)
    qm = qsub.add_parser("mark", parents=[common],
                         help="operator verdict: spam or ham (feeds reputation)")
    qm.add_argument("id")
    qm.add_argument("verdict", choices=("spam", "ham"))
    qm.set_defaults(func=cmd_queue_mark)

    rv = sub.add_parser("review", parents=[common],
                        help="the queue review web page (foreground; SIGTERM stops it)")
    rv.add_argument("--listen", default="127.0.0.1:8088", metavar="HOST:PORT",
                    help="address to serve on (default 127.0.0.1:8088; IPv6: [::1]:8088)")
    rva = rv.add_mutually_exclusive_group()
    rva.add_argument("--auth-file", metavar="FILE",
                     help="HTTP Basic users, one user:password line each (required off loopback)")
    rva.add_argument("--no-auth", action="store_true",
                     help="no password (only with a loopback --listen)")
    rv.add_argument("--queue-dir", metavar="DIR",
                    help="the answering machine's queue directory (default: "
                    "$SPITWALL_QUEUE_DIR or .lab/queue)")
    rv.set_defaults(func=cmd_review)

    md = sub.add_parser("media", help="run the phase-2 answering machine (foreground)",
                        add_help=False)
    md.add_argument("rest", nargs=argparse.REMAINDER)
    md.set_defaults(func=cmd_media)

    _add_intercept_parsers(sub, common)

    st = sub.add_parser("stats", parents=[common], help="decision counters")
    st.set_defaults(func=cmd_stats)

    mt = sub.add_parser("metrics", parents=[common],
                        help="Prometheus exporter (foreground; SIGTERM stops it)")
    mt.add_argument("--listen", default="127.0.0.1:9464", metavar="HOST:PORT",
                    help="address to serve /metrics on (default 127.0.0.1:9464; IPv6: "
                    "[::1]:9464); there is no authentication")
    mt.add_argument("--media-stats", metavar="FILE",
                    help="the answering machine's --stats-file, exported too")
    mt.add_argument("--li-redis", metavar="URL",
                    help="intercept role's Redis URL (default $SPITWALL_LI_REDIS): exports the "
                    "delivery worker's counters and backlog; inside the LI domain only")
    mt.set_defaults(func=cmd_metrics)
    return top


def _add_intercept_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    from intercept.targets import DELIVERABLES, MODES, SIDES

    ip = sub.add_parser("intercept", help="intercept/recording targets (intercept role only)",
                        description="Provision intercept and recording targets. Needs the "
                        "spitwall-li-admin Redis user; every change is audited.")
    isub: Any = ip.add_subparsers(dest="action", metavar="ACTION", parser_class=Parser)
    isub.required = True
    a = isub.add_parser("add", parents=[common], help="provision a target (LIID)")
    a.add_argument("--liid", required=True, metavar="ID", help="case id (1-64 of A-Za-z0-9._-)")
    a.add_argument("--target", required=True, action="append", metavar="URI-OR-NUMBER",
                   help="SIP URI user@domain or E.164 number (repeatable)")
    a.add_argument("--deliver-to", required=True, metavar="SIP-URI|subscribe",
                   help="recorder / mediation function to PUBLISH to, or 'subscribe'")
    a.add_argument("--cert", required=True, metavar="PEM-FILE",
                   help="recipient certificate (RSA); events are encrypted to it")
    a.add_argument("--start", type=_iso_time, metavar="ISO-TIME", help="default: now")
    a.add_argument("--end", type=_iso_time, metavar="ISO-TIME", help="default: none")
    a.add_argument("--deliver", type=_csv(DELIVERABLES, "--deliver"), metavar="keys,events",
                   help="what to deliver (default: keys,events)")
    a.add_argument("--mode", choices=MODES, default="intercept")
    a.add_argument("--match", type=_csv(SIDES, "--match"), metavar="caller,callee",
                   help="which side of a call the target may be on (default: both)")
    a.add_argument("--replace", action="store_true", help="replace an existing LIID")
    a.set_defaults(func=cmd_intercept_add)
    isub.add_parser("list", parents=[common], help="all targets").set_defaults(
        func=cmd_intercept_list)
    s = isub.add_parser("show", parents=[common], help="one target as JSON (no PEM)")
    s.add_argument("liid", metavar="LIID")
    s.set_defaults(func=cmd_intercept_show)
    r = isub.add_parser("remove", parents=[common], help="remove a target")
    r.add_argument("liid", metavar="LIID")
    r.set_defaults(func=cmd_intercept_remove)
    au = isub.add_parser("audit", parents=[common], help="the intercept audit stream")
    au.add_argument("-n", type=int, default=20, metavar="N", help="last N entries (default 20)")
    au.set_defaults(func=cmd_intercept_audit)

    rc = sub.add_parser("recorder", help="recorders allowed to SUBSCRIBE (intercept role only)")
    rsub: Any = rc.add_subparsers(dest="action", metavar="ACTION", parser_class=Parser)
    rsub.required = True
    ra = rsub.add_parser("allow", parents=[common], help="allow addresses to SUBSCRIBE")
    ra.add_argument("address", nargs="+", metavar="ADDRESS", help="IP, IP:port or CIDR")
    ra.add_argument("--user", metavar="NAME", help="also require digest credentials")
    ra.add_argument("--password-file", metavar="FILE",
                    help="file holding the password (else prompted); only its HA1s are stored")
    ra.add_argument("--no-md5", action="store_true",
                    help="accept only SHA-256 digests (RFC 8760), not MD5 (default: both, "
                         "SHA-256 offered first)")
    ra.add_argument("--liid", action="append", metavar="ID",
                    help="only for this LIID (repeatable; default: any)")
    ra.set_defaults(func=cmd_recorder_allow)
    rsub.add_parser("list", parents=[common], help="allowed recorders").set_defaults(
        func=cmd_recorder_list)
    rr = rsub.add_parser("remove", parents=[common], help="remove allowed addresses")
    rr.add_argument("address", nargs="+", metavar="ADDRESS")
    rr.set_defaults(func=cmd_recorder_remove)

    dv = sub.add_parser("deliver", add_help=False,
                        help="intercept delivery worker (foreground); 'deliver replay' "
                        "re-queues dead letters")
    dv.add_argument("rest", nargs=argparse.REMAINDER)
    dv.set_defaults(func=cmd_deliver)


def _text(x: Any) -> str:
    return x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)


def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return v


#: commands whose arguments all go to another program's parser (argparse's REMAINDER does not
#: take a leading option such as `spitwall deliver --consumer w1`)
PASSTHROUGH = ("deliver", "media")


def _split_passthrough(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """``[global options] deliver|media ARGS...`` -> (argv up to the command, ARGS)."""
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--redis":
            i += 2
        elif a.startswith("--redis=") or a == "--json":
            i += 1
        else:
            break
    if i < len(argv) and argv[i] in PASSTHROUGH:
        return argv[:i + 1], argv[i + 1:]
    return argv, None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    head, rest = _split_passthrough(list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(head)
    if rest is not None:
        args.rest = rest
    try:
        rc = args.func(args)
        return int(rc or 0)
    except CliError as exc:
        sys.stderr.write(f"spitwall: error: {exc}\n")
        return EXIT_FAIL
    except ValueError as exc:
        sys.stderr.write(f"spitwall: error: {exc}\n")
        return EXIT_USAGE
    except redis.exceptions.NoPermissionError as exc:
        sys.stderr.write(f"spitwall: error: Redis refused it for this user (ACL): {exc}\n")
        return EXIT_FAIL
    except redis.RedisError as exc:
        sys.stderr.write(f"spitwall: error: Redis: {exc}\n")
        return EXIT_FAIL
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
