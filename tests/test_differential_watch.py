"""Differential test of Watch and Lease: seeded random workloads (the KV generator of kv_differential.py
plus watches and leases) sent over gRPC to a fresh fastetcd and a fresh real etcd 3.5.1.

Watches: identical WatchCreateRequests on both servers (single keys, prefixes, "\\0" range ends, empty
ranges, start revisions now / in the past / compacted / in the future / negative after a compaction,
NOPUT / NODELETE filters, prev_kv, explicit and duplicate watch ids), over several streams per server.
Compared per watch: the created response, the FLATTENED events (how events are grouped into responses may
legitimately differ), and every other response (cancel, compaction, progress) in order. An "all keys"
watch on its own stream records the whole event history of each server.

Events arrive asynchronously while the workload goes on. Before anything whose answer depends on what has
been delivered (a compaction, which changes what prev_kv lookups and replays see; a cancel, which drops
undelivered events; a WatchProgressRequest; the final comparison) the test waits at a barrier: until every
watch on both servers has the number of events etcd's history says it must have. The expected counts come
from the oracle's "all keys" watch; an oracle that misses its own expected count fails the test as a
harness bug, so the model behind the barrier is itself checked against etcd.

Leases: LeaseGrant with explicit ids (server-chosen ids would differ) and TTLs long enough that nothing
expires during a run, puts with leases (also inside Txns), LeaseRevoke (its key deletions show up in the
watches), LeaseTimeToLive (keys compared sorted: etcd lists them in Go map order; TTL within a tolerance),
LeaseLeases (ids compared sorted), one-shot LeaseKeepAlive.

Reproduce a failing seed: `pytest tests/test_differential_watch.py --diff-seed-start 3 --watch-diff-seeds 1`.
"""

from __future__ import annotations

import difflib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import pytest
from google.protobuf import text_format
from google.protobuf.message import Message
from kv_differential import (
    PREFIXES,
    Generator,
    Model,
    Outcome,
    TxnScope,
    covers,
    describe,
    outcome_of,
    parametrize_seeds,
    zero_header_ids,
)
from watch_streams import WatchLog, WatchResponse, WatchStream, attribute

from fastetcd.proto import kv_pb2, rpc_pb2, rpc_pb2_grpc
from fastetcd.testing import channel, prefix_end

NOPUT = rpc_pb2.WatchCreateRequest.NOPUT
NODELETE = rpc_pb2.WatchCreateRequest.NODELETE

# Explicit lease ids: both servers must hand out the same id. 1 and 7587861234567890 are also the ids the
# KV generator puts "unknown" leases on, so those puts succeed once the lease exists.
LEASE_IDS = [1, 2, 3, 7587861234567890, 2**62, -5, 2**63 - 1]
TTL_TOLERANCE_S = 2
STREAMS = 2  # random watches per server are spread over this many streams (watch ids are per stream)
BARRIER_TIMEOUT_S = 10.0
# etcd moves a watch that replays history to its live set on a 100 ms tick; until then a compaction past
# its start revision cancels it, and a watch with nothing to replay gives no sign of having moved.
SYNC_GRACE_S = 1.0
# The "all keys" watch: key "\0" with range_end "\0" is every key (the empty key cannot be written).
ALL_KEYS = rpc_pb2.WatchCreateRequest(key=b"\x00", range_end=b"\x00", prev_kv=True)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    parametrize_seeds(metafunc, "watch_seed", "--watch-diff-seeds")


# -- what etcd does with a WatchCreateRequest ------------------------------------------------------

def effective_range(key: bytes, range_end: bytes) -> tuple[bytes, bytes | None]:
    """etcd's recvLoop: an empty key is "\\0"; an empty range_end is a single key (None here); "\\0" means
    every key >= key (b"" here)."""
    key = key or b"\x00"
    if not range_end:
        return key, None
    if range_end == b"\x00":
        return key, b""
    return key, range_end


def watch_matches(req: rpc_pb2.WatchCreateRequest, event: kv_pb2.Event) -> bool:
    key, end = effective_range(req.key, req.range_end)
    if end is None:
        hit = event.kv.key == key
    else:
        hit = covers(key, end or b"\x00", event.kv.key)
    if not hit:
        return False
    if NOPUT in req.filters and event.type == kv_pb2.Event.PUT:
        return False
    return not (NODELETE in req.filters and event.type == kv_pb2.Event.DELETE)


