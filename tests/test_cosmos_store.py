"""The Cosmos DB store against the Cosmos-compatible test server (tests/cosmos_server), real azure-cosmos SDK.

What goes in comes back across reopen, snapshots and compaction; big entries are chunked; a second writer
fences the first and no log index is ever acknowledged twice; throttling, dropped connections and lost
answers end as the right outcome (landed exactly once / certainly failed / Throttled / Uncertain); an
append costs one request. One server per module, one container per test.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import sys
import uuid
from collections.abc import Coroutine
from typing import Any

import pytest
from cosmos_fixture import CosmosServer, cosmos_fixture, module_cosmos_server  # noqa: F401  (fixtures)

from fastetcd.store.base import Behind, Fenced, Recovered, StoreError, Uncertain
from fastetcd.store.cosmos import CosmosStore, Throttled

DB = "fastetcd"


def run(coro: Coroutine[Any, Any, Any], timeout: float = 30.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture
def container() -> str:
    return f"c-{uuid.uuid4().hex[:10]}"


def make(cosmos: CosmosServer, container: str, **kw: Any) -> CosmosStore:
    client_kwargs = {
        # Fast SDK retries of dropped connections, and a short throttling budget, keep the suite quick.
        "retry_backoff_factor": 0.01,
        "retry_throttle_total": 4,
        **cosmos.client_kwargs(),
        **kw.pop("client_kwargs", {}),
    }
    return CosmosStore(cosmos.endpoint, cosmos.key, DB, container, client_kwargs=client_kwargs, **kw)


async def reopen(cosmos: CosmosServer, container: str, **kw: Any) -> Recovered:
    store = make(cosmos, container, **kw)
    try:
        return await store.open()
    finally:
        await store.close()


def recs(first: int, last: int, tag: bytes = b"v") -> list[tuple[int, bytes]]:
    return [(i, tag + str(i).encode()) for i in range(first, last + 1)]


def items(cosmos: CosmosServer, container: str) -> list[dict[str, Any]]:
    c = cosmos.client().get_database_client(DB).get_container_client(container)
    return list(c.query_items("SELECT * FROM c", enable_cross_partition_query=True))


def log_items(cosmos: CosmosServer, container: str) -> list[dict[str, Any]]:
    return [it for it in items(cosmos, container) if it["pk"].startswith("log-") and "first" in it]


def part_items(cosmos: CosmosServer, container: str) -> list[dict[str, Any]]:
    return [it for it in items(cosmos, container) if "x" in it]


# ---- round trips ---------------------------------------------------------------------------------------


def test_fresh_store_round_trips_and_reopens(cosmos: CosmosServer, container: str) -> None:
    async def body() -> Recovered:
        s = make(cosmos, container)
        assert await s.open() == Recovered(snapshot_index=0, snapshot=None, compact_rev=-1, entries=[])
        await s.append(recs(1, 3))
        await s.append([])  # nothing to do
        await s.append([(4, b"\x00" * 100_000), (5, b""), (6, bytes(range(256)))])
        with pytest.raises(StoreError, match="does not follow"):
            await s.append(recs(8, 9))
        with pytest.raises(StoreError, match="not contiguous"):
            await s.append([(7, b"a"), (9, b"b")])
        assert s.size() >= 100_000
        await s.close()
        return await reopen(cosmos, container)

    got = run(body())
    assert got.entries == [*recs(1, 3), (4, b"\x00" * 100_000), (5, b""), (6, bytes(range(256)))]
    assert got.snapshot is None and got.snapshot_index == 0 and got.compact_rev == -1
    # One log item per append (group commit = one item), in segment 0.
    assert sorted((it["first"], it["last"]) for it in log_items(cosmos, container)) == [(1, 3), (4, 6)]


def test_key_never_shown(cosmos: CosmosServer, container: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # the SDK's own logging included

    async def body() -> None:
        s = make(cosmos, container)
        assert cosmos.key not in repr(s) and cosmos.key not in str(s)
        await s.open()
        await s.append(recs(1, 1))
        await s.close()

    run(body())
    assert "opened Cosmos DB store" in caplog.text
    assert cosmos.key not in caplog.text


def test_empty_key_without_azure_identity_is_a_clear_error(
    cosmos: CosmosServer, container: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "azure.identity.aio", None)  # as if not installed
    s = CosmosStore(cosmos.endpoint, "", DB, container)
    with pytest.raises(StoreError, match="azure-identity"):
        run(s.open())
    run(s.close())


def test_many_appends_across_segments_reopen_contiguous(cosmos: CosmosServer, container: str) -> None:
    rng = random.Random(7)
    expected: list[tuple[int, bytes]] = []

    async def write(store: CosmosStore, n: int) -> None:
        for _ in range(n):
            first = len(expected) + 1
            batch = [(first + i, rng.randbytes(rng.randrange(0, 300))) for i in range(rng.randrange(1, 6))]
            await store.append(batch)
            expected.extend(batch)

    async def body() -> None:
        s = make(cosmos, container, segment_size=7)
        await s.open()
        await write(s, 40)
        await s.close()
        # A reopened store claims the tail and continues the same log.
        s = make(cosmos, container, segment_size=7)
        got = await s.open()
        assert got.entries == expected
        await write(s, 20)
        await s.close()
        got = await reopen(cosmos, container, segment_size=7)
        assert got.entries == expected

    run(body())
    assert len(expected) > 60
    segments = {it["pk"] for it in log_items(cosmos, container)}
    assert len(segments) > 5  # really spread over segments, each append whole in one of them
    for it in log_items(cosmos, container):
        assert it["pk"] == f"log-{it['first'] // 7}"


def test_snapshot_then_records_and_old_items_deleted(cosmos: CosmosServer, container: str) -> None:
    snap1 = os.urandom(3_000_000)  # more than one 2 MB item
    snap2 = os.urandom(10_000)

    async def body() -> tuple[Recovered, Recovered]:
        s = make(cosmos, container, segment_size=5)
        await s.open()
        for first in range(1, 24, 2):
            await s.append(recs(first, first + 1))  # 1..24
        size_before = s.size()
        # The engine hands 4 MiB chunks: the store re-chunks to what fits an item.
        await s.save_snapshot(12, [snap1[:2_500_000], snap1[2_500_000:]])
        assert s.size() < size_before + len(snap1)
        await s.append(recs(25, 26))
        await s.close()
        first = await reopen(cosmos, container, segment_size=5)
        s = make(cosmos, container, segment_size=5)
        await s.open()
        with pytest.raises(StoreError, match="older"):
            await s.save_snapshot(11, [b"x"])
        with pytest.raises(StoreError, match="ahead"):
            await s.save_snapshot(27, [b"x"])
        await s.save_snapshot(20, [snap2])
        await s.close()
        return first, await reopen(cosmos, container, segment_size=5)

    first, second = run(body())
    assert first.snapshot_index == 12 and first.snapshot == snap1
    assert first.entries == recs(13, 26)
    assert second.snapshot_index == 20 and second.snapshot == snap2
    assert second.entries == recs(21, 26)
    everything = items(cosmos, container)
    # Log items wholly covered by the snapshot are gone, and with them whole segments (head included).
    assert all(it["last"] > 20 for it in everything if "first" in it)
    # Appends of two from 1 with segment_size 5: 15..20 are segment 3, 21..24 segment 4, 25..26 segment 5.
    assert {it["pk"] for it in everything if it["pk"].startswith("log-")} == {"log-4", "log-5"}
    # Only the newest snapshot's chunks remain.
    snaps = {it["pk"] for it in everything if it["pk"].startswith("snap-")}
    assert len(snaps) == 1 and snaps.pop().startswith("snap-20-")


def test_snapshot_inside_a_log_item_keeps_the_rest_of_it(cosmos: CosmosServer, container: str) -> None:
    big = os.urandom(1_600_000)  # so the straddling item also has a chunk that must survive

    async def body() -> Recovered:
        s = make(cosmos, container, segment_size=4)
        await s.open()
        await s.append(
            [(1, b"a"), (2, b"b"), (3, big), (4, b"d"), (5, b"e")]
        )  # one item, two segments' worth
        await s.append(recs(6, 6))
        await s.save_snapshot(2, [b"state at 2"])
        await s.close()
        return await reopen(cosmos, container, segment_size=4)

    got = run(body())
    assert got.snapshot_index == 2 and got.snapshot == b"state at 2"
    assert got.entries == [(3, big), (4, b"d"), (5, b"e"), (6, b"v6")]


def test_compact_persists_and_only_moves_forward(cosmos: CosmosServer, container: str) -> None:
    async def body() -> tuple[int, int]:
        s = make(cosmos, container)
        await s.open()
        await s.append(recs(1, 10))
        await s.compact(0)  # etcd allows a first compaction at revision 0
        await s.compact(5)
        await s.close()
        first = (await reopen(cosmos, container)).compact_rev
        s = make(cosmos, container)
        await s.open()
        await s.compact(3)  # a stale request must not move it back
        await s.close()
        return first, (await reopen(cosmos, container)).compact_rev

    assert run(body()) == (5, 5)


# ---- big entries ---------------------------------------------------------------------------------------


def test_entry_of_one_and_a_half_mib_is_chunked_and_round_trips(cosmos: CosmosServer, container: str) -> None:
    one = os.urandom(3 * 1024 * 1024 // 2)
    three = [os.urandom(3 * 1024 * 1024 // 2) for _ in range(3)]

    async def body() -> Recovered:
        s = make(cosmos, container)
        await s.open()
        await s.append(recs(1, 1))
        cosmos.reset_stats()
        await s.append([(2, one)])
        stats = cosmos.stats()
        # One extra part item, then the batch that commits it.
        assert stats["by_kind"] == {"write": 1, "batch": 1}, stats
        await s.append([(3, three[0]), (4, b"small"), (5, three[1]), (6, three[2])])
        await s.append(recs(7, 8))
        await s.close()
        return await reopen(cosmos, container)

    got = run(body())
    assert got.entries == [
        (1, b"v1"),
        (2, one),
        (3, three[0]),
        (4, b"small"),
        (5, three[1]),
        (6, three[2]),
    ] + recs(7, 8)
    assert len(part_items(cosmos, container)) == 1 + 3  # 1.5 MiB -> 2 parts; 4.5 MiB -> 4 parts
    assert all(len(it["d"]) <= 1_800_000 for it in items(cosmos, container) if "d" in it)


def test_orphan_chunks_removed_on_open(cosmos: CosmosServer, container: str) -> None:
    kept = os.urandom(2_000_000)
    lost = os.urandom(2_000_000)

    async def body() -> Recovered:
        s = make(cosmos, container)
        await s.open()
        await s.append([(1, kept)])
        # The parts get written, then the committing batch is refused: they are orphans.
        cosmos.fault("status", status=400, count=1, kind="batch")
        with pytest.raises(StoreError) as err:
            await s.append([(2, lost)])
        assert not isinstance(err.value, Uncertain | Fenced)
        assert len(part_items(cosmos, container)) == 2
        await s.close()
        return await reopen(cosmos, container)

    got = run(body())
    assert got.entries == [(1, kept)]
    parts = part_items(cosmos, container)
    assert [p["x"] for p in parts] == [1]  # the committed item's part is kept, the orphan is gone


# ---- fencing -------------------------------------------------------------------------------------------


def test_second_writer_fences_the_first(cosmos: CosmosServer, container: str) -> None:
    async def body() -> Recovered:
        a = make(cosmos, container, writer_id="node-a")
        await a.open()
        await a.append(recs(1, 3, b"a"))
        b = make(cosmos, container, writer_id="node-b")
        got_b = await b.open()
        assert got_b.entries == recs(1, 3, b"a")
        with pytest.raises(Fenced, match="node-b"):
            await a.append(recs(4, 5, b"a"))
        with pytest.raises(Fenced):  # and it stays fenced
            await a.append(recs(4, 5, b"a"))
        with pytest.raises(Fenced):
            await a.compact(2)
        await b.append(recs(4, 6, b"b"))
        await a.close()
        await b.close()
        return await reopen(cosmos, container)

    got = run(body())
    assert got.entries == recs(1, 3, b"a") + recs(4, 6, b"b")


def test_fenced_writers_part_writes_cannot_damage_committed_entries(
    cosmos: CosmosServer, container: str
) -> None:
    """Parts are written before the batch that fences: a writer that does not know yet that it lost
    writes its parts for an index the new writer has already committed with parts of its own."""
    big_a, big_b = os.urandom(2_000_000), os.urandom(2_000_000)

    async def body() -> Recovered:
        a = make(cosmos, container, writer_id="node-a")
        await a.open()
        b = make(cosmos, container, writer_id="node-b")
        await b.open()
        await b.append([(1, big_b)])
        with pytest.raises(Fenced):
            await a.append([(1, big_a)])
        await a.close()
        await b.close()
        return await reopen(cosmos, container)

    got = run(body())
    assert got.entries == [(1, big_b)]


def test_fencing_holds_across_a_segment_boundary(cosmos: CosmosServer, container: str) -> None:
    async def body() -> Recovered:
        a = make(cosmos, container, writer_id="node-a", segment_size=4)
        await a.open()
        await a.append(recs(1, 4, b"a"))  # the next append opens segment 1
        b = make(cosmos, container, writer_id="node-b", segment_size=4)
        await b.open()  # claims by creating segment 1's head
        with pytest.raises(Fenced, match="node-b"):
            await a.append(recs(5, 5, b"a"))
        await b.append(recs(5, 9, b"b"))  # and b opens segment 2 from there
        await b.append(recs(10, 10, b"b"))
        await a.close()
        await b.close()
        return await reopen(cosmos, container, segment_size=4)

    got = run(body())
    assert got.entries == recs(1, 4, b"a") + recs(5, 10, b"b")


def test_writer_that_slept_through_a_cleanup_cannot_recreate_a_segment(
    cosmos: CosmosServer, container: str
) -> None:
    """b takes over, writes on, snapshots, and deletes the segments a would write to next: a's append
    must not simply create that segment's head again."""

    async def body() -> Recovered:
        a = make(cosmos, container, writer_id="node-a", segment_size=2)
        await a.open()
        await a.append(recs(1, 2, b"a"))  # segment 0; a's next append would open segment 1
        b = make(cosmos, container, writer_id="node-b", segment_size=2)
        await b.open()
        for first in (3, 5, 7):
            await b.append(recs(first, first + 1, b"b"))
        await b.save_snapshot(8, [b"state"])  # segments 0..2 are gone now
        assert not [it for it in items(cosmos, container) if it["pk"] in ("log-0", "log-1")]
        with pytest.raises(Fenced):
            await a.append(recs(3, 3, b"a"))
        await a.close()
        await b.close()
        return await reopen(cosmos, container, segment_size=2)

    got = run(body())
    assert got.snapshot_index == 8 and got.entries == []
    assert not [it for it in items(cosmos, container) if it["pk"] in ("log-0", "log-1")]


