"""SDP (RFC 8866, formerly RFC 4566) parsing and serialisation, and the offer/answer (RFC 3264)
the answering machine needs: one audio stream, G.711, RFC 4733 telephone-event.

Two users with hostile input: the answering machine reads the caller's offer, and the intercept
(issue 5) reads every offer and answer on the proxy's path to extract ``a=crypto`` lines,
``a=fingerprint`` and ``a=zrtp-hash``. Both need a parser that either returns a faithful,
typed description or raises `ValueError` naming the line -- never another exception, never a
silently half-read body -- with bounded cost: at most `MAX_SDP_BYTES` bytes, `MAX_LINES` lines and
`MAX_MEDIA` ``m=`` lines.

Why hand-written: looked at PyPI (``pip index versions``) for this: ``sdp-transform`` 1.1.0
(last release May 2024) is a port of the JavaScript library that maps lines onto loose dicts by
regular expression and skips lines it cannot match instead of reporting them; ``aiortc`` 1.16.0
has an SDP module that is part of its WebRTC stack (pulls in its ICE, DTLS and PyAV
dependencies) and models WebRTC sessions only; ``sippy`` 2.5.0 has one inside its B2BUA. None
gives typed, validated fields with line-numbered errors; the grammar is small enough to own.

What is parsed (RFC 8866 §5 and §9):

* Lines are ``<letter>=<value>``, CRLF or LF terminated; trailing spaces and tabs are dropped,
  blank lines are skipped, fields are split on runs of whitespace. NUL or a bare CR in a line is
  an error.
* Session level: ``v=0`` first, ``o=`` (six fields, numeric session id and version), ``s=``
  required, each once; ``c=`` at most once; ``b=``, ``t=`` (with its ``r=`` lines) any number;
  ``i=``, ``u=``, ``e=``, ``p=``, ``z=``, ``k=`` kept verbatim; ``a=`` attributes.
* Media level (after each ``m=``): ``c=`` (several allowed, for layered multicast), ``b=``,
  ``i=``, ``k=``, ``a=``. Session-only letters inside a media description are errors.
* ``c=`` must be ``IN IP4`` or ``IN IP6`` with an address of that family, or a host name, and
  optional ``/ttl`` and ``/count`` (multicast).
* ``m=`` needs a port 0-65535 (optionally ``/count``), a protocol, and at least one format; for
  RTP protocols (any with an ``RTP`` component: RTP/AVP, RTP/SAVP, UDP/TLS/RTP/SAVPF, ...) the
  formats must be payload types 0-127.
* Attributes are ``(name, value)`` pairs in order, value None for property attributes
  (``a=sendrecv``). ``rtpmap`` and ``fmtp`` are checked at parse time (payload type, clock rate,
  channels; no two different ``rtpmap`` for one payload type), so the `MediaDescription.rtpmap` and
  `MediaDescription.fmtp` helpers cannot fail later.
* Unknown type letters: RFC 8866 §5 tells a parser to ignore a whole description that contains
  one; we ignore (and keep, for `serialize`) only that line, because the endpoints that accept
  the description still set up media -- and the intercept must still see its keys.

`SessionDescription.serialize` writes the lines back in RFC order with CRLF; for a description in
RFC order it reproduces the input modulo whitespace, and ``parse(serialize(d)) == d`` always.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

MAX_SDP_BYTES = 64 * 1024
MAX_LINES = 2000
MAX_MEDIA = 64

DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")
_MIRROR = {
    "sendrecv": "sendrecv",
    "sendonly": "recvonly",
    "recvonly": "sendonly",
    "inactive": "inactive",
}

_TOKEN = re.compile(r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+")
_PROTO = re.compile(r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+(?:/[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+)*")
_DIGITS = re.compile(r"[0-9]+")
_PORT = re.compile(r"([0-9]{1,5})(?:/([0-9]{1,5}))?")
_BANDWIDTH = re.compile(r"([!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+):([0-9]{1,10})")
_RTPMAP = re.compile(r"([0-9]{1,3})\s+([^\s/]+)/([0-9]{1,10})(?:/([0-9]{1,3}))?")
_FMTP = re.compile(r"(\S+)(?:\s+(.*))?", re.DOTALL)
_HOSTNAME = re.compile(
    r"(?=.{1,253}\.?$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)
_NUMERIC_HOST = re.compile(r"[0-9.]+")

_SESSION_ONLY = frozenset("vosuepthrz")
_SESSION_OTHER_RANK = {"i": 0, "u": 1, "e": 2, "p": 3, "z": 4, "k": 5}
_KNOWN = frozenset("vosiuepcbtrzkam")

# RFC 3551 tables 4 and 5: static payload types, usable without a=rtpmap.
_STATIC_PT: dict[int, tuple[str, int, int]] = {
    0: ("PCMU", 8000, 1), 3: ("GSM", 8000, 1), 4: ("G723", 8000, 1), 5: ("DVI4", 8000, 1),
    6: ("DVI4", 16000, 1), 7: ("LPC", 8000, 1), 8: ("PCMA", 8000, 1), 9: ("G722", 8000, 1),
    10: ("L16", 44100, 2), 11: ("L16", 44100, 1), 12: ("QCELP", 8000, 1), 13: ("CN", 8000, 1),
    14: ("MPA", 90000, 1), 15: ("G728", 8000, 1), 16: ("DVI4", 11025, 1),
    17: ("DVI4", 22050, 1), 18: ("G729", 8000, 1), 25: ("CelB", 90000, 1),
    26: ("JPEG", 90000, 1), 28: ("nv", 90000, 1), 31: ("H261", 90000, 1),
    32: ("MPV", 90000, 1), 33: ("MP2T", 90000, 1), 34: ("H263", 90000, 1),
}


def _show(text: str, limit: int = 40) -> str:
    """An attacker-supplied value for an error message: repr'd and cut."""
    return repr(text[:limit] + "...") if len(text) > limit else repr(text)


