"""Micro-benchmarks of the native transport's hot paths, with a saved baseline as a regression gate.

Not unit tests. Run and compare with the baseline in bench/baselines/ (what CI does, see .ci/run):

    python -m pytest bench/test_transport_bench.py --benchmark-only \
        --benchmark-storage=bench/baselines --benchmark-compare=transport \
        --benchmark-compare-fail=min:150%

Refresh the baseline after an intended change (on an idle machine of CI's kind):

    python -m pytest bench/test_transport_bench.py --benchmark-only \
        --benchmark-storage=bench/baselines --benchmark-save=transport

The gate compares minimums, the figure least moved by a busy neighbour on a shared 2-core machine, and
fails only past +150%: it catches a hot path that got a coroutine, a copy or a Python object per call back,
not a few percent. Each benchmark checks the answer it times, so a path that got fast by getting wrong fails.

- decode: a Range request as the Range handler reads it (server/_wire.pyx's decoder + etcd's checks).
- encode: a RangeResponse around encoded KeyValues (server/_wire.pyx).
- in-memory call: one whole gRPC call through the native transport's Connection, bytes in, bytes out: HTTP/2
  frames and HPACK (nghttp2), gRPC framing, the direct Range handler over a real engine, the response frames.
  No socket and no event loop turn, so it measures the server's own code per call.
- loopback: one Range round trip from a minimal HTTP/2 client to a fastetcd process on the native
  transport over 127.0.0.1 (the client's own cost is included; it is small and constant).
"""

from __future__ import annotations

import asyncio
import socket
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hpack
import pytest
from fastetcd.server._wire import RangeArgs, decode_range_request, encode_range_response

from fastetcd.engine.state_machine import StateMachine
from fastetcd.proto import kv_pb2
from fastetcd.proto import rpc_pb2 as pb
from fastetcd.server import _native
from fastetcd.server.header import Header
from fastetcd.server.kv import KVService, check_range
from fastetcd.store.embedded import EmbeddedStore
from fastetcd.testing import start_fastetcd

RANGE_PATH = "/etcdserverpb.KV/Range"
KEY = b"foo"  # etcd's benchmark tool ranges over one small key, as bench/compare.py does
VALUE = b"v" * 256
MAX_REQUEST_BYTES = 1536 * 1024

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, SETTINGS, WINDOW_UPDATE = 0x0, 0x1, 0x4, 0x8
END_STREAM, END_HEADERS = 0x1, 0x4
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
MAX_WINDOW = 2**31 - 1


def frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream_id) + payload


