# cython: language_level=3
"""The MVCC core: etcd's key index and revision store in C structures, and the records reads return.

Every key has an id; ``order`` keeps the ids sorted by key bytes so that a range is two binary searches and a
walk over a C array. Each key's versions (puts and tombstones) sit in one ascending C array; a version owns the
encoded ``mvccpb.KeyValue`` bytes it will be served as, so a Range answer is a list of existing bytes objects.
The head revision may run ahead of what the engine has made durable: readers always pass the revision they
read at, which hides pending versions without copying anything.

Besides ``MVCC`` it holds ``KeyVersion`` (one version as the engine reads it, for sorts, filters and Txn
compares) and the encoders of what the core stores and emits: ``encode_kv`` and ``encode_event``, which the
engine's watch hub also uses. Response encoders belong to the server (server/_wire.pyx), watch matching to
_watch_index.pyx; the protobuf helpers the core and the server's encoders share are in _pb.pxd.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.object cimport PyObject
from cpython.ref cimport Py_DECREF, Py_INCREF, Py_XDECREF
from libc.stdint cimport int32_t, int64_t, uint8_t, uint64_t
from libc.stdlib cimport free, realloc
from libc.string cimport memcmp, memcpy, memmove

from fastetcd._pb cimport (field_bytes_len, field_varint_len, message_len, put_field_bytes, put_field_varint,
                           put_message, put_varint, varint_len)

cdef enum:
    OP_PUT = 1
    OP_DELETE = 2


# ---------------------------------------------------------------- encoders of what the core stores and emits

cdef object _encode_kv(const char* k, Py_ssize_t kl, int64_t create, int64_t mod, int64_t version,
                       const char* v, Py_ssize_t vl, int64_t lease, int32_t* voff):
    """mvccpb.KeyValue in Go's field order, zero fields omitted (byte-identical to etcd)."""
    cdef Py_ssize_t size = (field_bytes_len(kl) + field_varint_len(<uint64_t>create)
                            + field_varint_len(<uint64_t>mod) + field_varint_len(<uint64_t>version)
                            + field_bytes_len(vl) + field_varint_len(<uint64_t>lease))
    cdef object out = PyBytes_FromStringAndSize(NULL, size)
    cdef char* base = PyBytes_AS_STRING(out)
    cdef char* p = base
    p = put_field_bytes(p, 0x0a, k, kl)
    p = put_field_varint(p, 0x10, <uint64_t>create)
    p = put_field_varint(p, 0x18, <uint64_t>mod)
    p = put_field_varint(p, 0x20, <uint64_t>version)
    if voff != NULL:
        voff[0] = <int32_t>((p - base) + (0 if vl == 0 else 1 + varint_len(<uint64_t>vl)))
    p = put_field_bytes(p, 0x2a, v, vl)
    p = put_field_varint(p, 0x30, <uint64_t>lease)
    return out


def encode_kv(bytes key, int64_t create, int64_t mod, int64_t version, bytes value, int64_t lease):
    """Encode one mvccpb.KeyValue (used for events and keys-only answers)."""
    return _encode_kv(PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key), create, mod, version,
                      PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value), lease, NULL)


def encode_event(bint is_delete, bytes kv, object prev_kv):
    """Encode an mvccpb.Event (type, kv, prev_kv)."""
    cdef Py_ssize_t kl = PyBytes_GET_SIZE(kv)
    cdef Py_ssize_t size = field_varint_len(is_delete) + message_len(kl)
    if prev_kv is not None:
        size += message_len(PyBytes_GET_SIZE(<bytes>prev_kv))
    cdef object out = PyBytes_FromStringAndSize(NULL, size)
    cdef char* p = PyBytes_AS_STRING(out)
    p = put_field_varint(p, 0x08, is_delete)  # EventType: PUT = 0, DELETE = 1
    p = put_message(p, 0x12, PyBytes_AS_STRING(kv), kl)
    if prev_kv is not None:
        put_message(p, 0x1a, PyBytes_AS_STRING(<bytes>prev_kv), PyBytes_GET_SIZE(<bytes>prev_kv))
    return out


def _rev_sub(tuple t):
    return (t[0], t[1])


# ---------------------------------------------------------------- growable byte buffer (log records)

