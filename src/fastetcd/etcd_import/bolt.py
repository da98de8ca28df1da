"""A read-only reader of bolt databases (etcd's backend, ``go.etcd.io/bbolt`` file format version 2).

Only what reading needs: the two meta pages, branch and leaf pages with their overflow, buckets (on their
own pages, or inline in their parent's leaf) and nested buckets. The layout, all integers little-endian
(bbolt writes native order; every platform etcd ships for that matters is little-endian)::

    page header (16 bytes)     id u64, flags u16, count u16, overflow u32
                               flags: 0x01 branch, 0x02 leaf, 0x04 meta, 0x10 freelist; a page spans
                               overflow + 1 consecutive pages of page_size bytes
    meta (after the header)    magic u32 (0xED0CDAED), version u32 (2), page_size u32, flags u32,
                               root bucket (root pgid u64, sequence u64), freelist pgid u64,
                               high-water pgid u64, txid u64, checksum u64 = FNV-64a of the fields before it
    branch element (16 bytes)  pos u32, ksize u32, child pgid u64
    leaf element (16 bytes)    flags u32 (0x01: the value is a bucket), pos u32, ksize u32, vsize u32
                               key at element address + pos, value right after the key
    bucket value               root pgid u64, sequence u64; root 0 means the bucket is inline: a leaf page
                               (header and elements) follows the 16 bytes

Pages 0 and 1 are the meta pages; the valid one with the higher txid is the database's current state.
Every page read is checked (its id, a single known type, bounds within the file and below the
high-water mark, elements within the page), so a damaged file raises ``BoltError`` instead of returning
wrong data.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator
from typing import NamedTuple

MAGIC = 0xED0CDAED
VERSION = 2

BRANCH_PAGE = 0x01
LEAF_PAGE = 0x02
META_PAGE = 0x04
FREELIST_PAGE = 0x10
PAGE_TYPES = {BRANCH_PAGE: "branch", LEAF_PAGE: "leaf", META_PAGE: "meta", FREELIST_PAGE: "freelist"}

BUCKET_LEAF_FLAG = 0x01

PAGE_HEADER = struct.Struct("<QHHI")
META = struct.Struct("<IIIIQQQQQQ")  # ... root, sequence, freelist, pgid, txid, checksum
BRANCH_ELEMENT = struct.Struct("<IIQ")
LEAF_ELEMENT = struct.Struct("<IIII")
BUCKET_HEADER = struct.Struct("<QQ")

PGID_NO_FREELIST = 0xFFFFFFFFFFFFFFFF  # meta.freelist when the freelist is not stored (etcd's default)

_META_SUMMED = META.size - 8  # the checksum covers every meta field before it
_MAX_DEPTH = 64  # a bolt tree of a few billion keys is well under 10 deep; deeper means a cycle

_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_MASK64 = (1 << 64) - 1


class BoltError(Exception):
    """Not a bolt database, or a damaged one."""


def fnv64a(data: bytes) -> int:
    h = _FNV_OFFSET
    for b in data:
        h = ((h ^ b) * _FNV_PRIME) & _MASK64
    return h


class Meta(NamedTuple):
    page_id: int  # 0 or 1: which meta page
    page_size: int
    flags: int
    root: int  # the root bucket's page
    freelist: int
    pgid: int  # high-water mark: every page of the tree is below it
    txid: int


class PageHeader(NamedTuple):
    id: int
    flags: int
    count: int
    overflow: int

    @property
    def type(self) -> str:
        return PAGE_TYPES.get(self.flags, f"unknown<{self.flags:02x}>")


class Entry(NamedTuple):
    """One element of a bucket: a key with either a value or a nested bucket."""

    key: bytes
    value: bytes  # for a bucket, its header (and inline page)
    is_bucket: bool


def _parse_meta(buf: memoryview | bytes, page_id: int) -> Meta | str:
    """The meta of page ``page_id`` starting at ``buf``, or why it is not valid."""
    if len(buf) < PAGE_HEADER.size + META.size:
        return "too short"
    magic, version, page_size, mflags, root, _seq, freelist, pgid, txid, checksum = META.unpack_from(
        buf, PAGE_HEADER.size
    )
    if magic != MAGIC:
        return "invalid magic"
    if version != VERSION:
        return f"version {version} (only {VERSION} is supported)"
    if checksum != fnv64a(bytes(buf[PAGE_HEADER.size : PAGE_HEADER.size + _META_SUMMED])):
        return "checksum mismatch"
    return Meta(page_id, page_size, mflags, root, freelist, pgid, txid)


class BoltDB:
    """A bolt database in memory or mapped from a file; ``size`` bytes of it are the database (an
    ``etcdctl snapshot save`` file has a sha256 trailer after them)."""

    def __init__(self, data: bytes | bytearray | memoryview | mmap.mmap, size: int | None = None) -> None:
        self._mapped: mmap.mmap | None = None
        self._data = memoryview(data) if size is None else memoryview(data)[:size]
        self.size = len(self._data)
        try:
            self.meta = self._pick_meta()
        except BaseException:
            self._data.release()
            raise
        self.page_size = self.meta.page_size
        if self.meta.pgid * self.page_size > self.size:
            self._data.release()
            raise BoltError(
                f"database is truncated: {self.size} bytes, the meta page needs "
                f"{self.meta.pgid} pages of {self.page_size} bytes"
            )

    @classmethod
    def open(cls, path: str | os.PathLike[str], size: int | None = None) -> BoltDB:
        """Map the file at ``path`` read-only (its first ``size`` bytes when given)."""
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise BoltError("not a bolt database (the file is empty)")
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            db = cls(mapped, size)
        except BaseException:
            mapped.close()
            raise
        db._mapped = mapped
        return db

    def close(self) -> None:
        self._data.release()
        if self._mapped is not None:
            try:
                self._mapped.close()
            except BufferError:  # a page view is still referenced (an unfinished iterator): GC unmaps
                pass
            self._mapped = None

    def __enter__(self) -> BoltDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- meta

    def _pick_meta(self) -> Meta:
        # bbolt's getPageSize: page 0's meta tells the page size; if it is damaged, the second meta
        # page is looked for at each power-of-two page size from 1 KiB to 16 MiB.
        m0 = _parse_meta(self._data[:0x1000], 0)
        candidates = [m0] if isinstance(m0, Meta) else []
        sizes = [m0.page_size] if isinstance(m0, Meta) else [1024 << i for i in range(15)]
        m1: Meta | str = "not found"
        for ps in sizes:
            if ps <= 0 or ps >= self.size:
                continue
            m1 = _parse_meta(self._data[ps : ps + 0x1000], 1)
            if isinstance(m1, Meta):
                candidates.append(m1)
                break
        candidates = [m for m in candidates if m.page_size >= 512 and m.page_size & (m.page_size - 1) == 0]
        if not candidates:
            raise BoltError(f"not a bolt database (meta page 0: {m0}; meta page 1: {m1})")
        if len(candidates) == 2 and candidates[0].page_size != candidates[1].page_size:
            candidates = [candidates[0]]
        # db.meta(): the higher txid wins when valid, else the other one
        return max(candidates, key=lambda m: m.txid)

    # ---------------------------------------------------------------- pages

    def page_header(self, pgid: int) -> PageHeader:
        off = pgid * self.page_size
        if pgid < 0 or off + PAGE_HEADER.size > self.size:
            raise BoltError(f"page {pgid} is beyond the end of the file")
        return PageHeader(*PAGE_HEADER.unpack_from(self._data, off))

    def page(self, pgid: int) -> tuple[PageHeader, memoryview]:
        """The header of page ``pgid`` and the whole page, overflow included."""
        if not 2 <= pgid < self.meta.pgid:
            raise BoltError(f"page {pgid} is outside the tree (high-water mark {self.meta.pgid})")
        h = self.page_header(pgid)
        if h.id != pgid:
            raise BoltError(f"page {pgid} identifies itself as page {h.id}")
        if h.flags not in PAGE_TYPES:
            raise BoltError(f"page {pgid} has unknown flags {h.flags:#x}")
        end = (pgid + h.overflow + 1) * self.page_size
        if pgid + h.overflow >= self.meta.pgid or end > self.size:
            raise BoltError(f"page {pgid} with {h.overflow} overflow pages runs past the tree")
        return h, self._data[pgid * self.page_size : end]

    def pages(self) -> dict[int, PageHeader]:
        """Every page the current state uses, by id: both meta pages, the freelist if it is stored, and
        the branch and leaf pages of every bucket, nested ones included (a page's overflow pages are
        part of it). Pages that are free hold stale data and are not listed."""
        used = {0: self.page_header(0), 1: self.page_header(1)}
        if self.meta.freelist != PGID_NO_FREELIST:
            used[self.meta.freelist] = self.page(self.meta.freelist)[0]
        todo = [self.root()]
        while todo:
            bucket = todo.pop()
            if bucket.inline:
                continue
            for pgid, h in bucket.tree_pages():
                used[pgid] = h
            todo.extend(bucket.open(e) for e in bucket if e.is_bucket)
        return dict(sorted(used.items()))

    # ---------------------------------------------------------------- buckets

    def root(self) -> Bucket:
        return Bucket(self, self.meta.root, None, b"")

    def bucket(self, *path: bytes) -> Bucket | None:
        """The bucket at ``path`` (names from the root), or None if one of them is missing."""
        b: Bucket | None = self.root()
        for name in path:
            assert b is not None
            b = b.bucket(name)
            if b is None:
                return None
        return b


class Bucket:
    def __init__(self, db: BoltDB, root: int, inline: memoryview | None, name: bytes) -> None:
        self.db = db
        self.root = root  # 0 for an inline bucket
        self._inline = inline
        self.name = name

    @property
    def inline(self) -> bool:
        return self.root == 0

    def __iter__(self) -> Iterator[Entry]:
        """Every element in key order."""
        for pgid, buf in self._leaves():
            yield from _leaf_entries(buf, pgid)

    def _leaves(self) -> Iterator[tuple[int, memoryview]]:
        """The bucket's leaf pages in key order (pgid -1: the inline page)."""
        if self.root == 0:
            assert self._inline is not None
            yield -1, self._inline
            return
        for pgid, h, buf in self._walk():
            if h.flags == LEAF_PAGE:
                yield pgid, buf

    def tree_pages(self) -> list[tuple[int, PageHeader]]:
        """The branch and leaf pages of this bucket's own tree (none for an inline bucket)."""
        return [] if self.root == 0 else [(pgid, h) for pgid, h, _ in self._walk()]

    def _walk(self) -> Iterator[tuple[int, PageHeader, memoryview]]:
        """Depth first from the root page: every branch and leaf page, leaves in key order."""
        seen: set[int] = set()
        stack = [(self.root, 0)]
        while stack:
            pgid, depth = stack.pop()
            if depth > _MAX_DEPTH or pgid in seen:
                raise BoltError(f"page {pgid} is reached twice: the tree has a cycle")
            seen.add(pgid)
            h, buf = self.db.page(pgid)
            if h.flags == BRANCH_PAGE:
                if PAGE_HEADER.size + h.count * BRANCH_ELEMENT.size > len(buf):
                    raise BoltError(f"branch page {pgid}: {h.count} elements do not fit the page")
                children = [
                    BRANCH_ELEMENT.unpack_from(buf, PAGE_HEADER.size + i * BRANCH_ELEMENT.size)[2]
                    for i in range(h.count)
                ]
                stack.extend((child, depth + 1) for child in reversed(children))
            elif h.flags != LEAF_PAGE:
                raise BoltError(f"page {pgid} is a {h.type} page inside bucket {self.name!r}")
            yield pgid, h, buf

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """(key, value) of every element that is not a nested bucket, in key order."""
        for pgid, buf in self._leaves():
            for key, value, is_bucket in _leaf_entries(buf, pgid):
                if not is_bucket:
                    yield key, value

    def buckets(self) -> list[bytes]:
        """The names of the nested buckets."""
        return [e.key for e in self if e.is_bucket]

    def bucket(self, name: bytes) -> Bucket | None:
        for e in self:
            if e.key == name:
                return self.open(e) if e.is_bucket else None
            if e.key > name:
                return None
        return None

    def open(self, e: Entry) -> Bucket:
        """The nested bucket of element ``e``."""
        if len(e.value) < BUCKET_HEADER.size:
            raise BoltError(f"bucket {e.key!r}: header is {len(e.value)} bytes")
        root, _seq = BUCKET_HEADER.unpack_from(e.value)
        inline = memoryview(e.value)[BUCKET_HEADER.size :] if root == 0 else None
        return Bucket(self.db, root, inline, e.key)


