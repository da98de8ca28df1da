"""etcd's server-side Lock (v3lockpb) and Election (v3electionpb) services: a differential against etcd 3.5.1.

Every scenario runs the same gRPC calls against fastetcd and a fresh real etcd at once and returns a
transcript (answers, errors, revisions, keys with lease ids replaced by names); the two transcripts must be
equal, and each scenario also asserts the recipe's promises (mutual exclusion, hand-over on unlock, resign
or lease expiry, what Observe streams) on both servers. etcdctl's client-side `lock` and `elect` recipes
are checked against fastetcd the same way.
"""

from __future__ import annotations

import asyncio
import difflib
import queue
import signal
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from servers import ServerPair

from fastetcd.engine.state_machine import StateMachine
from fastetcd.proto import kv_pb2, rpc_pb2_grpc, v3election_pb2_grpc, v3lock_pb2_grpc
from fastetcd.proto import rpc_pb2 as pb
from fastetcd.proto import v3election_pb2 as epb
from fastetcd.proto import v3lock_pb2 as lpb
from fastetcd.server.election import ElectionService
from fastetcd.server.header import Header
from fastetcd.server.lock import LockService
from fastetcd.store.embedded import EmbeddedStore
from fastetcd.testing import etcd_tool, etcdctl_env, stop_process_group

WAIT_S = 15.0  # a lease of 2 s expires within about 2.5 s on both servers; leave room on a busy machine


class Client:
    """Stubs for one server plus the transcript one scenario writes, with lease ids named L1, L2, ..."""

    def __init__(self, endpoint: str) -> None:
        self.channel = grpc.insecure_channel(endpoint)
        self.kv = rpc_pb2_grpc.KVStub(self.channel)
        self.lease = rpc_pb2_grpc.LeaseStub(self.channel)
        self.lock = v3lock_pb2_grpc.LockStub(self.channel)
        self.election = v3election_pb2_grpc.ElectionStub(self.channel)
        self.log: list[tuple] = []
        self._names: dict[int, str] = {}

    def close(self) -> None:
        self.channel.close()

    def name(self, lease: int) -> str:
        return self._names.setdefault(lease, f"L{len(self._names) + 1}")

    def key(self, key: bytes) -> str:
        """A recipe key "<name>/<lease hex>" with the lease named (a lease the server granted gets one)."""
        prefix, _, tail = key.rpartition(b"/")
        try:
            lease = int(tail, 16)
        except ValueError:
            return key.decode()
        return f"{prefix.decode()}/<{self.name(lease)}>"

    def grant(self, ttl: int) -> int:
        lease = self.lease.LeaseGrant(pb.LeaseGrantRequest(TTL=ttl)).ID
        self.name(lease)
        return lease

    def record(self, *entry: object) -> None:
        self.log.append(entry)

    def call(self, what: str, fn: Callable[[], object]) -> object | None:
        """Run one call; record its error (code and text) if it fails and return None."""
        try:
            return fn()
        except grpc.RpcError as e:
            self.record(what, "error", e.code().name, e.details())
            return None

    def keys(self, prefix: bytes) -> list[tuple[str, int]]:
        resp = self.kv.Range(pb.RangeRequest(key=prefix, range_end=prefix[:-1] + bytes([prefix[-1] + 1])))
        return sorted(((self.key(kv.key), kv.create_revision) for kv in resp.kvs), key=lambda k: k[1])

    def wait_keys(self, prefix: bytes, n: int) -> None:
        """Until exactly n keys are under prefix (a waiter enqueued, or a lease expired)."""
        deadline = time.monotonic() + WAIT_S
        while len(self.keys(prefix)) != n:
            assert time.monotonic() < deadline, f"{prefix!r} never had {n} keys: {self.keys(prefix)}"
            time.sleep(0.02)

    def leader_value(self, name: bytes) -> bytes:
        return self.election.Leader(epb.LeaderRequest(name=name)).kv.value


class Observer:
    """An Observe stream read by a thread into a queue."""

    def __init__(self, c: Client, name: bytes) -> None:
        self.call = c.election.Observe(epb.LeaderRequest(name=name), timeout=60)
        self.got: queue.Queue[epb.LeaderResponse | BaseException] = queue.Queue()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for msg in self.call:
                self.got.put(msg)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            self.got.put(e)

    def next(self) -> epb.LeaderResponse:
        msg = self.got.get(timeout=WAIT_S)
        assert isinstance(msg, epb.LeaderResponse), f"Observe ended: {msg!r}"
        return msg

    def close(self) -> None:
        self.call.cancel()
        self.thread.join(timeout=5)

    def assert_quiet(self) -> None:
        assert self.got.empty(), f"Observe sent more than expected: {self.got.get()!r}"


