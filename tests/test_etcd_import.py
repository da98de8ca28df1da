"""``fastetcd import``: a real etcd 3.5.1's backend becomes a fastetcd data dir with the same history.

Real etcd gets a seeded random history (puts, overwrites, single and prefix deletes, txns, leases with
keys, a revoke, a compaction, writes after it that overwrite compacted keys, values larger than a page, a
NOSPACE alarm); its answers are recorded, then ``etcdctl snapshot save`` and, after etcd stopped, its
``member/snap/db`` are each imported and served by fastetcd, which must answer the same: the key space
with every revision and version, reads at past revisions and the compacted error below the compaction,
``endpoint hashkv`` at several revisions (equal hashes mean the same MVCC history), leases, alarms and
the header revision.

Also: the bolt reader on the files etcd made (page types, overflow pages, inline buckets) and on small
hand-made files (nested buckets, damaged meta pages, cycles); the state built from a compacted history
against the core that lived through it; refusing to start on an etcd data dir.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import random
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from fastetcd._core import MVCC

from fastetcd.engine.lessor import MIN_TTL
from fastetcd.engine.state_machine import SNAPSHOT_MAGIC
from fastetcd.etcd_import import EtcdImportError, build_state
from fastetcd.etcd_import import bolt as boltmod
from fastetcd.etcd_import.bolt import BoltDB, BoltError
from fastetcd.etcd_import.etcd_db import EtcdDB, EtcdDBError, LeaseRecord, Version, decode_lease, parse_rev
from fastetcd.proto import kv_pb2, rpc_pb2, rpc_pb2_grpc
from fastetcd.store.base import StoreError
from fastetcd.store.embedded import EmbeddedStore
from fastetcd.testing import ServerProcess, run_etcdctl, run_fastetcd, start_etcd, start_fastetcd

SEED = 20261127
BIG_BEFORE = 10_000  # bytes: larger than a 4 KiB page, so the leaf holding it has overflow pages
BIG_AFTER = 30_000


# ------------------------------------------------------------------------------------------ etcd history


@dataclass
class History:
    compact_rev: int = 0
    leases: list[int] = field(default_factory=list)  # alive at the end
    big_keys: dict[bytes, bytes] = field(default_factory=dict)


def _apply_history(endpoint: str, seed: int) -> History:
    rnd = random.Random(seed)
    hist = History()
    keys = [f"{p}/{i}".encode() for p in ("app", "cfg", "svc") for i in range(10)] + [b"\x00bin\xff/1"]
    with grpc.insecure_channel(endpoint) as ch:
        kv = rpc_pb2_grpc.KVStub(ch)
        lease = rpc_pb2_grpc.LeaseStub(ch)
        maint = rpc_pb2_grpc.MaintenanceStub(ch)
        alive: list[int] = []

        def value() -> bytes:
            return rnd.randbytes(rnd.choice([0, 1, 7, 40, 300]))

        def step() -> None:
            r = rnd.random()
            if r < 0.45:
                kv.Put(rpc_pb2.PutRequest(key=rnd.choice(keys), value=value()), timeout=10)
            elif r < 0.55 and alive:
                kv.Put(
                    rpc_pb2.PutRequest(key=rnd.choice(keys), value=value(), lease=rnd.choice(alive)),
                    timeout=10,
                )
            elif r < 0.65:
                kv.DeleteRange(rpc_pb2.DeleteRangeRequest(key=rnd.choice(keys)), timeout=10)
            elif r < 0.70:
                prefix = rnd.choice([b"app/", b"cfg/1", b"svc/"])
                kv.DeleteRange(
                    rpc_pb2.DeleteRangeRequest(key=prefix, range_end=prefix[:-1] + bytes([prefix[-1] + 1])),
                    timeout=10,
                )
            elif r < 0.85:
                k1, k2, k3 = rnd.sample(keys, 3)
                cmp = rpc_pb2.Compare(
                    key=k1,
                    target=rpc_pb2.Compare.VERSION,
                    result=rpc_pb2.Compare.GREATER,
                    version=rnd.randint(0, 3),
                )
                success = [
                    rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=k2, value=value())),
                    rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=k3)),
                    rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=k1, value=value())),
                ]
                failure = [rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=k3, value=value()))]
                kv.Txn(rpc_pb2.TxnRequest(compare=[cmp], success=success, failure=failure), timeout=10)
            elif r < 0.93 or not alive:
                alive.append(
                    lease.LeaseGrant(
                        rpc_pb2.LeaseGrantRequest(TTL=rnd.choice([600, 1800, 3600])), timeout=10
                    ).ID
                )
            else:
                victim = alive.pop(rnd.randrange(len(alive)))
                lease.LeaseRevoke(rpc_pb2.LeaseRevokeRequest(ID=victim), timeout=10)

        for _ in range(160):
            step()
        big = b"big/before"
        hist.big_keys[big] = rnd.randbytes(BIG_BEFORE)
        kv.Put(rpc_pb2.PutRequest(key=big, value=hist.big_keys[big]), timeout=10)
        for _ in range(40):
            step()
        head = kv.Range(rpc_pb2.RangeRequest(key=b"x"), timeout=10).header.revision
        hist.compact_rev = head - 25
        kv.Compact(rpc_pb2.CompactionRequest(revision=hist.compact_rev, physical=True), timeout=30)
        for k in keys[:12]:  # most of these had versions the compaction removed
            kv.Put(rpc_pb2.PutRequest(key=k, value=value()), timeout=10)
        for _ in range(120):
            step()
        big = b"big/after"
        hist.big_keys[big] = rnd.randbytes(BIG_AFTER)
        kv.Put(
            rpc_pb2.PutRequest(key=big, value=hist.big_keys[big], lease=alive[0] if alive else 0), timeout=10
        )
        for lid in alive:  # every live lease keeps a key
            kv.Put(rpc_pb2.PutRequest(key=b"leased/%d" % lid, value=b"v", lease=lid), timeout=10)
        kv.Put(rpc_pb2.PutRequest(key=b"last", value=b"1"), timeout=10)
        # NOSPACE from a client, as etcd's own tests raise it; it caps writes, so it comes last
        member = maint.Status(rpc_pb2.StatusRequest(), timeout=10).header.member_id
        maint.Alarm(
            rpc_pb2.AlarmRequest(
                action=rpc_pb2.AlarmRequest.ACTIVATE, memberID=member, alarm=rpc_pb2.NOSPACE
            ),
            timeout=10,
        )
        hist.leases = alive
    return hist


def ctl(endpoint: str, *args: str, ok: bool = True) -> str:
    code, out, err = run_etcdctl(endpoint, args)
    if ok:
        assert code == 0, f"etcdctl {' '.join(args)}: {err}"
        return out
    assert code != 0, f"etcdctl {' '.join(args)} succeeded: {out}"
    return err.strip().splitlines()[-1]


def _get_json(endpoint: str, *extra: str) -> dict:
    got = json.loads(ctl(endpoint, "get", "", "--from-key", "-w", "json", *extra))
    return {"revision": got["header"]["revision"], "kvs": got.get("kvs", []), "count": got.get("count", 0)}


def _hashkv(endpoint: str, rev: int) -> tuple[int, int]:
    got = json.loads(ctl(endpoint, "endpoint", "hashkv", "--rev", str(rev), "-w", "json"))[0]["HashKV"]
    return got["hash"], got.get("compact_revision", 0)


@dataclass
class Observed:
    """What a server answers, for comparing fastetcd with the etcd it was imported from."""

    head: dict
    past: dict[int, dict]
    errors: dict[str, str]
    hashes: dict[int, tuple[int, int]]
    leases: list[int]
    ttl: dict[int, dict]
    alarms: str
    events: list[bytes]  # a watch of every key from just after the compaction up to the head


def watch_history(endpoint: str, start_rev: int, head_rev: int) -> list[bytes]:
    """Every event from ``start_rev`` to ``head_rev`` (with prev_kv), as the server sends them."""
    create = rpc_pb2.WatchCreateRequest(key=b"\0", range_end=b"\0", start_revision=start_rev, prev_kv=True)
    done = threading.Event()

    def requests() -> Iterator[rpc_pb2.WatchRequest]:
        yield rpc_pb2.WatchRequest(create_request=create)
        done.wait(30)  # keep the stream open: etcd ends a watch stream its client half-closed

    events: list[bytes] = []
    with grpc.insecure_channel(endpoint) as ch:
        stream = rpc_pb2_grpc.WatchStub(ch).Watch(requests(), timeout=30)
        try:
            for resp in stream:
                events += [e.SerializeToString() for e in resp.events]
                if resp.events and resp.events[-1].kv.mod_revision >= head_rev:
                    break
        finally:
            done.set()
            stream.cancel()
    return events


def observe(endpoint: str, head_rev: int, compact_rev: int) -> Observed:
    mid = (compact_rev + head_rev) // 2
    revs = sorted({compact_rev, compact_rev + 1, mid, head_rev - 1, head_rev})
    hash_revs = sorted({0, compact_rev + 1, compact_rev + 3, mid, head_rev})
    leases = sorted(int(x["id"]) for x in json.loads(ctl(endpoint, "lease", "list", "-w", "json"))["leases"])
    ttl = {}
    for lid in leases:
        t = json.loads(ctl(endpoint, "lease", "timetolive", f"{lid:x}", "--keys", "-w", "json"))
        ttl[lid] = {"granted": t["granted-ttl"], "remaining": t["ttl"], "keys": sorted(t.get("keys", []))}
    return Observed(
        head=_get_json(endpoint),
        past={r: _get_json(endpoint, "--rev", str(r)) for r in revs},
        errors={
            "get below compaction": ctl(endpoint, "get", "app/1", "--rev", str(compact_rev - 1), ok=False),
            "get in the future": ctl(endpoint, "get", "app/1", "--rev", str(head_rev + 5), ok=False),
            "hashkv at the compaction": ctl(
                endpoint, "endpoint", "hashkv", "--rev", str(compact_rev), ok=False
            ),
        },
        hashes={r: _hashkv(endpoint, r) for r in hash_revs},
        leases=leases,
        ttl=ttl,
        alarms=ctl(endpoint, "alarm", "list"),
        events=watch_history(endpoint, compact_rev + 1, head_rev),
    )


@dataclass
class EtcdSource:
    snapshot: Path
    data_dir: Path  # the stopped etcd's data dir
    history: History
    observed: Observed


@pytest.fixture(scope="module")
def etcd_source(tmp_path_factory: pytest.TempPathFactory) -> EtcdSource:
    tmp = tmp_path_factory.mktemp("etcd-source")
    etcd = start_etcd(tmp)
    try:
        hist = _apply_history(etcd.endpoint, SEED)
        head = _get_json(etcd.endpoint)["revision"]
        observed = observe(etcd.endpoint, head, hist.compact_rev)
        snap = tmp / "etcd.snap"
        assert "Snapshot saved at" in ctl(etcd.endpoint, "snapshot", "save", str(snap))
        # a clean stop: etcd commits its backend, so member/snap/db holds everything
        etcd.stop(timeout=30, escalate=False)
    finally:
        etcd.kill()
    return EtcdSource(snap, tmp / "etcd", hist, observed)


def _import(source: Path, dest: Path) -> subprocess.CompletedProcess[str]:
    return run_fastetcd("import", str(source), "--data-dir", str(dest), timeout=120)


def _start_imported(root: Path) -> ServerProcess:
    return start_fastetcd(root, ["--store", "embedded"])


# ------------------------------------------------------------------------------------------ end to end


@pytest.mark.parametrize("kind", ["snapshot file", "member/snap/db"])
def test_imported_fastetcd_answers_as_etcd(etcd_source: EtcdSource, tmp_path: Path, kind: str) -> None:
    source = (
        etcd_source.snapshot if kind == "snapshot file" else etcd_source.data_dir / "member" / "snap" / "db"
    )
    proc = _import(source, tmp_path / "fastetcd")
    assert proc.returncode == 0, proc.stderr
    want = etcd_source.observed
    head = want.head["revision"]
    assert proc.stdout.startswith(
        f"imported etcd at revision {head} (compact revision "
        f"{etcd_source.history.compact_rev}, {want.head['count']} keys"
    ), proc.stdout
    assert "NOSPACE" in proc.stderr
    started = time.monotonic()
    fe = _start_imported(tmp_path)
    try:
        got = observe(fe.endpoint, head, etcd_source.history.compact_rev)
        since_start = time.monotonic() - started
        assert got.head == want.head
        assert got.past == want.past
        assert got.errors == want.errors
        assert got.hashes == want.hashes
        assert got.events == want.events and len(want.events) > 100
        assert got.leases == want.leases and sorted(etcd_source.history.leases) == want.leases
        assert got.alarms == want.alarms and "NOSPACE" in got.alarms
        for lid, w in want.ttl.items():
            g = got.ttl[lid]
            assert (g["granted"], g["keys"]) == (w["granted"], w["keys"]), lid
            assert w["keys"], "every live lease has a key attached"
            # fastetcd restarts a lease at its full TTL, as etcd does after a restart
            assert g["granted"] - since_start - 1 <= g["remaining"] <= g["granted"], (lid, g)
            assert abs(g["remaining"] - w["remaining"]) <= 15, (lid, w, g)  # seconds; slack for load
        # big values came through overflow pages intact
        for key, value in etcd_source.history.big_keys.items():
            with grpc.insecure_channel(fe.endpoint) as ch:
                r = rpc_pb2_grpc.KVStub(ch).Range(rpc_pb2.RangeRequest(key=key), timeout=10)
            assert r.kvs[0].value == value
        # the alarm caps writes as it did in etcd; once disarmed, the log continues after the import
        assert ctl(fe.endpoint, "put", "after", "1", ok=False).endswith("database space exceeded")
        ctl(fe.endpoint, "alarm", "disarm")
        ctl(fe.endpoint, "put", "after", "1")
        assert _get_json(fe.endpoint)["revision"] == head + 1
    finally:
        fe.kill()
    # and the data dir holds all of it across a restart
    fe = _start_imported(tmp_path)
    try:
        assert _hashkv(fe.endpoint, head) == want.hashes[head]
        assert _get_json(fe.endpoint)["revision"] == head + 1
    finally:
        fe.kill()


def test_import_refuses_a_used_data_dir_and_damaged_snapshots(
    etcd_source: EtcdSource, tmp_path: Path
) -> None:
    used = tmp_path / "used"
    used.mkdir()
    (used / "something").write_text("x")
    proc = _import(etcd_source.snapshot, used)
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr == f"fastetcd: error: data-dir '{used}' exists\n"

    damaged = tmp_path / "damaged.snap"
    data = bytearray(etcd_source.snapshot.read_bytes())
    data[5000] ^= 0xFF
    damaged.write_bytes(data)
    proc = _import(damaged, tmp_path / "d1")
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"fastetcd: error: {damaged}: snapshot is damaged: expected sha256 ")
    assert proc.stderr.count("\n") == 1
    assert not (tmp_path / "d1").exists()

    for name, body in (("empty", b""), ("text", b"hello\n" * 1000)):
        bad = tmp_path / name
        bad.write_bytes(body)
        proc = _import(bad, tmp_path / f"d-{name}")
        assert proc.returncode == 1
        assert proc.stderr.startswith("fastetcd: error: ") and "not a bolt database" in proc.stderr
        assert proc.stderr.count("\n") == 1

    # fastetcd's own restore points at the import when handed etcd's snapshot
    proc = run_fastetcd("snapshot", "restore", str(etcd_source.snapshot), "--data-dir", str(tmp_path / "r"))
    assert (proc.returncode, proc.stderr) == (
        1,
        (
            f"fastetcd: error: {etcd_source.snapshot} is an etcd snapshot; import it with: "
            f"fastetcd import {etcd_source.snapshot} --data-dir {tmp_path / 'r'}\n"
        ),
    )

    # --data-dir is required
    proc = run_fastetcd("import", str(etcd_source.snapshot))
    assert proc.returncode == 2 and "--data-dir" in proc.stderr

    proc = _import(tmp_path / "missing.db", tmp_path / "d2")
    assert (proc.returncode, proc.stderr) == (
        1,
        f"fastetcd: error: {tmp_path / 'missing.db'} does not exist\n",
    )


def test_import_takes_an_etcd_data_dir_and_refuses_one_in_use(
    etcd_source: EtcdSource, tmp_path: Path
) -> None:
    proc = _import(etcd_source.data_dir, tmp_path / "fastetcd")
    assert proc.returncode == 0, proc.stderr
    fe = _start_imported(tmp_path)
    try:
        head = etcd_source.observed.head["revision"]
        assert _hashkv(fe.endpoint, head) == etcd_source.observed.hashes[head]
    finally:
        fe.kill()
    # a running etcd holds bolt's exclusive lock on its db: reading it then could see torn pages
    db = etcd_source.data_dir / "member" / "snap" / "db"
    with open(db, "rb+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc = _import(db, tmp_path / "d3")
    assert proc.returncode == 1
    assert proc.stderr == (
        f"fastetcd: error: {db} is locked by a running etcd: stop it first, or import a "
        "snapshot taken with etcdctl snapshot save\n"
    )


def test_import_of_a_fresh_etcd_with_users_brings_them_along(tmp_path: Path) -> None:
    etcd = start_etcd(tmp_path / "src")
    try:
        ctl(etcd.endpoint, "user", "add", "alice:secret")
        ctl(etcd.endpoint, "role", "add", "reader")
        want_rev = _get_json(etcd.endpoint)["revision"]
        want_hash = _hashkv(etcd.endpoint, 0)
        want_users = ctl(etcd.endpoint, "user", "list")
        snap = tmp_path / "fresh.snap"
        ctl(etcd.endpoint, "snapshot", "save", str(snap))
    finally:
        etcd.kill()
    proc = _import(snap, tmp_path / "fastetcd")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("imported etcd at revision 1 (compact revision -1, 0 keys, 0 versions")
    assert proc.stdout.endswith("users: 1, roles: 1, auth disabled\n")
    assert proc.stderr == ""
    fe = _start_imported(tmp_path)
    try:
        assert want_rev == 1 and _get_json(fe.endpoint)["revision"] == 1
        assert _hashkv(fe.endpoint, 0) == want_hash
        assert ctl(fe.endpoint, "user", "list") == want_users
        assert ctl(fe.endpoint, "role", "list") == "reader\n"
    finally:
        fe.kill()


def test_import_keeps_auth_enabled_with_etcds_passwords(tmp_path: Path) -> None:
    """Users log in to the imported fastetcd with the passwords they had (etcd's bcrypt hashes come
    along), their permissions hold, and the auth revision is etcd's."""
    root = ("--user", "root:rootpw")
    etcd = start_etcd(tmp_path / "src")
    try:
        ctl(etcd.endpoint, "put", "app/x", "1")
        ctl(etcd.endpoint, "user", "add", "root:rootpw")
        ctl(etcd.endpoint, "user", "add", "alice:secret")
        ctl(etcd.endpoint, "role", "add", "app")
        ctl(etcd.endpoint, "role", "grant-permission", "app", "readwrite", "app/", "--prefix")
        ctl(etcd.endpoint, "user", "grant-role", "alice", "app")
        ctl(etcd.endpoint, "auth", "enable")
        want_status = ctl(etcd.endpoint, *root, "auth", "status")
        want_role = ctl(etcd.endpoint, *root, "role", "get", "app")
        snap = tmp_path / "auth.snap"
        ctl(etcd.endpoint, *root, "snapshot", "save", str(snap))
    finally:
        etcd.kill()
    proc = _import(snap, tmp_path / "fastetcd")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.endswith("users: 2, roles: 2, auth enabled\n")  # etcdctl added the root role
    fe = _start_imported(tmp_path)
    try:
        assert ctl(fe.endpoint, *root, "auth", "status") == want_status
        assert ctl(fe.endpoint, *root, "role", "get", "app") == want_role
        assert ctl(fe.endpoint, "--user", "alice:secret", "get", "app/x", "--print-value-only") == "1\n"
        assert ctl(fe.endpoint, "--user", "alice:secret", "put", "other", "1", ok=False) == (
            "Error: etcdserver: permission denied"
        )
        assert ctl(fe.endpoint, "--user", "alice:wrong", "get", "app/x", ok=False) == (
            "Error: etcdserver: authentication failed, invalid user ID or password"
        )
        assert ctl(fe.endpoint, "get", "app/x", ok=False) == "Error: etcdserver: user name is empty"
    finally:
        fe.kill()


