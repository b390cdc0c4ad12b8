"""A disk spool for intercept events that Redis could not take: they survive a Kamailio crash.

Without it, events that Redis refuses (an outage) wait in the refusing process's memory (a
bounded backlog) and are lost if Kamailio dies or restarts before Redis is back. With a spool
directory (`SPITWALL_LI_SPOOL`), a process that cannot hand its events to Redis appends them to
its own file, `li-<pid>.spool`, and fsyncs before it goes on; whichever Kamailio process next
gets a write through to Redis -- the same one, another child, or a child of the next Kamailio
after a crash -- sends every spooled file, oldest first, before its own events, and removes each
file once it is sent.

What is spooled is what would have gone to Redis: XADDs whose event bodies are already S/MIME
ciphertext to the case's recipient; routing fields (event id, LIID, destination) are in clear,
as they are in the Redis stream. Plaintext keys never reach the spool. The directory is created
0700 and the files 0600 (the Kamailio user's only).

Delivery from the spool is at least once: an event can be sent twice (a crash between a send and
the file's removal, or a send that fails half-way), and the recipient drops the repeat by the
event id (`intercept.tap.event_id`). A frame cut short by a crash while it was being written is
skipped and counted as lost (`torn`): those events were never acknowledged to anybody.

Why by hand and not a queue library: the spool must be appended to by any of Kamailio's forked
processes, survive a SIGKILL of any of them, and be drained by whichever process sees Redis
first, with no daemon of its own; per-process files with `flock` and fsync do that with the
standard library and msgpack, which the event records already use.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import msgpack

log = logging.getLogger("spitwall.intercept.spool")

Command = list[Any]
PREFIX = "li-"
SUFFIX = ".spool"
#: bytes of all spool files together beyond which new events are dropped (and counted)
DEFAULT_MAX_BYTES = 1 << 30
#: commands per send when a spool is replayed
REPLAY_CHUNK = 1000
#: seconds between looks at the directory for other processes' files
SCAN_INTERVAL = 1.0


class Spool:
    """One process's view of the spool directory."""

    def __init__(self, directory: str | Path, *, max_bytes: int = DEFAULT_MAX_BYTES,
                 pid: int | None = None) -> None:
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        self.pid = pid if pid is not None else os.getpid()
        self.lost = 0  # events dropped: spool full, unwritable, or a torn frame
        self.spooled = 0  # events written to the spool
        self.replayed = 0  # events sent from the spool
        self._next_scan = 0.0
        self._found = False  # other files seen at the last look
        self._own_pending = False
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    @property
    def own_path(self) -> Path:
        return self.dir / f"{PREFIX}{self.pid}{SUFFIX}"

    # -- writing -------------------------------------------------------------------------
    def append(self, commands: Sequence[Command]) -> bool:
        """Write ``commands`` as one frame to this process's file and fsync it. False (and
        counted as lost) when the spool is full or cannot be written."""
        if not commands:
            return True
        frame = msgpack.packb(list(commands), use_bin_type=True)
        if self.size() + len(frame) > self.max_bytes:
            self.lost += len(commands)
            log.error("intercept spool %s full (%d bytes): %d events lost", self.dir,
                      self.max_bytes, len(commands))
            return False
        try:
            with self._locked_own() as fd:
                os.write(fd, frame)
                os.fsync(fd)
        except OSError as exc:
            self.lost += len(commands)
            log.error("intercept spool %s not writable (%s): %d events lost", self.dir, exc,
                      len(commands))
            return False
        self.spooled += len(commands)
        self._own_pending = True
        return True

    @contextlib.contextmanager
    def _locked_own(self) -> Iterator[int]:
        """This process's file, open for appending and locked; a file that a replay removed
        while we waited for the lock is replaced by a new one."""
        while True:
            fd = os.open(self.own_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                if os.fstat(fd).st_nlink == 0:  # removed by a replay meanwhile: start anew
                    continue
                yield fd
                return
            finally:
                os.close(fd)  # closing releases the lock

    # -- reading -------------------------------------------------------------------------
    def files(self) -> list[Path]:
        """Spool files, oldest first (by modification time, then name)."""
        found = []
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.dir):
                if entry.name.startswith(PREFIX) and entry.name.endswith(SUFFIX):
                    with contextlib.suppress(FileNotFoundError):
                        found.append((entry.stat().st_mtime, entry.name))
        return [self.dir / name for _mtime, name in sorted(found)]

    def size(self) -> int:
        total = 0
        for path in self.files():
            with contextlib.suppress(FileNotFoundError):
                total += path.stat().st_size
        return total

    def pending(self, now: float | None = None) -> bool:
        """Whether there may be spooled events to send: our own for sure; other processes'
        (or a crashed Kamailio's) found by a look at the directory at most once a second."""
        if self._own_pending:
            return True
        t = time.monotonic() if now is None else now
        if t >= self._next_scan:
            self._next_scan = t + SCAN_INTERVAL
            self._found = bool(self.files())
        return self._found

    def replay(self, send: Callable[[Sequence[Command]], None]) -> int:
        """Send every spool file's events, oldest file first, in chunks; remove each file
        once sent. A file being written by another process right now is left for the next
        time. Whatever ``send`` raises propagates (the file stays). Returns events sent."""
        sent = 0
        for path in self.files():
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue  # another process replayed it
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                if os.fstat(fd).st_nlink == 0:
                    continue  # replayed and removed while we opened it
                commands = self._read(fd, path)
                for start in range(0, len(commands), REPLAY_CHUNK):
                    send(commands[start:start + REPLAY_CHUNK])
                path.unlink()
                sent += len(commands)
            finally:
                os.close(fd)
        self.replayed += sent
        left = self.files()  # what was being written meanwhile, or is new
        self._own_pending = self.own_path in left
        self._found = bool(left)
        return sent

    def _read(self, fd: int, path: Path) -> list[Command]:
        unpacker = msgpack.Unpacker(raw=False, max_buffer_size=self.max_bytes + 1)
        while chunk := os.read(fd, 1 << 20):
            unpacker.feed(chunk)
        commands: list[Command] = []
        try:
            for frame in unpacker:
                if isinstance(frame, list):
                    commands += [c for c in frame if isinstance(c, list)]
                else:
                    self.lost += 1
                    log.error("intercept spool %s: a frame that is not a list skipped", path)
        except (ValueError, msgpack.UnpackException) as exc:
            self.lost += 1
            log.error("intercept spool %s: unreadable from byte %d on, skipped (%s)", path,
                      unpacker.tell(), exc)
            return commands
        if unpacker.tell() < os.fstat(fd).st_size:  # a frame cut short by a crash
            self.lost += 1
            log.error("intercept spool %s: torn last frame (%d bytes) skipped", path,
                      os.fstat(fd).st_size - unpacker.tell())
        return commands
