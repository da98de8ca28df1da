"""Interoperability with grpc-go, against fastetcd on both transports and real etcd 3.5.1 (same assertions):

- the shared scenario (tests/interop/scenario.py) on etcd's generated API stubs (tests/interop/grpc_go);
- etcdctl 3.5.1 (clientv3): a watch receiving thousands of events, one killed with SIGINT mid-stream (the
  server must drop its watch), --command-timeout, oversized puts;
- etcd's benchmark tool (tools/benchmark) and the project's bench/loadgen, run briefly: no errors.

The Go programs are built on first use (tests/interop/tools.py).
"""

from __future__ import annotations

import base64
import json
import queue
import re
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from typing import Any

import grpc
from interop import grpcio_client
from interop.scenario import (
    check,
    check_responses,
    expected_events,
    params_for,
    run_client,
)
from interop.tools import etcd_benchmark, grpc_go_client, loadgen

from fastetcd.proto import rpc_pb2, rpc_pb2_grpc
from fastetcd.testing import ServerProcess, etcd_tool, etcdctl_env, gauges, run_etcdctl, wait_for_gauges

READ_TIMEOUT_S = 60.0
# clientv3 logs each failed attempt as a JSON line on stderr before etcdctl's own "Error: ..." line.
_ERROR_LINE = re.compile(r"^Error: .*$", re.M)


def test_grpc_go_scenario(interop_server: ServerProcess, interop_server_kind: str) -> None:
    params = params_for(interop_server, "grpc-go")
    result = run_client(grpc_go_client(), params)
    assert result["client"].startswith("grpc-go 1.")
    check(result, params, interop_server_kind)


class LineReader:
    """A child's stdout, line by line, with a deadline (a thread feeds a queue)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.proc = proc
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def events(self, n: int, timeout: float = READ_TIMEOUT_S) -> tuple[list[list[Any]], list[list[int]]]:
        """Read `etcdctl watch -w json` responses until ``n`` events came, in the scenario's event shape."""
        events: list[list[Any]] = []
        responses: list[list[int]] = []
        until = time.monotonic() + timeout
        while len(events) < n:
            line = self.lines.get(timeout=max(0.0, until - time.monotonic()))
            assert line is not None, f"etcdctl watch ended after {len(events)} of {n} events"
            resp = json.loads(line)
            for ev in resp["Events"] or ():
                kv = ev["kv"]
                kind = "DELETE" if ev.get("type") == 1 else "PUT"  # encoding/json leaves out PUT's 0
                events.append([kind, base64.b64decode(kv["key"]).decode(),
                               base64.b64decode(kv.get("value", "")).decode(), kv["create_revision"],
                               kv["mod_revision"], kv["version"]])
            if resp["Events"]:
                responses.append([resp["Header"]["revision"], len(resp["Events"])])
        return events, responses


