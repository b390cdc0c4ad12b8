"""SDP parsing (real-world samples, malformed input, a mutation fuzz), serialisation, answers."""

from __future__ import annotations

import random

import pytest

from media.sdp import (
    MAX_LINES,
    MAX_MEDIA,
    MAX_SDP_BYTES,
    Codec,
    Connection,
    RtpMap,
    SessionDescription,
    answer_for,
)


def crlf(text: str) -> str:
    return "".join(line + "\r\n" for line in text.strip("\n").split("\n"))


# SIPp's built-in uac scenario, keywords substituted.
SIPP = crlf("""
v=0
o=user1 53655765 2353687637 IN IP4 127.0.0.1
s=-
c=IN IP4 127.0.0.1
t=0 0
m=audio 6000 RTP/AVP 0
a=rtpmap:0 PCMU/8000
""")

# SIPp's uac_pcap scenario (PCMA and telephone-event), keywords substituted.
SIPP_PCAP = crlf("""
v=0
o=user1 53655765 2353687637 IN IP4 127.0.0.1
s=-
c=IN IP4 127.0.0.1
t=0 0
m=audio 6000 RTP/AVP 8 101
a=rtpmap:8 PCMA/8000
a=rtpmap:101 telephone-event/8000
a=fmtp:101 0-11,16
""")

LINPHONE = crlf("""
v=0
o=alice 1234 5678 IN IP4 192.168.1.10
s=Talk
c=IN IP4 192.168.1.10
t=0 0
a=rtcp-xr:rcvr-rtt=all:10000 stat-summary=loss,dup,jitt,TTL voip-metrics
a=record:off
m=audio 7078 RTP/AVP 96 97 98 0 8 18 101 99 100
a=rtpmap:96 opus/48000/2
a=fmtp:96 useinbandfec=1
a=rtpmap:97 speex/16000
a=fmtp:97 vbr=on
a=rtpmap:98 speex/8000
a=fmtp:98 vbr=on
a=fmtp:18 annexb=yes
a=rtpmap:101 telephone-event/48000
a=rtpmap:99 telephone-event/16000
a=rtpmap:100 telephone-event/8000
a=rtcp-fb:* trr-int 5000
a=rtcp-fb:* ccm tmmbr
m=video 9078 RTP/AVP 96 97
a=rtpmap:96 VP8/90000
a=rtpmap:97 H264/90000
a=fmtp:97 profile-level-id=42801F
a=rtcp-fb:* trr-int 5000
a=rtcp-fb:96 nack pli
""")

SRTP = crlf("""
v=0
o=- 3800000000 3800000001 IN IP4 10.0.0.5
s=-
c=IN IP4 10.0.0.5
t=0 0
m=audio 16384 RTP/SAVP 0 8 101
a=rtpmap:0 PCMU/8000
a=rtpmap:8 PCMA/8000
a=rtpmap:101 telephone-event/8000
a=fmtp:101 0-15
a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz|2^20|1:4
a=crypto:2 AES_CM_128_HMAC_SHA1_32 inline:NzB4d1BINUAvLEw6UzF3WSJ+PSdFcGdUJShpX1Zj|2^20|1:32
a=ptime:20
a=sendrecv
""")

# "Best effort" SRTP, as some PBXes offer it: an SRTP and a plain stream.
SRTP_OPTIONAL = crlf("""
v=0
o=pbx 1 1 IN IP4 10.0.0.6
s=call
c=IN IP4 10.0.0.6
t=0 0
m=audio 20000 RTP/SAVP 8 0
a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz
m=audio 20002 RTP/AVP 8 0
a=sendonly
""")