def differential(pair: ServerPair, scenario: Callable[[Client], None]) -> list[tuple]:
    """Run ``scenario`` against both servers at once; their transcripts must be identical."""

    def run(endpoint: str) -> list[tuple]:
        c = Client(endpoint)
        try:
            scenario(c)
        finally:
            c.close()
        return c.log

    with ThreadPoolExecutor(max_workers=2) as pool:
        subject_f = pool.submit(run, pair.subject.endpoint)
        oracle_f = pool.submit(run, pair.oracle.endpoint)
        oracle = oracle_f.result()
        subject = subject_f.result()
    diff = "\n".join(difflib.unified_diff(
        [repr(e) for e in oracle], [repr(e) for e in subject], "etcd", "fastetcd", lineterm=""
    ))
    assert subject == oracle, f"fastetcd and etcd differ:\n{diff}"
    return subject


def lock_key(c: Client, resp: lpb.LockResponse) -> tuple[str, int]:
    return c.key(resp.key), resp.header.revision


# ------------------------------------------------------------------------------------------------ Lock


def scenario_mutual_exclusion(c: Client) -> None:
    l1, l2 = c.grant(60), c.grant(60)
    a = c.lock.Lock(lpb.LockRequest(name=b"mx", lease=l1))
    c.record("a locks", *lock_key(c, a))
    # the same lease locking again is the same acquisition
    c.record("a again", *lock_key(c, c.lock.Lock(lpb.LockRequest(name=b"mx", lease=l1))))
    b = c.lock.Lock.future(lpb.LockRequest(name=b"mx", lease=l2))
    c.wait_keys(b"mx/", 2)  # b is enqueued behind a
    c.record("queue", c.keys(b"mx/"))
    # a's critical section: b must still be waiting, whatever a does meanwhile
    for i in range(3):
        c.kv.Put(pb.PutRequest(key=b"mx-data", value=b"%d" % i))
        time.sleep(0.1)
        assert not b.done(), "the second locker got the lock while the first held it"
    unlocked = c.lock.Unlock(lpb.UnlockRequest(key=a.key))
    c.record("a unlocks", unlocked.header.revision)
    got = b.result(timeout=WAIT_S)
    c.record("b locks", *lock_key(c, got))
    assert got.key != a.key and got.header.revision >= unlocked.header.revision
    c.record("queue", c.keys(b"mx/"))
    c.record("b unlocks", c.lock.Unlock(lpb.UnlockRequest(key=got.key)).header.revision)
    c.record("queue", c.keys(b"mx/"))


def test_lock_mutual_exclusion(server_pair: ServerPair) -> None:
    log = differential(server_pair, scenario_mutual_exclusion)
    assert [e[0] for e in log if e[0] in ("a locks", "b locks")] == ["a locks", "b locks"]


def scenario_lock_counter(c: Client) -> None:
    """Six clients each increment a counter five times with a plain read and a plain put, under the lock:
    without mutual exclusion increments get lost."""
    workers, rounds = 6, 5
    c.kv.Put(pb.PutRequest(key=b"counter", value=b"0"))

    def work() -> None:
        lease = c.grant(60)
        for _ in range(rounds):
            held = c.lock.Lock(lpb.LockRequest(name=b"ctr", lease=lease), timeout=60)
            value = int(c.kv.Range(pb.RangeRequest(key=b"counter")).kvs[0].value)
            time.sleep(0.002)  # widen the window a lost update needs
            c.kv.Put(pb.PutRequest(key=b"counter", value=b"%d" % (value + 1)))
            c.lock.Unlock(lpb.UnlockRequest(key=held.key))

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for f in [pool.submit(work) for _ in range(workers)]:
            f.result()
    got = c.kv.Range(pb.RangeRequest(key=b"counter"))
    # every round writes three revisions (lock, put, unlock) after the counter's own put at revision 2
    c.record("counter", got.kvs[0].value, got.header.revision, c.keys(b"ctr/"))


def test_lock_serializes_read_modify_write(server_pair: ServerPair) -> None:
    log = differential(server_pair, scenario_lock_counter)
    assert log == [("counter", b"30", 2 + 30 * 3, [])]


