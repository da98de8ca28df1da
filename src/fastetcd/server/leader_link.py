"""A follower's line to the leader: forwarded calls, forwarded keep-alive streams, and the read index.

Calls travel as they arrived (the same method path, the request's raw bytes, the caller's token and
require-leader metadata) over one gRPC channel per leader URL, so the leader serves them exactly as it
serves its own clients, errors included: a client cannot tell which node answered.

The read index is how a follower serves a linearizable read: the leader's committed revision, asked
*after* the read began, is at least that of every write acknowledged before it; once this node has applied
it, a local read is as fresh as the leader's. Reads that arrive while one question is in flight wait for
the next one (the answer in flight may predate them), so under load one round trip serves many reads.
Example: reads A and B arrive, question 1 goes out; C arrives; answer 1 (rev 40) serves A and B, question
2 goes out at once for C; answer 2 (rev 41) serves C.
"""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from fastetcd import errors
from fastetcd.engine.replica import Replica
from fastetcd.proto import rpc_pb2 as pb
from fastetcd.server.call_context import CALLER

log = logging.getLogger(__name__)

READ_INDEX_PATH = "/fastetcdpb.Replica/ReadIndex"
# How long a call waits for a leader to be known before it fails (etcd: election timeout-ish waits end
# in "request timed out"; with require-leader at once in "no leader").
LEADER_WAIT = 7.0
CALL_TIMEOUT = 7.0
_POLL = 0.05


def read_index_answer(rev: int) -> bytes:
    """What the leader answers to READ_INDEX_PATH: a ResponseHeader carrying its committed revision."""
    return pb.ResponseHeader(revision=rev).SerializeToString()


def header_revision(raw: bytes) -> int:
    """The revision in an etcd response's header (field 1 in every etcd response message)."""
    return pb.PutResponse.FromString(raw).header.revision


def _target(url: str) -> tuple[str, bool]:
    u = urllib.parse.urlsplit(url)
    return f"{u.hostname}:{u.port or (443 if u.scheme == 'https' else 2379)}", u.scheme == "https"