def range_is_empty(req: rpc_pb2.WatchCreateRequest) -> bool:
    """mvcc's "watcher range is empty": a real range_end not above the key."""
    key, end = effective_range(req.key, req.range_end)
    return bool(end) and key >= end  # type: ignore[operator]


@dataclass
class WatchSpec:
    stream: int
    req: rpc_pb2.WatchCreateRequest
    created_rev: int = 0  # the oracle's header revision in the created response
    error: bool = False  # created and canceled at once (empty range, duplicate id)
    compacted: bool = False  # must end with a compaction response instead of events
    canceled_at: int | None = None  # revision when a cancel was acknowledged
    ids: tuple[int, int] = (0, 0)  # watch id on (subject, oracle)
    compact_main: int = -1  # the oracle's compaction revision when the watch was created
    created_at: float = 0.0  # time.monotonic() when both servers had created it

    @property
    def first_rev(self) -> int:
        start = self.req.start_revision
        return start if start > 0 else self.created_rev + 1

    def expected_events(self, history: list[kv_pb2.Event]) -> int:
        if self.error or self.compacted:
            return 0
        last = self.canceled_at if self.canceled_at is not None else float("inf")
        events = [e for e in history
                  if self.first_rev <= e.kv.mod_revision <= last and watch_matches(self.req, e)]
        if self.first_rev == self.compact_main:
            # A replay from the compaction revision itself sees only what compaction kept there: per key
            # its last write of that revision, unless that is a deletion.
            at = [e for e in events if e.kv.mod_revision == self.compact_main]
            last_of_key = {e.kv.key: e for e in at}
            rest = [e for e in events if e.kv.mod_revision != self.compact_main]
            kept = [e for e in at if last_of_key[e.kv.key] is e and e.type == kv_pb2.Event.PUT]
            return len(kept) + len(rest)
        return len(events)


# -- the generator ---------------------------------------------------------------------------------

class WatchGenerator(Generator):
    """The KV generator plus watch and lease operations. Needs to know of the oracle's compaction state
    (compact_main, -1 before the first successful Compact) and of granted leases."""

    def __init__(self, rng: random.Random, model: Model) -> None:
        super().__init__(rng, model)
        self.compact_main = -1
        self.granted: set[int] = set()
        self.live_watches: list[WatchSpec] = []

    def lease_id(self) -> int:
        if self.granted and self.rng.random() < 0.8:
            return self.rng.choice(sorted(self.granted))
        return self.rng.choice(LEASE_IDS)

    def put_req(self, scope: TxnScope | None = None) -> rpc_pb2.PutRequest | None:
        req = super().put_req(scope)
        if req is not None and self.rng.random() < 0.2:
            req.lease = self.lease_id()
        return req

    def compact_req(self) -> rpc_pb2.CompactionRequest:
        req = super().compact_req()
        # What a replay from the compaction revision returns depends on whether etcd's background
        # compaction has finished yet; physical compactions answer only after it has.
        req.physical = True
        return req

    def start_revision(self) -> int:
        rng, m, c = self.rng, self.model, self.compact_main
        r = rng.random()
        if r < 0.4:
            return 0
        if r < 0.7:
            return rng.randint(max(1, c), m.rev)
        if r < 0.82 and c > 1:
            return rng.randint(1, c - 1)
        if r < 0.94:
            return m.rev + rng.randint(1, 4)
        if c >= 0:
            # Before any compaction etcd 3.5.1 parks such a watch until its next sync tick and then starts
            # it "now": timing-dependent, so only after one.
            return -rng.randint(1, 3)
        return 0

    def watch_req(self) -> rpc_pb2.WatchCreateRequest:
        rng = self.rng
        r = rng.random()
        if r < 0.05:
            key, end = b"", rng.choice([b"", b"\x00"])
        elif r < 0.15:
            p = rng.choice(PREFIXES)
            key, end = p, prefix_end(p)
        else:
            key, end = self.key_range()
        req = rpc_pb2.WatchCreateRequest(key=key, range_end=end, start_revision=self.start_revision())
        req.prev_kv = rng.random() < 0.4
        f = rng.random()
        if f < 0.12:
            req.filters.append(NOPUT)
        elif f < 0.24:
            req.filters.append(NODELETE)
        elif f < 0.27:
            req.filters.extend([NOPUT, NODELETE])
        elif f < 0.29:
            req.filters.append(2)  # unknown filter: ignored by etcd
        req.progress_notify = rng.random() < 0.1
        req.fragment = rng.random() < 0.05
        if rng.random() < 0.12:
            req.watch_id = rng.randint(1, 8)  # may collide with an auto-assigned or explicit id
        return req

    def next_op(self) -> tuple[str, object]:
        rng = self.rng
        r = rng.random()
        if r < 0.05:
            return "Watch", WatchSpec(stream=rng.randrange(STREAMS), req=self.watch_req())
        if r < 0.065:
            if self.live_watches and rng.random() < 0.85:
                return "CancelWatch", rng.choice(self.live_watches)
            return "CancelUnknown", (rng.randrange(STREAMS), rng.choice([-1, 57, 1000]))
        if r < 0.072:
            return "Progress", rng.randrange(STREAMS)
        if r < 0.102:
            ttl = rng.choice([300, 600, 3600, 3600, 9_000_000_000, 9_000_000_001])
            return "LeaseGrant", rpc_pb2.LeaseGrantRequest(ID=self.lease_id(), TTL=ttl)
        if r < 0.117:
            return "LeaseRevoke", rpc_pb2.LeaseRevokeRequest(ID=self.lease_id())
        if r < 0.137:
            return "LeaseTimeToLive", rpc_pb2.LeaseTimeToLiveRequest(ID=self.lease_id(),
                                                                     keys=rng.random() < 0.7)
        if r < 0.147:
            return "LeaseLeases", rpc_pb2.LeaseLeasesRequest()
        if r < 0.157:
            return "LeaseKeepAlive", rpc_pb2.LeaseKeepAliveRequest(ID=self.lease_id())
        return super().next_op()


