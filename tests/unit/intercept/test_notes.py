"""The timer process's reading of the SIP workers' notes: messages, pairing, per-call memory."""

from __future__ import annotations

import random

import pytest

from intercept.notes import RECORDING, Calls, NoteReader, RawMessage

CODE = "CASE-1:caller"
OFFER = "v=0\r\nm=audio 4000 RTP/SAVP 0\r\na=crypto:1 X inline:AAAA\r\n"
ANSWER = "v=0\r\nm=audio 5000 RTP/SAVP 0\r\na=crypto:1 X inline:BBBB\r\n"


def request(method: str, cseq: int, body: str = "", from_tag: str = "ft1",
            call_id: str = "c1@h") -> str:
    ctype = "Content-Type: application/sdp\r\n" if body else ""
    return (f"{method} sip:bob@example.net SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.2;branch=z9hG4bK1\r\n"
            f'From: "Alice" <sip:alice@example.com>;tag={from_tag}\r\n'
            f"To: <sip:bob@example.net>\r\nCall-ID: {call_id}\r\nCSeq: {cseq} {method}\r\n"
            f"{ctype}Content-Length: {len(body)}\r\n\r\n{body}")


def reply(status: int, cseq: int, method: str = "INVITE", body: str = "",
          call_id: str = "c1@h", from_tag: str = "ft1") -> str:
    """A reply; `from_tag` is the request sender's (a reply copies the request's From)."""
    ctype = "c: application/sdp;charset=x\r\n" if body else ""  # compact form, parameter
    return (f"SIP/2.0 {status} Some Reason\r\n"
            f"f: <sip:alice@example.com>;tag={from_tag}\r\nt: <sip:bob@example.net>;tag=tt9\r\n"
            f"i: {call_id}\r\nCSeq: {cseq} {method}\r\n{ctype}\r\n{body}")


def test_raw_message_request_and_reply() -> None:
    m = RawMessage.read(request("INVITE", 7, OFFER))
    assert (m.method, m.status, m.ruri, m.call_id, m.cseq) == \
        ("INVITE", 0, "sip:bob@example.net", "c1@h", "7")
    assert (m.from_uri, m.from_tag, m.to_uri, m.sdp) == \
        ("sip:alice@example.com", "ft1", "sip:bob@example.net", OFFER)
    r = RawMessage.read(reply(183, 7, body=ANSWER))
    assert (r.method, r.status, r.reason, r.call_id, r.sdp) == \
        ("INVITE", 183, "Some Reason", "c1@h", ANSWER)


def test_raw_message_body_only_when_sdp() -> None:
    text = request("INVITE", 1, "hello").replace("application/sdp", "text/plain")
    assert RawMessage.read(text).sdp == ""
    assert RawMessage.read(request("INVITE", 1)).sdp == ""
    # LF-only line ends and a bare From URI with a tag
    m = RawMessage.read("BYE sip:x@y SIP/2.0\nFrom: sip:a@b;tag=zz\nCall-ID: q\n\n")
    assert (m.method, m.from_uri, m.from_tag, m.call_id) == ("BYE", "sip:a@b", "zz", "q")


def test_raw_message_never_raises() -> None:
    rng = random.Random(7)
    alphabet = "SIP/2.0 INVITE:;<>=@\r\n\t tag=CSeq Call-ID i f t c application/sdp 0123"
    samples = ["", "\r\n\r\n", ":", "SIP/2.0", "SIP/2.0 abc", "CSeq:", "From: <", "From: >;<"]
    samples += ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 300)))
                for _ in range(3000)]
    base = request("INVITE", 3, OFFER)
    samples += [base[:i] for i in range(0, len(base), 7)]
    for text in samples:
        m = RawMessage.read(text)
        assert isinstance(m.cseq, str) and len(m.call_id) <= 256


