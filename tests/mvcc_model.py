"""A deliberately naive pure-Python model of etcd's MVCC key space, the oracle for the Cython core.

Written for obviousness, not speed: every read scans every version of every key. It follows etcd's rules
(server/mvcc/key_index.go) as DESIGN.md §3 states them, so a disagreement with ``fastetcd._core.MVCC`` is a
bug in one of the two, and this one is small enough to check by reading.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Version:
    """One version of one key; ``value is None`` marks a tombstone (whose other fields are 0)."""

    rev: int
    sub: int
    create: int
    version: int
    lease: int
    value: bytes | None

    @property
    def live(self) -> bool:
        return self.value is not None


def in_range(k: bytes, key: bytes, end: bytes) -> bool:
    """etcd's range semantics: end b"" is the key alone, b"\\x00" every key >= key, else [key, end)."""
    if end == b"":
        return k == key
    if end == b"\x00":
        return k >= key
    return key <= k < end


class ModelMVCC:
    """Per key the ascending list of its retained versions, plus the head and compaction revisions."""

    def __init__(self) -> None:
        self.keys: dict[bytes, list[Version]] = {}
        self.rev = 1
        self.compact_rev = -1  # etcd: never compacted

    # ---------------------------------------------------------------- writes

    def _head(self, key: bytes) -> Version | None:
        versions = self.keys.get(key)
        return versions[-1] if versions else None

    def put(self, key: bytes, value: bytes, lease: int, rev: int, sub: int) -> Version:
        head = self._head(key)
        if head is not None and head.live:
            create, version = head.create, head.version + 1
        else:  # never written, deleted, or compacted away: a new generation
            create, version = rev, 1
        v = Version(rev, sub, create, version, lease, value)
        self.keys.setdefault(key, []).append(v)
        self.rev = max(self.rev, rev)
        return v

    def delete(self, key: bytes, rev: int, sub: int) -> bool:
        head = self._head(key)
        if head is None or not head.live:
            return False
        self.keys[key].append(Version(rev, sub, 0, 0, 0, None))
        self.rev = max(self.rev, rev)
        return True

    def delete_range(self, key: bytes, end: bytes, rev: int, sub: int) -> list[tuple[bytes, Version]]:
        """Tombstone every key live at the head in the range, in key order; returns what was deleted."""
        prev = []
        for k in sorted(self.keys):
            head = self._head(k)
            if in_range(k, key, end) and head is not None and head.live:
                prev.append((k, head))
        for i, (k, _) in enumerate(prev):
            self.delete(k, rev, sub + i)
        return prev

    def truncate(self, rev: int) -> None:
        for k in list(self.keys):
            kept = [v for v in self.keys[k] if v.rev <= rev]
            if kept:
                self.keys[k] = kept
            else:
                del self.keys[k]
        self.rev = rev

    def compact(self, rev: int) -> None:
        for k in list(self.keys):
            versions = self.keys[k]
            older = [v for v in versions if v.rev <= rev]
            kept = [v for v in versions if v.rev > rev]
            if older and older[-1].live:
                kept.insert(0, older[-1])
            if kept:
                self.keys[k] = kept
            else:
                del self.keys[k]
        self.compact_rev = max(self.compact_rev, rev)

    # ---------------------------------------------------------------- reads

    def get(self, key: bytes, rev: int) -> Version | None:
        """The version of ``key`` visible at ``rev``: the newest one <= rev, unless that is a tombstone."""
        seen = [v for v in self.keys.get(key, []) if v.rev <= rev]
        if not seen or not seen[-1].live:
            return None
        return seen[-1]

    def range(
        self, key: bytes, end: bytes, rev: int, limit: int = 0
    ) -> tuple[list[tuple[bytes, Version]], int]:
        """Live (key, version) pairs at ``rev`` in key order, the first ``limit`` if > 0, and the total."""
        hits = []
        for k in sorted(self.keys):
            if in_range(k, key, end):
                v = self.get(k, rev)
                if v is not None:
                    hits.append((k, v))
        return (hits[:limit] if limit > 0 else hits), len(hits)

    def count(self, key: bytes, end: bytes, rev: int) -> int:
        return self.range(key, end, rev)[1]

    def __len__(self) -> int:
        """Keys with any retained version, live or not (what ``len(MVCC)`` counts)."""
        return len(self.keys)

    def n_versions(self) -> int:
        return sum(len(vs) for vs in self.keys.values())
