"""Differential test: seeded random KV operation sequences sent over gRPC to a fresh fastetcd and a fresh
real etcd 3.5.1; every response must be identical field by field.

Responses are compared as protobuf bytes after zeroing the header's cluster_id / member_id / raft_term
at every nesting level (the only fields two clusters may legitimately disagree on); errors are compared
as (gRPC status code, details). The sequence is generated from the seed and the oracle's answers, so a
failing seed reproduces: `pytest tests/test_differential.py -k seed7 --diff-ops 1500`.

The generator and the comparison live in kv_differential.py (the watch differential reuses them).
"""

from __future__ import annotations

import difflib
import random
from collections.abc import Callable

import grpc
import pytest
from google.protobuf.message import Message
from kv_differential import (
    Generator,
    Model,
    Outcome,
    RangeRequest,
    avoid_etcd_351_panic,
    describe,
    outcome_of,
    parametrize_seeds,
    zero_header_ids,
)

from fastetcd.proto import rpc_pb2
from fastetcd.testing import channel, kv_stub


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    parametrize_seeds(metafunc, "seed", "--diff-seeds")


def _mismatch_report(seed: int, index: int, method: str, req: Message, history: list[str],
                     got: Outcome, want: Outcome) -> str:
    a, b = got.render(), want.render()
    diff = "".join(difflib.unified_diff(b.splitlines(True), a.splitlines(True), "etcd", "fastetcd"))
    recent = "\n".join(f"  {line}" for line in history[-8:])
    return (
        f"seed {seed}, op #{index}: {method} differs\n"
        f"request: {describe(method, req)}\n"
        f"--- fastetcd ---\n{a}--- etcd ---\n{b}--- diff (etcd -> fastetcd) ---\n{diff}\n"
        f"previous ops:\n{recent}\n"
        f"reproduce: pytest tests/test_differential.py -k test_differential --diff-seed-start {seed}"
        f" --diff-seeds 1 --diff-ops {index + 1}"
    )


Caller = Callable[[Message], grpc.Future]


def run_sequence(seed: int, n_ops: int, subject: str, oracle: str) -> int:
    """Run one sequence; returns the number of ops that succeeded on the oracle (a sanity figure)."""
    rng = random.Random(seed)
    model = Model()
    gen = Generator(rng, model)
    history: list[str] = []
    succeeded = 0
    with channel(subject) as sch, channel(oracle) as och:  # TLS under --tls
        s_stub, o_stub = kv_stub(sch), kv_stub(och)

        def both(method: str, req: Message) -> tuple[Outcome, Outcome]:
            # Sent concurrently: the servers are independent and this halves the wall time.
            fs = getattr(s_stub, method).future(req, timeout=30)
            fo = getattr(o_stub, method).future(req, timeout=30)
            return outcome_of(fs), outcome_of(fo)

        for index in range(n_ops):
            method, req = gen.next_op()
            got, want = both(method, req)
            if got.key() != want.key():
                pytest.fail(_mismatch_report(seed, index, method, req, history, got, want), pytrace=False)
            if want.ok is not None:
                succeeded += 1
                header = getattr(want.ok, "header", None)
                if header is not None and header.revision:
                    model.rev = max(model.rev, header.revision)
                if method == "Compact":
                    model.compacted = req.revision
            history.append(f"#{index} {describe(method, req)[:300]} -> {want.key()[0]}")

        # Whole-space reads at the end, including history, catch divergence no random op looked at.
        finals = [RangeRequest(key=b"\x00", range_end=b"\x00")]
        for rev in sorted({max(1, model.compacted), (model.compacted + model.rev) // 2, model.rev}):
            finals.append(RangeRequest(key=b"\x00", range_end=b"\x00", revision=rev))
        for i, req in enumerate(finals):
            got, want = both("Range", req)
            if got.key() != want.key():
                report = _mismatch_report(seed, n_ops + i, "Range", req, history, got, want)
                pytest.fail(report, pytrace=False)
    return succeeded


def test_differential(seed: int, request: pytest.FixtureRequest, fastetcd_endpoint: str,
                      etcd_endpoint: str) -> None:
    n_ops = request.config.getoption("--diff-ops")
    succeeded = run_sequence(seed, n_ops, fastetcd_endpoint, etcd_endpoint)
    # A generator whose requests mostly fail would compare little but error strings.
    assert succeeded >= n_ops // 2, f"only {succeeded} of {n_ops} ops succeeded on etcd"


def test_generator_is_deterministic() -> None:
    def ops(seed: int) -> list[bytes]:
        gen = Generator(random.Random(seed), Model(rev=40, compacted=10))
        return [gen.next_op()[1].SerializeToString(deterministic=True) for _ in range(300)]

    assert ops(3) == ops(3)
    assert ops(3) != ops(4)


def test_avoid_panic_rule_clears_only_deleted_keys() -> None:
    put_hit = rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=b"b/2", ignore_value=True))
    put_miss = rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=b"a/1", ignore_lease=True))
    delete = rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=b"b/", range_end=b"\x00"))
    inner = rpc_pb2.TxnRequest(success=[put_hit])
    req = rpc_pb2.TxnRequest(success=[delete, rpc_pb2.RequestOp(request_txn=inner), put_miss])
    avoid_etcd_351_panic(req)
    assert not req.success[1].request_txn.success[0].request_put.ignore_value
    assert req.success[2].request_put.ignore_lease


def test_zero_header_ids_reaches_nested_headers() -> None:
    hdr = rpc_pb2.ResponseHeader(cluster_id=1, member_id=2, revision=3, raft_term=4)
    inner = rpc_pb2.TxnResponse(header=hdr, responses=[
        rpc_pb2.ResponseOp(response_range=rpc_pb2.RangeResponse(header=hdr))])
    resp = rpc_pb2.TxnResponse(header=hdr, responses=[rpc_pb2.ResponseOp(response_txn=inner)])
    zero_header_ids(resp)
    nested = resp.responses[0].response_txn.responses[0].response_range.header
    assert (nested.cluster_id, nested.member_id, nested.raft_term, nested.revision) == (0, 0, 0, 3)
    assert resp.header.revision == 3 and resp.header.cluster_id == 0