def client_preface() -> bytes:
    """Preface, SETTINGS with a large stream window, and the connection window opened to the maximum:
    the client never reads flow control, so the server must never run out of window to answer."""
    settings = struct.pack(">HI", SETTINGS_INITIAL_WINDOW_SIZE, MAX_WINDOW)
    return (PREFACE + frame(SETTINGS, 0, 0, settings)
            + frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", MAX_WINDOW - 65535)))


class UnaryCalls:
    """Pre-encoded frames of one unary call per stream id: HEADERS (literals only, so the same block stays
    valid on every stream) and one DATA frame with END_STREAM carrying the length-prefixed request."""

    def __init__(self, path: str, request: bytes, authority: str = "bench") -> None:
        block = hpack.Encoder().encode([
            (":method", "POST"), (":scheme", "http"), (":path", path), (":authority", authority),
            ("content-type", "application/grpc"), ("te", "trailers"),
        ])
        self.block = block
        self.body = b"\x00" + struct.pack(">I", len(request)) + request
        self.next_id = 1

    def next(self) -> tuple[int, bytes]:
        sid = self.next_id
        self.next_id += 2
        return sid, (frame(HEADERS, END_HEADERS, sid, self.block) + frame(DATA, END_STREAM, sid, self.body))


def split_frames(buf: bytearray) -> Iterator[tuple[int, int, int, bytes]]:
    """Complete frames at the front of ``buf`` as (type, flags, stream id, payload), removed from it."""
    while len(buf) >= 9:
        length = int.from_bytes(buf[:3], "big")
        if len(buf) < 9 + length:
            return
        kind, flags = buf[3], buf[4]
        stream = int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
        payload = bytes(buf[9:9 + length])
        del buf[:9 + length]
        yield kind, flags, stream, payload


def grpc_message(frames: list[tuple[int, int, int, bytes]], sid: int) -> bytes:
    """The gRPC message of stream ``sid`` (an error is trailers-only: no message, and the caller's check
    of the response's content fails)."""
    data = b"".join(payload for kind, _, stream, payload in frames if stream == sid and kind == DATA)
    assert any(k == HEADERS and f & END_STREAM and s == sid for k, f, s, _ in frames), "the call did not end"
    return data[5:]


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def kv() -> Iterator[KVService]:
    """The real KV service over a real engine holding KEY (written through the engine, then stopped:
    reads are served from memory, which is what a Range does)."""
    with tempfile.TemporaryDirectory() as tmp:
        async def load() -> StateMachine:
            store = EmbeddedStore(str(Path(tmp) / "data"))
            sm = StateMachine(store)
            await sm.start()
            await sm.put(pb.PutRequest(key=KEY, value=VALUE))
            await sm.stop()
            await store.close()
            return sm

        sm = asyncio.run(load())
        yield KVService(sm, Header(cluster_id=1, member_id=2), max_request_bytes=MAX_REQUEST_BYTES,
                        max_txn_ops=128)


# ------------------------------------------------------------------------------------------ decode / encode


def test_decode_range_request(benchmark: Any) -> None:
    raw = pb.RangeRequest(key=KEY, serializable=True).SerializeToString()

    def decode() -> RangeArgs:
        r = decode_range_request(raw)
        check_range(r)
        return r

    r = benchmark(decode)
    assert (r.key, r.serializable) == (KEY, True)


@pytest.mark.parametrize("n", [1, 100])
def test_encode_range_response(benchmark: Any, n: int) -> None:
    header = Header(cluster_id=1, member_id=2).encode(42)
    kvs = [kv_pb2.KeyValue(key=b"k%05d" % i, value=VALUE, create_revision=i + 2, mod_revision=i + 2,
                       version=1).SerializeToString() for i in range(n)]
    out = benchmark(encode_range_response, header, kvs, False, n)
    resp = pb.RangeResponse.FromString(out)
    assert (resp.header.revision, resp.count, len(resp.kvs), resp.kvs[-1].value) == (42, n, n, VALUE)


# ------------------------------------------------------------------------------------------ in-memory call


class CapturingTransport:
    """What an asyncio transport gives the protocol, keeping what is written."""

    def __init__(self) -> None:
        self.out = bytearray()

    def write(self, data: bytes) -> None:
        self.out += data

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...

    def is_closing(self) -> bool:
        return False


class SteppedLoop:
    """The connection's event loop, stepped by hand: callbacks it schedules run when run_ready() says.
    (A direct Range needs only call_soon, for the flush after the response.)"""

    def __init__(self) -> None:
        self.ready: list[tuple[Callable, tuple]] = []

    def call_soon(self, callback: Callable, *args: Any, context: Any = None) -> None:
        self.ready.append((callback, args))

    def call_later(self, delay: float, callback: Callable, *args: Any, context: Any = None) -> asyncio.Handle:
        # Timers (the handshake timeout) never fire within a benchmark; the connection may cancel them.
        return asyncio.Handle(callback, args, self)  # type: ignore[arg-type]

    def time(self) -> float:
        return time.monotonic()

    def get_debug(self) -> bool:
        return False

    def run_ready(self) -> None:
        while self.ready:
            ready, self.ready = self.ready, []
            for callback, args in ready:
                callback(*args)


def test_unary_call_in_memory(benchmark: Any, kv: KVService) -> None:
    config = _native.ServerConfig({RANGE_PATH: ("direct", kv.range)}, MAX_REQUEST_BYTES + 512 * 1024,
                                  256 * 1024, 2**31 - 1, 4 * 1024 * 1024, 5.0, None)
    conn = _native.Connection(config)
    loop, transport = SteppedLoop(), CapturingTransport()
    asyncio.events._set_running_loop(loop)  # the protocol asks for its loop in connection_made
    try:
        conn.connection_made(transport)
    finally:
        asyncio.events._set_running_loop(None)
    conn.data_received(client_preface())
    loop.run_ready()
    calls = UnaryCalls(RANGE_PATH, pb.RangeRequest(key=KEY, serializable=True).SerializeToString())

    def call() -> int:
        sid, frames = calls.next()
        transport.out.clear()
        conn.data_received(frames)
        loop.run_ready()
        return sid

    sid = benchmark(call)
    frames = list(split_frames(bytearray(transport.out)))
    resp = pb.RangeResponse.FromString(grpc_message(frames, sid))
    assert [(x.key, x.value) for x in resp.kvs] == [(KEY, VALUE)]
    assert conn.stream_count == 0  # every call's stream was closed: nothing grows per call


# ------------------------------------------------------------------------------------------ loopback


class RawClient:
    """A blocking HTTP/2 client that sends one unary call and reads until its trailers."""

    def __init__(self, port: int, request: bytes) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(client_preface())
        self.calls = UnaryCalls(RANGE_PATH, request, authority=f"127.0.0.1:{port}")
        self.buf = bytearray()
        self.last: list[tuple[int, int, int, bytes]] = []

    def call(self) -> int:
        sid, frames = self.calls.next()
        self.sock.sendall(frames)
        self.last = []
        while True:
            for f in split_frames(self.buf):
                self.last.append(f)
                kind, flags, stream, _ = f
                if kind == HEADERS and flags & END_STREAM and stream == sid:
                    return sid
            chunk = self.sock.recv(65536)
            assert chunk, "the server closed the connection"
            self.buf += chunk

    def close(self) -> None:
        self.sock.close()


def test_unary_round_trip_loopback(benchmark: Any, tmp_path: Path) -> None:
    with start_fastetcd(tmp_path, ["--transport", "native"]) as server:
        client = RawClient(server.port, pb.RangeRequest(key=KEY, serializable=True).SerializeToString())
        try:
            sid = benchmark(client.call)
            resp = pb.RangeResponse.FromString(grpc_message(client.last, sid))
            assert resp.header.revision == 1 and resp.header.cluster_id != 0 and resp.count == 0
        finally:
            client.close()
