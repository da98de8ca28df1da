"""The file ``etcdctl snapshot save`` writes from fastetcd, and ``fastetcd snapshot restore`` reads.

Layout::

    b"FASTETCD-SNAP\\x00\\x01\\x00"   magic and format version (16 bytes)
    <q revision> <q compact revision> <Q log index> <Q length>
    state                             StateMachine.snapshot_bytes(): core, leases, alarms
    zero padding                      up to a multiple of 512 bytes
    sha256 of everything above        32 bytes

etcdctl 3.5 accepts a snapshot only if its size is a multiple of 512 plus a 32-byte sha256 trailer (its
``hasChecksum``, made for bolt files of whole pages), which is why the body is padded; the trailer is the
same integrity check etcd's restore makes.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

MAGIC = b"FASTETCD-SNAP\x00\x01\x00"
_HEAD = struct.Struct("<qqQQ")
_ALIGN = 512
_SHA = 32


class SnapshotFileError(Exception):
    """Not a fastetcd snapshot, or a damaged one."""


@dataclass(frozen=True)
class SnapshotFile:
    revision: int
    compact_rev: int
    index: int  # the log index the state covers; a restored store continues after it
    state: bytes

    def encode(self) -> bytes:
        body = MAGIC + _HEAD.pack(self.revision, self.compact_rev, self.index, len(self.state)) + self.state
        body += b"\x00" * (-len(body) % _ALIGN)
        return body + hashlib.sha256(body).digest()

    @classmethod
    def decode(cls, data: bytes) -> SnapshotFile:
        if not data.startswith(MAGIC):
            raise SnapshotFileError("not a fastetcd snapshot")
        body, digest = data[:-_SHA], data[-_SHA:]
        if len(data) % _ALIGN != _SHA or hashlib.sha256(body).digest() != digest:
            raise SnapshotFileError("snapshot is damaged: sha256 checksum mismatch")
        revision, compact_rev, index, n = _HEAD.unpack_from(body, len(MAGIC))
        start = len(MAGIC) + _HEAD.size
        if start + n > len(body):
            raise SnapshotFileError("snapshot is damaged: truncated state")
        return cls(revision, compact_rev, index, body[start : start + n])
