"""Who is calling: what a transport learned about the current RPC, for the services that need it.

Services take and return bytes (routes.py), so what is not in the request message travels beside it: the
transport sets ``CALLER`` before it runs the handler, and the handler (auth checks, mostly) reads it.
A context variable is copied into every task created while it is set, so a bidi stream's handler task
sees the caller that opened it.

Example: etcdctl --user root:pw get k sends metadata ``token: <simple token>``; over mutual TLS the
verified client certificate's subject CN (say ``kube-apiserver``) comes along too. The auth store takes
the token if there is one, else the CN (etcd's rule: a certificate stands in for a password).

Where the CN comes from (only under --client-cert-auth, as in etcd): grpcio's ``auth_context()``
(grpc_transport.py); on the native transport the TLS connection keeps it as ``Connection.common_name``
(native_transport.py, at the handshake) and _native.pyx's ``Stream.caller()`` puts it beside the token
header when it sets ``CALLER`` for a call.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Caller:
    token: str | None = None  # the "token" metadata (etcd's auth token), as sent
    common_name: str | None = None  # the CN of a verified client certificate (mutual TLS)
    # "hasleader: true" metadata (clientv3.WithRequireLeader): fail with "etcdserver: no leader" rather
    # than wait when this node knows no leader. kube-apiserver sets it on every watch.
    require_leader: bool = False


ANONYMOUS = Caller()
# What a transport sets for a call with no token and no certificate but "hasleader: true".
ANONYMOUS_REQUIRING_LEADER = Caller(require_leader=True)
CALLER: ContextVar[Caller] = ContextVar("fastetcd_caller", default=ANONYMOUS)


def caller() -> Caller:
    return CALLER.get()
