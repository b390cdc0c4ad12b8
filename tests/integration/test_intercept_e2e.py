"""Lawful intercept end to end, with every part real: a SIPp caller offers SDES keys through
the real Kamailio to a SIPp callee that answers with its own; the target is provisioned with the
CLI; the lab's delivery worker (`spitwall deliver`) delivers the proxy's encrypted events to a
test recorder (a SIP endpoint on loopback, tests/integration/recorder.py) by PUBLISH, or by
NOTIFY to a recorder that SUBSCRIBEd through the proxy. The recorder decrypts the S/MIME body
with its private key and a pylibsrtp session built from the disclosed key decrypts what the
caller protected.
"""

from __future__ import annotations

import base64
import random
import uuid
from pathlib import Path
from typing import Any

import pylibsrtp
import pytest
import redis
from cryptography import x509

from intercept import names, provision
from ops.lab import Lab
from tests.integration.helpers import spitwall
from tests.integration.recorder import Recorder, recipient_keypair
from tests.integration.test_intercept_proxy import SUITE, attr, new_key, sdes, srtp_call, srtp_uas
from tests.redis_replies import bytes_entries

pytestmark = pytest.mark.timeout(240)


def _ip() -> str:
    return f"127.77.{random.randrange(1, 250)}.{random.randrange(1, 250)}"


def _recorder(tmp: Path) -> tuple[Recorder, Path]:
    key, cert_pem = recipient_keypair("li-e2e")
    rec = Recorder(key, cert_pem)
    tmp.mkdir(parents=True, exist_ok=True)
    pem = tmp / "recorder.pem"
    pem.write_bytes(cert_pem)
    return rec, pem


def _srtp_check(keys_body: str, sender_key: str, ssrc: int) -> None:
    """What the sender protected with its key, the recorder decrypts with the disclosed one."""
    line = next(x for x in attr(keys_body, "crypto") if f"SSRC={ssrc}" in x)
    disclosed = base64.b64decode(line.split("inline:")[1].split()[0].split("|")[0])
    sender = pylibsrtp.Session(pylibsrtp.Policy(
        key=base64.b64decode(sender_key), ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND))
    recorder = pylibsrtp.Session(pylibsrtp.Policy(
        key=disclosed, ssrc_type=pylibsrtp.Policy.SSRC_ANY_INBOUND))
    audio = bytes(range(160))
    for seq in range(3):
        rtp = (bytes([0x80, 0x00]) + seq.to_bytes(2, "big") + (seq * 160).to_bytes(4, "big")
               + ssrc.to_bytes(4, "big") + audio)
        assert recorder.unprotect(sender.protect(rtp))[12:] == audio


def check_published_call(events: list[Any], call_id: str, liid: str, k_caller: str,
                         k_callee: str) -> None:
    """The four PUBLISHes (Event: srtp) of one target call, in order; the key event names the
    call and the case, and its keys decrypt the caller's SRTP (SSRC 1111; callee's 2222)."""
    assert {e.method for e in events} == {"PUBLISH"}
    assert all(e.header("Event") == "srtp" for e in events)
    kinds = [e.json()["event"] if e.content_type == "application/json" else "Keys"
             for e in events]
    assert kinds == ["Origination", "Keys", "Answer", "Release"]
    keys_body = next(e.text for e in events if e.content_type == "application/sdp")
    assert f"a=x-call-id:{call_id}" in keys_body and f"a=x-liid:{liid}" in keys_body
    _srtp_check(keys_body, k_caller, 1111)
    assert attr(keys_body, "rcrypto") == [f"1 {SUITE} inline:{k_callee} SSRC=2222"]


def _provision(lab: Lab, liid: str, target: str, deliver_to: str, pem: Path) -> None:
    assert lab.state is not None
    out = spitwall("intercept", "add", "--liid", liid, "--target", target, "--deliver-to",
                   deliver_to, "--cert", str(pem), redis_url=lab.state.redis_url)
    assert out.returncode == 0, out.stderr


def _remove(lab: Lab, liid: str) -> None:
    assert lab.state is not None
    spitwall("intercept", "remove", liid, redis_url=lab.state.redis_url)