def scenario_lock_lease_expiry(c: Client) -> None:
    short, long_ = c.grant(2), c.grant(60)
    c.record("a locks", *lock_key(c, c.lock.Lock(lpb.LockRequest(name=b"exp", lease=short))))
    b = c.lock.Lock.future(lpb.LockRequest(name=b"exp", lease=long_))
    c.wait_keys(b"exp/", 2)
    got = b.result(timeout=WAIT_S)  # a never unlocks: its lease expires
    c.record("b locks", *lock_key(c, got))
    c.record("queue", c.keys(b"exp/"))


def test_lock_released_by_lease_expiry(server_pair: ServerPair) -> None:
    log = differential(server_pair, scenario_lock_lease_expiry)
    assert log[-1] == ("queue", [("exp/<L2>", 3)])


def scenario_lock_canceled_waiter(c: Client) -> None:
    l1, l2 = c.grant(60), c.grant(60)
    c.record("a locks", *lock_key(c, c.lock.Lock(lpb.LockRequest(name=b"cx", lease=l1))))
    b = c.lock.Lock.future(lpb.LockRequest(name=b"cx", lease=l2))
    c.wait_keys(b"cx/", 2)
    b.cancel()
    # etcd's Mutex.Lock deletes its key when the caller's context ends while it waits
    c.wait_keys(b"cx/", 1)
    c.record("queue", c.keys(b"cx/"), c.kv.Range(pb.RangeRequest(key=b"cx")).header.revision)


def test_lock_canceled_waiter_leaves_the_queue(server_pair: ServerPair) -> None:
    log = differential(server_pair, scenario_lock_canceled_waiter)
    assert log[-1] == ("queue", [("cx/<L1>", 2)], 4)


def scenario_lock_session_expired(c: Client) -> None:
    holder, waiter = c.grant(60), c.grant(2)
    a = c.lock.Lock(lpb.LockRequest(name=b"se", lease=holder))
    b = c.lock.Lock.future(lpb.LockRequest(name=b"se", lease=waiter))
    c.wait_keys(b"se/", 2)
    c.wait_keys(b"se/", 1)  # the waiter's lease expired: its key is gone, but it still waits
    assert not b.done()
    c.lock.Unlock(lpb.UnlockRequest(key=a.key))
    try:
        b.result(timeout=WAIT_S)
        c.record("b", "locked")
    except grpc.RpcError as e:
        c.record("b", "error", e.code().name, e.details())


def test_lock_waiter_whose_lease_expired(server_pair: ServerPair) -> None:
    log = differential(server_pair, scenario_lock_session_expired)
    assert log == [("b", "error", "UNKNOWN", "mutex: session is expired")]


def scenario_lock_edges(c: Client) -> None:
    c.call("unknown lease", lambda: c.lock.Lock(lpb.LockRequest(name=b"e", lease=0x1234)))
    c.call("unlock no key", lambda: c.lock.Unlock(lpb.UnlockRequest()))
    c.call("negative lease", lambda: c.lock.Lock(lpb.LockRequest(name=b"e", lease=-5)))
    c.record("unlock missing", c.lock.Unlock(lpb.UnlockRequest(key=b"e/none")).header.revision)
    # lease 0: the server grants a session lease of etcd's default 60 s for the lock
    got = c.lock.Lock(lpb.LockRequest(name=b"e", lease=0))
    c.record("lease 0", *lock_key(c, got))
    lease = int(got.key.rpartition(b"/")[2], 16)
    ttl = c.lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=lease, keys=True))
    c.record("granted", ttl.grantedTTL, [c.key(k) for k in ttl.keys])
    c.record("empty name", *lock_key(c, c.lock.Lock(lpb.LockRequest(name=b"", lease=c.grant(60)))))


def test_lock_errors_and_defaults(server_pair: ServerPair) -> None:
    log = differential(server_pair, scenario_lock_edges)
    assert log[:2] == [
        ("unknown lease", "error", "UNKNOWN", "etcdserver: requested lease not found"),
        ("unlock no key", "error", "UNKNOWN", "etcdserver: key is not provided"),
    ]
    assert ("granted", 60, ["e/<L1>"]) in log


# ------------------------------------------------------------------------------------------------ Election


def leader_key(c: Client, k: epb.LeaderKey) -> tuple:
    return (k.name.decode(), c.key(k.key), k.rev, c.name(k.lease))


def observed(c: Client, msg: epb.LeaderResponse) -> tuple:
    return ("observed", msg.header.revision, c.key(msg.kv.key), msg.kv.value, msg.kv.create_revision)


