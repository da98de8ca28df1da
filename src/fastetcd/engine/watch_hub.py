"""The watch hub: committed events → the watch streams that want them (etcd's watchable store).

Delivery is pulled, not pushed. Every committed revision's events go once into a bounded ring (each event
encoded at most twice, with and without prev_kv, and those bytes shared by every watcher). The hub then
only wakes the streams whose watchers match one of the keys (a Cython ``WatchIndex`` over stream ids).
A woken stream sends each of its watchers everything from the watcher's position up to the committed
revision in as few responses as fit, so a busy watcher gets many revisions per message instead of a
message per revision, and a stream whose client stops reading just stops advancing: nothing is buffered
for it. A watcher that falls behind the ring (or starts before it) reads its events from the MVCC history
instead, a bounded window at a time.
"""

from __future__ import annotations

import logging
from typing import Protocol

from fastetcd._core import MVCC, encode_event
from fastetcd._watch_index import WatchIndex

log = logging.getLogger(__name__)

# History reads for a watcher behind the ring cover at most this many revisions (etcd's watchBatchMaxRevs).
CATCH_UP_REVS = 1000
# The ring keeps at least this many recent revisions, and more while they fit in RING_BYTES (counting
# each event's kv and prev_kv twice, for the two encodings it may get).
RING_MIN_REVS = 1024
RING_BYTES = 32 << 20


class Sink(Protocol):
    """A watch stream of the server layer, as the hub sees it."""

    def wake(self) -> None: ...


class Watcher:
    __slots__ = (
        "watch_id",
        "key",
        "end",
        "prev_kv",
        "no_put",
        "no_delete",
        "progress_notify",
        "fragment",
        "next_rev",
        "quiet",
    )

    def __init__(
        self,
        watch_id: int,
        key: bytes,
        end: bytes,
        next_rev: int,
        *,
        prev_kv: bool = False,
        no_put: bool = False,
        no_delete: bool = False,
        progress_notify: bool = False,
        fragment: bool = False,
    ) -> None:
        self.watch_id = watch_id
        self.key = key
        self.end = end  # b"" = the key alone, b"\0" = every key >= key, else [key, end)
        self.prev_kv = prev_kv
        self.no_put = no_put
        self.no_delete = no_delete
        self.progress_notify = progress_notify
        self.fragment = fragment
        self.next_rev = next_rev  # every event below this revision has been sent
        self.quiet = True  # nothing sent since the last progress tick

    def signature(self) -> tuple:
        """Watchers with equal signatures receive identical event lists: computed once per stream cycle."""
        return (self.key, self.end, self.prev_kv, self.no_put, self.no_delete, self.next_rev)


class Event:
    """One committed event and its encodings (with and without prev_kv), made on first use."""

    __slots__ = ("is_delete", "key", "kv", "prev", "_plain", "_with_prev")

    def __init__(self, is_delete: bool, key: bytes, kv: bytes, prev: bytes | None) -> None:
        self.is_delete = is_delete
        self.key = key
        self.kv = kv
        self.prev = prev
        self._plain: bytes | None = None
        self._with_prev: bytes | None = None

    def encoded(self, prev_kv: bool) -> bytes:
        if prev_kv and self.prev is not None:
            if self._with_prev is None:
                self._with_prev = encode_event(self.is_delete, self.kv, self.prev)
            return self._with_prev
        if self._plain is None:
            self._plain = encode_event(self.is_delete, self.kv, None)
        return self._plain


def _in_range(key: bytes, start: bytes, end: bytes) -> bool:
    if not end:
        return key == start
    if end == b"\x00":
        return key >= start
    return start <= key < end


