"""`spitwall review`: the spam-queue review web page (what `spitwall queue list|play|mark` do,
in a browser).

Three routes:

* ``GET /[?queue=spam|voicemail][&limit=N]``: the newest messages, each with an audio player
  and spam/ham buttons;
* ``GET /audio/<id>.wav``: one message's WAV, from ``<queue-dir>/<queue>/<id>.wav`` only;
* ``POST /mark`` (``id``, ``verdict``, ``csrf``): `media.queue.mark_with_feedback`, the function
  behind `spitwall queue mark` (so the page and the CLI cannot diverge), then 303 to the list.

Why plain WSGI and the standard library's `wsgiref` instead of a web framework: three routes
and one form do not need one, and the operator tool stays free of an extra dependency (and of
its security updates). The server is threaded so that a slow audio download does not block the
list page.

What the page shows comes from SIP headers, i.e. from spammers: every value is HTML-escaped,
and a strict Content-Security-Policy (no scripts at all) backs that up. Access needs HTTP Basic
credentials from an auth file (``user:password`` lines) unless the page is bound to loopback
with an explicit ``--no-auth``; a POST must carry the per-process CSRF token and, when the
browser sends an Origin, come from the page's own origin. Basic credentials travel in clear
over plain HTTP: off the host, put the page behind a TLS reverse proxy or an SSH tunnel.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hmac
import html
import logging
import os
import secrets
import signal
import socket
import socketserver
import stat
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import Any, BinaryIO
from urllib.parse import parse_qs, urlencode, urlsplit
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import redis

from media.queue import QUEUES, VERDICTS, Message, MessageQueue, mark_with_feedback, safe_id

log = logging.getLogger("spitwall.review")

DEFAULT_LISTEN = "127.0.0.1:8088"
DEFAULT_LIMIT = 50
MAX_LIMIT = 500
MAX_FORM_BYTES = 4096
REALM = "spitwall review"
CHUNK = 64 * 1024

#: sent with every answer. No script source at all: even an escaping bug could not run code.
SECURITY_HEADERS: tuple[tuple[str, str], ...] = (
    ("Content-Security-Policy",
     "default-src 'none'; media-src 'self'; style-src 'unsafe-inline'; form-action 'self'; "
     "frame-ancestors 'none'; base-uri 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
    ("Cache-Control", "no-store"),
)

StartResponse = Callable[..., Any]
Environ = Mapping[str, Any]


class HttpError(Exception):
    """An answer other than 200, with a one-line text body (never a traceback)."""

    def __init__(self, status: str, message: str,
                 headers: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = list(headers)


# -- configuration -----------------------------------------------------------------------------
def load_users(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``user:password`` lines of an auth file (blank lines and ``#`` comments skipped).

    ValueError with a one-line message (naming the line, never its content: it holds a
    password) for a malformed file, OSError when it cannot be read."""
    users: dict[str, str] = {}
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"auth file {path} is not UTF-8") from None
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user or not password:
            raise ValueError(f"auth file {path} line {n}: expected user:password")
        users[user] = password
    if not users:
        raise ValueError(f"auth file {path} has no user:password line")
    return users


def auth_file_too_open(path: str | os.PathLike[str]) -> bool:
    """True when others than the owner may read the auth file (worth a warning).

    A systemd credential (``LoadCredential=``: the file is directly in ``$CREDENTIALS_DIRECTORY``)
    is judged by its "other" bits only. systemd writes it 0400 into a per-service directory on a
    read-only file system that only the service's user may enter. On ramfs (Debian 12's systemd
    252) the file then belongs to that user; on tmpfs (newer systemd) it stays root's and the user
    gets read access through an ACL entry, and `stat` shows the ACL mask in the group bits (0440)
    although no group may read it: a warning there would be false, on every start."""
    mode = os.stat(path).st_mode
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds and Path(path).resolve().parent == Path(creds).resolve():
        return bool(mode & stat.S_IRWXO)
    return bool(mode & (stat.S_IRWXG | stat.S_IRWXO))


