"""The interoperability scenario (tests/interop/scenario.py) on grpcio, Python's gRPC stack, with the
project's generated stubs. `run(params)` returns the result; as a script it prints it like the other clients:
``python tests/interop/grpcio_client.py '<params json>'``."""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc

from fastetcd.proto import kv_pb2, rpc_pb2, rpc_pb2_grpc, v3lock_pb2, v3lock_pb2_grpc
from fastetcd.testing import WATCH_GAUGES, gauges, prefix_end, wait_for_gauges

# The scenario's default deadline for calls that must not hang (not the ones that test deadlines).
CALL_TIMEOUT_S = 30.0


def _status(e: grpc.RpcError) -> dict[str, str]:
    return {"code": e.code().name, "message": e.details() or ""}


def _kv(kv: Any) -> dict[str, Any]:
    return {"key": kv.key.decode(), "value": kv.value.decode(), "create_revision": kv.create_revision,
            "mod_revision": kv.mod_revision, "version": kv.version}


def _event(ev: Any) -> list[Any]:
    kv = ev.kv
    return [kv_pb2.Event.EventType.Name(ev.type), kv.key.decode(), kv.value.decode(), kv.create_revision,
            kv.mod_revision, kv.version]


class WatchCall:
    """One Watch stream: requests go in through a queue, responses are read with ``next``."""

    _END = object()

    def __init__(self, stub: rpc_pb2_grpc.WatchStub, timeout: float | None = None) -> None:
        self._requests: queue.Queue[Any] = queue.Queue()
        self.call = stub.Watch(iter(self._requests.get, self._END), timeout=timeout)

    def send(self, request: rpc_pb2.WatchRequest) -> None:
        self._requests.put(request)

    def __iter__(self) -> Iterator[rpc_pb2.WatchResponse]:
        return self.call

    def cancel(self) -> None:
        self.call.cancel()
        self._requests.put(self._END)


def _create(key: bytes, end: bytes, start_revision: int = 0) -> rpc_pb2.WatchRequest:
    return rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(
        key=key, range_end=end, start_revision=start_revision))


def _read_events(call: WatchCall, n: int) -> tuple[list[list[Any]], list[list[int]], int]:
    """Read until ``n`` events came; returns (events, [header revision, events] per response, watch id)."""
    events: list[list[Any]] = []
    responses: list[list[int]] = []
    watch_id = -1
    for resp in call:
        if resp.created:
            watch_id = resp.watch_id
        if resp.events:
            events.extend(_event(ev) for ev in resp.events)
            responses.append([resp.header.revision, len(resp.events)])
        if len(events) >= n:
            break
    return events, responses, watch_id


def unary(p: dict[str, Any], kv: rpc_pb2_grpc.KVStub) -> dict[str, Any]:
    pre = p["prefix"] + "unary/"
    a, b = (pre + "a").encode(), (pre + "b").encode()
    t = CALL_TIMEOUT_S
    out: dict[str, Any] = {}
    r = kv.Put(rpc_pb2.PutRequest(key=a, value=b"1"), timeout=t)
    out["put"] = {"revision": r.header.revision}
    r = kv.Put(rpc_pb2.PutRequest(key=a, value=b"2", prev_kv=True), timeout=t)
    out["put_prev"] = {"revision": r.header.revision, "prev_value": r.prev_kv.value.decode()}
    r = kv.Range(rpc_pb2.RangeRequest(key=a), timeout=t)
    out["range"] = {"revision": r.header.revision, "count": r.count, "kvs": [_kv(x) for x in r.kvs]}
    value_is = rpc_pb2.Compare(result=rpc_pb2.Compare.EQUAL, target=rpc_pb2.Compare.VALUE, key=a)
    for name, want, success, failure in (
        ("txn_success", b"2", [rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=b, value=b"3")),
                               rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=a))], []),
        ("txn_failure", b"x", [], [rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=b))]),
    ):
        cmp = rpc_pb2.Compare()
        cmp.CopyFrom(value_is)
        cmp.value = want
        r = kv.Txn(rpc_pb2.TxnRequest(compare=[cmp], success=success, failure=failure), timeout=t)
        kinds = [op.WhichOneof("response") for op in r.responses]
        ranges = [_kv(x) for op in r.responses if op.HasField("response_range")
                  for x in op.response_range.kvs]
        out[name] = {"revision": r.header.revision, "succeeded": r.succeeded, "responses": kinds,
                     "range_kvs": ranges}
    r = kv.DeleteRange(rpc_pb2.DeleteRangeRequest(key=pre.encode(), range_end=prefix_end(pre.encode()),
                                                  prev_kv=True), timeout=t)
    out["delete"] = {"revision": r.header.revision, "deleted": r.deleted,
                     "prev_keys": [x.key.decode() for x in r.prev_kvs]}
    r = kv.Range(rpc_pb2.RangeRequest(key=pre.encode(), range_end=prefix_end(pre.encode()), count_only=True),
                 timeout=t)
    out["range_after_delete"] = {"revision": r.header.revision, "count": r.count}
    try:
        kv.Range(rpc_pb2.RangeRequest(key=b""), timeout=t)
        out["empty_key"] = {"code": "OK", "message": ""}
    except grpc.RpcError as e:
        out["empty_key"] = _status(e)
    futures = [kv.Put.future(rpc_pb2.PutRequest(key=f"{pre}c/{i}".encode(), value=b"c"), timeout=t)
               for i in range(p["concurrent"])]
    out["concurrent_revisions"] = sorted(f.result().header.revision for f in futures)
    return out


