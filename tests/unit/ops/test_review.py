"""ops/review.py, the queue review web page: served for real on 127.0.0.1 (a thread, or the real
`spitwall review` process) against a real redis-server and a real queue directory."""

from __future__ import annotations

import base64
import contextlib
import http.client
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import msgpack
import pytest
import redis

from media.queue import MessageQueue, meta_key
from ops import cli
from ops.procs import free_port, wait_until
from ops.review import SECURITY_HEADERS, ReviewApp, make_server
from scoring import reputation
from tests.unit.scoring.support import dead_redis_url

PCM = b"\x01\x00\xff\xff" * 4000  # 1 s at 8 kHz
USERS = {"alice": "s3cret:with:colons", "bob": "hunter2"}
ALICE = ("alice", USERS["alice"])
TOKEN = "test-csrf-token-0123456789"
REPO = Path(__file__).resolve().parents[3]
CALLER_REP = "spitwall:{caller:tel:4155550100}:rep"
IP_REP = "spitwall:{ip:192.0.2.7}:rep"


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")


@dataclass
class Site:
    """A review page served in a thread of this process."""

    port: int
    queue: MessageQueue

    def request(self, method: str, path: str, *, auth: tuple[str, str] | None = ALICE,
                headers: dict[str, str] | None = None, body: bytes | None = None) -> Reply:
        """One raw request (http.client: the path goes out exactly as given)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        hdrs = dict(headers or {})
        if auth is not None:
            hdrs["Authorization"] = basic(*auth)
        try:
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()

    def get(self, path: str, *, auth: tuple[str, str] | None = ALICE) -> Reply:
        return self.request("GET", path, auth=auth)

    def post_mark(self, fields: dict[str, str], *, auth: tuple[str, str] | None = ALICE,
                  headers: dict[str, str] | None = None) -> Reply:
        hdrs = {"Content-Type": "application/x-www-form-urlencoded", **(headers or {})}
        return self.request("POST", "/mark", auth=auth, headers=hdrs,
                            body=urlencode(fields).encode())


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@contextlib.contextmanager
def serving(app: ReviewApp) -> Iterator[int]:
    """Serve `app` on a kernel-chosen loopback port in a thread; stopped and joined after."""
    server = make_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield server.server_port
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def q(redis_url: str, tmp_path: Path) -> Iterator[MessageQueue]:
    client = redis.Redis.from_url(redis_url)
    yield MessageQueue(client, tmp_path / "queue", min_free_bytes=0)
    client.close()


@pytest.fixture
def site(q: MessageQueue) -> Iterator[Site]:
    with serving(ReviewApp(q, users=USERS, csrf_token=TOKEN)) as port:
        yield Site(port, q)


def one_line(reply: Reply) -> str:
    """A short plain-text error: one line, no traceback."""
    text = reply.text
    assert reply.headers["content-type"].startswith("text/plain")
    assert text.endswith("\n") and text.count("\n") == 1, text
    assert "Traceback" not in text
    return text


def rows(page: str) -> int:
    return page.count('<tr id="m-')


# -- the list page ---------------------------------------------------------------------------
def test_list_page_shows_the_newest_messages_of_both_queues(site: Site) -> None:
    old = site.queue.store("spam", PCM, {"caller": "sip:bot1@dialer.example", "callee": "alice",
                                         "phase1_score": 0.42, "verdict": "bot",
                                         "features": {"overlap_ms": 1234.5, "hellos": 0.0}})
    time.sleep(0.01)
    vm = site.queue.store("voicemail", PCM, {"caller": "sip:carol@example.net",
                                             "callee": "bob", "verdict": "human"})
    time.sleep(0.01)
    new = site.queue.store("spam", PCM, {"caller": "sip:bot2@dialer.example", "callee": "dave",
                                         "verdict": "bot"})
    page = site.get("/")
    assert page.status == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    html = page.text
    assert rows(html) == 3
    assert html.index(new.id) < html.index(vm.id) < html.index(old.id)  # newest first
    for text in ("sip:bot1@dialer.example", "alice", "0.42", "overlap_ms=1.23e+03", "hellos=0",
                 "sip:carol@example.net", "voicemail", "1.0"):
        assert text in html
    assert f'<audio controls preload="none" src="/audio/{old.id}.wav"></audio>' in html
    assert '<form method="post" action="/mark">' in html
    assert html.count('name="verdict" value="spam"') == 3
    assert html.count('name="verdict" value="ham"') == 3
    assert html.count(f'name="csrf" value="{TOKEN}"') == 3
    assert "<script" not in html

    only_vm = site.get("/?queue=voicemail").text
    assert rows(only_vm) == 1 and vm.id in only_vm
    only_spam = site.get("/?queue=spam&limit=1").text
    assert rows(only_spam) == 1 and new.id in only_spam
    assert rows(site.get("/?limit=2").text) == 2


def test_every_answer_has_the_security_headers(site: Site) -> None:
    m = site.queue.store("spam", PCM, {"caller": "x"})
    for reply in (site.get("/"), site.get(f"/audio/{m.id}.wav"), site.get("/", auth=None),
                  site.get("/?limit=0"), site.post_mark({"id": m.id, "verdict": "spam"})):
        for name, value in SECURITY_HEADERS:
            assert reply.headers[name.lower()] == value, (reply.status, name)
    csp = dict(SECURITY_HEADERS)["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src" not in csp


def test_a_hostile_caller_is_escaped(site: Site) -> None:
    site.queue.store("spam", PCM, {
        "caller": "<script>alert(1)</script>", "callee": '"><img src=x onerror=alert(2)>',
        "verdict": "<b>bot</b>", "phase1_score": "<i>", "features": {"<svg onload=x>": 1.0},
        "mark": "\"><script>alert(3)</script>"})
    html = site.get("/").text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&quot;&gt;&lt;img src=x onerror=alert(2)&gt;" in html
    assert "&lt;svg onload=x&gt;" in html and "&lt;b&gt;bot&lt;/b&gt;" in html
    for raw in ("<script", "<img", "<svg", "<b>bot</b>", "<i>"):
        assert raw not in html


# -- audio -----------------------------------------------------------------------------------
def test_audio_is_the_exact_wav(site: Site) -> None:
    m = site.queue.store("voicemail", PCM, {"caller": "alice"})
    wav = m.path.read_bytes()
    reply = site.get(f"/audio/{m.id}.wav")
    assert reply.status == 200 and reply.body == wav
    assert reply.headers["content-type"] == "audio/wav"
    assert reply.headers["content-length"] == str(len(wav))
    head = site.request("HEAD", f"/audio/{m.id}.wav")
    assert head.status == 200 and head.body == b"" and head.headers["content-length"] == str(
        len(wav))


def test_audio_unknown_id_is_404(site: Site) -> None:
    assert one_line(site.get("/audio/1700000000-deadbeef.wav"))
    assert site.get("/audio/1700000000-deadbeef.wav").status == 404
    assert site.get("/audio/").status == 404
    assert site.get("/nowhere").status == 404


@pytest.mark.parametrize("path", [
    "/audio/../x.wav", "/audio/%2e%2e.wav", "/audio/%2e%2e%2fqueue%2fx.wav",
    "/audio/..%2f..%2f..%2fetc%2fpasswd.wav", "/audio/a%00b.wav", "/audio/a/b.wav",
    "/audio/%c3%a9.wav", "/audio/" + "1" * 65 + ".wav",
])
def test_audio_traversal_like_ids_are_400(site: Site, path: str) -> None:
    reply = site.get(path)
    assert reply.status == 400, path
    assert one_line(reply) == "not a message id\n"


def test_audio_never_leaves_the_queue_directory(site: Site, tmp_path: Path) -> None:
    """Neither a tampered metadata path nor a symlink in the queue directory is followed."""
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"TOP SECRET")
    m = site.queue.store("spam", PCM, {"caller": "x"})
    wav = m.path.read_bytes()
    tampered = {**m.meta, "path": str(secret)}
    site.queue.client.hset(meta_key("spam"), m.id, msgpack.packb(tampered, use_bin_type=True))
    assert site.get(f"/audio/{m.id}.wav").body == wav
    m.path.unlink()
    m.path.symlink_to(secret)
    reply = site.get(f"/audio/{m.id}.wav")
    assert reply.status == 404 and b"SECRET" not in reply.body


# -- marking ---------------------------------------------------------------------------------
def test_mark_spam_changes_the_mark_and_feeds_reputation(site: Site) -> None:
    m = site.queue.store("spam", PCM, {"caller": "sip:+14155550100@x",
                                       "caller_key": "tel:4155550100",
                                       "source_ip": "192.0.2.7", "verdict": "bot"})
    reply = site.post_mark({"id": m.id, "verdict": "spam", "csrf": TOKEN, "queue": "spam",
                            "limit": "20"})
    assert reply.status == 303
    assert reply.headers["location"] == f"/?queue=spam&limit=20#m-{m.id}"
    got = site.queue.get(m.id).meta
    assert got["mark"] == "spam" and got["marked_by"] == "alice (review page)"
    rep = site.queue.client.hget(CALLER_REP, "s")
    assert rep is not None and float(rep) > 0.5
    ip_rep = site.queue.client.hget(IP_REP, "s")
    assert ip_rep is not None and float(ip_rep) > 0.5
    page = site.get("/?queue=spam").text
    assert "spam by alice (review page)" in page


def test_mark_ham_lowers_reputation_like_the_cli(site: Site, redis_url: str,
                                                 capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The page and `spitwall queue mark` share one implementation: same mark, same score."""
    meta = {"caller": "x", "caller_key": "tel:4155550100", "source_ip": "192.0.2.7"}
    web, cli_msg = (site.queue.store("voicemail", PCM, meta) for _ in range(2))
    for _ in range(2):
        reputation.apply_feedback(site.queue.client, caller="tel:4155550100", ip="192.0.2.7",
                                  kind="report_spam", half_life=86400)
    before = float(site.queue.client.hget(CALLER_REP, "s") or 0)
    assert site.post_mark({"id": web.id, "verdict": "ham", "csrf": TOKEN}).status == 303
    after_web = float(site.queue.client.hget(CALLER_REP, "s") or 0)
    assert after_web < before
    monkeypatch.setenv("SPITWALL_QUEUE_DIR", str(site.queue.dir))
    assert cli.main(["--redis", redis_url, "queue", "mark", cli_msg.id, "ham"]) == 0
    after_cli = float(site.queue.client.hget(CALLER_REP, "s") or 0)
    assert after_cli < after_web
    assert site.queue.get(web.id).meta["mark"] == site.queue.get(cli_msg.id).meta["mark"] == "ham"
    assert site.queue.get(cli_msg.id).meta["marked_by"]  # the OS user
    capsys.readouterr()


