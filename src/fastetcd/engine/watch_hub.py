"""The watch hub: committed events → the watchers that want them (etcd's watchable store).

Synced watchers sit in a ``WatchIndex`` and receive each committed revision as it lands, every event
encoded once and the same bytes shared by every watcher that receives it. A watcher that starts in the
past, or whose stream stops draining, is *unsynced*: it leaves the index and a catch-up task replays its
events from the MVCC history, a bounded window at a time and only while its stream has room, then
rejoins the index. So a slow client costs history reads, never an unbounded buffer, and never holds up
anyone else.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from fastetcd._core import MVCC, WatchIndex, encode_event

log = logging.getLogger(__name__)

# A catch-up step replays at most this many revisions (etcd's watchBatchMaxRevs).
CATCH_UP_REVS = 1000


class Sink(Protocol):
    """Where a watcher's responses go (a watch stream of the server layer)."""

    watchers: dict[int, Watcher]  # this sink's watchers by watch id

    def send_events(self, w: Watcher, rev: int, events: list[bytes]) -> None: ...
    def send_compacted(self, w: Watcher, compact_rev: int) -> None: ...
    def send_progress(self, w: Watcher | None, rev: int) -> None: ...
    def congested(self) -> bool: ...
    def on_synced(self) -> None: ...


class Watcher:
    __slots__ = (
        "hid",
        "sink",
        "watch_id",
        "key",
        "end",
        "prev_kv",
        "no_put",
        "no_delete",
        "progress_notify",
        "fragment",
        "next_rev",
        "synced",
        "quiet",
    )

    def __init__(
        self,
        sink: Sink,
        watch_id: int,
        key: bytes,
        end: bytes,
        start_rev: int,
        *,
        prev_kv: bool = False,
        no_put: bool = False,
        no_delete: bool = False,
        progress_notify: bool = False,
        fragment: bool = False,
    ) -> None:
        self.hid = 0
        self.sink = sink
        self.watch_id = watch_id
        self.key = key
        self.end = end
        self.prev_kv = prev_kv
        self.no_put = no_put
        self.no_delete = no_delete
        self.progress_notify = progress_notify
        self.fragment = fragment
        self.next_rev = start_rev  # every event below this revision has been handed to the sink
        self.synced = False
        self.quiet = True  # nothing sent since the last progress tick


class _Event:
    """One committed event and its two encodings (with and without prev_kv), made on first use."""

    __slots__ = ("is_delete", "kv", "prev", "_plain", "_with_prev")

    def __init__(self, is_delete: bool, kv: bytes, prev: bytes | None) -> None:
        self.is_delete = is_delete
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


def _select(w: Watcher, events: list[_Event]) -> list[bytes]:
    return [
        ev.encoded(w.prev_kv)
        for ev in events
        if not ((ev.is_delete and w.no_delete) or (not ev.is_delete and w.no_put))
    ]


