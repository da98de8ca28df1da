"""The state machine: one writer, group commit, reads at the committed revision.

Write requests queue to a single writer task. The writer applies each to the core at the next revision
(so a Txn sees the effects of earlier requests in the same batch) and to the lessor, collects one log entry
per request that changed anything, and hands the whole batch to the store in one durable step. Only once
the store says it is durable does ``committed_rev`` advance and do the callers get their answers, then the
watchers the batch's events (see ``_commit_batch``); until then the new versions sit in the core above
``committed_rev``, invisible to readers. If the append fails, the core and the lessor are rolled back and
exactly that batch's callers get the error.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import random
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import crc32c

from fastetcd import errors, metrics
from fastetcd._core import MVCC
from fastetcd.engine import alarms as alarm_types
from fastetcd.engine import kv_hash, log_entry, quota
from fastetcd.engine.alarms import Alarms
from fastetcd.engine.apply import Applier, RangeResult, range_kvs
from fastetcd.engine.auth_store import AuthStore, encode_change
from fastetcd.engine.lessor import LeaseStatus, Lessor
from fastetcd.engine.watch_hub import WatchHub
from fastetcd.proto import rpc_pb2 as pb
from fastetcd.store.base import Corrupt, Fenced, Store, StoreError, Throttled, Uncertain
from fastetcd.tasks import cancel_and_wait

log = logging.getLogger(__name__)

# A batch closes at this many requests even if more are queued, to bound one durable step's size.
MAX_BATCH = 1024
# Queued writes beyond this are refused with etcd's "too many requests", as etcd does when its
# applied index falls too far behind the committed one.
MAX_PENDING = 20000
SNAPSHOT_CHUNK = 4 << 20
# etcd answers "request timed out" after 5 s plus two election timeouts (7 s with its defaults).
REQUEST_TIMEOUT = 7.0
# How often queued writes are checked against REQUEST_TIMEOUT (one timer for all, not one per request).
TIMEOUT_SWEEP = 0.25
# etcd checks for expired leases every 500 ms and checkpoints remaining TTLs every 5 minutes.
LEASE_EXPIRY_TICK = 0.5
LEASE_CHECKPOINT_INTERVAL = 300.0

# (revision, that revision's KV record) for every revision a batch committed, in order.
CommitListener = Callable[[list[tuple[int, bytes]]], None]
# What a caller may hand over with a write: the write's future then resolves with encode(response) (the
# answer's bytes), computed once the write is durable, so the caller needs no future and callback of its own.
Encoder = Callable[[Any], Any]


# A snapshot begins with this, then the lengths of the core's, the lessor's and the alarms' parts; the
# auth state follows. (FESNAP02 snapshots, from before auth, have two lengths and end with the alarms;
# snapshots written before alarms existed begin with the core's length, which is never this large.)
SNAPSHOT_MAGIC = b"FESNAP03"
SNAPSHOT_MAGIC_V2 = b"FESNAP02"


def pack_snapshot(core: bytes, leases: bytes, alarms: bytes, auth: bytes = b"") -> bytes:
    """A snapshot's layout, from ``MVCC.dump``, ``Lessor.dump``, ``Alarms.dump`` and ``AuthStore.dump``
    (what ``StateMachine._load_snapshot`` reads back; ``fastetcd import`` builds its state with it too)."""
    head = SNAPSHOT_MAGIC + struct.pack("<QQQ", len(core), len(leases), len(alarms))
    return head + core + leases + alarms + auth


class _Exclusive:
    """A queued operation that runs alone (compaction, defragmentation), after everything queued before
    it is durable and before anything queued after it is applied."""

    __slots__ = ("run",)

    def __init__(self, run: Callable[[], Awaitable[Any]]) -> None:
        self.run = run


class _Batch:
    """One group commit being built: its callers' outcomes, log entries, and committed KV revisions."""

    __slots__ = ("done", "entries", "revisions")

    def __init__(self) -> None:
        # (future, result, error, encoder): the future gets encode(result) when an encoder came with it
        self.done: list[tuple[asyncio.Future, Any, BaseException | None, Encoder | None]] = []
        self.entries: list[tuple[int, bytes]] = []  # (log index, entry)
        self.revisions: list[tuple[int, bytes]] = []  # (revision, KV record): what watchers get


