"""Intercept in the request path, through the real Kamailio: SIPp callers offering SDES
(`a=crypto`), DTLS-SRTP or ZRTP to a SIPp callee that answers in kind; a provisioned target.

What the proxy queues in the event stream is checked by decrypting it with the recipient's
private key: call events in order, the draft's key body with the right keys on the right side,
a pylibsrtp session built from the disclosed key decrypting what the caller protected, and the
relayed INVITE of a target's call indistinguishable from anyone else's.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pylibsrtp
import pytest
import redis

from intercept import names
from intercept.targets import Target, normalise_identity
from ops.lab import Lab
from ops.sipp import SIPP_DIR, free_udp_port, parse_message_log, sipp_binary, stop_popen
from scoring import config_admin
from tests.intercept_certs import Recipient, make_recipient
from tests.redis_replies import bytes_entries

pytestmark = pytest.mark.timeout(180)

SUITE = "AES_CM_128_HMAC_SHA1_80"


def new_key() -> str:
    return base64.b64encode(os.urandom(30)).decode()


@dataclass
class Media:
    """One side's SDP flavour: profile and two attributes (without 'a=')."""

    proto: str = "RTP/SAVP"
    attr1: str = "x-none:1"
    attr2: str = "x-none:1"
    attr3: str = "x-none:1"  # the re-INVITE's key (rekey scenarios only)

    def args(self) -> list[str]:
        return ["-key", "proto", self.proto, "-key", "attr1", self.attr1,
                "-key", "attr2", self.attr2, "-key", "attr3", self.attr3]


def sdes(key: str, ssrc: int) -> Media:
    return Media("RTP/SAVP", f"crypto:1 {SUITE} inline:{key}", f"ssrc:{ssrc} cname:t{ssrc}")


@dataclass
class SrtpUas:
    proc: subprocess.Popen[bytes]
    port: int
    workdir: Path

    def invites(self) -> list[Any]:
        log = self.workdir / "uas_messages.log"
        if not log.exists():
            return []
        return [m for m in parse_message_log(log)
                if m.direction == "received" and m.method == "INVITE"]


