"""The delivery worker over TCP and TLS, as operators run it (`python -m intercept.deliver`, a
real process, with a real redis-server): PUBLISH and NOTIFY over TCP to a real SIPp UAS
(``sipp -t t1``, `tests/sipp/uas_event.xml`), a large un-parametrised PUBLISH switching to TCP
(RFC 3261 18.1.1) and falling back to UDP when TCP is refused, an explicit ``;transport=tcp``
that is refused being dead-lettered with the reason, and mutual TLS to a real Kamailio acting
as TLS SIP server (`tests/kamailio/tls_publish.cfg`, Debian's ``kamailio-tls-modules``; CA,
server and client certificates made at test time by `tests.tls_certs`).

Every process is started on free loopback ports and stopped by its pid."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
import redis
from cryptography.hazmat.primitives.asymmetric import rsa

from intercept import names
from ops.procs import free_port, pid_alive, start_process, stop_pid
from ops.sipp import SipMessage as LoggedMessage
from ops.sipp import parse_message_log, sipp_binary, stop_popen
from tests.integration.deliver_rig import (
    Worker,
    WorkerFactory,
    add,
    pending,
    redis_client,
    worker_factory,
)
from tests.integration.deliver_rig import wait as rig_wait
from tests.integration.recorder import Recorder, recipient_keypair
from tests.tls_certs import TestCa

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SIPP_SCENARIO = REPO / "tests" / "sipp" / "uas_event.xml"
KAMAILIO_CFG = REPO / "tests" / "kamailio" / "tls_publish.cfg"
#: fast SIP and retry timing for tests: T1 50 ms, Timer F 2 s, back-off 0.2 s .. 1 s
FAST = ("--sip-t1", "0.05", "--sip-timeout", "2", "--backoff", "0.2", "--backoff-max", "1")


# --------------------------------------------------------------------------- processes


@pytest.fixture
def start_worker(redis_url: str, tmp_path: Path) -> Iterator[WorkerFactory]:
    with worker_factory(redis_url, tmp_path, consumer_prefix="transport-",
                        defaults=FAST) as start:
        yield start


def _tcp_listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.3):
            return True
    except OSError:
        return False


@dataclass
class Sipp:
    proc: subprocess.Popen[bytes]
    port: int
    workdir: Path

    def requests(self, method: str) -> list[LoggedMessage]:
        return [m for m in parse_message_log(self.workdir / "messages.log")
                if m.direction == "received" and m.method == method]


@pytest.fixture
def sipp_tcp(tmp_path: Path) -> Iterator[Sipp]:
    """A SIPp UAS over TCP (``-t t1``) that answers PUBLISH and NOTIFY 200."""
    workdir = tmp_path / "sipp"
    workdir.mkdir()
    port = free_port("127.0.0.1", "tcp")
    cmd = [sipp_binary(), "-sf", str(SIPP_SCENARIO), "-t", "t1", "-i", "127.0.0.1",
           "-p", str(port), "-cp", str(free_port("127.0.0.1", "udp")), "-nostdin",
           "-trace_msg", "-message_file", "messages.log",
           "-trace_err", "-error_file", "errors.log"]
    with (workdir / "stdout.txt").open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=workdir, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    sipp = Sipp(proc, port, workdir)
    try:
        deadline = time.monotonic() + 10
        while not _tcp_listening(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"sipp did not start: {(workdir / 'stdout.txt').read_text()}")
            time.sleep(0.05)
        yield sipp
    finally:
        stop_popen(proc)


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca = TestCa("spitwall test CA")
    server = ca.issue("recorder.test", dns=["recorder.test"], ips=["127.0.0.1"]).write(d, "srv")
    client = ca.issue("spitwall-deliver", client=True).write(d, "cli")
    return Pki(ca.write(d), server.cert, server.key, client.cert, client.key,
               TestCa("some other CA").write(d, "other-ca"))


@dataclass
class KamailioTls:
    pid: int
    port: int
    workdir: Path

    @property
    def log(self) -> str:
        return (self.workdir / "kamailio.log").read_text(errors="replace")

    def publishes(self) -> list[str]:
        return self.received("PUBLISH")

    def received(self, method: str) -> list[str]:
        return [line for line in self.log.splitlines() if f"{method}-RECEIVED" in line]


@pytest.fixture
def kamailio_tls(tmp_path: Path, pki: Pki) -> Iterator[KamailioTls]:
    """Kamailio as a TLS SIP server on 127.0.0.1 that requires a client certificate."""
    workdir = tmp_path / "kamailio"
    (workdir / "run").mkdir(parents=True)
    port = free_port("127.0.0.1", "tcp")
    argv = ["/usr/sbin/kamailio", "-f", str(KAMAILIO_CFG), "-DD", "-E",
            "-Y", str(workdir / "run"), "-w", str(workdir),
            "-A", "TLS_ADDR=127.0.0.1", "-A", f"TLS_PORT={port}",
            "-A", f'TLS_CERT="{pki.server_cert}"', "-A", f'TLS_KEY="{pki.server_key}"',
            "-A", f'TLS_CA="{pki.ca}"', "-A", "REQUIRE_CLIENT_CERT=1"]
    pid = start_process(argv, workdir / "kamailio.log", cwd=workdir)
    kam = KamailioTls(pid, port, workdir)
    try:
        deadline = time.monotonic() + 15
        while not _tcp_listening(port):
            if not pid_alive(pid) or time.monotonic() > deadline:
                pytest.fail(f"kamailio (TLS) did not start: {kam.log[-3000:]}")
            time.sleep(0.1)
        yield kam
    finally:
        stop_pid(pid, ["kamailio", str(workdir)])


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def recipient() -> tuple[rsa.RSAPrivateKey, bytes]:
    return recipient_keypair()


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    with redis_client(redis_url) as r:
        yield r


def wait(predicate: Callable[[], bool], timeout: float = 15.0) -> bool:
    return rig_wait(predicate, timeout)


def dead_letters(client: redis.Redis) -> list[dict[str, str]]:
    rows: Any = client.xrange(names.DEAD)
    return [{k.decode(): v.decode("utf-8", "replace") for k, v in fields.items()
             if k != b"body"} for _sid, fields in rows]


def delivered(client: redis.Redis) -> int:
    return int(client.hget(names.DELIVERY_STATS, "delivered") or 0)


# --------------------------------------------------------------------------- TCP


#: the test events' PUBLISHes are ~1.2 KB (a 668-byte S/MIME body); production ones ~1.6 KB.
#: A --udp-max below their size makes them "large" (over 1300 in production).
SMALL_UDP_MAX = ("--udp-max", "1000")


@pytest.mark.parametrize("param", [";transport=tcp", ""], ids=["explicit", "by-size"])
def test_publish_over_tcp_to_sipp(client: redis.Redis, sipp_tcp: Sipp,
                                  start_worker: WorkerFactory,
                                  recipient: tuple[Any, bytes], param: str) -> None:
    """``;transport=tcp``, or no transport and a request larger than --udp-max: TCP."""
    worker = start_worker(*(SMALL_UDP_MAX if not param else ()))
    add(client, f"sip:li@127.0.0.1:{sipp_tcp.port}{param}", recipient[1], 5)
    assert wait(lambda: delivered(client) == 5), worker.log.read_text()[-3000:]
    assert wait(lambda: pending(client) == 0)
    publishes = sipp_tcp.requests("PUBLISH")
    assert len(publishes) == 5
    assert all((m.header("Via") or "").startswith("SIP/2.0/TCP 127.0.0.1:") for m in publishes)
    assert all("rport" not in (m.header("Via") or "") for m in publishes)
    assert all(int(m.header("Content-Length") or 0) > 600 for m in publishes)
    sip = worker.stats()["sip"]
    assert sip["connections_opened"] == 1  # one connection, reused
    assert sip["retransmissions_sent"] == 0 and sip["tcp_fallback_udp"] == 0
    assert dead_letters(client) == []


def subscribe(worker: Worker, liid: str, contact: str) -> str:
    """A SUBSCRIBE (Event: srtp) from 127.0.0.1 over UDP -- the only way the worker receives
    one -- whose Contact, where the NOTIFYs go, is ``contact``; returns the answer's text."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(5)
        lport = sock.getsockname()[1]
        msg = (f"SUBSCRIBE sip:{liid}@127.0.0.1:{worker.port} SIP/2.0\r\n"
               f"Via: SIP/2.0/UDP 127.0.0.1:{lport};branch=z9hG4bK{secrets.token_hex(6)}\r\n"
               "Max-Forwards: 70\r\n"
               f"From: <sip:rec@127.0.0.1>;tag={secrets.token_hex(4)}\r\n"
               f"To: <sip:{liid}@127.0.0.1>\r\n"
               f"Call-ID: {secrets.token_hex(8)}@127.0.0.1\r\nCSeq: 1 SUBSCRIBE\r\n"
               f"Contact: <{contact}>\r\n"
               "Event: srtp\r\nExpires: 600\r\nContent-Length: 0\r\n\r\n")
        sock.sendto(msg.encode(), ("127.0.0.1", worker.port))
        return sock.recv(4096).decode()


