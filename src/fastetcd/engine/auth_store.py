"""etcd's auth store (server/auth/store.go, range_perm_cache.go): users, roles, permissions, and the rules
every request is checked by once auth is enabled.

State (``AuthState``) is part of the log like keys and leases: each change is one log entry holding the
etcd request that made it (``encode_change``; passwords already bcrypt-hashed, as etcd puts them in its
raft log), applied by the same code when the writer runs it and when a restart or a replica replays it,
and the whole state goes into snapshots (``dump``/``load``). The state machine runs a change alone
(after everything queued before it is durable) on a copy, and installs the copy only once its entry is
durable, so no reader ever sees an auth change that could still be lost.

Example: ``user add alice`` (revision 1 → 2), ``role add r``, ``role grant-permission r read a b``,
``user grant-role alice r``, ``auth enable`` (revision stays 5). Alice's Range on ``[a, b)`` is then
allowed, her Put on ``a`` is refused with "etcdserver: permission denied", and a Range without a token with
"etcdserver: user name is empty". Root (any user holding the ``root`` role) may do anything.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from fastetcd import errors
from fastetcd.engine.auth_tokens import AuthInfo, SimpleTokens, TokenProvider
from fastetcd.proto import auth_pb2
from fastetcd.proto import rpc_pb2 as pb

ROOT = "root"  # both the root user's and the root role's name
MIN_BCRYPT_COST, MAX_BCRYPT_COST = 4, 31
READ = auth_pb2.Permission.READ
WRITE = auth_pb2.Permission.WRITE
READWRITE = auth_pb2.Permission.READWRITE

# Kinds of change, the first byte of a logged change; the rest is the etcd request.
USER_ADD, USER_DELETE, USER_CHANGE_PASSWORD, USER_GRANT_ROLE, USER_REVOKE_ROLE = 1, 2, 3, 4, 5
ROLE_ADD, ROLE_DELETE, ROLE_GRANT_PERMISSION, ROLE_REVOKE_PERMISSION = 6, 7, 8, 9
AUTH_ENABLE, AUTH_DISABLE = 10, 11
REQUEST_TYPES: dict[int, type] = {
    USER_ADD: pb.AuthUserAddRequest,
    USER_DELETE: pb.AuthUserDeleteRequest,
    USER_CHANGE_PASSWORD: pb.AuthUserChangePasswordRequest,
    USER_GRANT_ROLE: pb.AuthUserGrantRoleRequest,
    USER_REVOKE_ROLE: pb.AuthUserRevokeRoleRequest,
    ROLE_ADD: pb.AuthRoleAddRequest,
    ROLE_DELETE: pb.AuthRoleDeleteRequest,
    ROLE_GRANT_PERMISSION: pb.AuthRoleGrantPermissionRequest,
    ROLE_REVOKE_PERMISSION: pb.AuthRoleRevokePermissionRequest,
    AUTH_ENABLE: pb.AuthEnableRequest,
    AUTH_DISABLE: pb.AuthDisableRequest,
}

_DUMP_HEAD = struct.Struct("<BQII")  # enabled, revision, user count, role count


def encode_change(kind: int, req: Any) -> bytes:
    """An auth change as the log holds it: its kind, then the etcd request (``REQUEST_TYPES[kind]``)."""
    return bytes([kind]) + req.SerializeToString()


def decode_change(data: bytes) -> tuple[int, Any]:
    return data[0], REQUEST_TYPES[data[0]].FromString(data[1:])


@dataclass(slots=True)
class User:
    name: str
    password: bytes  # bcrypt hash; b"" for a no-password user
    roles: list[str] = field(default_factory=list)  # sorted, as etcd keeps them
    no_password: bool = False


# A permission: (key, range_end, type); range_end b"" is the single key, b"\0" everything from key on.
Perm = tuple[bytes, bytes, int]


class AuthState:
    """Users, roles and the enabled flag, with etcd's rules for changing them (``apply``)."""

    def __init__(self) -> None:
        self.enabled = False
        self.revision = 1  # etcd's auth store starts at 1 and counts changes (enabling does not count)
        self.users: dict[str, User] = {}
        self.roles: dict[str, list[Perm]] = {}  # sorted by key, as etcd keeps them

    def copy(self) -> AuthState:
        c = AuthState()
        c.enabled = self.enabled
        c.revision = self.revision
        c.users = {n: User(u.name, u.password, list(u.roles), u.no_password) for n, u in self.users.items()}
        c.roles = {n: list(p) for n, p in self.roles.items()}
        return c

    def has_root_role(self, name: str) -> bool:
        user = self.users.get(name)
        return user is not None and ROOT in user.roles

    # -------------------------------------------------------------- changes (etcd's authStore methods)

    def apply(self, kind: int, r: Any) -> bool:
        """Apply one change, raising etcd's error without changing anything if it is refused. Returns
        False when it is accepted but changes nothing (enable twice, a role granted twice): not logged."""
        if kind == USER_ADD:
            if not r.name:
                raise errors.USER_EMPTY
            if r.name in self.users:
                raise errors.USER_ALREADY_EXIST
            no_password = r.options.no_password if r.HasField("options") else False
            password = b"" if no_password else _hashed(r.hashedPassword)
            self.users[r.name] = User(r.name, password, [], no_password)
        elif kind == USER_DELETE:
            if self.enabled and r.name == ROOT:
                raise errors.INVALID_AUTH_MGMT
            if self.users.pop(r.name, None) is None:
                raise errors.USER_NOT_FOUND
        elif kind == USER_CHANGE_PASSWORD:
            user = self.users.get(r.name)
            if user is None:
                raise errors.USER_NOT_FOUND
            user.password = b"" if user.no_password else _hashed(r.hashedPassword)
        elif kind == USER_GRANT_ROLE:
            user = self.users.get(r.user)
            if user is None:
                raise errors.USER_NOT_FOUND
            if r.role != ROOT and r.role not in self.roles:  # root needs no role of that name
                raise errors.ROLE_NOT_FOUND
            if r.role in user.roles:
                return False
            user.roles = sorted([*user.roles, r.role])
        elif kind == USER_REVOKE_ROLE:
            if self.enabled and r.name == ROOT and r.role == ROOT:
                raise errors.INVALID_AUTH_MGMT
            user = self.users.get(r.name)
            if user is None:
                raise errors.USER_NOT_FOUND
            if r.role not in user.roles:
                raise errors.ROLE_NOT_GRANTED
            user.roles = [role for role in user.roles if role != r.role]
        elif kind == ROLE_ADD:
            if not r.name:
                raise errors.ROLE_EMPTY
            if r.name in self.roles:
                raise errors.ROLE_ALREADY_EXIST
            self.roles[r.name] = []
        elif kind == ROLE_DELETE:
            if self.enabled and r.role == ROOT:
                raise errors.INVALID_AUTH_MGMT
            if self.roles.pop(r.role, None) is None:
                raise errors.ROLE_NOT_FOUND
            for user in self.users.values():
                if r.role in user.roles:
                    user.roles = [role for role in user.roles if role != r.role]
        elif kind == ROLE_GRANT_PERMISSION:
            if not r.HasField("perm"):
                raise errors.PERMISSION_NOT_GIVEN
            perms = self.roles.get(r.name)
            if perms is None:
                raise errors.ROLE_NOT_FOUND
            p = r.perm
            # etcd binary-searches the first permission with key >= the new one's and updates it only if
            # that very one has the same range end; otherwise the new permission is added.
            idx = next((i for i, q in enumerate(perms) if q[0] >= p.key), len(perms))
            if idx < len(perms) and perms[idx][0] == p.key and perms[idx][1] == p.range_end:
                perms[idx] = (p.key, p.range_end, p.permType)
            else:
                perms.append((p.key, p.range_end, p.permType))
                perms.sort(key=lambda q: q[0])  # stable, as Go's insertion sort for short lists
        elif kind == ROLE_REVOKE_PERMISSION:
            perms = self.roles.get(r.role)
            if perms is None:
                raise errors.ROLE_NOT_FOUND
            kept = [q for q in perms if q[0] != r.key or q[1] != r.range_end]
            if len(kept) == len(perms):
                raise errors.PERMISSION_NOT_GRANTED
            self.roles[r.role] = kept
        elif kind == AUTH_ENABLE:
            if self.enabled:
                return False
            if ROOT not in self.users:
                raise errors.ROOT_USER_NOT_EXIST
            if not self.has_root_role(ROOT):
                raise errors.ROOT_ROLE_NOT_EXIST
            self.enabled = True
            return True  # etcd does not count enabling as a revision
        elif kind == AUTH_DISABLE:
            if not self.enabled:
                return False
            self.enabled = False
        else:
            raise ValueError(f"unknown auth change {kind}")
        self.revision += 1
        return True

    # -------------------------------------------------------------- snapshots

    def dump(self) -> bytes:
        """In name order, so two stores holding the same users and roles dump (and hash) the same."""
        parts = [_DUMP_HEAD.pack(self.enabled, self.revision, len(self.users), len(self.roles))]
        for _, user in sorted(self.users.items()):
            msg = auth_pb2.User(name=user.name.encode(), password=user.password, roles=user.roles)
            if user.no_password:
                msg.options.no_password = True
            parts.append(_framed(msg.SerializeToString()))
        for name, perms in sorted(self.roles.items()):
            role = auth_pb2.Role(name=name.encode())
            for key, end, typ in perms:
                role.keyPermission.add(key=key, range_end=end, permType=typ)
            parts.append(_framed(role.SerializeToString()))
        return b"".join(parts)

    @classmethod
    def load(cls, data: bytes) -> AuthState:
        s = cls()
        if not data:
            return s
        enabled, s.revision, n_users, n_roles = _DUMP_HEAD.unpack_from(data)
        s.enabled = bool(enabled)
        pos = _DUMP_HEAD.size
        for _ in range(n_users):
            raw, pos = _unframe(data, pos)
            u = auth_pb2.User.FromString(raw)
            name = u.name.decode()
            s.users[name] = User(name, u.password, list(u.roles), u.options.no_password)
        for _ in range(n_roles):
            raw, pos = _unframe(data, pos)
            role = auth_pb2.Role.FromString(raw)
            s.roles[role.name.decode()] = [(p.key, p.range_end, p.permType) for p in role.keyPermission]
        return s


