"""A watch stream whose client stops reading must neither hold back other watchers nor make the server
buffer without bound, and once it reads again it must get every event, in order, once.

Two watchers on one prefix, each on its own TCP connection: a fast one that reads continuously and a slow
one that reads only its `created` response and then nothing until all EVENTS puts are done and SLOW_STALL_S
more seconds have passed. The slow channel has HTTP/2 BDP probing off, so its flow-control window stays at
gRPC's 64 KiB default and the backlog (EVENTS × VALUE_SIZE ≈ 20 MiB) has to stay on the server's side.
Meanwhile the server's VmRSS is sampled from /proc.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc

from fastetcd.proto import kv_pb2, rpc_pb2, rpc_pb2_grpc
from fastetcd.testing import UNLIMITED_CHANNEL_OPTIONS, ServerProcess, kv_stub, process_memory

EVENTS = 10_000
VALUE_SIZE = 2048
WRITERS = 4
PREFIX = b"slowwatch/"
PREFIX_END = b"slowwatch0"

# Server RSS may grow by at most this much between "watchers created" and the end of the stall. It
# includes the history the server keeps of the EVENTS puts themselves (≈ 20 MiB of values), not only
# what it holds back for the slow watcher.
RSS_GROWTH_BOUND_MIB = 150
# Every event must reach the fast watcher within this long of its put being acknowledged.
FAST_WATCHER_MAX_LAG_S = 2.0
# How long the slow watcher keeps not reading after the last put was acknowledged.
SLOW_STALL_S = 3.0
# Upper bounds, so that a hung server fails the test instead of hanging it.
PUT_PHASE_TIMEOUT_S = 40.0
DRAIN_TIMEOUT_S = 20.0
RSS_SAMPLE_INTERVAL_S = 0.05


def _vm_rss_kib(pid: int) -> int:
    return process_memory(pid) // 1024


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.samples: list[int] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.samples.append(_vm_rss_kib(self.pid))
            except (OSError, RuntimeError):
                return  # the server died; the test notices through its RPCs
            self.stop.wait(RSS_SAMPLE_INTERVAL_S)


@dataclass
class WatchLog:
    """What one watcher saw: (mod_revision, event type, key, receipt time) per event."""

    events: list[tuple[int, int, bytes, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    created: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)


def _requests(create: rpc_pb2.WatchRequest, close: threading.Event) -> Iterator[rpc_pb2.WatchRequest]:
    yield create
    # Keep the send side open: a half-closed stream would be a different situation than a slow reader.
    close.wait()


def _watch_reader(responses: Iterator[rpc_pb2.WatchResponse], log: WatchLog, expected: int,
                  resume: threading.Event | None) -> None:
    """Consume one watch stream until `expected` events arrived. With `resume`, stop reading right after
    the `created` response until resume is set: gRPC flow control then pushes back on the server."""
    try:
        for resp in responses:
            if resp.created:
                log.created.set()
                if resume is not None:
                    resume.wait()
                continue
            if resp.canceled or resp.compact_revision:
                log.errors.append(f"watch canceled: {resp.cancel_reason!r} compact {resp.compact_revision}")
                return
            now = time.monotonic()
            for ev in resp.events:
                log.events.append((ev.kv.mod_revision, ev.type, ev.kv.key, now))
            if len(log.events) >= expected:
                return
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.CANCELLED:
            log.errors.append(f"{e.code().name}: {e.details()}")
    finally:
        log.done.set()


def _writer(endpoint: str, seqs: range, acks: dict[int, tuple[bytes, float]], errors: list[str]) -> None:
    value = os.urandom(VALUE_SIZE // 2).hex().encode()
    with grpc.insecure_channel(endpoint, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        stub = kv_stub(channel)
        for i in seqs:
            key = PREFIX + f"{i:06d}".encode()
            try:
                resp = stub.Put(rpc_pb2.PutRequest(key=key, value=value), timeout=30)
            except grpc.RpcError as e:
                errors.append(f"put {key!r}: {e.code().name}: {e.details()}")
                return
            acks[resp.header.revision] = (key, time.monotonic())


def _check_stream(name: str, log: WatchLog, acks: dict[int, tuple[bytes, float]]) -> None:
    assert not log.errors, f"{name} watcher failed: {log.errors}"
    revs = [rev for rev, _, _, _ in log.events]
    expected = sorted(acks)
    if revs != expected:
        missing = sorted(set(expected) - set(revs))
        dups = len(revs) - len(set(revs))
        out_of_order = sum(1 for a, b in zip(revs, revs[1:], strict=False) if b <= a)
        raise AssertionError(
            f"{name} watcher: {len(revs)} events for {len(expected)} puts; missing {len(missing)} "
            f"(first {missing[:5]}), {dups} duplicates, {out_of_order} out of order"
        )
    wrong = [(rev, typ, key) for rev, typ, key, _ in log.events
             if typ != kv_pb2.Event.PUT or key != acks[rev][0]]
    assert not wrong, f"{name} watcher: events that do not match their put: {wrong[:5]}"


def test_slow_watcher_blocks_no_one_and_stays_bounded(subject_server: ServerProcess) -> None:
    server = subject_server
    endpoint = server.endpoint
    with grpc.insecure_channel(endpoint) as channel:
        head = kv_stub(channel).Range(rpc_pb2.RangeRequest(key=b"x"), timeout=10).header.revision
    create = rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(
        key=PREFIX, range_end=PREFIX_END, start_revision=head + 1))

    # A local subchannel pool gives each channel its own TCP connection (by default equal channels share one).
    fast_channel = grpc.insecure_channel(
        endpoint, options=[*UNLIMITED_CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)])
    slow_channel = grpc.insecure_channel(
        endpoint, options=[*UNLIMITED_CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1),
                           ("grpc.http2.bdp_probe", 0)])
    close = threading.Event()
    resume = threading.Event()
    fast, slow = WatchLog(), WatchLog()
    fast_responses = rpc_pb2_grpc.WatchStub(fast_channel).Watch(_requests(create, close))
    slow_responses = rpc_pb2_grpc.WatchStub(slow_channel).Watch(_requests(create, close))
    readers = [
        threading.Thread(target=_watch_reader, args=(fast_responses, fast, EVENTS, None), daemon=True),
        threading.Thread(target=_watch_reader, args=(slow_responses, slow, EVENTS, resume), daemon=True),
    ]
    sampler = RssSampler(server.proc.pid)
    try:
        for t in readers:
            t.start()
        assert fast.created.wait(10) and slow.created.wait(10), "watch streams not created"
        rss_before = _vm_rss_kib(server.proc.pid)
        sampler.start()

        acks: dict[int, tuple[bytes, float]] = {}
        put_errors: list[str] = []
        per = EVENTS // WRITERS
        writers = [threading.Thread(target=_writer, args=(endpoint, range(w * per, (w + 1) * per), acks,
                                                            put_errors), daemon=True)
                   for w in range(WRITERS)]
        t_puts = time.monotonic()
        for t in writers:
            t.start()
        for t in writers:
            t.join(timeout=max(0.0, PUT_PHASE_TIMEOUT_S - (time.monotonic() - t_puts)))
        put_seconds = time.monotonic() - t_puts
        assert not any(t.is_alive() for t in writers), f"{EVENTS} puts not done in {PUT_PHASE_TIMEOUT_S}s"
        assert not put_errors, f"puts failed while a watcher was stalled: {put_errors[:3]}"
        assert len(acks) == EVENTS and sorted(acks) == list(range(head + 1, head + EVENTS + 1))

        # The fast watcher must be done (or nearly) while the slow one still reads nothing.
        fast.done.wait(FAST_WATCHER_MAX_LAG_S + 1.0)
        time.sleep(max(0.0, SLOW_STALL_S - (time.monotonic() - t_puts - put_seconds)))
        assert not slow.events, "the slow watcher read events during its stall"
        sampler.stop.set()
        sampler.join()
        rss_peak = max([rss_before, *sampler.samples])
        growth_mib = (rss_peak - rss_before) / 1024

        resume.set()
        slow.done.wait(DRAIN_TIMEOUT_S)
        fast.done.wait(DRAIN_TIMEOUT_S)
    finally:
        sampler.stop.set()
        close.set()
        fast_responses.cancel()
        slow_responses.cancel()
        for t in readers:
            t.join(timeout=10)
        fast_channel.close()
        slow_channel.close()

    lags = [t - acks[rev][1] for rev, _, _, t in fast.events if rev in acks]
    if lags:
        ordered = sorted(lags)
        p50, p99, worst = (ordered[int(q * (len(ordered) - 1))] * 1e3 for q in (0.5, 0.99, 1.0))
        lag_text = f"median {p50:.1f} ms, p99 {p99:.1f} ms, max {worst:.1f} ms"
    else:
        lag_text = "no events"
    print(
        f"\n[{server.kind}] {EVENTS} puts of {VALUE_SIZE} B in {put_seconds:.1f}s; fast watcher lag "
        f"{lag_text}; server VmRSS {rss_before / 1024:.1f} MiB before, peak {rss_peak / 1024:.1f} MiB "
        f"during (growth {growth_mib:.1f} MiB, bound {RSS_GROWTH_BOUND_MIB})"
    )

    _check_stream("fast", fast, acks)
    late = [(rev, lag) for (rev, _, _, _), lag in zip(fast.events, lags, strict=True)
            if lag > FAST_WATCHER_MAX_LAG_S]
    assert not late, (
        f"{len(late)} events reached the fast watcher more than {FAST_WATCHER_MAX_LAG_S}s after their put "
        f"was acknowledged (worst {max(lag for _, lag in late):.2f}s): the slow watcher held it back"
    )
    assert growth_mib <= RSS_GROWTH_BOUND_MIB, (
        f"server RSS grew by {growth_mib:.1f} MiB while a watcher did not read (bound {RSS_GROWTH_BOUND_MIB})"
    )
    _check_stream("slow", slow, acks)
    assert server.alive()
