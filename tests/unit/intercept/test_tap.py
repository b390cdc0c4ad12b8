"""The proxy's event factory: matching a CallAttempt, encrypted events, deterministic ids,
the in-memory backlog while Redis is away."""

from __future__ import annotations

import base64
import json
import os

import pytest

from intercept import names
from intercept.tap import (
    BACKLOG_MAX,
    CallInfo,
    Tap,
    Tapped,
    call_identities,
    decode_matches,
    encode_matches,
    event_id,
    pack_targets,
    unpack_targets,
)
from intercept.targets import Target
from scoring.model import CallAttempt
from tests.intercept_certs import make_recipient

REC = make_recipient("unit-tap")
K1 = base64.b64encode(bytes(range(30))).decode()
K2 = base64.b64encode(bytes(range(30, 60))).decode()


def sdp(key: str, port: int, ssrc: int, proto: str = "RTP/SAVP") -> str:
    return (f"v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.{port % 250}\r\n"
            f"t=0 0\r\nm=audio {port} {proto} 0\r\n"
            f"a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:{key}\r\na=ssrc:{ssrc} cname:x\r\n")


def tap_with(*targets: Target) -> Tap:
    tap = Tap()
    tap.load({t.liid.encode(): t.pack() for t in targets}, "3")
    return tap


def mk(liid: str = "C1", ident: str = "tel:15551230001", **kw: object) -> Target:
    return Target(liid=liid, identities=(ident,), deliver_to="sip:lea@127.0.0.1",
                  cert_pem=REC.cert_pem, start=0.0, **kw)  # type: ignore[arg-type]


def fields(cmd: list[object]) -> dict[str, object]:
    assert cmd[:3] == ["XADD", names.EVENTS, "*"]
    rest = cmd[3:]
    return {str(rest[i]): rest[i + 1] for i in range(0, len(rest), 2)}


def test_call_identities_cover_from_pai_ruri_and_to() -> None:
    a = CallAttempt(call_id="c", source_ip="1.2.3.4", from_user="alice", from_domain="a.org",
                    pai='"X" <sip:+15551230001@gw;user=phone>', ruri_user="bob",
                    ruri_domain="b.org", to_user="+1 555", )
    callers, callees = call_identities(a)
    assert set(callers) == {"alice@a.org", "tel:15551230001"}
    assert "bob@b.org" in callees
    tel = CallAttempt(call_id="c", source_ip="1.2.3.4", pai="<tel:+15551239999>")
    assert "tel:15551239999" in call_identities(tel)[0]


def test_match_codes_round_trip() -> None:
    code = encode_matches([Tapped("A", "caller"), Tapped("B.2", "callee")])
    assert code == "A:caller,B.2:callee"
    assert decode_matches(code) == [Tapped("A", "caller"), Tapped("B.2", "callee")]
    assert decode_matches("") == [] and decode_matches(None) == []
    assert decode_matches("A:other,:caller,junk") == []


def test_stale_and_match() -> None:
    tap = tap_with(mk())
    assert not tap.stale("3") and tap.stale("4") and tap.stale(None)
    a = CallAttempt(call_id="c", source_ip="1.2.3.4", from_user="+15551230001",
                    from_domain="x", ruri_user="bob", ruri_domain="y")
    assert [m.target.liid for m in tap.match(a, 10.0)] == ["C1"]
    assert Tap().match(a, 10.0) == []


def test_targets_packed_for_shared_memory_give_the_same_snapshot() -> None:
    tap = tap_with(mk("C1"), mk("C2", "bob@example.org", mode="recording"))
    text = pack_targets(tap.raw, 3)
    assert text.isascii() and "\n" not in text
    version, raw = unpack_targets(text)
    assert version == 3 and raw == tap.raw
    other = Tap()
    other.load(raw, str(version))
    assert other.snapshot.version == 3
    assert sorted(t.liid for t in other.snapshot.targets) == ["C1", "C2"]
    assert unpack_targets(pack_targets({}, 7)) == (7, {})


@pytest.mark.parametrize("bad", [
    "", "not base64!", base64.b64encode(b"\xc1").decode(),  # msgpack: never used byte
    base64.b64encode(b"\x93\x01\x02\x03").decode(),  # a list of three
    base64.b64encode(b"\x92\xa1x\x80").decode(),  # version not an int
    base64.b64encode(b"\x92\x01\x81\x01\x02").decode(),  # int keys
    "é",
])
def test_unpacking_anything_else_is_a_value_error(bad: str) -> None:
    with pytest.raises(ValueError, match="shared targets"):
        unpack_targets(bad)