def _fields(value: str) -> list[str]:
    return value.split()


def _uint(text: str, what: str, maximum: int) -> int:
    if not _DIGITS.fullmatch(text) or len(text) > 20:
        raise ValueError(f"{what} {_show(text)} is not a number (at most 20 digits)")
    number = int(text)
    if number > maximum:
        raise ValueError(f"{what} {number} is larger than {maximum}")
    return number


def _is_rtp(proto: str) -> bool:
    return "RTP" in proto.upper().split("/")


Attribute = tuple[str, str | None]
"""An ``a=`` line: name and value (None for a property attribute such as ``a=sendrecv``)."""


class RtpMap(NamedTuple):
    """An ``a=rtpmap`` value: encoding name, clock rate, channels (1 when not given)."""

    encoding: str
    clock_rate: int
    channels: int = 1


def _parse_rtpmap(value: str) -> tuple[int, RtpMap]:
    match = _RTPMAP.fullmatch(value.strip())
    if not match:
        raise ValueError(
            f"rtpmap {_show(value)} is not '<payload type> <encoding>/<clock rate>[/<channels>]'"
        )
    pt = _uint(match[1], "rtpmap payload type", 127)
    clock = _uint(match[3], "rtpmap clock rate", 10**9)
    if clock == 0:
        raise ValueError("rtpmap clock rate is 0")
    channels = 1 if match[4] is None else _uint(match[4], "rtpmap channel count", 255)
    if channels == 0:
        raise ValueError("rtpmap channel count is 0")
    return pt, RtpMap(match[2], clock, channels)


def _parse_fmtp(value: str) -> tuple[str, str]:
    match = _FMTP.fullmatch(value.strip())
    if not match:
        raise ValueError("fmtp has no format")
    return match[1], match[2] or ""


def _parse_attribute(value: str) -> Attribute:
    name, sep, rest = value.partition(":")
    if not _TOKEN.fullmatch(name):
        raise ValueError(f"attribute name {_show(name)} is not a token")
    return name, (rest if sep else None)


def _attr_line(attribute: Attribute) -> str:
    name, value = attribute
    return f"a={name}" if value is None else f"a={name}:{value}"


def _attribute_values(attributes: Iterable[Attribute], name: str) -> list[str]:
    return [value or "" for key, value in attributes if key == name]


