"""KV.RangeStream (etcd 3.7) against real etcd 3.7.3, and what a stream costs the server.

The reference is etcd v3.7.3 built by ci/build_etcd37.sh into bench/.bin/etcd-3.7 (.ci/run builds it
before the tests). Both servers get the same random histories (puts of small and large values, txns that
create several keys at one revision, leases, deletes, compactions) and the same random RangeRequests sent as
RangeStream (single keys, prefixes, intervals, "\\0" ends; limits; keys_only, count_only; revisions
current, past, compacted, future and negative; default and non-default sort options; revision filters).
Every stream must give the same chunks, byte for byte once the header's cluster and member ids are
cleared (so the merged answers, count and more included, are equal too), or the same error after the same
chunks. Both run with a small --max-request-bytes, so that etcd's byte-adaptive chunk sizes (doubling and
halving) are exercised by modest values.

fastetcd's merged stream is also checked against its own unary Range. The one known difference is etcd
3.7's: keys_only KeyValues from RangeStream carry no lease (etcd 3.7 reads them from its index alone; its
unary Range does the same), while fastetcd's unary Range keeps etcd 3.5's answer, with the lease.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from etcd37 import etcd37_binary

from fastetcd.proto import rpc_pb2 as pb
from fastetcd.proto import rpc_pb2_grpc
from fastetcd.testing import (
    UNLIMITED_CHANNEL_OPTIONS,
    ServerProcess,
    free_port,
    process_memory,
    start_etcd,
    start_fastetcd,
)

# Small, so that values of a few KiB make etcd halve its chunk limits and small ones make it double them.
MAX_REQUEST_BYTES = 48 * 1024
SEEDS = 4
OPS = 350
LEASE_ID = 0x5EED
KEYS = [b"a/%03d" % i for i in range(40)] + [b"b/%02d" % i for i in range(12)] + [b"c", b"c/x", b"d\xff"]
BULK = 260  # keys under bulk/, so that some streams run to many chunks

S, N = pb.RangeRequest.SortOrder, pb.RangeRequest.SortTarget




def start_etcd37(data_dir: Path, extra_args: tuple[str, ...] = ()) -> ServerProcess:
    return start_etcd(data_dir, extra_args, binary=str(etcd37_binary()))


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """(etcd 3.7, fastetcd), both with MAX_REQUEST_BYTES."""
    args = ("--max-request-bytes", str(MAX_REQUEST_BYTES))
    started: list[ServerProcess] = []
    try:
        started.append(start_etcd37(tmp_path / "etcd37", args))
        started.append(start_fastetcd(tmp_path / "fastetcd", args))
        yield started[0], started[1]
    finally:
        for s in started:
            s.kill()


# ---------------------------------------------------------------------------------------------------------
# talking to both


def normalized(chunk: pb.RangeStreamResponse) -> bytes:
    """A chunk's bytes with the member-specific header fields cleared."""
    c = pb.RangeStreamResponse()
    c.CopyFrom(chunk)
    if c.range_response.HasField("header"):
        c.range_response.header.cluster_id = 0
        c.range_response.header.member_id = 0
    return c.SerializeToString()


def stream(
    kv: rpc_pb2_grpc.KVStub, req: pb.RangeRequest
) -> tuple[list[pb.RangeStreamResponse], tuple | None]:
    """Every chunk of a RangeStream, and its error (code, message) if it ended with one."""
    chunks: list[pb.RangeStreamResponse] = []
    try:
        for c in kv.RangeStream(req, timeout=30):
            chunks.append(c)
    except grpc.RpcError as e:
        return chunks, (e.code(), e.details())
    return chunks, None


def merged(chunks: list[pb.RangeStreamResponse]) -> pb.RangeResponse:
    """proto.Merge of the chunks, as etcd's client (GetStreamToGetResponse) does."""
    out = pb.RangeResponse()
    for c in chunks:
        out.MergeFrom(c.range_response)
    return out


