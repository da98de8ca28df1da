"""The engine's state machine over the real embedded store: group commit, isolation of pending writes,
store failures, same-batch visibility, restart recovery, compaction ordering.

``FaultyStore`` (tests/faulty_store.py) delegates to a real ``EmbeddedStore`` in a tmp dir; it only counts,
holds or fails appends, so everything acknowledged is really on disk and restarts are real recoveries.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from faulty_store import FaultyStore

from fastetcd import errors
from fastetcd.engine import state_machine
from fastetcd.engine.state_machine import StateMachine
from fastetcd.proto import kv_pb2
from fastetcd.proto import rpc_pb2 as pb
from fastetcd.store.embedded import EmbeddedStore

ALL = (b"\0", b"\0")  # etcd: key "\0" with range_end "\0" is every key


@pytest.fixture(autouse=True, params=["append", "append_nowait"])
def store_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test twice: the writer awaiting ``append`` (Cosmos), and answering from the store's durable
    callback (``append_nowait``, the embedded store's commit log)."""
    monkeypatch.setattr(FaultyStore, "nowait", request.param == "append_nowait")
    return request.param


def run(coro: Coroutine[Any, Any, Any], timeout: float = 25.0) -> Any:
    # A hang (a held append never released, a writer that never answers) must fail, not stall the suite.
    return asyncio.run(asyncio.wait_for(coro, timeout))


@asynccontextmanager
async def engine(
    path: Path, *, snapshot_count: int = 100_000, shared: bool | None = None
) -> AsyncIterator[tuple[StateMachine, FaultyStore]]:
    # The commit log (the single-node server's store) on the callback path, unless the test needs other
    # nodes on the same files: shared (SQLite only), as HA nodes run it.
    if shared is None:
        shared = not FaultyStore.nowait
    store = FaultyStore(EmbeddedStore(str(path), shared=shared))
    sm = StateMachine(store, snapshot_count=snapshot_count)
    try:
        await sm.start()
        yield sm, store
    finally:
        store.unhold()  # a failing test must not leave the writer parked inside append
        await sm.stop()
        await store.close()


def run_engine(
    path: Path, body: Callable[[StateMachine, FaultyStore], Awaitable[Any]], *, shared: bool | None = None
) -> Any:
    """run(body(sm, store)) on a fresh engine over `path`."""

    async def main() -> Any:
        async with engine(path, shared=shared) as (sm, store):
            return await body(sm, store)

    return run(main())


def put(key: bytes, value: bytes, **kw: Any) -> pb.PutRequest:
    return pb.PutRequest(key=key, value=value, **kw)


def delete(key: bytes, end: bytes = b"", **kw: Any) -> pb.DeleteRangeRequest:
    return pb.DeleteRangeRequest(key=key, range_end=end, **kw)


def op_put(key: bytes, value: bytes) -> pb.RequestOp:
    return pb.RequestOp(request_put=put(key, value))


def op_del(key: bytes) -> pb.RequestOp:
    return pb.RequestOp(request_delete_range=delete(key))


def op_range(key: bytes) -> pb.RequestOp:
    return pb.RequestOp(request_range=pb.RangeRequest(key=key))


def version_is(key: bytes, v: int, result: int = pb.Compare.EQUAL) -> pb.Compare:
    return pb.Compare(key=key, target=pb.Compare.VERSION, result=result, version=v)


def decode(kvs: Any) -> list[tuple[bytes, bytes, int, int, int]]:
    """Encoded KeyValues (engine reads) or KeyValue messages (inside responses) as comparable tuples."""
    out = []
    for raw in kvs:
        kv = kv_pb2.KeyValue.FromString(raw) if isinstance(raw, bytes) else raw
        out.append((kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version))
    return out


def read_all(sm: StateMachine, rev: int = 0) -> tuple[list[tuple[bytes, bytes, int, int, int]], int]:
    """Every key at ``rev`` (0 = committed) through the engine's read path, and the count it reports."""
    res = sm.range(pb.RangeRequest(key=ALL[0], range_end=ALL[1], revision=rev))
    assert res.count == len(res.kvs)
    return decode(res.kvs), res.count


def get(sm: StateMachine, key: bytes, rev: int = 0) -> tuple[bytes, bytes, int, int, int] | None:
    got = decode(sm.range(pb.RangeRequest(key=key, revision=rev)).kvs)
    assert len(got) <= 1
    return got[0] if got else None


def raises_etcd(err: errors.EtcdError, fn: Any, *args: Any) -> None:
    with pytest.raises(errors.EtcdError) as info:
        fn(*args)
    assert (info.value.code, info.value.message) == (err.code, err.message)


async def araises_etcd(err: errors.EtcdError, aw: Any) -> None:
    with pytest.raises(errors.EtcdError) as info:
        await aw
    assert (info.value.code, info.value.message) == (err.code, err.message)


def spawn(aw: Any) -> asyncio.Future:
    return asyncio.ensure_future(aw)