def _direction_of(attributes: Iterable[Attribute]) -> str | None:
    for name, _value in attributes:
        if name in DIRECTIONS:
            return name
    return None


@dataclass(frozen=True, slots=True)
class Origin:
    """The ``o=`` line. Session id and version are kept as the digit strings sent."""

    username: str
    session_id: str
    session_version: str
    nettype: str
    addrtype: str
    address: str

    @classmethod
    def parse(cls, value: str) -> Origin:
        parts = _fields(value)
        if len(parts) != 6:
            raise ValueError(
                f"o= has {len(parts)} fields, expected 6 (username sess-id sess-version "
                "nettype addrtype address)"
            )
        for text, what in ((parts[1], "o= session id"), (parts[2], "o= session version")):
            if not _DIGITS.fullmatch(text) or len(text) > 64:
                raise ValueError(f"{what} {_show(text)} is not a number")
        return cls(*parts)

    def serialize(self) -> str:
        return " ".join(
            (self.username, self.session_id, self.session_version, self.nettype,
             self.addrtype, self.address)
        )


@dataclass(frozen=True, slots=True)
class Connection:
    """A ``c=`` line: ``IN IP4|IP6 <address>[/<ttl>][/<count>]`` (ttl for IP4 only)."""

    addrtype: str
    address: str
    ttl: int | None = None
    count: int | None = None
    nettype: str = "IN"

    @classmethod
    def parse(cls, value: str) -> Connection:
        parts = _fields(value)
        if len(parts) != 3:
            raise ValueError(f"c= has {len(parts)} fields, expected 3 (nettype addrtype address)")
        nettype, addrtype, spec = parts
        if nettype != "IN":
            raise ValueError(f"c= network type {_show(nettype)} is not IN")
        if addrtype not in ("IP4", "IP6"):
            raise ValueError(f"c= address type {_show(addrtype)} is not IP4 or IP6")
        address, *suffix = spec.split("/")
        numbers = [_uint(part, "c= multicast ttl/count", 65535) for part in suffix]
        ttl = count = None
        if addrtype == "IP4":
            if len(numbers) > 2:
                raise ValueError(f"c= address {_show(spec)} has more than ttl/count")
            if numbers:
                ttl = numbers[0]
                if ttl > 255:
                    raise ValueError(f"c= ttl {ttl} is larger than 255")
            if len(numbers) == 2:
                count = numbers[1]
        else:
            if len(numbers) > 1:
                raise ValueError(f"c= IP6 address {_show(spec)} has more than /count")
            if numbers:
                count = numbers[0]
        if count == 0:
            raise ValueError("c= address count is 0")
        _check_address(addrtype, address)
        return cls(addrtype=addrtype, address=address, ttl=ttl, count=count, nettype=nettype)

    def serialize(self) -> str:
        spec = self.address
        if self.ttl is not None:
            spec += f"/{self.ttl}"
        if self.count is not None:
            spec += f"/{self.count}"
        return f"{self.nettype} {self.addrtype} {spec}"


def _check_address(addrtype: str, address: str) -> None:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        if _HOSTNAME.fullmatch(address) and not _NUMERIC_HOST.fullmatch(address):
            return
        raise ValueError(
            f"c= address {_show(address)} is neither an IP address nor a host name"
        ) from None
    if (ip.version == 4) != (addrtype == "IP4"):
        raise ValueError(f"c= address {_show(address)} is not an {addrtype} address")


@dataclass(frozen=True, slots=True)
class Bandwidth:
    """A ``b=<bwtype>:<bandwidth>`` line (kbit/s for AS and CT)."""

    bwtype: str
    bandwidth: int

    @classmethod
    def parse(cls, value: str) -> Bandwidth:
        match = _BANDWIDTH.fullmatch(value.strip())
        if not match:
            raise ValueError(f"b= {_show(value)} is not '<bwtype>:<bandwidth>'")
        return cls(match[1], int(match[2]))

    def serialize(self) -> str:
        return f"{self.bwtype}:{self.bandwidth}"


