"""The KV differential's request generator and outcome comparison, shared by the differential tests
(test_differential, test_differential_watch).

The key space is small (30 keys under overlapping prefixes) so that puts, deletes, ranges, compares and
compactions keep hitting the same keys and revisions.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import grpc
import pytest
from google.protobuf import text_format
from google.protobuf.message import Message

from fastetcd.proto import rpc_pb2
from fastetcd.testing import prefix_end

RangeRequest = rpc_pb2.RangeRequest
Compare = rpc_pb2.Compare

KEYS: list[bytes] = [
    b"\x00", b"a", b"a/", b"a/0", b"a/1", b"a/2", b"a/3", b"a/b/0", b"a/b/1", b"a/b/2",
    b"a/b\xff", b"a0", b"b/0", b"b/1", b"b/2", b"b/3", b"b/4", b"b/\xff", b"b/\xff\xff", b"b0",
    b"c", b"c/x", b"c/y", b"c/z/1", b"c/z/2", b"d", b"d\x00", b"zz", b"\xfe", b"\xff",
]
PREFIXES: list[bytes] = [b"a/", b"a/b/", b"b/", b"b/\xff", b"c/", b"c/z/", b"a", b"d", b"\xff"]
VALUES: list[bytes] = [b"", b"v0", b"v1", b"v2", b"v10", b"V", b"\x00", b"\xff\xfe", b"zzz", b"a/1"]

# etcd 3.5.1's default --max-txn-ops.
MAX_TXN_OPS = 128


def parametrize_seeds(metafunc: pytest.Metafunc, argname: str, count_option: str) -> None:
    """Parametrize `argname` with seeds --diff-seed-start .. + <count_option> (ids seed0, seed1, ...)."""
    if argname in metafunc.fixturenames:
        start = metafunc.config.getoption("--diff-seed-start")
        seeds = list(range(start, start + metafunc.config.getoption(count_option)))
        metafunc.parametrize(argname, seeds, ids=[f"seed{s}" for s in seeds])


def covers(key: bytes, range_end: bytes, candidate: bytes) -> bool:
    """Whether a request on [key, range_end) touches candidate, with etcd's conventions for range_end.

    The watch hub has its own version of this rule (engine/watch_hub.py); the differential keeps an
    independent copy on purpose: an oracle-side model must not share code with what it checks."""
    if not range_end:
        return candidate == key
    if range_end == b"\x00":
        return candidate >= key
    return key <= candidate < range_end


@dataclass
class Model:
    """What the generator knows of the oracle's state: enough to aim revisions at interesting places."""

    rev: int = 1
    compacted: int = 0


@dataclass
class TxnScope:
    """Keys written within one Txn, to keep most generated Txns free of duplicate-key errors."""

    puts: set[bytes] = field(default_factory=set)
    dels: list[tuple[bytes, bytes]] = field(default_factory=list)
    allow_conflicts: bool = False

    def can_put(self, key: bytes) -> bool:
        return self.allow_conflicts or (
            key not in self.puts and not any(covers(k, e, key) for k, e in self.dels)
        )

    def can_delete(self, key: bytes, range_end: bytes) -> bool:
        return self.allow_conflicts or not any(covers(key, range_end, p) for p in self.puts)


