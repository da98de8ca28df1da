"""The seam between services and transports: gRPC method paths → raw-bytes handlers.

Every transport (grpcio's, the native one) serves the same table, so a service is written once and a
method added here is served by all of them. Handlers take and return serialized protobuf bytes; errors
are ``fastetcd.errors.EtcdError`` (a gRPC status code name and etcd's message).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Literal

Unary = Callable[[bytes], Awaitable[bytes]]
# A plain function called where the request arrived, with no coroutine: it returns the response bytes
# (a read, answered at once) or a future of them (a write, answered from the writer's commit).
Direct = Callable[[bytes], "bytes | asyncio.Future[bytes]"]
# A bidirectional stream: the request bytes as they arrive, and a coroutine that sends one response.
Bidi = Callable[[AsyncIterator[bytes], Callable[[bytes], Awaitable[None]]], Awaitable[None]]

UNARY: Literal["unary"] = "unary"
DIRECT: Literal["direct"] = "direct"
BIDI: Literal["bidi"] = "bidi"

# "/etcdserverpb.KV/Range" -> (DIRECT, handler)
Routes = dict[str, tuple[Literal["unary", "direct", "bidi"], Unary | Direct | Bidi]]
