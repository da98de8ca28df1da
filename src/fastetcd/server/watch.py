"""The Watch service (etcdserverpb.Watch), transport-neutral: request bytes in, response bytes out.

One ``WatchStream`` per client stream holds that stream's watchers and its outgoing queue. Everything a
stream sends — created/canceled answers, events, progress — goes through that one ordered queue, so a
progress response can never overtake events (etcd 3.5.1's bug #15220), and the queue's size is what tells
the hub that a client has stopped reading.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable

from fastetcd._core import encode_watch_response
from fastetcd.engine.watch_hub import Watcher, WatchHub
from fastetcd.proto import rpc_pb2 as pb
from fastetcd.server.header import Header

log = logging.getLogger(__name__)

# A stream holding more than this many unsent bytes is congested: its watchers stop receiving live events
# and are caught up from history once it drains below LOW_WATER. Memory per stream stays near HIGH_WATER.
HIGH_WATER = 4 << 20
LOW_WATER = 1 << 20

_NOPUT = pb.WatchCreateRequest.NOPUT
_NODELETE = pb.WatchCreateRequest.NODELETE
ERR_EMPTY_RANGE = "mvcc: watcher range is empty"
ERR_DUPLICATE_ID = "mvcc: duplicate watch ID provided on the WatchStream"


class WatchStream:
    def __init__(self, hub: WatchHub, header: Header, max_request_bytes: int) -> None:
        self.hub = hub
        self.header = header
        self.max_request_bytes = max_request_bytes
        self.watchers: dict[int, Watcher] = {}
        self._next_id = 0
        self._out: deque[bytes] = deque()
        self._out_bytes = 0
        self._was_congested = False
        self._wake = asyncio.Event()
        self._deferred_progress = False
        self.closed = False

    # -------------------------------------------------------------- requests

    def on_request(self, raw: bytes) -> None:
        req = pb.WatchRequest.FromString(raw)
        kind = req.WhichOneof("request_union")
        if kind == "create_request":
            self._create(req.create_request)
        elif kind == "cancel_request":
            self._cancel(req.cancel_request.watch_id)
        elif kind == "progress_request":
            if self.hub.all_synced(self):
                self.send_progress(None, self.hub.committed_rev)
            else:
                self._deferred_progress = True

    def _create(self, c: pb.WatchCreateRequest) -> None:
        key = c.key or b"\x00"  # the smallest key, as etcd does
        end = c.range_end
        rev = self.hub.committed_rev
        error = ""
        if end and end != b"\x00" and key >= end:
            error = ERR_EMPTY_RANGE
        watch_id = c.watch_id
        if not error:
            if watch_id == 0:  # etcd's AutoWatchID
                while self._next_id in self.watchers:
                    self._next_id += 1
                watch_id = self._next_id
                self._next_id += 1
            elif watch_id in self.watchers:
                error = ERR_DUPLICATE_ID
        if error:
            self._push(
                encode_watch_response(
                    self.header.encode(rev), -1, [], created=True, canceled=True, cancel_reason=error
                )
            )
            return
        w = Watcher(
            self,
            watch_id,
            key,
            end,
            c.start_revision,
            prev_kv=c.prev_kv,
            no_put=_NOPUT in c.filters,
            no_delete=_NODELETE in c.filters,
            progress_notify=c.progress_notify,
            fragment=c.fragment,
        )
        self.watchers[watch_id] = w
        self._push(encode_watch_response(self.header.encode(rev), watch_id, [], created=True))
        self.hub.add(w)

    def _cancel(self, watch_id: int) -> None:
        w = self.watchers.pop(watch_id, None)
        if w is None:
            return  # etcd answers nothing for an unknown id
        self.hub.remove(w)
        self._push(
            encode_watch_response(self.header.encode(self.hub.committed_rev), watch_id, [], canceled=True)
        )

    def close(self) -> None:
        self.closed = True
        for w in self.watchers.values():
            self.hub.remove(w)
        self.watchers.clear()
        self._out.clear()
        self._wake.set()

    # -------------------------------------------------------------- hub sink

    def send_events(self, w: Watcher, rev: int, events: list[bytes]) -> None:
        header = self.header.encode(rev)
        resp = encode_watch_response(header, w.watch_id, events)
        if w.fragment and len(events) > 1 and len(resp) >= self.max_request_bytes:
            self._send_fragments(header, w.watch_id, events)
        else:
            self._push(resp)

    def _send_fragments(self, header: bytes, watch_id: int, events: list[bytes]) -> None:
        """etcd's sendFragments: fill each response up to the request limit; all but the last say fragment."""
        base = len(encode_watch_response(header, watch_id, [], fragment=True))
        i = 0
        while i < len(events):
            size = base
            j = i
            while j < len(events):
                size += len(events[j]) + 6
                if j > i and size >= self.max_request_bytes:
                    break
                j += 1
            last = j == len(events)
            self._push(encode_watch_response(header, watch_id, events[i:j], fragment=not last))
            i = j

    def send_compacted(self, w: Watcher, compact_rev: int) -> None:
        self.watchers.pop(w.watch_id, None)
        self._push(
            encode_watch_response(
                self.header.encode(self.hub.committed_rev),
                w.watch_id,
                [],
                canceled=True,
                compact_revision=compact_rev,
            )
        )

    def send_progress(self, w: Watcher | None, rev: int) -> None:
        self._push(encode_watch_response(self.header.encode(rev), -1 if w is None else w.watch_id, []))

    def on_synced(self) -> None:
        if self._deferred_progress:
            self._deferred_progress = False
            self.send_progress(None, self.hub.committed_rev)

    def congested(self) -> bool:
        return self._out_bytes > HIGH_WATER

    # -------------------------------------------------------------- outgoing queue

    def _push(self, msg: bytes) -> None:
        if self.closed:
            return
        self._out.append(msg)
        self._out_bytes += len(msg)
        if self._out_bytes > HIGH_WATER:
            self._was_congested = True
        self._wake.set()

    async def outgoing(self) -> AsyncIterator[bytes]:
        while not self.closed:
            if not self._out:
                self._wake.clear()
                await self._wake.wait()
                continue
            msg = self._out.popleft()
            self._out_bytes -= len(msg)
            if self._was_congested and self._out_bytes < LOW_WATER:
                self._was_congested = False
                self.hub.kick()
            yield msg


class WatchService:
    def __init__(
        self, hub: WatchHub, header: Header, *, max_request_bytes: int, progress_interval: float
    ) -> None:
        self.hub = hub
        self.header = header
        self.max_request_bytes = max_request_bytes
        self.progress_interval = progress_interval
        self._ticker: asyncio.Task | None = None

    def start(self) -> None:
        if self.progress_interval > 0:
            self._ticker = asyncio.create_task(self._tick(), name="fastetcd-watch-progress")

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            try:
                await self._ticker
            except asyncio.CancelledError:
                pass

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.progress_interval)
            self.hub.progress_tick()

    async def watch(self, requests: AsyncIterator[bytes], send: Callable[[bytes], Awaitable[None]]) -> None:
        """Serve one Watch stream until the client closes it."""
        stream = WatchStream(self.hub, self.header, self.max_request_bytes)

        async def read() -> None:
            try:
                async for raw in requests:
                    stream.on_request(raw)
            finally:
                stream.close()

        reader = asyncio.create_task(read())
        try:
            async for msg in stream.outgoing():
                await send(msg)
        finally:
            reader.cancel()
            stream.close()
            try:
                await reader
            except (asyncio.CancelledError, Exception):
                pass