class WatchHub:
    def __init__(self, core: MVCC, committed_rev: int) -> None:
        self.core = core
        self.committed_rev = committed_rev
        self.index = WatchIndex()
        self._sinks: dict[int, Sink] = {}
        self._refs: dict[tuple[int, bytes, bytes], int] = {}
        self._next_sid = 1
        self._ring: list[list[Event]] = []  # events of revision ring_start + i
        self._ring_start = committed_rev + 1
        self._ring_bytes: list[int] = []
        self._ring_total = 0

    def watcher_count(self) -> int:
        return sum(self._refs.values())

    def stream_count(self) -> int:
        return len(self._sinks)

    def ring_bytes(self) -> int:
        return self._ring_total

    # -------------------------------------------------------------- streams and watchers

    def register(self, sink: Sink) -> int:
        sid = self._next_sid
        self._next_sid += 1
        self._sinks[sid] = sink
        return sid

    def unregister(self, sid: int) -> None:
        self._sinks.pop(sid, None)
        for ref in [r for r in self._refs if r[0] == sid]:
            del self._refs[ref]
            self.index.remove(sid, ref[1], ref[2])

    def watch(self, sid: int, w: Watcher) -> None:
        ref = (sid, w.key, w.end)
        n = self._refs.get(ref, 0)
        if n == 0:
            self.index.add(sid, w.key, w.end)
        self._refs[ref] = n + 1

    def unwatch(self, sid: int, w: Watcher) -> None:
        ref = (sid, w.key, w.end)
        n = self._refs.get(ref, 0) - 1
        if n <= 0:
            self._refs.pop(ref, None)
            self.index.remove(sid, w.key, w.end)
        else:
            self._refs[ref] = n

    # -------------------------------------------------------------- committed events

    def publish(self, revisions: list[tuple[int, bytes]]) -> None:
        """Record committed revisions (revision, KV record) and wake the streams they concern."""
        core = self.core
        woken: set[int] = set()
        index = self.index
        for rev, record in revisions:
            events = [Event(d, key, kv, prev) for d, key, kv, prev in core.events(rev, record)]
            self._ring.append(events)
            size = 2 * sum(len(e.kv) + len(e.prev or b"") for e in events)
            self._ring_bytes.append(size)
            self._ring_total += size
            self.committed_rev = rev
            if self._sinks:
                for ev in events:
                    ids = index.match(ev.key)
                    if ids is not None:
                        woken.update(ids)
        self._trim()
        for sid in woken:
            sink = self._sinks.get(sid)
            if sink is not None:
                sink.wake()

    def _trim(self) -> None:
        n = len(self._ring)
        if n <= RING_MIN_REVS or self._ring_total <= RING_BYTES:
            return
        drop = 0
        total = self._ring_total
        while n - drop > RING_MIN_REVS and total > RING_BYTES:
            total -= self._ring_bytes[drop]
            drop += 1
        del self._ring[:drop]
        del self._ring_bytes[:drop]
        self._ring_total = total
        self._ring_start += drop

    def collect(self, w: Watcher, upto: int, max_bytes: int) -> tuple[list[bytes], int] | None:
        """Encoded events for ``w`` from its position through at most revision ``upto``.

        Returns (events, last revision covered), whole revisions only, stopping early once ``max_bytes`` is
        exceeded; or None if the events it needs were compacted away (etcd cancels such a watcher).
        """
        start = w.next_rev
        key, end = w.key, w.end
        no_put, no_delete, prev_kv = w.no_put, w.no_delete, w.prev_kv
        out: list[bytes] = []
        size = 0
        compact_rev = self.core.compact_rev
        if start < self._ring_start:
            if start < compact_rev:
                return None
            top = min(upto, start + CATCH_UP_REVS - 1, self._ring_start - 1)
            last = top
            cur = -1
            for rev, is_delete, _key, kv, prev in self.core.history(key, end, start, top):
                if rev != cur:
                    if size > max_bytes:
                        last = cur
                        break
                    cur = rev
                if (is_delete and no_delete) or (not is_delete and no_put):
                    continue
                # etcd reads prev_kv at rev-1 when it sends: below the compaction there is none
                ev = encode_event(is_delete, kv, prev if prev_kv and rev > compact_rev else None)
                out.append(ev)
                size += len(ev)
            return out, last
        ring = self._ring
        base = self._ring_start
        last = upto
        for rev in range(start, upto + 1):
            if size > max_bytes:
                last = rev - 1
                break
            with_prev = prev_kv and rev > compact_rev
            # compaction at C keeps no tombstone at C: etcd's history has none to replay
            drop_deletes = no_delete or rev <= compact_rev
            for ev in ring[rev - base]:
                if _in_range(ev.key, key, end) and not (
                    (ev.is_delete and drop_deletes) or (not ev.is_delete and no_put)
                ):
                    enc = ev.encoded(with_prev)
                    out.append(enc)
                    size += len(enc)
        return out, last