def test_notify_over_tcp_to_sipp(client: redis.Redis, sipp_tcp: Sipp,
                                 start_worker: WorkerFactory,
                                 recipient: tuple[Any, bytes]) -> None:
    """A subscriber whose Contact says ``;transport=tcp`` gets its NOTIFYs over TCP."""
    client.hset(names.RECORDERS, "127.0.0.1", msgpack.packb({}, use_bin_type=True))
    worker = start_worker()
    reply = subscribe(worker, "CASE-7", f"sip:rec@127.0.0.1:{sipp_tcp.port};transport=tcp")
    assert reply.startswith("SIP/2.0 200 "), reply
    assert wait(lambda: len(sipp_tcp.requests("NOTIFY")) == 1)  # the first, empty NOTIFY
    add(client, "subscribe", recipient[1], 2, liid="CASE-7")
    assert wait(lambda: delivered(client) == 2), worker.log.read_text()[-3000:]
    notifies = sipp_tcp.requests("NOTIFY")
    assert len(notifies) == 3
    assert all((m.header("Via") or "").startswith("SIP/2.0/TCP ") for m in notifies)
    assert all((m.header("Subscription-State") or "").startswith("active") for m in notifies)
    assert [m.header("CSeq") for m in notifies] == ["1 NOTIFY", "2 NOTIFY", "3 NOTIFY"]
    assert worker.stats()["sip"]["connections_opened"] == 1


