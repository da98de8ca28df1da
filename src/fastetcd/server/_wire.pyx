# cython: language_level=3
"""The server's response encoders: etcdserverpb messages built around payloads that are already encoded.

KeyValues come from the MVCC core and Events from the watch hub as bytes; a response only wraps them, so each
payload is copied once, into the answer, and no protobuf object is built. The output is byte-identical to
Go's encoder (fields in number order, zero scalars omitted), which the property tests check.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport int64_t, uint64_t

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
