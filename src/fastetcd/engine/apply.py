"""Applying KV requests to the MVCC core: etcd 3.5's ``applierV3backend``, rule for rule.

Everything here is synchronous and runs either in the single writer (writes, at the head revision) or
directly on the event loop (reads, at the committed revision). Checks that can fail run before the first
mutation, as in etcd, so a request either applies whole or not at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter

from fastetcd import errors, metrics
from fastetcd._core import MVCC, KeyVersion, encode_kv
from fastetcd.engine.go_sort import go_sort
from fastetcd.engine.lessor import Lessor
from fastetcd.proto import rpc_pb2 as pb

_NONE = pb.RangeRequest.NONE
_ASCEND = pb.RangeRequest.ASCEND
_KEY = pb.RangeRequest.KEY

# Sort target -> the KeyVersion field it sorts by (Range here, RangeStream in range_stream.py)
SORT_FIELDS = {
    pb.RangeRequest.KEY: attrgetter("key"),
    pb.RangeRequest.CREATE: attrgetter("create_revision"),
    pb.RangeRequest.MOD: attrgetter("mod_revision"),
    pb.RangeRequest.VERSION: attrgetter("version"),
    pb.RangeRequest.VALUE: attrgetter("value"),
}


@dataclass(slots=True)
class RangeResult:
    kvs: list[bytes]  # encoded mvccpb.KeyValue
    more: bool
    count: int
    rev: int  # header revision: the store's current revision, not the one read at


def range_kvs(core: MVCC, r: pb.RangeRequest, cur_rev: int) -> RangeResult:
    """etcd's Range at current revision ``cur_rev`` (errors: future revision, compacted)."""
    rev = r.revision
    if rev > cur_rev:
        raise errors.FUTURE_REV
    if rev <= 0:
        rev = cur_rev
    if rev < core.compact_rev:
        raise errors.COMPACTED
    if r.count_only:
        return RangeResult([], False, core.count(r.key, r.range_end, rev), cur_rev)
    filtered = r.min_mod_revision or r.max_mod_revision or r.min_create_revision or r.max_create_revision
    if r.sort_order == _NONE and r.sort_target == _KEY and not filtered:
        return _range_in_key_order(core, r, rev, cur_rev)
    return _range_sorted(core, r, rev, cur_rev, bool(filtered))


def _range_in_key_order(core: MVCC, r: pb.RangeRequest, rev: int, cur_rev: int) -> RangeResult:
    """The common Range: the core's encoded KeyValues as they are, in key order."""
    limit = r.limit
    # one more than the limit tells whether there is `more`
    kvs, count = core.range(r.key, r.range_end, rev, limit + 1 if limit > 0 else 0, r.keys_only)
    more = 0 < limit < len(kvs)
    if more:
        del kvs[limit:]
    return RangeResult(kvs, more, count, cur_rev)


def _range_sorted(core: MVCC, r: pb.RangeRequest, rev: int, cur_rev: int, filtered: bool) -> RangeResult:
    """A Range that sorts or filters: on KeyVersion records, encoded only at the end."""
    sort_order = r.sort_order
    limit = r.limit
    # etcd fetches everything to sort or filter; a non-key target with order NONE (below) is etcd's quirk:
    # it fetches one more than the limit in key order and sorts only those.
    fetch = 0 if (sort_order != _NONE or filtered) else (limit + 1 if limit > 0 else 0)
    items, count = core.range_items(r.key, r.range_end, rev, fetch)
    if filtered:
        items = [
            it
            for it in items
            if not (r.max_mod_revision and it.mod_revision > r.max_mod_revision)
            and not (r.min_mod_revision and it.mod_revision < r.min_mod_revision)
            and not (r.max_create_revision and it.create_revision > r.max_create_revision)
            and not (r.min_create_revision and it.create_revision < r.min_create_revision)
        ]
    if r.sort_target != _KEY and sort_order == _NONE:
        sort_order = _ASCEND  # etcd's quirk: a non-key target sorts ascending even with order NONE
    if sort_order != _NONE:
        f = SORT_FIELDS[r.sort_target]
        if sort_order == _ASCEND:
            go_sort(items, lambda a, b: f(a) < f(b))
        else:
            go_sort(items, lambda a, b: f(b) < f(a))
    more = 0 < limit < len(items)
    if more:
        del items[limit:]
    if r.keys_only:
        kvs = [
            encode_kv(it.key, it.create_revision, it.mod_revision, it.version, b"", it.lease) for it in items
        ]
    else:
        kvs = [it.kv for it in items]
    return RangeResult(kvs, more, count, cur_rev)


