"""SIP over TLS into the real proxy (kamailio.cfg's TLS_CERT/TLS_KEY defines; `lab up
--sip-tls-cert`): a caller on TLS is scored and relayed to a UDP next hop, and its ACK and BYE
come back through the proxy on the same TLS connection; with TLS_VERIFY only callers with a
certificate from the configured CA get in.

SIPp as packaged by Debian has no TLS, so the caller is a small SIP UAC over Python's `ssl`.
"""

from __future__ import annotations

import json
import re
import secrets
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ops.lab import Lab, SipTls
from ops.sipp import start_uas
from tests.integration.helpers import SDP, spitwall
from tests.tls_certs import Paths, TestCa

pytestmark = pytest.mark.integration


@dataclass
class Pki:
    ca: Path
    server: Paths
    client: Paths


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = TestCa("spitwall SIP test CA")
    d = tmp_path / "pki"
    d.mkdir()
    return Pki(ca.write(d), ca.issue("proxy.test", ips=["127.0.0.1"]).write(d, "server"),
               ca.issue("trunk.example", client=True).write(d, "client"))


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]

    def all(self, name: str) -> list[str]:
        """Values of a header, comma-separated lists split (for Record-Route)."""
        out: list[str] = []
        for k, v in self.headers:
            if k.lower() == name.lower():
                out += [x.strip() for x in re.split(r",(?=\s*<)", v)]
        return out

    def one(self, name: str) -> str:
        return self.all(name)[0]


@dataclass
class TlsUac:
    """One call's worth of SIP over one TLS connection."""

    sock: ssl.SSLSocket
    buf: bytes = b""
    call_id: str = field(default_factory=lambda: secrets.token_hex(8) + "@tls-test")
    tag: str = field(default_factory=lambda: secrets.token_hex(4))

    def send(self, method: str, ruri: str, cseq: int, *, to: str, routes: Sequence[str] = (),
             body: bytes = b"", ctype: str = "") -> None:
        ip, port = self.sock.getsockname()[:2]
        lines = [f"{method} {ruri} SIP/2.0",
                 f"Via: SIP/2.0/TLS {ip}:{port};branch=z9hG4bK{secrets.token_hex(6)};rport",
                 "Max-Forwards: 70",
                 f'From: "Trunk" <sip:alice@{ip}>;tag={self.tag}', f"To: {to}",
                 f"Call-ID: {self.call_id}", f"CSeq: {cseq} {method}",
                 f"Contact: <sip:alice@{ip}:{port};transport=tls>",
                 "User-Agent: Linphone/5.2", *[f"Route: {r}" for r in routes]]
        if ctype:
            lines.append(f"Content-Type: {ctype}")
        lines.append(f"Content-Length: {len(body)}")
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)

    def response(self) -> Response:
        """The next response (requests from the far side are not expected here)."""
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = [(k.strip(), v.strip()) for k, _, v in (x.partition(":") for x in lines[1:])]
        length = int(next((v for k, v in headers if k.lower() in ("content-length", "l")), "0"))
        while len(rest) < length:
            self._fill()
            rest = self.buf.partition(b"\r\n\r\n")[2]
        self.buf = rest[length:]
        return Response(int(lines[0].split()[1]), headers)

    def final(self) -> Response:
        while True:
            r = self.response()
            if r.status >= 200:
                return r

    def _fill(self) -> None:
        data = self.sock.recv(65535)
        if not data:
            raise ConnectionError("the proxy closed the TLS connection")
        self.buf += data


def _context(pki: Pki, client_cert: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca))  # verifies the proxy's certificate
    if client_cert:
        ctx.load_cert_chain(str(pki.client.cert), str(pki.client.key))
    return ctx


def _call(lab: Lab, ctx: ssl.SSLContext) -> tuple[TlsUac, Response, Response]:
    """INVITE, ACK, BYE over one TLS connection; returns the INVITE's and the BYE's finals."""
    assert lab.state is not None
    raw = socket.create_connection(("127.0.0.1", lab.state.sip_tls_port), timeout=10)
    uac = TlsUac(ctx.wrap_socket(raw, server_hostname="127.0.0.1"))
    with uac.sock:
        port = lab.state.sip_tls_port
        uac.send("INVITE", f"sip:bob@127.0.0.1:{port};transport=tls", 1,
                 to="<sip:bob@127.0.0.1>", body=SDP, ctype="application/sdp")
        ok = uac.final()
        assert ok.status == 200, ok
        to = ok.one("To")
        routes = list(reversed(ok.all("Record-Route")))  # a UAC's route set (RFC 3261 12.1.2)
        target = ok.one("Contact").strip("<>").split(">")[0]
        uac.send("ACK", target, 1, to=to, routes=routes)
        uac.send("BYE", target, 2, to=to, routes=routes)
        bye = uac.final()
    return uac, ok, bye


def _lab(lab_factory: Any, pki: Pki, hop_port: int, verify: bool) -> Lab:
    tls = SipTls(str(pki.server.cert), str(pki.server.key), str(pki.ca), verify)
    lab: Lab = lab_factory(next_hop=f"sip:127.0.0.1:{hop_port}", sip_tls=tls)
    assert lab.state is not None and lab.state.sip_tls_port
    return lab


def test_tls_caller_is_scored_relayed_and_its_dialog_stays_on_tls(lab_factory: Any,
                                                                  pki: Pki) -> None:
    with start_uas("127.0.0.1") as hop:
        lab = _lab(lab_factory, pki, hop.port, verify=False)
        uac, ok, bye = _call(lab, _context(pki, client_cert=False))
        assert bye.status == 200, bye
        # two Record-Routes: the TLS side the caller sees, the UDP side the callee sees
        assert any("transport=tls" in r for r in ok.all("Record-Route")), ok.all("Record-Route")
        invites = hop.wait_for_invites(1)
        assert invites[0].headers("X-Spitwall-Score")
        assert {m.method for m in hop.messages()} >= {"INVITE", "ACK", "BYE"}
        assert lab.state is not None
        out = spitwall("explain", uac.call_id, "--json", redis_url=lab.state.redis_url)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["call"]["src"].endswith("/tls")


def test_mutual_tls_admits_only_clients_with_a_certificate_from_the_ca(lab_factory: Any,
                                                                        pki: Pki) -> None:
    with start_uas("127.0.0.1") as hop:
        lab = _lab(lab_factory, pki, hop.port, verify=True)
        assert lab.state is not None
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            _call(lab, _context(pki, client_cert=False))  # no certificate: refused
        assert hop.count_invites() == 0
        _uac, ok, bye = _call(lab, _context(pki, client_cert=True))
        assert ok.status == 200 and bye.status == 200
        assert hop.count_invites() == 1


def test_lab_refuses_bad_tls_arguments(tmp_path: Path, redis_url: str, pki: Pki) -> None:
    for args, message in (
            (["--sip-tls-cert", str(pki.server.cert)], "go together"),
            (["--sip-tls-verify"], "need --sip-tls-cert"),
            (["--sip-tls-cert", str(tmp_path / "none.crt"), "--sip-tls-key",
              str(pki.server.key)], "not a readable file"),
            (["--sip-tls-cert", str(pki.server.cert), "--sip-tls-key", str(pki.server.key),
              "--sip-tls-verify"], "needs --sip-tls-ca")):
        out = spitwall("lab", "up", "--workdir", str(tmp_path / "lab"), "--redis", redis_url,
                       *args, redis_url=redis_url)
        assert out.returncode != 0
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], out.stderr
