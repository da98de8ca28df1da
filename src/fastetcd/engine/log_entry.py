"""Log entries: the unit the store makes durable and a replica (or a restart) replays.

One entry per request that changed anything: the etcd revision it created (0 for none, e.g. a lease grant),
the core's record of that revision's key-value writes, and the other state operations it performed (lease
grants, revokes and checkpoints; alarm changes; a compaction; an auth change, as auth_store.py encodes
it). Readers skip operation codes they do not know, so an older binary replays a newer log's entries.
Entries are numbered by a contiguous log index, independent of revisions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

LEASE_GRANT = 1  # id, ttl
LEASE_REVOKE = 2  # id
LEASE_CHECKPOINT = 3  # id, remaining ttl (0 = back to the full ttl)
ALARM_ACTIVATE = 4  # member id, alarm type
ALARM_DEACTIVATE = 5  # member id, alarm type
# Bytes, not (id, arg): its length, then an auth change (auth_store.encode_change). Never in ``ops``.
AUTH_CHANGE = 6
COMPACT = 7  # 0, revision: history below it is gone; followers compact where the leader did

_U64 = (1 << 64) - 1


@dataclass(slots=True)
class Entry:
    rev: int = 0  # revision this entry created, 0 if none
    kv: bytes = b""  # MVCC.take_record() of that revision
    ops: list[tuple[int, int, int]] = field(default_factory=list)  # (op, id, arg): lease and alarm ops
    auth: bytes = b""  # an auth change (users, roles, enabling), b"" for none


def _varint(out: bytearray, v: int) -> None:
    v &= _U64  # int64 ids and ttls travel as their two's complement, like protobuf's int64
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    v = shift = 0
    while True:
        b = data[pos]
        pos += 1
        v |= (b & 0x7F) << shift
        if b < 0x80:
            break
        shift += 7
    if v >= 1 << 63:
        v -= 1 << 64
    return v, pos


def encode(e: Entry) -> bytes:
    out = bytearray()
    _varint(out, e.rev)
    _varint(out, len(e.kv))
    out += e.kv
    for op, target, arg in e.ops:
        out.append(op)
        _varint(out, target)
        if op != LEASE_REVOKE:
            _varint(out, arg)
    if e.auth:
        out.append(AUTH_CHANGE)
        _varint(out, len(e.auth))
        out += e.auth
    return bytes(out)


def encode_kv(rev: int, kv: bytes) -> bytes:
    """``encode(Entry(rev, kv))``, the entry of nearly every write, without building the Entry."""
    out = bytearray()
    _varint(out, rev)
    _varint(out, len(kv))
    out += kv
    return bytes(out)


def decode(data: bytes) -> Entry:
    rev, pos = _read_varint(data, 0)
    n, pos = _read_varint(data, pos)
    kv = data[pos : pos + n]
    pos += n
    ops = []
    auth = b""
    while pos < len(data):
        op = data[pos]
        if op == AUTH_CHANGE:
            n, pos = _read_varint(data, pos + 1)
            auth = data[pos : pos + n]
            pos += n
            continue
        target, pos = _read_varint(data, pos + 1)
        arg = 0
        if op != LEASE_REVOKE:
            arg, pos = _read_varint(data, pos)
        ops.append((op, target, arg))
    return Entry(rev, kv, ops, auth)
