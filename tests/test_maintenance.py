"""The Maintenance service under etcdctl 3.5.1, with real etcd 3.5.1 as the oracle: health, status, alarms
and the quota's NOSPACE story, defragment, HashKV (equal to etcd's for the same history), Hash, snapshot save
and ``fastetcd snapshot restore``, move-leader."""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import pytest
from servers import ServerFactory

from fastetcd.proto import rpc_pb2, rpc_pb2_grpc
from fastetcd.testing import ServerProcess, run_etcdctl, run_fastetcd, start_fastetcd


def ctl(server: ServerProcess, *args: str, ok: bool = True) -> str:
    code, out, err = run_etcdctl(server.endpoint, args)
    if ok:
        assert code == 0, f"etcdctl {' '.join(args)} on {server.kind}: {err}"
        return out
    assert code != 0, f"etcdctl {' '.join(args)} on {server.kind} succeeded: {out}"
    return err.strip().splitlines()[-1]


def status(server: ServerProcess) -> dict:
    return json.loads(ctl(server, "endpoint", "status", "-w", "json"))[0]["Status"]


def hashkv(server: ServerProcess, rev: int = 0) -> tuple[int, int]:
    got = json.loads(ctl(server, "endpoint", "hashkv", "--rev", str(rev), "-w", "json"))[0]["HashKV"]
    return got["hash"], got.get("compact_revision", 0)


def feed_history(server: ServerProcess) -> None:
    """Puts, overwrites, deletes, a txn and a compaction: every kind of version HashKV must walk."""
    for args in (
        ("put", "a", "1"), ("put", "b", "1"), ("put", "a", "2"), ("del", "b"), ("put", "c", "3"),
        ("put", "d/1", "x"), ("put", "d/2", "y"), ("del", "d/", "--prefix"), ("put", "b", "again"),
    ):
        ctl(server, *args)
    code, _, err = run_etcdctl(server.endpoint, ["txn"], stdin='value("a") = "2"\n\nput a 3\nput e 5\n\n\n')
    assert code == 0, err


def test_health_alarms_defrag_move_leader_and_hashkv_match_etcd(server_factory: ServerFactory) -> None:
    fe = server_factory("fastetcd", "fe")
    etcd = server_factory("etcd", "etcd")
    for s in (fe, etcd):
        feed_history(s)
    for s in (fe, etcd):
        assert "is healthy" in ctl(s, "endpoint", "health")
        assert "is healthy" in ctl(s, "endpoint", "health", "--cluster")
        assert ctl(s, "alarm", "list") == ""
    head = status(etcd)["header"]["revision"]
    assert status(fe)["header"]["revision"] == head
    # Before and after a compaction, at every revision: the same CRC-32C as etcd's backend walk.
    assert [hashkv(fe, r) for r in range(0, head + 1)] == [hashkv(etcd, r) for r in range(0, head + 1)]
    for s in (fe, etcd):
        ctl(s, "compact", "6")
    assert [hashkv(fe, r) for r in (0, 7, head)] == [hashkv(etcd, r) for r in (0, 7, head)]
    assert ctl(fe, "endpoint", "hashkv", "--rev", "6", ok=False) == ctl(
        etcd, "endpoint", "hashkv", "--rev", "6", ok=False
    ) == "Error: etcdserver: mvcc: required revision has been compacted"
    assert ctl(fe, "endpoint", "hashkv", "--rev", str(head + 5), ok=False) == ctl(
        etcd, "endpoint", "hashkv", "--rev", str(head + 5), ok=False
    )
    for s in (fe, etcd):
        assert ctl(s, "defrag").startswith("Finished defragmenting etcd member")
        assert ctl(s, "move-leader", "1234", ok=False) == "Error: etcdserver: bad leader transferee"
    # Defragmenting dropped nothing that is still readable.
    assert [hashkv(fe, r) for r in (0, 7)] == [hashkv(etcd, r) for r in (0, 7)]


