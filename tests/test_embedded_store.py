"""The embedded SQLite store: what goes in comes back, across close, snapshots and SIGKILL."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, closing
from typing import Any

import pytest

from fastetcd.store import embedded
from fastetcd.store.base import Behind, Fenced, Recovered, StoreError
from fastetcd.store.embedded import DB_FILE, EmbeddedStore
from fastetcd.testing import fastetcd_env


def run(coro):
    return asyncio.run(coro)


def recs(first: int, last: int, tag: bytes = b"v") -> list[tuple[int, bytes]]:
    return [(r, tag + str(r).encode()) for r in range(first, last + 1)]


async def reopen(path: str, shared: bool = True) -> Recovered:
    s = EmbeddedStore(path, shared=shared)
    try:
        return await s.open()
    finally:
        await s.close()


@asynccontextmanager
async def opened(path: str, **kw: Any) -> AsyncIterator[EmbeddedStore]:
    """An open store on `path`, closed on the way out."""
    s = EmbeddedStore(path, **kw)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture(params=[True, False], ids=["shared", "commit-log"])
def shared(request) -> bool:
    """Both ways the store writes: SQLite synced per append, or the commit log first (a single node)."""
    return request.param


def sql(path: str, query: str) -> list[tuple[Any, ...]]:
    """Rows of `query` on the store's database, read with a connection of its own."""
    with closing(sqlite3.connect(os.path.join(path, DB_FILE))) as conn:
        return conn.execute(query).fetchall()


def test_fresh_store_is_empty_and_round_trips(tmp_path, shared):
    d = str(tmp_path / "data")

    async def body():
        s = EmbeddedStore(d, shared=shared)
        got = await s.open()
        assert got == Recovered(snapshot_index=0, snapshot=None, compact_rev=-1, entries=[])
        await s.append(recs(2, 4))
        await s.append([])  # nothing to do, must not count as a revision
        await s.append([(5, b"\x00" * 100_000), (6, b"")])
        await s.close()
        return await reopen(d, shared=shared)

    got = run(body())
    assert got.snapshot is None and got.snapshot_index == 0
    assert got.entries == recs(2, 4) + [(5, b"\x00" * 100_000), (6, b"")]
    assert os.stat(d).st_mode & 0o777 == 0o700


def test_reopen_same_instance_and_append_continues(tmp_path, shared):
    d = str(tmp_path)

    async def body():
        s = EmbeddedStore(d, shared=shared)
        await s.open()
        await s.append(recs(2, 3))
        await s.close()
        got = await s.open()
        await s.append(recs(4, 5))  # contiguity is checked against what was recovered
        with pytest.raises(StoreError):
            await s.append(recs(7, 7))
        await s.close()
        return got, await reopen(d, shared=shared)

    first, second = run(body())
    assert first.entries == recs(2, 3)
    assert second.entries == recs(2, 5)


def test_wal_mode_and_size(tmp_path):
    d = str(tmp_path)

    async def body():
        async with opened(d) as s:
            before = s.size()
            await s.append([(2, os.urandom(1_000_000))])
            return before, s.size()

    before, after = run(body())
    assert 0 < before
    assert after >= before + 1_000_000
    assert sql(d, "PRAGMA journal_mode") == [("wal",)]


def test_unshared_writer_keeps_other_connections_out_until_closed(tmp_path):
    # shared=False (no followers): SQLite's lock is held for good, so no commit pays for file locks;
    # the price is that nobody else may read the database meanwhile, and that must hold.
    d = str(tmp_path)

    async def body():
        async with opened(d, shared=False) as s:
            await s.append(recs(2, 3))
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                sql(d, "SELECT count(*) FROM log")
            assert not os.path.exists(os.path.join(d, DB_FILE + "-shm"))
            await s.append(recs(4, 4))
        return sql(d, "SELECT idx FROM log ORDER BY idx")

    assert run(body()) == [(2,), (3,), (4,)]


