"""The Lock service (v3lockpb.Lock), transport-neutral: etcd's v3lock/lock.go over concurrency.Mutex.

Lock(name, lease) puts ``<name>/<lease hex>`` with the lease if it does not exist yet, and owns the lock once
that key has the lowest create revision under ``<name>/``: it waits for every older key to be deleted (by
Unlock, a revoke or the lease's expiry). Locking twice with one lease is one acquisition. A Lock whose caller
goes away while it waits deletes its key, as etcd's Mutex.Lock does when its context is canceled. A lease of
0 gets a fresh 60-second lease (etcd's session default), which nothing keeps alive.
"""

from __future__ import annotations

import asyncio

from fastetcd import errors
from fastetcd.engine.state_machine import StateMachine
from fastetcd.proto import rpc_pb2 as pb
from fastetcd.proto import v3lock_pb2 as lockpb
from fastetcd.server.concurrency import Client, first_create
from fastetcd.server.header import Header

ERR_SESSION_EXPIRED = "mutex: session is expired"


class LockService:
    def __init__(self, sm: StateMachine, header: Header, *, max_request_bytes: int) -> None:
        self.client = Client(sm, header, max_request_bytes=max_request_bytes)

    async def lock(self, raw: bytes) -> bytes:
        r = lockpb.LockRequest.FromString(raw)
        c = self.client
        lease, prefix, key = await c.queue_key(r.name, r.lease)
        # Mutex.tryAcquire: enqueue myKey unless this lease already did; read the owner in the same txn.
        owner = pb.RequestOp(request_range=first_create(prefix))
        unqueued = pb.Compare(key=key, target=pb.Compare.CREATE, result=pb.Compare.EQUAL, create_revision=0)
        resp = await c.txn(pb.TxnRequest(
            compare=[unqueued],
            success=[pb.RequestOp(request_put=pb.PutRequest(key=key, lease=lease)), owner],
            failure=[pb.RequestOp(request_range=pb.RangeRequest(key=key)), owner],
        ))
        my_rev = resp.header.revision
        if not resp.succeeded:
            my_rev = resp.responses[0].response_range.kvs[0].create_revision
        owners = resp.responses[1].response_range.kvs
        if not owners or owners[0].create_revision == my_rev:
            return lockpb.LockResponse(header=resp.header, key=key).SerializeToString()
        try:
            await c.wait_deletes(prefix, my_rev - 1)
        except asyncio.CancelledError:
            c.cleanup("unlock " + key.decode(errors="replace"), c.delete(key))
            raise
        except errors.EtcdError:
            try:
                await c.delete(key)
            except errors.EtcdError:
                pass  # etcd ignores the failed unlock and reports the wait's error
            raise
        # the waiter's own key may have gone with its lease while it waited
        got = c.get(pb.RangeRequest(key=key))
        if not got.kvs:
            raise errors.EtcdError("UNKNOWN", ERR_SESSION_EXPIRED)
        return lockpb.LockResponse(header=got.header, key=key).SerializeToString()

    async def unlock(self, raw: bytes) -> bytes:
        r = lockpb.UnlockRequest.FromString(raw)
        resp = await self.client.delete(r.key)
        return lockpb.UnlockResponse(header=resp.header).SerializeToString()
