"""Property tests: the Cython MVCC core against the pure-Python model in mvcc_model.py.

Random sequences of multi-write revisions, deletes, delete_ranges, compactions and truncations (the engine's
rollback of a failed durable append) are applied to both; every read at every readable revision must agree
field by field and byte for byte with protobuf's own encoding. Recovery paths (replaying the log records on a
fresh core, or loading a dump and replaying the records after it) must rebuild the same state.

FASTETCD_PROPERTY_EXAMPLES scales the number of examples (default keeps the file well under a minute).
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from mvcc_model import ModelMVCC, Version, in_range

from fastetcd import _core
from fastetcd.proto import kv_pb2, rpc_pb2
from fastetcd.server import _wire
from fastetcd.testing import prefix_end

MVCC = _core.MVCC

EXAMPLES = int(os.environ.get("FASTETCD_PROPERTY_EXAMPLES", "200"))

# Keys chosen so that ordering edge cases are dense: prefixes of each other, NUL and 0xff bytes, keys that
# differ only in length.
KEYS = [b"\x00", b"\x00\x00", b"a", b"a\x00", b"ab", b"abc", b"b", b"\xff", b"\xff\xff"]
# Range bounds: the keys, keys that are never written, and etcd's two special ends (b"" and b"\x00").
BOUNDS = [*KEYS, b"", b"aa", b"a\xff", b"c", b"\xfe", b"\x01"]
BIG = bytes(range(256)) * 400  # 100 KiB holding every byte value
VALUES = [b"", b"v", b"\x00", b"\xff\xfe", b"value-" * 30, BIG]
LEASES = [0, 1, 127, 128, 16384, 2**31, 2**63 - 1]


keys = st.sampled_from(KEYS)


def _value(i: int) -> bytes:
    return VALUES[i]


# Drawn by index so that Hypothesis never builds a repr of the 100 KiB value for every strategy it prints.
values = st.one_of(st.sampled_from(range(len(VALUES))).map(_value), st.binary(max_size=12))
leases = st.one_of(st.sampled_from(LEASES), st.integers(0, 2**63 - 1))


@st.composite
def ranges(draw: st.DrawFn) -> tuple[bytes, bytes]:
    start = draw(st.sampled_from(BOUNDS))
    specials = st.sampled_from([b"", b"\x00", prefix_end(start)])
    end = draw(st.one_of(specials, st.sampled_from(BOUNDS)))
    return start, end


put_ops = st.tuples(st.just("put"), keys, values, leases)
delete_ops = st.tuples(st.just("delete"), keys)
delete_range_ops = st.tuples(st.just("delete_range"), ranges())
# A request is one revision: 1..4 writes with increasing sub-revisions, like a Txn. Puts dominate so that
# generations grow long enough for deletes and compactions to have something to work on. A key may repeat
# within a request: etcd's API refuses that, but the core must still stay consistent with itself.
requests = st.lists(st.one_of(put_ops, put_ops, delete_ops, delete_range_ops), min_size=1, max_size=4)


def expected_kv(key: bytes, v: Version, keys_only: bool = False) -> bytes:
    assert v.value is not None
    return kv_pb2.KeyValue(
        key=key, create_revision=v.create, mod_revision=v.rev, version=v.version,
        value=b"" if keys_only else v.value, lease=v.lease,
    ).SerializeToString(deterministic=True)


def fields(encoded: bytes) -> tuple[bytes, int, int, int, bytes, int]:
    kv = kv_pb2.KeyValue.FromString(encoded)
    return kv.key, kv.create_revision, kv.mod_revision, kv.version, kv.value, kv.lease


def record_fields(kv: _core.KeyVersion) -> tuple[bytes, int, int, int, bytes, int]:
    """A ``KeyVersion``'s fields in the order of ``fields``, so that the two compare directly."""
    return kv.key, kv.create_revision, kv.mod_revision, kv.version, kv.value, kv.lease