def test_offer_and_answer_are_paired_early_and_final() -> None:
    r = NoteReader()
    kind, item = r.read(f"invite 100.5 {CODE} 1 603", request("INVITE", 1, OFFER)) or ("", {})
    assert kind == "invite"
    assert item == {"li": CODE, "call_id": "c1@h", "caller": "sip:alice@example.com",
                    "callee": "sip:bob@example.net", "cseq": "1", "rc": 1, "reject": "603",
                    "now": 100.5}
    assert r.read(f"reply 100.6 {CODE}", reply(100, 1)) is None  # nothing before 180
    _, early = r.read(f"reply 100.7 {CODE}", reply(183, 1, body=ANSWER)) or ("", {})
    assert (early["offer"], early["answer"], early["offerer"], early["rekey"]) == \
        (OFFER, ANSWER, "caller", False)
    _, final = r.read(f"reply 100.8 {CODE}", reply(200, 1, body=ANSWER)) or ("", {})
    assert (final["status"], final["offer"], final["answer"], final["now"]) == \
        (200, OFFER, ANSWER, 100.8)
    assert final["caller"] == "sip:alice@example.com"
    _, end = r.read(f"end 130 {CODE}", "c1@h\nBYE or dialog timeout") or ("", {})
    assert end == {"li": CODE, "call_id": "c1@h", "now": 130.0,
                   "caller": "sip:alice@example.com", "callee": "sip:bob@example.net",
                   "reason": "BYE or dialog timeout"}
    assert len(r.calls) == 0


def test_failure_releases_and_forgets_the_call() -> None:
    r = NoteReader()
    r.read(f"invite 1 {CODE} 1 603", request("INVITE", 1, OFFER))
    _, item = r.read(f"reply 2 {CODE}", reply(486, 1, body=ANSWER)) or ("", {})
    assert (item["status"], item["answer"], item["offer"]) == (486, "", "")
    assert len(r.calls) == 0


def test_rejected_invite_is_not_remembered() -> None:
    r = NoteReader()
    _, item = r.read(f"invite 1 {CODE} 0 608", request("INVITE", 1, OFFER)) or ("", {})
    assert (item["rc"], item["reject"]) == (0, "608")
    assert len(r.calls) == 0


def test_late_offer_is_answered_in_the_ack() -> None:
    r = NoteReader()
    r.read(f"invite 1 {CODE} 1 603", request("INVITE", 1))
    _, ok = r.read(f"reply 2 {CODE}", reply(200, 1, body=OFFER)) or ("", {})
    assert (ok["offer"], ok["answer"]) == ("", OFFER)  # no key event from the 2xx alone
    kind, ack = r.read(f"request 3 {CODE}", request("ACK", 1, ANSWER)) or ("", {})
    assert kind == "ack"
    assert (ack["offer"], ack["answer"], ack["offerer"]) == (OFFER, ANSWER, "callee")
    assert r.read(f"request 4 {CODE}", request("ACK", 1, ANSWER)) is None  # used once


def test_reinvite_from_either_side_is_a_rekey() -> None:
    r = NoteReader()
    r.read(f"invite 1 {CODE} 1 603", request("INVITE", 1, OFFER))
    r.read(f"reply 2 {CODE}", reply(200, 1, body=ANSWER))
    assert r.read(f"request 3 {CODE}", request("ACK", 1)) is None
    # the callee re-INVITEs (its own From tag)
    assert r.read(f"request 4 {CODE}", request("INVITE", 5, ANSWER, from_tag="tt9")) is None
    _, item = r.read(f"reply 5 {CODE}", reply(200, 5, body=OFFER, from_tag="tt9")) or ("", {})
    assert (item["rekey"], item["offerer"], item["offer"], item["answer"]) == \
        (True, "callee", ANSWER, OFFER)
    # the caller's UPDATE
    r.read(f"request 6 {CODE}", request("UPDATE", 2, OFFER))
    _, upd = r.read(f"reply 7 {CODE}", reply(200, 2, "UPDATE", body=ANSWER)) or ("", {})
    assert (upd["rekey"], upd["offerer"]) == (True, "caller")


