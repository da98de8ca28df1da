"""The auth store in the engine: auth changes go through the single writer like every write (visible only
once durable, undone by a failed append, replayed and snapshotted), a write checked against older auth
fails, and the token and certificate rules. Over the real embedded store (tests/faulty_store.py)."""

from __future__ import annotations

import asyncio
import base64
import struct
from pathlib import Path

import bcrypt
import pytest
from faulty_store import FaultyStore
from test_state_machine import engine, run

from fastetcd import errors
from fastetcd.engine import auth_store as a
from fastetcd.engine import log_entry
from fastetcd.engine.auth_store import AuthStore
from fastetcd.engine.auth_tokens import AuthInfo, SimpleTokens
from fastetcd.engine.state_machine import SNAPSHOT_MAGIC_V2, StateMachine
from fastetcd.proto import rpc_pb2 as pb
from fastetcd.store.embedded import EmbeddedStore


def hashed(password: str) -> str:
    return base64.b64encode(bcrypt.hashpw(password.encode(), bcrypt.gensalt(4))).decode()


def user_add(name: str, password: str = "pw") -> tuple[int, pb.AuthUserAddRequest]:
    return a.USER_ADD, pb.AuthUserAddRequest(name=name, hashedPassword=hashed(password))


async def setup_root(sm: StateMachine) -> None:
    await sm.auth_change(*user_add("root"))
    await sm.auth_change(a.USER_GRANT_ROLE, pb.AuthUserGrantRoleRequest(user="root", role="root"))


def test_an_auth_change_is_visible_only_once_durable(tmp_path: Path) -> None:
    async def body() -> None:
        async with engine(tmp_path) as (sm, store):
            store.hold()
            change = asyncio.ensure_future(sm.auth_change(*user_add("alice")))
            await store.wait_held()
            assert "alice" not in sm.auth.state.users and sm.auth.revision == 1
            store.unhold()
            await change
            assert "alice" in sm.auth.state.users and sm.auth.revision == 2

    run(body())


def test_a_failed_auth_append_changes_nothing(tmp_path: Path) -> None:
    async def body() -> None:
        async with engine(tmp_path) as (sm, store):
            store.fail_appends = {1}
            with pytest.raises(errors.EtcdError, match="storage failure"):
                await sm.auth_change(*user_add("alice"))
            assert sm.auth.state.users == {} and sm.auth.revision == 1
            await sm.auth_change(*user_add("bob"))  # the log goes on at the same index
            await sm.put(pb.PutRequest(key=b"k", value=b"v"))
        async with engine(tmp_path) as (sm, _):
            assert list(sm.auth.state.users) == ["bob"] and sm.auth.revision == 2
            assert sm.committed_rev == 2

    run(body())


def test_refused_and_unchanged_auth_changes_log_nothing(tmp_path: Path) -> None:
    async def body() -> None:
        async with engine(tmp_path) as (sm, store):
            with pytest.raises(errors.ROOT_USER_NOT_EXIST):
                await sm.auth_change(a.AUTH_ENABLE, pb.AuthEnableRequest())
            await sm.auth_change(*user_add("root"))
            with pytest.raises(errors.ROOT_ROLE_NOT_EXIST):
                await sm.auth_change(a.AUTH_ENABLE, pb.AuthEnableRequest())
            await sm.auth_change(a.USER_GRANT_ROLE, pb.AuthUserGrantRoleRequest(user="root", role="root"))
            await sm.auth_change(a.USER_GRANT_ROLE, pb.AuthUserGrantRoleRequest(user="root", role="root"))
            await sm.auth_change(a.AUTH_ENABLE, pb.AuthEnableRequest())
            await sm.auth_change(a.AUTH_ENABLE, pb.AuthEnableRequest())
            assert (sm.auth.enabled, sm.auth.revision) == (True, 3)  # enabling is no revision
            assert store.append_count == 3  # add, grant, enable: the refused and the no-ops are not logged
            with pytest.raises(errors.USER_NOT_FOUND):  # the caller's root check runs first
                await sm.auth_change(a.ROLE_ADD, pb.AuthRoleAddRequest(name="r"),
                                     lambda: sm.auth.is_admin_permitted(AuthInfo("nobody", 3)))
            assert "r" not in sm.auth.state.roles

    run(body())


def test_a_write_checked_before_an_auth_change_fails(tmp_path: Path) -> None:
    """etcd's apply refuses a request whose auth revision is older than the store's: the permission it
    was checked with may be gone (here: the change queued ahead of it)."""

    async def body() -> None:
        async with engine(tmp_path) as (sm, store):
            store.hold()
            first = asyncio.ensure_future(sm.put(pb.PutRequest(key=b"a", value=b"1")))
            await store.wait_held()
            change = asyncio.ensure_future(sm.auth_change(*user_add("alice")))
            checked_at = sm.auth.revision
            stale = asyncio.ensure_future(sm.put(pb.PutRequest(key=b"b", value=b"1"), auth_rev=checked_at))
            fresh = asyncio.ensure_future(sm.put(pb.PutRequest(key=b"c", value=b"1")))
            store.unhold()
            await first
            await change
            with pytest.raises(errors.AUTH_OLD_REVISION):
                await stale
            await fresh
            await sm.put(pb.PutRequest(key=b"d", value=b"1"), auth_rev=sm.auth.revision)
            keys = sm.range(pb.RangeRequest(key=b"\0", range_end=b"\0", keys_only=True)).kvs
            assert len(keys) == 3  # a, c, d

    run(body())


