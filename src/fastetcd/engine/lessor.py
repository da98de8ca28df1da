"""Leases: etcd's lessor, driven by the single writer.

Grants, revokes and TTL checkpoints are log operations (they survive restarts and reach replicas);
keep-alives only move an in-memory deadline. One heap of deadlines serves every lease, so tens of
thousands of leases cost no timers. Which keys hang on which lease is derived state: it follows the puts
and deletes the writer applies and is rebuilt from the key space after a restart.
"""

from __future__ import annotations

import heapq
import struct
import time
from collections.abc import Callable
from typing import NamedTuple

from fastetcd import errors
from fastetcd.engine.log_entry import LEASE_CHECKPOINT, LEASE_GRANT, LEASE_REVOKE

# etcd's bounds: TTLs above this are refused; below the minimum (derived from the election timeout,
# 2 s with etcd's defaults) are raised to it.
MAX_TTL = 9_000_000_000
MIN_TTL = 2


class Lease:
    __slots__ = ("id", "ttl", "expiry", "keys", "checkpoint")

    def __init__(self, lease_id: int, ttl: int, expiry: float) -> None:
        self.id = lease_id
        self.ttl = ttl
        self.expiry = expiry
        self.keys: set[bytes] = set()
        self.checkpoint = 0  # remaining TTL persisted by the last checkpoint; 0 = none (full ttl)

    def remaining(self, now: float) -> float:
        return self.expiry - now


class LeaseStatus(NamedTuple):
    """What LeaseTimeToLive reports of one lease."""

    id: int
    remaining: int  # whole seconds left (etcd truncates)
    granted: int  # the TTL the lease was granted with
    keys: list[bytes]  # attached keys, sorted