def test_offerless_reinvite_offer_comes_in_the_2xx() -> None:
    r = NoteReader()
    r.read(f"invite 1 {CODE} 1 603", request("INVITE", 1, OFFER))
    r.read(f"reply 2 {CODE}", reply(200, 1, body=ANSWER))
    r.read(f"request 3 {CODE}", request("INVITE", 2))  # the caller, no SDP
    _, ok = r.read(f"reply 4 {CODE}", reply(200, 2, body=OFFER)) or ("", {})
    assert (ok["rekey"], ok["offer"]) == (True, "")
    _, ack = r.read(f"request 5 {CODE}", request("ACK", 2, ANSWER)) or ("", {})
    assert (ack["offer"], ack["answer"], ack["offerer"]) == (OFFER, ANSWER, "callee")


def test_recording_suffix_and_bad_keys() -> None:
    r = NoteReader()
    _, item = r.read(f"invite 1 {CODE}{RECORDING} 1 603", request("INVITE", 1)) or ("", {})
    assert item["li"] == CODE
    assert r.read("invite", "x") is None
    assert r.read("invite notatime CODE", "x") is None
    assert r.read("strange 1 CODE", "x") is None
    assert r.bad == 3


def test_forgotten_call_still_gets_events() -> None:
    r = NoteReader(Calls(limit=1))
    r.read(f"invite 1 {CODE} 1 603", request("INVITE", 1, OFFER, call_id="a"))
    r.read(f"invite 1 {CODE} 1 603", request("INVITE", 1, OFFER, call_id="b"))
    assert r.calls.forgotten == 1
    _, item = r.read(f"reply 2 {CODE}", reply(200, 1, body=ANSWER, call_id="a")) or ("", {})
    assert (item["offer"], item["answer"], item["caller"]) == \
        ("", ANSWER, "sip:alice@example.com")
    _, end = r.read(f"end 3 {CODE}", "a\nBYE") or ("", {})
    assert (end["caller"], end["reason"]) == ("", "BYE")
    # an in-dialog request of a forgotten call starts a new record
    assert r.read(f"request 4 {CODE}", request("INVITE", 2, OFFER, call_id="a")) is None
    assert r.calls.get("a") is not None


def test_calls_are_bounded_least_recently_active_first() -> None:
    calls = Calls(limit=2)
    r = NoteReader(calls)
    for cid in ("a", "b"):
        r.read(f"invite 1 {CODE} 1 603", request("INVITE", 1, OFFER, call_id=cid))
    r.read(f"request 2 {CODE}", request("ACK", 1, call_id="a"))  # "a" is active again
    r.read(f"invite 3 {CODE} 1 603", request("INVITE", 1, OFFER, call_id="c"))
    assert calls.get("a") is not None and calls.get("b") is None and calls.get("c") is not None


def multipart(sdp: str, boundary: str = "unique-b1") -> tuple[str, str]:
    """(Content-Type value, body) of a SIP-I style INVITE body: ISUP IAM beside the SDP."""
    body = (f"--{boundary}\r\nContent-Type: application/isup;version=itu-t92+\r\n"
            f"Content-Disposition: signal;handling=optional\r\n\r\n\x01\x10\x20\r\n"
            f"--{boundary}\r\nContent-Type: application/sdp\r\n\r\n{sdp}\r\n"
            f"--{boundary}--\r\n")
    return f'multipart/mixed;boundary="{boundary}"', body


def test_sdp_inside_a_multipart_body() -> None:
    ctype, body = multipart(OFFER)
    text = request("INVITE", 1).replace("Content-Length: 0\r\n",
                                        f"Content-Type: {ctype}\r\n\r\n") + body
    m = RawMessage.read(text)
    assert m.sdp.rstrip("\r\n") == OFFER.rstrip("\r\n")
    assert "inline:AAAA" in m.sdp