class LeaderLink:
    """Forwarding from this node to whichever node leads (``replica.leader()``)."""

    def __init__(self, replica: Replica, *, credentials: grpc.ChannelCredentials | None = None) -> None:
        self.replica = replica
        self._credentials = credentials
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._next_read: asyncio.Future[int] | None = None
        self._asking = False

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for ch in channels.values():
            await ch.close()

    # ------------------------------------------------------------------ who leads

    async def leader_url(self) -> str | None:
        """The leader's first client URL; None when this node itself leads. Waits for a leader to be known
        (not a stale view of this node), failing with etcd's errors when none comes."""
        deadline = time.monotonic() + LEADER_WAIT
        me = self.replica.sm.member_id
        while True:
            if self.replica.is_leader:
                return None
            leader = self.replica.leader()
            if leader is not None and leader.member.id != me and leader.member.client_urls:
                return leader.member.client_urls[0]
            if CALLER.get().require_leader:
                raise errors.NO_LEADER
            if time.monotonic() >= deadline:
                raise errors.TIMEOUT
            await asyncio.sleep(_POLL)

    def _channel(self, url: str) -> grpc.aio.Channel:
        ch = self._channels.get(url)
        if ch is None:
            target, secure = _target(url)
            if secure:
                ch = grpc.aio.secure_channel(target, self._credentials or grpc.ssl_channel_credentials())
            else:
                ch = grpc.aio.insecure_channel(target)
            self._channels[url] = ch
        return ch

    @staticmethod
    def _metadata() -> list[tuple[str, str]]:
        c = CALLER.get()
        md = []
        if c.token is not None:
            md.append(("token", c.token))
        if c.require_leader:
            md.append(("hasleader", "true"))
        return md

    # ------------------------------------------------------------------ unary calls

    async def call(self, url: str, path: str, raw: bytes) -> bytes:
        """``path`` on the node at ``url``; its gRPC error becomes the same EtcdError here."""
        method = self._channel(url).unary_unary(path)
        try:
            return await method(raw, metadata=self._metadata(), timeout=CALL_TIMEOUT)
        except grpc.aio.AioRpcError as e:
            if _never_sent(e):
                raise _Undelivered(url) from None
            raise _etcd_error(e) from None

    async def forward(self, path: str, raw: bytes, local: Callable[[bytes], Awaitable[bytes]]) -> bytes:
        """Serve a leader-only call: here if this node leads, else at the leader; a forwarded answer is
        returned once this node has applied the revision it reports (a client's next read here sees it)."""
        answer = await self._at_leader(path, raw, local)
        rev = header_revision(answer)
        if rev > self.replica.sm.committed_rev:
            await self.replica.wait_applied(rev, CALL_TIMEOUT)
        return answer

    # ------------------------------------------------------------------ linearizable reads

    async def read_barrier(self) -> None:
        """Return once this node has applied every write acknowledged before the call (see module doc)."""
        if self.replica.is_leader:
            return
        loop = asyncio.get_running_loop()
        if self._next_read is None:
            self._next_read = loop.create_future()
        fut = self._next_read
        if not self._asking:
            self._asking = True
            loop.create_task(self._ask_rounds())
        rev = await asyncio.shield(fut)
        if rev > self.replica.sm.committed_rev:
            await self.replica.wait_applied(rev, CALL_TIMEOUT)

    async def _ask_rounds(self) -> None:
        try:
            while self._next_read is not None:
                fut, self._next_read = self._next_read, None
                try:
                    rev = await self._read_index()
                except BaseException as e:  # noqa: BLE001 - every waiter gets it
                    if not fut.done():
                        fut.set_exception(e if isinstance(e, Exception) else errors.STOPPED())
                    if not isinstance(e, Exception):
                        raise
                else:
                    if not fut.done():
                        fut.set_result(rev)
        finally:
            self._asking = False

    async def _read_index(self) -> int:
        async def here(_: bytes) -> bytes:
            return read_index_answer(await self.replica.read_index())

        return pb.ResponseHeader.FromString(await self._at_leader(READ_INDEX_PATH, b"", here)).revision

    async def _at_leader(self, path: str, raw: bytes, local: Callable[[bytes], Awaitable[bytes]]) -> bytes:
        """``path`` served by the leader, this node included. A node that answers "not leader" refused the
        call before doing anything (its leadership had lapsed): ask whoever leads next, until LEADER_WAIT."""
        deadline = time.monotonic() + LEADER_WAIT
        while True:
            url = await self.leader_url()
            try:
                return await (local(raw) if url is None else self.call(url, path, raw))
            except _Undelivered:
                # The leader we knew is gone and the call never reached it: safe to send to its successor.
                if time.monotonic() >= deadline:
                    raise errors.LEADER_CHANGED() from None
            except errors.EtcdError as e:
                if e.message != errors.NOT_LEADER.message or time.monotonic() >= deadline:
                    raise
            await asyncio.sleep(_POLL)

    # ------------------------------------------------------------------ streams

    async def forward_stream(
        self, path: str, requests: AsyncIterator[bytes], send: Callable[[bytes], Awaitable[None]]
    ) -> None:
        """A bidi stream (LeaseKeepAlive) relayed to the leader for as long as both ends keep it open.
        A change of leader ends it with the leader's error; clients open a new one (clientv3 does)."""
        url = await self.leader_url()
        assert url is not None
        call = self._channel(url).stream_stream(path)(metadata=self._metadata())

        async def pump() -> None:
            async for raw in requests:
                await call.write(raw)
            await call.done_writing()

        pumping = asyncio.ensure_future(pump())
        try:
            while True:
                raw = await call.read()
                if raw is grpc.aio.EOF:
                    break
                await send(raw)
        except grpc.aio.AioRpcError as e:
            raise _etcd_error(e) from None
        finally:
            pumping.cancel()
            call.cancel()


class _Undelivered(Exception):
    """A call that certainly did not reach the node (no connection could be made)."""


def _never_sent(e: grpc.aio.AioRpcError) -> bool:
    # grpc-core's text when no connection to the target could be established: nothing was sent.
    details = e.details() or ""
    return e.code() == grpc.StatusCode.UNAVAILABLE and "failed to connect to all addresses" in details


def _etcd_error(e: grpc.aio.AioRpcError) -> errors.EtcdError:
    code: Any = e.code()
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) and not (
        e.details() or ""
    ).startswith("etcdserver:"):
        # The leader is gone or unreachable (not one of its own answers): what etcd says when a
        # proposal is lost with its leader.
        return errors.LEADER_CHANGED()
    return errors.EtcdError(code.name, e.details() or "")
