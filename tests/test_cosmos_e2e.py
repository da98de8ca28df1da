"""End-to-end acceptance of the Cosmos store: fastetcd processes on the Cosmos test server
(tests/cosmos_server), driven by etcd gRPC clients, through restarts, a second writer on the same
container and injected Cosmos faults.

These run on the Cosmos store whatever `--store` says. Every Put writes a key of its own with a unique
value, so a Range shows each write's revision, a key with version > 1 is a write applied twice, and the
watch history from revision 2 must hold exactly one event per revision.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc
import pytest
from cosmos_fixture import CosmosServer
from servers import ServerFactory

from fastetcd.proto import kv_pb2, rpc_pb2, rpc_pb2_grpc
from fastetcd.testing import UNLIMITED_CHANNEL_OPTIONS, CosmosTarget, ServerProcess, kv_stub

WRITERS = 16
# Two 5 s Cosmos delays in a row can hold a write ~10 s; the rest is slack for a loaded CI box.
CLIENT_DEADLINE_S = 15.0
# Answers a client may get while Cosmos is unavailable (etcd's own texts); anything else is a finding.
EXPECTED_OUTAGE_ERRORS = (
    "etcdserver: too many requests",
    "etcdserver: request timed out",
    "etcdserver: storage failure",
)


# ----------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture
def cosmos(cosmos_session_server: CosmosServer) -> Iterator[CosmosServer]:
    """The session's Cosmos test server, with no fault rules before or after the test."""
    cosmos_session_server.clear_faults()
    try:
        yield cosmos_session_server
    finally:
        if cosmos_session_server.alive():
            cosmos_session_server.clear_faults()


@pytest.fixture
def target(cosmos: CosmosServer) -> CosmosTarget:
    return CosmosTarget(cosmos.endpoint, cosmos.key)


# ----------------------------------------------------------------------------------------------------
# load: WRITERS clients, each putting fresh keys until stopped


@dataclass
class Ack:
    rev: int
    key: bytes
    value: bytes
    server: str


@dataclass
class Failure:
    key: bytes
    server: str
    code: str
    details: str
    seconds: float  # how long the call took
    at: float  # monotonic time it ended


@dataclass
class Load:
    """Writers in a thread of their own (grpc.aio), so the test can kill servers and inject faults."""

    endpoints: dict[str, str]  # label -> endpoint; WRITERS writers per endpoint
    prefix: bytes
    writers: int = WRITERS
    deadline: float = CLIENT_DEADLINE_S
    acks: list[Ack] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    slowest: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Load:
        self._thread = threading.Thread(target=asyncio.run, args=(self._run(),), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> Load:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout=self.deadline + 10)
        assert not self._thread.is_alive(), "writers still running well past their client deadline"
        return self

    async def _run(self) -> None:
        channels = {label: grpc.aio.insecure_channel(ep) for label, ep in self.endpoints.items()}
        try:
            await asyncio.gather(*(
                self._writer(label, rpc_pb2_grpc.KVStub(ch), w)
                for label, ch in channels.items()
                for w in range(self.writers)
            ))
        finally:
            for ch in channels.values():
                await ch.close()

    async def _writer(self, label: str, stub: rpc_pb2_grpc.KVStub, w: int) -> None:
        n = 0
        while not self._stop.is_set():
            key = self.prefix + f"{label}/{w:02d}/{n:07d}".encode()
            value = f"{label}:{w}:{n}:{os.getpid()}".encode()
            n += 1  # a failed key is never retried: it may or may not have landed
            t0 = time.monotonic()
            try:
                resp = await stub.Put(rpc_pb2.PutRequest(key=key, value=value), timeout=self.deadline)
            except grpc.aio.AioRpcError as e:
                t1 = time.monotonic()
                self.failures.append(Failure(key, label, e.code().name, e.details() or "", t1 - t0, t1))
                await asyncio.sleep(0.05)  # a dead or refusing server must not turn this into a spin
                continue
            self.slowest = max(self.slowest, time.monotonic() - t0)
            self.acks.append(Ack(resp.header.revision, key, value, label))


def describe(failures: list[Failure]) -> list[str]:
    counts = Counter(f"{f.code}: {f.details}" for f in failures)
    return [f"{n} × {what}" for what, n in counts.most_common()]