def _hashed(b64: str) -> bytes:
    """etcd's selectPassword for a request the API layer already hashed: the base64 of a bcrypt hash."""
    import base64
    import binascii

    try:
        return base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise errors.NO_PASSWORD_USER from None


def _framed(b: bytes) -> bytes:
    return struct.pack("<I", len(b)) + b


def _unframe(data: bytes, pos: int) -> tuple[bytes, int]:
    (n,) = struct.unpack_from("<I", data, pos)
    return data[pos + 4 : pos + 4 + n], pos + 4 + n


# ------------------------------------------------------------------ etcd's interval rules (pkg/adt)


def _cmp(a: bytes, b: bytes) -> int:
    """adt.BytesAffineComparable: an empty bound is greater than every other (the open end)."""
    if not a:
        return 0 if not b else 1
    if not b:
        return -1
    return (a > b) - (a < b)


def _compare(ib: bytes, ie: bytes, jb: bytes, je: bytes) -> int:
    """adt.Interval.Compare of [ib, ie) with [jb, je): -1 left of it, 1 right of it, 0 overlapping."""
    if _cmp(ib, jb) < 0 and _cmp(ie, jb) <= 0:
        return -1
    if _cmp(ib, je) >= 0:
        return 1
    return 0


class _Node:
    __slots__ = ("begin", "end", "max", "left", "right", "parent", "red")

    def __init__(self, begin: bytes, end: bytes, nil: _Node | None) -> None:
        self.begin = begin
        self.end = end
        self.max = end
        self.left = self.right = self.parent = nil
        self.red = True