# -- the WSGI application ---------------------------------------------------------------------
class ReviewApp:
    """The WSGI application. `users` None means no authentication (loopback only: `serve`'s
    callers check that); `csrf_token` is random per process unless a test fixes it."""

    def __init__(self, queue: MessageQueue, *, users: Mapping[str, str] | None,
                 csrf_token: str | None = None) -> None:
        self.queue = queue
        self.users = dict(users) if users is not None else None
        self.csrf_token = csrf_token or secrets.token_urlsafe(32)
        #: failures by kind ("redis", "internal"), logged as they happen
        self.errors: Counter[str] = Counter()

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        method = str(environ.get("REQUEST_METHOD", "GET")).upper()
        status: str
        headers: list[tuple[str, str]]
        body: Iterable[bytes]
        try:
            user = self._authenticate(environ)
            status, headers, body = self._route(environ, method, user)
        except HttpError as err:
            status, headers, body = err.status, err.headers, [err.message.encode() + b"\n"]
            headers = [*headers, ("Content-Type", "text/plain; charset=utf-8"),
                       ("Content-Length", str(len(body[0])))]
        except redis.RedisError as exc:
            self.errors["redis"] += 1
            log.warning("Redis unavailable: %s", exc)
            msg = b"Redis is unavailable; try again later.\n"
            status = "503 Service Unavailable"
            headers = [("Content-Type", "text/plain; charset=utf-8"),
                       ("Content-Length", str(len(msg))), ("Retry-After", "5")]
            body = [msg]
        except Exception:  # a bug must not kill the server: logged with traceback, counted
            self.errors["internal"] += 1
            log.exception("review page: %s %s failed (%d so far)", method,
                          environ.get("PATH_INFO", ""), self.errors["internal"])
            msg = b"Internal error; see the server's log.\n"
            status = "500 Internal Server Error"
            headers = [("Content-Type", "text/plain; charset=utf-8"),
                       ("Content-Length", str(len(msg)))]
            body = [msg]
        start_response(status, [*headers, *SECURITY_HEADERS])
        if method == "HEAD":
            if hasattr(body, "close"):
                body.close()
            return []
        return body

    # -- access control
    def _authenticate(self, environ: Environ) -> str | None:
        """The user name (None without authentication), or 401."""
        if self.users is None:
            return None
        challenge = [("WWW-Authenticate", f'Basic realm="{REALM}", charset="UTF-8"')]
        scheme, _, token = str(environ.get("HTTP_AUTHORIZATION", "")).partition(" ")
        try:
            user, sep, password = (base64.b64decode(token.strip(), validate=True)
                                   .decode("utf-8").partition(":"))
        except ValueError:  # not base64 (binascii.Error), not ASCII, not UTF-8
            sep = user = password = ""
        if scheme.lower() != "basic" or not sep:
            raise HttpError("401 Unauthorized", "authentication required", challenge)
        ok = False
        for name, secret in self.users.items():  # no early exit: the time tells nothing
            same_user = hmac.compare_digest(name.encode(), user.encode())
            same_password = hmac.compare_digest(secret.encode(), password.encode())
            ok |= same_user & same_password
        if not ok:
            log.warning("review page: failed login as %r from %s", user[:64],
                        environ.get("REMOTE_ADDR", "?"))
            raise HttpError("401 Unauthorized", "wrong user name or password", challenge)
        return user

    def _check_same_origin(self, environ: Environ) -> None:
        """403 for a cross-site POST: a present Origin must name our Host; browsers that send
        Sec-Fetch-Site must call it same-origin."""
        origin = environ.get("HTTP_ORIGIN")
        host = str(environ.get("HTTP_HOST", "")).lower()
        if origin is not None and (not host or urlsplit(str(origin)).netloc.lower() != host):
            raise HttpError("403 Forbidden", "cross-origin request refused")
        if environ.get("HTTP_SEC_FETCH_SITE", "same-origin") not in ("same-origin", "none"):
            raise HttpError("403 Forbidden", "cross-site request refused")

    # -- routing
    def _route(self, environ: Environ, method: str,
               user: str | None) -> tuple[str, list[tuple[str, str]], Iterable[bytes]]:
        path = str(environ.get("PATH_INFO", "") or "/")
        if path == "/":
            self._allow(method, ("GET", "HEAD"))
            return self._list_page(environ)
        if path.startswith("/audio/"):
            self._allow(method, ("GET", "HEAD"))
            return self._audio(environ, path.removeprefix("/audio/"))
        if path == "/mark":
            self._allow(method, ("POST",))
            return self._mark(environ, user)
        raise HttpError("404 Not Found", "not found")

    @staticmethod
    def _allow(method: str, allowed: tuple[str, ...]) -> None:
        if method not in allowed:
            raise HttpError("405 Method Not Allowed", f"use {' or '.join(allowed)}",
                            [("Allow", ", ".join(allowed))])

    # -- GET /
    def _list_page(self, environ: Environ
                   ) -> tuple[str, list[tuple[str, str]], Iterable[bytes]]:
        params = _query(str(environ.get("QUERY_STRING", "")))
        queue = _queue_param(params.get("queue", ""))
        limit = _limit_param(params.get("limit", ""))
        msgs = sorted(self.queue.list(queue or None, limit=limit),
                      key=lambda m: _num(m.meta.get("ts")), reverse=True)[:limit]
        page = render_page(msgs, queue=queue, limit=limit, csrf=self.csrf_token,
                           authenticated=self.users is not None)
        body = page.encode("utf-8")
        return "200 OK", [("Content-Type", "text/html; charset=utf-8"),
                          ("Content-Length", str(len(body)))], [body]

    # -- GET /audio/<id>.wav
    def _audio(self, environ: Environ, name: str
               ) -> tuple[str, list[tuple[str, str]], Iterable[bytes]]:
        if not name.endswith(".wav"):
            raise HttpError("404 Not Found", "not found")
        mid = _message_id(name.removesuffix(".wav"))
        try:
            msg = self.queue.get(mid)
        except ValueError:
            raise HttpError("404 Not Found", f"no queued message {mid}") from None
        # The file name is built from the validated id and a known queue name, inside the
        # configured queue directory: the path stored in the metadata is not trusted.
        path = self.queue.dir / msg.queue / f"{mid}.wav"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise HttpError("404 Not Found", f"the audio of {mid} is not in the queue directory "
                            f"{self.queue.dir} (is it the answering machine's?)") from None
        except OSError as exc:
            log.warning("audio of %s: %s", mid, exc)
            raise HttpError("404 Not Found", f"the audio of {mid} cannot be read") from None
        fh = os.fdopen(fd, "rb")
        try:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise HttpError("404 Not Found", f"the audio of {mid} is not a file")
        except BaseException:
            fh.close()
            raise
        return "200 OK", [("Content-Type", "audio/wav"), ("Content-Length", str(st.st_size)),
                          ("Content-Disposition", f'inline; filename="{mid}.wav"')], \
            FileBody(fh)

    # -- POST /mark
    def _mark(self, environ: Environ, user: str | None
              ) -> tuple[str, list[tuple[str, str]], Iterable[bytes]]:
        self._check_same_origin(environ)
        form = _read_form(environ)
        if not hmac.compare_digest(form.get("csrf", "").encode(), self.csrf_token.encode()):
            raise HttpError("403 Forbidden", "missing or stale form token; reload the page")
        mid = _message_id(form.get("id", ""))
        verdict = form.get("verdict", "")
        if verdict not in VERDICTS:
            raise HttpError("400 Bad Request", "verdict must be spam or ham")
        by = f"{user} (review page)" if user is not None else "unauthenticated (review page)"
        try:
            mark_with_feedback(self.queue, mid, verdict, by=by)
        except ValueError:
            raise HttpError("404 Not Found", f"no queued message {mid}") from None
        log.info("review page: %s marked %s as %s (from %s)", by, mid, verdict,
                 environ.get("REMOTE_ADDR", "?"))
        # back to the same view; only validated values go into Location (no open redirect)
        try:
            back = {"queue": _queue_param(form.get("queue", "")),
                    "limit": str(_limit_param(form.get("limit", "")))}
        except HttpError:
            back = {"queue": "", "limit": str(DEFAULT_LIMIT)}
        location = "/?" + urlencode({k: v for k, v in back.items() if v}) + f"#m-{mid}"
        msg = f"marked {mid} as {verdict}\n".encode()
        return "303 See Other", [("Location", location),
                                 ("Content-Type", "text/plain; charset=utf-8"),
                                 ("Content-Length", str(len(msg)))], [msg]


