"""Startup wiring, as etcd's ``embed`` package: store → state machine → services → transports.

Nothing here serves a request. It opens the store the config names, recovers the state machine from it,
builds the transport-neutral services over the engine, routes gRPC method paths to them, and runs a
transport until told to stop; then it drains in the reverse order, so that whatever was acknowledged is
durable before the process exits.
"""

from __future__ import annotations

import asyncio
import logging
import os
import urllib.parse
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY

from fastetcd import __version__
from fastetcd.config import Config
from fastetcd.engine.auth_store import MAX_BCRYPT_COST, MIN_BCRYPT_COST, AuthStore
from fastetcd.engine.auth_tokens import AuthOptionsError, token_provider
from fastetcd.engine.compactor import Compactor
from fastetcd.engine.replica import Replica
from fastetcd.engine.state_machine import StateMachine
from fastetcd.engine.state_metrics import StateCollector
from fastetcd.server import grpc_transport
from fastetcd.server.auth import AuthService
from fastetcd.server.cluster import ClusterService
from fastetcd.server.cluster_view import ClusterView, ReplicaView, SingleMember
from fastetcd.server.election import ElectionService
from fastetcd.server.header import Header, member_id_for
from fastetcd.server.health import HealthService
from fastetcd.server.http_endpoints import HttpEndpoints
from fastetcd.server.http_listener import HttpListener
from fastetcd.server.kv import KVService
from fastetcd.server.leader_link import LeaderLink
from fastetcd.server.lease import LeaseService
from fastetcd.server.lock import LockService
from fastetcd.server.maintenance import MaintenanceService
from fastetcd.server.replicated_routes import replicated_routes
from fastetcd.server.routes import BIDI, DIRECT, UNARY, Bidi, Direct, Routes, Unary
from fastetcd.server.tls import ALPN_GRPC, ALPN_HTTP1, ServerTLS, TLSError, self_cert
from fastetcd.server.watch import WatchService

if TYPE_CHECKING:
    import grpc

    from fastetcd.server.native_transport import NativeServer
from fastetcd.store.base import Store, StoreError
from fastetcd.store.leadership import Leadership, Member, TimingRule

log = logging.getLogger(__name__)

# How often a follower reads the log for new entries (a cheap query on either store; on Cosmos about ten
# small queries a second per follower).
FOLLOW_INTERVAL = 0.1
# How long in-flight calls have to finish once the server is told to stop.
STOP_GRACE = 2.0
# Streams that never end by themselves: on stop the native transport ends them at once with UNAVAILABLE
# (clientv3 reconnects them elsewhere), where etcd cuts them when its grace runs out; the other calls
# finish within STOP_GRACE.
ENDLESS_STREAMS = (
    "/etcdserverpb.Watch/Watch",
    "/etcdserverpb.Lease/LeaseKeepAlive",
    "/grpc.health.v1.Health/Watch",
    "/v3electionpb.Election/Observe",
)


def open_store(config: Config) -> Store:
    if config.store == "embedded":
        from fastetcd.store.embedded import EmbeddedStore

        return EmbeddedStore(config.data_dir, shared=config.replicated)
    if config.store == "cosmos":
        try:
            from fastetcd.store.cosmos import CosmosStore
        except ImportError as e:
            raise StoreError(f"--store cosmos needs: pip install 'fastetcd[cosmos]' ({e})") from e
        return CosmosStore(
            config.cosmos_endpoint, config.cosmos_key, config.cosmos_database, config.cosmos_container
        )
    raise StoreError(f"unknown store {config.store!r}")


def open_leadership(config: Config, store: Store, member: Member) -> Leadership:
    """Who leads among the nodes over this store (store/leadership.py)."""
    timing = TimingRule.for_lease(config.ha_lease)
    if config.store == "cosmos":
        from fastetcd.store.cosmos_leadership import CosmosLeadership

        return CosmosLeadership(store, member, timing)  # type: ignore[arg-type]
    from fastetcd.store.embedded_leadership import EmbeddedLeadership

    return EmbeddedLeadership(config.data_dir, member, timing)


