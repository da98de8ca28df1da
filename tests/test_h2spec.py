"""h2spec's generic and http2 sections against fastetcd's native transport (HTTP/2 framing conformance).

h2spec sends plain HTTP/2 requests to ``/``: the native transport answers requests without a gRPC
content-type as etcd's HTTP mux does over TLS (404 with a body for ``/``), so the cases that wait for a
response's DATA frame get one.

Expected failures are asserted exactly: the test fails if any other case fails, and also if a listed case
starts passing (then the list is out of date). The one exception, RACING_CLOSED_STREAMS, is explained there.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from h2spec import run_h2spec

from fastetcd.proto import rpc_pb2, rpc_pb2_grpc
from fastetcd.testing.process import start_fastetcd

SECTIONS = ["generic", "http2"]

# RFC 7540 5.1.1 wants a connection error for a new stream id below one already used. nghttp2 checks this
# only against streams it still knows, and on purpose does not remember every id it has seen (see
# nghttp2_session_on_request_headers_received): h2spec opens stream 5, then 3, which nghttp2 ignores. A gRPC
# client never goes back in stream ids; ignoring such a HEADERS frame harms nobody.
NGHTTP2_LENIENT = {"http2/5.1.1/2"}

# With etcd's default --max-concurrent-streams (no limit), nghttp2 keeps no closed streams (it would keep
# one per call the connection ever made: unbounded memory, see ServerConfig in _native.pyx), so it cannot
# tell a closed stream from one it never knew, and ignores DATA and HEADERS on closed streams instead of
# answering STREAM_CLOSED. Harmless for gRPC clients: a frame that races a stream's end is ignored (as
# grpc-go, etcd's server, ignores DATA for a stream it no longer has). With a limit they pass (the
# stream-limit case).
CLOSED_STREAMS_FORGOTTEN = {"http2/5.1/8", "http2/5.1/9", "http2/5.1/11", "http2/5.1/12"}

# For the same reason, a race: these send a frame on a stream the client has half-closed. If it arrives
# before the server answered, the stream is still open and nghttp2 answers STREAM_CLOSED (a pass); if the
# answer went out first, the stream is closed and forgotten, and the frame ignored (a failure, in a few runs
# out of ten). Either outcome is accepted for these, in this configuration only.
RACING_CLOSED_STREAMS = {"http2/5.1/5", "http2/5.1/6", "http2/6.1/2"}

# Needs an advertised SETTINGS_MAX_CONCURRENT_STREAMS, which "no limit" does not advertise.
SKIPPED_UNLIMITED = {"http2/5.1.2/1"}


def check(results: dict[str, str], expected_failures: set[str], expected_skips: set[str],
          either: set[str]) -> None:
    assert len(results) >= 138, f"h2spec ran only {len(results)} cases"
    failed = {case for case, outcome in results.items() if outcome == "failed"}
    skipped = {case for case, outcome in results.items() if outcome == "skipped"}
    unexpected, fixed = sorted(failed - expected_failures - either), sorted(expected_failures - failed)
    assert not unexpected, f"unexpected h2spec failures: {unexpected}"
    assert not fixed, f"h2spec cases listed as expected failures now pass (update the list): {fixed}"
    assert skipped == expected_skips, f"skipped cases changed: {sorted(skipped)}"
    print(f"h2spec: {len(results) - len(failed) - len(skipped)} passed, {len(failed)} failed "
          f"({', '.join(sorted(failed))}), {len(skipped)} skipped")


def still_serves(port: int) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        kv = rpc_pb2_grpc.KVStub(ch)
        kv.Put(rpc_pb2.PutRequest(key=b"after-h2spec", value=b"ok"), timeout=10)
        assert kv.Range(rpc_pb2.RangeRequest(key=b"after-h2spec"), timeout=10).kvs[0].value == b"ok"


@pytest.mark.parametrize(
    ("args", "expected_failures", "expected_skips", "either"),
    [
        pytest.param([], NGHTTP2_LENIENT | CLOSED_STREAMS_FORGOTTEN, SKIPPED_UNLIMITED, RACING_CLOSED_STREAMS,
                     id="etcd-defaults"),
        pytest.param(["--max-concurrent-streams", "100"], NGHTTP2_LENIENT, set(), set(), id="stream-limit"),
    ],
)
def test_h2spec(tmp_path: Path, args: list[str], expected_failures: set[str], expected_skips: set[str],
                either: set[str]) -> None:
    with start_fastetcd(tmp_path, ["--transport", "native", "--store", "embedded", *args]) as server:
        results = run_h2spec(server.port, SECTIONS, tmp_path / "h2spec.xml")
        assert server.alive(), server.log_tail()
        check(results, expected_failures, expected_skips, either)
        still_serves(server.port)