def test_hash_and_hashkv_equal_for_two_servers_and_stable_across_restart(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    one = server_factory("fastetcd", "one")
    two = server_factory("fastetcd", "two")
    for s in (one, two):
        feed_history(s)
        ctl(s, "lease", "grant", "600")
    # Lease ids are random per server: compare the key space, and each server's Hash with itself.
    assert hashkv(one) == hashkv(two)

    def whole_hash(s: ServerProcess) -> int:
        with grpc.insecure_channel(s.endpoint) as ch:
            return rpc_pb2_grpc.MaintenanceStub(ch).Hash(rpc_pb2.HashRequest(), timeout=10).hash

    before = (hashkv(one), hashkv(one, 5), whole_hash(one))
    one.kill()
    again = start_fastetcd(tmp_path / "one")
    try:
        assert (hashkv(again), hashkv(again, 5), whole_hash(again)) == before
    finally:
        again.kill()


def test_nospace_alarm_story_matches_etcd(server_factory: ServerFactory) -> None:
    """Fill the quota until NOSPACE; delete, compact, defrag, disarm: writes work again, as with etcd."""
    quota = ["--quota-backend-bytes", "2000000"]
    servers = [server_factory("fastetcd", "fe", quota), server_factory("etcd", "etcd", quota)]
    value = "x" * 100_000
    outcomes = []
    for s in servers:
        acked = []
        for i in range(60):
            code, _, err = run_etcdctl(s.endpoint, ["put", f"k{i:02d}", value])
            if code != 0:
                break
            acked.append(f"k{i:02d}")
        assert acked and len(acked) < 60, f"{s.kind} never reached its quota"
        steps = [err.strip().splitlines()[-1]]
        member = status(s)["header"]["member_id"]
        alarms = ctl(s, "alarm", "list")
        assert alarms == f"memberID:{member} alarm:NOSPACE \n"
        steps.append(status(s)["errors"] == [alarms.rstrip("\n")])
        code, out, err = run_etcdctl(s.endpoint, ["endpoint", "health"])
        steps.append((code, "NOSPACE" in err))
        # Nothing acknowledged is lost; reads and deletes still work under the alarm.
        keys = ctl(s, "get", "k", "--prefix", "--keys-only").split()
        assert keys == acked
        steps.append(ctl(s, "del", "k", "--prefix").strip() == str(len(acked)))
        steps.append(ctl(s, "put", "after", "v", ok=False))
        ctl(s, "compact", str(status(s)["header"]["revision"]), "--physical")
        steps.append(ctl(s, "put", "after", "v", ok=False))
        ctl(s, "defrag")
        steps.append(status(s)["dbSize"] < 1_000_000)
        steps.append(ctl(s, "put", "after", "v", ok=False))
        steps.append(ctl(s, "alarm", "disarm").strip() == alarms.strip())
        steps.append(ctl(s, "put", "after", "v").strip())
        steps.append(ctl(s, "alarm", "list"))
        steps.append(status(s).get("errors"))
        steps.append(ctl(s, "get", "after", "--print-value-only").strip())
        outcomes.append(steps)
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][0] == "Error: etcdserver: mvcc: database space exceeded"


def test_nospace_alarm_survives_restart(tmp_path: Path) -> None:
    fe = start_fastetcd(tmp_path / "fe", ["--quota-backend-bytes", "1000000"])
    try:
        for i in range(30):
            if run_etcdctl(fe.endpoint, ["put", f"k{i}", "x" * 100_000])[0] != 0:
                break
        assert "NOSPACE" in ctl(fe, "alarm", "list")
    finally:
        fe.kill()
    # A raised alarm is state: it comes back after a restart (here with the quota lifted), until disarmed.
    fe = start_fastetcd(tmp_path / "fe")
    try:
        assert "NOSPACE" in ctl(fe, "alarm", "list")
        assert ctl(fe, "put", "k", "v", ok=False) == "Error: etcdserver: mvcc: database space exceeded"
        ctl(fe, "alarm", "disarm")
        ctl(fe, "put", "k", "v")
    finally:
        fe.kill()