# ----------------------------------------------------------------------------------------- group commit


def test_group_commit_concurrent_puts_share_appends_and_get_contiguous_revisions(tmp_path):
    n = 200

    async def body(sm: StateMachine, store: FaultyStore) -> Any:
        resps = await asyncio.gather(*(sm.put(put(b"k%03d" % i, b"v%d" % i)) for i in range(n)))
        revs = [r.header.revision for r in resps]
        assert len(set(revs)) == n
        assert sorted(revs) == list(range(2, n + 2))
        assert 1 <= store.append_count < n, store.appends
        # Every revision went to the store exactly once, in order, with no gaps.
        assert [rev for batch in store.appends for rev in batch] == list(range(2, n + 2))
        assert sm.committed_rev == n + 1
        # Each caller's revision is the one its own key was written at.
        for i, r in enumerate(resps):
            assert get(sm, b"k%03d" % i) == (b"k%03d" % i, b"v%d" % i, r.header.revision,
                                             r.header.revision, 1)
        assert read_all(sm)[1] == n

    run_engine(tmp_path, body)


def test_an_answer_sees_its_write_committed_and_comes_before_the_watchers_on_the_callback_path(
    tmp_path, store_path
):
    async def body(sm: StateMachine, store: FaultyStore) -> Any:
        order: list[str] = []
        seen: list[tuple[int, Any]] = []

        def answered(fut: asyncio.Future) -> None:
            order.append("answer")
            # What a client's next request would see once it has the answer.
            seen.append((sm.committed_rev, get(sm, b"k")))

        sm.listeners.append(lambda revisions: order.append(f"listener {[r for r, _ in revisions]}"))
        fut = sm.put_nowait(put(b"k", b"v"))
        fut.add_done_callback(answered)
        resp = await fut
        await asyncio.sleep(0)  # the writer resumes (and calls the listeners) after the answer
        assert resp.header.revision == 2
        assert seen == [(2, (b"k", b"v", 2, 2, 1))]
        if store_path == "append_nowait":
            assert order == ["answer", "listener [2]"]  # the answer did not wait for the watchers
        else:
            assert order == ["listener [2]", "answer"]

    run_engine(tmp_path, body)


def test_writes_queued_during_an_append_go_together_in_the_next_one(tmp_path):
    async def body(sm: StateMachine, store: FaultyStore) -> Any:
        store.hold()
        first = spawn(sm.put(put(b"first", b"1")))
        await store.wait_held()
        rest = [spawn(sm.put(put(b"k%02d" % i, b"x"))) for i in range(50)]
        await asyncio.sleep(0.05)
        assert store.append_count == 1  # the writer is parked in the first append
        assert not first.done() and not any(f.done() for f in rest)
        store.unhold()
        assert (await first).header.revision == 2
        got = [(await f).header.revision for f in rest]
        assert sorted(got) == list(range(3, 53))
        assert store.appends == [[2], list(range(3, 53))]

    run_engine(tmp_path, body)


def test_no_op_writes_take_no_revision_and_no_append(tmp_path):
    async def body(sm: StateMachine, store: FaultyStore) -> Any:
        await sm.put(put(b"a", b"1"))
        before = store.append_count
        d = await sm.delete_range(delete(b"missing"))
        assert (d.deleted, d.header.revision) == (0, 2)
        t = await sm.txn(pb.TxnRequest(compare=[version_is(b"a", 7)], success=[op_put(b"a", b"2")]))
        assert not t.succeeded and t.header.revision == 2
        assert store.append_count == before and sm.committed_rev == 2
        assert (await sm.put(put(b"b", b"1"))).header.revision == 3

    run_engine(tmp_path, body)


def test_a_write_not_durable_in_time_times_out_yet_may_still_commit(tmp_path, monkeypatch):
    # etcd's "request timed out": the caller gets the error, the proposal is not withdrawn.
    monkeypatch.setattr(state_machine, "REQUEST_TIMEOUT", 0.3)

    async def body(sm: StateMachine, store: FaultyStore) -> Any:
        store.hold()
        slow = spawn(sm.put(put(b"slow", b"1")))
        await store.wait_held()
        with pytest.raises(errors.EtcdError) as e:
            await slow
        assert (e.value.code, e.value.message) == ("UNAVAILABLE", "etcdserver: request timed out")
        abandoned = spawn(sm.put(put(b"abandoned", b"1")))
        await asyncio.sleep(0.05)
        abandoned.cancel()  # the client went away: its write stays queued
        store.unhold()
        assert (await sm.put(put(b"after", b"1"))).header.revision == 4
        assert [kv[0] for kv in read_all(sm)[0]] == [b"abandoned", b"after", b"slow"]

    run_engine(tmp_path, body)


# ----------------------------------------------------------------------------------------- isolation


