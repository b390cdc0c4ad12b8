"""Redis ACL users that keep the intercept state away from everyone who does not need it.

Why: lawful-intercept targets and their events must be invisible to the ordinary operator role
(CALEA: the target list is need-to-know), while the proxy must read targets and append events,
and the delivery worker must consume them. Redis 7 ACLs enforce that at the server, whatever
the client code does. Six users, one per role:

* ``spitwall-proxy`` (Kamailio children): the scoring commands on every non-``li`` key, read-only
  access to the targets and their version (not to the recorders' digest HA1s nor the audit)
  and, through a selector, XADD on the event stream -- it cannot read the events back nor
  change targets;
* ``spitwall-ops`` (operator CLI) and ``spitwall-media`` (answering machine): key patterns that
  cover every ``spitwall:`` key except the ``spitwall:li:`` prefix, and no command that lists or
  counts keys or reports on keys without an ACL key check (SCAN, KEYS, RANDOMKEY, DBSIZE, INFO,
  MEMORY, MONITOR, CLIENT TRACKING, ...), so they get NOPERM on ``li`` keys and cannot even tell
  whether one exists. The answering machine faces the network, so it gets only the commands it
  uses;
* ``spitwall-deliver`` (delivery worker): the stream-consumer and hash commands on
  ``spitwall:li:*``; XDEL/XTRIM only on the ``{ev}`` streams, EXPIRE only on the subscriptions;
* ``spitwall-li-admin`` (intercept admin): provisioning and dead-letter replay on
  ``spitwall:li:*``; no DEL/UNLINK/RENAME/EXPIRE/XTRIM/XDEL on the ``{li}`` keys (so not on the
  audit stream either), no dangerous commands;
* ``spitwall-metrics`` (the Prometheus exporter, `ops.metrics`): read-only (``%R~``) on exactly
  the keys it reads -- the stats hash, the kill switch's mirror ``spitwall:{cfg}:enabled``
  (not the config hash, which holds ``media.token_key``), the config and lists versions, the
  queue indexes -- with HGETALL, GET and ZCARD only: no write, no other key, nothing under
  ``spitwall:li:`` (an LI-domain exporter reads those with the deliver or li-admin user).

Limit (Redis cannot express it): a user that may XADD to the audit stream could pass MAXLEN and
trim it. Nobody but the ``default`` user can delete or XSETID it, so removals are detectable:
`intercept.provision.audit_integrity` compares XINFO STREAM's ``entries-added`` with its length.

Glob note (Redis 7.0 ``stringmatchlen``): ``[^l]`` matches exactly one character, so
``spitwall:[^l]*`` does not match ``spitwall:`` itself; the exact patterns ``spitwall:``,
``spitwall:l`` and ``spitwall:li`` close those gaps (``tests/unit/intercept/test_acl.py``).
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from intercept import names
from media.queue import QUEUES, index_key
from scoring import keys, redisconn

PROXY = "proxy"
OPS = "ops"
MEDIA = "media"
DELIVER = "deliver"
LI_ADMIN = "li-admin"
METRICS = "metrics"
ROLES = (PROXY, OPS, MEDIA, DELIVER, LI_ADMIN, METRICS)
USER_PREFIX = "spitwall-"

#: every ``spitwall:`` key except those under ``spitwall:li:``
NON_LI_KEYS = (
    "~spitwall:", "~spitwall:l", "~spitwall:li",
    "~spitwall:[^l]*", "~spitwall:l[^i]*", "~spitwall:li[^:]*",
)  # fmt: skip
LI_KEYS = f"~{names.PREFIX}*"  # ~spitwall:li:*
LI_STREAMS = f"{names.PREFIX}{{ev}}:*"  # events, dead letters, delivery counters
#: the keys `ops.metrics` reads (and nothing else)
METRICS_KEYS = (keys.STATS, keys.KILL_SWITCH, keys.CONFIG_VERSION, keys.LISTS_VERSION,
                *(index_key(q) for q in QUEUES))

#: what redis-py sends on connect (AUTH/HELLO, CLIENT SETNAME, SELECT) plus PING
CONNECTION = (
    "+ping", "+echo", "+auth", "+hello", "+select", "+quit", "+reset",
    "+client|setname", "+client|getname", "+client|id", "+client|info",
)  # fmt: skip
#: redis-py >= 5 also sends CLIENT SETINFO (Redis >= 7.2 only; added when the server has it)
OPTIONAL_CONNECTION = ("+client|setinfo",)
TRANSACTION = ("+multi", "+exec", "+discard", "+watch", "+unwatch")
#: what a Redis Cluster client needs (added only on cluster-enabled servers): the slot map and
#: node list (addresses and node ids, no key names), the key positions of commands (COMMAND,
#: redis-py asks once), and the redirect handshakes
CLUSTER_CLIENT = (
    "+cluster|slots", "+cluster|shards", "+cluster|nodes", "+cluster|info", "+cluster|myid",
    "+cluster|keyslot", "+command", "+asking", "+readonly", "+readwrite",
)  # fmt: skip
#: commands inside scoring/lua/*.lua (scripts run with the caller's ACL, keys included)
SCRIPT_INNER = ("+get", "+set", "+del", "+incr", "+expire", "+hmget", "+hset", "+hincrby",
                "+pfadd", "+pfcount", "+lpush", "+ltrim", "+lrange")
SCRIPTS = ("+evalsha", "+script|load", "+script|exists")

#: Commands that would reveal key names, key counts or other clients' traffic without a key
#: check, or that are not needed and touch global state. On top of -@dangerous (KEYS, INFO,
#: MONITOR, DEBUG, CONFIG, CLIENT LIST, SLOWLOG, LATENCY, ACL LOG/GETUSER, SORT, SYNC, ...).
OPS_DENIED = (
    "-@dangerous", "-@pubsub", "-scan", "-randomkey", "-dbsize", "-memory", "-object",
    "-cluster", "-function", "-fcall", "-fcall_ro", "-client|tracking", "-client|trackinginfo",
    "-client|caching", "-client|getredir", "-script|flush", "-script|kill", "-script|debug",
)  # fmt: skip

RULES: dict[str, tuple[str, ...]] = {
    PROXY: (
        *NON_LI_KEYS, f"%R~{names.TARGETS}", f"%R~{names.VERSION}", "resetchannels",
        *CONNECTION, *SCRIPTS, *SCRIPT_INNER, "+mget", "+hget", "+hgetall",
        f"(~{names.EVENTS} +xadd)",
    ),
    OPS: (*NON_LI_KEYS, "resetchannels", "+@all", *OPS_DENIED),
    MEDIA: (
        *NON_LI_KEYS, "resetchannels", *CONNECTION, *TRANSACTION, *SCRIPTS,
        "+get", "+mget", "+incr", "+incrby", "+expire", "+hget", "+hgetall", "+hmget", "+hset",
        "+hdel", "+hincrby", "+zadd", "+zcard", "+zrange", "+zrevrange", "+zrem",
    ),
    DELIVER: (
        LI_KEYS, "resetchannels", *CONNECTION, *TRANSACTION,
        "+xreadgroup", "+xgroup", "+xack", "+xautoclaim", "+xclaim", "+xpending", "+xadd",
        "+xrange", "+xrevrange", "+xlen", "+xinfo", "+hgetall", "+hget", "+hset", "+hdel",
        "+hincrby", "+get", "+exists",
        f"(~{LI_STREAMS} +xdel +xtrim)", f"(~{names.SUBSCRIPTIONS} +expire)",
    ),
    LI_ADMIN: (
        LI_KEYS, "resetchannels", *CONNECTION, *TRANSACTION,
        "+get", "+mget", "+incr", "+incrby", "+exists", "+type", "+hget", "+hgetall", "+hmget",
        "+hset", "+hdel", "+hexists", "+hlen", "+hkeys", "+xadd", "+xrange", "+xrevrange", "+xlen",
        "+xinfo", "+xpending",
        f"(~{LI_STREAMS} +xdel +xtrim +xack +xclaim +xautoclaim +xgroup +xreadgroup)",
    ),
    METRICS: (
        *(f"%R~{k}" for k in METRICS_KEYS), "resetchannels", *CONNECTION,
        "+hgetall", "+get", "+zcard",
    ),
}


def user_name(role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"unknown Redis role {role!r}; expected one of {', '.join(ROLES)}")
    return USER_PREFIX + role


def rules(role: str, *, setinfo: bool = False, cluster: bool = False) -> list[str]:
    """The ACL SETUSER rules of ``role`` (without passwords). ``setinfo``: the server knows
    CLIENT SETINFO (Redis >= 7.2), so allow it (redis-py sends it on connect). ``cluster``:
    the server is a Redis Cluster node, so allow what cluster clients need."""
    user_name(role)
    out = list(RULES[role])
    if setinfo and role != OPS:  # ops has +@all
        out += OPTIONAL_CONNECTION
    if cluster:  # after OPS_DENIED's -cluster
        out += CLUSTER_CLIENT
    return out


def generate_passwords(roles: Sequence[str] = ROLES) -> dict[str, str]:
    """A fresh random password per role (256 bits, hex, so it needs no URL quoting)."""
    for role in roles:
        user_name(role)
    return {role: secrets.token_hex(32) for role in roles}


def server_version(client: Any) -> tuple[int, ...]:
    """Redis server version, e.g. (7, 0, 15)."""
    text = str(client.info("server").get("redis_version", "0"))
    return tuple(int(p) for p in text.split(".") if p.isdigit())


def apply_users(client: Any, passwords: Mapping[str, str], *,
                keep_other_passwords: bool = False) -> list[str]:
    """ACL SETUSER every role in ``passwords`` (role -> password); returns the user names.

    By default each user is reset first (``reset``: passwords, keys, channels, commands,
    selectors), so applying twice gives the same user with only the new password.
    ``keep_other_passwords`` resets everything but the passwords and adds this one: for a
    Redis shared by several labs, each with its own password (see `remove_passwords`).
    Needs a user allowed to run ACL SETUSER (the ``default`` user of a fresh redis-server).
    """
    for role, password in passwords.items():
        user_name(role)
        if not password or any(ch.isspace() or ch in "<>" for ch in password):
            raise ValueError(f"password of {role!r} must be non-empty without spaces or < >")
    version = server_version(client)
    if version < (7, 0):
        raise ValueError(f"Redis {'.'.join(map(str, version))} has no ACL selectors; "
                         "spitwall's roles need Redis >= 7.0")
    setinfo = version >= (7, 2)
    cluster = str(client.info("cluster").get("cluster_enabled", 0)) == "1"
    done: list[str] = []
    for role, password in passwords.items():
        name = user_name(role)
        head = (["on", f">{password}", "resetkeys", "resetchannels", "clearselectors", "-@all"]
                if keep_other_passwords else ["reset", "on", f">{password}"])
        client.execute_command("ACL", "SETUSER", name, *head,
                               *rules(role, setinfo=setinfo, cluster=cluster))
        done.append(name)
    return done


def remove_passwords(client: Any, passwords: Mapping[str, str]) -> None:
    """Take these passwords away from the users (``<password``); the users stay. A password
    (or user) that is already gone -- a restarted Redis without an aclfile -- is skipped."""
    for role, password in passwords.items():
        name = user_name(role)
        if not client.execute_command("ACL", "GETUSER", name):
            continue
        try:
            client.execute_command("ACL", "SETUSER", name, f"<{password}")
        except Exception as exc:
            if "does not exist" not in str(exc):
                raise


def user_url(base_url: str, role: str, password: str) -> str:
    """``base_url`` (redis://host:port/db, any credentials dropped) with this role's user."""
    if redisconn.is_sentinel(base_url):
        return redisconn.SentinelUrl.parse(base_url).with_credentials(user_name(role), password)
    if redisconn.is_cluster(base_url):
        return redisconn.ClusterUrl.parse(base_url).with_credentials(user_name(role), password)
    parts = urlsplit(base_url)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"cannot put credentials into {redisconn.redacted(base_url)!r}: "
                         "not redis://, rediss://, redis+sentinel:// or redis+cluster://")
    host = parts.hostname or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{quote(user_name(role), safe='')}:{quote(password, safe='')}@{host}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path or "/0", parts.query, ""))


