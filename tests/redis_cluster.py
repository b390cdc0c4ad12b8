"""A real Redis Cluster on loopback for tests: N masters (and optional replicas) we start and stop.

redis-server processes with ``cluster-enabled yes`` on free ports, joined and given their
slots by ``redis-cli --cluster create`` (the tool operators use), stopped by pid at the end.
With ``tls=True`` every node speaks only TLS (clients, cluster bus, replication), with
certificates of a throw-away CA made at start (`tests.tls_certs`).
"""

from __future__ import annotations

import random
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import redis

from ops.lab import REDIS_EXPECT, redis_argv
from ops.procs import free_port, pid_alive, redis_ping, start_process, stop_pid, wait_until
from tests.tls_certs import RedisTls


def cluster_port() -> int:
    """A free TCP port whose cluster bus port (port + 10000) is free too. Both lie below
    Linux's ephemeral range (32768-60999), so no outgoing connection can take them between
    this probe and redis-server's bind."""
    for _ in range(500):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", random.randrange(20000, 22768)))
            except OSError:
                continue
            port = int(sock.getsockname()[1])
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


PORT_RACE_ATTEMPTS = 3


class NodeDidNotStart(AssertionError):
    def __init__(self, message: str, port_taken: bool) -> None:
        super().__init__(message)
        self.port_taken = port_taken


