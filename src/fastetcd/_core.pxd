cimport cython
# The C-level side of _core.pyx: its structures, KeyVersion's fields and MVCC's attributes and methods.
# Cython reads it to compile _core.pyx; no other module cimports it today (server/_wire.pyx shares only
# _pb.pxd's helpers with the core, _watch_index.pyx nothing). A compiled module that wants to walk the
# index without going through Python would cimport it.
from cpython.object cimport PyObject
from libc.stdint cimport int32_t, int64_t, uint8_t


cdef struct Rev:
    # One version of one key: a put (kv != NULL) or a tombstone (kv == NULL).
    int64_t main          # mod_revision
    int64_t create        # create_revision of the generation this version belongs to
    int64_t version       # 1 on create, +1 per put
    int64_t lease
    PyObject* kv          # owned: the encoded mvccpb.KeyValue of this version, NULL for a tombstone
    int32_t sub           # sub-revision inside `main`
    int32_t voff          # offset of the value bytes inside kv
    int32_t vlen          # length of the value


cdef struct KeyEntry:
    PyObject* key         # owned bytes; NULL for a free slot
    const char* kp        # points into key's buffer (stable while key is alive)
    Py_ssize_t kl
    Rev* revs             # ascending by (main, sub)
    int64_t head_main     # revs[n-1].main (0 if n == 0), kept here so count() need not touch revs
    int32_t n
    int32_t cap
    bint head_live        # revs[n-1] is a put


cdef struct Buf:
    char* p
    Py_ssize_t n
    Py_ssize_t cap


@cython.final
cdef class KeyVersion:
    cdef readonly bytes key
    cdef readonly int64_t create_revision
    cdef readonly int64_t mod_revision
    cdef readonly int64_t version
    cdef readonly int64_t lease
    cdef readonly bytes value
    cdef readonly bytes kv        # the encoded mvccpb.KeyValue, shared with the core (not a copy)


@cython.final
cdef class MVCC:
    cdef KeyEntry* ents       # by key id
    cdef int32_t n_ents
    cdef int32_t cap_ents
    cdef int32_t* order       # key ids sorted by key bytes
    cdef int32_t n_order
    cdef int32_t cap_order
    cdef dict kid             # key bytes -> key id
    cdef list free_kids
    cdef Buf rec              # the log record of the revision being applied
    cdef int64_t rec_rev
    cdef readonly bint bulk
    cdef readonly int64_t rev
    cdef readonly int64_t compact_rev
    cdef readonly Py_ssize_t n_revs

    cdef int32_t _lower_bound(self, const char* k, Py_ssize_t kl) noexcept nogil
    cdef int32_t _key_id(self, bytes key, bint create) except -2
    cdef Rev* _at(self, int32_t kid, int64_t rev) noexcept nogil
    cdef Rev* _live(self, bytes key, int64_t rev) except? NULL
    cdef int _bounds(self, bytes key, bytes end, int32_t* lo, int32_t* hi) except -1
    cdef Rev* _push(self, int32_t kid) except NULL
    cdef int _rec_op(self, uint8_t op, bytes key, bytes value, int64_t lease, int64_t rev) except -1
    cdef void _drop_key(self, int32_t kid)
    cdef void _compact_order(self)
    cdef void _set_rev(self, int64_t rev)
    cdef bint _tombstone(self, int32_t kid, bytes key, int64_t rev, int32_t sub) except -1
    cdef object _event(self, KeyEntry* e, int32_t j)