@pytest.mark.parametrize(
    ("segment_size", "slow_claim"),
    [(16, False), (100_000, True)],
    ids=["chasing-segments", "slow-head-writes"],
)
def test_takeover_during_appends_never_acknowledges_an_index_twice(
    cosmos: CosmosServer, container: str, segment_size: int, slow_claim: bool
) -> None:
    """b opens while a appends back to back. chasing-segments: a crosses segment boundaries during
    b's claim, so b must follow the tail into the next segment. slow-head-writes: b's head writes are
    held 200 ms (a's batches are not), so a claim under If-Match would always find the head changed."""
    acked: dict[int, bytes] = {}
    fenced: list[Exception] = []

    async def writer(store: CosmosStore, name: bytes, next_index: int, stop: asyncio.Event) -> None:
        while not stop.is_set():
            batch = [(next_index, name + str(next_index).encode()), (next_index + 1, name + b"+")]
            try:
                await store.append(batch)
            except Fenced as e:
                fenced.append(e)
                return
            for i, d in batch:
                assert i not in acked, f"index {i} acknowledged twice"
                acked[i] = d
            next_index += 2
            await asyncio.sleep(0)

    async def body() -> Recovered:
        a = make(cosmos, container, writer_id="node-a", segment_size=segment_size)
        await a.open()
        stop = asyncio.Event()
        task = asyncio.create_task(writer(a, b"a", 1, stop))
        await asyncio.sleep(0.3)
        if slow_claim:
            cosmos.fault("delay", ms=200, kind="write")
        b = make(cosmos, container, writer_id="node-b", segment_size=segment_size)
        got = await asyncio.wait_for(b.open(), 8)
        cosmos.clear_faults()
        assert [i for i, _ in got.entries] == list(range(1, len(got.entries) + 1))
        assert all(acked[i] == d for i, d in got.entries if i in acked)
        await asyncio.wait_for(task, 10)  # a must be fenced by its next append
        stop.set()
        last = got.entries[-1][0] if got.entries else 0
        await writer_b(b, last + 1)
        await a.close()
        await b.close()
        return await reopen(cosmos, container, segment_size=segment_size)

    async def writer_b(store: CosmosStore, first: int) -> None:
        for i in range(first, first + 10):
            await store.append([(i, b"b" + str(i).encode())])
            assert i not in acked, f"index {i} acknowledged twice"
            acked[i] = b"b" + str(i).encode()

    got = run(body())
    assert len(fenced) == 1 and "node-b" in str(fenced[0])
    assert dict(got.entries) == acked  # everything acknowledged is there, exactly as acknowledged
    assert [i for i, _ in got.entries] == list(range(1, len(got.entries) + 1))
    assert len([i for i in acked if acked[i].startswith(b"a")]) > 2


