"""grpcio (grpc.aio) as a transport for the transport-neutral services.

Handlers are registered with no (de)serializers, so grpcio hands over the raw request bytes and sends the
service's response bytes as they are: protobuf work stays in the services and the Cython core, and another
transport can sit beside this one behind the same services.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
from google.protobuf.message import DecodeError

from fastetcd import errors

log = logging.getLogger(__name__)

Unary = Callable[[bytes], Awaitable[bytes]]
# A bidirectional stream: the request bytes as they arrive, and a coroutine that sends one response.
Bidi = Callable[[AsyncIterator[bytes], Callable[[bytes], Awaitable[None]]], Awaitable[None]]

# etcd accepts gRPC messages this much larger than --max-request-bytes, so that an oversized request
# reaches its own size check and gets "request is too large" instead of a transport error.
GRPC_OVERHEAD_BYTES = 512 * 1024


def _unary(fn: Unary) -> grpc.RpcMethodHandler:
    async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            return await fn(request)
        except errors.EtcdError as e:
            await context.abort(grpc.StatusCode[e.code], e.message)
        except DecodeError as e:
            await context.abort(grpc.StatusCode.INTERNAL, f"grpc: error unmarshalling request: {e}")
        raise AssertionError("unreachable")  # context.abort raises

    return grpc.unary_unary_rpc_method_handler(handler)


def _bidi(fn: Bidi) -> grpc.RpcMethodHandler:
    async def handler(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        try:
            await fn(requests, context.write)
        except errors.EtcdError as e:
            await context.abort(grpc.StatusCode[e.code], e.message)
        except DecodeError as e:
            await context.abort(grpc.StatusCode.INTERNAL, f"grpc: error unmarshalling request: {e}")

    return grpc.stream_stream_rpc_method_handler(handler)


def service_handler(
    name: str, unary: dict[str, Unary], bidi: dict[str, Bidi] | None = None
) -> grpc.GenericRpcHandler:
    """A generic handler for service ``name`` (e.g. "etcdserverpb.KV") with raw-bytes methods."""
    handlers = {m: _unary(fn) for m, fn in unary.items()}
    handlers.update({m: _bidi(fn) for m, fn in (bidi or {}).items()})
    return grpc.method_handlers_generic_handler(name, handlers)


def build_server(handlers: list[grpc.GenericRpcHandler], *, max_request_bytes: int) -> grpc.aio.Server:
    limit = max_request_bytes + GRPC_OVERHEAD_BYTES
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", 2**31 - 1),
            ("grpc.max_concurrent_streams", 2**31 - 1),
            ("grpc.so_reuseport", 0),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 5000),
        ]
    )
    server.add_generic_rpc_handlers(handlers)
    return server
