"""A client that half-closes its Watch stream keeps receiving events, as with etcd.

Python clients often send their create requests from a finite iterator; the stream must stay open after
that iterator ends, or a watch that replays history ends before delivering anything.
"""

from __future__ import annotations

import pytest

from fastetcd.proto import rpc_pb2, rpc_pb2_grpc
from fastetcd.testing import channel


def _events_after_half_close(endpoint: str, key: bytes, want: int) -> list[tuple[int, bytes]]:
    with channel(endpoint) as ch:  # TLS under --tls
        watch = rpc_pb2_grpc.WatchStub(ch)
        create = rpc_pb2.WatchRequest(
            create_request=rpc_pb2.WatchCreateRequest(key=key, range_end=key + b"\xff", start_revision=1)
        )
        got: list[tuple[int, bytes]] = []
        responses = watch.Watch(iter([create]), timeout=10)  # the request side ends right after the create
        for resp in responses:
            got.extend((ev.type, ev.kv.key) for ev in resp.events)
            if len(got) >= want:
                responses.cancel()
                break
        return got


@pytest.mark.parametrize("which", ["subject", "oracle"])
def test_half_closed_watch_still_replays_and_follows(server_pair, which: str) -> None:
    server = getattr(server_pair, which)
    with channel(server.endpoint) as ch:
        kv = rpc_pb2_grpc.KVStub(ch)
        for i in range(3):
            kv.Put(rpc_pb2.PutRequest(key=b"hc/%d" % i, value=b"v"))
        kv.DeleteRange(rpc_pb2.DeleteRangeRequest(key=b"hc/0"))
    events = _events_after_half_close(server.endpoint, b"hc/", 4)
    assert events == [(0, b"hc/0"), (0, b"hc/1"), (0, b"hc/2"), (1, b"hc/0")]