FINGERPRINT = (
    "sha-256 D2:FA:0E:C3:22:59:5E:14:95:69:92:3D:13:B4:84:24:2C:C2:A2:C0:3E:FD:34:8E:5E:EA:6F:"
    "AF:52:CE:E6:0F"
)
WEBRTC = crlf(f"""
v=0
o=- 4611731400430051336 2 IN IP4 127.0.0.1
s=-
t=0 0
a=group:BUNDLE 0 1
a=extmap-allow-mixed
a=msid-semantic: WMS stream
m=audio 9 UDP/TLS/RTP/SAVPF 111 63 9 0 8 13 110 126
c=IN IP4 0.0.0.0
a=rtcp:9 IN IP4 0.0.0.0
a=ice-ufrag:EsAw
a=ice-pwd:bP+XJMM09aR8AiX1jdukzR6Y
a=ice-options:trickle
a=fingerprint:{FINGERPRINT}
a=setup:actpass
a=mid:0
a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level
a=sendrecv
a=msid:stream track
a=rtcp-mux
a=rtpmap:111 opus/48000/2
a=rtcp-fb:111 transport-cc
a=fmtp:111 minptime=10;useinbandfec=1
a=rtpmap:63 red/48000/2
a=fmtp:63 111/111
a=rtpmap:9 G722/8000
a=rtpmap:0 PCMU/8000
a=rtpmap:8 PCMA/8000
a=rtpmap:13 CN/8000
a=rtpmap:110 telephone-event/48000
a=rtpmap:126 telephone-event/8000
a=ssrc:3735928559 cname:4TOk42mSjXCkVIa6
m=application 9 UDP/DTLS/SCTP webrtc-datachannel
c=IN IP4 0.0.0.0
a=ice-ufrag:EsAw
a=ice-pwd:bP+XJMM09aR8AiX1jdukzR6Y
a=fingerprint:{FINGERPRINT}
a=setup:actpass
a=mid:1
a=sctp-port:5000
a=max-message-size:262144
""")

# Every line type, multicast, IPv6, repeat times, an unknown letter.
EVERYTHING = crlf("""
v=0
o=jdoe 2890844526 2890842807 IN IP4 10.47.16.5
s=SDP Seminar
i=A Seminar on the session description protocol
u=http://www.example.com/seminars/sdp.pdf
e=j.doe@example.com (Jane Doe)
p=+1 617 555-6011
c=IN IP4 224.2.17.12/127/2
b=CT:128
t=2873397496 2873404696
r=604800 3600 0 90000
t=0 0
z=2882844526 -1h 2898848070 0
k=prompt
x=unknown line type, kept
a=recvonly
m=audio 49170/2 RTP/AVP 0
i=the audio
c=IN IP6 ff15::101/3
c=IN IP6 host.example.com
b=AS:64
k=prompt
a=rtpmap:0 PCMU/8000
m=video 51372 RTP/AVP 99
a=rtpmap:99 h263-1998/90000
m=message 5000 TCP/MSRP *
a=accept-types:text/plain
""")

SAMPLES = [SIPP, SIPP_PCAP, LINPHONE, SRTP, SRTP_OPTIONAL, WEBRTC, EVERYTHING]


@pytest.mark.parametrize("text", SAMPLES)
def test_samples_parse_and_round_trip(text: str) -> None:
    sdp = SessionDescription.parse(text)
    assert sdp.serialize() == text
    assert SessionDescription.parse(sdp.serialize()) == sdp
    lf = text.replace("\r\n", "\n")
    assert SessionDescription.parse(lf) == sdp  # LF line endings too
    assert SessionDescription.parse(text.encode()) == sdp  # and UTF-8 bytes


def test_sipp_fields() -> None:
    sdp = SessionDescription.parse(SIPP)
    assert sdp.origin.username == "user1" and sdp.origin.session_id == "53655765"
    assert sdp.origin.session_version == "2353687637" and sdp.origin.address == "127.0.0.1"
    assert sdp.session_name == "-" and sdp.connection == Connection("IP4", "127.0.0.1")
    assert sdp.times[0].start == 0 and sdp.times[0].stop == 0
    (audio,) = sdp.media
    assert (audio.media, audio.port, audio.port_count, audio.proto, audio.formats) == (
        "audio", 6000, None, "RTP/AVP", ("0",)
    )
    assert audio.payload_types == (0,)
    assert audio.rtpmap == {0: RtpMap("PCMU", 8000, 1)}
    assert audio.direction == "sendrecv" and audio.connection_address == "127.0.0.1"