@dataclass(slots=True)
class PutResult:
    """A Put applied for a decoded request (server/_wire.pyx's PutArgs), for the server to encode."""

    rev: int  # header revision
    prev_kv: bytes | None  # encoded mvccpb.KeyValue, if asked for and the key existed


@dataclass(slots=True)
class DeleteResult:
    """A DeleteRange applied inside a decoded Txn."""

    rev: int
    deleted: int
    prev_kvs: list[bytes]  # encoded mvccpb.KeyValues, if asked for


@dataclass(slots=True)
class TxnResult:
    """A Txn applied for a decoded request (server/_wire.pyx's TxnArgs): one result per op of the branch
    taken, in order, for the server to encode. Decoded txns never nest."""

    rev: int
    succeeded: bool
    responses: list[RangeResult | PutResult | DeleteResult]


class WriteTxn:
    """One write request being applied at revision ``core.rev + 1`` (etcd's storeTxnWrite).

    It also keeps lease attachments in step with the keys it writes and deletes. (Not to be confused with
    the single writer task in state_machine.py, which runs many of these per batch.)
    """

    __slots__ = ("core", "lessor", "begin", "rev", "sub")

    def __init__(self, core: MVCC, lessor: Lessor) -> None:
        self.core = core
        self.lessor = lessor
        self.begin = core.rev
        self.rev = self.begin + 1
        self.sub = 0

    def current_rev(self) -> int:
        """etcd's storeTxnWrite.Rev(): ``rev`` once this write changed a key, else the revision before it.

        Reads inside the write see its own earlier changes at this revision, and it is the header revision
        the response reports (a delete that matched nothing reports the unchanged revision).
        """
        return self.rev if self.sub else self.begin

    def put(self, key: bytes, value: bytes, lease: int) -> int:
        old = self.core.lease_of(key, self.current_rev())
        self.core.put(key, value, lease, self.rev, self.sub)
        self.sub += 1
        metrics.MVCC_PUT.n += 1
        if old != lease:
            if old:
                self.lessor.detach(old, key)
            if lease:
                self.lessor.attach(lease, key)
        return self.rev

    def delete_range(self, key: bytes, end: bytes) -> tuple[int, int]:
        """(number deleted, header revision) like storeTxnWrite.DeleteRange."""
        leased: list[tuple[bytes, int]] = []
        n = len(self.core.delete_range(key, end, self.rev, self.sub, leased))
        self.sub += n
        for k, lease in leased:
            self.lessor.detach(lease, k)
        return n, self.current_rev()


def _header(rev: int) -> pb.ResponseHeader:
    return pb.ResponseHeader(revision=rev)