def assert_kvs(got: list[bytes], want: list[tuple[bytes, Version]], keys_only: bool = False) -> None:
    # Decoded fields first, for a readable failure; then the bytes, which is what goes on the wire.
    want_bytes = [expected_kv(k, v, keys_only) for k, v in want]
    assert [fields(b) for b in got] == [fields(b) for b in want_bytes]
    assert got == want_bytes


def readable_revs(model: ModelMVCC) -> range:
    return range(max(model.compact_rev, 1), model.rev + 1)


def assert_range(core: MVCC, model: ModelMVCC, key: bytes, end: bytes, rev: int, limit: int) -> None:
    want, want_total = model.range(key, end, rev, limit)
    for keys_only in (False, True):
        got, total = core.range(key, end, rev, limit, keys_only)
        assert total == want_total, (key, end, rev, limit)
        assert_kvs(got, want, keys_only)
    items, total = core.range_items(key, end, rev, limit)
    assert total == want_total
    assert [record_fields(it) for it in items] == [fields(expected_kv(k, v)) for k, v in want]
    assert [it.kv for it in items] == [expected_kv(k, v) for k, v in want]
    assert core.count(key, end, rev) == want_total


def assert_same_state(core: MVCC, model: ModelMVCC) -> None:
    """All that ``core`` answers agrees with ``model``: head, compaction, every key at every revision."""
    assert core.rev == model.rev
    assert core.compact_rev == model.compact_rev
    assert len(core) == len(model)
    assert core.n_revs == model.n_versions()
    for rev in readable_revs(model):
        assert_range(core, model, b"\x00", b"\x00", rev, 0)
        for key in BOUNDS:  # the written keys and some never written (b"" among them)
            v = model.get(key, rev)
            got = core.get(key, rev)
            kv = core.get_kv(key, rev)
            if v is None:
                assert got is None and kv is None, (key, rev, got)
            else:
                assert record_fields(got) == fields(expected_kv(key, v)), (key, rev)
                assert got.kv == kv == expected_kv(key, v)


