"""The KV service (etcdserverpb.KV), transport-neutral: request bytes in, response bytes out.

Validation follows etcd's v3rpc/key.go (the checks that run before a request reaches the state machine);
the apply rules live in engine/apply.py, the permission rules in engine/auth_store.py. Permissions are
checked where etcd checks them (a read before it is served, a write before it is applied: the auth
revision they were checked at goes with the write, and an auth change in between fails it).
"""

from __future__ import annotations

import asyncio

from fastetcd import errors
from fastetcd.engine.apply import PutResult, RangeResult, TxnResult, is_txn_readonly
from fastetcd.engine.auth_store import AuthStore
from fastetcd.engine.auth_tokens import AuthInfo
from fastetcd.engine.lessor import LeaseStatus
from fastetcd.engine.state_machine import StateMachine
from fastetcd.proto import rpc_pb2 as pb
from fastetcd.server._wire import (
    REQUEST_PUT,
    REQUEST_RANGE,
    TxnArgs,
    decode_put_request,
    decode_range_request,
    decode_txn_request,
    encode_delete_range_response,
    encode_header,
    encode_put_response,
    encode_range_response,
    encode_response_op,
    encode_txn_response,
)
from fastetcd.server.header import Header
from fastetcd.server.range_stream import first_request, send_range_stream
from fastetcd.server.service import auth_info, may_read
from fastetcd.wire_size import varint_len

_SORT_ORDERS = frozenset(pb.RangeRequest.SortOrder.values())
_SORT_TARGETS = frozenset(pb.RangeRequest.SortTarget.values())


class KVService:
    def __init__(self, sm: StateMachine, header: Header, *, max_request_bytes: int, max_txn_ops: int) -> None:
        self.sm = sm
        self.header = header
        self.max_request_bytes = max_request_bytes
        self.max_txn_ops = max_txn_ops

    def _check_size(self, raw: bytes) -> None:
        check_request_size(len(raw), self.max_request_bytes)

    # Range, Put, DeleteRange and Txn are routed as DIRECT handlers (routes.py): no coroutine per call. A
    # write's answer is the engine's own future, resolved with the encoded response (its ``encode``).

    def range(self, raw: bytes) -> bytes:
        # The C decoder takes canonical messages; protobuf decides everything else, errors included.
        r = decode_range_request(raw) or pb.RangeRequest.FromString(raw)
        check_range(r)
        may_read(self.sm.auth, r.key, r.range_end)
        rr = self.sm.range(r)
        return encode_range_response(self.header.encode(rr.rev), rr.kvs, rr.more, rr.count)

    async def range_stream(self, requests, send) -> None:
        """etcd 3.7's KV.RangeStream (server-streaming, routed as a bidi stream): server/range_stream.py."""
        r = pb.RangeRequest.FromString(await first_request(requests))
        check_range(r)
        may_read(self.sm.auth, r.key, r.range_end)
        await send_range_stream(self.sm, self.header, self.max_request_bytes, r, send)

    def put(self, raw: bytes) -> asyncio.Future[bytes]:
        r = decode_put_request(raw) or pb.PutRequest.FromString(raw)
        check_put(r)
        auth_rev = self._authorize(raw, r, self._may_put)
        return self.sm.put_nowait(r, auth_rev, self._encode)

    def delete_range(self, raw: bytes) -> asyncio.Future[bytes]:
        r = pb.DeleteRangeRequest.FromString(raw)
        check_delete(r)
        auth_rev = self._authorize(raw, r, self._may_delete)
        return self.sm.delete_range_nowait(r, auth_rev, self._encode)

    def _authorize(self, raw: bytes, r, may) -> int:
        """etcd's order for a write after its request checks: the caller's token, the size limit, then
        permissions. Returns the auth revision they were checked at (0: auth is off)."""
        auth = self.sm.auth
        info = auth_info(auth)
        self._check_size(raw)
        if not auth.enabled:
            return 0
        may(info, r)
        return info.revision if info is not None else 0

    def _may_put(self, info: AuthInfo | None, r: pb.PutRequest) -> None:
        """etcd's authApplierV3.Put: write on the key; write on every key of the lease it attaches (else
        this user could attach a key to a lease it cannot revoke); read on the key for prev_kv."""
        auth = self.sm.auth
        auth.is_put_permitted(info, r.key)
        if r.lease:
            check_lease_puts(auth, info, self.sm.lease_status(r.lease))
        if r.prev_kv:
            auth.is_range_permitted(info, r.key, b"")

    def _may_delete(self, info: AuthInfo | None, r: pb.DeleteRangeRequest) -> None:
        auth = self.sm.auth
        auth.is_delete_permitted(info, r.key, r.range_end)
        if r.prev_kv:
            auth.is_range_permitted(info, r.key, r.range_end)

    def txn(self, raw: bytes) -> bytes | asyncio.Future[bytes]:
        r = decode_txn_request(raw)
        if r is not None:
            check_flat_txn(r, self.max_txn_ops)
        else:
            r = pb.TxnRequest.FromString(raw)
            check_txn(r, self.max_txn_ops)
            check_intervals(r.success)
            check_intervals(r.failure)
        auth = self.sm.auth
        info = auth_info(auth)
        if is_txn_readonly(r):
            if auth.enabled:
                auth.check_txn(info, r)
            return self._encode(self.sm.txn_readonly(r))
        self._check_size(raw)
        if auth.enabled:
            auth.check_txn(info, r)
        return self.sm.txn_nowait(r, info.revision if info is not None and auth.enabled else 0, self._encode)

    def _encode(self, resp) -> bytes:
        """A response serialized with etcd's header (the revision the apply set, or none)."""
        kind = type(resp)
        if kind is PutResult:
            return encode_put_response(self.header.encode(resp.rev), resp.prev_kv)
        if kind is TxnResult:
            return encode_txn_response(self.header.encode(resp.rev), resp.succeeded, _response_ops(resp))
        self.header.fill(resp.header)
        return resp.SerializeToString()

    async def compact(self, raw: bytes) -> bytes:
        r = pb.CompactionRequest.FromString(raw)
        auth_info(self.sm.auth)  # etcd checks the token only: any user may compact
        self._check_size(raw)
        rev = await self.sm.compact(r.revision)
        return self._encode(pb.CompactionResponse(header=pb.ResponseHeader(revision=rev)))


