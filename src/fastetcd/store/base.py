"""The Store protocol: what the engine needs from durable storage.

The engine is the single writer. It hands the store batches of log entries and treats a batch as
committed only when ``append`` returns. Entries are numbered by their **log index**, not by etcd revision:
most entries carry one revision, but some carry none (a lease grant or a TTL checkpoint changes no key).
Example: put a (rev 2), grant lease L, put b (rev 3) are log indexes 1, 2, 3. A store therefore never sees
an index twice and never sees a gap: indexes are contiguous and strictly increasing, which
``check_append`` guards in every store.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol


class StoreError(Exception):
    """The store could not make a batch durable; none of the batch's records are committed."""


class Uncertain(StoreError):
    """The outcome of an append is unknown (timeout, lost connection)."""


class Fenced(StoreError):
    """Another writer has taken over the store; this node must stop writing."""


class Corrupt(StoreError):
    """The store found its own data damaged: it accepts nothing more until an operator restores it."""


class Throttled(StoreError):
    """The store refused the batch for load (Cosmos 429s beyond the retry budget); try again later."""


class Behind(StoreError):
    """A follower asked for entries that a newer snapshot replaced (and cleanup removed): it must reload
    from the snapshot instead of tailing."""


@dataclass
class Recovered:
    """What ``Store.open`` found on disk: the newest snapshot plus every record after it."""

    snapshot_index: int = 0  # log index the snapshot covers (0: no snapshot)
    snapshot: bytes | None = None  # opaque bytes written by save_snapshot (the core's dump)
    compact_rev: int = -1  # a revision, not an index; -1: never compacted (etcd allows Compact(0) first)
    entries: list[tuple[int, bytes]] = field(default_factory=list)  # (log index, entry), ascending


# Told once whether an append is durable: None, or the StoreError that says it is not (or is uncertain).
DurableCallback = Callable[[StoreError | None], None]


class Store(Protocol):
    # Seconds the engine may wait to gather more requests into a batch under concurrency: worth it when
    # an append is a network round trip (Cosmos), not for a local fsync. Optional; 0 if absent.
    gather_window: float

    async def open(self, *, writer: bool = True) -> Recovered:
        """Open (creating if needed) and return the recovered state.

        ``writer=False`` opens as a follower: read everything committed, claim nothing; the store then
        serves ``tail`` until ``claim`` makes this node the writer.
        """

    async def tail(self, after: int) -> list[tuple[int, bytes]]:
        """Entries committed after log index ``after`` (ascending, contiguous from ``after + 1``; [] if none
        yet), as far as one read gets. Raises ``Behind`` when ``after + 1`` is no longer in the log."""

    async def claim(self, after: int) -> list[tuple[int, bytes]]:
        """Become the writer (only once leadership says so): fence every earlier writer and return the entries
        committed after ``after`` that the caller has not applied, which it must apply before appending."""

    async def release(self) -> None:
        """Stop being the writer (leadership lost): later appends fail, ``tail`` keeps working."""

    async def append(self, entries: list[tuple[int, bytes]]) -> None:
        """Make ``entries`` (log index, entry) durable in one atomic step; raise StoreError if it did not."""

    def append_nowait(self, entries: list[tuple[int, bytes]], on_durable: DurableCallback) -> bool:
        """``append`` when the store can take the entries at once without a coroutine: True, and
        ``on_durable`` is later called from the event loop with None (durable) or the StoreError. False:
        nothing was done; the caller uses ``append``. A store may always answer False."""

    async def compact(self, rev: int) -> None:
        """Persist that revisions below ``rev`` are compacted (survives restart)."""

    async def save_snapshot(self, index: int, chunks: Iterable[bytes]) -> None:
        """Persist a snapshot of the state after log index ``index``; entries <= index may then be dropped."""

    def size(self) -> int:
        """Bytes the store occupies (etcd's db size)."""

    def size_in_use(self) -> int:
        """Bytes of ``size`` that hold live data (etcd's dbSizeInUse)."""

    async def defragment(self) -> None:
        """Give the space that dropped log entries and snapshots left behind back to the file system."""

    async def close(self) -> None:
        """Flush and release everything."""


def check_append(entries: list[tuple[int, bytes]], last_index: int | None) -> None:
    """A bug guard, not a feature: the engine must hand over contiguous indexes right after the stored ones.

    ``last_index`` is the newest index stored (log or snapshot); None for a store that holds nothing, where
    any first index >= 1 may start the log. Appending 7, 8 after 6 passes; 8 after 6 (a gap), 6 after 6
    (a repeat) or 7, 9 (a hole inside the batch) raise StoreError.
    """
    first = entries[0][0]
    if last_index is None:
        if first < 1:
            raise StoreError(f"append of invalid index {first}")
    elif first != last_index + 1:
        raise StoreError(f"append of index {first} does not follow stored index {last_index}")
    for i, (index, _) in enumerate(entries):
        if index != first + i:
            raise StoreError(f"append batch is not contiguous: index {index} at position {i} after {first}")