def test_linphone_helpers() -> None:
    sdp = SessionDescription.parse(LINPHONE)
    audio, video = sdp.media
    assert audio.rtpmap[96] == RtpMap("opus", 48000, 2)
    assert audio.rtpmap[100] == RtpMap("telephone-event", 8000, 1)
    assert 0 not in audio.rtpmap and audio.encoding(0) == RtpMap("PCMU", 8000, 1)
    assert audio.encoding(18) == RtpMap("G729", 8000, 1) and audio.encoding(120) is None
    assert audio.fmtp == {96: "useinbandfec=1", 97: "vbr=on", 98: "vbr=on", 18: "annexb=yes"}
    assert audio.attribute_values("rtcp-fb") == ["* trr-int 5000", "* ccm tmmbr"]
    assert sdp.attribute_values("record") == ["off"]
    assert video.connection_address == "192.168.1.10"  # inherited from the session
    assert video.fmtp == {97: "profile-level-id=42801F"}


def test_srtp_crypto_lines() -> None:
    sdp = SessionDescription.parse(SRTP)
    (audio,) = sdp.media
    assert audio.proto == "RTP/SAVP" and audio.is_rtp
    assert audio.attribute_values("crypto") == [
        "1 AES_CM_128_HMAC_SHA1_80 inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz|2^20|1:4",
        "2 AES_CM_128_HMAC_SHA1_32 inline:NzB4d1BINUAvLEw6UzF3WSJ+PSdFcGdUJShpX1Zj|2^20|1:32",
    ]
    assert audio.attributes[-1] == ("sendrecv", None)


def test_webrtc() -> None:
    sdp = SessionDescription.parse(WEBRTC)
    audio, data = sdp.media
    assert audio.proto == "UDP/TLS/RTP/SAVPF" and audio.is_rtp and audio.port == 9
    assert audio.attribute_values("fingerprint") == [FINGERPRINT]
    assert audio.has_attribute("rtcp-mux") and audio.attribute_values("rtcp-mux") == [""]
    assert sdp.attribute_values("msid-semantic") == [" WMS stream"]
    assert not data.is_rtp and data.formats == ("webrtc-datachannel",)
    assert data.payload_types == () and data.connection_address == "0.0.0.0"
    assert sdp.connection is None


def test_everything() -> None:
    sdp = SessionDescription.parse(EVERYTHING)
    assert sdp.connection == Connection("IP4", "224.2.17.12", ttl=127, count=2)
    assert [b.bandwidth for b in sdp.bandwidths] == [128]
    assert sdp.times[0].repeats == ("604800 3600 0 90000",) and len(sdp.times) == 2
    assert ("x", "unknown line type, kept") in sdp.other_lines
    audio, video, msrp = sdp.media
    assert audio.port_count == 2 and len(audio.connections) == 2
    assert audio.connections[0] == Connection("IP6", "ff15::101", count=3)
    assert audio.connection_address == "ff15::101"
    assert audio.direction == "recvonly" and video.direction == "recvonly"  # session default
    assert msrp.formats == ("*",) and not msrp.is_rtp


def test_direction_precedence() -> None:
    text = SIPP.replace("t=0 0\r\n", "t=0 0\r\na=sendonly\r\n") + "a=inactive\r\n"
    sdp = SessionDescription.parse(text)
    assert sdp.direction == "sendonly" and sdp.media[0].direction == "inactive"


def test_whitespace_and_blank_lines_tolerated() -> None:
    messy = SIPP.replace("a=rtpmap:0 PCMU/8000", "a=rtpmap:0 PCMU/8000  \t").replace(
        "m=audio 6000 RTP/AVP 0", "m=audio  6000 RTP/AVP   0"
    ) + "\r\n\r\n"
    assert SessionDescription.parse(messy) == SessionDescription.parse(SIPP)


def _offer_with(media: str, session_attrs: str = "") -> str:
    return crlf(
        "v=0\no=caller 1 1 IN IP4 192.0.2.1\ns=-\nc=IN IP4 192.0.2.1\nt=0 0\n"
        + session_attrs + media
    )


def test_answer_sipp() -> None:
    answer, codec = answer_for(SessionDescription.parse(SIPP), "127.0.0.2", 40000,
                               session_id=42)
    assert codec == Codec(0, "PCMU", 8000, None) and codec.g711_type == 0
    assert answer == crlf("""
v=0
o=spitwall 42 42 IN IP4 127.0.0.2
s=spitwall
c=IN IP4 127.0.0.2
t=0 0
m=audio 40000 RTP/AVP 0
a=rtpmap:0 PCMU/8000
a=ptime:20
a=sendrecv
""")


