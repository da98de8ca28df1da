"""The commit log: what it acknowledged comes back after a crash, whatever the file holds after it."""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, closing

import pytest

from fastetcd.store import commit_log, embedded
from fastetcd.store.base import Corrupt, Recovered, Uncertain
from fastetcd.store.commit_log import LOG_FILE, CommitLog
from fastetcd.store.embedded import DB_FILE, EmbeddedStore


def recs(first: int, last: int, size: int = 20) -> list[tuple[int, bytes]]:
    return [(i, str(i).encode().ljust(size, b".")) for i in range(first, last + 1)]


def sqlite_log(path: str) -> list[int]:
    with closing(sqlite3.connect(os.path.join(path, DB_FILE))) as conn:
        return [r[0] for r in conn.execute("SELECT idx FROM log ORDER BY idx")]


@asynccontextmanager
async def single_node(path: str) -> AsyncIterator[EmbeddedStore]:
    """The store as a single node opens it (commit log on), closed on the way out."""
    s = EmbeddedStore(path, shared=False)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


async def reopen(path: str, *, shared: bool) -> Recovered:
    s = EmbeddedStore(path, shared=shared)
    try:
        return await s.open()
    finally:
        await s.close()


def crash_copy(src: str, dst: str) -> str:
    """The data dir as the disk holds it right now: what a crash of the process would leave behind."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("fastetcd.lock"))
    return dst


def test_read_takes_whole_records_of_its_generation_and_stops_at_the_first_other(tmp_path):
    path = str(tmp_path / LOG_FILE)
    commit_log.create(path)
    old = commit_log.encode(7, [(i, b"#" * 30) for i in range(40, 61)])
    new = commit_log.encode(8, recs(91, 96))
    torn_at = len(commit_log.encode(8, recs(91, 95))) + 30  # in the middle of 96's data
    with open(path, "r+b") as f:
        f.write(old)
        f.seek(0)
        f.write(new[:torn_at])
    assert os.path.getsize(path) == commit_log.CAPACITY
    # 91..95 are whole; 96 is torn; after it come the ends of generation 7's records.
    assert commit_log.read(path, 8) == recs(91, 95)
    assert commit_log.read(path, 7) == []  # the start of the file is no longer generation 7's
    assert commit_log.read(str(tmp_path / "missing"), 1) == []

    with open(path, "r+b") as f:  # a flipped bit in 93's data ends the log before it
        pos = len(commit_log.encode(8, recs(91, 92))) + 30
        f.seek(pos)
        byte = f.read(1)
        f.seek(pos)
        f.write(bytes([byte[0] ^ 1]))
    assert commit_log.read(path, 8) == recs(91, 92)


def test_appends_are_durable_in_order_and_an_fsync_failure_is_uncertain(tmp_path):
    path = str(tmp_path / LOG_FILE)
    commit_log.create(path)

    async def body():
        loop = asyncio.get_running_loop()
        reports: list[tuple[int, object]] = []
        last = loop.create_future()

        def reporter(i: int):
            def on_durable(error) -> None:
                reports.append((i, error))
                if i == 51:
                    last.set_result(None)
                if i == 7:
                    raise RuntimeError("a broken callback")  # logged; the others still hear
            return on_durable

        log = CommitLog(path, 3)
        try:
            # Submitted together: the thread writes what queued up behind a sync in one write.
            for i in range(1, 51):
                log.append(log.encode(recs(i, i)), reporter(i))
            log.append(log.encode(recs(51, 60, size=70_000)), reporter(51))
            await asyncio.wait_for(last, 10)
        finally:
            log.close()
        assert reports == [(i, None) for i in range(1, 52)]
        assert commit_log.read(path, 3) == recs(1, 50) + recs(51, 60, size=70_000)

        broken = CommitLog("/dev/null", 1)  # writes succeed, fdatasync fails (EINVAL)
        try:
            failed = loop.create_future()
            broken.append(broken.encode(recs(1, 1)), failed.set_result)
            error = await asyncio.wait_for(failed, 10)
            assert isinstance(error, Uncertain) and "Invalid argument" in str(error)
            with pytest.raises(Uncertain):  # refused at once: nothing more after a failure
                broken.append(broken.encode(recs(2, 2)), failed.set_result)
        finally:
            broken.close()

    asyncio.run(body())


def test_acknowledged_appends_survive_a_crash_before_sqlite_has_them(tmp_path, monkeypatch):
    monkeypatch.setattr(embedded, "_FLUSH_DELAY", 60.0)  # SQLite gets nothing before the copy
    d = str(tmp_path / "data")

    async def body():
        async with single_node(d) as s:
            await s.append(recs(1, 5))
            await s.append(recs(6, 9))
            crash_copy(d, str(tmp_path / "crashed"))

    asyncio.run(body())
    crashed = str(tmp_path / "crashed")
    assert sqlite_log(crashed) == []
    got = asyncio.run(reopen(crashed, shared=True))  # whatever mode comes next replays the log
    assert got.entries == recs(1, 9)
    assert sqlite_log(crashed) == list(range(1, 10))
    # Replayed once, durably: the next open finds them in SQLite and nothing new in the log.
    assert asyncio.run(reopen(crashed, shared=False)).entries == recs(1, 9)


def test_a_full_log_starts_over_after_sqlite_is_synced(tmp_path, monkeypatch):
    monkeypatch.setattr(commit_log, "CAPACITY", 1024)
    d = str(tmp_path / "data")
    each = len(commit_log.encode(1, recs(1, 1)))  # 48 bytes: 21 fit in 1 KiB

    async def body():
        crashes = []
        async with single_node(d) as s:
            for i in range(1, 101):
                await s.append(recs(i, i))
                if i in (21, 22, 60):
                    crashes.append(crash_copy(d, str(tmp_path / f"crash-{i}")))
            await s.append(recs(101, 101, size=5000))  # bigger than the whole log: SQLite, synced
            await s.append(recs(102, 103))
            crashes.append(crash_copy(d, str(tmp_path / "crash-103")))
        return crashes

    crashes = asyncio.run(body())
    assert each * 21 <= 1024 < each * 22
    expected = recs(1, 100) + recs(101, 101, size=5000) + recs(102, 103)
    for crashed, last in zip(crashes, (21, 22, 60, 103), strict=True):
        got = asyncio.run(reopen(crashed, shared=False))
        assert got.entries == expected[:last], crashed
    assert asyncio.run(reopen(d, shared=False)).entries == expected


def test_a_log_that_does_not_continue_sqlite_is_refused(tmp_path):
    """Say the database was put back from an older copy: the log's entries would leave a hole."""
    d = str(tmp_path / "data")

    async def body():
        async with single_node(d) as s:
            await s.append(recs(1, 3))

    asyncio.run(body())
    with closing(sqlite3.connect(os.path.join(d, DB_FILE))) as conn:
        generation = int(conn.execute("SELECT value FROM meta WHERE key = 'log_generation'").fetchone()[0])
    with open(os.path.join(d, LOG_FILE), "r+b") as f:
        f.write(commit_log.encode(generation, recs(5, 6)))
    with pytest.raises(Corrupt, match=f"{LOG_FILE} does not continue {DB_FILE}"):
        asyncio.run(reopen(d, shared=False))
    assert sqlite_log(d) == [1, 2, 3]


