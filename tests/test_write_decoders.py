"""The write path's C decoders (server/_wire.pyx: PutRequest, flat TxnRequests) against protobuf, and the
engine's answers to decoded requests against its answers to the same requests as protobuf messages.

A decoded request must read exactly as protobuf reads the same bytes, or be refused (None: the server then
parses with protobuf, which decides every edge case). And a decoded request must be checked, applied and
answered byte for byte as the message is: same response, same error, same log record, same lease state.
"""

from __future__ import annotations

import os

from fastetcd._core import MVCC
from hypothesis import given, settings
from hypothesis import strategies as st

from fastetcd import errors
from fastetcd.engine import log_entry, quota
from fastetcd.engine.apply import Applier, is_txn_readonly
from fastetcd.engine.lessor import Lessor
from fastetcd.proto import rpc_pb2 as pb
from fastetcd.server import _wire
from fastetcd.server.header import Header
from fastetcd.server.kv import KVService, check_flat_txn, check_intervals, check_put, check_txn

EXAMPLES = int(os.environ.get("FASTETCD_PROPERTY_EXAMPLES", "200"))

int64s = st.one_of(st.sampled_from([0, 1, -1, 127, 128, 2**63 - 1, -(2**63)]),
                   st.integers(-(2**63), 2**63 - 1))
int32s = st.one_of(st.sampled_from([0, 1, 2, 3, 4, 5, -1, 2**31 - 1, -(2**31)]),
                   st.integers(-(2**31), 2**31 - 1))

PUT_FIELDS = [f.name for f in pb.PutRequest.DESCRIPTOR.fields]
DELETE_FIELDS = [f.name for f in pb.DeleteRangeRequest.DESCRIPTOR.fields]
RANGE_FIELDS = [f.name for f in pb.RangeRequest.DESCRIPTOR.fields]
COMPARE_FIELDS = [f.name for f in pb.Compare.DESCRIPTOR.fields]


# ---------------------------------------------------------------------------------------------- decoding

def any_puts(
    keys: st.SearchStrategy[bytes], values: st.SearchStrategy[bytes], leases: st.SearchStrategy[int]
) -> st.SearchStrategy[pb.PutRequest]:
    return st.builds(pb.PutRequest, key=keys, value=values, lease=leases, prev_kv=st.booleans(),
                     ignore_value=st.booleans(), ignore_lease=st.booleans())


ANY_KEY = st.binary(max_size=20)
puts = any_puts(st.binary(max_size=40), st.binary(max_size=300), int64s)
ranges = st.builds(pb.RangeRequest, key=ANY_KEY, range_end=st.binary(max_size=20), limit=int64s,
                   revision=int64s, sort_order=int32s, sort_target=int32s, count_only=st.booleans(),
                   keys_only=st.booleans(), min_mod_revision=int64s)
deletes = st.builds(pb.DeleteRangeRequest, key=st.binary(max_size=20), range_end=st.binary(max_size=20),
                    prev_kv=st.booleans())


@st.composite
def compares(draw: st.DrawFn, keys: st.SearchStrategy[bytes] = ANY_KEY,
             numbers: st.SearchStrategy[int] = int64s) -> pb.Compare:
    c = pb.Compare(result=draw(int32s), target=draw(int32s), key=draw(keys),
                   range_end=draw(st.sampled_from([b"", b"\x00", b"z"])))
    union = draw(st.sampled_from([None, "version", "create_revision", "mod_revision", "value", "lease"]))
    if union == "value":
        c.value = draw(st.binary(max_size=20))
    elif union is not None:
        setattr(c, union, draw(numbers))
    return c


def ops(
    put_st: st.SearchStrategy[pb.PutRequest] = puts,
    range_st: st.SearchStrategy[pb.RangeRequest] = ranges,
    delete_st: st.SearchStrategy[pb.DeleteRangeRequest] = deletes,
) -> st.SearchStrategy[pb.RequestOp]:
    return st.one_of(st.builds(pb.RequestOp, request_put=put_st),
                     st.builds(pb.RequestOp, request_range=range_st),
                     st.builds(pb.RequestOp, request_delete_range=delete_st))


