"""Redis URLs for every spitwall process, including Redis Sentinel (high availability).

Carriers run Redis with replicas and Sentinel so that losing the master host does not stop
scoring (the proxy fails open while Redis is unreachable; with Sentinel it reconnects to the
promoted replica by itself). Every process (Kamailio children, the CLI, the answering machine,
the delivery worker, the lab) opens Redis through this module, so one URL form works everywhere:

* ``redis://[user:password@]host:port/db``, ``rediss://...``, ``unix://...``: redis-py's own
  `from_url`;
* ``redis+sentinel://[user:password@]host[:port][,host[:port]...]/service[/db]
  [?sentinel_username=U&sentinel_password=P&sentinel_timeout=S]``: the listed sentinels
  (default port 26379) are asked for the current master of ``service``. The credentials are
  those of the data nodes (the master and its replicas), like in ``redis://``; sentinels that
  need their own are given in the query.

redis-py has Sentinel support (`redis.sentinel.Sentinel`) but no URL form for it, so the URL is
parsed here; connections are redis-py's `SentinelManagedConnection`s, which ask the sentinels
for the master at every (re)connect and drop the connection when the old master answers
``READONLY`` after a failover.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, quote, unquote

import redis
import redis.asyncio as aredis
import redis.asyncio.sentinel as asentinel
import redis.sentinel

SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_PORT = 26379
_SERVICE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_QUERY_KEYS = ("sentinel_username", "sentinel_password", "sentinel_timeout")


def is_sentinel(url: str) -> bool:
    return url.split("://", 1)[0].lower() == SENTINEL_SCHEME


@dataclass(frozen=True)
class SentinelUrl:
    """A parsed ``redis+sentinel://`` URL."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    #: socket timeout towards the sentinels (None: the data connection's)
    sentinel_timeout: float | None = None

    @classmethod
    def parse(cls, url: str) -> SentinelUrl:
        """Parse; raises ValueError naming the part that is wrong (never echoes a password)."""
        scheme, sep, rest = url.partition("://")
        if not sep or scheme.lower() != SENTINEL_SCHEME:
            raise ValueError(f"not a {SENTINEL_SCHEME}:// URL")
        rest, _, query = rest.partition("?")
        if "#" in rest or "#" in query:
            raise ValueError("a Redis URL has no fragment ('#')")
        netloc, slash, path = rest.partition("/")
        username = password = None
        if "@" in netloc:
            creds, _, netloc = netloc.rpartition("@")
            user, colon, pw = creds.partition(":")
            username = unquote(user) or None
            password = unquote(pw) if colon else None
            if not colon:  # redis://secret@host means a password, not a user
                username, password = None, unquote(user) or None
        sentinels = tuple(_host_port(part) for part in netloc.split(","))
        segments = path.split("/") if slash else []
        if not segments or not segments[0]:
            raise ValueError("the sentinel URL needs the master's service name: "
                             f"{SENTINEL_SCHEME}://host:port[,host:port]/SERVICE[/DB]")
        service = unquote(segments[0])
        if not _SERVICE.fullmatch(service):
            raise ValueError("service name must be 1-64 characters of A-Z a-z 0-9 . _ -")
        if len(segments) > 2:
            raise ValueError("path must be /SERVICE or /SERVICE/DB")
        db_text = segments[1] if len(segments) == 2 else ""
        if db_text and (not db_text.isdigit() or int(db_text[:6]) > 9999):
            raise ValueError(f"database must be a small non-negative integer, "
                             f"not {db_text[:20]!r}")
        db = int(db_text) if db_text else 0
        params = parse_qs(query, keep_blank_values=True, strict_parsing=False) if query else {}
        unknown = sorted(set(params) - set(_QUERY_KEYS))
        if unknown:
            raise ValueError(f"unknown sentinel URL parameter {unknown[0][:40]!r} "
                             f"(known: {', '.join(_QUERY_KEYS)})")
        one = {k: v[-1] for k, v in params.items()}
        timeout = None
        if "sentinel_timeout" in one:
            try:
                timeout = float(one["sentinel_timeout"])
            except ValueError:
                timeout = -1.0
            if not 0 < timeout <= 60:
                raise ValueError("sentinel_timeout must be seconds in (0, 60]")
        return cls(sentinels, service, db, username, password,
                   one.get("sentinel_username") or None, one.get("sentinel_password") or None,
                   timeout)

    def with_credentials(self, username: str, password: str) -> str:
        """This URL with other data-node credentials (e.g. a role's ACL user)."""
        hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.sentinels)
        query = "&".join(f"{k}={quote(str(v), safe='')}" for k, v in (
            ("sentinel_username", self.sentinel_username),
            ("sentinel_password", self.sentinel_password),
            ("sentinel_timeout", self.sentinel_timeout)) if v is not None)
        creds = f"{quote(username, safe='')}:{quote(password, safe='')}@"
        return (f"{SENTINEL_SCHEME}://{creds}{hosts}/{self.service}/{self.db}"
                + (f"?{query}" if query else ""))

    def _sentinel_kwargs(self, socket_timeout: float | None) -> dict[str, Any]:
        kw: dict[str, Any] = {}
        timeout = self.sentinel_timeout if self.sentinel_timeout is not None else socket_timeout
        if timeout is not None:
            kw["socket_timeout"] = kw["socket_connect_timeout"] = timeout
        if self.sentinel_username:
            kw["username"] = self.sentinel_username
        if self.sentinel_password:
            kw["password"] = self.sentinel_password
        return kw

    def _data_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        kw = dict(kwargs)
        kw.setdefault("db", self.db)
        if self.username:
            kw.setdefault("username", self.username)
        if self.password:
            kw.setdefault("password", self.password)
        return kw

    def sentinel(self, **kwargs: Any) -> redis.sentinel.Sentinel:
        return redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
            list(self.sentinels),
            sentinel_kwargs=self._sentinel_kwargs(kwargs.get("socket_timeout")),
            **self._data_kwargs(kwargs))

    def async_sentinel(self, **kwargs: Any) -> asentinel.Sentinel:
        return asentinel.Sentinel(  # type: ignore[no-untyped-call]
            list(self.sentinels),
            sentinel_kwargs=self._sentinel_kwargs(kwargs.get("socket_timeout")),
            **self._data_kwargs(kwargs))


