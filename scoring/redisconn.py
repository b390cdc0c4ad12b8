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
  need their own are given in the query; ``rediss+sentinel://`` is the same over TLS, to the
  sentinels and the data nodes, with the TLS options of ``rediss+cluster://`` in the query;
* ``redis+cluster://[user:password@]host[:port][,host[:port]...][/]``: a Redis Cluster; the
  listed nodes (default port 6379) are only the seeds from which the slot map is learnt, any one
  that answers will do. A cluster has only database 0. ``rediss+cluster://...[?ssl_ca_certs=F
  &ssl_certfile=F&ssl_keyfile=F&ssl_cert_reqs=required&ssl_check_hostname=true]`` is the same
  over TLS (certificate and host name verified by default).

redis-py has Sentinel support (`redis.sentinel.Sentinel`) but no URL form for it, so the URL is
parsed here; connections are redis-py's `SentinelManagedConnection`s, which ask the sentinels
for the master at every (re)connect and drop the connection when the old master answers
``READONLY`` after a failover. Cluster URLs give redis-py's `RedisCluster` (same command methods
as `Redis`, routed by key slot) to every process except the Kamailio children, whose store
routes its own pipelined commands (`scoring.clusterlink`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import parse_qs, quote, unquote

import redis
import redis.asyncio as aredis
import redis.asyncio.cluster as acluster
import redis.asyncio.sentinel as asentinel
import redis.cluster
import redis.sentinel
from redis.asyncio.retry import Retry as ARetry
from redis.backoff import NoBackoff
from redis.retry import Retry

CLUSTER_SCHEME = "redis+cluster"
CLUSTER_TLS_SCHEME = "rediss+cluster"
CLUSTER_SCHEMES = (CLUSTER_SCHEME, CLUSTER_TLS_SCHEME)
CLUSTER_PORT = 6379
SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_TLS_SCHEME = "rediss+sentinel"
SENTINEL_SCHEMES = (SENTINEL_SCHEME, SENTINEL_TLS_SCHEME)
SENTINEL_PORT = 26379
_SERVICE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_QUERY_KEYS = ("sentinel_username", "sentinel_password", "sentinel_timeout")


def is_sentinel(url: str) -> bool:
    return url.split("://", 1)[0].lower() in SENTINEL_SCHEMES


def is_cluster(url: str) -> bool:
    return url.split("://", 1)[0].lower() in CLUSTER_SCHEMES


def _credentials(netloc: str) -> tuple[str, str | None, str | None]:
    """(rest of netloc, username, password) of ``[user[:password]@]rest``."""
    username = password = None
    if "@" in netloc:
        creds, _, netloc = netloc.rpartition("@")
        user, colon, pw = creds.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if colon else None
        if not colon:  # redis://secret@host means a password, not a user
            username, password = None, unquote(user) or None
    return netloc, username, password


def _netloc(hosts: tuple[tuple[str, int], ...], username: str, password: str) -> str:
    joined = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in hosts)
    return f"{quote(username, safe='')}:{quote(password, safe='')}@{joined}"


#: TLS options of a ``rediss+cluster://`` URL (query), as redis-py's SSL connections take them
_TLS_QUERY = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs",
              "ssl_check_hostname")


def _tls_options(params: dict[str, list[str]]) -> tuple[tuple[str, str], ...]:
    """The `_TLS_QUERY` options of a parsed query, validated (ValueError names the wrong one)."""
    options = tuple((k, params[k][-1]) for k in _TLS_QUERY if k in params)
    for k, v in options:
        if k == "ssl_cert_reqs" and v not in ("required", "optional", "none"):
            raise ValueError("ssl_cert_reqs must be required, optional or none")
        if k == "ssl_check_hostname" and v.lower() not in ("true", "false"):
            raise ValueError("ssl_check_hostname must be true or false")
        if k in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile") and not v:
            raise ValueError(f"{k} needs a file path")
    return options


