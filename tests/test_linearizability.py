"""Linearizability of the KV API under concurrent clients, decided by a model checker (porcupine).

Clients on one or more endpoints record a history (tests/linearizability/recorder.py): a random mix of
Put, Range (linearizable and serializable), Range of the whole key set, DeleteRange and Txn
compare-and-swap on four keys, every operation with its invocation and response time and its answer
including the header revision; an error or a timeout is an unknown outcome. The Go checker
(tests/linearizability/checker, built into bench/.bin/lincheck on first use) decides it against a model
of etcd's store as one object, header revisions included. Its main.go explains the model and its limits;
in short:

- linearizable operations must be linearizable with their exact answers (values, create/mod revisions,
  versions, header revisions; a write that changes something takes the next revision);
- serializable reads are not linearizable in general (a cluster member answers them locally), so they
  are checked against a weaker model, snapshot consistency: the read shows the state the write order
  gives at its own header revision, nothing from the future, and a client's reads never go back;
- an unknown outcome may have taken effect at any time after the call, or never.

A checker is only worth its rejections, so before any acceptance is trusted it is shown to reject a
stale read planted in a real history, and a set of hand-made histories pins each rule down (including
an unknown write that makes an otherwise impossible read legal).

Unknown outcomes are exercised for real twice: a kill -9 and restart mid-load (clients fail through the
gap; nothing acknowledged may be lost), and operations with a deadline of a few milliseconds (timeouts
whose writes the server applied anyway, which the checker must place).

The servers are real processes (fastetcd as --subject/--store/--transport choose, real etcd 3.5.1 as
the reference, and a three-member etcd cluster for clients on several endpoints). The whole module takes
about a minute: a few seconds of load per server on a shared machine.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from cosmos_fixture import CosmosServer
from linearizability.history import KV, History, Op, Output
from linearizability.lincheck import LINEARIZABLE, NOT_LINEARIZABLE, Verdict, check_history
from linearizability.recorder import Recorder

from fastetcd.testing import (
    LOOPBACK,
    CosmosTarget,
    ServerProcess,
    etcd_tool,
    free_port,
    spawn,
    start_fastetcd,
    start_server,
    wait_ready,
)

# Seconds of load per recorded history, and clients. 12 clients on 4 keys overlap on every key all the
# time; a few seconds is a few thousand operations here, which porcupine decides in well under a second.
LOAD_S = 3.0
CLIENTS = 12


def _record(endpoints: list[str], seconds: float = LOAD_S, clients: int = CLIENTS, seed: int = 0) -> History:
    with Recorder(endpoints, clients=clients, seed=seed) as rec:
        time.sleep(seconds)
    return rec.history


def _assert_linearizable(verdict: Verdict) -> None:
    assert verdict.returncode == LINEARIZABLE, verdict.describe()


def _assert_rich(history: History, min_ops: int) -> None:
    """The history exercised what the checker is meant to judge, or an acceptance means little."""
    stats = history.stats()
    ok = sum(n for k, n in stats.items() if k.endswith(":ok"))
    assert ok >= min_ops, f"only {ok} operations answered: {dict(stats)}"
    for need in ("put:ok", "range:ok", "range:serializable", "range_all:ok", "delete:deleted",
                 "cas_mod:succeeded", "cas_mod:failed", "cas_value:succeeded", "cas_value:failed"):
        assert stats[need] > 0, f"no {need} in the history: {dict(stats)}"


# ----------------------------------------------------------------------------------------------------
# real histories


@pytest.fixture(scope="module")
def trusted_checker(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A checker is trusted only after it rejected a stale read: every test that accepts a history asks
    for this first (the minimal stale reads of HAND_MADE; the real-history plants are tests of their own)."""
    workdir = tmp_path_factory.mktemp("lin-trust")
    for name, history, code, porcupine in HAND_MADE:
        if name.startswith("stale read"):
            verdict = check_history(history, workdir, name.replace(" ", "-"), html_on_failure=False)
            got = (verdict.returncode, verdict.report.get("porcupine"))
            assert got == (code, porcupine) == (NOT_LINEARIZABLE, "Illegal"), verdict.describe()


