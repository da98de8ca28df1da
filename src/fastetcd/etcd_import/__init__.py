"""``fastetcd import SOURCE --data-dir DIR``: a new fastetcd data dir from an etcd v3 backend.

SOURCE is a file from ``etcdctl snapshot save`` (its sha256 trailer is checked) or a stopped etcd's
``member/snap/db`` (or that etcd data dir). Every version etcd retains is applied in revision order to a
fresh MVCC core, leases go through the lessor's grant, alarms are raised as they were, etcd's compaction
is applied (and a compaction etcd had scheduled but not finished is finished, as etcd does on restart),
and the result becomes the new store's snapshot at log index 1. The server started on DIR has etcd's
keys, values, create/mod revisions, versions, leases (IDs and TTLs), current revision and compaction
revision, so ``HashKV`` at any revision both keep answers etcd's hash.

Users (with their bcrypt password hashes), roles, the auth revision and whether auth was enabled come
along too, so etcd's users log in to fastetcd with the same passwords.

Not carried over (yet): cluster membership (fastetcd is one member with its own IDs); raft's term and
index.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

from fastetcd._core import MVCC
from fastetcd.engine.alarms import NAMES as ALARM_NAMES
from fastetcd.engine.alarms import Alarms
from fastetcd.engine.auth_store import AuthState, User
from fastetcd.engine.lessor import Lessor
from fastetcd.engine.state_machine import pack_snapshot
from fastetcd.errors import EtcdError
from fastetcd.etcd_import.etcd_db import EtcdDB, EtcdDBError
from fastetcd.proto import kv_pb2
from fastetcd.snapshot_restore import RestoreError, check_new_data_dir, install

# The imported state is the store's snapshot at this log index; the log continues after it.
SNAPSHOT_INDEX = 1


class EtcdImportError(RestoreError):
    """The import did not happen; the message is one line for the operator."""


@dataclass(frozen=True)
class ImportedState:
    state: bytes  # StateMachine snapshot bytes
    revision: int
    compact_rev: int  # -1: etcd never compacted
    keys: int  # keys live at ``revision``
    versions: int  # versions retained
    leases: int
    alarms: list[tuple[int, int]]
    users: int
    roles: int
    auth_enabled: bool


def resolve_source(source: str) -> str:
    """An etcd data dir stands for its ``member/snap/db``."""
    if os.path.isdir(source):
        db = os.path.join(source, "member", "snap", "db")
        if not os.path.isfile(db):
            raise EtcdImportError(f"{source} is a directory without member/snap/db: not an etcd data dir")
        return db
    return source


def build_state(db: EtcdDB) -> ImportedState:
    """etcd's state, as the snapshot a fastetcd store starts from."""
    finished = db.finished_compact if db.finished_compact is not None else -1
    scheduled = db.scheduled_compact if db.scheduled_compact is not None else -1
    # etcd's restore finishes a compaction it had scheduled but not completed
    compact = max(finished, scheduled)
    core = MVCC()
    core.begin_bulk()
    applied = 0
    last = (0, 0)
    known: set[bytes] = set()  # keys with a retained version so far
    for ver in db.versions():
        if (ver.main, ver.sub) <= last:  # bolt keeps keys sorted: only a damaged file gets here
            raise EtcdImportError(f"revision {ver.main}.{ver.sub} comes after {last[0]}.{last[1]}")
        last = (ver.main, ver.sub)
        try:
            kv = kv_pb2.KeyValue.FromString(ver.kv)
        except Exception:  # protobuf's DecodeError
            raise EtcdImportError(f"revision {ver.main}: malformed KeyValue") from None
        key = kv.key
        if ver.tombstone:
            if core.delete(key, ver.main, ver.sub):
                applied += 1
            elif ver.main > compact:
                raise EtcdImportError(f"revision {ver.main}: tombstone of {key!r}, which is not live there")
            # else: a compaction etcd did not finish left the tombstone of a version it already removed;
            # finishing the compaction removes it too
            continue
        if kv.mod_revision != ver.main:
            raise EtcdImportError(f"revision {ver.main}: {key!r} says it was modified at {kv.mod_revision}")
        if key not in known and (kv.create_revision, kv.version) != (ver.main, 1):
            _stand_in_versions(core, key, kv.create_revision, kv.version, ver.main, compact)
        known.add(key)
        core.put(key, kv.value, kv.lease, ver.main, ver.sub)
        applied += 1
        got = core.get(key, ver.main)
        if got is None or (got.create_revision, got.version) != (kv.create_revision, kv.version):
            raise EtcdImportError(
                f"revision {ver.main}: {key!r} has create revision {kv.create_revision} and version "
                f"{kv.version}, which do not follow from its earlier versions"
            )
    core.end_bulk()
    if compact >= 0:
        core.compact(compact)
        # Compacting at etcd's finished compaction revision keeps every version etcd kept (it only drops
        # the stand-ins); anything else means the two disagree about what the history is.
        if scheduled <= finished and core.n_revs != applied:
            raise EtcdImportError(
                f"compaction at revision {compact} would keep {core.n_revs} of the {applied} versions "
                "etcd keeps"
            )
    # etcd's current revision: the newest revision in the key bucket, or the compaction if that is newer
    revision = max(last[0], finished, 1)

    lessor = Lessor()
    for lease in db.leases():
        if lease.id <= 0:
            raise EtcdImportError(f"lease record with ID {lease.id}")
        try:
            lessor.grant(lease.id, lease.ttl)  # raises a TTL below the minimum to it, as etcd's restore
        except EtcdError as e:
            raise EtcdImportError(f"lease {lease.id:x}: {e}") from None
        if 0 < lease.remaining_ttl < lessor.leases[lease.id].ttl:
            lessor.set_checkpoint(lease.id, lease.remaining_ttl)
    lessor.take_ops()
    lessor.commit()

    alarms = Alarms()
    raised = db.alarms()
    for member, alarm in raised:
        if alarm not in ALARM_NAMES or alarm == 0:
            raise EtcdImportError(f"alarm of member {member:x} has unknown type {alarm}")
        alarms.activate(member, alarm)
    alarms.take_ops()
    alarms.commit()

    auth = _auth_state(db)
    state = pack_snapshot(core.dump(revision), lessor.dump(), alarms.dump(), auth.dump())
    return ImportedState(
        state=state,
        revision=revision,
        compact_rev=core.compact_rev,
        keys=core.count(b"\0", b"\0", revision),
        versions=core.n_revs,
        leases=len(lessor.leases),
        alarms=sorted(raised),
        users=len(auth.users),
        roles=len(auth.roles),
        auth_enabled=auth.enabled,
    )


