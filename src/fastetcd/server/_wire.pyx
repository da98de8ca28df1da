# cython: language_level=3
"""The server's response encoders: etcdserverpb messages built around payloads that are already encoded.

KeyValues come from the MVCC core and Events from the watch hub as bytes; a response only wraps them, so each
payload is copied once, into the answer, and no protobuf object is built. The output is byte-identical to
Go's encoder (fields in number order, zero scalars omitted), which the property tests check.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport int32_t, int64_t, uint64_t

from fastetcd._pb cimport (field_bytes_len, field_varint_len, message_len, put_field_bytes, put_field_varint,
                           put_message)


cdef Py_ssize_t _repeated_len(list items):
    cdef Py_ssize_t i, size = 0
    for i in range(len(items)):
        size += message_len(PyBytes_GET_SIZE(<bytes>items[i]))
    return size


cdef char* _put_repeated(char* p, char tag, list items):
    cdef Py_ssize_t i
    cdef bytes item
    for i in range(len(items)):
        item = <bytes>items[i]
        p = put_message(p, tag, PyBytes_AS_STRING(item), PyBytes_GET_SIZE(item))
    return p


def encode_header(uint64_t cluster_id, uint64_t member_id, int64_t revision, uint64_t raft_term):
    """Encode an etcdserverpb.ResponseHeader."""
    cdef Py_ssize_t size = (field_varint_len(cluster_id) + field_varint_len(member_id)
                            + field_varint_len(<uint64_t>revision) + field_varint_len(raft_term))
    cdef object out = PyBytes_FromStringAndSize(NULL, size)
    cdef char* p = PyBytes_AS_STRING(out)
    p = put_field_varint(p, 0x08, cluster_id)
    p = put_field_varint(p, 0x10, member_id)
    p = put_field_varint(p, 0x18, <uint64_t>revision)
    put_field_varint(p, 0x20, raft_term)
    return out


def encode_range_response(bytes header, list kvs, bint more, int64_t count):
    """Encode an etcdserverpb.RangeResponse around encoded KeyValues."""
    cdef Py_ssize_t hl = PyBytes_GET_SIZE(header)
    cdef Py_ssize_t size = (message_len(hl) + _repeated_len(kvs) + field_varint_len(more)
                            + field_varint_len(<uint64_t>count))
    cdef object out = PyBytes_FromStringAndSize(NULL, size)
    cdef char* p = PyBytes_AS_STRING(out)
    p = put_message(p, 0x0a, PyBytes_AS_STRING(header), hl)
    p = _put_repeated(p, 0x12, kvs)
    p = put_field_varint(p, 0x18, more)
    put_field_varint(p, 0x20, <uint64_t>count)
    return out


def encode_watch_response(bytes header, int64_t watch_id, list events, bint created=False,
                          bint canceled=False, int64_t compact_revision=0, str cancel_reason="",
                          bint fragment=False):
    """Encode an etcdserverpb.WatchResponse around encoded Events."""
    cdef bytes reason = cancel_reason.encode()
    cdef Py_ssize_t hl = PyBytes_GET_SIZE(header), rl = PyBytes_GET_SIZE(reason)
    cdef Py_ssize_t size = (message_len(hl) + field_varint_len(<uint64_t>watch_id)
                            + field_varint_len(created) + field_varint_len(canceled)
                            + field_varint_len(<uint64_t>compact_revision) + field_bytes_len(rl)
                            + field_varint_len(fragment) + _repeated_len(events))
    cdef object out = PyBytes_FromStringAndSize(NULL, size)
    cdef char* p = PyBytes_AS_STRING(out)
    # Go sends the header even when every field in it is zero
    p = put_message(p, 0x0a, PyBytes_AS_STRING(header), hl)
    p = put_field_varint(p, 0x10, <uint64_t>watch_id)
    p = put_field_varint(p, 0x18, created)
    p = put_field_varint(p, 0x20, canceled)
    p = put_field_varint(p, 0x28, <uint64_t>compact_revision)
    p = put_field_bytes(p, 0x32, PyBytes_AS_STRING(reason), rl)
    p = put_field_varint(p, 0x38, fragment)
    _put_repeated(p, 0x5a, events)
    return out


# ---- RangeRequest, decoded without a protobuf object (the hot read path)

cdef class RangeArgs:
    """A decoded etcdserverpb.RangeRequest: the fields under RangeRequest's names, so the request checks
    and the engine's read path take it where they take the protobuf message."""
    cdef readonly bytes key, range_end
    cdef readonly int64_t limit, revision
    cdef readonly int sort_order, sort_target
    cdef readonly bint serializable, keys_only, count_only
    cdef readonly int64_t min_mod_revision, max_mod_revision, min_create_revision, max_create_revision


