"""High availability over one embedded data dir: several replicas (each its own StateMachine, EmbeddedStore
and EmbeddedLeadership on one shared tmp dir) in one event loop. Everything is real: the flocks, SQLite
in WAL mode, the log a follower tails."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from faulty_store import FaultyStore
from test_state_machine import araises_etcd, delete, get, put, read_all, run, spawn

from fastetcd import errors
from fastetcd.engine.replica import Replica
from fastetcd.engine.state_machine import StateMachine
from fastetcd.engine.watch_hub import Watcher
from fastetcd.proto import kv_pb2
from fastetcd.proto import rpc_pb2 as pb
from fastetcd.store.embedded import EmbeddedStore
from fastetcd.store.embedded_leadership import EmbeddedLeadership
from fastetcd.store.leadership import Member, TimingRule

TIMING = TimingRule(lease=1.0, renew=0.2, poll=0.05, drift_margin=0.1)


def make(path: Path, member_id: int, *, poll: float | None = None) -> Replica:
    member = Member(member_id, f"node{member_id}", (f"http://127.0.0.1:{23790 + member_id}",))
    leadership = EmbeddedLeadership(str(path), member, TIMING)
    return Replica(StateMachine(EmbeddedStore(str(path))), leadership, poll=poll)


async def stop(r: Replica) -> None:
    await r.stop()
    await r.sm.store.close()


@asynccontextmanager
async def cluster(path: Path, n: int, **kw: Any) -> AsyncIterator[list[Replica]]:
    nodes = [make(path, i + 1, **kw) for i in range(n)]
    try:
        for r in nodes:
            await r.start()
        yield nodes
    finally:
        for r in nodes:
            if r.sm.store._thread is not None:  # not stopped by the test itself
                await stop(r)


async def until(pred: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def elected(nodes: list[Replica]) -> Replica:
    await until(lambda: sum(r.is_leader for r in nodes) == 1)
    return next(r for r in nodes if r.is_leader)


class WatchAll:
    """A watch on every key through a node's watch hub, recording each event's revision as delivered."""

    def __init__(self, sm: StateMachine) -> None:
        self.hub = sm.watch_hub
        self.w = Watcher(1, b"\0", b"\0", sm.committed_rev + 1)
        self.revs: list[int] = []
        self.hub.watch(self.hub.register(self), self.w)

    def wake(self) -> None:
        got = self.hub.collect(self.w, self.hub.committed_rev, 1 << 30)
        assert got is not None
        events, last = got
        self.revs += [kv_pb2.Event.FromString(e).kv.mod_revision for e in events]
        self.w.next_rev = last + 1


def test_followers_apply_the_leaders_writes_and_watchers_see_each_revision_once_in_order(tmp_path):
    async def main() -> None:
        async with cluster(tmp_path, 3) as nodes:
            leader = await elected(nodes)
            followers = [r for r in nodes if r is not leader]
            watches = [WatchAll(r.sm) for r in followers]
            for r in followers:
                with pytest.raises(errors.NOT_LEADER):
                    r.sm.put_nowait(put(b"x", b"1"))
                await araises_etcd(errors.NOT_LEADER(), r.read_index())
            await asyncio.gather(*(leader.sm.put(put(b"k%03d" % i, b"v")) for i in range(100)))
            await leader.sm.delete_range(delete(b"k050"))
            last = leader.sm.committed_rev
            assert await leader.read_index() == last == 102
            for r, w in zip(followers, watches, strict=True):
                await until(lambda r=r: r.sm.committed_rev == last)
                assert read_all(r.sm) == read_all(leader.sm)
                assert r.sm.hash_all() == leader.sm.hash_all()
                assert w.revs == list(range(2, last + 1))
                assert r.leader() is not None and r.leader().member == leader.leadership.member
                assert r.term == leader.term == 1
            assert [m.id for m in leader.leadership.members()] == [1, 2, 3]

    run(main(), timeout=40)


def test_when_the_leader_stops_a_follower_takes_over_without_a_gap_and_leases_live_on(tmp_path):
    async def main() -> None:
        async with cluster(tmp_path, 3) as nodes:
            old = await elected(nodes)
            survivors = [r for r in nodes if r is not old]
            watches = [WatchAll(r.sm) for r in survivors]
            terms: dict[int, list[int]] = {id(r): [] for r in survivors}
            for r in survivors:
                r.on_term.append(terms[id(r)].append)
            lease = await old.sm.lease_grant(pb.LeaseGrantRequest(TTL=2))
            await old.sm.put(put(b"leased", b"v", lease=lease.ID))
            for i in range(20):
                await old.sm.put(put(b"k%d" % i, b"v"))
            last = old.sm.committed_rev
            term = old.term
            await stop(old)  # graceful: finishes, gives the store back, resigns
            new = await elected(survivors)
            assert new.term == term + 1
            # The claim brought everything the old leader committed, whatever the last tail had.
            assert new.sm.committed_rev == last
            assert (await new.sm.put(put(b"after", b"1"))).header.revision == last + 1
            # TTL 2 s, granted before the change: renewed for its TTL plus one leadership lease (1 s).
            assert new.sm.lease_status(lease.ID).remaining >= 2
            await asyncio.sleep(1.5)
            assert new.sm.lease_status(lease.ID) is not None and get(new.sm, b"leased") is not None
            other = next(r for r in survivors if r is not new)
            await until(lambda: other.sm.committed_rev == last + 1)
            for w in watches:
                assert w.revs == list(range(2, last + 2))
            # Both learn the new term (response headers carry it): the leader at once, the other by observing.
            await until(lambda: all(t[-1:] == [term + 1] for t in terms.values()))
            # Nobody renews it: the new leader expires it and the follower sees the key go.
            await until(lambda: other.sm.lease_status(lease.ID) is None, timeout=5)
            assert get(other.sm, b"leased") is None and get(new.sm, b"leased") is None

    run(main(), timeout=40)


def test_a_transfer_mid_load_loses_no_acknowledged_write_and_fails_the_rest_with_not_leader(tmp_path):
    async def main() -> None:
        async with cluster(tmp_path, 2) as nodes:
            old = await elected(nodes)
            target = next(r for r in nodes if r is not old)
            watch = WatchAll(target.sm)
            await until(lambda: len(old.leadership.members()) == 2)
            writes = [spawn(old.sm.put(put(b"k%03d" % i, b"v%d" % i))) for i in range(300)]
            await asyncio.sleep(0)
            await old.leadership.transfer(target.leadership.member.id)
            results = await asyncio.gather(*writes, return_exceptions=True)
            new = await elected(nodes)
            assert new is target
            acked = {}
            for i, res in enumerate(results):
                if isinstance(res, BaseException):
                    assert isinstance(res, errors.NOT_LEADER), res
                else:
                    acked[b"k%03d" % i] = res.header.revision
            assert acked, "some writes should have committed before the transfer"
            rev = new.sm.committed_rev
            for i in range(300):
                key = b"k%03d" % i
                kv = get(new.sm, key)
                assert (kv[3] if kv else None) == acked.get(key)  # acknowledged ⇔ there
            assert (await new.sm.put(put(b"next", b"1"))).header.revision == rev + 1
            await until(lambda: old.sm.committed_rev == rev + 1)  # the old leader follows
            assert not old.is_leader and read_all(old.sm) == read_all(new.sm)
            assert watch.revs == list(range(2, rev + 2))

    run(main(), timeout=40)


def test_a_leader_that_may_not_write_fails_with_not_leader_and_steps_down(tmp_path):
    async def main() -> None:
        async with cluster(tmp_path, 2) as nodes:
            old = await elected(nodes)
            await old.sm.put(put(b"a", b"1"))
            committed = old.sm.committed_rev
            old.sm.may_write = lambda: False  # as if its leadership could no longer be proven
            failed = [spawn(old.sm.put(put(b"k%d" % i, b"x"))) for i in range(10)]
            for f in failed:
                await araises_etcd(errors.NOT_LEADER(), f)
            assert old.sm.core.rev == committed and read_all(old.sm)[1] == 1
            new = await elected(nodes)
            assert new is not old and not old.halted.is_set()
            assert (await new.sm.put(put(b"b", b"1"))).header.revision == committed + 1
            await until(lambda: old.sm.committed_rev == committed + 1)
            assert get(old.sm, b"k0") is None and get(new.sm, b"k0") is None
            assert old.sm.halted is None  # demoted and following, not dead

    run(main(), timeout=40)


def test_wait_applied_wakes_the_follower_and_times_out_as_documented(tmp_path):
    async def main() -> None:
        # A follower that would otherwise tail only every 30 s.
        async with cluster(tmp_path, 2, poll=30.0) as nodes:
            leader = await elected(nodes)
            fol = next(r for r in nodes if r is not leader)
            await leader.sm.put(put(b"a", b"1"))
            rev = await leader.read_index()
            assert fol.sm.committed_rev < rev
            t0 = time.monotonic()
            await fol.wait_applied(rev, timeout=5)
            assert time.monotonic() - t0 < 2 and fol.sm.committed_rev >= rev
            assert get(fol.sm, b"a") is not None
            await fol.wait_applied(1, timeout=0.01)  # already there: returns at once
            t0 = time.monotonic()
            await araises_etcd(errors.TIMEOUT(), fol.wait_applied(rev + 5, timeout=0.3))
            assert 0.25 < time.monotonic() - t0 < 2
            # A waiter for a revision not written yet returns once it is.
            waiting = spawn(fol.wait_applied(rev + 2, timeout=5))
            await leader.sm.put(put(b"b", b"1"))
            await asyncio.sleep(0.1)
            assert not waiting.done()
            await leader.sm.put(put(b"c", b"1"))
            await waiting
            assert get(fol.sm, b"c") is not None

    run(main(), timeout=40)


def test_a_follower_behind_a_snapshot_halts_for_a_restart(tmp_path):
    async def main() -> None:
        async with cluster(tmp_path, 1) as (leader,):
            await elected([leader])
            fol = make(tmp_path, 9, poll=30.0)
            await fol.start()
            try:
                await leader.sm.put(put(b"a", b"1"))
                await leader.sm.defragment()  # a snapshot at the newest index drops the log behind it
                fol.wake()
                await asyncio.wait_for(fol.halted.wait(), 5)
                assert "behind" in fol.failure and fol.sm.halted is not None
                with pytest.raises(errors.NOT_LEADER):
                    fol.sm.put_nowait(put(b"x", b"1"))
            finally:
                await stop(fol)
            # Restarted, it loads the snapshot and follows again.
            fol = make(tmp_path, 9)
            await fol.start()
            try:
                assert get(fol.sm, b"a") is not None and not fol.halted.is_set()
            finally:
                await stop(fol)

    run(main(), timeout=40)


def test_followers_compact_where_the_leader_compacts_and_a_new_leader_keeps_it(tmp_path):
    async def main() -> None:
        async with cluster(tmp_path, 2) as nodes:
            leader = await elected(nodes)
            follower = next(r for r in nodes if r is not leader)
            for i in range(10):
                await leader.sm.put(put(b"k", b"v%d" % i))  # revisions 2..11
            await leader.sm.compact(6)
            await until(lambda: follower.sm.compact_rev == 6)
            with pytest.raises(errors.COMPACTED):
                follower.sm.range(pb.RangeRequest(key=b"k", revision=5))
            assert get(follower.sm, b"k", 6) == get(leader.sm, b"k", 6)
            # The compaction is in the log: the node that leads next has it, and refuses to go back.
            await stop(leader)
            await until(lambda: follower.is_leader)
            assert follower.sm.compact_rev == 6
            await araises_etcd(errors.COMPACTED(), follower.sm.compact(5))

    run(main(), timeout=40)


def test_a_leader_read_waits_for_an_append_a_follower_may_already_serve(tmp_path):
    """Found by the HA acceptance test: an append lands (durable), a follower tails it and answers a read at
    the new revision, and the leader, whose append has not returned yet, answered the next read at the old
    one. The leader's read index now waits for the append under way."""

    async def main() -> None:
        member = Member(1, "node1", ("http://127.0.0.1:23791",))
        store = FaultyStore(EmbeddedStore(str(tmp_path)))
        first = Replica(StateMachine(store), EmbeddedLeadership(str(tmp_path), member, TIMING))
        await first.start()
        follower = make(tmp_path, 2)
        await follower.start()
        try:
            await until(lambda: first.is_leader)
            await first.sm.put(put(b"a", b"1"))
            store.hold(durable=True)
            pending = first.sm.put_nowait(put(b"a", b"2"))
            await store.wait_held()
            await until(lambda: follower.sm.committed_rev == 3)  # the follower serves revision 3 already
            index = asyncio.ensure_future(first.read_index())
            await asyncio.sleep(0.2)
            assert not index.done(), f"the leader answered read index {index.result()} mid-append"
            store.unhold()
            assert await index == 3
            await pending
        finally:
            store.unhold()
            await stop(follower)
            await stop(first)

    run(main(), timeout=40)
