"""The Maintenance service (etcdserverpb.Maintenance): Status so far."""

from __future__ import annotations

from fastetcd import ETCD_COMPAT_VERSION
from fastetcd.engine.state_machine import StateMachine
from fastetcd.proto import rpc_pb2 as pb
from fastetcd.server.header import Header


class MaintenanceService:
    def __init__(self, sm: StateMachine, header: Header) -> None:
        self.sm = sm
        self.header = header

    async def status(self, raw: bytes) -> bytes:
        pb.StatusRequest.FromString(raw)
        size = self.sm.db_size()
        resp = pb.StatusResponse(
            version=ETCD_COMPAT_VERSION,
            dbSize=size,
            leader=self.header.member_id,
            # A single member applies every entry it commits: the raft index follows the revision.
            raftIndex=self.sm.committed_rev,
            raftTerm=self.header.raft_term,
            raftAppliedIndex=self.sm.committed_rev,
            dbSizeInUse=size,
        )
        resp.header.SetInParent()
        self.header.fill(resp.header, self.sm.committed_rev)
        return resp.SerializeToString()