cdef inline const unsigned char* _read_varint(const unsigned char* p, const unsigned char* end,
                                              uint64_t* out) noexcept nogil:
    """The varint at p into *out; the position after it, or NULL if it is truncated or over 10 bytes."""
    cdef uint64_t v = 0
    cdef int shift = 0
    while p < end and shift < 70:
        if shift == 63 and p[0] > 1:
            return NULL  # bits past 64: let protobuf decide
        v |= <uint64_t>(p[0] & 0x7F) << shift
        if not (p[0] & 0x80):
            out[0] = v
            return p + 1
        p += 1
        shift += 7
    return NULL


cdef object _decode_range(const unsigned char* p, const unsigned char* end):
    """The RangeRequest in [p, end) as RangeArgs, or None (see decode_range_request)."""
    cdef uint64_t tag, v, n
    cdef int field, wire
    cdef RangeArgs r = RangeArgs.__new__(RangeArgs)
    r.key = b""
    r.range_end = b""
    while p < end:
        p = _read_varint(p, end, &tag)
        if p == NULL or tag > 0xFFFFFFFF:
            return None
        field = <int>(tag >> 3)
        wire = <int>(tag & 7)
        if field == 0 or field > 536870911:
            return None
        if wire == 2:
            p = _read_varint(p, end, &n)
            if p == NULL or n > <uint64_t>(end - p):
                return None
            if field == 1:
                r.key = PyBytes_FromStringAndSize(<const char*>p, <Py_ssize_t>n)
            elif field == 2:
                r.range_end = PyBytes_FromStringAndSize(<const char*>p, <Py_ssize_t>n)
            elif field <= 13:
                return None
            p += n
        elif wire == 0:
            p = _read_varint(p, end, &v)
            if p == NULL:
                return None
            if field == 3:
                r.limit = <int64_t>v
            elif field == 4:
                r.revision = <int64_t>v
            elif field == 5:
                r.sort_order = <int>(<int32_t>v)  # protobuf keeps an enum's low 32 bits
            elif field == 6:
                r.sort_target = <int>(<int32_t>v)
            elif field == 7:
                r.serializable = v != 0
            elif field == 8:
                r.keys_only = v != 0
            elif field == 9:
                r.count_only = v != 0
            elif field == 10:
                r.min_mod_revision = <int64_t>v
            elif field == 11:
                r.max_mod_revision = <int64_t>v
            elif field == 12:
                r.min_create_revision = <int64_t>v
            elif field == 13:
                r.max_create_revision = <int64_t>v
        elif (wire == 1 or wire == 5) and field > 13:
            n = 8 if wire == 1 else 4
            if n > <uint64_t>(end - p):
                return None
            p += n
        else:
            return None
    return r


def decode_range_request(bytes raw):
    """``raw`` as RangeArgs, or None where anything is unusual (a malformed message, a known field with
    another wire type, groups): the caller then parses with protobuf, which gives the answer and the
    error grpc-go's etcd gives. So this fast path never decides an edge case by itself."""
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(raw)
    return _decode_range(p, p + PyBytes_GET_SIZE(raw))


# ---- PutRequest, DeleteRangeRequest and flat TxnRequests, decoded without protobuf objects (the write path)
#
# Same contract as decode_range_request: a canonical message decodes, anything else (malformed, a known
# field with another wire type, groups, a oneof set twice, a nested txn, an empty RequestOp) gives None and
# the caller parses with protobuf, so every edge case and every error stays protobuf's. The classes carry
# the protobuf messages' field names (and WhichOneof / HasField where the engine asks them), so the request
# checks and the engine take them where they take the messages.

