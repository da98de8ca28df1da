"""Oversized, malformed and out-of-range input against fastetcd and real etcd: the same gRPC status code
(and, for etcd's own errors, the same message) from both, and the server keeps serving afterwards.
"""

from __future__ import annotations

import itertools
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from google.protobuf.message import Message
from servers import ServerFactory, ServerPair

from fastetcd.proto import rpc_pb2
from fastetcd.testing import UNLIMITED_CHANNEL_OPTIONS, kv_stub

DEFAULT_MAX_REQUEST_BYTES = 1572864  # etcd's --max-request-bytes default, 1.5 MiB
GRPC_OVERHEAD_BYTES = 512 * 1024  # etcd lets gRPC receive up to max-request-bytes + this
TOO_LARGE = ("INVALID_ARGUMENT", "etcdserver: request is too large")
TOO_MANY_OPS = ("INVALID_ARGUMENT", "etcdserver: too many operations in txn request")
EMPTY_KEY = ("INVALID_ARGUMENT", "etcdserver: key is not provided")
DUPLICATE_KEY = ("INVALID_ARGUMENT", "etcdserver: duplicate key given in txn request")
COMPACTED = ("OUT_OF_RANGE", "etcdserver: mvcc: required revision has been compacted")
FUTURE_REV = ("OUT_OF_RANGE", "etcdserver: mvcc: required revision is a future revision")

Put, Range, Delete = rpc_pb2.PutRequest, rpc_pb2.RangeRequest, rpc_pb2.DeleteRangeRequest
Op, Txn = rpc_pb2.RequestOp, rpc_pb2.TxnRequest


def _zero_ids(msg: Message) -> None:
    if msg.DESCRIPTOR.full_name == "etcdserverpb.ResponseHeader":
        msg.cluster_id = msg.member_id = msg.raft_term = 0
        return
    for fd, value in msg.ListFields():
        if fd.message_type is not None:
            for item in (value if fd.is_repeated else [value]):
                _zero_ids(item)


@dataclass(frozen=True)
class Result:
    code: str
    details: str  # for OK: the normalized response, as text

    def pair(self) -> tuple[str, str]:
        return (self.code, self.details)


class Target:
    """One server under attack, with a client that may send anything the server is meant to refuse."""

    _serial = itertools.count()

    def __init__(self, name: str, endpoint: str) -> None:
        self.name = name
        self.endpoint = endpoint
        self.channel = grpc.insecure_channel(endpoint, options=UNLIMITED_CHANNEL_OPTIONS)
        self.kv = kv_stub(self.channel)

    def call(self, method: str, req: Message) -> Result:
        try:
            resp = getattr(self.kv, method)(req, timeout=30)
        except grpc.RpcError as e:
            return Result(e.code().name, e.details() or "")
        _zero_ids(resp)
        return Result("OK", str(resp))

    def raw_call(self, path: str, payload: bytes) -> Result:
        try:
            self.channel.unary_unary(path)(payload, timeout=30)
        except grpc.RpcError as e:
            return Result(e.code().name, e.details() or "")
        return Result("OK", "")

    def assert_serves(self) -> None:
        """A fresh write is acknowledged and read back with the revision it was acknowledged at."""
        n = next(self._serial)
        key, value = f"still-serving/{n}".encode(), os.urandom(16)
        put = self.kv.Put(Put(key=key, value=value), timeout=30)
        got = self.kv.Range(Range(key=key), timeout=30)
        assert [(kv.value, kv.mod_revision) for kv in got.kvs] == [(value, put.header.revision)], self.name
        assert got.header.revision >= put.header.revision, self.name

    def close(self) -> None:
        self.channel.close()


class Both:
    def __init__(self, subject: str, oracle: str) -> None:
        self.fastetcd = Target("fastetcd", subject)
        self.etcd = Target("etcd", oracle)

    def same(self, method: str, req: Message, expect: tuple[str, str] | None = None,
             code_only: bool = False) -> Result:
        got, want = self.fastetcd.call(method, req), self.etcd.call(method, req)
        if expect is not None:
            assert want.pair() == expect, f"oracle answered {want} to {method}, the test expected {expect}"
        if code_only:
            assert got.code == want.code, f"{method}: fastetcd {got} vs etcd {want}"
        else:
            assert got == want, f"{method}:\n fastetcd: {got}\n etcd:     {want}"
        return want

    def assert_serves(self) -> None:
        self.fastetcd.assert_serves()
        self.etcd.assert_serves()

    def close(self) -> None:
        self.fastetcd.close()
        self.etcd.close()


@pytest.fixture
def both(fastetcd_endpoint: str, etcd_endpoint: str) -> Iterator[Both]:
    b = Both(fastetcd_endpoint, etcd_endpoint)
    try:
        yield b
    finally:
        b.close()