# ---- faults --------------------------------------------------------------------------------------------


def test_429_storm_is_retried_then_throttled(cosmos: CosmosServer, container: str) -> None:
    async def body() -> Recovered:
        s = make(cosmos, container)
        await s.open()
        cosmos.fault("429", count=3, retry_after_ms=20, kind="batch")
        await s.append(recs(1, 2))  # the SDK waits out the retry-after and succeeds
        assert cosmos.stats()["by_status"]["429"] == 3
        cosmos.fault("429", retry_after_ms=10, kind="batch")
        with pytest.raises(Throttled) as err:
            await s.append(recs(3, 4))
        assert not isinstance(err.value, Uncertain)
        cosmos.clear_faults()
        await s.append(recs(3, 4))  # still usable: the throttled batch certainly did not happen
        await s.close()
        return await reopen(cosmos, container)

    assert run(body()).entries == recs(1, 4)


@pytest.mark.parametrize("count", [1, None], ids=["once", "every-attempt"])
def test_dropped_answer_after_the_batch_landed(
    cosmos: CosmosServer, container: str, count: int | None
) -> None:
    """drop_after: applied, answer lost. The SDK resends (412 from its own copy, or another lost answer);
    the store reads the head back and reports success, once."""

    async def body() -> Recovered:
        s = make(cosmos, container)
        await s.open()
        await s.append(recs(1, 2))
        cosmos.fault("drop_after", count=count, kind="batch")
        await s.append(recs(3, 5))
        assert cosmos.stats()["faults_injected"]
        cosmos.clear_faults()
        await s.append(recs(6, 6))
        await s.close()
        return await reopen(cosmos, container)

    assert run(body()).entries == recs(1, 6)
    assert sorted((it["first"], it["last"]) for it in log_items(cosmos, container)) == [
        (1, 2),
        (3, 5),
        (6, 6),
    ]