def cluster_id_for(config: Config, member_id: int) -> int:
    """etcd's cluster id: the same on every member. Members of a replicated cluster share their store,
    so its identity is the cluster's; a lone member derives it from its own id, as before."""
    if not config.replicated:
        return member_id ^ 0x5A5A5A5A5A5A5A5A
    # Not the endpoint: members may reach one account through different (regional, proxied) addresses.
    where = (f"cosmos|{config.cosmos_database}|{config.cosmos_container}"
             if config.store == "cosmos" else f"embedded|{os.path.abspath(config.data_dir)}")
    return member_id_for(where, [])


def etcd_routes(
    kv: KVService, watch: WatchService, lease: LeaseService, maintenance: MaintenanceService,
    cluster: ClusterService, auth: AuthService, lock: LockService, election: ElectionService,
) -> Routes:
    """etcd's gRPC method paths → the services' raw-bytes handlers, for any transport."""
    methods: dict[str, dict[str, Unary | Direct | Bidi]] = {
        "KV": {"Range": kv.range, "Put": kv.put, "DeleteRange": kv.delete_range, "Txn": kv.txn,
               "Compact": kv.compact, "RangeStream": kv.range_stream},
        "Watch": {"Watch": watch.watch},
        "Lease": {"LeaseGrant": lease.grant, "LeaseRevoke": lease.revoke, "LeaseKeepAlive": lease.keep_alive,
                  "LeaseTimeToLive": lease.time_to_live, "LeaseLeases": lease.leases},
        "Maintenance": {"Status": maintenance.status, "Alarm": maintenance.alarm,
                        "Defragment": maintenance.defragment, "Hash": maintenance.hash,
                        "HashKV": maintenance.hash_kv, "Snapshot": maintenance.snapshot,
                        "MoveLeader": maintenance.move_leader, "Downgrade": maintenance.downgrade},
        "Cluster": {"MemberList": cluster.member_list},
        "Auth": {"Authenticate": auth.authenticate, "AuthStatus": auth.auth_status,
                 "AuthEnable": auth.auth_enable, "AuthDisable": auth.auth_disable,
                 "UserAdd": auth.user_add, "UserGet": auth.user_get, "UserList": auth.user_list,
                 "UserDelete": auth.user_delete, "UserChangePassword": auth.user_change_password,
                 "UserGrantRole": auth.user_grant_role, "UserRevokeRole": auth.user_revoke_role,
                 "RoleAdd": auth.role_add, "RoleGet": auth.role_get, "RoleList": auth.role_list,
                 "RoleDelete": auth.role_delete, "RoleGrantPermission": auth.role_grant_permission,
                 "RoleRevokePermission": auth.role_revoke_permission},
    }
    health = HealthService()
    # Snapshot and health Watch stream only responses; served as bidi streams, they look the same on the wire.
    streams = {"Watch", "LeaseKeepAlive", "Snapshot", "RangeStream"}
    # The hot calls answer without a coroutine (see KVService).
    direct = {"Range", "Put", "DeleteRange", "Txn", "LeaseGrant", "LeaseRevoke"}
    routes: Routes = {
        f"/etcdserverpb.{service}/{method}": (
            BIDI if method in streams else DIRECT if method in direct else UNARY, fn)
        for service, handlers in methods.items()
        for method, fn in handlers.items()
    }
    routes["/grpc.health.v1.Health/Check"] = (UNARY, health.check)
    routes["/grpc.health.v1.Health/Watch"] = (BIDI, health.watch)
    # etcd's server-side concurrency recipes (server/etcdserver/api/v3lock, v3election)
    routes["/v3lockpb.Lock/Lock"] = (UNARY, lock.lock)
    routes["/v3lockpb.Lock/Unlock"] = (UNARY, lock.unlock)
    for method, fn in (("Campaign", election.campaign), ("Proclaim", election.proclaim),
                       ("Leader", election.leader), ("Resign", election.resign)):
        routes[f"/v3electionpb.Election/{method}"] = (UNARY, fn)
    routes["/v3electionpb.Election/Observe"] = (BIDI, election.observe)  # a server stream, as Snapshot
    return routes


