"""The Store protocol: what the engine needs from durable storage.

The engine is the single writer. It hands the store batches of log records, one record per etcd
revision, and treats a batch as committed only when ``append`` returns. A store therefore never sees a
revision twice and never sees a gap: records are contiguous and strictly increasing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol


class StoreError(Exception):
    """The store could not make a batch durable; none of the batch's records are committed."""


class Uncertain(StoreError):
    """The outcome of an append is unknown (timeout, lost connection)."""


class Fenced(StoreError):
    """Another writer has taken over the store; this node must stop writing."""


class Throttled(StoreError):
    """The store refused the batch for load (Cosmos 429s beyond the retry budget); try again later."""


@dataclass
class Recovered:
    """What ``Store.open`` found on disk: the newest snapshot plus every record after it."""

    snapshot_rev: int = 0
    snapshot: bytes | None = None  # opaque bytes written by save_snapshot (the core's dump)
    compact_rev: int = -1  # -1: never compacted (etcd allows a first Compact at revision 0)
    records: list[tuple[int, bytes]] = field(default_factory=list)  # (revision, record), ascending


class Store(Protocol):
    # Seconds the engine may wait to gather more requests into a batch under concurrency: worth it when
    # an append is a network round trip (Cosmos), not for a local fsync. Optional; 0 if absent.
    gather_window: float

    async def open(self) -> Recovered:
        """Open (creating if needed) and return the recovered state."""

    async def append(self, records: list[tuple[int, bytes]]) -> None:
        """Make ``records`` durable in one atomic step; raise StoreError if it did not happen."""

    async def compact(self, rev: int) -> None:
        """Persist that revisions below ``rev`` are compacted (survives restart)."""

    async def save_snapshot(self, rev: int, chunks: Iterable[bytes]) -> None:
        """Persist a snapshot of the state at ``rev``; records <= rev may then be dropped."""

    def size(self) -> int:
        """Bytes the store occupies (etcd's db size)."""

    async def close(self) -> None:
        """Flush and release everything."""
