"""A Watch bidi stream driven from synchronous test code, and the attribution of its responses to watches.

Requests are fed through a queue; a reader thread records every response with its arrival time. Test code
waits on a condition until a predicate over the recorded responses holds, so nothing relies on sleeps.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import grpc

from fastetcd.proto import kv_pb2, rpc_pb2, rpc_pb2_grpc

WatchResponse = rpc_pb2.WatchResponse

# What clientv3.WithRequireLeader sends (kube-apiserver watches with it).
REQUIRE_LEADER = (("hasleader", "true"),)


@dataclass
class Received:
    at: float  # time.monotonic() at arrival
    resp: WatchResponse


class WatchStream:
    def __init__(self, channel: grpc.Channel, metadata: Sequence[tuple[str, str]] = ()) -> None:
        self._requests: queue.Queue[rpc_pb2.WatchRequest | None] = queue.Queue()
        self._cond = threading.Condition()
        self.received: list[Received] = []
        self.error: grpc.RpcError | None = None
        self.ended = False
        self._call = rpc_pb2_grpc.WatchStub(channel).Watch(self._request_iter(), metadata=list(metadata))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _request_iter(self) -> Iterator[rpc_pb2.WatchRequest]:
        while True:
            req = self._requests.get()
            if req is None:
                return
            yield req

    def _read(self) -> None:
        try:
            for resp in self._call:
                with self._cond:
                    self.received.append(Received(time.monotonic(), resp))
                    self._cond.notify_all()
        except grpc.RpcError as e:
            with self._cond:
                if e.code() != grpc.StatusCode.CANCELLED:
                    self.error = e
        finally:
            with self._cond:
                self.ended = True
                self._cond.notify_all()

    def send(self, req: rpc_pb2.WatchRequest) -> None:
        self._requests.put(req)

    def create(self, create: rpc_pb2.WatchCreateRequest) -> None:
        self.send(rpc_pb2.WatchRequest(create_request=create))

    def cancel(self, watch_id: int) -> None:
        self.send(rpc_pb2.WatchRequest(cancel_request=rpc_pb2.WatchCancelRequest(watch_id=watch_id)))

    def request_progress(self) -> None:
        self.send(rpc_pb2.WatchRequest(progress_request=rpc_pb2.WatchProgressRequest()))

    def responses(self) -> list[WatchResponse]:
        with self._cond:
            return [r.resp for r in self.received]

    def wait(self, predicate: Callable[[list[WatchResponse]], bool], timeout: float) -> bool:
        """Block until predicate(responses so far) holds or the stream ends; False on timeout/end."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if predicate([r.resp for r in self.received]):
                    return True
                left = deadline - time.monotonic()
                if left <= 0 or self.ended:
                    return False
                self._cond.wait(left)

    def wait_created(self, count: int, timeout: float = 10.0) -> bool:
        """Until `count` created responses have arrived in total."""
        return self.wait(lambda rs: sum(1 for r in rs if r.created) >= count, timeout)

    def close(self) -> None:
        self._requests.put(None)
        self._call.cancel()
        self._reader.join(timeout=10)


@dataclass
class WatchLog:
    """Everything one watch received: its created response, its events flattened across responses
    (grouping into responses may legitimately differ between servers), and the other responses
    (cancellation, compaction, progress) in arrival order."""

    created: WatchResponse
    events: list[kv_pb2.Event] = field(default_factory=list)
    others: list[WatchResponse] = field(default_factory=list)
    # (header revision, largest event mod_revision) per event response, for the header invariant.
    event_headers: list[tuple[int, int]] = field(default_factory=list)

    @property
    def ended(self) -> bool:
        return self.created.canceled or any(r.canceled or r.compact_revision for r in self.others)


def attribute(responses: Sequence[WatchResponse]) -> tuple[list[WatchLog], list[WatchResponse]]:
    """Split one stream's responses into one log per create request (in request order: created
    responses come back in the order of the creates) and the responses of no live watch (e.g. replies to
    WatchProgressRequest, watch_id -1)."""
    logs: list[WatchLog] = []
    live: dict[int, WatchLog] = {}
    stray: list[WatchResponse] = []
    for resp in responses:
        if resp.created:
            log = WatchLog(created=resp)
            logs.append(log)
            if not resp.canceled:
                live[resp.watch_id] = log
            continue
        log = live.get(resp.watch_id)
        if log is None:
            stray.append(resp)
            continue
        if resp.events:
            log.events.extend(resp.events)
            log.event_headers.append((resp.header.revision, max(e.kv.mod_revision for e in resp.events)))
        else:
            log.others.append(resp)
        if resp.canceled:
            del live[resp.watch_id]
    return logs, stray
