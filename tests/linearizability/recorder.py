"""Record a history: concurrent clients doing a random mix of KV operations on a small key set.

Every client is a thread with a gRPC channel (and connection) of its own to one of the endpoints
(round-robin), doing one operation at a time: Put (a value unique to the operation, so a read names the
write it saw), Range of one key (linearizable, or serializable), Range of the whole key set, DeleteRange,
and Txn compare-and-swap on the key's mod_revision or value (then Put, else Range), comparing with what
the client last saw of the key so that some swaps succeed and some fail.

A few keys and many clients, so operations on one key overlap all the time: that is what makes a stale
read or a lost write visible. An error or a timeout is an unknown outcome; after one, a client only reads
(and backs off) until the server answers again, so an outage leaves at most one unknown write per client
(each one is a branch the checker has to explore; failed reads cost nothing, the checker drops them).

    with Recorder([server.endpoint], clients=12) as rec:
        time.sleep(3)
    rec.history.dump(path)
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any

import grpc

from fastetcd.proto import kv_pb2, rpc_pb2, rpc_pb2_grpc
from fastetcd.testing import channel, kv_stub, prefix_end, watch_stub

from .history import KV, History, Op, Output

# (kind, serializable, weight): writes and linearizable reads about even, so reads see fresh writes.
DEFAULT_MIX: tuple[tuple[str, bool, int], ...] = (
    ("put", False, 22),
    ("range", False, 24),
    ("range", True, 8),
    ("range_all", False, 5),
    ("range_all", True, 2),
    ("delete", False, 8),
    ("cas_mod", False, 20),
    ("cas_value", False, 11),
)

# Each client its own TCP connection (grpcio otherwise shares one subchannel between channels to one
# target), and a quick reconnect once a restarted server listens again (grpc's default backoff starts
# at 1 s and grows to 2 min).
CLIENT_CHANNEL_OPTIONS: list[tuple[str, object]] = [
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 300),
]


def _kv(kv: kv_pb2.KeyValue) -> KV:
    return KV(kv.key.decode(), kv.value.decode(), kv.create_revision, kv.mod_revision, kv.version)


class Recorder:
    """Clients recording into one :class:`History` while the ``with`` block runs.

    Entering reads the key set's initial state (no client runs yet, so it is exact) and starts the
    clients; leaving stops them, waits for their last operations, and appends one final linearizable
    Range of the whole key set (retried until the server answers), so a write lost at the very end is
    caught too.
    """

    def __init__(self, endpoints: Sequence[str], *, clients: int = 12, keys: int = 4, prefix: str = "/lin/",
                 seed: int = 0, rpc_timeout: float = 5.0, backoff: float = 0.05,
                 mix: Sequence[tuple[str, bool, int]] = DEFAULT_MIX,
                 short_deadline: float | None = None, short_deadline_share: float = 0.0,
                 resolve_by_watch: bool = False) -> None:
        if not endpoints:
            raise ValueError("no endpoints")
        self.endpoints = list(endpoints)
        self.clients = clients
        self.prefix = prefix
        self.keys = [f"{prefix}k{i}" for i in range(keys)]
        self.seed = seed
        self.rpc_timeout = rpc_timeout
        self.backoff = backoff
        self.mix = list(mix)
        # A share of the operations with a deadline so short that many expire while the server is still
        # working on them: timeouts whose writes may well have been applied (unknown outcomes for real).
        # Drawn from (0, short_deadline], so some expire mid-flight however fast the server is.
        self.short_deadline = short_deadline
        self.short_deadline_share = short_deadline_share if short_deadline else 0.0
        self.history = History(self.keys, 0)
        self._ids = itertools.count()  # next() on a count is atomic under the GIL
        self._ops: list[list[Op]] = [[] for _ in range(clients)]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._crashed: list[BaseException] = []
        # With resolve_by_watch, a watch of the prefix on the first endpoint records which values were
        # written at which revision; see _resolve_unknown_writes.
        self.resolve_by_watch = resolve_by_watch
        self._written: dict[str, int] = {}  # value -> revision of its PUT event
        self._watched_rev = 0  # every event up to this revision has been received
        self._watch_failed: BaseException | None = None
        self._watch_wake = threading.Event()
        self._watch_stop = threading.Event()
        self._watch_call: Any = None

    # ---------------------------------------------------------------------------------------------
    def __enter__(self) -> Recorder:
        rev, kvs = self._read_all_until_ok(self.endpoints[0], deadline_s=30.0)
        self.history.initial_revision, self.history.initial_kvs = rev, kvs
        if self.resolve_by_watch:
            t = threading.Thread(target=self._watch, args=(rev,), name="lin-watch", daemon=True)
            self._watch_thread = t
            t.start()
        for c in range(self.clients):
            t = threading.Thread(target=self._client, args=(c,), name=f"lin-client-{c}", daemon=True)
            self._threads.append(t)
            t.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self.rpc_timeout + 10)
        ops = [op for client_ops in self._ops for op in client_ops]
        if exc_type is None:
            final = self._final_read()
            ops.append(final)
            if self.resolve_by_watch and final.out is not None:
                ops = self._resolve_unknown_writes(ops, final.out.revision)
        self._watch_stop.set()
        if self._watch_call is not None:
            self._watch_call.cancel()
        ops.sort(key=lambda op: op.id)
        self.history.ops = ops
        if exc_type is None and any(t.is_alive() for t in self._threads):
            raise RuntimeError("a client thread did not stop")
        if exc_type is None and self._crashed:
            raise RuntimeError("a client thread crashed") from self._crashed[0]

    # ---------------------------------------------------------------------------------------------
    def _watch(self, after: int) -> None:
        p = self.prefix.encode()

        def requests() -> Iterator[rpc_pb2.WatchRequest]:
            yield rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(
                key=p, range_end=prefix_end(p), start_revision=after + 1))
            while not self._watch_stop.is_set():
                if self._watch_wake.wait(0.1):
                    self._watch_wake.clear()
                    yield rpc_pb2.WatchRequest(progress_request=rpc_pb2.WatchProgressRequest())

        try:
            with channel(self.endpoints[0], options=CLIENT_CHANNEL_OPTIONS) as ch:
                self._watch_call = call = watch_stub(ch).Watch(requests())
                for resp in call:
                    for ev in resp.events:
                        if ev.type == kv_pb2.Event.PUT:
                            self._written[ev.kv.value.decode()] = ev.kv.mod_revision
                    # A progress notification comes only once the watcher has sent everything up to its
                    # header revision (etcd's rule, and fastetcd's).
                    if not resp.events and not resp.created and not resp.canceled:
                        self._watched_rev = max(self._watched_rev, resp.header.revision)
        except grpc.RpcError as e:
            if not self._watch_stop.is_set():
                self._watch_failed = e

    def _resolve_unknown_writes(self, ops: list[Op], final_rev: int) -> list[Op]:
        """Settle unknown puts and swaps by the server's own account of what happened, as etcd's
        robustness tests do: values are unique, so a PUT event with a write's value says it took effect
        at that revision; a write whose value no event carries through the final read's revision took
        no effect (a swap whose compare failed writes nothing either) and leaves the history. Unknown
        deletes stay unknown (an event cannot name them). Without a complete watch nothing changes."""
        deadline = time.monotonic() + 15
        while self._watched_rev < final_rev and self._watch_failed is None and time.monotonic() < deadline:
            self._watch_wake.set()
            time.sleep(0.05)
        if self._watched_rev < final_rev:
            return ops
        end = time.monotonic_ns()
        kept = []
        for op in ops:
            if op.unknown and op.is_write and op.kind != "delete":
                rev = self._written.get(op.value)
                if rev is None:
                    continue
                op.ret, op.error = end, ""
                op.out = Output(rev, succeeded=op.kind != "put")
            kept.append(op)
        return kept

    def wait_for_write(self, since: float, timeout: float = 60.0) -> float:
        """Seconds from ``since`` (time.monotonic()) until some client's write invoked after it was
        acknowledged: how a fault test sees writes resume without a write of its own, which the history
        would lack (the checker needs every write that takes a revision)."""
        since_ns = int(since * 1e9)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # Lists only grow (appends are atomic under the GIL): a scan from the end finds new ones.
            done = [op.ret for ops in self._ops for op in reversed(ops[-50:])
                    if op.is_write and op.out is not None and op.call >= since_ns and op.ret is not None]
            if done:
                return (min(done) - since_ns) / 1e9
            time.sleep(0.02)
        raise AssertionError(f"no write was acknowledged within {timeout:.0f} s")

    # ---------------------------------------------------------------------------------------------
    def _read_all_until_ok(self, endpoint: str, deadline_s: float) -> tuple[int, list[KV]]:
        deadline = time.monotonic() + deadline_s
        with channel(endpoint) as ch:
            stub = kv_stub(ch)
            while True:
                try:
                    r = stub.Range(self._range_all_request(False), timeout=self.rpc_timeout)
                    return r.header.revision, [_kv(kv) for kv in r.kvs]
                except grpc.RpcError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)

    def _final_read(self) -> Op:
        """A linearizable Range of everything after the clients stopped, retried for a while (after a
        restart the server may still be coming up); recorded like any other operation."""
        op = Op(next(self._ids), self.clients, self.endpoints[0], "range_all")
        deadline = time.monotonic() + 30.0
        with channel(op.endpoint, options=CLIENT_CHANNEL_OPTIONS) as ch:
            stub = kv_stub(ch)
            while True:
                op.call = time.monotonic_ns()
                try:
                    r = stub.Range(self._range_all_request(False), timeout=self.rpc_timeout)
                except grpc.RpcError as e:
                    if time.monotonic() > deadline:
                        op.error = f"{e.code().name}: {e.details()}"
                        return op
                    time.sleep(0.1)
                    continue
                op.ret = time.monotonic_ns()
                op.out = Output(r.header.revision, kvs=[_kv(kv) for kv in r.kvs])
                return op

    def _range_all_request(self, serializable: bool) -> rpc_pb2.RangeRequest:
        p = self.prefix.encode()
        return rpc_pb2.RangeRequest(key=p, range_end=prefix_end(p), serializable=serializable)

    # ---------------------------------------------------------------------------------------------
    def _client(self, c: int) -> None:
        try:
            self._run_client(c)
        except BaseException as e:  # recorded and re-raised by __exit__: a bug here must fail the test
            self._crashed.append(e)

    def _run_client(self, c: int) -> None:
        rng = random.Random(self.seed * 1_000_003 + c)
        endpoint = self.endpoints[c % len(self.endpoints)]
        kinds = [(k, s) for k, s, _ in self.mix]
        weights = [w for _, _, w in self.mix]
        read_kinds = [(k, s, w) for k, s, w in self.mix if k in ("range", "range_all")]
        # What this client last saw of each key: (value, mod_revision), or None when absent / not seen.
        seen: dict[str, tuple[str, int] | None] = {}
        out = self._ops[c]
        reads_only = False
        seq = 0
        with channel(endpoint, options=CLIENT_CHANNEL_OPTIONS) as ch:
            stub = kv_stub(ch)
            while not self._stop.is_set():
                if reads_only:
                    kind, serializable = rng.choices([(k, s) for k, s, _ in read_kinds],
                                                     [w for _, _, w in read_kinds])[0]
                else:
                    kind, serializable = rng.choices(kinds, weights)[0]
                key = rng.choice(self.keys)
                seq += 1
                op = Op(next(self._ids), c, endpoint, kind, "" if kind == "range_all" else key,
                        serializable=serializable)
                if op.is_write and kind != "delete":
                    op.value = f"c{c}-{seq}"
                last = seen.get(key)
                if kind == "cas_mod":
                    op.expect_mod = last[1] if last else 0
                elif kind == "cas_value":
                    op.expect_value = last[0] if last else f"c{c}-never"
                timeout = self.rpc_timeout
                if self.short_deadline and rng.random() < self.short_deadline_share:
                    timeout = rng.uniform(self.short_deadline / 20, self.short_deadline)
                op.call = time.monotonic_ns()
                try:
                    op.out = self._invoke(stub, op, timeout)
                    op.ret = time.monotonic_ns()
                except grpc.RpcError as e:
                    op.error = f"{e.code().name}: {e.details()}"
                out.append(op)
                if op.out is None:
                    reads_only = True
                    self._stop.wait(self.backoff)
                    continue
                reads_only = False
                self._remember(op, seen)

    def _invoke(self, kv: rpc_pb2_grpc.KVStub, op: Op, t: float) -> Output:
        key = op.key.encode()
        if op.kind == "put":
            r = kv.Put(rpc_pb2.PutRequest(key=key, value=op.value.encode()), timeout=t)
            return Output(r.header.revision)
        if op.kind == "range":
            r = kv.Range(rpc_pb2.RangeRequest(key=key, serializable=op.serializable), timeout=t)
            return Output(r.header.revision, kvs=[_kv(x) for x in r.kvs])
        if op.kind == "range_all":
            r = kv.Range(self._range_all_request(op.serializable), timeout=t)
            return Output(r.header.revision, kvs=[_kv(x) for x in r.kvs])
        if op.kind == "delete":
            r = kv.DeleteRange(rpc_pb2.DeleteRangeRequest(key=key), timeout=t)
            return Output(r.header.revision, deleted=r.deleted)
        if op.kind == "cas_mod":
            cmp = rpc_pb2.Compare(key=key, target=rpc_pb2.Compare.MOD, result=rpc_pb2.Compare.EQUAL,
                                  mod_revision=op.expect_mod)
        else:
            cmp = rpc_pb2.Compare(key=key, target=rpc_pb2.Compare.VALUE, result=rpc_pb2.Compare.EQUAL,
                                  value=op.expect_value.encode())
        txn = rpc_pb2.TxnRequest(
            compare=[cmp],
            success=[rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=key, value=op.value.encode()))],
            failure=[rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=key))],
        )
        r = kv.Txn(txn, timeout=t)
        kvs = [] if r.succeeded else [_kv(x) for x in r.responses[0].response_range.kvs]
        return Output(r.header.revision, succeeded=r.succeeded, kvs=kvs)

    def _remember(self, op: Op, seen: dict[str, tuple[str, int] | None]) -> None:
        """Update what this client last saw of the keys op touched (for its next compare-and-swaps)."""
        assert op.out is not None
        if op.kind == "put" or (op.kind.startswith("cas_") and op.out.succeeded):
            seen[op.key] = (op.value, op.out.revision)
            return
        if op.kind == "delete":
            seen[op.key] = None
            return
        for key in self.keys if op.kind == "range_all" else [op.key]:
            seen[key] = None
        for kv in op.out.kvs:
            seen[kv.key] = (kv.value, kv.mod)
