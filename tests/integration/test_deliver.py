"""The delivery worker as operators run it (`python -m intercept.deliver`, a real process) against
a real redis-server and the test recorder (a real SIP endpoint on loopback): PUBLISH delivery and
acknowledgement, a recorder that is down for 30 s, a worker killed with pending events, dead
letters and replay, SUBSCRIBE/NOTIFY with the allow-list, digest, refusals and expiry.

Events are XADDed directly, as the proxy does (encrypted with `intercept.events.envelope`)."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import redis
from cryptography.hazmat.primitives.asymmetric import rsa

from intercept import names
from intercept.deliver import replay
from intercept.delivery.digest import ha1
from ops.procs import free_port, sip_options_ping
from tests.integration.deliver_rig import (
    WorkerFactory,
    add,
    pending,
    redis_client,
    wait,
    worker_factory,
)
from tests.integration.recorder import Recorder, recipient_keypair
from tests.redis_replies import bytes_entries

pytestmark = pytest.mark.integration

@pytest.fixture(scope="module")
def recipient() -> tuple[rsa.RSAPrivateKey, bytes]:
    return recipient_keypair()


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    with redis_client(redis_url) as r:
        yield r


@pytest.fixture
def recorder(recipient: tuple[rsa.RSAPrivateKey, bytes]) -> Iterator[Recorder]:
    rec = Recorder(*recipient)
    rec.start("127.0.0.1", 0)
    yield rec
    rec.stop()


@pytest.fixture
def start_worker(redis_url: str, tmp_path: Path) -> Iterator[WorkerFactory]:
    with worker_factory(redis_url, tmp_path) as start:
        yield start


def allow(client: redis.Redis, address: str, **record: Any) -> None:
    client.hset(names.RECORDERS, address, msgpack.packb(record, use_bin_type=True))


def audit(client: redis.Redis) -> list[dict[str, str]]:
    return [{k.decode(): v.decode() for k, v in f.items()}
            for _id, f in bytes_entries(client.xrange(names.AUDIT))]


# --------------------------------------------------------------------------- PUBLISH


def test_publish_delivers_in_order_and_acks(client: redis.Redis, recorder: Recorder,
                                            start_worker: WorkerFactory,
                                            recipient: tuple[Any, bytes]) -> None:
    worker = start_worker()
    ids = add(client, recorder.uri, recipient[1], 10) + add(client, recorder.uri, recipient[1],
                                                             10, kind="keys")
    assert recorder.wait_for(20, 10), recorder.errors
    assert recorder.event_ids == ids  # stream order kept for one destination
    assert recorder.raw_count == 20 and not recorder.errors
    assert wait(lambda: pending(client) == 0)
    assert client.hget(names.DELIVERY_STATS, "delivered") == b"20"
    assert client.xlen(names.EVENTS) == 0  # delivered ciphertext does not linger in Redis
    first = recorder.events[0]
    assert first.method == "PUBLISH" and first.request_uri == recorder.uri
    assert first.json()["liid"] == "CASE-1"  # the case id is inside the encrypted body ...
    headers = {name.lower(): value for name, value in first.headers}
    assert headers["event"] == "srtp" and headers["expires"] == "3600"
    assert headers["content-type"].startswith("application/pkcs7-mime; smime-type=enveloped")
    assert headers["content-disposition"].startswith("attachment; handling=required")
    assert headers["cseq"] == "1 PUBLISH" and headers["max-forwards"] == "70"
    raw_headers = "\n".join(f"{n}: {v}" for n, v in first.headers)
    for secret in ("CASE-1", "15551230001", "15551230002", first.event_id):
        assert secret not in raw_headers  # ... and nowhere in the SIP headers
    keys = recorder.events[10]
    assert keys.content_type == "application/sdp" and "a=crypto:1 AES_CM_128" in keys.text
    stats = worker.stats()
    assert stats["delivered"] == 20 and stats["published"] == 20 and stats["dead"] == 0


def test_recorder_down_30s_nothing_lost(client: redis.Redis, recipient: tuple[Any, bytes],
                                        start_worker: WorkerFactory) -> None:
    """Issue 5: the recorder is down for 30 s; every event arrives after it returns, none is
    lost, and after de-duplication by event id there are no repeats."""
    rec = Recorder(*recipient)
    host, port = rec.start("127.0.0.1", 0)
    start_worker("--max-attempts", "50", "--backoff-max", "4")
    try:
        before = add(client, rec.uri, recipient[1], 3)
        assert rec.wait_for(3, 10)
        rec.stop()  # down: the port is closed, nothing answers
        down_at = time.monotonic()
        during = []
        for _ in range(6):  # events keep coming while it is down
            during += add(client, rec.uri, recipient[1], 5)
            time.sleep(4)
        time.sleep(max(0.0, 30 - (time.monotonic() - down_at)))
        assert pending(client) == 30  # all held, none acknowledged, none dead
        assert client.xlen(names.DEAD) == 0
        rec.start(host, port)  # back on the same port
        assert rec.wait_for(33, 20), f"{len(rec.events)} of 33 arrived"
        assert rec.event_ids == before + during  # none lost, in order, no repeats
        assert wait(lambda: pending(client) == 0)
        assert client.xlen(names.DEAD) == 0
        assert rec.raw_count >= 33
    finally:
        rec.stop()


def test_killed_worker_pending_events_are_reclaimed(
    client: redis.Redis, recorder: Recorder, start_worker: WorkerFactory,
    recipient: tuple[Any, bytes],
) -> None:  # fmt: skip
    recorder.respond = None  # silent: the first worker cannot deliver
    first = start_worker("--claim-idle", "1")
    ids = add(client, recorder.uri, recipient[1], 5)
    assert wait(lambda: pending(client) == 5)
    first.kill()  # SIGKILL: no chance to clean up
    owners = client.xpending(names.EVENTS, names.EVENTS_GROUP)["consumers"]
    assert [o["name"] for o in owners] == [first.consumer.encode()]
    recorder.respond = 200
    second = start_worker("--claim-idle", "1")  # another name: reclaims with XAUTOCLAIM
    assert recorder.wait_for(5, 15), recorder.errors
    assert recorder.event_ids == ids
    assert wait(lambda: pending(client) == 0)
    assert second.stats()["reclaimed"] == 5


def test_restart_with_same_consumer_resumes_at_once(
    client: redis.Redis, recorder: Recorder, start_worker: WorkerFactory,
    recipient: tuple[Any, bytes],
) -> None:  # fmt: skip
    recorder.respond = None
    port = free_port("127.0.0.1", "udp")
    first = start_worker("--claim-idle", "3600", port=port, consumer="same")
    ids = add(client, recorder.uri, recipient[1], 3)
    assert wait(lambda: pending(client) == 3)
    first.stop()  # SIGTERM: graceful, the events stay pending
    assert pending(client) == 3
    recorder.respond = 200
    second = start_worker("--claim-idle", "3600", port=port, consumer="same")
    assert recorder.wait_for(3, 10)  # not waiting for claim-idle (an hour)
    assert recorder.event_ids == ids
    assert second.stats()["resumed"] == 3


def test_dead_letter_then_replay(client: redis.Redis, recorder: Recorder,
                                 start_worker: WorkerFactory,
                                 recipient: tuple[Any, bytes]) -> None:
    recorder.respond = 503
    start_worker("--max-attempts", "3", "--backoff", "0.1")
    ids = add(client, recorder.uri, recipient[1], 2)
    client.xadd(names.EVENTS, {"v": "1", "id": "x", "liid": "CASE-1", "dest": "mailto:x@y",
                               "body": b"\x30"})  # undeliverable: dead at once
    assert wait(lambda: client.xlen(names.DEAD) == 3, 15)
    assert wait(lambda: pending(client) == 0)
    dead = [{k.decode(): v for k, v in f.items()}
            for _id, f in bytes_entries(client.xrange(names.DEAD))]
    by_id = {d["id"].decode(): d for d in dead}
    for eid in ids:
        assert by_id[eid]["attempts"] == b"3"
        assert by_id[eid]["error"].startswith(b"503")
        assert by_id[eid]["dest"].decode() == recorder.uri
    assert by_id["x"]["attempts"] == b"0" and b"undeliverable" in by_id["x"]["error"]
    assert recorder.events == []  # a 503 is not a delivery
    assert client.hget(names.DELIVERY_STATS, "dead") == b"3"
    client.xdel(names.DEAD, next(i for i, f in bytes_entries(client.xrange(names.DEAD))
                                 if f[b"id"] == b"x"))

    recorder.respond = 200
    assert replay(client, None) == 2
    assert client.xlen(names.DEAD) == 0
    assert recorder.wait_for(2, 10)
    assert recorder.event_ids == ids  # same event ids, new stream entries
    assert wait(lambda: pending(client) == 0)
    assert wait(lambda: client.xlen(names.EVENTS) == 0)  # delivered or dead: deleted


# --------------------------------------------------------------------------- SUBSCRIBE


def test_subscribe_notify_per_event(client: redis.Redis, recorder: Recorder,
                                    start_worker: WorkerFactory,
                                    recipient: tuple[Any, bytes]) -> None:
    allow(client, "127.0.0.1")
    worker = start_worker()
    sub = recorder.subscribe(worker.address, "CASE-7", expires=120)
    assert sub.status == 200 and sub.expires == 120
    assert recorder.wait_until(lambda: len(sub.states) >= 1, 5)
    assert sub.states[0].startswith("active;expires=")  # the immediate NOTIFY
    ids = add(client, "subscribe", recipient[1], 4, liid="CASE-7", kind="keys")
    add(client, "subscribe", recipient[1], 1, liid="OTHER")  # not this subscription's case
    assert recorder.wait_for(4, 10), recorder.errors
    assert recorder.event_ids == ids
    assert all(e.method == "NOTIFY" and e.header("Event") == "srtp" for e in recorder.events)
    assert all(e.header("Subscription-State", ).startswith("active;expires=")  # type: ignore[union-attr]
               for e in recorder.events)
    assert sub.notify_cseqs == sorted(sub.notify_cseqs) and len(set(sub.notify_cseqs)) == 5
    assert wait(lambda: pending(client) == 1)  # OTHER has no subscriber: stays pending
    assert client.hlen(names.SUBSCRIPTIONS) == 1
    assert 0 < client.ttl(names.SUBSCRIPTIONS) <= 120 + 60
    assert [a["action"] for a in audit(client)] == ["subscribe_accepted"]

    assert recorder.unsubscribe(sub) == 200
    assert recorder.wait_until(lambda: sub.terminated, 5)
    assert sub.states[-1] == "terminated;reason=timeout"
    assert wait(lambda: client.hlen(names.SUBSCRIPTIONS) == 0)


def test_subscribe_refused_and_audited(client: redis.Redis, recipient: tuple[Any, bytes],
                                       start_worker: WorkerFactory) -> None:
    allow(client, "127.0.0.1")
    proxy = Recorder(*recipient)  # stands in for Kamailio forwarding a SUBSCRIBE
    proxy_addr = proxy.start("127.0.0.1", 0)
    stranger = Recorder(*recipient)
    stranger.start("127.0.0.2", 0)
    try:
        worker = start_worker("--proxy", f"{proxy_addr[0]}:{proxy_addr[1]}")
        sub = stranger.subscribe(worker.address, "CASE-1")
        assert sub.status == 403
        # a header naming an allowed source counts only when the proxy sent it
        spoof = stranger.subscribe(worker.address, "CASE-1",
                                   headers=[("X-Spitwall-Source", "127.0.0.1:5060")])
        assert spoof.status == 403
        # from the proxy, for a recorder that is not allowed: refused, audited with its address
        via = proxy.subscribe(worker.address, "CASE-1",
                              headers=[("X-Spitwall-Source", "127.0.0.9:5999")])
        assert via.status == 403
        # from the proxy, for an allowed recorder: accepted
        ok = proxy.subscribe(worker.address, "CASE-1",
                             headers=[("X-Spitwall-Source", "127.0.0.1:5999")])
        assert ok.status == 200
        stranger_port = stranger.address[1]
        # the 403 goes out first, the audit entry follows
        assert wait(lambda: client.hget(names.DELIVERY_STATS, "subscribe_refused") == b"3")
        assert wait(lambda: len([a for a in audit(client)
                                 if a["action"] == "subscribe_refused"]) == 3)
        refused = [a for a in audit(client) if a["action"] == "subscribe_refused"]
        assert all(a["liid"] == "CASE-1" and a["user"].startswith("deliver:")
                   and json.loads(a["detail"])["reason"] == a["reason"] for a in refused)
        assert sorted(a["address"] for a in refused) == [  # audited concurrently: any order
            f"127.0.0.2:{stranger_port}", f"127.0.0.2:{stranger_port}", "127.0.0.9:5999"]
        assert all(a["reason"] == "address not allow-listed" and float(a["ts"]) > 0
                   for a in refused)
    finally:
        proxy.stop()
        stranger.stop()


def test_unknown_event_package_is_489(client: redis.Redis, recorder: Recorder,
                                      start_worker: WorkerFactory) -> None:
    allow(client, "127.0.0.1")
    worker = start_worker()
    # the recorder always sends Event: srtp; a second Event header is ignored, so craft one
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(3)
        lport = sock.getsockname()[1]
        msg = (f"SUBSCRIBE sip:CASE-1@127.0.0.1:{worker.port} SIP/2.0\r\n"
               f"Via: SIP/2.0/UDP 127.0.0.1:{lport};branch=z9hG4bKevt1;rport\r\n"
               "Max-Forwards: 70\r\n"
               f"From: <sip:r@127.0.0.1:{lport}>;tag=1\r\nTo: <sip:CASE-1@127.0.0.1>\r\n"
               "Call-ID: evt1@x\r\nCSeq: 1 SUBSCRIBE\r\n"
               f"Contact: <sip:r@127.0.0.1:{lport}>\r\nEvent: presence\r\n"
               "Content-Length: 0\r\n\r\n")
        sock.sendto(msg.encode(), ("127.0.0.1", worker.port))
        reply = sock.recv(4096).decode()
    assert reply.startswith("SIP/2.0 489 ") and "Allow-Events: srtp" in reply


def test_subscribe_flood_is_answered_and_audit_stays_bounded(
    client: redis.Redis, start_worker: WorkerFactory,
) -> None:  # fmt: skip
    import socket

    worker = start_worker()
    n = 1000
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.5", 0))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
        sock.settimeout(5)
        lport = sock.getsockname()[1]
        for i in range(n):
            sock.sendto((f"SUBSCRIBE sip:CASE-{i}@127.0.0.1 SIP/2.0\r\n"
                         f"Via: SIP/2.0/UDP 127.0.0.5:{lport};branch=z9hG4bKf{i}\r\n"
                         f"From: <sip:x@127.0.0.5>;tag={i}\r\nTo: <sip:CASE-{i}@127.0.0.1>\r\n"
                         f"Call-ID: flood{i}\r\nCSeq: 1 SUBSCRIBE\r\n"
                         f"Contact: <sip:x@127.0.0.5:{lport}>\r\nEvent: srtp\r\n"
                         "Content-Length: 0\r\n\r\n").encode(), worker.address)
        codes: list[int] = []
        with contextlib.suppress(TimeoutError):
            while len(codes) < n:
                codes.append(int(sock.recv(4096).split(b" ", 2)[1]))
    assert len(codes) >= 0.95 * n and set(codes) <= {403, 503}
    time.sleep(0.5)
    refused = [a for a in audit(client) if a["action"] == "subscribe_refused"]
    assert 50 <= len(refused) <= 200  # burst of 100 + 10/s, not one per datagram
    stats = worker.stats()
    assert stats["subscribe_refused"] >= 0.9 * n and stats["audit_suppressed"] > 0
    assert sip_options_ping("127.0.0.1", worker.port, 1.0) == 200  # still serving


def test_digest_protected_recorder(client: redis.Redis, recorder: Recorder,
                                   start_worker: WorkerFactory,
                                   recipient: tuple[Any, bytes]) -> None:
    allow(client, "127.0.0.1", user="rec1", ha1=ha1("rec1", "s3cret"))
    worker = start_worker()
    none = recorder.subscribe(worker.address, "CASE-2")
    assert none.status == 401  # challenged: no credentials offered
    wrong = recorder.subscribe(worker.address, "CASE-2", user="rec1", password="guess")
    assert wrong.status == 403
    sub = recorder.subscribe(worker.address, "CASE-2", user="rec1", password="s3cret")
    assert sub.status == 200
    ids = add(client, "subscribe", recipient[1], 2, liid="CASE-2")
    assert recorder.wait_for(2, 10) and recorder.event_ids == ids
    assert recorder.refresh(sub, 300, user="rec1", password="s3cret") == 200
    assert sub.expires == 300
    assert recorder.refresh(sub, 300) == 401  # a refresh must authenticate too
    reasons = [a["reason"] for a in audit(client) if a["action"] == "subscribe_refused"]
    assert reasons == ["bad credentials"]


def test_digest_sha256_preferred_md5_optional_and_replays_refused(
        client: redis.Redis, recorder: Recorder, start_worker: WorkerFactory,
        recipient: tuple[Any, bytes]) -> None:
    """RFC 8760: SHA-256 offered first and used by a recorder that speaks it; MD5 only when
    the entry has an MD5 HA1. A verified Authorization sent again (nonce count used before)
    is challenged, not accepted: a replayer cannot subscribe with captured credentials."""
    both = {"user": "rec2", "ha1": ha1("rec2", "pw2"),
            "ha1_sha256": ha1("rec2", "pw2", algorithm="SHA-256")}
    allow(client, "127.0.0.1", **both)
    worker = start_worker()
    sub = recorder.subscribe(worker.address, "CASE-7", user="rec2", password="pw2")
    assert sub.status == 200
    assert 'algorithm=SHA-256' in recorder.authorizations[-1]
    ids = add(client, "subscribe", recipient[1], 1, liid="CASE-7")
    assert recorder.wait_for(1, 10) and recorder.event_ids == ids
    captured = recorder.authorizations[-1]
    # the captured credentials, sent again in a new SUBSCRIBE (as a replayer would):
    # challenged afresh, no subscription
    replay = recorder.subscribe(worker.address, "CASE-7", headers=[("Authorization", captured)])
    assert replay.status == 401
    assert wait(lambda: worker.stats().get("subscribe_replayed") == 1)
    assert client.hlen(names.SUBSCRIPTIONS) == 1
    # an MD5-only recorder still gets in while the entry has an MD5 HA1 ...
    recorder.digest_algorithms = ("MD5",)
    old = recorder.subscribe(worker.address, "CASE-8", user="rec2", password="pw2")
    assert old.status == 200 and 'algorithm=MD5' in recorder.authorizations[-1]
    # ... and not once the entry is SHA-256 only (`spitwall recorder allow --no-md5`)
    allow(client, "127.0.0.1", user="rec2", ha1_sha256=both["ha1_sha256"])
    time.sleep(2.2)  # the worker reads the allow-list at most every 2 s
    refused = recorder.subscribe(worker.address, "CASE-9", user="rec2", password="pw2")
    assert refused.status == 403
    recorder.digest_algorithms = ("SHA-256", "MD5")
    assert recorder.subscribe(worker.address, "CASE-9", user="rec2",
                              password="pw2").status == 200


def test_subscription_expiry_and_waiting_events(client: redis.Redis, recorder: Recorder,
                                                start_worker: WorkerFactory,
                                                recipient: tuple[Any, bytes]) -> None:
    allow(client, "127.0.0.1")
    worker = start_worker("--expires-min", "2", "--max-attempts", "40")
    short = recorder.subscribe(worker.address, "CASE-3", expires=1)
    assert short.status == 423  # below the minimum: Interval Too Brief
    sub = recorder.subscribe(worker.address, "CASE-3", expires=2)
    assert sub.status == 200 and sub.expires == 2
    assert recorder.wait_until(lambda: sub.terminated, 6)
    assert sub.states[0].startswith("active") and sub.states[-1] == "terminated;reason=timeout"
    assert wait(lambda: client.hlen(names.SUBSCRIPTIONS) == 0)
    ids = add(client, "subscribe", recipient[1], 2, liid="CASE-3")
    time.sleep(1.5)
    assert recorder.events == [] and pending(client) == 2  # nobody subscribed: they wait
    again = recorder.subscribe(worker.address, "CASE-3", expires=60)
    assert again.status == 200
    assert recorder.wait_for(2, 5)  # delivered as soon as a subscriber appears
    assert recorder.event_ids == ids
    assert wait(lambda: pending(client) == 0)


def test_subscribe_events_without_subscriber_are_dead_lettered(
    client: redis.Redis, start_worker: WorkerFactory, recipient: tuple[Any, bytes],
) -> None:  # fmt: skip
    start_worker("--max-attempts", "2", "--backoff", "0.1")
    add(client, "subscribe", recipient[1], 1, liid="CASE-4")
    assert wait(lambda: client.xlen(names.DEAD) == 1, 10)
    (_id, fields), = bytes_entries(client.xrange(names.DEAD))
    assert fields[b"error"] == b"no active subscription" and fields[b"attempts"] == b"2"


def test_failing_destination_does_not_hold_up_others(
    client: redis.Redis, recorder: Recorder, start_worker: WorkerFactory,
    recipient: tuple[Any, bytes],
) -> None:  # fmt: skip
    allow(client, "127.0.0.1")
    worker = start_worker("--lane-cap", "3", "--claim-idle", "1", "--max-attempts", "100",
                          "--max-in-memory", "20")
    waiting = add(client, "subscribe", recipient[1], 30, liid="CASE-6")  # nobody subscribed
    time.sleep(1.0)
    flowing = add(client, recorder.uri, recipient[1], 10)
    assert recorder.wait_for(10, 10)  # not stuck behind the 30 waiting events
    assert recorder.event_ids == flowing
    assert worker.stats()["spilled"] > 0
    sub = recorder.subscribe(worker.address, "CASE-6", expires=60)
    assert sub.status == 200
    assert recorder.wait_for(40, 20), f"{len(recorder.events)} of 40"
    assert sorted(recorder.event_ids[10:]) == sorted(waiting)  # all of them, once each
    assert wait(lambda: pending(client) == 0)
    assert client.xlen(names.DEAD) == 0


def test_restarted_worker_resumes_subscriptions(
    client: redis.Redis, recorder: Recorder, start_worker: WorkerFactory,
    recipient: tuple[Any, bytes],
) -> None:  # fmt: skip
    allow(client, "127.0.0.1")
    port = free_port("127.0.0.1", "udp")
    first = start_worker(port=port, consumer="w")
    sub = recorder.subscribe(first.address, "CASE-5", expires=300)
    assert sub.status == 200
    add(client, "subscribe", recipient[1], 1, liid="CASE-5")
    assert recorder.wait_for(1, 10)
    first.stop()
    second = start_worker(port=port, consumer="w")
    assert second.stats()["subscriptions"] == 1
    ids = add(client, "subscribe", recipient[1], 1, liid="CASE-5")
    assert recorder.wait_for(2, 10), recorder.errors
    assert recorder.event_ids[-1] == ids[0]
    assert sub.notify_cseqs == sorted(sub.notify_cseqs)  # CSeq keeps growing across restarts