txns = st.builds(pb.TxnRequest, compare=st.lists(compares(), max_size=3), success=st.lists(ops(), max_size=3),
                 failure=st.lists(ops(), max_size=3))


def fields_of(m: object, names: list[str]) -> dict[str, object]:
    return {f: getattr(m, f) for f in names}


def txn_view(t: object) -> object:
    """What the checks and the engine read of a TxnRequest (message or TxnArgs), as plain data."""
    def op_view(op: object) -> object:
        kind = op.WhichOneof("request")  # type: ignore[attr-defined]
        sub = getattr(op, kind) if kind is not None else None
        names = {"request_put": PUT_FIELDS, "request_range": RANGE_FIELDS,
                 "request_delete_range": DELETE_FIELDS}.get(kind or "", [])
        has_put = op.HasField("request_put")  # type: ignore[attr-defined]
        return kind, fields_of(sub, names) if names else None, has_put

    def compare_view(c: object) -> object:
        return fields_of(c, COMPARE_FIELDS), c.WhichOneof("target_union")  # type: ignore[attr-defined]

    compare = [compare_view(c) for c in t.compare]  # type: ignore[attr-defined]
    success = [op_view(op) for op in t.success]  # type: ignore[attr-defined]
    failure = [op_view(op) for op in t.failure]  # type: ignore[attr-defined]
    return compare, success, failure, is_txn_readonly(t)  # type: ignore[arg-type]


def parsed(cls: type, raw: bytes) -> object:
    try:
        return cls.FromString(raw)
    except Exception:  # noqa: BLE001 - protobuf's DecodeError: the fast path must then defer to it
        return None


def mangled(raw: bytes, edits: list[tuple[int, int]], extra: list[tuple[int, int, bytes]], cut: int) -> bytes:
    """``raw`` with bytes overwritten, raw fields of any number and wire type appended, maybe cut short."""
    b = bytearray(raw)
    for pos, value in edits:
        if b:
            b[pos % len(b)] = value
    for field, wire, payload in extra:
        b.append((field << 3 | wire) & 0x7F | (0x80 if field >= 16 else 0))
        if field >= 16:
            b.append(field >> 4)
        b += payload
    return bytes(b[:len(b) - cut] if cut < len(b) else b)


edits_st = st.lists(st.tuples(st.integers(0, 1000), st.integers(0, 255)), max_size=2)
extra_st = st.lists(st.tuples(st.integers(1, 70), st.integers(0, 7), st.binary(max_size=12)), max_size=3)


@settings(max_examples=EXAMPLES, deadline=None)
@given(r=puts, edits=edits_st, extra=extra_st, cut=st.integers(0, 8))
def test_decode_put_request_agrees_with_protobuf(r: pb.PutRequest, edits: list[tuple[int, int]],
                                                 extra: list[tuple[int, int, bytes]], cut: int) -> None:
    raw = r.SerializeToString()
    got = _wire.decode_put_request(raw)
    assert got is not None, "a canonical PutRequest must take the fast path"
    assert fields_of(got, PUT_FIELDS) == fields_of(r, PUT_FIELDS)
    raw = mangled(raw, edits, extra, cut)
    got = _wire.decode_put_request(raw)
    if got is not None:
        want = parsed(pb.PutRequest, raw)
        assert want is not None, f"accepted what protobuf refuses: {raw!r}"
        assert fields_of(got, PUT_FIELDS) == fields_of(want, PUT_FIELDS)