@dataclass(frozen=True, slots=True)
class Timing:
    """A ``t=<start> <stop>`` line (NTP seconds, 0 0 for unbounded) and its ``r=`` lines."""

    start: int = 0
    stop: int = 0
    repeats: tuple[str, ...] = ()

    @classmethod
    def parse(cls, value: str) -> Timing:
        parts = _fields(value)
        if len(parts) != 2:
            raise ValueError(f"t= has {len(parts)} fields, expected 2 (start stop)")
        return cls(_uint(parts[0], "t= start", 2**64), _uint(parts[1], "t= stop", 2**64))


@dataclass(frozen=True, slots=True)
class MediaDescription:
    """One ``m=`` section. ``formats`` are the tokens of the m= line as sent (payload type
    numbers for RTP protocols, see `payload_types`); ``port_count`` is None when the line had
    no ``/count``. ``other_lines`` holds ``i=``, ``k=`` and unknown lines verbatim.

    `SessionDescription.parse` copies the session-level connection and direction into
    ``session_connection`` / ``session_direction`` (not serialised, not compared) so that
    `connection` and `direction` can apply the session-level defaults on their own.
    ``other_lines`` are in serialisation order (``i=`` first).
    """

    media: str
    port: int
    proto: str
    formats: tuple[str, ...]
    port_count: int | None = None
    connections: tuple[Connection, ...] = ()
    bandwidths: tuple[Bandwidth, ...] = ()
    attributes: tuple[Attribute, ...] = ()
    other_lines: tuple[tuple[str, str], ...] = ()
    session_connection: Connection | None = field(default=None, compare=False, repr=False)
    session_direction: str | None = field(default=None, compare=False, repr=False)

    @classmethod
    def parse_media_line(cls, value: str) -> MediaDescription:
        """Parse the value of an ``m=`` line (without the lines that follow it)."""
        parts = _fields(value)
        if len(parts) < 4:
            raise ValueError(
                f"m= has {len(parts)} fields, expected at least 4 (media port proto format...)"
            )
        media, port_spec, proto, *formats = parts
        if not _TOKEN.fullmatch(media):
            raise ValueError(f"m= media type {_show(media)} is not a token")
        match = _PORT.fullmatch(port_spec)
        if not match:
            raise ValueError(f"m= port {_show(port_spec)} is not '<port>[/<count>]'")
        port = _uint(match[1], "m= port", 65535)
        port_count = None if match[2] is None else _uint(match[2], "m= port count", 65535)
        if port_count == 0:
            raise ValueError("m= port count is 0")
        if not _PROTO.fullmatch(proto):
            raise ValueError(f"m= protocol {_show(proto)} is not a token")
        if _is_rtp(proto):
            for fmt in formats:
                if not _DIGITS.fullmatch(fmt) or len(fmt) > 3 or int(fmt) > 127:
                    raise ValueError(
                        f"m= format {_show(fmt)} is not an RTP payload type (0-127) for {proto}"
                    )
        return cls(media=media, port=port, proto=proto, formats=tuple(formats),
                   port_count=port_count)

    @property
    def is_rtp(self) -> bool:
        return _is_rtp(self.proto)

    @property
    def payload_types(self) -> tuple[int, ...]:
        """The formats as payload type numbers; empty for non-RTP protocols."""
        return tuple(int(f) for f in self.formats) if self.is_rtp else ()

    @property
    def rtpmap(self) -> dict[int, RtpMap]:
        """``a=rtpmap`` lines by payload type (static types without one are not included; see
        `encoding`)."""
        out: dict[int, RtpMap] = {}
        for value in self.attribute_values("rtpmap"):
            pt, rtpmap = _parse_rtpmap(value)
            out.setdefault(pt, rtpmap)
        return out

    @property
    def fmtp(self) -> dict[int, str]:
        """``a=fmtp`` parameters by payload type (formats that are not numbers are skipped)."""
        out: dict[int, str] = {}
        for value in self.attribute_values("fmtp"):
            fmt, params = _parse_fmtp(value)
            if _DIGITS.fullmatch(fmt) and len(fmt) <= 3:
                out.setdefault(int(fmt), params)
        return out

    def encoding(self, payload_type: int) -> RtpMap | None:
        """The encoding of a payload type: its ``a=rtpmap``, else the RFC 3551 static
        assignment, else None."""
        rtpmap = self.rtpmap.get(payload_type)
        if rtpmap is not None:
            return rtpmap
        static = _STATIC_PT.get(payload_type)
        return RtpMap(*static) if static else None

    @property
    def direction(self) -> str:
        """sendrecv, sendonly, recvonly or inactive: this section's attribute, else the
        session's, else sendrecv (RFC 3264 §5.1)."""
        return _direction_of(self.attributes) or self.session_direction or "sendrecv"

    @property
    def connection(self) -> Connection | None:
        """This section's (first) ``c=``, else the session's."""
        return self.connections[0] if self.connections else self.session_connection

    @property
    def connection_address(self) -> str | None:
        connection = self.connection
        return connection.address if connection else None

    def attribute_values(self, name: str) -> list[str]:
        """Values of every ``a=<name>`` in order ("" for a property attribute)."""
        return _attribute_values(self.attributes, name)

    def has_attribute(self, name: str) -> bool:
        return any(key == name for key, _value in self.attributes)

    def serialize_lines(self) -> list[str]:
        port = str(self.port) if self.port_count is None else f"{self.port}/{self.port_count}"
        lines = [f"m={self.media} {port} {self.proto} {' '.join(self.formats)}"]
        lines += [f"i={v}" for k, v in self.other_lines if k == "i"]
        lines += [f"c={c.serialize()}" for c in self.connections]
        lines += [f"b={b.serialize()}" for b in self.bandwidths]
        lines += [f"{k}={v}" for k, v in self.other_lines if k != "i"]
        lines += [_attr_line(a) for a in self.attributes]
        return lines