cdef class PutArgs:
    """A decoded etcdserverpb.PutRequest."""
    cdef readonly bytes key, value
    cdef readonly int64_t lease
    cdef readonly bint prev_kv, ignore_value, ignore_lease


cdef class DeleteRangeArgs:
    """A decoded etcdserverpb.DeleteRangeRequest."""
    cdef readonly bytes key, range_end
    cdef readonly bint prev_kv


cdef class CompareArgs:
    """A decoded etcdserverpb.Compare; ``WhichOneof("target_union")`` names the target field that was set."""
    cdef readonly int result, target
    cdef readonly bytes key, range_end, value
    cdef readonly int64_t version, create_revision, mod_revision, lease
    cdef object union

    def WhichOneof(self, name):
        return self.union


# RequestOp's oneof names, as WhichOneof("request") returns them (interned: compared by identity too)
REQUEST_RANGE = "request_range"
REQUEST_PUT = "request_put"
REQUEST_DELETE_RANGE = "request_delete_range"
_COMPARE_UNION = (None, None, None, None, "version", "create_revision", "mod_revision", "value", "lease")


cdef class RequestOpArgs:
    """A decoded etcdserverpb.RequestOp holding a range, a put or a delete (never a nested txn)."""
    cdef readonly str kind  # the oneof's field name
    cdef readonly object request_range, request_put, request_delete_range
    cdef readonly object request_txn  # always None: a nested txn goes to protobuf

    def WhichOneof(self, name):
        return self.kind

    def HasField(self, name):
        return self.kind == name


cdef class TxnArgs:
    """A decoded etcdserverpb.TxnRequest without nested txns. ``readonly``: only ranges in both branches
    (etcd's isTxnReadonly)."""
    cdef readonly list compare, success, failure
    cdef readonly bint readonly


cdef inline const unsigned char* _skip(const unsigned char* p, const unsigned char* end, int wire):
    """Past an unknown field's value; NULL if it is truncated or a group (protobuf decides those)."""
    cdef uint64_t n
    if wire == 0:
        return _read_varint(p, end, &n)
    if wire == 2:
        p = _read_varint(p, end, &n)
        if p == NULL or n > <uint64_t>(end - p):
            return NULL
        return p + n
    if wire == 1 or wire == 5:
        n = 8 if wire == 1 else 4
        if n > <uint64_t>(end - p):
            return NULL
        return p + n
    return NULL


cdef inline const unsigned char* _tag(const unsigned char* p, const unsigned char* end, int* field, int* wire):
    cdef uint64_t tag
    p = _read_varint(p, end, &tag)
    if p == NULL or tag > 0xFFFFFFFF or (tag >> 3) == 0 or (tag >> 3) > 536870911:
        return NULL
    field[0] = <int>(tag >> 3)
    wire[0] = <int>(tag & 7)
    return p


cdef object _decode_put(const unsigned char* p, const unsigned char* end):
    cdef uint64_t v, n
    cdef int field, wire
    cdef PutArgs r = PutArgs.__new__(PutArgs)
    r.key = b""
    r.value = b""
    while p < end:
        p = _tag(p, end, &field, &wire)
        if p == NULL:
            return None
        if field > 6:
            p = _skip(p, end, wire)
            if p == NULL:
                return None
        elif field <= 2:
            if wire != 2:
                return None
            p = _read_varint(p, end, &n)
            if p == NULL or n > <uint64_t>(end - p):
                return None
            if field == 1:
                r.key = PyBytes_FromStringAndSize(<const char*>p, <Py_ssize_t>n)
            else:
                r.value = PyBytes_FromStringAndSize(<const char*>p, <Py_ssize_t>n)
            p += n
        else:
            if wire != 0:
                return None
            p = _read_varint(p, end, &v)
            if p == NULL:
                return None
            if field == 3:
                r.lease = <int64_t>v
            elif field == 4:
                r.prev_kv = v != 0
            elif field == 5:
                r.ignore_value = v != 0
            else:
                r.ignore_lease = v != 0
    return r


