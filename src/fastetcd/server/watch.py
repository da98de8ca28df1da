"""The Watch service (etcdserverpb.Watch), transport-neutral: request bytes in, response bytes out.

A ``WatchStream`` per client stream owns that stream's watchers. Its sender runs in cycles: first the
control answers (created, canceled) in request order, then, for every watcher behind the committed
revision C, the events up to C (watchers with identical ranges, filters and positions share one
computation), and last any progress answer, which is sent with revision C only once every watcher of the
stream has been brought past C — so a progress response never overtakes events and the header revision
on a stream never goes backwards. A client that stops reading blocks its own sender and nothing else.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

from fastetcd import errors
from fastetcd.engine.state_machine import StateMachine
from fastetcd.engine.watch_hub import Watcher, WatchHub
from fastetcd.proto import rpc_pb2 as pb
from fastetcd.server._wire import encode_watch_response
from fastetcd.server.header import Header
from fastetcd.server.service import auth_info
from fastetcd.tasks import cancel_and_wait

log = logging.getLogger(__name__)

# Events for one watcher are packed into one response up to about this many bytes (whole revisions).
RESPONSE_BYTES = 1 << 20
GATHER_DELAY_PER_MESSAGE = 0.0005
MAX_GATHER_DELAY = 0.05

_NOPUT = pb.WatchCreateRequest.NOPUT
_NODELETE = pb.WatchCreateRequest.NODELETE
ERR_EMPTY_RANGE = "mvcc: watcher range is empty"
ERR_DUPLICATE_ID = "mvcc: duplicate watch ID provided on the WatchStream"
# etcd 3.5.1 puts the gRPC status's whole text in the cancel reason, whatever the auth check's error was.
ERR_PERMISSION_DENIED = "rpc error: code = PermissionDenied desc = etcdserver: permission denied"


class _Cycle:
    """What one sender cycle did: responses sent, and whether every watcher reached the cycle's revision."""

    __slots__ = ("sent", "caught_up")

    def __init__(self) -> None:
        self.sent = 0
        self.caught_up = True


