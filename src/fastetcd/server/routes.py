"""The seam between services and transports: gRPC method paths → raw-bytes handlers.

Every transport (grpcio's, the native one) serves the same table, so a service is written once and a
method added here is served by all of them. Handlers take and return serialized protobuf bytes; errors
are ``fastetcd.errors.EtcdError`` (a gRPC status code name and etcd's message).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Literal

Unary = Callable[[bytes], Awaitable[bytes]]
# A bidirectional stream: the request bytes as they arrive, and a coroutine that sends one response.
Bidi = Callable[[AsyncIterator[bytes], Callable[[bytes], Awaitable[None]]], Awaitable[None]]

UNARY: Literal["unary"] = "unary"
BIDI: Literal["bidi"] = "bidi"

# "/etcdserverpb.KV/Range" -> (UNARY, handler)
Routes = dict[str, tuple[Literal["unary", "bidi"], Unary | Bidi]]
