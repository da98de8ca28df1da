"""clientv3/concurrency's building blocks, server-side, for the Lock and Election services.

etcd serves v3lockpb and v3electionpb by running the client recipes (``Mutex``, ``Election``, ``Session``)
over an in-process client of its own KV server. This module is that client: KV calls go to the state
machine with etcd's request checks, and a failure reaches the caller the way it crosses etcd's in-process
client, as a gRPC UNKNOWN status carrying the etcd error text. Waiting (etcd's ``waitDelete``, Observe's
watches) is an internal watcher on the watch hub: no task, no polling, nothing on the writer.

etcd's in-process client passes the caller's token along, so with auth enabled every KV call a recipe
makes is checked against the caller's permissions: so are these (``auth_info`` reads the caller).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any

from fastetcd import errors
from fastetcd.engine.state_machine import StateMachine
from fastetcd.engine.watch_hub import Watcher
from fastetcd.keys import prefix_end
from fastetcd.proto import kv_pb2
from fastetcd.proto import rpc_pb2 as pb
from fastetcd.server import kv as kvsvc
from fastetcd.server.header import Header
from fastetcd.server.service import auth_info

log = logging.getLogger(__name__)

# concurrency.defaultSessionTTL: the lease a Session grants when the request names none (lease 0).
SESSION_TTL = 60
# A waiter pulls its events from the hub at most this many bytes at a time.
WAIT_BATCH_BYTES = 1 << 20
_TXN_OPS_LIMIT = 128  # our recipes' txns have at most two ops a branch: this only keeps check_txn's shape

_DELETE = kv_pb2.Event.DELETE


def client_error(e: errors.EtcdError) -> errors.EtcdError:
    """An etcd error as etcd's in-process client hands it to the v3lock/v3election handlers: the handler
    returns rpctypes.EtcdError, which is no gRPC status, so the client sees UNKNOWN with etcd's text."""
    return errors.EtcdError("UNKNOWN", e.message)


@contextmanager
def as_client() -> Iterator[None]:
    """Errors raised inside come out as ``client_error`` turns them."""
    try:
        yield
    except errors.EtcdError as e:
        raise client_error(e) from None




def first_create(prefix: bytes) -> pb.RangeRequest:
    """clientv3.WithFirstCreate on ``prefix``: the oldest key under it."""
    return pb.RangeRequest(
        key=prefix, range_end=prefix_end(prefix), limit=1,
        sort_target=pb.RangeRequest.CREATE, sort_order=pb.RangeRequest.ASCEND,
    )


def lease_hex(lease: int) -> bytes:
    """Go's fmt "%x" of a LeaseID (an int64, so a negative one keeps its sign)."""
    return b"%x" % lease