@settings(max_examples=EXAMPLES, deadline=None)
@given(t=txns, edits=edits_st, extra=extra_st, cut=st.integers(0, 8))
def test_decode_txn_request_agrees_with_protobuf(t: pb.TxnRequest, edits: list[tuple[int, int]],
                                                 extra: list[tuple[int, int, bytes]], cut: int) -> None:
    """Every flat TxnRequest takes the fast path and reads as protobuf reads it; mangled bytes (inside
    the nested messages too) either read the same or are left to protobuf."""
    raw = t.SerializeToString()
    got = _wire.decode_txn_request(raw)
    assert got is not None, "a canonical flat TxnRequest must take the fast path"
    assert txn_view(got) == txn_view(t)
    raw = mangled(raw, edits, extra, cut)
    got = _wire.decode_txn_request(raw)
    if got is not None:
        want = parsed(pb.TxnRequest, raw)
        assert want is not None, f"accepted what protobuf refuses: {raw!r}"
        assert txn_view(got) == txn_view(want)


def test_decoders_leave_unusual_shapes_to_protobuf() -> None:
    put = pb.RequestOp(request_put=pb.PutRequest(key=b"k"))
    nested = pb.TxnRequest(success=[pb.RequestOp(request_txn=pb.TxnRequest(success=[put]))])
    assert _wire.decode_txn_request(nested.SerializeToString()) is None
    empty_op = pb.TxnRequest(success=[pb.RequestOp()])
    assert _wire.decode_txn_request(empty_op.SerializeToString()) is None
    # a RequestOp naming two members of its oneof: protobuf keeps the last
    two = pb.RequestOp(request_range=pb.RangeRequest(key=b"a")).SerializeToString() + put.SerializeToString()
    raw = b"\x12" + bytes([len(two)]) + two
    assert _wire.decode_txn_request(raw) is None
    assert pb.TxnRequest.FromString(raw).success[0].WhichOneof("request") == "request_put"
    # a Compare naming two targets: protobuf keeps the last
    c = pb.Compare(key=b"k", version=3).SerializeToString() + pb.Compare(mod_revision=5).SerializeToString()
    raw = b"\x0a" + bytes([len(c)]) + c
    assert _wire.decode_txn_request(raw) is None
    assert pb.TxnRequest.FromString(raw).compare[0].WhichOneof("target_union") == "mod_revision"
    # a known field with another wire type; a group
    assert _wire.decode_put_request(b"\x18\x05" + b"\x0a\x01k") is not None
    assert _wire.decode_put_request(b"\x0a\x01k\x19" + bytes(8)) is None
    assert _wire.decode_put_request(b"\x0a\x01k\x3b\x3c") is None


# ---------------------------------------------------------------------------------------------- applying

KEYS = [b"", b"a", b"b", b"c", b"\x00", b"b\x00"]
LEASE = 7
keys = st.sampled_from(KEYS)
small_revs = st.integers(-1, 12)
applied_puts = any_puts(keys, st.sampled_from([b"", b"x", b"v" * 30]), st.sampled_from([0, 0, LEASE, 99]))
ends = st.sampled_from([b"", b"\x00", b"c", b"z"])
applied_ranges = st.builds(pb.RangeRequest, key=keys, range_end=ends,
                           limit=st.integers(0, 3), revision=small_revs, count_only=st.booleans(),
                           keys_only=st.booleans(), sort_order=st.integers(0, 2),
                           sort_target=st.integers(0, 4))
applied_deletes = st.builds(pb.DeleteRangeRequest, key=keys, range_end=st.sampled_from([b"", b"\x00", b"c"]),
                            prev_kv=st.booleans())
applied_txns = st.builds(
    pb.TxnRequest, compare=st.lists(compares(keys, small_revs), max_size=2),
    success=st.lists(ops(applied_puts, applied_ranges, applied_deletes), max_size=3),
    failure=st.lists(ops(applied_puts, applied_ranges, applied_deletes), max_size=2))
histories = st.lists(st.tuples(st.sampled_from(KEYS[1:]), st.sampled_from([b"1", b"22"]),
                               st.sampled_from([0, LEASE])), max_size=8)


def engine(history: list[tuple[bytes, bytes, int]]) -> tuple[MVCC, Lessor, Applier]:
    core, lessor = MVCC(), Lessor(clock=lambda: 0.0)
    applier = Applier(core, lessor)
    lessor.grant(LEASE, 60)
    for key, value, lease in history:
        applier.put(pb.PutRequest(key=key, value=value, lease=lease))
    if history:
        applier.delete_range(pb.DeleteRangeRequest(key=history[0][0]))
    core.take_record()
    lessor.take_ops()
    return core, lessor, applier