class ScriptedOps(WatchGenerator):
    """Fixed operations through the same machinery (barriers, comparison) as the random ones."""

    def __init__(self, model: Model, script: list[tuple[str, object]]) -> None:
        super().__init__(random.Random(0), model)
        self.script = list(script)

    def next_op(self) -> tuple[str, object]:
        return self.script.pop(0)


# -- one server ------------------------------------------------------------------------------------

class Side:
    """One server's connection: unary stubs, the "all keys" stream and the random watches' streams."""

    def __init__(self, name: str, endpoint: str) -> None:
        self.name = name
        self.channel = channel(endpoint)  # TLS under --tls
        self.kv = rpc_pb2_grpc.KVStub(self.channel)
        self.lease = rpc_pb2_grpc.LeaseStub(self.channel)
        self.all_keys = WatchStream(self.channel)
        self.streams = [WatchStream(self.channel) for _ in range(STREAMS)]
        self.creates = [0] * STREAMS

    def unary(self, method: str) -> Callable[..., grpc.Future]:
        stub = self.lease if method.startswith("Lease") else self.kv
        return getattr(stub, method).future

    def keep_alive(self, req: rpc_pb2.LeaseKeepAliveRequest) -> Outcome:
        call = self.lease.LeaseKeepAlive(iter([req]), timeout=10)
        try:
            resp = next(call)
        except grpc.RpcError as e:
            return Outcome(code=e.code().name, details=e.details() or "")
        except StopIteration:
            return Outcome(code="NO_RESPONSE", details="stream ended without a response")
        finally:
            call.cancel()
        zero_header_ids(resp)
        return Outcome(ok=resp)

    def history(self) -> list[kv_pb2.Event]:
        logs, _ = attribute(self.all_keys.responses())
        return logs[0].events if logs else []

    def close(self) -> None:
        for s in [self.all_keys, *self.streams]:
            s.close()
        self.channel.close()


def normalize_lease(method: str, got: Outcome, want: Outcome) -> str:
    """Make timing-dependent parts comparable in place; returns a complaint if they are out of tolerance."""
    if got.ok is None or want.ok is None:
        return ""
    if method == "LeaseLeases":
        for o in (got, want):
            ids = sorted(lease.ID for lease in o.ok.leases)  # etcd orders by expiry time
            del o.ok.leases[:]
            o.ok.leases.extend(rpc_pb2.LeaseStatus(ID=i) for i in ids)
    if method == "LeaseTimeToLive":
        for o in (got, want):
            keys = sorted(o.ok.keys)  # etcd lists a lease's keys in Go map order
            del o.ok.keys[:]
            o.ok.keys.extend(keys)
        g, w = got.ok, want.ok
        if g.TTL == -1 or w.TTL == -1:
            return ""  # unknown lease: compared exactly
        problem = ""
        if abs(g.TTL - w.TTL) > TTL_TOLERANCE_S or not 0 <= g.TTL <= g.grantedTTL:
            problem = (f"remaining TTL {g.TTL} (granted {g.grantedTTL})"
                       f" vs etcd's {w.TTL} (granted {w.grantedTTL})")
        g.TTL = w.TTL = 0
        return problem
    return ""