def _last_line_error(err: str) -> str:
    lines = err.splitlines()
    for line in lines[:-1]:
        json.loads(line)  # the log lines before it are JSON
    assert lines[-1].startswith("fastetcd: error: "), err
    return lines[-1]


@pytest.mark.parametrize("layout", ["real etcd data dir", "member/wal only"])
def test_fastetcd_refuses_to_start_on_an_etcd_data_dir(
    etcd_source: EtcdSource, tmp_path: Path, layout: str
) -> None:
    if layout == "real etcd data dir":
        data_dir = etcd_source.data_dir
    else:
        data_dir = tmp_path / "half"
        (data_dir / "member" / "wal").mkdir(parents=True)
    before = sorted(p.relative_to(data_dir) for p in data_dir.rglob("*"))
    server = start_fastetcd(tmp_path / "run", ["--data-dir", str(data_dir)], explicit_data_dir=False,
                            wait=False)
    try:
        code = server.proc.wait(timeout=60)
    finally:
        server.kill()
    assert code == 1, server.output()
    assert _last_line_error(server.output()) == (
        f"fastetcd: error: data dir {data_dir} is an etcd data dir; import it with: "
        f"fastetcd import {data_dir}/member/snap/db --data-dir NEWDIR"
    )
    assert sorted(p.relative_to(data_dir) for p in data_dir.rglob("*")) == before  # nothing written