class Both:
    def __init__(self, etcd: ServerProcess, fe: ServerProcess) -> None:
        self.channels = [
            grpc.insecure_channel(s.endpoint, options=UNLIMITED_CHANNEL_OPTIONS) for s in (etcd, fe)
        ]
        self.kv = [rpc_pb2_grpc.KVStub(c) for c in self.channels]
        self.lease = [rpc_pb2_grpc.LeaseStub(c) for c in self.channels]
        self.rev = 1
        self.compacted = 0
        self.streams = self.multi_chunk = self.errors = 0

    def close(self) -> None:
        for c in self.channels:
            c.close()

    def unary(self, method: str, req) -> object:
        """Call both; the answers' revisions (or errors) must agree, so that the histories stay the same."""
        out = []
        for stub in self.lease if method.startswith("Lease") else self.kv:
            try:
                out.append(getattr(stub, method)(req, timeout=30))
            except grpc.RpcError as e:
                out.append((e.code(), e.details()))
        theirs, ours = out
        if isinstance(theirs, tuple) or isinstance(ours, tuple):
            assert ours == theirs, f"{method} {req}: etcd {theirs}, fastetcd {ours}"
            return None
        assert ours.header.revision == theirs.header.revision, f"{method} {req}: {theirs} vs {ours}"
        self.rev = ours.header.revision
        return ours

    def check_stream(self, req: pb.RangeRequest) -> None:
        (theirs, terr), (ours, oerr) = (stream(kv, req) for kv in self.kv)
        where = f"RangeStream({req}) at revision {self.rev}, compacted at {self.compacted}"
        assert oerr == terr, f"{where}: error etcd {terr}, fastetcd {oerr}"
        assert [normalized(c) for c in ours] == [normalized(c) for c in theirs], (
            f"{where}: chunks differ\n etcd:     {[len(c.range_response.kvs) for c in theirs]}"
            f"\n fastetcd: {[len(c.range_response.kvs) for c in ours]}"
            f"\n etcd merged:     {merged(theirs)}\n fastetcd merged: {merged(ours)}"
        )
        self.streams += 1
        self.multi_chunk += len(ours) > 1
        self.errors += oerr is not None
        if oerr is None and req.sort_target == N.KEY:
            self.check_against_range(req, merged(ours))

    def check_against_range(self, req: pb.RangeRequest, got: pb.RangeResponse) -> None:
        """fastetcd's merged stream is its unary Range answer (but for keys_only leases, see the top)."""
        want = self.kv[1].Range(req, timeout=30)
        if req.keys_only:
            for kv in want.kvs:
                kv.lease = 0
        assert got == want, f"merged RangeStream differs from Range for {req}:\n{got}\nvs\n{want}"


# ---------------------------------------------------------------------------------------------------------
# random histories and requests


def value(rng: random.Random) -> bytes:
    size = rng.choice([0, 1, 8, 40, 200]) if rng.random() < 0.8 else rng.randint(1024, 12 * 1024)
    return rng.randbytes(size)


def random_request(rng: random.Random, both: Both) -> pb.RangeRequest:
    r = pb.RangeRequest()
    shape = rng.random()
    if shape < 0.15:
        r.key = rng.choice(KEYS)
    elif shape < 0.55:
        p = rng.choice([b"a/", b"b/", b"bulk/", b"c", b"a/0", b"bulk/1"])
        r.key, r.range_end = p, p[:-1] + bytes([p[-1] + 1])
    elif shape < 0.7:
        r.key, r.range_end = rng.choice(KEYS + [b"bulk/100"]), b"\x00"
    elif shape < 0.8:
        r.key, r.range_end = b"\x00", b"\x00"
    elif shape < 0.98:
        r.key, r.range_end = rng.choice(KEYS + [b"bulk/05"]), rng.choice(KEYS + [b"bulk/2", b"z"])
    else:
        r.range_end = b"z"  # no key: etcd's "key is not provided"
    x = rng.random()
    if x < 0.45:
        r.limit = 0
    elif x < 0.75:
        r.limit = rng.randint(1, 40)
    elif x < 0.95:
        r.limit = rng.randint(40, 400)
    else:
        r.limit = -rng.randint(1, 3)
    x = rng.random()
    if x < 0.6:
        r.revision = 0
    elif x < 0.97:
        r.revision = rng.randint(max(1, both.compacted - 3), both.rev + 2)  # compacted and future ones too
    else:
        r.revision = -rng.randint(1, 2)
    r.keys_only = rng.random() < 0.3
    r.count_only = rng.random() < 0.1
    r.serializable = rng.random() < 0.3
    x = rng.random()
    if x < 0.08:
        r.sort_order = S.ASCEND  # key target, ascending: etcd's default order, allowed
    elif x < 0.22:
        r.sort_target = rng.choice([N.VERSION, N.CREATE, N.MOD, N.VALUE])  # order NONE: sorted per chunk
    elif x < 0.26:
        r.sort_order = rng.choice([S.DESCEND, S.ASCEND])
        r.sort_target = rng.choice([N.KEY, N.VERSION, N.CREATE, N.MOD, N.VALUE])
        if r.sort_order == S.ASCEND and r.sort_target == N.KEY:
            r.sort_order = S.DESCEND  # a custom order: Unimplemented
    elif x < 0.27:
        r.sort_order = 7  # not an order: etcd's "invalid sort option"
    if rng.random() < 0.03:
        setattr(r, rng.choice(["min_mod_revision", "max_mod_revision", "min_create_revision",
                               "max_create_revision"]), rng.randint(1, both.rev))  # fmt: skip
    return r