@pytest.fixture(scope="module")
def subject_history(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                    fastetcd_store: str) -> History:
    """One history recorded against the server under test (fastetcd on the chosen store and transport,
    or etcd with --subject=etcd); the stale-read tests plant their reads into a copy of it."""
    kind = request.config.getoption("--subject")
    with start_server(kind, tmp_path_factory.mktemp("lin-subject")) as server:
        history = _record([server.endpoint], seconds=LOAD_S + 1)
    return history


@pytest.mark.usefixtures("trusted_checker")
def test_subject_is_linearizable(subject_history: History, tmp_path: Path) -> None:
    _assert_linearizable(check_history(subject_history, tmp_path))
    _assert_rich(subject_history, 300)


@pytest.mark.usefixtures("trusted_checker")
def test_etcd_is_linearizable(tmp_path: Path) -> None:
    """The reference: real etcd 3.5.1 must pass, or the recorder or the model is wrong."""
    with start_server("etcd", tmp_path / "etcd") as server:
        history = _record([server.endpoint], seed=1)
    _assert_linearizable(check_history(history, tmp_path))
    _assert_rich(history, 300)


def _start_etcd_cluster(workdir: Path, members: int = 3) -> list[ServerProcess]:
    """A real etcd cluster on loopback ports (the harness starts single members only)."""
    names = [f"m{i}" for i in range(members)]
    peers = {n: f"http://{LOOPBACK}:{free_port()}" for n in names}
    cluster = ",".join(f"{n}={url}" for n, url in peers.items())
    servers = []
    for n in names:
        endpoint = f"{LOOPBACK}:{free_port()}"
        member_dir = workdir / n
        member_dir.mkdir(parents=True)
        argv = [etcd_tool("etcd"), "--name", n, "--data-dir", str(member_dir / "data"),
                "--listen-client-urls", f"http://{endpoint}", "--advertise-client-urls", f"http://{endpoint}",
                "--listen-peer-urls", peers[n], "--initial-advertise-peer-urls", peers[n],
                "--initial-cluster", cluster, "--initial-cluster-state", "new",
                "--initial-cluster-token", workdir.name, "--log-level", "error", "--unsafe-no-fsync"]
        servers.append(spawn("etcd", argv, endpoint, member_dir, member_dir / "etcd.log", cwd=member_dir))
    try:
        for s in servers:
            wait_ready(s)
    except BaseException:
        for s in servers:
            s.kill()
        raise
    return servers


@pytest.mark.usefixtures("trusted_checker")
def test_etcd_cluster_on_three_endpoints_is_linearizable(tmp_path: Path) -> None:
    """Clients spread over the three members of a real etcd cluster: linearizable reads on followers
    are linearizable (ReadIndex); serializable ones may be stale, which the weaker model allows."""
    servers = _start_etcd_cluster(tmp_path)
    try:
        history = _record([s.endpoint for s in servers], seed=2)
    finally:
        for s in servers:
            s.kill()
    assert len({op.endpoint for op in history.ops}) == 3
    _assert_linearizable(check_history(history, tmp_path))
    _assert_rich(history, 300)


@pytest.mark.usefixtures("trusted_checker")
def test_fastetcd_on_cosmos_is_linearizable(cosmos_session_server: CosmosServer, tmp_path: Path) -> None:
    """The Cosmos store explicitly, whatever --store says (its writes are Cosmos batches)."""
    cosmos_session_server.clear_faults()
    target = CosmosTarget(cosmos_session_server.endpoint, cosmos_session_server.key)
    with start_fastetcd(tmp_path / "fe", cosmos=target) as server:
        history = _record([server.endpoint], seed=3)
    _assert_linearizable(check_history(history, tmp_path))
    _assert_rich(history, 200)


