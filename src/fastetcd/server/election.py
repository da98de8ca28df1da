"""The Election service (v3electionpb.Election), transport-neutral: etcd's v3election/election.go over
concurrency.Election.

A campaigner puts ``<name>/<lease hex>`` with its value and leads once its key is the oldest under
``<name>/``. ``LeaderKey.rev`` is that key's create revision: Proclaim and Resign act only while the key
still has it (Proclaim fails with "election: not leader"; Resign then does nothing). A Campaign whose caller
goes away while it waits resigns, as etcd's does. Leader and Observe report the oldest key under the prefix;
Observe streams each of its values, then the next leader's once its key is deleted. Errors reach clients as
etcd's do: gRPC UNKNOWN with etcd's text ("election: no leader", "election: not leader", ...).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

from fastetcd import errors
from fastetcd.engine.state_machine import StateMachine
from fastetcd.keys import prefix_end
from fastetcd.proto import kv_pb2
from fastetcd.proto import rpc_pb2 as pb
from fastetcd.proto import v3election_pb2 as epb
from fastetcd.server.concurrency import Client, first_create
from fastetcd.server.header import Header

ERR_NOT_LEADER = "election: not leader"
ERR_NO_LEADER = "election: no leader"
ERR_MISSING_LEADER_KEY = '"leader" field must be provided'

_PUT = kv_pb2.Event.PUT
_DELETE = kv_pb2.Event.DELETE


def _is_leader(key: bytes, rev: int) -> pb.Compare:
    return pb.Compare(key=key, target=pb.Compare.CREATE, result=pb.Compare.EQUAL, create_revision=rev)


class ElectionService:
    def __init__(self, sm: StateMachine, header: Header, *, max_request_bytes: int) -> None:
        self.client = Client(sm, header, max_request_bytes=max_request_bytes)

    # ---------------------------------------------------------------- concurrency.Election's steps

    async def _proclaim(self, key: bytes, rev: int, lease: int, value: bytes) -> pb.TxnResponse:
        resp = await self.client.txn(pb.TxnRequest(
            compare=[_is_leader(key, rev)],
            success=[pb.RequestOp(request_put=pb.PutRequest(key=key, value=value, lease=lease))],
        ))
        if not resp.succeeded:
            raise errors.EtcdError("UNKNOWN", ERR_NOT_LEADER)
        return resp

    async def _resign(self, key: bytes, rev: int) -> pb.TxnResponse:
        return await self.client.txn(pb.TxnRequest(
            compare=[_is_leader(key, rev)],
            success=[pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(key=key))],
        ))

    # ---------------------------------------------------------------- RPCs

    async def campaign(self, raw: bytes) -> bytes:
        r = epb.CampaignRequest.FromString(raw)
        c = self.client
        lease, prefix, key = await c.queue_key(r.name, r.lease)
        resp = await c.txn(pb.TxnRequest(
            compare=[_is_leader(key, 0)],
            success=[pb.RequestOp(request_put=pb.PutRequest(key=key, value=r.value, lease=lease))],
            failure=[pb.RequestOp(request_range=pb.RangeRequest(key=key))],
        ))
        rev = resp.header.revision
        if not resp.succeeded:
            # this lease campaigns already: keep its place in line, with the new value
            kv = resp.responses[0].response_range.kvs[0]
            rev = kv.create_revision
            if kv.value != r.value:
                try:
                    await self._proclaim(key, rev, lease, r.value)
                except errors.EtcdError:
                    try:
                        await self._resign(key, rev)
                    except errors.EtcdError:
                        pass
                    raise
        try:
            await c.wait_deletes(prefix, rev - 1)
        except asyncio.CancelledError:
            c.cleanup("resign " + key.decode(errors="replace"), self._resign(key, rev))
            raise
        # etcd answers with the header of the campaign's first txn, not of the wait
        leader = epb.LeaderKey(name=r.name, key=key, rev=rev, lease=lease)
        return epb.CampaignResponse(header=resp.header, leader=leader).SerializeToString()

    async def proclaim(self, raw: bytes) -> bytes:
        r = epb.ProclaimRequest.FromString(raw)
        if not r.HasField("leader"):
            raise errors.EtcdError("UNKNOWN", ERR_MISSING_LEADER_KEY)
        lease = await self.client.session(r.leader.lease)
        resp = await self._proclaim(r.leader.key, r.leader.rev, lease, r.value)
        return epb.ProclaimResponse(header=resp.header).SerializeToString()

    async def resign(self, raw: bytes) -> bytes:
        r = epb.ResignRequest.FromString(raw)
        if not r.HasField("leader"):
            raise errors.EtcdError("UNKNOWN", ERR_MISSING_LEADER_KEY)
        await self.client.session(r.leader.lease)  # etcd opens a session first (lease 0 grants one)
        resp = await self._resign(r.leader.key, r.leader.rev)
        return epb.ResignResponse(header=resp.header).SerializeToString()

    async def leader(self, raw: bytes) -> bytes:
        r = epb.LeaderRequest.FromString(raw)
        got = self.client.get(first_create(r.name + b"/"))
        if not got.kvs:
            raise errors.EtcdError("UNKNOWN", ERR_NO_LEADER)
        return epb.LeaderResponse(header=got.header, kv=got.kvs[0]).SerializeToString()

    async def observe(
        self, requests: AsyncIterator[bytes], send: Callable[[bytes], Awaitable[None]]
    ) -> None:
        """A server stream (routed as a bidi stream, like Snapshot): the current leader's value, each value it
        proclaims, then the next leader's, and so on.

        Ends (with OK, as etcd's does) only if the history it watches was compacted away, or if the client
        sends no request; otherwise it runs until the client goes away.
        """
        raw = await anext(aiter(requests), None)
        if raw is None:
            return
        r = epb.LeaderRequest.FromString(raw)
        c = self.client
        prefix = r.name + b"/"
        try:
            while True:
                got = c.get(first_create(prefix))
                if got.kvs:
                    kv, rev = got.kvs[0], got.header.revision
                else:
                    # no leader: the first put under the prefix from the read's revision on
                    with c.watch(prefix, prefix_end(prefix), got.header.revision) as w:
                        async for ev in w.events():
                            if ev.type == _PUT:
                                kv, rev = ev.kv, ev.kv.mod_revision
                                break
                await send(self._leader_response(kv, rev))
                with c.watch(kv.key, b"", rev + 1) as w:
                    async for ev in w.events():
                        if ev.type == _DELETE:
                            break
                        await send(self._leader_response(ev.kv, ev.kv.mod_revision))
        except errors.EtcdError:
            return  # etcd's observe closes its channel on any error, and Observe then returns nil

    def _leader_response(self, kv: kv_pb2.KeyValue, rev: int) -> bytes:
        resp = epb.LeaderResponse(kv=kv)
        self.client.fill(resp.header, rev)
        return resp.SerializeToString()
