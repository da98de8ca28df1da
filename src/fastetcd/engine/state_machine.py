"""The state machine: one writer, group commit, reads at the committed revision.

Write requests queue to a single writer task. The writer applies each to the core at the next revision
(so a Txn sees the effects of earlier requests in the same batch), collects one log record per new
revision, and hands the whole batch to the store in one durable step. Only when ``store.append`` returns
does ``committed_rev`` advance and do the callers get their answers; until then the new versions sit in the
core above ``committed_rev``, invisible to readers. If the append fails, the core is truncated back and
exactly that batch's callers get the error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from fastetcd import errors
from fastetcd._core import MVCC
from fastetcd.engine.apply import Applier, RangeResult, range_kvs
from fastetcd.proto import rpc_pb2 as pb
from fastetcd.store.base import Store, StoreError

log = logging.getLogger(__name__)

# A batch closes at this many requests even if more are queued, to bound one durable step's size.
MAX_BATCH = 1024
# Queued writes beyond this are refused with etcd's "too many requests", as etcd does when its
# applied index falls too far behind the committed one.
MAX_PENDING = 20000
SNAPSHOT_CHUNK = 4 << 20


class _Compaction:
    """A queued Compact: runs alone, after everything queued before it is durable."""

    __slots__ = ("rev",)

    def __init__(self, rev: int) -> None:
        self.rev = rev


class StateMachine:
    """etcd's KV state machine over an MVCC core and a durable Store."""

    def __init__(self, store: Store, *, snapshot_count: int = 100_000, quota_bytes: int = 0) -> None:
        self.store = store
        self.core = MVCC()
        self.applier = Applier(self.core)
        self.committed_rev = 1
        self.snapshot_count = snapshot_count
        self.quota_bytes = quota_bytes
        self._queue: deque[tuple[Any, asyncio.Future]] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._last_snapshot_rev = 0
        self._snapshot_task: asyncio.Task | None = None

    # -------------------------------------------------------------- life cycle

    async def start(self) -> None:
        t0 = time.monotonic()
        rec = await self.store.open()
        if rec.snapshot is not None:
            self.core.load(rec.snapshot)
        for rev, record in rec.records:
            self.core.apply_record(rev, record)
        if rec.compact_rev > self.core.compact_rev:
            self.core.compact(rec.compact_rev)
        self.committed_rev = self.core.rev
        self._last_snapshot_rev = rec.snapshot_rev
        log.info(
            "recovered state",
            extra={
                "revision": self.committed_rev,
                "compact-revision": self.core.compact_rev,
                "snapshot-revision": rec.snapshot_rev,
                "replayed-records": len(rec.records),
                "took": f"{time.monotonic() - t0:.3f}s",
            },
        )
        self._task = asyncio.create_task(self._writer(), name="fastetcd-writer")

    async def stop(self) -> None:
        """Finish what is queued, then stop the writer."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task
        if self._snapshot_task is not None:
            await self._snapshot_task

    # -------------------------------------------------------------- reads (event loop, committed revision)

    def range(self, r: pb.RangeRequest) -> RangeResult:
        return range_kvs(self.core, r, self.committed_rev)

    def txn_readonly(self, t: pb.TxnRequest) -> pb.TxnResponse:
        return self.applier.txn(t, read_rev=self.committed_rev)

    @property
    def compact_rev(self) -> int:
        return self.core.compact_rev

    # -------------------------------------------------------------- writes (through the writer)

    async def put(self, r: pb.PutRequest) -> pb.PutResponse:
        return await self._submit(self.applier.put, r)

    async def delete_range(self, r: pb.DeleteRangeRequest) -> pb.DeleteRangeResponse:
        return await self._submit(self.applier.delete_range, r)

    async def txn(self, r: pb.TxnRequest) -> pb.TxnResponse:
        return await self._submit(self.applier.txn, r)

    async def compact(self, rev: int) -> int:
        """Compact at ``rev``; returns the current revision for the response header."""
        return await self._submit(_Compaction(rev), None)

    async def _submit(self, fn: Callable | _Compaction, req: Any) -> Any:
        if self._stopping:
            raise errors.STOPPED
        if len(self._queue) >= MAX_PENDING:
            raise errors.TOO_MANY_REQUESTS
        fut = asyncio.get_running_loop().create_future()
        self._queue.append(((fn, req), fut))
        self._wake.set()
        return await fut

    def _over_quota(self) -> bool:
        return bool(self.quota_bytes) and self.store.size() > self.quota_bytes

    async def _writer(self) -> None:
        queue = self._queue
        while True:
            if not queue:
                if self._stopping:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            (fn, req), fut = queue[0]
            if isinstance(fn, _Compaction):
                queue.popleft()
                await self._compact(fn.rev, fut)
                continue
            await self._commit_batch()
            self._maybe_snapshot()

    async def _commit_batch(self) -> None:
        queue = self._queue
        core = self.core
        done: list[tuple[asyncio.Future, Any, BaseException | None]] = []
        records: list[tuple[int, bytes]] = []
        no_space = self._over_quota()
        while queue and len(done) < MAX_BATCH:
            (fn, req), fut = queue[0]
            if isinstance(fn, _Compaction):
                break
            queue.popleft()
            if fut.cancelled():
                continue
            before = core.rev
            try:
                if no_space and not _frees_space(req):
                    raise errors.NO_SPACE
                res = fn(req)
            except errors.EtcdError as e:
                done.append((fut, None, e))
                continue
            except Exception as e:  # a bug must not leave a half-applied request behind
                log.exception("apply failed")
                core.truncate(before)
                done.append((fut, None, e))
                continue
            if core.rev != before:
                records.append((core.rev, core.take_record()))
            done.append((fut, res, None))
        if records:
            try:
                await self.store.append(records)
            except StoreError as e:
                log.error("store append failed", extra={"error": str(e), "records": len(records)})
                core.truncate(self.committed_rev)
                err = errors.EtcdError("UNAVAILABLE", f"etcdserver: storage failure: {e}")
                for fut, _, _ in done:
                    if not fut.done():
                        fut.set_exception(err)
                return
            self.committed_rev = core.rev
        for fut, res, exc in done:
            if fut.done():
                continue
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(res)

    async def _compact(self, rev: int, fut: asyncio.Future) -> None:
        try:
            if rev <= self.core.compact_rev:
                raise errors.COMPACTED
            if rev > self.core.rev:
                raise errors.FUTURE_REV
            await self.store.compact(rev)
        except errors.EtcdError as e:
            if not fut.done():
                fut.set_exception(e)
            return
        except StoreError as e:
            if not fut.done():
                fut.set_exception(errors.EtcdError("UNAVAILABLE", f"etcdserver: storage failure: {e}"))
            return
        self.core.compact(rev)
        if not fut.done():
            fut.set_result(self.committed_rev)

    # -------------------------------------------------------------- snapshots

    def _maybe_snapshot(self) -> None:
        """Bound start-up replay: every ``snapshot_count`` revisions, persist the core's state."""
        if self.committed_rev - self._last_snapshot_rev < self.snapshot_count:
            return
        if self._snapshot_task is not None and not self._snapshot_task.done():
            return
        rev = self.committed_rev
        data = self.core.dump(rev)
        self._last_snapshot_rev = rev
        chunks = [data[i : i + SNAPSHOT_CHUNK] for i in range(0, len(data), SNAPSHOT_CHUNK)] or [b""]
        self._snapshot_task = asyncio.create_task(self._save_snapshot(rev, chunks))

    async def _save_snapshot(self, rev: int, chunks: list[bytes]) -> None:
        try:
            await self.store.save_snapshot(rev, chunks)
            log.info("saved snapshot", extra={"revision": rev, "bytes": sum(map(len, chunks))})
        except StoreError as e:
            log.error("snapshot failed", extra={"revision": rev, "error": str(e)})


def _frees_space(req: Any) -> bool:
    """Under the quota alarm etcd still accepts deletes (and reads); everything that may write is refused."""
    return isinstance(req, pb.DeleteRangeRequest)