class Applier:
    """Applies Put / DeleteRange / Txn and lease operations to the core and the lessor."""

    def __init__(self, core: MVCC, lessor: Lessor) -> None:
        self.core = core
        self.lessor = lessor

    # -------------------------------------------------------------- writes

    # Requests come as protobuf messages (answered with messages) or as the server's decoded requests
    # (server/_wire.pyx: the same field names, answered with the *Result records above, which the server
    # encodes without building messages). Both run the same rules, in _put_kv and _delete_kv.

    def put(self, p: pb.PutRequest) -> pb.PutResponse | PutResult:
        if p.lease and not self.lessor.exists(p.lease):
            raise errors.LEASE_NOT_FOUND
        w = WriteTxn(self.core, self.lessor)
        if type(p) is pb.PutRequest:
            return self._put(w, p)
        return self._put_kv(w, p)

    def _put(self, w: WriteTxn, p: pb.PutRequest) -> pb.PutResponse:
        res = self._put_kv(w, p)
        resp = pb.PutResponse(header=pb.ResponseHeader(revision=res.rev))
        if res.prev_kv is not None:
            resp.prev_kv.MergeFromString(res.prev_kv)
        return resp

    def _put_kv(self, w: WriteTxn, p: pb.PutRequest) -> PutResult:
        value, lease = p.value, p.lease
        prev = None
        if p.ignore_value or p.ignore_lease or p.prev_kv:
            prev = self.core.get(p.key, w.current_rev())
        if p.ignore_value or p.ignore_lease:
            if prev is None:
                raise errors.KEY_NOT_FOUND
            if p.ignore_value:
                value = prev.value
            if p.ignore_lease:
                lease = prev.lease
        prev_kv = prev.kv if p.prev_kv and prev is not None else None
        return PutResult(w.put(p.key, value, lease), prev_kv)

    def delete_range(self, d: pb.DeleteRangeRequest) -> pb.DeleteRangeResponse:
        return self._delete_range(WriteTxn(self.core, self.lessor), d)

    def _delete_range(self, w: WriteTxn, d: pb.DeleteRangeRequest) -> pb.DeleteRangeResponse:
        res = self._delete_kv(w, d)
        resp = pb.DeleteRangeResponse(header=pb.ResponseHeader(revision=res.rev), deleted=res.deleted)
        for kv in res.prev_kvs:
            resp.prev_kvs.add().MergeFromString(kv)
        return resp

    def _delete_kv(self, w: WriteTxn, d: pb.DeleteRangeRequest) -> DeleteResult:
        prev_kvs: list[bytes] = []
        if d.prev_kv:
            prev_kvs, _ = self.core.range(d.key, d.range_end, w.current_rev(), 0, False)
        deleted, rev = w.delete_range(d.key, d.range_end)
        return DeleteResult(rev, deleted, prev_kvs)

    # -------------------------------------------------------------- leases

    def lease_grant(self, r: pb.LeaseGrantRequest) -> pb.LeaseGrantResponse:
        lease = self.lessor.grant(r.ID, r.TTL)
        return pb.LeaseGrantResponse(header=_header(self.core.rev), ID=lease.id, TTL=lease.ttl)

    def lease_revoke(
        self, r: pb.LeaseRevokeRequest, *, only_if_expired: bool = False
    ) -> pb.LeaseRevokeResponse:
        """Delete the lease's keys (sorted, in one revision) and the lease itself."""
        lease = self.lessor.get(r.ID)
        if lease is None:
            raise errors.LEASE_NOT_FOUND
        if only_if_expired and lease.remaining(self.lessor.clock()) > 0:
            return pb.LeaseRevokeResponse(header=_header(self.core.rev))  # renewed while queued
        w = WriteTxn(self.core, self.lessor)
        for key in sorted(lease.keys):
            self.core.delete(key, w.rev, w.sub)
            w.sub += 1
        self.lessor.revoke(r.ID)
        return pb.LeaseRevokeResponse(header=_header(w.current_rev()))

    def lease_checkpoint(self, checkpoints: list[tuple[int, int]]) -> None:
        for lease_id, remaining in checkpoints:
            self.lessor.set_checkpoint(lease_id, remaining)

    # -------------------------------------------------------------- txn

    def txn(self, t: pb.TxnRequest, read_rev: int | None = None) -> pb.TxnResponse | TxnResult:
        """Apply a Txn. ``read_rev`` is given for read-only txns served at the committed revision."""
        if type(t) is not pb.TxnRequest:
            return self._txn_decoded(t, read_rev)
        core = self.core
        view = core.rev if read_rev is None else read_rev
        path = self._compare_to_path(t, view)
        write = not is_txn_readonly(t)
        if write:
            self._check_requests(t, path, 0, self._check_put, view)
        self._check_requests(t, path, 0, self._check_range, view)
        if write:
            w = WriteTxn(core, self.lessor)
            resp, _ = self._apply_txn(w, t, path, 0, view)
            resp.header.revision = w.current_rev()
        else:
            resp, _ = self._apply_txn(None, t, path, 0, view)
            resp.header.revision = view
        return resp

    def _txn_decoded(self, t, read_rev: int | None) -> TxnResult:
        """``txn`` for a decoded request (server/_wire.pyx's TxnArgs): the same steps, in the same order, for
        a txn that does not nest (so its path is the one compare outcome), with results for the server to
        encode instead of messages."""
        core = self.core
        view = core.rev if read_rev is None else read_rev
        ok = True
        for c in t.compare:
            if not self._compare(c, view):
                ok = False
                break
        ops = t.success if ok else t.failure
        write = not t.readonly
        if write:
            for op in ops:
                self._check_put(op, view)
        for op in ops:
            self._check_range(op, view)
        w = WriteTxn(core, self.lessor) if write else None
        results: list[RangeResult | PutResult | DeleteResult] = []
        for op in ops:
            kind = op.kind
            if kind == "request_put":
                results.append(self._put_kv(w, op.request_put))
            elif kind == "request_range":
                results.append(range_kvs(core, op.request_range, w.current_rev() if w is not None else view))
            else:
                results.append(self._delete_kv(w, op.request_delete_range))
        return TxnResult(w.current_rev() if w is not None else view, ok, results)

    def _compare(self, c: pb.Compare, view: int) -> bool:
        items, _ = self.core.range_items(c.key, c.range_end, view, 0)
        target = c.target
        if not items:
            if target == pb.Compare.VALUE:
                return False  # etcd: a missing key never equals any value
            return _compare_kv(c, None)
        return all(_compare_kv(c, it) for it in items)

    def _compare_to_path(self, t: pb.TxnRequest, view: int) -> list[bool]:
        ok = all(self._compare(c, view) for c in t.compare)
        path = [ok]
        for op in t.success if ok else t.failure:
            if op.WhichOneof("request") == "request_txn":
                path.extend(self._compare_to_path(op.request_txn, view))
        return path

    def _check_requests(self, t: pb.TxnRequest, path: list[bool], i: int, check, view: int) -> int:
        """Run ``check`` on every op of the branch ``path`` chooses; returns how many path slots it used."""
        used = 1
        for op in t.success if path[i] else t.failure:
            if op.WhichOneof("request") == "request_txn":
                used += self._check_requests(op.request_txn, path, i + used, check, view)
            else:
                check(op, view)
        return used

    def _check_put(self, op: pb.RequestOp, view: int) -> None:
        if op.WhichOneof("request") != "request_put":
            return
        p = op.request_put
        if (p.ignore_value or p.ignore_lease) and self.core.get(p.key, view) is None:
            raise errors.KEY_NOT_FOUND
        if p.lease and not self.lessor.exists(p.lease):
            raise errors.LEASE_NOT_FOUND

    def _check_range(self, op: pb.RequestOp, view: int) -> None:
        if op.WhichOneof("request") != "request_range":
            return
        rev = op.request_range.revision
        if rev == 0:
            return
        if rev > view:
            raise errors.FUTURE_REV
        if rev < self.core.compact_rev:
            raise errors.COMPACTED

    def _apply_txn(
        self, w: WriteTxn | None, t: pb.TxnRequest, path: list[bool], i: int, view: int
    ) -> tuple[pb.TxnResponse, int]:
        ok = path[i]
        used = 1
        resp = pb.TxnResponse(header=pb.ResponseHeader(), succeeded=ok)
        for op in t.success if ok else t.failure:
            kind = op.WhichOneof("request")
            out = resp.responses.add()
            if kind == "request_range":
                cur = w.current_rev() if w is not None else view
                rr = range_kvs(self.core, op.request_range, cur)
                rresp = out.response_range
                rresp.header.revision = rr.rev
                for kv in rr.kvs:
                    rresp.kvs.add().MergeFromString(kv)
                rresp.more = rr.more
                rresp.count = rr.count
            elif kind == "request_put":
                out.response_put.CopyFrom(self._put(w, op.request_put))
            elif kind == "request_delete_range":
                out.response_delete_range.CopyFrom(self._delete_range(w, op.request_delete_range))
            elif kind == "request_txn":
                sub, n = self._apply_txn(w, op.request_txn, path, i + used, view)
                out.response_txn.CopyFrom(sub)
                used += n
        return resp, used