def test_reads_never_see_pending_writes(tmp_path):
    async def body(sm: StateMachine, store: FaultyStore) -> Any:
        await sm.put(put(b"a", b"old"))  # 2
        await sm.put(put(b"c", b"doomed"))  # 3
        committed = read_all(sm)
        store.hold()
        pending = [
            spawn(sm.put(put(b"a", b"new"))),
            spawn(sm.put(put(b"b", b"created"))),
            spawn(sm.delete_range(delete(b"c"))),
        ]
        await store.wait_held()
        await asyncio.sleep(0.02)
        # The premise: the pending versions really are in the core, above committed_rev.
        assert store.appends[-1] == [4, 5, 6]
        assert sm.core.rev == 6 and sm.core.get(b"a", 6).value == b"new"
        assert sm.committed_rev == 3
        assert not any(f.done() for f in pending)

        assert read_all(sm) == committed
        assert get(sm, b"a") == (b"a", b"old", 2, 2, 1)
        assert get(sm, b"b") is None
        assert get(sm, b"c") == (b"c", b"doomed", 3, 3, 1)
        assert sm.range(pb.RangeRequest(key=b"a")).rev == 3  # header revision: committed, not head
        cnt = sm.range(pb.RangeRequest(key=ALL[0], range_end=ALL[1], count_only=True))
        assert cnt.count == 2
        keys_only = sm.range(pb.RangeRequest(key=ALL[0], range_end=ALL[1], keys_only=True))
        assert [k[0] for k in decode(keys_only.kvs)] == [b"a", b"c"]
        by_mod = sm.range(pb.RangeRequest(key=ALL[0], range_end=ALL[1], sort_target=pb.RangeRequest.MOD,
                                          sort_order=pb.RangeRequest.DESCEND))
        assert [k[:2] for k in decode(by_mod.kvs)] == [(b"c", b"doomed"), (b"a", b"old")]
        raises_etcd(errors.FUTURE_REV, sm.range, pb.RangeRequest(key=b"a", revision=4))

        t = sm.txn_readonly(pb.TxnRequest(
            compare=[version_is(b"a", 1), version_is(b"b", 0)],
            success=[op_range(b"a"), op_range(b"b")],
            failure=[op_range(b"c")],
        ))
        assert t.succeeded and t.header.revision == 3
        assert decode(t.responses[0].response_range.kvs) == [(b"a", b"old", 2, 2, 1)]
        assert t.responses[1].response_range.count == 0
        assert t.responses[0].response_range.header.revision == 3

        store.unhold()
        revs = [(await f).header.revision for f in pending]
        assert revs == [4, 5, 6]
        assert sm.committed_rev == 6
        assert get(sm, b"a") == (b"a", b"new", 2, 4, 2)
        assert get(sm, b"b") == (b"b", b"created", 5, 5, 1)
        assert get(sm, b"c") is None
        assert read_all(sm, 3) == committed  # history is still there

    run_engine(tmp_path, body)


# ----------------------------------------------------------------------------------------- store failure


@pytest.mark.parametrize("acked_before", [0, 3], ids=["first-append-fails", "later-append-fails"])
def test_failed_append_fails_exactly_its_batch_and_leaves_no_trace(tmp_path, acked_before):
    async def body():
        async with engine(tmp_path) as (sm, store):
            for i in range(acked_before):
                await sm.put(put(b"pre%d" % i, b"v"))
            head = sm.committed_rev
            before_state = read_all(sm)
            before_history = [read_all(sm, r) for r in range(2, head + 1)]
            keys_before = len(sm.core)

            store.fail_appends = {store.append_count + 1}
            store.hold()
            doomed = [
                spawn(sm.put(put(b"pre0", b"overwritten"))),
                spawn(sm.put(put(b"brand-new", b"1"))),
                spawn(sm.delete_range(delete(b"pre", b"prf"))),
                # Sees brand-new (same batch), so it writes too.
                spawn(sm.txn(pb.TxnRequest(compare=[version_is(b"brand-new", 1)],
                                           success=[op_put(b"t", b"1"), op_put(b"brand-new", b"2")]))),
                # Writes nothing; if it succeeded it would report a revision that never committed.
                spawn(sm.delete_range(delete(b"missing"))),
            ]
            await store.wait_held()
            # Queued behind the failing batch: must not be caught up in its failure.
            later = [spawn(sm.put(put(b"after", b"1"))), spawn(sm.put(put(b"pre1", b"later")))]
            await asyncio.sleep(0.02)
            # Four writing requests (the delete_range at least removes the pre0 the batch wrote).
            assert store.appends[-1] == list(range(head + 1, head + 5))
            store.unhold()

            outcomes = await asyncio.gather(*doomed, return_exceptions=True)
            for o in outcomes:
                assert isinstance(o, errors.EtcdError), outcomes
                assert o.code == "UNAVAILABLE"
            after_resps = await asyncio.gather(*later)
            # Revisions continue right after the last durable one: no gap where the failed batch was.
            assert [r.header.revision for r in after_resps] == [head + 1, head + 2]
            assert store.appends[-1] == [head + 1, head + 2]
            assert sm.committed_rev == head + 2 == sm.core.rev

            # None of the failed batch's versions survive in the core, at any revision.
            for key in (b"brand-new", b"t"):
                assert sm.core.get(key, head + 10) is None
            assert len(sm.core) == keys_before + 1 + (0 if acked_before >= 2 else 1)  # after (+ pre1)
            state = dict((k[0], k) for k in read_all(sm)[0])
            expected = {k[0]: k for k in before_state[0]}
            expected[b"after"] = (b"after", b"1", head + 1, head + 1, 1)
            old_pre1 = expected.get(b"pre1")
            expected[b"pre1"] = (b"pre1", b"later", old_pre1[2] if old_pre1 else head + 2, head + 2,
                                 old_pre1[4] + 1 if old_pre1 else 1)
            assert state == expected
            assert [read_all(sm, r) for r in range(2, head + 1)] == before_history
            final = [read_all(sm, r) for r in range(2, head + 3)]

        # A restart sees exactly the acknowledged writes, at every revision.
        async with engine(tmp_path) as (sm, store):
            assert sm.committed_rev == head + 2
            assert [read_all(sm, r) for r in range(2, head + 3)] == final
            assert (await sm.put(put(b"post-restart", b"1"))).header.revision == head + 3

    run(body())


