"""The native transport: HTTP/2 + gRPC on libnghttp2 (``_native.pyx``), beside grpc_transport.py.

Routes map a full gRPC method path to its kind and handler, with the same transport-neutral handler
signatures grpc_transport.py takes:

- ``"unary"``: ``async fn(raw: bytes) -> bytes``
- ``"bidi"``: ``async fn(requests: AsyncIterator[bytes], send: Callable[[bytes], Awaitable[None]])``
- ``"direct"``: ``fn(raw: bytes) -> bytes | asyncio.Future[bytes]``, called inside ``data_received``
  (no task): bytes are answered at once, a future from its done callback.

Errors: ``EtcdError`` → its code and message; protobuf ``DecodeError`` → INTERNAL "grpc: error
unmarshalling request: ..."; anything else → UNKNOWN, as grpcio reports it. The same port answers
HTTP/1.x, and HTTP/2 requests without a gRPC content-type (as etcd's HTTP mux does):
``http_respond(method, target) -> (status, content type, body)`` answers (the server passes
``HttpEndpoints.respond``); without one, ``GET /health`` and ``GET /version`` (see http1.py).

Against hostile or broken clients: grpc-go's connection timeout (``handshake_timeout``), its ping policy
(``min_ping_interval``, ``permit_without_stream``) and its two-phase GOAWAY on ``stop``; bounds on queued
output per stream and per connection (``stream_buffer_bytes``, ``connection_buffer_bytes``).

TLS: ``start(..., ssl_context=...)`` serves through asyncio's TLS transport (contexts from tls.py, ALPN
h2 and http/1.1); the connection protocol sees plain bytes after the handshake, and under
--client-cert-auth keeps the verified client certificate's CN as ``common_name`` for every call.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable, Collection

from fastetcd.server import _native
from fastetcd.server.grpc_transport import GRPC_OVERHEAD_BYTES
from fastetcd.server.http1 import Responder
from fastetcd.server.tls import common_name

log = logging.getLogger(__name__)

Route = tuple[str, Callable]  # ("unary" | "bidi" | "direct", handler)

# A bidi stream's send() waits while this many bytes of its messages are queued and not yet taken by
# the peer's flow-control window (one message is always accepted, so a message may exceed it).
STREAM_BUFFER_BYTES = 256 * 1024
# Receive windows (stream and connection): what a client may send before we acknowledge. Requests
# are consumed as they arrive, so this sets throughput, not memory; 4 MiB is grpcio's choice.
WINDOW_BYTES = 4 * 1024 * 1024
# etcd's default --grpc-keepalive-min-time: pings closer than this with no data sent are strikes.
MIN_PING_INTERVAL = 5.0
# The final GOAWAY follows the shutdown notice once the client answered the ping sent with it (so
# requests it sent before it saw the notice are still taken), or after this long (grpc-go waits up to a
# minute; a stopping server has only its grace period).
NOTICE_WAIT = 1.0
MAX_CONCURRENT_STREAMS = _native.UNLIMITED_STREAMS  # etcd's default --max-concurrent-streams
# grpc-go's ConnectionTimeout (120s there): a connection must send the HTTP/2 preface and its SETTINGS (or
# an HTTP/1 request head) within this long, so that slow or idle half-open connections do not pile up.
HANDSHAKE_TIMEOUT = 20.0
# A connection whose calls have this many response bytes queued (the client is not reading them) starts
# no new call and is not read from until the client takes some: what a client that opens many calls and
# never reads costs. One call's answer may exceed it (it is queued whole, as grpc-go queues it).
CONNECTION_BUFFER_BYTES = 32 * 1024 * 1024
# How calls that end_streams names end when the server stops (etcd's ErrGRPCStopped).
STOPPED_MESSAGE = "etcdserver: server stopped"


class _TlsConnection(_native.Connection):
    """A connection over asyncio's TLS transport: the handshake is done when this is made, so the verified
    client certificate is known before the first stream; its CN goes to every call (``Caller``)."""

    cert_cn = False  # etcd takes the CN as the user only with --client-cert-auth (set per connection)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.cert_cn:
            self.common_name = common_name(transport.get_extra_info("peercert"))
        super().connection_made(transport)


class NativeServer:
    """gRPC over libnghttp2 on asyncio; one instance serves all its listening sockets."""

    def __init__(
        self,
        routes: dict[str, Route],
        *,
        max_request_bytes: int,
        stream_buffer_bytes: int = STREAM_BUFFER_BYTES,
        max_concurrent_streams: int = MAX_CONCURRENT_STREAMS,
        window_bytes: int = WINDOW_BYTES,
        min_ping_interval: float = MIN_PING_INTERVAL,
        permit_without_stream: bool = False,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        connection_buffer_bytes: int = CONNECTION_BUFFER_BYTES,
        http_respond: Responder | None = None,
        client_cert_auth: bool = False,
    ) -> None:
        self._config = _native.ServerConfig(
            routes,
            max_request_bytes + GRPC_OVERHEAD_BYTES,
            stream_buffer_bytes,
            max_concurrent_streams,
            window_bytes,
            min_ping_interval,
            http_respond,
            permit_without_stream,
            handshake_timeout,
            connection_buffer_bytes,
        )
        self._servers: list[asyncio.base_events.Server] = []
        self._handshake_timeout = handshake_timeout
        self._client_cert_auth = client_cert_auth

    @property
    def max_message_bytes(self) -> int:
        return self._config.max_message_bytes

    def _protocol(self) -> _native.Connection:
        return _native.Connection(self._config)

    def _tls_connection(self) -> _native.Connection:
        conn = _TlsConnection(self._config)
        conn.cert_cn = self._client_cert_auth
        return conn

    async def start(self, host: str | None, port: int, *, reuse_port: bool = False,
                    ssl_context: ssl.SSLContext | None = None) -> list[tuple]:
        """Listen on ``host:port`` (host None or "" = all interfaces); returns the bound addresses.

        With ``ssl_context`` the port serves TLS only (server/tls.py builds it: ALPN h2 for gRPC and
        http/1.1 for the HTTP/1 endpoints, both answered after the handshake as on a plain port).
        """
        loop = asyncio.get_running_loop()
        tls_kw: dict[str, object] = {}
        if ssl_context is not None:
            # the TLS handshake gets grpc-go's connection timeout too (its clock then restarts for the
            # HTTP/2 preface, which comes after)
            tls_kw = {"ssl": ssl_context, "ssl_handshake_timeout": self._handshake_timeout}
        server = await loop.create_server(
            self._tls_connection if ssl_context is not None else self._protocol,
            host or None, port, reuse_address=True, reuse_port=reuse_port or None, backlog=1024,
            **tls_kw,  # type: ignore[arg-type]
        )
        self._servers.append(server)
        return [sock.getsockname() for sock in server.sockets]

    def buffered_bytes(self) -> int:
        """Message bytes queued on all streams, not yet handed to nghttp2 (bounded per stream)."""
        return sum(c.buffered for c in self._config.connections)

    def queued_request_bytes(self) -> int:
        """Request bytes received for bidi handlers that have not taken them yet (bounded by the window)."""
        return sum(c.queued_request_bytes for c in self._config.connections)

    def write_buffer_bytes(self) -> int:
        """Bytes the sockets' transports hold, written by us but not yet taken by the kernel."""
        return sum(c.write_buffer_size for c in self._config.connections)

    def connection_count(self) -> int:
        return len(self._config.connections)

    async def stop(self, grace: float, *, end_streams: Collection[str] = ()) -> None:
        """Stop listening; GOAWAY every connection (grpc-go's two phases); end the calls on the
        ``end_streams`` paths (streams that would never end by themselves) with UNAVAILABLE; let the other
        in-flight calls finish within ``grace``, then drop what is left."""
        deadline = time.monotonic() + grace
        for server in self._servers:
            server.close()
        conns = list(self._config.connections)
        for conn in conns:
            conn.shutdown_notice()
        notice_end = min(deadline, time.monotonic() + NOTICE_WAIT)
        while time.monotonic() < notice_end and not all(c.draining_done for c in self._config.connections):
            await asyncio.sleep(0.005)
        paths = {p.encode() for p in end_streams}
        for conn in list(self._config.connections):
            conn.goaway()
            if paths:
                conn.end_streams(paths, STOPPED_MESSAGE)
        while self._config.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for conn in list(self._config.connections):
            conn.abort()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        # Let connection_lost run (it cancels what is still running) before the caller moves on.
        for _ in range(3):
            if not self._config.connections:
                break
            await asyncio.sleep(0)