# ----------------------------------------------------------------------------------------------------
# checks


def range_prefix(endpoint: str, prefix: bytes, **kw: object) -> rpc_pb2.RangeResponse:
    end = prefix[:-1] + bytes([prefix[-1] + 1])
    with grpc.insecure_channel(endpoint, options=UNLIMITED_CHANNEL_OPTIONS) as ch:
        return kv_stub(ch).Range(rpc_pb2.RangeRequest(key=prefix, range_end=end, **kw), timeout=30)


def check_acks(endpoint: str, prefix: bytes, acks: list[Ack]) -> dict[bytes, kv_pb2.KeyValue]:
    """Every acknowledged write is there, at its acknowledged revision, applied once."""
    revs = Counter(a.rev for a in acks)
    twice = {r: n for r, n in revs.items() if n > 1}
    assert not twice, f"revisions acknowledged more than once: {sorted(twice.items())[:10]}"
    kvs = {kv.key: kv for kv in range_prefix(endpoint, prefix).kvs}
    lost = [a for a in acks if a.key not in kvs]
    assert not lost, f"{len(lost)} of {len(acks)} acknowledged writes are gone, e.g. {lost[:3]}"
    wrong = [(a, kvs[a.key]) for a in acks
             if (kvs[a.key].value, kvs[a.key].mod_revision) != (a.value, a.rev)]
    assert not wrong, f"{len(wrong)} writes differ from what was acknowledged, e.g. {wrong[:2]}"
    again = [kv for kv in kvs.values() if kv.version != 1 or kv.create_revision != kv.mod_revision]
    assert not again, f"{len(again)} keys were written more than once, e.g. {again[:2]}"
    return kvs


def history(endpoint: str, start_rev: int, timeout: float = 30.0) -> tuple[int, list[kv_pb2.Event]]:
    """(current revision, every event from start_rev to it) from a Watch over the whole key space."""
    with grpc.insecure_channel(endpoint, options=UNLIMITED_CHANNEL_OPTIONS) as ch:
        head = kv_stub(ch).Range(rpc_pb2.RangeRequest(key=b"\0"), timeout=10).header.revision
        if head < start_rev:
            return head, []
        create = rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(
            key=b"\0", range_end=b"\0", start_revision=start_rev))
        done = threading.Event()

        def requests() -> Iterator[rpc_pb2.WatchRequest]:
            # Keep the sending side open like etcd's own clients do (a half-closed stream is another
            # matter: fastetcd then ends the stream, possibly before the replay).
            yield create
            done.wait(timeout)

        events: list[kv_pb2.Event] = []
        stream = rpc_pb2_grpc.WatchStub(ch).Watch(requests(), timeout=timeout)
        try:
            for resp in stream:
                assert not resp.canceled, f"watch from {start_rev} canceled: {resp.cancel_reason!r}"
                events.extend(resp.events)
                if events and events[-1].kv.mod_revision >= head:
                    break
            else:
                pytest.fail(f"the watch from {start_rev} ended after {len(events)} events, before {head}")
        finally:
            done.set()
            stream.cancel()
    return head, events


def check_history(endpoint: str, acks: list[Ack], start_rev: int = 2) -> int:
    """Revisions start_rev..head are contiguous (one event each: every revision here is one Put), and each
    acknowledged write is the event of its revision. Returns head."""
    head, events = history(endpoint, start_rev)
    revs = [e.kv.mod_revision for e in events]
    assert revs == list(range(start_rev, head + 1)), (
        f"history {start_rev}..{head} is not one event per revision: "
        f"missing {sorted(set(range(start_rev, head + 1)) - set(revs))[:10]}, "
        f"repeated {[r for r, n in Counter(revs).items() if n > 1][:10]}"
    )
    by_rev = {e.kv.mod_revision: e for e in events}
    wrong = [a for a in acks if (by_rev[a.rev].kv.key, by_rev[a.rev].kv.value) != (a.key, a.value)]
    assert not wrong, f"{len(wrong)} acknowledged writes are not the event of their revision: {wrong[:3]}"
    keys = Counter(e.kv.key for e in events)
    dup = [k for k, n in keys.items() if n > 1]
    assert not dup, f"keys written more than once in the history: {dup[:5]}"
    return head