# -- the run ---------------------------------------------------------------------------------------

class BarrierTimeout(Exception):
    pass


@dataclass
class Run:
    seed: int
    subject: Side
    oracle: Side
    gen: WatchGenerator
    model: Model
    specs: list[WatchSpec] = field(default_factory=list)
    history: list[str] = field(default_factory=list)
    progress_asked: list[int] = field(default_factory=lambda: [0] * STREAMS)
    succeeded: int = 0

    @property
    def sides(self) -> tuple[Side, Side]:
        return self.subject, self.oracle

    def fail(self, index: int, what: str) -> None:
        recent = "\n".join(f"  {line}" for line in self.history[-10:])
        pytest.fail(
            f"seed {self.seed}, op #{index}: {what}\nprevious ops:\n{recent}\n"
            f"reproduce: pytest tests/test_differential_watch.py --diff-seed-start {self.seed}"
            f" --watch-diff-seeds 1 --watch-diff-ops {index + 1}",
            pytrace=False,
        )

    def note(self, index: int, text: str) -> None:
        self.history.append(f"#{index} {text[:300]}")

    # -- barrier -----------------------------------------------------------------------------------

    def barrier(self, before_compaction: bool = False) -> None:
        """Wait until every watch on both servers has received what the oracle's history says it must."""
        if before_compaction:
            self._settle_replays()
        rev = self.model.rev
        for side in self.sides:
            ok = side.all_keys.wait(
                lambda rs: rev <= 1 or any(e.kv.mod_revision >= rev for r in rs for e in r.events),
                BARRIER_TIMEOUT_S)
            if not ok:
                raise BarrierTimeout(f"{side.name}'s all-keys watch never reached revision {rev}")
        history = self.oracle.history()
        for side in self.sides:
            for s, stream in enumerate(side.streams):
                specs = [spec for spec in self.specs if spec.stream == s]

                def done(responses: list[WatchResponse], specs: list[WatchSpec] = specs, s: int = s) -> bool:
                    logs, stray = attribute(responses)
                    if len(logs) < len(specs):
                        return False
                    for spec, log in zip(specs, logs, strict=False):
                        if spec.compacted and not spec.error and not log.others:
                            return False
                        if len(log.events) < spec.expected_events(history):
                            return False
                    return sum(1 for r in stray if r.watch_id == -1) >= self.progress_asked[s]

                if not stream.wait(done, BARRIER_TIMEOUT_S):
                    raise BarrierTimeout(f"{side.name}'s watches on stream {s} did not receive the events"
                                         f" etcd's history implies by revision {rev}")

    def _settle_replays(self) -> None:
        """etcd delivers a replay and moves the watch to its live set in the same tick, so a watch that
        has received an event is live; one with nothing to replay gets SYNC_GRACE_S after its creation."""
        unsure = []
        for spec in self.specs:
            if spec.error or spec.compacted or not 0 < spec.req.start_revision <= spec.created_rev:
                continue
            if time.monotonic() >= spec.created_at + SYNC_GRACE_S:
                continue
            logs, _ = attribute(self.oracle.streams[spec.stream].responses())
            index = [x for x in self.specs if x.stream == spec.stream].index(spec)
            if index >= len(logs) or not logs[index].events:
                unsure.append(spec.created_at)
        if unsure:
            time.sleep(max(0.0, max(unsure) + SYNC_GRACE_S - time.monotonic()))

    # -- ops ---------------------------------------------------------------------------------------

    def unary(self, index: int, method: str, req: Message) -> None:
        if method == "LeaseKeepAlive":
            got, want = self.subject.keep_alive(req), self.oracle.keep_alive(req)
        else:
            fs = self.subject.unary(method)(req, timeout=30)
            fo = self.oracle.unary(method)(req, timeout=30)
            got, want = outcome_of(fs), outcome_of(fo)
        problem = normalize_lease(method, got, want)
        if got.key() != want.key() or problem:
            a, b = got.render(), want.render()
            diff = "".join(difflib.unified_diff(b.splitlines(True), a.splitlines(True), "etcd", "fastetcd"))
            self.fail(index, f"{method} differs {problem}\nrequest: {describe(method, req)}\n"
                             f"--- fastetcd ---\n{a}--- etcd ---\n{b}--- diff ---\n{diff}")
        if want.ok is None:
            return
        self.succeeded += 1
        header = getattr(want.ok, "header", None)
        if header is not None and header.revision:
            self.model.rev = max(self.model.rev, header.revision)
        if method == "Compact":
            self.model.compacted = req.revision
            self.gen.compact_main = req.revision
        elif method == "LeaseGrant":
            self.gen.granted.add(req.ID)
        elif method == "LeaseRevoke":
            self.gen.granted.discard(req.ID)

    def watch(self, index: int, spec: WatchSpec) -> None:
        for side in self.sides:
            side.streams[spec.stream].create(spec.req)
            side.creates[spec.stream] += 1
        created: list[WatchResponse] = []
        for side in self.sides:
            stream = side.streams[spec.stream]
            if not stream.wait_created(side.creates[spec.stream]):
                self.fail(index, f"{side.name} sent no created response to"
                                 f" {describe('Watch', spec.req)} (stream error: {stream.error})")
            logs, _ = attribute(stream.responses())
            created.append(logs[side.creates[spec.stream] - 1].created)
        s_created, o_created = created
        spec.created_rev = o_created.header.revision
        spec.error = o_created.canceled
        spec.ids = (s_created.watch_id, o_created.watch_id)
        start, c = spec.req.start_revision, self.gen.compact_main
        spec.compact_main = c
        spec.created_at = time.monotonic()
        spec.compacted = (0 < start < c) or (start < 0 <= c)
        # The oracle must agree with the model the barrier relies on.
        empty = range_is_empty(spec.req)
        if (empty and not spec.error) or (spec.error and not empty and spec.req.watch_id == 0):
            self.fail(index, f"harness: etcd's created response {o_created} for {spec.req} contradicts the"
                             " model of empty ranges")
        self.specs.append(spec)
        if not spec.error and not spec.compacted:
            self.gen.live_watches.append(spec)

    def cancel(self, index: int, spec: WatchSpec) -> None:
        self.barrier()
        self.gen.live_watches.remove(spec)
        def acks(rs: list[WatchResponse], wid: int) -> int:
            return sum(1 for r in rs if r.canceled and not r.created and r.watch_id == wid)

        before = [acks(side.streams[spec.stream].responses(), wid)
                  for side, wid in zip(self.sides, spec.ids, strict=True)]
        for side, wid in zip(self.sides, spec.ids, strict=True):
            side.streams[spec.stream].cancel(wid)
        for side, wid, n in zip(self.sides, spec.ids, before, strict=True):
            ok = side.streams[spec.stream].wait(lambda rs, wid=wid, n=n: acks(rs, wid) > n, BARRIER_TIMEOUT_S)
            if not ok:
                self.fail(index, f"{side.name} did not acknowledge the cancel of watch {wid}"
                                 f" ({describe('Watch', spec.req)})")
        spec.canceled_at = self.model.rev

    def progress(self, stream: int) -> None:
        self.barrier()
        for side in self.sides:
            side.streams[stream].request_progress()
        self.progress_asked[stream] += 1
        self.barrier()  # waits for the answers too

    # -- final comparison --------------------------------------------------------------------------

    def compare_watches(self) -> list[str]:
        problems: list[str] = []
        pairs = [(self.subject.all_keys, self.oracle.all_keys, [WatchSpec(-1, ALL_KEYS)])]
        for s in range(STREAMS):
            pairs.append((self.subject.streams[s], self.oracle.streams[s],
                          [spec for spec in self.specs if spec.stream == s]))
        for s_stream, o_stream, specs in pairs:
            s_logs, s_stray = attribute(s_stream.responses())
            o_logs, o_stray = attribute(o_stream.responses())
            for stream, name in ((s_stream, "fastetcd"), (o_stream, "etcd")):
                if stream.error is not None:
                    err = stream.error
                    problems.append(f"{name}'s watch stream failed: {err.code()} {err.details()}")
            for i, spec in enumerate(specs):
                if i >= len(s_logs) or i >= len(o_logs):
                    problems.append(f"watch {describe('Watch', spec.req)}: no created response"
                                    f" (fastetcd {len(s_logs)}, etcd {len(o_logs)} creates answered)")
                    continue
                problems.extend(_compare_log(spec, s_logs[i], o_logs[i]))
            if _keys(s_stray) != _keys(o_stray):
                problems.append("responses of no watch (e.g. progress) differ:\n"
                                + _diff(_render(o_stray), _render(s_stray)))
        return problems