# -- request helpers ---------------------------------------------------------------------------
def _query(text: str) -> dict[str, str]:
    """The first value of each query or form field; 400 on junk."""
    try:
        fields = parse_qs(text, keep_blank_values=True, strict_parsing=False,
                          max_num_fields=20, errors="strict")
    except (ValueError, UnicodeDecodeError):
        raise HttpError("400 Bad Request", "malformed query or form") from None
    return {k: v[0] for k, v in fields.items()}


def _read_form(environ: Environ) -> dict[str, str]:
    ctype = str(environ.get("CONTENT_TYPE", "")).split(";", 1)[0].strip().lower()
    if ctype != "application/x-www-form-urlencoded":
        raise HttpError("400 Bad Request", "expected a form (application/x-www-form-urlencoded)")
    try:
        length = int(environ.get("CONTENT_LENGTH") or "")
    except ValueError:
        raise HttpError("400 Bad Request", "missing Content-Length") from None
    if not 0 <= length <= MAX_FORM_BYTES:
        raise HttpError("400 Bad Request", f"form larger than {MAX_FORM_BYTES} bytes")
    raw = environ["wsgi.input"].read(length)
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise HttpError("400 Bad Request", "malformed form") from None
    return _query(text)


def _message_id(text: str) -> str:
    try:
        return safe_id(text)
    except ValueError:
        raise HttpError("400 Bad Request", "not a message id") from None


