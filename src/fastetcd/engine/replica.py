"""A replica: one state machine that follows the committed log, and leads (writes) while it holds leadership.

Several fastetcd nodes share one store. Exactly one of them writes; the others apply what it committed,
serve serializable reads and watches from their own memory, and one of them takes over when the writer
goes. ``Replica`` drives one ``StateMachine`` through those roles under a ``Leadership``:

* following: every ``poll`` seconds (or at once when woken) ``store.tail(applied_index)`` →
  ``sm.apply_committed``; writes are refused with "not leader" (the server forwards them);
* campaigning, all the while: ``leadership.campaign()`` returns once this node leads, then
  ``sm.promote(extend=<the election's length>)`` claims the store, applies what the old writer
  committed and starts the writer;
* leading until ``leadership.lost`` is set or the state machine halts (the store fenced it, or an append's
  outcome is unknown): ``sm.demote()`` gives the store back, and the node follows and campaigns again.

Invariants, with worked examples:

1. **Revisions continue without a gap or a repeat across a change of leader.** The old leader A committed
   through log index 120 (revision 95) and dies; follower B had applied index 117. B wins, and its claim
   returns 118..120, which B applies (revision 95) before its writer starts, so B's first write is
   revision 96 at index 121. A batch A had applied but not made durable (index 121 in A's memory) was
   never committed: B never sees it, and A's callers got an error (or no answer), never success.
2. **Every revision reaches the watch hub once, in order, on every node.** A follower at revision 40
   tails entries giving revisions 41..44: ``apply_committed`` publishes [41, 42, 43, 44] in one call; the
   next tail starts after the last applied index, so 44 is never published twice, and a tail that raced
   a promotion is trimmed to what was not applied yet.
3. **A node writes only while it leads, and serves linearizable reads only while it provably leads.**
   ``sm.may_write`` asks ``time.monotonic() < leadership.valid_until()`` right before every append; past
   it the batch fails with "not leader", is rolled back, and the node demotes. ``is_leader`` and
   ``read_index`` use the same test, so an old leader cut off from the store stops answering
   linearizable reads before a successor may commit (store/leadership.py's timing rule).
4. **Leases survive a change of leader.** Keep-alives renewed the old leader's in-memory deadlines only;
   the new one gives every lease its TTL (or checkpointed remainder) plus one leadership lease
   (``timing.lease``) before its expiry timer runs: a lease granted with TTL 2 s just before the old
   leader died does not expire during the change, and expires 2 + lease seconds later if nobody renews it.
5. **A linearizable read on a follower sees every write acknowledged before it started.** The follower
   asks the leader for ``read_index()`` (its committed revision, say 230; the leader is valid, so nobody
   else committed anything newer), then ``wait_applied(230, timeout)`` wakes its follow loop and returns
   once its own ``committed_rev`` >= 230; it then reads locally at its committed revision.

Known limitation: a follower too far behind (a snapshot replaced log entries it had not applied yet;
``store.tail`` raises ``Behind``) cannot catch up here. It logs, halts its state machine and sets
``halted``, and the process must restart, which recovers from the snapshot. Compactions are not log
entries, so a follower learns of them only at its next start-up; it serves older history meanwhile.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from collections.abc import Callable

from fastetcd import errors
from fastetcd.engine.state_machine import StateMachine
from fastetcd.store.base import Behind, StoreError
from fastetcd.store.leadership import Leader, Leadership
from fastetcd.tasks import cancel_and_wait

log = logging.getLogger(__name__)

# While someone waits for a revision this node has not applied yet, the store is tailed this often
# instead of every ``poll``: the revision may not have been committed yet when the wait woke the loop.
WAITING_POLL = 0.01


class Replica:
    """One node of several over one store: follows the committed log, leads while elected."""

    def __init__(self, sm: StateMachine, leadership: Leadership, *, poll: float | None = None) -> None:
        self.sm = sm
        self.leadership = leadership
        self.poll = leadership.timing.poll if poll is None else poll
        # Set (with ``failure``) when this node cannot go on and must restart: the server waits on this,
        # not on ``sm.halt``, which a leader that merely lost its leadership sets too.
        self.halted = asyncio.Event()
        self.failure: str | None = None
        # Called with each new term this node learns of (as leader or follower): response headers carry it.
        self.on_term: list[Callable[[int], None]] = []
        self._term = 0
        self._published_term = 0
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._handed_over = asyncio.Event()  # set by transfer(): the leader steps down without losing
        # Held while entries are applied from the store or the role changes: a tail is never applied on
        # top of a promotion's claim, nor in the middle of a demotion.
        self._role = asyncio.Lock()
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []  # (revision, seq, future) heap
        self._seq = itertools.count()
        self._follow_task: asyncio.Task | None = None
        self._lead_task: asyncio.Task | None = None
        self._campaigning = False

    # ------------------------------------------------------------------ life cycle

    async def start(self) -> None:
        """Recover as a follower, publish this member, then follow and campaign in the background."""
        await self.sm.start(writer=False)
        self.sm.listeners.append(self._on_commit)
        self.sm.may_write = self._leadership_proven
        await self.leadership.start()
        self._follow_task = asyncio.create_task(self._follow(), name="fastetcd-follow")
        self._lead_task = asyncio.create_task(self._lead(), name="fastetcd-campaign")

    async def stop(self) -> None:
        """Stop following and campaigning; a leader finishes what is queued, gives the store back, then
        resigns, so a successor takes over at once. The caller closes the store afterwards."""
        self._stop.set()
        task = self._lead_task
        if task is not None:
            if self._campaigning or task.done():  # done: _fail may have cancelled it
                await cancel_and_wait(task)
            else:
                await task  # a promotion or demotion under way finishes first; see _lead
        await cancel_and_wait(self._follow_task)
        await self.sm.stop()
        await self.leadership.close()
        for _, _, fut in self._waiters:
            if not fut.done():
                fut.set_exception(errors.STOPPED())
        self._waiters.clear()

    # ------------------------------------------------------------------ what the server asks

    @property
    def is_leader(self) -> bool:
        """Leads, writes, and can prove it right now (invariant 3)."""
        return self.sm.leading and self.sm.halted is None and self._leadership_proven()

    @property
    def term(self) -> int:
        """The newest leadership term this node knows of (etcd's raft_term)."""
        leader = self.leadership.leader()
        return max(self._term, leader.term if leader is not None else 0)

    def leader(self) -> Leader | None:
        return self.leadership.leader()

    def wake(self) -> None:
        """Tail the store now instead of at the next poll."""
        self._wake.set()

    async def wait_applied(self, rev: int, timeout: float) -> None:
        """Return once ``committed_rev >= rev`` here (invariant 5), tailing the store at once rather than at
        the next poll; raise "request timed out" after ``timeout`` seconds."""
        if self.sm.committed_rev >= rev:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (rev, next(self._seq), fut))
        self._wake.set()
        try:
            async with asyncio.timeout(timeout):
                await fut
        except TimeoutError:
            raise errors.TIMEOUT from None

    async def read_index(self) -> int:
        """The revision a linearizable read must see (asked of the leader by followers): this leader's
        committed revision once the append under way returned, while it provably leads; "not leader"
        otherwise."""
        await self.leader_barrier()
        return self.sm.committed_rev

    async def leader_barrier(self) -> None:
        """On the leader, before a linearizable read: wait for the append under way, which followers may
        already be serving (StateMachine.append_in_flight); "not leader" if leadership is not proven."""
        pending = self.sm.append_in_flight()
        if pending is not None:
            await asyncio.shield(pending)
        if not self.is_leader:
            raise errors.NOT_LEADER

    # ------------------------------------------------------------------ internals

    def _leadership_proven(self) -> bool:
        return time.monotonic() < self.leadership.valid_until()

    def _on_commit(self, revisions: list[tuple[int, bytes]]) -> None:
        # Called for the writer's commits and for applied entries alike: waiters do not care which.
        waiters = self._waiters
        rev = self.sm.committed_rev
        while waiters and waiters[0][0] <= rev:
            fut = heapq.heappop(waiters)[2]
            if not fut.done():
                fut.set_result(None)

    def _publish_term(self) -> None:
        term = self.term
        if term != self._published_term:
            self._published_term = term
            for callback in self.on_term:
                callback(term)

    def _fail(self, reason: str) -> None:
        if self.failure is not None:
            return
        self.failure = reason
        log.critical("replica cannot continue: restart it", extra={"reason": reason})
        self.sm.fail(reason)
        self.halted.set()
        if self._campaigning and self._lead_task is not None:
            self._lead_task.cancel()  # a node that cannot follow must not lead either

    async def _follow(self) -> None:
        sm = self.sm
        while True:
            self._wake.clear()  # before the tail: a wake during it makes the wait below return at once
            applied = False
            if not sm.leading:
                async with self._role:
                    if not sm.leading:
                        try:
                            entries = await sm.store.tail(sm.applied_index)
                        except Behind as e:
                            self._fail(f"behind the log (restart to load the snapshot): {e}")
                            return
                        except StoreError as e:
                            log.warning("tailing the store failed", extra={"error": str(e)})
                        else:
                            if entries:
                                sm.apply_committed(entries)
                                applied = True
            self._publish_term()
            if applied:
                continue  # more may be waiting beyond what one tail returns
            try:
                # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel that meets a wake.
                async with asyncio.timeout(WAITING_POLL if self._waiters else self.poll):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _lead(self) -> None:
        sm = self.sm
        leadership = self.leadership
        while not self._stop.is_set():
            self._handed_over.clear()
            self._campaigning = True
            started = time.monotonic()
            try:
                term = await leadership.campaign()
            finally:
                self._campaigning = False
            # etcd extends leases by its election timeout; here the election took what the campaign
            # waited: nothing after a graceful hand-over, about a lease after a leader died.
            extend = min(time.monotonic() - started, leadership.timing.failover_bound)
            if self._stop.is_set() or self.halted.is_set():
                await leadership.resign()
                return
            async with self._role:
                try:
                    await sm.promote(extend=extend)
                except Behind as e:
                    await leadership.resign()
                    self._fail(f"behind the log (restart to load the snapshot): {e}")
                    return
                except StoreError as e:
                    log.error("taking over the store failed", extra={"term": term, "error": str(e)})
                    await leadership.resign()
                    await asyncio.sleep(self.poll)
                    continue
            self._term = term
            self._publish_term()
            self._wake.set()  # whoever waits for a revision may have it now
            why = await self._lead_until_done()
            async with self._role:
                if why == "stop":
                    await sm.stop()  # a graceful stop finishes what was queued
                    await sm.store.release()
                    await leadership.resign()
                    return
                log.warning("stepping down", extra={"term": term, "reason": why})
                await sm.demote()
            if not leadership.lost.is_set() and why != "handed over":
                await leadership.resign()  # the store fenced us: let someone else in
            self._wake.set()

    async def transfer(self, member_id: int, timeout: float) -> None:
        """etcd's MoveLeader: hand leadership to ``member_id`` and return once it leads (this node then
        follows); errors.LEADER_TRANSFER_TIMEOUT if that takes longer than ``timeout``."""
        if not self.is_leader:
            raise errors.NOT_LEADER
        await self.leadership.transfer(member_id)
        self._handed_over.set()
        deadline = time.monotonic() + timeout
        while True:
            leader = self.leadership.leader()
            if leader is not None and leader.member.id == member_id:
                return
            if time.monotonic() >= deadline:
                raise errors.LEADER_TRANSFER_TIMEOUT
            await asyncio.sleep(0.02)

    async def _lead_until_done(self) -> str:
        """Wait until leadership is lost, the state machine halts, or the replica stops; which one."""
        waits = {
            asyncio.ensure_future(self.leadership.lost.wait()): "leadership lost",
            asyncio.ensure_future(self.sm.halt.wait()): "halted",
            asyncio.ensure_future(self._stop.wait()): "stop",
            asyncio.ensure_future(self._handed_over.wait()): "handed over",
        }
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        why = next(waits[w] for w in waits if w in done)
        return f"halted: {self.sm.halted}" if why == "halted" else why