def _response_ops(t: TxnResult) -> list[bytes]:
    """A decoded txn's ResponseOps. Their headers carry the revision only: etcd fills in the ids and the
    term on the outer header alone."""
    out = []
    for r in t.responses:
        inner = encode_header(0, 0, r.rev, 0)
        if type(r) is PutResult:
            out.append(encode_response_op(2, encode_put_response(inner, r.prev_kv)))
        elif type(r) is RangeResult:
            out.append(encode_response_op(1, encode_range_response(inner, r.kvs, r.more, r.count)))
        else:
            out.append(encode_response_op(3, encode_delete_range_response(inner, r.deleted, r.prev_kvs)))
    return out


def check_lease_puts(auth: AuthStore, info: AuthInfo | None, lease: LeaseStatus | None) -> None:
    """etcd's checkLeasePuts: write on every key attached to ``lease`` (a LeaseStatus, or None)."""
    if lease is not None:
        for key in lease.keys:
            auth.is_put_permitted(info, key)


# ------------------------------------------------------------------ etcd's request checks (v3rpc/key.go)


def check_request_size(size: int, max_request_bytes: int) -> None:
    """etcd's --max-request-bytes on a write of ``size`` bytes, measured as etcd measures it: wrapped in its
    raft envelope (InternalRaftRequest: a ~12-byte header with the request id, plus the tag and length)."""
    if size + 13 + varint_len(size) > max_request_bytes:
        raise errors.REQUEST_TOO_LARGE


def check_range(r: pb.RangeRequest) -> None:
    if not r.key:
        raise errors.EMPTY_KEY
    if r.sort_order not in _SORT_ORDERS or r.sort_target not in _SORT_TARGETS:
        raise errors.INVALID_SORT_OPTION


def check_put(r: pb.PutRequest) -> None:
    if not r.key:
        raise errors.EMPTY_KEY
    if r.ignore_value and r.value:
        raise errors.VALUE_PROVIDED
    if r.ignore_lease and r.lease:
        raise errors.LEASE_PROVIDED