class WatchStream:
    def __init__(self, hub: WatchHub, sm: StateMachine, header: Header, max_request_bytes: int) -> None:
        self.hub = hub
        self.sm = sm
        self.header = header
        self.max_request_bytes = max_request_bytes
        self.watchers: dict[int, Watcher] = {}
        # Ids of watches whose history was compacted away: etcd stops them but keeps their ids taken until
        # the client cancels them.
        self._dead: set[int] = set()
        self._next_id = 0
        self._control: deque[bytes] = deque()
        self._progress_requested = False
        self._progress_tick = False
        self._wake = asyncio.Event()
        self.closed = False
        self.sid = hub.register(self)

    def wake(self) -> None:
        self._wake.set()

    # -------------------------------------------------------------- requests

    def on_request(self, raw: bytes) -> None:
        req = pb.WatchRequest.FromString(raw)
        kind = req.WhichOneof("request_union")
        if kind == "create_request":
            self._create(req.create_request)
        elif kind == "cancel_request":
            self._cancel(req.cancel_request.watch_id)
        elif kind == "progress_request":
            self._progress_requested = True
            self._wake.set()

    def _create(self, c: pb.WatchCreateRequest) -> None:
        key = c.key or b"\x00"  # the smallest key, as etcd does
        end = c.range_end
        rev = self.hub.committed_rev
        if not self._permitted(key, end):
            self._send_control(
                encode_watch_response(
                    self.header.encode(rev), c.watch_id, [], created=True, canceled=True,
                    cancel_reason=ERR_PERMISSION_DENIED,
                )
            )
            return
        error = ""
        if end and end != b"\x00" and key >= end:
            error = ERR_EMPTY_RANGE
        watch_id = c.watch_id
        if not error:
            if watch_id == 0:  # etcd's AutoWatchID
                while self._next_id in self.watchers or self._next_id in self._dead:
                    self._next_id += 1
                watch_id = self._next_id
                self._next_id += 1
            elif watch_id in self.watchers or watch_id in self._dead:
                error = ERR_DUPLICATE_ID
        if error:
            self._send_control(
                encode_watch_response(
                    self.header.encode(rev), -1, [], created=True, canceled=True, cancel_reason=error
                )
            )
            return
        start = c.start_revision
        self._send_control(encode_watch_response(self.header.encode(rev), watch_id, [], created=True))
        if start and start < self.sm.compact_rev:
            # etcd creates the watch, then cancels it: its history is gone
            self._dead.add(watch_id)
            self._send_control(self._compacted(watch_id))
            return
        w = Watcher(
            watch_id,
            key,
            end,
            start or rev + 1,
            prev_kv=c.prev_kv,
            no_put=_NOPUT in c.filters,
            no_delete=_NODELETE in c.filters,
            progress_notify=c.progress_notify,
            fragment=c.fragment,
        )
        self.watchers[watch_id] = w
        self.hub.watch(self.sid, w)

    def _permitted(self, key: bytes, end: bytes) -> bool:
        """Read on the watched range, for the stream's caller (checked at every create, as etcd does).

        A range end of "\0" is checked as everything from ``key`` on, as etcd does since 3.5.33; 3.5.1
        checked only ``key`` itself there, which let a watch see keys its user may not read."""
        auth = self.sm.auth
        try:
            auth.is_range_permitted(auth_info(auth), key, end)
        except errors.EtcdError:
            return False
        return True

    def _cancel(self, watch_id: int) -> None:
        w = self.watchers.pop(watch_id, None)
        if w is None:
            if watch_id not in self._dead:
                return  # etcd answers nothing for an unknown id
            self._dead.discard(watch_id)
        else:
            self.hub.unwatch(self.sid, w)
        self._send_control(
            encode_watch_response(self.header.encode(self.hub.committed_rev), watch_id, [], canceled=True)
        )

    def _compacted(self, watch_id: int) -> bytes:
        # etcd's compaction notice carries no revision of its own, so its header says revision 0; it counts
        # as a cancel only for a real compaction (a negative start after Compact(0) just goes silent)
        compact_rev = self.sm.compact_rev
        return encode_watch_response(
            self.header.encode(0), watch_id, [], canceled=compact_rev != 0, compact_revision=compact_rev
        )

    def _send_control(self, msg: bytes) -> None:
        self._control.append(msg)
        self._wake.set()

    def progress_tick(self) -> None:
        self._progress_tick = True
        self._wake.set()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.hub.unregister(self.sid)
        self.watchers.clear()
        self._wake.set()

    # -------------------------------------------------------------- sender

    async def outgoing(self) -> AsyncIterator[bytes]:
        """The stream's responses, one cycle at a time: control answers, then events, then progress."""
        while not self.closed:
            self._wake.clear()
            # Answers to creates and cancels go first, and only here: their header revisions were taken
            # when they arrived, so sending them mid-cycle could put them ahead of this cycle's `upto`.
            while self._control:
                yield self._control.popleft()
            upto = self.hub.committed_rev
            cycle = _Cycle()
            for msg in self._event_responses(upto, cycle):
                yield msg
            if cycle.sent:
                # Each gRPC message costs tens of microseconds in grpcio, whatever it carries. A stream that
                # just sent many gathers events a little longer, so its next responses carry more revisions
                # each: throughput scales with events, not messages, at a latency cost of a few ms.
                await asyncio.sleep(min(MAX_GATHER_DELAY, cycle.sent * GATHER_DELAY_PER_MESSAGE))
            if not cycle.caught_up:
                continue
            for msg in self._progress_responses(upto):
                yield msg
            if not self._control and not self._wake.is_set():
                await self._wake.wait()

    def _event_responses(self, upto: int, cycle: _Cycle) -> Iterator[bytes]:
        """Events up to ``upto`` for every watcher behind it; lazily, as a cancel may land between two."""
        hub = self.hub
        groups: dict[tuple, list[Watcher]] = {}
        for w in self.watchers.values():
            if w.next_rev <= upto:
                groups.setdefault(w.signature(), []).append(w)
        # Every response of this cycle says revision `upto`, as etcd's history replay does: a watcher
        # still catching up must not make the stream's header revision go backwards.
        header = self.header.encode(upto)
        for ws in groups.values():
            got = hub.collect(ws[0], upto, RESPONSE_BYTES)
            if got is None:
                for w in ws:
                    if self.watchers.pop(w.watch_id, None) is not None:
                        hub.unwatch(self.sid, w)
                        self._dead.add(w.watch_id)
                        yield self._compacted(w.watch_id)
                continue
            events, last = got
            if last < upto:
                cycle.caught_up = False
            for w in ws:
                if self.watchers.get(w.watch_id) is not w:
                    continue  # canceled while we were sending
                w.next_rev = last + 1
                if events:
                    w.quiet = False
                    for msg in self._responses(header, w, events):
                        cycle.sent += 1
                        yield msg

    def _progress_responses(self, upto: int) -> list[bytes]:
        """Progress answers, once every watcher is past ``upto`` (so none overtakes an event)."""
        out = []
        if self._progress_requested and all(w.next_rev > upto for w in self.watchers.values()):
            self._progress_requested = False
            out.append(encode_watch_response(self.header.encode(upto), -1, []))
        if self._progress_tick:
            self._progress_tick = False
            for w in self.watchers.values():
                if w.progress_notify and w.next_rev > upto:
                    if w.quiet:
                        out.append(encode_watch_response(self.header.encode(upto), w.watch_id, []))
                    w.quiet = True
        return out

    def _responses(self, header: bytes, w: Watcher, events: list[bytes]) -> list[bytes]:
        resp = encode_watch_response(header, w.watch_id, events)
        if not (w.fragment and len(events) > 1 and len(resp) >= self.max_request_bytes):
            return [resp]
        # etcd's sendFragments: fill each response up to the request limit; all but the last say fragment.
        out = []
        base = len(encode_watch_response(header, w.watch_id, [], fragment=True))
        i = 0
        while i < len(events):
            size = base
            j = i
            while j < len(events):
                size += len(events[j]) + 6
                if j > i and size >= self.max_request_bytes:
                    break
                j += 1
            out.append(encode_watch_response(header, w.watch_id, events[i:j], fragment=j < len(events)))
            i = j
        return out