def test_snapshot_drops_older_log_and_keeps_records_after_it(tmp_path, shared):
    d = str(tmp_path)

    async def body():
        async with opened(d, shared=shared) as s:
            await s.append(recs(2, 10))
            await s.save_snapshot(7, (c for c in [b"ab", b"cd", b"ef"]))
            await s.append(recs(11, 12))
        first = await reopen(d, shared=shared)

        async with opened(d, shared=shared) as s:
            with pytest.raises(StoreError, match="older"):
                await s.save_snapshot(5, [b"old"])
            with pytest.raises(StoreError, match="ahead"):
                await s.save_snapshot(13, [b"future"])
            await s.save_snapshot(12, [b"X" * 10, b"Y"])
        return first, await reopen(d, shared=shared)

    first, second = run(body())
    assert first.snapshot_index == 7
    assert first.snapshot == b"abcdef"
    assert first.entries == recs(8, 12)
    assert second.snapshot_index == 12
    assert second.snapshot == b"X" * 10 + b"Y"
    assert second.entries == []

    assert sql(d, "SELECT DISTINCT idx FROM snapshot") == [(12,)]
    assert sql(d, "SELECT count(*) FROM log") == [(0,)]


def test_snapshot_with_no_chunks_and_append_after_it(tmp_path, shared):
    d = str(tmp_path)

    async def body():
        async with opened(d, shared=shared) as s:
            await s.append(recs(2, 3))
            await s.save_snapshot(3, [])
        s = EmbeddedStore(d, shared=shared)
        got = await s.open()
        with pytest.raises(StoreError):
            await s.append(recs(5, 5))  # a gap after the snapshot
        await s.append(recs(4, 4))
        await s.close()
        return got, await reopen(d, shared=shared)

    got, after = run(body())
    assert (got.snapshot_index, got.snapshot, got.entries) == (3, b"", [])
    assert (after.snapshot_index, after.entries) == (3, recs(4, 4))


def test_compact_rev_persists_and_never_goes_back(tmp_path, shared):
    d = str(tmp_path)

    async def body():
        async with opened(d, shared=shared) as s:
            await s.append(recs(2, 20))
            await s.compact(9)
        first = await reopen(d, shared=shared)
        async with opened(d, shared=shared) as s:
            await s.compact(5)
            await s.compact(15)
            await s.compact(12)
        return first, await reopen(d, shared=shared)

    first, second = run(body())
    assert first.compact_rev == 9
    assert second.compact_rev == 15
    assert second.entries == recs(2, 20)  # compaction is the core's business; the log stays


@pytest.mark.parametrize(
    "bad",
    [
        recs(6, 7),  # gap
        recs(4, 5),  # overlap
        recs(5, 5) + recs(5, 5),  # duplicate inside the batch
        [(5, b"a"), (7, b"b")],  # hole inside the batch
        [(6, b"a"), (5, b"b")],  # out of order
    ],
)
def test_contiguity_guard_rejects_and_leaves_store_unchanged(tmp_path, bad, shared):
    d = str(tmp_path)

    async def body():
        async with opened(d, shared=shared) as s:
            await s.append(recs(2, 4))
            with pytest.raises(StoreError):
                await s.append(bad)
            await s.append(recs(5, 6))
        return await reopen(d, shared=shared)

    assert run(body()).entries == recs(2, 6)


def test_sqlite_error_mid_batch_rolls_back_the_whole_batch(tmp_path):
    d = str(tmp_path)

    async def body():
        async with opened(d) as s:
            await s.append(recs(2, 3))
            # The second row cannot be bound, after the first was already inserted in the transaction.
            with pytest.raises(StoreError, match="failed"):
                await s.append([(4, b"ok"), (5, {"not": "bytes"})])  # type: ignore[list-item]
            await s.append(recs(4, 5, b"again"))
        return await reopen(d)

    assert run(body()).entries == recs(2, 3) + recs(4, 5, b"again")


