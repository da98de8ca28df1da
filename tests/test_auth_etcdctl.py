"""Auth as etcdctl 3.5.1 sees it: its ``user``, ``role`` and ``auth`` commands, and every other command run
as a limited user, give the same stdout, stderr and exit codes on fastetcd as on real etcd 3.5.1
(normalized as test_etcdctl_compat's comparisons are).

Both servers hash passwords at ``--bcrypt-cost 4`` (bcrypt's minimum) so that the many logins stay fast.
"""

from __future__ import annotations

import base64
import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from etcdctl_compare import Outcome
from servers import ServerFactory
from test_etcdctl_compat import Pair, _txn_stdin
from test_etcdctl_watch_lease import WATCH_START_S, BackgroundCtl, LeasePair

from fastetcd.proto import rpc_pb2 as pb
from fastetcd.proto import rpc_pb2_grpc
from fastetcd.testing import channel, kv_stub, prefix_end

FAST_BCRYPT = ("--bcrypt-cost", "4")
ROOT = ("--user", "root:rootpw")
ALICE = ("--user", "alice:alicepw")


class AuthPair(Pair):
    """A Pair whose scenario guards (the oracle's exit code) are listed with the differences, not fatal:
    one run shows everything that is off."""

    def run(self, *args: str, stdin: str | None = None, expect_rc: int | None = None) -> Outcome:
        want = super().run(*args, stdin=stdin)
        if expect_rc is not None and want.rc != expect_rc:
            self.mismatches.append(f"$ etcdctl {' '.join(args)}: the oracle gave rc={want.rc}, the scenario "
                                   f"expects {expect_rc}\n{want.show()}")
        return want


@pytest.fixture
def auth_pair(server_factory: ServerFactory, subject_kind: str) -> Iterator[Pair]:
    with ThreadPoolExecutor(max_workers=2) as pool:
        subject_f = pool.submit(server_factory, subject_kind, "subject", FAST_BCRYPT)
        oracle_f = pool.submit(server_factory, "etcd", "oracle", FAST_BCRYPT)
    with AuthPair(subject_f.result().endpoint, oracle_f.result().endpoint) as p:
        yield p


def _setup_root_and_alice(p: Pair) -> None:
    """root (with the root role), alice holding role r1, and auth enabled."""
    p.run("user", "add", "root:rootpw", expect_rc=0)
    p.run("auth", "enable", expect_rc=0)  # etcdctl adds the root role and grants it on the way
    p.run(*ROOT, "user", "add", "alice:alicepw", expect_rc=0)
    p.run(*ROOT, "role", "add", "r1", expect_rc=0)
    p.run(*ROOT, "role", "grant-permission", "r1", "read", "a", expect_rc=0)
    p.run(*ROOT, "role", "grant-permission", "r1", "readwrite", "b", "--prefix", expect_rc=0)
    p.run(*ROOT, "role", "grant-permission", "r1", "write", "c", "--from-key", expect_rc=0)
    p.run(*ROOT, "role", "grant-permission", "r1", "read", "d", "f", expect_rc=0)
    p.run(*ROOT, "user", "grant-role", "alice", "r1", expect_rc=0)