def etcdctl_watch(endpoint: str, args: Sequence[str]) -> tuple[subprocess.Popen[str], LineReader]:
    proc = subprocess.Popen([etcd_tool("etcdctl"), f"--endpoints={endpoint}", "watch", *args, "-w", "json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=etcdctl_env())
    return proc, LineReader(proc)


def interrupt(proc: subprocess.Popen[str]) -> int:
    """SIGINT, as a user's Ctrl-C; etcdctl installs no handler, so the signal ends it at once."""
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout=10)
    finally:
        proc.kill()


def test_etcdctl_watch_interrupt_timeout_and_oversize(interop_server: ServerProcess) -> None:
    params = params_for(interop_server, "etcdctl")
    p = vars(params)
    metrics = interop_server.metrics_url
    assert metrics is not None
    pre = params.key("watch", "")
    base = gauges(metrics)

    # A live watch: created before the writes (etcdctl prints nothing on creation, so the server's watcher
    # gauge says when it is in place), then thousands of events in order with their Txns' revisions.
    live, live_out = etcdctl_watch(interop_server.endpoint, ["--prefix", pre])
    try:
        assert wait_for_gauges(metrics, lambda g: g[1] == base[1] + 1) == (base[0] + 1, base[1] + 1)
        with grpc.insecure_channel(interop_server.endpoint) as ch:
            revs = grpcio_client.write_events(p, rpc_pb2_grpc.KVStub(ch))
        assert revs == list(range(revs[0], revs[0] + len(revs)))
        events, responses = live_out.events(params.events)
        assert len(events) == params.events
        assert events == expected_events(params, revs[0])
        check_responses(responses, events)
    finally:
        interrupt(live)
    assert wait_for_gauges(metrics, lambda g: g == base) == base

    # A watch from history, interrupted after its first response: the server still had most of the
    # backlog to send when the connection went; it drops the watch and goes on serving.
    hist, hist_out = etcdctl_watch(interop_server.endpoint, ["--prefix", pre, f"--rev={revs[0]}"])
    try:
        events, _ = hist_out.events(1)
        assert events[0] == expected_events(params, revs[0])[0]
    finally:
        interrupt(hist)
    assert wait_for_gauges(metrics, lambda g: g == base) == base
    code, out, err = run_etcdctl(interop_server.endpoint, ["get", "--prefix", pre, "--keys-only"])
    assert (code, err) == (0, "") and out.split() == [params.watch_key(i) for i in range(params.events)]

    # --command-timeout: the deadline goes with every call; one this short expires before the answer.
    code, out, err = run_etcdctl(interop_server.endpoint, ["--command-timeout=1ms", "get", "--prefix", pre])
    assert (code, out, _ERROR_LINE.findall(err)) == (1, "", ["Error: context deadline exceeded"])

    # Over --max-request-bytes: etcd's own check answers. Past clientv3's 2 MiB send limit the client
    # refuses it itself (a server's gRPC limit is the grpc-go scenario's to reach).
    key = params.key("oversize", "huge")
    code, out, err = run_etcdctl(interop_server.endpoint, ["put", key], stdin="x" * params.too_large_value)
    assert (code, out, _ERROR_LINE.findall(err)) == (1, "", ["Error: etcdserver: request is too large"])
    code, out, err = run_etcdctl(interop_server.endpoint, ["put", key], stdin="x" * params.over_grpc_value)
    size = rpc_pb2.PutRequest(key=key.encode(), value=b"x" * params.over_grpc_value).ByteSize()
    want = ("Error: rpc error: code = ResourceExhausted desc = trying to send message larger than max "
            f"({size} vs. 2097152)")
    assert (code, out, _ERROR_LINE.findall(err)) == (1, "", [want])
    assert run_etcdctl(interop_server.endpoint, ["get", key])[:2] == (0, "")


# The summary etcd's benchmark tool prints, and the error lines under it when calls failed.
_BENCH_SUMMARY = re.compile(r"^Summary:\n\s+Total:", re.M)
_BENCH_ERRORS = "Error distribution:"


def run_benchmark(endpoint: str, args: Sequence[str]) -> str:
    argv = [str(etcd_benchmark()), f"--endpoints={endpoint}", "--conns=2", "--clients=4", *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{argv} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    assert _BENCH_SUMMARY.search(proc.stdout), proc.stdout[-3000:]
    assert _BENCH_ERRORS not in proc.stdout, proc.stdout[-3000:]
    return proc.stdout


def test_etcd_benchmark_tool(interop_server: ServerProcess) -> None:
    ep = interop_server.endpoint
    run_benchmark(ep, ["put", "--total=2000", "--key-size=8", "--val-size=64", "--key-space-size=500"])
    run_benchmark(ep, ["txn-put", "--total=500", "--key-size=8", "--val-size=64", "--key-space-size=500"])
    run_benchmark(ep, ["range", "bench/", "--total=1000", "--consistency=l"])
    run_benchmark(ep, ["range", "bench/", "--total=1000", "--consistency=s"])
    run_benchmark(ep, ["watch", "--streams=4", "--watch-per-stream=50", "--watched-key-total=20",
                       "--put-total=1000", "--put-rate=1000", "--key-space-size=20"])
    run_benchmark(ep, ["lease-keepalive", "--total=500"])


def test_loadgen(interop_server: ServerProcess) -> None:
    tool = str(loadgen())
    ep = f"-endpoint={interop_server.endpoint}"
    fanout = subprocess.run([tool, "watch-fanout", ep, "-streams=4", "-watch-per-stream=25", "-conns=2",
                             "-put-rate=500", "-seconds=1", "-putters=4", "-drain-timeout=10s"],
                            capture_output=True, text=True, timeout=120)
    assert fanout.returncode == 0, fanout.stderr[-3000:]
    f = json.loads(fanout.stdout)
    failures = (f["put_errors"], f["order_errors"], f["watchers_short_of_events"], f["errors"])
    assert failures == (0, 0, 0, []), f
    assert f["events"] == f["events_expected"] == f["puts"] * 100 > 0, f
    churn = subprocess.run([tool, "lease-churn", ep, "-clients=4", "-conns=2", "-seconds=1"],
                           capture_output=True, text=True, timeout=120)
    assert churn.returncode == 0, churn.stderr[-3000:]
    c = json.loads(churn.stdout)
    assert (c["error_count"], c["errors"]) == (0, []) and c["loops"] > 0, c