def test_tcp_refused_falls_back_to_udp(client: redis.Redis, start_worker: WorkerFactory,
                                       recipient: tuple[Any, bytes]) -> None:
    """RFC 3261 18.1.1: the size-chosen TCP connect is refused -> the same requests go over
    UDP, and the destination is not tried over TCP again for a while."""
    rec = Recorder(*recipient)
    _host, port = rec.start("127.0.0.1", 0)
    try:
        assert not _tcp_listening(port)
        worker = start_worker(*SMALL_UDP_MAX)
        ids = add(client, rec.uri, recipient[1], 5)
        assert rec.wait_for(5, 15), rec.errors
        more = add(client, rec.uri, recipient[1], 5)
        assert rec.wait_for(10, 15), rec.errors
        assert rec.event_ids == ids + more
        assert wait(lambda: pending(client) == 0)
        sip = worker.stats()["sip"]
        assert sip["connections_failed"] == 1  # one refused connect: remembered after that
        assert sip["tcp_fallback_udp"] >= 1 and sip["connections_opened"] == 0
        assert all((e.header("Via") or "").startswith("SIP/2.0/UDP") for e in rec.events)
    finally:
        rec.stop()


def test_explicit_tcp_refused_is_dead_lettered_with_the_reason(
    client: redis.Redis, start_worker: WorkerFactory, recipient: tuple[Any, bytes],
) -> None:  # fmt: skip
    port = free_port("127.0.0.1", "tcp")  # nothing listens there
    start_worker("--max-attempts", "2")
    add(client, f"sip:li@127.0.0.1:{port};transport=tcp", recipient[1])
    assert wait(lambda: len(dead_letters(client)) == 1)
    dead = dead_letters(client)[0]
    assert dead["error"] == "no final response (TCP connection refused)"
    assert dead["attempts"] == "2"


# --------------------------------------------------------------------------- TLS


