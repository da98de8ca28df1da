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


def decode_range_request(bytes raw):
    """``raw`` as RangeArgs, or None where anything is unusual (a malformed message, a known field with
    another wire type, groups): the caller then parses with protobuf, which gives the answer and the
    error grpc-go's etcd gives. So this fast path never decides an edge case by itself."""
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(raw)
    cdef const unsigned char* end = p + PyBytes_GET_SIZE(raw)
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