@dataclass(frozen=True, slots=True)
class SessionDescription:
    """A parsed SDP body. ``other_lines`` holds ``i= u= e= p= z= k=`` and unknown lines of the
    session level verbatim, in serialisation order (that order, unknown letters last)."""

    origin: Origin
    session_name: str
    connection: Connection | None = None
    bandwidths: tuple[Bandwidth, ...] = ()
    times: tuple[Timing, ...] = ()
    attributes: tuple[Attribute, ...] = ()
    media: tuple[MediaDescription, ...] = ()
    other_lines: tuple[tuple[str, str], ...] = ()
    version: int = 0

    @classmethod
    def parse(cls, text: str | bytes) -> SessionDescription:
        """Parse an SDP body (str, or UTF-8 bytes); `ValueError` says which line is wrong."""
        return _Parser(_bounded_text(text)).run()

    @property
    def direction(self) -> str:
        """The session-level direction attribute, else sendrecv."""
        return _direction_of(self.attributes) or "sendrecv"

    def attribute_values(self, name: str) -> list[str]:
        """Values of every session-level ``a=<name>`` in order ("" for a property attribute)."""
        return _attribute_values(self.attributes, name)

    def serialize(self) -> str:
        """The description as text, lines in RFC 8866 order, CRLF line endings."""
        other = self.other_lines
        lines = [
            f"v={self.version}",
            f"o={self.origin.serialize()}",
            f"s={self.session_name or ' '}",  # s= may not be empty: one space (RFC 8866 §5.3)
        ]
        for letter in "iuep":
            lines += [f"{k}={v}" for k, v in other if k == letter]
        if self.connection is not None:
            lines.append(f"c={self.connection.serialize()}")
        lines += [f"b={b.serialize()}" for b in self.bandwidths]
        for timing in self.times:
            lines.append(f"t={timing.start} {timing.stop}")
            lines += [f"r={r}" for r in timing.repeats]
        for letter in "zk":
            lines += [f"{k}={v}" for k, v in other if k == letter]
        lines += [f"{k}={v}" for k, v in other if k not in _KNOWN]
        lines += [_attr_line(a) for a in self.attributes]
        for media in self.media:
            lines += media.serialize_lines()
        return "\r\n".join(lines) + "\r\n"