@pytest.mark.parametrize("csrf", [None, "", "wrong", TOKEN + "x"])
def test_mark_without_the_csrf_token_is_403(site: Site, csrf: str | None) -> None:
    m = site.queue.store("spam", PCM, {"caller_key": "tel:4155550100"})
    fields = {"id": m.id, "verdict": "spam"}
    if csrf is not None:
        fields["csrf"] = csrf
    reply = site.post_mark(fields)
    assert reply.status == 403 and "token" in one_line(reply)
    assert site.queue.get(m.id).meta["mark"] == ""
    assert site.queue.client.hget(CALLER_REP, "s") is None


@pytest.mark.parametrize("headers", [
    {"Origin": "http://evil.example"}, {"Origin": "null"},
    {"Origin": "http://127.0.0.1:1"}, {"Sec-Fetch-Site": "cross-site"},
])
def test_mark_from_another_origin_is_403(site: Site, headers: dict[str, str]) -> None:
    m = site.queue.store("spam", PCM, {})
    reply = site.post_mark({"id": m.id, "verdict": "spam", "csrf": TOKEN}, headers=headers)
    assert reply.status == 403 and "refused" in one_line(reply)
    assert site.queue.get(m.id).meta["mark"] == ""


def test_mark_from_the_same_origin_is_accepted(site: Site) -> None:
    m = site.queue.store("spam", PCM, {})
    reply = site.post_mark({"id": m.id, "verdict": "ham", "csrf": TOKEN},
                           headers={"Origin": f"http://127.0.0.1:{site.port}",
                                    "Sec-Fetch-Site": "same-origin"})
    assert reply.status == 303 and reply.headers["location"] == f"/?limit=50#m-{m.id}"
    assert site.queue.get(m.id).meta["mark"] == "ham"