def test_request_just_over_max_request_bytes(both: Both) -> None:
    limit = DEFAULT_MAX_REQUEST_BYTES
    both.same("Put", Put(key=b"big", value=b"x" * limit), TOO_LARGE)
    both.same("Put", Put(key=b"big", value=b"x" * (limit + 1)), TOO_LARGE)
    # Size is checked before the lease is looked up, after the key is validated.
    both.same("Put", Put(key=b"big", value=b"x" * limit, lease=5), TOO_LARGE)
    both.same("Put", Put(key=b"", value=b"x" * limit), EMPTY_KEY)
    both.same("Txn", Txn(success=[Op(request_put=Put(key=b"big", value=b"x" * limit))]), TOO_LARGE)
    both.same("DeleteRange", Delete(key=b"k" * (limit + 1)), TOO_LARGE)
    both.assert_serves()
    # Just under the limit is fine, and reads are not size-limited (they never go through the log in
    # etcd): neither a huge Range key nor a read-only Txn holding one.
    both.same("Put", Put(key=b"big", value=b"y" * (limit - 1024)))
    both.same("Range", Range(key=b"big", keys_only=True))
    both.same("Range", Range(key=b"k" * (limit + 1)))
    both.same("Txn", Txn(success=[Op(request_range=Range(key=b"k" * (limit + 1)))]))
    both.same("Txn", Txn(compare=[rpc_pb2.Compare(key=b"k" * (limit + 1))]))
    both.assert_serves()


def test_value_far_over_grpc_receive_limit(both: Both) -> None:
    # Beyond max-request-bytes + 512 KiB gRPC itself refuses the message. The wording is the gRPC
    # library's (Go's in etcd), which no client parses; the code is what clients act on.
    size = DEFAULT_MAX_REQUEST_BYTES + GRPC_OVERHEAD_BYTES + 64 * 1024
    want = both.same("Put", Put(key=b"huge", value=b"x" * size), code_only=True)
    assert want.code == "RESOURCE_EXHAUSTED"
    both.same("Txn", Txn(success=[Op(request_put=Put(key=b"huge", value=b"x" * (3 * size)))]), code_only=True)
    both.assert_serves()


def test_txn_op_count_and_duplicate_keys(both: Both) -> None:
    both.same("Put", Put(key=b"a", value=b"1"))
    ranges = [Op(request_range=Range(key=b"a"))]
    both.same("Txn", Txn(success=ranges * 129), TOO_MANY_OPS)
    both.same("Txn", Txn(failure=ranges * 129), TOO_MANY_OPS)
    both.same("Txn", Txn(compare=[rpc_pb2.Compare(key=b"a")] * 129), TOO_MANY_OPS)
    both.same("Txn", Txn(success=ranges * 128, failure=ranges * 128))
    puts = [Op(request_put=Put(key=f"p/{i}".encode(), value=b"v")) for i in range(128)]
    both.same("Txn", Txn(success=puts))
    # The op limit counts one level only: nested Txns may hold 128 each.
    nested = Op(request_txn=Txn(success=ranges * 128))
    both.same("Txn", Txn(success=[nested] * 2))

    put_a = Op(request_put=Put(key=b"a", value=b"2"))
    both.same("Txn", Txn(success=[put_a, put_a]), DUPLICATE_KEY)
    both.same("Txn", Txn(success=[Op(request_delete_range=Delete(key=b"a", range_end=b"b")), put_a]),
              DUPLICATE_KEY)
    both.same("Txn", Txn(success=[Op(request_txn=Txn(success=[put_a])), put_a]), DUPLICATE_KEY)
    # Then and else of one nested Txn are exclusive, so the same key in both is allowed.
    both.same("Txn", Txn(success=[Op(request_txn=Txn(success=[put_a], failure=[put_a]))]))
    both.same("Txn", Txn(success=[put_a], failure=[put_a]))
    both.same("Range", Range(key=b"a"))
    both.assert_serves()


def test_revision_out_of_range(both: Both) -> None:
    for i in range(6):
        both.same("Put", Put(key=b"r", value=str(i).encode()))  # revisions 2..7
    both.same("Compact", rpc_pb2.CompactionRequest(revision=4))
    both.same("Range", Range(key=b"r", revision=3), COMPACTED)
    both.same("Range", Range(key=b"r", revision=4))
    both.same("Range", Range(key=b"r", revision=8), FUTURE_REV)
    both.same("Range", Range(key=b"r", revision=2**62), FUTURE_REV)
    both.same("Range", Range(key=b"r", revision=-5))
    both.same("Txn", Txn(success=[Op(request_range=Range(key=b"r", revision=1))]), COMPACTED)
    both.same("Txn", Txn(success=[Op(request_range=Range(key=b"r", revision=99))]), FUTURE_REV)
    # Only the branch that runs is checked.
    both.same("Txn", Txn(success=[Op(request_range=Range(key=b"r"))],
                         failure=[Op(request_range=Range(key=b"r", revision=99))]))
    both.same("Compact", rpc_pb2.CompactionRequest(revision=4), COMPACTED)
    both.same("Compact", rpc_pb2.CompactionRequest(revision=99), FUTURE_REV)
    both.same("Compact", rpc_pb2.CompactionRequest(revision=7, physical=True))
    both.same("Range", Range(key=b"r", revision=6), COMPACTED)
    both.same("Range", Range(key=b"r", revision=7))
    both.assert_serves()