def write_events(p: dict[str, Any], kv: rpc_pb2_grpc.KVStub) -> list[int]:
    """The watch step's writes: ``events`` keys in Txns of ``txn_ops`` Puts; returns the Txns' revisions."""
    revs = []
    ops = p["txn_ops"]
    for j in range(p["events"] // ops):
        puts = [rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(
            key=f"{p['prefix']}watch/{i:05d}".encode(), value=(f"v{i}-" + "x" * p["value_pad"]).encode()))
            for i in range(j * ops, (j + 1) * ops)]
        revs.append(kv.Txn(rpc_pb2.TxnRequest(success=puts), timeout=CALL_TIMEOUT_S).header.revision)
    return revs


def watch(p: dict[str, Any], kv: rpc_pb2_grpc.KVStub, ws: rpc_pb2_grpc.WatchStub) -> dict[str, Any]:
    pre = (p["prefix"] + "watch/").encode()
    end = prefix_end(pre)
    n = p["events"]
    out: dict[str, Any] = {"gauges_base": list(gauges(p["metrics_url"], WATCH_GAUGES))}

    live = WatchCall(ws)
    live.send(_create(pre, end))
    first = next(iter(live))
    assert first.created, first
    revs = out["txn_revisions"] = write_events(p, kv)
    events, responses, _ = _read_events(live, n)
    out["live"] = {"events": events, "responses": responses}
    live.send(rpc_pb2.WatchRequest(cancel_request=rpc_pb2.WatchCancelRequest(watch_id=first.watch_id)))
    canceled = next(r for r in live if r.canceled)
    out["cancel_request"] = {"canceled": canceled.canceled,
                             "same_watch_id": canceled.watch_id == first.watch_id}
    live.cancel()

    history = WatchCall(ws)
    history.send(_create(pre, end, revs[0]))
    events, responses, _ = _read_events(history, n)
    out["history"] = {"events": events, "responses": responses}
    history.cancel()

    mid = WatchCall(ws)
    mid.send(_create(pre, end, revs[0]))
    got, _, _ = _read_events(mid, 1)
    mid.cancel()
    try:
        for _ in mid:
            pass
        code = "OK"
    except grpc.RpcError as e:
        code = e.code().name
    out["midstream"] = {"events_before_cancel": len(got), "code": code}

    base = tuple(out["gauges_base"])
    out["gauges_after"] = list(wait_for_gauges(p["metrics_url"], lambda g: g == base, timeout=p["settle_s"]))
    r = kv.Range(rpc_pb2.RangeRequest(key=pre, range_end=end, count_only=True), timeout=CALL_TIMEOUT_S)
    out["served_after"] = {"count": r.count}
    return out


def _timed(fn: Any) -> dict[str, Any]:
    t0 = time.monotonic()
    try:
        fn()
        got = {"code": "OK", "message": ""}
    except grpc.RpcError as e:
        got = _status(e)
    got["elapsed_ms"] = round((time.monotonic() - t0) * 1000)
    return got


