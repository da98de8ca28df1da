"""The Maintenance service (etcdserverpb.Maintenance), as etcd's v3rpc/maintenance.go answers it."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable

from fastetcd import ETCD_CLUSTER_VERSION, ETCD_COMPAT_VERSION, errors
from fastetcd.engine import alarms as alarm_types
from fastetcd.engine.snapshot_file import SnapshotFile
from fastetcd.engine.state_machine import StateMachine
from fastetcd.proto import rpc_pb2 as pb
from fastetcd.server.cluster_view import ClusterView
from fastetcd.server.header import Header
from fastetcd.server.service import Service, auth_info

# etcd sends a snapshot in pieces of this size, then one message with the sha256 of what it sent.
SNAPSHOT_PIECE = 32 * 1024

WRONG_DOWNGRADE_FORMAT = errors.EtcdError(
    "INVALID_ARGUMENT", "etcdserver: wrong downgrade target version format"
)
INVALID_DOWNGRADE_TARGET = errors.EtcdError(
    "INVALID_ARGUMENT", "etcdserver: invalid downgrade target version"
)
DOWNGRADE_IN_PROGRESS = errors.EtcdError(
    "FAILED_PRECONDITION", "etcdserver: cluster has a downgrade job in progress"
)
NO_INFLIGHT_DOWNGRADE = errors.EtcdError("FAILED_PRECONDITION", "etcdserver: no inflight downgrade job")
UNKNOWN_METHOD = errors.EtcdError("UNKNOWN", "etcdserver: unknown method")
# coreos/go-semver's grammar, which etcd parses a downgrade target with (after trying VERSION + ".0")
_SEMVER = re.compile(r"^(\d+)\.(\d+)\.\d+(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?$")


# The auth package's own texts for the errors its root check gives (auth.Err*), by the rpctypes text.
_AUTH_TEXTS = {
    errors.USER_EMPTY.message: "auth: user name is empty",
    errors.USER_NOT_FOUND.message: "auth: user not found",
    errors.PERMISSION_DENIED.message: "auth: permission denied",
    errors.INVALID_AUTH_TOKEN.message: "auth: invalid auth token",
}


def downgrade_target(version: str) -> tuple[int, int]:
    """etcd's convertToClusterVersion: "3.4" and "3.4.2" both mean cluster version 3.4."""
    m = _SEMVER.match(version) or _SEMVER.match(version + ".0")
    if m is None:
        raise WRONG_DOWNGRADE_FORMAT
    return int(m.group(1)), int(m.group(2))


def alarm_text(member_id: int, alarm: int) -> str:
    """An AlarmMember as etcd prints it in Status.errors (gogoproto's compact text form)."""
    return f"memberID:{member_id} alarm:{alarm_types.NAMES[alarm]} "


class MaintenanceService(Service):
    def __init__(self, sm: StateMachine, header: Header, view: ClusterView) -> None:
        super().__init__(sm, header)
        self.view = view
        # etcd's downgrade job: enabling one only marks the cluster as allowed to run the previous minor
        # version's binaries; fastetcd has none, so the mark changes nothing but the answers below.
        self._downgrading = False

    async def status(self, raw: bytes) -> bytes:
        pb.StatusRequest.FromString(raw)
        resp = pb.StatusResponse(
            version=ETCD_COMPAT_VERSION,
            dbSize=self.sm.db_size(),
            leader=self.view.leader_id(),
            # What this member has applied stands in for raft's committed and applied indexes: the
            # committed revision (a lone member applies all it commits; members of a cluster compare it).
            raftIndex=self.sm.committed_rev,
            raftTerm=self.view.term(),
            raftAppliedIndex=self.sm.committed_rev,
            errors=[alarm_text(m, a) for m, a in self.sm.active_alarms()],
            dbSizeInUse=self.sm.db_size_in_use(),
        )
        return self._fill(resp)

    def _admin(self) -> None:
        """etcd's authMaintenanceServer: defragment, snapshot and the hashes are for root only. Its errors
        skip etcd's gRPC error mapping: clients get UNKNOWN and the auth package's own text."""
        try:
            self.sm.auth.is_admin_permitted(auth_info(self.sm.auth))
        except errors.EtcdError as e:
            raise errors.EtcdError("UNKNOWN", _AUTH_TEXTS.get(e.message, e.message)) from None

    async def alarm(self, raw: bytes) -> bytes:
        r = pb.AlarmRequest.FromString(raw)
        auth_info(self.sm.auth)  # a raft request in etcd: the token is checked, any user may
        found = await self.sm.alarm(r.action, r.memberID, r.alarm)
        return self._fill(pb.AlarmResponse(alarms=[pb.AlarmMember(memberID=m, alarm=a) for m, a in found]))

    async def defragment(self, raw: bytes) -> bytes:
        pb.DefragmentRequest.FromString(raw)
        self._admin()
        await self.sm.defragment()
        return self._fill(pb.DefragmentResponse())

    async def hash(self, raw: bytes) -> bytes:
        pb.HashRequest.FromString(raw)
        self._admin()
        return self._fill(pb.HashResponse(hash=self.sm.hash_all()))

    async def hash_kv(self, raw: bytes) -> bytes:
        r = pb.HashKVRequest.FromString(raw)
        self._admin()
        h, current, compact = self.sm.hash_kv(r.revision)
        resp = pb.HashKVResponse(header=pb.ResponseHeader(revision=current), hash=h, compact_revision=compact)
        return self._fill(resp)

    async def move_leader(self, raw: bytes) -> bytes:
        r = pb.MoveLeaderRequest.FromString(raw)
        await self.view.move_leader(r.targetID)
        return self._fill(pb.MoveLeaderResponse())

    async def downgrade(self, raw: bytes) -> bytes:
        r = pb.DowngradeRequest.FromString(raw)
        cluster = tuple(int(p) for p in ETCD_CLUSTER_VERSION.split(".")[:2])
        if r.action == pb.DowngradeRequest.CANCEL:
            if not self._downgrading:
                raise NO_INFLIGHT_DOWNGRADE
            self._downgrading = False
            return self._fill(pb.DowngradeResponse(version=ETCD_CLUSTER_VERSION))
        if r.action not in (pb.DowngradeRequest.VALIDATE, pb.DowngradeRequest.ENABLE):
            raise UNKNOWN_METHOD
        if downgrade_target(r.version) != (cluster[0], cluster[1] - 1):
            raise INVALID_DOWNGRADE_TARGET
        if self._downgrading:
            raise DOWNGRADE_IN_PROGRESS
        self._downgrading = r.action == pb.DowngradeRequest.ENABLE
        return self._fill(pb.DowngradeResponse(version=ETCD_CLUSTER_VERSION))

    async def snapshot(
        self, requests: AsyncIterator[bytes], send: Callable[[bytes], Awaitable[None]]
    ) -> None:
        """etcd's Snapshot: the state in pieces with the bytes remaining, then the sha256 trailer's piece."""
        async for raw in requests:
            pb.SnapshotRequest.FromString(raw)
            break
        self._admin()
        sm = self.sm
        data = SnapshotFile(sm.committed_rev, sm.compact_rev, sm.applied_index, sm.snapshot_bytes()).encode()
        body, total = memoryview(data)[:-32], len(data) - 32
        for start in range(0, total, SNAPSHOT_PIECE):
            piece = body[start : start + SNAPSHOT_PIECE]
            resp = pb.SnapshotResponse(remaining_bytes=total - start - len(piece), blob=bytes(piece))
            await send(resp.SerializeToString())
        await send(pb.SnapshotResponse(remaining_bytes=0, blob=data[-32:]).SerializeToString())