class CoreVsModel(RuleBasedStateMachine):
    """Random histories on the core and the model side by side, checked after every step."""

    snapshots = Bundle("snapshots")

    def __init__(self) -> None:
        super().__init__()
        self.core = MVCC()
        self.model = ModelMVCC()
        # (rev, record) of every revision still in the core, as the engine would have appended them.
        self.log: list[tuple[int, bytes]] = []

    @initialize()
    def empty_store_reads(self) -> None:
        assert self.core.rev == 1 and self.core.compact_rev == -1 and len(self.core) == 0
        assert self.core.range(b"\x00", b"\x00", 1, 0, False) == ([], 0)

    def _apply(self, ops: list[tuple], rev: int) -> int:
        """Apply one request to core and model at ``rev``; returns how many writes (sub-revisions) it made."""
        sub = 0
        for op in ops:
            if op[0] == "put":
                _, key, value, lease = op
                self.core.put(key, value, lease, rev, sub)
                self.model.put(key, value, lease, rev, sub)
                sub += 1
            elif op[0] == "delete":
                deleted = self.core.delete(op[1], rev, sub)
                assert deleted == self.model.delete(op[1], rev, sub)
                sub += deleted
            else:
                key, end = op[1]
                prev = self.core.delete_range(key, end, rev, sub)
                assert_kvs(prev, self.model.delete_range(key, end, rev, sub))
                sub += len(prev)
                event(f"delete_range deleted {min(len(prev), 2)}+ keys")
        return sub

    @rule(ops=requests)
    def write(self, ops: list[tuple]) -> None:
        rev = self.model.rev + 1
        writes = self._apply(ops, rev)
        record = self.core.take_record()
        if writes:
            self.log.append((rev, record))
            assert self.core.rev == rev
        else:  # only deletes of absent keys: no revision is taken and nothing is logged
            assert record == b""
            assert self.core.rev == rev - 1

    @rule(batch=st.lists(requests, min_size=2, max_size=6))
    def write_batch(self, batch: list[list[tuple]]) -> None:
        """Several revisions in a row, like one group commit; keeps histories long enough to compact."""
        for ops in batch:
            self.write(ops)

    @rule(ops=requests)
    def aborted_write(self, ops: list[tuple]) -> None:
        """A request that raises half-way: the engine truncates back to the revision before it."""
        before = self.core.rev
        state = self.core.dump(before)
        sub = 0
        for op in ops:
            if op[0] == "put":
                self.core.put(op[1], op[2], op[3], before + 1, sub)
                sub += 1
            elif op[0] == "delete":
                sub += self.core.delete(op[1], before + 1, sub)
            else:
                sub += len(self.core.delete_range(op[1][0], op[1][1], before + 1, sub))
        self.core.truncate(before)
        assert self.core.dump(before) == state

    @rule(data=st.data())
    def compact(self, data: st.DataObject) -> None:
        rev = data.draw(st.integers(max(self.model.compact_rev, 1), self.model.rev), label="compact at")
        keys, versions = len(self.model), self.model.n_versions()
        self.core.compact(rev)
        self.model.compact(rev)
        if len(self.model) < keys:
            event("compaction dropped a key")
        event("compaction dropped versions" if self.model.n_versions() < versions else "compaction: no-op")

    @precondition(lambda self: self.model.rev > max(self.model.compact_rev, 1))
    @rule(k=st.integers(0, 3))
    def truncate(self, k: int) -> None:
        """Roll back the last k revisions, as after a failed durable append (never below a compaction)."""
        head = self.model.rev
        rev = max(head - k, self.model.compact_rev, 1)
        state, keys = self.core.dump(rev), len(self.model)
        self.core.truncate(rev)
        self.model.truncate(rev)
        assert self.core.dump(rev) == state
        self.log = [(r, rec) for r, rec in self.log if r <= rev]
        event("truncate dropped a key" if len(self.model) < keys else "truncate dropped no key")

    @rule(target=snapshots)
    def snapshot(self) -> tuple[int, bytes, tuple[tuple[int, bytes], ...]]:
        # The log it covers goes along: a truncation below it followed by new writes makes it stale, which
        # the engine rules out by only snapshotting committed revisions.
        return self.core.rev, self.core.dump(self.core.rev), tuple(self.log)

    @rule(key_end=ranges(), limit=st.integers(0, 4))
    def check_range(self, key_end: tuple[bytes, bytes], limit: int) -> None:
        key, end = key_end
        for rev in readable_revs(self.model):
            assert_range(self.core, self.model, key, end, rev, limit)

    def _assert_recovered(self, core: MVCC) -> None:
        if self.model.compact_rev > core.compact_rev:
            core.compact(self.model.compact_rev)
        assert_same_state(core, self.model)
        # Byte for byte the same state, sub-revisions included.
        assert core.dump(core.rev) == self.core.dump(self.core.rev)

    @rule()
    def check_replay(self) -> None:
        """Restart from the log alone: every record applied in order to a fresh core."""
        core = MVCC()
        for rev, record in self.log:
            core.apply_record(rev, record)
        self._assert_recovered(core)

    @rule(data=st.data())
    def check_dump_now(self, data: st.DataObject) -> None:
        """Restart from a snapshot of the current core at some revision plus the records after it."""
        rev = data.draw(st.integers(max(self.model.compact_rev, 1), self.model.rev), label="dump at")
        core = MVCC()
        core.load(self.core.dump(rev))
        assert core.rev == rev
        for r, record in self.log:
            if r > rev:
                core.apply_record(r, record)
        self._assert_recovered(core)

    @rule(snap=snapshots)
    def check_old_snapshot(self, snap: tuple[int, bytes, tuple[tuple[int, bytes], ...]]) -> None:
        """Restart from an earlier snapshot (compactions may have happened since) plus the later records."""
        rev, data, covered = snap
        if rev > self.model.rev or tuple(e for e in self.log if e[0] <= rev) != covered:
            event("old snapshot stale")
            return
        event("old snapshot predates a compaction" if rev < self.model.compact_rev else "old snapshot")
        core = MVCC()
        core.load(data)
        for r, record in self.log:
            if r > rev:
                core.apply_record(r, record)
        self._assert_recovered(core)

    @invariant()
    def same_state(self) -> None:
        assert_same_state(self.core, self.model)