def _bounded_text(text: str | bytes) -> str:
    if isinstance(text, bytes | bytearray):
        if len(text) > MAX_SDP_BYTES:
            raise ValueError(f"SDP is {len(text)} bytes, more than {MAX_SDP_BYTES}")
        try:
            return bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"SDP is not UTF-8 (byte {exc.start})") from None
    if not isinstance(text, str):
        raise ValueError(f"SDP must be str or bytes, not {type(text).__name__}")
    if len(text) > MAX_SDP_BYTES:
        raise ValueError(f"SDP is {len(text)} characters, more than {MAX_SDP_BYTES} bytes")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise ValueError(f"SDP has an unencodable character at {exc.start}") from None
    if size > MAX_SDP_BYTES:
        raise ValueError(f"SDP is {size} bytes, more than {MAX_SDP_BYTES}")
    return text


class _MediaBuilder:
    def __init__(self, media: MediaDescription) -> None:
        self.media = media
        self.connections: list[Connection] = []
        self.bandwidths: list[Bandwidth] = []
        self.attributes: list[Attribute] = []
        self.other: list[tuple[str, str]] = []
        self.rtpmaps: dict[int, RtpMap] = {}


class _Parser:
    def __init__(self, text: str) -> None:
        self.lines = text.split("\n")
        if self.lines and self.lines[-1] == "":
            self.lines.pop()
        if len(self.lines) > MAX_LINES:
            raise ValueError(f"SDP has {len(self.lines)} lines, more than {MAX_LINES}")
        self.origin: Origin | None = None
        self.session_name: str | None = None
        self.connection: Connection | None = None
        self.bandwidths: list[Bandwidth] = []
        self.times: list[Timing] = []
        self.attributes: list[Attribute] = []
        self.other: list[tuple[str, str]] = []
        self.session_rtpmaps: dict[int, RtpMap] = {}
        self.media: list[_MediaBuilder] = []
        self.seen_version = False

    def run(self) -> SessionDescription:
        for number, raw in enumerate(self.lines, 1):
            line = raw[:-1] if raw.endswith("\r") else raw
            try:
                self._line(line)
            except ValueError as exc:
                raise ValueError(f"SDP line {number}: {exc}") from None
        if not self.seen_version:
            raise ValueError("SDP is empty")
        if self.origin is None:
            raise ValueError("SDP has no o= line")
        if self.session_name is None:
            raise ValueError("SDP has no s= line")
        session_direction = _direction_of(self.attributes)
        # Canonical (serialisation) order, so that parse(serialize(d)) == d.
        self.other.sort(key=lambda line: _SESSION_OTHER_RANK.get(line[0], 6))
        for builder in self.media:
            builder.other.sort(key=lambda line: line[0] != "i")
        media = tuple(
            MediaDescription(
                media=b.media.media,
                port=b.media.port,
                proto=b.media.proto,
                formats=b.media.formats,
                port_count=b.media.port_count,
                connections=tuple(b.connections),
                bandwidths=tuple(b.bandwidths),
                attributes=tuple(b.attributes),
                other_lines=tuple(b.other),
                session_connection=self.connection,
                session_direction=session_direction,
            )
            for b in self.media
        )
        return SessionDescription(
            origin=self.origin,
            session_name=self.session_name,
            connection=self.connection,
            bandwidths=tuple(self.bandwidths),
            times=tuple(self.times),
            attributes=tuple(self.attributes),
            media=media,
            other_lines=tuple(self.other),
        )

    def _line(self, line: str) -> None:
        if "\r" in line or "\x00" in line:
            raise ValueError("contains a bare CR or a NUL character")
        line = line.rstrip(" \t")
        if not line:
            return
        if len(line) < 2 or line[1] != "=" or not "a" <= line[0] <= "z":
            raise ValueError(f"{_show(line, 20)} is not '<type letter>=<value>'")
        letter, value = line[0], line[2:]
        if not self.seen_version:
            if letter != "v":
                raise ValueError("the first line must be v=")
            if value != "0":
                raise ValueError(f"unsupported SDP version {_show(value)} (only v=0)")
            self.seen_version = True
            return
        if letter == "m":
            if len(self.media) >= MAX_MEDIA:
                raise ValueError(f"more than {MAX_MEDIA} m= lines")
            self.media.append(_MediaBuilder(MediaDescription.parse_media_line(value)))
        elif self.media:
            self._media_line(self.media[-1], letter, value)
        else:
            self._session_line(letter, value)

    def _session_line(self, letter: str, value: str) -> None:
        if letter == "v":
            raise ValueError("duplicate v= line")
        if letter == "o":
            if self.origin is not None:
                raise ValueError("duplicate o= line")
            self.origin = Origin.parse(value)
        elif letter == "s":
            if self.session_name is not None:
                raise ValueError("duplicate s= line")
            self.session_name = value
        elif letter == "c":
            if self.connection is not None:
                raise ValueError("duplicate session-level c= line")
            self.connection = Connection.parse(value)
        elif letter == "b":
            self.bandwidths.append(Bandwidth.parse(value))
        elif letter == "t":
            self.times.append(Timing.parse(value))
        elif letter == "r":
            if not self.times:
                raise ValueError("r= before any t= line")
            last = self.times[-1]
            self.times[-1] = Timing(last.start, last.stop, (*last.repeats, value))
        elif letter == "a":
            self.attributes.append(_check_attribute(value, None, self.session_rtpmaps))
        else:
            self.other.append((letter, value))

    def _media_line(self, builder: _MediaBuilder, letter: str, value: str) -> None:
        if letter in _SESSION_ONLY:
            raise ValueError(f"{letter}= is not allowed inside a media description")
        if letter == "c":
            builder.connections.append(Connection.parse(value))
        elif letter == "b":
            builder.bandwidths.append(Bandwidth.parse(value))
        elif letter == "a":
            builder.attributes.append(_check_attribute(value, builder.media, builder.rtpmaps))
        else:
            builder.other.append((letter, value))