def _keys(responses: list[WatchResponse]) -> list[bytes]:
    out = []
    for r in responses:
        c = WatchResponse()
        c.CopyFrom(r)
        zero_header_ids(c)
        out.append(c.SerializeToString(deterministic=True))
    return out


def _render(msgs: list[Message]) -> str:
    out = []
    for m in msgs:
        c = type(m)()
        c.CopyFrom(m)
        if isinstance(c, WatchResponse):
            zero_header_ids(c)
        out.append(text_format.MessageToString(c, as_one_line=True))
    return "\n".join(out) + "\n"


def _diff(want: str, got: str) -> str:
    return "".join(difflib.unified_diff(want.splitlines(True), got.splitlines(True), "etcd", "fastetcd", n=2))


def _compare_log(spec: WatchSpec, got: WatchLog, want: WatchLog) -> list[str]:
    problems: list[str] = []
    title = (f"watch {describe('Watch', spec.req)} (stream {spec.stream},"
             f" created at revision {spec.created_rev})")
    if _keys([got.created]) != _keys([want.created]):
        diff = _diff(_render([want.created]), _render([got.created]))
        problems.append(f"{title}: created response differs:\n{diff}")
    g = [e.SerializeToString(deterministic=True) for e in got.events]
    w = [e.SerializeToString(deterministic=True) for e in want.events]
    if g != w:
        first = next((i for i, (a, b) in enumerate(zip(g, w, strict=False)) if a != b), min(len(g), len(w)))
        lo = max(0, first - 2)
        problems.append(
            f"{title}: events differ from event #{first} (fastetcd {len(g)} events, etcd {len(w)}):\n"
            + _diff(_render(want.events[lo:first + 4]), _render(got.events[lo:first + 4])))
    if _keys(got.others) != _keys(want.others):
        problems.append(f"{title}: cancel/compaction/progress responses differ:\n"
                        + _diff(_render(want.others), _render(got.others)))
    for header_rev, max_event_rev in got.event_headers:
        if header_rev < max_event_rev:
            problems.append(f"{title}: fastetcd sent events up to revision {max_event_rev} under a header"
                            f" revision {header_rev}")
            break
    return problems


