"""The Cluster service (etcdserverpb.Cluster): this single member."""

from __future__ import annotations

from fastetcd.engine.state_machine import StateMachine
from fastetcd.proto import rpc_pb2 as pb
from fastetcd.server.header import Header
from fastetcd.server.service import Service


class ClusterService(Service):
    def __init__(self, sm: StateMachine, header: Header, *, name: str, client_urls: list[str]) -> None:
        super().__init__(sm, header)
        self.name = name
        self.client_urls = client_urls

    async def member_list(self, raw: bytes) -> bytes:
        pb.MemberListRequest.FromString(raw)
        resp = pb.MemberListResponse(
            members=[
                pb.Member(
                    ID=self.header.member_id,
                    name=self.name,
                    peerURLs=["http://localhost:2380"],
                    clientURLs=self.client_urls,
                )
            ]
        )
        return self._fill(resp)