def test_failed_compaction_in_store_leaves_history_readable(tmp_path):
    async def body(sm: StateMachine, store: FaultyStore) -> Any:
        for i in range(4):
            await sm.put(put(b"k", b"%d" % i))  # 2..5
        store.fail_compact = True
        with pytest.raises(errors.EtcdError) as info:
            await sm.compact(4)
        assert info.value.code == "UNAVAILABLE"
        assert sm.compact_rev == -1
        assert get(sm, b"k", 2)[1] == b"0"
        store.fail_compact = False
        assert await sm.compact(4) == 5
        raises_etcd(errors.COMPACTED, sm.range, pb.RangeRequest(key=b"k", revision=3))
        assert (await sm.put(put(b"k", b"x"))).header.revision == 6

    run_engine(tmp_path, body)


# ----------------------------------------------------------------------------------------- same batch


def test_txn_compares_see_earlier_requests_of_the_same_batch(tmp_path):
    async def body(sm: StateMachine, store: FaultyStore) -> Any:
        await sm.put(put(b"other", b"x"))  # 2
        store.hold()
        blocker = spawn(sm.put(put(b"blocker", b"1")))  # 3, parks the writer
        await store.wait_held()
        reqs = [
            # 4: k absent -> creates it
            sm.txn(pb.TxnRequest(compare=[version_is(b"k", 0)], success=[op_put(b"k", b"v1")],
                                 failure=[op_put(b"loser", b"1")])),
            # 5: sees t1's k (version 1) -> failure branch
            sm.txn(pb.TxnRequest(compare=[version_is(b"k", 0)], success=[op_put(b"k", b"v2")],
                                 failure=[op_put(b"k", b"v2b")])),
            # 6: sees version 2; its range reads the batch's pending value
            sm.txn(pb.TxnRequest(compare=[version_is(b"k", 2)],
                                 success=[op_range(b"k"), op_put(b"seen", b"2")])),
            # 7: prev_kv is the pending v2b
            sm.put(put(b"k", b"v3", prev_kv=True)),
            # 8
            sm.delete_range(delete(b"k", prev_kv=True)),
            # 9: k was deleted by the request before -> recreated with a fresh generation
            sm.txn(pb.TxnRequest(
                compare=[version_is(b"k", 0), pb.Compare(key=b"k", target=pb.Compare.CREATE,
                                                         result=pb.Compare.EQUAL, create_revision=0)],
                success=[op_put(b"k", b"reborn")])),
        ]
        futs = [spawn(r) for r in reqs]
        await asyncio.sleep(0.02)
        store.unhold()
        await blocker
        t1, t2, t3, p, d, t4 = [await f for f in futs]
        assert store.appends == [[2], [3], list(range(4, 10))]  # really one batch

        assert t1.succeeded and t1.header.revision == 4
        assert not t2.succeeded and t2.header.revision == 5
        assert t3.succeeded and t3.header.revision == 6
        assert decode(t3.responses[0].response_range.kvs) == [(b"k", b"v2b", 4, 5, 2)]
        assert p.header.revision == 7
        assert (p.prev_kv.value, p.prev_kv.mod_revision, p.prev_kv.version) == (b"v2b", 5, 2)
        assert d.deleted == 1 and d.header.revision == 8
        assert [(kv.value, kv.version) for kv in d.prev_kvs] == [(b"v3", 3)]
        assert t4.succeeded and t4.header.revision == 9

        assert get(sm, b"k") == (b"k", b"reborn", 9, 9, 1)
        assert get(sm, b"loser") is None
        assert get(sm, b"seen") == (b"seen", b"2", 6, 6, 1)
        assert get(sm, b"k", 8) is None
        assert get(sm, b"k", 5) == (b"k", b"v2b", 4, 5, 2)

    run_engine(tmp_path, body)