def client_tls(config: Config) -> ServerTLS | None:
    """The client (and metrics) listeners' TLS, or None when no URL is https:// (etcd's embed rules)."""
    urls = [*config.client_urls, *config.metrics_urls]
    if not any(u.scheme == "https" for u in urls):
        if config.cert_file or config.client_cert_auth:
            log.warning("scheme is HTTP while key and cert files or --client-cert-auth are present; ignoring "
                        "them", extra={"client-urls": ",".join(config.listen_client_urls)})
        return None
    cert_file = key_file = None
    if config.auto_tls and not config.cert_file:
        # etcd's ClientAutoTLS: a self-signed pair for the listen and advertise hosts, in the data dir.
        hosts = [u.host for u in config.client_urls]
        hosts += [u.hostname or "" for u in map(urllib.parse.urlsplit, config.advertise_client_urls)]
        cert_file, key_file = self_cert(
            os.path.join(config.data_dir, "fixtures", "client"), hosts, config.self_signed_cert_validity
        )
        log.warning("automatically generated a self-signed client certificate (--auto-tls)",
                    extra={"cert-file": cert_file})
    elif config.auto_tls:
        log.warning("ignoring client auto TLS since certs given")
    try:
        return ServerTLS(config.tls_info(cert_file, key_file))
    except TLSError as e:
        raise OSError(str(e)) from None


def leader_credentials(config: Config) -> grpc.ChannelCredentials | None:
    """How a follower calls the leader's https:// client URL: trusting --trusted-ca-file and presenting this
    node's own certificate (the leader may require one); None: the system's roots."""
    if not config.trusted_ca_file:
        return None
    import grpc

    def read(path: str) -> bytes | None:
        if not path:
            return None
        with open(path, "rb") as f:
            return f.read()

    return grpc.ssl_channel_credentials(
        read(config.trusted_ca_file), read(config.key_file), read(config.cert_file)
    )


async def _start_grpcio(config: Config, routes: Routes, tls: ServerTLS | None) -> grpc.aio.Server:
    server = grpc_transport.build_server(
        routes,
        max_request_bytes=config.max_request_bytes,
        max_concurrent_streams=config.max_concurrent_streams,
        client_cert_auth=config.client_cert_auth,
    )
    for url in config.client_urls:
        try:
            if url.scheme == "https":
                assert tls is not None
                bound = server.add_secure_port(url.address, grpc_transport.server_credentials(tls))
            else:
                bound = server.add_insecure_port(url.address)
        except RuntimeError as e:  # grpcio reports a failed bind this way
            raise OSError(f"cannot listen on {url}: {e}") from None
        if bound == 0:
            raise OSError(f"cannot listen on {url}: address in use or not available")
    await server.start()
    return server


async def _start_native(
    config: Config, routes: Routes, endpoints: HttpEndpoints, tls: ServerTLS | None
) -> NativeServer:
    # Imported here: the grpcio transport must work where the nghttp2 extension was not built.
    try:
        from fastetcd.server.native_transport import NativeServer
    except ImportError as e:
        raise OSError(
            "--transport native is not in this build: libnghttp2's headers were missing when fastetcd was "
            f"installed (Debian: apt-get install libnghttp2-dev, then reinstall) ({e})"
        ) from None

    # The client port also answers HTTP/1.1 (/health, /version, /metrics...), as etcd's does.
    server = NativeServer(
        routes,
        max_request_bytes=config.max_request_bytes,
        max_concurrent_streams=config.max_concurrent_streams,
        handshake_timeout=config.handshake_timeout,
        http_respond=endpoints.respond,
        client_cert_auth=config.client_cert_auth,
    )
    for url in config.client_urls:
        ctx = tls.server_context(ALPN_GRPC) if tls is not None and url.scheme == "https" else None
        try:
            await server.start(url.host, url.port, ssl_context=ctx)
        except OSError as e:
            await server.stop(0)
            raise OSError(f"cannot listen on {url}: {e.strerror or e}") from None
    return server


