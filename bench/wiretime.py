#!/usr/bin/env python3
"""Wire timestamps of SIP packets on the loopback interface, for the latency benchmarks.

Why not SIPp's own clock: SIPp reads its socket in a loop that sleeps between passes (its
timer resolution), so a 200 that arrives right after a 180 is read 0.2 ms or 1 ms later
depending on the phase of that loop, and the phase is a property of one SIPp process for a
whole run: two identical callers differed by 0.3 ms at the median in the same round. The
kernel's receive timestamp of each packet (``SO_TIMESTAMPNS`` on an ``AF_PACKET`` socket bound
to ``lo``) is what a caller on the wire could see, without any client's scheduling.

Run as a separate process (it needs root for ``AF_PACKET``; the benchmarks run as root in the
lab): ``wiretime.py --out FILE --port PROXY_PORT``. It writes one tab-separated line per UDP
packet to or from the proxy port: kernel time (s), source ip:port, destination ip:port,
first line of the SIP message, Call-ID, CSeq method; and stops on SIGTERM/SIGINT. No
library: tcpdump/libpcap are not installed on the CI machine and scapy would be far too slow
for 3,000 packets/s in Python; the parsing needed here is the IPv4/UDP headers and three lines.
"""

from __future__ import annotations

import argparse
import signal
import socket
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

ETH_P_ALL = 0x0003
SO_TIMESTAMPNS = 35  # asm-generic/socket.h (SO_TIMESTAMPNS_OLD); also its SCM_ type
SOL_PACKET = 263
PACKET_IGNORE_OUTGOING = 23  # Linux >= 4.20: every loopback packet once, not twice
ETH_HEADER = 14  # lo has an all-zero Ethernet header on AF_PACKET sockets
RCVBUF = 32 * 1024 * 1024
SO_RCVBUFFORCE = 33


@dataclass(frozen=True)
class Packet:
    """One SIP packet as seen on the wire."""

    t: float
    src: str
    dst: str
    first: str
    call_id: str
    cseq_method: str

    @property
    def status(self) -> int | None:
        """The status code of a response, None for a request."""
        parts = self.first.split(" ", 2)
        if parts[0] == "SIP/2.0" and len(parts) > 1 and parts[1].isdigit():
            return int(parts[1])
        return None

    @property
    def method(self) -> str | None:
        """The method of a request, None for a response."""
        return None if self.first.startswith("SIP/") else self.first.split(" ", 1)[0]


def _header(lines: list[bytes], names: tuple[bytes, ...]) -> bytes:
    for line in lines:
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() in names:
            return value.strip()
    return b""


def _record(t: float, frame: bytes, port: int) -> str | None:
    """The output line for one frame, None if it is not UDP to or from `port`."""
    ip = frame[ETH_HEADER:]
    if len(ip) < 28 or ip[0] >> 4 != 4 or ip[9] != 17:
        return None
    ihl = (ip[0] & 0x0F) * 4
    sport, dport = struct.unpack_from("!HH", ip, ihl)
    if port not in (sport, dport):
        return None
    payload = ip[ihl + 8:]
    head = payload.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    if not head or not head[0]:
        return None
    call_id = _header(head[1:], (b"call-id", b"i"))
    cseq = _header(head[1:], (b"cseq",)).split()
    src = f"{socket.inet_ntoa(ip[12:16])}:{sport}"
    dst = f"{socket.inet_ntoa(ip[16:20])}:{dport}"
    fields = [f"{t:.6f}", src, dst, head[0].decode("latin-1"), call_id.decode("latin-1"),
              cseq[1].decode("latin-1") if len(cseq) > 1 else ""]
    return "\t".join(f.replace("\t", " ") for f in fields)


def capture(out: Path, port: int) -> int:
    """Capture until SIGTERM/SIGINT; returns the number of packets written."""
    stop = False

    def _stop(_sig: int, _frame: FrameType | None) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
    sock.bind(("lo", 0))
    sock.settimeout(0.2)
    n = 0
    with out.open("w", encoding="utf-8") as fh:
        print("ready", file=fh, flush=True)
        while not stop:
            try:
                frame, anc, _flags, _addr = sock.recvmsg(65535, socket.CMSG_SPACE(16))
            except (TimeoutError, InterruptedError):
                continue
            t = 0.0
            for level, kind, data in anc:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= 16:
                    sec, nsec = struct.unpack("qq", data[:16])
                    t = sec + nsec / 1e9
            line = _record(t, frame, port)
            if line is not None:
                fh.write(line + "\n")
                n += 1
    sock.close()
    return n


def read(path: Path) -> Iterator[Packet]:
    """The packets a capture file holds (the 'ready' marker and torn lines skipped)."""
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) != 6:
            continue
        try:
            t = float(parts[0])
        except ValueError:
            continue
        yield Packet(t, parts[1], parts[2], parts[3], parts[4], parts[5])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--port", type=int, required=True, help="the proxy's SIP port")
    args = ap.parse_args(argv)
    try:
        n = capture(args.out, args.port)
    except PermissionError:
        print("wiretime: AF_PACKET needs root (CAP_NET_RAW)", file=sys.stderr)
        return 2
    print(f"wiretime: {n} packets", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