def test_users_roles_and_enabling(auth_pair: Pair) -> None:
    p = auth_pair
    p.run("auth", "status", expect_rc=0)
    p.run("auth", "status", "-w", "json", expect_rc=0)
    p.run("auth", "enable", expect_rc=1)  # etcdserver: root user does not exist
    p.run("auth", "disable", expect_rc=0)  # not enabled: nothing to do
    p.run("user", "add", "root:rootpw", expect_rc=0)
    p.run("user", "add", "root:again", expect_rc=1)  # user name already exists
    p.run("user", "add", ":nameless", expect_rc=128)  # refused by etcdctl itself
    p.run("user", "add", "--no-password", "np", expect_rc=0)
    p.run("user", "add", "carol", "--new-user-password=cpw", expect_rc=0)
    p.run("user", "add", "dave", "--interactive=false", stdin="dpw\n", expect_rc=0)
    p.run("user", "passwd", "np", "--interactive=false", stdin="x\n", expect_rc=0)  # stays password-less
    p.run("user", "delete", "dave", expect_rc=0)
    p.run("user", "list", expect_rc=0)
    p.run("user", "list", "-w", "json")
    p.run("user", "get", "root", expect_rc=0)
    p.run("user", "get", "nobody", expect_rc=1)  # user name not found
    p.run("user", "get", "root", "-w", "json")
    p.run("role", "add", "r1", expect_rc=0)
    p.run("role", "add", "r1", expect_rc=1)  # role name already exists
    p.run("role", "add", "", expect_rc=1)
    p.run("role", "get", "r1", expect_rc=0)
    p.run("role", "get", "nope", expect_rc=1)  # role name not found
    p.run("role", "get", "root", expect_rc=1)  # no such role until someone adds it
    grants = [("read", "a"), ("write", "b", "--prefix"), ("readwrite", "c", "--from-key"), ("read", "d", "e"),
              ("write", "a"), ("read", "b", "--prefix"), ("readwrite", "", "--prefix"), ("read", "b", "c"),
              ("read", "a", "z")]  # fmt: skip
    for args in grants:
        p.run("role", "grant-permission", "r1", *args, expect_rc=0)
    p.run("role", "grant-permission", "r1", "bogus", "k", expect_rc=128)
    p.run("role", "grant-permission", "nope", "read", "k", expect_rc=1)
    p.run("role", "get", "r1", expect_rc=0)
    p.run("role", "get", "r1", "-w", "json")
    p.run("role", "revoke-permission", "r1", "b", "--prefix", expect_rc=0)
    p.run("role", "revoke-permission", "r1", "b", "--prefix", expect_rc=1)  # permission is not granted
    p.run("role", "revoke-permission", "r1", "zz", expect_rc=1)
    p.run("role", "revoke-permission", "nope", "a", expect_rc=1)
    p.run("role", "revoke-permission", "r1", "a", "z", expect_rc=0)
    p.run("role", "get", "r1", expect_rc=0)
    p.run("role", "list", expect_rc=0)
    p.run("user", "grant-role", "carol", "r1", expect_rc=0)
    p.run("user", "grant-role", "carol", "r1", expect_rc=0)  # granted twice: no error, no change
    p.run("user", "grant-role", "carol", "nope", expect_rc=1)
    p.run("user", "grant-role", "nobody", "r1", expect_rc=1)
    p.run("user", "grant-role", "carol", "root", expect_rc=0)  # root needs no role of that name
    p.run("user", "get", "carol", expect_rc=0)
    p.run("user", "get", "carol", "--detail", expect_rc=1)  # role root does not exist (yet)
    p.run("user", "revoke-role", "carol", "root", expect_rc=0)
    p.run("user", "revoke-role", "carol", "root", expect_rc=1)  # role is not granted to the user
    p.run("user", "revoke-role", "nobody", "r1", expect_rc=1)
    p.run("auth", "status", expect_rc=0)
    p.run("auth", "enable", expect_rc=0)  # root lacks the root role: etcdctl adds and grants it
    p.run(*ROOT, "auth", "status", expect_rc=0)  # enabling is not an auth revision
    p.run(*ROOT, "auth", "enable", expect_rc=0)  # already enabled: nothing to do
    p.run(*ROOT, "user", "get", "root", "--detail", expect_rc=0)
    p.run(*ROOT, "role", "list", "-w", "json")
    p.run(*ROOT, "user", "delete", "root", expect_rc=1)  # invalid auth management
    p.run(*ROOT, "user", "revoke-role", "root", "root", expect_rc=1)
    p.run(*ROOT, "role", "delete", "root", expect_rc=1)
    p.run(*ROOT, "role", "delete", "r1", expect_rc=0)  # also taken from carol
    p.run(*ROOT, "role", "delete", "r1", expect_rc=1)
    p.run(*ROOT, "user", "get", "carol", expect_rc=0)
    p.run(*ROOT, "user", "delete", "carol", expect_rc=0)
    p.run(*ROOT, "user", "delete", "carol", expect_rc=1)
    p.run(*ROOT, "user", "list", expect_rc=0)
    p.run(*ROOT, "auth", "disable", expect_rc=0)
    p.run("auth", "status", expect_rc=0)
    p.run("user", "delete", "root", expect_rc=0)  # allowed once auth is off
    p.run("role", "delete", "root", expect_rc=0)
    p.run("user", "list", "-w", "json")
    p.run("role", "list", "-w", "json")
    p.run("auth", "status", "-w", "json")
    p.check()


def test_login_outcomes(auth_pair: Pair) -> None:
    p = auth_pair
    p.run("put", "k", "v", expect_rc=0)
    p.run("user", "add", "root:rootpw", expect_rc=0)
    # auth off: etcdctl's Authenticate gets "authentication is not enabled" and carries on without a token
    p.run(*ROOT, "get", "k", expect_rc=0)
    p.run("--user", "root:wrong", "get", "k", expect_rc=0)
    p.run("user", "add", "--no-password", "np", expect_rc=0)
    p.run("auth", "enable", expect_rc=0)
    p.run(*ROOT, "get", "k", expect_rc=0)
    p.run(*ROOT, "put", "k", "v2", expect_rc=0)
    p.run("--user", "root:wrong", "get", "k", expect_rc=2)  # authentication failed
    p.run("--user", "nobody:pw", "get", "k", expect_rc=2)
    p.run("--user", "np:anything", "get", "k")  # a no-password user cannot log in with one
    p.run("get", "k", expect_rc=1)  # user name is empty
    p.run("put", "k", "v", expect_rc=1)
    p.run("del", "k", expect_rc=1)
    p.run("auth", "status", expect_rc=1)
    p.run("user", "list", expect_rc=1)
    p.run("user", "get", "root", expect_rc=1)
    p.run("role", "list", expect_rc=1)
    p.run("auth", "disable", expect_rc=1)
    p.run("--user", "root:wrong", "auth", "disable", expect_rc=2)
    p.run(*ROOT, "user", "passwd", "root", "--interactive=false", stdin="newpw\n", expect_rc=0)
    p.run(*ROOT, "get", "k", expect_rc=2)  # the old password no longer works
    p.run("--user", "root:newpw", "get", "k", expect_rc=0)
    p.run("--user", "root:newpw", "auth", "disable", expect_rc=0)
    p.run("get", "k", expect_rc=0)
    p.check()