cdef object _decode_delete(const unsigned char* p, const unsigned char* end):
    cdef uint64_t v, n
    cdef int field, wire
    cdef DeleteRangeArgs r = DeleteRangeArgs.__new__(DeleteRangeArgs)
    r.key = b""
    r.range_end = b""
    while p < end:
        p = _tag(p, end, &field, &wire)
        if p == NULL:
            return None
        if field > 3:
            p = _skip(p, end, wire)
            if p == NULL:
                return None
        elif field <= 2:
            if wire != 2:
                return None
            p = _read_varint(p, end, &n)
            if p == NULL or n > <uint64_t>(end - p):
                return None
            if field == 1:
                r.key = PyBytes_FromStringAndSize(<const char*>p, <Py_ssize_t>n)
            else:
                r.range_end = PyBytes_FromStringAndSize(<const char*>p, <Py_ssize_t>n)
            p += n
        else:
            if wire != 0:
                return None
            p = _read_varint(p, end, &v)
            if p == NULL:
                return None
            r.prev_kv = v != 0
    return r


cdef object _decode_compare(const unsigned char* p, const unsigned char* end):
    cdef uint64_t v, n
    cdef int field, wire
    cdef CompareArgs c = CompareArgs.__new__(CompareArgs)
    c.key = b""
    c.range_end = b""
    c.value = b""
    c.union = None
    while p < end:
        p = _tag(p, end, &field, &wire)
        if p == NULL:
            return None
        if field == 3 or field == 7 or field == 64:
            if wire != 2:
                return None
            p = _read_varint(p, end, &n)
            if p == NULL or n > <uint64_t>(end - p):
                return None
            if field == 3:
                c.key = PyBytes_FromStringAndSize(<const char*>p, <Py_ssize_t>n)
            elif field == 64:
                c.range_end = PyBytes_FromStringAndSize(<const char*>p, <Py_ssize_t>n)
            else:
                c.value = PyBytes_FromStringAndSize(<const char*>p, <Py_ssize_t>n)
            p += n
        elif 1 <= field <= 8:
            if wire != 0:
                return None
            p = _read_varint(p, end, &v)
            if p == NULL:
                return None
            if field == 1:
                c.result = <int>(<int32_t>v)
            elif field == 2:
                c.target = <int>(<int32_t>v)
            elif field == 4:
                c.version = <int64_t>v
            elif field == 5:
                c.create_revision = <int64_t>v
            elif field == 6:
                c.mod_revision = <int64_t>v
            else:
                c.lease = <int64_t>v
        else:
            p = _skip(p, end, wire)
            if p == NULL:
                return None
            continue
        if 4 <= field <= 8:
            # a second, different member of the oneof would clear the first: protobuf's business
            if c.union is not None and c.union is not _COMPARE_UNION[field]:
                return None
            c.union = _COMPARE_UNION[field]
    return c


cdef object _decode_op(const unsigned char* p, const unsigned char* end):
    cdef uint64_t n
    cdef int field, wire
    cdef object sub
    cdef RequestOpArgs op = RequestOpArgs.__new__(RequestOpArgs)
    while p < end:
        p = _tag(p, end, &field, &wire)
        if p == NULL:
            return None
        if field > 4:
            p = _skip(p, end, wire)
            if p == NULL:
                return None
            continue
        # a nested txn, a member of the oneof given twice (protobuf merges or replaces), a wrong wire type
        if field == 4 or op.kind is not None or wire != 2:
            return None
        p = _read_varint(p, end, &n)
        if p == NULL or n > <uint64_t>(end - p):
            return None
        if field == 1:
            sub = _decode_range(p, p + n)
            op.kind = REQUEST_RANGE
            op.request_range = sub
        elif field == 2:
            sub = _decode_put(p, p + n)
            op.kind = REQUEST_PUT
            op.request_put = sub
        else:
            sub = _decode_delete(p, p + n)
            op.kind = REQUEST_DELETE_RANGE
            op.request_delete_range = sub
        if sub is None:
            return None
        p += n
    if op.kind is None:
        return None  # an empty RequestOp: etcd's error for it comes from the protobuf path's checks
    return op


