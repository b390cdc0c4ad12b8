"""The request path's connections to a Redis Cluster: one round trip of latency, in parallel.

Every command the store sends touches keys of one hash tag (`scoring.keys`), so each goes to
the master of its first key's slot. A round trip writes each node's commands in one buffer to
all the nodes involved first, then reads the replies: its latency is the slowest node's, not
the sum. Deferred writes are kept until their replies are read (before the next request on that
connection), so a write that meets a slot migration (``MOVED``/``ASK``) is sent again to the
right node instead of being lost.

Written by hand, like `scoring.store`'s single-node path, because redis-py's `ClusterPipeline`
builds several Python objects per command (it costs more CPU per INVITE than the rest of the
store), cannot leave replies unread, and re-sends scripts it has not seen. Slots are computed
with redis-py's `key_slot` and replies parsed by its (hiredis) parser; only the routing is ours.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

import redis
from redis.crc import key_slot
from redis.exceptions import AskError, MovedError, NoScriptError, ResponseError

from scoring.redisconn import ClusterUrl

log = logging.getLogger("spitwall.store")

SLOTS = 16384
Command = Sequence[Any]


def command_key(cmd: Command) -> bytes | None:
    """The first key of a store command (EVAL/EVALSHA: after the key count), as bytes."""
    name = str(cmd[0]).upper()
    if name in ("EVALSHA", "EVAL"):
        if len(cmd) < 4 or int(cmd[2]) < 1:
            return None
        key = cmd[3]
    elif len(cmd) < 2 or name == "SCRIPT":
        return None
    else:
        key = cmd[1]
    return key if isinstance(key, bytes) else str(key).encode("utf-8", "surrogateescape")


class ClusterLink:
    """Slot map and one connection per master, for one process (one Kamailio child).

    `roundtrip` and `defer` raise `redis.ConnectionError`/`TimeoutError`/`OSError` when a node
    cannot be reached; the store then fails open and calls `close`, so the next attempt learns
    the slot map afresh (after a failover it names the promoted replica).
    """

    def __init__(self, url: ClusterUrl, scripts: Iterable[str], **conn_kwargs: Any) -> None:
        self.url = url
        self.scripts = tuple(scripts)
        self.conn_kwargs = url.node_kwargs(**conn_kwargs)
        self.known: list[tuple[str, int]] = list(url.nodes)
        self._slots: list[tuple[str, int] | None] = []
        self._conns: dict[tuple[str, int], Any] = {}
        self._pending: dict[tuple[str, int], deque[Command]] = {}
        self.redirects = 0

    # -- topology ----------------------------------------------------------------------
    def refresh(self) -> None:
        """Learn the slot map (CLUSTER SLOTS) from the first known node that answers."""
        last: BaseException | None = None
        for host, port in dict.fromkeys([*self.known, *self.url.nodes]):
            conn = self._new_connection((host, port))
            try:
                conn.connect()
                conn.send_command("CLUSTER", "SLOTS")
                reply = conn.read_response()
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                last = exc
                continue
            except ResponseError as exc:  # not a cluster node, or no right to ask (ACL)
                raise redis.ConnectionError(f"CLUSTER SLOTS on {host}:{port}: {exc}") from exc
            finally:
                conn.disconnect()
            self._install(reply, host)
            return
        raise redis.ConnectionError(f"no Redis Cluster node answered ({last})")

    def _install(self, reply: Any, asked_host: str) -> None:
        slots: list[tuple[str, int] | None] = [None] * SLOTS
        nodes: list[tuple[str, int]] = []
        for entry in reply:
            start, end, primary = int(entry[0]), int(entry[1]), entry[2]
            host = _text(primary[0]) or asked_host  # "" means "the address you reached me on"
            addr = (host, int(primary[1]))
            nodes.append(addr)
            nodes += [((_text(r[0]) or asked_host), int(r[1])) for r in entry[3:]]
            slots[start:end + 1] = [addr] * (end - start + 1)
        missing = slots.count(None)
        if missing:
            log.warning("redis cluster: %d of %d slots have no master", missing, SLOTS)
        self._slots = slots
        self.known = list(dict.fromkeys(nodes))

    def node_for(self, cmd: Command) -> tuple[str, int]:
        key = command_key(cmd)
        if key is None:
            raise ValueError(f"{str(cmd[0])[:20]} has no key to route by")
        if not self._slots:
            self.refresh()
        addr = self._slots[key_slot(key)]
        if addr is None:
            raise redis.ConnectionError(f"slot {key_slot(key)} has no master")
        return addr

    # -- connections -------------------------------------------------------------------
    def _new_connection(self, addr: tuple[str, int]) -> Any:
        return self.url.connection_class()(host=addr[0], port=addr[1], **self.conn_kwargs)

    def _conn(self, addr: tuple[str, int]) -> Any:
        conn = self._conns.get(addr)
        if conn is not None:
            return conn
        conn = self._new_connection(addr)
        try:
            conn.connect()
            self._load_scripts(conn)
        except ResponseError as exc:  # e.g. NOPERM: a misconfigured user, as good as down
            conn.disconnect()
            raise redis.ConnectionError(f"SCRIPT LOAD on {addr[0]}:{addr[1]}: {exc}") from exc
        except BaseException:
            conn.disconnect()
            raise
        self._conns[addr] = conn
        self._pending[addr] = deque()
        return conn

    def _load_scripts(self, conn: Any) -> None:
        for source in self.scripts:  # registered once per connection, i.e. once per child
            conn.send_command("SCRIPT", "LOAD", source)
        for _ in self.scripts:
            conn.read_response()

    def close(self) -> None:
        """Drop every connection and the slot map (the next call learns it again)."""
        for conn in self._conns.values():
            try:
                conn.disconnect()
            except (redis.RedisError, OSError) as exc:
                log.debug("disconnect failed: %r", exc)
        self._conns.clear()
        self._pending.clear()
        self._slots = []

    # -- requests ----------------------------------------------------------------------
    def roundtrip(self, commands: Sequence[Command], pack: Any) -> list[Any]:
        """Send commands (grouped per master, all writes before any read) and return their
        replies in order; error replies come back as exception values. ``MOVED``/``ASK`` and
        ``NOSCRIPT`` are followed once."""
        replies: list[Any] = [None] * len(commands)
        groups: dict[tuple[str, int], list[int]] = {}
        for i, cmd in enumerate(commands):
            groups.setdefault(self.node_for(cmd), []).append(i)
        self._exchange(groups, commands, replies, pack)
        again = [i for i, r in enumerate(replies)
                 if isinstance(r, (AskError, NoScriptError))]  # MovedError is an AskError
        if again:
            self._follow(again, commands, replies, pack)
        return replies

    def _exchange(self, groups: dict[tuple[str, int], list[int]], commands: Sequence[Command],
                  replies: list[Any], pack: Any) -> None:
        # Drain every node first: a deferred write redirected while draining is sent (and its
        # reply read) on another node, which must not have our commands in flight yet.
        for addr in groups:
            self._drain(addr, self._conn(addr), pack)
        for addr, idx in groups.items():
            self._conns[addr].send_packed_command([pack([commands[i] for i in idx])])
        for addr, idx in groups.items():
            conn = self._conns[addr]
            for i in idx:
                try:
                    replies[i] = conn.read_response()
                except ResponseError as exc:
                    replies[i] = exc

    def _follow(self, again: list[int], commands: Sequence[Command], replies: list[Any],
                pack: Any) -> None:
        self.redirects += 1
        if any(isinstance(replies[i], MovedError) for i in again):
            self.refresh()
        groups: dict[tuple[str, int], list[int]] = {}
        asking: dict[tuple[str, int], list[int]] = {}
        for i in again:
            r = replies[i]
            if isinstance(r, NoScriptError):  # e.g. a replica promoted since we connected
                addr = self.node_for(commands[i])
                self._load_scripts(self._conn(addr))
                groups.setdefault(addr, []).append(i)
            elif isinstance(r, MovedError):
                groups.setdefault(self.node_for(commands[i]), []).append(i)
            else:  # ASK: this key only, this once, on the importing node
                asking.setdefault((r.host, int(r.port)), []).append(i)
        self._exchange(groups, commands, replies, pack)
        for addr, idx in asking.items():
            conn = self._conn(addr)
            self._drain(addr, conn, pack)
            conn.send_packed_command([pack([c for i in idx for c in (["ASKING"], commands[i])])])
            for i in idx:
                try:
                    conn.read_response()  # +OK of ASKING
                    replies[i] = conn.read_response()
                except ResponseError as exc:
                    replies[i] = exc

    def defer(self, commands: Sequence[Command], pack: Any) -> None:
        """Send without waiting; replies are read before the next request to that node."""
        groups: dict[tuple[str, int], list[Command]] = {}
        for cmd in commands:
            groups.setdefault(self.node_for(cmd), []).append(cmd)
        for addr, cmds in groups.items():
            conn = self._conn(addr)
            conn.send_packed_command([pack(cmds)])
            self._pending[addr].extend(cmds)

    def _drain(self, addr: tuple[str, int], conn: Any, pack: Any) -> None:
        pending = self._pending[addr]
        redirected: list[Command] = []
        while pending:
            cmd = pending.popleft()
            try:
                conn.read_response()
            except (AskError, NoScriptError):  # slot moved (or scripts lost): send it again
                redirected.append(cmd)
            except ResponseError as exc:  # a deferred write failed: log, do not fail the call
                log.error("deferred redis write failed: %s", exc)
        if redirected:
            self.redirects += 1
            replies = self.roundtrip(redirected, pack)
            for cmd, r in zip(redirected, replies, strict=True):
                if isinstance(r, Exception):
                    log.error("deferred redis write %s failed after redirect: %s",
                              str(cmd[0])[:20], r)

    @property
    def pending(self) -> int:
        return sum(len(q) for q in self._pending.values())


def _text(x: Any) -> str:
    return x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)