@dataclass
class ClusterSet:
    """``masters`` masters with ``replicas`` replicas each, cluster-node-timeout ``timeout_ms``."""

    workdir: Path
    masters: int = 3
    replicas: int = 0
    timeout_ms: int = 1000
    tls: bool = False
    ports: list[int] = field(default_factory=list)
    pids: dict[int, int] = field(default_factory=dict)
    #: with ``tls``: the certificates
    certs: RedisTls | None = None
    #: more redis-server arguments for every node
    extra: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        # the first seed has nobody listening: discovery must go on to the next one
        dead = free_port("127.0.0.1", "tcp")
        hosts = f"127.0.0.1:{dead},127.0.0.1:{self.ports[0]}"
        if not self.tls:
            return f"redis+cluster://{hosts}"
        assert self.certs is not None
        return f"rediss+cluster://{hosts}/0?ssl_ca_certs={self.certs.ca}"

    def start(self) -> None:
        if self.tls:
            self.certs = RedisTls.make(self.workdir / "pki")
        for _ in range(self.masters * (1 + self.replicas)):
            for attempt in range(1, PORT_RACE_ATTEMPTS + 1):
                port = cluster_port()
                try:
                    self.start_node(port)
                    break
                except NodeDidNotStart as exc:  # a probed port taken before the bind: anew
                    if attempt == PORT_RACE_ATTEMPTS or not exc.port_taken:
                        raise
            self.ports.append(port)
        cli_tls = (["--tls", "--cacert", str(self.certs.ca), "--cert",
                    str(self.certs.client.cert), "--key", str(self.certs.client.key)]
                   if self.certs else [])
        subprocess.run(["redis-cli", *cli_tls, "--cluster", "create",
                        *[f"127.0.0.1:{p}" for p in self.ports],
                        "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                       check=True, capture_output=True, timeout=60)
        assert wait_until(self.healthy, 30), "cluster did not reach cluster_state:ok"

    def start_node(self, port: int) -> None:
        wd = self.workdir / str(port)
        wd.mkdir(parents=True, exist_ok=True)
        argv = [*redis_argv(wd, port), "--cluster-enabled", "yes",
                "--cluster-config-file", str(wd / "nodes.conf"),
                "--cluster-node-timeout", str(self.timeout_ms)]
        if self.certs:  # TLS only: the plain port is closed
            argv = [*argv, "--port", "0", "--tls-port", str(port), *self.certs.server_args(),
                    "--tls-cluster", "yes"]
        argv += self.extra
        pid = start_process(argv, wd / "out.log", cwd=wd)
        self.pids[port] = pid
        if not wait_until(lambda: self._ping(port) or not pid_alive(pid), 10) \
                or not pid_alive(pid):
            stop_pid(pid, "redis-server")
            del self.pids[port]
            log = "".join(f.read_text(errors="replace") for f in (wd / "out.log", wd / "redis.log")
                          if f.exists())
            raise NodeDidNotStart(f"cluster node {port} not up: {log[-500:]}",
                                  "Address already in use" in log)

    def _ping(self, port: int) -> bool:
        if not self.tls:
            return redis_ping("127.0.0.1", port, 0.5)
        try:
            return bool(self.node(port).ping())
        except (redis.RedisError, OSError):
            return False

    def node(self, port: int) -> redis.Redis:
        if self.certs:
            return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2, ssl=True,
                               ssl_ca_certs=str(self.certs.ca))
        return redis.Redis(port=port, socket_timeout=2)

    def healthy(self) -> bool:
        """Every running node says cluster_state:ok and knows every running node."""
        running = [p for p in self.ports if p in self.pids]
        try:
            for p in running:
                info = self.node(p).execute_command("CLUSTER", "INFO")
                text = info.decode() if isinstance(info, bytes) else str(info)
                if "cluster_state:ok" not in text:
                    return False
                repl = self.node(p).info("replication")
                if repl.get("role") == "slave" and repl.get("master_link_status") != "up":
                    return False
        except redis.RedisError:
            return False
        return True

    def master_of(self, key: str) -> int:
        """Port of the master that serves ``key``'s slot now."""
        slot = int(self.node(self.running()[0]).execute_command("CLUSTER", "KEYSLOT", key))
        for start, end, primary, *_ in self.node(self.running()[0]).execute_command(
                "CLUSTER", "SLOTS"):
            if int(start) <= slot <= int(end):
                return int(primary[1])
        raise AssertionError(f"no node serves slot {slot}")

    def node_id(self, port: int) -> str:
        raw = self.node(port).execute_command("CLUSTER", "MYID")
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    def move_slot(self, key: str, dst: int, *, finish: bool = True) -> int:
        """Migrate ``key``'s slot (and its keys) to the master on port ``dst``, the way
        ``redis-cli --cluster reshard`` does; with ``finish=False`` the slot is left half-way
        (MIGRATING on the source, IMPORTING on ``dst``, keys not moved). Returns the slot."""
        src = self.master_of(key)
        assert src != dst, "already there"
        slot = int(self.node(src).execute_command("CLUSTER", "KEYSLOT", key))
        self.node(dst).execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", self.node_id(src))
        self.node(src).execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", self.node_id(dst))
        if not finish:
            return slot
        while names := self.node(src).execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
            self.node(src).execute_command("MIGRATE", "127.0.0.1", dst, "", 0, 5000,
                                           "KEYS", *names)
        for port in self.running():
            repl = self.node(port).info("replication")
            if repl.get("role") == "master":
                self.node(port).execute_command("CLUSTER", "SETSLOT", slot, "NODE",
                                                self.node_id(dst))
        return slot

    def slot_owners(self) -> dict[int, int]:
        """Slot -> port of the master serving it now."""
        owners: dict[int, int] = {}
        for start, end, primary, *_ in self.node(self.running()[0]).execute_command(
                "CLUSTER", "SLOTS"):
            for slot in range(int(start), int(end) + 1):
                owners[slot] = int(primary[1])
        return owners

    def running(self) -> list[int]:
        return [p for p in self.ports if p in self.pids]

    def kill(self, port: int) -> None:
        stop_pid(self.pids.pop(port), REDIS_EXPECT)

    def stop(self) -> None:
        for port in list(self.pids):
            pid = self.pids.pop(port)
            if pid_alive(pid):
                stop_pid(pid, REDIS_EXPECT)

    def flushall(self) -> None:
        for port in self.running():
            self.node(port).execute_command("FLUSHALL")
