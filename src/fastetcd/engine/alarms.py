"""Cluster alarms (etcd's alarmStore): NOSPACE past the backend quota, CORRUPT on a failed integrity check.

Alarms are state like keys and leases: activating or deactivating one is a log operation, so it survives
restarts and reaches replicas, and an active NOSPACE caps the node exactly as etcd's ``applierV3Capped``
does (puts, txns with puts and lease grants refused; reads, deletes, revokes and compaction allowed) until
an operator frees space and disarms it.
"""

from __future__ import annotations

import struct

from fastetcd.engine.log_entry import ALARM_ACTIVATE, ALARM_DEACTIVATE

# etcdserverpb.AlarmType
NONE = 0
NOSPACE = 1
CORRUPT = 2
NAMES = {NONE: "NONE", NOSPACE: "NOSPACE", CORRUPT: "CORRUPT"}
_U64 = (1 << 64) - 1


class Alarms:
    def __init__(self) -> None:
        self.active: set[tuple[int, int]] = set()  # (member id, alarm type)
        self.ops: list[tuple[int, int, int]] = []  # alarm operations of the entry being built
        self._undo: list[tuple[int, int, bool]] = []  # (member, alarm, was active) of this batch

    def get(self, alarm: int = NONE) -> list[tuple[int, int]]:
        """Active alarms of type ``alarm`` (every type for NONE), ordered as etcd lists them."""
        return sorted(a for a in self.active if alarm == NONE or a[1] == alarm)

    def has(self, alarm: int) -> bool:
        return any(a[1] == alarm for a in self.active)

    # -------------------------------------------------------------- writer-side mutations

    def activate(self, member: int, alarm: int) -> bool:
        """Raise ``alarm`` for ``member``; False if it was already raised (nothing to log)."""
        return self._set(member, alarm, True)

    def deactivate(self, member: int, alarm: int) -> bool:
        """Clear ``alarm`` of ``member``; False if it was not raised."""
        return self._set(member, alarm, False)

    def raise_unlogged(self, member: int, alarm: int) -> None:
        """Raise an alarm that cannot be logged (the store itself is damaged): it lasts until restart."""
        self.active.add((member, alarm))

    def _set(self, member: int, alarm: int, on: bool) -> bool:
        key = (member, alarm)
        if (key in self.active) == on:
            return False
        self._undo.append((member, alarm, not on))
        (self.active.add if on else self.active.discard)(key)
        self.ops.append((ALARM_ACTIVATE if on else ALARM_DEACTIVATE, member, alarm))
        return True

    def take_ops(self) -> list[tuple[int, int, int]]:
        ops, self.ops = self.ops, []
        return ops

    def commit(self) -> None:
        self._undo.clear()

    def rollback(self) -> None:
        """Undo every change since the last commit (the batch's append failed)."""
        for member, alarm, was_on in reversed(self._undo):
            (self.active.add if was_on else self.active.discard)((member, alarm))
        self._undo.clear()
        self.ops.clear()

    # -------------------------------------------------------------- recovery

    def replay(self, ops: list[tuple[int, int, int]]) -> None:
        for op, member, alarm in ops:
            # The log reads every varint back as int64; a member id is a uint64 (half of them >= 2**63).
            member &= _U64
            if op == ALARM_ACTIVATE:
                self.active.add((member, alarm))
            elif op == ALARM_DEACTIVATE:
                self.active.discard((member, alarm))

    def dump(self) -> bytes:
        return b"".join(struct.pack("<QI", m, a) for m, a in sorted(self.active))

    def load(self, data: bytes) -> None:
        self.active = {struct.unpack_from("<QI", data, i) for i in range(0, len(data), 12)}