def run_watch_sequence(seed: int, n_ops: int, subject_ep: str, oracle_ep: str,
                       script: list[tuple[str, object]] | None = None) -> Run:
    """A seeded random sequence, or the given script (then seed only labels the run)."""
    model = Model()
    gen = WatchGenerator(random.Random(seed), model) if script is None else ScriptedOps(model, script)
    run = Run(seed, Side("fastetcd", subject_ep), Side("etcd", oracle_ep), gen, model)
    try:
        _drive(run, n_ops)
    finally:
        for side in run.sides:
            side.close()
    return run


def _drive(run: Run, n_ops: int) -> None:
    for side in run.sides:
        side.all_keys.create(ALL_KEYS)
        if not side.all_keys.wait_created(1):
            run.fail(0, f"{side.name} did not create the all-keys watch")
    index = 0
    try:
        for index in range(n_ops):
            op, arg = run.gen.next_op()
            if op == "Watch":
                run.watch(index, arg)  # type: ignore[arg-type]
                run.note(index, f"Watch stream {arg.stream} {describe('Watch', arg.req)}")  # type: ignore[attr-defined]
            elif op == "CancelWatch":
                run.cancel(index, arg)  # type: ignore[arg-type]
                run.note(index, f"Cancel {arg.ids} {describe('Watch', arg.req)}")  # type: ignore[attr-defined]
            elif op == "CancelUnknown":
                run.barrier()  # the id may be a compacted watch's, whose notice must come first
                stream, wid = arg  # type: ignore[misc]
                for side in run.sides:
                    side.streams[stream].cancel(wid)
                run.note(index, f"Cancel unknown id {wid} on stream {stream}")
            elif op == "Progress":
                run.progress(arg)  # type: ignore[arg-type]
                run.note(index, f"WatchProgressRequest on stream {arg}")
            else:
                if op == "Compact":
                    run.barrier(before_compaction=True)
                run.unary(index, op, arg)  # type: ignore[arg-type]
                run.note(index, describe(op, arg))  # type: ignore[arg-type]
        run.barrier()
    except BarrierTimeout as e:
        problems = run.compare_watches()
        shown = problems or ["(the watches received so far agree)"]
        run.fail(index, f"barrier: {e}\n\n" + "\n\n".join(shown))
    problems = run.compare_watches()
    if problems:
        shown = problems[:12]
        run.fail(index, f"{len(problems)} watch differences:\n\n" + "\n\n".join(shown))
    # Every lease and the whole key space, as a last look.
    for lease_id in LEASE_IDS:
        run.unary(n_ops, "LeaseTimeToLive", rpc_pb2.LeaseTimeToLiveRequest(ID=lease_id, keys=True))
    run.unary(n_ops, "LeaseLeases", rpc_pb2.LeaseLeasesRequest())
    run.unary(n_ops, "Range", rpc_pb2.RangeRequest(key=b"\x00", range_end=b"\x00"))