# ----------------------------------------------------------------------------------------- recovery

KEYS = [b"k%02d" % i for i in range(12)]


class Model:
    """What the KV space must hold at every revision, from the requests in the order the writer took them."""

    def __init__(self) -> None:
        self.rev = 1
        self.state: dict[bytes, tuple[bytes, bytes, int, int, int]] = {}
        self.history: dict[int, list[tuple[bytes, bytes, int, int, int]]] = {1: []}

    def _put(self, s: dict, key: bytes, value: bytes, rev: int) -> None:
        old = s.get(key)
        s[key] = (key, value, old[2] if old else rev, rev, old[4] + 1 if old else 1)

    def apply(self, op: tuple) -> int:
        """Apply one op; returns the header revision etcd reports for it."""
        s = dict(self.state)
        rev = self.rev + 1
        kind = op[0]
        if kind == "put":
            self._put(s, op[1], op[2], rev)
        elif kind == "del":
            for k in [k for k in s if op[1] <= k < op[2]]:
                del s[k]
        elif kind == "txn":  # if key exists: delete it and put key2, else put key
            _, key, key2, value = op
            if key in s:
                del s[key]
                self._put(s, key2, value, rev)
            else:
                self._put(s, key, value, rev)
        if s != self.state:
            self.state = s
            self.rev = rev
            self.history[rev] = sorted(s.values())
        return self.rev


def random_op(rnd: random.Random, i: int) -> tuple:
    r = rnd.random()
    if r < 0.55:
        return ("put", rnd.choice(KEYS), b"v%d" % i)
    if r < 0.75:
        k = rnd.randrange(len(KEYS))
        return ("del", KEYS[k], KEYS[k] + b"\0" if rnd.random() < 0.7 else KEYS[min(k + 4, len(KEYS) - 1)])
    key, key2 = rnd.sample(KEYS, 2)
    return ("txn", key, key2, b"t%d" % i)


def submit(sm: StateMachine, op: tuple) -> Any:
    kind = op[0]
    if kind == "put":
        return sm.put(put(op[1], op[2]))
    if kind == "del":
        return sm.delete_range(delete(op[1], op[2]))
    _, key, key2, value = op
    return sm.txn(pb.TxnRequest(compare=[version_is(key, 0, pb.Compare.GREATER)],
                                success=[op_del(key), op_put(key2, value)],
                                failure=[op_put(key, value)]))


async def run_ops(sm: StateMachine, model: Model, rnd: random.Random, n: int) -> None:
    """``n`` random ops in concurrent groups (so batches hold several requests), checked against the model."""
    done = 0
    while done < n:
        group = [random_op(rnd, done + j) for j in range(min(rnd.randint(1, 8), n - done))]
        resps = await asyncio.gather(*(submit(sm, op) for op in group))
        # The writer applies in queue order, so the model's order is the submission order.
        assert [r.header.revision for r in resps] == [model.apply(op) for op in group]
        done += len(group)
    assert sm.committed_rev == model.rev


def check_against_model(sm: StateMachine, model: Model) -> dict[int, Any]:
    """Every revision from compact_rev to head reads as the model says; returns the raw read results."""
    assert sm.committed_rev == model.rev
    seen = {}
    first = max(sm.compact_rev, 1)
    for rev in range(first, model.rev + 1):
        kvs, count = read_all(sm, rev)
        want = max(r for r in model.history if r <= rev)
        assert kvs == model.history[want], f"revision {rev}"
        res = sm.range(pb.RangeRequest(key=b"k03", range_end=b"k09", revision=rev, limit=2))
        seen[rev] = (kvs, count, res.kvs, res.more, res.count)
    if sm.compact_rev > 1:
        raises_etcd(errors.COMPACTED, sm.range, pb.RangeRequest(key=b"k00", revision=sm.compact_rev - 1))
    raises_etcd(errors.FUTURE_REV, sm.range, pb.RangeRequest(key=b"k00", revision=model.rev + 1))
    return seen