class Lessor:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.leases: dict[int, Lease] = {}
        self._heap: list[tuple[float, int]] = []
        self.ops: list[tuple[int, int, int]] = []  # lease operations of the entry being built
        self._undo: list[Callable[[], None]] = []  # reverts this batch's grants/revokes/checkpoints

    # -------------------------------------------------------------- queries

    def exists(self, lease_id: int) -> bool:
        return lease_id in self.leases

    def get(self, lease_id: int) -> Lease | None:
        return self.leases.get(lease_id)

    def status(self, lease_id: int) -> LeaseStatus | None:
        lease = self.leases.get(lease_id)
        if lease is None:
            return None
        # etcd truncates the remaining duration to whole seconds
        return LeaseStatus(lease.id, int(lease.remaining(self.clock())), lease.ttl, sorted(lease.keys))

    def by_expiry(self) -> list[Lease]:
        return sorted(self.leases.values(), key=lambda le: le.expiry)

    def expired(self, limit: int = 1000) -> list[int]:
        """Ids of leases past their deadline (stale heap entries are dropped on the way)."""
        now = self.clock()
        out: list[int] = []
        heap = self._heap
        while heap and heap[0][0] <= now and len(out) < limit:
            expiry, lease_id = heapq.heappop(heap)
            lease = self.leases.get(lease_id)
            if lease is not None and lease.expiry == expiry:
                out.append(lease_id)
        return out

    def rearm(self, lease_id: int) -> None:
        """Put a lease whose expiry revoke failed back in line: ``expired`` dropped its heap entry, and
        without one the lease would never be tried again (etcd retries a failed expiry too)."""
        lease = self.leases.get(lease_id)
        if lease is not None:
            heapq.heappush(self._heap, (lease.expiry, lease_id))

    # -------------------------------------------------------------- writer-side mutations

    def grant(self, lease_id: int, ttl: int) -> Lease:
        if ttl > MAX_TTL:
            raise errors.LEASE_TTL_TOO_LARGE
        if lease_id in self.leases:
            raise errors.LEASE_EXIST
        ttl = max(ttl, MIN_TTL)
        lease = self._insert(lease_id, ttl, 0)
        self.ops.append((LEASE_GRANT, lease_id, ttl))
        self._undo.append(lambda: self.leases.pop(lease_id, None))
        return lease

    def revoke(self, lease_id: int) -> None:
        lease = self.leases.pop(lease_id)
        self.ops.append((LEASE_REVOKE, lease_id, 0))
        self._undo.append(lambda: self.leases.__setitem__(lease_id, lease))

    def set_checkpoint(self, lease_id: int, remaining: int) -> None:
        lease = self.leases.get(lease_id)
        if lease is None:
            return
        before = lease.checkpoint
        lease.checkpoint = remaining
        self.ops.append((LEASE_CHECKPOINT, lease_id, remaining))
        self._undo.append(lambda: setattr(lease, "checkpoint", before))

    def attach(self, lease_id: int, key: bytes) -> None:
        lease = self.leases.get(lease_id)
        if lease is not None:
            lease.keys.add(key)

    def detach(self, lease_id: int, key: bytes) -> None:
        lease = self.leases.get(lease_id)
        if lease is not None:
            lease.keys.discard(key)

    def take_ops(self) -> list[tuple[int, int, int]]:
        ops, self.ops = self.ops, []
        return ops

    def commit(self) -> None:
        """The batch is durable: its changes stay."""
        self._undo.clear()

    def rollback(self, leased_keys: list[tuple[bytes, int]]) -> None:
        """The batch failed: undo its lease changes and rebuild key attachments from the key space."""
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        self.ops.clear()
        self.reattach(leased_keys)

    def reattach(self, leased_keys: list[tuple[bytes, int]]) -> None:
        for lease in self.leases.values():
            lease.keys.clear()
        for key, lease_id in leased_keys:
            self.attach(lease_id, key)

    # -------------------------------------------------------------- in-memory only

    def renew(self, lease_id: int) -> Lease:
        lease = self.leases.get(lease_id)
        now = self.clock()
        if lease is None or lease.remaining(now) <= 0:
            # etcd does not resurrect an expired lease whose revoke is under way
            raise errors.LEASE_NOT_FOUND
        lease.expiry = now + lease.ttl
        heapq.heappush(self._heap, (lease.expiry, lease_id))
        return lease

    def _insert(self, lease_id: int, ttl: int, remaining: int) -> Lease:
        lease = Lease(lease_id, ttl, self.clock() + (remaining or ttl))
        lease.checkpoint = remaining
        self.leases[lease_id] = lease
        heapq.heappush(self._heap, (lease.expiry, lease_id))
        return lease

    # -------------------------------------------------------------- leadership changes

    def promote(self, extend: float) -> None:
        """This node became the leader: every deadline it holds is stale (keep-alives went to the old
        leader), so each lease gets what a restart would give it (the checkpointed remainder, else the
        full TTL) plus ``extend`` seconds, as etcd's ``lessor.Promote``; e.g. TTL 10 with no checkpoint
        and extend 5: expires 15 s from now unless renewed."""
        now = self.clock()
        for lease in self.leases.values():
            lease.expiry = now + (lease.checkpoint or lease.ttl) + extend
        self._heap = [(lease.expiry, lease.id) for lease in self.leases.values()]
        heapq.heapify(self._heap)

    def drop_stale(self) -> None:
        """On a follower nothing pops the deadline heap (no expiry runs there), so the entries that
        grants, revokes and checkpoints leave behind are dropped here once they outnumber the leases."""
        if len(self._heap) > 2 * len(self.leases) + 1024:
            self._heap = [(lease.expiry, lease.id) for lease in self.leases.values()]
            heapq.heapify(self._heap)

    # -------------------------------------------------------------- replay and snapshots

    def replay(self, ops: list[tuple[int, int, int]]) -> None:
        """Apply logged lease operations at start-up. Deadlines start from now: a restart never
        shortens a lease below what it had left (full TTL, or the checkpointed remainder)."""
        for op, lease_id, arg in ops:
            if op == LEASE_GRANT:
                self._insert(lease_id, arg, 0)
            elif op == LEASE_REVOKE:
                self.leases.pop(lease_id, None)
            elif op == LEASE_CHECKPOINT:
                lease = self.leases.get(lease_id)
                if lease is not None:
                    lease.checkpoint = arg
                    lease.expiry = self.clock() + (arg or lease.ttl)
                    heapq.heappush(self._heap, (lease.expiry, lease_id))

    def dump(self) -> bytes:
        """The persisted lease state (ttl and checkpointed remainder; deadlines are not persisted)."""
        return b"".join(struct.pack("<qqq", le.id, le.ttl, le.checkpoint) for le in self.leases.values())

    def load(self, data: bytes) -> None:
        for lease_id, ttl, remaining in struct.iter_unpack("<qqq", data):
            self._insert(lease_id, ttl, remaining)
