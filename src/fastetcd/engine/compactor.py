"""Auto-compaction, as etcd's v3compactor: periodic (keep a window of time) or revision (keep a count).

Periodic, retention P: every P/10 (at most every 6 minutes) it notes the current revision and keeps the
notes of the last P. From P after start on, every P (at most every hour) it compacts at the revision noted
P ago. Example: P = 1h; at 10:00 the server starts; at 11:00 it compacts at what the revision was at 10:00,
at 12:00 at what it was at 11:00.

Revision, retention R: every check interval (etcd: 5 minutes) it compacts at current revision - R, unless
that is not positive or was already done. Example: R = 100, revision 1,250 → compact at 1,150.

A compaction that finds its revision already compacted counts as done, as in etcd; any other failure is
retried at the next turn.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from fastetcd import errors
from fastetcd.engine.state_machine import StateMachine
from fastetcd.tasks import cancel_and_wait

log = logging.getLogger(__name__)

REVISION_CHECK_INTERVAL = 300.0  # etcd's revInterval
_HOUR = 3600.0


class Compactor:
    def __init__(
        self, sm: StateMachine, *, period: float = 0.0, revisions: int = 0,
        revision_interval: float = REVISION_CHECK_INTERVAL, may_compact: Callable[[], bool] | None = None,
    ) -> None:
        self.sm = sm
        # In a replicated cluster only the leader compacts (etcd pauses its compactor on followers).
        self.may_compact = may_compact
        self.period = period  # seconds of history to keep (periodic mode), 0 = off
        self.revisions = revisions  # revisions to keep (revision mode), 0 = off
        self.revision_interval = revision_interval
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self.period > 0:
            self._task = asyncio.create_task(self._periodic(), name="fastetcd-compactor")
        elif self.revisions > 0:
            self._task = asyncio.create_task(self._by_revision(), name="fastetcd-compactor")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    async def _periodic(self) -> None:
        compact_every = min(self.period, _HOUR)
        sample_every = compact_every / 10
        keep = int(self.period / sample_every) + 1
        noted: list[int] = []
        last_success = time.monotonic()
        wait = self.period  # the first compaction waits the whole retention
        while True:
            noted.append(self.sm.committed_rev)
            del noted[:-keep]  # noted[0] is the revision of one retention ago
            await asyncio.sleep(sample_every)
            if time.monotonic() - last_success < wait:
                continue
            wait = compact_every
            if await self._compact(noted[0], "periodic", {"compact-period": f"{self.period}s"}):
                last_success = time.monotonic()

    async def _by_revision(self) -> None:
        done = 0
        while True:
            await asyncio.sleep(self.revision_interval)
            rev = self.sm.committed_rev - self.revisions
            if rev <= 0 or rev == done:
                continue
            if await self._compact(rev, "revision", {"revision-compaction-retention": self.revisions}):
                done = rev

    async def _compact(self, rev: int, mode: str, fields: dict) -> bool:
        if self.may_compact is not None and not self.may_compact():
            return False
        log.info(f"starting auto {mode} compaction", extra={"revision": rev, **fields})
        t0 = time.monotonic()
        try:
            await self.sm.compact(rev)
        except errors.COMPACTED:
            pass
        except errors.EtcdError as e:
            log.warning(f"failed auto {mode} compaction", extra={"revision": rev, "error": e.message})
            return False
        log.info(f"completed auto {mode} compaction",
                 extra={"revision": rev, "took": f"{time.monotonic() - t0:.3f}s"})
        return True
