# Protobuf wire-format helpers shared by the Cython modules that encode messages by hand: the MVCC core
# (_core.pyx: KeyValue, Event) and the server's response encoders (server/_wire.pyx). They are inline and
# live in a .pxd so that each module compiles its own copy: there is no module to import at run time, and
# nothing is duplicated in the source.
#
# Every writer takes a pointer into a buffer that the caller sized with the matching *_len function and
# returns the position after what it wrote. Tags are single bytes (field number < 16).
from libc.stdint cimport uint64_t
from libc.string cimport memcpy


cdef inline Py_ssize_t varint_len(uint64_t v) noexcept nogil:
    cdef Py_ssize_t n = 1
    while v >= 0x80:
        v >>= 7
        n += 1
    return n


cdef inline char* put_varint(char* p, uint64_t v) noexcept nogil:
    while v >= 0x80:
        p[0] = <char>((v & 0x7f) | 0x80)
        v >>= 7
        p += 1
    p[0] = <char>v
    return p + 1


# ---- scalar fields: proto3 omits a zero (or empty) value, and Go's encoder does too

cdef inline Py_ssize_t field_varint_len(uint64_t v) noexcept nogil:
    return 0 if v == 0 else 1 + varint_len(v)


cdef inline char* put_field_varint(char* p, char tag, uint64_t v) noexcept nogil:
    if v == 0:
        return p
    p[0] = tag
    return put_varint(p + 1, v)


cdef inline Py_ssize_t field_bytes_len(Py_ssize_t n) noexcept nogil:
    return 0 if n == 0 else 1 + varint_len(<uint64_t>n) + n


cdef inline char* put_field_bytes(char* p, char tag, const char* s, Py_ssize_t n) noexcept nogil:
    if n == 0:
        return p
    return put_message(p, tag, s, n)


# ---- embedded messages (a singular one that is set, or an element of a repeated field): always written,
# even when empty, since presence is what they say

cdef inline Py_ssize_t message_len(Py_ssize_t n) noexcept nogil:
    return 1 + varint_len(<uint64_t>n) + n


cdef inline char* put_message(char* p, char tag, const char* s, Py_ssize_t n) noexcept nogil:
    p[0] = tag
    p = put_varint(p + 1, <uint64_t>n)
    memcpy(p, s, n)
    return p + n
