"""grpcio (grpc.aio) as a transport for the transport-neutral services.

Handlers are registered with no (de)serializers, so grpcio hands over the raw request bytes and sends the
service's response bytes as they are: protobuf work stays in the services and the Cython core, and another
transport can sit beside this one behind the same services.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
from google.protobuf.message import DecodeError

from fastetcd import errors, metrics
from fastetcd.metrics import RpcMetrics
from fastetcd.server.call_context import ANONYMOUS, ANONYMOUS_REQUIRING_LEADER, CALLER, Caller
from fastetcd.server.routes import BIDI, DIRECT, Bidi, Direct, Routes, Unary
from fastetcd.server.tls import ServerTLS

log = logging.getLogger(__name__)

# etcd accepts gRPC messages this much larger than --max-request-bytes, so that an oversized request
# reaches its own size check and gets "request is too large" instead of a transport error.
GRPC_OVERHEAD_BYTES = 512 * 1024


def _caller(context: grpc.aio.ServicerContext, cert_cn: bool) -> Caller:
    token = None
    require_leader = False
    for key, value in context.invocation_metadata() or ():
        if key == "token":
            token = value
        elif key == "hasleader":
            require_leader = value == "true"
    common_name = None
    # etcd takes the CN as the user only with --client-cert-auth (EtcdServer.AuthInfoFromCtx); a
    # certificate required by --trusted-ca-file alone authenticates the connection, not a user.
    names = (context.auth_context() or {}).get("x509_common_name") if cert_cn else None
    if names:
        common_name = names[0].decode()
    if token is None and common_name is None:
        return ANONYMOUS_REQUIRING_LEADER if require_leader else ANONYMOUS
    return Caller(token, common_name, require_leader)


def _awaiting(fn: Direct) -> Unary:
    """A DIRECT handler as a coroutine function: grpcio runs every call in a task anyway."""

    async def call(request: bytes) -> bytes:
        response = fn(request)
        return response if type(response) is bytes else await response

    return call


def _unary(fn: Unary, rpc: RpcMetrics, cert_cn: bool) -> grpc.RpcMethodHandler:
    async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        rpc.start()
        CALLER.set(_caller(context, cert_cn))
        metrics.GRPC_RECEIVED.n += len(request)
        try:
            response = await fn(request)
        except errors.EtcdError as e:
            rpc.handled(e.code)
            await context.abort(grpc.StatusCode[e.code], e.message)
        except DecodeError as e:
            rpc.handled("INTERNAL")
            await context.abort(grpc.StatusCode.INTERNAL, f"grpc: error unmarshalling request: {e}")
        else:
            rpc.handled("OK")
            metrics.GRPC_SENT.n += len(response)
            return response
        raise AssertionError("unreachable")  # context.abort raises

    return grpc.unary_unary_rpc_method_handler(handler)


def _bidi(fn: Bidi, rpc: RpcMetrics, cert_cn: bool) -> grpc.RpcMethodHandler:
    async def handler(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        rpc.start()
        CALLER.set(_caller(context, cert_cn))

        async def counted() -> AsyncIterator[bytes]:
            async for request in requests:
                metrics.GRPC_RECEIVED.n += len(request)
                yield request

        async def send(response: bytes) -> None:
            metrics.GRPC_SENT.n += len(response)
            await context.write(response)

        code = "CANCELLED"  # unless the handler finishes one way or another below
        try:
            await fn(counted(), send)
            code = "OK"
        except errors.EtcdError as e:
            code = e.code
            await context.abort(grpc.StatusCode[e.code], e.message)
        except DecodeError as e:
            code = "INTERNAL"
            await context.abort(grpc.StatusCode.INTERNAL, f"grpc: error unmarshalling request: {e}")
        finally:
            rpc.handled(code)

    return grpc.stream_stream_rpc_method_handler(handler)


def _generic_handlers(routes: Routes, cert_cn: bool) -> list[grpc.GenericRpcHandler]:
    """One generic handler per gRPC service ("etcdserverpb.KV"), with raw-bytes methods."""
    services: dict[str, dict[str, grpc.RpcMethodHandler]] = {}
    for path, (kind, fn) in routes.items():
        service, method = path.lstrip("/").split("/")
        if kind == BIDI:
            handler = _bidi(fn, RpcMetrics("bidi_stream", path), cert_cn)  # type: ignore[arg-type]
        elif kind == DIRECT:
            handler = _unary(_awaiting(fn), RpcMetrics("unary", path), cert_cn)  # type: ignore[arg-type]
        else:
            handler = _unary(fn, RpcMetrics("unary", path), cert_cn)  # type: ignore[arg-type]
        services.setdefault(service, {})[method] = handler
    return [grpc.method_handlers_generic_handler(name, methods) for name, methods in services.items()]


def build_server(
    routes: Routes, *, max_request_bytes: int, max_concurrent_streams: int = 2**31 - 1,
    client_cert_auth: bool = False,
) -> grpc.aio.Server:
    """A grpc.aio server for ``routes``; with ``client_cert_auth`` the services see the verified client
    certificate's CN (``Caller.common_name``)."""
    limit = max_request_bytes + GRPC_OVERHEAD_BYTES
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", 2**31 - 1),
            ("grpc.max_concurrent_streams", min(max_concurrent_streams, 2**31 - 1)),  # a C int
            ("grpc.so_reuseport", 0),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 5000),
        ]
    )
    server.add_generic_rpc_handlers(_generic_handlers(routes, client_cert_auth))
    return server


def server_credentials(tls: ServerTLS) -> grpc.ServerCredentials:
    """TLS credentials that follow ``tls``'s files: grpcio asks the fetcher on every new connection, and
    it answers with the new certificate once the files changed (etcd rereads them per handshake)."""
    seen = tls.generation

    def configuration() -> grpc.ServerCertificateConfiguration:
        pem = tls.pem()
        return grpc.ssl_server_certificate_configuration(
            [(pem.private_key, pem.cert_chain)], root_certificates=pem.root_certificates
        )

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        nonlocal seen
        try:
            tls.refresh()
            if tls.generation == seen:
                return None  # grpcio keeps the current one
            seen = tls.generation
            return configuration()
        except Exception:  # an exception here would fail the handshake with no trace of why
            log.exception("TLS certificate reload failed")
            return None

    return grpc.dynamic_ssl_server_credentials(
        configuration(), fetch, require_client_authentication=tls.info.requires_client_cert
    )
