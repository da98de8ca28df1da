"""engine/alarms.py in process: alarms survive the log and snapshots, whatever the member id."""

from __future__ import annotations

from fastetcd.engine import log_entry
from fastetcd.engine.alarms import CORRUPT, NOSPACE, Alarms

BIG_MEMBER = 0xF123_4567_89AB_CDEF  # >= 2**63: a uint64 that an int64 reading would turn negative


def test_ops_replayed_from_the_log_give_the_same_alarms_for_any_member_id() -> None:
    a = Alarms()
    assert a.activate(BIG_MEMBER, NOSPACE) and a.activate(7, CORRUPT)
    assert not a.activate(7, CORRUPT)  # already raised: nothing to log
    assert a.deactivate(7, CORRUPT) and not a.deactivate(7, CORRUPT)
    entry = log_entry.decode(log_entry.encode(log_entry.Entry(0, b"", a.take_ops())))
    b = Alarms()
    b.replay(entry.ops)
    assert b.get() == a.get() == [(BIG_MEMBER, NOSPACE)]
    c = Alarms()
    c.load(b.dump())
    assert c.get() == [(BIG_MEMBER, NOSPACE)] and c.has(NOSPACE) and not c.has(CORRUPT)


def test_rollback_undoes_the_batch_only() -> None:
    a = Alarms()
    a.activate(1, NOSPACE)
    a.commit()
    a.deactivate(1, NOSPACE)
    a.activate(2, CORRUPT)
    a.rollback()
    assert a.get() == [(1, NOSPACE)] and a.take_ops() == []