@pytest.mark.parametrize("ctype,body", [
    ('multipart/mixed;boundary="x"', "--x\r\nContent-Type: text/plain\r\n\r\nhi\r\n--x--\r\n"),
    ("multipart/mixed", "no boundary at all"),
    ('multipart/mixed;boundary="x"', "--x\r\n\r\n--x--"),
    ('multipart/mixed;boundary="x"', "\x00\xff" * 50),
    ('multipart/mixed;boundary="x"', "--x\r\nContent-Type: application/sdp\r\n\r\n" + "a" * 70000),
])
def test_multipart_without_usable_sdp(ctype: str, body: str) -> None:
    text = request("INVITE", 1).replace("Content-Length: 0\r\n",
                                        f"Content-Type: {ctype}\r\n\r\n") + body
    assert RawMessage.read(text).sdp == ""


def test_same_cseq_number_from_both_sides_are_different_transactions() -> None:
    r = NoteReader()
    r.read(f"invite 1 {CODE} 1 603", request("INVITE", 1, OFFER))
    r.read(f"reply 2 {CODE}", reply(200, 1, body=ANSWER))
    # the callee's first own request also has CSeq 1 (each side counts its own)
    r.read(f"request 3 {CODE}", request("INVITE", 1, ANSWER, from_tag="tt9"))
    r.read(f"request 4 {CODE}", request("UPDATE", 2, OFFER))  # the caller's
    _, mine = r.read(f"reply 5 {CODE}", reply(200, 1, body=OFFER, from_tag="tt9")) or ("", {})
    assert (mine["offer"], mine["offerer"], mine["rekey"]) == (ANSWER, "callee", True)


def test_offer_in_a_reliable_183_answered_in_the_prack() -> None:
    """RFC 3262: INVITE without SDP, the callee offers in a reliable 183, the PRACK answers;
    the 200 to the PRACK is no call event, the INVITE's 200 is the Answer."""
    r = NoteReader()
    r.read(f"invite 1 {CODE} 1 603", request("INVITE", 1))
    _, early = r.read(f"reply 2 {CODE}", reply(183, 1, body=OFFER)) or ("", {})
    assert (early["offer"], early["answer"]) == ("", OFFER)  # no key event yet
    kind, prack = r.read(f"request 3 {CODE}", request("PRACK", 2, ANSWER)) or ("", {})
    assert kind == "ack"
    assert (prack["offer"], prack["answer"], prack["offerer"]) == (OFFER, ANSWER, "callee")
    _, ok = r.read(f"reply 4 {CODE}", reply(200, 2, "PRACK")) or ("", {})
    assert ok["keys_only"] is True
    _, final = r.read(f"reply 5 {CODE}", reply(200, 1)) or ("", {})
    assert (final["keys_only"], final["status"]) == (False, 200)
    assert r.read(f"request 6 {CODE}", request("ACK", 1)) is None  # nothing left to answer
    # a PRACK failure does not end the call
    r.read(f"request 7 {CODE}", request("PRACK", 3, OFFER))
    _, bad = r.read(f"reply 8 {CODE}", reply(481, 3, "PRACK")) or ("", {})
    assert bad["keys_only"] is True and r.calls.get("c1@h") is not None


def test_offer_in_a_prack_is_answered_in_its_200() -> None:
    r = NoteReader()
    r.read(f"invite 1 {CODE} 1 603", request("INVITE", 1, OFFER))
    r.read(f"reply 2 {CODE}", reply(183, 1, body=ANSWER))
    r.read(f"request 3 {CODE}", request("PRACK", 2, OFFER.replace("AAAA", "CCCC")))
    _, ok = r.read(f"reply 4 {CODE}", reply(200, 2, "PRACK", body=ANSWER)) or ("", {})
    assert ok["keys_only"] and "CCCC" in ok["offer"] and ok["answer"] == ANSWER