def load_bulk(both: Both, rng: random.Random) -> None:
    for first in range(0, BULK, 20):
        ops = [pb.RequestOp(request_put=pb.PutRequest(key=b"bulk/%03d" % i, value=value(rng)))
               for i in range(first, min(first + 20, BULK))]  # fmt: skip
        both.unary("Txn", pb.TxnRequest(success=ops))


def run_history(both: Both, rng: random.Random, ops: int) -> None:
    both.unary("LeaseGrant", pb.LeaseGrantRequest(ID=LEASE_ID, TTL=3600))
    load_bulk(both, rng)
    for _ in range(ops):
        x = rng.random()
        if x < 0.35:
            lease = LEASE_ID if rng.random() < 0.3 else 0
            both.unary("Put", pb.PutRequest(key=rng.choice(KEYS), value=value(rng), lease=lease))
        elif x < 0.42:
            keys = rng.sample(KEYS + [b"bulk/%03d" % rng.randrange(BULK)], rng.randint(2, 6))
            ops_ = [pb.RequestOp(request_put=pb.PutRequest(key=k, value=value(rng))) for k in keys]
            both.unary("Txn", pb.TxnRequest(success=ops_))
        elif x < 0.50:
            both.unary("DeleteRange", pb.DeleteRangeRequest(key=rng.choice(KEYS)))
        elif x < 0.52:
            lo, hi = sorted(rng.sample(KEYS + [b"bulk/1", b"bulk/15"], 2))
            both.unary("DeleteRange", pb.DeleteRangeRequest(key=lo, range_end=hi))
        elif x < 0.54:
            rev = rng.randint(max(1, both.compacted), both.rev + 1)  # may be compacted already, or future
            if both.unary("Compact", pb.CompactionRequest(revision=rev)) is not None:
                both.compacted = max(both.compacted, rev)
        else:
            both.check_stream(random_request(rng, both))


@pytest.mark.parametrize("seed", range(SEEDS))
def test_range_stream_matches_etcd37(pair: tuple[ServerProcess, ServerProcess], seed: int) -> None:
    both = Both(*pair)
    try:
        run_history(both, random.Random(seed), OPS)
        # The comparison must have covered what it claims: long streams, errors, and data.
        assert both.streams > OPS // 3 and both.multi_chunk > 10 and both.errors > 3, vars(both)
        everything = pb.RangeRequest(key=b"\x00", range_end=b"\x00")
        both.check_stream(everything)
    finally:
        both.close()


# ---------------------------------------------------------------------------------------------------------
# a stream over time: writes and compactions while it runs

SLOW_CHANNEL_OPTIONS = [
    *UNLIMITED_CHANNEL_OPTIONS,
    # No BDP probing: the client's flow-control window stays at gRPC's 64 KiB default, so a client that
    # stops reading makes the server wait instead of absorbing the rest of the stream into its buffers.
    ("grpc.http2.bdp_probe", 0),
]


def put_many(kv: rpc_pb2_grpc.KVStub, prefix: bytes, n: int, size: int, per_txn: int = 20) -> None:
    rng = random.Random(n)
    for first in range(0, n, per_txn):
        ops = [pb.RequestOp(request_put=pb.PutRequest(key=prefix + b"%06d" % i, value=rng.randbytes(size)))
               for i in range(first, min(first + per_txn, n))]  # fmt: skip
        kv.Txn(pb.TxnRequest(success=ops), timeout=60)


def prefix_request(prefix: bytes, **kw) -> pb.RangeRequest:
    return pb.RangeRequest(key=prefix, range_end=prefix[:-1] + bytes([prefix[-1] + 1]), **kw)


def test_writes_during_a_stream_are_not_seen(pair: tuple[ServerProcess, ServerProcess]) -> None:
    """A stream for revision 0 answers at the revision it started at, as etcd 3.7's does."""
    answers = []
    for server in pair:
        with grpc.insecure_channel(server.endpoint, options=SLOW_CHANNEL_OPTIONS) as ch:
            kv = rpc_pb2_grpc.KVStub(ch)
            put_many(kv, b"pin/", 600, 2048)
            call = kv.RangeStream(prefix_request(b"pin/"), timeout=60)
            chunks = [next(call)]
            kv.Put(pb.PutRequest(key=b"pin/999999", value=b"new"), timeout=10)  # after every key of the range
            kv.DeleteRange(pb.DeleteRangeRequest(key=b"pin/000000"), timeout=10)  # already sent
            kv.Put(pb.PutRequest(key=b"pin/000500", value=b"changed"), timeout=10)  # not sent yet
            chunks.extend(call)
            got = merged(chunks)
            assert len(chunks) > 3, f"{server.kind}: too few chunks for a stream over time"
            want = kv.Range(prefix_request(b"pin/", revision=got.header.revision), timeout=10)
            assert got.kvs == want.kvs and got.count == want.count == 600 and not got.more
            now = kv.Range(prefix_request(b"pin/", count_only=True)).header.revision
            assert now == got.header.revision + 3
            answers.append([normalized(c) for c in chunks])
    assert answers[1] == answers[0]


