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
        c = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=3)
        c.ping()
    except ValueError as exc:
        raise CliError(f"bad --redis URL {url!r}: {exc}") from None
    except redis.RedisError as exc:
        raise CliError(f"cannot reach Redis at {url}: {exc}") from None
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


# -- explain -----------------------------------------------------------------------------
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
    half = cfg.get_float("reputation.half_life")
    if args.verdict == "show":
        data = reputation.read(c, caller=args.caller, ip=args.ip or "", half_life=half)
    else:
        kind = "report_spam" if args.verdict == "spam" else "report_ok"
        reputation.apply_feedback(c, caller=args.caller, ip=args.ip or "", kind=kind,
                                  half_life=half)
        data = reputation.read(c, caller=args.caller, ip=args.ip or "", half_life=half)
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
    from scoring import config_admin, reputation

    q = _queue(args)
    msg = q.mark(args.id, args.verdict)
    cfg, _raw = config_admin.show(q.client)
    caller, ip = str(msg.meta.get("caller_key", "")), str(msg.meta.get("source_ip", ""))
    if caller or ip:
        reputation.apply_feedback(q.client, caller=caller, ip=ip,
                                  kind="report_spam" if args.verdict == "spam" else "report_ok",
                                  half_life=cfg.get_float("reputation.half_life"))
    emit(args, _msg_json(msg), lambda: f"marked {args.id} as {args.verdict}")
    return 0


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

    md = sub.add_parser("media", help="run the phase-2 answering machine (foreground)",
                        add_help=False)
    md.add_argument("rest", nargs=argparse.REMAINDER)
    md.set_defaults(func=cmd_media)

    st = sub.add_parser("stats", parents=[common], help="decision counters")
    st.set_defaults(func=cmd_stats)
    return top


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
        return int(rc or 0)
    except CliError as exc:
        sys.stderr.write(f"spitwall: error: {exc}\n")
        return EXIT_FAIL
    except ValueError as exc:
        sys.stderr.write(f"spitwall: error: {exc}\n")
        return EXIT_USAGE
    except redis.RedisError as exc:
        sys.stderr.write(f"spitwall: error: Redis: {exc}\n")
        return EXIT_FAIL
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
