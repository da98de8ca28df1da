"""Assemble a running server: store → state machine → services → transports."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from fastetcd import __version__
from fastetcd.config import Config
from fastetcd.engine.state_machine import StateMachine
from fastetcd.engine.watch_hub import WatchHub
from fastetcd.server import grpc_transport
from fastetcd.server.cluster import ClusterService
from fastetcd.server.header import Header, member_id_for
from fastetcd.server.kv import KVService
from fastetcd.server.lease import LeaseService
from fastetcd.server.maintenance import MaintenanceService
from fastetcd.server.watch import WatchService
from fastetcd.store.base import Store, StoreError

if TYPE_CHECKING:
    import grpc

    from fastetcd.server.native_transport import NativeServer, Route

log = logging.getLogger(__name__)


def open_store(config: Config) -> Store:
    if config.store == "embedded":
        from fastetcd.store.embedded import EmbeddedStore

        return EmbeddedStore(config.data_dir)
    if config.store == "cosmos":
        try:
            from fastetcd.store.cosmos import CosmosStore
        except ImportError as e:
            raise StoreError(f"--store cosmos needs: pip install 'fastetcd[cosmos]' ({e})") from e
        return CosmosStore(
            config.cosmos_endpoint, config.cosmos_key, config.cosmos_database, config.cosmos_container
        )
    raise StoreError(f"unknown store {config.store!r}")


async def _start_grpcio(config: Config, services: dict[str, tuple[dict, dict]]) -> grpc.aio.Server:
    server = grpc_transport.build_server(
        [grpc_transport.service_handler(name, unary, bidi) for name, (unary, bidi) in services.items()],
        max_request_bytes=config.max_request_bytes,
    )
    for url in config.client_urls:
        try:
            bound = server.add_insecure_port(url.address)
        except RuntimeError as e:  # grpcio reports a failed bind this way
            raise OSError(f"cannot listen on {url}: {e}") from None
        if bound == 0:
            raise OSError(f"cannot listen on {url}: address in use or not available")
    await server.start()
    return server


async def _start_native(config: Config, services: dict[str, tuple[dict, dict]]) -> NativeServer:
    # Imported here: the grpcio transport must work where the nghttp2 extension was not built.
    from fastetcd.server.native_transport import NativeServer

    routes: dict[str, Route] = {}
    for name, (unary, bidi) in services.items():
        routes.update({f"/{name}/{method}": ("unary", fn) for method, fn in unary.items()})
        routes.update({f"/{name}/{method}": ("bidi", fn) for method, fn in bidi.items()})
    server = NativeServer(routes, max_request_bytes=config.max_request_bytes)
    for url in config.client_urls:
        try:
            await server.start(url.host, url.port)
        except OSError as e:
            await server.stop(0)
            raise OSError(f"cannot listen on {url}: {e.strerror or e}") from None
    return server


async def serve(config: Config, stop: asyncio.Event) -> None:
    """Serve until ``stop`` is set, then drain and flush. Raises StoreError/OSError if it cannot start."""
    store = open_store(config)
    sm = StateMachine(
        store,
        snapshot_count=config.snapshot_count,
        quota_bytes=max(config.quota_backend_bytes, 0),
    )
    await sm.start()
    hub = WatchHub(sm.core, sm.committed_rev)
    sm.listeners.append(hub.publish)
    watch = None
    try:
        member_id = member_id_for(config.name, config.advertise_client_urls)
        header = Header(cluster_id=member_id ^ 0x5A5A5A5A5A5A5A5A, member_id=member_id)
        kv = KVService(
            sm, header, max_request_bytes=config.max_request_bytes, max_txn_ops=config.max_txn_ops
        )
        watch = WatchService(
            sm,
            hub,
            header,
            max_request_bytes=config.max_request_bytes,
            progress_interval=config.experimental_watch_progress_notify_interval,
        )
        watch.start()
        lease = LeaseService(sm, header)
        maintenance = MaintenanceService(sm, header)
        cluster = ClusterService(sm, header, name=config.name, client_urls=config.advertise_client_urls)
        # One method table for either transport: service → (unary methods, bidi methods).
        services: dict[str, tuple[dict, dict]] = {
            "etcdserverpb.KV": (
                {
                    "Range": kv.range,
                    "Put": kv.put,
                    "DeleteRange": kv.delete_range,
                    "Txn": kv.txn,
                    "Compact": kv.compact,
                },
                {},
            ),
            "etcdserverpb.Watch": ({}, {"Watch": watch.watch}),
            "etcdserverpb.Lease": (
                {
                    "LeaseGrant": lease.grant,
                    "LeaseRevoke": lease.revoke,
                    "LeaseTimeToLive": lease.time_to_live,
                    "LeaseLeases": lease.leases,
                },
                {"LeaseKeepAlive": lease.keep_alive},
            ),
            "etcdserverpb.Maintenance": ({"Status": maintenance.status}, {}),
            "etcdserverpb.Cluster": ({"MemberList": cluster.member_list}, {}),
        }
        if config.transport == "native":
            server = await _start_native(config, services)
        else:
            server = await _start_grpcio(config, services)
        log.info(
            "serving client traffic insecurely",
            extra={"address": ",".join(config.listen_client_urls), "version": __version__,
                   "revision": sm.committed_rev},
        )
        try:
            stopped = asyncio.ensure_future(stop.wait())
            halted = asyncio.ensure_future(sm.halt.wait())
            await asyncio.wait([stopped, halted], return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            halted.cancel()
        finally:
            log.info("stopping server")
            await server.stop(2)
    finally:
        if watch is not None:
            await watch.stop()
        await sm.stop()
        await store.close()
        log.info("stopped", extra={"revision": sm.committed_rev})
    if sm.halted is not None:
        raise StoreError(sm.halted)