def put(endpoint: str, key: bytes, value: bytes, timeout: float = 10.0, **kw: object) -> rpc_pb2.PutResponse:
    with grpc.insecure_channel(endpoint, options=UNLIMITED_CHANNEL_OPTIONS) as ch:
        return kv_stub(ch).Put(rpc_pb2.PutRequest(key=key, value=value, **kw), timeout=timeout)


def wait_writable(endpoint: str, key: bytes, within: float) -> float:
    """Seconds until a Put succeeds (the service resumed by itself); fails the test after `within`."""
    t0 = time.monotonic()
    last = ""
    n = 0
    while time.monotonic() - t0 < within:
        try:
            put(endpoint, key + str(n).encode(), b"probe", timeout=5)
            return time.monotonic() - t0
        except grpc.RpcError as e:
            last = f"{e.code().name}: {e.details()}"
            n += 1
            time.sleep(0.2)
    pytest.fail(f"writes did not resume within {within}s after the fault was cleared; last error: {last}")


def stop_gracefully(server: ServerProcess, timeout: float = 20.0) -> int:
    try:
        return server.stop(timeout=timeout, escalate=False)
    except TimeoutError as e:
        pytest.fail(str(e))


# ----------------------------------------------------------------------------------------------------
# 1. restarts while the Cosmos server keeps running


@pytest.mark.parametrize("how", ["sigterm", "kill9"])
def test_restart_keeps_every_acknowledged_write(server_factory: ServerFactory, target: CosmosTarget,
                                                how: str) -> None:
    prefix = b"restart/"
    server = server_factory("fastetcd", "node", cosmos=target)
    container = server.cosmos_container
    with grpc.insecure_channel(server.endpoint) as ch:
        lease = rpc_pb2_grpc.LeaseStub(ch)
        kept = lease.LeaseGrant(rpc_pb2.LeaseGrantRequest(TTL=600), timeout=10).ID
        revoked = lease.LeaseGrant(rpc_pb2.LeaseGrantRequest(TTL=600), timeout=10).ID
    # The leased keys live outside the load's prefix, so the prefix holds exactly the load's writes.
    first = put(server.endpoint, b"leased/a", b"1", lease=kept).header.revision
    put(server.endpoint, b"leased/b", b"2", lease=kept)
    put(server.endpoint, b"leased/c", b"3", lease=revoked)
    with grpc.insecure_channel(server.endpoint) as ch:
        rpc_pb2_grpc.LeaseStub(ch).LeaseRevoke(rpc_pb2.LeaseRevokeRequest(ID=revoked), timeout=10)

    load = Load({"w": server.endpoint}, prefix).start()
    time.sleep(2.0)
    stop_at = time.monotonic()
    if how == "sigterm":
        rc = stop_gracefully(server)
        assert rc == 0, f"fastetcd exited {rc} on SIGTERM; log:\n{server.log_tail()}"
    else:
        server.kill()
    load.stop()
    early = [f for f in load.failures if f.at < stop_at]
    assert not early, f"writes failed before the stop: {describe(early)}"
    assert len(load.acks) >= WRITERS, f"only {len(load.acks)} writes acknowledged in 2 s"

    server = server_factory("fastetcd", "node", cosmos=target)  # same data dir → same container
    assert server.cosmos_container == container
    check_acks(server.endpoint, prefix, load.acks)
    # The revoke (its own revision deleting leased/c) sits between the lease puts and the load.
    head, events = history(server.endpoint, first)
    revs = [e.kv.mod_revision for e in events]
    assert revs == list(range(first, head + 1)), f"history {first}..{head} has gaps or repeats: {revs[:20]}"
    assert [(e.type, e.kv.key) for e in events[:4]] == [
        (kv_pb2.Event.PUT, b"leased/a"), (kv_pb2.Event.PUT, b"leased/b"),
        (kv_pb2.Event.PUT, b"leased/c"), (kv_pb2.Event.DELETE, b"leased/c"),
    ]
    check_history(server.endpoint, load.acks, start_rev=first + 4)

    with grpc.insecure_channel(server.endpoint) as ch:
        lease = rpc_pb2_grpc.LeaseStub(ch)
        ttl = lease.LeaseTimeToLive(rpc_pb2.LeaseTimeToLiveRequest(ID=kept, keys=True), timeout=10)
        gone = lease.LeaseTimeToLive(rpc_pb2.LeaseTimeToLiveRequest(ID=revoked), timeout=10)
    # Not reset to a full TTL, only extended by the election the restart made (the old leader's lease on
    # the container ran out first), as etcd's lessor.Promote does after any election.
    assert ttl.grantedTTL == 600 and 0 < ttl.TTL <= 600 + 5.5, ttl
    assert sorted(ttl.keys) == [b"leased/a", b"leased/b"]
    assert gone.TTL == -1, "a revoked lease came back after the restart"
    # And the restarted node writes on at the next revision.
    assert put(server.endpoint, b"after", b"x").header.revision == head + 1