def _tls_kwargs(options: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    return {k: v.lower() == "true" if k == "ssl_check_hostname" else v for k, v in options}


def _tls_query(options: tuple[tuple[str, str], ...]) -> list[str]:
    return [f"{k}={quote(v, safe='/')}" for k, v in options]


@dataclass(frozen=True)
class ClusterUrl:
    """A parsed ``redis+cluster://`` or ``rediss+cluster://`` (TLS) URL: seed nodes, the data
    nodes' credentials and, with TLS, the certificate options."""

    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None
    tls: bool = False
    #: (name, value) pairs of `_TLS_QUERY`, only with ``tls``
    tls_options: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, url: str) -> ClusterUrl:
        """Parse; raises ValueError naming the part that is wrong (never echoes a password)."""
        scheme, sep, rest = url.partition("://")
        scheme = scheme.lower()
        if not sep or scheme not in CLUSTER_SCHEMES:
            raise ValueError(f"not a {CLUSTER_SCHEME}:// or {CLUSTER_TLS_SCHEME}:// URL")
        tls = scheme == CLUSTER_TLS_SCHEME
        if "#" in rest:
            raise ValueError("a Redis URL has no fragment ('#')")
        rest, _, query = rest.partition("?")
        if query and not tls:
            raise ValueError(f"a {CLUSTER_SCHEME}:// URL takes no parameters ('?...'); "
                             f"TLS options belong to {CLUSTER_TLS_SCHEME}://")
        netloc, _, path = rest.partition("/")
        if path not in ("", "0"):
            raise ValueError("a Redis Cluster has only database 0: "
                             f"{scheme}://host:port[,host:port][/0]")
        netloc, username, password = _credentials(netloc)
        nodes = tuple(_host_port(part, CLUSTER_PORT, "cluster node")
                      for part in netloc.split(","))
        params = parse_qs(query, keep_blank_values=True) if query else {}
        unknown = sorted(set(params) - set(_TLS_QUERY))
        if unknown:
            raise ValueError(f"unknown cluster URL parameter {unknown[0][:40]!r} "
                             f"(known: {', '.join(_TLS_QUERY)})")
        return cls(nodes, username, password, tls, _tls_options(params))

    def with_credentials(self, username: str, password: str) -> str:
        """This URL with other credentials (e.g. a role's ACL user)."""
        scheme = CLUSTER_TLS_SCHEME if self.tls else CLUSTER_SCHEME
        query = "&".join(_tls_query(self.tls_options))
        return (f"{scheme}://{_netloc(self.nodes, username, password)}/0"
                + (f"?{query}" if query else ""))

    def _auth(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        kw = dict(kwargs)
        kw.pop("db", None)
        if self.username:
            kw.setdefault("username", self.username)
        if self.password:
            kw.setdefault("password", self.password)
        for k, v in _tls_kwargs(self.tls_options).items():
            kw.setdefault(k, v)
        return kw

    def redis_kwargs(self, **kwargs: Any) -> dict[str, Any]:
        """Keyword arguments of a `redis.Redis` (or `RedisCluster`) for these nodes."""
        kw = self._auth(kwargs)
        if self.tls:
            kw["ssl"] = True
        return kw

    def client(self, **kwargs: Any) -> redis.cluster.RedisCluster:
        nodes = [redis.cluster.ClusterNode(h, p)  # type: ignore[no-untyped-call]
                 for h, p in self.nodes]
        return redis.cluster.RedisCluster(startup_nodes=nodes, **self.redis_kwargs(**kwargs))

    def async_client(self, **kwargs: Any) -> acluster.RedisCluster:
        nodes = [acluster.ClusterNode(h, p) for h, p in self.nodes]
        return acluster.RedisCluster(startup_nodes=nodes, **self.redis_kwargs(**kwargs))

    def connection_class(self) -> type[redis.Connection] | type[redis.SSLConnection]:
        return redis.SSLConnection if self.tls else redis.Connection

    def node_kwargs(self, **kwargs: Any) -> dict[str, Any]:
        """Keyword arguments of a `connection_class()` to one node (credentials and TLS
        options included)."""
        return self._auth(kwargs)


@dataclass(frozen=True)
class SentinelUrl:
    """A parsed ``redis+sentinel://`` or ``rediss+sentinel://`` (TLS to the sentinels and the
    data nodes) URL."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    #: socket timeout towards the sentinels (None: the data connection's)
    sentinel_timeout: float | None = None
    tls: bool = False
    #: (name, value) pairs of `_TLS_QUERY`, for the sentinels and the data nodes alike
    tls_options: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, url: str) -> SentinelUrl:
        """Parse; raises ValueError naming the part that is wrong (never echoes a password)."""
        scheme, sep, rest = url.partition("://")
        if not sep or scheme.lower() not in SENTINEL_SCHEMES:
            raise ValueError(f"not a {SENTINEL_SCHEME}:// or {SENTINEL_TLS_SCHEME}:// URL")
        tls = scheme.lower() == SENTINEL_TLS_SCHEME
        rest, _, query = rest.partition("?")
        if "#" in rest or "#" in query:
            raise ValueError("a Redis URL has no fragment ('#')")
        netloc, slash, path = rest.partition("/")
        netloc, username, password = _credentials(netloc)
        sentinels = tuple(_host_port(part, SENTINEL_PORT, "sentinel")
                          for part in netloc.split(","))
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
        known = (*_QUERY_KEYS, *(_TLS_QUERY if tls else ()))
        unknown = sorted(set(params) - set(known))
        if unknown:
            hint = (f"; TLS options belong to {SENTINEL_TLS_SCHEME}://"
                    if not tls and unknown[0] in _TLS_QUERY else "")
            raise ValueError(f"unknown sentinel URL parameter {unknown[0][:40]!r} "
                             f"(known: {', '.join(known)}){hint}")
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
                   timeout, tls, _tls_options(params) if tls else ())

    def with_credentials(self, username: str, password: str) -> str:
        """This URL with other data-node credentials (e.g. a role's ACL user)."""
        query = "&".join([f"{k}={quote(str(v), safe='')}" for k, v in (
            ("sentinel_username", self.sentinel_username),
            ("sentinel_password", self.sentinel_password),
            ("sentinel_timeout", self.sentinel_timeout)) if v is not None]
            + _tls_query(self.tls_options))
        scheme = SENTINEL_TLS_SCHEME if self.tls else SENTINEL_SCHEME
        return (f"{scheme}://{_netloc(self.sentinels, username, password)}"
                f"/{self.service}/{self.db}"
                + (f"?{query}" if query else ""))

    def _sentinel_kwargs(self, socket_timeout: float | None, *,
                         asyncio: bool = False) -> dict[str, Any]:
        # No retries towards a sentinel: redis-py's clients retry a refused connection three
        # times with exponential back-off (about 4 s per dead sentinel, measured), which a
        # Kamailio child would spend on an INVITE at every reconnection; the next sentinel in
        # the list is the retry.
        kw: dict[str, Any] = {"retry": (ARetry if asyncio else Retry)(NoBackoff(), 0)}
        timeout = self.sentinel_timeout if self.sentinel_timeout is not None else socket_timeout
        if timeout is not None:
            kw["socket_timeout"] = kw["socket_connect_timeout"] = timeout
        if self.sentinel_username:
            kw["username"] = self.sentinel_username
        if self.sentinel_password:
            kw["password"] = self.sentinel_password
        if self.tls:
            kw.update(ssl=True, **_tls_kwargs(self.tls_options))
        return kw

    def _data_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        kw = dict(kwargs)
        kw.setdefault("db", self.db)
        if self.username:
            kw.setdefault("username", self.username)
        if self.password:
            kw.setdefault("password", self.password)
        if self.tls:
            kw.setdefault("ssl", True)
            for k, v in _tls_kwargs(self.tls_options).items():
                kw.setdefault(k, v)
        return kw

    def sentinel(self, **kwargs: Any) -> redis.sentinel.Sentinel:
        return redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
            list(self.sentinels),
            sentinel_kwargs=self._sentinel_kwargs(kwargs.get("socket_timeout")),
            **self._data_kwargs(kwargs))

    def async_sentinel(self, **kwargs: Any) -> asentinel.Sentinel:
        return asentinel.Sentinel(  # type: ignore[no-untyped-call]
            list(self.sentinels),
            sentinel_kwargs=self._sentinel_kwargs(kwargs.get("socket_timeout"), asyncio=True),
            **self._data_kwargs(kwargs))


def _host_port(part: str, default_port: int, what: str) -> tuple[str, int]:
    part = part.strip()
    if not part:
        raise ValueError(f"empty {what} address (host[:port], comma-separated)")
    if part.startswith("["):
        host, bracket, tail = part[1:].partition("]")
        if not bracket or (tail and not tail.startswith(":")):
            raise ValueError(f"bad IPv6 {what} address {part[:60]!r}")
        port_text = tail[1:] if tail else ""
    else:
        host, _, port_text = part.partition(":")
    if not host or any(ch in host for ch in " /@?"):
        raise ValueError(f"bad {what} host {part[:60]!r}")
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"bad {what} port in {part[:60]!r}")
        return host, int(port_text)
    return host, default_port


