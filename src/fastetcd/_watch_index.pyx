# cython: language_level=3
"""Watch matching for the watch hub: which watchers want an event on a key.

Its own module: it holds no MVCC state and needs nothing from the core but a key's bytes.
"""

from libc.stdint cimport uint32_t


cdef class WatchIndex:
    """Which watchers want an event on a key: exact keys by hash, ranges by their distinct bounds.

    Watchers with identical bounds share one pyroaring set, so a thousand watchers on one prefix cost one
    comparison per event, not a thousand.
    """

    cdef dict exact       # key -> BitMap of watcher ids
    cdef dict ranges      # (start, end) -> BitMap; end b"" = unbounded
    cdef list flat        # [(start, end, BitMap)] mirror of ranges for a tight loop
    cdef object BitMap

    def __cinit__(self):
        from pyroaring import BitMap
        self.BitMap = BitMap
        self.exact = {}
        self.ranges = {}
        self.flat = []

    def add(self, uint32_t wid, bytes key, bytes end):
        """Register watcher ``wid`` for ``key`` (end b"") or [key, end) (end b"\\0" = every key >= key)."""
        cdef object ids
        if not end:
            ids = self.exact.get(key)
            if ids is None:
                ids = self.exact[key] = self.BitMap()
            ids.add(wid)
            return
        if end == b"\x00":
            end = b""
        ids = self.ranges.get((key, end))
        if ids is None:
            ids = self.ranges[(key, end)] = self.BitMap()
            self.flat.append((key, end, ids))
        ids.add(wid)

    def remove(self, uint32_t wid, bytes key, bytes end):
        cdef object ids
        if not end:
            ids = self.exact.get(key)
            if ids is not None:
                ids.discard(wid)
                if not ids:
                    del self.exact[key]
            return
        if end == b"\x00":
            end = b""
        ids = self.ranges.get((key, end))
        if ids is not None:
            ids.discard(wid)
            if not ids:
                del self.ranges[(key, end)]
                self.flat = [t for t in self.flat if t[2] is not ids]

    def match(self, bytes key):
        """The ids of the watchers interested in ``key`` (a new BitMap, or None when there are none)."""
        cdef object found = None
        cdef object ids = self.exact.get(key)
        cdef tuple t
        cdef bytes start, end
        if ids is not None:
            found = self.BitMap(ids)
        for t in self.flat:
            start = <bytes>t[0]
            end = <bytes>t[1]
            if key >= start and (not end or key < end):
                if found is None:
                    found = self.BitMap(<object>t[2])
                else:
                    found |= <object>t[2]
        return found

    def __len__(self):
        return sum(len(v) for v in self.exact.values()) + sum(len(v) for v in self.ranges.values())
