"""engine/lessor.py in process: grants, renewals and expiry order under an injected clock, checkpoints,
rollback and re-attachment of keys, snapshot dump/load and log replay."""

from __future__ import annotations

import pytest

from fastetcd import errors
from fastetcd.engine import log_entry
from fastetcd.engine.lessor import MAX_TTL, MIN_TTL, Lessor
from fastetcd.engine.log_entry import LEASE_CHECKPOINT, LEASE_GRANT, LEASE_REVOKE


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def lessor(clock: Clock) -> Lessor:
    return Lessor(clock)


def committed(lessor: Lessor, *grants: tuple[int, int]) -> Lessor:
    """Grant (id, ttl) pairs as one durable batch."""
    for lease_id, ttl in grants:
        lessor.grant(lease_id, ttl)
    lessor.take_ops()
    lessor.commit()
    return lessor


def state(lessor: Lessor) -> dict[int, tuple[int, float, int, set[bytes]]]:
    """id -> (ttl, expiry, checkpoint, keys): everything a lease carries."""
    return {le.id: (le.ttl, le.expiry, le.checkpoint, set(le.keys)) for le in lessor.leases.values()}


# -------------------------------------------------------------------------------------- grant and limits


def test_grant_records_its_op_and_raises_short_ttls_to_the_minimum(lessor: Lessor, clock: Clock) -> None:
    short = lessor.grant(1, 1)
    long = lessor.grant(2, 60)
    assert (short.ttl, short.expiry) == (MIN_TTL, clock.now + MIN_TTL)
    assert (long.ttl, long.expiry) == (60, clock.now + 60)
    # The op carries the TTL actually granted, so a replay grants the same lease.
    assert lessor.take_ops() == [(LEASE_GRANT, 1, MIN_TTL), (LEASE_GRANT, 2, 60)]
    assert lessor.take_ops() == []


def test_grant_refuses_a_taken_id_and_a_too_large_ttl(lessor: Lessor) -> None:
    committed(lessor, (7, 10))
    with pytest.raises(errors.LEASE_EXIST):
        lessor.grant(7, 20)
    with pytest.raises(errors.LEASE_TTL_TOO_LARGE):
        lessor.grant(8, MAX_TTL + 1)
    assert lessor.grant(9, MAX_TTL).ttl == MAX_TTL
    assert lessor.get(7).ttl == 10 and not lessor.exists(8)
    assert lessor.take_ops() == [(LEASE_GRANT, 9, MAX_TTL)]


def test_keys_follow_attach_and_detach(lessor: Lessor) -> None:
    committed(lessor, (1, 10))
    for key in (b"b", b"a", b"c"):
        lessor.attach(1, key)
    lessor.detach(1, b"c")
    lessor.detach(1, b"never attached")
    lessor.attach(99, b"orphan")  # no such lease: ignored
    assert lessor.get(1).keys == {b"a", b"b"}
    assert lessor.get(99) is None


# -------------------------------------------------------------------------------------- expiry and renew


def test_expired_reports_leases_in_deadline_order(lessor: Lessor, clock: Clock) -> None:
    committed(lessor, (1, 10), (2, 5), (3, 7), (4, 30))
    start = clock.now
    clock.now = start + 4.99
    assert lessor.expired() == []
    clock.now = start + 7
    assert lessor.expired() == [2, 3]  # a deadline equal to now has passed
    for lease_id in (2, 3):
        lessor.revoke(lease_id)
    lessor.commit()
    clock.now = start + 100
    assert lessor.expired() == [1, 4]
    assert [le.id for le in lessor.by_expiry()] == [1, 4]


def test_expired_honours_its_limit(lessor: Lessor, clock: Clock) -> None:
    committed(lessor, *((i, 2 + i) for i in range(1, 6)))
    clock.now += 60
    assert lessor.expired(limit=2) == [1, 2]
    assert lessor.expired(limit=2) == [3, 4]
    assert lessor.expired() == [5]


def test_renew_moves_the_deadline_and_the_old_one_no_longer_expires_it(lessor: Lessor, clock: Clock) -> None:
    committed(lessor, (1, 5), (2, 7))
    start = clock.now
    clock.now = start + 3
    renewed = lessor.renew(1)
    assert renewed.expiry == start + 8
    assert lessor.take_ops() == []  # keep-alives are in memory only, never logged
    clock.now = start + 7
    assert lessor.expired() == [2]  # 1's original deadline (start + 5) passed, but it was renewed
    clock.now = start + 8
    assert lessor.expired() == [1]


def test_renew_refuses_unknown_and_already_expired_leases(lessor: Lessor, clock: Clock) -> None:
    committed(lessor, (1, 5))
    with pytest.raises(errors.LEASE_NOT_FOUND):
        lessor.renew(2)
    clock.now += 5  # at the deadline: its revoke is under way, etcd does not resurrect it
    with pytest.raises(errors.LEASE_NOT_FOUND):
        lessor.renew(1)
    assert lessor.get(1).expiry == clock.now


# -------------------------------------------------------------------------------------- checkpoints


