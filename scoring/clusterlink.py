"""The request path's connections to a Redis Cluster: one round trip of latency, in parallel.

Every command the store sends touches keys of one hash tag (`scoring.keys`), so each goes to
the master of its first key's slot. A round trip writes each node's commands in one buffer to
all the nodes involved first, then reads the replies: its latency is the slowest node's, not
the sum. Deferred writes are kept until their replies are read (before the next request on that
connection), so a write that meets a slot migration (``MOVED``/``ASK``) is sent again to the
right node instead of being lost.

A master that cannot be reached is marked down for ``retry_after`` seconds on its own: the
INVITEs whose keys live there fail open (`NodeDown`), the others are still scored (with
``cluster-require-full-coverage no``, the cluster keeps serving the other slots; otherwise it
refuses everything until a replica is promoted, and the store fails open for all calls). While a
master is down the slot map is learnt again at most once per ``retry_after``, so a promoted
replica is found without a restart.

Written by hand, like `scoring.store`'s single-node path, because redis-py's `ClusterPipeline`
builds several Python objects per command (it costs more CPU per INVITE than the rest of the
store), cannot leave replies unread, and re-sends scripts it has not seen. Slots are computed
with redis-py's `key_slot` and replies parsed by its (hiredis) parser; only the routing is ours.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

import redis
from redis.crc import key_slot
from redis.exceptions import AskError, MovedError, NoScriptError, ResponseError

from scoring.redisconn import ClusterUrl

log = logging.getLogger("spitwall.store")

SLOTS = 16384
#: deferred replies read per master at the latest before sending it more (see `defer`)
MAX_PENDING = 256
Command = Sequence[Any]
Addr = tuple[str, int]


class NodeDown(redis.ConnectionError):
    """One master cannot be reached (or is marked down): this request fails open, the link
    goes on with the other masters."""


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

    def __init__(self, url: ClusterUrl, scripts: Iterable[str], *, retry_after: float = 1.0,
                 **conn_kwargs: Any) -> None:
        self.url = url
        self.scripts = tuple(scripts)
        self.retry_after = retry_after
        self.conn_kwargs = url.node_kwargs(**conn_kwargs)
        self.known: list[Addr] = list(url.nodes)
        self._slots: list[Addr | None] = []
        self._conns: dict[Addr, Any] = {}
        #: per master, the deferred commands whose replies are unread (None: a reply to drop)
        self._pending: dict[Addr, deque[Command | None]] = {}
        #: masters marked down, until when (monotonic)
        self._down: dict[Addr, float] = {}
        self._next_refresh = 0.0
        self.redirects = 0
        self.dropped = 0  # deferred commands not sent: their master was down

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
        slots: list[Addr | None] = [None] * SLOTS
        nodes: list[Addr] = []
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

    def node_for(self, cmd: Command) -> Addr:
        key = command_key(cmd)
        if key is None:
            raise ValueError(f"{str(cmd[0])[:20]} has no key to route by")
        if not self._slots:
            self.refresh()
        elif self._down and time.monotonic() >= self._next_refresh:
            self._next_refresh = time.monotonic() + self.retry_after
            try:  # a master is down: has a replica taken its slots?
                self.refresh()
            except redis.ConnectionError as exc:
                log.debug("redis cluster: slot map not refreshed: %s", exc)
        addr = self._slots[key_slot(key)]
        if addr is None:
            raise redis.ConnectionError(f"slot {key_slot(key)} has no master")
        return addr

    # -- connections -------------------------------------------------------------------
    def _new_connection(self, addr: Addr) -> Any:
        return self.url.connection_class()(host=addr[0], port=addr[1], **self.conn_kwargs)

    def _conn(self, addr: Addr) -> Any:
        conn = self._conns.get(addr)
        if conn is not None:
            return conn
        until = self._down.get(addr)
        if until is not None:
            if time.monotonic() < until:
                raise NodeDown(f"redis cluster node {addr[0]}:{addr[1]} marked down")
            del self._down[addr]
        conn = self._new_connection(addr)
        try:
            conn.connect()
            self._load_scripts(conn)
        except ResponseError as exc:  # e.g. NOPERM: a misconfigured user, as good as down
            conn.disconnect()
            self._node_failed(addr, exc)
            raise NodeDown(f"SCRIPT LOAD on {addr[0]}:{addr[1]}: {exc}") from exc
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            conn.disconnect()
            self._node_failed(addr, exc)
            raise NodeDown(f"redis cluster node {addr[0]}:{addr[1]}: {exc}") from exc
        self._conns[addr] = conn
        self._pending[addr] = deque()
        return conn

    def _node_failed(self, addr: Addr, exc: BaseException) -> None:
        """Drop ``addr``'s connection and unread replies; mark it down for ``retry_after``."""
        conn = self._conns.pop(addr, None)
        lost = len(self._pending.pop(addr, ()))
        if conn is not None:
            try:
                conn.disconnect()
            except (redis.RedisError, OSError) as close_exc:
                log.debug("disconnect failed: %r", close_exc)
        if addr not in self._down:
            log.warning("redis cluster node %s:%d unavailable (%s); its slots fail open for "
                        "%.1fs%s", addr[0], addr[1], exc, self.retry_after,
                        f", {lost} deferred writes unconfirmed" if lost else "")
        self._down[addr] = time.monotonic() + self.retry_after
        self._next_refresh = min(self._next_refresh, time.monotonic() + self.retry_after)

    def _io(self, addr: Addr, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` on ``addr``'s connection; a transport failure marks only it down."""
        try:
            return fn(*args)
        except NodeDown:
            raise
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            self._node_failed(addr, exc)
            raise NodeDown(f"redis cluster node {addr[0]}:{addr[1]}: {exc}") from exc

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
        self._down.clear()
        self._slots = []

    # -- requests ----------------------------------------------------------------------
    def roundtrip(self, commands: Sequence[Command], pack: Any) -> list[Any]:
        """Send commands (grouped per master, all writes before any read) and return their
        replies in order; error replies come back as exception values. ``MOVED``/``ASK`` and
        ``NOSCRIPT`` are followed once."""
        replies: list[Any] = [None] * len(commands)
        groups: dict[Addr, list[int]] = {}
        for i, cmd in enumerate(commands):
            groups.setdefault(self.node_for(cmd), []).append(i)
        self._exchange(groups, commands, replies, pack)
        again = [i for i, r in enumerate(replies)
                 if isinstance(r, (AskError, NoScriptError))]  # MovedError is an AskError
        if again:
            self._follow(again, commands, replies, pack)
        return replies

    def _exchange(self, groups: dict[Addr, list[int]], commands: Sequence[Command],
                  replies: list[Any], pack: Any) -> None:
        # Drain every node first: a deferred write redirected while draining is sent (and its
        # reply read) on another node, which must not have our commands in flight yet.
        for addr in groups:
            self._drain(addr, self._conn(addr), pack)
        in_flight: list[Addr] = []
        try:
            for addr, idx in groups.items():
                conn = self._conns[addr]
                self._io(addr, conn.send_packed_command, [pack([commands[i] for i in idx])])
                in_flight.append(addr)
            for addr, idx in groups.items():
                conn = self._conns[addr]
                for i in idx:
                    try:
                        replies[i] = self._io(addr, conn.read_response)
                    except ResponseError as exc:
                        replies[i] = exc
                in_flight.remove(addr)
        except NodeDown:
            for addr in in_flight:  # healthy masters' replies are still coming: drop them later
                if addr in self._pending:
                    self._pending[addr].extend([None] * len(groups[addr]))
            raise

    def _follow(self, again: list[int], commands: Sequence[Command], replies: list[Any],
                pack: Any) -> None:
        self.redirects += 1
        if any(isinstance(replies[i], MovedError) for i in again):
            self.refresh()
        groups: dict[Addr, list[int]] = {}
        asking: dict[Addr, list[int]] = {}
        for i in again:
            r = replies[i]
            if isinstance(r, NoScriptError):  # e.g. a replica promoted since we connected
                addr = self.node_for(commands[i])
                self._io(addr, self._load_scripts, self._conn(addr))
                groups.setdefault(addr, []).append(i)
            elif isinstance(r, MovedError):
                groups.setdefault(self.node_for(commands[i]), []).append(i)
            else:  # ASK: this key only, this once, on the importing node
                asking.setdefault((r.host, int(r.port)), []).append(i)
        self._exchange(groups, commands, replies, pack)
        for addr, idx in asking.items():
            conn = self._conn(addr)
            self._drain(addr, conn, pack)
            self._io(addr, conn.send_packed_command,
                     [pack([c for i in idx for c in (["ASKING"], commands[i])])])
            for i in idx:
                try:
                    self._io(addr, conn.read_response)  # +OK of ASKING
                    replies[i] = self._io(addr, conn.read_response)
                except ResponseError as exc:
                    replies[i] = exc

    def defer(self, commands: Sequence[Command], pack: Any) -> None:
        """Send without waiting; replies are read before the next request to that node.
        Commands for a master that is down are dropped (counted; `NodeDown` once the others
        are sent)."""
        groups: dict[Addr, list[Command]] = {}
        for cmd in commands:
            groups.setdefault(self.node_for(cmd), []).append(cmd)
        failed: NodeDown | None = None
        for addr, cmds in groups.items():
            try:
                conn = self._conn(addr)
                if len(self._pending[addr]) >= MAX_PENDING:  # a process that only defers
                    self._drain(addr, conn, pack)
                self._io(addr, conn.send_packed_command, [pack(cmds)])
            except NodeDown as exc:
                self.dropped += len(cmds)
                failed = exc
                continue
            self._pending[addr].extend(cmds)
        if failed is not None:
            raise failed

    def _drain(self, addr: Addr, conn: Any, pack: Any) -> None:
        pending = self._pending[addr]
        redirected: list[Command] = []
        while pending:
            cmd = pending.popleft()
            try:
                self._io(addr, conn.read_response)
            except ResponseError as exc:
                if cmd is None:  # the reply of a request that failed on another master
                    continue
                if isinstance(exc, (AskError, NoScriptError)):  # slot moved, scripts lost
                    redirected.append(cmd)  # send it again
                else:  # a deferred write failed: log, do not fail the call
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