def test_busy_database_fails_append_cleanly(tmp_path):
    d = str(tmp_path)

    async def body():
        async with opened(d, busy_timeout=0.2) as s:
            await s.append(recs(2, 2))
            # Another SQLite user (a backup tool, say) holding the write lock makes the append fail, not
            # hang.
            with closing(sqlite3.connect(os.path.join(d, DB_FILE), isolation_level=None)) as other:
                other.execute("BEGIN IMMEDIATE")
                try:
                    with pytest.raises(StoreError, match="locked"):
                        await s.append(recs(3, 3))
                finally:
                    other.execute("ROLLBACK")
            await s.append(recs(3, 3, b"later"))
        return await reopen(d)

    assert run(body()).entries == recs(2, 2) + recs(3, 3, b"later")


def _write_schema_1_db(path: str) -> None:
    """A data dir as fastetcd 0.1.0 wrote it: log index in a column named ``rev``, schema 1."""
    os.makedirs(path, mode=0o700)
    conn = sqlite3.connect(os.path.join(path, DB_FILE), isolation_level=None)
    conn.execute("CREATE TABLE log (rev INTEGER PRIMARY KEY, data BLOB NOT NULL)")
    conn.execute(
        "CREATE TABLE snapshot (rev INTEGER NOT NULL, chunk INTEGER NOT NULL, data BLOB NOT NULL,"
        " PRIMARY KEY (rev, chunk))"
    )
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value)")
    conn.executemany(
        "INSERT INTO meta (key, value) VALUES (?, ?)",
        [("schema", 1), ("snapshot_rev", 3), ("compact_rev", 2)],
    )
    conn.executemany("INSERT INTO snapshot (rev, chunk, data) VALUES (3, ?, ?)", [(0, b"ab"), (1, b"cd")])
    conn.executemany("INSERT INTO log (rev, data) VALUES (?, ?)", recs(4, 6))
    conn.close()


def test_schema_1_data_dir_is_migrated_in_place(tmp_path):
    d = str(tmp_path / "data")
    _write_schema_1_db(d)

    async def body():
        s = EmbeddedStore(d)
        got = await s.open()
        await s.append(recs(7, 7))
        await s.save_snapshot(5, [b"snap"])
        await s.close()
        return got, await reopen(d)

    got, again = run(body())
    assert (got.snapshot_index, got.snapshot, got.compact_rev, got.entries) == (3, b"abcd", 2, recs(4, 6))
    assert (again.snapshot_index, again.snapshot, again.entries) == (5, b"snap", recs(6, 7))
    assert sql(d, "SELECT value FROM meta WHERE key = 'schema'") == [(2,)]
    assert [r[1] for r in sql(d, "PRAGMA table_info(log)")] == ["idx", "data"]


def test_unknown_schema_version_is_refused(tmp_path):
    d = str(tmp_path / "data")
    _write_schema_1_db(d)
    conn = sqlite3.connect(os.path.join(d, DB_FILE), isolation_level=None)
    conn.execute("UPDATE meta SET value = 99 WHERE key = 'schema'")
    conn.close()
    with pytest.raises(StoreError, match="schema version 99"):
        run(reopen(d))


def test_calls_on_closed_store_raise(tmp_path):
    async def body():
        s = EmbeddedStore(str(tmp_path))
        with pytest.raises(StoreError, match="not open"):
            await s.append(recs(2, 2))
        await s.open()
        with pytest.raises(StoreError, match="already open"):
            await s.open()
        await s.close()
        await s.close()  # idempotent
        with pytest.raises(StoreError, match="not open"):
            await s.compact(1)

    run(body())


def test_second_store_on_same_dir_is_refused_until_first_closes(tmp_path):
    d = str(tmp_path)

    async def body():
        a = EmbeddedStore(d)
        await a.open()
        b = EmbeddedStore(d)
        with pytest.raises(StoreError, match=f"data dir {d} is in use by another process"):
            await b.open()
        await a.close()
        await b.open()
        await b.close()

    run(body())