def _check_attribute(
    value: str, media: MediaDescription | None, rtpmaps: dict[int, RtpMap]
) -> Attribute:
    attribute = _parse_attribute(value)
    name, attr_value = attribute
    if name == "rtpmap":
        pt, rtpmap = _parse_rtpmap(attr_value or "")
        if rtpmaps.setdefault(pt, rtpmap) != rtpmap:
            raise ValueError(f"conflicting rtpmap for payload type {pt}")
    elif name == "fmtp":
        fmt, _params = _parse_fmtp(attr_value or "")
        if media is not None and media.is_rtp and (
            not _DIGITS.fullmatch(fmt) or len(fmt) > 3 or int(fmt) > 127
        ):
            raise ValueError(f"fmtp format {_show(fmt)} is not an RTP payload type (0-127)")
    return attribute


@dataclass(frozen=True, slots=True)
class Codec:
    """What `answer_for` agreed on: the audio payload type, its encoding name as preferred
    (e.g. "PCMU"), clock rate, and the telephone-event payload type (None if not offered).

    The payload type is the offer's: usually static 0 or 8, but an offer may map G.711 to a
    dynamic type (``a=rtpmap:96 PCMU/8000``). Send and accept that number on the wire; pick the
    codec by `name` (`g711_type` gives the static type that `media.g711` takes)."""

    payload_type: int
    name: str
    clock_rate: int
    dtmf_pt: int | None = None

    @property
    def g711_type(self) -> int | None:
        """0 for PCMU, 8 for PCMA, None for anything else."""
        return {"PCMU": 0, "PCMA": 8}.get(self.name.upper())


# Codecs whose RTP clock rate is fixed (RFC 3551): an offer with another rate is not that codec.
_FIXED_CLOCK = {"pcmu": 8000, "pcma": 8000, "g722": 8000, "g729": 8000, "gsm": 8000}