def scenario_election(c: Client) -> None:
    la, lb = c.grant(60), c.grant(60)
    c.call("leader before", lambda: c.election.Leader(epb.LeaderRequest(name=b"el")))
    waiting = Observer(c, b"el")  # no leader yet: waits for the first campaigner's put
    late: Observer | None = None
    try:
        a = c.election.Campaign(epb.CampaignRequest(name=b"el", lease=la, value=b"a1"))
        c.record("a leads", a.header.revision, *leader_key(c, a.leader))
        c.record(*observed(c, waiting.next()))
        c.record("proclaim", c.election.Proclaim(
            epb.ProclaimRequest(leader=a.leader, value=b"a2")).header.revision)
        c.record(*observed(c, waiting.next()))
        assert c.leader_value(b"el") == b"a2"
        b = c.election.Campaign.future(epb.CampaignRequest(name=b"el", lease=lb, value=b"b1"))
        c.wait_keys(b"el/", 2)
        late = Observer(c, b"el")  # a leader exists: its current value first
        c.record(*observed(c, late.next()))
        observers = (waiting, late)
        time.sleep(0.2)
        assert not b.done(), "a second campaigner was elected while the first leads"
        c.record("resign", c.election.Resign(epb.ResignRequest(leader=a.leader)).header.revision)
        got = b.result(timeout=WAIT_S)
        c.record("b leads", got.header.revision, *leader_key(c, got.leader))
        for obs in observers:
            c.record(*observed(c, obs.next()))
        lr = c.election.Leader(epb.LeaderRequest(name=b"el"))
        c.record("leader", lr.header.revision, c.key(lr.kv.key), lr.kv.value)
        # the old leadership is gone: proclaiming with it fails, resigning it again changes nothing
        stale = epb.ProclaimRequest(leader=a.leader, value=b"x")
        c.call("stale proclaim", lambda: c.election.Proclaim(stale))
        c.record("stale resign", c.election.Resign(epb.ResignRequest(leader=a.leader)).header.revision)
        c.record("proclaim", c.election.Proclaim(
            epb.ProclaimRequest(leader=got.leader, value=b"b2")).header.revision)
        for obs in observers:
            c.record(*observed(c, obs.next()))
        time.sleep(0.2)
        for obs in observers:
            obs.assert_quiet()
    finally:
        waiting.close()
        if late is not None:
            late.close()


def test_election_campaign_proclaim_observe_resign(server_pair: ServerPair) -> None:
    log = differential(server_pair, scenario_election)
    values = [e[3] for e in log if e[0] == "observed"]
    assert values == [b"a1", b"a2", b"a2", b"b1", b"b1", b"b2", b"b2"]
    assert ("stale proclaim", "error", "UNKNOWN", "election: not leader") in log
    assert log[0] == ("leader before", "error", "UNKNOWN", "election: no leader")


def scenario_election_lease_expiry(c: Client) -> None:
    short, long_ = c.grant(2), c.grant(60)
    a = c.election.Campaign(epb.CampaignRequest(name=b"ex", lease=short, value=b"a"))
    c.record("a leads", a.header.revision, *leader_key(c, a.leader))
    obs = Observer(c, b"ex")
    try:
        c.record(*observed(c, obs.next()))
        b = c.election.Campaign.future(epb.CampaignRequest(name=b"ex", lease=long_, value=b"b"))
        got = b.result(timeout=WAIT_S)  # a's lease expires
        c.record("b leads", got.header.revision, *leader_key(c, got.leader))
        c.record(*observed(c, obs.next()))
        expired = epb.ProclaimRequest(leader=a.leader, value=b"z")
        c.call("expired proclaim", lambda: c.election.Proclaim(expired))
    finally:
        obs.close()


def test_election_lease_expiry_hands_over(server_pair: ServerPair) -> None:
    log = differential(server_pair, scenario_election_lease_expiry)
    assert [e[3] for e in log if e[0] == "observed"] == [b"a", b"b"]
    assert log[-1] == ("expired proclaim", "error", "UNKNOWN", "election: not leader")