class _Perms:
    """One user's merged permissions of one type: etcd's adt interval tree (a red-black tree on interval
    begins, each node holding its subtree's largest end), ported with its exact shape and pruning.

    The shape matters: a backwards request range ([c, bb)) or a backwards permission is answered by
    whichever nodes the tree's pruned walk happens to reach, so only the same tree gives etcd's answers.
    """

    __slots__ = ("nil", "root")

    def __init__(self) -> None:
        self.nil = _Node(b"", b"", None)
        self.nil.red = False
        self.root = self.nil

    # ---- insertion (CLRS 13.3, as adt.intervalTree.Insert)

    def insert(self, begin: bytes, end: bytes) -> None:
        nil = self.nil
        z = _Node(begin, end, nil)
        y, x = nil, self.root
        while x is not nil:
            y = x
            x = x.left if _cmp(begin, x.begin) < 0 else x.right
        z.parent = y
        if y is nil:
            self.root = z
        else:
            if _cmp(begin, y.begin) < 0:
                y.left = z
            else:
                y.right = z
            self._update_max(y)
        self._insert_fixup(z)

    def _update_max(self, x: _Node) -> None:
        nil = self.nil
        while x is not nil:
            old, m = x.max, x.end
            if x.left is not nil and _cmp(x.left.max, m) > 0:
                m = x.left.max
            if x.right is not nil and _cmp(x.right.max, m) > 0:
                m = x.right.max
            if _cmp(old, m) == 0:
                break  # etcd stops here, even where an ancestor's max is stale
            x.max = m
            x = x.parent

    def _insert_fixup(self, z: _Node) -> None:
        while z.parent.red:
            gp = z.parent.parent
            if z.parent is gp.left:
                y = gp.right
                if y.red:
                    y.red = z.parent.red = False
                    gp.red = True
                    z = gp
                else:
                    if z is z.parent.right:
                        z = z.parent
                        self._rotate_left(z)
                    z.parent.red = False
                    z.parent.parent.red = True
                    self._rotate_right(z.parent.parent)
            else:
                y = gp.left
                if y.red:
                    y.red = z.parent.red = False
                    gp.red = True
                    z = gp
                else:
                    if z is z.parent.left:
                        z = z.parent
                        self._rotate_right(z)
                    z.parent.red = False
                    z.parent.parent.red = True
                    self._rotate_left(z.parent.parent)
        self.root.red = False

    def _rotate_left(self, x: _Node) -> None:
        nil = self.nil
        if x.right is nil:
            return
        y = x.right
        x.right = y.left
        if y.left is not nil:
            y.left.parent = x
        self._update_max(x)
        self._replace_parent(x, y)
        y.left = x
        self._update_max(y)

    def _rotate_right(self, x: _Node) -> None:
        nil = self.nil
        if x.left is nil:
            return
        y = x.left
        x.left = y.right
        if y.right is not nil:
            y.right.parent = x
        self._update_max(x)
        self._replace_parent(x, y)
        y.right = x
        self._update_max(y)

    def _replace_parent(self, x: _Node, y: _Node) -> None:
        y.parent = x.parent
        if x.parent is self.nil:
            self.root = y
        else:
            if x is x.parent.left:
                x.parent.left = y
            else:
                x.parent.right = y
            self._update_max(x.parent)
        x.parent = y

    # ---- queries

    def _visit(self, x: _Node, b: bytes, e: bytes, out: list[_Node]) -> None:
        """adt's visit: the nodes overlapping [b, e) in begin order, as far as the tree's pruning reaches."""
        if x is self.nil:
            return
        v = _compare(b, e, x.begin, x.end)
        if v < 0:
            self._visit(x.left, b, e, out)
        elif v > 0:
            if _compare(x.begin, x.max, b, e) == 0:
                self._visit(x.left, b, e, out)
                self._visit(x.right, b, e, out)
        else:
            self._visit(x.left, b, e, out)
            out.append(x)
            self._visit(x.right, b, e, out)

    def intersects(self, b: bytes, e: bytes) -> bool:
        """IntervalTree.Intersects: its walk toward an overlapping node."""
        nil = self.nil
        x = self.root
        while x is not nil and _compare(b, e, x.begin, x.end) != 0:
            x = x.left if x.left is not nil and _cmp(x.left.max, b) > 0 else x.right
        return x is not nil

    def contains(self, b: bytes, e: bytes) -> bool:
        """IntervalTree.Contains: the visited intervals cover [b, e) without a gap."""
        nodes: list[_Node] = []
        self._visit(self.root, b, e, nodes)
        if not nodes:
            return False
        min_begin, max_end = nodes[0].begin, nodes[0].end
        for n in nodes[1:]:
            if _cmp(max_end, n.begin) < 0:
                return False
            if _cmp(n.end, max_end) > 0:
                max_end = n.end
        return _cmp(max_end, e) >= 0 and _cmp(min_begin, b) <= 0


