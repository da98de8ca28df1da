"""The Lease service (etcdserverpb.Lease), transport-neutral.

With auth enabled every lease call needs a user, and a lease is as visible and as writable as its keys:
revoking or renewing it needs write on each attached key, listing those keys read. That is etcd 3.5.9's
rule (3.5.1 checked only revokes, and let anyone read a lease's key names: CVE-2023-32082).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

from fastetcd import errors
from fastetcd.engine.auth_tokens import AuthInfo
from fastetcd.proto import rpc_pb2 as pb
from fastetcd.server.kv import check_lease_puts
from fastetcd.server.service import Service, answer, auth_info


class LeaseService(Service):
    # grant and revoke are DIRECT handlers (routes.py): answered from the commit, no coroutine per call.

    def grant(self, raw: bytes) -> asyncio.Future[bytes]:
        r = pb.LeaseGrantRequest.FromString(raw)
        self._user()
        return answer(self.sm.lease_grant_nowait(r), self._fill)

    def revoke(self, raw: bytes) -> asyncio.Future[bytes]:
        r = pb.LeaseRevokeRequest.FromString(raw)
        auth_rev = self._may_write(self._user(), r.ID)
        return answer(self.sm.lease_revoke_nowait(r, auth_rev), self._fill)

    def _user(self) -> AuthInfo | None:
        """etcd's requireAuthInfo: the caller, who must be someone once auth is enabled."""
        auth = self.sm.auth
        info = auth_info(auth)
        if info is None and auth.enabled:
            raise errors.USER_EMPTY
        return info

    def _is_admin(self, info: AuthInfo | None) -> bool:
        try:
            self.sm.auth.is_admin_permitted(info)
        except errors.EtcdError:
            return False
        return True

    def _may_read_keys(self, info: AuthInfo | None, lease_id: int) -> None:
        """Read on every key of the lease (to learn their names)."""
        lease = self.sm.lease_status(lease_id)
        for key in lease.keys if lease is not None else ():
            self.sm.auth.is_range_permitted(info, key, b"")

    def _may_write(self, info: AuthInfo | None, lease_id: int) -> int:
        """Write on every key of the lease; returns the auth revision that was checked (0: auth off)."""
        auth = self.sm.auth
        if not auth.enabled:
            return 0
        check_lease_puts(auth, info, self.sm.lease_status(lease_id))
        return info.revision if info is not None else 0

    async def time_to_live(self, raw: bytes) -> bytes:
        r = pb.LeaseTimeToLiveRequest.FromString(raw)
        info = self._user()
        auth = self.sm.auth
        if r.keys and auth.enabled and not self._is_admin(info):
            self._may_read_keys(info, r.ID)
        status = self.sm.lease_status(r.ID)
        if status is None:
            # etcd answers an unknown lease with TTL -1, not an error
            return self._fill(pb.LeaseTimeToLiveResponse(ID=r.ID, TTL=-1))
        resp = pb.LeaseTimeToLiveResponse(ID=status.id, TTL=status.remaining, grantedTTL=status.granted)
        if r.keys:
            resp.keys.extend(status.keys)
        return self._fill(resp)

    async def leases(self, raw: bytes) -> bytes:
        pb.LeaseLeasesRequest.FromString(raw)
        info = self._user()
        auth = self.sm.auth
        if auth.enabled and not self._is_admin(info):
            for lease_id in self.sm.lease_ids():
                self._may_read_keys(info, lease_id)
        return self._fill(pb.LeaseLeasesResponse(leases=[pb.LeaseStatus(ID=i) for i in self.sm.lease_ids()]))

    async def keep_alive(
        self, requests: AsyncIterator[bytes], send: Callable[[bytes], Awaitable[None]]
    ) -> None:
        """One LeaseKeepAlive stream: every request renews in memory and is answered with the granted TTL."""
        async for raw in requests:
            r = pb.LeaseKeepAliveRequest.FromString(raw)
            info = self._user()
            if not self._is_admin(info):
                self._may_write(info, r.ID)
            rev = self.sm.committed_rev  # etcd fills the header before renewing
            ttl = await self.sm.lease_keepalive(r.ID)
            resp = pb.LeaseKeepAliveResponse(ID=r.ID, TTL=ttl)
            resp.header.SetInParent()
            self.header.fill(resp.header, rev)
            await send(resp.SerializeToString())
