"""An HTTP/1.1 listener for etcd's HTTP endpoints (``--listen-metrics-urls``), on h11 and asyncio.

It runs on the server's event loop, so the endpoints read engine state between requests, never while
the writer changes it. Keep-alive connections are served request after request; anything that is not
HTTP/1.1 is answered 400 (when h11 can still say so) and the connection closed.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from http import HTTPStatus

import h11

from fastetcd.server.http_endpoints import HttpEndpoints

log = logging.getLogger(__name__)

_MAX_REQUEST_BYTES = 64 * 1024  # headers of a GET; a peer sending more is not a metrics scraper
_IDLE_TIMEOUT = 60.0


class HttpListener:
    def __init__(self, endpoints: HttpEndpoints) -> None:
        self.endpoints = endpoints
        self._servers: list[asyncio.Server] = []

    async def listen(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> None:
        """Serve on ``host:port``; over TLS with ``ssl_context`` (an https:// metrics URL)."""
        tls_kw: dict[str, object] = {}
        if ssl_context is not None:
            tls_kw = {"ssl": ssl_context, "ssl_handshake_timeout": 10.0}
        server = await asyncio.start_server(self._serve, host or None, port, **tls_kw)  # type: ignore[arg-type]
        self._servers.append(server)

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_REQUEST_BYTES)
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await asyncio.wait_for(reader.read(65536), _IDLE_TIMEOUT)
                    conn.receive_data(data)  # b"" marks the peer's close
                    continue
                if isinstance(event, h11.Request):
                    status, ctype, body = self.endpoints.respond(event.method.decode(), event.target.decode())
                    headers = [("content-type", ctype), ("content-length", str(len(body)))]
                    reason = HTTPStatus(status).phrase.encode()
                    writer.write(conn.send(h11.Response(status_code=status, headers=headers, reason=reason)))
                    if event.method != b"HEAD":
                        writer.write(conn.send(h11.Data(data=body)))
                    writer.write(conn.send(h11.EndOfMessage()))
                    await writer.drain()
                elif isinstance(event, h11.ConnectionClosed) or conn.our_state is h11.MUST_CLOSE:
                    return
                elif conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                    conn.start_next_cycle()
        except h11.RemoteProtocolError as e:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                body = b"Bad Request\n"
                headers = [("content-type", "text/plain"), ("content-length", str(len(body)))]
                try:
                    writer.write(conn.send(h11.Response(status_code=e.error_status_hint, headers=headers)))
                    writer.write(conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
                except h11.LocalProtocolError:
                    pass
        except (TimeoutError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()