CoreVsModel.TestCase.settings = settings(
    max_examples=EXAMPLES, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestCoreVsModel = CoreVsModel.TestCase


# ---------------------------------------------------------------- arbitrary binary keys and big values


@settings(max_examples=max(EXAMPLES // 3, 10), deadline=None)
@given(
    writes=st.lists(
        st.tuples(st.binary(min_size=1, max_size=6), st.one_of(st.binary(max_size=64), st.just(BIG)),
                  st.booleans()),
        min_size=1, max_size=25,
    ),
    bounds=st.lists(st.tuples(st.binary(max_size=6), st.binary(max_size=6)), max_size=6),
)
def test_binary_keys_and_values(writes: list[tuple[bytes, bytes, bool]],
                                bounds: list[tuple[bytes, bytes]]) -> None:
    """Unconstrained binary keys order like Go's bytes.Compare; values of any size and content round-trip."""
    core, model = MVCC(), ModelMVCC()
    log = []
    for i, (key, value, delete) in enumerate(writes):
        rev = model.rev + 1
        if delete and model.delete(key, rev, 0):
            assert core.delete(key, rev, 0)
        elif delete:
            assert not core.delete(key, rev, 0)
            continue
        else:
            core.put(key, value, i, rev, 0)
            model.put(key, value, i, rev, 0)
        log.append((rev, core.take_record()))
    for rev in readable_revs(model):
        for key, end in [(b"\x00", b"\x00"), *bounds]:
            assert_range(core, model, key, end, rev, 0)
        for key, _, _ in writes:
            v = model.get(key, rev)
            assert core.get_kv(key, rev) == (None if v is None else expected_kv(key, v))
    replayed = MVCC()
    for rev, record in log:
        replayed.apply_record(rev, record)
    loaded = MVCC()
    loaded.load(core.dump(core.rev))
    for other in (replayed, loaded):
        assert_same_state(other, model)
        everything = (b"\x00", b"\x00", model.rev, 0, False)
        assert other.range(*everything) == core.range(*everything)


def test_large_values_round_trip() -> None:
    """etcd's default request limit is 1.5 MiB: values up to it survive record replay and dump/load intact."""
    core = MVCC()
    sizes = [100 * 1024, 1536 * 1024, 0, 128, 16383, 16384, 2**21 + 1]
    log = []
    for i, size in enumerate(sizes):
        value = (bytes(range(256)) * (size // 256 + 1))[:size]
        core.put(b"big/%d" % i, value, 0, i + 2, 0)
        log.append((i + 2, core.take_record()))
    core.put(b"big/0", b"small", 7, len(sizes) + 2, 0)  # the big version stays readable in history
    log.append((core.rev, core.take_record()))
    replayed, loaded = MVCC(), MVCC()
    for rev, record in log:
        replayed.apply_record(rev, record)
    loaded.load(core.dump(core.rev))
    for c in (core, replayed, loaded):
        for i, size in enumerate(sizes):
            value = (bytes(range(256)) * (size // 256 + 1))[:size]
            got = c.get(b"big/%d" % i, i + 2)
            assert record_fields(got) == (b"big/%d" % i, i + 2, i + 2, 1, value, 0)
            assert fields(c.get_kv(b"big/%d" % i, i + 2)) == record_fields(got)
        assert record_fields(c.get(b"big/0", c.rev)) == (b"big/0", 2, c.rev, 2, b"small", 7)
        kvs, total = c.range(b"big/", prefix_end(b"big/"), 2, 0, False)
        assert total == 1 and fields(kvs[0])[4] == (bytes(range(256)) * 400)[: 100 * 1024]


def test_apply_record_refuses_stale_records() -> None:
    """A replayed record must be after the head: a duplicate would fork history instead of failing loudly."""
    writer = MVCC()
    writer.put(b"a", b"1", 0, 2, 0)
    rec2 = writer.take_record()
    writer.delete(b"a", 3, 0)
    rec3 = writer.take_record()
    replica = MVCC()
    replica.apply_record(2, rec2)
    with pytest.raises(ValueError):
        replica.apply_record(2, rec2)
    replica.apply_record(3, rec3)
    with pytest.raises(ValueError):
        replica.apply_record(4, rec3)  # deletes a key that is not live
    assert replica.rev == 3 and replica.get(b"a", 3) is None
    # Compaction at the head leaves no version at all; the guard must not depend on there being one, or the
    # stale record resurrects b"a" below the head revision.
    replica.compact(3)
    with pytest.raises(ValueError):
        replica.apply_record(2, rec2)
    assert replica.get(b"a", 3) is None


# ---------------------------------------------------------------- wire encoders against protobuf

int64s = st.one_of(st.sampled_from([0, 1, -1, 127, 128, 2**63 - 1, -(2**63)]),
                   st.integers(-(2**63), 2**63 - 1))
uint64s = st.one_of(st.sampled_from([0, 1, 127, 128, 2**64 - 1]), st.integers(0, 2**64 - 1))


@settings(max_examples=EXAMPLES, deadline=None)
@given(key=st.binary(max_size=300), create=int64s, mod=int64s, version=int64s, value=st.binary(max_size=300),
       lease=int64s)
def test_encode_kv_matches_protobuf(key: bytes, create: int, mod: int, version: int, value: bytes,
                                    lease: int) -> None:
    want = kv_pb2.KeyValue(key=key, create_revision=create, mod_revision=mod, version=version, value=value,
                           lease=lease).SerializeToString(deterministic=True)
    assert _core.encode_kv(key, create, mod, version, value, lease) == want


@settings(max_examples=EXAMPLES, deadline=None)
@given(cluster_id=uint64s, member_id=uint64s, revision=int64s, raft_term=uint64s,
       kvs=st.lists(st.tuples(st.binary(min_size=1, max_size=8), st.binary(max_size=200)), max_size=5),
       more=st.booleans(), count=int64s)
def test_encode_range_response_matches_protobuf(
    cluster_id: int, member_id: int, revision: int, raft_term: int, kvs: list[tuple[bytes, bytes]],
    more: bool, count: int,
) -> None:
    header = rpc_pb2.ResponseHeader(cluster_id=cluster_id, member_id=member_id, revision=revision,
                                    raft_term=raft_term)
    encoded_header = _wire.encode_header(cluster_id, member_id, revision, raft_term)
    assert encoded_header == header.SerializeToString(deterministic=True)
    messages = [kv_pb2.KeyValue(key=k, create_revision=2, mod_revision=3, version=1, value=v) for k, v in kvs]
    want = rpc_pb2.RangeResponse(header=header, kvs=messages, more=more, count=count)
    got = _wire.encode_range_response(encoded_header, [m.SerializeToString() for m in messages], more, count)
    assert got == want.SerializeToString(deterministic=True)


key_values = st.builds(kv_pb2.KeyValue, key=st.binary(min_size=1, max_size=8), mod_revision=int64s,
                       value=st.binary(max_size=200))


@settings(max_examples=EXAMPLES, deadline=None)
@given(is_delete=st.booleans(), kv=key_values, prev_kv=st.one_of(st.none(), key_values))
def test_encode_event_matches_protobuf(is_delete: bool, kv: kv_pb2.KeyValue,
                                       prev_kv: kv_pb2.KeyValue | None) -> None:
    want = kv_pb2.Event(type=kv_pb2.Event.DELETE if is_delete else kv_pb2.Event.PUT, kv=kv, prev_kv=prev_kv)
    got = _core.encode_event(is_delete, kv.SerializeToString(),
                             None if prev_kv is None else prev_kv.SerializeToString())
    assert got == want.SerializeToString(deterministic=True)


@settings(max_examples=EXAMPLES, deadline=None)
@given(revision=int64s, watch_id=int64s, created=st.booleans(), canceled=st.booleans(),
       compact_revision=int64s, cancel_reason=st.text(max_size=20), fragment=st.booleans(),
       events=st.lists(st.builds(kv_pb2.Event, kv=key_values), max_size=4))
def test_encode_watch_response_matches_protobuf(
    revision: int, watch_id: int, created: bool, canceled: bool, compact_revision: int, cancel_reason: str,
    fragment: bool, events: list[kv_pb2.Event],
) -> None:
    # an all-zero header too: Go sends it anyway, as an empty message
    header = rpc_pb2.ResponseHeader(revision=revision)
    want = rpc_pb2.WatchResponse(header=header, watch_id=watch_id, created=created, canceled=canceled,
                                 compact_revision=compact_revision, cancel_reason=cancel_reason,
                                 fragment=fragment, events=events)
    got = _wire.encode_watch_response(header.SerializeToString(), watch_id,
                                      [e.SerializeToString() for e in events], created=created,
                                      canceled=canceled, compact_revision=compact_revision,
                                      cancel_reason=cancel_reason, fragment=fragment)
    assert got == want.SerializeToString(deterministic=True)


RANGE_FIELDS = [f.name for f in rpc_pb2.RangeRequest.DESCRIPTOR.fields]
int32s = st.one_of(st.sampled_from([0, 1, 2, 3, 4, 5, -1, 2**31 - 1, -(2**31)]),
                   st.integers(-(2**31), 2**31 - 1))
range_requests = st.builds(
    rpc_pb2.RangeRequest, key=st.binary(max_size=40), range_end=st.binary(max_size=40), limit=int64s,
    revision=int64s, sort_order=int32s, sort_target=int32s, serializable=st.booleans(),
    keys_only=st.booleans(), count_only=st.booleans(), min_mod_revision=int64s, max_mod_revision=int64s,
    min_create_revision=int64s, max_create_revision=int64s)


def _decoded_both_ways(raw: bytes) -> tuple[object, object]:
    try:
        want = rpc_pb2.RangeRequest.FromString(raw)
    except Exception:  # noqa: BLE001 - protobuf's DecodeError; the fast path must then defer to it
        want = None
    return want, _wire.decode_range_request(raw)


@settings(max_examples=EXAMPLES, deadline=None)
@given(r=range_requests,
       extra=st.lists(st.tuples(st.integers(1, 40), st.integers(0, 7), st.binary(max_size=12)), max_size=3),
       cut=st.integers(0, 8))
def test_decode_range_request_agrees_with_protobuf(r: rpc_pb2.RangeRequest,
                                                   extra: list[tuple[int, int, bytes]], cut: int) -> None:
    """The hot path's decoder gives protobuf's fields for every message it accepts; on anything else
    (unknown or mistyped fields, truncation, garbage) it either agrees or defers (None)."""
    raw = r.SerializeToString()
    want, got = _decoded_both_ways(raw)
    assert got is not None, "a canonical RangeRequest must take the fast path"
    assert {f: getattr(got, f) for f in RANGE_FIELDS} == {f: getattr(want, f) for f in RANGE_FIELDS}
    # Append raw fields of any number and wire type, and maybe cut the message short.
    for field, wire, payload in extra:
        raw += bytes([(field << 3 | wire) & 0x7F | (0x80 if field >= 16 else 0)])
        if field >= 16:
            raw += bytes([field >> 4])
        raw += payload
    raw = raw[:len(raw) - cut] if cut < len(raw) else raw
    want, got = _decoded_both_ways(raw)
    if got is not None:
        assert want is not None, f"accepted what protobuf refuses: {raw!r}"
        assert {f: getattr(got, f) for f in RANGE_FIELDS} == {f: getattr(want, f) for f in RANGE_FIELDS}


def test_range_semantics_of_the_model() -> None:
    """The oracle's own range rule, pinned to etcd's documented examples so the model cannot drift."""
    assert in_range(b"a", b"a", b"") and not in_range(b"ab", b"a", b"")
    assert in_range(b"\xff\xff", b"a", b"\x00") and not in_range(b"\x00", b"a", b"\x00")
    assert in_range(b"ab", b"a", prefix_end(b"a")) and not in_range(b"b", b"a", prefix_end(b"a"))
    assert not in_range(b"b", b"b", b"a")  # end before key: empty, not an error
    assert prefix_end(b"a\xff") == b"b" and prefix_end(b"\xff\xff") == b"\x00"