# ----------------------------------------------------------------------------------------------------
# 2. two writers on one container


def test_second_writer_fences_the_first(server_factory: ServerFactory, target: CosmosTarget) -> None:
    """Without leadership (--ha off) a second node on the container takes it over by fencing alone.
    (With it, the default, the second node follows instead: tests/test_ha_cosmos.py.)"""
    prefix = b"fence/"
    container = f"fence-{os.getpid()}-{time.monotonic_ns()}"
    a = server_factory("fastetcd", "a", ["--ha", "off"], cosmos=target, container=container)
    load_a = Load({"A": a.endpoint}, prefix, writers=8).start()
    a_started = time.monotonic()
    time.sleep(1.0)
    b = server_factory("fastetcd", "b", ["--ha", "off"], cosmos=target, container=container)
    b_ready = time.monotonic()
    load_b = Load({"B": b.endpoint}, prefix, writers=8).start()
    try:
        a.proc.wait(timeout=20)
    except Exception:
        pytest.fail(f"A still running 20 s after B took over its container; A's log:\n{a.log_tail()}")
    time.sleep(1.0)  # B keeps writing alone for a while
    load_a.stop()
    load_b.stop()

    a_acks, b_acks = load_a.acks, load_b.acks
    assert a_acks and b_acks, (len(a_acks), len(b_acks), describe(load_b.failures))
    both = {x.rev for x in a_acks} & {x.rev for x in b_acks}
    assert not both, f"revisions acknowledged by both writers: {sorted(both)[:10]}"
    b_errors = describe(load_b.failures)
    assert not load_b.failures, f"B refused writes: {b_errors}"
    late = [x for x in a_acks if x.rev > min(y.rev for y in b_acks)]
    assert not late, f"A acknowledged revisions after B's first: {late[:5]}"
    check_acks(b.endpoint, prefix, a_acks + b_acks)
    check_history(b.endpoint, a_acks + b_acks)

    assert a.proc.returncode != 0
    log = a.log_path.read_text(errors="replace").splitlines()
    reason = [ln for ln in log if ln.startswith("fastetcd: error:")]
    assert len(reason) == 1 and "fenced" in reason[0], f"A's exit reason: {reason}; tail:\n{a.log_tail()}"
    print(f"\nA: {len(a_acks)} acks, then {describe(load_a.failures)}; B ready {b_ready - a_started:.1f}s"
          f" after A's load began, {len(b_acks)} acks; A said: {reason[0]}")


# ----------------------------------------------------------------------------------------------------
# 3. Cosmos faults under load