@contextmanager
def srtp_uas(workdir: Path, media: Media, scenario: str = "uas_srtp.xml",
             addr: str = "127.0.0.1") -> Iterator[SrtpUas]:
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_udp_port(addr)
    cmd = [sipp_binary(), "-sf", str(SIPP_DIR / scenario), "-i", addr,
           "-p", str(port), "-mi", addr, "-mp", str(free_udp_port(addr)),
           # sipp's control socket is IPv4 only
           "-ci", "127.0.0.1", "-cp", str(free_udp_port("127.0.0.1")), "-nostdin",
           *media.args(),
           "-trace_msg", "-message_file", "uas_messages.log"]
    proc = subprocess.Popen(cmd, cwd=workdir, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        time.sleep(0.3)
        assert proc.poll() is None, "sipp uas_srtp did not start"
        yield SrtpUas(proc, port, workdir)
    finally:
        stop_popen(proc)


def srtp_call(lab: Lab, workdir: Path, caller: str, callee: str, media: Media,
              src_ip: str = "127.0.0.2", scenario: str = "uac_srtp.xml",
              hold_ms: int = 300) -> str:
    """One call through the proxy, up for `hold_ms` after the ACK; returns its Call-ID."""
    st = lab.state
    assert st is not None
    workdir.mkdir(parents=True, exist_ok=True)
    call_id = f"li-{uuid.uuid4().hex[:12]}"
    host = f"[{st.sip_addr}]" if ":" in st.sip_addr else st.sip_addr
    ctrl = "127.0.0.1" if ":" in src_ip else src_ip  # sipp's control socket is IPv4 only
    cmd = [sipp_binary(), f"{host}:{st.sip_port}", "-sf", str(SIPP_DIR / scenario),
           "-s", callee, "-i", src_ip, "-p", str(free_udp_port(src_ip)), "-mi", src_ip,
           "-mp", str(free_udp_port(src_ip)), "-ci", ctrl, "-cp", str(free_udp_port(ctrl)),
           "-m", "1",
           "-nostdin", "-key", "caller", caller, "-cid_str", call_id, *media.args(),
           "-d", str(hold_ms), "-timeout", f"{20 + hold_ms // 1000}s",
           "-trace_msg", "-message_file", "uac_messages.log"]
    out = subprocess.run(cmd, cwd=workdir, capture_output=True, timeout=40 + hold_ms / 1000,
                         check=False)
    assert out.returncode == 0, f"sipp uac failed ({out.returncode}): {out.stderr[-500:]!r}"
    return call_id


def provision(client: redis.Redis, recipient: Recipient, target: str, **kw: Any) -> str:
    liid = f"CASE-{uuid.uuid4().hex[:10]}"
    t = Target(liid=liid, identities=(normalise_identity(target),),
               deliver_to=kw.pop("deliver_to", "sip:recorder@127.0.0.1:5999"),
               cert_pem=recipient.cert_pem, start=time.time() - 5, **kw)
    client.hset(names.TARGETS, liid, t.pack())
    client.incr(names.VERSION)
    return liid


def unprovision(client: redis.Redis, liid: str) -> None:
    client.hdel(names.TARGETS, liid)
    client.incr(names.VERSION)


def events_of(client: redis.Redis, recipient: Recipient, liid: str,
              wait_for: str = "Release", timeout: float = 10.0) -> list[tuple[str, str]]:
    """(event name, decrypted body) of a case's events, in stream order, once `wait_for`
    arrived (or after `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        got = []
        for _id, fields in bytes_entries(client.xrange(names.EVENTS)):
            if fields[b"liid"].decode() != liid:
                continue
            assert fields[b"v"] == b"1"
            body = recipient.decrypt(fields[b"body"])
            got.append((fields[b"event"].decode(), body))
        if any(e == wait_for for e, _ in got) or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


def attr(body: str, name: str) -> list[str]:
    return [line.split(":", 1)[1] for line in body.splitlines() if line.startswith(f"a={name}:")]


@pytest.fixture
def recipient() -> Recipient:
    return make_recipient("li-recorder")


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


def _lab(lab_factory: Any, uas: SrtpUas) -> Lab:
    lab: Lab = lab_factory(next_hop=f"sip:127.0.0.1:{uas.port}", children=2)
    return lab


def target_call(lab_factory: Any, tmp_path: Path, client: redis.Redis, recipient: Recipient,
                target: str, caller: str, callee: str, uac_media: Media, uas_media: Media,
                uac: str = "uac_srtp.xml", uas: str = "uas_srtp.xml"
                ) -> tuple[list[tuple[str, str]], list[Any]]:
    """Provision `target`, place one call through a fresh lab, return (the case's decrypted
    events, the INVITEs the callee received); the case is removed again."""
    liid = provision(client, recipient, target)
    try:
        with srtp_uas(tmp_path / "uas", uas_media, uas) as srv:
            lab = _lab(lab_factory, srv)
            srtp_call(lab, tmp_path / "uac", caller, callee, uac_media, scenario=uac)
            return events_of(client, recipient, liid), srv.invites()
    finally:
        unprovision(client, liid)


def test_sdes_call_of_a_target_yields_events_and_usable_keys(
        lab_factory: Any, tmp_path: Path, client: redis.Redis, recipient: Recipient) -> None:
    caller = f"tgt{uuid.uuid4().hex[:8]}"
    k_caller, k_callee = new_key(), new_key()
    liid = provision(client, recipient, f"{caller}@127.0.0.2")
    try:
        with srtp_uas(tmp_path / "uas", sdes(k_callee, 2222)) as uas:
            lab = _lab(lab_factory, uas)
            call_id = srtp_call(lab, tmp_path / "uac", caller, "bob", sdes(k_caller, 1111))
            events = events_of(client, recipient, liid)
    finally:
        unprovision(client, liid)
    names_seen = [e for e, _ in events]
    assert names_seen == ["Origination", "Keys", "Answer", "Release"], names_seen
    release = json.loads(dict(events)["Release"].split("\r\n\r\n", 1)[1])
    assert release["reason"] == "BYE"  # the dialog ended with a BYE, not at its timeout
    keys_body = dict(events)["Keys"]
    assert "Content-Type: application/sdp" in keys_body
    assert f"a=x-call-id:{call_id}" in keys_body
    assert "a=x-target:offerer" in keys_body
    assert attr(keys_body, "crypto") == [f"1 {SUITE} inline:{k_caller} SSRC=1111"]
    assert attr(keys_body, "rcrypto") == [f"1 {SUITE} inline:{k_callee} SSRC=2222"]
    assert "a=x-key-method:sdes" in keys_body
    origination = dict(events)["Origination"]
    assert f'"call_id":"{call_id}"' in origination and f'"liid":"{liid}"' in origination

    # the recorder's view: decrypt what the caller sent with the disclosed key
    disclosed = base64.b64decode(attr(keys_body, "crypto")[0].split("inline:")[1].split()[0])
    sender = pylibsrtp.Session(pylibsrtp.Policy(
        key=base64.b64decode(k_caller), ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND))
    receiver = pylibsrtp.Session(pylibsrtp.Policy(
        key=disclosed, ssrc_type=pylibsrtp.Policy.SSRC_ANY_INBOUND))
    for seq in range(5):
        payload = os.urandom(160)
        rtp = bytes([0x80, 0x00]) + seq.to_bytes(2, "big") + (seq * 160).to_bytes(4, "big") \
            + (1111).to_bytes(4, "big") + payload
        assert receiver.unprotect(sender.protect(rtp))[12:] == payload

    # never in plaintext in Redis
    for _id, fields in bytes_entries(client.xrange(names.EVENTS)):
        for value in fields.values():
            assert k_caller.encode() not in value and k_callee.encode() not in value


def test_callee_target_is_the_answerer(
        lab_factory: Any, tmp_path: Path, client: redis.Redis, recipient: Recipient) -> None:
    callee = f"tgt{uuid.uuid4().hex[:8]}"
    k_caller, k_callee = new_key(), new_key()
    events, _ = target_call(lab_factory, tmp_path, client, recipient, f"{callee}@127.0.0.1",
                            "carol", callee, sdes(k_caller, 3333), sdes(k_callee, 4444))
    assert [e for e, _ in events] == ["TerminationAttempt", "Keys", "Answer", "Release"]
    body = dict(events)["Keys"]
    assert "a=x-target:answerer" in body
    assert attr(body, "crypto") == [f"1 {SUITE} inline:{k_callee} SSRC=4444"]
    assert attr(body, "rcrypto") == [f"1 {SUITE} inline:{k_caller} SSRC=3333"]


@pytest.mark.parametrize("uniform", ["true", "false"])
def test_target_and_plain_calls_with_and_without_uniform_path(
        lab_factory: Any, tmp_path: Path, client: redis.Redis, recipient: Recipient,
        uniform: str) -> None:
    """li.uniform on (every call arms the reply route while a target exists) or off (only the
    target's): the target's events are the same, and an ordinary call beside it gets none."""
    callee = f"tgt{uuid.uuid4().hex[:8]}"
    k_caller, k_callee = new_key(), new_key()
    config_admin.set_value(client, "li.uniform", uniform, user="test")
    try:
        with srtp_uas(tmp_path / "uas", sdes(k_callee, 4444)) as uas:
            lab = _lab(lab_factory, uas)
            liid = provision(client, recipient, f"{callee}@127.0.0.1")
            try:
                time.sleep(1.2)  # the children's config poll
                before = client.xlen(names.EVENTS)
                srtp_call(lab, tmp_path / "plain", "dave", "someone", sdes(new_key(), 5555))
                srtp_call(lab, tmp_path / "uac", "carol", callee, sdes(k_caller, 3333))
                events = events_of(client, recipient, liid)
            finally:
                unprovision(client, liid)
    finally:
        config_admin.reset(client, "li.uniform", user="test")
    assert [e for e, _ in events] == ["TerminationAttempt", "Keys", "Answer", "Release"]
    assert attr(dict(events)["Keys"], "crypto") == [f"1 {SUITE} inline:{k_callee} SSRC=4444"]
    assert client.xlen(names.EVENTS) - before == 4  # nothing from the ordinary call


def test_non_utf8_caller_does_not_cost_the_targets_keys(
        lab_factory: Any, tmp_path: Path, client: redis.Redis, recipient: Recipient) -> None:
    """A byte that is not UTF-8 in the caller's From (Kamailio relays it; Python cannot read
    the whole message as text): the note is put together from the parsed fields instead, and
    the callee target's events and keys still come."""
    callee = f"tgt{uuid.uuid4().hex[:8]}"
    k_caller, k_callee = new_key(), new_key()
    # "\udce9" is passed to SIPp as the single byte 0xE9 (latin-1 e-acute)
    events, _ = target_call(lab_factory, tmp_path, client, recipient, f"{callee}@127.0.0.1",
                            "caf\udce9", callee, sdes(k_caller, 3333), sdes(k_callee, 4444))
    sent = (tmp_path / "uac" / "uac_messages.log").read_bytes()
    assert b"caf\xe9@" in sent  # the test did send the byte
    assert [e for e, _ in events] == ["TerminationAttempt", "Keys", "Answer", "Release"]
    body = dict(events)["Keys"]
    assert attr(body, "crypto") == [f"1 {SUITE} inline:{k_callee} SSRC=4444"]
    assert attr(body, "rcrypto") == [f"1 {SUITE} inline:{k_caller} SSRC=3333"]


def test_sdp_in_a_multipart_body_sip_i(
        lab_factory: Any, tmp_path: Path, client: redis.Redis, recipient: Recipient) -> None:
    """SIP-I/SIP-T style INVITE: multipart/mixed with ISUP beside the SDP offer. The keys in
    the SDP part are found; the relayed INVITE keeps its multipart body."""
    caller = f"tgt{uuid.uuid4().hex[:8]}"
    k_caller, k_callee = new_key(), new_key()
    events, relayed = target_call(lab_factory, tmp_path, client, recipient,
                                  f"{caller}@127.0.0.2", caller, "bob", sdes(k_caller, 1111),
                                  sdes(k_callee, 2222), uac="uac_srtp_multipart.xml")
    assert relayed and "ISUP-IAM-PLACEHOLDER" in relayed[0].raw
    assert [e for e, _ in events] == ["Origination", "Keys", "Answer", "Release"]
    body = dict(events)["Keys"]
    assert attr(body, "crypto") == [f"1 {SUITE} inline:{k_caller} SSRC=1111"]
    assert attr(body, "rcrypto") == [f"1 {SUITE} inline:{k_callee} SSRC=2222"]


def test_offer_in_a_reliable_183_answered_in_the_prack(
        lab_factory: Any, tmp_path: Path, client: redis.Redis, recipient: Recipient) -> None:
    """RFC 3262: the INVITE has no SDP, the callee offers in a reliable 183 and the caller
    answers in the PRACK (through the proxy, record-routed)."""
    caller = f"tgt{uuid.uuid4().hex[:8]}"
    k_caller, k_callee = new_key(), new_key()
    events, _ = target_call(lab_factory, tmp_path, client, recipient, f"{caller}@127.0.0.2",
                            caller, "bob", sdes(k_caller, 1111), sdes(k_callee, 2222),
                            uac="uac_srtp_prack.xml", uas="uas_srtp_prack.xml")
    assert [e for e, _ in events] == ["Origination", "Keys", "Answer", "Release"]
    body = dict(events)["Keys"]
    assert "a=x-target:answerer" in body  # the caller answered this exchange
    assert attr(body, "crypto") == [f"1 {SUITE} inline:{k_caller} SSRC=1111"]
    assert attr(body, "rcrypto") == [f"1 {SUITE} inline:{k_callee} SSRC=2222"]


def test_reinvite_with_new_keys_is_a_rekey(
        lab_factory: Any, tmp_path: Path, client: redis.Redis, recipient: Recipient) -> None:
    caller = f"tgt{uuid.uuid4().hex[:8]}"
    k1, k2, k3, k4 = new_key(), new_key(), new_key(), new_key()
    uac_media = sdes(k1, 1111)
    uac_media.attr3 = f"crypto:1 {SUITE} inline:{k3}"
    uas_media = sdes(k2, 2222)
    uas_media.attr3 = f"crypto:1 {SUITE} inline:{k4}"
    events, _ = target_call(lab_factory, tmp_path, client, recipient, f"{caller}@127.0.0.2",
                            caller, "bob", uac_media, uas_media, uac="uac_srtp_rekey.xml",
                            uas="uas_srtp_rekey.xml")
    assert [e for e, _ in events] == ["Origination", "Keys", "Answer", "Keys", "ReKey",
                                      "Release"]
    first, second = [b for e, b in events if e == "Keys"]
    assert attr(first, "crypto")[0].startswith(f"1 {SUITE} inline:{k1}")
    assert attr(second, "crypto")[0].startswith(f"1 {SUITE} inline:{k3}")
    assert attr(second, "rcrypto")[0].startswith(f"1 {SUITE} inline:{k4}")


def test_late_offer_answered_in_the_ack(
        lab_factory: Any, tmp_path: Path, client: redis.Redis, recipient: Recipient) -> None:
    """INVITE without SDP: the callee offers in the 200, the caller answers in the ACK."""
    caller = f"tgt{uuid.uuid4().hex[:8]}"
    k_caller, k_callee = new_key(), new_key()
    events, _ = target_call(lab_factory, tmp_path, client, recipient, f"{caller}@127.0.0.2",
                            caller, "bob", sdes(k_caller, 1111), sdes(k_callee, 2222),
                            uac="uac_srtp_late.xml")
    assert sorted(e for e, _ in events) == ["Answer", "Keys", "Origination", "Release"]
    body = dict(events)["Keys"]
    assert "a=x-target:answerer" in body  # the caller answered this exchange
    assert attr(body, "crypto") == [f"1 {SUITE} inline:{k_caller} SSRC=1111"]
    assert attr(body, "rcrypto") == [f"1 {SUITE} inline:{k_callee} SSRC=2222"]


@pytest.mark.parametrize("media,method", [
    (Media("UDP/TLS/RTP/SAVP", "fingerprint:sha-256 " + ":".join(["AB"] * 32), "setup:actpass"),
     "dtls-srtp"),
    (Media("RTP/AVP", "zrtp-hash:1.10 " + "0" * 64, "x-none:1"), "zrtp"),
])
def test_keys_not_in_signalling_are_reported(
        lab_factory: Any, tmp_path: Path, client: redis.Redis, recipient: Recipient,
        media: Media, method: str) -> None:
    caller = f"tgt{uuid.uuid4().hex[:8]}"
    events, _ = target_call(lab_factory, tmp_path, client, recipient, f"{caller}@127.0.0.2",
                            caller, "bob", media, media)
    body = dict(events)["Keys"]
    assert f"a=x-key-method:{method}" in body
    assert not attr(body, "crypto") and not attr(body, "rcrypto")
    assert f'"key_method":"{method}"' in dict(events)["Answer"]


def test_target_invite_is_relayed_exactly_like_any_other(
        lab_factory: Any, tmp_path: Path, client: redis.Redis, recipient: Recipient) -> None:
    """Same header names in the same order, same values but for per-call ones, no body
    change: nothing tells the callee (or the target) that the call is intercepted."""
    target, other = f"tgt{uuid.uuid4().hex[:8]}", f"usr{uuid.uuid4().hex[:8]}"
    key = new_key()
    liid = provision(client, recipient, f"{target}@127.0.0.2")
    try:
        with srtp_uas(tmp_path / "uas", sdes(new_key(), 2)) as uas:
            lab = _lab(lab_factory, uas)
            srtp_call(lab, tmp_path / "uac1", other, "bob", sdes(key, 1))
            srtp_call(lab, tmp_path / "uac2", target, "bob", sdes(key, 1))
            events_of(client, recipient, liid)
            invites = uas.invites()
    finally:
        unprovision(client, liid)
    assert len(invites) == 2
    # per-call values; the score differs because the second call raises bob's call rate
    per_call = {"Via", "From", "Call-ID", "Contact", "Content-Length", "Record-Route",
                "X-Spitwall-Score"}

    def shape(msg: Any) -> list[tuple[str, str]]:
        return [(n, "*" if n in per_call else v) for n, v in msg.header_items]

    plain, tapped = invites
    assert [n for n, _ in plain.header_items] == [n for n, _ in tapped.header_items]
    assert shape(plain) == shape(tapped)
    # Record-Route: same parameters (the dialog's id differs per call, its presence does not)
    rr_params = [sorted(p.split("=")[0] for p in str(m.header("Record-Route")).split(";")[1:])
                 for m in (plain, tapped)]
    assert rr_params[0] == rr_params[1]
    assert plain.body.replace(other, target).split("o=")[0] == tapped.body.split("o=")[0]


def test_recording_indication_only_for_recording_mode(
        lab_factory: Any, tmp_path: Path, client: redis.Redis, recipient: Recipient) -> None:
    """With li.recording_indication on, a recording-mode target's call carries a=record:on
    (RFC 7866) in both directions; an intercept target's call never does."""

    recorded, tapped = f"rec{uuid.uuid4().hex[:8]}", f"tgt{uuid.uuid4().hex[:8]}"
    rec_liid = provision(client, recipient, f"{recorded}@127.0.0.2", mode="recording")
    li_liid = provision(client, recipient, f"{tapped}@127.0.0.2")
    config_admin.set_value(client, "li.recording_indication", "true", user="test")
    try:
        with srtp_uas(tmp_path / "uas", sdes(new_key(), 2)) as uas:
            lab = _lab(lab_factory, uas)
            srtp_call(lab, tmp_path / "uac1", recorded, "bob", sdes(new_key(), 1))
            srtp_call(lab, tmp_path / "uac2", tapped, "bob", sdes(new_key(), 1))
            events_of(client, recipient, li_liid)
            invites = uas.invites()
    finally:
        config_admin.reset(client, "li.recording_indication", user="test")
        unprovision(client, rec_liid)
        unprovision(client, li_liid)
    assert "a=record:on" in invites[0].body
    assert "a=record:on" not in invites[1].body
    oks = [m for m in parse_message_log(tmp_path / "uac1" / "uac_messages.log")
           if m.direction == "received" and m.status == 200 and m.cseq_method == "INVITE"]
    assert oks and "a=record:on" in oks[0].body
    oks = [m for m in parse_message_log(tmp_path / "uac2" / "uac_messages.log")
           if m.direction == "received" and m.status == 200 and m.cseq_method == "INVITE"]
    assert oks and "a=record:on" not in oks[0].body


def test_malformed_crypto_on_a_target_call_never_breaks_the_call(
        lab_factory: Any, tmp_path: Path, client: redis.Redis, recipient: Recipient) -> None:
    """A hostile a=crypto (not base64, absurd lifetime): the call completes as usual, the call
    events go out, no key event (the timer process counts the error), no Kamailio child dies."""
    from tests.integration.helpers import children_of

    caller = f"tgt{uuid.uuid4().hex[:8]}"
    bad = Media("RTP/SAVP", f"crypto:1 {SUITE} inline:!!notbase64!!|2^999", "ssrc:x cname:y")
    liid = provision(client, recipient, f"{caller}@127.0.0.2")
    try:
        with srtp_uas(tmp_path / "uas", sdes(new_key(), 2)) as uas:
            lab = _lab(lab_factory, uas)
            assert lab.state is not None
            before = children_of(lab.state.pids["kamailio"])
            srtp_call(lab, tmp_path / "uac", caller, "bob", bad)
            events = events_of(client, recipient, liid)
            assert children_of(lab.state.pids["kamailio"]) == before
            log = Path(lab.state.logs["kamailio"]).read_text(errors="replace")
    finally:
        unprovision(client, liid)
    assert [e for e, _ in events] == ["Origination", "Answer", "Release"]
    assert "not usable for keys" in log and "notbase64" not in log


@pytest.mark.parametrize("rekey", [False, True])
def test_target_call_relayed_by_the_answering_machine_fallback(
        lab_factory: Any, tmp_path: Path, client: redis.Redis, recipient: Recipient,
        rekey: bool) -> None:
    """A target's call diverted to an answering machine that does not answer is relayed to
    the callee by the fallback: its keys, answer, re-keying and release are all reported."""
    caller = f"tgt{uuid.uuid4().hex[:8]}"
    k1, k2, k3, k4 = new_key(), new_key(), new_key(), new_key()
    uac_media, uas_media = sdes(k1, 1111), sdes(k2, 2222)
    uac_media.attr3 = f"crypto:1 {SUITE} inline:{k3}"
    uas_media.attr3 = f"crypto:1 {SUITE} inline:{k4}"
    for key, value in (("divert_threshold", "0"), ("reject_threshold", "0.99"),
                       ("media.timeout", "1")):
        config_admin.set_value(client, key, value, user="test")
    liid = provision(client, recipient, f"{caller}@127.0.0.2")
    dead = free_udp_port("127.0.0.1")  # the "answering machine": nothing listens
    try:
        with srtp_uas(tmp_path / "uas", uas_media,
                      "uas_srtp_rekey.xml" if rekey else "uas_srtp.xml") as srv:
            lab: Lab = lab_factory(next_hop=f"sip:127.0.0.1:{srv.port}", children=2,
                                   media_uri=f"sip:spitwall-am@127.0.0.1:{dead}")
            srtp_call(lab, tmp_path / "uac", caller, "bob", uac_media,
                      scenario="uac_srtp_rekey.xml" if rekey else "uac_srtp.xml")
            events = events_of(client, recipient, liid)
            assert len(srv.invites()) == (2 if rekey else 1)  # the call reached the callee
    finally:
        unprovision(client, liid)
    expected = ["Origination", "Keys", "Answer", "Keys", "ReKey", "Release"] if rekey \
        else ["Origination", "Keys", "Answer", "Release"]
    assert [e for e, _ in events] == expected
    keys = [b for e, b in events if e == "Keys"]
    assert attr(keys[0], "crypto")[0].startswith(f"1 {SUITE} inline:{k1}")
    assert attr(keys[0], "rcrypto")[0].startswith(f"1 {SUITE} inline:{k2}")
    if rekey:
        assert attr(keys[1], "crypto")[0].startswith(f"1 {SUITE} inline:{k3}")
        assert attr(keys[1], "rcrypto")[0].startswith(f"1 {SUITE} inline:{k4}")