@pytest.mark.parametrize("seed", [7, 8, 9])
def test_restart_recovers_identical_state_from_snapshot_and_log(tmp_path, seed):
    rnd = random.Random(seed)
    model = Model()

    async def body():
        # Phase 1: small snapshot_count, a compaction in the middle, so later snapshots carry it.
        async with engine(tmp_path, snapshot_count=10) as (sm, store):
            await run_ops(sm, model, rnd, 250)
            c1 = sm.committed_rev - 37
            assert await sm.compact(c1) == sm.committed_rev
            await run_ops(sm, model, rnd, 150)
            seen1 = check_against_model(sm, model)
            assert store.snapshots, "snapshot_count=10 must have produced snapshots"
            head1 = sm.committed_rev

        # Replay really starts from a snapshot, not from revision 2.
        raw = EmbeddedStore(str(tmp_path))
        rec = await raw.open()
        await raw.close()
        assert rec.snapshot_index > 1 and rec.snapshot
        assert all(r > rec.snapshot_index for r, _ in rec.entries)
        assert len(rec.entries) < head1 - 1
        assert rec.compact_rev == c1

        # Phase 2: recovered state is identical; continue writing without new snapshots, and compact
        # after the last snapshot, so the compaction can only come from the store's own record of it.
        async with engine(tmp_path, snapshot_count=10**9) as (sm, store):
            assert sm.committed_rev == head1 and sm.compact_rev == c1
            assert check_against_model(sm, model) == seen1
            await run_ops(sm, model, rnd, 60)
            c2 = sm.committed_rev - 10
            assert c2 > rec.snapshot_index
            await sm.compact(c2)
            await run_ops(sm, model, rnd, 40)
            assert not store.snapshots
            seen2 = check_against_model(sm, model)
            head2 = sm.committed_rev

        # Phase 3: the compaction after the snapshot persisted, history at and above it is intact.
        async with engine(tmp_path, snapshot_count=10) as (sm, store):
            assert sm.committed_rev == head2 and sm.compact_rev == c2
            assert check_against_model(sm, model) == seen2
            raises_etcd(errors.COMPACTED, sm.range, pb.RangeRequest(key=b"k00", revision=c2 - 1))
            await araises_etcd(errors.COMPACTED, sm.compact(c2))
            # The recovered engine keeps writing at the next revision.
            nxt = await sm.put(put(b"k00", b"after-restart"))
            assert nxt.header.revision == head2 + 1

    run(body())


def test_stop_finishes_queued_writes_then_refuses_new_ones(tmp_path):
    async def body():
        async with engine(tmp_path) as (sm, store):
            futs = [spawn(sm.put(put(b"q%02d" % i, b"v"))) for i in range(20)]
            await asyncio.sleep(0)
            await sm.stop()
            assert sorted([(await f).header.revision for f in futs]) == list(range(2, 22))
            await araises_etcd(errors.STOPPED, sm.put(put(b"late", b"v")))
        async with engine(tmp_path) as (sm, store):
            assert sm.committed_rev == 21 and read_all(sm)[1] == 20

    run(body())


# ----------------------------------------------------------------------------------------- compaction


def test_compaction_is_ordered_with_writes(tmp_path):
    async def body():
        async with engine(tmp_path) as (sm, store):
            await sm.put(put(b"a", b"1"))  # 2
            await sm.put(put(b"b", b"1"))  # 3
            store.hold()
            blocker = spawn(sm.put(put(b"x", b"1")))  # 4, parks the writer
            await store.wait_held()
            # Queued before the write that creates revision 5: at its turn 5 is still in the future.
            early = spawn(sm.compact(5))
            p5 = spawn(sm.put(put(b"a", b"2")))
            p6 = spawn(sm.put(put(b"b", b"2")))
            # Queued after the writes that create 6: runs once they are durable.
            late = spawn(sm.compact(6))
            p7 = spawn(sm.put(put(b"a", b"3")))
            await asyncio.sleep(0.02)
            assert sm.compact_rev == -1
            store.unhold()

            assert (await blocker).header.revision == 4
            await araises_etcd(errors.FUTURE_REV, early)
            assert (await p5).header.revision == 5
            assert (await p6).header.revision == 6
            assert await late == 6  # header revision: the committed one when it ran
            assert (await p7).header.revision == 7
            assert sm.compact_rev == 6
            # The store learned of the compaction only after revision 6 was durable.
            i_compact = store.events.index(("compact", 6))
            i_append6 = next(i for i, e in enumerate(store.events) if e[0] == "append" and e[1] <= 6 <= e[2])
            assert i_append6 < i_compact and store.compacts == [6]

            raises_etcd(errors.COMPACTED, sm.range, pb.RangeRequest(key=b"a", revision=5))
            assert get(sm, b"a", 6) == (b"a", b"2", 2, 5, 2)
            assert get(sm, b"b", 6) == (b"b", b"2", 3, 6, 2)
            assert get(sm, b"x", 6) == (b"x", b"1", 4, 4, 1)
            assert get(sm, b"a") == (b"a", b"3", 2, 7, 3)

            await araises_etcd(errors.FUTURE_REV, sm.compact(8))
            await araises_etcd(errors.COMPACTED, sm.compact(6))
            await araises_etcd(errors.COMPACTED, sm.compact(3))
            assert sm.compact_rev == 6 and store.compacts == [6]
            assert await sm.compact(7) == 7  # the head itself may be compacted
            assert get(sm, b"a", 7) == (b"a", b"3", 2, 7, 3)
            raises_etcd(errors.COMPACTED, sm.range, pb.RangeRequest(key=b"a", revision=6))
            assert (await sm.put(put(b"c", b"1"))).header.revision == 8

        async with engine(tmp_path) as (sm, store):
            assert sm.compact_rev == 7 and sm.committed_rev == 8
            raises_etcd(errors.COMPACTED, sm.range, pb.RangeRequest(key=b"a", revision=6))
            assert [k[:2] for k in read_all(sm, 7)[0]] == [(b"a", b"3"), (b"b", b"2"), (b"x", b"1")]

    run(body())


