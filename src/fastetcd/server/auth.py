"""The Auth service (etcdserverpb.Auth), for now what a server with auth disabled answers.

etcd clients configured with a user name call Authenticate when they connect and carry on when etcd says
authentication is not enabled; answering that (instead of Unimplemented) is what lets them connect.
Users, roles and enabling auth are not built yet.
"""

from __future__ import annotations

from fastetcd import errors
from fastetcd.proto import rpc_pb2 as pb
from fastetcd.server.service import Service

AUTH_NOT_ENABLED = errors.EtcdError("FAILED_PRECONDITION", "etcdserver: authentication is not enabled")
# etcd's auth store starts at revision 1 and counts every change to users, roles and the enabled flag.
AUTH_REVISION = 1


class AuthService(Service):
    async def authenticate(self, raw: bytes) -> bytes:
        pb.AuthenticateRequest.FromString(raw)
        raise AUTH_NOT_ENABLED

    async def auth_status(self, raw: bytes) -> bytes:
        pb.AuthStatusRequest.FromString(raw)
        return self._fill(pb.AuthStatusResponse(enabled=False, authRevision=AUTH_REVISION))

    async def user_list(self, raw: bytes) -> bytes:
        pb.AuthUserListRequest.FromString(raw)
        return self._fill(pb.AuthUserListResponse())

    async def role_list(self, raw: bytes) -> bytes:
        pb.AuthRoleListRequest.FromString(raw)
        return self._fill(pb.AuthRoleListResponse())
