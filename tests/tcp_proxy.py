"""A TCP proxy between one fastetcd node and the Cosmos test server, to cut that node off (partition tests).

Runs its own event loop on a thread, so synchronous tests drive it. ``stall()`` stops relaying in both
directions and holds every connection open (the node's Cosmos requests hang, as behind a black-holed
route); ``release()`` relays again, what was held included; ``reset()`` closes every connection.

The Cosmos test server names the address a client used in its account answer (the Host header), so the
SDK keeps all its traffic on the proxy instead of learning the real endpoint and going around it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any


class TcpProxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._loop = asyncio.new_event_loop()
        self._open = asyncio.Event()
        self._conns: set[asyncio.StreamWriter] = set()
        self._server: asyncio.AbstractServer | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy", daemon=True)
        self._thread.start()
        self.port: int = self._call(self._start)

    def _call(self, fn: Callable[[], Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(fn(), self._loop).result(10)

    async def _start(self) -> int:
        self._open.set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self._server.sockets[0].getsockname()[1]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        self._conns.update((writer, up_writer))
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer),
                             return_exceptions=True)
        for w in (writer, up_writer):
            self._conns.discard(w)
            w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await self._open.wait()  # stalled: hold the bytes (and the connection) until release
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    def stall(self) -> None:
        async def do() -> None:
            self._open.clear()
        self._call(do)

    def release(self) -> None:
        async def do() -> None:
            self._open.set()
        self._call(do)

    def reset(self) -> None:
        async def do() -> None:
            for w in list(self._conns):
                w.transport.abort()
        self._call(do)

    def close(self) -> None:
        async def do() -> None:
            self._open.set()
            if self._server is not None:
                self._server.close()
            for w in list(self._conns):
                w.transport.abort()
        self._call(do)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
