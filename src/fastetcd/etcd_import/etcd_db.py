"""What fastetcd takes from an etcd v3 backend (a bolt database): its buckets, decoded.

etcd 3.5's buckets, and what is read of them:

``key``     key: a revision, 8-byte big-endian main, ``_``, 8-byte big-endian sub, and ``t`` for a tombstone;
            value: an ``mvccpb.KeyValue`` (a tombstone's holds only the key). Bolt keeps keys sorted, so
            this is every retained version in revision order.
``lease``   key: the lease ID, 8-byte big-endian; value: ``leasepb.Lease{ID=1, TTL=2, RemainingTTL=3}``.
``meta``    ``finishedCompactRev`` / ``scheduledCompactRev`` as revision bytes (main, ``_``, sub);
            ``consistent_index``, ``term`` and ``confState`` belong to raft and are not carried over.
``alarm``   key: an ``etcdserverpb.AlarmMember``, value empty.
``auth``    ``authEnabled`` (one byte, 1 when enabled) and ``authRevision`` (8-byte big-endian).
``authUsers`` / ``authRoles``  key: the name; value: an ``authpb.User`` / ``authpb.Role``.

Not read (yet): ``members``, ``members_removed``, ``cluster``.

A file from ``etcdctl snapshot save`` is the bolt database followed by the sha256 of it (etcd's restore
recognises it by its size, a multiple of 512 plus 32); the trailer is checked as etcd's restore does.
A data dir's ``member/snap/db`` has none.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

from fastetcd.etcd_import.bolt import BoltDB, BoltError
from fastetcd.proto import auth_pb2, rpc_pb2

KEY_BUCKET = b"key"
LEASE_BUCKET = b"lease"
META_BUCKET = b"meta"
ALARM_BUCKET = b"alarm"
FINISHED_COMPACT = b"finishedCompactRev"
SCHEDULED_COMPACT = b"scheduledCompactRev"
CONSISTENT_INDEX = b"consistent_index"

REV_BYTES = 17  # 8 + 1 + 8
_REV = struct.Struct(">QxQ")
_TOMBSTONE = ord("t")
_SHA = 32


class EtcdDBError(Exception):
    """The source is not a readable etcd v3 backend; the message is one line for the operator."""


class Version(NamedTuple):
    main: int
    sub: int
    tombstone: bool
    kv: bytes  # the mvccpb.KeyValue as etcd stored it


@dataclass(frozen=True)
class LeaseRecord:
    id: int
    ttl: int
    remaining_ttl: int  # 0 unless etcd checkpointed the lease


def parse_rev(b: bytes) -> tuple[int, int, bool]:
    """(main, sub, tombstone) of a key bucket key (or a meta bucket revision)."""
    if len(b) not in (REV_BYTES, REV_BYTES + 1) or b[8] != ord("_"):
        raise EtcdDBError(f"malformed revision key {b.hex()}")
    if len(b) == REV_BYTES + 1 and b[REV_BYTES] != _TOMBSTONE:
        raise EtcdDBError(f"malformed revision key {b.hex()}")
    main, sub = _REV.unpack_from(b)
    if main >= 1 << 63 or sub >= 1 << 63:
        raise EtcdDBError(f"revision out of range in key {b.hex()}")
    return main, sub, len(b) == REV_BYTES + 1


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise EtcdDBError("malformed lease record")
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result & ((1 << 64) - 1), pos
        shift += 7


def _int64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def decode_lease(data: bytes) -> LeaseRecord:
    """leasepb.Lease: ID=1, TTL=2, RemainingTTL=3 (int64 varints); other fields are skipped."""
    fields = {1: 0, 2: 0, 3: 0}
    pos = 0
    while pos < len(data):
        tag, pos = _varint(data, pos)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            v, pos = _varint(data, pos)
            if field in fields:
                fields[field] = _int64(v)
        elif wire == 2:
            n, pos = _varint(data, pos)
            pos += n
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise EtcdDBError("malformed lease record")
        if pos > len(data):
            raise EtcdDBError("malformed lease record")
    return LeaseRecord(fields[1], fields[2], fields[3])


def verify_trailer(path: str) -> tuple[int, bool]:
    """(bytes of the bolt database, whether a sha256 trailer was found and matched)."""
    size = os.path.getsize(path)
    if size % 512 != _SHA:
        return size, False
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = size - _SHA
        while left:
            chunk = f.read(min(left, 1 << 20))
            if not chunk:
                raise EtcdDBError(f"{path}: file shrank while being read")
            h.update(chunk)
            left -= len(chunk)
        trailer = f.read(_SHA)
    if h.digest() != trailer:
        raise EtcdDBError(
            f"{path}: snapshot is damaged: expected sha256 {trailer.hex()}, got {h.hexdigest()}"
        )
    return size - _SHA, True


class EtcdDB:
    """An etcd v3 backend opened read-only."""

    def __init__(self, path: str) -> None:
        self.path = path
        # A running etcd holds bolt's exclusive flock on its db: reading under it could see pages that
        # are being rewritten. A saved snapshot is never locked.
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise EtcdDBError(
                        f"{path} is locked by a running etcd: stop it first, or import a snapshot "
                        "taken with etcdctl snapshot save"
                    ) from None
                raise
            self.size, self.has_trailer = verify_trailer(path)
            try:
                self.bolt = BoltDB.open(path, self.size)
            except BoltError as e:
                raise EtcdDBError(f"{path}: {e}") from None
        except BaseException:
            os.close(self._fd)
            raise
        try:
            if KEY_BUCKET not in self.bolt.root().buckets():
                raise EtcdDBError(f"{path} is a bolt database but not an etcd v3 backend (no key bucket)")
            meta = dict(self._items(META_BUCKET))
            finished, scheduled = meta.get(FINISHED_COMPACT), meta.get(SCHEDULED_COMPACT)
            self.finished_compact = parse_rev(finished)[0] if finished is not None else None
            self.scheduled_compact = parse_rev(scheduled)[0] if scheduled is not None else None
            ci = meta.get(CONSISTENT_INDEX, b"")
            self.consistent_index = struct.unpack(">Q", ci)[0] if len(ci) == 8 else None
        except BoltError as e:
            self.close()
            raise EtcdDBError(f"{path}: {e}") from None
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.bolt.close()
        os.close(self._fd)

    def __enter__(self) -> EtcdDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _items(self, bucket: bytes) -> Iterator[tuple[bytes, bytes]]:
        try:
            b = self.bolt.bucket(bucket)
            if b is not None:
                yield from b.items()
        except BoltError as e:
            raise EtcdDBError(f"{self.path}: {e}") from None

    def versions(self) -> Iterator[Version]:
        """Every retained version in the key bucket, in revision order."""
        unpack = _REV.unpack_from
        for k, v in self._items(KEY_BUCKET):
            if len(k) == REV_BYTES and k[8] == 0x5F:  # the common case, parse_rev's checks inlined
                main, sub = unpack(k)
                if main < 1 << 63 and sub < 1 << 63:
                    yield Version(main, sub, False, v)
                    continue
            yield Version(*parse_rev(k), v)

    def leases(self) -> list[LeaseRecord]:
        out = []
        for k, v in self._items(LEASE_BUCKET):
            lease = decode_lease(v)
            if len(k) != 8 or struct.unpack(">q", k)[0] != lease.id:
                raise EtcdDBError(f"{self.path}: lease record {k.hex()} holds lease {lease.id:x}")
            out.append(lease)
        return out

    def alarms(self) -> list[tuple[int, int]]:
        """(member id, alarm type) of every raised alarm."""
        out = []
        for k, _ in self._items(ALARM_BUCKET):
            try:
                m = rpc_pb2.AlarmMember.FromString(k)
            except Exception:  # protobuf's DecodeError
                raise EtcdDBError(f"{self.path}: malformed alarm record {k.hex()}") from None
            out.append((m.memberID, int(m.alarm)))
        return out

    def auth(self) -> tuple[bool, int, list[auth_pb2.User], list[auth_pb2.Role]]:
        """(enabled, auth revision, users, roles), each list in name order; revision 0 if etcd kept none."""
        meta = dict(self._items(b"auth"))
        rev = meta.get(b"authRevision", b"")
        revision = struct.unpack(">Q", rev)[0] if len(rev) == 8 else 0
        try:
            users = [auth_pb2.User.FromString(v) for _, v in self._items(b"authUsers")]
            roles = [auth_pb2.Role.FromString(v) for _, v in self._items(b"authRoles")]
        except Exception:  # protobuf's DecodeError
            raise EtcdDBError(f"{self.path}: malformed user or role record") from None
        return meta.get(b"authEnabled", b"\x00") == b"\x01", revision, users, roles

    def auth_in_use(self) -> bool:
        """Whether etcd had authentication enabled or any users or roles (an import drops them)."""
        auth = dict(self._items(b"auth"))
        if auth.get(b"authEnabled", b"\x00") != b"\x00":
            return True
        return any(True for name in (b"authUsers", b"authRoles") for _ in self._items(name))