def test_dropped_before_applying_is_a_certain_failure(cosmos: CosmosServer, container: str) -> None:
    async def body() -> Recovered:
        s = make(cosmos, container)
        await s.open()
        await s.append(recs(1, 2))
        cosmos.fault("drop", kind="batch")  # every attempt, the SDK's resends included
        with pytest.raises(StoreError) as err:
            await s.append(recs(3, 5, b"lost"))
        assert not isinstance(err.value, Uncertain | Fenced)
        cosmos.clear_faults()
        # The engine reuses the indexes for other data; the first attempt can never land later.
        await s.append(recs(3, 4, b"new"))
        await s.close()
        return await reopen(cosmos, container)

    assert run(body()).entries == recs(1, 2) + recs(3, 4, b"new")


def test_timed_out_batch_that_lands_late_cannot_land(cosmos: CosmosServer, container: str) -> None:
    """The server applies a delayed batch after the client gave up on it. The store's read-back says
    "not there yet" and must make sure it never gets there: the engine reuses those indexes."""

    async def body() -> Recovered:
        s = make(cosmos, container, client_kwargs={"read_timeout": 0.2})
        await s.open()
        await s.append(recs(1, 2))
        # Every attempt (the SDK resends after a timeout) is held past the client's read timeout.
        cosmos.fault("delay", ms=2000, kind="batch")
        with pytest.raises(StoreError) as err:
            await s.append(recs(3, 4, b"late"))
        assert not isinstance(err.value, Uncertain | Fenced)
        cosmos.clear_faults()
        cosmos.reset_stats()
        await asyncio.sleep(2.0)  # the late copies are answered by now: all refused (412 inside a 207)
        late = cosmos.stats()["by_status"]
        assert late.get("207", 0) >= 1 and "200" not in late, late
        await s.append(recs(3, 3, b"new"))
        await s.close()
        return await reopen(cosmos, container)

    assert run(body()).entries == recs(1, 2) + recs(3, 3, b"new")