def test_watch_lease_differential(watch_seed: int, request: pytest.FixtureRequest, fastetcd_endpoint: str,
                                  etcd_endpoint: str) -> None:
    n_ops = request.config.getoption("--watch-diff-ops")
    started = time.monotonic()
    run = run_watch_sequence(watch_seed, n_ops, fastetcd_endpoint, etcd_endpoint)
    # Guards the generator: a run with few watches or few events compares little.
    events = len(run.oracle.history())
    assert len(run.specs) >= n_ops // 40, f"only {len(run.specs)} watches in {n_ops} ops"
    assert events >= n_ops // 4, f"only {events} events in {n_ops} ops"
    assert run.succeeded >= n_ops // 2, f"only {run.succeeded} of {n_ops} ops succeeded on etcd"
    print(f"seed {watch_seed}: {len(run.specs)} watches, {events} events, {time.monotonic() - started:.1f}s")


def _w(stream: int, **fields: object) -> WatchSpec:
    return WatchSpec(stream, rpc_pb2.WatchCreateRequest(**fields))


def _put(key: bytes, value: bytes = b"v", **fields: object) -> rpc_pb2.RequestOp:
    return rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=key, value=value, **fields))


def _del(key: bytes, range_end: bytes = b"", **fields: object) -> rpc_pb2.RequestOp:
    return rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=key, range_end=range_end,
                                                                              **fields))


def edge_case_script() -> list[tuple[str, object]]:
    """Corners that random sequences reach only now and then."""
    live_k = _w(0, key=b"k", prev_kv=True)
    txn = rpc_pb2.TxnRequest
    return [
        # Compact(0) before any write: a negative start revision then gets an empty notice (etcd: a
        # compaction notice for revision 0, which is not a cancel) and nothing after it.
        ("Compact", rpc_pb2.CompactionRequest(revision=0, physical=True)),
        ("Watch", _w(0, key=b"k", start_revision=-1)),
        ("Watch", live_k),
        ("Watch", _w(1, key=b"k", range_end=b"\x00", prev_kv=True)),
        ("Watch", _w(1, key=b"k", range_end=b"\x00", filters=[NOPUT])),
        ("Put", rpc_pb2.PutRequest(key=b"k", value=b"old")),  # 2
        # One key written twice in one revision (a "\0"-ended delete slips past the duplicate check):
        # two events, in order; prev_kv is what the key was at the revision before, so none for k2.
        ("Txn", txn(success=[_put(b"k2", b"new"), _del(b"k", b"\x00", prev_kv=True)])),  # 3
        ("Txn", txn(success=[_del(b"k", b"\x00"), _put(b"k2", b"again"), _put(b"k", b"back")])),  # 4
        # Revoking a lease deletes its keys in one revision, in key order.
        ("LeaseGrant", rpc_pb2.LeaseGrantRequest(ID=7, TTL=600)),
        ("Put", rpc_pb2.PutRequest(key=b"k3", lease=7)),  # 5
        ("Put", rpc_pb2.PutRequest(key=b"k1", lease=7)),  # 6
        ("Put", rpc_pb2.PutRequest(key=b"k4", lease=7)),  # 7
        ("LeaseRevoke", rpc_pb2.LeaseRevokeRequest(ID=7)),  # 8
        ("Put", rpc_pb2.PutRequest(key=b"k", value=b"nine")),  # 9
        ("Put", rpc_pb2.PutRequest(key=b"k", value=b"ten")),  # 10
        ("Compact", rpc_pb2.CompactionRequest(revision=9, physical=True)),
        # From the compaction revision: prev_kv of its event would be below it, so etcd sends none.
        ("Watch", _w(0, key=b"k", range_end=b"\x00", start_revision=9, prev_kv=True)),
        ("Watch", _w(0, key=b"k", range_end=b"\x00", start_revision=10, prev_kv=True)),
        # A compacted watch keeps its id until canceled.
        ("Watch", _w(1, key=b"k", start_revision=8, watch_id=5)),
        ("Watch", _w(1, key=b"k", watch_id=5)),
        ("CancelUnknown", (1, 5)),
        ("Watch", _w(1, key=b"k", watch_id=5)),
        ("Watch", _w(0, key=b"zz", start_revision=100)),  # in the future
        ("Progress", 0),
        ("Put", rpc_pb2.PutRequest(key=b"k", value=b"eleven")),  # 11
        ("CancelWatch", live_k),
        ("Put", rpc_pb2.PutRequest(key=b"k", value=b"twelve")),  # 12
        ("Progress", 1),
    ]