class Generator:
    def __init__(self, rng: random.Random, model: Model) -> None:
        self.rng = rng
        self.model = model
        # Error-provoking choices are rarer inside a Txn: one bad op rejects the whole Txn, and a Txn holds
        # many ops, so at full rate most Txns would only exercise error paths.
        self.err_scale = 1.0

    def chance(self, p: float) -> bool:
        """A coin for choices that make the request invalid."""
        return self.rng.random() < p * self.err_scale

    # -- building blocks -------------------------------------------------------------------------

    def key(self) -> bytes:
        return self.rng.choice(KEYS)

    def value(self) -> bytes:
        r = self.rng.random()
        if r < 0.75:
            return self.rng.choice(VALUES)
        if r < 0.97:
            return self.rng.randbytes(self.rng.randint(1, 40))
        return self.rng.randbytes(self.rng.randint(1000, 5000))

    def key_range(self) -> tuple[bytes, bytes]:
        """(key, range_end) in every shape etcd distinguishes."""
        r = self.rng.random()
        if r < 0.40:
            return self.key(), b""
        if r < 0.60:
            p = self.rng.choice(PREFIXES)
            return p, prefix_end(p)
        if r < 0.70:
            return self.key(), b"\x00"
        if r < 0.75:
            return b"\x00", b"\x00"
        if r < 0.95:
            a, b = self.key(), self.key()
            return (min(a, b), max(a, b)) if self.rng.random() < 0.85 else (max(a, b), min(a, b))
        # A range_end that is not a key of the space, and a key that sorts before all of them.
        return self.rng.choice([b"a/b", b"b", b"\x00\x00"]), self.rng.choice([b"b/3x", b"c/z", b"e"])

    def revision(self) -> int:
        m = self.model
        r = self.rng.random()
        if r < 0.55:
            return 0
        if r < 0.60:
            return -self.rng.randint(1, 3)
        if self.chance(0.35):
            if self.rng.random() < 0.6 and m.compacted > 1:
                return self.rng.randint(1, m.compacted - 1)
            return m.rev + self.rng.randint(1, 3)
        return self.rng.randint(max(1, m.compacted), m.rev)

    def small_rev(self) -> int:
        return self.rng.randint(0, self.model.rev + 1)

    # -- requests --------------------------------------------------------------------------------

    def range_req(self) -> RangeRequest:
        rng = self.rng
        key, end = self.key_range()
        req = RangeRequest(key=key, range_end=end)
        if self.chance(0.02):
            req.key = b""
        if rng.random() < 0.3:
            req.limit = rng.choice([1, 1, 2, 3, 5, 100, -1])
        req.revision = self.revision()
        if rng.random() < 0.5:
            req.sort_order = rng.choice([0, 1, 2])
            req.sort_target = rng.choice([0, 1, 2, 3, 4])
        req.serializable = rng.random() < 0.2
        req.keys_only = rng.random() < 0.15
        req.count_only = rng.random() < 0.1
        for name in ("min_mod_revision", "max_mod_revision", "min_create_revision", "max_create_revision"):
            if rng.random() < 0.07:
                setattr(req, name, self.small_rev())
        return req

    def put_req(self, scope: TxnScope | None = None) -> rpc_pb2.PutRequest | None:
        rng = self.rng
        key = self.key()
        if scope is not None:
            for _ in range(6):
                if scope.can_put(key):
                    break
                key = self.key()
            else:
                return None
            scope.puts.add(key)
        req = rpc_pb2.PutRequest(key=key, value=self.value(), prev_kv=rng.random() < 0.3)
        if self.chance(0.01):
            req.key = b""
        if self.chance(0.1):
            req.ignore_value = True
            if not self.chance(0.15):
                req.value = b""  # a value together with ignore_value is an error
        if self.chance(0.1):
            req.ignore_lease = True
        if self.chance(0.04):
            # No lease is ever granted here: any id is unknown.
            req.lease = rng.choice([1, 7587861234567890, 2**62])
        return req

    def delete_req(self, scope: TxnScope | None = None) -> rpc_pb2.DeleteRangeRequest | None:
        rng = self.rng
        for _ in range(6):
            key, end = self.key_range()
            if (key, end) == (b"\x00", b"\x00") and rng.random() < 0.8:
                continue  # wiping everything empties the space too often
            if scope is None or scope.can_delete(key, end):
                break
        else:
            return None
        if scope is not None:
            scope.dels.append((key, end))
        req = rpc_pb2.DeleteRangeRequest(key=key, range_end=end, prev_kv=rng.random() < 0.4)
        if self.chance(0.01):
            req.key = b""
        return req

    def compare(self) -> Compare:
        rng = self.rng
        c = Compare(result=rng.choice([0, 1, 2, 3]), target=rng.choice([0, 1, 2, 3, 4]), key=self.key())
        r = rng.random()
        if r < 0.15:
            p = rng.choice(PREFIXES)
            c.key, c.range_end = p, prefix_end(p)
        elif r < 0.2:
            c.range_end = b"\x00"
        if self.chance(0.01):
            c.key = b""
        # Mostly the union member that matches the target; sometimes another one (etcd then compares
        # against the zero value), sometimes none at all.
        target = c.target if rng.random() < 0.92 else rng.choice([0, 1, 2, 3, 4, -1])
        if target == Compare.VERSION:
            c.version = rng.choice([0, 1, 2, 3, rng.randint(0, 10)])
        elif target == Compare.CREATE:
            c.create_revision = self.small_rev()
        elif target == Compare.MOD:
            c.mod_revision = self.small_rev()
        elif target == Compare.VALUE:
            c.value = rng.choice(VALUES) if rng.random() < 0.9 else self.value()
        elif target == Compare.LEASE:
            c.lease = rng.choice([0, 0, 1, 7587861234567890])
        return c

    def request_op(self, scope: TxnScope, depth: int) -> rpc_pb2.RequestOp:
        r = self.rng.random()
        if r < 0.35:
            put = self.put_req(scope)
            if put is not None:
                return rpc_pb2.RequestOp(request_put=put)
        elif r < 0.55:
            delete = self.delete_req(scope)
            if delete is not None:
                return rpc_pb2.RequestOp(request_delete_range=delete)
        elif r < 0.65 and depth < 2:
            return rpc_pb2.RequestOp(request_txn=self.txn_req(scope, depth + 1))
        return rpc_pb2.RequestOp(request_range=self.range_req())

    def txn_req(self, scope: TxnScope | None = None, depth: int = 0) -> rpc_pb2.TxnRequest:
        rng = self.rng
        top = scope is None
        if scope is None:
            scope = TxnScope(allow_conflicts=rng.random() < 0.08)
            self.err_scale = 0.25
        req = rpc_pb2.TxnRequest()
        req.compare.extend(self.compare() for _ in range(rng.choice([0, 1, 1, 2, 3])))
        req.success.extend(self.request_op(scope, depth) for _ in range(rng.choice([0, 1, 2, 3, 4])))
        req.failure.extend(self.request_op(scope, depth) for _ in range(rng.choice([0, 1, 2, 3])))
        if top:
            r = rng.random()
            if r < 0.01:
                branch = rng.choice([req.success, req.failure])
                branch.extend(rpc_pb2.RequestOp(request_range=self.range_req())
                              for _ in range(MAX_TXN_OPS + 1 - len(branch)))
            elif r < 0.015:
                req.compare.extend(self.compare() for _ in range(MAX_TXN_OPS + 1))
            avoid_etcd_351_panic(req)
            self.err_scale = 1.0
        return req

    def compact_req(self) -> rpc_pb2.CompactionRequest:
        m, rng = self.model, self.rng
        r = rng.random()
        if r < 0.75 and m.rev > m.compacted:
            # Short steps: most of the history stays readable for the Range revisions.
            rev = rng.randint(m.compacted + 1, m.compacted + max(1, (m.rev - m.compacted) // 3))
        elif r < 0.88:
            rev = rng.randint(max(0, m.compacted - 3), m.compacted)
        else:
            rev = m.rev + rng.randint(1, 3)
        return rpc_pb2.CompactionRequest(revision=rev, physical=rng.random() < 0.5)

    def next_op(self) -> tuple[str, Message]:
        r = self.rng.random()
        if r < 0.33:
            return "Put", self.put_req()
        if r < 0.58:
            return "Range", self.range_req()
        if r < 0.70:
            return "DeleteRange", self.delete_req() or rpc_pb2.DeleteRangeRequest(key=self.key())
        if r < 0.985:
            return "Txn", self.txn_req()
        return "Compact", self.compact_req()


def _walk_ops(req: rpc_pb2.TxnRequest) -> list[rpc_pb2.RequestOp]:
    ops: list[rpc_pb2.RequestOp] = []
    for op in [*req.success, *req.failure]:
        ops.append(op)
        if op.HasField("request_txn"):
            ops.extend(_walk_ops(op.request_txn))
    return ops


def avoid_etcd_351_panic(req: rpc_pb2.TxnRequest) -> None:
    """etcd 3.5.1 panics on a Txn put with ignore_value / ignore_lease on a key that a delete in the same
    Txn removed (a "\\0"-ended delete slips past its duplicate-key check). Not behaviour to match: such
    puts lose their ignore flags."""
    ops = _walk_ops(req)
    dels = [(op.request_delete_range.key, op.request_delete_range.range_end)
            for op in ops if op.HasField("request_delete_range")]
    for op in ops:
        if op.HasField("request_put"):
            put = op.request_put
            if (put.ignore_value or put.ignore_lease) and any(covers(k, e, put.key) for k, e in dels):
                put.ignore_value = False
                put.ignore_lease = False


# -- comparing -----------------------------------------------------------------------------------

def zero_header_ids(msg: Message) -> None:
    """Zero cluster_id / member_id / raft_term in every ResponseHeader, however deeply nested."""
    if msg.DESCRIPTOR.full_name == "etcdserverpb.ResponseHeader":
        msg.cluster_id = 0
        msg.member_id = 0
        msg.raft_term = 0
        return
    for fd, value in msg.ListFields():
        if fd.message_type is None:
            continue
        if fd.is_repeated:
            if fd.message_type.GetOptions().map_entry:
                continue
            for item in value:
                zero_header_ids(item)
        else:
            zero_header_ids(value)


@dataclass
class Outcome:
    ok: Message | None = None
    code: str = ""
    details: str = ""

    def key(self) -> tuple[str, bytes | str]:
        if self.ok is not None:
            return ("OK", self.ok.SerializeToString(deterministic=True))
        return (self.code, self.details)

    def render(self) -> str:
        if self.ok is not None:
            return text_format.MessageToString(self.ok) or "<empty message>\n"
        return f"gRPC error {self.code}: {self.details!r}\n"


def outcome_of(future: grpc.Future) -> Outcome:
    try:
        resp = future.result()
    except grpc.RpcError as e:
        return Outcome(code=e.code().name, details=e.details() or "")
    zero_header_ids(resp)
    return Outcome(ok=resp)


def describe(method: str, req: Message) -> str:
    return f"{method}({text_format.MessageToString(req, as_one_line=True)})"