def test_dropped_batches_at_a_segment_boundary_are_certain_failures(
    cosmos: CosmosServer, container: str
) -> None:
    """segment_size 3: [1,2] in segment 0, [3] creates segment 1's head, [6] would create segment 2's."""

    async def lose(s: CosmosStore, batch: list[tuple[int, bytes]]) -> None:
        cosmos.fault("drop", kind="batch")
        with pytest.raises(StoreError) as err:
            await s.append(batch)
        assert not isinstance(err.value, Uncertain | Fenced)
        cosmos.clear_faults()

    async def body() -> Recovered:
        s = make(cosmos, container, segment_size=3)
        await s.open()
        await s.append(recs(1, 2))
        await lose(s, recs(3, 3, b"lost"))  # would have created segment 1's head
        await s.append(recs(3, 3))
        await lose(s, recs(4, 5, b"lost"))
        await s.append(recs(4, 5, b"new"))
        await lose(s, recs(6, 6, b"lost"))  # would have created segment 2's head
        await s.append(recs(6, 7, b"new"))
        await s.close()
        return await reopen(cosmos, container, segment_size=3)

    assert run(body()).entries == recs(1, 3) + recs(4, 7, b"new")


def test_unreadable_outcome_is_uncertain_and_stops_the_store(cosmos: CosmosServer, container: str) -> None:
    async def body() -> Recovered:
        s = make(cosmos, container)
        await s.open()
        await s.append(recs(1, 1))
        cosmos.fault("drop_after", kind=["batch", "read"])
        with pytest.raises(Uncertain):
            await s.append(recs(2, 3))
        cosmos.clear_faults()
        with pytest.raises(StoreError, match="reopen"):
            await s.append(recs(2, 3))
        await s.close()
        return await reopen(cosmos, container)

    assert run(body()).entries == recs(1, 3)  # it had landed; a reopen finds out