def test_limited_user(auth_pair: Pair) -> None:
    p = auth_pair
    for key in ("a", "b1", "c", "c9", "d", "e", "x"):
        p.run("put", key, f"v-{key}", expect_rc=0)
    _setup_root_and_alice(p)
    # reads: a single key, a prefix, a range, from-key
    p.run(*ALICE, "get", "a", expect_rc=0)
    p.run(*ALICE, "get", "b1", expect_rc=0)
    p.run(*ALICE, "get", "b", "--prefix", expect_rc=0)
    p.run(*ALICE, "get", "d", "f", expect_rc=0)
    p.run(*ALICE, "get", "d", "e", expect_rc=0)
    p.run(*ALICE, "get", "d", "g", expect_rc=1)  # permission denied: [f, g) is not readable
    p.run(*ALICE, "get", "a", "--prefix", expect_rc=1)
    p.run(*ALICE, "get", "c", expect_rc=1)  # write-only
    p.run(*ALICE, "get", "x", expect_rc=1)
    p.run(*ALICE, "get", "", "--prefix", expect_rc=1)
    p.run(*ALICE, "get", "b", "--from-key", expect_rc=1)
    p.run(*ALICE, "get", "a", "--rev=2", expect_rc=0)
    # writes
    p.run(*ALICE, "put", "a", "1", expect_rc=1)  # read-only
    p.run(*ALICE, "put", "b2", "1", expect_rc=0)
    p.run(*ALICE, "put", "b2", "2", "--prev-kv", expect_rc=0)
    p.run(*ALICE, "put", "c5", "1", expect_rc=0)
    p.run(*ALICE, "put", "c5", "1", "--prev-kv", expect_rc=1)  # prev_kv needs read too
    p.run(*ALICE, "put", "zzz", "1", expect_rc=0)  # c and everything after it
    p.run(*ALICE, "put", "bar", "1", expect_rc=0)
    p.run(*ALICE, "del", "b2", expect_rc=0)
    p.run(*ALICE, "del", "b", "--prefix", expect_rc=0)
    p.run(*ALICE, "del", "c", "--from-key", expect_rc=0)
    p.run(*ALICE, "del", "c", "--from-key", "--prev-kv", expect_rc=1)
    p.run(*ALICE, "del", "a", expect_rc=1)
    p.run(*ALICE, "del", "", "--prefix", expect_rc=1)
    # txns: compares need read, every op of both branches its own permission
    p.run(*ALICE, "txn", stdin=_txn_stdin(['value("a") = "v-a"'], ["put b3 t"], ["put b4 f"]), expect_rc=0)
    p.run(*ALICE, "txn", stdin=_txn_stdin(['value("x") = "v-x"'], ["put b3 t"], []), expect_rc=1)
    p.run(*ALICE, "txn", stdin=_txn_stdin([], ["get a"], ["get x"]), expect_rc=1)  # the unrun branch counts
    p.run(*ALICE, "txn", stdin=_txn_stdin([], ["get a", "get d"], []), expect_rc=0)
    p.run(*ALICE, "txn", stdin=_txn_stdin([], ["put b5 1"], ["del a"]), expect_rc=1)
    p.run(*ALICE, "txn", stdin=_txn_stdin(['mod("b3") > "0"'], ["del b3"], ["put c1 x"]), expect_rc=0)
    # watches: read on the key or range, refused at creation
    # (a refused watch ends etcdctl at once: "watch is canceled by the server", exit code 5)
    p.run(*ALICE, "watch", "x", expect_rc=5)
    p.run(*ALICE, "watch", "a", "--prefix", expect_rc=5)
    p.run(*ALICE, "watch", "c", expect_rc=5)
    p.run("watch", "a", expect_rc=5)  # no user at all
    # root-only operations
    p.run(*ALICE, "user", "add", "eve:pw", expect_rc=1)
    p.run(*ALICE, "user", "list", expect_rc=1)
    p.run(*ALICE, "role", "list", expect_rc=1)
    p.run(*ALICE, "role", "add", "r2", expect_rc=1)
    p.run(*ALICE, "user", "grant-role", "alice", "root", expect_rc=1)
    p.run(*ALICE, "auth", "disable", expect_rc=1)
    p.run(*ALICE, "auth", "status", expect_rc=1)
    p.run(*ALICE, "user", "get", "alice", expect_rc=0)  # oneself, yes
    p.run(*ALICE, "user", "get", "root", expect_rc=1)
    p.run(*ALICE, "role", "get", "r1", expect_rc=0)  # a role one holds, yes
    p.run(*ALICE, "role", "get", "root", expect_rc=1)
    p.run(*ALICE, "user", "passwd", "alice", "--interactive=false", stdin="x\n", expect_rc=1)
    p.run(*ALICE, "defrag", expect_rc=1)
    p.run(*ALICE, "endpoint", "hashkv", expect_rc=1)
    p.run(*ALICE, "compaction", "2", expect_rc=0)  # any user may compact
    p.run(*ALICE, "alarm", "list", expect_rc=0)
    p.run(*ROOT, "get", "", "--prefix", expect_rc=0)
    p.run(*ROOT, "get", "", "--prefix", "-w", "json")
    p.check()