def connection_pool(url: str, **kwargs: Any) -> redis.ConnectionPool:
    """A (blocking) connection pool for ``url``; Sentinel URLs give a pool whose connections
    follow the current master. A cluster has no single pool: ValueError."""
    if is_cluster(url):
        raise ValueError("a redis+cluster:// URL has one pool per node; use client()")
    if is_sentinel(url):
        parsed = SentinelUrl.parse(url)
        return redis.sentinel.SentinelConnectionPool(  # type: ignore[no-untyped-call]
            parsed.service, parsed.sentinel(**kwargs), **parsed._data_kwargs(kwargs))
    return redis.ConnectionPool.from_url(url, **kwargs)


def client(url: str, **kwargs: Any) -> redis.Redis:
    """A redis-py client for ``url`` (any form above); ValueError for a malformed URL.

    For a cluster this is a `RedisCluster`, typed as `Redis` because every caller uses only the
    command methods the two share (multi-key commands and transactions stay within one hash
    tag, see `scoring.keys`)."""
    if is_cluster(url):
        return cast(redis.Redis, ClusterUrl.parse(url).client(**kwargs))
    if is_sentinel(url):
        parsed = SentinelUrl.parse(url)
        master: redis.Redis = parsed.sentinel(**kwargs).master_for(  # type: ignore[no-untyped-call]
            parsed.service, **parsed._data_kwargs(kwargs))
        return master
    return redis.Redis.from_url(url, **kwargs)


def async_client(url: str, **kwargs: Any) -> aredis.Redis:
    """The asyncio client for ``url`` (any form above); a `RedisCluster` for a cluster."""
    if is_cluster(url):
        return cast(aredis.Redis, ClusterUrl.parse(url).async_client(**kwargs))
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
    known replicas, with a cluster every master and replica. For state that Redis does not
    replicate (ACL users): a replica promoted by a failover must already have it."""
    if is_cluster(url):
        seeds = ClusterUrl.parse(url)
        cluster = seeds.client(**kwargs)
        try:  # CLUSTER NODES: CLUSTER SLOTS omits replicas until they have synced
            nodes: dict[str, dict[str, Any]] = cluster.cluster_nodes()
            found = [(addr.rpartition(":")[0].strip("[]"), int(addr.rpartition(":")[2]))
                     for addr, info in nodes.items()
                     if not {"fail", "handshake", "noaddr"} & set(info["flags"].split(","))]
        finally:
            cluster.close()
        return [redis.Redis(host=h, port=p, **seeds.redis_kwargs(**kwargs)) for h, p in found]
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
    elif is_cluster(url):
        ClusterUrl.parse(url)
    else:
        redis.connection.parse_url(url)  # type: ignore[no-untyped-call]
    return url