CHILD_HOLDS_LOCK = textwrap.dedent(
    """
    import asyncio, sys
    from fastetcd.store.embedded import EmbeddedStore

    async def main():
        s = EmbeddedStore(sys.argv[1])
        await s.open()
        print("ready", flush=True)
        sys.stdin.read()

    asyncio.run(main())
    """
)


def test_lock_is_held_across_processes_and_released_by_death(tmp_path):
    d = str(tmp_path)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD_HOLDS_LOCK, d],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=fastetcd_env(),
    )
    try:
        assert child.stdout.readline().strip() == "ready"
        with pytest.raises(StoreError, match="in use by another process"):
            run(reopen(d))
    finally:
        child.kill()
        child.wait(timeout=10)
    assert run(reopen(d)).entries == []


@pytest.mark.parametrize("make_bad", ["file", "under_file"])
def test_unusable_data_dir_gives_clear_error(tmp_path, make_bad):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a dir")
    d = str(blocker) if make_bad == "file" else str(blocker / "sub")
    with pytest.raises(StoreError, match="data dir") as info:
        run(reopen(d))
    assert d in str(info.value)


def test_foreign_file_as_database_gives_clear_error(tmp_path):
    (tmp_path / DB_FILE).write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="unusable"):
        run(reopen(str(tmp_path)))
    # The failed open must not keep the lock.
    (tmp_path / DB_FILE).unlink()
    assert run(reopen(str(tmp_path))).entries == []


CRASH_CHILD = textwrap.dedent(
    """
    import asyncio, hashlib, sys
    from fastetcd.store.embedded import EmbeddedStore

    def payload(index):
        n = 100 + (index * 7919) % 5000
        seed = hashlib.sha256(str(index).encode()).digest()
        return (seed * (n // 32 + 1))[:n]

    async def main():
        s = EmbeddedStore(sys.argv[1], shared=sys.argv[2] == "shared")
        got = await s.open()
        last = got.entries[-1][0] if got.entries else 1
        print("recovered", last, flush=True)
        index = last + 1
        while True:
            batch = [(r, payload(r)) for r in range(index, index + 1 + index % 37)]
            await s.append(batch)
            index = batch[-1][0] + 1
            print(batch[-1][0], flush=True)  # only after append returned: this index is acknowledged

    asyncio.run(main())
    """
)


