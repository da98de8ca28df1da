"""KV.RangeStream (etcd 3.7), transport-neutral: one RangeRequest in, RangeStreamResponse chunks out.

A server-streaming method, served as a bidi stream (the client's single request, then its half-close, look
the same on the wire). The chunks come from ``engine/range_stream.py`` one at a time: the next chunk is read
from the core only after ``send`` returned for the previous one, so a client that reads slowly holds one
chunk of server memory, and a cancelled stream stops the scan.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

from fastetcd import errors
from fastetcd.engine.range_stream import Chunk, RangeStreamReader, check_range_stream
from fastetcd.engine.state_machine import StateMachine
from fastetcd.proto import rpc_pb2 as pb
from fastetcd.server._wire import encode_range_response
from fastetcd.server.header import Header

# grpc-go's answers (as etcd 3.7 gives them) when a server-streaming call sends no request, or more than one.
NO_REQUEST = errors.EtcdError(
    "INTERNAL", "cardinality violation: received no request message from non-client-streaming RPC"
)
MANY_REQUESTS = errors.EtcdError(
    "INTERNAL", "cardinality violation: received multiple request messages for non-client-streaming RPC"
)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_chunk(header: Header, chunk: Chunk) -> bytes:
    """RangeStreamResponse{range_response}: kvs only, or on the last chunk header, kvs, more and count."""
    if chunk.last:
        inner = memoryview(encode_range_response(header.encode(chunk.header_rev), chunk.kvs, chunk.more,
                                                 chunk.count))
    else:
        # the encoder always writes a header field; a middle chunk has none (drop the empty "0a 00")
        inner = memoryview(encode_range_response(b"", chunk.kvs, False, 0))[2:]
    return b"".join((b"\x0a", _varint(len(inner)), inner))


async def first_request(requests: AsyncIterator[bytes]) -> bytes:
    """The one request of a server-streaming call. Like grpc-go, it waits for the client's half-close, so
    that a second request is refused before any answer."""
    it = aiter(requests)
    try:
        raw = await anext(it)
    except StopAsyncIteration:
        raise errors.EtcdError(NO_REQUEST.code, NO_REQUEST.message) from None
    try:
        await anext(it)
    except StopAsyncIteration:
        return raw
    raise errors.EtcdError(MANY_REQUESTS.code, MANY_REQUESTS.message)


async def send_range_stream(
    sm: StateMachine, header: Header, max_request_bytes: int, r: pb.RangeRequest,
    send: Callable[[bytes], Awaitable[None]],
) -> None:
    """Answer a RangeRequest that passed Range's checks, chunk by chunk (etcd's kvServer.RangeStream)."""
    check_range_stream(r)
    for chunk in RangeStreamReader(sm, r, max_request_bytes):
        await send(encode_chunk(header, chunk))