def test_embedded_store_refuses_an_etcd_data_dir_before_writing(tmp_path: Path) -> None:
    (tmp_path / "member" / "snap").mkdir(parents=True)
    (tmp_path / "member" / "snap" / "db").write_bytes(b"")
    store = EmbeddedStore(str(tmp_path))
    with pytest.raises(StoreError, match="is an etcd data dir; import it with: fastetcd import "):
        asyncio.run(store.open())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["member"]
    # etcd's layout elsewhere in a dir is no etcd data dir: a plain fastetcd dir with a "member" file
    other = tmp_path / "other"
    other.mkdir()
    (other / "member").write_text("x")

    async def open_close() -> None:
        s = EmbeddedStore(str(other))
        await s.open()
        await s.close()

    asyncio.run(open_close())


# ------------------------------------------------------------------------------------------ bolt reader


def _bolt_size(path: Path) -> int:
    size = path.stat().st_size
    return size - 32 if size % 512 == 32 else size


@pytest.mark.parametrize("kind", ["snapshot file", "member/snap/db"])
def test_bolt_reader_on_etcd_files(etcd_source: EtcdSource, kind: str) -> None:
    path = (
        etcd_source.snapshot if kind == "snapshot file" else etcd_source.data_dir / "member" / "snap" / "db"
    )
    with BoltDB.open(path, _bolt_size(path)) as db:
        assert db.page_size == 4096 and db.size % db.page_size == 0
        pages = db.pages()
        assert (pages[0].type, pages[1].type) == ("meta", "meta")
        assert {h.type for h in pages.values()} == {"meta", "leaf", "branch"}  # etcd stores no freelist
        assert db.meta.freelist == boltmod.PGID_NO_FREELIST
        # the pages in use, overflow included, never overlap and stay below the high-water mark
        claimed = [p for pgid, h in pages.items() for p in range(pgid, pgid + h.overflow + 1)]
        assert len(claimed) == len(set(claimed)) and max(claimed) < db.meta.pgid
        assert all(h.id == pgid for pgid, h in pages.items())
        root = db.root()
        names = root.buckets()
        assert names == sorted(names)
        assert {b"key", b"lease", b"meta", b"alarm", b"members", b"cluster", b"auth"} <= set(names)
        # small buckets live inline in the root's leaf; the key bucket has its own tree, a branch on top
        key = db.bucket(b"key")
        assert key is not None and not key.inline and db.page(key.root)[0].type == "branch"
        for small in (b"meta", b"lease", b"alarm", b"cluster"):
            b = db.bucket(small)
            assert b is not None and b.inline, small
        assert db.bucket(b"no-such") is None and db.bucket(b"key", b"nested") is None
        # every version of the key bucket in revision order; the big values sit on overflow pages
        versions = list(key.items())
        assert [k for k, _ in versions] == sorted(k for k, _ in versions)
        head = etcd_source.observed.head["revision"]
        assert parse_rev(versions[-1][0])[0] == head
        for k, v in versions:
            main, _, tombstone = parse_rev(k)
            kv = kv_pb2.KeyValue.FromString(v)
            assert tombstone or kv.mod_revision == main
        big = {
            kv_pb2.KeyValue.FromString(v).key: kv_pb2.KeyValue.FromString(v).value
            for _, v in versions
            if len(v) > db.page_size
        }
        assert big == etcd_source.history.big_keys
        overflowed = [pgid for pgid, h in pages.items() if h.overflow]
        assert overflowed and all(pages[p].type == "leaf" for p in overflowed)
        assert any(
            len(e.value) > db.page_size for p in overflowed for e in boltmod._leaf_entries(db.page(p)[1], p)
        )
        # the lease bucket (inline) holds the leases etcd lists
        lease_ids = sorted(decode_lease(v).id for _, v in db.bucket(b"lease").items())
        assert lease_ids == etcd_source.observed.leases
    with EtcdDB(str(path)) as edb:
        assert edb.has_trailer == (kind == "snapshot file")
        assert edb.finished_compact == etcd_source.history.compact_rev
        assert edb.scheduled_compact == etcd_source.history.compact_rev
        assert [ttl.ttl for ttl in edb.leases()] == [
            etcd_source.observed.ttl[i]["granted"] for i in lease_ids
        ]
        assert [a for _, a in edb.alarms()] == [rpc_pb2.NOSPACE]
        assert not edb.auth_in_use()