@pytest.mark.usefixtures("trusted_checker")
def test_kill_9_and_restart_mid_load_is_linearizable(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """kill -9 under load, then a restart on the same data dir and port: the clients see errors
    (unknown outcomes) through the gap, and the whole history must still be linearizable, so no
    acknowledged write was lost and nothing unacknowledged appeared out of order."""
    kind = request.config.getoption("--subject")
    workdir = tmp_path / "server"
    server = start_server(kind, workdir)
    port = server.port
    try:
        with Recorder([server.endpoint], clients=8, seed=4) as rec:
            time.sleep(1.5)
            server.kill()
            killed = time.monotonic_ns()
            time.sleep(0.3)  # every client meets the outage
            server = start_server(kind, workdir, port=port)
            back = time.monotonic_ns()
            time.sleep(1.5)
    finally:
        server.kill()
    history = rec.history
    # The verdict first: a violation must never hide behind a failed sanity check of the load.
    _assert_linearizable(check_history(history, tmp_path))
    before = sum(1 for op in history.ops if op.ret is not None and op.ret < killed)
    after = sum(1 for op in history.ops if op.ret is not None and op.call > back)
    failed_writes = sum(1 for op in history.ops if op.out is None and op.is_write)
    summary = f"{before} answered before the kill, {after} after the restart, {failed_writes} writes failed"
    assert before >= 50 and after >= 50 and failed_writes > 0, f"the kill did not hit the load: {summary}"


@pytest.mark.usefixtures("trusted_checker")
def test_timeouts_are_unknown_outcomes(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """A fifth of the operations get a deadline of at most a few milliseconds, so many time out while the
    server applies them anyway: unknown outcomes that did take effect, which the checker must place
    (from the reads that saw them, or as the only writes that can fill a revision) and accept."""
    kind = request.config.getoption("--subject")
    with start_server(kind, tmp_path / "server") as server, \
            Recorder([server.endpoint], clients=8, seed=5, short_deadline=0.006,
                     short_deadline_share=0.2) as rec:
        time.sleep(LOAD_S)
    history = rec.history
    verdict = check_history(history, tmp_path)
    _assert_linearizable(verdict)
    assert sum(1 for op in history.ops if op.is_write and op.out is None) >= 5, history.stats()
    assert verdict.report["patched_unknown_writes"] > 0, verdict.describe()


# ----------------------------------------------------------------------------------------------------
# planted violations in a real history: the checker must catch them


def _stale_read_plant(history: History) -> tuple[Op, Op]:
    """A real linearizable read of a key, and a write of that key acknowledged after it with a newer
    revision: replaying the read after that write is a stale read."""
    writes = [op for op in history.ops
              if op.out is not None and op.ret is not None and op.kind in ("put", "cas_mod", "cas_value")
              and (op.kind == "put" or op.out.succeeded)]
    for r in history.ops:
        if r.kind != "range" or r.serializable or r.out is None or r.ret is None or not r.out.kvs:
            continue
        later = [w for w in writes if w.key == r.key and w.out.revision > r.out.revision and w.ret > r.ret]
        if later:
            return r, min(later, key=lambda w: w.ret)
    raise AssertionError("no read with a later write of its key in the history")


def _replay_after(history: History, read: Op, write: Op, revision: int) -> Op:
    assert write.ret is not None and read.out is not None and read.ret is not None
    stale = Op(history.next_id(), max(op.client for op in history.ops) + 1, read.endpoint, "range", read.key,
               call=write.ret + 1_000, ret=write.ret + 1_000 + (read.ret - read.call),
               out=Output(revision, kvs=list(read.out.kvs)))
    history.ops.append(stale)
    return stale


def test_planted_stale_read_is_rejected(subject_history: History, tmp_path: Path) -> None:
    """A copy of a real read, replayed after a newer write of its key was acknowledged, answering what
    it answered then (old value, old header revision)."""
    history = subject_history.copy()
    read, write = _stale_read_plant(history)
    assert read.out is not None
    stale = _replay_after(history, read, write, read.out.revision)
    verdict = check_history(history, tmp_path, "planted")
    assert verdict.returncode == NOT_LINEARIZABLE, verdict.describe()
    assert verdict.report["porcupine"] == "Illegal", verdict.describe()
    assert f"#{stale.id} " in verdict.output, verdict.describe()  # the explanation names it


def test_planted_stale_read_with_fresh_header_is_rejected(subject_history: History, tmp_path: Path) -> None:
    """The same stale data under a current header revision (a server stamping fresh headers on stale
    reads): no direct check sees it, only the model, which knows the key's value at that revision."""
    history = subject_history.copy()
    read, write = _stale_read_plant(history)
    assert write.ret is not None
    current = max(op.out.revision for op in history.ops
                  if op.out is not None and op.ret is not None and op.ret < write.ret + 1_000)
    _replay_after(history, read, write, current)
    verdict = check_history(history, tmp_path, "planted-fresh-header")
    assert verdict.returncode == NOT_LINEARIZABLE, verdict.describe()
    assert verdict.report["porcupine"] == "Illegal", verdict.describe()
    assert verdict.report["violations"] == [], verdict.describe()


def test_dropped_acknowledged_write_is_rejected(subject_history: History, tmp_path: Path) -> None:
    """A real acknowledged Put removed from the history, as if the server had lost it: its revision
    is then a gap no write can fill, and reads that saw its value name a write nobody made."""
    history = subject_history.copy()
    victim = next(op for op in history.ops if op.kind == "put" and op.out is not None
                  and any(kv.value == op.value for r in history.ops if r.out for kv in r.out.kvs))
    history.ops.remove(victim)
    verdict = check_history(history, tmp_path, "lost-write")
    assert verdict.returncode == NOT_LINEARIZABLE, verdict.describe()
    assert verdict.report["porcupine"] == "Illegal", verdict.describe()


# ----------------------------------------------------------------------------------------------------
# hand-made histories: each rule of the model on its own

INF = None  # no return: an unknown outcome


def _kv(value: str, mod: int, create: int, version: int, key: str = "/lin/a") -> KV:
    return KV(key, value, create, mod, version)


def _put(value: str, call: int, ret: int | None, rev: int = 0, key: str = "/lin/a") -> Op:
    return Op(0, 0, "", "put", key, value, call=call, ret=ret, out=None if ret is None else Output(rev),
              error="" if ret is not None else "UNAVAILABLE: planted")


def _get(call: int, ret: int, rev: int, kv: KV | None, key: str = "/lin/a", serializable: bool = False) -> Op:
    return Op(0, 0, "", "range", key, serializable=serializable, call=call, ret=ret,
              out=Output(rev, kvs=[kv] if kv else []))


def _cas_mod(expect: int, value: str, call: int, ret: int, rev: int, succeeded: bool,
             kv: KV | None = None, key: str = "/lin/a") -> Op:
    return Op(0, 0, "", "cas_mod", key, value, expect_mod=expect, call=call, ret=ret,
              out=Output(rev, succeeded=succeeded, kvs=[kv] if kv else []))


def _cas_value(expect: str, value: str, call: int, ret: int, rev: int, succeeded: bool,
               kv: KV | None = None, key: str = "/lin/a") -> Op:
    return Op(0, 0, "", "cas_value", key, value, expect_value=expect, call=call, ret=ret,
              out=Output(rev, succeeded=succeeded, kvs=[kv] if kv else []))


def _history(*ops: Op) -> History:
    for i, op in enumerate(ops):
        op.id, op.client = i, i  # one client per operation: porcupine only orders by time
    return History(["/lin/a", "/lin/b"], 1, [], list(ops))


A1, A2 = _kv("1", 2, 2, 1), _kv("2", 3, 2, 2)  # a=1 put at revision 2, then a=2 at revision 3

# (name, history, expected exit code, expected porcupine verdict)
HAND_MADE = [
    ("stale read", _history(_put("1", 0, 10, 2), _put("2", 20, 30, 3), _get(40, 50, 2, A1)),
     NOT_LINEARIZABLE, "Illegal"),
    ("stale read under a fresh header",
     _history(_put("1", 0, 10, 2), _put("2", 20, 30, 3), _get(40, 50, 3, A1)), NOT_LINEARIZABLE, "Illegal"),
    ("old value while the newer write is in flight",
     _history(_put("1", 0, 10, 2), _put("2", 20, 30, 3), _get(25, 50, 2, A1)), LINEARIZABLE, "Ok"),
    ("read of an acknowledged write's absence", _history(_put("1", 0, 10, 2), _get(20, 30, 1, None)),
     NOT_LINEARIZABLE, "Illegal"),
    ("unknown write makes the read legal",
     _history(_put("1", 0, 10, 2), _put("2", 20, INF), _get(40, 50, 3, A2)), LINEARIZABLE, "Ok"),
    ("read of an unknown write invoked after the read returned",
     _history(_put("1", 0, 10, 2), _get(12, 15, 3, A2), _put("2", 20, INF)), NOT_LINEARIZABLE, "Illegal"),
    ("unknown write that never applied",
     _history(_put("1", 0, INF), _get(20, 30, 1, None)), LINEARIZABLE, "Ok"),
    ("unknown write on another key fills a revision gap",
     _history(_put("1", 0, 10, 2), _put("x", 12, INF, key="/lin/b"), _put("3", 20, 30, 4),
              _get(40, 50, 4, _kv("3", 4, 2, 2))), LINEARIZABLE, "Ok"),
    ("revision gap no write could have filled",
     _history(_put("1", 0, 10, 2), _put("3", 20, 30, 4), _put("x", 35, INF, key="/lin/b"),
              _get(40, 50, 4, _kv("3", 4, 2, 2))), NOT_LINEARIZABLE, "Illegal"),
    ("two writes with one revision",
     _history(_put("1", 0, 10, 2), _put("x", 0, 10, 2, key="/lin/b")), NOT_LINEARIZABLE, "Illegal"),
    ("a value nobody wrote", _history(_put("1", 0, 10, 2), _get(20, 30, 2, _kv("9", 2, 2, 1))),
     NOT_LINEARIZABLE, "Illegal"),
    ("compare-and-swap on mod_revision",
     _history(_put("1", 0, 10, 2), _cas_mod(2, "x", 20, 30, 3, True), _cas_mod(2, "y", 40, 50, 3, False,
              _kv("x", 3, 2, 2)), _get(60, 70, 3, _kv("x", 3, 2, 2))), LINEARIZABLE, "Ok"),
    ("compare-and-swap that succeeded on a stale mod_revision",
     _history(_put("1", 0, 10, 2), _put("2", 20, 30, 3), _cas_mod(2, "x", 40, 50, 4, True)),
     NOT_LINEARIZABLE, "Illegal"),
    ("value compare on a missing key never holds (etcd)", _history(_cas_value("", "x", 0, 10, 2, True)),
     NOT_LINEARIZABLE, "Illegal"),
    ("value compare",
     _history(_put("1", 0, 10, 2), _cas_value("1", "x", 20, 30, 3, True),
              _cas_value("1", "y", 40, 50, 3, False, _kv("x", 3, 2, 2))), LINEARIZABLE, "Ok"),
    ("stale serializable read (allowed: the weaker model)",
     _history(_put("1", 0, 10, 2), _put("2", 20, 30, 3), _get(40, 50, 2, A1, serializable=True)),
     LINEARIZABLE, "Ok"),
    ("serializable read unlike its own revision",
     _history(_put("1", 0, 10, 2), _put("2", 20, 30, 3), _get(40, 50, 3, A1, serializable=True)),
     NOT_LINEARIZABLE, "Ok"),
    ("serializable read from the future",
     _history(_put("1", 0, 10, 2), _get(12, 15, 3, A2, serializable=True), _put("2", 20, 30, 3)),
     NOT_LINEARIZABLE, "Ok"),
]


@pytest.mark.parametrize(("history", "code", "porcupine"),
                         [pytest.param(h, c, p, id=name) for name, h, c, p in HAND_MADE])
def test_hand_made_history(history: History, code: int, porcupine: str, tmp_path: Path) -> None:
    verdict = check_history(history, tmp_path, html_on_failure=False)
    assert (verdict.returncode, verdict.report.get("porcupine")) == (code, porcupine), verdict.describe()