async def serve(config: Config, stop: asyncio.Event) -> None:
    """Serve until ``stop`` is set, then drain and flush. Raises StoreError/OSError if it cannot start."""
    kind, opts, jwt_ttl = config.auth_token_options
    try:
        tokens = token_provider(kind, opts, float(config.auth_token_ttl), jwt_ttl)
    except AuthOptionsError as e:
        raise OSError(f"--auth-token: {e}") from None
    if not MIN_BCRYPT_COST <= config.bcrypt_cost <= MAX_BCRYPT_COST:
        log.warning(
            "use default bcrypt cost instead of the invalid given cost",
            extra={"min-cost": MIN_BCRYPT_COST, "max-cost": MAX_BCRYPT_COST, "default-cost": 10,
                   "given-cost": config.bcrypt_cost},
        )
    tls = client_tls(config)  # before the store: a bad certificate fails the start with nothing opened
    store = open_store(config)
    member_id = member_id_for(config.name, config.advertise_client_urls)
    member = Member(member_id, config.name, tuple(config.advertise_client_urls))
    sm = StateMachine(
        store,
        snapshot_count=config.snapshot_count,
        quota_bytes=max(config.quota_backend_bytes, 0),
        member_id=member_id,
        auth=AuthStore(tokens, config.bcrypt_cost),
    )
    replica: Replica | None = None
    if config.replicated:
        # Followers read the log every FOLLOW_INTERVAL: what their watchers wait at most for an event.
        replica = Replica(sm, open_leadership(config, store, member), poll=FOLLOW_INTERVAL)
        await replica.start()
    else:
        await sm.start()
    compactor = Compactor(
        sm,
        may_compact=(lambda: replica.is_leader) if replica is not None else None,
        period=config.auto_compaction_period,
        revisions=config.auto_compaction_revisions,
        revision_interval=config.auto_compaction_revision_interval,
    )
    compactor.start()
    state_metrics = StateCollector(sm)
    REGISTRY.register(state_metrics)
    endpoints = HttpEndpoints(sm)
    http = HttpListener(endpoints)
    watch = None
    link: LeaderLink | None = None
    try:
        header = Header(cluster_id=cluster_id_for(config, member_id), member_id=member_id)
        view: ClusterView = SingleMember(member) if replica is None else ReplicaView(replica)
        if replica is not None:
            replica.on_term.append(header.set_term)
        kv = KVService(
            sm, header, max_request_bytes=config.max_request_bytes, max_txn_ops=config.max_txn_ops
        )
        watch = WatchService(
            sm,
            header,
            max_request_bytes=config.max_request_bytes,
            progress_interval=config.experimental_watch_progress_notify_interval,
        )
        watch.start()
        routes = etcd_routes(
            kv,
            watch,
            LeaseService(sm, header),
            MaintenanceService(sm, header, view),
            ClusterService(sm, header, view),
            AuthService(sm, header),
            LockService(sm, header, max_request_bytes=config.max_request_bytes),
            ElectionService(sm, header, max_request_bytes=config.max_request_bytes),
        )
        if replica is not None:
            link = LeaderLink(replica, credentials=leader_credentials(config))
            routes = replicated_routes(routes, replica, link)
        native: NativeServer | None = None
        server: grpc.aio.Server | NativeServer
        if config.transport == "native":
            server = native = await _start_native(config, routes, endpoints, tls)
        else:
            server = await _start_grpcio(config, routes, tls)
        secure = any(u.scheme == "https" for u in config.client_urls)
        log.info(
            "serving client traffic securely" if secure else "serving client traffic insecurely",
            extra={"address": ",".join(config.listen_client_urls), "version": __version__,
                   "revision": sm.committed_rev},
        )
        for url in config.metrics_urls:
            ctx = tls.server_context(ALPN_HTTP1) if tls is not None and url.scheme == "https" else None
            await http.listen(url.host, url.port, ctx)
        if config.metrics_urls:
            log.info("serving metrics and health", extra={"address": ",".join(config.listen_metrics_urls)})
        try:
            stopped = asyncio.ensure_future(stop.wait())
            # A replica turns a lost or fenced leadership into following; a lone node stops.
            halted = asyncio.ensure_future(sm.halt.wait() if replica is None else replica.halted.wait())
            await asyncio.wait([stopped, halted], return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            halted.cancel()
        finally:
            log.info("stopping server")
            await http.stop()
            if native is not None:
                await native.stop(STOP_GRACE, end_streams=ENDLESS_STREAMS)
            else:
                await server.stop(STOP_GRACE)
    finally:
        REGISTRY.unregister(state_metrics)
        await compactor.stop()
        if watch is not None:
            await watch.stop()
        if link is not None:
            await link.close()
        if replica is not None:
            await replica.stop()
        else:
            await sm.stop()
        await store.close()
        log.info("stopped", extra={"revision": sm.committed_rev})
    if sm.halted is not None:
        raise StoreError(sm.halted)