def test_call_events_are_encrypted_and_ids_deterministic() -> None:
    tap = tap_with(mk())
    call = CallInfo("call-1", "sip:+15551230001@x", "sip:bob@y", 1_800_000_000.0)
    cmds = tap.call_events([Tapped("C1", "caller")], None, call, discriminator="invite:1")
    again = tap.call_events([Tapped("C1", "caller")], None, call, discriminator="invite:1")
    assert len(cmds) == 1
    f, g = fields(cmds[0]), fields(again[0])
    assert f["event"] == "Origination" and f["kind"] == "call" and f["dest"] == "sip:lea@127.0.0.1"
    assert f["id"] == g["id"] == event_id("C1", "call-1", "Origination", "invite:1")
    assert f["body"] != g["body"]  # fresh content-encryption key each time
    body = json.loads(REC.body(f["body"]))  # type: ignore[arg-type]
    assert body["event_id"] == f["id"] and body["liid"] == "C1" and body["call_id"] == "call-1"
    assert b"call-1" not in f["body"]  # type: ignore[operator]
    assert list(f) == list(names.EVENT_FIELDS)
    callee = tap.call_events([Tapped("C1", "callee")], None, call, discriminator="invite:1")
    assert fields(callee[0])["event"] == "TerminationAttempt"


def test_deliverables_and_unknown_cases_are_respected() -> None:
    tap = tap_with(mk("K", deliver=("keys",)), mk("E", ident="a@b", deliver=("events",)))
    call = CallInfo("c", "a", "b", 1.0)
    both = [Tapped("K", "caller"), Tapped("E", "caller"), Tapped("GONE", "caller")]
    assert [fields(c)["liid"] for c in tap.call_events(both, "Answer", call,
                                                       discriminator="x")] == ["E"]
    keyed, media = tap.key_events(both, sdp(K1, 4000, 11), sdp(K2, 5000, 22),
                                  offerer_side="caller", call_id="c", now=1.0)
    assert [fields(c)["liid"] for c in keyed] == ["K"]
    assert media[0].key_method == "sdes"


def test_key_events_sides_and_same_answer_same_id() -> None:
    tap = tap_with(mk())
    offer, answer = sdp(K1, 4000, 11), sdp(K2, 5000, 22)
    (c1,), _ = tap.key_events([Tapped("C1", "callee")], offer, answer, offerer_side="caller",
                              call_id="c", now=1.0)
    (c2,), _ = tap.key_events([Tapped("C1", "callee")], offer, answer, offerer_side="caller",
                              call_id="c", now=2.0)
    f = fields(c1)
    assert f["id"] == fields(c2)["id"]
    body = REC.body(f["body"])  # type: ignore[arg-type]
    assert "a=x-target:answerer" in body
    assert f"a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:{K2} SSRC=22" in body
    assert f"a=rcrypto:1 AES_CM_128_HMAC_SHA1_80 inline:{K1} SSRC=11" in body
    assert "m=audio 4000 RTP/SAVP 0" in body  # the remote (offerer's) address
    assert K1.encode() not in c1[-1]
    other = sdp(base64.b64encode(os.urandom(30)).decode(), 5000, 22)
    (c3,), _ = tap.key_events([Tapped("C1", "callee")], offer, other, offerer_side="caller",
                              call_id="c", now=3.0)
    assert fields(c3)["id"] != f["id"]


@pytest.mark.parametrize("bad", ["", "v=0\r\nm=audio x", "\x00\xff", "v=0\r\n" * 10])
def test_malformed_sdp_gives_no_key_event_and_counts(bad: str) -> None:
    tap = tap_with(mk())
    out, media = tap.key_events([Tapped("C1", "caller")], bad, sdp(K2, 5000, 22),
                                offerer_side="caller", call_id="c", now=1.0)
    assert out == [] and media == [] and tap.errors == 1


def test_answer_with_unknown_tag_is_counted_not_raised() -> None:
    tap = tap_with(mk())
    answer = sdp(K2, 5000, 22).replace("a=crypto:1", "a=crypto:9")
    out, _ = tap.key_events([Tapped("C1", "caller")], sdp(K1, 4000, 11), answer,
                            offerer_side="caller", call_id="c", now=1.0)
    assert out == [] and tap.errors == 1