def test_changes_take_effect_at_once(auth_pair: Pair) -> None:
    p = auth_pair
    p.run("put", "a", "1", expect_rc=0)
    _setup_root_and_alice(p)
    p.run(*ALICE, "get", "a", expect_rc=0)
    p.run(*ROOT, "user", "revoke-role", "alice", "r1", expect_rc=0)
    p.run(*ALICE, "get", "a", expect_rc=1)  # permission denied at once
    p.run(*ROOT, "user", "grant-role", "alice", "r1", expect_rc=0)
    p.run(*ALICE, "get", "a", expect_rc=0)
    p.run(*ROOT, "role", "revoke-permission", "r1", "a", expect_rc=0)
    p.run(*ALICE, "get", "a", expect_rc=1)
    p.run(*ROOT, "role", "grant-permission", "r1", "readwrite", "a", expect_rc=0)
    p.run(*ALICE, "put", "a", "2", expect_rc=0)
    p.run(*ROOT, "role", "delete", "r1", expect_rc=0)
    p.run(*ALICE, "get", "a", expect_rc=1)
    p.run(*ROOT, "user", "grant-role", "alice", "root", expect_rc=0)
    p.run(*ALICE, "get", "a", expect_rc=0)  # the root role may do anything
    p.run(*ALICE, "user", "list", expect_rc=0)
    p.run(*ROOT, "user", "passwd", "alice", "--interactive=false", stdin="changed\n", expect_rc=0)
    p.run(*ALICE, "get", "a", expect_rc=2)
    p.run("--user", "alice:changed", "get", "a", expect_rc=0)
    p.run(*ROOT, "user", "delete", "alice", expect_rc=0)
    p.run("--user", "alice:changed", "get", "a", expect_rc=2)
    p.run(*ROOT, "auth", "status", expect_rc=0)
    p.check()


# ------------------------------------------------------------------ a client that holds its token


def _call(endpoint: str, fn: Callable[[grpc.Channel], object]) -> str:
    with channel(endpoint) as ch:
        try:
            fn(ch)
        except grpc.RpcError as e:
            return f"{e.code().name}: {e.details()}"  # type: ignore[attr-defined]
    return "OK"