@pytest.fixture
def client(redis_url: str) -> Any:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_publish_to_the_recorder_and_decrypt_the_media(
        lab_factory: Any, tmp_path: Path, v6: bool) -> None:
    """IPv6: proxy, callee, recorder and delivery worker on ::1, the same four events."""
    rec, pem = _recorder(tmp_path)
    host, port = rec.start("::1" if v6 else _ip(), 0)
    addr, uri_host = ("::1", "[::1]") if v6 else ("127.0.0.1", "127.0.0.1")
    caller, liid = f"tgt{uuid.uuid4().hex[:8]}", f"E2E-{uuid.uuid4().hex[:8]}"
    k_caller, k_callee = new_key(), new_key()
    try:
        with srtp_uas(tmp_path / "uas", sdes(k_callee, 2222), addr=addr) as uas:
            lab: Lab = lab_factory(next_hop=f"sip:{uri_host}:{uas.port}", children=2,
                                   sip_addr=addr)
            target = f"sip:{caller}@{'[::1]' if v6 else '127.0.0.2'}"
            recorder = f"sip:recorder@[{host}]:{port}" if v6 else f"sip:recorder@{host}:{port}"
            _provision(lab, liid, target, recorder, pem)
            try:
                call_id = srtp_call(lab, tmp_path / "uac", caller, "bob", sdes(k_caller, 1111),
                                    src_ip="::1" if v6 else "127.0.0.2")
                assert rec.wait_until(
                    lambda: any(e.json().get("event") == "Release" for e in rec.events
                                if e.content_type == "application/json"), timeout=20)
            finally:
                _remove(lab, liid)
        events = rec.events
    finally:
        rec.stop()
    check_published_call(events, call_id, liid, k_caller, k_callee)
    assert len({e.event_id for e in events}) == 4
    if v6:
        assert {e.source[0] for e in events} == {"::1"}


def test_subscribe_through_the_proxy_gets_notifies(
        lab_factory: Any, tmp_path: Path, client: redis.Redis) -> None:
    rec, pem = _recorder(tmp_path)
    stranger, _ = _recorder(tmp_path / "x")
    host, _port = rec.start(_ip(), 0)
    stranger.start(_ip(), 0)
    caller, liid = f"tgt{uuid.uuid4().hex[:8]}", f"E2E-{uuid.uuid4().hex[:8]}"
    k_caller = new_key()
    provision.recorder_allow(client, [host], who="test")
    try:
        with srtp_uas(tmp_path / "uas", sdes(new_key(), 2222)) as uas:
            lab: Lab = lab_factory(next_hop=f"sip:127.0.0.1:{uas.port}", children=2)
            assert lab.state is not None
            proxy = (lab.state.sip_addr, lab.state.sip_port)
            _provision(lab, liid, f"sip:{caller}@127.0.0.2", "subscribe", pem)
            try:
                sub = rec.subscribe(proxy, liid)
                refused = stranger.subscribe(proxy, liid)
                assert sub.status == 200, sub
                assert refused.status == 403, refused
                srtp_call(lab, tmp_path / "uac", caller, "bob", sdes(k_caller, 1111))
                assert rec.wait_for(4, timeout=20)
            finally:
                _remove(lab, liid)
        events = rec.events
    finally:
        rec.stop()
        stranger.stop()
        provision.recorder_remove(client, [host], who="test")
    assert {e.method for e in events} == {"NOTIFY"}
    # NOTIFYs come back through the proxy (it record-routed the SUBSCRIBE)
    assert {e.source for e in events} == {proxy}
    keys_body = next(e.text for e in events if e.content_type == "application/sdp")
    _srtp_check(keys_body, k_caller, 1111)
    assert stranger.events == []
    audit = [f for _i, f in bytes_entries(client.xrange(names.AUDIT))]
    assert any(b"subscribe_refused" in v for f in audit for v in f.values()), audit[-3:]


def test_recipient_certificate_is_what_encrypts(lab_factory: Any, tmp_path: Path) -> None:
    """A recorder holding another private key gets the events but cannot read them."""
    _rec, pem = _recorder(tmp_path)
    other_key, other_pem = recipient_keypair("not-the-recipient")
    eavesdropper = Recorder(other_key, other_pem)
    host, port = eavesdropper.start(_ip(), 0)
    caller, liid = f"tgt{uuid.uuid4().hex[:8]}", f"E2E-{uuid.uuid4().hex[:8]}"
    try:
        with srtp_uas(tmp_path / "uas", sdes(new_key(), 2)) as uas:
            lab: Lab = lab_factory(next_hop=f"sip:127.0.0.1:{uas.port}", children=2)
            _provision(lab, liid, f"sip:{caller}@127.0.0.2", f"sip:r@{host}:{port}", pem)
            try:
                srtp_call(lab, tmp_path / "uac", caller, "bob", sdes(new_key(), 1))
                assert eavesdropper.wait_until(lambda: len(eavesdropper.errors) >= 4, timeout=20)
            finally:
                _remove(lab, liid)
    finally:
        eavesdropper.stop()
    assert x509.load_pem_x509_certificate(pem.read_bytes())  # the case's recipient
    assert eavesdropper.events == []
    assert all("unreadable" in e for e in eavesdropper.errors)