def test_an_append_cancelled_while_the_log_starts_over_still_lands_in_order(tmp_path, monkeypatch):
    monkeypatch.setattr(commit_log, "CAPACITY", 1024)  # 21 one-entry appends fill it
    d = str(tmp_path / "data")

    async def body():
        async with single_node(d) as s:
            for i in range(1, 22):
                await s.append(recs(i, i))
            first = asyncio.ensure_future(s.append(recs(22, 22)))
            await asyncio.sleep(0)  # under way: SQLite is being synced before the log starts over
            first.cancel()
            await s.append(recs(23, 23))  # waits for 22, which lands: a write once begun is not withdrawn
            crash_copy(d, str(tmp_path / "crashed"))

    asyncio.run(body())
    assert asyncio.run(reopen(str(tmp_path / "crashed"), shared=False)).entries == recs(1, 23)


def test_a_full_log_starts_over_even_when_the_append_before_was_cancelled(tmp_path, monkeypatch):
    monkeypatch.setattr(commit_log, "CAPACITY", 1024)
    d = str(tmp_path / "data")

    async def body():
        async with single_node(d) as s:
            for i in range(1, 21):
                await s.append(recs(i, i))
            last_fitting = asyncio.ensure_future(s.append(recs(21, 21)))
            await asyncio.sleep(0)  # handed to the log, its fdatasync under way
            last_fitting.cancel()
            await s.append(recs(22, 22))  # must wait for 21's sync, not fail with 21's cancellation
            crash_copy(d, str(tmp_path / "crashed"))

    asyncio.run(body())
    assert asyncio.run(reopen(str(tmp_path / "crashed"), shared=False)).entries == recs(1, 22)
