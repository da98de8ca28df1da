"""The Maintenance service (etcdserverpb.Maintenance), as etcd's v3rpc/maintenance.go answers it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

from fastetcd import ETCD_COMPAT_VERSION, errors
from fastetcd.engine import alarms as alarm_types
from fastetcd.engine.snapshot_file import SnapshotFile
from fastetcd.engine.state_machine import StateMachine
from fastetcd.proto import rpc_pb2 as pb
from fastetcd.server.header import Header

# etcd sends a snapshot in pieces of this size, then one message with the sha256 of what it sent.
SNAPSHOT_PIECE = 32 * 1024

BAD_LEADER_TRANSFEREE = errors.EtcdError("FAILED_PRECONDITION", "etcdserver: bad leader transferee")


def alarm_text(member_id: int, alarm: int) -> str:
    """An AlarmMember as etcd prints it in Status.errors (gogoproto's compact text form)."""
    return f"memberID:{member_id} alarm:{alarm_types.NAMES[alarm]} "


class MaintenanceService:
    def __init__(self, sm: StateMachine, header: Header) -> None:
        self.sm = sm
        self.header = header

    def _fill(self, resp) -> bytes:
        resp.header.SetInParent()
        self.header.fill(resp.header, self.sm.committed_rev)
        return resp.SerializeToString()

    async def status(self, raw: bytes) -> bytes:
        pb.StatusRequest.FromString(raw)
        resp = pb.StatusResponse(
            version=ETCD_COMPAT_VERSION,
            dbSize=self.sm.db_size(),
            leader=self.header.member_id,
            # A single member applies every entry it commits: the raft index follows the revision.
            raftIndex=self.sm.committed_rev,
            raftTerm=self.header.raft_term,
            raftAppliedIndex=self.sm.committed_rev,
            errors=[alarm_text(m, a) for m, a in self.sm.active_alarms()],
            dbSizeInUse=self.sm.db_size_in_use(),
        )
        return self._fill(resp)

    async def alarm(self, raw: bytes) -> bytes:
        r = pb.AlarmRequest.FromString(raw)
        found = await self.sm.alarm(r.action, r.memberID, r.alarm)
        return self._fill(pb.AlarmResponse(alarms=[pb.AlarmMember(memberID=m, alarm=a) for m, a in found]))

    async def defragment(self, raw: bytes) -> bytes:
        pb.DefragmentRequest.FromString(raw)
        await self.sm.defragment()
        return self._fill(pb.DefragmentResponse())

    async def hash(self, raw: bytes) -> bytes:
        pb.HashRequest.FromString(raw)
        return self._fill(pb.HashResponse(hash=self.sm.hash_all()))

    async def hash_kv(self, raw: bytes) -> bytes:
        r = pb.HashKVRequest.FromString(raw)
        h, current, compact = self.sm.hash_kv(r.revision)
        resp = pb.HashKVResponse(header=pb.ResponseHeader(revision=current), hash=h, compact_revision=compact)
        return self._fill(resp)

    async def move_leader(self, raw: bytes) -> bytes:
        r = pb.MoveLeaderRequest.FromString(raw)
        # The only member is the leader already: moving leadership to it is done; anyone else is unknown.
        if r.targetID != self.header.member_id:
            raise BAD_LEADER_TRANSFEREE
        return self._fill(pb.MoveLeaderResponse())

    async def snapshot(
        self, requests: AsyncIterator[bytes], send: Callable[[bytes], Awaitable[None]]
    ) -> None:
        """etcd's Snapshot: the state in pieces with the bytes remaining, then the sha256 trailer's piece."""
        async for raw in requests:
            pb.SnapshotRequest.FromString(raw)
            break
        sm = self.sm
        data = SnapshotFile(sm.committed_rev, sm.compact_rev, sm.applied_index, sm.snapshot_bytes()).encode()
        body, total = memoryview(data)[:-32], len(data) - 32
        for start in range(0, total, SNAPSHOT_PIECE):
            piece = body[start : start + SNAPSHOT_PIECE]
            resp = pb.SnapshotResponse(remaining_bytes=total - start - len(piece), blob=bytes(piece))
            await send(resp.SerializeToString())
        await send(pb.SnapshotResponse(remaining_bytes=0, blob=data[-32:]).SerializeToString())