def test_answer_pcma_with_dtmf() -> None:
    answer, codec = answer_for(SessionDescription.parse(SIPP_PCAP), "127.0.0.2", 40000,
                               session_id=7, session_version=8)
    assert codec == Codec(8, "PCMA", 8000, 101) and codec.g711_type == 8
    sdp = SessionDescription.parse(answer)
    assert sdp.origin.session_version == "8"
    (audio,) = sdp.media
    assert audio.formats == ("8", "101")
    assert audio.rtpmap == {8: RtpMap("PCMA", 8000), 101: RtpMap("telephone-event", 8000)}
    assert audio.fmtp == {101: "0-15"}


def test_answer_linphone_prefers_pcmu_and_rejects_video() -> None:
    answer, codec = answer_for(SessionDescription.parse(LINPHONE), "10.1.1.1", 30000,
                               session_id=1)
    assert codec == Codec(0, "PCMU", 8000, 100)  # the 8 kHz telephone-event
    sdp = SessionDescription.parse(answer)
    audio, video = sdp.media
    assert audio.port == 30000 and audio.formats == ("0", "100")
    assert (video.media, video.port, video.proto, video.formats) == (
        "video", 0, "RTP/AVP", ("96", "97")
    )
    assert video.attributes == ()


def test_answer_preference_order() -> None:
    offer = SessionDescription.parse(LINPHONE)
    _answer, codec = answer_for(offer, "10.1.1.1", 30000, session_id=1, prefer=("PCMA", "PCMU"))
    assert codec.payload_type == 8 and codec.name == "PCMA"
    _answer, codec = answer_for(offer, "10.1.1.1", 30000, session_id=1, prefer=("pcma",))
    assert codec.payload_type == 8


def test_answer_dynamic_g711_and_remapped_static_type() -> None:
    offer = _offer_with("m=audio 5000 RTP/AVP 96 0\na=rtpmap:96 PCMU/8000\n"
                        "a=rtpmap:0 PCMA/8000\n")
    _answer, codec = answer_for(SessionDescription.parse(offer), "10.0.0.1", 4000, session_id=1)
    assert codec == Codec(96, "PCMU", 8000, None) and codec.g711_type == 0
    with pytest.raises(ValueError, match="no common codec"):  # 0 re-mapped to PCMA: not trusted
        answer_for(SessionDescription.parse(offer), "10.0.0.1", 4000, session_id=1,
                   prefer=("PCMA",))
    wrong_clock = _offer_with("m=audio 5000 RTP/AVP 97\na=rtpmap:97 PCMU/16000\n")
    with pytest.raises(ValueError, match="no common codec"):
        answer_for(SessionDescription.parse(wrong_clock), "10.0.0.1", 4000, session_id=1)


@pytest.mark.parametrize(
    ("offered", "answered"),
    [("sendrecv", "sendrecv"), ("sendonly", "recvonly"), ("recvonly", "sendonly"),
     ("inactive", "inactive")],
)
def test_answer_mirrors_direction(offered: str, answered: str) -> None:
    media_level = _offer_with(f"m=audio 5000 RTP/AVP 0\na={offered}\n")
    session_level = _offer_with("m=audio 5000 RTP/AVP 0\n", f"a={offered}\n")
    for offer in (media_level, session_level):
        answer, _codec = answer_for(SessionDescription.parse(offer), "10.0.0.1", 4000,
                                    session_id=1)
        assert SessionDescription.parse(answer).media[0].direction == answered


def test_answer_srtp_only_and_srtp_optional() -> None:
    with pytest.raises(ValueError, match="no audio stream with protocol RTP/AVP"):
        answer_for(SessionDescription.parse(SRTP), "10.0.0.1", 4000, session_id=1)
    with pytest.raises(ValueError, match="no audio stream with protocol RTP/AVP"):
        answer_for(SessionDescription.parse(WEBRTC), "10.0.0.1", 4000, session_id=1)
    answer, codec = answer_for(SessionDescription.parse(SRTP_OPTIONAL), "10.0.0.1", 4000,
                               session_id=1)
    assert codec.payload_type == 0  # PCMU preferred, though offered second
    savp, avp = SessionDescription.parse(answer).media
    assert (savp.port, savp.proto, savp.formats) == (0, "RTP/SAVP", ("8", "0"))
    assert (avp.port, avp.proto, avp.direction) == (4000, "RTP/AVP", "recvonly")