def test_bolt_reader_falls_back_to_the_other_meta_page(etcd_source: EtcdSource, tmp_path: Path) -> None:
    data = bytearray(etcd_source.snapshot.read_bytes()[:-32])
    with BoltDB(bytes(data)) as db:
        want = list(db.bucket(b"key").items())
        txid = db.meta.txid
    damaged = bytearray(data)
    damaged[16 + 40] ^= 1  # meta page 0's freelist field: its checksum no longer matches
    with BoltDB(bytes(damaged)) as db:
        # bbolt's WriteTo gives meta page 1 the same tree with the txid before
        assert db.meta.page_id == 1 and db.meta.txid == txid - 1
        assert list(db.bucket(b"key").items()) == want
    damaged[4096 + 16 + 40] ^= 1  # and meta page 1's
    with pytest.raises(BoltError, match="not a bolt database .*checksum mismatch"):
        BoltDB(bytes(damaged))
    with pytest.raises(BoltError, match="truncated"):
        BoltDB(bytes(data[: 4096 * 3]))


# Hand-made files: what etcd's files do not show (nested buckets, a newer meta page, damage).

PS = 4096


def _page(pgid: int, flags: int, count: int, body: bytes, overflow: int = 0) -> bytes:
    raw = struct.pack("<QHHI", pgid, flags, count, overflow) + body
    return raw + b"\0" * (-len(raw) % PS)


