"""A Store wrapper for engine tests: delegates to a real store, but can hold appends and fail them.

It never fakes success: every call that is not made to fail goes to the wrapped store, so what the
engine believes is durable really is, and a restart on the same data dir is a real recovery.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from fastetcd.engine import log_entry
from fastetcd.store.base import Recovered, Store, StoreError


class FaultyStore:
    """``Store`` over ``inner`` that records every append and can hold or fail chosen ones.

    - ``appends``: the etcd revisions created by the log entries of each ``append`` call, in call order,
      failed calls included (entries that create no revision, such as lease grants, are left out).
    - ``fail_appends``: 1-based numbers of the append calls that raise ``StoreError`` (without delegating,
      so the batch is certainly not durable).
    - ``hold()`` / ``unhold()``: appends started while held wait (before delegating) until unheld;
      ``wait_held()`` returns once one is waiting, i.e. the engine's writer is blocked inside the store.
      ``hold(durable=True)`` holds them after delegating instead: durable (a follower can read them) but
      not yet returned to the engine.

    ``nowait`` (class attribute, so a test module can switch every instance): whether ``append_nowait``
    takes appends, as the embedded store does. Then an append that is neither held nor failed goes
    straight to the inner store's ``append_nowait`` (its real durable callback), and the others run
    through ``append`` in a task and are reported to the engine's callback the same way.
    """

    nowait = False

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.appends: list[list[int]] = []
        # ("append", first_rev, last_rev, ok) / ("compact", rev): the order durable steps completed in.
        self.events: list[tuple] = []
        self.fail_appends: set[int] = set()
        self.fail_compact = False
        self.compacts: list[int] = []
        self.snapshots: list[int] = []
        self._gate = asyncio.Event()
        self._gate.set()
        self._hold_durable = False
        self._entered = asyncio.Event()
        self._reporting: set[asyncio.Future] = set()

    # ---------------------------------------------------------------- test controls

    def hold(self, *, durable: bool = False) -> None:
        self._entered.clear()
        self._gate.clear()
        self._hold_durable = durable

    async def wait_held(self, timeout: float = 5.0) -> None:
        await asyncio.wait_for(self._entered.wait(), timeout)

    def unhold(self) -> None:
        self._gate.set()

    @property
    def append_count(self) -> int:
        return len(self.appends)

    # ---------------------------------------------------------------- Store protocol

    async def open(self, *, writer: bool = True) -> Recovered:
        return await (self.inner.open() if writer else self.inner.open(writer=False))

    async def tail(self, after: int) -> list[tuple[int, bytes]]:
        return await self.inner.tail(after)

    async def claim(self, after: int) -> list[tuple[int, bytes]]:
        return await self.inner.claim(after)

    async def release(self) -> None:
        await self.inner.release()

    async def append(self, entries: list[tuple[int, bytes]]) -> None:
        revs = [log_entry.decode(data).rev for _, data in entries]
        self.appends.append([rev for rev in revs if rev])
        n = len(self.appends)
        durable_first = self._hold_durable
        if durable_first:
            await self.inner.append(entries)
        self._entered.set()
        await self._gate.wait()
        if n in self.fail_appends:
            self.events.append(("append", min(revs, default=0), max(revs, default=0), False))
            raise StoreError(f"injected failure of append #{n}")
        if not durable_first:
            await self.inner.append(entries)
        self.events.append(("append", min(revs, default=0), max(revs, default=0), True))

    def append_nowait(self, entries: list[tuple[int, bytes]], on_durable) -> bool:
        if not self.nowait:
            return False
        if self._gate.is_set() and len(self.appends) + 1 not in self.fail_appends:
            revs = [rev for rev in (log_entry.decode(data).rev for _, data in entries) if rev]

            def reported(error: StoreError | None) -> None:
                self.events.append(("append", min(revs, default=0), max(revs, default=0), error is None))
                on_durable(error)

            if not self.inner.append_nowait(entries, reported):
                return False
            self.appends.append(revs)
            return True
        task = asyncio.ensure_future(self._append_reporting(entries, on_durable))
        self._reporting.add(task)
        task.add_done_callback(self._reporting.discard)
        return True

    async def _append_reporting(self, entries: list[tuple[int, bytes]], on_durable) -> None:
        try:
            await self.append(entries)
        except StoreError as e:
            on_durable(e)
            return
        on_durable(None)

    async def compact(self, rev: int) -> None:
        if self.fail_compact:
            raise StoreError(f"injected failure of compaction at {rev}")
        await self.inner.compact(rev)
        self.compacts.append(rev)
        self.events.append(("compact", rev))

    async def save_snapshot(self, index: int, chunks: Iterable[bytes]) -> None:
        await self.inner.save_snapshot(index, chunks)
        self.snapshots.append(index)

    def size(self) -> int:
        return self.inner.size()

    def size_in_use(self) -> int:
        return self.inner.size_in_use()

    async def defragment(self) -> None:
        await self.inner.defragment()

    async def close(self) -> None:
        await self.inner.close()