cdef int _buf_reserve(Buf* b, Py_ssize_t extra) except -1:
    cdef Py_ssize_t need = b.n + extra
    cdef Py_ssize_t cap
    cdef char* p
    if need <= b.cap:
        return 0
    cap = b.cap * 2 if b.cap else 256
    while cap < need:
        cap *= 2
    p = <char*>realloc(b.p, cap)
    if p == NULL:
        raise MemoryError()
    b.p = p
    b.cap = cap
    return 0


cdef int _buf_varint(Buf* b, uint64_t v) except -1:
    _buf_reserve(b, 10)
    b.n = put_varint(b.p + b.n, v) - b.p
    return 0


cdef int _buf_bytes(Buf* b, const char* s, Py_ssize_t n) except -1:
    _buf_varint(b, <uint64_t>n)
    _buf_reserve(b, n)
    memcpy(b.p + b.n, s, n)
    b.n += n
    return 0


cdef class _Reader:
    """Cursor over a varint-encoded record or snapshot."""
    cdef const char* p
    cdef const char* end
    cdef bytes data

    def __cinit__(self, bytes data):
        self.data = data
        self.p = PyBytes_AS_STRING(data)
        self.end = self.p + PyBytes_GET_SIZE(data)

    cdef uint64_t varint(self) except? 0xFFFFFFFFFFFFFFFF:
        cdef uint64_t v = 0
        cdef int shift = 0
        cdef uint8_t c
        while True:
            if self.p >= self.end or shift > 63:
                raise ValueError("truncated or corrupt record")
            c = <uint8_t>self.p[0]
            self.p += 1
            v |= (<uint64_t>(c & 0x7f)) << shift
            if c < 0x80:
                return v
            shift += 7

    cdef bytes chunk(self):
        cdef Py_ssize_t n = <Py_ssize_t>self.varint()
        if n < 0 or self.p + n > self.end:
            raise ValueError("truncated or corrupt record")
        cdef bytes out = PyBytes_FromStringAndSize(self.p, n)
        self.p += n
        return out

    cdef bint done(self):
        return self.p >= self.end


# ---------------------------------------------------------------- key comparison

cdef extern from "stdlib.h" nogil:
    void qsort_r(void* base, size_t nmemb, size_t size,
                 int (*compar)(const void*, const void*, void*) noexcept nogil, void* arg)


cdef int _cmp_kids(const void* a, const void* b, void* ents) noexcept nogil:
    cdef KeyEntry* ea = &(<KeyEntry*>ents)[(<const int32_t*>a)[0]]
    cdef KeyEntry* eb = &(<KeyEntry*>ents)[(<const int32_t*>b)[0]]
    return _cmp(ea.kp, ea.kl, eb.kp, eb.kl)


cdef inline int _cmp(const char* a, Py_ssize_t al, const char* b, Py_ssize_t bl) noexcept nogil:
    cdef int c = memcmp(a, b, al if al < bl else bl)
    if c != 0:
        return c
    return (al > bl) - (al < bl)


cdef inline void _refresh_head(KeyEntry* e) noexcept nogil:
    """Mirror the newest version's revision and liveness into the entry (after any change to revs)."""
    if e.n:
        e.head_main = e.revs[e.n - 1].main
        e.head_live = e.revs[e.n - 1].kv != NULL
    else:
        e.head_main = 0
        e.head_live = False


@cython.final
@cython.no_gc  # its fields are bytes and ints, which cannot form a cycle: skip the collector's bookkeeping
@cython.freelist(16)
cdef class KeyVersion:
    """One live version of one key as a read returns it: mvccpb.KeyValue's fields under the same names, and
    the encoded KeyValue the core already holds (what a Range or a prev_kv serves, without re-encoding)."""

    def __repr__(self):
        return (f"KeyVersion(key={self.key!r}, create_revision={self.create_revision}, "
                f"mod_revision={self.mod_revision}, version={self.version}, lease={self.lease}, "
                f"value={self.value!r})")


cdef KeyVersion _key_version(bytes key, Rev* r):
    cdef KeyVersion kv = KeyVersion.__new__(KeyVersion)
    kv.key = key
    kv.create_revision = r.create
    kv.mod_revision = r.main
    kv.version = r.version
    kv.lease = r.lease
    kv.value = PyBytes_FromStringAndSize(PyBytes_AS_STRING(<object>r.kv) + r.voff, r.vlen)
    kv.kv = <bytes>r.kv
    return kv