class WatchHub:
    def __init__(self, core: MVCC, committed_rev: int) -> None:
        self.core = core
        self.committed_rev = committed_rev
        self.index = WatchIndex()
        self.watchers: dict[int, Watcher] = {}
        self.unsynced: set[Watcher] = set()
        self._next_hid = 1
        self._kick = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._catch_up_loop(), name="fastetcd-watch-catch-up")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    # -------------------------------------------------------------- watcher life cycle

    def add(self, w: Watcher) -> None:
        """Register ``w`` (its ``next_rev`` is the requested start revision, 0 for "from now on")."""
        hid = self._next_hid
        while hid in self.watchers or hid == 0:
            hid = (hid + 1) & 0xFFFFFFFF
        self._next_hid = (hid + 1) & 0xFFFFFFFF
        w.hid = hid
        self.watchers[hid] = w
        if w.next_rev == 0 or w.next_rev > self.committed_rev:
            w.next_rev = max(w.next_rev, self.committed_rev + 1)
            self._sync(w)
        else:
            self.unsynced.add(w)
            self._kick.set()

    def remove(self, w: Watcher) -> None:
        if self.watchers.pop(w.hid, None) is None:
            return
        if w.synced:
            self.index.remove(w.hid, w.key, w.end)
        self.unsynced.discard(w)

    def kick(self) -> None:
        """A stream drained: resume catching up its watchers."""
        if self.unsynced:
            self._kick.set()

    def _sync(self, w: Watcher) -> None:
        w.synced = True
        self.unsynced.discard(w)
        self.index.add(w.hid, w.key, w.end)

    def _unsync(self, w: Watcher) -> None:
        if w.synced:
            w.synced = False
            self.index.remove(w.hid, w.key, w.end)
            self.unsynced.add(w)

    # -------------------------------------------------------------- live events

    def publish(self, revisions: list[tuple[int, bytes]]) -> None:
        """Deliver committed revisions (revision, KV record) to the synced watchers that match."""
        core = self.core
        index = self.index
        watchers = self.watchers
        for rev, record in revisions:
            self.committed_rev = rev
            if not watchers:
                continue
            raw = core.events(rev, record)
            events = [_Event(d, kv, prev) for d, _key, kv, prev in raw]
            matched: dict[int, list[_Event]] = {}
            for i, ev in enumerate(raw):
                ids = index.match(ev[1])
                if ids is not None:
                    for hid in ids:
                        lst = matched.get(hid)
                        if lst is None:
                            matched[hid] = [events[i]]
                        else:
                            lst.append(events[i])
            for hid, evs in matched.items():
                w = watchers[hid]
                if rev < w.next_rev:
                    continue  # a watcher that asked to start in the future
                if w.sink.congested():
                    # Leave it where it is; the catch-up task replays from next_rev once the stream drains.
                    for other in list(w.sink.watchers.values()):
                        self._unsync(other)
                    continue
                w.next_rev = rev + 1
                selected = _select(w, evs)
                if selected:
                    w.quiet = False
                    w.sink.send_events(w, rev, selected)
        if self.unsynced:
            self._kick.set()

    # -------------------------------------------------------------- progress

    def all_synced(self, sink: Sink) -> bool:
        return not any(w.sink is sink for w in self.unsynced)

    def progress_tick(self) -> None:
        """etcd's progress notification: synced watchers that asked for it and heard nothing lately."""
        for w in list(self.watchers.values()):
            if w.progress_notify and w.synced:
                if w.quiet and not w.sink.congested():
                    w.sink.send_progress(w, self.committed_rev)
                w.quiet = True

    # -------------------------------------------------------------- catch-up (unsynced watchers)

    async def _catch_up_loop(self) -> None:
        while True:
            await self._kick.wait()
            self._kick.clear()
            try:
                self._catch_up()
            except Exception:
                log.exception("watch catch-up failed")
            await asyncio.sleep(0)

    def _catch_up(self) -> None:
        core = self.core
        for w in list(self.unsynced):
            if w.hid not in self.watchers:
                continue
            while not w.sink.congested():
                if w.next_rev < core.compact_rev:
                    self.remove(w)
                    w.sink.send_compacted(w, core.compact_rev)
                    break
                top = min(self.committed_rev, w.next_rev + CATCH_UP_REVS - 1)
                self._replay(w, core.history(w.key, w.end, w.next_rev, top), top)
                w.next_rev = top + 1
                if top >= self.committed_rev:
                    self._sync(w)
                    if self.all_synced(w.sink):
                        w.sink.on_synced()
                    break
        if self.unsynced and any(not w.sink.congested() for w in self.unsynced):
            self._kick.set()

    def _replay(self, w: Watcher, history: list[tuple], top: int) -> None:
        """Send history events to ``w``, one response per revision, header revision = current."""
        i = 0
        n = len(history)
        while i < n:
            rev = history[i][0]
            evs = []
            while i < n and history[i][0] == rev:
                _, is_delete, _key, kv, prev = history[i]
                evs.append(_Event(is_delete, kv, prev))
                i += 1
            selected = _select(w, evs)
            if selected:
                w.quiet = False
                w.sink.send_events(w, self.committed_rev, selected)