def test_faults_lose_nothing_and_service_resumes(server_factory: ServerFactory, cosmos: CosmosServer,
                                                 target: CosmosTarget) -> None:
    prefix = b"fault/"
    server = server_factory("fastetcd", "node", cosmos=target)
    load = Load({"w": server.endpoint}, prefix).start()
    seen: dict[str, list[Failure]] = {}  # fault -> the errors clients got meanwhile
    resumed: dict[str, float] = {}  # fault -> seconds until a write succeeded after clearing it

    def phase(name: str, apply: Callable[[], object], hold: float) -> None:
        before = len(load.failures)
        injected0 = sum(cosmos.stats()["faults_injected"].values())
        apply()
        time.sleep(hold)
        cosmos.clear_faults()
        injected = sum(cosmos.stats()["faults_injected"].values()) - injected0
        assert injected > 0, f"{name}: no fault was injected (fastetcd sent no request?)"
        resumed[name] = wait_writable(server.endpoint, f"probe/{name}/".encode(), within=20)
        time.sleep(0.5)
        seen[name] = load.failures[before:]
        assert server.alive(), f"fastetcd exited after {name}; log:\n{server.log_tail()}"

    try:
        time.sleep(1.0)
        phase("429 storm", lambda: cosmos.fault("429", retry_after_ms=100, kind="all"), hold=3.0)
        phase("5 s delay", lambda: cosmos.fault("delay", ms=5000, kind="batch", count=2), hold=6.0)
        phase("drop", lambda: cosmos.fault("drop", kind="batch", count=2), hold=1.0)
        phase("drop after apply", lambda: cosmos.fault("drop_after", kind="batch", count=2), hold=1.0)
    finally:
        load.stop()
        report = "\n".join(f"  {n}: resumed after {resumed[n]:.1f}s; errors: {describe(f)}"
                            for n, f in seen.items())
        print(f"\n{len(load.acks)} acks, slowest ack {load.slowest:.1f}s\n{report}")

    hung = [f for f in load.failures if f.code == "DEADLINE_EXCEEDED"]
    assert not hung, f"calls hit the client's {CLIENT_DEADLINE_S}s deadline: {describe(hung)}"
    unexpected = [f for f in load.failures if not f.details.startswith(EXPECTED_OUTAGE_ERRORS)]
    assert not unexpected, f"errors other than etcd's outage answers: {describe(unexpected)}"
    # Throttling is load, not a broken disk: clients (kube-apiserver's etcd3 store among them) back off
    # on etcd's "too many requests", which the engine answers for the store's Throttled.
    assert seen["429 storm"], "a 3 s 429 storm reached no client: the store queues instead of pushing back"
    throttled = [f for f in seen["429 storm"]
                 if (f.code, f.details) != ("RESOURCE_EXHAUSTED", "etcdserver: too many requests")]
    assert not throttled, f"a 429 storm must answer 'too many requests', got {describe(throttled)}"
    assert len(load.acks) > 10 * WRITERS
    check_acks(server.endpoint, prefix, load.acks)
    # Durable, not only in memory: the same after a kill -9 and a restart on the same container.
    server.kill()
    server = server_factory("fastetcd", "node", cosmos=target)
    check_acks(server.endpoint, prefix, load.acks)
    head, events = history(server.endpoint, 2)
    revs = [e.kv.mod_revision for e in events]
    assert revs == list(range(2, head + 1)), "revisions after the faults have gaps or repeats"
    twice = [k for k, n in Counter(e.kv.key for e in events).items() if n > 1]
    assert not twice, f"writes applied twice: {twice[:5]}"


# ----------------------------------------------------------------------------------------------------
# 4. a value bigger than a Cosmos item


def test_value_of_1_5_mib_round_trips(server_factory: ServerFactory, target: CosmosTarget) -> None:
    value = os.urandom(3 * 1024 * 1024 // 2)  # random: neither compression nor base64 brings it under 2 MB
    args = ["--max-request-bytes", str(4 * 1024 * 1024)]
    server = server_factory("fastetcd", "big", args, cosmos=target)
    rev = put(server.endpoint, b"big", value).header.revision
    put(server.endpoint, b"small", b"after")
    kv = range_prefix(server.endpoint, b"big").kvs
    assert len(kv) == 1 and kv[0].value == value and kv[0].mod_revision == rev
    server.kill()
    server = server_factory("fastetcd", "big", args, cosmos=target)
    kvs = {kv.key: kv for kv in range_prefix(server.endpoint, b"big").kvs}
    assert kvs[b"big"].value == value and kvs[b"big"].mod_revision == rev
    assert range_prefix(server.endpoint, b"small").kvs[0].value == b"after"


def test_harness_maps_data_dirs_to_containers(tmp_path) -> None:
    """A restart on the same data dir must find the same container, a new dir a fresh one."""
    from fastetcd.testing import cosmos_container_for

    a, b = tmp_path / "a", tmp_path / "b"
    assert cosmos_container_for(a) == cosmos_container_for(tmp_path / "x" / ".." / "a")
    assert cosmos_container_for(a) != cosmos_container_for(b)
    assert not re.search(r"[/\\?#]", cosmos_container_for(tmp_path / "we?ird#name"))
    assert len(cosmos_container_for(tmp_path / ("n" * 300))) <= 255
