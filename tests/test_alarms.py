"""engine/alarms.py in process: alarms survive the log and snapshots, whatever the member id."""

from __future__ import annotations

import asyncio

import pytest

from fastetcd import errors
from fastetcd.engine import log_entry
from fastetcd.engine.alarms import CORRUPT, NOSPACE, Alarms
from fastetcd.engine.state_machine import StateMachine
from fastetcd.proto import kv_pb2
from fastetcd.proto import rpc_pb2 as pb
from fastetcd.store.base import Corrupt
from fastetcd.store.embedded import EmbeddedStore

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


class _DamagedStore:
    """An embedded store whose appends start failing the way SQLite reports a damaged file."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.damaged = False

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def append_nowait(self, entries, on_durable) -> bool:
        return False  # through append(), which fails once damaged

    async def append(self, entries) -> None:
        if self.damaged:
            raise Corrupt("append: fastetcd.db is damaged: database disk image is malformed")
        await self.inner.append(entries)


def test_a_damaged_store_raises_corrupt_and_refuses_writes_but_not_reads(tmp_path) -> None:
    async def body() -> None:
        store = _DamagedStore(EmbeddedStore(str(tmp_path)))
        sm = StateMachine(store, member_id=BIG_MEMBER)  # type: ignore[arg-type]
        await sm.start()
        try:
            await sm.put(pb.PutRequest(key=b"a", value=b"1"))
            store.damaged = True
            with pytest.raises(errors.EtcdError) as first:
                await sm.put(pb.PutRequest(key=b"a", value=b"2"))
            assert (first.value.code, first.value.message) == ("DATA_LOSS", "etcdserver: corrupt cluster")
            assert sm.active_alarms() == [(BIG_MEMBER, CORRUPT)]
            for write in (sm.put(pb.PutRequest(key=b"b", value=b"1")),
                          sm.delete_range(pb.DeleteRangeRequest(key=b"a")),
                          sm.lease_grant(pb.LeaseGrantRequest(TTL=10)), sm.compact(1)):
                with pytest.raises(errors.CORRUPT):
                    await write
            # Reads go on, at the last durable revision: the failed put left nothing behind.
            kvs = sm.range(pb.RangeRequest(key=b"a")).kvs
            assert len(kvs) == 1 and kv_pb2.KeyValue.FromString(kvs[0]).value == b"1"
        finally:
            await sm.stop()
            await store.close()

    asyncio.run(body())