# Compare target -> its field, named alike in KeyVersion and in target_union, and the value of an absent key
_COMPARE_TARGET = {
    pb.Compare.VALUE: ("value", b""),
    pb.Compare.CREATE: ("create_revision", 0),
    pb.Compare.MOD: ("mod_revision", 0),
    pb.Compare.VERSION: ("version", 0),
    pb.Compare.LEASE: ("lease", 0),
}


def _compare_kv(c: pb.Compare, item: KeyVersion | None) -> bool:
    spec = _COMPARE_TARGET.get(c.target)
    if spec is None:
        return True
    field, zero = spec
    mine = getattr(item, field) if item else zero
    # a target_union naming another field compares against zero, as etcd's type switch does
    theirs = getattr(c, field) if c.WhichOneof("target_union") == field else zero
    result = c.result
    if result == pb.Compare.EQUAL:
        return mine == theirs
    if result == pb.Compare.NOT_EQUAL:
        return mine != theirs
    if result == pb.Compare.GREATER:
        return mine > theirs
    if result == pb.Compare.LESS:
        return mine < theirs
    return True


def is_txn_readonly(t: pb.TxnRequest) -> bool:
    """etcd's isTxnReadonly: only Range ops in either branch (a nested txn counts as a write)."""
    for op in t.success:
        if op.WhichOneof("request") != "request_range":
            return False
    for op in t.failure:
        if op.WhichOneof("request") != "request_range":
            return False
    return True