# ----------------------------------------------------------------------------------------- error objects


def _tb_depth(e: BaseException) -> int:
    n, tb = 0, e.__traceback__
    while tb is not None:
        n, tb = n + 1, tb.tb_next
    return n


def test_repeated_errors_do_not_accumulate_tracebacks(tmp_path):
    # Raising one exception instance again prepends each raise's frames to the same __traceback__, so a
    # module-level error object answered all day (COMPACTED to every stale reader) would keep every frame,
    # and every request those frames reference, alive for the life of the process.
    async def body(sm: StateMachine, store: FaultyStore) -> Any:
        for i in range(3):
            await sm.put(put(b"k", b"%d" % i))
        await sm.compact(3)
        depths = []
        for _ in range(200):
            try:
                sm.range(pb.RangeRequest(key=b"k", revision=2))
            except errors.EtcdError as e:
                depths.append(_tb_depth(e))
        for _ in range(50):
            try:
                await sm.compact(99)
            except errors.EtcdError as e:
                depths.append(_tb_depth(e))
        assert len(depths) == 250
        assert max(depths) < 20, f"traceback depth grows with every raise: {depths[:3]} ... {depths[-3:]}"

    run_engine(tmp_path, body)


def test_a_lease_expiry_whose_append_failed_is_retried(tmp_path):
    async def body(sm: StateMachine, store: FaultyStore) -> None:
        lease = await sm.lease_grant(pb.LeaseGrantRequest(TTL=2))
        await sm.put(put(b"leased", b"v", lease=lease.ID))
        store.fail_appends = {store.append_count + 1}  # the expiry's revoke: it fails once
        deadline = asyncio.get_running_loop().time() + 8
        def gone() -> bool:  # the revoke applied and durable: the key is gone at committed_rev too
            return sm.lease_status(lease.ID) is None and not sm.range(pb.RangeRequest(key=b"leased")).count

        while not gone() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)
        assert sm.lease_status(lease.ID) is None, "the lease outlived a failed expiry"
        assert store.append_count >= 4  # grant, put, the failed revoke, the revoke that took
        assert sm.range(pb.RangeRequest(key=b"leased")).count == 0

    run_engine(tmp_path, body)


# ----------------------------------------------------------------------------------------- roles (HA)


@asynccontextmanager
async def follower(path: Path) -> AsyncIterator[StateMachine]:
    """A second state machine on ``path``'s store, opened as a follower (the engine() there writes)."""
    sm = StateMachine(EmbeddedStore(str(path)))
    try:
        await sm.start(writer=False)
        yield sm
    finally:
        await sm.stop()
        await sm.store.close()


async def catch_up(sm: StateMachine) -> None:
    while entries := await sm.store.tail(sm.applied_index):
        sm.apply_committed(entries)


def same_state(a: StateMachine, b: StateMachine) -> None:
    assert (b.committed_rev, b.applied_index) == (a.committed_rev, a.applied_index)
    assert read_all(b) == read_all(a)
    assert b.hash_all() == a.hash_all()
    def leases(sm: StateMachine) -> dict[int, list[bytes]]:
        return {i: sm.lease_status(i).keys for i in sm.lease_ids()}

    assert leases(b) == leases(a)