class StateMachine:
    """etcd's KV and lease state machine over an MVCC core and a durable Store."""

    def __init__(
        self,
        store: Store,
        *,
        snapshot_count: int = 100_000,
        quota_bytes: int = 0,
        checkpoint_interval: float = LEASE_CHECKPOINT_INTERVAL,
        member_id: int = 0,
        auth: AuthStore | None = None,
    ) -> None:
        self.store = store
        self.core = MVCC()
        self.lessor = Lessor()
        self.alarms = Alarms()
        self.auth = auth if auth is not None else AuthStore()
        self.applier = Applier(self.core, self.lessor)
        self.member_id = member_id  # whose alarms this node raises
        # What a CORRUPT alarm still lets through, as etcd's corrupt applier: alarm changes, TTL checkpoints.
        self._alarm_ops = {self._activate_alarm, self._deactivate_alarm, self.applier.lease_checkpoint}
        self.committed_rev = 1
        self.applied_index = 0
        self.snapshot_count = snapshot_count
        self.quota_bytes = quota_bytes
        self.checkpoint_interval = checkpoint_interval
        self.listeners: list[CommitListener] = []
        self.watch_hub: WatchHub  # set by start(), once the recovered revision is known
        self._queue: deque[tuple[tuple[Any, Any, int, Encoder | None], asyncio.Future]] = deque()
        self._wake = asyncio.Event()
        # Every submitted write's (deadline, future), oldest first: all share REQUEST_TIMEOUT, so the
        # front expires first and one periodic sweep (_expire) times them out.
        self._deadlines: deque[tuple[float, asyncio.Future]] = deque()
        self._sweep: asyncio.TimerHandle | None = None
        self._tasks: list[asyncio.Task] = []
        self._writer_task: asyncio.Task | None = None
        self._stopping = False
        # True while this node writes: from start() (or promote()) until demote(). A follower refuses
        # writes with "not leader" (the server forwards them to the leader instead).
        self.leading = False
        # Asked right before every durable write when set (HA: "is my leadership still proven?"); the
        # single-node default has no one to lose leadership to.
        self.may_write: Callable[[], bool] | None = None
        self._in_flight: asyncio.Future | None = None  # see append_in_flight
        # Set when the store was fenced or left an outcome unknown: memory may no longer match the store,
        # so this node refuses writes and the server shuts down (a restart recovers from the store).
        self.halted: str | None = None
        self.halt = asyncio.Event()
        self._last_snapshot_index = 0
        self._snapshot_task: asyncio.Task | None = None
        # How long the writer lets requests gather before a batch, when the last one had company.
        self._gather_window: float = getattr(store, "gather_window", 0.0)
        self._last_batch = 0
        self._db_size = 0  # the store's size after the last durable step: what the quota is checked against
        self._loop: asyncio.AbstractEventLoop  # set by start()

    # -------------------------------------------------------------- life cycle

    async def start(self, *, writer: bool = True) -> None:
        """Recover from the store, then start the writer and the lease timers.

        ``writer=False`` opens the store as a follower: the state is recovered the same way, but nothing
        here writes; ``apply_committed`` brings in what the writer commits until ``promote``.
        """
        t0 = time.monotonic()
        # Held: asyncio.get_running_loop() costs a getpid() system call, and a write asked for it twice.
        self._loop = asyncio.get_running_loop()
        # The plain call for the default: a store need not know about followers to serve one node.
        rec = await (self.store.open() if writer else self.store.open(writer=False))
        self.core.begin_bulk()
        if rec.snapshot is not None:
            self._load_snapshot(rec.snapshot)
        compacted = self._apply_entries(rec.entries, None)
        self.core.end_bulk()
        self.auth.recovered()
        compact_rev = max(rec.compact_rev, compacted)
        if compact_rev > self.core.compact_rev:
            self.core.compact(compact_rev)
        self.lessor.reattach(self.core.leased_keys(self.core.rev))
        self.committed_rev = self.core.rev
        self._db_size = self.store.size()
        self.watch_hub = WatchHub(self.core, self.committed_rev)
        self.listeners.append(self.watch_hub.publish)
        self.applied_index = max(self.applied_index, rec.snapshot_index)
        self._last_snapshot_index = rec.snapshot_index
        log.info(
            "recovered state",
            extra={
                "revision": self.committed_rev,
                "compact-revision": self.core.compact_rev,
                "log-index": self.applied_index,
                "snapshot-index": rec.snapshot_index,
                "replayed-entries": len(rec.entries),
                "leases": len(self.lessor.leases),
                "alarms": [alarm_types.NAMES[a] for _, a in self.alarms.get()],
                "auth-enabled": self.auth.enabled,
                "auth-revision": self.auth.revision,
                "role": "writer" if writer else "follower",
                "took": f"{time.monotonic() - t0:.3f}s",
            },
        )
        if writer:
            self._start_writing()

    def _start_writing(self) -> None:
        self.leading = True
        self._stopping = False
        self._writer_task = asyncio.create_task(self._writer(), name="fastetcd-writer")
        self._tasks = [
            asyncio.create_task(self._expire_leases(), name="fastetcd-lease-expiry"),
            asyncio.create_task(self._checkpoint_leases(), name="fastetcd-lease-checkpoint"),
        ]

    def _apply_entries(
        self, entries: list[tuple[int, bytes]], revisions: list[tuple[int, bytes]] | None
    ) -> int:
        """Apply durable log entries in order, as the writer applied them: start-up replay and followers.

        ``revisions`` (None during start-up replay) collects each (revision, KV record) for the listeners,
        and asks for what a running node needs on top of replay: lease attachments kept in step with the
        keys, auth caches and tokens brought up to date. Returns the newest compaction revision the entries
        hold (-1: none) for the caller to apply last: the revisions before it must reach the listeners first.
        """
        core = self.core
        lessor = self.lessor
        live = revisions is not None
        compact_rev = -1
        for index, data in entries:
            e = log_entry.decode(data)
            if e.rev:
                core.apply_record(e.rev, e.kv)
                if revisions is not None:
                    revisions.append((e.rev, e.kv))
            if e.ops:
                lessor.replay(e.ops)
                self.alarms.replay(e.ops)
                for op, _, arg in e.ops:
                    if op == log_entry.COMPACT:
                        compact_rev = max(compact_rev, arg)
            if e.auth:
                self.auth.replay(e.auth, live=live)
            self.applied_index = index
        if live and revisions and lessor.leases:
            # Replay rebuilds attachments from the whole key space once; a follower applying a few
            # revisions at a time moves only the keys those revisions touched.
            for rev, kv in revisions:
                for _, key, _, _ in core.events(rev, kv):
                    old = core.lease_of(key, rev - 1)
                    if old:
                        lessor.detach(old, key)
                    new = core.lease_of(key, rev)
                    if new:
                        lessor.attach(new, key)
        if live:
            lessor.drop_stale()
        return compact_rev

    def append_in_flight(self) -> asyncio.Future | None:
        """The append under way, if any (resolved once it returned and ``committed_rev`` moved).

        Why a leader's linearizable read waits for it: its entries may be durable already, and then a
        follower tailing the store can serve them before this leader's append has even returned. Example:
        the append of revision 23 lands; a follower applies it and answers a read at 23; a read on the
        leader that arrives next would be answered at 22, older than what a client has seen. Waiting for
        the append in flight (one that starts later cannot have been served by anyone yet) closes that."""
        return self._in_flight

    def apply_committed(self, entries: list[tuple[int, bytes]]) -> None:
        """Apply entries another writer made durable (``store.tail``) on a node that is not writing.

        Exactly what replay does, then what a commit does: ``committed_rev`` advances and the listeners
        (the watch hub) get every new revision once, in order, so a watch on a follower sees what it
        would see on the leader. Entries at or below ``applied_index`` were applied already (a tail that
        raced a promotion's claim) and are skipped; a gap is a bug in the caller and raises.

        Example: applied_index 7, committed_rev 5; entries (8: put a → rev 6), (9: grant lease),
        (10: put b → rev 7) leave applied_index 10, committed_rev 7 and publish [(6, …), (7, …)].
        Leases granted here never expire on this node: only the leader's timers run.
        """
        if self.leading:
            raise RuntimeError("the writer applies its own entries")
        start = 0
        while start < len(entries) and entries[start][0] <= self.applied_index:
            start += 1
        entries = entries[start:]
        if not entries:
            return
        if entries[0][0] != self.applied_index + 1:
            raise RuntimeError(f"entry {entries[0][0]} does not follow applied index {self.applied_index}")
        revisions: list[tuple[int, bytes]] = []
        compacted = self._apply_entries(entries, revisions)
        self.committed_rev = self.core.rev
        self._db_size = self.store.size()
        if revisions:
            for listener in self.listeners:
                listener(revisions)
        if compacted > self.core.compact_rev:
            self.core.compact(compacted)

    async def promote(self, extend: float) -> None:
        """Follower → writer, once leadership is won: claim the store, apply what the old writer committed
        after ``applied_index``, give every lease its TTL again plus ``extend`` seconds (etcd's
        ``lessor.Promote``: keep-alives went to the old leader, so no deadline seen here is current), then
        start the writer and the lease timers.

        Example: a lease granted with TTL 10 on the old leader, last renewed there 9 s ago, would expire in
        1 s by the old deadline; after ``promote(5)`` it expires in 15 s unless a keep-alive comes.
        """
        if self.leading:
            return
        entries = await self.store.claim(self.applied_index)
        try:
            self.apply_committed(entries)
        except BaseException:
            await self.store.release()
            raise
        self.lessor.promote(extend)
        self._start_writing()
        log.info("leading", extra={"revision": self.committed_rev, "log-index": self.applied_index,
                                   "claimed-entries": len(entries)})

    async def demote(self) -> None:
        """Writer → follower (leadership lost or given up): stop the lease timers and the writer, fail what
        is queued with "not leader", and give the store back; the node then follows from ``applied_index``.

        A batch already inside ``store.append`` finishes first and its callers get its real outcome. Memory
        is then at ``committed_rev`` (a failed batch was rolled back; this only makes sure), so an append
        whose outcome was unknown comes back through ``tail`` if it did land.
        """
        if not self.leading:
            return
        self.leading = False  # from here on, new writes are refused with "not leader"
        for t in self._tasks:
            await cancel_and_wait(t)
        self._tasks = []
        while self._queue:
            _, fut = self._queue.popleft()
            if not fut.done():
                fut.set_exception(errors.NOT_LEADER())
        self._wake.set()
        if self._writer_task is not None:
            await self._writer_task
            self._writer_task = None
        if self._snapshot_task is not None:
            await self._snapshot_task
        if self.core.rev != self.committed_rev:
            self.core.truncate(self.committed_rev)
            self.lessor.rollback(self.core.leased_keys(self.core.rev))
            self.alarms.rollback()
        await self.store.release()
        self.halted = None
        self.halt.clear()
        log.info("following", extra={"revision": self.committed_rev, "log-index": self.applied_index})

    def fail(self, reason: str) -> None:
        """Stop writing for good: memory may no longer match the store; a restart recovers from it."""
        if self.halted is None:
            self.halted = reason
            log.critical("stopped writing", extra={"reason": reason})
            self.halt.set()

    async def stop(self) -> None:
        """Finish what is queued, then stop the writer."""
        for t in self._tasks:
            await cancel_and_wait(t)
        self._stopping = True
        self._wake.set()
        if self._writer_task is not None:
            await self._writer_task
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
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

    def db_size(self) -> int:
        """Bytes the store occupies (etcd's dbSize)."""
        return self.store.size()

    def db_size_in_use(self) -> int:
        """Bytes of the store that hold data (etcd's dbSizeInUse); the rest a defragment gives back."""
        return self.store.size_in_use()

    def key_count(self) -> int:
        """Keys with any retained version (etcd's keys gauge)."""
        return len(self.core)

    def active_alarms(self) -> list[tuple[int, int]]:
        """(member id, alarm type) of every raised alarm."""
        return self.alarms.get()

    def has_alarm(self, alarm: int) -> bool:
        return self.alarms.has(alarm)

    def hash_kv(self, rev: int) -> tuple[int, int, int]:
        """etcd's HashByRev: (hash of the key space at ``rev``, current revision, compact revision)."""
        compact = self.core.compact_rev
        if 0 < rev <= compact:  # etcd 3.5.1 refuses the compaction revision itself too
            raise errors.COMPACTED
        if rev > self.committed_rev:
            raise errors.FUTURE_REV
        return kv_hash.hash_kv(self.core, rev or self.committed_rev), self.committed_rev, compact

    def hash_all(self) -> int:
        """A hash of the whole state (keys, leases, alarms), for etcd's Hash RPC: equal on two servers
        that applied the same history, stable across restarts."""
        h = kv_hash.hash_kv(self.core, self.committed_rev)
        # Auth counts once it was ever changed, so a store that never used auth hashes as it always did.
        auth = self.auth.dump() if self.auth.revision > 1 else b""
        return crc32c.crc32c(self.lessor.dump() + self.alarms.dump() + auth, value=h)

    def lease_status(self, lease_id: int) -> LeaseStatus | None:
        return self.lessor.status(lease_id)

    def lease_ids(self) -> list[int]:
        """Every live lease, soonest to expire first."""
        return [lease.id for lease in self.lessor.by_expiry()]

    # -------------------------------------------------------------- writes (through the writer)

    # Each *_nowait returns the engine's future (no coroutine; see _enqueue); the async forms await it.
    # ``auth_rev``: the auth revision a request's permissions were checked at (0: not checked, auth off).
    # If auth changed before the request is applied, it fails as etcd's apply fails it.

    def put_nowait(
        self, r: pb.PutRequest, auth_rev: int = 0, encode: Encoder | None = None
    ) -> asyncio.Future[pb.PutResponse]:
        return self._enqueue_within_quota(quota.put_cost(r), self.applier.put, r, auth_rev, encode)

    def delete_range_nowait(
        self, r: pb.DeleteRangeRequest, auth_rev: int = 0, encode: Encoder | None = None
    ) -> asyncio.Future[pb.DeleteRangeResponse]:
        return self._enqueue(self.applier.delete_range, r, auth_rev, encode)

    def txn_nowait(
        self, r: pb.TxnRequest, auth_rev: int = 0, encode: Encoder | None = None
    ) -> asyncio.Future[pb.TxnResponse]:
        return self._enqueue_within_quota(quota.txn_cost(r), self.applier.txn, r, auth_rev, encode)

    async def put(self, r: pb.PutRequest, auth_rev: int = 0) -> pb.PutResponse:
        return await self.put_nowait(r, auth_rev)

    async def delete_range(self, r: pb.DeleteRangeRequest, auth_rev: int = 0) -> pb.DeleteRangeResponse:
        return await self.delete_range_nowait(r, auth_rev)

    async def txn(self, r: pb.TxnRequest, auth_rev: int = 0) -> pb.TxnResponse:
        return await self.txn_nowait(r, auth_rev)

    async def compact(self, rev: int) -> int:
        """Compact at ``rev``; returns the current revision for the response header."""
        return await self._submit(_Exclusive(lambda: self._compact(rev)), None)

    async def defragment(self) -> None:
        """Give the space of compacted history back to the file system (etcd's defrag).

        Everything up to now goes into a snapshot, so the log behind it can be dropped, then the store
        rewrites itself compactly. Runs alone in the writer: nothing is pending while the snapshot is cut.
        """
        await self._submit(_Exclusive(self._defragment), None)

    async def alarm(self, action: int, member_id: int, alarm: int) -> list[tuple[int, int]]:
        """etcd's Alarm apply: GET lists; ACTIVATE / DEACTIVATE change it (logged). Returns what to report."""
        if action == pb.AlarmRequest.GET:
            return self.alarms.get(alarm)
        if action == pb.AlarmRequest.ACTIVATE:
            if alarm == alarm_types.NONE:
                return []
            await self._submit(self._activate_alarm, (member_id, alarm))
            return [(member_id, alarm)]
        if action == pb.AlarmRequest.DEACTIVATE:
            return await self._submit(self._deactivate_alarm, (member_id, alarm))
        return []

    def _activate_alarm(self, req: tuple[int, int]) -> None:
        self.alarms.activate(*req)

    def _deactivate_alarm(self, req: tuple[int, int]) -> list[tuple[int, int]]:
        return [req] if self.alarms.deactivate(*req) else []

    def _enqueue_within_quota(
        self, cost: int, fn: Callable, req: Any, auth_rev: int = 0, encode: Encoder | None = None
    ) -> asyncio.Future:
        """etcd's quota check before a write is proposed: if it would not fit, raise NOSPACE and refuse."""
        if quota.fits(self._db_size, cost, self.quota_bytes):
            return self._enqueue(fn, req, auth_rev, encode)
        return asyncio.ensure_future(self._refuse_no_space())

    async def _refuse_no_space(self) -> None:
        try:
            await self._submit(self._activate_alarm, (self.member_id, alarm_types.NOSPACE))
        except errors.EtcdError:
            pass  # the request is refused either way
        raise errors.NO_SPACE

    def _capped(self, fn: Callable, req: Any) -> bool:
        """etcd's applierV3Capped: while NOSPACE is raised, writes that would grow the store fail."""
        if fn == self.applier.put or fn == self.applier.lease_grant:
            return True
        return fn == self.applier.txn and quota.txn_cost(req) > 0

    def lease_grant_nowait(self, r: pb.LeaseGrantRequest) -> asyncio.Future[pb.LeaseGrantResponse]:
        if r.ID == 0:
            r = pb.LeaseGrantRequest(ID=self._new_lease_id(), TTL=r.TTL)
        return self._enqueue_within_quota(quota.LEASE_OVERHEAD, self.applier.lease_grant, r)

    def lease_revoke_nowait(
        self, r: pb.LeaseRevokeRequest, auth_rev: int = 0
    ) -> asyncio.Future[pb.LeaseRevokeResponse]:
        return self._enqueue(self.applier.lease_revoke, r, auth_rev)

    async def lease_grant(self, r: pb.LeaseGrantRequest) -> pb.LeaseGrantResponse:
        return await self.lease_grant_nowait(r)

    async def lease_revoke(self, r: pb.LeaseRevokeRequest, auth_rev: int = 0) -> pb.LeaseRevokeResponse:
        return await self.lease_revoke_nowait(r, auth_rev)

    async def auth_change(self, kind: int, req: Any, authorize: Callable[[], None] | None = None) -> None:
        """An auth change (auth_store.py): runs alone, on a copy of the auth state that takes effect only
        once its log entry is durable. ``authorize`` (the caller's admin check) runs first, against the
        auth state the change meets, as etcd's apply checks it."""
        await self._submit(_Exclusive(lambda: self._auth_change(kind, req, authorize)), None)

    async def _auth_change(self, kind: int, req: Any, authorize: Callable[[], None] | None) -> None:
        if authorize is not None:
            authorize()
        new = self.auth.stage(kind, req)
        if new is None:
            return  # accepted, nothing changes: nothing to log
        index = self.applied_index + 1
        self._check_may_write()
        await self.store.append([(index, log_entry.encode(log_entry.Entry(auth=encode_change(kind, req))))])
        self.applied_index = index
        self._db_size = self.store.size()
        self.auth.install(new, kind, req)
        self._maybe_snapshot()

    async def lease_keepalive(self, lease_id: int) -> int:
        """Renew in memory; returns the granted TTL, 0 for an unknown lease (etcd's answer)."""
        try:
            lease = self.lessor.renew(lease_id)
        except errors.EtcdError:
            return 0
        if lease.checkpoint:
            # A checkpointed remainder would come back after a restart, shorter than the renewal
            # just promised: persist "full TTL again" before answering.
            await self._submit(self.applier.lease_checkpoint, [(lease_id, 0)])
        return lease.ttl

    def _new_lease_id(self) -> int:
        while True:
            lease_id = random.getrandbits(63)
            if lease_id and not self.lessor.exists(lease_id):
                return lease_id

    def _store_error(self, e: StoreError) -> errors.EtcdError:
        """What the callers of a failed batch see; a store we can no longer trust halts all writes."""
        if isinstance(e, Throttled):
            metrics.STORE_THROTTLED.inc()
            return errors.TOO_MANY_REQUESTS()
        if isinstance(e, Corrupt):
            if not self.alarms.has(alarm_types.CORRUPT):
                log.critical("store is damaged: raising CORRUPT, refusing writes", extra={"error": str(e)})
                self.alarms.raise_unlogged(self.member_id, alarm_types.CORRUPT)
            return errors.CORRUPT()
        if isinstance(e, Fenced | Uncertain):
            self.fail(f"{'fenced' if isinstance(e, Fenced) else 'store outcome unknown'}: {e}")
            return errors.NOT_LEADER() if isinstance(e, Fenced) else errors.TIMEOUT()
        return errors.EtcdError("UNAVAILABLE", f"etcdserver: storage failure: {e}")

    def _check_may_write(self) -> None:
        """Right before a durable write: a leader that cannot prove its leadership must not write, since
        someone else may already be writing. Failing as fenced rolls the batch back and halts the writer
        (the replica demotes it)."""
        if self.may_write is not None and not self.may_write():
            raise Fenced("leadership is not proven")

    async def _submit(self, fn: Callable | _Exclusive, req: Any, auth_rev: int = 0) -> Any:
        return await self._enqueue(fn, req, auth_rev)

    def _enqueue(
        self, fn: Callable | _Exclusive, req: Any, auth_rev: int = 0, encode: Encoder | None = None
    ) -> asyncio.Future:
        """Queue a write for the writer; the future resolves once it is durable (or failed, or timed out),
        with the response, or with ``encode(response)`` if an encoder is given.

        A plain future, not a task: transports can answer from its done callback without a coroutine.
        Cancelling it (the client went away) does not withdraw the write, as in etcd once proposed.
        """
        if self.halted is not None:
            raise errors.NOT_LEADER
        if self._stopping:
            raise errors.STOPPED
        if not self.leading:
            raise errors.NOT_LEADER
        if len(self._queue) >= MAX_PENDING:
            raise errors.TOO_MANY_REQUESTS
        loop = self._loop
        fut = loop.create_future()
        self._queue.append(((fn, req, auth_rev, encode), fut))
        self._wake.set()
        self._deadlines.append((time.monotonic() + REQUEST_TIMEOUT, fut))
        if self._sweep is None:
            self._sweep = loop.call_later(TIMEOUT_SWEEP, self._expire)
        return fut

    def _expire(self) -> None:
        """etcd's "request timed out" for writes not durable after REQUEST_TIMEOUT (they may still commit,
        exactly as with etcd's own timeout: the writer skips futures already done)."""
        self._sweep = None
        deadlines = self._deadlines
        now = time.monotonic()
        while deadlines:
            deadline, fut = deadlines[0]
            if not fut.done():
                if deadline > now:
                    break
                fut.set_exception(errors.TIMEOUT())
            deadlines.popleft()
        if deadlines:
            self._sweep = asyncio.get_running_loop().call_later(TIMEOUT_SWEEP, self._expire)

    async def _writer(self) -> None:
        queue = self._queue
        while True:
            if not queue:
                if self._stopping or not self.leading:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            (fn, _, _, _), fut = queue[0]
            if isinstance(fn, _Exclusive):
                queue.popleft()
                await self._run_exclusive(fn, fut)
                continue
            if self._gather_window and self._last_batch > 1:
                # Under concurrency, a remote store's round trip costs more than the wait: let more
                # requests join this batch (fewer Cosmos requests per write; a little latency).
                await asyncio.sleep(self._gather_window)
            self._last_batch = await self._commit_batch()
            self._maybe_snapshot()

    async def _commit_batch(self) -> int:
        """Apply and make durable what is queued (up to MAX_BATCH requests); returns how many it took.

        When the store takes the batch at once (``append_nowait``: the embedded commit log), its callers
        are answered from the store's durable callback (``_durable``), and the listeners (watchers, a
        follower's feed) get the batch when this coroutine resumes: after the answers, before the next
        batch. Example: a lone put of rev 8. The log thread's fdatasync returns; in that loop turn,
        ``committed_rev`` becomes 8 and the put's answer is resolved; its transport writes the answer
        in the same turn, and only then are watchers woken: neither this coroutine's resumption nor the
        listeners' work is on a write's latency.
        """
        batch = self._apply_queued()
        if not batch.entries:
            self._answer(batch)
            return len(batch.done)
        t0 = time.perf_counter()
        in_flight = self._in_flight = self._loop.create_future()
        try:
            self._check_may_write()
            durable = self._loop.create_future()
            if self.store.append_nowait(batch.entries, functools.partial(self._durable, batch, durable)):
                self._encode_answers(batch)  # while the disk works
                await durable
            else:
                await self.store.append(batch.entries)
                self._committed(batch)
                self._answer(batch)
        except StoreError as e:
            self._fail_batch(batch, e)
            return len(batch.done)
        finally:
            # Resolved after what follows too: the callbacks run once committed_rev has moved.
            self._in_flight = None
            in_flight.set_result(None)
        metrics.STORE_APPEND.observe(time.perf_counter() - t0)
        metrics.BATCH_SIZE.observe(len(batch.done))
        if batch.revisions:
            for listener in self.listeners:
                listener(batch.revisions)
        return len(batch.done)

    def _durable(self, batch: _Batch, durable: asyncio.Future, error: StoreError | None) -> None:
        """The store's word on ``batch`` (appended with append_nowait): commit and answer, or fail."""
        if error is None:
            # Durable, whatever became of the writer meanwhile: memory follows the store.
            self._committed(batch)
            self._answer(batch)
            if not durable.done():
                durable.set_result(None)
        elif not durable.done():
            durable.set_exception(error)  # the writer rolls back and fails the batch (_fail_batch)

    def _committed(self, batch: _Batch) -> None:
        self.lessor.commit()
        self.alarms.commit()
        self._db_size = self.store.size()
        self.applied_index = batch.entries[-1][0]
        self.committed_rev = self.core.rev

    @staticmethod
    def _encode_answers(batch: _Batch) -> None:
        """Each result that came with an encoder becomes its encoded answer."""
        done = batch.done
        for i, (fut, res, exc, encode) in enumerate(done):
            if encode is not None and exc is None:
                try:
                    done[i] = (fut, encode(res), None, None)
                except Exception as e:  # a bug in an encoder fails its call, not the batch's others
                    log.exception("encoding an answer failed")
                    done[i] = (fut, None, e, None)

    @classmethod
    def _answer(cls, batch: _Batch) -> None:
        cls._encode_answers(batch)
        for fut, res, exc, _ in batch.done:
            if fut.done():
                continue
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(res)

    def _apply_queued(self) -> _Batch:
        """Apply queued requests to the core and lessor, above ``committed_rev``; nothing is durable yet."""
        queue = self._queue
        core = self.core
        batch = _Batch()
        index = self.applied_index
        while queue and len(batch.done) < MAX_BATCH:
            (fn, req, auth_rev, encode), fut = queue[0]
            if isinstance(fn, _Exclusive):
                break
            queue.popleft()
            before = core.rev
            try:
                if auth_rev and auth_rev != self.auth.revision:
                    raise errors.AUTH_OLD_REVISION
                res = self._apply_one(fn, req)
            except Exception as e:
                batch.done.append((fut, None, e, None))
                continue
            rev = core.rev if core.rev != before else 0
            ops = self.lessor.take_ops() + self.alarms.take_ops()
            if rev or ops:
                kv = core.take_record() if rev else b""
                index += 1
                if ops:
                    entry = log_entry.encode(log_entry.Entry(rev, kv, ops))
                else:
                    entry = log_entry.encode_kv(rev, kv)
                batch.entries.append((index, entry))
                if rev:
                    batch.revisions.append((rev, kv))
            batch.done.append((fut, res, None, encode))
        return batch

    def _apply_one(self, fn: Callable, req: Any) -> Any:
        """Apply one request whole or not at all (raising what its caller should see)."""
        core = self.core
        lessor = self.lessor
        before = core.rev
        try:
            if self.alarms.active:  # none raised: the common case, one test
                if self.alarms.has(alarm_types.CORRUPT) and fn not in self._alarm_ops:
                    raise errors.CORRUPT  # etcd's applierV3Corrupt: every write but alarm changes
                if self.alarms.has(alarm_types.NOSPACE) and self._capped(fn, req):
                    raise errors.NO_SPACE
            return fn(req)
        except errors.EtcdError:
            lessor.ops.clear()  # etcd's checks run before the first mutation: only lease ops to drop
            raise
        except Exception:  # a bug must not leave a half-applied request behind
            log.exception("apply failed")
            core.truncate(before)
            lessor.ops.clear()
            lessor.reattach(core.leased_keys(core.rev))
            raise

    def _fail_batch(self, batch: _Batch, e: StoreError) -> None:
        """The append failed: roll memory back to ``committed_rev`` and fail every request of the batch."""
        log.error("store append failed", extra={"error": str(e), "entries": len(batch.entries)})
        self.core.truncate(self.committed_rev)
        self.lessor.rollback(self.core.leased_keys(self.core.rev))
        self.alarms.rollback()
        err = self._store_error(e)
        for fut, _, _, _ in batch.done:
            if not fut.done():
                fut.set_exception(err)

    async def _run_exclusive(self, op: _Exclusive, fut: asyncio.Future) -> None:
        try:
            res = await op.run()
        except errors.EtcdError as e:
            if not fut.done():
                fut.set_exception(e)
            return
        except StoreError as e:
            if not fut.done():
                fut.set_exception(self._store_error(e))
            return
        if not fut.done():
            fut.set_result(res)

    async def _compact(self, rev: int) -> int:
        if self.alarms.has(alarm_types.CORRUPT):
            raise errors.CORRUPT
        if rev <= self.core.compact_rev:
            raise errors.COMPACTED
        if rev > self.core.rev:
            raise errors.FUTURE_REV
        self._check_may_write()
        # Logged first, so that followers compact where the leader does (and a restart replays it even if
        # the store's own record of it below were lost with a crash in between).
        index = self.applied_index + 1
        entry = log_entry.Entry(ops=[(log_entry.COMPACT, 0, rev)])
        await self.store.append([(index, log_entry.encode(entry))])
        self.applied_index = index
        await self.store.compact(rev)
        self.core.compact(rev)
        return self.committed_rev

    async def _defragment(self) -> None:
        t0 = time.monotonic()
        before = self.store.size()
        if self.applied_index:
            # Even with no entry since the last snapshot: that one may still hold history compacted since.
            if self._snapshot_task is not None:
                await self._snapshot_task
            self._last_snapshot_index = self.applied_index
            await self.store.save_snapshot(self.applied_index, self._snapshot_chunks())
        await self.store.defragment()
        self._db_size = self.store.size()
        log.info(
            "finished defragmenting",
            extra={"current-db-size-bytes": before, "new-db-size-bytes": self._db_size,
                   "took": f"{time.monotonic() - t0:.3f}s"},
        )

    # -------------------------------------------------------------- lease timers

    async def _expire_leases(self) -> None:
        """Revoke leases whose deadline passed; each revoke is its own revision, as in etcd."""
        while True:
            await asyncio.sleep(LEASE_EXPIRY_TICK)
            expired = self.lessor.expired()
            if not expired:
                continue
            results = await asyncio.gather(
                *(self._submit(self._revoke_expired, lease_id) for lease_id in expired),
                return_exceptions=True,
            )
            for lease_id, res in zip(expired, results, strict=True):
                if isinstance(res, errors.STOPPED):
                    return
                if isinstance(res, BaseException):
                    log.warning("lease expiry failed", extra={"lease-id": lease_id, "error": str(res)})
                    self.lessor.rearm(lease_id)

    def _revoke_expired(self, lease_id: int) -> pb.LeaseRevokeResponse | None:
        if not self.lessor.exists(lease_id):
            return None  # revoked by a client meanwhile
        return self.applier.lease_revoke(pb.LeaseRevokeRequest(ID=lease_id), only_if_expired=True)

    async def _checkpoint_leases(self) -> None:
        """Persist remaining TTLs, so that restarts do not keep granting a lease its full TTL anew."""
        while True:
            await asyncio.sleep(self.checkpoint_interval)
            now = self.lessor.clock()
            cps = []
            for lease in self.lessor.leases.values():
                remaining = max(math.ceil(lease.remaining(now)), 1)
                if remaining < lease.ttl and remaining != lease.checkpoint:
                    cps.append((lease.id, remaining))
            if cps:
                try:
                    await self._submit(self.applier.lease_checkpoint, cps)
                except errors.EtcdError as e:
                    if isinstance(e, errors.STOPPED):
                        return

    # -------------------------------------------------------------- snapshots

    def _maybe_snapshot(self) -> None:
        """Bound start-up replay: every ``snapshot_count`` entries, persist the whole state."""
        if self.applied_index - self._last_snapshot_index < self.snapshot_count:
            return
        if self._snapshot_task is not None and not self._snapshot_task.done():
            return
        index = self.applied_index
        self._last_snapshot_index = index
        self._snapshot_task = asyncio.create_task(self._save_snapshot(index, self._snapshot_chunks()))

    def snapshot_bytes(self) -> bytes:
        """The whole state at ``committed_rev``, as ``_load_snapshot`` reads it back."""
        return pack_snapshot(
            self.core.dump(self.committed_rev), self.lessor.dump(), self.alarms.dump(), self.auth.dump()
        )

    def _snapshot_chunks(self) -> list[bytes]:
        data = self.snapshot_bytes()
        return [data[i : i + SNAPSHOT_CHUNK] for i in range(0, len(data), SNAPSHOT_CHUNK)]

    def _load_snapshot(self, data: bytes) -> None:
        if data.startswith(SNAPSHOT_MAGIC):
            pos = len(SNAPSHOT_MAGIC)
            n_core, n_leases, n_alarms = struct.unpack_from("<QQQ", data, pos)
            pos += 24
            self.core.load(data[pos : pos + n_core])
            pos += n_core
            self.lessor.load(data[pos : pos + n_leases])
            pos += n_leases
            self.alarms.load(data[pos : pos + n_alarms])
            self.auth.load(data[pos + n_alarms :])
            return
        if not data.startswith(SNAPSHOT_MAGIC_V2):  # written before alarms were state
            (n,) = struct.unpack_from("<Q", data)
            self.core.load(data[8 : 8 + n])
            self.lessor.load(data[8 + n :])
            return
        pos = len(SNAPSHOT_MAGIC_V2)
        n_core, n_leases = struct.unpack_from("<QQ", data, pos)
        pos += 16
        self.core.load(data[pos : pos + n_core])
        self.lessor.load(data[pos + n_core : pos + n_core + n_leases])
        self.alarms.load(data[pos + n_core + n_leases :])

    async def _save_snapshot(self, index: int, chunks: list[bytes]) -> None:
        try:
            await self.store.save_snapshot(index, chunks)
            log.info("saved snapshot", extra={"index": index, "bytes": sum(map(len, chunks))})
        except StoreError as e:
            log.error("snapshot failed", extra={"index": index, "error": str(e)})