def _on_both(server_factory: ServerFactory, subject_kind: str,
             scenario: Callable[[str], list[str]]) -> tuple[list[str], list[str]]:
    """``scenario`` against the subject and against etcd 3.5.1 (started side by side): (got, want)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        subject_f = pool.submit(server_factory, subject_kind, "subject", FAST_BCRYPT)
        oracle_f = pool.submit(server_factory, "etcd", "oracle", FAST_BCRYPT)
    return scenario(subject_f.result().endpoint), scenario(oracle_f.result().endpoint)


def enable_auth(auth: rpc_pb2_grpc.AuthStub, user: str, password: str, *, root_password: str = "pw",
                role: str | None = None, perm: dict | None = None) -> None:
    """root (with the root role) and ``user``, with ``role`` granting ``perm`` if given; then auth on."""
    auth.UserAdd(pb.AuthUserAddRequest(name="root", password=root_password))
    auth.UserGrantRole(pb.AuthUserGrantRoleRequest(user="root", role="root"))
    auth.UserAdd(pb.AuthUserAddRequest(name=user, password=password))
    if role is not None:
        auth.RoleAdd(pb.AuthRoleAddRequest(name=role))
        auth.RoleGrantPermission(pb.AuthRoleGrantPermissionRequest(name=role, perm=perm))
        auth.UserGrantRole(pb.AuthUserGrantRoleRequest(user=user, role=role))
    auth.AuthEnable(pb.AuthEnableRequest())


def _token(ch: grpc.Channel, name: str, password: str) -> str:
    auth = rpc_pb2_grpc.AuthStub(ch)
    return auth.Authenticate(pb.AuthenticateRequest(name=name, password=password)).token


def _token_scenario(endpoint: str) -> list[str]:
    """What a grpcio client holding tokens sees as the users behind them change."""
    out: list[str] = []
    with channel(endpoint) as ch:
        auth = rpc_pb2_grpc.AuthStub(ch)
        enable_auth(auth, "bob", "bobpw", root_password="rootpw",
                    role="rb", perm={"key": b"k", "range_end": b"l", "permType": "READWRITE"})
        root = [("token", _token(ch, "root", "rootpw"))]
        bob = [("token", _token(ch, "bob", "bobpw"))]
        kv = kv_stub(ch)

        def get(md: list[tuple[str, str]], key: bytes = b"k1") -> str:
            return _call(endpoint, lambda c: kv_stub(c).Range(pb.RangeRequest(key=key), metadata=md))

        out.append("bob get: " + get(bob))
        out.append("bob get outside: " + get(bob, b"z"))
        out.append("bogus token: " + get([("token", "notatoken")]))
        out.append("bad index: " + get([("token", "abcdefghijklmnop.x")]))
        kv.Put(pb.PutRequest(key=b"k1", value=b"v"), metadata=bob)
        out.append("bob put ok")
        auth.UserRevokeRole(pb.AuthUserRevokeRoleRequest(name="bob", role="rb"), metadata=root)
        out.append("bob after revoke: " + get(bob))
        auth.UserGrantRole(pb.AuthUserGrantRoleRequest(user="bob", role="rb"), metadata=root)
        out.append("bob after grant: " + get(bob))
        auth.UserChangePassword(pb.AuthUserChangePasswordRequest(name="bob", password="new"), metadata=root)
        out.append("bob old token after passwd: " + get(bob))
        out.append("root token still: " + get(root))
        bob = [("token", _token(ch, "bob", "new"))]
        out.append("bob new token: " + get(bob))
        out.append("bob user list: " + _call(
            endpoint, lambda c: rpc_pb2_grpc.AuthStub(c).UserList(pb.AuthUserListRequest(), metadata=bob)))
        out.append("bob defrag: " + _call(endpoint, lambda c: rpc_pb2_grpc.MaintenanceStub(c).Defragment(
            pb.DefragmentRequest(), metadata=bob)))
        auth.UserDelete(pb.AuthUserDeleteRequest(name="bob"), metadata=root)
        out.append("bob after delete: " + get(bob))
        out.append("wrong password: " + _call(endpoint, lambda c: _token(c, "root", "nope")))
        auth.AuthDisable(pb.AuthDisableRequest(), metadata=root)
        out.append("root token after disable: " + get(root))
        out.append("no token after disable: " + get([]))
        out.append("authenticate after disable: " + _call(endpoint, lambda c: _token(c, "root", "rootpw")))
    return out


def test_token_holder_sees_changes_at_once(server_factory: ServerFactory, subject_kind: str) -> None:
    got, want = _on_both(server_factory, subject_kind, _token_scenario)
    assert got == want
    assert "bob old token after passwd: UNAUTHENTICATED: etcdserver: invalid auth token" in want


def test_watch_refused_over_grpc(server_factory: ServerFactory, subject_kind: str) -> None:
    """The refused watch's response itself: created and canceled at once, etcd's reason, the asked id."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        subject_f = pool.submit(server_factory, subject_kind, "subject", FAST_BCRYPT)
        oracle_f = pool.submit(server_factory, "etcd", "oracle", FAST_BCRYPT)
    answers = []
    for server in (subject_f.result(), oracle_f.result()):
        answered = threading.Event()
        with channel(server.endpoint) as ch:
            auth = rpc_pb2_grpc.AuthStub(ch)
            enable_auth(auth, "u", "pw")
            md = [("token", _token(ch, "u", "pw"))]
            create = pb.WatchRequest(create_request=pb.WatchCreateRequest(key=b"k", watch_id=7))
            stream = rpc_pb2_grpc.WatchStub(ch).Watch(_open_stream(create, answered), metadata=md, timeout=5)
            resp = next(stream)
            answered.set()
            answers.append((resp.watch_id, resp.created, resp.canceled, resp.cancel_reason))
    assert answers[0] == answers[1]
    denied = "rpc error: code = PermissionDenied desc = etcdserver: permission denied"
    assert answers[1] == (7, True, True, denied)


def test_watch_checks_the_whole_range(server_factory: ServerFactory) -> None:
    """A watch is allowed where its user may read all of it: a from-key watch ("\\0" range end) needs read
    on everything from its key on (etcd 3.5.1 checked only the key itself; 3.5.33 checks the range)."""
    fe = server_factory("fastetcd", "fe", FAST_BCRYPT).endpoint
    with channel(fe) as ch:
        auth = rpc_pb2_grpc.AuthStub(ch)
        enable_auth(auth, "u", "pw",
                    role="r", perm={"key": b"a", "range_end": b"b", "permType": "READ"})
        md = [("token", _token(ch, "u", "pw"))]
        answers = []
        for key, end in ((b"a", b""), (b"a", b"b"), (b"a", b"\0"), (b"a", b"c")):
            done = threading.Event()
            create = pb.WatchRequest(create_request=pb.WatchCreateRequest(key=key, range_end=end))
            stream = rpc_pb2_grpc.WatchStub(ch).Watch(_open_stream(create, done), metadata=md, timeout=5)
            resp = next(stream)
            done.set()
            answers.append(resp.canceled)
        assert answers == [False, False, True, True]