def test_backlog_keeps_events_while_redis_is_away() -> None:
    tap = Tap()
    sent: list[list[object]] = []

    def down(cmds: object) -> None:
        raise ConnectionError("redis down")

    with pytest.raises(ConnectionError):
        tap.flush([["XADD", "k", "*", "a", "1"]], down)
    with pytest.raises(ConnectionError):
        tap.flush([["XADD", "k", "*", "a", "2"]], down)
    assert len(tap.backlog) == 2
    tap.flush([["XADD", "k", "*", "a", "3"]], lambda cmds: sent.extend(cmds))
    assert [c[-1] for c in sent] == ["1", "2", "3"] and not tap.backlog
    big = [["XADD", "k", "*", "n", str(i)] for i in range(BACKLOG_MAX + 5)]
    with pytest.raises(ConnectionError):
        tap.flush(big, down)
    assert len(tap.backlog) == BACKLOG_MAX and tap.lost == 5


def _events(cmds: list[list[object]]) -> list[str]:
    return [str(fields(c)["event"]) for c in cmds]


def test_work_items_give_the_events_of_each_call_point() -> None:
    tap = tap_with(mk())
    base = {"li": "C1:caller", "call_id": "c", "caller": "a", "callee": "b", "cseq": "1",
            "now": 5.0}
    offer, answer = sdp(K1, 4000, 11), sdp(K2, 5000, 22)
    assert _events(tap.handle("invite", {**base, "rc": 1})) == ["Origination"]
    assert _events(tap.handle("invite", {**base, "rc": 0, "reject": 603})) == \
        ["Origination", "Release"]
    ringing = tap.handle("reply", {**base, "status": 183, "offer": offer, "answer": answer})
    assert _events(ringing) == ["Keys"]
    ok = tap.handle("reply", {**base, "status": 200, "offer": offer, "answer": answer})
    assert _events(ok) == ["Keys", "Answer"]
    assert fields(ok[0])["id"] == fields(ringing[0])["id"]  # same answer: same event
    assert _events(tap.handle("reply", {**base, "status": 486, "reason": "Busy Here"})) == \
        ["Release"]
    rekey = tap.handle("reply", {**base, "status": 200, "rekey": True, "offer": offer,
                                 "answer": answer, "cseq": "2"})
    assert _events(rekey) == ["Keys", "ReKey"]
    assert _events(tap.handle("reply", {**base, "status": 488, "rekey": True})) == []
    assert _events(tap.handle("ack", {**base, "offer": answer, "answer": offer,
                                      "offerer": "callee"})) == ["Keys"]
    assert _events(tap.handle("end", {**base, "reason": "BYE"})) == ["Release"]
    assert tap.handle("bogus", base) == []
    assert tap.handle("invite", {**base, "li": ""}) == []


def test_release_reason_and_call_identity_reach_the_recipient() -> None:
    tap = tap_with(mk())
    item = {"li": "C1:callee", "call_id": "call-9", "caller": "sip:x@y", "callee": "sip:t@z",
            "cseq": "1", "now": 1_800_000_000.0, "status": 486, "reason": "Busy Here"}
    (cmd,) = tap.handle("reply", item)
    body = json.loads(REC.body(fields(cmd)["body"]))  # type: ignore[arg-type]
    assert body["event"] == "Release" and body["reason"] == "486 Busy Here"
    assert body["caller"] == "sip:x@y" and body["callee"] == "sip:t@z"
    assert body["time"] == "2027-01-15T08:00:00.000Z"


def test_hostile_work_items_never_raise() -> None:
    tap = tap_with(mk())
    for item in ({"li": "C1:caller", "status": "x"}, {"li": "C1:caller", "now": "soon"},
                 {"li": "C1:caller" * 1000}, {"li": "C1:caller", "status": [1]}):
        assert tap.handle("reply", item) == []
    assert tap.errors == 3  # bad status, bad time, status of the wrong type
    # unusable SDP: no key event (counted), the Answer still goes out
    bad_sdp = {"li": "C1:caller", "status": 200, "offer": "\x00", "answer": "v=0"}
    assert _events(tap.handle("reply", bad_sdp)) == ["Answer"] and tap.errors == 4
