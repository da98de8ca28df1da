"""etcd's HashKV: a CRC-32C over the key space as etcd's backend would hold it at a revision.

etcd hashes its bolt ``key`` bucket: the bucket's name, then for every stored version with revision <= the
hash revision, the revision as bytes (8-byte big-endian main, ``_``, 8-byte big-endian sub, and ``t`` for
a tombstone) followed by the stored ``mvccpb.KeyValue`` (a tombstone stores only its key). Versions at or
below the compaction revision count only while they are still their key's newest live version at the hash
revision (etcd's ``kvindex.Keep``), unless no key is live at all. Doing exactly that here gives the same
hash as etcd for the same history, so ``etcdctl endpoint hashkv`` can compare fastetcd with etcd.

Worked example: put a=1 (rev 2), put a=2 (rev 3), compact 3, put a=3 (rev 4). Hashing at 3 covers a@3 (the
kept version); hashing at 4 covers only a@4, because a@3 is no longer a's newest version.
"""

from __future__ import annotations

import struct

import crc32c

from fastetcd._core import MVCC

_REV = struct.Struct(">Qc Q")  # main, "_", sub
_FLUSH = 1 << 20


def _tombstone_value(key: bytes) -> bytes:
    # mvccpb.KeyValue{key: key}: field 1, length-delimited
    n, size = len(key), bytearray()
    while n >= 0x80:
        size.append((n & 0x7F) | 0x80)
        n >>= 7
    size.append(n)
    return b"\x0a" + bytes(size) + key


def hash_kv(core: MVCC, rev: int) -> int:
    versions = core.versions_upto(rev)
    newest: dict[bytes, tuple[int, int, bool]] = {}
    for main, sub, key, kv in versions:
        newest[key] = (main, sub, kv is not None)
    keep = {(main, sub) for main, sub, live in newest.values() if live}
    below = core.compact_rev + 1  # versions under this are compaction's leftovers
    h = crc32c.crc32c(b"key")
    buf = bytearray()
    for main, sub, key, kv in versions:
        if main < below and keep and (main, sub) not in keep:
            continue
        buf += _REV.pack(main, b"_", sub)
        if kv is None:
            buf += b"t"
            buf += _tombstone_value(key)
        else:
            buf += kv
        if len(buf) >= _FLUSH:
            h = crc32c.crc32c(buf, value=h)
            buf.clear()
    return crc32c.crc32c(buf, value=h)