def _open_stream(request: pb.WatchRequest, done: threading.Event) -> Iterator[pb.WatchRequest]:
    yield request
    done.wait(5)  # not half-closed meanwhile: etcd ends a watch stream whose client stopped sending


def _lock_scenario(endpoint: str) -> list[str]:
    """etcd's Lock and Election services run their recipes with the caller's token: its permissions apply."""
    from fastetcd.proto import v3election_pb2 as epb
    from fastetcd.proto import v3election_pb2_grpc, v3lock_pb2, v3lock_pb2_grpc

    out: list[str] = []
    with channel(endpoint) as ch:
        auth = rpc_pb2_grpc.AuthStub(ch)
        enable_auth(auth, "u", "pw",
                    role="locks", perm={"key": b"mine/", "range_end": b"mine0", "permType": "READWRITE"})
        user = [("token", _token(ch, "u", "pw"))]
        lease = rpc_pb2_grpc.LeaseStub(ch).LeaseGrant(pb.LeaseGrantRequest(TTL=60), metadata=user).ID

        def lock(name: bytes, md: list[tuple[str, str]]) -> str:
            return _call(endpoint, lambda c: v3lock_pb2_grpc.LockStub(c).Lock(
                v3lock_pb2.LockRequest(name=name, lease=lease), metadata=md, timeout=5))

        def campaign(name: bytes, md: list[tuple[str, str]]) -> str:
            return _call(endpoint, lambda c: v3election_pb2_grpc.ElectionStub(c).Campaign(
                epb.CampaignRequest(name=name, lease=lease, value=b"v"), metadata=md, timeout=5))

        out.append("lock outside: " + lock(b"theirs", user))
        out.append("lock inside: " + lock(b"mine", user))
        out.append("lock anonymous: " + lock(b"mine", []))
        out.append("campaign outside: " + campaign(b"theirs", user))
        out.append("campaign inside: " + campaign(b"mine/e", user))
    return out


def test_lock_and_election_check_the_caller(server_factory: ServerFactory, subject_kind: str) -> None:
    got, want = _on_both(server_factory, subject_kind, _lock_scenario)
    assert got == want
    assert "lock outside: UNKNOWN: etcdserver: permission denied" in want


# ------------------------------------------------------------------ permission intervals, at random

_KEYS = [b"a", b"ab", b"abc", b"b", b"ba", b"bb", b"c", b"d", b"\x00", b"\xff"]


def _random_range(rnd: random.Random) -> tuple[bytes, bytes]:
    key = rnd.choice(_KEYS)
    end = rnd.choice([b"", b"", b"\x00", prefix_end(key) or b"\x00", rnd.choice(_KEYS)])
    return key, end


def _outcome(fn: Callable[[], object]) -> str:
    try:
        fn()
    except grpc.RpcError as e:
        return f"{e.code().name}: {e.details()}"  # type: ignore[attr-defined]
    return "OK"


def _interval_scenario(endpoint: str, seed: int) -> list[str]:
    """Random permissions (single keys, ranges, prefixes, from-key, backwards ranges), then random reads,
    writes and deletes as the user holding them: which are allowed must be what etcd allows."""
    rnd = random.Random(seed)
    out: list[str] = []
    with channel(endpoint) as ch:
        auth = rpc_pb2_grpc.AuthStub(ch)
        kv = kv_stub(ch)
        enable_auth(auth, "u", "pw")
        root = [("token", _token(ch, "root", "pw"))]
        for round_ in range(4):
            role = f"r{round_}"
            auth.RoleAdd(pb.AuthRoleAddRequest(name=role), metadata=root)
            for _ in range(rnd.randint(1, 6)):
                key, end = _random_range(rnd)
                typ = rnd.choice(["READ", "WRITE", "READWRITE"])
                grant = pb.AuthRoleGrantPermissionRequest(name=role, perm={"key": key, "range_end": end,
                                                                            "permType": typ})
                auth.RoleGrantPermission(grant, metadata=root)
            if round_:
                revoke = pb.AuthUserRevokeRoleRequest(name="u", role=f"r{round_ - 1}")
                auth.UserRevokeRole(revoke, metadata=root)
            auth.UserGrantRole(pb.AuthUserGrantRoleRequest(user="u", role=role), metadata=root)
            if rnd.random() < 0.5:  # two roles at once: their permissions merge
                other = pb.AuthUserGrantRoleRequest(user="u", role=f"r{rnd.randrange(round_ + 1)}")
                auth.UserGrantRole(other, metadata=root)
            user = [("token", _token(ch, "u", "pw"))]
            perms = auth.RoleGet(pb.AuthRoleGetRequest(role=role), metadata=root).perm
            out.append(f"round {round_}: {[(p.key, p.range_end, p.permType) for p in perms]}")
            for _ in range(40):
                key, end = _random_range(rnd)
                what = rnd.choice(["get", "put", "del"])
                if what == "get":
                    req: object = pb.RangeRequest(key=key, range_end=end)
                    fn: Callable[..., object] = kv.Range
                elif what == "put":
                    req, fn = pb.PutRequest(key=key, value=b"v"), kv.Put
                else:
                    req, fn = pb.DeleteRangeRequest(key=key, range_end=end), kv.DeleteRange
                out.append(f"{what} {key!r} {end!r}: {_outcome(lambda: fn(req, metadata=user))}")  # noqa: B023
    return out


