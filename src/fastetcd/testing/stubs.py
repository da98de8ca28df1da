"""gRPC channels and stubs for etcd's v3 API (fastetcd and etcd alike)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import grpc

from fastetcd.testing.tls import DEFAULT, ClientTls, _Default, resolve_client

if TYPE_CHECKING:
    from fastetcd.proto import rpc_pb2_grpc


# No size limit either way: a client must be able to send what a server is meant to reject as too large,
# and to read whatever it answers.
UNLIMITED_CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
]

_READY_PROBE_KEY = b"__ready_probe__"
_RANGE_METHOD = "/etcdserverpb.KV/Range"
# RangeRequest{key: _READY_PROBE_KEY}: field 1 (key), wire type 2 (length-delimited), a one-byte length.
_READY_PROBE_REQUEST = b"\x0a" + bytes([len(_READY_PROBE_KEY)]) + _READY_PROBE_KEY


def channel(endpoint: str, *, unlimited: bool = False, options: Sequence[tuple[str, object]] = (),
            tls: ClientTls | None | _Default = DEFAULT) -> grpc.Channel:
    """A channel to ``host:port``; ``unlimited`` lifts gRPC's message size limits.

    Plain text, or TLS with ``tls`` (by default the process-wide client TLS, see fastetcd.testing.tls).
    """
    opts = [*(UNLIMITED_CHANNEL_OPTIONS if unlimited else []), *options]
    client = resolve_client(tls)
    if client is None:
        return grpc.insecure_channel(endpoint, options=opts)
    return grpc.secure_channel(endpoint, client.grpc_credentials(endpoint), options=opts)


def kv_stub(ch: grpc.Channel) -> rpc_pb2_grpc.KVStub:
    """etcdserverpb.KV on ``ch``."""
    from fastetcd.proto import rpc_pb2_grpc

    return rpc_pb2_grpc.KVStub(ch)


def watch_stub(ch: grpc.Channel) -> rpc_pb2_grpc.WatchStub:
    """etcdserverpb.Watch on ``ch``."""
    from fastetcd.proto import rpc_pb2_grpc

    return rpc_pb2_grpc.WatchStub(ch)


def lease_stub(ch: grpc.Channel) -> rpc_pb2_grpc.LeaseStub:
    """etcdserverpb.Lease on ``ch``."""
    from fastetcd.proto import rpc_pb2_grpc

    return rpc_pb2_grpc.LeaseStub(ch)


def maintenance_stub(ch: grpc.Channel) -> rpc_pb2_grpc.MaintenanceStub:
    """etcdserverpb.Maintenance on ``ch``."""
    from fastetcd.proto import rpc_pb2_grpc

    return rpc_pb2_grpc.MaintenanceStub(ch)


def range_answers(endpoint: str, timeout: float = 1.0, tls: ClientTls | None | _Default = DEFAULT) -> bool:
    """True when the server at ``endpoint`` answers a Range with OK, or refuses it for want of a user.

    This is the readiness probe for both servers: more than accepting TCP connections, it means the
    server serves reads (for etcd, a linearizable read: it has a leader). A server with auth enabled
    answers an anonymous Range with "user name is empty", once it would have served it.

    The request is encoded by hand and the answer left as bytes, so probing never imports fastetcd.proto:
    its messages (mvccpb.KeyValue, etcdserverpb.*) would clash in protobuf's default descriptor pool with an
    etcd client library's own copies of them, in a user's test process (fastetcd.pytest_plugin).
    """
    try:
        ch = channel(endpoint, tls=tls)
    except OSError:  # insecure_skip_verify could not fetch the certificate: not listening yet
        return False
    with ch:
        range_call = ch.unary_unary(_RANGE_METHOD)  # no (de)serializers: bytes in, bytes out
        try:
            range_call(_READY_PROBE_REQUEST, timeout=timeout)
        except grpc.RpcError as e:
            return e.details() == "etcdserver: user name is empty"  # type: ignore[attr-defined]
    return True