def test_compaction_mid_stream_fails_as_etcd37(pair: tuple[ServerProcess, ServerProcess]) -> None:
    """Compacting past a stream's revision fails the stream with etcd's error once it reads on; what it
    sent before is a prefix of the answer."""
    keys = 1500
    outcomes = []
    for server in pair:
        with grpc.insecure_channel(server.endpoint, options=SLOW_CHANNEL_OPTIONS) as ch:
            kv = rpc_pb2_grpc.KVStub(ch)
            put_many(kv, b"big/", keys, 2048)
            everything = [kv_.key for kv_ in kv.Range(prefix_request(b"big/"), timeout=30).kvs]
            call = kv.RangeStream(prefix_request(b"big/"), timeout=60)
            chunks = [next(call)]
            rev = kv.Put(pb.PutRequest(key=b"other", value=b"x"), timeout=10).header.revision
            kv.Compact(pb.CompactionRequest(revision=rev), timeout=10)
            with pytest.raises(grpc.RpcError) as err:
                for c in call:
                    chunks.append(c)
            got = [kv_.key for c in chunks for kv_ in c.range_response.kvs]
            assert 0 < len(got) < keys and got == everything[: len(got)], server.kind
            assert not any(c.range_response.HasField("header") for c in chunks), server.kind
            outcomes.append((err.value.code(), err.value.details()))
    compacted = "etcdserver: mvcc: required revision has been compacted"
    assert outcomes[0] == (grpc.StatusCode.OUT_OF_RANGE, compacted)
    assert outcomes[1] == outcomes[0]


# ---------------------------------------------------------------------------------------------------------
# what a stream costs fastetcd: one chunk for a client that stops reading; nothing once cancelled

MEM_KEYS = 40_000  # × 1 KiB: a 40 MiB answer
STALL_S = 3.0
# RSS growth allowed while a client has read one chunk and stalls: a chunk (at most ~2 × the default
# 1.5 MiB --max-request-bytes, plus its encoding) and what gRPC holds for the stream, with room for the
# allocator; far below the 40 MiB a buffered answer would take.
RSS_BOUND_MIB = 16


def _metric(url: str, name: str, **labels: str) -> float:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def test_slow_reader_holds_one_chunk_and_cancel_stops_the_scan(tmp_path: Path) -> None:
    metrics = f"http://127.0.0.1:{free_port()}"
    fe = start_fastetcd(tmp_path / "fe", ["--listen-metrics-urls", metrics])
    try:
        with grpc.insecure_channel(fe.endpoint, options=UNLIMITED_CHANNEL_OPTIONS) as ch:
            put_many(rpc_pb2_grpc.KVStub(ch), b"mem/", MEM_KEYS, 1024, per_txn=100)
        time.sleep(0.5)
        sent0 = _metric(metrics, "etcd_network_client_grpc_sent_bytes_total")
        base = process_memory(fe.pid)
        peak = [base]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], process_memory(fe.pid))
                time.sleep(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        with grpc.insecure_channel(fe.endpoint, options=SLOW_CHANNEL_OPTIONS) as ch:
            call = rpc_pb2_grpc.KVStub(ch).RangeStream(prefix_request(b"mem/"), timeout=60)
            first = next(call)
            assert 0 < len(first.range_response.kvs) < MEM_KEYS
            time.sleep(STALL_S)  # the client reads nothing more
            stop.set()
            sampler.join()
            grown = peak[0] - base
            assert grown < RSS_BOUND_MIB * 2**20, f"RSS grew {grown / 2**20:.1f} MiB for a stalled stream"
            call.cancel()
        deadline = time.monotonic() + 10
        labels = {"grpc_method": "RangeStream", "grpc_code": "Canceled"}
        while _metric(metrics, "grpc_server_handled_total", **labels) < 1:
            assert time.monotonic() < deadline, "the cancelled RangeStream never finished on the server"
            time.sleep(0.05)
        time.sleep(0.5)
        # Only what the stalled client's window let through was ever read and encoded, not the 40 MiB.
        sent = _metric(metrics, "etcd_network_client_grpc_sent_bytes_total") - sent0
        assert sent < 8 * 2**20, f"{sent / 2**20:.1f} MiB sent for a stream cancelled after one chunk"
    finally:
        fe.kill()
