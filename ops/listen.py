"""`--listen HOST:PORT` of the operator's HTTP endpoints (`spitwall metrics`, `spitwall review`).

Only IP literals (and ``localhost``) are accepted: a host name could resolve anywhere, and
whether an endpoint is on loopback decides whether it may run without a password (review) or
warns that anyone who reaches it reads it (metrics).
"""

from __future__ import annotations

import ipaddress


def parse_listen(text: str, example: str = "127.0.0.1:8080", *,
                 any_port: bool = False) -> tuple[str, int]:
    """``IP:PORT``, ``[IPv6]:PORT`` or ``localhost:PORT`` -> (IP, port); ValueError with a
    one-line message (quoting at most 60 characters of the input) otherwise. ``any_port``
    also accepts port 0 (the kernel picks one)."""
    shown = repr(text[:60]) + ("..." if len(text) > 60 else "")
    host, sep, port = text.strip().rpartition(":")
    lowest = 0 if any_port else 1
    if not sep or not host or not (port.isdigit() and len(port) <= 5
                                   and lowest <= int(port) < 65536):
        raise ValueError(f"bad --listen {shown}: expected HOST:PORT with a port "
                         f"{lowest}-65535, e.g. {example}")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    if host.lower() == "localhost":
        host = "127.0.0.1"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"bad --listen {shown}: the host must be an IP address "
                         "(or localhost)") from None
    if isinstance(ip, ipaddress.IPv6Address) != bracketed:
        raise ValueError(f"bad --listen {shown}: brackets go around an IPv6 address, and only "
                         f"there, e.g. [::1]:{example.rpartition(':')[2]}")
    return str(ip), int(port)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an IP address, as `parse_listen` returns it) is a loopback address."""
    return ipaddress.ip_address(host).is_loopback