def deadline(p: dict[str, Any], ch: grpc.Channel) -> dict[str, Any]:
    kv, ws = rpc_pb2_grpc.KVStub(ch), rpc_pb2_grpc.WatchStub(ch)
    leases, locks = rpc_pb2_grpc.LeaseStub(ch), v3lock_pb2_grpc.LockStub(ch)
    name = (p["prefix"] + "deadline/lock").encode()
    waiters = name + b"/"
    secs = p["deadline_ms"] / 1000
    out: dict[str, Any] = {"gauges_base": list(gauges(p["metrics_url"], WATCH_GAUGES))}
    l1, l2 = (leases.LeaseGrant(rpc_pb2.LeaseGrantRequest(TTL=60), timeout=CALL_TIMEOUT_S).ID
              for _ in range(2))
    held = locks.Lock(v3lock_pb2.LockRequest(name=name, lease=l1), timeout=CALL_TIMEOUT_S)
    out["lock_key"] = held.key.decode()
    out["lock_deadline"] = _timed(
        lambda: locks.Lock(v3lock_pb2.LockRequest(name=name, lease=l2), timeout=secs))

    def lock_keys() -> int:
        return kv.Range(rpc_pb2.RangeRequest(key=waiters, range_end=prefix_end(waiters), count_only=True),
                        timeout=CALL_TIMEOUT_S).count

    until = time.monotonic() + p["settle_s"]
    while lock_keys() != 1 and time.monotonic() < until:
        time.sleep(0.05)
    out["lock_keys_after"] = lock_keys()

    created = threading.Event()
    calls: list[WatchCall] = []

    def watch_until_deadline() -> None:
        # The deadline starts with the call, so the call is made inside the timed function.
        calls.append(WatchCall(ws, timeout=secs))
        calls[0].send(_create(name, b""))
        for resp in calls[0]:
            if resp.created:
                created.set()

    got = _timed(watch_until_deadline)
    calls[0].cancel()
    out["watch_deadline"] = {"created": created.is_set(), **got}
    base = tuple(out["gauges_base"])
    out["gauges_after"] = list(wait_for_gauges(p["metrics_url"], lambda g: g == base, timeout=p["settle_s"]))
    for lease in (l1, l2):
        leases.LeaseRevoke(rpc_pb2.LeaseRevokeRequest(ID=lease), timeout=CALL_TIMEOUT_S)
    out["served_after"] = {"count": lock_keys()}
    return out


def _outcome(fn: Any) -> dict[str, str]:
    try:
        fn()
        return {"code": "OK", "message": ""}
    except grpc.RpcError as e:
        return _status(e)


def oversize(p: dict[str, Any], kv: rpc_pb2_grpc.KVStub, ws: rpc_pb2_grpc.WatchStub) -> dict[str, Any]:
    pre = p["prefix"] + "oversize/"
    t = CALL_TIMEOUT_S
    out: dict[str, Any] = {}
    for name, size, key in (("too_large", p["too_large_value"], "big"),
                            ("over_grpc", p["over_grpc_value"], "huge")):
        request = rpc_pb2.PutRequest(key=f"{pre}{key}".encode(), value=b"x" * size)
        out[name] = [_outcome(lambda r=request: kv.Put(r, timeout=t)) for _ in range(p["oversize_repeats"])]
    create = _create(b"x" * p["over_grpc_value"], b"")
    out["watch_over_grpc"] = _outcome(lambda: list(ws.Watch(iter([create]), timeout=t)))
    for i in range(p["big_values"]):
        kv.Put(rpc_pb2.PutRequest(key=f"{pre}r/{i}".encode(), value=b"x" * p["big_value"]), timeout=t)
    big = (f"{pre}r/").encode()
    got = _outcome(lambda: kv.Range(rpc_pb2.RangeRequest(key=big, range_end=prefix_end(big)), timeout=t))
    out["response_over_client_limit"] = {"code": got["code"]}
    r = kv.Range(rpc_pb2.RangeRequest(key=pre.encode(), range_end=prefix_end(pre.encode()), count_only=True),
                 timeout=t)
    out["served_after"] = {"count": r.count}
    return out


def run(p: dict[str, Any]) -> dict[str, Any]:
    # grpcio's default send limit is unlimited already; the oversize step relies on that, so say it.
    with grpc.insecure_channel(p["endpoint"], options=[("grpc.max_send_message_length", -1)]) as ch:
        kv = rpc_pb2_grpc.KVStub(ch)
        return {
            "client": f"grpcio {grpc.__version__}",
            "unary": unary(p, kv),
            "watch": watch(p, kv, rpc_pb2_grpc.WatchStub(ch)),
            "deadline": deadline(p, ch),
            "oversize": oversize(p, kv, rpc_pb2_grpc.WatchStub(ch)),
        }


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[1]))))
