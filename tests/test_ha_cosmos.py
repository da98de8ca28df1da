"""Issue 11's acceptance: three fastetcd nodes over one Cosmos container, failover without stale reads.

Three real fastetcd processes share one container of the Cosmos test server, each through a TCP proxy of
its own (tests/ha_cluster.py), with leadership lease LEASE_S. Clients record histories over all three
endpoints and the porcupine checker decides them (tests/test_linearizability.py explains the model: an
error or a timeout is an unknown outcome; serializable reads are checked for snapshot consistency).

What is killed, paused or cut off is always the leader, under load:
- kill -9: a new leader serves writes within the failover bound; nothing acknowledged is lost, no revision
  is used twice, watches on the survivors see every revision exactly once;
- its Cosmos traffic stalled past its lease, then released: no stale read anywhere, the old leader comes
  back as a follower;
- SIGSTOP past its lease, then SIGCONT: it commits nothing and serves no linearizable read as leader;
and a follower restarted later catches up and serves.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from signal import SIGCONT, SIGSTOP

import grpc
import pytest
from cosmos_fixture import CosmosServer, cosmos_fixture, module_cosmos_server  # noqa: F401
from ha_cluster import LEASE_S, HaCluster
from linearizability.history import History
from linearizability.lincheck import LINEARIZABLE, check_history
from linearizability.recorder import Recorder

from fastetcd.proto import rpc_pb2
from fastetcd.testing import channel, kv_stub, run_etcdctl, watch_stub

# From the leader's last renewal: a lease plus one poll (store/leadership.py), then the new leader
# catches up and clients reconnect; generous for a loaded 2-core machine.
FAILOVER_BOUND_S = LEASE_S * 1.1 + 6.0
CLIENTS = 16


@pytest.fixture
def cluster(cosmos: CosmosServer, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[HaCluster]:
    """Three nodes; a test parametrized indirectly on ``cluster`` gives their extra flags."""
    c = HaCluster(cosmos, tmp_path, extra_args=tuple(getattr(request, "param", ())))
    try:
        c.start()
        yield c
    finally:
        c.close()


class Watcher:
    """A watch of every key from revision 1 on one node, collecting (revision, key) of each event."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.events: list[tuple[int, bytes]] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._ch = channel(endpoint)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        def requests() -> Iterator[rpc_pb2.WatchRequest]:
            yield rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(
                key=b"\0", range_end=b"\0", start_revision=1))
            self._stop.wait()

        try:
            for resp in watch_stub(self._ch).Watch(requests()):
                self.events.extend((ev.kv.mod_revision, ev.kv.key) for ev in resp.events)
        except grpc.RpcError as e:
            if not self._stop.is_set():
                self.error = e

    def revisions(self) -> list[int]:
        return [rev for rev, _ in self.events]

    def wait_for(self, rev: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while (not self.events or self.events[-1][0] < rev) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.events and self.events[-1][0] >= rev, (self.endpoint, self.events[-3:], rev, self.error)

    def close(self) -> None:
        self._stop.set()
        self._ch.close()


def _put(endpoint: str, key: bytes, value: bytes, timeout: float = 10.0) -> int:
    with channel(endpoint) as ch:
        return kv_stub(ch).Put(rpc_pb2.PutRequest(key=key, value=value), timeout=timeout).header.revision


def _get(endpoint: str, key: bytes, *, serializable: bool = False) -> rpc_pb2.RangeResponse:
    with channel(endpoint) as ch:
        return kv_stub(ch).Range(rpc_pb2.RangeRequest(key=key, serializable=serializable), timeout=10)


def _assert_no_revision_reused(history: History) -> None:
    revs = [op.out.revision for op in history.ops
            if op.is_write and op.out is not None and op.kind in ("put", "delete")
            and (op.kind == "put" or op.out.deleted)]
    assert len(revs) == len(set(revs)), "two acknowledged writes share a revision"


def _assert_every_revision_once(watcher: Watcher, upto: int, since: int = 2) -> None:
    revs = [r for r in watcher.revisions() if since <= r <= upto]
    assert revs == sorted(set(revs)), f"{watcher.endpoint}: events out of order or repeated"
    # Every revision is one event here: the load makes single-key writes only.
    assert revs == list(range(since, upto + 1)), f"{watcher.endpoint}: missing revisions"


# ------------------------------------------------------------------------------------------------


def test_writes_anywhere_reads_and_watches_everywhere(cluster: HaCluster) -> None:
    leader = cluster.leader()
    statuses = [cluster.status(i) for i in range(3)]
    assert len({s.raftTerm for s in statuses}) == 1
    assert len({s.header.cluster_id for s in statuses}) == 1
    # Members announce themselves every renewal: within a few of them every node lists all three.
    deadline = time.monotonic() + 10
    while True:
        with channel(cluster.nodes[0].endpoint) as ch:
            members = rpc_pb2_cluster_members(ch)
        if len(members) == 3 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert sorted(m.name for m in members) == ["n0", "n1", "n2"]
    assert {m.clientURLs[0] for m in members} == {f"http://{e}" for e in cluster.endpoints()}

    watchers = [Watcher(e) for e in cluster.endpoints()]
    try:
        last = 0
        for i in range(30):
            node = cluster.nodes[i % 3]
            rev = _put(node.endpoint, f"/k/{i}".encode(), f"v{i}".encode())
            assert rev > last
            last = rev
            # Read-your-write on every node, linearizable, right after the acknowledgement.
            for other in cluster.nodes:
                got = _get(other.endpoint, f"/k/{i}".encode())
                assert [kv.value for kv in got.kvs] == [f"v{i}".encode()], (other.name, i, leader)
            # The node that took the write has applied it before answering: a serializable read there sees it.
            assert _get(node.endpoint, f"/k/{i}".encode(), serializable=True).kvs
        for w in watchers:
            w.wait_for(last)
            _assert_every_revision_once(w, last)
        assert len({tuple(w.events) for w in watchers}) == 1
    finally:
        for w in watchers:
            w.close()

    _record_phase(cluster, cluster.endpoints(), 10, "calm", lambda _: time.sleep(3))


def rpc_pb2_cluster_members(ch: grpc.Channel) -> list:
    from fastetcd.proto import rpc_pb2_grpc

    return list(rpc_pb2_grpc.ClusterStub(ch).MemberList(rpc_pb2.MemberListRequest(), timeout=5).members)


def _survivors_first(cluster: HaCluster, leader: int) -> list[str]:
    """Endpoints with the leader last: the recorder's first endpoint takes its initial and final reads."""
    order = [i for i in range(3) if i != leader] + [leader]
    return cluster.endpoints(*order)


def _record_phase(cluster: HaCluster, endpoints: list[str], seed: int, name: str,
                  during: Callable[[Recorder], None]) -> History:
    """One history: ``CLIENTS`` clients on ``endpoints`` while ``during(recorder)`` runs, checked alone.

    A fault is recorded in phases (the fault itself up to the first writes after it, then the time after),
    each a history of its own: the writes of unknown outcome that a fault leaves (the clients of a dead or
    cut-off node) are concurrent with everything after them in their history, and porcupine's search
    grows with that, not with what a phase without them adds. Unknown puts and swaps are then settled by
    what a watch of the keys saw (the recorder's resolve_by_watch, as etcd's robustness tests do); the
    checker still decides everything, those writes included."""
    # Fresh keys per phase (values repeat across recorders); unknown writes settled by a watch.
    with Recorder(endpoints, clients=CLIENTS, seed=seed, prefix=f"/lin/{name}/",
                  resolve_by_watch=True) as rec:
        during(rec)
    history = rec.history
    verdict = check_history(history, cluster.root, name)
    assert verdict.returncode == LINEARIZABLE, verdict.describe()
    _assert_no_revision_reused(history)
    return history


def test_kill_leader_under_load(cluster: HaCluster) -> None:
    leader = cluster.leader()
    survivors = [i for i in range(3) if i != leader]
    watchers = [Watcher(cluster.nodes[i].endpoint) for i in survivors]
    took: list[float] = []

    def kill(rec: Recorder) -> None:
        time.sleep(2)
        killed_at = time.monotonic()
        cluster.kill(leader)
        took.append(rec.wait_for_write(killed_at))
        time.sleep(0.5)

    try:
        _record_phase(cluster, _survivors_first(cluster, leader), 11, "kill", kill)
        assert took[0] <= FAILOVER_BOUND_S, f"writes resumed {took[0]:.1f}s after the kill"
        _record_phase(cluster, cluster.endpoints(*survivors), 21, "after-kill", lambda _: time.sleep(2))
        new_leader = cluster.leader(among=survivors)
        assert new_leader in survivors
        head = _get(cluster.nodes[new_leader].endpoint, b"/none").header.revision
        for w in watchers:
            w.wait_for(head)
            _assert_every_revision_once(w, head)
    finally:
        for w in watchers:
            w.close()


def test_leader_cut_off_from_cosmos(cluster: HaCluster) -> None:
    leader = cluster.leader()
    others = [i for i in range(3) if i != leader]
    proxy = cluster.nodes[leader].proxy

    def cut_off(rec: Recorder) -> None:
        time.sleep(1.5)
        proxy.stall()
        stalled_at = time.monotonic()
        # The old leader keeps its clients' calls (the stall holds them) until it knows it lost; a new
        # leader serves writes meanwhile.
        rec.wait_for_write(stalled_at + LEASE_S)
        assert cluster.leader(among=others) in others
        time.sleep(0.5)

    try:
        _record_phase(cluster, _survivors_first(cluster, leader), 12, "cut-off", cut_off)
    finally:
        proxy.release()
    # Back in touch: it rejoins as a follower; clients of all three nodes see one history.
    _record_phase(cluster, _survivors_first(cluster, leader), 22, "rejoined", lambda _: time.sleep(3))
    new_leader = cluster.leader()
    assert new_leader != leader
    rev = _put(cluster.nodes[new_leader].endpoint, b"/after", b"1")
    assert _get(cluster.nodes[leader].endpoint, b"/after").header.revision >= rev


def test_leader_paused_past_its_lease(cluster: HaCluster) -> None:
    leader = cluster.leader()
    others = [i for i in range(3) if i != leader]

    def pause(rec: Recorder) -> None:
        time.sleep(1.5)
        cluster.signal(leader, SIGSTOP)
        try:
            rec.wait_for_write(time.monotonic() + LEASE_S)
            assert cluster.leader(among=others) in others
        finally:
            cluster.signal(leader, SIGCONT)
        # Calls queued at the paused leader are answered now: the checker sees whether any of them was
        # a stale read or a write committed under the old leadership.
        time.sleep(1.5)

    _record_phase(cluster, _survivors_first(cluster, leader), 13, "paused", pause)
    assert cluster.leader() != leader


@pytest.mark.parametrize("cluster", [("--snapshot-count", "50")], indirect=True)
def test_restarted_follower_catches_up(cluster: HaCluster) -> None:
    """Down while the leader wrote 200 entries and took snapshots (every 50) that let it drop the log the
    follower had not read: it comes back from the newest snapshot plus the log after it."""
    leader = cluster.leader()
    follower = next(i for i in range(3) if i != leader)
    cluster.nodes[follower].process.stop()
    for i in range(200):
        _put(cluster.nodes[leader].endpoint, f"/r/{i}".encode(), b"x" * 100)
    time.sleep(1)
    cluster.restart(follower)
    head = _get(cluster.nodes[leader].endpoint, b"/none").header.revision
    got = _get(cluster.nodes[follower].endpoint, b"/r/199")
    assert got.kvs and got.header.revision >= head
    with channel(cluster.nodes[follower].endpoint) as ch:
        r = kv_stub(ch).Range(rpc_pb2.RangeRequest(key=b"/r/", range_end=b"/r0", count_only=True,
                                                   serializable=True), timeout=10)
    assert r.count == 200


def _etcdctl(endpoint: str, *args: str) -> str:
    code, out, err = run_etcdctl(endpoint, list(args), timeout=30)
    assert code == 0, f"etcdctl {' '.join(args)}: {err}"
    return out


def test_etcdctl_sees_a_three_member_cluster_and_moves_its_leader(cluster: HaCluster) -> None:
    leader = cluster.leader()
    follower, other = (i for i in range(3) if i != leader)
    deadline = time.monotonic() + 10
    for node in cluster.nodes:  # members announce themselves every renewal: each node lists all soon
        while len(json.loads(_etcdctl(node.endpoint, "member", "list", "-w", "json"))["members"]) < 3:
            assert time.monotonic() < deadline, f"{node.name} does not list every member"
            time.sleep(0.2)

    statuses = json.loads(_etcdctl(cluster.nodes[follower].endpoint, "endpoint", "status", "--cluster",
                                   "-w", "json"))
    assert sorted(s["Endpoint"] for s in statuses) == sorted(f"http://{e}" for e in cluster.endpoints())
    assert len({s["Status"]["leader"] for s in statuses}) == 1
    assert len({s["Status"]["raftTerm"] for s in statuses}) == 1
    assert [s["Status"]["header"]["member_id"] == s["Status"]["leader"] for s in statuses].count(True) == 1
    health = json.loads(_etcdctl(cluster.nodes[follower].endpoint, "endpoint", "health", "--cluster",
                                 "-w", "json"))
    assert len(health) == 3 and all(h["health"] for h in health), health

    # Leases through followers: granted at the leader, kept alive and read back from any node.
    lease_id = _etcdctl(cluster.nodes[follower].endpoint, "lease", "grant", "30").split()[1]
    _etcdctl(cluster.nodes[follower].endpoint, "put", "--lease", lease_id, "/leased", "v")
    assert "TTL(30)" in _etcdctl(cluster.nodes[other].endpoint, "lease", "keep-alive", "--once", lease_id)
    assert "/leased" in _etcdctl(cluster.nodes[other].endpoint, "lease", "timetolive", "--keys", lease_id)

    # MoveLeader: leadership goes to the named member at once, with a new term.
    term = cluster.status(leader).raftTerm
    target = cluster.status(follower).header.member_id
    started = time.monotonic()
    # etcdctl sends MoveLeader to the leader among the endpoints it is given.
    moved = _etcdctl(",".join(cluster.endpoints()), "move-leader", f"{target:x}")
    assert cluster.leader() == follower, [moved, target] + [(s.header.member_id, s.leader, s.raftTerm)
                                          for s in map(cluster.status, range(3))]
    assert time.monotonic() - started < LEASE_S, "MoveLeader waited out a lease"
    assert cluster.status(follower).raftTerm > term
    assert _etcdctl(cluster.nodes[leader].endpoint, "put", "/after-move", "1").strip() == "OK"


def test_no_leader_is_reported_to_require_leader_calls(cluster: HaCluster) -> None:
    cluster.leader()
    _put(cluster.nodes[0].endpoint, b"/k", b"v")
    for node in cluster.nodes:
        node.proxy.stall()
    try:
        time.sleep(LEASE_S * 1.5)
        with channel(cluster.nodes[0].endpoint) as ch:
            watch = watch_stub(ch).Watch(iter([rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(
                key=b"/k"))]), metadata=(("hasleader", "true"),), timeout=5)
            with pytest.raises(grpc.RpcError) as e:
                next(iter(watch))
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert e.value.details() == "etcdserver: no leader"
        # Serializable reads need no leader, as in etcd.
        assert _get(cluster.nodes[0].endpoint, b"/k", serializable=True).kvs[0].value == b"v"
    finally:
        for node in cluster.nodes:
            node.proxy.release()
    cluster.leader()
    assert _put(cluster.nodes[0].endpoint, b"/k", b"w") > 0