def outcome(kv: KVService, core: MVCC, lessor: Lessor, call: object) -> tuple[object, ...]:
    """What a request did: its answer's bytes or its error, the log record, the lease attachments."""
    try:
        answer: object = kv._encode(call())  # type: ignore[operator]
    except errors.EtcdError as e:
        answer = (e.code, str(e))
    leases = {lid: sorted(lease.keys) for lid, lease in lessor.leases.items()}
    return answer, core.rev, core.take_record(), lessor.take_ops(), leases


def all_txn_checks(r: pb.TxnRequest, max_txn_ops: int) -> None:
    """What KV.Txn runs on a TxnRequest message before anything else."""
    check_txn(r, max_txn_ops)
    check_intervals(r.success)
    check_intervals(r.failure)


def checked(check: object, request: object) -> object:
    try:
        return check(request)  # type: ignore[operator]
    except errors.EtcdError as e:
        return e.code, str(e)


KV = KVService(None, Header(0x1234, 0xABCDEF, 3), max_request_bytes=1 << 20, max_txn_ops=4)  # type: ignore[arg-type]


@settings(max_examples=EXAMPLES, deadline=None)
@given(history=histories, t=applied_txns, readonly_at=st.one_of(st.none(), st.integers(1, 12)))
def test_decoded_txn_is_checked_and_applied_as_the_message(
    history: list[tuple[bytes, bytes, int]], t: pb.TxnRequest, readonly_at: int | None
) -> None:
    raw = t.SerializeToString()
    decoded = _wire.decode_txn_request(raw)
    assert decoded is not None
    for check in (lambda r: check_txn(r, KV.max_txn_ops), lambda r: check_intervals(r.success),
                  lambda r: check_intervals(r.failure), quota.txn_cost, is_txn_readonly):
        assert checked(check, decoded) == checked(check, t)
    for max_ops in (1, 2, KV.max_txn_ops):  # TOO_MANY_OPS first, then the rest in order
        want = checked(lambda r, n=max_ops: all_txn_checks(r, n), t)
        assert checked(lambda r, n=max_ops: check_flat_txn(r, n), decoded) == want
    core_a, lessor_a, applier_a = engine(history)
    core_b, lessor_b, applier_b = engine(history)
    read_rev = None
    if is_txn_readonly(t) and readonly_at is not None:
        read_rev = min(readonly_at, core_a.rev)  # a read-only txn at the committed revision
    want = outcome(KV, core_a, lessor_a, lambda: applier_a.txn(t, read_rev))
    got = outcome(KV, core_b, lessor_b, lambda: applier_b.txn(decoded, read_rev))
    assert got == want


@settings(max_examples=EXAMPLES, deadline=None)
@given(history=histories, p=applied_puts)
def test_decoded_put_is_checked_and_applied_as_the_message(history: list[tuple[bytes, bytes, int]],
                                                           p: pb.PutRequest) -> None:
    decoded = _wire.decode_put_request(p.SerializeToString())
    assert decoded is not None
    assert checked(check_put, decoded) == checked(check_put, p)
    assert quota.put_cost(decoded) == quota.put_cost(p)
    core_a, lessor_a, applier_a = engine(history)
    core_b, lessor_b, applier_b = engine(history)
    want = outcome(KV, core_a, lessor_a, lambda: applier_a.put(p))
    got = outcome(KV, core_b, lessor_b, lambda: applier_b.put(decoded))
    assert got == want


@settings(max_examples=EXAMPLES, deadline=None)
@given(rev=int64s, kv=st.binary(max_size=300))
def test_log_entry_of_a_plain_write(rev: int, kv: bytes) -> None:
    assert log_entry.encode_kv(rev, kv) == log_entry.encode(log_entry.Entry(rev, kv))
