"""etcd's client-visible errors: gRPC status code and exact message.

Clients (clientv3, kube-apiserver, etcdctl) recognise errors by their message text, so these strings are
etcd 3.5's own (api/v3rpc/rpctypes). They live at the bottom of the layer stack because the engine raises
them and the server turns them into gRPC statuses. Codes are grpc.StatusCode names, kept as strings so
that nothing below the server imports grpc.
"""

from __future__ import annotations


class EtcdError(Exception):
    """An error a client sees as a gRPC status with ``code`` and ``message``."""

    code = "UNKNOWN"
    message = ""

    def __init__(self, code: str | None = None, message: str | None = None) -> None:
        if code is not None:
            self.code = code
        if message is not None:
            self.message = message
        super().__init__(self.message)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code}, {self.message!r})"


def _e(code: str, message: str) -> type[EtcdError]:
    # Each constant is a class, so `raise errors.COMPACTED` raises a fresh instance: a shared instance
    # would collect every raise's traceback (and the requests its frames hold) for the server's lifetime.
    name = "".join(w.capitalize() for w in message.rsplit(": ", 1)[-1].split())
    return type(name, (EtcdError,), {"code": code, "message": message})


EMPTY_KEY = _e("INVALID_ARGUMENT", "etcdserver: key is not provided")
KEY_NOT_FOUND = _e("INVALID_ARGUMENT", "etcdserver: key not found")
VALUE_PROVIDED = _e("INVALID_ARGUMENT", "etcdserver: value is provided")
LEASE_PROVIDED = _e("INVALID_ARGUMENT", "etcdserver: lease is provided")
TOO_MANY_OPS = _e("INVALID_ARGUMENT", "etcdserver: too many operations in txn request")
DUPLICATE_KEY = _e("INVALID_ARGUMENT", "etcdserver: duplicate key given in txn request")
INVALID_SORT_OPTION = _e("INVALID_ARGUMENT", "etcdserver: invalid sort option")
REQUEST_TOO_LARGE = _e("INVALID_ARGUMENT", "etcdserver: request is too large")
COMPACTED = _e("OUT_OF_RANGE", "etcdserver: mvcc: required revision has been compacted")
FUTURE_REV = _e("OUT_OF_RANGE", "etcdserver: mvcc: required revision is a future revision")
NO_SPACE = _e("RESOURCE_EXHAUSTED", "etcdserver: mvcc: database space exceeded")
CORRUPT = _e("DATA_LOSS", "etcdserver: corrupt cluster")
TOO_MANY_REQUESTS = _e("RESOURCE_EXHAUSTED", "etcdserver: too many requests")
LEASE_NOT_FOUND = _e("NOT_FOUND", "etcdserver: requested lease not found")
LEASE_EXIST = _e("FAILED_PRECONDITION", "etcdserver: lease already exists")
LEASE_TTL_TOO_LARGE = _e("OUT_OF_RANGE", "etcdserver: too large lease TTL")
STOPPED = _e("UNAVAILABLE", "etcdserver: server stopped")
NOT_LEADER = _e("UNAVAILABLE", "etcdserver: not leader")
TIMEOUT = _e("UNAVAILABLE", "etcdserver: request timed out")
NO_LEADER = _e("UNAVAILABLE", "etcdserver: no leader")
LEADER_CHANGED = _e("UNAVAILABLE", "etcdserver: leader changed")
LEADER_TRANSFER_TIMEOUT = _e(
    "UNAVAILABLE", "etcdserver: request timed out, leader transfer took too long"
)

# Auth (etcd's rpctypes for auth.Err*, through v3rpc's togRPCError). An auth error etcd 3.5.1 has no gRPC
# mapping for reaches clients as UNKNOWN with the auth package's own text.
ROOT_USER_NOT_EXIST = _e("FAILED_PRECONDITION", "etcdserver: root user does not exist")
ROOT_ROLE_NOT_EXIST = _e("FAILED_PRECONDITION", "etcdserver: root user does not have root role")
USER_ALREADY_EXIST = _e("FAILED_PRECONDITION", "etcdserver: user name already exists")
USER_EMPTY = _e("INVALID_ARGUMENT", "etcdserver: user name is empty")
USER_NOT_FOUND = _e("FAILED_PRECONDITION", "etcdserver: user name not found")
ROLE_ALREADY_EXIST = _e("FAILED_PRECONDITION", "etcdserver: role name already exists")
ROLE_NOT_FOUND = _e("FAILED_PRECONDITION", "etcdserver: role name not found")
ROLE_EMPTY = _e("INVALID_ARGUMENT", "etcdserver: role name is empty")
AUTH_FAILED = _e("INVALID_ARGUMENT", "etcdserver: authentication failed, invalid user ID or password")
PERMISSION_NOT_GIVEN = _e("INVALID_ARGUMENT", "etcdserver: permission not given")
PERMISSION_DENIED = _e("PERMISSION_DENIED", "etcdserver: permission denied")
ROLE_NOT_GRANTED = _e("FAILED_PRECONDITION", "etcdserver: role is not granted to the user")
PERMISSION_NOT_GRANTED = _e("FAILED_PRECONDITION", "etcdserver: permission is not granted to the role")
AUTH_NOT_ENABLED = _e("FAILED_PRECONDITION", "etcdserver: authentication is not enabled")
INVALID_AUTH_TOKEN = _e("UNAUTHENTICATED", "etcdserver: invalid auth token")
INVALID_AUTH_MGMT = _e("INVALID_ARGUMENT", "etcdserver: invalid auth management")
# etcd 3.5.1 sends this as UNKNOWN "auth: revision in header is old", which no client recognises; 3.5.2
# gave it this text, on which clientv3 fetches a new token and retries (JWTs go stale on every auth change).
AUTH_OLD_REVISION = _e("INVALID_ARGUMENT", "etcdserver: revision of auth store is old")
NO_PASSWORD_USER = _e("UNKNOWN", "auth: authentication failed, password was given for no password user")
VERIFY_ONLY = _e("UNKNOWN", "auth: token signing attempted with verify-only key")