class Client:
    """The slice of clientv3 the recipes use, over the state machine, raising client-side errors."""

    def __init__(self, sm: StateMachine, header: Header, *, max_request_bytes: int) -> None:
        self.sm = sm
        self.header = header
        self.max_request_bytes = max_request_bytes
        self._background: set[asyncio.Task] = set()

    def fill(self, h: pb.ResponseHeader, revision: int = 0) -> pb.ResponseHeader:
        self.header.fill(h, revision)
        return h

    def _check_size(self, r: Any) -> None:
        with as_client():
            kvsvc.check_request_size(r.ByteSize(), self.max_request_bytes)

    async def queue_key(self, name: bytes, lease: int) -> tuple[int, bytes, bytes]:
        """(lease, prefix, key) of a Mutex's or an Election's place in line: ``name/`` + the session's
        lease in hex, as both recipes name it."""
        lease = await self.session(lease)
        prefix = name + b"/"
        return lease, prefix, prefix + lease_hex(lease)

    async def session(self, lease: int) -> int:
        """concurrency.NewSession(WithLease(lease)) then Orphan(): the lease the recipe uses; 0 grants one.

        The session's keep-alive is orphaned before it can send anything, so nothing else happens here.
        """
        if lease != 0:
            return lease
        with as_client():
            if auth_info(self.sm.auth) is None and self.sm.auth.enabled:
                raise errors.USER_EMPTY
            resp = await self.sm.lease_grant(pb.LeaseGrantRequest(TTL=SESSION_TTL))
        return resp.ID

    async def txn(self, t: pb.TxnRequest) -> pb.TxnResponse:
        with as_client():
            kvsvc.check_txn(t, _TXN_OPS_LIMIT)
            auth = self.sm.auth
            info = auth_info(auth)
            self._check_size(t)
            if auth.enabled:
                auth.check_txn(info, t)
            resp = await self.sm.txn(t, info.revision if info is not None and auth.enabled else 0)
        self.fill(resp.header)
        return resp

    def get(self, r: pb.RangeRequest) -> pb.RangeResponse:
        with as_client():
            kvsvc.check_range(r)
            self.sm.auth.is_range_permitted(auth_info(self.sm.auth), r.key, r.range_end)
            rr = self.sm.range(r)
        resp = pb.RangeResponse(more=rr.more, count=rr.count)
        for kv in rr.kvs:
            resp.kvs.add().MergeFromString(kv)
        self.fill(resp.header, rr.rev)
        return resp

    async def delete(self, key: bytes) -> pb.DeleteRangeResponse:
        r = pb.DeleteRangeRequest(key=key)
        with as_client():
            kvsvc.check_delete(r)
            auth = self.sm.auth
            info = auth_info(auth)
            self._check_size(r)
            auth.is_delete_permitted(info, key, b"")
            resp = await self.sm.delete_range(r, info.revision if info is not None and auth.enabled else 0)
        self.fill(resp.header)
        return resp

    def cleanup(self, what: str, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` to completion even though the request that needs it was canceled: etcd's recipes
        clean up with the client's own context (``client.Ctx()``) when the caller's context is done."""

        async def run() -> None:
            try:
                await coro
            except Exception as e:  # the server may be stopping; the lease still bounds the key's life
                log.warning("cleanup after a canceled request failed", extra={"what": what, "error": str(e)})

        task = asyncio.get_running_loop().create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---------------------------------------------------------------- watching

    def watch(self, key: bytes, end: bytes, start_rev: int) -> KeyWatch:
        return KeyWatch(self.sm, key, end, start_rev)

    async def wait_delete(self, key: bytes, rev: int) -> None:
        """concurrency.waitDelete: return once ``key`` is deleted at or after revision ``rev``."""
        with self.watch(key, b"", rev) as w:
            async for ev in w.events():
                if ev.type == _DELETE:
                    return

    async def wait_deletes(self, prefix: bytes, max_create_rev: int) -> None:
        """concurrency.waitDeletes: wait until no key under ``prefix`` was created at or before
        ``max_create_rev``, waiting each time for the newest such key to go."""
        while True:
            r = pb.RangeRequest(
                key=prefix, range_end=prefix_end(prefix), limit=1, max_create_revision=max_create_rev,
                sort_target=pb.RangeRequest.CREATE, sort_order=pb.RangeRequest.DESCEND,
            )
            resp = self.get(r)
            if not resp.kvs:
                return
            await self.wait_delete(resp.kvs[0].key, resp.header.revision)


class KeyWatch:
    """An internal watcher on the hub: the committed events on [key, end) from ``start_rev`` on.

    It is the hub's kind of sink (``wake()``), registered for its lifetime (use it as a context manager),
    and pulls events with ``WatchHub.collect`` exactly as a client watch stream does.
    """

    def __init__(self, sm: StateMachine, key: bytes, end: bytes, start_rev: int) -> None:
        self.hub = sm.watch_hub
        self.watcher = Watcher(0, key, end, start_rev)
        self._wake = asyncio.Event()
        self.sid = self.hub.register(self)
        self.hub.watch(self.sid, self.watcher)

    def wake(self) -> None:
        self._wake.set()

    def __enter__(self) -> KeyWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.hub.unregister(self.sid)

    async def events(self) -> AsyncIterator[kv_pb2.Event]:
        """Events in revision order, forever; raises the client's compaction error (as a clientv3 watch
        reports ErrCompacted) if the history it needs is gone."""
        hub, w = self.hub, self.watcher
        while True:
            upto = hub.committed_rev
            if w.next_rev > upto:
                self._wake.clear()
                if w.next_rev > hub.committed_rev:
                    await self._wake.wait()
                continue
            got = hub.collect(w, upto, WAIT_BATCH_BYTES)
            if got is None:
                raise client_error(errors.COMPACTED())
            events, last = got
            w.next_rev = last + 1
            for raw in events:
                yield kv_pb2.Event.FromString(raw)