def check_delete(r: pb.DeleteRangeRequest) -> None:
    if not r.key:
        raise errors.EMPTY_KEY


def check_txn(r: pb.TxnRequest, max_txn_ops: int) -> None:
    opc = max(len(r.compare), len(r.success), len(r.failure))
    if opc > max_txn_ops:
        raise errors.TOO_MANY_OPS
    for c in r.compare:
        if not c.key:
            raise errors.EMPTY_KEY
    for op in r.success:
        _check_op(op, max_txn_ops - opc)
    for op in r.failure:
        _check_op(op, max_txn_ops - opc)


def check_flat_txn(r: TxnArgs, max_txn_ops: int) -> None:
    """check_txn, then check_intervals on each branch, for a decoded txn (which never nests): the same
    errors in the same order, without the generic walk."""
    opc = max(len(r.compare), len(r.success), len(r.failure))
    if opc > max_txn_ops:
        raise errors.TOO_MANY_OPS
    for c in r.compare:
        if not c.key:
            raise errors.EMPTY_KEY
    for ops in (r.success, r.failure):
        for op in ops:
            kind = op.kind
            if kind is REQUEST_PUT:
                check_put(op.request_put)
            elif kind is REQUEST_RANGE:
                check_range(op.request_range)
            else:
                check_delete(op.request_delete_range)
    # one op cannot conflict with itself
    if len(r.success) > 1:
        check_intervals(r.success)
    if len(r.failure) > 1:
        check_intervals(r.failure)


def _check_op(op: pb.RequestOp, max_txn_ops: int) -> None:
    kind = op.WhichOneof("request")
    if kind == "request_range":
        check_range(op.request_range)
    elif kind == "request_put":
        check_put(op.request_put)
    elif kind == "request_delete_range":
        check_delete(op.request_delete_range)
    elif kind == "request_txn":
        check_txn(op.request_txn, max_txn_ops)
    else:
        raise errors.KEY_NOT_FOUND  # etcd's answer to an empty RequestOp


def _overlaps(dels: list[tuple[bytes, bytes]], k: bytes) -> bool:
    # etcd's interval tree with string-affine intervals: a point k is [k, k+"\0"); a delete is
    # [key, range_end) compared as strings (so a "\0" range_end is an empty interval, as in etcd).
    kend = k + b"\x00"
    return any(lo < kend and k < hi for lo, hi in dels)


def check_intervals(reqs) -> tuple[set[bytes], list[tuple[bytes, bytes]]]:
    """etcd's checkIntervals: no key may be put twice, or put and deleted, in one branch of a txn.
    Returns what the branch puts and deletes, which an enclosing txn checks against its own ops."""
    if len(reqs) == 1:  # the common branch: one op cannot conflict with itself
        op = reqs[0]
        kind = op.WhichOneof("request")
        if kind == "request_put":
            return {op.request_put.key}, []
        if kind == "request_delete_range":
            d = op.request_delete_range
            return set(), [(d.key, d.range_end) if d.range_end else (d.key, d.key + b"\x00")]
        if kind != "request_txn":
            return set(), []
    dels: list[tuple[bytes, bytes]] = []
    for op in reqs:
        if op.WhichOneof("request") != "request_delete_range":
            continue
        d = op.request_delete_range
        dels.append((d.key, d.range_end) if d.range_end else (d.key, d.key + b"\x00"))
    puts: set[bytes] = set()
    for op in reqs:
        if op.WhichOneof("request") != "request_txn":
            continue
        puts_then, dels_then = check_intervals(op.request_txn.success)
        puts_else, dels_else = check_intervals(op.request_txn.failure)
        for k in puts_then:
            if k in puts or _overlaps(dels, k):
                raise errors.DUPLICATE_KEY
            puts.add(k)
        for k in puts_else:
            if k in puts and k not in puts_then:
                raise errors.DUPLICATE_KEY
            if _overlaps(dels, k):
                raise errors.DUPLICATE_KEY
            puts.add(k)
        dels.extend(dels_then)
        dels.extend(dels_else)
    for op in reqs:
        if op.WhichOneof("request") != "request_put":
            continue
        k = op.request_put.key
        if k in puts or _overlaps(dels, k):
            raise errors.DUPLICATE_KEY
        puts.add(k)
    return puts, dels
