"""The embedded store's commit log: a preallocated file where an append becomes durable before SQLite has it.

etcd makes a write durable with one fdatasync of its preallocated WAL and commits its bolt database later,
in batches; this is the same split. An append is framed into records, written and fdatasynced by a thread
that never takes the GIL (``_log_writer.pyx``), and acknowledged when that returns. SQLite receives the
same entries afterwards without syncing each commit; whenever the file is full (and at every open) SQLite
is synced holding all of them, and the log starts over at offset 0 under a new generation number.

Record: ``magic u32 | crc32 u32 | generation u64 | index i64 | length u32 | data``, little-endian; the crc
covers everything after itself. Recovery reads records from offset 0 while they are whole and of the
generation SQLite recorded when this round of the file began. Example: generation 7 wrote indexes 40..90
at offsets 0..15,300; the file filled, so SQLite was synced holding 90 and recorded generation 8; 91..95
went to offsets 0..1,500 and the machine lost power in the middle of writing 96. On restart the records
of 91..95 are whole and of generation 8, 96's crc does not match, so 91..95 are replayed into SQLite and
96 (never acknowledged) is gone. Whatever follows on the disk, a torn record or one of generation 7, ends
the scan the same way.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import threading
import zlib
from collections import deque
from collections.abc import Callable

from fastetcd.store._log_writer import LogWriter
from fastetcd.store.base import Uncertain

_log = logging.getLogger(__name__)

LOG_FILE = "fastetcd.log"
# Preallocated once, so that an fdatasync never has to change the file's size (a metadata update that
# costs a journal commit): 300-byte append + fdatasync p50 ~200 µs appending to a file, ~135 µs here.
CAPACITY = 16 << 20

_MAGIC = 0x4C435446  # "FTCL"
_HEAD = struct.Struct("<IIQqI")
_TAIL = struct.Struct("<QqI")  # the part of the head the crc covers


def encode(generation: int, entries: list[tuple[int, bytes]]) -> bytes:
    parts = []
    for index, data in entries:
        tail = _TAIL.pack(generation, index, len(data))
        crc = zlib.crc32(data, zlib.crc32(tail))
        parts.append(_HEAD.pack(_MAGIC, crc, generation, index, len(data)))
        parts.append(data)
    return b"".join(parts)


def read(path: str, generation: int) -> list[tuple[int, bytes]]:
    """The whole records of ``generation`` at the start of the file, in order."""
    try:
        with open(path, "rb") as f:
            buf = f.read()
    except FileNotFoundError:
        return []
    out = []
    pos = 0
    head = _HEAD.size
    while pos + head <= len(buf):
        magic, crc, gen, index, length = _HEAD.unpack_from(buf, pos)
        end = pos + head + length
        if magic != _MAGIC or gen != generation or end > len(buf):
            break
        data = buf[pos + head:end]
        if zlib.crc32(data, zlib.crc32(buf[pos + 8:pos + head])) != crc:
            break
        out.append((index, data))
        pos = end
    return out


def _report(on_durable: Callable[[Uncertain | None], None], error: Uncertain | None) -> None:
    try:
        on_durable(error)
    except Exception:  # one appender's bug must not keep the others from hearing about theirs
        _log.exception("a commit log callback failed")


def create(path: str) -> None:
    """Make sure the file exists at full size, its size durable (fdatasync then never changes metadata)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        if os.fstat(fd).st_size < CAPACITY:
            os.posix_fallocate(fd, 0, CAPACITY)
            os.fsync(fd)
            dir_fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    finally:
        os.close(fd)


class CommitLog:
    """Appends to the log file from the event loop; each append's callback says when it is on disk.

    Appends are written, and reported durable, in the order they were made. ``restart(generation)``
    begins the file again at offset 0; the caller must first have made everything appended so far
    durable elsewhere (SQLite).
    """

    def __init__(self, path: str, generation: int) -> None:
        self.path = path
        self.generation = generation
        self._offset = 0
        self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self._writer = LogWriter(self._fd)
        self._thread = threading.Thread(target=self._writer.serve, name="fastetcd-log", daemon=True)
        self._thread.start()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._writer.fileno(), self._on_durable)
        self._waiting: deque[tuple[int, asyncio.Future]] = deque()
        # Its own futures, not the appenders': a caller cancelled while awaiting its append cancels that one.
        self._idle_waiters: list[asyncio.Future] = []
        self._failed: str | None = None

    def encode(self, entries: list[tuple[int, bytes]]) -> bytes:
        return encode(self.generation, entries)

    def fits(self, data: bytes) -> bool:
        return self._offset + len(data) <= CAPACITY

    def restart(self, generation: int) -> None:
        self.generation = generation
        self._offset = 0

    def append(self, data: bytes, on_durable: Callable[[Uncertain | None], None]) -> None:
        """Queue ``data`` (from ``encode``; it must fit). ``on_durable(None)`` is called from the event
        loop once it is on disk, ``on_durable(Uncertain)`` if that can no longer be known; in order.

        A callback, not a future: the engine answers a lone write from it, in the loop turn that learned
        the write is durable rather than one turn later."""
        if self._failed is not None:
            raise Uncertain(self._failed)
        try:
            seq = self._writer.submit(data, self._offset)
        except OSError as e:
            raise Uncertain(f"the commit log failed earlier: {e}") from e
        self._offset += len(data)
        self._waiting.append((seq, on_durable))

    async def idle(self) -> None:
        """Return once everything appended so far is durable (or raise Uncertain)."""
        if self._waiting:
            done = self._loop.create_future()
            self._idle_waiters.append(done)
            await done
        if self._failed is not None:
            raise Uncertain(self._failed)

    def _on_durable(self) -> None:
        durable, error = self._writer.collect()
        waiting = self._waiting
        while waiting and waiting[0][0] <= durable:
            _report(waiting.popleft()[1], None)
        if error:
            # Written or not, we cannot tell: an fdatasync that failed may have persisted part or all.
            self._failed = f"writing {self.path} failed: {os.strerror(error)}"
            while waiting:
                _report(waiting.popleft()[1], Uncertain(self._failed))
        if not waiting:
            for done in self._idle_waiters:
                if not done.done():
                    done.set_result(None)
            self._idle_waiters.clear()

    def close(self) -> None:
        """Finish what is submitted, stop the thread, close the file (blocks for at most one fdatasync)."""
        self._writer.stop()
        self._thread.join()
        self._loop.remove_reader(self._writer.fileno())
        self._on_durable()
        os.close(self._fd)