def test_answer_skips_disabled_stream_and_fails_cleanly() -> None:
    offer = _offer_with("m=audio 0 RTP/AVP 0\nm=audio 5002 RTP/AVP 8\n")
    answer, codec = answer_for(SessionDescription.parse(offer), "::1", 4000, session_id=1)
    first, second = SessionDescription.parse(answer).media
    assert first.port == 0 and second.port == 4000 and codec.name == "PCMA"
    assert "c=IN IP6 ::1" in answer and "o=spitwall 1 1 IN IP6 ::1" in answer
    g729 = SessionDescription.parse(_offer_with("m=audio 5000 RTP/AVP 18 101\n"
                                                "a=rtpmap:101 telephone-event/8000\n"))
    with pytest.raises(ValueError, match="no common codec: offer has 'G729, telephone-event'"):
        answer_for(g729, "10.0.0.1", 4000, session_id=1)
    no_address = SessionDescription.parse(
        crlf("v=0\no=a 1 1 IN IP4 192.0.2.1\ns=-\nt=0 0\nm=audio 5000 RTP/AVP 0\n")
    )
    with pytest.raises(ValueError, match="no c= address"):
        answer_for(no_address, "10.0.0.1", 4000, session_id=1)
    sipp = SessionDescription.parse(SIPP)
    for kwargs in ({"local_ip": "not-an-ip"}, {"local_port": 0}, {"local_port": 70000},
                   {"session_id": -1}):
        args = {"local_ip": "10.0.0.1", "local_port": 4000, "session_id": 1, **kwargs}
        with pytest.raises(ValueError):
            answer_for(sipp, args["local_ip"], args["local_port"],  # type: ignore[arg-type]
                       session_id=args["session_id"])  # type: ignore[arg-type]


