"""CosmosLeadership against the Cosmos-compatible test server: one leader at a time, terms counting changes,
store.leadership's timing rule on a leader cut off from Cosmos, resign and transfer without waiting out the
lease, and membership by heartbeat. Short timings keep it quick; one server per module, one container per
test.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Coroutine
from typing import Any

import pytest
from cosmos_fixture import CosmosServer, cosmos_fixture, module_cosmos_server  # noqa: F401  (fixtures)

from fastetcd.store.cosmos import CosmosStore
from fastetcd.store.cosmos_leadership import CosmosLeadership
from fastetcd.store.leadership import Member, TimingRule

DB = "fastetcd"
TIMING = TimingRule(lease=1.0, renew=0.2, poll=0.1, drift_margin=0.2)


def run(coro: Coroutine[Any, Any, Any], timeout: float = 60.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture
def container() -> str:
    return f"l-{uuid.uuid4().hex[:10]}"


class Node:
    """A store opened as follower plus its leadership, as one fastetcd node holds them."""

    def __init__(self, cosmos: CosmosServer, container: str, n: int) -> None:
        self.member = Member(id=0x8E9E05C52164694D + n, name=f"node-{n}", client_urls=(f"http://n{n}:2379",))
        self.store = CosmosStore(
            cosmos.endpoint, cosmos.key, DB, container, client_kwargs={"retry_backoff_factor": 0.01}
        )
        self.leadership = CosmosLeadership(self.store, self.member, TIMING)

    async def start(self) -> None:
        await self.store.open(writer=False)
        await self.leadership.start()

    async def close(self) -> None:
        await self.leadership.close()
        await self.store.close()


async def nodes(cosmos: CosmosServer, container: str, count: int) -> list[Node]:
    out = [Node(cosmos, container, n) for n in range(count)]
    for node in out:
        await node.start()
    return out


async def close_all(group: list[Node]) -> None:
    for node in group:
        await node.close()


async def first_done(tasks: dict[asyncio.Task[int], Node]) -> tuple[Node, int]:
    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    assert len(done) == 1, "two contenders won at once"
    task = done.pop()
    return tasks.pop(task), task.result()


def test_one_leader_at_a_time_and_terms_count_changes(cosmos: CosmosServer, container: str) -> None:
    async def body() -> None:
        group = await nodes(cosmos, container, 3)
        tasks = {asyncio.create_task(n.leadership.campaign()): n for n in group}
        terms = []
        leaders = []
        for _ in range(3):
            leader, term = await first_done(tasks)
            terms.append(term)
            leaders.append(leader)
            now = time.monotonic()
            assert leader.leadership.valid_until() > now
            # Nobody else believes it leads, and everyone sees this leader within a poll or two.
            assert [n for n in group if n.leadership.valid_until() > now] == [leader]
            await asyncio.sleep(3 * TIMING.poll)
            assert {n.leadership.leader().member for n in group} == {leader.member}
            # The others keep waiting while the leader renews: well past a lease, still one leader.
            await asyncio.sleep(2 * TIMING.lease)
            assert not any(t.done() for t in tasks)
            assert [n for n in group if n.leadership.valid_until() > time.monotonic()] == [leader]
            await leader.leadership.resign()
        assert terms == [1, 2, 3]
        assert len({id(n) for n in leaders}) == 3
        await close_all(group)

    run(body())


def test_a_cut_off_leader_stops_before_its_successor_starts(cosmos: CosmosServer, container: str) -> None:
    async def body() -> None:
        old, new = await nodes(cosmos, container, 2)
        term = await old.leadership.campaign()
        candidate = asyncio.create_task(new.leadership.campaign())
        await asyncio.sleep(TIMING.lease + 0.5)  # renewals keep the candidate out
        assert not candidate.done() and old.leadership.valid_until() > time.monotonic()

        old.leadership.stop_renewing()
        lost_at = asyncio.create_task(wait_lost(old.leadership))
        new_term = await candidate
        took_at = time.monotonic()
        last_sent = old.leadership.last_renewal_sent
        assert new_term == term + 1
        # The successor wrote no earlier than a lease after the old leader's last renewal was sent ...
        assert took_at >= last_sent + TIMING.lease
        # ... and the old leader had stopped by then, by its own clock, a drift margin before that.
        assert lost_at.done()
        assert lost_at.result() <= took_at
        assert old.leadership.valid_until() == 0.0
        assert last_sent + TIMING.lease - TIMING.drift_margin <= lost_at.result() < took_at
        # Failover within the rule's bound (plus scheduling slack on a loaded machine).
        assert took_at - last_sent < TIMING.failover_bound + 0.5
        await asyncio.sleep(3 * TIMING.poll)  # the old leader, now a follower, polls the record
        assert old.leadership.leader().member == new.member
        await close_all([old, new])

    async def wait_lost(leadership: CosmosLeadership) -> float:
        await leadership.lost.wait()
        return time.monotonic()

    run(body())


def test_a_renewal_that_finds_the_record_taken_loses_at_once(cosmos: CosmosServer, container: str) -> None:
    async def body() -> None:
        (a,) = await nodes(cosmos, container, 1)
        await a.leadership.campaign()
        # Someone overwrites the record (e.g. an operator, or a node with a faster clock than allowed).
        c = a.store.container
        doc = await c.read_item("leader", partition_key="meta")
        await c.replace_item("leader", {**doc, "member": None, "next": None, "nonce": "other"})
        t0 = time.monotonic()
        await asyncio.wait_for(a.leadership.lost.wait(), 2 * TIMING.renew + 0.5)
        assert (
            time.monotonic() - t0 < TIMING.lease - TIMING.drift_margin
        )  # at the next renewal, not at expiry
        assert a.leadership.valid_until() == 0.0
        # campaign() clears `lost` and takes the vacant record at once.
        assert await asyncio.wait_for(a.leadership.campaign(), 1.0) == 2
        assert not a.leadership.lost.is_set()
        await a.close()

    run(body())


def test_resign_and_transfer_hand_over_in_well_under_a_lease(cosmos: CosmosServer, container: str) -> None:
    async def body() -> None:
        group = await nodes(cosmos, container, 3)
        a, b, c = group
        assert await a.leadership.campaign() == 1
        tasks = {asyncio.create_task(n.leadership.campaign()): n for n in (b, c)}
        await asyncio.sleep(TIMING.lease + 0.3)  # both candidates have seen a's record for a lease

        # Transfer to c: only c may take it at once (b would have to wait out a lease on that version).
        t0 = time.monotonic()
        await a.leadership.transfer(c.member.id)
        assert a.leadership.valid_until() == 0.0  # a stopped before handing over
        leader, term = await first_done(tasks)
        assert leader is c and term == 2
        assert time.monotonic() - t0 < TIMING.lease / 2

        # Resign: whoever polls first takes it.
        a_task = asyncio.create_task(a.leadership.campaign())
        tasks[a_task] = a
        await asyncio.sleep(0.3)
        t0 = time.monotonic()
        await c.leadership.resign()
        assert c.leadership.valid_until() == 0.0
        leader, term = await first_done(tasks)
        assert leader in (a, b) and term == 3
        assert time.monotonic() - t0 < TIMING.lease / 2
        for t in tasks:
            t.cancel()
        with pytest.raises(ValueError, match="not alive"):
            await leader.leadership.transfer(0x1234)
        await close_all(group)

    run(body())


def test_members_are_the_nodes_with_a_recent_heartbeat(cosmos: CosmosServer, container: str) -> None:
    async def body() -> None:
        group = await nodes(cosmos, container, 3)
        await asyncio.sleep(2 * TIMING.renew)
        everyone = sorted((n.member for n in group), key=lambda m: m.id)
        for n in group:
            assert n.leadership.members() == everyone
        gone = group.pop(1)
        await gone.close()
        closed_at = time.time()
        await asyncio.sleep(TIMING.lease)
        assert gone.member in group[0].leadership.members()  # not yet: 3 leases without a heartbeat
        while time.time() < closed_at + 3 * TIMING.lease + 2 * TIMING.renew:
            await asyncio.sleep(TIMING.renew)
        for n in group:
            assert n.leadership.members() == [m for m in everyone if m != gone.member]
        # A node lists itself even before it has published anything.
        fresh = Node(cosmos, container, 7)
        assert fresh.leadership.members() == [fresh.member]
        await close_all(group)

    run(body())