# ---- cost ----------------------------------------------------------------------------------------------


def test_one_request_per_append_in_the_steady_state(cosmos: CosmosServer, container: str) -> None:
    async def body() -> None:
        s = make(cosmos, container)
        await s.open()
        await s.append(recs(1, 1))
        cosmos.reset_stats()
        for i in range(2, 52, 2):
            await s.append(recs(i, i + 1))
        stats = cosmos.stats()
        assert stats["total"] == 25 and stats["by_kind"] == {"batch": 25}, stats
        assert stats["batch_operations"] == 50  # the head and one log item each
        # Keep-alive: no connection per request (the SDK may pool a second one).
        assert stats["connections_opened"] <= 2
        await s.close()

    run(body())


def test_engine_on_cosmos_group_commit_and_restart(cosmos: CosmosServer, container: str) -> None:
    """The state machine over this store: 64 concurrent clients cost few requests, and a restart
    (snapshot + log replay) gives back every acknowledged write."""
    from fastetcd.engine.state_machine import StateMachine
    from fastetcd.proto import kv_pb2
    from fastetcd.proto import rpc_pb2 as pb

    async def body() -> None:
        store = make(cosmos, container)
        sm = StateMachine(store, snapshot_count=150)
        await sm.start()
        cosmos.reset_stats()

        async def client(c: int) -> None:
            for n in range(5):
                await sm.put(pb.PutRequest(key=b"k%d" % c, value=b"v%d" % n))

        await asyncio.gather(*(client(c) for c in range(64)))
        batches = cosmos.stats()["by_kind"].get("batch", 0)
        assert batches / 320 <= 0.1, batches
        rev = sm.committed_rev
        await sm.stop()
        await store.close()

        store = make(cosmos, container)
        sm = StateMachine(store)
        await sm.start()
        try:
            assert sm.committed_rev == rev
            got = sm.range(pb.RangeRequest(key=b"\0", range_end=b"\0"))
            kvs = [kv_pb2.KeyValue.FromString(raw) for raw in got.kvs]
            assert {kv.key: kv.value for kv in kvs} == {b"k%d" % c: b"v4" for c in range(64)}
        finally:
            await sm.stop()
            await store.close()

    run(body())


