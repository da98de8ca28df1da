"""The Lease service (etcdserverpb.Lease), transport-neutral."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

from fastetcd.proto import rpc_pb2 as pb
from fastetcd.server.service import Service, answer


class LeaseService(Service):
    # grant and revoke are DIRECT handlers (routes.py): answered from the commit, no coroutine per call.

    def grant(self, raw: bytes) -> asyncio.Future[bytes]:
        return answer(self.sm.lease_grant_nowait(pb.LeaseGrantRequest.FromString(raw)), self._fill)

    def revoke(self, raw: bytes) -> asyncio.Future[bytes]:
        return answer(self.sm.lease_revoke_nowait(pb.LeaseRevokeRequest.FromString(raw)), self._fill)

    async def time_to_live(self, raw: bytes) -> bytes:
        r = pb.LeaseTimeToLiveRequest.FromString(raw)
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
        return self._fill(pb.LeaseLeasesResponse(leases=[pb.LeaseStatus(ID=i) for i in self.sm.lease_ids()]))

    async def keep_alive(
        self, requests: AsyncIterator[bytes], send: Callable[[bytes], Awaitable[None]]
    ) -> None:
        """One LeaseKeepAlive stream: every request renews in memory and is answered with the granted TTL."""
        async for raw in requests:
            r = pb.LeaseKeepAliveRequest.FromString(raw)
            rev = self.sm.committed_rev  # etcd fills the header before renewing
            ttl = await self.sm.lease_keepalive(r.ID)
            resp = pb.LeaseKeepAliveResponse(ID=r.ID, TTL=ttl)
            resp.header.SetInParent()
            self.header.fill(resp.header, rev)
            await send(resp.SerializeToString())