def test_snapshot_save_then_restore_keeps_keys_revisions_leases_and_compaction(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    fe = server_factory("fastetcd", "fe")
    feed_history(fe)
    lease = ctl(fe, "lease", "grant", "900").split()[1]
    ctl(fe, "put", "leased/1", "v", "--lease", lease)
    ctl(fe, "put", "leased/2", "v", "--lease", lease)
    ctl(fe, "compact", "5")
    before = {
        "kvs": json.loads(ctl(fe, "get", "", "--prefix", "-w", "json")),
        "hashkv": hashkv(fe),
        "lease": ctl(fe, "lease", "timetolive", lease, "--keys").split("attached keys")[1],
        "leases": ctl(fe, "lease", "list"),
    }
    snap = tmp_path / "fe.snap"
    assert "Snapshot saved at" in ctl(fe, "snapshot", "save", str(snap))
    assert snap.stat().st_size % 512 == 32  # etcdctl's own check that a sha256 trailer is there

    restored_dir = tmp_path / "restored" / "fastetcd"
    proc = run_fastetcd("snapshot", "restore", str(snap), "--data-dir", str(restored_dir))
    assert proc.returncode == 0, proc.stderr
    again = start_fastetcd(tmp_path / "restored")
    try:
        after = {
            "kvs": json.loads(ctl(again, "get", "", "--prefix", "-w", "json")),
            "hashkv": hashkv(again),
            "lease": ctl(again, "lease", "timetolive", lease, "--keys").split("attached keys")[1],
            "leases": ctl(again, "lease", "list"),
        }
        for d in (before, after):
            for h in ("cluster_id", "member_id", "raft_term"):
                d["kvs"]["header"].pop(h)
        assert after == before
        assert ctl(again, "get", "a", "--rev", "4", ok=False).endswith("required revision has been compacted")
        ctl(again, "put", "new", "1")  # the log continues after the snapshot
        assert status(again)["header"]["revision"] == before["kvs"]["header"]["revision"] + 1
    finally:
        again.kill()

    # A second restore into the same dir is refused, as etcd refuses; so is a damaged file.
    proc = run_fastetcd("snapshot", "restore", str(snap), "--data-dir", str(restored_dir))
    assert proc.returncode == 1 and "exists" in proc.stderr
    damaged = tmp_path / "damaged.snap"
    data = bytearray(snap.read_bytes())
    data[100] ^= 0xFF
    damaged.write_bytes(bytes(data))
    proc = run_fastetcd("snapshot", "restore", str(damaged), "--data-dir", str(tmp_path / "other"))
    assert proc.returncode == 1 and "sha256 checksum mismatch" in proc.stderr


@pytest.mark.parametrize("action", ["ACTIVATE", "DEACTIVATE", "GET"])
def test_alarm_rpc_answers_match_etcd(server_factory: ServerFactory, action: str) -> None:
    """The raw Alarm RPC, as clientv3 and operators' scripts drive it, against both servers."""
    answers = []
    for kind in ("fastetcd", "etcd"):
        s = server_factory(kind, kind)
        with grpc.insecure_channel(s.endpoint) as ch:
            m = rpc_pb2_grpc.MaintenanceStub(ch)
            member = m.Status(rpc_pb2.StatusRequest(), timeout=10).header.member_id
            act = getattr(rpc_pb2.AlarmRequest, action)
            got = []
            for alarm in (rpc_pb2.NONE, rpc_pb2.NOSPACE, rpc_pb2.CORRUPT):
                for who in (member, 42):
                    resp = m.Alarm(rpc_pb2.AlarmRequest(action=act, memberID=who, alarm=alarm), timeout=10)
                    got.append([(a.memberID == member, a.alarm) for a in resp.alarms])
            listing = m.Alarm(rpc_pb2.AlarmRequest(action=rpc_pb2.AlarmRequest.GET), timeout=10)
            got.append(sorted((a.memberID == member, a.alarm) for a in listing.alarms))
        answers.append(got)
    assert answers[0] == answers[1]


def compacted_at(server: ServerProcess, key: str, rev: int) -> bool:
    code, _, err = run_etcdctl(server.endpoint, ["get", key, "--rev", str(rev)])
    assert code == 0 or "required revision has been compacted" in err, err
    return code != 0


def test_periodic_auto_compaction_matches_etcd(server_factory: ServerFactory) -> None:
    """Retention 2s: the first compaction 2s after start, then one every 2s at the revision of 2s ago."""
    args = ["--auto-compaction-mode", "periodic", "--auto-compaction-retention", "2s"]
    servers = [server_factory("fastetcd", "fe", args), server_factory("etcd", "etcd", args)]
    for s in servers:
        for i in range(10):
            ctl(s, "put", "k", str(i))  # revisions 2..11
    time.sleep(7)  # long enough for a compaction at 11, the revision noted at least 2s after the last put
    assert [(compacted_at(s, "k", 10), compacted_at(s, "k", 11)) for s in servers] == [(True, False)] * 2


def test_revision_auto_compaction_keeps_the_last_retention_revisions(server_factory: ServerFactory) -> None:
    # etcd's rule (compact at current revision - retention); its 5-minute interval is shortened here.
    fe = server_factory("fastetcd", "fe", [
        "--auto-compaction-mode", "revision", "--auto-compaction-retention", "100",
        "--auto-compaction-revision-interval", "1s",
    ])
    with grpc.insecure_channel(fe.endpoint) as ch:
        kv = rpc_pb2_grpc.KVStub(ch)
        for i in range(150):
            kv.Put(rpc_pb2.PutRequest(key=b"k", value=b"%d" % i), timeout=10)  # revisions 2..151
    deadline = time.monotonic() + 10
    while not compacted_at(fe, "k", 50) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert compacted_at(fe, "k", 50) and not compacted_at(fe, "k", 51)
    assert "completed auto revision compaction" in fe.log_path.read_text()


def test_downgrade_answers_match_etcd(server_factory: ServerFactory) -> None:
    """Validate, enable, cancel and an unknown action, with good and bad targets, in one order on both."""
    d = rpc_pb2.DowngradeRequest
    script = [(d.VALIDATE, v) for v in ("", "3.4", "3.4.0", "3.4.7", "3.5", "3.3", "x", "v3.4", "3.4.0-rc.1")]
    script += [(d.CANCEL, ""), (d.ENABLE, "3.5"), (d.ENABLE, "bad"), (7, "3.4")]
    answers = []
    for kind in ("fastetcd", "etcd"):
        s = server_factory(kind, kind)
        got = []
        with grpc.insecure_channel(s.endpoint) as ch:
            m = rpc_pb2_grpc.MaintenanceStub(ch)
            for action, version in script:
                try:
                    got.append(("OK", m.Downgrade(d(action=action, version=version), timeout=10).version))
                except grpc.RpcError as e:
                    got.append((e.code().name, e.details()))
        answers.append(got)
    assert answers[0] == answers[1]


def test_downgrade_job_enable_and_cancel(server_factory: ServerFactory) -> None:
    # etcd 3.5.1 takes longer than a client deadline to enable a job (its answers were recorded by hand:
    # in-progress after enabling, "no inflight downgrade job" after cancelling); the same sequence here.
    d = rpc_pb2.DowngradeRequest
    fe = server_factory("fastetcd", "fe")
    got = []
    with grpc.insecure_channel(fe.endpoint) as ch:
        m = rpc_pb2_grpc.MaintenanceStub(ch)
        for action in (d.ENABLE, d.ENABLE, d.VALIDATE, d.CANCEL, d.CANCEL):
            try:
                got.append(("OK", m.Downgrade(d(action=action, version="3.4"), timeout=10).version))
            except grpc.RpcError as e:
                got.append((e.code().name, e.details()))
    in_progress = ("FAILED_PRECONDITION", "etcdserver: cluster has a downgrade job in progress")
    assert got == [("OK", "3.5.0"), in_progress, in_progress, ("OK", "3.5.0"),
                   ("FAILED_PRECONDITION", "etcdserver: no inflight downgrade job")]


def test_credentialed_clients_connect_while_auth_is_off(server_factory: ServerFactory) -> None:
    """etcdctl --user calls Authenticate first; etcd's 'authentication is not enabled' lets it carry on."""
    answers = []
    for kind in ("fastetcd", "etcd"):
        s = server_factory(kind, kind)
        ctl(s, "put", "k", "v")
        got = [ctl(s, "--user", "root:pw", "get", "k", "--print-value-only"), ctl(s, "auth", "status")]
        with grpc.insecure_channel(s.endpoint) as ch:
            auth = rpc_pb2_grpc.AuthStub(ch)
            try:
                auth.Authenticate(rpc_pb2.AuthenticateRequest(name="root", password="pw"), timeout=10)
            except grpc.RpcError as e:
                got.append((e.code(), e.details()))
            got.append(len(auth.UserList(rpc_pb2.AuthUserListRequest(), timeout=10).users))
        answers.append(got)
    assert answers[0] == answers[1]
    assert answers[0][0] == "v\n"


@pytest.mark.slow
def test_etcdctl_check_perf_small_load_passes(server_factory: ServerFactory) -> None:
    """etcd's own acceptance check for a member: 60 s at 150 writes/s, slowest request under 0.5 s."""
    fe = server_factory("fastetcd", "fe")
    code, out, err = run_etcdctl(fe.endpoint, ["check", "perf", "--load=s"], timeout=180)
    lines = (out + err).replace("\r", "\n").splitlines()
    verdicts = [line for line in lines if line.startswith(("PASS", "FAIL"))]
    assert code == 0 and verdicts[-1] == "PASS", verdicts


def test_etcdctl_check_datascale_passes_on_the_native_transport(server_factory: ServerFactory) -> None:
    """datascale reads /metrics from the client URL: only a transport that answers HTTP/1.1 there can pass."""
    fe = server_factory("fastetcd", "fe", ["--transport", "native"])
    code, out, err = run_etcdctl(fe.endpoint, ["check", "datascale", "--load=s"], timeout=300)
    lines = (out + err).replace("\r", "\n").splitlines()
    passed = any(line.startswith("PASS: Approximate system memory used") for line in lines)
    assert code == 0 and passed, lines[-5:]


def _under_corrupt_alarm(endpoint: str) -> list[tuple[str, object]]:
    """Raise CORRUPT, then try every kind of request and disarm: each answer, in order."""
    with grpc.insecure_channel(endpoint) as ch:
        kv, m = rpc_pb2_grpc.KVStub(ch), rpc_pb2_grpc.MaintenanceStub(ch)
        lease = rpc_pb2_grpc.LeaseStub(ch)
        kv.Put(rpc_pb2.PutRequest(key=b"a", value=b"1"), timeout=10)
        member = m.Status(rpc_pb2.StatusRequest(), timeout=10).header.member_id

        def alarm(action: int) -> int:
            req = rpc_pb2.AlarmRequest(action=action, memberID=member, alarm=rpc_pb2.CORRUPT)
            return len(m.Alarm(req, timeout=10).alarms)

        alarm(rpc_pb2.AlarmRequest.ACTIVATE)
        read = rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=b"a"))
        calls = [
            lambda: kv.Put(rpc_pb2.PutRequest(key=b"a", value=b"2"), timeout=10),
            lambda: kv.Range(rpc_pb2.RangeRequest(key=b"a"), timeout=10).kvs[0].value,
            lambda: kv.Range(rpc_pb2.RangeRequest(key=b"a", serializable=True), timeout=10).count,
            lambda: kv.DeleteRange(rpc_pb2.DeleteRangeRequest(key=b"zz"), timeout=10),
            lambda: kv.Txn(rpc_pb2.TxnRequest(success=[read]), timeout=10).succeeded,
            lambda: kv.Compact(rpc_pb2.CompactionRequest(revision=1), timeout=10),
            lambda: lease.LeaseGrant(rpc_pb2.LeaseGrantRequest(TTL=10), timeout=10),
            lambda: list(m.Status(rpc_pb2.StatusRequest(), timeout=10).errors)
            == [f"memberID:{member} alarm:CORRUPT "],
            lambda: alarm(rpc_pb2.AlarmRequest.DEACTIVATE),
            lambda: kv.Put(rpc_pb2.PutRequest(key=b"a", value=b"3"), timeout=10).header.revision,
        ]
        got: list[tuple[str, object]] = []
        for call in calls:
            try:
                out = call()
                got.append(("OK", out if isinstance(out, bool | int | bytes) else None))
            except grpc.RpcError as e:
                got.append((e.code().name, e.details()))
        return got


def test_corrupt_alarm_refuses_writes_not_reads_until_disarmed_as_etcd(server_factory: ServerFactory) -> None:
    answers = [_under_corrupt_alarm(server_factory(kind, kind).endpoint) for kind in ("fastetcd", "etcd")]
    assert answers[0] == answers[1]
    assert answers[0][0] == ("DATA_LOSS", "etcdserver: corrupt cluster")