def _auth_state(db: EtcdDB) -> AuthState:
    """etcd's users, roles and auth setting as fastetcd's auth state: the same records, the same revision."""
    enabled, revision, users, roles = db.auth()
    state = AuthState()
    state.enabled = enabled
    state.revision = max(revision, 1)  # etcd starts its auth store at 1 too
    for u in users:
        name = u.name.decode()
        state.users[name] = User(name, u.password, sorted(u.roles), u.options.no_password)
    for r in roles:
        perms = [(p.key, p.range_end, p.permType) for p in r.keyPermission]
        state.roles[r.name.decode()] = sorted(perms, key=lambda p: p[0])
    return state


def _stand_in_versions(core: MVCC, key: bytes, create: int, version: int, rev: int, compact: int) -> None:
    """Give ``key`` the ``version - 1`` earlier versions of its generation that etcd compacted away.

    The core derives a version's create revision and version number from the key's previous version, so
    the first retained version of a key whose history was compacted needs that history before it. The
    stand-ins sit at ``create``, ``create + 1``, …: all at or below the compaction revision, so the
    compaction that follows removes every one of them and nothing else.
    """
    if not (0 < create < rev <= compact and version > 1 and rev - create >= version - 1):
        why = "are missing above the compaction revision" if rev > compact else "cannot fit"
        raise EtcdImportError(
            f"revision {rev}: {key!r} is version {version} created at {create}, "
            f"but its earlier versions {why}"
        )
    for i in range(version - 1):
        core.put(key, b"", 0, create + i, 0)


def import_etcd(source: str, data_dir: str) -> ImportedState:
    """Create the fastetcd data dir ``data_dir`` from the etcd backend at ``source``."""
    try:
        check_new_data_dir(data_dir)
    except RestoreError as e:
        raise EtcdImportError(str(e)) from None
    path = resolve_source(source)
    try:
        with EtcdDB(path) as db:
            imported = build_state(db)
    except EtcdDBError as e:
        raise EtcdImportError(str(e)) from None
    except FileNotFoundError:
        raise EtcdImportError(f"{path} does not exist") from None
    except OSError as e:
        raise EtcdImportError(f"cannot read {path}: {e.strerror or e}") from None
    created = not os.path.exists(data_dir)
    try:
        install(data_dir, SNAPSHOT_INDEX, imported.state, imported.compact_rev)
    except BaseException as e:
        if created:
            shutil.rmtree(data_dir, ignore_errors=True)
        if isinstance(e, RestoreError):
            raise EtcdImportError(str(e)) from None
        raise
    return imported