def test_mutual_tls_publish_to_kamailio(client: redis.Redis, kamailio_tls: KamailioTls,
                                        pki: Pki, start_worker: WorkerFactory,
                                        recipient: tuple[Any, bytes]) -> None:
    worker = start_worker("--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert),
                          "--tls-key", str(pki.client_key))
    add(client, f"sips:li@127.0.0.1:{kamailio_tls.port}", recipient[1], 5)
    assert wait(lambda: delivered(client) == 5), worker.log.read_text()[-3000:]
    assert wait(lambda: pending(client) == 0)
    lines = kamailio_tls.publishes()
    assert len(lines) == 5
    assert all("proto=tls cn=spitwall-deliver" in line and "via=SIP/2.0/TLS 127.0.0.1:" in line
               for line in lines), lines
    sip = worker.stats()["sip"]
    assert sip["connections_opened"] == 1 and sip["retransmissions_sent"] == 0
    assert dead_letters(client) == []


@pytest.mark.parametrize(("use", "error"), [
    ("no-client-cert", "no final response (TLS"),
    ("other-ca", "no final response (TLS: certificate verify failed: "),
    ("wrong-name", "no final response (TLS: certificate verify failed: Hostname mismatch"),
])
def test_tls_failures_are_dead_lettered_with_the_reason(
    client: redis.Redis, kamailio_tls: KamailioTls, pki: Pki, start_worker: WorkerFactory,
    recipient: tuple[Any, bytes], use: str, error: str,
) -> None:  # fmt: skip
    args = {"no-client-cert": ["--tls-ca", str(pki.ca)],
            "other-ca": ["--tls-ca", str(pki.other_ca), "--tls-cert", str(pki.client_cert),
                         "--tls-key", str(pki.client_key)],
            "wrong-name": ["--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert),
                           "--tls-key", str(pki.client_key)]}[use]
    host = "localhost" if use == "wrong-name" else "127.0.0.1"  # cert: recorder.test, 127.0.0.1
    if use == "wrong-name" and socket.getaddrinfo(host, 0, type=socket.SOCK_DGRAM)[0][4][0] \
            != "127.0.0.1":
        pytest.skip("localhost does not resolve to 127.0.0.1 first here")
    start_worker("--max-attempts", "1", *args)
    add(client, f"sips:li@{host}:{kamailio_tls.port}", recipient[1])
    assert wait(lambda: len(dead_letters(client)) == 1)
    assert dead_letters(client)[0]["error"].startswith(error), dead_letters(client)
    assert kamailio_tls.publishes() == []


def test_notify_over_mutual_tls_to_kamailio(client: redis.Redis, kamailio_tls: KamailioTls,
                                            pki: Pki, start_worker: WorkerFactory,
                                            recipient: tuple[Any, bytes]) -> None:
    """A subscriber whose Contact is a ``sips:`` URI gets its NOTIFYs over TLS."""
    client.hset(names.RECORDERS, "127.0.0.1", msgpack.packb({}, use_bin_type=True))
    worker = start_worker("--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert),
                          "--tls-key", str(pki.client_key))
    reply = subscribe(worker, "CASE-8", f"sips:rec@127.0.0.1:{kamailio_tls.port}")
    assert reply.startswith("SIP/2.0 200 "), reply
    assert wait(lambda: len(kamailio_tls.received("NOTIFY")) == 1)
    add(client, "subscribe", recipient[1], 2, liid="CASE-8")
    assert wait(lambda: delivered(client) == 2), worker.log.read_text()[-3000:]
    lines = kamailio_tls.received("NOTIFY")
    assert len(lines) == 3
    assert all("proto=tls cn=spitwall-deliver" in line and "state=active" in line
               for line in lines), lines
    assert worker.stats()["sip"]["connections_opened"] == 1


def test_subscribe_with_a_transport_we_do_not_speak_is_refused(
    client: redis.Redis, start_worker: WorkerFactory,
) -> None:  # fmt: skip
    client.hset(names.RECORDERS, "127.0.0.1", msgpack.packb({}, use_bin_type=True))
    worker = start_worker()
    reply = subscribe(worker, "CASE-9", "sip:rec@127.0.0.1:5999;transport=sctp")
    assert reply.startswith("SIP/2.0 400 "), reply


def test_bad_tls_files_stop_the_worker_at_start(tmp_path: Path, redis_url: str) -> None:
    env = dict(os.environ, SPITWALL_REDIS=redis_url)
    out = subprocess.run(
        [sys.executable, "-m", "intercept.deliver", "--sip-port",
         str(free_port("127.0.0.1", "udp")), "--tls-ca", str(tmp_path / "missing.pem")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 2 and "TLS set-up" in out.stderr
