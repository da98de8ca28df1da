"""engine/watch_hub.py's WatchHub and server/watch.py's WatchStream in process (no gRPC, no network).

The hub is driven by a real MVCC core: each test commits revisions on it and publishes them as the state
machine does, and a Python model of those writes says what every watcher must see. The stream is driven
by a real StateMachine over the embedded store in a tmp dir, with the hub listening to its commits; the
test plays the transport: request bytes in via on_request, response bytes out of outgoing().
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastetcd._core import MVCC

from fastetcd.engine import watch_hub
from fastetcd.engine.state_machine import StateMachine
from fastetcd.engine.watch_hub import Watcher, WatchHub
from fastetcd.proto import kv_pb2
from fastetcd.proto import rpc_pb2 as pb
from fastetcd.server.header import Header
from fastetcd.server.watch import ERR_DUPLICATE_ID, ERR_EMPTY_RANGE, WatchStream
from fastetcd.store.embedded import EmbeddedStore
from fastetcd.testing import prefix_end

PUT, DELETE = kv_pb2.Event.PUT, kv_pb2.Event.DELETE
ALL = b"\x00"  # as a range end: every key from the start key on


@dataclass(frozen=True)
class Ev:
    """An event as a client sees it: type, key, value, mod revision, and prev_kv's value (None: absent)."""

    type: int
    key: bytes
    value: bytes
    rev: int
    prev: bytes | None = None


def decode_events(raw: list[bytes]) -> list[Ev]:
    out = []
    for b in raw:
        e = kv_pb2.Event.FromString(b)
        out.append(Ev(e.type, e.kv.key, e.kv.value, e.kv.mod_revision,
                      e.prev_kv.value if e.HasField("prev_kv") else None))
    return out


def in_range(key: bytes, start: bytes, end: bytes) -> bool:
    if not end:
        return key == start
    return key >= start and (end == ALL or key < end)


class Committer:
    """Writes revisions on a real core, publishes them to the hub, and keeps the model of their events."""

    def __init__(self, core: MVCC, hub: WatchHub) -> None:
        self.core = core
        self.hub = hub
        self.events: list[Ev] = []  # every committed event, in (revision, sub) order, prev = value before
        self.live: dict[bytes, bytes] = {}

    def commit(self, *ops: tuple[bytes, bytes | None]) -> int:
        """One revision: (key, value) puts and (key, None) deletes, in this order."""
        rev = self.core.rev + 1
        for sub, (key, value) in enumerate(ops):
            prev = self.live.get(key)
            if value is None:
                assert self.core.delete(key, rev, sub)
                del self.live[key]
                self.events.append(Ev(DELETE, key, b"", rev, prev))
            else:
                self.core.put(key, value, 0, rev, sub)
                self.live[key] = value
                self.events.append(Ev(PUT, key, value, rev, prev))
        self.hub.publish([(rev, self.core.take_record())])
        return rev

    def expected(self, w: Watcher, upto: int | None = None) -> list[Ev]:
        """What `w` must receive from its position through `upto` (default: everything committed)."""
        top = self.core.rev if upto is None else upto
        compact = self.core.compact_rev
        out = []
        for e in self.events:
            if not (w.next_rev <= e.rev <= top and in_range(e.key, w.key, w.end)):
                continue
            if (e.type == DELETE and w.no_delete) or (e.type == PUT and w.no_put):
                continue
            if e.type == DELETE and e.rev <= compact:
                continue  # compaction keeps no tombstone at or below its revision
            keep_prev = w.prev_kv and e.rev > compact
            out.append(Ev(e.type, e.key, e.value, e.rev, e.prev if keep_prev else None))
        return out


class Sink:
    def __init__(self) -> None:
        self.wakes = 0

    def wake(self) -> None:
        self.wakes += 1


@pytest.fixture
def hub() -> WatchHub:
    core = MVCC()
    return WatchHub(core, core.rev)


@pytest.fixture
def db(hub: WatchHub) -> Committer:
    return Committer(hub.core, hub)