def _merged_perms(state: AuthState, user: User) -> tuple[_Perms, _Perms]:
    """etcd's getMergedPerms: every permission of every role the user holds, as read and write sets."""
    read, write = _Perms(), _Perms()
    for role in user.roles:
        for key, end, typ in state.roles.get(role, ()):
            if end:
                b, e = key, b"" if end == b"\x00" else end
            else:
                b, e = key, key + b"\x00"
            if typ in (READ, READWRITE):
                read.insert(b, e)
            if typ in (WRITE, READWRITE):
                write.insert(b, e)
    return read, write


# ------------------------------------------------------------------ the store


class AuthStore:
    """The auth state in force, the token provider, and etcd's permission checks over them."""

    def __init__(self, tokens: TokenProvider | None = None, bcrypt_cost: int = 10) -> None:
        self.state = AuthState()
        self.tokens: TokenProvider = tokens if tokens is not None else SimpleTokens()
        # bcrypt's own limits (Go's MinCost..MaxCost); etcd falls back to its default outside them.
        self.bcrypt_cost = bcrypt_cost if MIN_BCRYPT_COST <= bcrypt_cost <= MAX_BCRYPT_COST else 10
        self._perms: dict[str, tuple[_Perms, _Perms]] = {}  # user -> merged (read, write): etcd's cache

    @property
    def enabled(self) -> bool:
        return self.state.enabled

    @property
    def revision(self) -> int:
        return self.state.revision

    # -------------------------------------------------------------- state changes

    def stage(self, kind: int, req: Any) -> AuthState | None:
        """The state after ``req`` (raising etcd's error if it is refused); None if it changes nothing."""
        new = self.state.copy()
        return new if new.apply(kind, req) else None

    def install(self, new: AuthState, kind: int, req: Any) -> None:
        """Make a durable change the state in force; tokens it makes invalid are forgotten at once."""
        was_enabled = self.state.enabled
        self.state = new
        self._perms.clear()  # every change invalidates the merged permissions (etcd clears them too)
        if kind in (USER_DELETE, USER_CHANGE_PASSWORD):
            self.tokens.invalidate_user(req.name)
        if new.enabled != was_enabled:
            (self.tokens.enable if new.enabled else self.tokens.disable)()

    def replay(self, change: bytes, *, live: bool = False) -> None:
        """Apply a logged change. ``live``: on a running follower, where it must also take effect on the
        permission cache and the tokens, as ``install`` does on the writer."""
        kind, req = decode_change(change)
        if not live:
            self.state.apply(kind, req)
            return
        new = self.state.copy()
        new.apply(kind, req)
        self.install(new, kind, req)

    def load(self, data: bytes) -> None:
        self.state = AuthState.load(data)
        self._perms.clear()

    def recovered(self) -> None:
        """After start-up: a store recovered with auth enabled issues tokens again."""
        if self.state.enabled:
            self.tokens.enable()

    def dump(self) -> bytes:
        return self.state.dump()

    # -------------------------------------------------------------- who is calling

    def auth_info(self, token: str | None, common_name: str | None) -> AuthInfo | None:
        """etcd's AuthInfoFromCtx, then AuthInfoFromTLS: a token decides (raising "invalid auth token"
        if it is not valid, whether or not auth is enabled); without one, a verified client certificate's
        CN is the user name; None for nobody."""
        if token is not None:
            info = self.tokens.info(token, self.state.revision)
            if info is None:
                raise errors.INVALID_AUTH_TOKEN
            return info
        if common_name:
            return AuthInfo(common_name, self.state.revision)
        return None

    def check_password(self, name: str, password: str) -> tuple[bytes, int]:
        """The first half of etcd's CheckPassword (before the bcrypt comparison, which the caller runs off
        the event loop): the user's hash and the revision it was read at."""
        if not self.state.enabled:
            raise errors.AUTH_NOT_ENABLED
        user = self.state.users.get(name)
        if user is None:
            raise errors.AUTH_FAILED
        if user.no_password:
            raise errors.NO_PASSWORD_USER
        return user.password, self.state.revision

    # -------------------------------------------------------------- permission checks

    def is_admin_permitted(self, info: AuthInfo | None) -> None:
        if not self.state.enabled:
            return
        if info is None or not info.username:
            raise errors.USER_EMPTY
        user = self.state.users.get(info.username)
        if user is None:
            raise errors.USER_NOT_FOUND
        if ROOT not in user.roles:
            raise errors.PERMISSION_DENIED

    def has_role(self, name: str, role: str) -> bool:
        user = self.state.users.get(name)
        return user is not None and role in user.roles

    def is_range_permitted(self, info: AuthInfo | None, key: bytes, range_end: bytes) -> None:
        self._check(info, key, range_end, READ)

    def is_put_permitted(self, info: AuthInfo | None, key: bytes) -> None:
        self._check(info, key, b"", WRITE)

    def is_delete_permitted(self, info: AuthInfo | None, key: bytes, range_end: bytes) -> None:
        self._check(info, key, range_end, WRITE)

    def _check(self, info: AuthInfo | None, key: bytes, range_end: bytes, typ: int) -> None:
        """etcd's isOpPermitted."""
        state = self.state
        if not state.enabled:
            return
        if info is None or info.revision == 0:
            raise errors.USER_EMPTY
        if info.revision < state.revision:
            raise errors.AUTH_OLD_REVISION
        user = state.users.get(info.username)
        if user is None:
            raise errors.PERMISSION_DENIED
        if ROOT in user.roles:
            return
        perms = self._perms.get(user.name)
        if perms is None:
            perms = self._perms[user.name] = _merged_perms(state, user)
        tree = perms[0] if typ == READ else perms[1]
        if not range_end:
            ok = tree.intersects(key, key + b"\x00")
        else:
            ok = tree.contains(key, b"" if range_end == b"\x00" else range_end)
        if not ok:
            raise errors.PERMISSION_DENIED

    def check_txn(self, info: AuthInfo | None, t: pb.TxnRequest) -> None:
        """etcd's checkTxnAuth: every compare (read) and every op of both branches.

        Nested txns are checked too, as etcd does since 3.5.8; 3.5.1 let their ops through unchecked.
        """
        for c in t.compare:
            self.is_range_permitted(info, c.key, c.range_end)
        for ops in (t.success, t.failure):
            for op in ops:
                kind = op.WhichOneof("request")
                if kind == "request_range":
                    self.is_range_permitted(info, op.request_range.key, op.request_range.range_end)
                elif kind == "request_put":
                    self.is_put_permitted(info, op.request_put.key)
                elif kind == "request_delete_range":
                    d = op.request_delete_range
                    if d.prev_kv:
                        self.is_range_permitted(info, d.key, d.range_end)
                    self.is_delete_permitted(info, d.key, d.range_end)
                elif kind == "request_txn":
                    self.check_txn(info, op.request_txn)