BAD_LINES = [
    # (replace this line of SIPP, with this, expected message fragment)
    ("s=-", "s-", "line 3: 's-' is not '<type letter>=<value>'"),
    ("s=-", "S=-", "line 3: 'S=-' is not"),
    ("s=-", "=", "line 3: '=' is not"),
    ("m=audio 6000 RTP/AVP 0", "m=audio 65536 RTP/AVP 0", "line 6: m= port 65536 is larger"),
    ("m=audio 6000 RTP/AVP 0", "m=audio six RTP/AVP 0", "line 6: m= port 'six'"),
    ("m=audio 6000 RTP/AVP 0", "m=audio 6000/0 RTP/AVP 0", "line 6: m= port count is 0"),
    ("m=audio 6000 RTP/AVP 0", "m=audio -1 RTP/AVP 0", "line 6: m= port '-1'"),
    ("m=audio 6000 RTP/AVP 0", "m=audio 6000 RTP/AVP PCMU", "line 6: m= format 'PCMU'"),
    ("m=audio 6000 RTP/AVP 0", "m=audio 6000 RTP/AVP 0 128", "line 6: m= format '128'"),
    ("m=audio 6000 RTP/AVP 0", "m=audio 6000 RTP/AVP", "line 6: m= has 3 fields"),
    ("m=audio 6000 RTP/AVP 0", "m=audio 6000 RTP//AVP 0", "line 6: m= protocol"),
    ("c=IN IP4 127.0.0.1", "c=IN IP5 127.0.0.1", "line 4: c= address type 'IP5'"),
    ("c=IN IP4 127.0.0.1", "c=IN IP4 ::1", "line 4: c= address '::1' is not an IP4"),
    ("c=IN IP4 127.0.0.1", "c=IN IP6 127.0.0.1", "is not an IP6 address"),
    ("c=IN IP4 127.0.0.1", "c=IN IP4 300.1.1.1", "neither an IP address nor a host name"),
    ("c=IN IP4 127.0.0.1", "c=IN IP4 $ip", "neither an IP address nor a host name"),
    ("c=IN IP4 127.0.0.1", "c=IN IP4", "line 4: c= has 2 fields"),
    ("c=IN IP4 127.0.0.1", "c=TN IP4 127.0.0.1", "network type 'TN' is not IN"),
    ("c=IN IP4 127.0.0.1", "c=IN IP4 224.0.0.1/256", "ttl 256 is larger than 255"),
    ("c=IN IP4 127.0.0.1", "c=IN IP6 ff15::1/3/4", "has more than /count"),
    ("o=user1 53655765 2353687637 IN IP4 127.0.0.1", "o=user1 1 2 IN IP4",
     "line 2: o= has 5 fields"),
    ("o=user1 53655765 2353687637 IN IP4 127.0.0.1", "o=user1 x 2 IN IP4 127.0.0.1",
     "o= session id 'x'"),
    ("t=0 0", "t=0", "line 5: t= has 1 fields"),
    ("t=0 0", "r=1 2 3", "line 5: r= before any t= line"),
    ("t=0 0", "t=now 0", "t= start 'now'"),
    ("v=0", "v=1", "line 1: unsupported SDP version '1'"),
    ("v=0", "o=x 1 1 IN IP4 1.1.1.1", "line 1: the first line must be v="),
    ("a=rtpmap:0 PCMU/8000", "a=rtpmap:0 PCMU", "line 7: rtpmap '0 PCMU' is not"),
    ("a=rtpmap:0 PCMU/8000", "a=rtpmap:200 PCMU/8000", "payload type 200 is larger"),
    ("a=rtpmap:0 PCMU/8000", "a=rtpmap:0 PCMU/0", "clock rate is 0"),
    ("a=rtpmap:0 PCMU/8000", "a=rtpmap:0 PCMU/8000/x", "is not '<payload type>"),
    ("a=rtpmap:0 PCMU/8000", "a=fmtp:x 0-15", "fmtp format 'x' is not an RTP payload type"),
    ("a=rtpmap:0 PCMU/8000", "a=fmtp:", "fmtp has no format"),
    ("a=rtpmap:0 PCMU/8000", "a=", "line 7: attribute name '' is not a token"),
    ("a=rtpmap:0 PCMU/8000", "a=:x", "attribute name '' is not a token"),
    ("a=rtpmap:0 PCMU/8000", "a=rtp map:0", "attribute name 'rtp map'"),
    ("a=rtpmap:0 PCMU/8000", "t=0 0", "line 7: t= is not allowed inside a media description"),
    ("a=rtpmap:0 PCMU/8000", "a=rtpmap:0 PCMU/8000\r\na=rtpmap:0 PCMA/8000",
     "line 8: conflicting rtpmap for payload type 0"),
    ("s=-", "s=-\r\ns=again", "line 4: duplicate s= line"),
    ("s=-", "s=-\r\nv=0", "line 4: duplicate v= line"),
    ("s=-", "s=-\r\no=a 1 1 IN IP4 1.1.1.1", "duplicate o= line"),
    ("t=0 0", "c=IN IP4 1.1.1.1", "duplicate session-level c= line"),
    ("s=-", "s=a\x00b", "line 3: contains a bare CR or a NUL"),
    ("s=-", "s=a\rb", "line 3: contains a bare CR or a NUL"),
    ("t=0 0", "b=AS", "line 5: b= 'AS' is not '<bwtype>:<bandwidth>'"),
]