@pytest.mark.parametrize(("fields", "status"), [
    ({"id": "../x", "verdict": "spam"}, 400),
    ({"id": "", "verdict": "spam"}, 400),
    ({"id": "ID", "verdict": "maybe"}, 400),
    ({"id": "ID"}, 400),
    ({"id": "1700000000-deadbeef", "verdict": "spam"}, 404),
])
def test_mark_bad_input(site: Site, fields: dict[str, str], status: int) -> None:
    m = site.queue.store("spam", PCM, {})
    form = {k: (m.id if v == "ID" else v) for k, v in fields.items()}
    reply = site.post_mark({**form, "csrf": TOKEN})
    assert reply.status == status
    one_line(reply)
    assert site.queue.get(m.id).meta["mark"] == ""


def test_mark_needs_a_form_post(site: Site) -> None:
    assert site.get("/mark").status == 405
    assert site.get("/mark").headers["allow"] == "POST"
    reply = site.request("POST", "/mark", headers={"Content-Type": "application/json"},
                         body=b'{"id": "x"}')
    assert reply.status == 400
    assert site.request("POST", "/", body=b"").status == 405
    big = site.request("POST", "/mark", body=b"a=" + b"b" * 5000,
                       headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert big.status == 400


# -- bad list parameters ---------------------------------------------------------------------
@pytest.mark.parametrize("query", ["limit=0", "limit=501", "limit=abc", "limit=-1", "limit=%C2%B2",
                                   "queue=junk", "queue=%00"])
def test_bad_list_parameters_are_400(site: Site, query: str) -> None:
    reply = site.get("/?" + query)
    assert reply.status == 400
    one_line(reply)


# -- authentication --------------------------------------------------------------------------
@pytest.mark.parametrize("authorization", [
    None, basic("alice", "wrong"), basic("mallory", USERS["alice"]), basic("alice", ""),
    basic("bob", USERS["alice"]), "Basic !!!notbase64", "Bearer abc",
    "Basic " + base64.b64encode(b"alice").decode(), "Basic \u00e9t\u00e9",
    "Basic " + base64.b64encode(b"alice:\xff").decode(),
])
def test_wrong_or_absent_credentials_are_401(site: Site, authorization: str | None) -> None:
    m = site.queue.store("spam", PCM, {"caller": "sip:secret-caller@x"})
    headers = {} if authorization is None else {"Authorization": authorization}
    for method, path in (("GET", "/"), ("GET", f"/audio/{m.id}.wav"), ("POST", "/mark")):
        reply = site.request(method, path, auth=None, headers=headers,
                             body=b"" if method == "POST" else None)
        assert reply.status == 401, (method, path)
        assert reply.headers["www-authenticate"].startswith('Basic realm="spitwall review"')
        assert b"secret-caller" not in reply.body and b"RIFF" not in reply.body
    assert site.queue.get(m.id).meta["mark"] == ""


def test_every_user_of_the_auth_file_gets_in(site: Site) -> None:
    for user, password in USERS.items():
        assert site.get("/", auth=(user, password)).status == 200


def test_no_auth_mode_serves_without_credentials(q: MessageQueue) -> None:
    m = q.store("spam", PCM, {"caller": "x"})
    with serving(ReviewApp(q, users=None, csrf_token=TOKEN)) as port:
        site = Site(port, q)
        page = site.get("/", auth=None)
        assert page.status == 200 and "No authentication" in page.text
        assert site.post_mark({"id": m.id, "verdict": "spam", "csrf": TOKEN},
                              auth=None).status == 303
    assert q.get(m.id).meta["marked_by"] == "unauthenticated (review page)"


def test_the_csrf_token_is_random_per_app(q: MessageQueue) -> None:
    a, b = ReviewApp(q, users=None), ReviewApp(q, users=None)
    assert a.csrf_token != b.csrf_token and len(a.csrf_token) >= 32


# -- Redis down ------------------------------------------------------------------------------
def test_redis_down_is_503_without_a_traceback(tmp_path: Path) -> None:
    client = redis.Redis.from_url(dead_redis_url(), socket_connect_timeout=2)
    dead = MessageQueue(client, tmp_path / "queue")
    app = ReviewApp(dead, users=USERS, csrf_token=TOKEN)
    with serving(app) as port:
        site = Site(port, dead)
        for reply in (site.get("/"), site.get("/?queue=spam"),
                      site.get("/audio/1700000000-deadbeef.wav"),
                      site.post_mark({"id": "1700000000-deadbeef", "verdict": "spam",
                                      "csrf": TOKEN})):
            assert reply.status == 503
            assert one_line(reply) == "Redis is unavailable; try again later.\n"
    assert app.errors == {"redis": 4}  # counted, as well as logged
    client.close()


# -- the real `spitwall review` process ------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_spitwall_review_process_serves_and_stops_cleanly(
        q: MessageQueue, redis_url: str, tmp_path: Path, sig: signal.Signals) -> None:
    m = q.store("spam", PCM, {"caller": "sip:<bot>@dialer.example"})
    auth = tmp_path / "review.users"
    auth.write_text("# review page users\nalice:s3cret:with:colons\n\n")
    auth.chmod(0o600)
    port = free_port("127.0.0.1", "tcp")
    exe = REPO / ".venv/bin/spitwall"
    env = {k: v for k, v in os.environ.items() if k not in ("SPITWALL_REDIS",
                                                             "SPITWALL_QUEUE_DIR")}
    log = tmp_path / "review.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(exe), "review", "--listen", f"127.0.0.1:{port}", "--auth-file", str(auth),
             "--queue-dir", str(q.dir), "--redis", redis_url],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        def up() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        assert wait_until(up, 20), log.read_text()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/",
                                     headers={"Authorization": basic(*ALICE)})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200
            page = resp.read().decode()
        assert m.id in page and "sip:&lt;bot&gt;@dialer.example" in page
        os.kill(proc.pid, sig)
        assert proc.wait(timeout=10) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    text = log.read_text()
    assert f"spitwall review: http://127.0.0.1:{port}/" in text
    assert "Traceback" not in text and "GET /" in text


