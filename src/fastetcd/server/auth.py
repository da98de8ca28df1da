"""The Auth service (etcdserverpb.Auth): etcd's v3rpc/auth.go and the auth half of v3_server.go.

The rules live in engine/auth_store.py; this file does what etcd's API layer does before a request reaches
them: bcrypt (off the event loop: a hash at cost 10 takes tens of milliseconds), the caller's token, and
which requests need the root role. Changes go through the state machine's writer like every other write.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable

import bcrypt

from fastetcd import errors
from fastetcd.engine import auth_store as a
from fastetcd.engine.auth_tokens import AuthInfo
from fastetcd.engine.state_machine import StateMachine
from fastetcd.proto import auth_pb2
from fastetcd.proto import rpc_pb2 as pb
from fastetcd.server.header import Header
from fastetcd.server.service import Service, auth_info

# bcrypt reads at most 72 bytes of a password; Go's bcrypt ignores the rest, Python's refuses it.
BCRYPT_MAX_PASSWORD = 72


def _pw(password: str) -> bytes:
    return password.encode()[:BCRYPT_MAX_PASSWORD]


def _matches(password: str, hashed: bytes) -> bool:
    try:
        return bcrypt.checkpw(_pw(password), hashed)
    except ValueError:  # not a bcrypt hash (a password changed to "" stores none): nothing matches
        return False


class AuthService(Service):
    def __init__(self, sm: StateMachine, header: Header) -> None:
        super().__init__(sm, header)
        self.auth = sm.auth
        self._token_index = 0

    # -------------------------------------------------------------- helpers

    def _admin(self) -> Callable[[], None]:
        """The caller's root check, run now (so no bcrypt work is done for a refused caller) and returned
        to run again against the auth state the change meets."""
        info = auth_info(self.auth)

        def authorize() -> None:
            self.auth.is_admin_permitted(info)

        authorize()
        return authorize

    async def _hash(self, password: str) -> str:
        salt = bcrypt.gensalt(self.auth.bcrypt_cost)
        hashed = await asyncio.to_thread(bcrypt.hashpw, _pw(password), salt)
        return base64.b64encode(hashed).decode()

    async def _change(self, kind: int, req, resp):
        await self.sm.auth_change(kind, req, self._admin())
        return self._fill(resp)

    # -------------------------------------------------------------- Authenticate

    async def authenticate(self, raw: bytes) -> bytes:
        r = pb.AuthenticateRequest.FromString(raw)
        auth = self.auth
        while True:
            hashed, checked_rev = auth.check_password(r.name, r.password)
            if not await asyncio.to_thread(_matches, r.password, hashed):
                raise errors.AUTH_FAILED
            if auth.revision == checked_rev:
                break
            # the user changed while bcrypt ran: check again against what is in force now (etcd retries)
        user = auth.state.users.get(r.name)
        if user is None or user.no_password:
            raise errors.AUTH_FAILED
        # etcd numbers a simple token with the raft index of its Authenticate entry; any increasing
        # number does, and fastetcd logs no entry for it.
        self._token_index = max(self._token_index + 1, self.sm.applied_index + 1)
        token = auth.tokens.assign(r.name, auth.revision, self._token_index)
        return self._fill(pb.AuthenticateResponse(token=token))

    # -------------------------------------------------------------- enabling

    async def auth_enable(self, raw: bytes) -> bytes:
        req = pb.AuthEnableRequest.FromString(raw)
        return await self._change(a.AUTH_ENABLE, req, pb.AuthEnableResponse())

    async def auth_disable(self, raw: bytes) -> bytes:
        req = pb.AuthDisableRequest.FromString(raw)
        return await self._change(a.AUTH_DISABLE, req, pb.AuthDisableResponse())

    async def auth_status(self, raw: bytes) -> bytes:
        pb.AuthStatusRequest.FromString(raw)
        self._admin()
        return self._fill(pb.AuthStatusResponse(enabled=self.auth.enabled, authRevision=self.auth.revision))

    # -------------------------------------------------------------- users

    async def user_add(self, raw: bytes) -> bytes:
        r = pb.AuthUserAddRequest.FromString(raw)
        self._admin()
        if not (r.HasField("options") and r.options.no_password):
            # as etcd: only the hash goes into the log, whatever hash the client may have sent
            r.hashedPassword = await self._hash(r.password)
            r.password = ""
        return await self._change(a.USER_ADD, r, pb.AuthUserAddResponse())

    async def user_delete(self, raw: bytes) -> bytes:
        r = pb.AuthUserDeleteRequest.FromString(raw)
        return await self._change(a.USER_DELETE, r, pb.AuthUserDeleteResponse())

    async def user_change_password(self, raw: bytes) -> bytes:
        r = pb.AuthUserChangePasswordRequest.FromString(raw)
        self._admin()
        if r.password:
            r.hashedPassword = await self._hash(r.password)
            r.password = ""
        return await self._change(a.USER_CHANGE_PASSWORD, r, pb.AuthUserChangePasswordResponse())

    async def user_grant_role(self, raw: bytes) -> bytes:
        r = pb.AuthUserGrantRoleRequest.FromString(raw)
        return await self._change(a.USER_GRANT_ROLE, r, pb.AuthUserGrantRoleResponse())

    async def user_revoke_role(self, raw: bytes) -> bytes:
        r = pb.AuthUserRevokeRoleRequest.FromString(raw)
        return await self._change(a.USER_REVOKE_ROLE, r, pb.AuthUserRevokeRoleResponse())

    async def user_get(self, raw: bytes) -> bytes:
        r = pb.AuthUserGetRequest.FromString(raw)
        info = auth_info(self.auth)
        self._self_or_admin(info, r.name == (info.username if info else ""))
        user = self.auth.state.users.get(r.name)
        if user is None:
            raise errors.USER_NOT_FOUND
        return self._fill(pb.AuthUserGetResponse(roles=user.roles))

    async def user_list(self, raw: bytes) -> bytes:
        pb.AuthUserListRequest.FromString(raw)
        self._admin()
        return self._fill(pb.AuthUserListResponse(users=sorted(self.auth.state.users)))

    def _self_or_admin(self, info: AuthInfo | None, own: bool) -> None:
        """etcd lets a user read its own user and the roles it holds without the root role."""
        try:
            self.auth.is_admin_permitted(info)
        except errors.EtcdError:
            if not own:
                raise

    # -------------------------------------------------------------- roles

    async def role_add(self, raw: bytes) -> bytes:
        r = pb.AuthRoleAddRequest.FromString(raw)
        return await self._change(a.ROLE_ADD, r, pb.AuthRoleAddResponse())

    async def role_delete(self, raw: bytes) -> bytes:
        r = pb.AuthRoleDeleteRequest.FromString(raw)
        return await self._change(a.ROLE_DELETE, r, pb.AuthRoleDeleteResponse())

    async def role_grant_permission(self, raw: bytes) -> bytes:
        r = pb.AuthRoleGrantPermissionRequest.FromString(raw)
        return await self._change(a.ROLE_GRANT_PERMISSION, r, pb.AuthRoleGrantPermissionResponse())

    async def role_revoke_permission(self, raw: bytes) -> bytes:
        r = pb.AuthRoleRevokePermissionRequest.FromString(raw)
        return await self._change(a.ROLE_REVOKE_PERMISSION, r, pb.AuthRoleRevokePermissionResponse())

    async def role_get(self, raw: bytes) -> bytes:
        r = pb.AuthRoleGetRequest.FromString(raw)
        info = auth_info(self.auth)
        self._self_or_admin(info, info is not None and self.auth.has_role(info.username, r.role))
        perms = self.auth.state.roles.get(r.role)
        if perms is None:
            raise errors.ROLE_NOT_FOUND
        resp = pb.AuthRoleGetResponse(
            perm=[auth_pb2.Permission(key=k, range_end=e, permType=t) for k, e, t in perms]
        )
        return self._fill(resp)

    async def role_list(self, raw: bytes) -> bytes:
        pb.AuthRoleListRequest.FromString(raw)
        self._admin()
        return self._fill(pb.AuthRoleListResponse(roles=sorted(self.auth.state.roles)))