@pytest.mark.parametrize(("old", "new", "message"), BAD_LINES)
def test_malformed_lines(old: str, new: str, message: str) -> None:
    assert old in SIPP
    with pytest.raises(ValueError) as info:
        SessionDescription.parse(SIPP.replace(old, new, 1))
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "SDP is empty"),
        ("\r\n\r\n", "SDP is empty"),
        ("v=0\r\ns=-\r\n", "no o= line"),
        ("v=0\r\no=a 1 1 IN IP4 1.1.1.1\r\n", "no s= line"),
        (b"v=0\r\ns=\xff\r\n", "not UTF-8"),
        ("v=0\r\ns=\ud800\r\n", "unencodable character"),
        ("\ufeffv=0\r\n", "line 1"),
    ],
)
def test_malformed_documents(text: str | bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SessionDescription.parse(text)


def test_bounds() -> None:
    head = "v=0\r\no=a 1 1 IN IP4 1.1.1.1\r\ns=-\r\nc=IN IP4 1.1.1.1\r\nt=0 0\r\n"
    big = head + "m=audio 1 RTP/AVP 0\r\n" + "a=x:" + "y" * MAX_SDP_BYTES + "\r\n"
    with pytest.raises(ValueError, match="more than 65536"):
        SessionDescription.parse(big)
    with pytest.raises(ValueError, match="more than 65536"):
        SessionDescription.parse(big.encode())
    wide = head + "a=x:" + "€" * 30000 + "\r\n"  # under 64 K characters, over 64 KB
    with pytest.raises(ValueError, match="bytes, more than 65536"):
        SessionDescription.parse(wide)
    lines = head + "a=x\r\n" * MAX_LINES
    with pytest.raises(ValueError, match="more than 2000"):
        SessionDescription.parse(lines)
    ok = head + "a=x\r\n" * (MAX_LINES - 5)
    assert len(SessionDescription.parse(ok).attributes) == MAX_LINES - 5
    media = head + "m=audio 1 RTP/AVP 0\r\n" * (MAX_MEDIA + 1)
    with pytest.raises(ValueError, match="line 70: more than 64 m= lines"):
        SessionDescription.parse(media)
    assert len(SessionDescription.parse(head + "m=audio 1 RTP/AVP 0\r\n" * MAX_MEDIA).media) == 64
    with pytest.raises(ValueError, match="must be str or bytes"):
        SessionDescription.parse(None)  # type: ignore[arg-type]


def test_repeated_identical_rtpmap_is_accepted() -> None:
    text = SIPP + "a=rtpmap:0 PCMU/8000\r\n"
    assert SessionDescription.parse(text).media[0].rtpmap == {0: RtpMap("PCMU", 8000)}


def test_unknown_type_letter_is_kept_not_fatal() -> None:
    text = SIPP.replace("a=rtpmap:0 PCMU/8000", "y=whatever\r\na=rtpmap:0 PCMU/8000")
    sdp = SessionDescription.parse(text)
    assert sdp.media[0].other_lines == (("y", "whatever"),)
    assert sdp.serialize() == text


_JUNK = ["\x00", "\r", "\n", " ", "=", ":", "/", "é", "\u2028", "\x85", "\ud83d", "😀", "0",
         "9" * 30, "-1", "\t", "IP6", "a=", "m=", "c=IN IP4 ", "RTP/AVP", "\ufeff", "\uff11\uff12"]


def _mutate(rng: random.Random, text: str) -> str | bytes:
    lines = text.split("\r\n")
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(7)
        i = rng.randrange(len(lines))
        if op == 0:
            del lines[i]
        elif op == 1:
            lines.insert(i, lines[rng.randrange(len(lines))])
        elif op == 2 and lines[i]:
            j = rng.randrange(len(lines[i]))
            lines[i] = lines[i][:j] + rng.choice(_JUNK) + lines[i][j + 1:]
        elif op == 3:
            j = rng.randrange(len(lines[i]) + 1)
            lines[i] = lines[i][:j] + chr(rng.randrange(0x20, 0x3000)) + lines[i][j:]
        elif op == 4:
            lines[i] = lines[i][: rng.randrange(len(lines[i]) + 1)]
        elif op == 5:
            k = rng.randrange(len(lines))
            lines[i], lines[k] = lines[k], lines[i]
        else:
            lines[i] = lines[i].replace(" ", rng.choice(_JUNK), 1)
    out = "\r\n".join(lines)
    if rng.random() < 0.2:
        data = bytearray(out.encode("utf-8", "surrogatepass"))
        for _ in range(rng.randint(1, 3)):
            if data:
                data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)
    return out


def test_fuzz_only_value_error() -> None:
    """Random mutations of the samples: parse raises ValueError or returns a description that
    round-trips; answering it raises ValueError or yields an answer that parses."""
    rng = random.Random(8866)
    parsed = answered = 0
    for _ in range(4000):
        text = _mutate(rng, rng.choice(SAMPLES))
        try:
            sdp = SessionDescription.parse(text)
        except ValueError:
            continue
        parsed += 1
        assert SessionDescription.parse(sdp.serialize()) == sdp
        for media in sdp.media:
            media.rtpmap, media.fmtp, media.direction, media.connection_address  # noqa: B018
            media.payload_types  # noqa: B018
        try:
            answer, codec = answer_for(sdp, "192.0.2.9", 4000, session_id=5)
        except ValueError:
            continue
        answered += 1
        reparsed = SessionDescription.parse(answer)
        assert len(reparsed.media) == len(sdp.media)
        assert codec.g711_type in (0, 8)
    assert parsed > 400 and answered > 100  # the fuzz reaches past the first error