def _leaf_body(items: list[tuple[bytes, bytes, int]]) -> bytes:
    """Leaf elements then keys and values; each pos is relative to its element, as bbolt writes them."""
    heads, data = b"", b""
    n = len(items)
    for i, (k, v, flags) in enumerate(items):
        pos = (n - i) * 16 + len(data)
        heads += struct.pack("<IIII", flags, pos, len(k), len(v))
        data += k + v
    return heads + data


def _meta(pgid: int, root: int, hwm: int, txid: int, bad: bool = False) -> bytes:
    fields = struct.pack("<IIIIQQQQQ", boltmod.MAGIC, 2, PS, 0, root, 0, 0xFFFFFFFFFFFFFFFF, hwm, txid)
    checksum = boltmod.fnv64a(fields) ^ (1 if bad else 0)
    return _page(pgid, boltmod.META_PAGE, 0, fields + struct.pack("<Q", checksum))


def _handmade(meta1_root: int = 2, bad_meta1: bool = False, branch_to: int = 3) -> bytes:
    """Page 2: the root leaf, with bucket "outer" (root page 3) and inline bucket "small"; page 3: a
    branch over page 4 and page ``branch_to``; page 4: a leaf with the nested inline bucket "inner" and a
    value; page 5: a leaf whose value runs into its overflow page 6."""
    inline_page = struct.pack("<QHHI", 0, boltmod.LEAF_PAGE, 2, 0) + _leaf_body(
        [(b"a", b"1", 0), (b"b", b"2", 0)]
    )
    inner = struct.pack("<QQ", 0, 0) + inline_page
    big = bytes(range(256)) * 20  # 5120 bytes: page 5 needs an overflow page
    root_leaf = _page(
        2,
        boltmod.LEAF_PAGE,
        2,
        _leaf_body(
            [
                (b"outer", struct.pack("<QQ", 3, 7), boltmod.BUCKET_LEAF_FLAG),
                (b"small", struct.pack("<QQ", 0, 0) + inline_page, boltmod.BUCKET_LEAF_FLAG),
            ]
        ),
    )
    branch = _page(3, boltmod.BRANCH_PAGE, 2, struct.pack("<IIQIIQ", 32, 1, 4, 17, 1, branch_to) + b"kz")
    leaf4 = _page(
        4, boltmod.LEAF_PAGE, 2, _leaf_body([(b"inner", inner, boltmod.BUCKET_LEAF_FLAG), (b"k", b"v", 0)])
    )
    leaf5 = _page(5, boltmod.LEAF_PAGE, 1, _leaf_body([(b"z", big, 0)]), overflow=1)
    assert len(leaf5) == 2 * PS
    return _meta(0, 2, 7, 4) + _meta(1, meta1_root, 7, 5, bad_meta1) + root_leaf + branch + leaf4 + leaf5