@pytest.fixture
def small_ring(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A ring that keeps only the last 4 revisions once it holds more than 1 kB."""
    monkeypatch.setattr(watch_hub, "RING_MIN_REVS", 4)
    monkeypatch.setattr(watch_hub, "RING_BYTES", 1000)
    yield


def drain(hub: WatchHub, w: Watcher, max_bytes: int = 1 << 20) -> tuple[list[Ev], int]:
    """Collect for `w` until it is at the committed revision, as a stream does; (events, collect calls).
    Moves `w` along: take its expected events first."""
    got: list[Ev] = []
    calls = 0
    while w.next_rev <= hub.committed_rev:
        res = hub.collect(w, hub.committed_rev, max_bytes)
        assert res is not None, "compacted"
        events, last = res
        assert last >= w.next_rev, "no progress"
        got += decode_events(events)
        w.next_rev = last + 1
        calls += 1
    return got, calls


# ------------------------------------------------------------------------------------------ hub: waking


def test_publish_wakes_only_the_streams_whose_watchers_match(hub: WatchHub, db: Committer) -> None:
    sinks = {name: Sink() for name in ("prefix", "key", "from_c", "idle")}
    sids = {name: hub.register(s) for name, s in sinks.items()}
    hub.watch(sids["prefix"], Watcher(1, b"a/", prefix_end(b"a/"), 2))
    hub.watch(sids["key"], Watcher(1, b"b", b"", 2))
    hub.watch(sids["from_c"], Watcher(1, b"c", ALL, 2))

    def woken_by(*ops: tuple[bytes, bytes | None]) -> set[str]:
        before = {n: s.wakes for n, s in sinks.items()}
        db.commit(*ops)
        return {n for n, s in sinks.items() if s.wakes > before[n]}

    assert woken_by((b"a/1", b"v")) == {"prefix"}
    assert woken_by((b"b", b"v")) == {"key"}
    assert woken_by((b"bb", b"v")) == set()  # a single-key watch is that key only
    assert woken_by((b"zz", b"v")) == {"from_c"}
    assert woken_by((b"a/1", None), (b"b", b"w")) == {"prefix", "key"}  # one wake per stream and revision
    assert woken_by((b"a", b"v")) == set()


def test_unwatch_counts_references_and_unregister_silences_a_stream(hub: WatchHub, db: Committer) -> None:
    sink, other = Sink(), Sink()
    sid, other_sid = hub.register(sink), hub.register(other)
    first, second = Watcher(1, b"k", b"", 2), Watcher(2, b"k", b"", 2)
    hub.watch(sid, first)
    hub.watch(sid, second)
    hub.watch(other_sid, Watcher(1, b"k", b"", 2))
    hub.unwatch(sid, first)
    db.commit((b"k", b"1"))
    assert (sink.wakes, other.wakes) == (1, 1)  # the second watcher on the same range still wants k
    hub.unwatch(sid, second)
    hub.unregister(other_sid)
    db.commit((b"k", b"2"))
    assert (sink.wakes, other.wakes) == (1, 1)
    assert len(hub.index) == 0


# ------------------------------------------------------------------------------------------ hub: collect


def _history(db: Committer) -> None:
    db.commit((b"a/1", b"v1"))  # 2
    db.commit((b"b", b"b1"))  # 3
    db.commit((b"a/2", b"v1"), (b"a/1", None))  # 4
    db.commit((b"a/1", b"v2"))  # 5
    db.commit((b"a/2", b"v2"), (b"b", None), (b"c", b"c1"))  # 6


@pytest.mark.parametrize(
    ("key", "end", "filters"),
    [
        (b"a/", prefix_end(b"a/"), {}),
        (b"a/", prefix_end(b"a/"), {"no_put": True}),
        (b"a/", prefix_end(b"a/"), {"no_delete": True, "prev_kv": True}),
        (b"b", b"", {"prev_kv": True}),
        (b"a/2", ALL, {}),
        (b"\x00", ALL, {"prev_kv": True}),
    ],
    ids=["prefix", "noput", "nodelete-prevkv", "key-prevkv", "from-key", "all"],
)
def test_collect_returns_the_watchers_events_in_order(hub: WatchHub, db: Committer, key: bytes, end: bytes,
                                                      filters: dict[str, bool]) -> None:
    _history(db)
    w = Watcher(1, key, end, 2, **filters)
    want = db.expected(w)
    assert want, "the scenario must give this watcher something to see"
    assert drain(hub, w)[0] == want


def test_collect_stops_at_upto_and_starts_at_the_watchers_position(hub: WatchHub, db: Committer) -> None:
    _history(db)
    w = Watcher(1, b"\x00", ALL, 3)
    events, last = hub.collect(w, 4, 1 << 20)
    assert last == 4
    assert decode_events(events) == db.expected(w, upto=4)
    assert {e.rev for e in decode_events(events)} == {3, 4}


def test_collect_returns_whole_revisions_within_max_bytes(hub: WatchHub, db: Committer) -> None:
    for _ in range(6):
        db.commit(*((b"k%d" % j, b"x" * 100) for j in range(3)))  # three events of ~110 bytes each
    w = Watcher(1, b"k", ALL, 2)
    want = db.expected(w)
    events, last = hub.collect(w, hub.committed_rev, 1)
    # The limit is checked between revisions: the first revision comes whole, however small the limit.
    assert (len(events), last) == (3, 2)
    got, calls = drain(hub, w, max_bytes=700)
    assert got == want
    assert calls == 2  # a revision (~345 bytes) is added while the total is within 700: three per call


def test_prev_kv_and_deletes_at_or_below_the_compaction_are_left_out(hub: WatchHub, db: Committer) -> None:
    _history(db)
    hub.core.compact(4)
    w = Watcher(1, b"\x00", ALL, 2, prev_kv=True)
    want = db.expected(w)
    got = drain(hub, w)[0]
    assert got == want
    assert [e.rev for e in got if e.type == DELETE] == [6]  # the delete at 4 has no tombstone left
    assert all(e.prev is None for e in got if e.rev <= 4)
    assert any(e.prev is not None for e in got if e.rev > 4)


# ------------------------------------------------------------------------------------------ hub: ring trim


def test_a_watcher_behind_the_ring_catches_up_from_history(hub: WatchHub, db: Committer, small_ring: None,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watch_hub, "CATCH_UP_REVS", 5)
    for i in range(40):
        key, neighbour = b"k%02d" % (i % 7), b"k%02d" % (i % 7 + 1)
        delete = [(neighbour, None)] if neighbour in db.live else []
        db.commit((key, b"v%03d" % i + b"x" * 200), *delete)
    w = Watcher(1, b"k", prefix_end(b"k"), 2, prev_kv=True)
    want = db.expected(w)
    first, last = hub.collect(w, hub.committed_rev, 1 << 20)
    assert last == 6  # from history: at most CATCH_UP_REVS revisions per call
    w.next_rev = last + 1
    got, calls = drain(hub, w)
    assert decode_events(first) + got == want
    assert calls >= 7  # 35 more revisions of history at 5 a call, then the ring


def test_history_compacted_past_a_watcher_behind_the_ring_cancels_it(hub: WatchHub, db: Committer,
                                                                     small_ring: None) -> None:
    for i in range(20):
        db.commit((b"k", b"x" * 300 + b"%d" % i))
    hub.core.compact(10)
    assert hub.collect(Watcher(1, b"k", b"", 5), hub.committed_rev, 1 << 20) is None
    w = Watcher(1, b"k", b"", 10)  # at the compaction revision: its history is still there
    want = db.expected(w)
    assert len(want) == 12
    assert drain(hub, w)[0] == want


def test_a_stalled_stream_costs_the_hub_nothing_but_the_bounded_ring(hub: WatchHub, db: Committer,
                                                                     small_ring: None) -> None:
    sink = Sink()
    sid = hub.register(sink)
    w = Watcher(1, b"k", prefix_end(b"k"), 2)
    hub.watch(sid, w)
    for i in range(300):
        db.commit((b"k%d" % (i % 10), b"x" * 500))
    # The stream never collected: it was only woken, and the hub kept no more than its ring for it.
    assert sink.wakes == 300
    assert len(hub._ring) == watch_hub.RING_MIN_REVS
    want = db.expected(w)
    assert len(want) == 300
    assert drain(hub, w)[0] == want


# ------------------------------------------------------------------------------------------ WatchStream

CLUSTER_ID, MEMBER_ID = 0x1234, 0x5678


@asynccontextmanager
async def serving(path: Path) -> AsyncIterator[tuple[StateMachine, WatchHub]]:
    """A state machine over the embedded store, with the watch hub it publishes its commits to."""
    store = EmbeddedStore(str(path))
    sm = StateMachine(store)
    await sm.start()
    try:
        yield sm, sm.watch_hub
    finally:
        await sm.stop()
        await store.close()


class Client:
    """One watch stream, with the test as its transport."""

    def __init__(self, sm: StateMachine, hub: WatchHub) -> None:
        self.stream = WatchStream(hub, sm, Header(CLUSTER_ID, MEMBER_ID), 1 << 20)
        self.outgoing = self.stream.outgoing()

    def send(self, **kind: Any) -> None:
        self.stream.on_request(pb.WatchRequest(**kind).SerializeToString())

    def create(self, key: bytes, end: bytes = b"", **kw: Any) -> None:
        self.send(create_request=pb.WatchCreateRequest(key=key, range_end=end, **kw))

    def cancel(self, watch_id: int) -> None:
        self.send(cancel_request=pb.WatchCancelRequest(watch_id=watch_id))

    async def next(self, timeout: float = 5.0) -> pb.WatchResponse:
        return pb.WatchResponse.FromString(await asyncio.wait_for(anext(self.outgoing), timeout))

    async def until_progress(self) -> tuple[list[pb.WatchResponse], pb.WatchResponse]:
        """Ask for progress; (every response before the progress response, the progress response)."""
        self.send(progress_request=pb.WatchProgressRequest())
        before = []
        while True:
            r = await self.next()
            if r.watch_id == -1 and not (r.created or r.canceled or r.events):
                return before, r
            before.append(r)


def stream_events(responses: list[pb.WatchResponse], watch_id: int | None = None) -> list[Ev]:
    return [Ev(e.type, e.kv.key, e.kv.value, e.kv.mod_revision, e.prev_kv.value if e.HasField("prev_kv")
               else None)
            for r in responses if watch_id is None or r.watch_id == watch_id for e in r.events]


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


def run_stream(path: Path, body: Callable[[StateMachine, WatchHub, Client], Awaitable[None]]) -> None:
    """body(sm, hub, client) with a fresh engine over `path` and one watch stream on it."""

    async def main() -> None:
        async with serving(path) as (sm, hub):
            await body(sm, hub, Client(sm, hub))

    run(main())


async def put(sm: StateMachine, key: bytes, value: bytes) -> int:
    return (await sm.put(pb.PutRequest(key=key, value=value))).header.revision


async def delete(sm: StateMachine, key: bytes) -> int:
    return (await sm.delete_range(pb.DeleteRangeRequest(key=key))).header.revision


def test_stream_answers_create_then_sends_events_in_order(tmp_path: Path) -> None:
    async def body(sm: StateMachine, hub: WatchHub, c: Client) -> None:
        c.create(b"a/", prefix_end(b"a/"), prev_kv=True)
        created = await c.next()
        assert (created.created, created.watch_id, created.header.revision) == (True, 0, 1)
        assert (created.header.cluster_id, created.header.member_id) == (CLUSTER_ID, MEMBER_ID)
        r1 = await put(sm, b"a/1", b"v1")
        await put(sm, b"b", b"outside")
        r3 = await put(sm, b"a/1", b"v2")
        r4 = await delete(sm, b"a/1")
        before, progress = await c.until_progress()
        assert stream_events(before, 0) == [
            Ev(PUT, b"a/1", b"v1", r1),
            Ev(PUT, b"a/1", b"v2", r3, b"v1"),
            Ev(DELETE, b"a/1", b"", r4, b"v2"),
        ]
        revisions = [r.header.revision for r in [created, *before, progress]]
        assert revisions == sorted(revisions)  # a stream's header revision never goes backwards
        assert progress.header.revision == r4 == sm.committed_rev

    run_stream(tmp_path, body)


def test_stream_filters_per_watch(tmp_path: Path) -> None:
    async def body(sm: StateMachine, hub: WatchHub, c: Client) -> None:
        c.create(b"k", filters=[pb.WatchCreateRequest.NOPUT])
        c.create(b"k", filters=[pb.WatchCreateRequest.NODELETE])
        created = [await c.next(), await c.next()]
        assert [(r.watch_id, r.created) for r in created] == [(0, True), (1, True)]
        r1 = await put(sm, b"k", b"1")
        r2 = await delete(sm, b"k")
        before, _ = await c.until_progress()
        assert stream_events(before, 0) == [Ev(DELETE, b"k", b"", r2)]
        assert stream_events(before, 1) == [Ev(PUT, b"k", b"1", r1)]

    run_stream(tmp_path, body)


def test_start_revision_replays_history_then_goes_live(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (sm, hub):
            revs = [await put(sm, b"k", b"%d" % i) for i in range(5)]
            c = Client(sm, hub)
            c.create(b"k", start_revision=revs[2])
            assert (await c.next()).created
            live = await put(sm, b"k", b"live")
            before, _ = await c.until_progress()
            assert [(e.rev, e.value) for e in stream_events(before)] == [
                (revs[2], b"2"), (revs[3], b"3"), (revs[4], b"4"), (live, b"live")]

    run(main())


def test_compacted_start_is_created_then_canceled_and_keeps_its_id(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (sm, hub):
            for i in range(5):
                await put(sm, b"k", b"%d" % i)
            await sm.compact(4)
            c = Client(sm, hub)
            c.create(b"k", start_revision=2, watch_id=3)
            created, canceled = await c.next(), await c.next()
            assert (created.created, created.watch_id) == (True, 3)
            assert (canceled.canceled, canceled.watch_id, canceled.compact_revision) == (True, 3, 4)
            assert canceled.header.revision == 0  # etcd's compaction notice carries no revision
            c.create(b"k", watch_id=3)  # the id stays taken until the client cancels it
            dup = await c.next()
            assert (dup.created, dup.canceled, dup.cancel_reason) == (True, True, ERR_DUPLICATE_ID)
            c.cancel(3)
            assert (await c.next()).canceled
            c.create(b"k", watch_id=3)
            again = await c.next()
            assert (again.created, again.canceled, again.watch_id) == (True, False, 3)

    run(main())


def test_bad_creates_are_refused(tmp_path: Path) -> None:
    async def body(sm: StateMachine, hub: WatchHub, c: Client) -> None:
        c.create(b"k", watch_id=7)
        c.create(b"j", watch_id=7)
        c.create(b"b", b"a")
        ok, dup, empty = await c.next(), await c.next(), await c.next()
        assert (ok.watch_id, ok.canceled) == (7, False)
        assert (dup.watch_id, dup.created, dup.canceled, dup.cancel_reason) == (-1, True, True,
                                                                                ERR_DUPLICATE_ID)
        assert (empty.watch_id, empty.canceled, empty.cancel_reason) == (-1, True, ERR_EMPTY_RANGE)

    run_stream(tmp_path, body)


def test_cancel_stops_a_watch_and_leaves_the_others(tmp_path: Path) -> None:
    async def body(sm: StateMachine, hub: WatchHub, c: Client) -> None:
        c.create(b"k")
        c.create(b"k")
        await c.next(), await c.next()
        await put(sm, b"k", b"1")
        c.cancel(0)
        c.cancel(42)  # unknown: etcd answers nothing
        r2 = await put(sm, b"k", b"2")
        before, _ = await c.until_progress()
        canceled = [r.watch_id for r in before if r.canceled]
        assert canceled == [0]
        assert [e.value for e in stream_events(before, 1)] == [b"1", b"2"]
        assert r2 not in [e.rev for e in stream_events(before, 0)]

    run_stream(tmp_path, body)


def test_a_stalled_stream_buffers_nothing_and_catches_up_in_few_responses(
        tmp_path: Path, small_ring: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watch_hub, "CATCH_UP_REVS", 50)

    async def body(sm: StateMachine, hub: WatchHub, c: Client) -> None:
        c.create(b"k", prefix_end(b"k"), prev_kv=True)
        assert (await c.next()).created
        # Nobody reads the stream while 200 revisions commit (far more than the ring keeps).
        requests = [pb.PutRequest(key=b"k%d" % (i % 5), value=b"x" * 300 + b"%d" % i) for i in range(200)]
        writes = await asyncio.gather(*(sm.put(r) for r in requests))
        assert len({w.header.revision for w in writes}) == 200
        before, progress = await c.until_progress()
        got = stream_events(before)
        assert [e.rev for e in got] == sorted(w.header.revision for w in writes)
        last_value: dict[bytes, bytes] = {}
        for e in got:  # prev_kv is each key's previous value, also for events replayed from history
            assert e.prev == last_value.get(e.key)
            last_value[e.key] = e.value
        # Pulled, not pushed: the backlog comes as a few history windows, not a response per revision.
        assert len(before) <= 10
        assert progress.header.revision == sm.committed_rev

    run_stream(tmp_path, body)


def test_close_unregisters_the_stream(tmp_path: Path) -> None:
    async def body(sm: StateMachine, hub: WatchHub, c: Client) -> None:
        c.create(b"k")
        assert (await c.next()).created
        assert len(hub.index) == 1
        c.stream.close()
        assert len(hub.index) == 0
        await put(sm, b"k", b"after close")
        with pytest.raises(StopAsyncIteration):
            await c.next()

    run_stream(tmp_path, body)