def decode_put_request(bytes raw):
    """``raw`` as PutArgs, or None for protobuf to decide (as decode_range_request)."""
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(raw)
    return _decode_put(p, p + PyBytes_GET_SIZE(raw))


def decode_txn_request(bytes raw):
    """``raw`` as TxnArgs, or None for protobuf to decide (as decode_range_request; also for a nested
    txn or an empty RequestOp)."""
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(raw)
    cdef const unsigned char* end = p + PyBytes_GET_SIZE(raw)
    cdef uint64_t n
    cdef int field, wire
    cdef object item
    cdef TxnArgs t = TxnArgs.__new__(TxnArgs)
    t.compare = []
    t.success = []
    t.failure = []
    t.readonly = True
    while p < end:
        p = _tag(p, end, &field, &wire)
        if p == NULL:
            return None
        if field > 3:
            p = _skip(p, end, wire)
            if p == NULL:
                return None
            continue
        if wire != 2:
            return None
        p = _read_varint(p, end, &n)
        if p == NULL or n > <uint64_t>(end - p):
            return None
        if field == 1:
            item = _decode_compare(p, p + n)
            if item is None:
                return None
            t.compare.append(item)
        else:
            item = _decode_op(p, p + n)
            if item is None:
                return None
            if (<RequestOpArgs>item).kind is not REQUEST_RANGE:
                t.readonly = False
            (t.success if field == 2 else t.failure).append(item)
        p += n
    return t


# ---- write responses around encoded KeyValues

def encode_put_response(bytes header, bytes prev_kv):
    """Encode an etcdserverpb.PutResponse (``prev_kv``: an encoded KeyValue, or None)."""
    cdef Py_ssize_t hl = PyBytes_GET_SIZE(header)
    cdef Py_ssize_t pl = PyBytes_GET_SIZE(prev_kv) if prev_kv is not None else 0
    cdef Py_ssize_t size = message_len(hl) + (message_len(pl) if prev_kv is not None else 0)
    cdef object out = PyBytes_FromStringAndSize(NULL, size)
    cdef char* p = PyBytes_AS_STRING(out)
    p = put_message(p, 0x0a, PyBytes_AS_STRING(header), hl)
    if prev_kv is not None:
        put_message(p, 0x12, PyBytes_AS_STRING(prev_kv), pl)
    return out


def encode_delete_range_response(bytes header, int64_t deleted, list prev_kvs):
    """Encode an etcdserverpb.DeleteRangeResponse around encoded KeyValues."""
    cdef Py_ssize_t hl = PyBytes_GET_SIZE(header)
    cdef Py_ssize_t size = message_len(hl) + field_varint_len(<uint64_t>deleted) + _repeated_len(prev_kvs)
    cdef object out = PyBytes_FromStringAndSize(NULL, size)
    cdef char* p = PyBytes_AS_STRING(out)
    p = put_message(p, 0x0a, PyBytes_AS_STRING(header), hl)
    p = put_field_varint(p, 0x10, <uint64_t>deleted)
    _put_repeated(p, 0x1a, prev_kvs)
    return out


def encode_response_op(int field, bytes response):
    """Encode an etcdserverpb.ResponseOp holding ``response`` in oneof member ``field`` (1 range, 2 put,
    3 delete_range, 4 txn)."""
    cdef Py_ssize_t n = PyBytes_GET_SIZE(response)
    cdef object out = PyBytes_FromStringAndSize(NULL, message_len(n))
    put_message(PyBytes_AS_STRING(out), <char>((field << 3) | 2), PyBytes_AS_STRING(response), n)
    return out


def encode_txn_response(bytes header, bint succeeded, list responses):
    """Encode an etcdserverpb.TxnResponse around encoded ResponseOps."""
    cdef Py_ssize_t hl = PyBytes_GET_SIZE(header)
    cdef Py_ssize_t size = message_len(hl) + field_varint_len(succeeded) + _repeated_len(responses)
    cdef object out = PyBytes_FromStringAndSize(NULL, size)
    cdef char* p = PyBytes_AS_STRING(out)
    p = put_message(p, 0x0a, PyBytes_AS_STRING(header), hl)
    p = put_field_varint(p, 0x10, succeeded)
    _put_repeated(p, 0x1a, responses)
    return out
