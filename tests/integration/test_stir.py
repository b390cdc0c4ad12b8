"""STIR/SHAKEN through the real proxy: PASSporTs signed at test time by a test CA."""

from __future__ import annotations

import http.server
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from ops.sipp import free_udp_port
from scoring import keys
from scoring.stir import leaf_filename, write_leaf
from scoring.store import find_decision
from tests.integration.helpers import invite, rig, send_all, spitwall
from tests.unit.scoring.test_stir import Pki, claims, identity, jose, jws, p256, pem

pytestmark = pytest.mark.integration

CALLER, CALLEE = "12025550100", "12025550199"


def _call(r: Any, n: int, src_ip: str, ident: str | None) -> dict[str, Any]:
    port = free_udp_port(src_ip)
    extra = f"Identity: {ident}\r\n".encode() if ident else b""
    msg = invite(n, r.port, port, ruri_user=CALLEE.encode(), src_ip=src_ip, extra=extra,
                 from_hdr=f"<sip:{CALLER}@{src_ip}>;tag=s{n}".encode())
    send_all(r.port, [msg], port, src_ip=src_ip)
    client = redis.Redis.from_url(r.redis_url)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        d = find_decision(client, f"bad-{n}@{src_ip}")
        if d is not None:
            return d
        time.sleep(0.05)
    raise AssertionError(f"no decision for call {n}")


def _stir(d: dict[str, Any]) -> list[Any]:
    return next(c for c in d["checks"] if c[0] == "stir")


def test_attestation_a_scores_lower_and_forgery_higher(lab_factory: Any, tmp_path: Path) -> None:
    pki = Pki()
    trust = tmp_path / "sti"
    trust.mkdir()
    (trust / "ca.pem").write_bytes(pem(pki.ca))
    x5u = jose()["x5u"]
    write_leaf(trust, x5u, pem(pki.leaf))
    with rig(lab_factory) as r:
        assert spitwall("config", "set", "stir.trust_dir", str(trust),
                        redis_url=r.redis_url).returncode == 0
        now = int(time.time())
        good = identity(jws(pki.leaf_key, payload=claims(iat=now, orig={"tn": CALLER},
                                                          dest={"tn": [CALLEE]})))
        forged = identity(jws(p256(), payload=claims(iat=now, orig={"tn": CALLER},
                                                      dest={"tn": [CALLEE]})))
        d_a = _call(r, 41, "127.0.17.1", good)
        d_none = _call(r, 42, "127.0.17.2", None)
        d_forged = _call(r, 43, "127.0.17.3", forged)
        assert _stir(d_a)[1] == 0.0 and "A verified" in _stir(d_a)[3], d_a
        assert _stir(d_none)[3] == "no Identity header"
        assert _stir(d_forged)[1] == 1.0, d_forged
        assert d_a["score"] < d_none["score"] < d_forged["score"]
        assert d_forged["action"] != "relay"
        # the relayed signed call still carries its Identity header to the core
        got = [m for m in r.next_hop.invite_messages() if m.call_id == "bad-41@127.0.17.1"]
        assert got and got[0].has_header("Identity")


def test_cold_certificate_is_unverified_and_fetched_out_of_band(lab_factory: Any,
                                                                  tmp_path: Path) -> None:
    pki = Pki()
    trust = tmp_path / "sti"
    trust.mkdir()
    (trust / "ca.pem").write_bytes(pem(pki.ca))
    body = pem(pki.leaf)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host = f"127.0.0.1:{server.server_address[1]}"
        x5u = f"http://{host}/sti/leaf.pem"
        with rig(lab_factory) as r:
            for k, v in (("stir.trust_dir", str(trust)), ("stir.x5u_hosts", host)):
                assert spitwall("config", "set", k, v, redis_url=r.redis_url).returncode == 0
            ident = identity(jws(pki.leaf_key, header=jose(x5u=x5u),
                                 payload=claims(iat=int(time.time()), orig={"tn": CALLER},
                                                dest={"tn": [CALLEE]})), info=x5u)
            d = _call(r, 51, "127.0.18.1", ident)
            assert _stir(d)[1] == 0.35 and "not cached" in _stir(d)[3], d
            client = redis.Redis.from_url(r.redis_url)
            assert client.lrange(keys.X5U_MISSES, 0, -1) == [x5u.encode()]
            out = spitwall("stir", "fetch", "--json", redis_url=r.redis_url)
            assert out.returncode == 0, out.stderr
            assert (trust / leaf_filename(x5u)).exists()
    finally:
        server.shutdown()
        server.server_close()