# ---- followers: tail, claim, release -------------------------------------------------------------------


def test_follower_tails_every_entry_once_across_segments_and_chunks(
    cosmos: CosmosServer, container: str
) -> None:
    big = os.urandom(1_600_000)  # more than PART_BYTES: a log item with a chunk item

    async def body() -> None:
        w = make(cosmos, container, writer_id="node-w", segment_size=4)
        await w.open()
        await w.append(recs(1, 2))
        f = make(cosmos, container, writer_id="node-f", segment_size=4)
        got = await f.open(writer=False)
        assert got.entries == recs(1, 2)
        cosmos.reset_stats()
        assert await f.tail(2) == []
        assert cosmos.stats()["by_kind"] == {"query": 1}  # an idle poll is one query
        applied = 2
        # 3..5 crosses into segment 1; 6 is chunked; 7..12 reaches segment 3 in one item.
        for batch in (recs(3, 5), [(6, big)], recs(7, 12), recs(13, 13)):
            await w.append(batch)
            cosmos.reset_stats()
            assert await f.tail(applied) == batch
            applied = batch[-1][0]
            # One query per segment touched: where the item is, and where the next one will go.
            touched = {batch[0][0] // 4, (applied + 1) // 4}
            assert cosmos.stats()["by_kind"] == {"query": len(touched)}, cosmos.stats()
            assert await f.tail(applied) == []
        with pytest.raises(Fenced):  # a follower writes nothing
            await f.append(recs(14, 14))
        with pytest.raises(Fenced):
            await f.compact(1)
        await w.close()
        await f.close()

    run(body())


def test_follower_claim_fences_the_writer_and_leadership_goes_back_and_forth(
    cosmos: CosmosServer, container: str
) -> None:
    big, lost = os.urandom(1_600_000), os.urandom(1_600_000)

    async def body() -> Recovered:
        w = make(cosmos, container, writer_id="node-w", segment_size=4)
        await w.open()
        await w.append(recs(1, 3, b"w"))
        f = make(cosmos, container, writer_id="node-f", segment_size=4)
        assert (await f.open(writer=False)).entries == recs(1, 3, b"w")
        # Committed after the follower's last tail: the claim hands them over.
        await w.append(recs(4, 5, b"w"))
        await w.append([(6, big)])
        assert await f.claim(3) == [*recs(4, 5, b"w"), (6, big)]
        # The old writer's next append is fenced; its parts are left behind as orphans.
        with pytest.raises(Fenced, match="node-f"):
            await w.append([(7, lost)])
        assert [p["x"] for p in part_items(cosmos, container)] == [6, 7]
        await f.append(recs(7, 8, b"f"))
        # The old writer rejoins as a follower.
        assert await w.tail(6) == recs(7, 8, b"f")
        await f.release()
        with pytest.raises(Fenced):
            await f.append(recs(9, 9, b"f"))
        assert await f.tail(8) == []
        # ... and leads again: its claim also removes its own orphan parts.
        assert await w.claim(8) == []
        assert [p["x"] for p in part_items(cosmos, container)] == [6]
        await w.append(recs(9, 10, b"w"))
        assert await f.tail(8) == recs(9, 10, b"w")
        assert await f.claim(10) == []
        with pytest.raises(Fenced):
            await w.append(recs(11, 11, b"w"))
        await f.append(recs(11, 12, b"f"))
        assert await w.tail(10) == recs(11, 12, b"f")
        await w.close()
        await f.close()
        return await reopen(cosmos, container, segment_size=4)

    got = run(body())
    assert got.entries == [
        *recs(1, 5, b"w"),
        (6, big),
        *recs(7, 8, b"f"),
        *recs(9, 10, b"w"),
        *recs(11, 12, b"f"),
    ]


def test_follower_behind_a_snapshot_and_cleanup_is_told_so(cosmos: CosmosServer, container: str) -> None:
    async def body() -> Recovered:
        w = make(cosmos, container, writer_id="node-w", segment_size=2)
        await w.open()
        await w.append(recs(1, 2))
        f = make(cosmos, container, writer_id="node-f", segment_size=2)
        assert (await f.open(writer=False)).entries == recs(1, 2)
        await w.append(recs(3, 4))
        assert await f.tail(2) == recs(3, 4)
        for first in (5, 7, 9):
            await w.append(recs(first, first + 1))
        await w.save_snapshot(8, [b"state at 8"])  # segments 0..3 (indexes up to 8) are gone
        with pytest.raises(Behind, match="snapshot at index 8"):
            await f.tail(4)
        with pytest.raises(Behind):  # and so is a claim from there
            await f.claim(4)
        await f.close()
        # Reopening as a follower starts from the snapshot and tails on.
        f = make(cosmos, container, writer_id="node-f", segment_size=2)
        got = await f.open(writer=False)
        await w.append(recs(11, 11))
        assert await f.tail(10) == recs(11, 11)
        await w.close()
        await f.close()
        return got

    got = run(body())
    assert got.snapshot_index == 8 and got.snapshot == b"state at 8" and got.entries == recs(9, 10)