def test_watch_edge_cases(fastetcd_endpoint: str, etcd_endpoint: str) -> None:
    script = edge_case_script()
    run = run_watch_sequence(-1, len(script), fastetcd_endpoint, etcd_endpoint, script=script)
    assert run.model.rev == 12 and len(run.specs) == 10
    # What the script means to show, as etcd shows it (the comparison did the rest).
    history = [(e.type, e.kv.key, e.kv.mod_revision, e.HasField("prev_kv")) for e in run.oracle.history()]
    assert history[1:4] == [(0, b"k2", 3, False), (1, b"k", 3, True), (1, b"k2", 3, False)]
    assert [key for _, key, rev, _ in history if rev == 8] == [b"k1", b"k3", b"k4"]
    assert [spec.error for spec in run.specs[6:9]] == [False, True, False]



# -- the harness's own model, without servers --------------------------------------------------------

def _event(kind: int, key: bytes, rev: int) -> kv_pb2.Event:
    return kv_pb2.Event(type=kind, kv=kv_pb2.KeyValue(key=key, mod_revision=rev))


def test_watch_model_ranges_and_filters() -> None:
    put, delete = kv_pb2.Event.PUT, kv_pb2.Event.DELETE
    req = rpc_pb2.WatchCreateRequest
    assert watch_matches(req(key=b"a"), _event(put, b"a", 2))
    assert not watch_matches(req(key=b"a"), _event(put, b"a/", 2))
    assert watch_matches(req(key=b"a/", range_end=b"a0"), _event(put, b"a/b", 2))
    assert watch_matches(req(key=b"b", range_end=b"\x00"), _event(delete, b"\xff", 2))
    assert not watch_matches(req(key=b"b", range_end=b"\x00"), _event(put, b"a", 2))
    assert watch_matches(req(key=b"", range_end=b"\x00"), _event(put, b"\x00", 2))
    assert watch_matches(req(key=b""), _event(put, b"\x00", 2))  # the empty key means "\0"
    assert not watch_matches(req(key=b"a", filters=[NOPUT]), _event(put, b"a", 2))
    assert watch_matches(req(key=b"a", filters=[NOPUT]), _event(delete, b"a", 2))
    assert not watch_matches(req(key=b"a", filters=[NODELETE]), _event(delete, b"a", 2))
    assert watch_matches(req(key=b"a", filters=[2]), _event(delete, b"a", 2))
    assert range_is_empty(req(key=b"b", range_end=b"a"))
    assert range_is_empty(req(key=b"a", range_end=b"a"))
    assert not range_is_empty(req(key=b"a", range_end=b"\x00"))
    assert not range_is_empty(req(key=b"", range_end=b"\x00\x00"))
    spec = WatchSpec(0, req(key=b"a", start_revision=0), created_rev=5)
    history = [_event(put, b"a", r) for r in range(2, 10)]
    assert spec.expected_events(history) == 4  # revisions 6..9
    spec.canceled_at = 7
    assert spec.expected_events(history) == 2


def test_attribute_splits_responses_by_watch() -> None:
    hdr = rpc_pb2.ResponseHeader(revision=9)
    rs = [
        WatchResponse(header=hdr, watch_id=0, created=True),
        WatchResponse(header=hdr, watch_id=-1, created=True, canceled=True, cancel_reason="x"),
        WatchResponse(header=hdr, watch_id=1, created=True),
        WatchResponse(header=hdr, watch_id=1, events=[_event(0, b"k", 8), _event(0, b"j", 9)]),
        WatchResponse(header=hdr, watch_id=-1),
        WatchResponse(header=hdr, watch_id=0, events=[_event(1, b"k", 9)]),
        WatchResponse(header=hdr, watch_id=1, canceled=True),
        WatchResponse(header=hdr, watch_id=1, events=[_event(0, b"late", 10)]),
    ]
    logs, stray = attribute(rs)
    assert [len(log.events) for log in logs] == [1, 0, 2]
    assert logs[1].created.canceled and logs[2].ended and not logs[0].ended
    assert [r.watch_id for r in stray] == [-1, 1]  # the progress reply, and an event after the cancel