def _leaf_entries(buf: memoryview, pgid: int) -> list[Entry]:
    """The elements of a leaf page (pgid -1: an inline bucket's page)."""
    where = "inline bucket page" if pgid < 0 else f"leaf page {pgid}"
    page = bytes(buf)  # one copy of the page; keys and values are slices of it
    n = len(page)
    if n < PAGE_HEADER.size:
        raise BoltError(f"{where} is {n} bytes")
    _, flags, count, _ = PAGE_HEADER.unpack_from(page, 0)
    if flags != LEAF_PAGE:
        raise BoltError(f"{where} has flags {flags:#x}, not a leaf")
    if PAGE_HEADER.size + count * LEAF_ELEMENT.size > n:
        raise BoltError(f"{where}: {count} elements do not fit the page")
    out = []
    unpack = LEAF_ELEMENT.unpack_from
    for i in range(count):
        el = PAGE_HEADER.size + i * LEAF_ELEMENT.size
        eflags, pos, ksize, vsize = unpack(page, el)
        k = el + pos
        v = k + ksize
        if v + vsize > n:
            raise BoltError(f"{where}: element {i} (key and value) runs past the page")
        out.append(Entry(page[k:v], page[v : v + vsize], bool(eflags & BUCKET_LEAF_FLAG)))
    return out