def _queue_param(text: str) -> str:
    if text and text not in QUEUES:
        raise HttpError("400 Bad Request", f"queue must be one of {', '.join(QUEUES)}")
    return text


def _limit_param(text: str) -> int:
    if not text:
        return DEFAULT_LIMIT
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
        raise HttpError("400 Bad Request", f"limit must be a number from 1 to {MAX_LIMIT}")
    return int(text)


class FileBody:
    """A WSGI body that streams an open file in chunks and closes it in `close()`, which the
    server calls even when the body is never iterated (HEAD, a client gone)."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh = fh

    def __iter__(self) -> Iterator[bytes]:
        while block := self.fh.read(CHUNK):
            yield block

    def close(self) -> None:
        self.fh.close()


# -- HTML --------------------------------------------------------------------------------------
def _e(value: Any) -> str:
    """Escaped text for HTML content and quoted attributes (metadata comes from spammers)."""
    return html.escape(str(value), quote=True)


def _num(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def _when(ts: Any) -> str:
    try:
        return dt.datetime.fromtimestamp(float(ts), dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    except (TypeError, ValueError, OverflowError, OSError):
        return "-"


def _fixed(value: Any, fmt: str) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return format(value, fmt)
    return "" if value is None else str(value)


def _features(value: Any) -> str:
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={_fixed(v, '.3g')}" for k, v in sorted(value.items(), key=str))
    return "" if value is None else str(value)


def _clip(value: Any, n: int = 120) -> str:
    text = "" if value is None else str(value)
    return text if len(text) <= n else text[:n - 1] + "…"


STYLE = """
body{font:14px system-ui,sans-serif;margin:1em}table{border-collapse:collapse;width:100%}
th,td{border-bottom:1px solid #ddd;padding:.3em .5em;text-align:left;vertical-align:middle}
th{background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums}
td.f{font-size:12px;color:#555;max-width:24em}tr.spam td.m{color:#b00;font-weight:bold}
tr.ham td.m{color:#070;font-weight:bold}form{display:inline;white-space:nowrap}
audio{height:2em;width:14em}nav a{margin-right:1em}
"""


def _row(m: Message, *, queue: str, limit: int, csrf: str) -> str:
    meta = m.meta
    mark = str(meta.get("mark", "") or "")
    marked = mark + (f" by {_clip(meta['marked_by'], 60)}" if mark and meta.get("marked_by")
                     else "")
    return (
        f'<tr id="m-{_e(m.id)}" class="{_e(mark)}">'
        f"<td>{_e(_when(meta.get('ts')))}</td><td>{_e(m.queue)}</td>"
        f"<td class=n>{_e(_fixed(meta.get('seconds', 0), '.1f'))}</td>"
        f"<td>{_e(_clip(meta.get('caller', '')))}</td>"
        f"<td>{_e(_clip(meta.get('callee', '')))}</td>"
        f"<td class=n>{_e(_fixed(meta.get('phase1_score', ''), '.2f'))}</td>"
        f"<td>{_e(_clip(meta.get('verdict', ''), 20))}</td>"
        f"<td class=f>{_e(_clip(_features(meta.get('features')), 300))}</td>"
        f"<td class=m>{_e(marked)}</td>"
        f'<td><audio controls preload="none" src="/audio/{_e(m.id)}.wav"></audio></td>'
        f'<td><form method="post" action="/mark">'
        f'<input type="hidden" name="id" value="{_e(m.id)}">'
        f'<input type="hidden" name="csrf" value="{_e(csrf)}">'
        f'<input type="hidden" name="queue" value="{_e(queue)}">'
        f'<input type="hidden" name="limit" value="{limit}">'
        f'<button name="verdict" value="spam">spam</button> '
        f'<button name="verdict" value="ham">ham</button></form></td></tr>'
    )


def render_page(msgs: list[Message], *, queue: str, limit: int, csrf: str,
                authenticated: bool) -> str:
    """The list page; `queue` "" for both queues."""
    links = " ".join(
        f'<a href="/?{_e(urlencode({k: v for k, v in (("queue", q), ("limit", limit)) if v}))}">'
        f"{'<b>' if q == queue else ''}{_e(q or 'both queues')}{'</b>' if q == queue else ''}</a>"
        for q in ("", *QUEUES))
    rows = "\n".join(_row(m, queue=queue, limit=limit, csrf=csrf) for m in msgs)
    empty = "" if msgs else "<p>The queue is empty.</p>"
    note = "" if authenticated else "<p><b>No authentication</b> (loopback only).</p>"
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>spitwall: queue review</title><style>{STYLE}</style></head><body>"
        f"<h1>spitwall: queue review</h1><nav>{links}</nav>{note}"
        f"<p>{len(msgs)} message(s), newest first (at most {limit}). Marking spam or ham "
        "feeds the caller's and the source IP's reputation, like "
        "<code>spitwall queue mark</code>.</p>"
        "<table><thead><tr><th>time (UTC)</th><th>queue</th><th>s</th><th>caller</th>"
        "<th>callee</th><th>phase 1</th><th>verdict</th><th>features</th><th>mark</th>"
        "<th>listen</th><th>review</th></tr></thead>\n"
        f"<tbody>\n{rows}\n</tbody></table>{empty}</body></html>\n"
    )


# -- the server --------------------------------------------------------------------------------
class _Handler(WSGIRequestHandler):
    """wsgiref's handler with a socket timeout (an idle client cannot hold a thread for
    ever) and the access log through `logging` instead of bare stderr."""

    timeout = 30

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), format % args)


class ReviewServer(socketserver.ThreadingMixIn, WSGIServer):
    """A threading WSGI server for IPv4 or IPv6; worker threads die with the process."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host: str, port: int) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), _Handler)


def make_server(app: ReviewApp, host: str = "127.0.0.1", port: int = 8088) -> ReviewServer:
    """A bound server for `app` (port 0: the kernel picks one; see `server_address`)."""
    server = ReviewServer(host, port)
    server.set_app(app)
    return server


def serve(app: ReviewApp, host: str = "127.0.0.1", port: int = 8088, *,
          ready: Callable[[ReviewServer], None] | None = None) -> int:
    """Run `app` in the foreground until SIGTERM or SIGINT; returns 0 after a clean stop.

    `ready` is called once the socket is bound (to print the address). The signal handler
    only starts `shutdown()` in a thread: called in the thread that runs `serve_forever`, it
    would wait for itself."""
    server = make_server(app, host, port)
    stopping = threading.Event()

    def stop(signum: int, _frame: FrameType | None) -> None:
        if not stopping.is_set():
            stopping.set()
            log.info("review page: signal %d, stopping", signum)
            threading.Thread(target=server.shutdown, daemon=True).start()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        if ready is not None:
            ready(server)
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        for sig, handler in previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, handler)
    return 0