def test_checkpoint_is_logged_and_ignored_for_unknown_leases(lessor: Lessor) -> None:
    committed(lessor, (1, 60))
    lessor.set_checkpoint(1, 42)
    lessor.set_checkpoint(2, 5)
    assert lessor.get(1).checkpoint == 42
    assert lessor.take_ops() == [(LEASE_CHECKPOINT, 1, 42)]


# -------------------------------------------------------------------------------------- rollback and attach


def test_rollback_undoes_the_batch_and_rebuilds_attachments(lessor: Lessor, clock: Clock) -> None:
    committed(lessor, (1, 60), (2, 60))
    lessor.set_checkpoint(2, 30)
    lessor.take_ops()
    lessor.commit()
    lessor.attach(1, b"k1")
    lessor.attach(2, b"k2")
    before = state(lessor)

    # A batch: grant 3, revoke 1, checkpoint 2 again, keys moved around; then its append fails.
    lessor.grant(3, 10)
    lessor.attach(3, b"k3")
    lessor.revoke(1)
    lessor.set_checkpoint(2, 20)
    lessor.detach(2, b"k2")
    lessor.rollback([(b"k1", 1), (b"k2", 2)])  # the key space after the core truncated the batch

    assert state(lessor) == before
    assert lessor.take_ops() == []  # nothing of the failed batch may reach the next entry
    # Rolled-back undo steps are gone: a later rollback does not replay them.
    lessor.grant(4, 10)
    lessor.rollback([])
    assert sorted(lessor.leases) == [1, 2]
    assert lessor.get(1).keys == set()


def test_commit_keeps_the_batch_through_a_later_rollback(lessor: Lessor) -> None:
    committed(lessor, (1, 60))
    lessor.revoke(1)
    lessor.grant(2, 60)
    lessor.take_ops()
    lessor.commit()
    lessor.grant(3, 60)
    lessor.rollback([])
    assert sorted(lessor.leases) == [2]


def test_reattach_replaces_every_attachment(lessor: Lessor) -> None:
    committed(lessor, (1, 60), (2, 60))
    lessor.attach(1, b"stale")
    lessor.reattach([(b"a", 1), (b"b", 2), (b"c", 2), (b"x", 77)])
    assert lessor.get(1).keys == {b"a"}
    assert lessor.get(2).keys == {b"b", b"c"}


# -------------------------------------------------------------------------------------- restart


def test_dump_load_round_trip_restarts_deadlines_from_now(lessor: Lessor, clock: Clock) -> None:
    committed(lessor, (1, 60), (2, 10), (-5, MAX_TTL))
    lessor.set_checkpoint(1, 25)
    lessor.take_ops()
    lessor.commit()
    lessor.attach(1, b"k")
    data = lessor.dump()

    later = Clock(clock.now + 500)  # a restart: the monotonic clock of another process
    restored = Lessor(later)
    restored.load(data)
    assert state(restored) == {
        1: (60, later.now + 25, 25, set()),  # the checkpointed remainder, not the full TTL
        2: (10, later.now + 10, 0, set()),
        -5: (MAX_TTL, later.now + MAX_TTL, 0, set()),
    }
    later.now += 10
    assert restored.expired() == [2]
    later.now += 15
    assert restored.expired() == [1]
    assert restored.dump() == lessor.dump()


def test_replay_of_logged_ops_rebuilds_the_leases(lessor: Lessor, clock: Clock) -> None:
    lessor.grant(1, 60)
    lessor.grant(2, 30)
    lessor.grant(3, 9)
    first = log_entry.Entry(0, b"", lessor.take_ops())
    lessor.set_checkpoint(1, 12)
    lessor.set_checkpoint(3, 0)  # back to the full TTL
    lessor.revoke(2)
    second = log_entry.Entry(0, b"", lessor.take_ops())
    lessor.commit()

    later = Clock(clock.now + 1000)
    replayed = Lessor(later)
    for entry in (first, second):  # through the log encoding, as a restart reads them
        replayed.replay(log_entry.decode(log_entry.encode(entry)).ops)
    assert state(replayed) == {1: (60, later.now + 12, 12, set()), 3: (9, later.now + 9, 0, set())}
    # (A checkpoint that keeps the deadline adds a second, equal heap entry, so 3 may be reported twice:
    # harmless, the state machine skips revoking a lease that is already gone.)
    later.now += 9
    assert set(replayed.expired()) == {3}
    later.now += 3
    assert replayed.expired() == [1]


def test_replay_ignores_ops_on_unknown_leases(clock: Clock) -> None:
    replayed = Lessor(clock)
    replayed.replay([(LEASE_REVOKE, 5, 0), (LEASE_CHECKPOINT, 6, 3), (LEASE_GRANT, 7, 4)])
    assert state(replayed) == {7: (4, clock.now + 4, 0, set())}


def test_a_lease_whose_expiry_failed_is_offered_again_once_rearmed(lessor: Lessor, clock: Clock) -> None:
    committed(lessor, (7, 10))
    clock.now += 11
    assert lessor.expired() == [7]
    assert lessor.expired() == []  # its deadline was taken off the heap for the revoke under way
    lessor.rearm(7)  # that revoke failed: the lease is still there and must expire later
    assert lessor.expired() == [7]
    lessor.rearm(8)  # unknown: nothing to put back
    assert lessor.expired() == []