# -- CLI errors ------------------------------------------------------------------------------
def _review(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    try:
        rc = cli.main(["review", *argv, "--redis", dead_redis_url()])
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 1
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("listen", ["nope", "127.0.0.1", "127.0.0.1:99999", "127.0.0.1:",
                                    "example.com:8088", "::1:8088", "[::1]:x", ":8088"])
def test_bad_listen_is_a_one_line_error(capsys: pytest.CaptureFixture[str], listen: str) -> None:
    rc, err = _review(capsys, "--listen", listen, "--no-auth")
    assert rc == 1 and err.startswith("spitwall: error: bad --listen") and err.count("\n") == 1


@pytest.mark.parametrize("listen", ["0.0.0.0:0", "192.0.2.1:8088", "[::]:8088"])
@pytest.mark.parametrize("no_auth", [True, False])
def test_non_loopback_without_auth_file_is_refused(capsys: pytest.CaptureFixture[str],
                                                   listen: str, no_auth: bool) -> None:
    rc, err = _review(capsys, "--listen", listen, *(["--no-auth"] if no_auth else []))
    assert rc == 1 and err.count("\n") == 1
    assert "refusing to serve" in err and "--auth-file" in err


def test_loopback_needs_an_explicit_no_auth(capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = _review(capsys, "--listen", "127.0.0.1:0")
    assert rc == 1 and "--no-auth" in err and err.count("\n") == 1


def test_auth_file_and_no_auth_exclude_each_other(capsys: pytest.CaptureFixture[str],
                                                  tmp_path: Path) -> None:
    auth = tmp_path / "users"
    auth.write_text("alice:pw\n")
    rc, err = _review(capsys, "--auth-file", str(auth), "--no-auth")
    assert rc == 2 and err.count("\n") == 1


@pytest.mark.parametrize("content", [None, "", "# nobody\n", "alice\n", "alice:\n", ":pw\n",
                                     b"alice:\xff\n"])
def test_bad_auth_file_is_a_one_line_error(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                           content: str | bytes | None) -> None:
    auth = tmp_path / "users"
    if isinstance(content, bytes):
        auth.write_bytes(content)
    elif content is not None:
        auth.write_text("bob:topsecret\n" + content if content.startswith("alice") else content)
    rc, err = _review(capsys, "--listen", "0.0.0.0:0", "--auth-file", str(auth))
    assert rc == 1 and err.count("\n") == 1 and "auth" in err
    assert "topsecret" not in err


def test_busy_port_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        rc, err = _review(capsys, "--listen", f"127.0.0.1:{port}", "--no-auth")
    assert rc == 1 and "cannot listen" in err and err.count("\n") == 1


def test_a_systemd_credential_is_not_too_open(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """LoadCredential= on tmpfs: 0400 plus a read ACL for the service user, which `stat` shows
    as 0440 (the ACL mask in the group bits). Inside $CREDENTIALS_DIRECTORY only the "other"
    bits count; anywhere else group access is still worth the warning."""
    from ops.review import auth_file_too_open

    creds = tmp_path / "credentials" / "spitwall-review.service"
    creds.mkdir(parents=True)
    cred = creds / "review.users"
    cred.write_text("alice:pw\n")
    elsewhere = tmp_path / "review.users"
    elsewhere.write_text("alice:pw\n")
    for path in (cred, elsewhere):
        path.chmod(0o440)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    assert auth_file_too_open(cred) and auth_file_too_open(elsewhere)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert not auth_file_too_open(cred)
    assert auth_file_too_open(elsewhere)
    cred.chmod(0o444)
    assert auth_file_too_open(cred)
    cred.chmod(0o400)
    assert not auth_file_too_open(cred)