def test_revisions_below_one_before_and_after_first_compaction(both: Both) -> None:
    """etcd starts with compacted revision -1, not 0: a Txn Range at revision -1 and Compact(0) are fine
    until the first compaction; revision -2 already counts as compacted inside a Txn (a top-level Range
    treats any revision <= 0 as "now")."""
    both.same("Put", Put(key=b"r", value=b"1"))

    def txn_range(rev: int) -> Message:
        return Txn(success=[Op(request_range=Range(key=b"r", revision=rev))])

    assert both.same("Txn", txn_range(-1)).code == "OK"
    both.same("Txn", txn_range(-2), COMPACTED)
    both.same("Range", Range(key=b"r", revision=-2))
    both.same("Compact", rpc_pb2.CompactionRequest(revision=0))
    both.same("Txn", txn_range(-1), COMPACTED)
    both.same("Txn", txn_range(0))
    both.same("Compact", rpc_pb2.CompactionRequest(revision=0), COMPACTED)
    both.same("Compact", rpc_pb2.CompactionRequest(revision=-1), COMPACTED)
    both.same("Compact", rpc_pb2.CompactionRequest(revision=1))
    both.same("Range", Range(key=b"r", revision=1))
    both.assert_serves()


GARBAGE = [
    b"\x00" * 100,
    os.urandom(4096),
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /etcdserverpb.KV/Put HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
    # A valid HTTP/2 preface followed by nonsense frames.
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\xff" * 64,
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x04\x01\x05\x00\x00\x00\x01" + b"\x00" * 4,
    b"",
]


def _spray(endpoint: str, payload: bytes) -> None:
    host, port = endpoint.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.settimeout(1.0)
        try:
            sock.sendall(payload)
            sock.recv(4096)
        except OSError:
            pass  # a reset or silence are both fine; only the server's survival matters


def test_garbage_bytes_on_raw_socket(both: Both, server_pair: ServerPair) -> None:
    for payload in GARBAGE:
        for target in (both.fastetcd, both.etcd):
            _spray(target.endpoint, payload)
            target.assert_serves()
    # Many connections at once that never speak, then vanish.
    socks = [socket.create_connection(("127.0.0.1", server_pair.subject.port)) for _ in range(50)]
    for s in socks:
        s.close()
    assert server_pair.subject.alive() and server_pair.oracle.alive()
    both.assert_serves()


def test_malformed_grpc_messages(both: Both) -> None:
    for payload in (b"\xff\xff\xff\xff", b"\x0a\x05ab", b"\x0a"):
        got, want = both.fastetcd.raw_call("/etcdserverpb.KV/Put", payload), \
            both.etcd.raw_call("/etcdserverpb.KV/Put", payload)
        assert want.code == "INTERNAL"
        assert got.code == want.code, f"payload {payload!r}: fastetcd {got} vs etcd {want}"
    for path in ("/etcdserverpb.KV/Nope", "/etcdserverpb.Nope/Put"):
        got, want = both.fastetcd.raw_call(path, b""), both.etcd.raw_call(path, b"")
        assert want.code == "UNIMPLEMENTED"
        assert got.code == want.code, f"{path}: fastetcd {got} vs etcd {want}"
    both.assert_serves()


def test_configured_limits_are_honoured(server_factory: ServerFactory, subject_kind: str) -> None:
    args = ["--max-txn-ops", "4", "--max-request-bytes", "4096"]
    subject = server_factory(subject_kind, "subject-limits", args)
    oracle = server_factory("etcd", "oracle-limits", args)
    b = Both(subject.endpoint, oracle.endpoint)
    try:
        ranges = [Op(request_range=Range(key=b"a"))]
        b.same("Txn", Txn(success=ranges * 5), TOO_MANY_OPS)
        b.same("Txn", Txn(compare=[rpc_pb2.Compare(key=b"a")] * 5), TOO_MANY_OPS)
        b.same("Txn", Txn(success=ranges * 4))
        b.same("Put", Put(key=b"k", value=b"x" * 4096), TOO_LARGE)
        b.same("Put", Put(key=b"k", value=b"x" * 3000))
        over_grpc = b.same("Put", Put(key=b"k", value=b"x" * (4096 + GRPC_OVERHEAD_BYTES + 1024)),
                           code_only=True)
        assert over_grpc.code == "RESOURCE_EXHAUSTED"
        b.assert_serves()
    finally:
        b.close()