def test_a_follower_applies_committed_entries_and_publishes_each_revision_once(tmp_path):
    async def main() -> None:
        async with engine(tmp_path, shared=True) as (leader, _), follower(tmp_path) as sm:
            published: list[int] = []
            sm.listeners.append(lambda revs: published.extend(r for r, _ in revs))
            with pytest.raises(errors.NOT_LEADER):
                sm.put_nowait(put(b"x", b"1"))  # a follower refuses writes; the server forwards them
            lease = await leader.lease_grant(pb.LeaseGrantRequest(TTL=100))
            other = await leader.lease_grant(pb.LeaseGrantRequest(TTL=100))
            await leader.put(put(b"a", b"1", lease=lease.ID))
            await leader.put(put(b"b", b"1", lease=lease.ID))
            await catch_up(sm)
            same_state(leader, sm)
            assert sm.lease_status(lease.ID).keys == [b"a", b"b"]
            # Keys move between leases, get deleted, and a revoke deletes what is left on its lease.
            await leader.put(put(b"a", b"2", lease=other.ID))
            await leader.delete_range(delete(b"b"))
            await leader.put(put(b"c", b"1", lease=lease.ID))
            await leader.txn(pb.TxnRequest(success=[op_put(b"d", b"1"), op_del(b"c")]))
            await leader.put(put(b"e", b"1", lease=lease.ID))
            await leader.lease_revoke(pb.LeaseRevokeRequest(ID=lease.ID))
            entries = await sm.store.tail(sm.applied_index)
            half = len(entries) // 2
            sm.apply_committed(entries[:half])
            sm.apply_committed(entries)  # overlapping: what was applied is skipped, not applied twice
            same_state(leader, sm)
            assert sm.lease_status(other.ID).keys == [b"a"] and sm.lease_status(lease.ID) is None
            assert published == list(range(2, leader.committed_rev + 1))
            assert sm.watch_hub.committed_rev == sm.committed_rev
            await leader.put(put(b"f", b"1"))
            await leader.put(put(b"g", b"1"))
            with pytest.raises(RuntimeError, match="does not follow"):
                sm.apply_committed((await sm.store.tail(sm.applied_index))[1:])
            with pytest.raises(RuntimeError, match="writer applies its own"):
                leader.apply_committed([])

    run(main())


def test_promote_takes_over_with_leases_renewed_and_demote_hands_back(tmp_path):
    async def main() -> None:
        async with engine(tmp_path, shared=True) as (old, _), follower(tmp_path) as new:
            lease = await old.lease_grant(pb.LeaseGrantRequest(TTL=2))
            await old.put(put(b"leased", b"v", lease=lease.ID))
            await catch_up(new)
            await old.put(put(b"late", b"1"))  # committed after the follower's last tail: the claim has it
            await old.demote()
            assert not old.leading
            with pytest.raises(errors.NOT_LEADER):
                old.put_nowait(put(b"x", b"1"))
            await asyncio.sleep(2.6)
            # Past the TTL, yet nobody revoked it: only a leader's timers expire leases.
            assert new.lease_status(lease.ID) is not None and old.lease_status(lease.ID) is not None
            await new.promote(extend=0.5)
            assert new.leading and new.committed_rev == old.committed_rev
            assert new.lease_status(lease.ID).remaining == 2  # full TTL + 0.5 s, truncated as etcd does
            r = await new.put(put(b"next", b"1"))
            assert r.header.revision == old.committed_rev + 1
            # The new leader's expiry timer runs: the lease goes within its TTL + extend.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5
            # The lease is gone once its revoke is applied; its key once that revoke is durable.
            while (new.lease_status(lease.ID) is not None or get(new, b"leased") is not None) and (
                loop.time() < deadline
            ):
                await asyncio.sleep(0.1)
            assert new.lease_status(lease.ID) is None and get(new, b"leased") is None
            await catch_up(old)  # the old leader follows the new one
            same_state(new, old)
            assert get(old, b"leased") is None

    run(main())


def test_demote_fails_queued_writes_with_not_leader_after_the_batch_in_flight(tmp_path):
    async def body(sm: StateMachine, store: FaultyStore) -> None:
        store.hold()
        first = spawn(sm.put(put(b"first", b"1")))
        await store.wait_held()
        queued = [spawn(sm.put(put(b"q%d" % i, b"x"))) for i in range(5)]
        await asyncio.sleep(0)
        demoting = spawn(sm.demote())
        await asyncio.sleep(0.05)
        assert not demoting.done()  # it waits for the append in flight
        store.unhold()
        await demoting
        assert (await first).header.revision == 2  # in flight: its real outcome
        for f in queued:
            await araises_etcd(errors.NOT_LEADER(), f)
        assert sm.committed_rev == 2 and sm.core.rev == 2 and get(sm, b"q0") is None
        assert store.appends == [[2]]
        # The store lock is free: another node can take over the writing.
        other = EmbeddedStore(str(tmp_path))
        await other.open(writer=False)
        try:
            assert len(await other.claim(0)) == 1
        finally:
            await other.close()

    run_engine(tmp_path, body, shared=True)


def test_may_write_false_fails_the_batch_with_not_leader_and_keeps_memory_at_committed(tmp_path):
    async def body(sm: StateMachine, store: FaultyStore) -> None:
        await sm.put(put(b"a", b"1"))
        sm.may_write = lambda: False
        batch = [spawn(sm.put(put(b"k%d" % i, b"x"))) for i in range(3)]
        for f in batch:
            await araises_etcd(errors.NOT_LEADER(), f)
        assert store.appends == [[2]]  # nothing reached the store
        assert sm.committed_rev == 2 and sm.core.rev == 2 and read_all(sm)[1] == 1
        assert sm.halted is not None and sm.halt.is_set()
        await araises_etcd(errors.NOT_LEADER(), sm.compact(1))  # refused as the node halted
        await sm.demote()
        assert sm.halted is None and not sm.halt.is_set() and not sm.leading

    run_engine(tmp_path, body)
