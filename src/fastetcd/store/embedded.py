"""The embedded store: the log and snapshots in one SQLite database inside ``--data-dir``.

Durability comes from SQLite in WAL mode with ``synchronous=FULL``: a batch is one transaction, and
COMMIT returns only after the WAL is fsynced, so an acknowledged batch survives a crash of the process
or the machine, and a batch that was not acknowledged is either wholly there or wholly absent.

A store that no other process reads (``shared=False``: a single node, the default) does not wait for SQLite:
an append is acknowledged once it is fdatasynced in the commit log (``store/commit_log.py``), as etcd
acknowledges a write once it is in its WAL. SQLite then gets the entries in unsynced transactions, and is
synced whenever the commit log starts over; opening replays what the log holds beyond SQLite.

Every SQLite call runs on one dedicated thread. That keeps fsync off the event loop and keeps the calls
strictly in the order the engine made them, without locks: the thread's queue is the order
(``store/serial_thread.py``).

Several processes may share one data dir for high availability (``open(writer=False)``): the writer is
whoever holds the ``fastetcd.lock`` flock, the others read the same database (WAL mode lets readers in
other processes see every committed transaction while the writer goes on) and ``tail`` the log. Example:
a follower that applied up to index 40 calls ``tail(40)`` and gets 41..57; the writer then saves a
snapshot at 60, deleting the log up to 60 in the same transaction, and writes 61; a follower still at 57
now gets ``Behind`` (58..60 are gone), never 61 after 57.
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import functools
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from fastetcd import metrics
from fastetcd.store import commit_log
from fastetcd.store.base import (
    Behind,
    Corrupt,
    DurableCallback,
    Fenced,
    Recovered,
    StoreError,
    Uncertain,
    check_append,
)
from fastetcd.store.commit_log import CommitLog
from fastetcd.store.serial_thread import SerialThread

DB_FILE = "fastetcd.db"
LOCK_FILE = "fastetcd.lock"
# 1: log and snapshot keyed by a column named ``rev`` (it always held the log index); 2: named ``idx``.
SCHEMA_VERSION = 2

# One tail() reads at most this many entries, and stops early past TAIL_BYTES, to bound a catching-up
# follower's memory and the time it holds the event loop applying them.
TAIL_ENTRIES = 1024
TAIL_BYTES = 16 << 20
# How often claim() tries the writer lock again while the previous writer still gives it back.
_CLAIM_RETRY = 0.05

# A WAL that has been checkpointed is cut back to this size, so db size stays meaningful after a burst.
_WAL_SIZE_LIMIT = 64 * 1024 * 1024

# How long entries the commit log made durable may wait before SQLite gets them. SQLite inserting at every
# commit competes with the event loop for the GIL right when the loop answers; every 50 ms it is one
# transaction of many rows.
_FLUSH_DELAY = 0.05

# An append of at most this many entries is one INSERT statement (see _append); SQLite binds up to 32766
# parameters, and each distinct row count is one cached prepared statement.
_ONE_STATEMENT_ROWS = 64


@functools.cache
def _insert_rows(n: int) -> str:
    return "INSERT INTO log (idx, data) VALUES " + ", ".join(["(?, ?)"] * n)


# SQLite primary result codes (the low byte of the extended code).
_SQLITE_FULL = 13
_SQLITE_IOERR = 10
_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26

_log = logging.getLogger(__name__)


def _settle(fut: asyncio.Future, error: StoreError | None) -> None:
    if fut.done():  # its appender was cancelled
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)


T = TypeVar("T")


class _LockBusy(StoreError):
    """Another process (or another store in this one) holds the writer lock."""


class EmbeddedStore:
    """``store.base.Store`` on SQLite at ``DATA_DIR/fastetcd.db``.

    One process at a time may write a data dir: ``open`` takes an exclusive ``flock`` on
    ``DATA_DIR/fastetcd.lock`` and keeps it until ``close`` (or process death, which the kernel handles).
    ``open(writer=False)`` takes no lock; ``claim`` takes it, ``release`` gives it back.
    """

    def __init__(self, data_dir: str, *, busy_timeout: float = 5.0, shared: bool = True) -> None:
        self.data_dir = data_dir
        # False: no other process reads the database while this one writes (no followers), so the writer
        # may hold SQLite's lock for good: no file locking per transaction (8 fcntl calls a commit) and
        # the WAL index in memory instead of -shm. One 300-byte commit: p50 ~190 → ~150 µs here.
        self._shared = shared
        self.db_path = os.path.join(data_dir, DB_FILE)
        self._busy_timeout = busy_timeout
        self._thread: SerialThread | None = None
        self._conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        # Newest log index stored (log or snapshot); None while the store holds nothing at all.
        # Only touched on the SQLite thread.
        self._last_index: int | None = None
        self._snapshot_index = 0
        # Set once a COMMIT failed in a way that leaves its outcome unknown; see _append.
        self._broken: str | None = None
        self._free_bytes = 0  # free pages inside the database file, counted after each write transaction
        self._size = 0  # database + WAL bytes as of the SQLite thread's last write (commit log mode)
        self._recovered = False  # open() got as far as a usable database
        # The commit log (unshared writers only). Entries it made durable wait in _unsynced until the
        # SQLite thread inserts them; _flush_queued says an insert of them is already queued there.
        self._log: CommitLog | None = None
        self._log_generation = 0
        self._starting_over: asyncio.Future | None = None  # see append
        self._unsynced: collections.deque[tuple[int, bytes]] = collections.deque()
        self._flush_queued = False
        self._appended: int | None = None  # newest index handed to the commit log (event loop side)

    # ----------------------------------------------------------------- async API (event loop side)

    async def open(self, *, writer: bool = True) -> Recovered:
        if self._thread is not None:
            raise StoreError(f"store at {self.data_dir} is already open")
        self._thread = SerialThread("fastetcd-sqlite")
        try:
            recovered = await self._run(self._open, writer)
            if writer and not self._shared:
                self._log = CommitLog(self._log_path(), self._log_generation)
                self._appended = self._last_index
            return recovered
        except BaseException:
            await self._run_close()
            raise

    async def tail(self, after: int) -> list[tuple[int, bytes]]:
        return await self._run(self._tail, after)

    async def claim(self, after: int) -> list[tuple[int, bytes]]:
        deadline = time.monotonic() + self._busy_timeout
        while True:
            # A previous writer in this process or another gives the lock back when it demotes or dies;
            # retried from here, not blocked in the SQLite thread, so a cancelled claim leaves nothing behind.
            try:
                return await self._run(self._claim, after)
            except _LockBusy:
                if time.monotonic() >= deadline:
                    raise StoreError(f"data dir {self.data_dir} is still written by another writer") from None
            await asyncio.sleep(_CLAIM_RETRY)

    async def release(self) -> None:
        await self._run(self._release_lock)

    async def append(self, entries: list[tuple[int, bytes]]) -> None:
        if not entries:
            return
        log = self._log
        if log is None:
            await self._run(self._append, entries)
            return
        while self._starting_over is not None:
            await asyncio.shield(self._starting_over)
        if self._broken is not None:
            self._check_usable()
        check_append(entries, self._appended)
        data = log.encode(entries)
        if log.fits(data):
            durable = self._submit(log, data, entries, None)
        else:
            # A task, so that a caller cancelled half-way cannot leave SQLite on the next generation while
            # the log is still on the old one; later appends wait for it (entries must keep their order).
            task = self._starting_over = asyncio.ensure_future(self._start_over(log, entries))
            task.add_done_callback(self._started_over)
            durable = await asyncio.shield(task)
        if durable is not None:
            await durable

    def append_nowait(self, entries: list[tuple[int, bytes]], on_durable: DurableCallback) -> bool:
        """``append`` without a coroutine, when the commit log takes the entries as they are (it is open,
        has room and is not starting over): ``on_durable`` is called from the event loop with None once
        they are durable, or with the StoreError. False: nothing was done, use ``append``."""
        log = self._log
        if log is None or self._starting_over is not None or self._broken is not None:
            return False
        check_append(entries, self._appended)
        data = log.encode(entries)
        if not log.fits(data):
            return False
        self._submit(log, data, entries, on_durable)
        return True

    def _submit(
        self,
        log: CommitLog,
        data: bytes,
        entries: list[tuple[int, bytes]],
        on_durable: DurableCallback | None,
    ) -> asyncio.Future | None:
        """Hand ``data`` to the log; reports to ``on_durable``, or to the future returned when it is None."""
        durable = None
        report = on_durable
        if report is None:
            durable = asyncio.get_running_loop().create_future()
            report = functools.partial(_settle, durable)
        t0 = time.perf_counter()

        def done(error: StoreError | None) -> None:
            report(error)
            if error is None:
                metrics.WAL_FSYNC.observe(time.perf_counter() - t0)

        log.append(data, done)
        self._appended = entries[-1][0]
        self._unsynced.extend(entries)
        if not self._flush_queued:
            self._flush_queued = True
            asyncio.get_running_loop().call_later(_FLUSH_DELAY, self._post_flush)
        return durable

    async def _start_over(self, log: CommitLog, entries: list[tuple[int, bytes]]) -> asyncio.Future | None:
        """The log is full: SQLite takes and syncs everything so far, then the log starts over at offset 0
        and takes ``entries``; an append bigger than the whole log goes to SQLite (synced) instead."""
        await log.idle()
        if len(log.encode(entries)) > commit_log.CAPACITY:
            await self._run(self._append, entries)  # behind every flush queued before it
            self._appended = entries[-1][0]
            return None
        await self._run(self._begin_generation, log.generation + 1)
        log.restart(log.generation + 1)
        return self._submit(log, log.encode(entries), entries, None)

    def _started_over(self, task: asyncio.Future) -> None:
        self._starting_over = None
        if not task.cancelled():
            task.exception()  # retrieved here: the caller may have been cancelled and never see it

    async def compact(self, rev: int) -> None:
        await self._run(self._compact, rev)

    async def save_snapshot(self, index: int, chunks: Iterable[bytes]) -> None:
        # Consumed here, on the caller's thread, so a generator over live engine state is read while
        # the engine cannot change underneath it; only the finished chunks cross to the SQLite thread.
        chunk_list = list(chunks)
        await self._run(self._save_snapshot, index, chunk_list)

    async def install_snapshot(self, index: int, state: bytes, compact_rev: int) -> None:
        """Make an empty store start from ``state`` at log index ``index`` (a restore)."""
        await self._run(self._install_snapshot, index, state, compact_rev)

    def size(self) -> int:
        if self._log is not None:
            # Only the SQLite thread changes the files; it counts after each change. Two stat calls per
            # commit were 5 µs of a lone put's event loop time.
            return self._size
        return self._stat_size()

    def _stat_size(self) -> int:
        total = 0
        for path in (self.db_path, self.db_path + "-wal"):
            try:
                total += os.stat(path).st_size
            except FileNotFoundError:
                pass
        return total

    def size_in_use(self) -> int:
        # SQLite keeps freed pages in the file for reuse; they are what VACUUM gives back.
        return max(self.size() - self._free_bytes, 0)

    async def defragment(self) -> None:
        await self._run(self._defragment)

    async def close(self) -> None:
        if self._thread is not None:
            await self._run_close()

    def _post_flush(self) -> None:
        if self._thread is not None and self._unsynced:
            self._thread.post(self._flush)

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        if self._thread is None:
            raise StoreError(f"store at {self.data_dir} is not open")
        # Whatever runs on the SQLite thread sees every entry the commit log acknowledged before it.
        self._post_flush()
        # A caller cancelled does not stop its call: the SQLite thread runs it anyway, in order.
        return await self._thread.run(fn, *args)

    async def _run_close(self) -> None:
        thread = self._thread
        assert thread is not None
        if self._log is not None:
            self._log.close()
            self._log = None
        try:
            await thread.run(self._close)
        finally:
            thread.stop()
            self._thread = None
            self._release_lock()

    # ----------------------------------------------------------------- SQLite thread

    def _open(self, writer: bool = True) -> Recovered:
        self._broken = None
        self._prepare_dir()
        if writer:
            self._take_lock()
        try:
            conn = sqlite3.connect(self.db_path, timeout=self._busy_timeout, isolation_level=None)
        except sqlite3.Error as e:
            raise StoreError(f"data dir {self.data_dir}: cannot open {DB_FILE}: {e}") from e
        self._conn = conn
        try:
            if writer and not self._shared:
                conn.execute("PRAGMA locking_mode=EXCLUSIVE")
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                # Still durable with synchronous=FULL (rollback journal), only slower.
                _log.warning("SQLite WAL mode unavailable, using rollback journal",
                             extra={"data-dir": self.data_dir, "journal-mode": mode})
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute(f"PRAGMA journal_size_limit={_WAL_SIZE_LIMIT}")
            self._create_schema(conn)
            if writer:
                self._replay_log(conn)
                return self._recover(conn)
            # The writer goes on meanwhile: one read transaction makes the snapshot and the log agree.
            conn.execute("BEGIN")
            try:
                return self._recover(conn)
            finally:
                conn.execute("COMMIT")
        except sqlite3.Error as e:
            raise StoreError(f"data dir {self.data_dir}: {DB_FILE} is unusable: {e}") from e

    def _prepare_dir(self) -> None:
        try:
            # etcd creates its data dir owner-only; so do we.
            os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create data dir {self.data_dir}: {e.strerror or e}") from e
        if not os.path.isdir(self.data_dir):
            raise StoreError(f"data dir {self.data_dir} is not a directory")
        member = os.path.join(self.data_dir, "member")
        if os.path.exists(os.path.join(member, "snap", "db")) or os.path.isdir(os.path.join(member, "wal")):
            # etcd's own data: starting on it would silently begin an empty store beside it
            raise StoreError(
                f"data dir {self.data_dir} is an etcd data dir; import it with: fastetcd import "
                f"{os.path.join(member, 'snap', 'db')} --data-dir NEWDIR"
            )
        if not os.access(self.data_dir, os.W_OK | os.X_OK):
            raise StoreError(f"data dir {self.data_dir} is not writable")

    def _take_lock(self) -> None:
        path = os.path.join(self.data_dir, LOCK_FILE)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise StoreError(f"data dir {self.data_dir}: cannot create {LOCK_FILE}: {e.strerror or e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _LockBusy(f"data dir {self.data_dir} is in use by another process") from None
        except OSError as e:
            os.close(fd)
            raise StoreError(f"data dir {self.data_dir}: cannot lock {LOCK_FILE}: {e.strerror or e}") from e
        # The pid is only for a human wondering who holds the dir; the flock is the lock.
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _tail(self, after: int) -> list[tuple[int, bytes]]:
        # Not _check_usable: an append whose outcome is unknown breaks writing, and reading the log is
        # exactly how this node learns whether that append landed.
        conn = self._conn
        if conn is None:
            raise StoreError(f"store at {self.data_dir} is not open")
        try:
            # One read transaction: the snapshot index and the log rows are of the same commit.
            conn.execute("BEGIN")
            try:
                return self._read_after(conn, after, TAIL_ENTRIES, TAIL_BYTES)
            finally:
                conn.execute("COMMIT")
        except sqlite3.Error as e:
            raise StoreError(f"reading the log after index {after} failed: {e}") from e

    def _read_after(
        self, conn: sqlite3.Connection, after: int, limit: int, max_bytes: int
    ) -> list[tuple[int, bytes]]:
        """Entries after ``after`` (at most ``limit``, stopping once past ``max_bytes``), or Behind."""
        row = conn.execute("SELECT value FROM meta WHERE key = 'snapshot_index'").fetchone()
        snapshot_index = int(row[0]) if row else 0
        if snapshot_index > after:
            # A snapshot deletes the log up to its index in its own transaction: those entries are gone.
            raise Behind(f"log index {after + 1} was replaced by the snapshot at {snapshot_index}")
        out: list[tuple[int, bytes]] = []
        size = 0
        cur = conn.execute("SELECT idx, data FROM log WHERE idx > ? ORDER BY idx LIMIT ?", (after, limit))
        try:
            for idx, data in cur:
                out.append((idx, data))
                size += len(data)
                if size > max_bytes:
                    break
        finally:
            cur.close()
        if out:
            if out[0][0] != after + 1:
                raise Behind(f"log index {after + 1} is gone; the log now starts at {out[0][0]}")
            check_append(out, after)  # a hole inside would silently become a different state
            self._last_index = out[-1][0]
        return out

    def _claim(self, after: int) -> list[tuple[int, bytes]]:
        conn = self._check_usable()
        if self._lock_fd is None:
            self._take_lock()
        try:
            self._replay_log(conn)
            conn.execute("BEGIN")
            try:
                entries = self._read_after(conn, after, -1, 1 << 62)
                row = conn.execute("SELECT max(idx) FROM log").fetchone()
                snap = conn.execute("SELECT value FROM meta WHERE key = 'snapshot_index'").fetchone()
                self._snapshot_index = int(snap[0]) if snap else 0
            finally:
                conn.execute("COMMIT")
        except BaseException as e:
            self._release_lock()
            if isinstance(e, sqlite3.Error):
                raise StoreError(f"claiming the log after index {after} failed: {e}") from e
            raise
        last = row[0] if row[0] is not None else self._snapshot_index
        self._last_index = last or None
        return entries

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the only descriptor drops the flock
            self._lock_fd = None

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value)")
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            if row is not None and row[0] == 1:
                self._migrate_from_1(conn)
                row = (SCHEMA_VERSION,)
            conn.execute("CREATE TABLE IF NOT EXISTS log (idx INTEGER PRIMARY KEY, data BLOB NOT NULL)")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS snapshot"
                " (idx INTEGER NOT NULL, chunk INTEGER NOT NULL, data BLOB NOT NULL,"
                " PRIMARY KEY (idx, chunk))"
            )
            if row is None:
                conn.execute("INSERT INTO meta (key, value) VALUES ('schema', ?)", (SCHEMA_VERSION,))
            elif row[0] != SCHEMA_VERSION:
                raise StoreError(
                    f"data dir {self.data_dir}: {DB_FILE} has schema version {row[0]},"
                    f" this fastetcd reads version {SCHEMA_VERSION}"
                )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    @staticmethod
    def _migrate_from_1(conn: sqlite3.Connection) -> None:
        """Schema 1 called the log index ``rev``; the data is the same, only names change."""
        conn.execute("ALTER TABLE log RENAME COLUMN rev TO idx")
        conn.execute("ALTER TABLE snapshot RENAME COLUMN rev TO idx")
        conn.execute("UPDATE meta SET key = 'snapshot_index' WHERE key = 'snapshot_rev'")
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (SCHEMA_VERSION,))
        _log.info("migrated embedded store schema", extra={"from": 1, "to": SCHEMA_VERSION})

    def _recover(self, conn: sqlite3.Connection) -> Recovered:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        snapshot_index = int(meta.get("snapshot_index", 0))
        compact_rev = int(meta.get("compact_rev", -1))
        snapshot: bytes | None = None
        if snapshot_index:
            parts = conn.execute(
                "SELECT data FROM snapshot WHERE idx = ? ORDER BY chunk", (snapshot_index,)
            ).fetchall()
            snapshot = b"".join(p[0] for p in parts)
        entries: list[tuple[int, bytes]] = conn.execute(
            "SELECT idx, data FROM log WHERE idx > ? ORDER BY idx", (snapshot_index,)
        ).fetchall()

        # The engine replays these blindly, so a hole here would silently become a different state.
        if entries:
            try:
                check_append(entries, snapshot_index or None)
            except StoreError as e:
                raise StoreError(
                    f"data dir {self.data_dir}: log is not contiguous ({e}; snapshot at {snapshot_index})"
                ) from None

        self._last_index = entries[-1][0] if entries else (snapshot_index or None)
        self._snapshot_index = snapshot_index
        self._count_free_pages(conn)
        self._recovered = True
        _log.info(
            "opened embedded store",
            extra={
                "data-dir": self.data_dir,
                "snapshot-index": snapshot_index,
                "compact-revision": compact_rev,
                "log-entries": len(entries),
                "last-index": self._last_index or 0,
            },
        )
        return Recovered(
            snapshot_index=snapshot_index, snapshot=snapshot, compact_rev=compact_rev, entries=entries
        )

    def _log_path(self) -> str:
        return os.path.join(self.data_dir, commit_log.LOG_FILE)

    def _replay_log(self, conn: sqlite3.Connection) -> None:
        """Put into SQLite, durably, what the commit log made durable beyond it; then start the log's next
        generation. Every writer does this first, whatever its mode: the last one may have had a log."""
        row = conn.execute("SELECT value FROM meta WHERE key = 'log_generation'").fetchone()
        generation = int(row[0]) if row else 0
        path = self._log_path()
        if not self._shared:
            commit_log.create(path)
        row = conn.execute("SELECT max(idx) FROM log").fetchone()
        snap = conn.execute("SELECT value FROM meta WHERE key = 'snapshot_index'").fetchone()
        stored = row[0] if row[0] is not None else (int(snap[0]) if snap else None)
        entries = [e for e in commit_log.read(path, generation) if e[0] > (stored or 0)]
        if entries:
            try:
                check_append(entries, stored)
            except StoreError as e:
                raise Corrupt(
                    f"data dir {self.data_dir}: {commit_log.LOG_FILE} does not continue {DB_FILE} ({e})"
                ) from None
            self._unsynced.extend(entries)
            _log.info("replaying commit log", extra={"data-dir": self.data_dir, "entries": len(entries),
                                                    "last-index": entries[-1][0]})
        self._begin_generation(generation + 1)

    def _flush(self) -> None:
        """Insert what the commit log made durable into SQLite, unsynced: the log holds it until synced."""
        self._flush_queued = False  # before taking entries: any appended after this get a flush of their own
        if self._broken is not None or not self._unsynced or self._conn is None:
            return
        conn = self._conn
        rows = []
        pop = self._unsynced.popleft
        while self._unsynced:
            rows.append(pop())
        t0 = time.perf_counter()
        try:
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany("INSERT INTO log (idx, data) VALUES (?, ?)", rows)
            conn.execute("COMMIT")
            conn.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error as e:
            # Acknowledged entries are safe in the log, which must not start over now: refuse more writes,
            # and the next open replays the log.
            self._rollback(conn)
            self._broken = f"copying the commit log into {DB_FILE} failed: {e}"
            _log.error("copying the commit log into SQLite failed", extra={"error": str(e)})
            return
        metrics.BACKEND_COMMIT.observe(time.perf_counter() - t0)
        self._last_index = rows[-1][0]
        if self._free_bytes:
            self._count_free_pages(conn)
        else:
            self._size = self._stat_size()

    def _begin_generation(self, generation: int) -> None:
        """Make SQLite hold everything the commit log holds, durably, and record the log's next generation."""
        self._flush()
        # A synced commit syncs the WAL, and with it every unsynced commit before it.
        with self._transaction(f"starting commit log generation {generation}") as conn:
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('log_generation', ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (generation,),
            )
        self._log_generation = generation

    def _check_usable(self) -> sqlite3.Connection:
        if self._broken is not None:
            raise StoreError(f"store at {self.data_dir} failed earlier ({self._broken}); restart to recover")
        assert self._conn is not None
        return self._conn

    def _check_writer(self) -> sqlite3.Connection:
        conn = self._check_usable()
        if self._lock_fd is None:
            raise Fenced(f"store at {self.data_dir} is open as a follower: it does not write")
        return conn

    def _append(self, entries: list[tuple[int, bytes]]) -> None:
        conn = self._check_writer()
        check_append(entries, self._last_index)
        first, last = entries[0][0], entries[-1][0]
        t0 = time.perf_counter()
        try:
            if len(entries) <= _ONE_STATEMENT_ROWS:
                # One statement outside a transaction is its own transaction: one step, whose commit
                # fsyncs. Against BEGIN, INSERT, COMMIT it saves this thread two waits for the GIL,
                # which the event loop holds whenever it is busy: at 16 clients put 4,003 → 5,651 ops/s
                # together with SerialThread (bench/RESULTS.md, T1 entries of 15:34 and 17:46).
                conn.execute(_insert_rows(len(entries)), [x for entry in entries for x in entry])
            else:
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany("INSERT INTO log (idx, data) VALUES (?, ?)", entries)
                conn.execute("COMMIT")
        except BaseException as e:
            self._rollback(conn)
            if not isinstance(e, sqlite3.Error):
                raise
            code = getattr(e, "sqlite_errorcode", 0) & 0xFF
            if code in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
                self._broken = f"database damaged: {e}"
                raise Corrupt(f"append of log indexes {first}..{last}: {DB_FILE} is damaged: {e}") from e
            if code == _SQLITE_IOERR:
                # An I/O error while committing (a failed fsync, typically) may leave a complete commit
                # frame in the WAL that recovery would honour. We cannot tell, so refuse further writes:
                # reusing these indexes for other data could make disk and memory disagree after a restart.
                # (The single INSERT writes and commits in one step, so any I/O error counts.)
                self._broken = f"I/O error during commit: {e}"
                raise Uncertain(f"append of log indexes {first}..{last} has unknown outcome: {e}") from e
            raise StoreError(f"append of log indexes {first}..{last} failed: {e}") from e
        took = time.perf_counter() - t0
        # One commit is both the log's fsync and the backend's commit: what etcd reports twice.
        metrics.WAL_FSYNC.observe(took)
        metrics.BACKEND_COMMIT.observe(took)
        self._last_index = last
        if self._free_bytes:  # appends only take free pages, never free any: none left stays none
            self._count_free_pages(conn)

    def _rollback(self, conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error as e:
                self._broken = f"rollback failed: {e}"

    @contextmanager
    def _transaction(self, what: str) -> Iterator[sqlite3.Connection]:
        """One write transaction; any SQLite error rolls it back and becomes ``StoreError(what failed)``."""
        conn = self._check_writer()
        try:
            conn.execute("BEGIN IMMEDIATE")
            yield conn
            conn.execute("COMMIT")
        except BaseException as e:
            self._rollback(conn)
            if not isinstance(e, sqlite3.Error):
                raise
            raise StoreError(f"{what} failed: {e}") from e

    def _compact(self, rev: int) -> None:
        with self._transaction(f"persisting compaction at revision {rev}") as conn:
            # max() keeps compact_rev monotonic even if a stale request arrives late.
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('compact_rev', ?)"
                " ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value)",
                (rev,),
            )

    def _save_snapshot(self, index: int, chunks: list[bytes]) -> None:
        self._check_writer()
        last = self._last_index or 0
        if index > last:
            raise StoreError(f"snapshot at index {index} is ahead of the stored log ({last})")
        if index < self._snapshot_index:
            raise StoreError(f"snapshot at index {index} is older than the stored ({self._snapshot_index})")
        with self._transaction(f"saving snapshot at index {index}") as conn:
            conn.execute("DELETE FROM snapshot WHERE idx = ?", (index,))
            conn.executemany(
                "INSERT INTO snapshot (idx, chunk, data) VALUES (?, ?, ?)",
                ((index, i, c) for i, c in enumerate(chunks)),
            )
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('snapshot_index', ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (index,),
            )
            conn.execute("DELETE FROM snapshot WHERE idx < ?", (index,))
            conn.execute("DELETE FROM log WHERE idx <= ?", (index,))
        self._snapshot_index = index
        self._count_free_pages(self._check_usable())

    def _defragment(self) -> None:
        conn = self._check_usable()
        try:
            conn.execute("VACUUM")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as e:
            raise StoreError(f"defragmenting {DB_FILE} failed: {e}") from e
        self._count_free_pages(conn)

    def _count_free_pages(self, conn: sqlite3.Connection) -> None:
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        self._free_bytes = free * conn.execute("PRAGMA page_size").fetchone()[0]
        self._size = self._stat_size()

    def _install_snapshot(self, index: int, state: bytes, compact_rev: int) -> None:
        if self._last_index is not None:
            raise StoreError(f"data dir {self.data_dir} is not empty")
        with self._transaction(f"installing a snapshot at index {index}") as conn:
            conn.execute("INSERT INTO snapshot (idx, chunk, data) VALUES (?, 0, ?)", (index, state))
            conn.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?)",
                [("snapshot_index", index), ("compact_rev", compact_rev)],
            )
        self._last_index = self._snapshot_index = index

    def _close(self) -> None:
        self._flush()
        conn, self._conn = self._conn, None
        # A follower leaves the WAL to the writer: a checkpoint here would wait on the writer's transactions.
        if conn is not None and self._recovered and self._lock_fd is not None:
            try:
                # Folding the WAL back in leaves a single self-contained file behind.
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as e:
                _log.warning("checkpoint on close failed", extra={"data-dir": self.data_dir, "error": str(e)})
        if conn is not None:
            conn.close()
        self._recovered = False
