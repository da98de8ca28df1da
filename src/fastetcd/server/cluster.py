"""The Cluster service (etcdserverpb.Cluster): the members a ``ClusterView`` knows."""

from __future__ import annotations

from fastetcd.engine.state_machine import StateMachine
from fastetcd.proto import rpc_pb2 as pb
from fastetcd.server.cluster_view import ClusterView
from fastetcd.server.header import Header
from fastetcd.server.service import Service

# Members meet in the store, not over a peer port; etcdctl prints one, so each member shows etcd's default.
PEER_URL = "http://localhost:2380"


class ClusterService(Service):
    def __init__(self, sm: StateMachine, header: Header, view: ClusterView) -> None:
        super().__init__(sm, header)
        self.view = view

    async def member_list(self, raw: bytes) -> bytes:
        pb.MemberListRequest.FromString(raw)
        resp = pb.MemberListResponse(
            members=[
                pb.Member(ID=m.id, name=m.name, peerURLs=[PEER_URL], clientURLs=list(m.client_urls))
                for m in self.view.members()
            ]
        )
        return self._fill(resp)