def scenario_election_edges(c: Client) -> None:
    la, lb = c.grant(60), c.grant(60)
    a = c.election.Campaign(epb.CampaignRequest(name=b"ed", lease=la, value=b"v1"))
    c.record("a leads", a.header.revision, *leader_key(c, a.leader))
    # campaigning again with the same lease keeps the place in line and proclaims the new value
    again = c.election.Campaign(epb.CampaignRequest(name=b"ed", lease=la, value=b"v2"))
    c.record("a again", again.header.revision, *leader_key(c, again.leader))
    c.record("value", c.leader_value(b"ed"))
    # a canceled campaign resigns
    b = c.election.Campaign.future(epb.CampaignRequest(name=b"ed", lease=lb, value=b"w"))
    c.wait_keys(b"ed/", 2)
    b.cancel()
    c.wait_keys(b"ed/", 1)
    c.record("queue", c.keys(b"ed/"))
    c.call("proclaim without leader", lambda: c.election.Proclaim(epb.ProclaimRequest(value=b"x")))
    c.call("resign without leader", lambda: c.election.Resign(epb.ResignRequest()))
    no_key = epb.LeaderKey(name=b"ed", rev=a.leader.rev, lease=la)
    c.call("proclaim empty key", lambda: c.election.Proclaim(epb.ProclaimRequest(leader=no_key, value=b"x")))
    c.call("resign empty key", lambda: c.election.Resign(epb.ResignRequest(leader=no_key)))
    c.call("campaign unknown lease", lambda: c.election.Campaign(
        epb.CampaignRequest(name=b"ed", lease=0x77, value=b"x")))
    wrong_rev = epb.LeaderKey(name=a.leader.name, key=a.leader.key, rev=a.leader.rev + 1, lease=la)
    wrong = epb.ProclaimRequest(leader=wrong_rev, value=b"x")
    c.call("proclaim wrong rev", lambda: c.election.Proclaim(wrong))
    c.record("value", c.leader_value(b"ed"))
    c.record("resign", c.election.Resign(epb.ResignRequest(leader=a.leader)).header.revision)
    c.call("leader after", lambda: c.election.Leader(epb.LeaderRequest(name=b"ed")))
    # lease 0: a 60 s session lease granted by the server
    z = c.election.Campaign(epb.CampaignRequest(name=b"z", value=b"zero"))
    c.record("lease 0", z.header.revision, *leader_key(c, z.leader))
    c.record("granted", c.lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=z.leader.lease)).grantedTTL)


def test_election_errors_and_defaults(server_pair: ServerPair) -> None:
    log = differential(server_pair, scenario_election_edges)
    missing = ("error", "UNKNOWN", '"leader" field must be provided')
    assert ("proclaim without leader", *missing) in log and ("resign without leader", *missing) in log
    assert ("value", b"v2") in log and ("granted", 60) in log
    assert ("leader after", "error", "UNKNOWN", "election: no leader") in log
    assert ("resign empty key", "error", "UNKNOWN", "etcdserver: key is not provided") in log


# ------------------------------------------------------------------------------------------------ etcdctl


class Etcdctl:
    """A long-running etcdctl (lock and elect block until interrupted); its output read as it comes."""

    def __init__(self, endpoint: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [etcd_tool("etcdctl"), f"--endpoints={endpoint}", *args], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env=etcdctl_env(), start_new_session=True,
        )
        self.out: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.out.put(line.rstrip("\n"))

    def lines(self, n: int) -> list[str]:
        """The next n lines, each with a recipe key's lease suffix masked ("name/<lease>")."""
        try:
            got = [self.out.get(timeout=WAIT_S) for _ in range(n)]
        except queue.Empty:
            pytest.fail(f"etcdctl printed fewer lines than expected; stderr: {self.stop()}")
        return [line.rsplit("/", 1)[0] + "/<lease>" if "/" in line else line for line in got]

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> str:
        """SIGINT (etcdctl then releases its lock or resigns and revokes its lease), then its stderr."""
        stop_process_group(self.proc, signal.SIGINT, timeout=10)
        assert self.proc.stderr is not None
        return self.proc.stderr.read()


@pytest.fixture
def etcdctl() -> Iterator[Callable[..., Etcdctl]]:
    started: list[Etcdctl] = []

    def start(endpoint: str, *args: str) -> Etcdctl:
        started.append(Etcdctl(endpoint, *args))
        return started[-1]

    yield start
    for p in started:
        p.stop()


