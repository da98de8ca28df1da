"""grpc.health.v1.Health, registered as etcd 3.5 registers it: the server ("") is SERVING."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

from grpc_health.v1 import health_pb2

from fastetcd import errors

_SERVING = health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING).SerializeToString()
_UNKNOWN = errors.EtcdError("NOT_FOUND", "unknown service")  # grpc-go's health server's answer


class HealthService:
    async def check(self, raw: bytes) -> bytes:
        if health_pb2.HealthCheckRequest.FromString(raw).service:
            raise _UNKNOWN
        return _SERVING

    async def watch(self, requests: AsyncIterator[bytes], send: Callable[[bytes], Awaitable[None]]) -> None:
        """The status now, then nothing until the client goes: it never changes while the server runs."""
        async for raw in requests:
            if health_pb2.HealthCheckRequest.FromString(raw).service:
                # grpc-go answers a watch of an unknown service with SERVICE_UNKNOWN, and keeps watching
                unknown = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
                await send(health_pb2.HealthCheckResponse(status=unknown).SerializeToString())
            else:
                await send(_SERVING)
            break
        await asyncio.Event().wait()