def _host_port(part: str) -> tuple[str, int]:
    part = part.strip()
    if not part:
        raise ValueError("empty sentinel address (host[:port], comma-separated)")
    if part.startswith("["):
        host, bracket, tail = part[1:].partition("]")
        if not bracket or (tail and not tail.startswith(":")):
            raise ValueError(f"bad IPv6 sentinel address {part[:60]!r}")
        port_text = tail[1:] if tail else ""
    else:
        host, _, port_text = part.partition(":")
    if not host or any(ch in host for ch in " /@?"):
        raise ValueError(f"bad sentinel host {part[:60]!r}")
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"bad sentinel port in {part[:60]!r}")
        return host, int(port_text)
    return host, SENTINEL_PORT


def connection_pool(url: str, **kwargs: Any) -> redis.ConnectionPool:
    """A (blocking) connection pool for ``url``; Sentinel URLs give a pool whose connections
    follow the current master."""
    if is_sentinel(url):
        parsed = SentinelUrl.parse(url)
        return redis.sentinel.SentinelConnectionPool(  # type: ignore[no-untyped-call]
            parsed.service, parsed.sentinel(**kwargs), **parsed._data_kwargs(kwargs))
    return redis.ConnectionPool.from_url(url, **kwargs)


def client(url: str, **kwargs: Any) -> redis.Redis:
    """A redis-py client for ``url`` (any form above); ValueError for a malformed URL."""
    if is_sentinel(url):
        parsed = SentinelUrl.parse(url)
        master: redis.Redis = parsed.sentinel(**kwargs).master_for(  # type: ignore[no-untyped-call]
            parsed.service, **parsed._data_kwargs(kwargs))
        return master
    return redis.Redis.from_url(url, **kwargs)


def async_client(url: str, **kwargs: Any) -> aredis.Redis:
    """The asyncio client for ``url`` (any form above)."""
    if is_sentinel(url):
        parsed = SentinelUrl.parse(url)
        master: aredis.Redis = parsed.async_sentinel(**kwargs).master_for(
            parsed.service, **parsed._data_kwargs(kwargs))
        return master
    return aredis.Redis.from_url(url, **kwargs)


def redacted(url: str) -> str:
    """``url`` with its passwords replaced by ``***`` (for logs and status lines)."""
    url = re.sub(r"(://[^/@]*?:)[^/@]*@", r"\1***@", url, count=1)
    return re.sub(r"(sentinel_password=)[^&]*", r"\1***", url)


def node_clients(url: str, **kwargs: Any) -> list[redis.Redis]:
    """Clients for every data node behind ``url``: the master, and with Sentinel also its
    known replicas. For state that Redis does not replicate (ACL users): a replica promoted by
    a failover must already have it."""
    clients = [client(url, **kwargs)]
    if is_sentinel(url):
        parsed = SentinelUrl.parse(url)
        data = parsed._data_kwargs(kwargs)
        sentinel = parsed.sentinel(**kwargs)
        for host, port in sentinel.discover_slaves(parsed.service):  # type: ignore[no-untyped-call]
            clients.append(redis.Redis(host=host, port=port, **data))
    return clients


def check_url(url: str) -> str:
    """``url`` if it is a Redis URL this module can open; ValueError saying what is wrong."""
    if is_sentinel(url):
        SentinelUrl.parse(url)
    else:
        redis.connection.parse_url(url)  # type: ignore[no-untyped-call]
    return url