@cython.final
cdef class MVCC:
    """etcd's MVCC key space: versions of every key, readable at any revision >= ``compact_rev``.

    Writers call ``put``/``delete``/``delete_range`` with the revision they are building (``rev + 1`` for a new
    one) and a sub-revision; ``take_record`` then returns the log record of that revision, which
    ``apply_record`` replays byte for byte on another core. ``truncate`` rolls back revisions that never
    became durable.
    """

    def __cinit__(self):
        self.ents = NULL
        self.order = NULL
        self.n_ents = self.cap_ents = self.n_order = self.cap_order = 0
        self.kid = {}
        self.free_kids = []
        self.rec.p = NULL
        self.rec.n = self.rec.cap = 0
        self.rec_rev = 0
        self.bulk = False
        self.rev = 1  # etcd's first revision is 1: an empty store answers with header.revision 1
        self.compact_rev = -1  # etcd's compactMainRev before the first compaction: Compact(0) is allowed
        self.n_revs = 0

    def __dealloc__(self):
        cdef int32_t i, j
        for i in range(self.n_ents):
            if self.ents[i].key != NULL:
                for j in range(self.ents[i].n):
                    Py_XDECREF(self.ents[i].revs[j].kv)
                free(self.ents[i].revs)
                Py_DECREF(<object>self.ents[i].key)
        free(self.ents)
        free(self.order)
        free(self.rec.p)

    # ------------------------------------------------------------ index internals

    cdef int32_t _lower_bound(self, const char* k, Py_ssize_t kl) noexcept nogil:
        cdef int32_t lo = 0, hi = self.n_order, mid
        cdef KeyEntry* e
        while lo < hi:
            mid = (lo + hi) >> 1
            e = &self.ents[self.order[mid]]
            if _cmp(e.kp, e.kl, k, kl) < 0:
                lo = mid + 1
            else:
                hi = mid
        return lo

    cdef int32_t _key_id(self, bytes key, bint create) except -2:
        cdef object found = self.kid.get(key)
        cdef int32_t kid, pos
        cdef KeyEntry* e
        if found is not None:
            return <int32_t>found
        if not create:
            return -1
        if self.free_kids:
            kid = self.free_kids.pop()
        else:
            if self.n_ents == self.cap_ents:
                self.cap_ents = self.cap_ents * 2 if self.cap_ents else 1024
                e = <KeyEntry*>realloc(self.ents, self.cap_ents * sizeof(KeyEntry))
                if e == NULL:
                    raise MemoryError()
                self.ents = e
            kid = self.n_ents
            self.n_ents += 1
        e = &self.ents[kid]
        Py_INCREF(key)
        e.key = <PyObject*>key
        e.kp = PyBytes_AS_STRING(key)
        e.kl = PyBytes_GET_SIZE(key)
        e.revs = NULL
        e.n = e.cap = 0
        _refresh_head(e)
        if self.n_order == self.cap_order:
            self.cap_order = self.cap_order * 2 if self.cap_order else 1024
            self.order = <int32_t*>realloc(self.order, self.cap_order * sizeof(int32_t))
            if self.order == NULL:
                raise MemoryError()
        # Replay appends and sorts once at the end: inserting in place costs a memmove of the tail, which
        # over a million keys written in no particular order adds up to minutes.
        pos = self.n_order if self.bulk else self._lower_bound(e.kp, e.kl)
        memmove(&self.order[pos + 1], &self.order[pos], (self.n_order - pos) * sizeof(int32_t))
        self.order[pos] = kid
        self.n_order += 1
        self.kid[key] = kid
        return kid

    cdef void _drop_key(self, int32_t kid):
        """Forget a key with no versions left; the caller removes it from ``order``."""
        cdef KeyEntry* e = &self.ents[kid]
        cdef object key = <object>e.key
        del self.kid[key]
        Py_DECREF(key)
        free(e.revs)
        e.key = NULL
        e.revs = NULL
        e.n = e.cap = 0
        self.free_kids.append(kid)

    cdef void _compact_order(self):
        """Remove freed key ids from ``order`` in one pass."""
        cdef int32_t i, j = 0
        for i in range(self.n_order):
            if self.ents[self.order[i]].key != NULL:
                self.order[j] = self.order[i]
                j += 1
        self.n_order = j

    cdef Rev* _at(self, int32_t kid, int64_t rev) noexcept nogil:
        """The newest version of ``kid`` with main revision <= rev, or NULL."""
        cdef KeyEntry* e = &self.ents[kid]
        cdef int32_t lo, hi, mid
        if e.n == 0:
            return NULL
        if e.revs[e.n - 1].main <= rev:
            return &e.revs[e.n - 1]
        lo = 0
        hi = e.n
        while lo < hi:  # first index with main > rev
            mid = (lo + hi) >> 1
            if e.revs[mid].main <= rev:
                lo = mid + 1
            else:
                hi = mid
        return NULL if lo == 0 else &e.revs[lo - 1]

    cdef int _bounds(self, bytes key, bytes end, int32_t* lo, int32_t* hi) except -1:
        """etcd's range semantics: end b"" = the key alone, b"\\0" = every key >= key, else [key, end)."""
        if self.bulk:
            raise RuntimeError("range over an MVCC core in bulk load (call end_bulk first)")
        cdef const char* kp = PyBytes_AS_STRING(key)
        cdef Py_ssize_t kl = PyBytes_GET_SIZE(key)
        cdef Py_ssize_t el = PyBytes_GET_SIZE(end)
        cdef KeyEntry* e
        lo[0] = self._lower_bound(kp, kl)
        if el == 0:
            hi[0] = lo[0]
            if lo[0] < self.n_order:
                e = &self.ents[self.order[lo[0]]]
                if _cmp(e.kp, e.kl, kp, kl) == 0:
                    hi[0] = lo[0] + 1
        elif el == 1 and PyBytes_AS_STRING(end)[0] == 0:
            hi[0] = self.n_order
        else:
            hi[0] = self._lower_bound(PyBytes_AS_STRING(end), el)
            if hi[0] < lo[0]:
                hi[0] = lo[0]

    cdef Rev* _push(self, int32_t kid) except NULL:
        cdef KeyEntry* e = &self.ents[kid]
        cdef Rev* r
        if e.n == e.cap:
            e.cap = e.cap * 2 if e.cap else 2
            r = <Rev*>realloc(e.revs, e.cap * sizeof(Rev))
            if r == NULL:
                raise MemoryError()
            e.revs = r
        r = &e.revs[e.n]
        e.n += 1
        self.n_revs += 1
        return r

    cdef int _rec_op(self, uint8_t op, bytes key, bytes value, int64_t lease, int64_t rev) except -1:
        if rev != self.rec_rev:
            self.rec.n = 0
            self.rec_rev = rev
        _buf_reserve(&self.rec, 1)
        self.rec.p[self.rec.n] = <char>op
        self.rec.n += 1
        _buf_bytes(&self.rec, PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key))
        if op == OP_PUT:
            _buf_bytes(&self.rec, PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value))
            _buf_varint(&self.rec, <uint64_t>lease)
        return 0

    def begin_bulk(self):
        """Start a bulk load (replay): new keys are appended unsorted until ``end_bulk``; no ranges meanwhile."""
        self.bulk = True

    def end_bulk(self):
        """Sort the keys appended during a bulk load into place (one qsort instead of a memmove per key)."""
        if self.bulk:
            qsort_r(self.order, self.n_order, sizeof(int32_t), _cmp_kids, <void*>self.ents)
            self.bulk = False

    # ------------------------------------------------------------ writes

    cdef void _set_rev(self, int64_t rev):
        if rev > self.rev:
            self.rev = rev

    def put(self, bytes key, bytes value, int64_t lease, int64_t rev, int32_t sub):
        """Write a new version of ``key`` at (rev, sub); a key not live at the head starts a generation."""
        cdef int32_t kid = self._key_id(key, True)
        cdef KeyEntry* e = &self.ents[kid]
        cdef int64_t create = rev, version = 1
        cdef Rev* last
        if e.n and e.revs[e.n - 1].kv != NULL:
            last = &e.revs[e.n - 1]
            create = last.create
            version = last.version + 1
        cdef int32_t voff = 0
        cdef object kv = _encode_kv(e.kp, e.kl, create, rev, version, PyBytes_AS_STRING(value),
                                    PyBytes_GET_SIZE(value), lease, &voff)
        cdef Rev* r = self._push(kid)
        r.main = rev
        r.sub = sub
        r.create = create
        r.version = version
        r.lease = lease
        Py_INCREF(kv)
        r.kv = <PyObject*>kv
        r.voff = voff
        r.vlen = <int32_t>PyBytes_GET_SIZE(value)
        _refresh_head(&self.ents[kid])
        self._set_rev(rev)
        self._rec_op(OP_PUT, key, value, lease, rev)

    cdef bint _tombstone(self, int32_t kid, bytes key, int64_t rev, int32_t sub) except -1:
        cdef KeyEntry* e = &self.ents[kid]
        if e.n == 0 or e.revs[e.n - 1].kv == NULL:
            return False
        cdef Rev* r = self._push(kid)
        r.main = rev
        r.sub = sub
        r.create = 0
        r.version = 0
        r.lease = 0
        r.kv = NULL
        r.voff = r.vlen = 0
        _refresh_head(e)
        self._set_rev(rev)
        self._rec_op(OP_DELETE, key, None, 0, rev)
        return True

    def delete(self, bytes key, int64_t rev, int32_t sub):
        """Write a tombstone if ``key`` is live at the head; True if it was."""
        cdef int32_t kid = self._key_id(key, False)
        if kid < 0:
            return False
        return self._tombstone(kid, key, rev, sub)

    def delete_range(self, bytes key, bytes end, int64_t rev, int32_t sub, list leased=None):
        """Delete every key live at the head in the range; returns the deleted versions' encoded KeyValues.

        If ``leased`` is given, (key, lease) of every deleted key that had a lease is appended to it.
        """
        cdef int32_t lo, hi, i
        cdef list kids = []
        cdef list prev = []
        cdef KeyEntry* e
        cdef int32_t kid
        self._bounds(key, end, &lo, &hi)
        for i in range(lo, hi):
            e = &self.ents[self.order[i]]
            if e.n and e.revs[e.n - 1].kv != NULL:
                kids.append(self.order[i])
                prev.append(<object>e.revs[e.n - 1].kv)
                if leased is not None and e.revs[e.n - 1].lease != 0:
                    leased.append((<object>e.key, e.revs[e.n - 1].lease))
        for i in range(len(kids)):
            kid = <int32_t>kids[i]
            self._tombstone(kid, <bytes>self.ents[kid].key, rev, sub + i)
        return prev

    def take_record(self):
        """The log record of the revision just written (empty if nothing was written), then reset."""
        cdef bytes out = PyBytes_FromStringAndSize(self.rec.p, self.rec.n)
        self.rec.n = 0
        self.rec_rev = 0
        return out

    def apply_record(self, int64_t rev, bytes record):
        """Replay a record produced by ``take_record`` at ``rev``."""
        if rev <= self.rev:
            raise ValueError(f"record {rev} is not after head revision {self.rev}")
        cdef _Reader rd = _Reader(record)
        cdef int32_t sub = 0
        cdef uint8_t op
        cdef bytes key, value
        while not rd.done():
            op = <uint8_t>rd.p[0]
            rd.p += 1
            key = rd.chunk()
            if op == OP_PUT:
                value = rd.chunk()
                self.put(key, value, <int64_t>rd.varint(), rev, sub)
            elif op == OP_DELETE:
                if not self.delete(key, rev, sub):
                    raise ValueError(f"record {rev} deletes {key!r}, which is not live")
            else:
                raise ValueError(f"record {rev}: unknown op {op}")
            sub += 1
        self._set_rev(rev)
        self.rec.n = 0
        self.rec_rev = 0

    def truncate(self, int64_t rev):
        """Drop every version above ``rev`` (a batch that did not become durable); head becomes ``rev``."""
        cdef int32_t kid
        cdef KeyEntry* e
        cdef bint dropped = False
        for kid in range(self.n_ents):
            e = &self.ents[kid]
            if e.key == NULL:
                continue
            while e.n and e.revs[e.n - 1].main > rev:
                e.n -= 1
                self.n_revs -= 1
                Py_XDECREF(e.revs[e.n].kv)
            _refresh_head(e)
            if e.n == 0:
                self._drop_key(kid)
                dropped = True
        if dropped:
            self._compact_order()
        self.rev = rev
        self.rec.n = 0
        self.rec_rev = 0

    def compact(self, int64_t rev):
        """etcd compaction: per key keep the newest version <= rev (unless a tombstone) and all after it."""
        cdef int32_t kid, i, lo, hi, mid, cut
        cdef KeyEntry* e
        cdef bint dropped = False
        for kid in range(self.n_ents):
            e = &self.ents[kid]
            if e.key == NULL or e.n == 0 or e.revs[0].main > rev:
                continue
            lo = 0
            hi = e.n
            while lo < hi:
                mid = (lo + hi) >> 1
                if e.revs[mid].main <= rev:
                    lo = mid + 1
                else:
                    hi = mid
            cut = lo - 1  # newest version <= rev
            if e.revs[cut].kv == NULL:
                cut += 1
            if cut == 0:
                continue
            for i in range(cut):
                Py_XDECREF(e.revs[i].kv)
            memmove(e.revs, &e.revs[cut], (e.n - cut) * sizeof(Rev))
            e.n -= cut
            self.n_revs -= cut
            _refresh_head(e)
            if e.n == 0:
                self._drop_key(kid)
                dropped = True
        if dropped:
            self._compact_order()
        if rev > self.compact_rev:
            self.compact_rev = rev

    # ------------------------------------------------------------ reads

    cdef Rev* _live(self, bytes key, int64_t rev) except? NULL:
        """The version of ``key`` visible at ``rev``, or NULL if the key is absent or deleted there."""
        cdef int32_t kid = self._key_id(key, False)
        cdef Rev* r
        if kid < 0:
            return NULL
        r = self._at(kid, rev)
        if r == NULL or r.kv == NULL:
            return NULL
        return r

    def get(self, bytes key, int64_t rev):
        """The ``KeyVersion`` of ``key`` live at ``rev``, or None."""
        cdef Rev* r = self._live(key, rev)
        return None if r == NULL else _key_version(key, r)

    def lease_of(self, bytes key, int64_t rev):
        """The lease of ``key`` at ``rev`` (0 if it has none or is not live)."""
        cdef Rev* r = self._live(key, rev)
        return 0 if r == NULL else r.lease

    def get_kv(self, bytes key, int64_t rev):
        """The encoded KeyValue of ``key`` at ``rev``, or None."""
        cdef Rev* r = self._live(key, rev)
        return None if r == NULL else <object>r.kv

    def range(self, bytes key, bytes end, int64_t rev, Py_ssize_t limit, bint keys_only):
        """Encoded KeyValues live at ``rev`` in the range (at most ``limit`` if > 0) and the total count."""
        cdef int32_t lo, hi, i
        cdef Py_ssize_t count = 0
        cdef list out = []
        cdef Rev* r
        cdef KeyEntry* e
        self._bounds(key, end, &lo, &hi)
        for i in range(lo, hi):
            r = self._at(self.order[i], rev)
            if r == NULL or r.kv == NULL:
                continue
            count += 1
            if limit <= 0 or count <= limit:
                if keys_only:
                    e = &self.ents[self.order[i]]
                    out.append(_encode_kv(e.kp, e.kl, r.create, r.main, r.version, NULL, 0, r.lease, NULL))
                else:
                    out.append(<object>r.kv)
        return out, count

    def range_items(self, bytes key, bytes end, int64_t rev, Py_ssize_t limit):
        """Like ``range`` but ``KeyVersion`` records, for sorts, filters and Txn compares."""
        cdef int32_t lo, hi, i
        cdef Py_ssize_t count = 0
        cdef list out = []
        cdef Rev* r
        self._bounds(key, end, &lo, &hi)
        for i in range(lo, hi):
            r = self._at(self.order[i], rev)
            if r == NULL or r.kv == NULL:
                continue
            count += 1
            if limit > 0 and count > limit:
                continue
            out.append(_key_version(<bytes>self.ents[self.order[i]].key, r))
        return out, count

    def range_page(self, bytes key, bytes end, int64_t rev, Py_ssize_t limit, int mode):
        """The first ``limit`` keys live at ``rev`` in the range (all if ``limit`` <= 0), without counting the
        rest: one page of etcd's Range without the total count, as a RangeStream chunk reads it.

        mode 0: encoded KeyValues; 1: keys-only KeyValues as etcd 3.7 reads them from its index alone (no
        value and no lease); 2: ``KeyVersion`` records, as ``range_items`` returns them.

        Its loop is ``range``'s without the count past the limit; the scans stay separate functions so that
        each inner loop keeps its own few branches (``range`` is the hottest read there is).
        """
        cdef int32_t lo, hi, i
        cdef Py_ssize_t n = 0
        cdef list out = []
        cdef Rev* r
        cdef KeyEntry* e
        self._bounds(key, end, &lo, &hi)
        for i in range(lo, hi):
            if 0 < limit <= n:
                break
            r = self._at(self.order[i], rev)
            if r == NULL or r.kv == NULL:
                continue
            n += 1
            if mode == 0:
                out.append(<object>r.kv)
                continue
            e = &self.ents[self.order[i]]
            if mode == 1:
                out.append(_encode_kv(e.kp, e.kl, r.create, r.main, r.version, NULL, 0, 0, NULL))
            else:
                out.append(_key_version(<bytes>e.key, r))
        return out

    def count(self, bytes key, bytes end, int64_t rev):
        """Number of keys live at ``rev`` in the range, without touching any value."""
        cdef int32_t lo, hi, i
        cdef Py_ssize_t count = 0
        cdef Rev* r
        cdef KeyEntry* e
        self._bounds(key, end, &lo, &hi)
        with nogil:
            for i in range(lo, hi):
                e = &self.ents[self.order[i]]
                if e.head_main <= rev:
                    count += e.head_live  # the common case, answered without touching the versions
                else:
                    r = self._at(self.order[i], rev)
                    if r != NULL and r.kv != NULL:
                        count += 1
        return count

    def __len__(self):
        """Number of keys with any retained version (live or not)."""
        return self.n_order

    # ------------------------------------------------------------ watch support

    cdef object _event(self, KeyEntry* e, int32_t j):
        """(is_delete, key, kv, prev_kv or None) for version j of a key, as a watcher receives it."""
        cdef Rev* r = &e.revs[j]
        cdef object prev = None
        cdef int32_t k = j - 1
        # etcd reads prev_kv at revision - 1: an earlier write to the key in the same revision is not it
        while k >= 0 and e.revs[k].main == r.main:
            k -= 1
        if k >= 0 and e.revs[k].kv != NULL:
            prev = <object>e.revs[k].kv
        if r.kv == NULL:
            # etcd's DELETE event carries only the key and the deleting revision
            return (True, <object>e.key, _encode_kv(e.kp, e.kl, 0, r.main, 0, NULL, 0, 0, NULL), prev)
        return (False, <object>e.key, <object>r.kv, prev)

    def events(self, int64_t rev, bytes record):
        """The events of revision ``rev`` (whose log record is ``record``), in sub-revision order."""
        cdef _Reader rd = _Reader(record)
        cdef list out = []
        cdef uint8_t op
        cdef bytes key
        cdef int32_t kid, j, sub = 0
        cdef KeyEntry* e
        while not rd.done():
            op = <uint8_t>rd.p[0]
            rd.p += 1
            key = rd.chunk()
            if op == OP_PUT:
                rd.chunk()
                rd.varint()
            kid = self._key_id(key, False)
            if kid < 0:
                raise ValueError(f"revision {rev}: key {key!r} is not in the index")
            e = &self.ents[kid]
            j = e.n - 1
            # a key can be written twice in one revision (a put, then a range delete): find this op's sub
            while j >= 0 and (e.revs[j].main > rev or (e.revs[j].main == rev and e.revs[j].sub > sub)):
                j -= 1
            if j < 0 or e.revs[j].main != rev or e.revs[j].sub != sub:
                raise ValueError(f"revision {rev}: no version of {key!r} at sub-revision {sub}")
            out.append(self._event(e, j))
            sub += 1
        return out

    def history(self, bytes key, bytes end, int64_t start_rev, int64_t end_rev):
        """Every event in the range with start_rev <= revision <= end_rev, ordered by (revision, sub).

        Returns a list of (revision, is_delete, key, kv, prev_kv or None): what a watcher that fell behind
        (or started in the past) must receive before it joins the live stream.
        """
        cdef int32_t lo, hi, i, j
        cdef KeyEntry* e
        cdef list found = []
        cdef tuple ev
        self._bounds(key, end, &lo, &hi)
        for i in range(lo, hi):
            e = &self.ents[self.order[i]]
            j = e.n - 1
            while j >= 0 and e.revs[j].main > end_rev:
                j -= 1
            while j >= 0 and e.revs[j].main >= start_rev:
                ev = self._event(e, j)
                found.append((e.revs[j].main, e.revs[j].sub, ev))
                j -= 1
        found.sort(key=_rev_sub)
        return [(f[0],) + f[2] for f in found]

    def versions_upto(self, int64_t rev):
        """(main, sub, key, kv or None for a tombstone) of every retained version with main <= rev, in
        (main, sub) order: the order etcd's backend keeps its key bucket in, which HashKV walks."""
        cdef int32_t i, j
        cdef KeyEntry* e
        cdef Rev* r
        cdef list found = []
        for i in range(self.n_order):
            e = &self.ents[self.order[i]]
            for j in range(e.n):
                r = &e.revs[j]
                if r.main > rev:
                    break
                found.append((r.main, r.sub, <object>e.key, <object>r.kv if r.kv != NULL else None))
        found.sort(key=_rev_sub)
        return found

    def leased_keys(self, int64_t rev):
        """(key, lease) of every key live at ``rev`` that has a lease: rebuilds lease attachments."""
        cdef int32_t i
        cdef Rev* r
        cdef list out = []
        for i in range(self.n_order):
            r = self._at(self.order[i], rev)
            if r != NULL and r.kv != NULL and r.lease != 0:
                out.append((<object>self.ents[self.order[i]].key, r.lease))
        return out

    # ------------------------------------------------------------ snapshots

    def dump(self, int64_t rev):
        """Every retained version <= rev, as bytes that ``load`` turns back into an identical core."""
        cdef Buf b
        cdef int32_t i, j, n
        cdef KeyEntry* e
        cdef Rev* r
        b.p = NULL
        b.n = b.cap = 0
        try:
            _buf_varint(&b, <uint64_t>rev)
            _buf_varint(&b, <uint64_t>self.compact_rev)
            for i in range(self.n_order):
                e = &self.ents[self.order[i]]
                n = 0
                while n < e.n and e.revs[n].main <= rev:
                    n += 1
                if n == 0:
                    continue
                _buf_bytes(&b, e.kp, e.kl)
                _buf_varint(&b, <uint64_t>n)
                for j in range(n):
                    r = &e.revs[j]
                    _buf_varint(&b, <uint64_t>r.main)
                    _buf_varint(&b, <uint64_t>r.sub)
                    if r.kv == NULL:
                        _buf_varint(&b, 0)
                    else:
                        _buf_varint(&b, 1)
                        _buf_varint(&b, <uint64_t>r.create)
                        _buf_varint(&b, <uint64_t>r.version)
                        _buf_varint(&b, <uint64_t>r.lease)
                        _buf_bytes(&b, PyBytes_AS_STRING(<object>r.kv) + r.voff, r.vlen)
            return PyBytes_FromStringAndSize(b.p, b.n)
        finally:
            free(b.p)

    def load(self, bytes data):
        """Fill an empty core from ``dump`` output."""
        if self.n_revs:
            raise ValueError("load needs an empty core")
        cdef _Reader rd = _Reader(data)
        cdef int64_t rev = <int64_t>rd.varint()
        cdef int64_t compact_rev = <int64_t>rd.varint()
        cdef bytes key, value
        cdef int32_t kid, voff
        cdef uint64_t n, j
        cdef Rev* r
        cdef KeyEntry* e
        cdef object kv
        while not rd.done():
            key = rd.chunk()
            kid = self._key_id(key, True)
            n = rd.varint()
            for j in range(n):
                r = self._push(kid)
                r.main = <int64_t>rd.varint()
                r.sub = <int32_t>rd.varint()
                r.kv = NULL
                r.create = r.version = r.lease = 0
                r.voff = r.vlen = 0
                if rd.varint():
                    r.create = <int64_t>rd.varint()
                    r.version = <int64_t>rd.varint()
                    r.lease = <int64_t>rd.varint()
                    value = rd.chunk()
                    e = &self.ents[kid]
                    kv = _encode_kv(e.kp, e.kl, r.create, r.main, r.version, PyBytes_AS_STRING(value),
                                    PyBytes_GET_SIZE(value), r.lease, &voff)
                    Py_INCREF(kv)
                    r.kv = <PyObject*>kv
                    r.voff = voff
                    r.vlen = <int32_t>PyBytes_GET_SIZE(value)
            _refresh_head(&self.ents[kid])
        self.rev = rev if rev > 1 else 1
        self.compact_rev = compact_rev
