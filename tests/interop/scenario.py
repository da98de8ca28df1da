"""The interoperability scenario every client stack runs, and the one place its outcome is judged.

Three independent gRPC stacks (grpc-js in tests/interop/grpc_js, grpc-go in tests/interop/grpc_go, grpcio in
tests/interop/grpcio_client.py) each run the same steps against one server and print what they saw as one
JSON object (the shape below). A client only performs the steps and reports; `check` decides what is
right, so the three stacks are held to one table. The tests run it against fastetcd on both transports and
against real etcd 3.5.1 with the same assertions: etcd passing keeps the table honest.

A client gets `Params` as one JSON argument and does, on one channel (one HTTP/2 connection):

unary      Put a=1 (revision r0), Put a=2 with prev_kv, Range a, Txn value(a)=="2" → [Put b=3, Range a],
           Txn value(a)=="x" → failure [Range b], DeleteRange prefix with prev_kv, Range prefix (count only),
           Range with an empty key (an error: INVALID_ARGUMENT "etcdserver: key is not provided"); then
           `concurrent` Puts all in flight at once on the one connection (one stream each).
watch      Read the watch gauges (base). Open stream 1 and create a watch on the watch prefix; once created,
           write `events` keys (Params.watch_key(i) = Params.watch_value(i)) with Txns of `txn_ops` Puts
           each (etcd's --max-txn-ops is 128), one revision per Txn; read all
           `events` events on stream 1; send a WatchCancelRequest for its watch id and read the canceled
           answer; cancel the call. Stream 2: a watch from the first Txn's revision (history) reads all
           events again; cancel the call. Stream 3: the same watch; cancel the call as soon as the first
           events arrive (the server has a backlog to send: mid-stream cancellation). Poll the gauges until
           they are back at base (at most `settle_s`). Range the watch prefix (count only).
deadline   Grant two leases; Lock(lock name, lease 1) gets the lock; Lock(lock name, lease 2) with a deadline
           of `deadline_ms` must fail, as it waits for lease 1's key; poll Range(lock name + "/", count only)
           until the waiter's key is gone (at most `settle_s`). A watch stream with a deadline of
           `deadline_ms`: its watch is created, then the deadline ends the call. Poll the gauges until they
           are back at base. Revoke both leases.
oversize   Put with a value of `too_large_value` bytes (over --max-request-bytes, under gRPC's limit of
           --max-request-bytes + 512 KiB: etcd's own check refuses it), `oversize_repeats` times; then
           `over_grpc_value` bytes (over gRPC's limit: the transport refuses it on the length prefix and
           drops the rest), `oversize_repeats` times: together more than a connection's flow-control
           window, so the server must give the window back for what it dropped. A Watch whose create request
           is over gRPC's limit (a key of `over_grpc_value` bytes). `big_values` Puts of `big_value` bytes
           and a Range of them all: a response over the clients' default receive limit (4 MiB in all three
           stacks), which the client refuses. Then a Range on the same channel still works (count only).

Statuses are reported as {"code": "INVALID_ARGUMENT", "message": "..."} (the canonical upper-case code
name); key-values as {"key", "value", "create_revision", "mod_revision", "version"} (text keys and values);
watch events as [type, key, value, create_revision, mod_revision, version].
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fastetcd.proto import rpc_pb2
from fastetcd.testing import ServerProcess

REPO = Path(__file__).resolve().parents[2]
PROTO_DIR = REPO / "proto"

# etcd's defaults: --max-request-bytes 1.5 MiB, and gRPC's receive limit 512 KiB above it.
MAX_REQUEST_BYTES = 1_572_864
GRPC_RECEIVE_LIMIT = MAX_REQUEST_BYTES + 512 * 1024
# Padding per watched value: 5,000 events are ~1.2 MB, more than a flow-control window, so the server still
# has a backlog when a client cancels mid-stream.
VALUE_PAD = 200


@dataclass(frozen=True)
class Params:
    endpoint: str
    metrics_url: str
    prefix: str  # every key the scenario writes starts with this
    proto_dir: str = str(PROTO_DIR)
    events: int = 5000
    txn_ops: int = 100
    value_pad: int = VALUE_PAD
    too_large_value: int = 1_600_000
    over_grpc_value: int = 2_200_000
    deadline_ms: int = 300
    settle_s: float = 10.0
    concurrent: int = 200
    oversize_repeats: int = 3
    big_values: int = 5
    big_value: int = 1_000_000

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    # Keys and values; every client spells them the same way (the clients get only the prefix).
    def key(self, section: str, name: str) -> str:
        return f"{self.prefix}{section}/{name}"

    def watch_key(self, i: int) -> str:
        return self.key("watch", f"{i:05d}")

    def watch_value(self, i: int) -> str:
        return f"v{i}-" + "x" * self.value_pad

    def lock_name(self) -> str:
        return self.key("deadline", "lock")


def params_for(server: ServerProcess, client: str) -> Params:
    assert server.metrics_url is not None, "start interop servers with metrics=True"
    return Params(endpoint=server.endpoint, metrics_url=server.metrics_url, prefix=f"interop/{client}/")


def run_client(argv: Sequence[str], params: Params, *, cwd: Path | None = None, timeout: float = 120.0
               ) -> dict[str, Any]:
    """Run a client process with ``params`` as its last argument; its stdout is the result JSON."""
    proc = subprocess.run([*argv, params.to_json()], capture_output=True, text=True, cwd=cwd, timeout=timeout)
    assert proc.returncode == 0, f"{argv[0]} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout)


def status(code: str, message: str) -> dict[str, str]:
    return {"code": code, "message": message}


def kv(key: str, value: str, create: int, mod: int, version: int) -> dict[str, Any]:
    return {"key": key, "value": value, "create_revision": create, "mod_revision": mod, "version": version}


def over_grpc_status(size: int, server_kind: str) -> dict[str, str]:
    """What a message of ``size`` bytes past gRPC's receive limit gets: grpc-go's words in etcd and in
    fastetcd's native transport.

    grpcio's C core refuses the message before any handler sees it, in its own words, so fastetcd on the
    grpcio transport cannot say etcd's (the code, which clients act on, is the same).
    """
    sizes = f"({size} vs. {GRPC_RECEIVE_LIMIT})"
    if server_kind == "grpcio":
        return status("RESOURCE_EXHAUSTED", f"SERVER: Received message larger than max {sizes}")
    return status("RESOURCE_EXHAUSTED", f"grpc: received message larger than max {sizes}")


def deadline_ok(got: dict[str, Any], p: Params, server_kind: str) -> None:
    """A call whose deadline passes fails with DEADLINE_EXCEEDED, after (not before) the deadline.

    The message is the client library's own (each words it differently), so only the code is compared.
    etcd has a second answer: its handler's context expires at the same moment as the client's timer, and
    grpc-go 1.38 sends the handler's context error as UNKNOWN "context deadline exceeded"; which one a
    client sees is a race inside etcd (both happen, for Lock and for Watch). fastetcd always answers
    DEADLINE_EXCEEDED.
    """
    if server_kind == "etcd" and (got["code"], got["message"]) == ("UNKNOWN", "context deadline exceeded"):
        pass
    else:
        assert got["code"] == "DEADLINE_EXCEEDED", got
    # Timers round to the millisecond; an answer well after the deadline means it was not honoured.
    assert p.deadline_ms - 5 <= got["elapsed_ms"] < p.deadline_ms + 5000, got


def check(result: dict[str, Any], p: Params, server_kind: str) -> None:
    """Assert a client's result; ``server_kind`` is "grpcio" or "native" (fastetcd's transport) or "etcd"."""
    check_unary(result["unary"], p)
    r0 = result["unary"]["put"]["revision"]
    check_watch(result["watch"], p, first_rev=r0 + 4 + p.concurrent)
    check_deadline(result["deadline"], p, server_kind)
    check_oversize(result["oversize"], p, server_kind)


def check_unary(u: dict[str, Any], p: Params) -> None:
    r0 = u["put"]["revision"]
    a, b = p.key("unary", "a"), p.key("unary", "b")
    assert u == {
        "put": {"revision": r0},
        "put_prev": {"revision": r0 + 1, "prev_value": "1"},
        "range": {"revision": r0 + 1, "count": 1, "kvs": [kv(a, "2", r0, r0 + 1, 2)]},
        "txn_success": {"revision": r0 + 2, "succeeded": True,
                        "responses": ["response_put", "response_range"],
                        "range_kvs": [kv(a, "2", r0, r0 + 1, 2)]},
        "txn_failure": {"revision": r0 + 2, "succeeded": False, "responses": ["response_range"],
                        "range_kvs": [kv(b, "3", r0 + 2, r0 + 2, 1)]},
        "delete": {"revision": r0 + 3, "deleted": 2, "prev_keys": [a, b]},
        "range_after_delete": {"revision": r0 + 3, "count": 0},
        "empty_key": status("INVALID_ARGUMENT", "etcdserver: key is not provided"),
        # Each Put gets a revision of its own, whatever order the server took them in.
        "concurrent_revisions": list(range(r0 + 4, r0 + 4 + p.concurrent)),
    }


def expected_events(p: Params, first_rev: int) -> list[list[Any]]:
    out = []
    for i in range(p.events):
        rev = first_rev + i // p.txn_ops
        out.append(["PUT", p.watch_key(i), p.watch_value(i), rev, rev, 1])
    return out


def check_responses(responses: list[list[int]], events: list[list[Any]]) -> None:
    """Per response [header revision, number of events]: headers never go backwards and never trail the
    events they carry, and the responses hold exactly the events reported."""
    assert sum(n for _, n in responses) == len(events)
    last, at = 0, 0
    for header_rev, n in responses:
        assert header_rev >= last, responses
        if n:
            assert header_rev >= events[at + n - 1][4], (header_rev, events[at + n - 1])
        last, at = header_rev, at + n


def check_watch(w: dict[str, Any], p: Params, first_rev: int) -> None:
    n_txns = p.events // p.txn_ops
    assert w["txn_revisions"] == list(range(first_rev, first_rev + n_txns))
    want = expected_events(p, first_rev)
    for name in ("live", "history"):
        got = w[name]["events"]
        # Compare the counts first: a long list diff is unreadable.
        assert len(got) == len(want), (name, len(got))
        assert got == want, name
        check_responses(w[name]["responses"], got)
    assert w["cancel_request"] == {"canceled": True, "same_watch_id": True}
    mid = w["midstream"]
    assert mid["code"] == "CANCELLED" and 0 < mid["events_before_cancel"] <= p.events, mid
    assert w["gauges_after"] == w["gauges_base"], w
    assert w["served_after"] == {"count": p.events}


def check_deadline(d: dict[str, Any], p: Params, server_kind: str) -> None:
    assert d["lock_key"].startswith(p.lock_name() + "/"), d
    deadline_ok(d["lock_deadline"], p, server_kind)
    assert d["lock_keys_after"] == 1, d  # the waiter's key went with its call; the holder's stays
    assert d["watch_deadline"]["created"] is True, d
    deadline_ok(d["watch_deadline"], p, server_kind)
    assert d["gauges_after"] == d["gauges_base"], d
    assert d["served_after"] == {"count": 0}, d  # both leases revoked: the lock keys went with them


def check_oversize(o: dict[str, Any], p: Params, server_kind: str) -> None:
    put = rpc_pb2.PutRequest(key=p.key("oversize", "huge").encode(), value=b"x" * p.over_grpc_value)
    watch = rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(key=b"x" * p.over_grpc_value))
    assert o == {
        "too_large": [status("INVALID_ARGUMENT", "etcdserver: request is too large")] * p.oversize_repeats,
        "over_grpc": [over_grpc_status(put.ByteSize(), server_kind)] * p.oversize_repeats,
        "watch_over_grpc": over_grpc_status(watch.ByteSize(), server_kind),
        # The client's own refusal: its words differ by stack, the code is the same.
        "response_over_client_limit": {"code": "RESOURCE_EXHAUSTED"},
        "served_after": {"count": p.big_values},
    }