class WatchService:
    def __init__(
        self,
        sm: StateMachine,
        header: Header,
        *,
        max_request_bytes: int,
        progress_interval: float,
    ) -> None:
        self.sm = sm
        self.hub = sm.watch_hub
        self.header = header
        self.max_request_bytes = max_request_bytes
        self.progress_interval = progress_interval
        self.streams: set[WatchStream] = set()
        self._ticker: asyncio.Task | None = None

    def start(self) -> None:
        if self.progress_interval > 0:
            self._ticker = asyncio.create_task(self._tick(), name="fastetcd-watch-progress")

    async def stop(self) -> None:
        await cancel_and_wait(self._ticker)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.progress_interval)
            for stream in self.streams:
                stream.progress_tick()

    async def watch(self, requests: AsyncIterator[bytes], send: Callable[[bytes], Awaitable[None]]) -> None:
        """Serve one Watch stream until the client closes it."""
        stream = WatchStream(self.hub, self.sm, self.header, self.max_request_bytes)
        self.streams.add(stream)

        async def read() -> None:
            # A client that half-closes keeps receiving, as with etcd: only its cancel (or a broken
            # request) ends the stream.
            try:
                async for raw in requests:
                    stream.on_request(raw)
            except BaseException:
                stream.close()
                raise

        reader = asyncio.create_task(read())
        try:
            async for msg in stream.outgoing():
                await send(msg)
        finally:
            self.streams.discard(stream)
            reader.cancel()
            stream.close()
            try:
                await reader
            except (asyncio.CancelledError, Exception):
                pass