def test_bolt_reader_nested_and_inline_buckets_overflow_and_meta_choice() -> None:
    data = _handmade(branch_to=5)
    with BoltDB(data) as db:
        assert db.meta.page_id == 1 and db.meta.txid == 5  # the valid meta with the higher txid
        assert [(pgid, h.type, h.overflow) for pgid, h in db.pages().items()] == [
            (0, "meta", 0),
            (1, "meta", 0),
            (2, "leaf", 0),
            (3, "branch", 0),
            (4, "leaf", 0),
            (5, "leaf", 1),
        ]
        assert db.root().buckets() == [b"outer", b"small"]
        outer = db.bucket(b"outer")
        assert outer is not None and outer.root == 3 and not outer.inline
        assert [(e.key, e.is_bucket) for e in outer] == [(b"inner", True), (b"k", False), (b"z", False)]
        assert dict(outer.items()) == {b"k": b"v", b"z": bytes(range(256)) * 20}
        inner = db.bucket(b"outer", b"inner")
        assert inner is not None and inner.inline and dict(inner.items()) == {b"a": b"1", b"b": b"2"}
        small = db.bucket(b"small")
        assert small is not None and small.inline and dict(small.items()) == {b"a": b"1", b"b": b"2"}
        assert db.bucket(b"outer", b"k") is None  # a value, not a bucket
    # meta page 1 is damaged: meta page 0 (older, valid) is used
    with BoltDB(_handmade(meta1_root=3, bad_meta1=True, branch_to=5)) as db:
        assert db.meta.page_id == 0 and db.meta.txid == 4
    # a branch pointing back at itself is a cycle, not an endless walk
    with BoltDB(_handmade(branch_to=3)) as db:
        with pytest.raises(BoltError, match="cycle"):
            list(db.bucket(b"outer"))
    # a child beyond the high-water mark, a page claiming another id, an element past its page
    with BoltDB(_handmade(branch_to=9)) as db, pytest.raises(BoltError, match="outside the tree"):
        list(db.bucket(b"outer"))
    bad = bytearray(_handmade(branch_to=5))
    bad[4 * PS] = 6
    with BoltDB(bytes(bad)) as db, pytest.raises(BoltError, match="identifies itself as page 6"):
        list(db.bucket(b"outer"))
    bad = bytearray(_handmade(branch_to=5))
    struct.pack_into("<I", bad, 5 * PS + 16 + 12, 3 * PS)  # vsize past the page and its overflow
    with BoltDB(bytes(bad)) as db, pytest.raises(BoltError, match="runs past the page"):
        list(db.bucket(b"outer"))