def _payload(index: int) -> bytes:
    import hashlib

    n = 100 + (index * 7919) % 5000
    seed = hashlib.sha256(str(index).encode()).digest()
    return (seed * (n // 32 + 1))[:n]


@pytest.mark.parametrize("sharing", ["shared", "exclusive"])
def test_sigkill_mid_append_loses_no_acknowledged_revision(tmp_path, sharing):
    d = str(tmp_path / "data")
    rng = random.Random(1234)
    acked = 1
    for _ in range(4):
        child = subprocess.Popen(
            [sys.executable, "-c", CRASH_CHILD, d, sharing],
            stdout=subprocess.PIPE,
            text=True,
            env=fastetcd_env(),
        )
        try:
            first = child.stdout.readline().split()
            assert first[0] == "recovered", first
            # Everything acknowledged before the previous kill is back (more may be: a batch can commit
            # after its ack was lost with the process).
            assert int(first[1]) >= acked
            for _ in range(rng.randint(20, 120)):
                line = child.stdout.readline()
                assert line, "child died on its own"
                acked = max(acked, int(line))
            child.send_signal(signal.SIGKILL)
            rest, _ = child.communicate(timeout=10)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        assert child.returncode == -signal.SIGKILL
        for line in rest.split():
            acked = max(acked, int(line))

    got = run(reopen(d))
    revs = [r for r, _ in got.entries]
    assert revs[0] == 2
    assert revs == list(range(2, revs[-1] + 1))
    assert revs[-1] >= acked
    torn = [r for r, data in got.entries if data != _payload(r)]
    assert torn == []


# ------------------------------------------------------------------ followers (several processes, one dir)


def test_follower_tails_what_the_writer_commits_without_taking_the_lock(tmp_path):
    d = str(tmp_path / "data")

    async def body():
        async with opened(d) as w:
            await w.append(recs(1, 3))
            f = EmbeddedStore(d)
            rec = await f.open(writer=False)  # the writer holds the lock: a follower needs none
            try:
                assert rec.entries == recs(1, 3)
                assert await f.tail(3) == []
                await w.append(recs(4, 6))
                assert await f.tail(3) == recs(4, 6)
                assert await f.tail(5) == recs(6, 6)
                # A follower does not write: its appends are fenced, not silently interleaved.
                with pytest.raises(Fenced):
                    await f.append(recs(7, 7))
                with pytest.raises(Fenced):
                    await f.compact(2)
            finally:
                await f.close()
            assert (await w.tail(0))[-1] == recs(6, 6)[0]

    run(body())


def test_tail_is_bounded_per_call_and_contiguous(tmp_path, monkeypatch):
    d = str(tmp_path / "data")
    monkeypatch.setattr(embedded, "TAIL_ENTRIES", 4)

    async def body():
        async with opened(d) as w:
            await w.append(recs(1, 10))
            got: list[tuple[int, bytes]] = []
            while batch := await w.tail(len(got)):
                assert len(batch) <= 4
                got += batch
            assert got == recs(1, 10)

    run(body())


def test_tail_behind_a_snapshot_raises_behind(tmp_path):
    d = str(tmp_path / "data")

    async def body():
        async with opened(d) as w:
            f = EmbeddedStore(d)
            await f.open(writer=False)
            try:
                await w.append(recs(1, 5))
                await w.save_snapshot(4, [b"state"])
                # 1..4 are gone: a follower at 2 must reload, never get 5 after 2.
                with pytest.raises(Behind):
                    await f.tail(2)
                with pytest.raises(Behind):
                    await f.tail(0)
                assert await f.tail(4) == recs(5, 5)
                # Snapshot at the newest index: the log is empty, and a follower behind it is still behind.
                await w.save_snapshot(5, [b"state"])
                with pytest.raises(Behind):
                    await f.tail(4)
                assert await f.tail(5) == []
            finally:
                await f.close()

    run(body())


def test_claim_takes_the_writer_lock_and_returns_what_the_follower_missed(tmp_path):
    d = str(tmp_path / "data")

    async def body():
        w = EmbeddedStore(d, busy_timeout=0.3)
        await w.open()
        f = EmbeddedStore(d, busy_timeout=0.3)
        await f.open(writer=False)
        try:
            await w.append(recs(1, 4))
            # The old writer still holds the lock: a claim waits for it, then gives up.
            with pytest.raises(StoreError, match="still written by another writer"):
                await f.claim(2)
            await w.release()
            with pytest.raises(Fenced):
                await w.append(recs(5, 5))  # a released writer cannot append
            assert await f.claim(2) == recs(3, 4)
            await f.append(recs(5, 6))  # continues right after the claimed log
            with pytest.raises(StoreError):
                await f.append(recs(8, 8))  # the contiguity guard knows the claimed end
            # A non-HA process on the same dir now meets the new writer's lock.
            with pytest.raises(StoreError, match="in use by another process"):
                await reopen(d)
            assert await w.tail(4) == recs(5, 6)  # the old writer follows
            await f.release()
            assert await w.claim(6) == []
            await w.append(recs(7, 7))
        finally:
            await f.close()
            await w.close()
        assert (await reopen(d)).entries == recs(1, 7)

    run(body())


def test_claim_behind_a_snapshot_raises_behind_and_keeps_no_lock(tmp_path):
    d = str(tmp_path / "data")

    async def body():
        async with opened(d) as w:
            await w.append(recs(1, 5))
            await w.save_snapshot(3, [b"s"])
            await w.release()
            f = EmbeddedStore(d)
            await f.open(writer=False)
            try:
                with pytest.raises(Behind):
                    await f.claim(1)
                assert await w.claim(5) == []  # the failed claim left the lock free
            finally:
                await f.close()

    run(body())