def etcdctl_lock_elect(endpoint: str, etcdctl: Callable[..., Etcdctl]) -> list[str]:
    """etcdctl's client-side recipes: a held lock makes a second locker (with a command) wait; a second
    campaigner waits for the first to resign; an observer sees both leaders."""
    out: list[str] = []
    holder = etcdctl(endpoint, "lock", "ctl-lock")
    out += holder.lines(1)
    waiter = etcdctl(endpoint, "lock", "ctl-lock", "--", "sh", "-c", "echo got $ETCD_LOCK_KEY")
    time.sleep(1)
    out.append(f"waiter running while held: {waiter.running()}")
    holder.stop()
    out += waiter.lines(1)
    assert waiter.proc.wait(timeout=WAIT_S) == 0, waiter.stop()

    leader = etcdctl(endpoint, "elect", "ctl-elect", "first")
    out += leader.lines(2)
    observer = etcdctl(endpoint, "elect", "-l", "ctl-elect")
    out += observer.lines(2)
    second = etcdctl(endpoint, "elect", "ctl-elect", "second")
    time.sleep(1)
    out.append(f"second campaigner waiting: {second.running()}")
    leader.stop()
    out += second.lines(2)
    out += observer.lines(2)
    return out


def test_etcdctl_lock_and_elect(server_pair: ServerPair, etcdctl: Callable[..., Etcdctl]) -> None:
    with ThreadPoolExecutor(max_workers=2) as pool:
        ours_f = pool.submit(etcdctl_lock_elect, server_pair.subject.endpoint, etcdctl)
        theirs_f = pool.submit(etcdctl_lock_elect, server_pair.oracle.endpoint, etcdctl)
        ours, theirs = ours_f.result(), theirs_f.result()
    assert ours == theirs
    assert ours == [
        "ctl-lock/<lease>", "waiter running while held: True", "got ctl-lock/<lease>",
        "ctl-elect/<lease>", "first", "ctl-elect/<lease>", "first",
        "second campaigner waiting: True", "ctl-elect/<lease>", "second", "ctl-elect/<lease>", "second",
    ]


# ------------------------------------------------------------------------------------------------ in process


def test_canceled_waits_leave_nothing_behind(tmp_path: Path) -> None:
    """A Lock, a Campaign and an Observe that wait hold one hub registration each and no task; canceling them
    (what a transport does when the client goes away) drops the registrations, and the cleanup etcd does
    (delete the waiter's key, resign) runs while other writes carry on."""

    async def main() -> None:
        store = EmbeddedStore(str(tmp_path / "data"))
        sm = StateMachine(store)
        await sm.start()
        try:
            header = Header(cluster_id=1, member_id=2)
            locks = LockService(sm, header, max_request_bytes=1 << 20)
            elections = ElectionService(sm, header, max_request_bytes=1 << 20)
            l1 = (await sm.lease_grant(pb.LeaseGrantRequest(TTL=60))).ID
            l2 = (await sm.lease_grant(pb.LeaseGrantRequest(TTL=60))).ID
            await locks.lock(lpb.LockRequest(name=b"n", lease=l1).SerializeToString())
            await elections.campaign(epb.CampaignRequest(name=b"e", lease=l1).SerializeToString())
            hub = sm.watch_hub
            before = len(hub._sinks)
            sent: list[bytes] = []

            async def send(msg: bytes) -> None:
                sent.append(msg)

            async def one(request: epb.LeaderRequest) -> AsyncIterator[bytes]:
                yield request.SerializeToString()
                await asyncio.Event().wait()  # a client that keeps its side open

            waits = [
                asyncio.create_task(locks.lock(lpb.LockRequest(name=b"n", lease=l2).SerializeToString())),
                asyncio.create_task(elections.campaign(
                    epb.CampaignRequest(name=b"e", lease=l2).SerializeToString())),
                asyncio.create_task(elections.observe(one(epb.LeaderRequest(name=b"e")), send)),
            ]
            while len(hub._sinks) < before + 3:
                await asyncio.sleep(0.01)
            # the writer is free while they wait
            await sm.put(pb.PutRequest(key=b"other", value=b"v"))
            assert not any(t.done() for t in waits) and len(sent) == 1
            for t in waits:
                t.cancel()
            for t in waits:
                with pytest.raises(asyncio.CancelledError):
                    await t
            assert len(hub._sinks) == before
            for _ in range(100):  # the cleanups run on their own
                keys = [kv_pb2.KeyValue.FromString(kv).key for kv in sm.range(pb.RangeRequest(
                    key=b"\0", range_end=b"\0")).kvs]
                if keys == [b"e/%x" % l1, b"n/%x" % l1, b"other"]:
                    break
                await asyncio.sleep(0.01)
            assert keys == [b"e/%x" % l1, b"n/%x" % l1, b"other"]
        finally:
            await sm.stop()
            await store.close()

    asyncio.run(asyncio.wait_for(main(), 30))