def password_of(url: str) -> str:
    """The (percent-decoded) password of a role URL as `user_url` writes it; "" for none."""
    return unquote(urlsplit(url).password or "")


def complete_passwords(existing: Mapping[str, str],
                       roles: Sequence[str] = ROLES) -> tuple[dict[str, str], list[str]]:
    """Every role of ``roles`` with its password: the ``existing`` one (role -> password), else a
    fresh one (`generate_passwords`). Returns (passwords, the roles that got a fresh one). Roles
    in ``existing`` that this version does not know (a file from a newer version) are left out.

    So a re-run after an upgrade that added a role (``metrics``) creates that role's user and
    changes no other password: every running service keeps working."""
    for role in roles:
        user_name(role)
    missing = [role for role in roles if not existing.get(role)]
    fresh = generate_passwords(missing)
    return {role: existing.get(role) or fresh[role] for role in roles}, missing


def ensure_users_file(path: str | os.PathLike[str], admin_url: str,
                      roles: Sequence[str] = ROLES) -> tuple[dict[str, str], list[str]]:
    """The role passwords of a users file (a JSON object role -> `user_url` URL, mode 0600, as
    docs/deployment.md keeps it in ``/root/spitwall-redis-users.json``), completed first.

    Roles missing from the file -- all of them when there is no file yet, a role added by an
    upgrade otherwise -- get a fresh password, and their URLs (the host, port and database of
    ``admin_url``, its credentials dropped) are added to the file, which is replaced atomically
    with mode 0600 *before* any user is created, so a run that fails half-way is repeated with
    the same passwords. Existing entries, unknown roles included, are kept as they are; with
    nothing missing the file is not touched. Returns (role -> password for ``roles``, the roles
    added). ValueError for a file that is not such an object, or whose URL has no password."""
    target = Path(path)
    urls: dict[str, str] = {}
    if target.exists():
        try:
            data = json.loads(target.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{target} is not a JSON users file: {exc}") from None
        if not isinstance(data, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
            raise ValueError(f"{target} is not a JSON object of role -> Redis URL")
        urls = data
    existing: dict[str, str] = {}
    for role, url in urls.items():
        password = password_of(url)
        if not password:
            raise ValueError(f"{target}: the URL of role {role!r} has no password")
        existing[role] = password
    passwords, added = complete_passwords(existing, roles)
    if added:
        merged = {**urls, **{role: user_url(admin_url, role, passwords[role]) for role in added}}
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        try:  # mkstemp creates it 0600
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(merged, f, indent=2)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return passwords, added


def describe() -> str:
    """Every role's user and rules, one line each (for docs and reports)."""
    return "\n".join(f"{user_name(r)}: {' '.join(rules(r))}" for r in ROLES)
