"""Auth state is part of the store: users, roles, permissions and the enabled flag survive a restart,
whether they come back from the log or from a snapshot (and, with ``--store cosmos``, from Cosmos)."""

from __future__ import annotations

import json

import grpc
import pytest
from servers import ServerFactory

from fastetcd.proto import rpc_pb2 as pb
from fastetcd.proto import rpc_pb2_grpc
from fastetcd.testing import channel, kv_stub

FAST_BCRYPT = ("--bcrypt-cost", "4")


def _login(ch: grpc.Channel, name: str, password: str) -> list[tuple[str, str]]:
    resp = rpc_pb2_grpc.AuthStub(ch).Authenticate(pb.AuthenticateRequest(name=name, password=password))
    return [("token", resp.token)]


def _error(fn) -> str:
    try:
        fn()
    except grpc.RpcError as e:
        return f"{e.code().name}: {e.details()}"  # type: ignore[attr-defined]
    return "OK"


def _state(endpoint: str) -> dict[str, object]:
    """Everything a root client can read back of the auth state, and what a limited user may do."""
    with channel(endpoint) as ch:
        auth = rpc_pb2_grpc.AuthStub(ch)
        kv = kv_stub(ch)
        root = _login(ch, "root", "rootpw")
        status = auth.AuthStatus(pb.AuthStatusRequest(), metadata=root)
        users = list(auth.UserList(pb.AuthUserListRequest(), metadata=root).users)
        roles = list(auth.RoleList(pb.AuthRoleListRequest(), metadata=root).roles)
        alice = _login(ch, "alice", "alicepw")
        return {
            "enabled": status.enabled,
            "auth revision": status.authRevision,
            "users": users,
            "roles": roles,
            "user roles": {u: list(auth.UserGet(pb.AuthUserGetRequest(name=u), metadata=root).roles)
                           for u in users},
            "perms": {r: [(p.key, p.range_end, p.permType)
                          for p in auth.RoleGet(pb.AuthRoleGetRequest(role=r), metadata=root).perm]
                      for r in roles},
            "alice reads app/x": _error(lambda: kv.Range(pb.RangeRequest(key=b"app/x"), metadata=alice)),
            "alice writes app/x": _error(lambda: kv.Put(pb.PutRequest(key=b"app/x", value=b"1"),
                                                        metadata=alice)),
            "alice reads other": _error(lambda: kv.Range(pb.RangeRequest(key=b"other"), metadata=alice)),
            "anonymous reads": _error(lambda: kv.Range(pb.RangeRequest(key=b"app/x"))),
            "old password": _error(lambda: _login(ch, "alice", "first")),
            "no-password user": _error(lambda: _login(ch, "np", "")),
            "value": kv.Range(pb.RangeRequest(key=b"app/x"), metadata=root).kvs[0].value,
        }  # fmt: skip


def _make_auth_state(endpoint: str) -> None:
    with channel(endpoint) as ch:
        auth = rpc_pb2_grpc.AuthStub(ch)
        kv = kv_stub(ch)
        kv.Put(pb.PutRequest(key=b"app/x", value=b"before"))
        auth.UserAdd(pb.AuthUserAddRequest(name="root", password="rootpw"))
        auth.UserGrantRole(pb.AuthUserGrantRoleRequest(user="root", role="root"))
        auth.UserAdd(pb.AuthUserAddRequest(name="alice", password="first"))
        auth.UserChangePassword(pb.AuthUserChangePasswordRequest(name="alice", password="alicepw"))
        auth.UserAdd(pb.AuthUserAddRequest(name="np", options={"no_password": True}))
        auth.UserAdd(pb.AuthUserAddRequest(name="gone", password="x"))
        for role in ("app-rw", "app-ro", "unused"):
            auth.RoleAdd(pb.AuthRoleAddRequest(name=role))
        auth.RoleGrantPermission(pb.AuthRoleGrantPermissionRequest(
            name="app-ro", perm={"key": b"app/", "range_end": b"app0", "permType": "READ"}))
        auth.RoleGrantPermission(pb.AuthRoleGrantPermissionRequest(
            name="app-rw", perm={"key": b"app/x", "permType": "WRITE"}))
        auth.RoleGrantPermission(pb.AuthRoleGrantPermissionRequest(
            name="app-rw", perm={"key": b"z", "range_end": b"\0", "permType": "READWRITE"}))
        auth.RoleRevokePermission(
            pb.AuthRoleRevokePermissionRequest(role="app-rw", key=b"z", range_end=b"\0"))
        auth.UserGrantRole(pb.AuthUserGrantRoleRequest(user="alice", role="app-ro"))
        auth.UserGrantRole(pb.AuthUserGrantRoleRequest(user="alice", role="app-rw"))
        auth.UserGrantRole(pb.AuthUserGrantRoleRequest(user="alice", role="unused"))
        auth.UserDelete(pb.AuthUserDeleteRequest(name="gone"))
        auth.RoleDelete(pb.AuthRoleDeleteRequest(role="unused"))
        auth.AuthEnable(pb.AuthEnableRequest())
        root = _login(ch, "root", "rootpw")
        kv.Put(pb.PutRequest(key=b"app/x", value=b"after"), metadata=root)


@pytest.mark.parametrize("snapshot_count", [100_000, 3], ids=["log", "snapshot"])
def test_auth_survives_restart(server_factory: ServerFactory, snapshot_count: int) -> None:
    args = (*FAST_BCRYPT, "--snapshot-count", str(snapshot_count))
    server = server_factory("fastetcd", "fe", args)
    _make_auth_state(server.endpoint)
    before = _state(server.endpoint)
    assert before["enabled"] is True
    assert before["users"] == ["alice", "np", "root"]
    assert before["alice reads app/x"] == "OK"
    assert before["alice writes app/x"] == "OK"
    assert before["alice reads other"] == "PERMISSION_DENIED: etcdserver: permission denied"
    assert before["anonymous reads"] == "INVALID_ARGUMENT: etcdserver: user name is empty"
    assert before["old password"].startswith("INVALID_ARGUMENT: etcdserver: authentication failed")
    assert server.stop() == 0
    server = server_factory("fastetcd", "fe", args)
    assert _state(server.endpoint) == before
    recovered = next(json.loads(line) for line in server.output().splitlines() if "recovered state" in line)
    assert recovered["auth-enabled"] is True
    assert (recovered["snapshot-index"] > 0) == (snapshot_count < 100)  # the snapshot holds auth state
    # and once more, after changes made by the restarted server
    with channel(server.endpoint) as ch:
        root = _login(ch, "root", "rootpw")
        rpc_pb2_grpc.AuthStub(ch).AuthDisable(pb.AuthDisableRequest(), metadata=root)
    assert server.stop() == 0
    server = server_factory("fastetcd", "fe", args)
    with channel(server.endpoint) as ch:
        status = rpc_pb2_grpc.AuthStub(ch).AuthStatus(pb.AuthStatusRequest())
        assert (status.enabled, status.authRevision) == (False, before["auth revision"] + 1)  # type: ignore[operator]
        assert kv_stub(ch).Range(pb.RangeRequest(key=b"app/x")).kvs[0].value == b"1"