def _choose_codec(media: MediaDescription, prefer: Sequence[str]) -> Codec:
    for name in prefer:
        for pt in media.payload_types:
            encoding = media.encoding(pt)
            static = _STATIC_PT.get(pt)
            if (
                encoding is not None
                and encoding.encoding.lower() == name.lower()
                and encoding.channels == 1
                # a static type re-mapped to another codec is not trusted either way
                and (static is None or static[0].lower() == encoding.encoding.lower())
                and _FIXED_CLOCK.get(name.lower(), encoding.clock_rate) == encoding.clock_rate
            ):
                dtmf = None
                for dpt in media.payload_types:
                    event = media.rtpmap.get(dpt)
                    if (
                        event is not None
                        and event.encoding.lower() == "telephone-event"
                        and event.clock_rate == encoding.clock_rate
                    ):
                        dtmf = dpt
                        break
                return Codec(pt, name, encoding.clock_rate, dtmf)
    offered = ", ".join(
        (enc.encoding if (enc := media.encoding(pt)) else str(pt)) for pt in media.payload_types
    )
    raise ValueError(f"no common codec: offer has {_show(offered, 80)}, we take {list(prefer)}")


def answer_for(
    offer: SessionDescription,
    local_ip: str,
    local_port: int,
    *,
    session_id: int,
    session_version: int | None = None,
    prefer: Sequence[str] = ("PCMU", "PCMA"),
    ptime: int = 20,
) -> tuple[str, Codec]:
    """The SDP answer (RFC 3264) of the answering machine to ``offer``, and the codec agreed.

    The first ``audio`` m= line with protocol RTP/AVP and a non-zero port is accepted at
    ``local_ip``/``local_port`` with the first codec of ``prefer`` that the offer has (static
    payload types 0 and 8 count without ``a=rtpmap``), plus the offer's telephone-event payload
    type at the same clock rate, with ``fmtp 0-15``; its direction mirrors the offer's
    (sendonly ↔ recvonly). Every other m= line is rejected (port 0, formats copied, RFC 3264
    §6). ``session_version`` defaults to ``session_id``; bump it for a re-INVITE's answer.

    `ValueError` when there is no such stream, no common codec (the caller answers 488) or when
    the offer gives no address for the stream, or the local arguments are invalid.
    """
    try:
        local = ipaddress.ip_address(local_ip)
    except ValueError:
        raise ValueError(f"local_ip {_show(local_ip)} is not an IP address") from None
    if not 0 < local_port < 65536:
        raise ValueError(f"local_port {local_port} is out of range (1..65535)")
    if session_id < 0 or (session_version is not None and session_version < 0):
        raise ValueError("session id and version must not be negative")
    if not 0 < ptime <= 1000:
        raise ValueError(f"ptime {ptime} is out of range (1..1000 ms)")
    index = next(
        (
            i
            for i, m in enumerate(offer.media)
            if m.media.lower() == "audio" and m.proto.upper() == "RTP/AVP" and m.port != 0
        ),
        None,
    )
    if index is None:
        raise ValueError("offer has no audio stream with protocol RTP/AVP")
    audio = offer.media[index]
    if audio.connection is None:
        raise ValueError("offer gives no c= address for the audio stream")
    codec = _choose_codec(audio, prefer)
    formats = [str(codec.payload_type)]
    attributes: list[Attribute] = [("rtpmap", f"{codec.payload_type} {codec.name}/"
                                              f"{codec.clock_rate}")]
    if codec.dtmf_pt is not None:
        formats.append(str(codec.dtmf_pt))
        attributes += [
            ("rtpmap", f"{codec.dtmf_pt} telephone-event/{codec.clock_rate}"),
            ("fmtp", f"{codec.dtmf_pt} 0-15"),
        ]
    attributes += [("ptime", str(ptime)), (_MIRROR[audio.direction], None)]
    media = tuple(
        MediaDescription(
            media=m.media, port=local_port, proto=m.proto, formats=tuple(formats),
            attributes=tuple(attributes),
        )
        if i == index
        else MediaDescription(media=m.media, port=0, proto=m.proto, formats=m.formats)
        for i, m in enumerate(offer.media)
    )
    addrtype = "IP4" if local.version == 4 else "IP6"
    version = session_id if session_version is None else session_version
    answer = SessionDescription(
        origin=Origin("spitwall", str(session_id), str(version), "IN", addrtype, str(local)),
        session_name="spitwall",
        connection=Connection(addrtype, str(local)),
        times=(Timing(0, 0),),
        media=media,
    )
    return answer.serialize(), codec
