"""The route table of a node in a replicated cluster: what it serves itself, what only the leader may.

Every node serves the same etcd methods (routes.py). On the leader each call is served locally after one
role check. On a follower:

* leader-only calls (writes, lease TTLs and keep-alives, compaction, alarms, defragment, MoveLeader, auth
  changes, lock and election changes) go to the leader (leader_link.py) and come back once this node has
  applied the revision the answer reports;
* linearizable reads (a Range or RangeStream without ``serializable``, a read-only Txn) wait for the read
  index, then are served here; on the leader they wait for the append under way, if any (followers may
  already serve what it wrote: StateMachine.append_in_flight);
* everything else — serializable reads, watches, Status, MemberList, hashes, snapshots, health,
  Authenticate — is local.

Examples: ``etcdctl --endpoints=follower put k v`` is forwarded, and ``etcdctl --endpoints=follower get k``
right after sees v (the put returned only once the follower applied its revision);
``get --consistency=s`` is answered from the follower's memory, possibly a few milliseconds behind.

A request with require-leader metadata on a node that knows no leader fails at once with etcd's
"etcdserver: no leader" instead of waiting for one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

from fastetcd import errors
from fastetcd.engine.apply import is_txn_readonly
from fastetcd.engine.replica import Replica
from fastetcd.proto import rpc_pb2 as pb
from fastetcd.server.call_context import CALLER
from fastetcd.server.leader_link import READ_INDEX_PATH, LeaderLink, read_index_answer
from fastetcd.server.routes import BIDI, DIRECT, UNARY, Bidi, Direct, Routes, Unary

_KV = "/etcdserverpb.KV/"
_AUTH = "/etcdserverpb.Auth/"
LEADER_ONLY = frozenset(
    [f"{_KV}{m}" for m in ("Put", "DeleteRange", "Compact")]
    + [f"/etcdserverpb.Lease/{m}" for m in ("LeaseGrant", "LeaseRevoke", "LeaseTimeToLive", "LeaseLeases",
                                            "LeaseKeepAlive")]
    + [f"/etcdserverpb.Maintenance/{m}" for m in ("Alarm", "Defragment", "MoveLeader")]
    + [f"{_AUTH}{m}" for m in ("AuthEnable", "AuthDisable", "UserAdd", "UserDelete", "UserChangePassword",
                               "UserGrantRole", "UserRevokeRole", "RoleAdd", "RoleDelete",
                               "RoleGrantPermission", "RoleRevokePermission")]
    + ["/v3lockpb.Lock/Lock", "/v3lockpb.Lock/Unlock"]
    + [f"/v3electionpb.Election/{m}" for m in ("Campaign", "Proclaim", "Resign")]
)
# Local, except that a linearizable one first waits for the read index.
READS = frozenset([f"{_KV}Range", f"{_KV}RangeStream", f"{_KV}Txn", "/v3electionpb.Election/Leader"])
# Streams that need a leader to mean anything: with require-leader they fail on a leaderless node.
_WATCHES = frozenset(["/etcdserverpb.Watch/Watch", "/v3electionpb.Election/Observe"])


def _needs_read_index(path: str, raw: bytes) -> bool:
    if path == f"{_KV}Txn":
        return True  # only read-only ones reach here; etcd has no serializable Txn
    if path in (f"{_KV}Range", f"{_KV}RangeStream"):
        return not pb.RangeRequest.FromString(raw).serializable
    return True


def replicated_routes(routes: Routes, replica: Replica, link: LeaderLink) -> Routes:
    """``routes`` wrapped for one node of a replicated cluster (see the module docstring)."""
    out: Routes = {}
    for path, (kind, fn) in routes.items():
        if path in LEADER_ONLY:
            out[path] = _leader_only(path, kind, fn, replica, link)
        elif path in READS:
            out[path] = _read(path, kind, fn, replica, link)
        elif path in _WATCHES:
            out[path] = (kind, _leader_required_stream(fn, replica))  # type: ignore[arg-type]
        else:
            out[path] = (kind, fn)

    async def read_index(raw: bytes) -> bytes:
        return read_index_answer(await replica.read_index())

    out[READ_INDEX_PATH] = (UNARY, read_index)
    return out


def _check_leader_known(replica: Replica) -> None:
    if CALLER.get().require_leader and replica.leader() is None:
        raise errors.NO_LEADER


async def _as_awaitable(kind: str, fn: Unary | Direct, raw: bytes) -> bytes:
    if kind == DIRECT:
        res = fn(raw)  # type: ignore[call-arg]
        return res if type(res) is bytes else await res  # type: ignore[misc]
    return await fn(raw)  # type: ignore[misc]


def _leader_only(path: str, kind: str, fn, replica: Replica, link: LeaderLink):
    if kind == BIDI:
        async def stream(requests: AsyncIterator[bytes], send: Callable[[bytes], Awaitable[None]]) -> None:
            if replica.is_leader:
                return await fn(requests, send)
            _check_leader_known(replica)
            await link.forward_stream(path, requests, send)

        return BIDI, stream

    def local(raw: bytes) -> Awaitable[bytes]:
        return _as_awaitable(kind, fn, raw)

    if kind == DIRECT:
        def direct(raw: bytes):
            if replica.is_leader:
                return fn(raw)
            _check_leader_known(replica)
            return asyncio.ensure_future(link.forward(path, raw, local))

        return DIRECT, direct

    async def unary(raw: bytes) -> bytes:
        if replica.is_leader:
            return await fn(raw)
        _check_leader_known(replica)
        return await link.forward(path, raw, local)

    return UNARY, unary


def _read(path: str, kind: str, fn, replica: Replica, link: LeaderLink):
    is_txn = path == f"{_KV}Txn"

    if kind == BIDI:  # RangeStream: the first request says whether it is linearizable
        async def stream(requests: AsyncIterator[bytes], send: Callable[[bytes], Awaitable[None]]) -> None:
            first = await anext(requests, None)
            if first is not None and _needs_read_index(path, first):
                if replica.is_leader:
                    await replica.leader_barrier()
                else:
                    _check_leader_known(replica)
                    await link.read_barrier()
            await fn(_prepend(first, requests), send)

        return BIDI, stream

    async def after_barrier(raw: bytes) -> bytes:
        _check_leader_known(replica)
        await link.read_barrier()
        return await _as_awaitable(kind, fn, raw)

    def follower_call(raw: bytes):
        if is_txn:
            t = pb.TxnRequest.FromString(raw)
            if not is_txn_readonly(t):
                return link.forward(path, raw, lambda r: _as_awaitable(kind, fn, r))
        if not _needs_read_index(path, raw):
            return None
        return after_barrier(raw)

    async def on_leader(raw: bytes) -> bytes:
        await replica.leader_barrier()
        return await _as_awaitable(kind, fn, raw)

    def call(raw: bytes):
        """None: serve ``raw`` right here, now; else the awaitable that serves it."""
        if replica.is_leader:
            # The fast path: with no append under way the leader's memory is as new as anything served.
            if replica.sm.append_in_flight() is None or not _needs_read_index(path, raw):
                return None
            return on_leader(raw)
        return follower_call(raw)

    if kind == DIRECT:
        def direct(raw: bytes):
            pending = call(raw)
            return fn(raw) if pending is None else asyncio.ensure_future(pending)

        return DIRECT, direct

    async def unary(raw: bytes) -> bytes:
        pending = call(raw)
        return await (fn(raw) if pending is None else pending)

    return UNARY, unary


async def _prepend(first: bytes | None, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if first is not None:
        yield first
    async for raw in rest:
        yield raw


def _leader_required_stream(fn: Bidi, replica: Replica) -> Bidi:
    async def stream(requests: AsyncIterator[bytes], send: Callable[[bytes], Awaitable[None]]) -> None:
        _check_leader_known(replica)
        await fn(requests, send)

    return stream