# ------------------------------------------------------------------------------------------ state


class _FakeEtcdDB:
    """build_state's view of an etcd backend, made from a core that lived through the history."""

    def __init__(
        self,
        versions: list[Version],
        finished: int | None,
        scheduled: int | None,
        leases: list[LeaseRecord] = (),
        alarms: list[tuple[int, int]] = (),
    ) -> None:
        self._versions = versions
        self.finished_compact = finished
        self.scheduled_compact = scheduled
        self._leases = list(leases)
        self._alarms = list(alarms)

    def versions(self) -> Iterator[Version]:
        return iter(self._versions)

    def leases(self) -> list[LeaseRecord]:
        return self._leases

    def alarms(self) -> list[tuple[int, int]]:
        return self._alarms

    def auth(self) -> tuple[bool, int, list, list]:
        return False, 1, [], []


def _random_ops(rnd: random.Random, n: int) -> list[list[tuple]]:
    """Revisions of (op, key[, value, lease]); the last revision is a put."""
    keys = [b"k%d" % i for i in range(8)]
    revs: list[list[tuple]] = []
    for _ in range(n):
        r = rnd.random()
        if r < 0.6:
            revs.append([("put", rnd.choice(keys), rnd.randbytes(rnd.randint(0, 5)), rnd.choice([0, 0, 7]))])
        elif r < 0.8:
            revs.append([("del", rnd.choice(keys))])
        else:
            revs.append(
                [
                    ("put", k, b"t", 0) if rnd.random() < 0.6 else ("del", k)
                    for k in rnd.sample(keys, rnd.randint(2, 4))
                ]
            )
    revs.append([("put", b"last", b"", 0)])
    return revs


def _replay(revs: list[list[tuple]]) -> MVCC:
    core = MVCC()
    for ops in revs:
        rev = core.rev + 1
        sub = 0
        for op in ops:
            if op[0] == "put":
                core.put(op[1], op[2], op[3], rev, sub)
                sub += 1
            elif core.delete(op[1], rev, sub):
                sub += 1
        if sub == 0:  # a revision that changed nothing is no revision
            core.put(b"filler", b"", 0, rev, 0)
    return core


def _bucket_of(core: MVCC) -> list[Version]:
    """The key bucket etcd would hold for this core: every retained version, tombstones as KeyValue{key}."""
    out = []
    for main, sub, key, kv in core.versions_upto(core.rev):
        tomb = kv is None
        out.append(Version(main, sub, tomb, kv_pb2.KeyValue(key=key).SerializeToString() if tomb else kv))
    return out


def _core_part(state: bytes) -> bytes:
    assert state.startswith(SNAPSHOT_MAGIC)
    n_core, _, _ = struct.unpack_from("<QQQ", state, len(SNAPSHOT_MAGIC))
    start = len(SNAPSHOT_MAGIC) + 24
    return state[start : start + n_core]


@pytest.mark.parametrize("seed", range(12))
def test_state_from_a_compacted_history_equals_the_core_that_lived_it(seed: int) -> None:
    rnd = random.Random(seed)
    revs = _random_ops(rnd, 120)
    lived = _replay(revs)
    head = lived.rev
    compact = rnd.randint(2, head - 1)
    lived.compact(compact)
    built = build_state(_FakeEtcdDB(_bucket_of(lived), compact, compact))
    assert (built.revision, built.compact_rev) == (head, compact)
    assert _core_part(built.state) == lived.dump(head)
    # no compaction at all
    fresh = _replay(revs)
    built = build_state(_FakeEtcdDB(_bucket_of(fresh), None, None))
    assert (built.revision, built.compact_rev) == (head, -1)
    assert _core_part(built.state) == fresh.dump(head)