@pytest.mark.parametrize("snapshot_count", [100_000, 2])
def test_auth_state_survives_restart(tmp_path: Path, snapshot_count: int) -> None:
    async def body() -> None:
        async with engine(tmp_path, snapshot_count=snapshot_count) as (sm, _):
            await setup_root(sm)
            await sm.auth_change(*user_add("alice", "secret"))
            await sm.auth_change(a.ROLE_ADD, pb.AuthRoleAddRequest(name="r"))
            perm = {"key": b"k", "range_end": b"\0", "permType": "READWRITE"}
            grant = pb.AuthRoleGrantPermissionRequest(name="r", perm=perm)
            await sm.auth_change(a.ROLE_GRANT_PERMISSION, grant)
            await sm.auth_change(a.USER_GRANT_ROLE, pb.AuthUserGrantRoleRequest(user="alice", role="r"))
            await sm.auth_change(a.AUTH_ENABLE, pb.AuthEnableRequest())
            before = sm.auth.dump()
            hash_before = sm.hash_all()
        async with engine(tmp_path, snapshot_count=snapshot_count) as (sm, _):
            assert sm.auth.dump() == before
            assert sm.hash_all() == hash_before
            assert sm.auth.enabled and sm.auth.revision == 7  # six changes after 1; enabling is none
            hashed_pw, _ = sm.auth.check_password("alice", "secret")
            assert bcrypt.checkpw(b"secret", hashed_pw)
            sm.auth.is_put_permitted(AuthInfo("alice", 7), b"kz")
            with pytest.raises(errors.PERMISSION_DENIED):
                sm.auth.is_put_permitted(AuthInfo("alice", 7), b"a")
            assert (sm._last_snapshot_index > 0) == (snapshot_count == 2)  # recovered from a snapshot

    run(body())


def test_a_snapshot_from_before_auth_loads(tmp_path: Path) -> None:
    async def body() -> None:
        async with engine(tmp_path) as (sm, _):
            await sm.put(pb.PutRequest(key=b"k", value=b"v"))
            core, leases, alarms = sm.core.dump(sm.committed_rev), sm.lessor.dump(), sm.alarms.dump()
        old = SNAPSHOT_MAGIC_V2 + struct.pack("<QQ", len(core), len(leases)) + core + leases + alarms
        fresh = StateMachine(FaultyStore(EmbeddedStore(str(tmp_path / "other"))))
        fresh._load_snapshot(old)
        assert fresh.core.rev == 2 and fresh.auth.revision == 1 and not fresh.auth.enabled

    run(body())


def test_log_entries_carry_auth_changes() -> None:
    change = a.encode_change(*user_add("u"))
    e = log_entry.Entry(0, b"", [(log_entry.LEASE_GRANT, 7, 60)], change)
    assert log_entry.decode(log_entry.encode(e)) == e
    assert log_entry.decode(log_entry.encode(log_entry.Entry(3, b"kv"))).auth == b""
    kind, req = a.decode_change(change)
    assert kind == a.USER_ADD and req.name == "u"


# ------------------------------------------------------------------ who is calling


def test_simple_tokens_live_their_ttl_after_last_use() -> None:
    now = [0.0]
    tokens = SimpleTokens(ttl=10, clock=lambda: now[0])
    assert tokens.assign("u", 1, 5).endswith(".5")
    assert tokens.tokens == {}  # assigned while auth is off: forgotten at once, as etcd's
    tokens.enable()
    t = tokens.assign("u", 1, 6)
    prefix = t.split(".")[0]
    assert len(prefix) == 16 and prefix.isalpha()
    now[0] = 9
    assert tokens.info(t, 4) == AuthInfo("u", 4)  # the store's current revision, whatever it was issued at
    now[0] = 18
    assert tokens.info(t, 4) is not None  # used at 9: alive until 19
    now[0] = 29
    assert tokens.info(t, 4) is None
    t1, t2 = tokens.assign("u", 1, 7), tokens.assign("v", 1, 8)
    tokens.invalidate_user("u")
    assert tokens.info(t1, 1) is None and tokens.info(t2, 1) is not None
    tokens.disable()
    assert tokens.info(t2, 1) is None
    assert tokens.info("no-dot", 1) is None and tokens.info("a.b", 1) is None


def test_a_certificate_name_stands_in_for_a_token() -> None:
    store = AuthStore(SimpleTokens())
    assert store.auth_info(None, None) is None
    assert store.auth_info(None, "kube-apiserver") == AuthInfo("kube-apiserver", 1)
    with pytest.raises(errors.INVALID_AUTH_TOKEN):  # a token decides, even a bad one beside a certificate
        store.auth_info("bogus.1", "kube-apiserver")
    store.tokens.enable()
    token = store.tokens.assign("alice", 1, 1)
    assert store.auth_info(token, "kube-apiserver") == AuthInfo("alice", 1)