@pytest.mark.parametrize("seed", range(6))
def test_permission_intervals_at_random(server_factory: ServerFactory, subject_kind: str, seed: int) -> None:
    got, want = _on_both(server_factory, subject_kind, lambda endpoint: _interval_scenario(endpoint, seed))
    assert [(g, w) for g, w in zip(got, want, strict=True) if g != w] == []
    assert any(line.endswith(": OK") for line in want) and any("permission denied" in line for line in want)


def _lease_scenario(endpoint: str) -> list[str]:
    """Leases with auth on: revoking one needs write on each of its keys; attaching a key to a lease
    needs write on the lease's keys too (etcd's checkLeasePuts)."""
    out: list[str] = []
    with channel(endpoint) as ch:
        auth = rpc_pb2_grpc.AuthStub(ch)
        lease = rpc_pb2_grpc.LeaseStub(ch)
        kv = kv_stub(ch)
        enable_auth(auth, "u", "pw",
                    role="w", perm={"key": b"mine/", "range_end": b"mine0", "permType": "READWRITE"})
        root = [("token", _token(ch, "root", "pw"))]
        user = [("token", _token(ch, "u", "pw"))]
        theirs = lease.LeaseGrant(pb.LeaseGrantRequest(TTL=60), metadata=root).ID
        kv.Put(pb.PutRequest(key=b"theirs", value=b"1", lease=theirs), metadata=root)
        mine = lease.LeaseGrant(pb.LeaseGrantRequest(TTL=60), metadata=user).ID
        out.append("attach to mine: " + _outcome(lambda: kv.Put(
            pb.PutRequest(key=b"mine/1", value=b"1", lease=mine), metadata=user)))
        out.append("attach to theirs: " + _outcome(lambda: kv.Put(
            pb.PutRequest(key=b"mine/2", value=b"1", lease=theirs), metadata=user)))
        out.append("revoke theirs: " + _outcome(lambda: lease.LeaseRevoke(
            pb.LeaseRevokeRequest(ID=theirs), metadata=user)))
        out.append("ttl of mine with keys: " + _outcome(lambda: lease.LeaseTimeToLive(
            pb.LeaseTimeToLiveRequest(ID=mine, keys=True), metadata=user)))
        out.append("revoke mine: " + _outcome(lambda: lease.LeaseRevoke(
            pb.LeaseRevokeRequest(ID=mine), metadata=user)))
        out.append("mine/1 after: " + str(len(kv.Range(pb.RangeRequest(key=b"mine/1"), metadata=user).kvs)))
        out.append("theirs after: " + str(len(kv.Range(pb.RangeRequest(key=b"theirs"), metadata=root).kvs)))
    return out


def test_lease_permissions(server_factory: ServerFactory, subject_kind: str) -> None:
    got, want = _on_both(server_factory, subject_kind, _lease_scenario)
    assert got == want
    assert "revoke theirs: PERMISSION_DENIED: etcdserver: permission denied" in want


def test_lease_rules_of_later_etcd(server_factory: ServerFactory) -> None:
    """Where etcd 3.5.1 let lease calls through that etcd 3.5.9 closed (CVE-2023-32082), fastetcd follows
    3.5.9: an anonymous caller gets nothing, and a lease's key names need read on them."""
    fe = server_factory("fastetcd", "fe", FAST_BCRYPT).endpoint
    with channel(fe) as ch:
        auth = rpc_pb2_grpc.AuthStub(ch)
        lease = rpc_pb2_grpc.LeaseStub(ch)
        enable_auth(auth, "u", "pw")
        root = [("token", _token(ch, "root", "pw"))]
        user = [("token", _token(ch, "u", "pw"))]
        lid = lease.LeaseGrant(pb.LeaseGrantRequest(TTL=60), metadata=root).ID
        kv_stub(ch).Put(pb.PutRequest(key=b"secret", value=b"1", lease=lid), metadata=root)
        empty = "INVALID_ARGUMENT: etcdserver: user name is empty"
        assert _outcome(lambda: lease.LeaseGrant(pb.LeaseGrantRequest(TTL=60))) == empty
        assert _outcome(lambda: lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=lid))) == empty
        assert _outcome(lambda: lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=lid))) == empty
        denied = "PERMISSION_DENIED: etcdserver: permission denied"
        ttl_keys = pb.LeaseTimeToLiveRequest(ID=lid, keys=True)
        assert _outcome(lambda: lease.LeaseTimeToLive(ttl_keys, metadata=user)) == denied
        ttl = pb.LeaseTimeToLiveRequest(ID=lid)
        assert _outcome(lambda: lease.LeaseTimeToLive(ttl, metadata=user)) == "OK"
        assert lease.LeaseTimeToLive(ttl_keys, metadata=root).keys == [b"secret"]
        assert _outcome(lambda: lease.LeaseLeases(pb.LeaseLeasesRequest(), metadata=user)) == denied
        keepalive = lease.LeaseKeepAlive(iter([pb.LeaseKeepAliveRequest(ID=lid)]), metadata=user)
        assert _outcome(lambda: list(keepalive)) == denied


