"""etcd 3.7's RangeStream read (etcdserver/v3_server.go ``rangeStream``), chunk by chunk from the core.

A RangeStream answers a RangeRequest as a sequence of chunks whose merge is the Range answer. etcd runs the
request as a loop of limited Ranges over the core's index: the first chunk reads at most 10 keys; each next
one starts after the previous chunk's last key and doubles or halves its key limit to land near
``--max-request-bytes`` (judged by the size of the chunk it just read, as etcd's ``adjustChunkLimit``);
the last chunk carries the header (the revision the stream started at), ``more`` and ``count`` (the keys
sent plus, when the client's limit cut the answer short, a count of the rest). A revision of 0 is pinned to
the store's revision when the stream starts, so writes during the stream are not seen; a compaction past
that revision fails the next chunk with etcd's "required revision has been compacted".

``RangeStreamReader`` reads one chunk per ``next()``, when the sender asks for it, so a stream holds one chunk
at a time and a client that stops reading stops the scan. Rules copied from etcd 3.7.3, quirks included:

- each chunk is etcd's Range without the total count (``txn.Range(..., withTotalCount=false)``): its size,
  which drives the next limit, counts a ``count`` of the keys the chunk read (at most limit + 1);
- keys_only chunks come from etcd's index alone, so their KeyValues carry no lease (unless the sort target is
  VALUE, which reads the values);
- a sort target other than KEY with sort order NONE passes the request check, and etcd sorts each chunk by
  that target (Go's pdqsort, ascending) before cutting it to the limit; the next chunk starts after the last
  key *of the sorted chunk*;
- a negative client limit reads everything in one chunk; only revision 0 is pinned (a negative revision
  reads each chunk at the then-current revision).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from fastetcd import errors
from fastetcd._core import encode_kv
from fastetcd.engine.apply import SORT_FIELDS
from fastetcd.engine.go_pdqsort import go_pdqsort
from fastetcd.engine.state_machine import StateMachine
from fastetcd.proto import rpc_pb2 as pb
from fastetcd.wire_size import varint_len

INITIAL_CHUNK_LIMIT = 10  # etcd's initialStreamChunkLimit
MAX_INT64 = (1 << 63) - 1

_KEY = pb.RangeRequest.KEY
_VALUE = pb.RangeRequest.VALUE
_NONE = pb.RangeRequest.NONE
_ASCEND = pb.RangeRequest.ASCEND

CUSTOM_SORT = errors.EtcdError("UNIMPLEMENTED", "RangeStream does not support custom sort orders")
REVISION_FILTERS = errors.EtcdError("UNIMPLEMENTED", "RangeStream does not support revision filters")


def check_range_stream(r: pb.RangeRequest) -> None:
    """etcd's checkRangeStreamRequest, after the Range checks: key order only, no revision filters."""
    if not (r.sort_order == _NONE or (r.sort_target == _KEY and r.sort_order == _ASCEND)):
        raise errors.EtcdError(CUSTOM_SORT.code, CUSTOM_SORT.message)
    if r.min_mod_revision or r.max_mod_revision or r.min_create_revision or r.max_create_revision:
        raise errors.EtcdError(REVISION_FILTERS.code, REVISION_FILTERS.message)


def adjust_chunk_limit(last_limit: int, last_size: int, target_size: int) -> int:
    """etcd's adjustChunkLimit: double below half the target size, halve above twice it; never below 1."""
    if last_size < target_size // 2:
        last_limit *= 2
    elif last_size > target_size * 2:
        last_limit //= 2
    return last_limit or 1


@dataclass(slots=True)
class Chunk:
    """One RangeStreamResponse: ``kvs`` (encoded mvccpb.KeyValue), and on the last chunk the rest."""

    kvs: list[bytes]
    last: bool
    more: bool = False
    count: int = 0
    header_rev: int = 0


def _kv_key(kv: bytes) -> bytes:
    """The key of an encoded KeyValue (field 1 comes first, and etcd never stores an empty key)."""
    n, shift, i = 0, 0, 1
    while True:
        b = kv[i]
        n |= (b & 0x7F) << shift
        i += 1
        if b < 0x80:
            return kv[i : i + n]
        shift += 7


class RangeStreamReader:
    """The chunks of one RangeStream, read lazily: ``next()`` reads the next chunk from the core."""

    def __init__(self, sm: StateMachine, r: pb.RangeRequest, max_request_bytes: int) -> None:
        self.sm = sm
        self.key, self.end, self.rev = r.key, r.range_end, r.revision
        self.keys_only, self.count_only = r.keys_only, r.count_only
        self.sort_field = None if r.sort_target == _KEY else SORT_FIELDS[r.sort_target]  # None: key order
        self.fast_keys_only = r.keys_only and r.sort_target != _VALUE
        self.target_size = max_request_bytes
        self.total_limit = r.limit or MAX_INT64
        self.limit = min(INITIAL_CHUNK_LIMIT, self.total_limit)
        self.sent = 0
        self.header_rev = 0
        self.done = False

    def __iter__(self) -> Iterator[Chunk]:
        return self

    def _read_rev(self, rev: int) -> int:
        """etcd's rangeKeys checks: the revision to read at, or its error."""
        cur = self.sm.committed_rev
        if rev > cur:
            raise errors.FUTURE_REV
        at = cur if rev <= 0 else rev
        if at < self.sm.core.compact_rev:
            raise errors.COMPACTED
        return at

    def __next__(self) -> Chunk:
        if self.done:
            raise StopIteration
        core = self.sm.core
        cur = self.sm.committed_rev
        at = self._read_rev(self.rev)
        if self.count_only:
            self.done = True
            return Chunk([], True, False, core.count(self.key, self.end, at), cur)
        limit = self.limit
        fetch = limit + 1 if 0 < limit < MAX_INT64 else limit
        f = self.sort_field
        if f is None:
            kvs = core.range_page(self.key, self.end, at, fetch, 1 if self.fast_keys_only else 0)
            read = len(kvs)
            more = 0 < limit < read
            if more:
                del kvs[limit:]
        else:
            items = core.range_page(self.key, self.end, at, fetch, 2)
            read = len(items)
            go_pdqsort(items, lambda a, b: f(a) < f(b))
            more = 0 < limit < read
            if more:
                del items[limit:]
            if not self.keys_only:
                kvs = [it.kv for it in items]
            else:
                no_lease = self.fast_keys_only  # read from the index alone: no lease, as etcd 3.7
                kvs = [
                    encode_kv(it.key, it.create_revision, it.mod_revision, it.version, b"",
                              0 if no_lease else it.lease)
                    for it in items
                ]
        if self.header_rev == 0:
            # The stream's revision: the store's when it started; a request for revision 0 reads there.
            self.header_rev = cur
            if self.rev == 0:
                self.rev = cur
        self.sent += len(kvs)
        next_key = _kv_key(kvs[-1]) + b"\x00" if more else b""
        if not more or self.sent == self.total_limit:
            self.done = True
            count = self.sent
            if more:
                count += core.count(next_key, self.end, self._read_rev(self.rev))
            return Chunk(kvs, True, more, count, self.header_rev)
        # The size of what etcd's txn.Range returned for this chunk: header{revision}, kvs, more, count.
        size = 2 + 1 + varint_len(cur) + sum(1 + varint_len(len(kv)) + len(kv) for kv in kvs)
        size += (2 if more else 0) + (1 + varint_len(read) if read else 0)
        self.key = next_key
        self.limit = min(adjust_chunk_limit(limit, size, self.target_size), self.total_limit - self.sent)
        return Chunk(kvs, False)