@pytest.mark.parametrize("seed", range(8))
def test_a_compaction_etcd_had_not_finished_is_finished(seed: int) -> None:
    # etcd deletes a compaction's versions in revision order, in batches, and records finishedCompactRev
    # last; a backend saved between two batches holds a prefix of the deletions. Its restore finishes
    # the compaction; so must the import.
    rnd = random.Random(1000 + seed)
    revs = _random_ops(rnd, 120)
    finished = rnd.randint(2, 50)
    scheduled = rnd.randint(finished + 1, 118)
    before = _replay(revs)
    before.compact(finished)
    after = _replay(revs)
    after.compact(scheduled)
    kept = {(v.main, v.sub) for v in _bucket_of(after)}
    bucket = _bucket_of(before)
    doomed = [(v.main, v.sub) for v in bucket if (v.main, v.sub) not in kept]
    gone = set(doomed[: rnd.randint(0, len(doomed))])
    partial = [v for v in bucket if (v.main, v.sub) not in gone]
    built = build_state(_FakeEtcdDB(partial, finished, scheduled))
    assert (built.revision, built.compact_rev) == (after.rev, scheduled)
    assert _core_part(built.state) == after.dump(after.rev)


def test_leases_and_alarms_go_into_the_state() -> None:
    from fastetcd.engine.alarms import Alarms
    from fastetcd.engine.lessor import Lessor

    leases = [LeaseRecord(7, 600, 0), LeaseRecord(8, 1, 0), LeaseRecord(9, 900, 300)]
    built = build_state(_FakeEtcdDB([], None, None, leases, [(42, rpc_pb2.NOSPACE)]))
    assert built.revision == 1 and built.keys == 0
    n_core, n_leases, n_alarms = struct.unpack_from("<QQQ", built.state, len(SNAPSHOT_MAGIC))
    start = len(SNAPSHOT_MAGIC) + 24 + n_core
    lessor = Lessor()
    lessor.load(built.state[start : start + n_leases])
    # a TTL below the minimum is raised to it, as etcd's restore does; a checkpointed remainder is kept
    assert {i: (le.ttl, le.checkpoint) for i, le in lessor.leases.items()} == {
        7: (600, 0),
        8: (MIN_TTL, 0),
        9: (900, 300),
    }
    alarms = Alarms()
    alarms.load(built.state[start + n_leases : start + n_leases + n_alarms])
    assert alarms.get() == [(42, rpc_pb2.NOSPACE)]


def test_inconsistent_histories_are_refused() -> None:
    def put(main: int, key: bytes, create: int, version: int) -> Version:
        kv = kv_pb2.KeyValue(key=key, create_revision=create, mod_revision=main, version=version, value=b"v")
        return Version(main, 0, False, kv.SerializeToString())

    # earlier versions missing above the compaction revision
    with pytest.raises(EtcdImportError, match="earlier versions are missing above the compaction"):
        build_state(_FakeEtcdDB([put(5, b"a", 3, 2)], 4, 4))
    # a version that does not follow the one before it
    with pytest.raises(EtcdImportError, match="do not follow"):
        build_state(_FakeEtcdDB([put(2, b"a", 2, 1), put(3, b"a", 2, 5)], None, None))
    # a tombstone of a key that is not live
    tomb = Version(6, 0, True, kv_pb2.KeyValue(key=b"a").SerializeToString())
    with pytest.raises(EtcdImportError, match="not live"):
        build_state(_FakeEtcdDB([tomb], None, None))
    # versions out of revision order
    with pytest.raises(EtcdImportError, match="revision 2.0 comes after 3.0"):
        build_state(_FakeEtcdDB([put(3, b"a", 3, 1), put(2, b"b", 2, 1)], None, None))
    # a KeyValue whose mod revision is not its place in the bucket
    with pytest.raises(EtcdImportError, match="says it was modified at 3"):
        build_state(_FakeEtcdDB([Version(4, 0, False, put(3, b"a", 3, 1).kv)], None, None))


def test_lease_records_and_revision_keys_decode() -> None:
    assert decode_lease(bytes.fromhex("08881010d80418 2c".replace(" ", ""))) == LeaseRecord(0x808, 600, 44)
    # negative int64 and an unknown length-delimited field are fine
    raw = b"\x08" + b"\xff" * 9 + b"\x01" + b"\x22\x02ab" + b"\x10\x05"
    assert decode_lease(raw) == LeaseRecord(-1, 5, 0)
    with pytest.raises(EtcdDBError):
        decode_lease(b"\x08\xff")
    assert parse_rev(struct.pack(">QcQ", 7, b"_", 2)) == (7, 2, False)
    assert parse_rev(struct.pack(">QcQ", 7, b"_", 0) + b"t") == (7, 0, True)
    for bad in (b"short", struct.pack(">QcQ", 7, b"-", 0), struct.pack(">QcQ", 7, b"_", 0) + b"x"):
        with pytest.raises(EtcdDBError):
            parse_rev(bad)