def test_nested_txn_ops_are_checked(server_factory: ServerFactory) -> None:
    """Every op of a txn needs its permission, inside nested txns too (etcd 3.5.1 skipped those: a user
    could write anywhere through one; etcd 3.5.28 closed it)."""
    fe = server_factory("fastetcd", "fe", FAST_BCRYPT).endpoint
    with channel(fe) as ch:
        auth = rpc_pb2_grpc.AuthStub(ch)
        kv = kv_stub(ch)
        enable_auth(auth, "u", "pw",
                    role="r", perm={"key": b"mine", "permType": "READWRITE"})
        md = [("token", _token(ch, "u", "pw"))]

        def nested(key: bytes) -> pb.TxnRequest:
            inner = pb.TxnRequest(success=[pb.RequestOp(request_put=pb.PutRequest(key=key, value=b"1"))])
            return pb.TxnRequest(success=[pb.RequestOp(request_txn=inner)])

        assert _outcome(lambda: kv.Txn(nested(b"mine"), metadata=md)) == "OK"
        assert _outcome(lambda: kv.Txn(nested(b"theirs"), metadata=md)) == (
            "PERMISSION_DENIED: etcdserver: permission denied"
        )
        root = [("token", _token(ch, "root", "pw"))]
        assert kv.Range(pb.RangeRequest(key=b"theirs"), metadata=root).count == 0


# ------------------------------------------------------------------ watches that are allowed


@pytest.fixture
def watch_pair(server_factory: ServerFactory, subject_kind: str) -> Iterator[LeasePair]:
    with ThreadPoolExecutor(max_workers=2) as pool:
        subject_f = pool.submit(server_factory, subject_kind, "subject", FAST_BCRYPT)
        oracle_f = pool.submit(server_factory, "etcd", "oracle", FAST_BCRYPT)
    with LeasePair(subject_f.result().endpoint, oracle_f.result().endpoint) as p:
        yield p


def test_limited_users_watches(watch_pair: LeasePair, tmp_path: Path) -> None:
    """A limited user's allowed watches see what etcd's do, also after its role is revoked (etcd checks a
    watch when it is created, not each event)."""
    p = watch_pair
    _setup_root_and_alice(p)  # type: ignore[arg-type]  # LeasePair runs commands as Pair does
    specs = {
        "single": [*ALICE, "watch", "a"],
        "prefix": [*ALICE, "watch", "b", "--prefix", "--prev-kv"],
        "range": [*ALICE, "watch", "d", "f", "-w", "json"],
        "root": [*ROOT, "watch", "--prefix", ""],
    }
    background: list[BackgroundCtl] = []
    try:
        watches = {label: BackgroundCtl(p, tmp_path, label, args) for label, args in specs.items()}
        background.extend(watches.values())
        time.sleep(WATCH_START_S)
        p.run(*ROOT, "put", "a", "1", expect_rc=0)
        p.run(*ALICE, "put", "b1", "2", expect_rc=0)
        p.run(*ROOT, "put", "d", "3", expect_rc=0)
        p.run(*ROOT, "put", "x", "outside", expect_rc=0)
        p.run(*ROOT, "user", "revoke-role", "alice", "r1", expect_rc=0)
        p.run(*ALICE, "put", "b2", "refused", expect_rc=1)
        p.run(*ROOT, "put", "b2", "after revoke", expect_rc=0)
        p.run(*ROOT, "put", "a", "END-a", expect_rc=0)
        p.run(*ROOT, "put", "b3", "END-b", expect_rc=0)
        p.run(*ROOT, "put", "e", "END-d", expect_rc=0)
        markers = {"single": b"END-a", "prefix": b"END-b", "range": base64.b64encode(b"END-d"),
                   "root": b"END-d"}
        missing = [label for label, w in watches.items() if not w.wait_for(markers[label])]
        for w in watches.values():
            w.stop()
        assert not missing, f"the last writes never reached the watches {missing} on both servers"
    finally:
        for b in background:
            b.kill()
    p.check()
